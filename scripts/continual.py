#!/usr/bin/env python3
"""The continual-learning experiment (issue 8): a sequence of tasks learned one after the
other into a versioned adapter store with `ember learn`, under several methods, each scored
after every task on the held-out questions of every task seen so far (`ember eval-qa`) and
at the end on general-text perplexity (`ember perplexity`). The merge methods (ties, dare)
train each task from scratch with naive settings and merge the task adapters so far into
the adapter of record (`ember adapter commit` + `ember adapter merge`). One JSON object on
stdout:

  per method: acc[t][j] (accuracy on task j after learning task t), average accuracy on all
  tasks after the last, forgetting per task (best earlier accuracy minus final), backward
  transfer, perplexity change against the base, seconds and peak memory per update; and
  the goal check: the default combination forgets >= 50% less than naive sequential
  fine-tuning while keeping >= 90% of its new-task accuracy.

    scripts/continual.py [--model GGUF] [--tasks 4] [--steps 8] [--lr 3e-3]
                         [--methods naive,replay,l2,ewc,distill,gate,ties,dare,default]

The defaults are sized for about an hour on a 2-core machine's lavapipe; on a GPU, a
larger setting: --steps 30 --questions 0 --probe-limit 32.

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
# General text the model wrote itself, kept as anchors by the methods that retain.
ANCHORS = os.path.join(ROOT, "examples", "data", "general", "replay.jsonl")

NAIVE = ["--replay-ratio", "0", "--l2", "0", "--no-gate"]
METHODS = {
    # Plain sequential fine-tuning: no replay, no pull, no gate.
    "naive": NAIVE,
    # Past task examples replayed (2 per step on top of the 4 new ones).
    "replay": ["--replay-ratio", "0.5", "--l2", "0", "--no-gate"],
    "l2": ["--replay-ratio", "0", "--l2", "1.0", "--no-gate"],
    "ewc": ["--replay-ratio", "0", "--l2", "0", "--ewc", "1.0", "--no-gate"],
    # Everything replayed is distilled against the frozen base, general text included.
    "distill": ["--replay-ratio", "0.5", "--replay-distill", "--retain", ANCHORS, "--l2", "0",
                "--no-gate"],
    # The gate alone (its default probes: the replay buffer, i.e. earlier tasks' examples).
    "gate": ["--replay-ratio", "0", "--l2", "0"],
    # Task adapters trained from scratch, merged after each task.
    "ties": "MERGE",
    "dare": "MERGE",
    # The runtime's defaults (2 replayed per 4 new, L2 0.01, the gate on the replay buffer),
    # given the general text to retain.
    "default": ["--retain", ANCHORS],
}
MERGE = {"ties": ["--method", "ties", "--density", "0.5"],
         "dare": ["--method", "dare_ties", "--density", "0.5", "--seed", "1"]}


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
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", default="3e-3")
    ap.add_argument("--warmup", default="0", help="warmup steps (once per store), every method")
    ap.add_argument("--rank", default="8")
    ap.add_argument("--seq", default="64")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--questions", type=int, default=6, help="held-out questions per task (0: all)")
    ap.add_argument("--probe-limit", default="8", help="gate probes scored per set")
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

    def accuracies(adapter, n):
        """Accuracy on each of the first n tasks' questions (one eval-qa run)."""
        path = os.path.join(work, "questions.jsonl")
        counts = []
        with open(path, "w") as f:
            for j in range(n):
                lines = open(evals[j]).read().splitlines()
                counts.append(len(lines))
                f.write("\n".join(lines) + "\n")
        out = run([ember, "eval-qa", "-m", model, "--questions", path, "-n", "12", "--json"]
                  + (["--adapter", adapter] if adapter else []))
        rows, acc, k = parse(out)["answers"], [], 0
        for c in counts:
            acc.append(sum(1 for r in rows[k:k + c] if r["correct"]) / c)
            k += c
        return acc

    def learn(store, data, flags):
        out = run([ember, "learn", "--store", store, "-m", model, "--data", data,
                   "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--lr", a.lr,
                   "--lora-rank", a.rank, "--seq", a.seq, "--seed", "1",
                   "--probe-limit", a.probe_limit, "--warmup", a.warmup, "--json"] + flags)
        return parse(out)

    def head(store):
        h = json.loads(run([ember, "adapter", "list", "--store", store, "--json"]))["head"]
        return os.path.join(store, f"v{h:04d}") if h else None

    def ppl(adapter):
        out = run([ember, "perplexity", "-m", model, "-f", GENERAL, "--json"]
                  + (["--adapter", adapter] if adapter else []))
        return parse(out)["ppl"]

    t0 = time.time()
    result = {"model": model, "tasks": a.tasks, "steps": a.steps, "batch_size": a.batch_size,
              "lr": float(a.lr), "rank": int(a.rank), "seq": int(a.seq), "warmup": int(a.warmup),
              "questions_per_task": a.questions, "probe_limit": int(a.probe_limit), "methods": {}}
    base_ppl = ppl(None)
    result["base_ppl"] = base_ppl
    result["base_acc"] = accuracies(None, a.tasks)
    task_vectors = []  # (adapter dir, update report) per task, shared by the merge methods
    for name in a.methods.split(","):
        store = os.path.join(work, f"store-{name}")
        acc, updates = [], []
        for i, t in enumerate(tasks):
            data = os.path.join(t, "train.jsonl")
            if METHODS[name] == "MERGE":
                if len(task_vectors) <= i:
                    tv = os.path.join(work, f"task-vector-{i + 1}")
                    task_vectors.append((tv + "/v0001", learn(tv, data, NAIVE)))
                rep = task_vectors[i][1]
                run([ember, "adapter", "commit", "--store", store, "-m", model,
                     "--adapter", task_vectors[i][0], "--note", f"task {i + 1}"])
                if i > 0:
                    # The task adapters are versions 1, 2, 4, 6, ...: each task's commit
                    # after the first is followed by the merge of all so far.
                    t0m = time.time()
                    versions = [1] + [2 * k for k in range(1, i + 1)]
                    run([ember, "adapter", "merge", "--store", store, "-m", model]
                        + MERGE[name] + [str(v) for v in versions])
                    rep = dict(rep, secs=rep["secs"] + time.time() - t0m)
            else:
                rep = learn(store, data, METHODS[name])
            updates.append(rep)
            adapter = head(store)
            acc.append(accuracies(adapter, i + 1))
            print(f"continual: {name} task {i + 1}: kept={rep['kept']} acc={acc[-1]}", file=sys.stderr)
        final = acc[-1]
        p = ppl(adapter)
        forgetting = [max(acc[t][j] for t in range(j, a.tasks - 1)) - final[j] for j in range(a.tasks - 1)]
        result["methods"][name] = {
            "acc": acc,
            "avg_acc_final": sum(final) / len(final),
            "new_task_acc": [acc[t][t] for t in range(a.tasks)],
            "forgetting": forgetting,
            "avg_forgetting": sum(forgetting) / max(len(forgetting), 1),
            "bwt": sum(final[j] - acc[j][j] for j in range(a.tasks - 1)) / max(a.tasks - 1, 1),
            "ppl": p,
            "ppl_change_pct": 100.0 * (p - base_ppl) / base_ppl,
            "secs_per_update": sum(u["secs"] for u in updates) / len(updates),
            "peak_rss_mb": max(u["peak_rss_mb"] for u in updates),
            "kept": [u["kept"] for u in updates],
            "device": updates[-1]["device"],
        }
        print(f"continual: {name} done {json.dumps(result['methods'][name])}", file=sys.stderr)
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
