#!/usr/bin/env python3
"""A simple chat loop with the `ember` Python package: the conversation is rendered with the
model's chat template and each answer is streamed as it is generated.

    python3 examples/python/chat.py -m SmolLM2-135M-Instruct.Q4_1.gguf
    printf 'Hi!\\nWhat is 2+2?\\n' | python3 examples/python/chat.py -m MODEL --temp 0

Type a message and press Enter; an empty line or end of input (Ctrl-D) quits, `/reset`
starts over. MODEL must have a chat template (an instruct model).
"""

from __future__ import annotations

import argparse
import sys

import ember


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True, help="GGUF file or HF model directory")
    ap.add_argument("-s", "--system", default=None, help="system prompt")
    ap.add_argument("-n", "--max-tokens", type=int, default=256, help="tokens per answer at most")
    ap.add_argument("--temp", type=float, default=0.7, help="temperature (0 = greedy)")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ctx-size", type=int, default=2048, help="tokens the conversation may hold")
    ap.add_argument("--backend", default=None, help="vulkan, metal, dx12, gl or any")
    args = ap.parse_args(argv)

    interactive = sys.stdin.isatty()
    try:
        with ember.Context(backend=args.backend) as ctx, ember.Model(ctx, args.model) as model:
            with ember.Session(model, n_ctx=args.ctx_size) as session:
                start = [{"role": "system", "content": args.system}] if args.system else []
                history = list(start)
                turn = 0
                while True:
                    if interactive:
                        print("> ", end="", flush=True)
                    line = sys.stdin.readline()
                    if not line or not line.strip():
                        break
                    text = line.strip()
                    if not interactive:
                        print(f"> {text}")
                    if text == "/reset":
                        history = list(start)
                        print("(conversation cleared)")
                        continue
                    history.append({"role": "user", "content": text})
                    prompt = model.apply_chat_template(history)
                    if len(model.tokenize(prompt, parse_special=True)) + 8 >= args.ctx_size:
                        print("(the conversation is too long for the context; /reset)")
                        history.pop()
                        continue
                    stream = session.stream(
                        prompt,
                        max_tokens=args.max_tokens,
                        temperature=args.temp,
                        top_p=args.top_p,
                        seed=args.seed + turn,
                    )
                    answer = []
                    for piece in stream:
                        answer.append(piece)
                        print(piece, end="", flush=True)
                    print()
                    history.append({"role": "assistant", "content": "".join(answer).strip()})
                    turn += 1
    except ember.EmberError as e:
        print(f"chat.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
