#!/usr/bin/env bash
# Tests the C ABI from C, the way a C user gets it:
#
#   1. builds libember (release: libember.so and libember.a) and installs it, its header and
#      ember.pc into a temporary prefix (scripts/install-capi.sh);
#   2. compiles every program in examples/c, and the C example of README.md, with
#      cc -std=c11 -Wall -Wextra -Werror, against the static library (libember.a plus the
#      system libraries of its Libs.private) and against the shared one; compiles one example
#      with `pkg-config --cflags --libs ember` from the temporary prefix;
#   3. writes the tiny random model (ember-tests' write_tiny, as scripts/test-cpp.sh does)
#      and runs every program on it, both builds; then runs them under valgrind's memcheck,
#      which must report no error and no definite leak (scripts/valgrind.supp lists the
#      reports from code that is not Ember's, each with its reason);
#   4. when EMBER_TEST_MODEL names SmolLM2's GGUF, also generates and chats with it.
#
#   scripts/test-c.sh              CC=clang scripts/test-c.sh
#   EMBER_NO_VALGRIND=1 scripts/test-c.sh      skip step 3's valgrind runs
#   EMBER_KEEP_WORK=1 scripts/test-c.sh        keep the temporary directory
# Exits nonzero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

CC="${CC:-cc}"
# Quiet the Wayland probe of the Vulkan loader on headless machines.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

start=$SECONDS
log() { echo "test-c: [$((SECONDS - start)) s] $*" >&2; }
die() {
  log "FAILED: $*"
  exit 1
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/ember-c.XXXXXX")"
# EMBER_KEEP_WORK=1 keeps the temporary directory (programs, outputs, valgrind logs).
if [ "${EMBER_KEEP_WORK:-0}" = 1 ]; then
  trap 'echo "test-c: kept $WORK" >&2' EXIT
else
  trap 'rm -rf "$WORK"' EXIT
fi
# A shader cache of our own, filled by the plain runs, so that under valgrind lavapipe loads
# its compiled shaders instead of running LLVM under valgrind (5-10x faster). Valgrind does
# not emulate AVX-512, and lavapipe keys its cache by the CPU features it sees, so both kinds
# of run tell lavapipe (only lavapipe/llvmpipe reads this) to use AVX2 at most.
export MESA_SHADER_CACHE_DIR="$WORK/mesa-shader-cache"
export GALLIUM_OVERRIDE_CPU_CAPS="${GALLIUM_OVERRIDE_CPU_CAPS:-avx}"

log "building libember (release) and installing it into a temporary prefix"
PREFIX="$WORK/prefix"
scripts/install-capi.sh "$PREFIX" >/dev/null
LIB_DIR="$PREFIX/lib"
for f in lib/libember.so lib/libember.a include/ember.h lib/pkgconfig/ember.pc; do
  test -f "$PREFIX/$f" || die "install-capi.sh did not install $f"
done
export PKG_CONFIG_PATH="$LIB_DIR/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
# The system libraries libember.a needs (rustc's native-static-libs, recorded in ember.pc).
read -r -a STATIC_LIBS <<<"$(pkg-config --libs-only-l --static ember | sed 's/-lember//')"
log "static link: libember.a ${STATIC_LIBS[*]}"

log "ember.h as C11 (pedantic)"
"$CC" -x c -std=c11 -fsyntax-only -Wall -Wextra -Werror -Wpedantic capi/include/ember.h

log "extracting the C example of README.md"
awk '/<!-- c-example:begin -->/ { on = 1; next }
     /<!-- c-example:end -->/   { on = 0 }
     on && /^```/ { fence = !fence; next }
     on && fence' README.md >"$WORK/readme.c"
n_lines=$(wc -l <"$WORK/readme.c")
if [ "$n_lines" -lt 3 ] || [ "$n_lines" -gt 15 ]; then
  die "README.md's C example has $n_lines lines (expected 3 to 15)"
fi

BIN="$WORK/bin"   # the programs; their outputs go to $WORK
mkdir -p "$BIN"
EXAMPLES=(generate chat errors train)
CFLAGS=(-std=c11 -Wall -Wextra -Werror -g -I capi/include)
log "compiling ${EXAMPLES[*]} and readme.c, static and shared"
for name in "${EXAMPLES[@]}" readme; do
  src="examples/c/$name.c"
  [ "$name" = readme ] && src="$WORK/readme.c"
  "$CC" "${CFLAGS[@]}" "$src" "$LIB_DIR/libember.a" "${STATIC_LIBS[@]}" -o "$BIN/$name-static"
  "$CC" "${CFLAGS[@]}" "$src" -L "$LIB_DIR" -lember -Wl,-rpath,"$LIB_DIR" -o "$BIN/$name"
done
if ldd "$BIN/generate-static" | grep -q libember; then
  die "generate-static links libember dynamically"
fi

log "compiling examples/c/generate.c with pkg-config"
# shellcheck disable=SC2046  # pkg-config prints words to split
"$CC" -std=c11 -Wall -Wextra -Werror examples/c/generate.c $(pkg-config --cflags --libs ember) \
  -Wl,-rpath,"$LIB_DIR" -o "$BIN/generate-pc"

log "writing the tiny models"
cargo run --release --locked -q -p ember-tests --example write_tiny -- "$WORK/tiny.gguf" llama gguf q4_1
# An HF directory of the same model with a ChatML template, for chat.c's template path.
cargo run --release --locked -q -p ember-tests --example write_tiny -- "$WORK/tiny-chat" llama hf
TEMPLATE='{% for m in messages %}<|im_start|>{{ m.role }}\\n{{ m.content }}<|im_end|>\\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}'
sed -i "1s/^{\$/{\"chat_template\": \"$TEMPLATE\",/" "$WORK/tiny-chat/tokenizer_config.json"
grep -q chat_template "$WORK/tiny-chat/tokenizer_config.json" || die "no chat template added"
TINY="$WORK/tiny.gguf"

# run NAME ARGS... : runs the shared build of NAME with stdin from $STDIN, output in
# WORK/NAME.out and .err, then the static build the same way; fails on a nonzero status.
STDIN=/dev/null
run() {
  local bin="$1"
  shift
  for variant in "" -static; do
    if ! "$BIN/$bin$variant" "$@" <"$STDIN" >"$WORK/$bin$variant.out" 2>"$WORK/$bin$variant.err"; then
      cat "$WORK/$bin$variant.out" "$WORK/$bin$variant.err" >&2
      die "$bin$variant $*"
    fi
  done
}

log "running the examples on the tiny model (shared and static builds)"
run generate "$TINY" "Hello" -n 8
test -s "$WORK/generate.out" || die "generate printed nothing"
cmp -s "$WORK/generate.out" "$WORK/generate-static.out" \
  || die "the static and shared builds of generate disagree"
run generate "$TINY" "Hello" -n 16 --stop-after 3
grep -q "stopped by the callback after 3 tokens" "$WORK/generate.err" \
  || die "generate --stop-after 3 did not stop after 3 tokens"
"$BIN/generate-pc" "$TINY" "Hello" -n 4 >/dev/null 2>&1 || die "generate-pc"
for variant in "" -static; do
  mkdir -p "$WORK/errors$variant.d"
  "$BIN/errors$variant" "$TINY" "$WORK/errors$variant.d" >"$WORK/errors$variant.out" 2>&1 \
    || { cat "$WORK/errors$variant.out" >&2; die "errors$variant"; }
done
tail -n 1 "$WORK/errors.out" >&2
printf 'Hello there\n/reset\nHow are you?\n' >"$WORK/chat.in"
STDIN="$WORK/chat.in"
run chat "$WORK/tiny-chat" -n 8 --show-prompt
grep -q '^<|im_start|>user$' "$WORK/chat.err" || die "chat did not apply the template"
[ "$(grep -c '^<|im_start|>assistant$' "$WORK/chat.err")" = 2 ] || die "chat did not answer twice"
run chat "$TINY" -n 8 --plain
STDIN=/dev/null
if "$BIN/chat" "$TINY" -n 8 <"$WORK/chat.in" >/dev/null 2>"$WORK/chat-refused.err"; then
  die "chat accepted a model without a chat template"
fi
grep -q EMBER_UNSUPPORTED "$WORK/chat-refused.err" || die "chat's refusal did not say EMBER_UNSUPPORTED"
for variant in "" -static; do
  mkdir -p "$WORK/train$variant.d"
  "$BIN/train$variant" "$TINY" "$WORK/train$variant.d" --steps 6 -n 8 >"$WORK/train$variant.out" 2>&1 \
    || { cat "$WORK/train$variant.out" >&2; die "train$variant"; }
done
test -f "$WORK/train.d/lora/adapter_model.safetensors" || die "train saved no adapter"
run readme "$TINY"
test -s "$WORK/readme.out" || die "README.md's example printed nothing"

if [ "${EMBER_NO_VALGRIND:-0}" != 1 ]; then
  command -v valgrind >/dev/null || die "valgrind is not installed (EMBER_NO_VALGRIND=1 skips)"
  # memcheck: every error counts, and so does every definite leak.
  VG=(valgrind --tool=memcheck --error-exitcode=1 --leak-check=full
    --errors-for-leak-kinds=definite --suppressions=scripts/valgrind.supp --num-callers=40)
  # vg NAME ARGS... : the shared build of NAME under memcheck, stdin from $STDIN. Valgrind
  # runs one thread at a time, so lavapipe gets one worker thread (LP_NUM_THREADS).
  vg() {
    local name="$1"
    shift
    local t=$SECONDS
    if ! LP_NUM_THREADS=1 "${VG[@]}" --log-file="$WORK/vg-$name.log" "$BIN/$name" "$@" <"$STDIN" \
      >"$WORK/vg-$name.out" 2>&1; then
      cat "$WORK/vg-$name.out" "$WORK/vg-$name.log" >&2
      die "valgrind: $name $*"
    fi
    log "valgrind $name ($((SECONDS - t)) s): $(grep -o 'ERROR SUMMARY: [0-9]* errors' "$WORK/vg-$name.log"), $(grep -o 'definitely lost: [0-9,]* bytes' "$WORK/vg-$name.log" || echo 'definitely lost: 0 bytes')"
  }
  log "valgrind memcheck on every example (tiny model, few tokens)"
  vg generate "$TINY" "Hi" -n 3 --stop-after 2
  STDIN="$WORK/chat.in"
  vg chat "$WORK/tiny-chat" -n 2
  STDIN=/dev/null
  mkdir -p "$WORK/vg-errors.d" "$WORK/vg-train.d"
  vg errors "$TINY" "$WORK/vg-errors.d"
  vg train "$TINY" "$WORK/vg-train.d" --steps 2 -n 2
  vg readme "$TINY"
fi

if [ -n "${EMBER_TEST_MODEL:-}" ]; then
  log "generate and chat with $EMBER_TEST_MODEL"
  "$BIN/generate" "$EMBER_TEST_MODEL" "The capital of France is" -n 8 >"$WORK/smol.out" \
    || die "generate on $EMBER_TEST_MODEL"
  grep -q Paris "$WORK/smol.out" || die "generate did not say Paris: $(cat "$WORK/smol.out")"
  printf 'What is the capital of France?\n' \
    | "$BIN/chat" "$EMBER_TEST_MODEL" --temp 0 -n 24 >"$WORK/smol-chat.out" 2>"$WORK/smol-chat.err" \
    || { cat "$WORK/smol-chat.err" >&2; die "chat on $EMBER_TEST_MODEL"; }
  grep -q Paris "$WORK/smol-chat.out" || die "chat did not say Paris: $(cat "$WORK/smol-chat.out")"
else
  log "set EMBER_TEST_MODEL to SmolLM2's GGUF to also run the examples on it"
fi

log "all C tests passed ($((SECONDS - start)) s)"
