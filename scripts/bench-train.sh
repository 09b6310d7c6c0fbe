#!/usr/bin/env bash
# LoRA training speed and memory: Ember (`ember bench-train`) against PyTorch + PEFT on the
# CPU (scripts/bench_train_peft.py), same GGUF, same shape of work, one after the other (never
# at once), one combined JSON object on stdout.
#
#   scripts/bench-train.sh [-m MODEL] [--seq 256] [--lora-rank 8] [--steps 3]
#
# Both run one sequence of SEQ token ids per optimizer step (the same ids: Ember's seeded
# generator, ported to the script), LoRA rank R, alpha 2R, on q,k,v,o,gate,up,down_proj,
# AdamW lr 1e-4 with clipping to norm 1.0; one warmup step, then STEPS timed steps, STEPS
# training forwards (loss, no grad) and STEPS inference prefills. Each reports
# train_tokens_per_s, train_step_s, step_over_forward and peak_rss_mb; see the head of
# scripts/bench_train_peft.py for what differs (torch trains over f32 dequantized weights).
#
# Where Ember runs on lavapipe (a CPU Vulkan driver) both use the same CPU cores, but torch's
# speed is context, not a target: it is MKL/oneDNN kernels against SPIR-V compiled by llvmpipe,
# and on real hardware Ember runs on the GPU. The memory ratio is the more telling one.
#
# Peak memory compared (ratios.peak_memory): Ember's peak RSS when its device is a CPU driver
# (llvmpipe/lavapipe/SwiftShader), since there "GPU" buffers are host allocations of the same
# process and already counted in the RSS; on a real GPU, peak RSS + gpu_mb (the device buffers
# bench-train allocates: weights and training state; a size, not a measured peak). torch's is
# its whole-process peak RSS (ru_maxrss), which also includes its GGUF load.
#
# Env: EMBER (binary, default target/release/ember: build it first with
#   cargo build --release -p ember-cli), PEFT_PYTHON (default /tmp/peers/hf/bin/python: torch,
#   transformers, peft, gguf), TORCH_THREADS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
EMBER=${EMBER:-target/release/ember}
PEFT_PYTHON=${PEFT_PYTHON:-/tmp/peers/hf/bin/python}
TORCH_THREADS=${TORCH_THREADS:-2}
MODEL="" SEQ=256 RANK=8 STEPS=3
while [ $# -gt 0 ]; do
  case "$1" in
    -m|--model) MODEL=$2; shift 2 ;;
    --seq) SEQ=$2; shift 2 ;;
    --lora-rank) RANK=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[ -n "$MODEL" ] || MODEL=$(scripts/fetch-model.sh)
[ -x "$EMBER" ] || { echo "no $EMBER: cargo build --release -p ember-cli" >&2; exit 1; }
[ -x "$PEFT_PYTHON" ] || { echo "no $PEFT_PYTHON (needs torch, transformers, peft, gguf)" >&2; exit 1; }
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

t0=$(date +%s)
if ! "$EMBER" bench-train -m "$MODEL" --seq "$SEQ" --lora-rank "$RANK" --steps "$STEPS" --json \
    >"$out/ember.json" 2>"$out/ember.log"; then
  echo "ember bench-train failed:" >&2; tail -20 "$out/ember.log" >&2; exit 1
fi
t1=$(date +%s)
if ! "$PEFT_PYTHON" scripts/bench_train_peft.py "$MODEL" --seq "$SEQ" --lora-rank "$RANK" \
    --steps "$STEPS" --threads "$TORCH_THREADS" >"$out/peft.json" 2>"$out/peft.log"; then
  echo "bench_train_peft.py failed:" >&2; tail -20 "$out/peft.log" >&2; exit 1
fi
t2=$(date +%s)

python3 - "$out" "$((t1 - t0))" "$((t2 - t1))" <<'PY'
import json, re, sys
d, ember_wall, peft_wall = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
em = json.load(open(f"{d}/ember.json"))
pt = json.load(open(f"{d}/peft.json"))
em["wall_s"], pt["wall_s"] = ember_wall, peft_wall
cpu_driver = re.search(r"llvmpipe|lavapipe|swiftshader", f"{em.get('device')} {em.get('driver')}", re.I)
em_peak = em["peak_rss_mb"] + (0.0 if cpu_driver else em["gpu_mb"])
em["peak_memory_mb"] = em_peak
em["peak_memory_basis"] = "peak_rss_mb (CPU driver: device buffers are in RSS)" if cpu_driver \
    else "peak_rss_mb + gpu_mb"
pt["peak_memory_mb"] = pt["peak_rss_mb"]
if em["trainable_params"] != pt["trainable_params"]:
    print(f"warning: trainable params differ: ember {em['trainable_params']}, peft {pt['trainable_params']}",
          file=sys.stderr)
ratios = {  # ember / peft: >1 means Ember is faster (tokens/s) or uses more memory
    "tokens_per_s": em["train_tokens_per_s"] / pt["train_tokens_per_s"],
    "step_s": em["train_step_s"] / pt["train_step_s"],
    "forward_s": em["forward_s"] / pt["forward_s"],
    "step_over_forward": em["step_over_forward"] / pt["step_over_forward"],
    "peak_memory": em_peak / pt["peak_memory_mb"],
}
device = {"ember": f"{em.get('device')} ({em.get('backend')}, {em.get('driver')})",
          "peft": f"cpu, torch {pt.get('torch')}, {pt.get('threads')} threads",
          "ember_is_cpu_driver": bool(cpu_driver)}
print(json.dumps({"ember": em, "peft": pt, "ratios": ratios, "device": device}, indent=2))
PY
