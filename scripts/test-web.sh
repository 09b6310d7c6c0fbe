#!/usr/bin/env bash
# The browser: builds Ember for wasm32 (wgpu's WebGPU backend) with the page in
# examples/web/www, serves it on localhost with SmolLM2, and drives it in headless Chromium
# (WebGPU on SwiftShader) through chromedriver: load the model from the server, greedy
# generation, a question, a short LoRA update on the GPU, the question again. The test
# (scripts/web-e2e.py) checks the greedy tokens against the committed native lavapipe run,
# the training losses and the trained answer against `ember finetune` / `ember generate`
# with the same data and settings here, and saves a screenshot.
#
#   scripts/test-web.sh            build, test (installs chromium, chromium-driver and
#                                  wasm-bindgen-cli when missing; apt needs root)
#   scripts/test-web.sh --serve    build, then serve the page on http://127.0.0.1:8080/
#                                  (EMBER_WEB_PORT) to open in a browser with WebGPU
#   EMBER_NO_INSTALL=1 ...         install nothing
#   EMBER_WEB_OUT=dir              where the screenshot, the page's results and the native
#                                  runs go (default /tmp/ember-web)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "test-web: $*" >&2; }
mode="${1:-test}"
out="${EMBER_WEB_OUT:-${TMPDIR:-/tmp}/ember-web}"
mkdir -p "$out"
install_ok() { [ "${EMBER_NO_INSTALL:-0}" != 1 ]; }

# The wasm-bindgen CLI must be the version of the wasm-bindgen crate in Cargo.lock.
wb_version="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' Cargo.lock)"
if ! command -v wasm-bindgen >/dev/null || [ "$(wasm-bindgen --version | awk '{print $2}')" != "$wb_version" ]; then
  install_ok || { log "needs wasm-bindgen-cli $wb_version (cargo install wasm-bindgen-cli --version $wb_version)"; exit 1; }
  log "installing wasm-bindgen-cli $wb_version (a few minutes, once)"
  cargo install -q wasm-bindgen-cli --version "$wb_version"
fi
if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  install_ok || { log "needs the wasm32-unknown-unknown target (rustup target add)"; exit 1; }
  rustup target add wasm32-unknown-unknown >/dev/null
fi
if [ "$mode" != --serve ] && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; }; then
  if install_ok && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing chromium and chromium-driver"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
  else
    log "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
    exit 1
  fi
fi

target_dir="${CARGO_TARGET_DIR:-target}"
log "building ember-web for wasm32-unknown-unknown"
cargo build -q --release --locked -p ember-web --target wasm32-unknown-unknown
wasm-bindgen --target web --out-dir examples/web/www/pkg \
  "$target_dir/wasm32-unknown-unknown/release/ember_web.wasm"

# What the server holds: the page, the model and the training examples.
model="$(scripts/fetch-model.sh)"
site="$(mktemp -d)"
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  rm -rf "$site"
}
trap cleanup EXIT
cp -r examples/web/www/. "$site/"
ln -s "$model" "$site/model.gguf"
cp examples/data/quillfeather/demo.jsonl "$site/demo.jsonl"
# The scripted pass trains on two examples (one batch, so the loss must fall step by step).
head -n 2 examples/data/quillfeather/demo.jsonl >"$site/teach.jsonl"

serve() {
  (cd "$site" && exec python3 -m http.server "$1" --bind 127.0.0.1) >"$out/http.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 50); do
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
      "http://127.0.0.1:$1/index.html" 2>/dev/null && return 0
    sleep 0.1
  done
  log "the web server did not start (see $out/http.log)"
  exit 1
}

if [ "$mode" = --serve ]; then
  port="${EMBER_WEB_PORT:-8080}"
  serve "$port"
  log "serving on http://127.0.0.1:$port/ (Ctrl-C stops)"
  wait "$server_pid"
  exit 0
fi

# The same training and question natively (this machine's Vulkan driver), for comparison.
steps=3 batch=2 seq=64 lr=0.003 rank=8 seed=1 qn=12
question="Who makes the Quillfeather K7?"
log "native run: ember finetune + generate"
cargo build -q --locked -p ember-cli
ember="$target_dir/debug/ember"
"$ember" finetune -m "$model" --data "$site/teach.jsonl" --out "$out/native-adapter" \
  --lora-rank "$rank" --seq "$seq" --batch-size "$batch" --steps "$steps" --lr "$lr" \
  --schedule constant --seed "$seed" --json >"$out/native-finetune.jsonl"
"$ember" generate -m "$model" --adapter "$out/native-adapter" --chat -p "$question" \
  -n "$qn" --temp 0 --json >"$out/native-after.json"

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
serve "$port"
q="$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$question")"
url="http://127.0.0.1:$port/index.html?run=1&selfcheck=1&model=model.gguf&data=teach.jsonl"
url+="&prompt=The%20three%20primary%20colors%20are&n=8"
url+="&question=$q&qn=$qn&steps=$steps&batch=$batch&seq=$seq&lr=$lr&rank=$rank&seed=$seed"
log "driving the page in headless Chromium (WebGPU on SwiftShader; a few minutes)"
python3 scripts/web-e2e.py --url "$url" \
  --fixture tests/fixtures/smollm2_greedy.json \
  --native-losses "$out/native-finetune.jsonl" --native-after "$out/native-after.json" \
  --screenshot "$out/screenshot.png" --result "$out/page-results.json" \
  --timeout "${EMBER_WEB_TIMEOUT:-1500}"
