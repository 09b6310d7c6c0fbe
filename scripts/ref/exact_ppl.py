#!/usr/bin/env python3
"""Exact-math perplexity reference for SmolLM2-135M-Instruct (Q4_1 GGUF).

Writes tests/fixtures/smollm2_ppl.json, which Ember's perplexity tests compare against.

Perplexity definition (the one Ember's CLI computes):
  * tokenize the file with llama.cpp's tokenizer, no BOS, special=False;
  * split the ids into consecutive non-overlapping windows of `ctx` tokens; the last partial
    window is used too if it has at least 2 tokens;
  * in each window score every token except the window's first: token t is predicted from
    tokens window_start..t-1, positions restart at 0 in each window (fresh KV state);
  * ppl = exp(mean NLL over all scored tokens).
For every scored position, in order, "top1" is the argmax token id of the predicting logits.

"Exact math": transformers loads the GGUF (dequantizing every tensor with the gguf package)
and the model runs in float64 (eager attention), so the only approximation left is the
quantization of the weights themselves. "ppl_f32" is the same model run in float32.
"llamacpp_*" is llama.cpp's own CPU result (llama-cpp-python, n_ctx=512, logits_all=True,
every window evaluated from a cleared KV cache) with the same windows and scoring rule;
llama.cpp quantizes activations to 8 bits inside its Q4_1/Q8_0 matmuls, so it differs a little.

Environments: this file runs in two Python environments.
  * torch + transformers + gguf (e.g. /tmp/peers/hf/bin/python): the main run;
  * llama-cpp-python 0.3.36 CPU (e.g. /tmp/peers/cpu/bin/python): tokenization and the
    llama.cpp numbers; the main run calls this same file under that interpreter with
    --llamacpp-part (set it with --llama-python or $EMBER_LLAMA_PYTHON).

Usage (from the repo root):
  /tmp/peers/hf/bin/python scripts/ref/exact_ppl.py [--model PATH] [--out PATH] [--no-f32]
--model defaults to the output of scripts/fetch-model.sh, falling back to
/tmp/peers/models/SmolLM2-135M-Instruct.Q4_1.gguf.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT_DIR = os.path.join(ROOT, "tests", "fixtures", "text")
FALLBACK_MODEL = "/tmp/peers/models/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LLAMA_PYTHON = "/tmp/peers/cpu/bin/python"
# (file under tests/fixtures/text, ctx)
CASES = [("short.txt", 512), ("general.txt", 512)]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def default_model():
    try:
        out = subprocess.run(
            ["bash", os.path.join(ROOT, "scripts", "fetch-model.sh")],
            check=True, stdout=subprocess.PIPE, text=True,
        ).stdout.strip()
        if out and os.path.isfile(out):
            return out
    except (subprocess.CalledProcessError, OSError) as e:
        log(f"fetch-model.sh failed ({e}); using {FALLBACK_MODEL}")
    return FALLBACK_MODEL


def windows(n_tokens, ctx):
    """[start, end) of every window that is scored (at least 2 tokens)."""
    return [(s, min(s + ctx, n_tokens)) for s in range(0, n_tokens, ctx) if min(s + ctx, n_tokens) - s >= 2]


def score_logits(logits, ids):
    """logits: [n, vocab] for window ids (len n). Returns (nll per scored token, top1 per scored token)."""
    logits = np.asarray(logits, dtype=np.float64)[:-1]
    m = logits.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
    tgt = np.asarray(ids[1:])
    nll = lse - logits[np.arange(len(tgt)), tgt]
    return nll, logits.argmax(axis=1)


# ---------------------------------------------------------------- llama.cpp part (cpu env)

def llamacpp_part(model, cases):
    import llama_cpp
    from llama_cpp import Llama

    max_ctx = max(ctx for _, ctx in cases)
    llm = Llama(model_path=model, n_ctx=max_ctx, n_batch=max_ctx, n_ubatch=max_ctx,
                logits_all=True, n_threads=os.cpu_count() or 2, seed=0, verbose=False)
    res = {"llama_cpp_python": llama_cpp.__version__, "cases": []}
    for name, ctx in cases:
        text = open(os.path.join(TEXT_DIR, name), "rb").read()
        ids = llm.tokenize(text, add_bos=False, special=False)
        nll_sums, top1, n_scored = [], [], 0
        for s, e in windows(len(ids), ctx):
            llm.reset()
            llm._ctx.kv_cache_clear()
            w = ids[s:e]
            llm.eval(w)
            nll, t1 = score_logits(llm.scores[: len(w)], w)
            nll_sums.append(float(nll.sum()))
            top1.extend(int(x) for x in t1)
            n_scored += len(nll)
        res["cases"].append({"file": name, "ctx": ctx, "ids": ids, "nll_sums": nll_sums,
                             "top1": top1, "n_scored": n_scored})
    return res


# ---------------------------------------------------------------- exact part (hf env)

def load_hf(model):
    import torch
    from transformers import AutoModelForCausalLM

    from _exact import make_float64_exact

    d, f = os.path.split(os.path.abspath(model))
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32,
                                             attn_implementation="sdpa")
    # Patch RMSNorm/RoPE so that the float64 run really is float64 (see _exact.py); the
    # patched forwards fall back to transformers' own code for float32 inputs.
    make_float64_exact(m)
    return m.eval()


def hf_score(m, ids, ctx, dtype):
    import torch

    m = m.to(dtype)
    nll_sums, nll_all, top1 = [], [], []
    with torch.no_grad():
        for s, e in windows(len(ids), ctx):
            w = ids[s:e]
            x = torch.tensor([w], dtype=torch.long)
            logits = m(x, use_cache=False).logits[0].to(torch.float64).numpy()
            nll, t1 = score_logits(logits, w)
            nll_sums.append(float(nll.sum()))
            nll_all.extend(float(v) for v in nll)
            top1.extend(int(v) for v in t1)
    return nll_sums, nll_all, top1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "smollm2_ppl.json"))
    ap.add_argument("--llama-python", default=os.environ.get("EMBER_LLAMA_PYTHON", DEFAULT_LLAMA_PYTHON))
    ap.add_argument("--llamacpp-part", action="store_true",
                    help="internal: run the llama.cpp half (in the llama-cpp-python env), JSON to stdout")
    ap.add_argument("--no-f32", action="store_true", help="skip the float32 run")
    args = ap.parse_args()
    model = args.model or default_model()

    if args.llamacpp_part:
        json.dump(llamacpp_part(model, CASES), sys.stdout)
        return

    import torch
    import transformers

    torch.manual_seed(0)
    t0 = time.time()
    log(f"llama.cpp part under {args.llama_python} ...")
    lc = json.loads(subprocess.run(
        [args.llama_python, os.path.abspath(__file__), "--llamacpp-part", "--model", model],
        check=True, stdout=subprocess.PIPE, text=True).stdout)
    log(f"  done in {time.time() - t0:.1f}s")

    log("loading the GGUF with transformers ...")
    m = load_hf(model)
    out_cases = []
    for lcc in lc["cases"]:
        name, ctx, ids = lcc["file"], lcc["ctx"], lcc["ids"]
        t0 = time.time()
        nll_sums, nll_all, top1 = hf_score(m, ids, ctx, torch.float64)
        n_scored = len(nll_all)
        ppl = math.exp(sum(nll_sums) / n_scored)
        log(f"{name}: {len(ids)} tokens, {n_scored} scored, f64 ppl {ppl:.6f} ({time.time() - t0:.1f}s)")
        assert n_scored == lcc["n_scored"]
        agree = sum(a == b for a, b in zip(top1, lcc["top1"])) / n_scored
        case = {
            "file": name,
            "ctx": ctx,
            "n_tokens": len(ids),
            "n_windows": len(nll_sums),
            "n_scored": n_scored,
            "ppl": ppl,
            "mean_nll": sum(nll_sums) / n_scored,
        }
        if not args.no_f32:
            f32_sums, _, f32_top1 = hf_score(m, ids, ctx, torch.float32)
            case["ppl_f32"] = math.exp(sum(f32_sums) / n_scored)
            case["f32_top1_agreement"] = sum(a == b for a, b in zip(top1, f32_top1)) / n_scored
            log(f"  f32 ppl {case['ppl_f32']:.6f}, top1 agreement {case['f32_top1_agreement']:.4f}")
        case["llamacpp_ppl"] = math.exp(sum(lcc["nll_sums"]) / n_scored)
        case["llamacpp_top1_agreement"] = agree
        log(f"  llama.cpp ppl {case['llamacpp_ppl']:.6f}, top1 agreement {agree:.4f}")
        case["window_nll_sums"] = nll_sums
        case["llamacpp_window_nll_sums"] = lcc["nll_sums"]
        if len(ids) <= 64:
            case["nll"] = nll_all
        case["ids"] = ids
        case["top1"] = top1
        out_cases.append(case)
        m = m.to(torch.float32)

    out = {
        "model": os.path.basename(model),
        "method": "transformers GGUF load (gguf-package dequantization), float64 forward "
                  "(sdpa attention, RMSNorm and RoPE kept in float64); llama.cpp tokenizer ids (no BOS, special=False); non-overlapping windows "
                  "of ctx tokens (last partial window kept if >= 2 tokens), positions restart at 0 "
                  "per window, every token but the window's first scored; ppl = exp(mean NLL). "
                  "top1 = argmax of the predicting logits per scored token. llamacpp_* = "
                  "llama-cpp-python CPU, same windows and scoring, fresh KV cache per window.",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "llama_cpp_python": lc["llama_cpp_python"],
        "cases": out_cases,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    log(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
