#!/usr/bin/env python3
"""PyTorch + PEFT peer of `ember bench-train`: the same LoRA training step, timed on the CPU.

    python scripts/bench_train_peft.py MODEL.gguf [--seq 256] [--lora-rank 8] [--steps 3]

What it does, mirroring examples/cli/src/train_cmds.rs (run_bench_train) and the defaults it
relies on (TrainConfig::default, AdapterArgs):

  * model: the same GGUF, loaded by transformers and dequantized to f32 (Ember trains on the
    stored quantized weights; the arithmetic is the same weights, the memory is not);
  * data: one sequence of `seq` token ids drawn with Ember's own generator (util::Rng, a
    splitmix64: `Rng::new(seed).below(vocab)` per token), so both benches see the very same
    ids; every token after the first is scored (Example::all = labels == input_ids);
  * LoRA: rank r, alpha 2r (scale alpha/r), no dropout, on q,k,v,o,gate,up,down_proj of every
    layer (Ember's `--lora-targets all`); 2,442,240 trainable parameters at r=8 on SmolLM2-135M;
  * optimizer: AdamW lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0, gradient clipping
    to norm 1.0, constant schedule: one step = zero grad, forward, loss, backward, clip, update;
  * timing: `--warmup` steps (Ember: 1) and one forward, then `--steps` timed steps, then
    `--steps` timed training forwards (no grad, loss included: Ember's Trainer::evaluate), then
    `--steps` timed prefills (adapter disabled, KV cache on, logits of every position: Ember's
    Session::logits with no adapter); each reported as mean seconds per call;
  * memory: peak RSS of the whole process (getrusage ru_maxrss, MiB, like Ember's VmHWM), and
    the peak since the model finished loading (VmHWM reset through /proc/self/clear_refs), since
    transformers' GGUF dequantization has a transient peak that is loading, not training.

torch runs with torch.set_num_threads(--threads, default 2) on the CPU. Where Ember runs on
lavapipe (a CPU Vulkan driver) this is a same-silicon comparison of two very different stacks
(oneDNN/MKL kernels vs. SPIR-V JIT-compiled by llvmpipe), so torch's speed is context, not a
target; on a real GPU the ratio is GPU vs. CPU and says even less. Its memory is the more
telling number. The JSON keys parallel Ember's where the meaning is the same.
"""

import argparse
import gc
import json
import os
import resource
import sys
import time

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


class EmberRng:
    """Ember's util::Rng (splitmix64), bit for bit."""

    def __init__(self, seed):
        self.s = (seed ^ GOLDEN) & MASK

    def next_u64(self):
        self.s = (self.s + GOLDEN) & MASK
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def below(self, n):
        return 0 if n == 0 else self.next_u64() % n


TARGETS = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}


def parse_targets(s):
    if s in ("all", "all-linear"):
        return list(TARGETS.values())
    out = []
    for t in s.split(","):
        t = t.strip()
        out.append(t if t.endswith("_proj") else TARGETS[t])
    return out


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def vm_hwm_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_hwm():
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="GGUF file")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=None, help="default: 2 * rank")
    p.add_argument("--lora-targets", default="all")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (Ember: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    path = os.path.abspath(a.model)
    t0 = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    load_s = time.perf_counter() - t0
    rank = a.lora_rank
    alpha = a.lora_alpha if a.lora_alpha is not None else 2.0 * rank
    cfg = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
        target_modules=parse_targets(a.lora_targets), task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, cfg)
    model.train()  # no dropout anywhere in this model or adapter; train() only for parity
    trainable = [q for q in model.parameters() if q.requires_grad]
    n_params = sum(q.numel() for q in trainable)
    opt = torch.optim.AdamW(trainable, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    rng = EmberRng(a.seed)
    vocab = model.config.vocab_size
    ids = torch.tensor([[rng.below(vocab) for _ in range(a.seq)]], dtype=torch.long)

    gc.collect()
    rss_after_load = vm_hwm_mb() if reset_hwm() else None

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        return loss.item()

    def forward():
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()

    def prefill():
        with torch.no_grad(), model.disable_adapter():
            return model(input_ids=ids, use_cache=True).logits.shape

    def timed(f):
        n = max(a.steps, 1)
        t = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t) / n

    first_loss = None
    for _ in range(max(a.warmup, 0)):
        first_loss = step()
    forward()
    prefill()
    step_s = timed(step)
    fwd_s = timed(forward)
    prefill_s = timed(prefill)

    hwm = vm_hwm_mb() if rss_after_load is not None else None
    out = {
        "model": path,
        "model_formats": "F32 (GGUF dequantized by transformers)",
        "device": "cpu", "backend": "pytorch", "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "seq": a.seq, "lora_rank": rank, "lora_alpha": alpha, "lora_targets": a.lora_targets,
        "trainable_params": n_params,
        "train_step_s": step_s, "train_tokens_per_s": a.seq / step_s,
        "forward_s": fwd_s, "step_over_forward": step_s / fwd_s,
        "prefill_s": prefill_s, "step_over_prefill": step_s / prefill_s,
        "first_loss": first_loss,
        "load_s": load_s,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_load_mb": rss_after_load,
        "peak_rss_after_load_mb": hwm,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.exit(main())
