#!/usr/bin/env python3
"""The real-model teaching run of README ("On the real model") done by PyTorch + PEFT on the
CPU: a peer check of what the recipe does to the model, independent of Ember's kernels.

    python scripts/ref/forgetting_peft.py [--replay ce|kl|none] [--topk K] [--lr 2e-3] ...

Base: SmolLM2-135M-Instruct Q4_1 (scripts/fetch-model.sh), loaded by transformers and
dequantized to f32. Data: examples/data/quillfeather/train.jsonl (chat records, loss on the
assistant turn) and examples/data/general/replay.jsonl (plain text), mixed and shuffled
(Python's random with --seed, so the order is not Ember's); LoRA rank 8, alpha 16 on all seven
projections; AdamW, global-norm clipping at 1, linear warmup (3 steps) + cosine; each step's
loss is the sum over its scored tokens divided by their number, as in Ember.

The replay text enters one of three ways:
  --replay ce    as ordinary next-token targets (`ember finetune --data replay.jsonl`);
  --replay kl    distilled: KL(base || adapted) at every position, the base model's
                 distribution computed with the adapter disabled (`ember finetune --distill`);
                 with --topk K the base distribution is cut to its top K and renormalized
                 (a cheaper variant, shown here to be not good enough);
  --replay none  left out.
Then: perplexity of tests/fixtures/text/general.txt (windows of 512, every token after each
window's first scored, as `ember perplexity`), with and without the adapter, and greedy
answers (40 tokens) to examples/data/quillfeather/eval.jsonl, counted when they contain the
expected text (as `ember eval-qa`). Prints one JSON line.
"""

import argparse
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.expanduser(
        "~/.cache/ember/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--steps", type=int, default=45)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default=TARGETS)
    ap.add_argument("--replay", choices=["ce", "kl", "none"], default="kl")
    ap.add_argument("--topk", type=int, default=0)
    ap.add_argument("--seq", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    d, f = os.path.dirname(a.model), os.path.basename(a.model)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    base = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    data = os.path.join(ROOT, "examples/data")

    def chat(msgs):
        full = tok.apply_chat_template(msgs, tokenize=False)
        start = len(tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True))
        p = tok(full[:start], add_special_tokens=False)["input_ids"]
        c = tok(full[start:], add_special_tokens=False)["input_ids"]
        return p + c, [0] * len(p) + [1] * len(c)

    examples = []
    for line in open(os.path.join(data, "quillfeather/train.jsonl")):
        ids, mask = chat(json.loads(line)["messages"])
        examples.append(("data", ids, mask))
    if a.replay != "none":
        for line in open(os.path.join(data, "general/replay.jsonl")):
            ids = tok(json.loads(line)["text"])["input_ids"][: a.seq]
            examples.append(("replay", ids, [1] * len(ids)))

    model = get_peft_model(base, LoraConfig(
        r=a.rank, lora_alpha=2 * a.rank, target_modules=a.targets.split(","), lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)

    def lr_at(step):
        if step < a.warmup:
            return a.lr * step / a.warmup
        t = (step - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * 0.5 * (1 + math.cos(math.pi * t))

    rng = random.Random(a.seed)
    order, losses = [], []
    t0 = time.time()
    for step in range(a.steps):
        if len(order) < a.batch_size:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        batch = [examples[i] for i in order[: a.batch_size]]
        order = order[a.batch_size:]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad()
        n = sum(sum(m[1:]) for _, _, m in batch)
        total = 0.0
        for kind, ids, mask in batch:
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0, :-1]
            scored = torch.tensor(mask[1:], dtype=torch.bool)
            if kind == "replay" and a.replay == "kl":
                with torch.no_grad(), model.disable_adapter():
                    teacher = F.log_softmax(model(input_ids=x).logits[0, :-1], -1)
                lq = F.log_softmax(logits, -1)
                if a.topk:
                    v, ix = teacher.topk(a.topk, -1)
                    terms = -(F.softmax(v, -1) * lq.gather(-1, ix)).sum(-1)
                else:
                    terms = (teacher.exp() * (teacher - lq)).sum(-1)
                loss = terms[scored].sum() / n
            else:
                target = torch.tensor(ids[1:])
                loss = F.cross_entropy(logits[scored], target[scored], reduction="sum") / n
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(total)
    train_s = time.time() - t0
    model.eval()

    def perplexity(adapted):
        text = open(os.path.join(ROOT, "tests/fixtures/text/general.txt")).read()
        ids = tok(text, add_special_tokens=False)["input_ids"]
        nll, count = 0.0, 0
        for i in range(0, len(ids), 512):
            w = ids[i: i + 512]
            if len(w) < 2:
                continue
            with torch.no_grad():
                if adapted:
                    lg = model(input_ids=torch.tensor([w])).logits[0, :-1]
                else:
                    with model.disable_adapter():
                        lg = model(input_ids=torch.tensor([w])).logits[0, :-1]
            nll += F.cross_entropy(lg, torch.tensor(w[1:]), reduction="sum").item()
            count += len(w) - 1
        return math.exp(nll / count)

    ppl_base, ppl = perplexity(False), perplexity(True)
    correct, total_q = 0, 0
    for line in open(os.path.join(data, "quillfeather/eval.jsonl")):
        q = json.loads(line)
        ids = tok.apply_chat_template([{"role": "user", "content": q["question"]}],
                                      add_generation_prompt=True, return_tensors="pt")
        if not torch.is_tensor(ids):
            ids = ids["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=40, do_sample=False)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        correct += q["expect"].lower() in answer.lower()
        total_q += 1
    print(json.dumps({
        "peer": "pytorch+peft", "torch": torch.__version__, "threads": a.threads,
        "replay": a.replay, "topk": a.topk, "lr": a.lr, "steps": a.steps,
        "batch_size": a.batch_size, "rank": a.rank, "targets": a.targets,
        "first_loss": losses[0], "final_loss": losses[-1], "train_s": round(train_s, 1),
        "ppl_base": ppl_base, "ppl": ppl, "ppl_rise": ppl / ppl_base - 1,
        "qa_correct": correct, "qa_questions": total_q, "qa_accuracy": correct / total_q,
    }))


if __name__ == "__main__":
    main()
