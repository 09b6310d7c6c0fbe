#!/usr/bin/env python3
"""PEFT LoRA / prompt-tuning reference fixtures on the tiny Llama (tests/fixtures/lora/).

Base model: the tiny Llama of tiny_llama.py (--variant llama; weights from the portable
generator that tests/src/tiny.rs reproduces bit for bit), built in float32 and run in float64
(model.double() plus the _exact.py patches, sdpa attention). Everything PEFT does is stock
PEFT; the only patch besides _exact.py is the causal-LM loss: transformers' ForCausalLMLoss
upcasts logits with .float(), which would turn a float64 loss into a float32 one, so the
transformers model gets `loss_function = f64_causal_lm_loss`, the same formula without that
cast (checked against the stock loss at every first step, difference recorded).

Writes (see tests/fixtures/lora/README.md for the full description):
  qv_random/, all_rslora/          PEFT save_pretrained adapters (float32), random A and B
  logits.json                      float64 last-position logits + per-position argmax of the
                                   3 prompts of tests/fixtures/tiny_llama/logits.json with each
                                   adapter, qv_random at scale 0.5, the trained prompt-tuning
                                   adapter; merged-vs-unmerged check
  grads.safetensors                float64 gradients (qv_random on batch 0; prompt tuning step 0)
  train_qv/{init,final}/, train_all/{init,final}/, train_qv_clip/final/, train_qv_mask/final/,
  prompt_tuning/{init,final}/      training runs' adapters (float32; final = float64 result
                                   rounded to float32)
  training.json                    batches, hyper-parameters, per-step losses and grad norms

save_pretrained also writes a model-card README.md template into each adapter directory; it
is deleted (it holds no data).

Deterministic: single-threaded torch, deterministic algorithms, fixed seeds; PEFT writes
target_modules (a Python set) in hash order, so adapter_config.json is rewritten with that
list sorted (otherwise byte-identical to PEFT's output).

Environment: torch (CPU), transformers, peft, safetensors, numpy (e.g. /tmp/peers/hf/bin/python).
Usage (from the repo root): /tmp/peers/hf/bin/python scripts/ref/tiny_lora.py [--out DIR]
"""
import argparse
import json
import math
import os
import shutil
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_llama  # noqa: E402
from _exact import make_float64_exact  # noqa: E402

ROOT = tiny_llama.ROOT
PROMPTS = tiny_llama.PROMPTS

N_STEPS = 20
BATCH, SEQ = 2, 12
BATCH_SEED = 0x4C4F5241  # "LORA"
RANDOM_ADAPTER_SEED = 1234
RANDOM_ADAPTER_STD = 0.05
QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAMW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
ADAMW_PROMPT = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
CLIP = 0.1
MASK_LAST = 4
MERGE_TOL = 1e-9


# ---------------------------------------------------------------- helpers
def make_batches():
    """20 batches of 2 x 12 token ids: SplitMix64 (tiny_llama.splitmix64, i.e. ember::util::Rng
    seeded BATCH_SEED), one draw per token in order (batch, sequence, position), id = draw >> 56."""
    draws = tiny_llama.splitmix64(BATCH_SEED, N_STEPS * BATCH * SEQ)
    ids = [d >> 56 for d in draws]
    return [[ids[(b * BATCH + s) * SEQ:(b * BATCH + s + 1) * SEQ] for s in range(BATCH)]
            for b in range(N_STEPS)]


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
    """The tiny Llama in float32 (fresh each call; get_peft_model edits it in place)."""
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


def sort_config(path):
    """PEFT dumps target_modules (a set) in hash order; sort it, keep PEFT's formatting."""
    f = os.path.join(path, "adapter_config.json")
    with open(f) as fh:
        d = json.load(fh)
    if isinstance(d.get("target_modules"), list):
        d["target_modules"] = sorted(d["target_modules"])
    with open(f, "w") as fh:
        fh.write(json.dumps(d, indent=2, sort_keys=True))


def save_f32(peft_model, path):
    """save_pretrained with the trainable tensors rounded to float32; the model is restored
    to float64 (lossless for the frozen float32-exact base weights; adapter values are kept)."""
    keep = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    if os.path.isdir(path):
        shutil.rmtree(path)
    peft_model.to(torch.float32)
    peft_model.save_pretrained(path)
    peft_model.to(torch.float64)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if n in keep:
                p.copy_(keep[n])
    sort_config(path)
    os.remove(os.path.join(path, "README.md"))  # PEFT's generated model-card template
    from safetensors.numpy import load_file
    st = load_file(os.path.join(path, "adapter_model.safetensors"))
    assert all(v.dtype == np.float32 for v in st.values())
    return st


def trainable(peft_model):
    return [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]


def peft_key(name):
    """PeftModel parameter name -> key in adapter_model.safetensors."""
    return name.replace(".default.", ".")


def argmax_margin(row):
    top = np.sort(row)[-2:]
    return float(top[1] - top[0])


def prompt_logits(model, ids):
    with torch.no_grad():
        lg = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()
    return lg


def logits_case(model):
    out = []
    for ids in PROMPTS:
        lg = prompt_logits(model, ids)
        out.append({
            "ids": ids,
            "logits_last": [float(v) for v in lg[-1]],
            "argmax": [int(v) for v in lg.argmax(-1)],
            "min_top2_margin": min(argmax_margin(r) for r in lg),
        })
    return out


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


def grad_norm(params):
    return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))


# ---------------------------------------------------------------- 1. inference parity
def lora_config(targets, r, alpha, rslora=False):
    from peft import LoraConfig
    return LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, target_modules=list(targets),
                      lora_dropout=0.0, bias="none", use_rslora=rslora)


def random_adapter(cfg, path, seed):
    from peft import get_peft_model
    torch.manual_seed(0)
    model = get_peft_model(base_model(), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if p.requires_grad:
                assert "lora_" in n and p.dtype == torch.float32, n
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * RANDOM_ADAPTER_STD)
    st = save_f32(model, path)
    return st


def load_adapter(path):
    from peft import PeftModel
    model = PeftModel.from_pretrained(base_model(), path, is_trainable=False)
    return to_f64(model).eval()


def set_scale(model, factor):
    from peft.tuners.lora import LoraLayer
    n = 0
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.set_scale("default", factor)
            n += 1
    assert n > 0


def inference(out_dir, batches):
    res = {}
    checks = {}
    grads = {}
    specs = {
        "qv_random": (lora_config(QV, 8, 16), RANDOM_ADAPTER_SEED),
        "all_rslora": (lora_config(ALL, 4, 8, rslora=True), RANDOM_ADAPTER_SEED + 1),
    }
    for name, (cfg, seed) in specs.items():
        path = os.path.join(out_dir, name)
        st = random_adapter(cfg, path, seed)
        model = load_adapter(path)
        # The loaded adapter holds exactly the saved float32 values.
        for n, p in model.named_parameters():
            if "lora_" in n:
                assert np.array_equal(p.detach().numpy(), st[peft_key(n)].astype(np.float64)), n
        scalings = sorted({m.scaling["default"] for m in model.modules() if hasattr(m, "scaling")
                           and isinstance(getattr(m, "scaling"), dict) and "default" in m.scaling})
        res[name] = {"adapter": name, "scale": 1.0, "lora_scaling": scalings,
                     "prompts": logits_case(model)}
        unmerged = [prompt_logits(model, ids) for ids in PROMPTS]

        if name == "qv_random":
            # Gradient of the batch-0 loss (labels = input_ids) w.r.t. every A and B.
            model.train()
            for n, p in model.named_parameters():
                p.requires_grad_("lora_" in n)
            loss = loss_on(model, batches[0])
            loss.backward()
            for n, p in trainable(model):
                grads[f"qv_random/{peft_key(n)}"] = p.grad.detach().clone().contiguous()
            checks["qv_random_batch0_loss"] = float(loss.detach())
            checks["qv_random_batch0_stock_loss_abs_diff"] = stock_loss_diff(model, batches[0])
            for _, p in trainable(model):
                p.grad = None
                p.requires_grad_(False)
            model.eval()

            # Scale 0.5 with PEFT's set_scale (scaling = 0.5 * alpha / r) ...
            set_scale(model, 0.5)
            res["qv_random_scale_0.5"] = {"adapter": "qv_random", "scale": 0.5,
                                          "lora_scaling": [1.0], "prompts": logits_case(model)}
            set_scale(model, 1.0)
            # ... which equals the adapter with B halved (exact: a power of two).
            half = load_adapter(path)
            with torch.no_grad():
                for n, p in half.named_parameters():
                    if "lora_B" in n:
                        p.mul_(0.5)
            d = max(float(np.abs(prompt_logits(half, ids)[-1] -
                                 np.array(res["qv_random_scale_0.5"]["prompts"][i]["logits_last"])).max())
                    for i, ids in enumerate(PROMPTS))
            checks["scale_0.5_vs_B_halved_max_abs_diff"] = d
            assert d < MERGE_TOL, d

        merged = model.merge_and_unload()
        d = max(float(np.abs(prompt_logits(merged, ids) - u).max()) for ids, u in zip(PROMPTS, unmerged))
        assert d < MERGE_TOL, (name, d)
        checks[f"{name}_merged_vs_unmerged_max_abs_diff"] = d
        print(f"{name}: merged vs unmerged max |diff| {d:.3e}", file=sys.stderr)
    return res, checks, grads


# ---------------------------------------------------------------- 2./3. training
def full_labels(x):
    return x


def mask_labels(x):
    lab = torch.full_like(x, -100)
    lab[:, -MASK_LAST:] = x[:, -MASK_LAST:]
    return lab


def train(model, batches, opt_kwargs, label_fn=full_labels, clip=None):
    """One AdamW step per batch. Returns per-step losses (before the step's update), the global
    gradient L2 norms (before clipping), and the final loss on every batch."""
    model.train()
    params = [p for _, p in trainable(model)]
    opt = torch.optim.AdamW(params, **opt_kwargs)
    losses, norms, first_stock_diff = [], [], None
    # A shadow copy updated with the AdamW / clipping formulas documented in the README; it
    # must track torch's parameters (checks the README against the installed torch).
    lr, (b1, b2), eps, wd = opt_kwargs["lr"], opt_kwargs["betas"], opt_kwargs["eps"], opt_kwargs["weight_decay"]
    shadow = [[p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p)] for p in params]
    adam_diff = clip_diff = 0.0
    for step, ids in enumerate(batches):
        x = torch.tensor(ids)
        labels = label_fn(x)
        if step == 0:
            first_stock_diff = stock_loss_diff(model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=labels, use_cache=False).loss
        assert loss.dtype == torch.float64
        loss.backward()
        norms.append(grad_norm(params))
        if clip is not None:
            raw = [p.grad.detach().clone() for p in params]
            total = float(torch.nn.utils.clip_grad_norm_(params, clip))
            assert abs(total - norms[-1]) <= 1e-12 * max(1.0, total), (total, norms[-1])
            coef = min(1.0, clip / (norms[-1] + 1e-6))
            clip_diff = max(clip_diff, max(float((g * coef - p.grad).abs().max()) for g, p in zip(raw, params)))
        opt.step()
        t = step + 1
        for (w, m, v), p in zip(shadow, params):
            g = p.grad
            w.mul_(1.0 - lr * wd)
            m.copy_(b1 * m + (1.0 - b1) * g)
            v.copy_(b2 * v + (1.0 - b2) * g * g)
            denom = v.sqrt() / math.sqrt(1.0 - b2 ** t) + eps
            w.sub_((lr / (1.0 - b1 ** t)) * m / denom)
            adam_diff = max(adam_diff, float((w - p.detach()).abs().max()))
        losses.append(float(loss.detach()))
    assert adam_diff < 1e-12 and clip_diff < 1e-15, (adam_diff, clip_diff)
    model.eval()
    with torch.no_grad():
        final = [float(loss_on(model, ids, label_fn(torch.tensor(ids)))) for ids in batches]
    return {"losses": losses, "grad_norms": norms, "final_losses": final,
            "step0_stock_loss_abs_diff": first_stock_diff,
            "readme_adamw_formula_max_abs_diff": adam_diff,
            **({"readme_clip_formula_max_abs_diff": clip_diff} if clip is not None else {})}


def lora_run(out_dir, name, targets, r, alpha, batches, clip=None, mask=False, save_init=True):
    from peft import get_peft_model
    base = base_model()
    torch.manual_seed(0)
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
    if save_init:
        st = save_f32(model, os.path.join(out_dir, name, "init"))
        assert sorted(st) == sorted(init) and all(np.array_equal(st[k], init[k]) for k in st)
    run = train(model, batches, ADAMW, mask_labels if mask else full_labels, clip)
    save_f32(model, os.path.join(out_dir, name, "final"))
    scaling = sorted({m.scaling["default"] for m in model.modules()
                      if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling})
    return {
        "init": f"{name}/init" if save_init else "train_qv/init",
        "final": f"{name}/final",
        "target_modules": sorted(targets), "r": r, "lora_alpha": alpha, "lora_scaling": scaling,
        "use_rslora": False, "lora_dropout": 0.0,
        "optimizer": optimizer_json(ADAMW),
        "clip_grad_norm": clip,
        "labels": (f"-100 except the last {MASK_LAST} tokens of each sequence" if mask
                   else "input_ids"),
        **run,
    }, init


def optimizer_json(kw):
    return {"type": "torch.optim.AdamW", "lr": kw["lr"], "betas": list(kw["betas"]),
            "eps": kw["eps"], "weight_decay": kw["weight_decay"], "amsgrad": False,
            "maximize": False, "foreach": False, "fused": False}


def prompt_tuning_run(out_dir, batches):
    from peft import PromptTuningConfig, get_peft_model
    base = base_model()
    torch.manual_seed(0)
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init="RANDOM")
    model = get_peft_model(base, cfg)
    to_f64(model)
    names = [n for n, _ in trainable(model)]
    assert names == ["prompt_encoder.default.embedding.weight"], names
    init = save_f32(model, os.path.join(out_dir, "prompt_tuning", "init"))
    assert list(init) == ["prompt_embeddings"] and init["prompt_embeddings"].shape == (4, 64)

    # PEFT's loss = manual: [prompt; embed(ids)] at positions 0..15, causal, labels -100 on the
    # 4 virtual tokens, so the last virtual token predicts ids[0] (12 targets per sequence).
    ids = torch.tensor(batches[0])
    inner = model.get_base_model()
    with torch.no_grad():
        peft_loss = float(model(input_ids=ids, labels=ids, use_cache=False).loss)
        prompt = model.prompt_encoder["default"].embedding.weight
        emb = torch.cat([prompt.unsqueeze(0).expand(ids.shape[0], -1, -1),
                         inner.model.embed_tokens(ids)], dim=1)
        lg = inner(inputs_embeds=emb, use_cache=False).logits
        manual = float(torch.nn.functional.cross_entropy(lg[:, 3:-1].reshape(-1, lg.shape[-1]),
                                                         ids.reshape(-1)))
    pt_check = abs(peft_loss - manual)
    assert pt_check < 1e-12, (peft_loss, manual)

    # Step-0 gradient of the prompt embedding (float64), for the backward kernels.
    model.train()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grad0 = model.prompt_encoder["default"].embedding.weight.grad.detach().clone()
    model.zero_grad(set_to_none=True)

    run = train(model, batches, ADAMW_PROMPT)
    final = save_f32(model, os.path.join(out_dir, "prompt_tuning", "final"))
    res = {
        "init": "prompt_tuning/init", "final": "prompt_tuning/final",
        "num_virtual_tokens": 4, "prompt_tuning_init": "RANDOM (nn.Embedding default: N(0, 1))",
        "optimizer": optimizer_json(ADAMW_PROMPT),
        "clip_grad_norm": None,
        "labels": "input_ids (PEFT prepends -100 for the 4 virtual tokens)",
        "peft_vs_manual_loss_abs_diff": pt_check,
        **run,
    }
    # Inference with the trained (float32-rounded) prompt, read back from its directory.
    from peft import PeftModel
    back = to_f64(PeftModel.from_pretrained(base_model(), os.path.join(out_dir, "prompt_tuning", "final"))).eval()
    w = back.prompt_encoder["default"].embedding.weight.detach().numpy()
    assert np.array_equal(w, final["prompt_embeddings"].astype(np.float64))
    logits = {"adapter": "prompt_tuning/final", "scale": 1.0,
              "note": "logits of the prompt's own positions (the 4 virtual positions dropped); "
                      "argmax likewise over the prompt's positions",
              "prompts": []}
    for p in PROMPTS:
        lg = prompt_logits(back, p)
        assert lg.shape[0] == len(p) + 4
        lg = lg[4:]
        logits["prompts"].append({"ids": p, "logits_last": [float(v) for v in lg[-1]],
                                  "argmax": [int(v) for v in lg.argmax(-1)],
                                  "min_top2_margin": min(argmax_margin(r) for r in lg)})
    return res, grad0, logits


# ---------------------------------------------------------------- output
def dump(obj, path):
    """JSON with indent 1, but every list of numbers on one line."""
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
    with open(path, "w") as f:
        f.write(enc(obj, 0) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/lora"))
    args = ap.parse_args()
    out_dir = args.out
    os.makedirs(out_dir, exist_ok=True)

    import peft
    import transformers
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tiny_llama.check_generator()
    batches = make_batches()

    res, checks, grads = inference(out_dir, batches)

    runs = {}
    runs["train_qv"], qv_init = lora_run(out_dir, "train_qv", QV, 8, 16, batches)
    runs["train_all"], _ = lora_run(out_dir, "train_all", ALL, 4, 8, batches)
    runs["train_qv_clip"], clip_init = lora_run(out_dir, "train_qv_clip", QV, 8, 16, batches,
                                                clip=CLIP, save_init=False)
    runs["train_qv_mask"], mask_init = lora_run(out_dir, "train_qv_mask", QV, 8, 16, batches,
                                                mask=True, save_init=False)
    for other in (clip_init, mask_init):  # same seed, same config -> the same init as train_qv
        assert sorted(other) == sorted(qv_init) and all(np.array_equal(other[k], qv_init[k]) for k in other)
    runs["prompt_tuning"], pt_grad0, pt_logits = prompt_tuning_run(out_dir, batches)
    res["prompt_tuning_final"] = pt_logits
    grads["prompt_tuning/step0/prompt_embeddings"] = pt_grad0.contiguous()

    base_fixture = os.path.join(ROOT, "tests/fixtures/tiny_llama/logits.json")
    with open(base_fixture) as f:
        base = json.load(f)
    assert [p["ids"] for p in base["prompts"]] == PROMPTS
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__}

    dump({
        "base": "tests/fixtures/tiny_llama (variant llama), weights_checksum " + base["weights_checksum"],
        "reference": "float64 forward (sdpa; RMSNorm, RoPE in float64, see scripts/ref/_exact.py) "
                     "of the float32 base weights and float32 adapter values; logits not rounded",
        **versions,
        "checks": {**checks, "merge_tolerance": MERGE_TOL,
                   "merged_equals_unmerged": True},
        "cases": res,
    }, os.path.join(out_dir, "logits.json"))

    dump({
        "base": "tests/fixtures/tiny_llama (variant llama), weights_checksum " + base["weights_checksum"],
        "dtype": "float64 (model.double() + scripts/ref/_exact.py; loss without transformers' "
                 "float32 upcast); adapters saved as float32",
        **versions,
        "batches_note": f"{N_STEPS} batches of {BATCH} x {SEQ} ids; SplitMix64 seeded "
                        f"{BATCH_SEED:#x} (ember::util::Rng::new), id = next_u64() >> 56, "
                        "drawn in (batch, sequence, position) order; step i uses batches[i]",
        "loss": "mean cross entropy over all non-ignored shifted targets of the whole batch "
                "(logits[:, t] predicts labels[:, t+1]; labels -100 ignored)",
        "batches": batches,
        "runs": runs,
    }, os.path.join(out_dir, "training.json"))

    save_file({k: v.to(torch.float64).contiguous() for k, v in sorted(grads.items())},
              os.path.join(out_dir, "grads.safetensors"), metadata={"format": "pt"})

    for name, r in runs.items():
        print(f"{name}: loss {r['losses'][0]:.6f} -> {r['losses'][-1]:.6f} "
              f"(final mean {np.mean(r['final_losses']):.6f}), grad norm "
              f"{r['grad_norms'][0]:.4g} -> {r['grad_norms'][-1]:.4g}", file=sys.stderr)
    for root, _, files in sorted(os.walk(out_dir)):
        for fn in sorted(files):
            p = os.path.join(root, fn)
            print(f"  {os.path.relpath(p, ROOT)} {os.path.getsize(p)}", file=sys.stderr)


if __name__ == "__main__":
    main()
