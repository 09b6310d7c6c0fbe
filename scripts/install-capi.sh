#!/usr/bin/env bash
# Builds libember (release) and installs the C ABI into PREFIX:
#
#   PREFIX/lib/libember.so   PREFIX/lib/libember.a   PREFIX/include/ember.h
#   PREFIX/lib/pkgconfig/ember.pc   (from capi/ember.pc.in)
#
# so that `cc app.c $(pkg-config --cflags --libs ember)` links the shared library and
# `pkg-config --static --libs ember` adds the system libraries libember.a needs
# (Libs.private: what rustc reports as native-static-libs for this toolchain and target).
# Each file is copied to a temporary name in its directory and renamed over the old one, so a
# reader sees the old file or the new one, never half of one.
#
#   scripts/install-capi.sh PREFIX        e.g. scripts/install-capi.sh "$HOME/.local"
#
# Prints the installed paths on stdout.
set -euo pipefail
if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: $0 PREFIX" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
mkdir -p "$1"
PREFIX="$(cd "$1" && pwd -P)"

log() { echo "install-capi: $*" >&2; }

log "building libember (release)"
cargo build --release --locked -q -p ember-capi
REL="$TARGET_DIR/release"
test -f "$REL/libember.so" && test -f "$REL/libember.a"

# The system libraries a static libember needs. Every one of Ember's dependencies reaches the
# system through the standard library (wgpu loads Vulkan with dlopen), so this is the
# standard library's list, which rustc prints for any static library; scripts/test-c.sh
# links every example statically with it, which checks it.
tmp="$(mktemp -d "${TMPDIR:-/tmp}/ember-install.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
: >"$tmp/empty.rs"
LIBS_PRIVATE="$(rustc --crate-type staticlib --crate-name native_libs --print native-static-libs \
  -o "$tmp/libnative_libs.a" "$tmp/empty.rs" 2>&1 | sed -n 's/^note: native-static-libs: //p')"
if [ -z "$LIBS_PRIVATE" ]; then
  log "rustc did not print native-static-libs"
  exit 1
fi

VERSION="$(cargo metadata --no-deps --format-version 1 --locked \
  | sed -n 's/.*"name":"ember-capi","version":"\([^"]*\)".*/\1/p')"
if [ -z "$VERSION" ]; then
  log "could not read ember-capi's version"
  exit 1
fi
sed -e "s|@PREFIX@|$PREFIX|" -e "s|@VERSION@|$VERSION|" -e "s|@LIBS_PRIVATE@|$LIBS_PRIVATE|" \
  capi/ember.pc.in >"$tmp/ember.pc"

# put MODE SRC DIR: copies SRC into DIR under a temporary name, then renames it into place.
put() {
  local mode="$1" src="$2" dir="$3" name
  name="$(basename "$src")"
  install -d "$dir"
  install -m "$mode" "$src" "$dir/.$name.tmp.$$"
  mv -f "$dir/.$name.tmp.$$" "$dir/$name"
  echo "$dir/$name"
}
put 0755 "$REL/libember.so" "$PREFIX/lib"
put 0644 "$REL/libember.a" "$PREFIX/lib"
put 0644 capi/include/ember.h "$PREFIX/include"
put 0644 "$tmp/ember.pc" "$PREFIX/lib/pkgconfig"
log "installed libember $VERSION into $PREFIX ($LIBS_PRIVATE)"
