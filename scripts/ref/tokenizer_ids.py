#!/usr/bin/env python3
"""Reference token ids for Ember's GGUF (BPE) tokenizer, produced by llama.cpp itself.

Reads tests/fixtures/tokenizer_strings.json (a JSON list of tricky strings) and writes
tests/fixtures/smollm2_token_ids.json with, for every string, the ids llama.cpp produces:

  ids_special      tokenize(text, add_bos=False, special=True)   special tokens like <|im_start|> parsed
  ids_nospecial    tokenize(text, add_bos=False, special=False)  special-token text tokenized as plain text
  ids_bos_special  tokenize(text, add_bos=True,  special=True)   (llama.cpp only prepends BOS when the
                                                                 GGUF's add_bos_token flag allows it)
  detok_special    detokenize(ids_special, special=True) decoded as UTF-8
  detok_nospecial  detokenize(ids_nospecial) decoded as UTF-8
  roundtrip_special / roundtrip_nospecial: whether that detokenized text equals the input exactly

plus the GGUF's BOS/EOS ids and add_bos_token flag.

Environment: llama-cpp-python 0.3.36 (CPU build); only the vocabulary is loaded.
Usage (from the repo root):
  /tmp/peers/cpu/bin/python scripts/ref/tokenizer_ids.py [--model PATH] [--out PATH]
--model defaults to the output of scripts/fetch-model.sh, falling back to
/tmp/peers/models/SmolLM2-135M-Instruct.Q4_1.gguf.
"""
import argparse
import json
import os
import subprocess
import sys

import llama_cpp
from llama_cpp import Llama

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FALLBACK_MODEL = "/tmp/peers/models/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model():
    """Path printed by scripts/fetch-model.sh, else the fallback path."""
    try:
        out = subprocess.run(
            ["bash", os.path.join(ROOT, "scripts", "fetch-model.sh")],
            check=True, stdout=subprocess.PIPE, text=True,
        ).stdout.strip()
        if out and os.path.isfile(out):
            return out
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"fetch-model.sh failed ({e}); using {FALLBACK_MODEL}", file=sys.stderr)
    return FALLBACK_MODEL


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF path (default: scripts/fetch-model.sh)")
    ap.add_argument("--strings", default=os.path.join(ROOT, "tests/fixtures/tokenizer_strings.json"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/smollm2_token_ids.json"))
    args = ap.parse_args()
    model = args.model or default_model()

    with open(args.strings, encoding="utf-8") as f:
        strings = json.load(f)

    llm = Llama(model_path=model, vocab_only=True, verbose=False)
    meta = llm.metadata

    def as_bool(v):
        return None if v is None else str(v).lower() == "true"

    cases = []
    for s in strings:
        b = s.encode("utf-8")
        ids_sp = llm.tokenize(b, add_bos=False, special=True)
        ids_nosp = llm.tokenize(b, add_bos=False, special=False)
        ids_bos = llm.tokenize(b, add_bos=True, special=True)
        det_sp = llm.detokenize(ids_sp, special=True).decode("utf-8", errors="replace")
        det_nosp = llm.detokenize(ids_nosp).decode("utf-8", errors="replace")
        cases.append({
            "text": s,
            "ids_special": ids_sp,
            "ids_nospecial": ids_nosp,
            "ids_bos_special": ids_bos,
            "detok_special": det_sp,
            "detok_nospecial": det_nosp,
            "roundtrip_special": det_sp == s,
            "roundtrip_nospecial": det_nosp == s,
        })

    out = {
        "model": os.path.basename(model),
        "llama_cpp_python": llama_cpp.__version__,
        "tokenizer_model": meta.get("tokenizer.ggml.model"),
        "tokenizer_pre": meta.get("tokenizer.ggml.pre"),
        "n_vocab": llm.n_vocab(),
        "bos_id": llm.token_bos(),
        "eos_id": llm.token_eos(),
        "add_bos_token": as_bool(meta.get("tokenizer.ggml.add_bos_token")),
        "add_space_prefix": as_bool(meta.get("tokenizer.ggml.add_space_prefix")),
        "note": "ids_* are llama.cpp's Llama.tokenize(text.encode(), add_bos, special); "
                "detok_* are Llama.detokenize(ids, special) decoded as UTF-8 (errors=replace).",
        "cases": cases,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    bad = [c["text"] for c in cases if not c["roundtrip_special"]]
    print(f"wrote {args.out}: {len(cases)} cases, {len(bad)} without exact round trip", file=sys.stderr)


if __name__ == "__main__":
    main()
