#!/usr/bin/env bash
# The main job: build Ember, show the GPU it runs on, and check every kernel family
# against its CPU reference on that GPU. Installs lavapipe (Mesa's CPU Vulkan driver) when
# the machine has no Vulkan driver and this runs as root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -s)" = Linux ] && ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
  fi
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
cargo build --release --locked -p ember-cli
./target/release/ember info
./target/release/ember selfcheck
