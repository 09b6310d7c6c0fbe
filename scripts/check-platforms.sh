#!/usr/bin/env bash
# Cross builds of libember: the shared library for aarch64 Linux (Debian's cross gcc as the
# linker) and for 64-bit Windows (mingw-w64), each checked for its file format and for the
# C ABI's exported symbols; and `cargo check` of the runtime and the C ABI for Android and
# iOS (no linker there: checking proves the code and every dependency compile for them).
#
#   scripts/check-platforms.sh           installs the rustup targets and, as root, the cross
#                                        compilers (gcc-aarch64-linux-gnu, gcc-mingw-w64-x86-64)
#   EMBER_NO_INSTALL=1 ...               install nothing
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "check-platforms: $*" >&2; }

TARGETS=(aarch64-unknown-linux-gnu x86_64-pc-windows-gnu aarch64-linux-android aarch64-apple-ios)
if [ "${EMBER_NO_INSTALL:-0}" != 1 ]; then
  missing=()
  installed="$(rustup target list --installed)"
  for t in "${TARGETS[@]}"; do
    grep -qx "$t" <<<"$installed" || missing+=("$t")
  done
  if [ "${#missing[@]}" != 0 ]; then
    log "rustup target add ${missing[*]}"
    rustup target add "${missing[@]}" >/dev/null
  fi
  if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v x86_64-w64-mingw32-gcc >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      log "installing the cross compilers"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >/dev/null
      apt-get install -y -qq --no-install-recommends gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
        gcc-mingw-w64-x86-64 binutils-mingw-w64-x86-64 >/dev/null
    else
      log "install gcc-aarch64-linux-gnu and gcc-mingw-w64-x86-64 (as root) first"
      exit 1
    fi
  fi
fi

target_dir="${CARGO_TARGET_DIR:-target}"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER=x86_64-w64-mingw32-gcc

# A few C ABI entry points every build must export.
SYMBOLS=(ember_version ember_context_create ember_model_load ember_session_create ember_session_generate
  ember_trainer_step ember_learner_open)

check_exports() {
  local what="$1" listing="$2"
  for s in "${SYMBOLS[@]}"; do
    if ! grep -qw "$s" <<<"$listing"; then
      log "$what does not export $s"
      exit 1
    fi
  done
}

log "aarch64-unknown-linux-gnu: building libember.so"
cargo build --locked -q -p ember-capi --target aarch64-unknown-linux-gnu
so="$target_dir/aarch64-unknown-linux-gnu/debug/libember.so"
header="$(aarch64-linux-gnu-readelf -h "$so")"
grep -q "AArch64" <<<"$header" || { log "$so is not an AArch64 ELF"; exit 1; }
check_exports "$so" "$(aarch64-linux-gnu-readelf --dyn-syms -W "$so")"
log "ok: $so ($(du -h "$so" | cut -f1), AArch64 ELF, exports the C ABI)"

log "x86_64-pc-windows-gnu: building ember.dll"
cargo build --locked -q -p ember-capi --target x86_64-pc-windows-gnu
dll="$target_dir/x86_64-pc-windows-gnu/debug/ember.dll"
dump="$(x86_64-w64-mingw32-objdump -p "$dll")"
grep -q "pei-x86-64" <<<"$dump" || { log "$dll is not a PE32+ x86-64 DLL"; exit 1; }
check_exports "$dll" "$dump"
log "ok: $dll ($(du -h "$dll" | cut -f1), PE32+ x86-64, exports the C ABI)"

for t in aarch64-linux-android aarch64-apple-ios; do
  log "$t: cargo check of the runtime and the C ABI"
  cargo check --locked -q -p ember -p ember-capi --target "$t"
  log "ok: $t"
done
log "all platforms passed"
