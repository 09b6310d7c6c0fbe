#!/usr/bin/env python3
"""Streams a continuation of a prompt with the `ember` Python package.

    python3 examples/python/generate.py -m MODEL.gguf -p "The capital of France is" -n 32 --temp 0

MODEL is a GGUF file or an HF model directory; `scripts/fetch-model.sh` prints the path of
SmolLM2-135M-Instruct. Install the package with `pip install bindings/python` and point
EMBER_LIBRARY at libember (or run from the repository after
`cargo build --release -p ember-capi`).
"""

from __future__ import annotations

import argparse
import sys

import ember


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True, help="GGUF file or HF model directory")
    ap.add_argument("-p", "--prompt", default="Once upon a time", help="prompt text")
    ap.add_argument("-n", "--max-tokens", type=int, default=64, help="tokens to generate at most")
    ap.add_argument("--temp", type=float, default=0.8, help="temperature (0 = greedy)")
    ap.add_argument("--top-k", type=int, default=40)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--min-p", type=float, default=0.05)
    ap.add_argument("--repeat-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    ap.add_argument("--ctx-size", type=int, default=2048, help="tokens the context holds")
    ap.add_argument("--backend", default=None, help="vulkan, metal, dx12, gl or any")
    ap.add_argument("-q", "--quiet", action="store_true", help="no statistics on stderr")
    args = ap.parse_args(argv)

    try:
        with ember.Context(backend=args.backend) as ctx, ember.Model(ctx, args.model) as model:
            with ember.Session(model, n_ctx=args.ctx_size) as session:
                stream = session.stream(
                    args.prompt,
                    max_tokens=args.max_tokens,
                    temperature=args.temp,
                    top_k=args.top_k,
                    top_p=args.top_p,
                    min_p=args.min_p,
                    repeat_penalty=args.repeat_penalty,
                    seed=args.seed,
                    stop=args.stop,
                    chat=args.chat,
                )
                if not args.chat:
                    print(args.prompt, end="", flush=True)
                for piece in stream:
                    print(piece, end="", flush=True)
                print()
                r = stream.result
                if not args.quiet and r is not None:
                    print(
                        f"[{r.n_prompt_tokens} prompt tokens at {r.prefill_tok_s:.1f} tok/s, "
                        f"{r.n_tokens} generated at {r.decode_tok_s:.1f} tok/s, "
                        f"stop: {r.stop_reason.name.lower()}]",
                        file=sys.stderr,
                    )
    except ember.EmberError as e:
        print(f"generate.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print()
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
