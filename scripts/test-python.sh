#!/usr/bin/env bash
# Tests the Python bindings (bindings/python, the ctypes package `ember`) the way a user gets
# them: builds libember, makes a fresh virtual environment in a temporary directory, installs
# pytest and numpy, installs the package with a plain `pip install bindings/python` (no
# compiler involved), then runs its pytest suite and the examples in examples/python.
#
#   scripts/test-python.sh
#
# Env:
#   PYTHON            interpreter to make the venv with (default: python3, >= 3.9)
#   EMBER_TEST_MODEL  SmolLM2 GGUF for the real-model tests and the examples (default: the
#                     path scripts/fetch-model.sh prints; it downloads once, then it is cached)
#   EMBER_NO_MODEL=1  skip the real-model tests and run the examples on the tiny model
#   PYTEST_ARGS       extra pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd -P)"
PYTHON="${PYTHON:-python3}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

log() { echo "test-python: $*" >&2; }
t0=$SECONDS

log "building libember and the tiny-model writer (release)"
cargo build --release --locked -q -p ember-capi
cargo build --release --locked -q -p ember-tests --example write_tiny
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$(uname -s)" in
  Darwin) LIB="$TARGET_DIR/release/libember.dylib" ;;
  MINGW* | MSYS* | CYGWIN*) LIB="$TARGET_DIR/release/ember.dll" ;;
  *) LIB="$TARGET_DIR/release/libember.so" ;;
esac
[[ -f "$LIB" ]] || { log "missing $LIB"; exit 1; }
export EMBER_LIBRARY="$LIB"

if [[ "${EMBER_NO_MODEL:-0}" == 1 ]]; then
  unset EMBER_TEST_MODEL
elif [[ -z "${EMBER_TEST_MODEL:-}" ]]; then
  EMBER_TEST_MODEL="$(scripts/fetch-model.sh)"
  export EMBER_TEST_MODEL
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/ember-python.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

log "virtual environment in $TMP/venv"
"$PYTHON" -m venv "$TMP/venv"
PY="$TMP/venv/bin/python"
[[ -x "$PY" ]] || PY="$TMP/venv/Scripts/python.exe"
"$PY" -m pip install -q --disable-pip-version-check pytest numpy
rm -rf "$ROOT/bindings/python/build" "$ROOT"/bindings/python/*.egg-info
# A non-editable install from the source tree: proves the package builds without a compiler.
"$PY" -m pip install -q --disable-pip-version-check "$ROOT/bindings/python"
rm -rf "$ROOT/bindings/python/build" "$ROOT"/bindings/python/*.egg-info

# Run from the temporary directory so that `import ember` finds the installed copy, not
# the checkout.
cd "$TMP"
log "pytest"
EMBER_PY_EXPECT_INSTALLED=1 "$PY" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} \
  "$ROOT/bindings/python/tests"

MODEL="${EMBER_TEST_MODEL:-}"
if [[ -z "$MODEL" ]]; then
  MODEL="$TMP/tiny.gguf"
  (cd "$ROOT" && cargo run --release --locked -q -p ember-tests --example write_tiny -- \
    "$MODEL" llama gguf q4_1)
fi

log "examples/python/generate.py"
out="$("$PY" "$ROOT/examples/python/generate.py" -m "$MODEL" -p "The capital of France is" \
  -n 12 --temp 0)"
echo "$out"
if [[ -n "${EMBER_TEST_MODEL:-}" ]] && [[ "$out" != *Paris* ]]; then
  log "generate.py did not say Paris"
  exit 1
fi

# Training on a real model is slow on a CPU rasterizer: the finetune example runs a few
# steps on the tiny model whatever EMBER_TEST_MODEL says.
log "examples/python/finetune.py (tiny model, 4 steps)"
TINY="$TMP/tiny.gguf"
if [[ ! -f "$TINY" ]]; then
  (cd "$ROOT" && cargo run --release --locked -q -p ember-tests --example write_tiny -- \
    "$TINY" llama gguf q4_1)
fi
printf '{"text": "abcabcabcabcabcabc"}\n{"prompt": "abcab", "completion": "cabcabc"}\n' \
  >"$TMP/finetune.jsonl"
out="$("$PY" "$ROOT/examples/python/finetune.py" -m "$TINY" --data "$TMP/finetune.jsonl" \
  --out "$TMP/finetune-lora" --steps 4 --batch-size 2 --rank 4 --targets q,v --seq-len 32 \
  --lr 1e-2 --schedule constant -p "abcab" -n 8)"
echo "$out"
[[ -f "$TMP/finetune-lora/adapter_config.json" ]] || { log "finetune.py saved no adapter"; exit 1; }
[[ "$out" == *"tuned:"* ]] || { log "finetune.py did not generate with the adapter"; exit 1; }

if [[ -n "${EMBER_TEST_MODEL:-}" ]]; then
  log "examples/python/chat.py (piped stdin)"
  out="$(printf 'Hi!\nWhat is the capital of France?\n' \
    | "$PY" "$ROOT/examples/python/chat.py" -m "$MODEL" --temp 0 -n 24)"
  echo "$out"
  [[ "$(grep -c '^> ' <<<"$out")" == 2 ]] || { log "chat.py did not answer two turns"; exit 1; }
else
  log "chat.py needs a chat model; skipped (EMBER_NO_MODEL=1)"
fi

log "all Python binding tests passed ($((SECONDS - t0)) s)"
