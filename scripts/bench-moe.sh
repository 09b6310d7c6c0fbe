#!/usr/bin/env bash
# Mixture-of-Experts decode benchmark, one run, one JSON object on stdout:
#
#  1. Ember on a synthetic MoE model (E=8 experts, top-2, expert width F) against the same
#     model with a dense SwiGLU feed-forward of width 2F (equal ACTIVE parameters, every other
#     tensor byte-identical). Target: MoE decode time <= 1.5 x dense decode time
#     (ratios.moe_decode_time_over_dense = dense decode tok/s / MoE decode tok/s).
#  2. Ember against llama.cpp's Vulkan backend (the fair peer: same device) on the same MoE
#     GGUF, plus llama.cpp's CPU backend for context.
#
#   scripts/bench-moe.sh [--prompt N] [--gen M] [--reps R] [--no-cpu] [--llamacpp-dense]
#                        [--models DIR] [-- MAKE_BENCH_MOE_ARGS...]
#
# e.g. scripts/bench-moe.sh --gen 64 -- --layers 6 --expert-ff 1024 --qtype q8_0
# (keep --reps >= 2: llama.cpp compiles its Vulkan pipelines during the first rep, and
# the best rep is reported)
#
# The models are written by scripts/make_bench_moe.py (random weights, fixed seed, the
# SmolLM2 test model's tokenizer) into a cache dir keyed by the generator and its arguments
# ($EMBER_MODEL_DIR/bench-moe-<hash>, default under ~/.cache/ember/models) and reused.
# Peers: ../shared/tools/setup-peers.sh ($PEERS/vk: llama-cpp-python built with Vulkan,
# $PEERS/cpu, $PEERS/hf: numpy + gguf; PEERS defaults to /tmp/peers).
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s.%N)
PEERS=${PEERS:-/tmp/peers}
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

PROMPT=64 GEN=32 REPS=2 CPU=1 LDENSE=0 MODELS=""
MAKE_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --prompt) PROMPT=$2; shift 2 ;;
    --gen) GEN=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --no-cpu) CPU=0; shift ;;
    --llamacpp-dense) LDENSE=1; shift ;;
    --models) MODELS=$2; shift 2 ;;
    --) shift; MAKE_ARGS=("$@"); break ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-moe: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
log() { echo "bench-moe: $*" >&2; }

for v in vk hf; do
  [ -x "$PEERS/$v/bin/python" ] || { echo "missing $PEERS/$v: run ../shared/tools/setup-peers.sh" >&2; exit 1; }
done
if [ "$CPU" = 1 ] && [ ! -x "$PEERS/cpu/bin/python" ]; then
  log "no $PEERS/cpu: skipping llama.cpp CPU"; CPU=0
fi

log "building ember-cli (release)"
cargo build --release --locked -q -p ember-cli
EMBER=./target/release/ember

# --- models (cached) ---
TOK=$(scripts/fetch-model.sh)
if [ -z "$MODELS" ]; then
  key=$( { sha256sum scripts/make_bench_moe.py | cut -d' ' -f1; printf '%s\n' "${MAKE_ARGS[@]+"${MAKE_ARGS[@]}"}"; basename "$TOK"; } \
         | sha256sum | cut -c1-12)
  MODELS="${EMBER_MODEL_DIR:-$HOME/.cache/ember/models}/bench-moe-$key"
fi
MOE="$MODELS/moe.gguf" DENSE="$MODELS/dense.gguf"
if [ -f "$MOE" ] && [ -f "$DENSE" ]; then
  log "reusing $MODELS"
else
  log "writing models into $MODELS"
  "$PEERS/hf/bin/python" scripts/make_bench_moe.py "$MODELS" --tokenizer-from "$TOK" \
    ${MAKE_ARGS[@]+"${MAKE_ARGS[@]}"} >&2
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# run NAME CMD...: stdout to $out/NAME.json, stderr to $out/NAME.log; on failure show the log.
run() {
  local name=$1; shift
  local t=$(date +%s.%N)
  if ! "$@" >"$out/$name.json" 2>"$out/$name.log"; then
    echo "bench-moe: $name failed: $*" >&2; tail -30 "$out/$name.log" >&2; exit 1
  fi
  log "$name done in $(python3 -c "import sys;print(round($(date +%s.%N)-$t,1))")s"
}

# --- Ember: MoE and dense ---
run ember_moe $EMBER bench -m "$MOE" --prompt "$PROMPT" --gen "$GEN" --reps "$REPS" --json
run ember_dense $EMBER bench -m "$DENSE" --prompt "$PROMPT" --gen "$GEN" --reps "$REPS" --json
N_EXPERT=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['experts']['n'])" "$out/ember_moe.json")

# --- llama.cpp ---
# Without GGML_VK_VISIBLE_DEVICES=0 ggml-vulkan ignores lavapipe (a CPU-type device) and runs
# on its CPU backend; check its log names the Vulkan device, offloads every layer, and loaded
# the experts (print_info: n_expert = E).
check_llama() {  # NAME VULKAN(0/1) EXPECT_EXPERTS
  local l="$out/$1.log"
  if [ "$2" = 1 ] && ! grep -qiE "using device Vulkan0|ggml_vulkan: 0 =" "$l"; then
    echo "bench-moe: llama.cpp ($1) did not use its Vulkan device; log:" >&2; tail -20 "$l" >&2; exit 1
  fi
  if [ "$2" = 1 ] && grep -qE "offloaded ([0-9]+)/([0-9]+) layers" "$l" \
     && ! grep -oE "offloaded ([0-9]+)/([0-9]+) layers" "$l" | awk -F'[ /]' '{exit !($2==$3)}'; then
    echo "bench-moe: llama.cpp ($1) did not offload every layer:" >&2; grep -E "offloaded" "$l" >&2; exit 1
  fi
  if [ "$3" -gt 0 ] && ! grep -qE "n_expert +=  *$3\$" "$l"; then
    echo "bench-moe: llama.cpp ($1) did not load the model as a $3-expert MoE; log:" >&2
    grep -E "n_expert|error|failed" "$l" >&2 || tail -20 "$l" >&2; exit 1
  fi
}
run llamacpp_vulkan env GGML_VK_VISIBLE_DEVICES=0 "$PEERS/vk/bin/python" scripts/bench_llamacpp.py \
  "$MOE" --prompt "$PROMPT" --gen "$GEN" --reps "$REPS" --gpu
check_llama llamacpp_vulkan 1 "$N_EXPERT"
if [ "$LDENSE" = 1 ]; then
  run llamacpp_vulkan_dense env GGML_VK_VISIBLE_DEVICES=0 "$PEERS/vk/bin/python" scripts/bench_llamacpp.py \
    "$DENSE" --prompt "$PROMPT" --gen "$GEN" --reps "$REPS" --gpu
  check_llama llamacpp_vulkan_dense 1 0
fi
if [ "$CPU" = 1 ]; then
  run llamacpp_cpu "$PEERS/cpu/bin/python" scripts/bench_llamacpp.py "$MOE" --prompt "$PROMPT" \
    --gen "$GEN" --reps "$REPS"
  check_llama llamacpp_cpu 0 "$N_EXPERT"
fi

# Sanity: Ember and llama.cpp (CPU) must read the file the same way: equal greedy text.
export GREEDY_PROMPT="Hello, my name is"
run greedy_ember $EMBER generate -m "$MOE" -p "$GREEDY_PROMPT" -n 12 --temp 0 --json
if [ "$CPU" = 1 ]; then
  run greedy_llamacpp "$PEERS/cpu/bin/python" -c '
import json, sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=2, verbose=False)
r = llm.create_completion(sys.argv[2], max_tokens=12, temperature=0.0)
print(json.dumps({"text": r["choices"][0]["text"]}))' "$MOE" "$GREEDY_PROMPT"
fi

python3 - "$out" "$MODELS" "$T0" "$LDENSE" "$CPU" <<'PY'
import json, os, re, sys, time
d, models, t0, ldense, cpu = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1", sys.argv[5] == "1"
load = lambda n: json.load(open(f"{d}/{n}.json"))
moe, dense = load("ember_moe"), load("ember_dense")
vk = load("llamacpp_vulkan")
m = re.search(r"ggml_vulkan: 0 = ([^|(]*)", open(f"{d}/llamacpp_vulkan.log").read())
vk["device"] = m.group(1).strip() if m else None
r = {
    "moe_decode_time_over_dense": dense["decode_tok_s"] / moe["decode_tok_s"],
    "moe_prefill_time_over_dense": dense["prefill_tok_s"] / moe["prefill_tok_s"],
    "ember_vs_llamacpp_vulkan_prefill": moe["prefill_tok_s"] / vk["prefill_tok_s"],
    "ember_vs_llamacpp_vulkan_decode": moe["decode_tok_s"] / vk["decode_tok_s"],
}
r["moe_decode_target_met"] = r["moe_decode_time_over_dense"] <= 1.5
res = {"ember_moe": moe, "ember_dense": dense, "llamacpp_vulkan": vk}
if ldense:
    vkd = load("llamacpp_vulkan_dense")
    res["llamacpp_vulkan_dense"] = vkd
    r["llamacpp_vulkan_moe_decode_time_over_dense"] = vkd["decode_tok_s"] / vk["decode_tok_s"]
if cpu:
    c = load("llamacpp_cpu")
    res["llamacpp_cpu"] = c
    r["ember_vs_llamacpp_cpu_prefill"] = moe["prefill_tok_s"] / c["prefill_tok_s"]
    r["ember_vs_llamacpp_cpu_decode"] = moe["decode_tok_s"] / c["decode_tok_s"]
params = {
    "moe_total": moe.get("params"), "moe_active": moe.get("active_params"),
    "dense_total": dense.get("params"), "dense_active": dense.get("active_params", dense.get("params")),
}
if params["moe_total"] and params["moe_active"]:
    params["moe_active_over_total"] = params["moe_active"] / params["moe_total"]
if params["moe_active"] and params["dense_active"]:
    params["moe_active_over_dense_active"] = params["moe_active"] / params["dense_active"]
greedy = {"prompt": os.environ["GREEDY_PROMPT"], "ember": load("greedy_ember").get("text")}
if cpu:
    greedy["llamacpp_cpu"] = load("greedy_llamacpp")["text"]
    greedy["match"] = greedy["ember"] == greedy["llamacpp_cpu"]
summary = {
    "device": moe.get("device"), "backend": moe.get("backend"), "driver": moe.get("driver"),
    "llamacpp_vulkan_device": vk["device"],
    "models": models, "experts": moe.get("experts"),
    "prompt": moe.get("prompt"), "gen": moe.get("gen"),
    "params": params, "ratios": r, "greedy_moe": greedy, **res,
    "wall_s": round(time.time() - t0, 1),
}
# One line per innermost list of numbers (expert_load counts/shares) keeps it readable.
text = json.dumps(summary, indent=2)
text = re.sub(r"\[\s*([-+0-9.eE,\s]+?)\s*\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]", text)
print(text)
PY
