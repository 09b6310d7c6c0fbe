#!/usr/bin/env python3
"""Times llama.cpp (through llama-cpp-python) on a GGUF: prefill of N prompt tokens and
greedy decode of M tokens, the same shape `ember bench` measures. Prints one JSON line.

    python bench_llamacpp.py MODEL --prompt 256 --gen 128 --gpu   (Vulkan: all layers offloaded)
    python bench_llamacpp.py MODEL --prompt 256 --gen 128         (CPU backend)

For the Vulkan build on a CPU Vulkan driver (lavapipe) set GGML_VK_VISIBLE_DEVICES=0, or
ggml-vulkan skips CPU-type devices and silently runs on its CPU backend.
"""
import argparse
import json
import os
import time

import llama_cpp
import numpy as np


def next_token(llm):
    """Greedy next token from the last evaluated position's logits (read from the context:
    `llm.scores` is only filled when every position keeps its logits)."""
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return int(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).argmax())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    llm = llama_cpp.Llama(
        model_path=a.model,
        n_ctx=a.prompt + a.gen + 16,
        n_batch=a.prompt + a.gen + 16,
        n_ubatch=a.prompt,
        n_gpu_layers=-1 if a.gpu else 0,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        verbose=True,
    )
    vocab = llm.n_vocab()
    # The same synthetic prompt ember bench uses.
    prompt = [1000 + (i * 7919) % (vocab - 1000) for i in range(a.prompt)]
    best_p, best_d = 0.0, 0.0
    for _ in range(a.reps):
        llm.reset()
        llm._ctx.memory_clear(True) if hasattr(llm._ctx, "memory_clear") else None
        t0 = time.perf_counter()
        llm.eval(prompt)
        p = a.prompt / (time.perf_counter() - t0)
        tok = next_token(llm)
        first = tok
        t1 = time.perf_counter()
        for _ in range(a.gen):
            llm.eval([tok])
            tok = next_token(llm)
        d = a.gen / (time.perf_counter() - t1)
        best_p, best_d = max(best_p, p), max(best_d, d)
    print(json.dumps({
        "peer": "llama.cpp",
        "llama_cpp_python": llama_cpp.__version__,
        "backend": "vulkan" if a.gpu else f"cpu ({a.threads} threads)",
        "model": os.path.basename(a.model),
        "prompt": a.prompt, "gen": a.gen,
        "prefill_tok_s": best_p, "decode_tok_s": best_d, "first_token": first,
    }))


if __name__ == "__main__":
    main()
