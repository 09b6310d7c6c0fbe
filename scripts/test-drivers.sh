#!/usr/bin/env bash
# The portability suite: the kernel tests, the LoRA training parity tests and the model-level
# checks (SmolLM2 perplexity against exact math, greedy generation equal to the committed
# lavapipe run) on every driver a machine without a GPU can have, all from Debian packages:
#
#   lavapipe     Vulkan on Mesa's llvmpipe (mesa-vulkan-drivers), Khronos validation layer on
#   swiftshader  Vulkan on Google's SwiftShader (from chromium-common), validation layer on
#   gles         OpenGL ES 3.2 through wgpu's GL backend on Mesa's llvmpipe (EGL, surfaceless)
#   restricted   lavapipe with WebGPU's default limits and without SHADER_F16 and SUBGROUP,
#                as on many phones and older GPUs
#
# With the validation layer on, a run fails on any "Validation Error" the layer reports (but
# one upstream naga bug, counted apart: see NAGA_WORKGROUP_STRIDE), and also when the layer
# did not report that it was active (so a missing layer cannot pass).
#
#   scripts/test-drivers.sh                       every driver (installs chromium-common as root)
#   EMBER_DRIVERS="swiftshader gles" scripts/...  some of them
#   EMBER_TEST_MODEL=path                         the model (scripts/fetch-model.sh prints it)
#
# The model-level checks need EMBER_TEST_MODEL; without it they are skipped (the kernel and
# training tests still run). Logs: $EMBER_DRIVER_LOGS (default: /tmp/ember-driver-logs).
#
#   scripts/test-drivers.sh --bench               instead of the tests: `ember bench --json`
#                                                 (release build, no validation layer) on
#                                                 each driver, one JSON object per line
#                                                 on stdout (needs EMBER_TEST_MODEL)
set -euo pipefail
cd "$(dirname "$0")/.."

CHROMIUM=/usr/lib/chromium
DRIVERS="${EMBER_DRIVERS:-lavapipe swiftshader gles restricted}"

log() { echo "test-drivers: $*" >&2; }

need_chromium() { case " $DRIVERS " in *" swiftshader "* | *" lavapipe "*) return 0 ;; esac; return 1; }

# SwiftShader and the validation layer both come with chromium-common (no recommends: 32 MB).
if need_chromium && [ ! -f "$CHROMIUM/libvk_swiftshader.so" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ "${EMBER_NO_INSTALL:-0}" != 1 ]; then
    log "installing chromium-common (SwiftShader and the Khronos validation layer)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends chromium-common >/dev/null
  else
    log "$CHROMIUM/libvk_swiftshader.so is missing: apt-get install --no-install-recommends chromium-common"
    exit 1
  fi
fi

export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
logs="${EMBER_DRIVER_LOGS:-${TMPDIR:-/tmp}/ember-driver-logs}"
mkdir -p "$logs" "$work/icd" "$work/layers"

# Chromium ships the libraries without loader manifests (or with a relative path): write them.
cat >"$work/icd/swiftshader.json" <<EOF
{"file_format_version": "1.0.0",
 "ICD": {"library_path": "$CHROMIUM/libvk_swiftshader.so", "api_version": "1.0.5"}}
EOF
cat >"$work/layers/VkLayer_khronos_validation.json" <<EOF
{"file_format_version": "1.2.0",
 "layer": {"name": "VK_LAYER_KHRONOS_validation", "type": "GLOBAL",
           "library_path": "$CHROMIUM/libVkLayer_khronos_validation.so",
           "api_version": "1.4.309", "implementation_version": "1",
           "description": "Khronos Validation Layer"}}
EOF
lavapipe_icd="$(ls /usr/share/vulkan/icd.d/lvp_icd*.json 2>/dev/null | head -n1 || true)"
if [ -z "$lavapipe_icd" ]; then
  log "no lavapipe ICD under /usr/share/vulkan/icd.d (apt-get install mesa-vulkan-drivers)"
  exit 1
fi

# The validation layer, loaded by the Vulkan loader and reporting on stdout. wgpu's own
# validation is turned off so that it does not take the reports over (it would route them
# to the `log` crate, which tests do not print).
bench=0
[ "${1:-}" = --bench ] && bench=1
validation=(WGPU_VALIDATION=0 WGPU_DEBUG=0 "VK_LAYER_PATH=$work/layers"
  VK_INSTANCE_LAYERS=VK_LAYER_KHRONOS_validation
  VK_KHRONOS_VALIDATION_REPORT_FLAGS=error,warn,info)
# Benchmarks run without the layer (it costs time on every call).
[ "$bench" = 1 ] && validation=()

# The one error the layer reports that is not Ember's: naga's SPIR-V writer decorates every
# array type with ArrayStride, also the arrays of `var<workgroup>` variables, which the
# Vulkan spec forbids without VK_KHR_workgroup_memory_explicit_layout (upstream:
# gfx-rs/wgpu issue 7696, fix in review as pull request 9295). lavapipe and SwiftShader
# accept such shaders; the run counts these separately and fails on every other error.
NAGA_WORKGROUP_STRIDE="VUID-StandaloneSpirv-None-10684"

driver_env() {
  case "$1" in
    lavapipe) echo "VK_ICD_FILENAMES=$lavapipe_icd EMBER_BACKEND=vulkan ${validation[*]}" ;;
    swiftshader) echo "VK_ICD_FILENAMES=$work/icd/swiftshader.json EMBER_BACKEND=vulkan ${validation[*]}" ;;
    # wgpu asks EGL for desktop GL first; capping Mesa's desktop GL below 3.3 makes it fall
    # back to OpenGL ES 3.2, the API phones and browsers' GL paths have.
    gles) echo "EMBER_BACKEND=gl MESA_GL_VERSION_OVERRIDE=3.0" ;;
    restricted) echo "VK_ICD_FILENAMES=$lavapipe_icd EMBER_BACKEND=vulkan EMBER_WEBGPU_LIMITS=1 EMBER_NO_F16=1 EMBER_NO_SUBGROUPS=1" ;;
    *) log "unknown driver $1 (lavapipe, swiftshader, gles, restricted)"; exit 2 ;;
  esac
}

# The tests every driver runs: the kernel suite and the C ABI's (the runtime's and the C ABI
# crate's unit tests), LoRA training against the torch/peft fixtures, and the real model end
# to end. The test binaries are those `cargo test --workspace` builds (so nothing is built
# twice), run directly from their package's directory as cargo runs them.
SMOLLM2_TESTS=(perplexity_matches_exact_math_and_llama_cpp
  greedy_generation_matches_the_committed_lavapipe_run)

for d in $DRIVERS; do driver_env "$d" >/dev/null; done

if [ "$bench" = 1 ]; then
  : "${EMBER_TEST_MODEL:?the benchmark needs EMBER_TEST_MODEL (scripts/fetch-model.sh prints it)}"
  cargo build --locked -q --release -p ember-cli
  for d in $DRIVERS; do
    read -r -a vars <<<"$(driver_env "$d")"
    log "bench on $d: ${vars[*]}"
    json="$(env "${vars[@]}" "${CARGO_TARGET_DIR:-target}/release/ember" bench -m "$EMBER_TEST_MODEL" \
      --prompt 128 --gen 32 --reps 1 --json)"
    echo "{\"driver\": \"$d\", \"bench\": $json}"
  done
  exit 0
fi

cargo test --locked -q --workspace --no-run --message-format=json >"$work/build.json"
# Prints "directory executable" for each test binary asked for (package dir, target name, kind).
binaries() {
  python3 - "$work/build.json" <<'PY'
import json, os, sys
want = [("runtime", "ember", "lib"), ("capi", "ember", "lib"),
        ("tests", "train_parity", "test"), ("tests", "smollm2", "test")]
found = {}
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    pkg = os.path.dirname(m["manifest_path"])
    kind = "test" if m["target"]["kind"] == ["test"] else "lib"
    key = (os.path.basename(pkg), m["target"]["name"], kind)
    found[key] = (pkg, m["executable"])
for k in want:
    if k not in found:
        sys.exit(f"test-drivers: no test binary for {k}")
    print(*found[k])
PY
}
mapfile -t BINARIES < <(binaries)
[ "${#BINARIES[@]}" = 4 ] || { log "could not find the test binaries"; exit 1; }

# Runs them all (errexit does not apply inside a tested command, so failures are counted).
suite() {
  local dir exe rc=0
  for entry in "${BINARIES[@]}"; do
    read -r dir exe <<<"$entry"
    case "$exe" in
      */smollm2-*) (cd "$dir" && "$exe" --exact "${SMOLLM2_TESTS[@]}") || rc=1 ;;
      *) (cd "$dir" && "$exe") || rc=1 ;;
    esac
  done
  return $rc
}

summary=()
failed=0
for d in $DRIVERS; do
  read -r -a vars <<<"$(driver_env "$d")"
  out="$logs/$d.log"
  log "$d: ${vars[*]}"
  info="$(env "${vars[@]}" "${CARGO_TARGET_DIR:-target}/debug/ember" info 2>/dev/null | sed -n 's/^adapter: *//p;s/^driver: *//p' | paste -sd ';')"
  start=$(date +%s)
  status=ok
  if ! (export "${vars[@]}"; suite) >"$out" 2>&1; then
    status="tests failed"
  fi
  secs=$(($(date +%s) - start))
  case " ${vars[*]} " in
    *VK_INSTANCE_LAYERS=*)
      active=$(grep -c "CURRENT-VALIDATION-ENABLED" "$out" || true)
      upstream=$(grep "Validation Error" "$out" | grep -c "$NAGA_WORKGROUP_STRIDE" || true)
      errors=$(grep "Validation Error" "$out" | grep -vc "$NAGA_WORKGROUP_STRIDE" || true)
      warnings=$(grep -c "Validation Warning" "$out" || true)
      if [ "$active" = 0 ]; then
        status="validation layer never reported active"
      elif [ "$errors" != 0 ]; then
        status="$errors validation errors"
        grep "Validation Error" "$out" | grep -v "$NAGA_WORKGROUP_STRIDE" | head -n 20 >&2 || true
      fi
      vtext="validation: $errors errors ($upstream shader modules with naga's workgroup ArrayStride), $warnings warnings, layer active in $active instances"
      ;;
    *) vtext="no validation layer" ;;
  esac
  if [ "$status" != ok ]; then
    failed=1
    tail -n 40 "$out" >&2
  fi
  line="$d [$info]: $status in ${secs}s, $(grep -c '^test .* ok$' "$out" || true) tests passed, $vtext"
  log "$line"
  summary+=("$line")
done

log "summary:"
printf '  %s\n' "${summary[@]}" >&2
if [ "$failed" != 0 ]; then
  log "FAILED (logs in $logs)"
  exit 1
fi
log "all drivers passed"
