#!/usr/bin/env python3
"""Reference chat-template renderings (and an HF tokenizer directory) for Ember's tokenizer.

Loads SmolLM2's tokenizer from its GGUF with transformers
(AutoTokenizer.from_pretrained(dir, gguf_file=name)), saves it as a Hugging Face directory
(tokenizer.json, tokenizer_config.json with the GGUF's chat template, ...), reloads it from
that directory and writes tests/fixtures/smollm2_chat.json with:

  cases    3 conversations (system+user, user+assistant+user, one user message with unicode
           and surrounding whitespace), each rendered by
           apply_chat_template(messages, tokenize=False, add_generation_prompt=False/True)
  hf_ids   the saved tokenizer's own ids (encode(text, add_special_tokens=False)) for a few
           strings: what Ember's Tokenizer::from_hf_dir must reproduce on that directory.
           transformers' GGUF conversion does not apply llama.cpp's "smollm" pre-tokenizer
           (digits split one by one), so these may differ from llama.cpp's ids in
           smollm2_token_ids.json; those remain the truth for GGUF tokenization.

The Rust test (runtime/src/tokenizer/tests.rs) checks the renderings against the GGUF's
template; with EMBER_TEST_HF_DIR=<the --hf-dir used here> it also loads the saved directory.

Environment: transformers 5.x with gguf (the torch env of scripts/ref/README.md).
Usage (from the repo root):
  /tmp/peers/hf/bin/python scripts/ref/chat_template.py [--model PATH] [--out PATH]
                                                        [--hf-dir DIR] [--no-fixture]
--hf-dir keeps the saved tokenizer directory there (default: a temporary directory, removed).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import transformers
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FALLBACK_MODEL = "/tmp/peers/models/SmolLM2-135M-Instruct.Q4_1.gguf"

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    [
        {"role": "user", "content": "  Café 😀 {{ not a tag }} <b>bold</b>\nsecond line  "},
    ],
]

ID_STRINGS = [
    "Hello, world!",
    "<|im_start|>user\nHi<|im_end|>\n",
    " leading space and trailing ",
    "don't can't I'm",
    "Emoji: 😀 👍🏽",
    "我喜欢吃苹果。",
    "def f(x):\n    return x\n",
]


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
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/smollm2_chat.json"))
    ap.add_argument("--hf-dir", default=None, help="keep the saved tokenizer directory here")
    ap.add_argument("--no-fixture", action="store_true", help="only write --hf-dir")
    args = ap.parse_args()
    model = os.path.abspath(args.model or default_model())

    tmp = None
    hf_dir = args.hf_dir
    if hf_dir is None:
        tmp = tempfile.mkdtemp(prefix="ember-hf-tok-")
        hf_dir = tmp
    try:
        tok = AutoTokenizer.from_pretrained(os.path.dirname(model), gguf_file=os.path.basename(model))
        tok.save_pretrained(hf_dir)
        # Render with what the saved directory holds: the files Ember's from_hf_dir reads.
        tok = AutoTokenizer.from_pretrained(hf_dir)
        cases = []
        for messages in CONVERSATIONS:
            for agp in (False, True):
                cases.append({
                    "messages": messages,
                    "add_generation_prompt": agp,
                    "rendered": tok.apply_chat_template(
                        messages, tokenize=False, add_generation_prompt=agp),
                })
        hf_ids = [{"text": s, "ids": tok.encode(s, add_special_tokens=False)} for s in ID_STRINGS]
        out = {
            "model": os.path.basename(model),
            "transformers": transformers.__version__,
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "note": "rendered = AutoTokenizer (saved from the GGUF, reloaded from the saved dir)"
                    ".apply_chat_template(messages, tokenize=False, add_generation_prompt); "
                    "hf_ids = that tokenizer's encode(text, add_special_tokens=False).",
            "cases": cases,
            "hf_ids": hf_ids,
        }
        if not args.no_fixture:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(out, f, ensure_ascii=False, indent=1)
                f.write("\n")
            print(f"wrote {args.out}: {len(cases)} renderings, {len(hf_ids)} id lists",
                  file=sys.stderr)
        if args.hf_dir:
            print(f"saved the tokenizer directory in {args.hf_dir}", file=sys.stderr)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
