#!/usr/bin/env python3
"""PEFT LoRA / prompt-tuning / prefix-tuning reference fixtures (tests/fixtures/lora/), which
tests/tests/train_parity.rs and tests/tests/adapter_parity.rs compare Ember against: LoRA
adapters with float64 logits, float64 gradients, 20-step AdamW runs (q,v; all linears;
clipping; loss mask; warmup + cosine), prompt tuning and prefix tuning, each with a run.json
(loss, gradient norm and lr per step) and init/final adapters; see scripts/ref/README.md.

Base model: the tiny Llama of tiny_llama.py (--variant llama; weights from the portable
generator that tests/src/tiny.rs reproduces bit for bit), built in float32 and run in float64
(model.double() plus the _exact.py patches, sdpa attention). PEFT is stock PEFT; the only
patch besides _exact.py is the causal-LM loss: transformers' ForCausalLMLoss upcasts logits
with .float(), which would turn the float64 loss into a float32 one, so the model gets
`loss_function = f64_causal_lm_loss`, the same formula without that cast (the difference from
the stock loss at step 0 is recorded in every run.json).

Writes (scripts/ref/README.md, section "tiny_lora.py: LoRA, prompt- and prefix-tuning
fixtures", describes every file and convention):
  qv_random/, all_rslora/     PEFT save_pretrained adapters (float32) with random A AND B
  logits.json                 prompts (lengths 1, 7, 24): float64 last-position logits and
                              per-position argmax for the base model, both adapters and the
                              trained prompt-/prefix-tuning adapters
  grads.safetensors           float64 gradients of the batch-0 loss (qv_random's A and B;
                              prompt- and prefix-tuning initial embeddings)
  batches.json                the 20 training batches (2 x 12 ids each), shared by all runs
  train_qv/, train_all/, train_qv_clip/, train_qv_mask/, train_qv_cosine/,
  prompt_tuning/, prefix_tuning/
                              init/ and final/ (PEFT save_pretrained, float32) + run.json
                              (config, per-step float64 losses, grad norms, lr, clip flags,
                              final - init per tensor)

save_pretrained also writes a model-card README.md into each adapter dir; it is deleted (it
holds no data). PEFT writes target_modules (a Python set) in hash order, so each
adapter_config.json is rewritten with that list sorted and keys sorted (otherwise PEFT's own
content).

Deterministic: 2 torch threads, deterministic algorithms, fixed seeds; two runs write
identical bytes.

Environment: torch (CPU), transformers, peft, safetensors, numpy (e.g. /tmp/peers/hf/bin/python).
Usage (from the repo root):
  /tmp/peers/hf/bin/python scripts/ref/tiny_lora.py [--out DIR] [--lr 1e-2]
"""
import argparse
import json
import math
import os
import shutil
import sys
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_llama  # noqa: E402
from _exact import make_float64_exact  # noqa: E402

ROOT = tiny_llama.ROOT
PROMPTS = [
    [42],
    [1, 17, 99, 200, 3, 255, 128],
    [(i * 37 + 11) % 256 for i in range(24)],
]

N_STEPS = 20
BATCH, SEQ = 2, 12
BATCH_SEED = 1234
ID_LOW, ID_HIGH = 3, 256  # numpy integers(low, high): high exclusive
QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BETAS, EPS, WD = (0.9, 0.999), 1e-8, 0.01
CLIP = 0.05
MASK_FIRST = 5
WARMUP = 3
N_VIRTUAL = 4
RANDOM_B_BOUND = 0.05
SEEDS = {  # torch.manual_seed right before get_peft_model (PEFT's own init draws)
    "train_qv": 100, "train_all": 101, "train_qv_clip": 102, "train_qv_mask": 103,
    "train_qv_cosine": 104, "prompt_tuning": 105, "prefix_tuning": 106,
}
RANDOM_ADAPTER_SEEDS = {"qv_random": 1234, "all_rslora": 1235}  # torch.Generator seeds
TOL_SELF = 1e-10  # float64 self-consistency checks (manual forward vs PEFT, merge, formulas)


# ---------------------------------------------------------------- helpers
def make_batches():
    """N_STEPS batches of BATCH x SEQ ids: numpy default_rng(BATCH_SEED).integers(3, 256, (20, 2, 12))."""
    rng = np.random.default_rng(BATCH_SEED)
    return rng.integers(ID_LOW, ID_HIGH, size=(N_STEPS, BATCH, SEQ)).tolist()


def f64_causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                       shift_labels=None, **kwargs):
    """transformers.loss.loss_utils.ForCausalLMLoss without its `logits.float()` upcast."""
    assert num_items_in_batch is None
    if shift_labels is None:
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    logits = logits.view(-1, vocab_size)
    shift_labels = shift_labels.view(-1).to(logits.device)
    return torch.nn.functional.cross_entropy(logits, shift_labels, ignore_index=ignore_index,
                                             reduction="mean")


def base_model():
    """The tiny Llama in float32 (fresh each call; PEFT edits it in place)."""
    _, model, _ = tiny_llama.build("llama")
    return model


def to_f64(peft_model):
    inner = peft_model.get_base_model()
    make_float64_exact(inner)
    inner.loss_function = f64_causal_lm_loss
    peft_model.to(torch.float64)
    for n, p in peft_model.named_parameters():
        assert p.dtype == torch.float64, n
    return peft_model


def tidy_config(path):
    """PEFT dumps target_modules (a set) in hash order; sort it and the keys."""
    f = os.path.join(path, "adapter_config.json")
    with open(f) as fh:
        d = json.load(fh)
    if isinstance(d.get("target_modules"), list):
        d["target_modules"] = sorted(d["target_modules"])
    with open(f, "w") as fh:
        fh.write(json.dumps(d, indent=2, sort_keys=True) + "\n")


def trainable(peft_model):
    return [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]


def peft_key(name):
    """PeftModel LoRA parameter name -> key in adapter_model.safetensors."""
    return name.replace(".default.", ".")


def save_f32(peft_model, path):
    """save_pretrained with the trainable tensors rounded to float32; afterwards the model is back
    in float64 with its float64 trainable values (the frozen base is float32-exact)."""
    from safetensors.numpy import load_file
    keep = {n: p.detach().clone() for n, p in trainable(peft_model)}
    if os.path.isdir(path):
        shutil.rmtree(path)
    peft_model.to(torch.float32)
    peft_model.save_pretrained(path)
    peft_model.to(torch.float64)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if n in keep:
                p.copy_(keep[n])
    tidy_config(path)
    os.remove(os.path.join(path, "README.md"))  # PEFT's generated model-card template
    st = load_file(os.path.join(path, "adapter_model.safetensors"))
    assert all(v.dtype == np.float32 for v in st.values())
    return st


def f32(x):
    """Shortest decimal that round-trips to the same float32."""
    return float(str(np.float32(x)))


def margin(row):
    top = np.sort(row)[-2:]
    return float(top[1] - top[0])


def logits_of(model, ids, drop=0):
    with torch.no_grad():
        lg = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()
    return lg[drop:]


def loss_on(model, ids, labels=None):
    x = torch.tensor(ids)
    return model(input_ids=x, labels=x if labels is None else labels, use_cache=False).loss


def stock_loss_diff(model, ids, labels=None):
    """|float64 loss - transformers' stock (float32-upcast) loss| on one batch."""
    from transformers.loss.loss_utils import ForCausalLMLoss
    inner = model.get_base_model()
    with torch.no_grad():
        ours = float(loss_on(model, ids, labels))
        inner.loss_function = ForCausalLMLoss
        try:
            stock = float(loss_on(model, ids, labels))
        finally:
            inner.loss_function = f64_causal_lm_loss
    return abs(ours - stock)


def lora_scalings(model):
    return sorted({m.scaling["default"] for m in model.modules()
                   if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling})


class PositionRecorder:
    """Records the position_ids every rotary-embedding call of a (patched) model receives."""

    def __init__(self, model):
        self.seen = []
        self.hooks = []
        for m in model.modules():
            if type(m).__name__.endswith("RotaryEmbedding"):
                self.hooks.append(m.register_forward_hook(self._hook, with_kwargs=True))
        assert self.hooks

    def _hook(self, mod, args, kwargs, out):
        pos = args[1] if len(args) > 1 else kwargs["position_ids"]
        self.seen.append(pos.detach().clone())

    def close(self):
        for h in self.hooks:
            h.remove()


# ---------------------------------------------------------------- manual float64 forward
def manual_forward(W, embeds, pos, prefix_kv=None):
    """Independent float64 Llama forward, the spec Ember implements.

    W: {HF name: float64 tensor} (LoRA already merged by the caller where wanted);
    embeds: [T, hidden] input embeddings; pos: [T] RoPE positions of those rows;
    prefix_kv: None or per layer (K, V), each [n_kv, P, head_dim], used as attention keys and
    values before the T rows, WITHOUT RoPE, visible to every row. Returns logits [T, vocab]."""
    S = tiny_llama.SIZES
    nh, nkv = S["num_attention_heads"], S["num_key_value_heads"]
    hd = S["hidden_size"] // nh
    eps = S["rms_norm_eps"]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    inv = 1.0 / (S["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = pos.to(torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()  # [T, hd]

    def rope(x):  # x [H, T, hd], rotate-half
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    T = embeds.shape[0]
    h = embeds
    for i in range(S["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, W[p + "input_layernorm.weight"])
        q = (x @ W[p + "self_attn.q_proj.weight"].T).view(T, nh, hd).transpose(0, 1)
        k = (x @ W[p + "self_attn.k_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
        v = (x @ W[p + "self_attn.v_proj.weight"].T).view(T, nkv, hd).transpose(0, 1)
        q, k = rope(q), rope(k)
        P = 0
        if prefix_kv is not None:
            pk, pv = prefix_kv[i]
            P = pk.shape[1]
            k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
        rep = nh // nkv  # query head j uses kv head j // rep
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        s = q @ k.transpose(1, 2) / math.sqrt(hd)  # [nh, T, P + T]
        mask = torch.ones(T, P + T, dtype=torch.bool)
        mask[:, P:] = torch.tril(torch.ones(T, T, dtype=torch.bool))
        s = s.masked_fill(~mask, float("-inf"))
        a = torch.softmax(s, -1) @ v  # [nh, T, hd]
        h = h + a.transpose(0, 1).reshape(T, nh * hd) @ W[p + "self_attn.o_proj.weight"].T
        x = rms(h, W[p + "post_attention_layernorm.weight"])
        g = x @ W[p + "mlp.gate_proj.weight"].T
        u = x @ W[p + "mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(g) * u) @ W[p + "mlp.down_proj.weight"].T
    h = rms(h, W["model.norm.weight"])
    return h @ W["lm_head.weight"].T


def merged_weights64(base_w, adapter, scaling):
    """W + scaling * B @ A for every LoRA pair in a PEFT adapter_model.safetensors dict."""
    W = dict(base_w)
    for k in adapter:
        if k.endswith("lora_A.weight"):
            name = k[len("base_model.model."):-len(".lora_A.weight")] + ".weight"
            A = torch.from_numpy(adapter[k]).to(torch.float64)
            B = torch.from_numpy(adapter[k.replace("lora_A", "lora_B")]).to(torch.float64)
            W[name] = W[name] + scaling * (B @ A)
    return W


def prefix_kv_from_flat(flat):
    """PEFT's prefix tensor [P, n_layers*2*n_kv*head_dim] -> per layer (K, V) [n_kv, P, head_dim].

    The same steps as PeftModel.get_prompt: view(P, n_layers*2, n_kv, head_dim), then
    permute to [n_layers*2, n_kv, P, head_dim]; entry 2*l is layer l's K, 2*l+1 its V."""
    S = tiny_llama.SIZES
    nkv, hd, L = S["num_key_value_heads"], S["hidden_size"] // S["num_attention_heads"], S["num_hidden_layers"]
    x = flat.view(flat.shape[0], L * 2, nkv, hd).permute(1, 2, 0, 3)
    return [(x[2 * i], x[2 * i + 1]) for i in range(L)]


# ---------------------------------------------------------------- A. inference parity
def lora_config(targets, r, alpha, rslora=False):
    from peft import LoraConfig
    return LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, target_modules=list(targets),
                      lora_dropout=0.0, bias="none", use_rslora=rslora)


def random_adapter(cfg, path, seed):
    """get_peft_model, then every lora_A ~ U(-1/sqrt(in), 1/sqrt(in)) and every lora_B ~
    U(-0.05, 0.05), drawn from torch.Generator().manual_seed(seed) in sorted parameter-name
    order as (2 * torch.rand(shape) - 1) * bound in float32."""
    from peft import get_peft_model
    torch.manual_seed(0)
    model = get_peft_model(base_model(), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if p.requires_grad:
                assert "lora_" in n and p.dtype == torch.float32, n
                bound = 1.0 / math.sqrt(p.shape[1]) if "lora_A" in n else RANDOM_B_BOUND
                u = torch.rand(p.shape, generator=g, dtype=torch.float32)
                p.copy_((2.0 * u - 1.0) * bound)
    return save_f32(model, path)


def load_adapter(path):
    from peft import PeftModel
    model = PeftModel.from_pretrained(base_model(), path, is_trainable=False)
    return to_f64(model).eval()


def logits_case(model, drop=0):
    out = []
    for ids in PROMPTS:
        lg = logits_of(model, ids, drop)
        out.append({"ids": ids, "logits_last": [f32(v) for v in lg[-1]],
                    "argmax": [int(v) for v in lg.argmax(-1)],
                    "min_top2_margin": min(margin(r) for r in lg)})
    return out, [logits_of(model, ids, drop) for ids in PROMPTS]


def inference(out_dir, batches, base_w):
    cases, checks, grads = {}, {}, {}
    base = to_f64_plain(base_model())
    base_prompts, base_full = logits_case(base)
    cases["base"] = {"adapter": None, "prompts": base_prompts}
    specs = {
        "qv_random": (lora_config(QV, 8, 16), 16 / 8),
        "all_rslora": (lora_config(ALL, 4, 8, rslora=True), 8 / math.sqrt(4)),
    }
    for name, (cfg, scaling) in specs.items():
        path = os.path.join(out_dir, name)
        st = random_adapter(cfg, path, RANDOM_ADAPTER_SEEDS[name])
        model = load_adapter(path)
        for n, p in model.named_parameters():  # the loaded adapter holds exactly the saved values
            if "lora_" in n:
                assert np.array_equal(p.detach().numpy(), st[peft_key(n)].astype(np.float64)), n
        assert lora_scalings(model) == [scaling], (name, lora_scalings(model))
        prompts, full = logits_case(model)
        for p, u, b in zip(prompts, full, base_full):  # from the float64 logits
            p["max_abs_diff_vs_base_last"] = float(np.abs(u[-1] - b[-1]).max())
        cases[name] = {"adapter": name, "scale": 1.0, "lora_scaling": scaling, "prompts": prompts}

        # Independent checks: manual forward with W + scaling * B A, and PEFT's merge_and_unload.
        W = merged_weights64(base_w, st, scaling)
        d_manual = max(float(np.abs(manual_forward(W, W["model.embed_tokens.weight"][torch.tensor(ids)],
                                                   torch.arange(len(ids))).numpy() - u).max())
                       for ids, u in zip(PROMPTS, full))
        if name == "qv_random":
            model.train()
            for n, p in model.named_parameters():
                p.requires_grad_("lora_" in n)
            loss = loss_on(model, batches[0])
            loss.backward()
            for n, p in trainable(model):
                grads[f"qv_random/{peft_key(n)}"] = p.grad.detach().clone().contiguous()
            checks["qv_random_batch0_loss"] = float(loss.detach())
            for _, p in trainable(model):
                p.grad = None
                p.requires_grad_(False)
            model.eval()
        merged = model.merge_and_unload()
        d_merge = max(float(np.abs(logits_of(merged, ids) - u).max()) for ids, u in zip(PROMPTS, full))
        assert d_manual < TOL_SELF and d_merge < TOL_SELF, (name, d_manual, d_merge)
        checks[f"{name}_manual_forward_max_abs_diff"] = d_manual
        checks[f"{name}_merged_vs_unmerged_max_abs_diff"] = d_merge
        print(f"{name}: scaling {scaling}, max |adapted - base| (last position) "
              f"{[round(p['max_abs_diff_vs_base_last'], 4) for p in prompts]}, manual {d_manual:.1e}, "
              f"merged {d_merge:.1e}", file=sys.stderr)
    return cases, checks, grads


def to_f64_plain(model):
    make_float64_exact(model)
    model.loss_function = f64_causal_lm_loss
    return model.eval()


# ---------------------------------------------------------------- B./C./D. training
def full_labels(x):
    return x


def mask_first_labels(x):
    lab = x.clone()
    lab[:, :MASK_FIRST] = -100
    return lab


def cosine_lambda(t):
    """transformers.get_cosine_schedule_with_warmup(num_warmup_steps=WARMUP,
    num_training_steps=N_STEPS) (num_cycles 0.5), written out."""
    if t < WARMUP:
        return t / WARMUP
    progress = (t - WARMUP) / (N_STEPS - WARMUP)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(model, batches, lr, label_fn=full_labels, clip=None, schedule=False):
    """One AdamW step per batch, in order. Returns per-step losses (before the step's update),
    global gradient L2 norms (before clipping), clip flags, learning rates, plus self-checks."""
    from transformers import get_cosine_schedule_with_warmup
    model.train()
    params = [p for _, p in trainable(model)]
    opt = torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    sched = get_cosine_schedule_with_warmup(opt, WARMUP, N_STEPS) if schedule else None
    # A shadow copy updated with the AdamW / clipping / schedule formulas documented in the
    # README; it must track torch's parameters (checks the README against the installed torch).
    shadow = [[p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p)] for p in params]
    b1, b2 = BETAS
    losses, norms, clipped, lrs = [], [], [], []
    adam_diff = clip_diff = 0.0
    stock_diff = stock_loss_diff(model, batches[0], label_fn(torch.tensor(batches[0])))
    for step, ids in enumerate(batches):
        x = torch.tensor(ids)
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=label_fn(x), use_cache=False).loss
        assert loss.dtype == torch.float64
        loss.backward()
        norm = math.sqrt(sum(float((p.grad ** 2).sum()) for p in params))
        norms.append(norm)
        coef = 1.0
        if clip is not None:
            raw = [p.grad.detach().clone() for p in params]
            total = float(torch.nn.utils.clip_grad_norm_(params, clip))
            assert abs(total - norm) <= 1e-12 * max(1.0, norm), (total, norm)
            coef = min(1.0, clip / (norm + 1e-6))
            clip_diff = max(clip_diff, max(float((g * coef - p.grad).abs().max()) for g, p in zip(raw, params)))
        clipped.append(coef < 1.0)
        lr_t = opt.param_groups[0]["lr"]
        want = lr * (cosine_lambda(step) if schedule else 1.0)
        assert abs(lr_t - want) <= 1e-18, (step, lr_t, want)
        lrs.append(lr_t)
        opt.step()
        if sched is not None:
            sched.step()
        t = step + 1
        for (w, m, v), p in zip(shadow, params):
            g = p.grad
            w.mul_(1.0 - lr_t * WD)
            m.copy_(b1 * m + (1.0 - b1) * g)
            v.copy_(b2 * v + (1.0 - b2) * g * g)
            denom = v.sqrt() / math.sqrt(1.0 - b2 ** t) + EPS
            w.sub_((lr_t / (1.0 - b1 ** t)) * m / denom)
            adam_diff = max(adam_diff, float((w - p.detach()).abs().max()))
        losses.append(float(loss.detach()))
    assert adam_diff < 1e-12 and clip_diff < 1e-15, (adam_diff, clip_diff)
    model.eval()
    return {
        "losses": losses, "grad_norms": norms, "lr": lrs, "clipped": clipped,
        "n_clipped": sum(clipped),
        "checks": {"step0_stock_float32_loss_abs_diff": stock_diff,
                   "readme_adamw_formula_max_abs_diff": adam_diff,
                   **({"readme_clip_formula_max_abs_diff": clip_diff} if clip is not None else {})},
    }


def eval_losses(model, batches, label_fn):
    with torch.no_grad():
        return [float(loss_on(model, ids, label_fn(torch.tensor(ids)))) for ids in batches]


def optimizer_json(lr):
    return {"type": "torch.optim.AdamW", "lr": lr, "betas": list(BETAS), "eps": EPS,
            "weight_decay": WD, "weight_decay_applies_to": "every trainable tensor",
            "amsgrad": False, "maximize": False, "foreach": False, "fused": False}


def tensor_diffs(init, final):
    return {k: float(np.abs(final[k].astype(np.float64) - init[k].astype(np.float64)).max())
            for k in sorted(init)}


def write_run(out_dir, name, obj):
    dump(obj, os.path.join(out_dir, name, "run.json"))


def lora_run(out_dir, name, targets, r, alpha, batches, lr, clip=None, mask=False, schedule=False):
    from peft import get_peft_model
    base = base_model()
    torch.manual_seed(SEEDS[name])
    model = get_peft_model(base, lora_config(targets, r, alpha))
    init = {peft_key(n): p.detach().numpy().copy() for n, p in trainable(model)}
    # PEFT's default init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.
    for k, v in init.items():
        if "lora_A" in k:
            bound = 1.0 / math.sqrt(v.shape[1])
            assert v.dtype == np.float32 and np.abs(v).max() <= bound and np.abs(v).max() > 0.9 * bound, k
        else:
            assert not v.any(), k
    to_f64(model)
    st = save_f32(model, os.path.join(out_dir, name, "init"))
    assert sorted(st) == sorted(init) and all(np.array_equal(st[k], init[k]) for k in st)
    label_fn = mask_first_labels if mask else full_labels
    ev0 = eval_losses(model, batches, label_fn)
    run = train(model, batches, lr, label_fn, clip, schedule)
    ev1 = eval_losses(model, batches, label_fn)
    final = save_f32(model, os.path.join(out_dir, name, "final"))
    scaling = lora_scalings(model)
    assert scaling == [alpha / r], scaling
    cfg = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": False,
        "scaling": alpha / r, "scaling_rule": "lora_alpha / r",
        "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none",
        "init": f"PEFT default (A kaiming_uniform a=sqrt(5) = U(-1/sqrt(in_features), "
                f"1/sqrt(in_features)), B = 0) under torch.manual_seed({SEEDS[name]}); values in init/",
        "optimizer": optimizer_json(lr),
        "max_grad_norm": clip,
        "clip_rule": (None if clip is None else
                      "torch.nn.utils.clip_grad_norm_: total = global L2 norm of all gradients; "
                      "coef = min(1, max_norm / (total + 1e-6)); every gradient *= coef"),
        "labels": (f"input_ids with labels[:, :{MASK_FIRST}] = -100 (positions 0..{MASK_FIRST - 1} "
                   f"of each sequence ignored; targets are ids[{MASK_FIRST}..{SEQ - 1}], i.e. the "
                   f"last {SEQ - MASK_FIRST} tokens, predicted by positions {MASK_FIRST - 1}..{SEQ - 2}; "
                   f"{BATCH * (SEQ - MASK_FIRST)} targets per batch)" if mask else
                   f"input_ids (every position; {BATCH * (SEQ - 1)} targets per batch)"),
        "schedule": schedule_json(lr) if schedule else "constant lr",
    }
    return {
        "name": name, "config": cfg, "batches": "../batches.json (step i uses batches[i])",
        "init": "init/", "final": "final/",
        **{k: v for k, v in run.items() if k != "checks"},
        "eval_losses_init": ev0, "eval_losses_final": ev1,
        "eval_mean_loss_init": float(np.mean(ev0)), "eval_mean_loss_final": float(np.mean(ev1)),
        "max_abs_diff_final_vs_init": tensor_diffs(init, final),
        "checks": run["checks"],
    }


def schedule_json(lr):
    return {
        "type": "torch.optim.lr_scheduler.LambdaLR from transformers.get_cosine_schedule_with_warmup"
                f"(num_warmup_steps={WARMUP}, num_training_steps={N_STEPS}, num_cycles=0.5); "
                "scheduler.step() after every optimizer.step()",
        "formula": f"lr_t = lr * f(t) for step t = 0..{N_STEPS - 1} (the lr of the t-th optimizer "
                   f"step); f(t) = t / {WARMUP} if t < {WARMUP}, else "
                   f"0.5 * (1 + cos(pi * (t - {WARMUP}) / ({N_STEPS} - {WARMUP}))); "
                   "note f(0) = 0: step 0 changes no parameter (weight decay is lr * wd too) but "
                   "still updates AdamW's m, v and its step count",
        "lr_t": [lr * cosine_lambda(t) for t in range(N_STEPS)],
    }


def prompt_manual_loss(model, ids, prompt):
    """Manual loss of PEFT prompt tuning: [prompt; embed(ids)] at positions 0..P+n-1, causal,
    labels -100 on the P virtual positions (last virtual position predicts ids[0])."""
    W = {k: v for k, v in model.get_base_model().state_dict().items()}
    losses = []
    for row in ids:
        emb = torch.cat([prompt, W["model.embed_tokens.weight"][torch.tensor(row)]], 0)
        lg = manual_forward(W, emb, torch.arange(emb.shape[0]))
        losses.append(torch.nn.functional.cross_entropy(lg[N_VIRTUAL - 1:-1], torch.tensor(row),
                                                        reduction="sum"))
    return float(sum(losses) / (len(ids) * len(ids[0])))


def prefix_manual_loss(model, ids, flat):
    """Manual loss of PEFT prefix tuning: real tokens at positions P..P+n-1, prefix K/V (no RoPE)
    visible to all; labels = input_ids, n - 1 targets per sequence."""
    W = {k: v for k, v in model.get_base_model().state_dict().items()}
    kv = prefix_kv_from_flat(flat)
    losses = []
    for row in ids:
        emb = W["model.embed_tokens.weight"][torch.tensor(row)]
        lg = manual_forward(W, emb, N_VIRTUAL + torch.arange(len(row)), kv)
        losses.append(torch.nn.functional.cross_entropy(lg[:-1], torch.tensor(row[1:]), reduction="sum"))
    return float(sum(losses) / (len(ids) * (len(ids[0]) - 1)))


def soft_run(out_dir, name, batches, lr):
    """Prompt tuning (name == "prompt_tuning") or prefix tuning (name == "prefix_tuning")."""
    from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
    prefix = name == "prefix_tuning"
    if prefix:
        cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, prefix_projection=False)
    else:
        cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, prompt_tuning_init="RANDOM")
    base = base_model()
    torch.manual_seed(SEEDS[name])
    model = get_peft_model(base, cfg)
    S = tiny_llama.SIZES
    hd = S["hidden_size"] // S["num_attention_heads"]
    width = S["num_hidden_layers"] * 2 * S["num_key_value_heads"] * hd if prefix else S["hidden_size"]
    names = [n for n, _ in trainable(model)]
    assert names == ["prompt_encoder.default.embedding.weight"], names
    w0 = model.prompt_encoder["default"].embedding.weight
    assert tuple(w0.shape) == (N_VIRTUAL, width) and w0.dtype == torch.float32
    to_f64(model)
    init = save_f32(model, os.path.join(out_dir, name, "init"))
    assert list(init) == ["prompt_embeddings"] and np.array_equal(init["prompt_embeddings"], w0.detach().numpy())
    if prefix:
        pc = model.peft_config["default"]
        assert (pc.token_dim, pc.num_attention_heads, pc.num_layers) == (
            S["num_key_value_heads"] * hd, S["num_key_value_heads"], S["num_hidden_layers"]), pc

    # Conventions, checked: position ids seen by RoPE, PEFT's loss vs the manual construction.
    ids = batches[0]
    rec = PositionRecorder(model.get_base_model())
    with torch.no_grad():
        peft_loss = float(loss_on(model, ids))
        n = len(ids[0])
        pos_seen = rec.seen[0][0].tolist()
        rec.seen.clear()
        # An explicit attention_mask of ones, and explicit position_ids 0..n-1, change nothing
        # for prompt tuning (PEFT drops position_ids with a warning); prefix tuning adds P to them.
        x = torch.tensor(ids)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            alt = model(input_ids=x, labels=x, attention_mask=torch.ones_like(x),
                        position_ids=torch.arange(n)[None].expand(len(ids), -1), use_cache=False).loss
        pos_explicit = rec.seen[0][0].tolist()
    rec.close()
    emb = model.prompt_encoder["default"].embedding.weight.detach()
    manual = prefix_manual_loss(model, ids, emb) if prefix else prompt_manual_loss(model, ids, emb)
    d_manual = abs(peft_loss - manual)
    d_alt = abs(float(alt) - peft_loss)
    want = list(range(N_VIRTUAL, N_VIRTUAL + n)) if prefix else list(range(N_VIRTUAL + n))
    assert pos_seen == want and pos_explicit == want, (pos_seen, pos_explicit)
    assert d_manual < TOL_SELF and d_alt < TOL_SELF, (d_manual, d_alt)

    # Step-0 gradient of the trainable embedding (float64).
    model.train()
    loss_on(model, ids).backward()
    grad0 = model.prompt_encoder["default"].embedding.weight.grad.detach().clone()
    model.zero_grad(set_to_none=True)

    ev0 = eval_losses(model, batches, full_labels)
    run = train(model, batches, lr)
    ev1 = eval_losses(model, batches, full_labels)
    final = save_f32(model, os.path.join(out_dir, name, "final"))

    # Inference with the trained prompt read back from its directory.
    back = to_f64(PeftModel.from_pretrained(base_model(), os.path.join(out_dir, name, "final"))).eval()
    wb = back.prompt_encoder["default"].embedding.weight.detach().numpy()
    assert np.array_equal(wb, final["prompt_embeddings"].astype(np.float64))
    prompts, full = logits_case(back, drop=0 if prefix else N_VIRTUAL)
    Wb = {k: v for k, v in back.get_base_model().state_dict().items()}
    fb = torch.from_numpy(wb)
    d_inf = 0.0
    for p, u in zip(PROMPTS, full):
        e = Wb["model.embed_tokens.weight"][torch.tensor(p)]
        if prefix:
            lg = manual_forward(Wb, e, N_VIRTUAL + torch.arange(len(p)), prefix_kv_from_flat(fb))
        else:
            lg = manual_forward(Wb, torch.cat([fb, e], 0), torch.arange(N_VIRTUAL + len(p)))[N_VIRTUAL:]
        d_inf = max(d_inf, float(np.abs(lg.numpy() - u).max()))
    assert d_inf < TOL_SELF, d_inf
    logits = {"adapter": f"{name}/final", "prompts": prompts,
              "note": ("logits of the prompt's own positions; the prefix adds no positions" if prefix else
                       f"logits of the prompt's own positions (PEFT returns {N_VIRTUAL} + n rows; the "
                       f"first {N_VIRTUAL}, the virtual positions, are dropped)")}

    if prefix:
        conv = {
            "peft_type": "PREFIX_TUNING", "num_virtual_tokens": N_VIRTUAL, "prefix_projection": False,
            "init": f"nn.Embedding default N(0, 1) (float32) under torch.manual_seed({SEEDS[name]})",
            "saved_key": "prompt_embeddings",
            "saved_shape": [N_VIRTUAL, width],
            "layout": (f"row j = virtual token j; column c = ((2*layer + kv) * n_kv_heads + head) * "
                       f"head_dim + d with kv = 0 for K and 1 for V (layer 0 K, layer 0 V, layer 1 K, "
                       f"layer 1 V; {S['num_key_value_heads']} KV heads of {hd}); PeftModel.get_prompt: "
                       f"view(B, P, n_layers*2, n_kv_heads, head_dim).permute(2, 0, 3, 1, 4).split(2)"),
            "rope_on_prefix_keys": False,
            "positions": f"real tokens get RoPE positions {N_VIRTUAL}..{N_VIRTUAL}+n-1 (transformers "
                         f"derives them from the cache length {N_VIRTUAL}); explicit position_ids are "
                         f"shifted by +{N_VIRTUAL} by PEFT",
            "attention": "every real token attends to all prefix K/V plus the real tokens up to itself; "
                         f"an attention_mask, if given, gets {N_VIRTUAL} ones prepended",
            "labels": f"input_ids; no virtual positions, {BATCH * (SEQ - 1)} targets per batch",
        }
    else:
        conv = {
            "peft_type": "PROMPT_TUNING", "num_virtual_tokens": N_VIRTUAL, "prompt_tuning_init": "RANDOM",
            "init": f"nn.Embedding default N(0, 1) (float32) under torch.manual_seed({SEEDS[name]})",
            "saved_key": "prompt_embeddings", "saved_shape": [N_VIRTUAL, width],
            "positions": f"inputs_embeds = cat([prompt, embed_tokens(ids)], 1); the virtual tokens "
                         f"take RoPE positions 0..{N_VIRTUAL - 1} and the real tokens "
                         f"{N_VIRTUAL}..{N_VIRTUAL}+n-1 (PEFT passes no position_ids; explicit ones "
                         "are dropped with a warning)",
            "attention": "plain causal over all P + n positions; an attention_mask, if given, gets "
                         f"{N_VIRTUAL} ones prepended",
            "labels": f"input_ids with {N_VIRTUAL} labels of -100 prepended: the last virtual position "
                      f"predicts ids[0], so n targets per sequence ({BATCH * SEQ} per batch)",
        }
    res = {
        "name": name, "config": {**conv, "optimizer": optimizer_json(lr), "max_grad_norm": None,
                                 "schedule": "constant lr"},
        "batches": "../batches.json (step i uses batches[i])", "init": "init/", "final": "final/",
        **{k: v for k, v in run.items() if k != "checks"},
        "eval_losses_init": ev0, "eval_losses_final": ev1,
        "eval_mean_loss_init": float(np.mean(ev0)), "eval_mean_loss_final": float(np.mean(ev1)),
        "max_abs_diff_final_vs_init": tensor_diffs(init, final),
        "checks": {**run["checks"], "rope_position_ids_seen": pos_seen,
                   "peft_vs_manual_loss_abs_diff": d_manual,
                   "explicit_mask_and_position_ids_loss_abs_diff": d_alt,
                   "manual_forward_logits_max_abs_diff": d_inf},
    }
    return res, grad0, logits


# ---------------------------------------------------------------- output
def dump(obj, path):
    """JSON with indent 1, but every list of scalars on one line."""
    def enc(o, ind):
        pad = " " * ind
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f'{pad} {json.dumps(k)}: {enc(v, ind + 1)}' for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, (list, tuple)):
            if all(not isinstance(v, (dict, list, tuple)) for v in o):
                return "[" + ", ".join(json.dumps(v) for v in o) + "]"
            items = [pad + " " + enc(v, ind + 1) for v in o]
            return "[\n" + ",\n".join(items) + "\n" + pad + "]"
        return json.dumps(o)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(enc(obj, 0) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/lora"))
    ap.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate of every run")
    args = ap.parse_args()
    out_dir, lr = args.out, args.lr
    os.makedirs(out_dir, exist_ok=True)

    import peft
    import transformers
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    tiny_llama.check_generator()
    for t in range(N_STEPS + 5):  # the written-out schedule is transformers' own
        from transformers.optimization import _get_cosine_schedule_with_warmup_lr_lambda as hf
        assert cosine_lambda(t) == hf(t, num_warmup_steps=WARMUP, num_training_steps=N_STEPS, num_cycles=0.5)
    batches = make_batches()
    base_w = {n: torch.from_numpy(tiny_llama.tensor_values(n, s)).to(torch.float64)
              for n, s in tiny_llama.tensor_shapes("llama").items()}
    checksum = f"{tiny_llama.weights_checksum({n: w.numpy().astype(np.float32) for n, w in base_w.items()}):016x}"
    base_desc = f"tests/fixtures/tiny_llama (variant llama), weights_checksum {checksum}"
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}

    dump({"base": base_desc,
          "rule": f"numpy.random.default_rng({BATCH_SEED}).integers({ID_LOW}, {ID_HIGH}, "
                  f"size=({N_STEPS}, {BATCH}, {SEQ})); step i trains on batches[i]",
          "batches": batches}, os.path.join(out_dir, "batches.json"))

    cases, checks, grads = inference(out_dir, batches, base_w)

    runs = {
        "train_qv": lora_run(out_dir, "train_qv", QV, 8, 16, batches, lr),
        "train_all": lora_run(out_dir, "train_all", ALL, 4, 8, batches, lr),
        "train_qv_clip": lora_run(out_dir, "train_qv_clip", QV, 8, 16, batches, lr, clip=CLIP),
        "train_qv_mask": lora_run(out_dir, "train_qv_mask", QV, 8, 16, batches, lr, mask=True),
        "train_qv_cosine": lora_run(out_dir, "train_qv_cosine", QV, 8, 16, batches, lr, schedule=True),
    }
    for name in ("prompt_tuning", "prefix_tuning"):
        runs[name], g0, lg = soft_run(out_dir, name, batches, lr)
        grads[f"{name}/step0/prompt_embeddings"] = g0.contiguous()
        cases[f"{name}_final"] = lg
    for name, r in runs.items():
        r.update(versions)
        r["reference"] = ("float64 (model.double() + scripts/ref/_exact.py, sdpa; loss without "
                          "transformers' float32 upcast); adapters saved as float32")
        r["loss"] = ("transformers causal-LM loss: logits[:, t] scored against labels[:, t+1]; mean "
                     "cross entropy over all non-ignored (!= -100) targets of the whole batch")
        r["base"] = base_desc
        write_run(out_dir, name, r)

    dump({"base": base_desc,
          "reference": "float64 forward (sdpa; RMSNorm, RoPE in float64, see scripts/ref/_exact.py) of "
                       "the float32 base weights and float32 adapter values; logits rounded to float32",
          **versions,
          "checks": checks,
          "cases": cases}, os.path.join(out_dir, "logits.json"))
    save_file({k: v.to(torch.float64).contiguous() for k, v in sorted(grads.items())},
              os.path.join(out_dir, "grads.safetensors"), metadata={"format": "pt"})

    print(f"{'run':16} {'loss[0]':>10} {'loss[19]':>10} {'eval init':>10} {'eval final':>10} "
          f"{'|g|[0]':>8} {'|g|[19]':>8} clipped", file=sys.stderr)
    for name, r in runs.items():
        print(f"{name:16} {r['losses'][0]:10.6f} {r['losses'][-1]:10.6f} {r['eval_mean_loss_init']:10.6f} "
              f"{r['eval_mean_loss_final']:10.6f} {r['grad_norms'][0]:8.4f} {r['grad_norms'][-1]:8.4f} "
              f"{r['n_clipped']}", file=sys.stderr)
        assert r["eval_mean_loss_final"] < r["eval_mean_loss_init"], name
    total = 0
    for root, _, files in sorted(os.walk(out_dir)):
        for fn in sorted(files):
            total += os.path.getsize(os.path.join(root, fn))
    print(f"wrote {out_dir}: {total} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
