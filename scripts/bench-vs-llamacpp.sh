#!/usr/bin/env bash
# Ember vs llama.cpp on the same GGUF, same machine, one run: llama.cpp's Vulkan backend
# (the fair peer: same device), Ember, and llama.cpp's CPU backend for context. Prints each
# result as JSON, then the ratios.
#
#   scripts/bench-vs-llamacpp.sh [MODEL] [PROMPT_TOKENS] [GEN_TOKENS]
#
# The peers come from ../shared/tools/setup-peers.sh (llama-cpp-python 0.3.16 built with
# Vulkan in $PEERS/vk, 0.3.36 on CPU in $PEERS/cpu; PEERS defaults to /tmp/peers).
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${PEERS:-/tmp/peers}
MODEL=${1:-$(scripts/fetch-model.sh)}
PROMPT=${2:-256}
GEN=${3:-128}
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
for v in vk cpu; do
  [ -x "$PEERS/$v/bin/python" ] || { echo "missing $PEERS/$v: run ../shared/tools/setup-peers.sh" >&2; exit 1; }
done
cargo build --release --locked -q -p ember-cli
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# llama.cpp on Vulkan. Without GGML_VK_VISIBLE_DEVICES=0 ggml-vulkan ignores lavapipe (a
# CPU-type device) and runs on its CPU backend; check its log names the Vulkan device.
GGML_VK_VISIBLE_DEVICES=0 "$PEERS/vk/bin/python" scripts/bench_llamacpp.py "$MODEL" \
  --prompt "$PROMPT" --gen "$GEN" --gpu >"$out/vk.json" 2>"$out/vk.log"
if ! grep -qiE "using device Vulkan0|ggml_vulkan: 0 =" "$out/vk.log"; then
  echo "llama.cpp did not use its Vulkan device; log:" >&2; tail -20 "$out/vk.log" >&2; exit 1
fi
vkdev=$(grep -oiE "ggml_vulkan: 0 = [^|(]*" "$out/vk.log" | head -1 | sed 's/ggml_vulkan: 0 = //')

./target/release/ember bench -m "$MODEL" --prompt "$PROMPT" --gen "$GEN" --json >"$out/ember.json" 2>"$out/ember.log"

"$PEERS/cpu/bin/python" scripts/bench_llamacpp.py "$MODEL" --prompt "$PROMPT" --gen "$GEN" \
  >"$out/cpu.json" 2>"$out/cpu.log"

python3 - "$out" "$vkdev" <<'PY'
import json, sys
d, vkdev = sys.argv[1], sys.argv[2]
vk = json.load(open(f"{d}/vk.json")); vk["device"] = vkdev.strip()
em = json.load(open(f"{d}/ember.json")); cpu = json.load(open(f"{d}/cpu.json"))
ratios = {
    "ember_vs_llamacpp_vulkan_prefill": em["prefill_tok_s"] / vk["prefill_tok_s"],
    "ember_vs_llamacpp_vulkan_decode": em["decode_tok_s"] / vk["decode_tok_s"],
    "ember_vs_llamacpp_cpu_prefill": em["prefill_tok_s"] / cpu["prefill_tok_s"],
    "ember_vs_llamacpp_cpu_decode": em["decode_tok_s"] / cpu["decode_tok_s"],
}
print(json.dumps({"llamacpp_vulkan": vk, "ember": em, "llamacpp_cpu": cpu, "ratios": ratios}, indent=2))
PY
