#!/usr/bin/env python3
"""Teaches a model a LoRA adapter from a JSONL file, saves it, and generates with it.

    python3 examples/python/finetune.py -m MODEL.gguf \\
        --data examples/data/quillfeather/train.jsonl --out quillfeather-lora \\
        --steps 60 --chat -p "Who makes the Quillfeather K7?"

The data is one JSON record per line: {"messages": [{"role": ..., "content": ...}, ...]}
(the assistant turns are learned; needs a chat model), {"prompt": ..., "completion": ...}
or {"text": ...}; any other file is plain text. The adapter is saved in the PEFT layout
(adapter_config.json + adapter_model.safetensors), loadable with ember.Adapter or by PEFT.
Then each prompt is answered by the base model and by the adapter (greedy).

MODEL is a GGUF file or an HF model directory; `scripts/fetch-model.sh` prints the path of
SmolLM2-135M-Instruct. Install the package with `pip install bindings/python` and point
EMBER_LIBRARY at libember (or run from the repository after
`cargo build --release -p ember-capi`).
"""

from __future__ import annotations

import argparse
import sys
import time

import ember


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True, help="GGUF file or HF model directory")
    ap.add_argument("--data", required=True, help="training data (JSONL records or text)")
    ap.add_argument("--out", required=True, help="directory to save the adapter to")
    ap.add_argument("--eval", default=None, help="JSONL records to score before and after")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--alpha", type=float, default=0.0, help="LoRA alpha (0: twice the rank)")
    ap.add_argument(
        "--targets", default="all", help='LoRA targets: "all" or a list such as q,k,v,o,gate'
    )
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (x32)")
    ap.add_argument("--lr", type=float, default=2e-3, help="base learning rate")
    ap.add_argument("--schedule", default="cosine", help="cosine, constant, warmup_constant")
    ap.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%%)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-p", "--prompt", action="append", default=[], help="prompt (repeatable)")
    ap.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    ap.add_argument("-n", "--max-tokens", type=int, default=48, help="tokens to generate")
    ap.add_argument("--backend", default=None, help="vulkan, metal, dx12, gl or any")
    args = ap.parse_args(argv)

    targets = "all" if args.targets == "all" else [t for t in args.targets.split(",") if t]
    eval_records = None
    if args.eval:
        import json

        with open(args.eval, encoding="utf-8") as f:
            eval_records = [json.loads(line) for line in f if line.strip()]

    try:
        with ember.Context(backend=args.backend) as ctx, ember.Model(ctx, args.model) as model:
            params = ember.TrainParams(
                lora_rank=args.rank,
                lora_alpha=args.alpha,
                targets=targets,
                seq_len=args.seq_len,
                lr=args.lr,
                schedule=args.schedule,
                warmup=args.warmup if args.warmup is not None else args.steps // 20,
                total_steps=args.steps,
                seed=args.seed,
            )
            with model.trainer(params) as trainer:
                print(
                    f"training {trainer.info['trainable_params']} parameters "
                    f"for {args.steps} steps of {args.batch_size} sequences",
                    file=sys.stderr,
                )
                if eval_records:
                    before = trainer.evaluate(eval_records)
                    print(f"eval loss before: {before:.4f}", file=sys.stderr)
                t0 = time.perf_counter()

                def progress(step: int, total: int, r: ember.StepResult) -> bool:
                    print(
                        f"\rstep {step}/{total}  loss {r.loss:.4f}  lr {r.lr:.2e}  "
                        f"{r.seconds:.2f} s/step",
                        end="",
                        file=sys.stderr,
                        flush=True,
                    )
                    return True

                try:
                    loss = trainer.train_file(args.data, args.steps, args.batch_size, progress)
                except KeyboardInterrupt:  # the steps done so far are kept: save them
                    loss = float("nan")
                    print("\ninterrupted", file=sys.stderr, end="")
                print(
                    f"\nfinal loss {loss:.4f} after {trainer.steps} steps "
                    f"({time.perf_counter() - t0:.1f} s)",
                    file=sys.stderr,
                )
                if eval_records:
                    after = trainer.evaluate(eval_records)
                    print(f"eval loss after: {after:.4f}", file=sys.stderr)
                trainer.save(args.out)
                print(f"saved the adapter to {args.out}", file=sys.stderr)

            # Load it back as any saved adapter, and answer with and without it.
            with ember.Adapter(model, args.out) as adapter, model.session() as session:
                aid = session.attach_adapter(adapter, "finetuned")
                for prompt in args.prompt:
                    opts = dict(max_tokens=args.max_tokens, temperature=0, chat=args.chat)
                    base = session.generate(prompt, **opts).text
                    tuned = session.generate(prompt, adapter=aid, **opts).text
                    print(f"prompt: {prompt}")
                    print(f"  base:  {base.strip()}")
                    print(f"  tuned: {tuned.strip()}")
    except ember.EmberError as e:
        print(f"finetune.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
