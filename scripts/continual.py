#!/usr/bin/env python3
"""The continual-learning experiment (issue 8): a sequence of tasks learned one after the
other into a versioned adapter store with `ember learn`, under several methods, each scored
after every task on the held-out questions of every task seen so far (`ember eval-qa`) and
at the end on general-text perplexity (`ember perplexity`). One JSON object on stdout:

  per method: acc[t][j] (accuracy on task j after learning task t), average accuracy on all
  tasks after the last, forgetting per task (best earlier accuracy minus final), backward
  transfer, perplexity change against the base, seconds and peak memory per update; and
  the goal check: the default combination forgets >= 50% less than naive sequential
  fine-tuning while keeping >= 90% of its new-task accuracy.

    scripts/continual.py [--model GGUF] [--tasks 4] [--steps 30] [--lr 2e-3]
                         [--methods naive,replay,l2,ewc,distill,gate,default]

Data: examples/data/continual/task*/ (scripts/make-continual-tasks.py). The model defaults
to the path scripts/fetch-model.sh prints. Uses target/release/ember (built if missing).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "examples", "data", "continual")
GENERAL = os.path.join(ROOT, "tests", "fixtures", "text", "general.txt")

METHODS = {
    # Plain sequential fine-tuning: no replay, no pull, no gate.
    "naive": ["--replay-ratio", "0", "--l2", "0", "--no-gate"],
    "replay": ["--replay-ratio", "0.5", "--l2", "0", "--no-gate"],
    "l2": ["--replay-ratio", "0", "--l2", "1.0", "--no-gate"],
    "ewc": ["--replay-ratio", "0", "--l2", "0", "--ewc", "1.0", "--no-gate"],
    "distill": ["--replay-ratio", "0.5", "--replay-distill", "--l2", "0", "--no-gate"],
    "gate": ["--replay-ratio", "0", "--l2", "0", "--max-retained-rise", "0.10", "RETAINED"],
    # The default combination: replay, L2 toward the previous version, the gate.
    "default": ["--replay-ratio", "0.5", "--l2", "0.1", "--max-retained-rise", "0.10", "RETAINED"],
}


def parse(out):
    """The JSON a command printed (pretty or on its last line)."""
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        return json.loads(out.strip().splitlines()[-1])


def run(args, env=None):
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"continual: {' '.join(args)} failed:\n{r.stderr}")
    return r.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", default="2e-3")
    ap.add_argument("--rank", default="8")
    ap.add_argument("--seq", default="64")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--questions", type=int, default=0, help="held-out questions per task (0: all)")
    a = ap.parse_args()
    model = a.model or run([os.path.join(ROOT, "scripts", "fetch-model.sh")]).strip()
    ember = os.path.join(ROOT, "target", "release", "ember")
    if not os.path.exists(ember):
        run(["cargo", "build", "--release", "--locked", "-q", "-p", "ember-cli"])
    tasks = [os.path.join(DATA, f"task{i}") for i in range(1, a.tasks + 1)]
    work = tempfile.mkdtemp(prefix="ember-continual-")
    evals = []
    for t in tasks:
        lines = open(os.path.join(t, "eval.jsonl")).read().splitlines()
        if a.questions:
            lines = lines[: a.questions]
        path = os.path.join(work, os.path.basename(t) + "-eval.jsonl")
        open(path, "w").write("\n".join(lines) + "\n")
        evals.append(path)

    def accuracy(adapter, j):
        out = run([ember, "eval-qa", "-m", model, "--questions", evals[j], "-n", "16", "--json"]
                  + (["--adapter", adapter] if adapter else []))
        return parse(out)["accuracy"]

    def ppl(adapter):
        out = run([ember, "perplexity", "-m", model, "-f", GENERAL, "--json"]
                  + (["--adapter", adapter] if adapter else []))
        return parse(out)["ppl"]

    t0 = time.time()
    result = {"model": model, "tasks": a.tasks, "steps": a.steps, "batch_size": a.batch_size,
              "lr": float(a.lr), "rank": int(a.rank), "seq": int(a.seq), "methods": {}}
    base_ppl = ppl(None)
    result["base_ppl"] = base_ppl
    result["base_acc"] = [accuracy(None, j) for j in range(a.tasks)]
    for name in a.methods.split(","):
        store = os.path.join(work, f"store-{name}")
        acc, updates = [], []
        for i, t in enumerate(tasks):
            flags = []
            for f in METHODS[name]:
                if f == "RETAINED":
                    for k in range(i):
                        flags += ["--probe-retained", os.path.join(tasks[k], "train.jsonl")]
                else:
                    flags.append(f)
            out = run([ember, "learn", "--store", store, "-m", model,
                       "--data", os.path.join(t, "train.jsonl"), "--steps", str(a.steps),
                       "--batch-size", str(a.batch_size), "--lr", a.lr, "--lora-rank", a.rank,
                       "--seq", a.seq, "--seed", "1", "--probe-limit", "16", "--json"] + flags)
            rep = parse(out)
            updates.append(rep)
            head = json.loads(run([ember, "adapter", "list", "--store", store, "--json"]))["head"]
            adapter = os.path.join(store, f"v{head:04d}") if head else None
            acc.append([accuracy(adapter, j) for j in range(i + 1)])
            print(f"continual: {name} task {i + 1}: kept={rep['kept']} acc={acc[-1]}", file=sys.stderr)
        final = acc[-1]
        forgetting = [max(acc[t][j] for t in range(j, a.tasks - 1)) - final[j] for j in range(a.tasks - 1)]
        result["methods"][name] = {
            "acc": acc,
            "avg_acc_final": sum(final) / len(final),
            "new_task_acc": [acc[t][t] for t in range(a.tasks)],
            "forgetting": forgetting,
            "avg_forgetting": sum(forgetting) / max(len(forgetting), 1),
            "bwt": sum(final[j] - acc[j][j] for j in range(a.tasks - 1)) / max(a.tasks - 1, 1),
            "ppl": ppl(adapter),
            "ppl_change_pct": 100.0 * (ppl(adapter) - base_ppl) / base_ppl,
            "secs_per_update": sum(u["secs"] for u in updates) / len(updates),
            "peak_rss_mb": max(u["peak_rss_mb"] for u in updates),
            "kept": [u["kept"] for u in updates],
            "device": updates[-1]["device"],
        }
    m = result["methods"]
    if "naive" in m and "default" in m:
        n, d = m["naive"], m["default"]
        new_n = sum(n["new_task_acc"]) / a.tasks
        new_d = sum(d["new_task_acc"]) / a.tasks
        result["goal"] = {
            "forgetting_reduction": 1 - d["avg_forgetting"] / n["avg_forgetting"] if n["avg_forgetting"] > 0 else None,
            "new_task_acc_ratio": new_d / new_n if new_n > 0 else None,
            "target": "forgetting_reduction >= 0.5 and new_task_acc_ratio >= 0.9",
        }
    result["secs"] = time.time() - t0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
