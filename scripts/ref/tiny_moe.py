#!/usr/bin/env python3
"""Tiny random Mixture-of-Experts models (Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE) with reference logits.

The MoE counterpart of tiny_llama.py (same generator, prompts and fixture conventions; its
functions are imported). Writes a model directory (config.json + model.safetensors, float32,
in the canonical per-expert checkpoint layout that published checkpoints of each family use),
NOT committed, and the committed fixture tests/fixtures/tiny_<variant>/logits.json.

Variants (--variant); every one has vocab 256, hidden 64, 2 layers, 4 heads, 2 kv heads
(head_dim 16), max_pos 128, rms eps 1e-5, rope_theta 1e4, untied lm_head, 4 experts, top-2
routing, expert intermediate size 32, SiLU-gated (SwiGLU) experts, every layer sparse:
  mixtral    MixtralConfig(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32);
             the router's top-2 weights are always renormalized to sum to 1.
             -> /tmp/ember-tiny-mixtral, tests/fixtures/tiny_mixtral/logits.json
  qwen2_moe  Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
             shared_expert_intermediate_size=48, norm_topk_prob=False, decoder_sparse_step=1,
             mlp_only_layers=[], intermediate_size=128 (unused: no dense layer), q/k/v biases
             as Qwen2); plus a shared expert (SwiGLU, width 48) on every token, scaled by
             sigmoid(shared_expert_gate . x).
             -> /tmp/ember-tiny-qwen2-moe, tests/fixtures/tiny_qwen2_moe/logits.json
  olmoe      OlmoeConfig(num_experts=4, num_experts_per_tok=2, intermediate_size=32,
             norm_topk_prob=False); q_norm / k_norm RMSNorms applied to the whole q and k
             projections (all heads together, before RoPE): q_norm weight [64], k_norm [32].
             -> /tmp/ember-tiny-olmoe, tests/fixtures/tiny_olmoe/logits.json
  qwen3_moe  Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
             head_dim=16, norm_topk_prob=True (as Qwen3-30B-A3B), decoder_sparse_step=1,
             mlp_only_layers=[], attention_bias=False, intermediate_size=128 (unused: no dense
             layer)); no shared expert; per-head q_norm / k_norm RMSNorms (weights [head_dim] =
             [16], shared by the heads) applied to each head's q and k after the projection,
             before RoPE.
             -> /tmp/ember-tiny-qwen3-moe, tests/fixtures/tiny_qwen3_moe/logits.json

The MoE block of every layer, for a token x (after post_attention_layernorm):
  p = softmax(W_router x) over the 4 experts; ids = the 2 largest p, largest first (torch.topk);
  w = p[ids], divided by its sum for Mixtral and Qwen3-MoE only;
  y = sum_j w_j * down_e(silu(gate_e x) * up_e x) (Qwen2-MoE: y += sigmoid(w_sg . x) * shared(x));
  the residual adds y.

Canonical safetensors keys (per layer i, expert e), all [out, in]:
  mixtral    model.layers.{i}.block_sparse_moe.gate.weight [4, 64] (router),
             model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight [32, 64] (gate),
             .w2.weight [64, 32] (down), .w3.weight [32, 64] (up)
  qwen2_moe  model.layers.{i}.mlp.gate.weight [4, 64],
             model.layers.{i}.mlp.experts.{e}.{gate_proj,up_proj}.weight [32, 64], .down_proj [64, 32],
             model.layers.{i}.mlp.shared_expert.{gate_proj,up_proj}.weight [48, 64], .down_proj [64, 48],
             model.layers.{i}.mlp.shared_expert_gate.weight [1, 64],
             model.layers.{i}.self_attn.{q,k,v}_proj.bias
  olmoe      model.layers.{i}.mlp.gate.weight, model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
             (as qwen2_moe), model.layers.{i}.self_attn.q_norm.weight [64], .k_norm.weight [32]
  qwen3_moe  router and experts as olmoe, model.layers.{i}.self_attn.q_norm.weight [16],
             .k_norm.weight [16] (per head)
plus, for all, model.embed_tokens.weight, model.norm.weight, lm_head.weight and per layer
input_layernorm, post_attention_layernorm, self_attn.{q,k,v,o}_proj.weight as in tiny_llama.py.
transformers 5 holds the experts fused (mlp.experts.gate_up_proj [4, 64, 64] = per expert
[gate; up] stacked on the output dim, mlp.experts.down_proj [4, 64, 32]; Mixtral's
block_sparse_moe is renamed mlp): the script fuses the canonical tensors itself to set the
model, checks that model.save_pretrained writes back exactly the canonical keys and values,
and that from_pretrained of the written directory gives identical parameters and logits.

Weights: every canonical tensor comes from tiny_llama.py's portable generator (per tensor
SplitMix64 seeded 0x454D424552 + FNV-1a-64(name), w = (2u - 1) * f32(0.2*sqrt(3)) in f32,
names containing "norm" 1 + w), implemented bit for bit by tests/src/tiny.rs; weights_checksum
as in tiny_llama.py (FNV-1a-64 over sorted names + f32 LE data).

Reference: float64 forward (transformers, sdpa attention, experts_implementation="eager",
RMSNorm, RoPE and the router's softmax / top-k / renormalization in float64, see _exact.py) of
the float32 weights, logits rounded to float32; an independent numpy float64 forward written
from the description above must agree (checks.manual_forward_max_abs_diff).

Fixture keys: variant, architecture, config, moe, init, weights_checksum, model_sha256, tensors
(sorted names), tensor_shapes, reference, transformers, torch, prompts (as tiny_llama.py: ids,
logits_last, argmax, greedy, min_top2_margin, f32_max_abs_diff, f32_argmax_same, plus
min_route_gap, the smallest gap between the 2nd and 3rd largest router probability over all
layers and positions, and f32_routing_same), routing (7-token prompt, per layer: experts =
the top-2 expert ids per token in transformers' order, largest probability first; weights =
the weights applied to them; probs = the full softmax), gguf (what llama.cpp's converter makes
of the checkpoint, from the gguf-py package: architecture, metadata, tensor names and ggml
dims, which tensors stay f32 under llama-quantize, which weights' rows are not whole 32-element
blocks (Qwen2-MoE's 48-wide ffn_down_shexp: llama-quantize refuses Q8_0/Q4_0/Q4_1 for them),
whether q/k rows are permuted), checks.

Environment: torch, transformers (5.x), safetensors, numpy, gguf (e.g. /tmp/peers/hf/bin/python).
Usage (from the repo root):
  /tmp/peers/hf/bin/python scripts/ref/tiny_moe.py [--variant mixtral|qwen2_moe|olmoe|qwen3_moe]
      [OUT_DIR] [--fixture PATH] [--no-fixture]
"""
import argparse
import hashlib
import importlib.metadata
import json
import os
import sys
import tempfile

import numpy as np
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _exact import make_float64_exact  # noqa: E402
from tiny_llama import (  # noqa: E402
    N_GREEDY,
    PROMPTS,
    ROOT,
    check_generator,
    f32,
    margin,
    tensor_values,
    weights_checksum,
)

VARIANTS = {
    "mixtral": ("/tmp/ember-tiny-mixtral", "tests/fixtures/tiny_mixtral/logits.json"),
    "qwen2_moe": ("/tmp/ember-tiny-qwen2-moe", "tests/fixtures/tiny_qwen2_moe/logits.json"),
    "olmoe": ("/tmp/ember-tiny-olmoe", "tests/fixtures/tiny_olmoe/logits.json"),
    "qwen3_moe": ("/tmp/ember-tiny-qwen3-moe", "tests/fixtures/tiny_qwen3_moe/logits.json"),
}
# The sizes shared with tiny_llama.py (its SIZES without intermediate_size).
SIZES = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
             rope_theta=10000.0)
N_EXPERTS, TOP_K, EXPERT_FFN, SHARED_FFN = 4, 2, 32, 48
QWEN2_MOE_DENSE_FFN = 128  # Qwen2MoeConfig.intermediate_size: used by no layer here
QWEN3_MOE_DENSE_FFN = 128  # Qwen3MoeConfig.intermediate_size: used by no layer here
# Variants whose router renormalizes its top-k weights to sum to 1.
RENORMALIZED = ("mixtral", "qwen3_moe")
ROUTE_PROMPT = 1  # index in PROMPTS of the prompt whose routing is recorded (7 tokens)


def head_dim():
    return SIZES["hidden_size"] // SIZES["num_attention_heads"]


def expert_names(variant):
    """(gate, up, down) per-expert weight names, as in the canonical checkpoints."""
    return ("w1", "w3", "w2") if variant == "mixtral" else ("gate_proj", "up_proj", "down_proj")


def moe_prefix(variant, i):
    return f"model.layers.{i}." + ("block_sparse_moe." if variant == "mixtral" else "mlp.")


def tensor_shapes(variant):
    """{canonical HF name: shape}, sorted by name, as tests/src/tiny.rs tensor_shapes()."""
    h, v = SIZES["hidden_size"], SIZES["vocab_size"]
    kv = SIZES["num_key_value_heads"] * head_dim()
    t = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    g, u, d = expert_names(variant)
    for i in range(SIZES["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
        })
        if variant == "qwen2_moe":
            t.update({p + "self_attn.q_proj.bias": (h,), p + "self_attn.k_proj.bias": (kv,),
                      p + "self_attn.v_proj.bias": (kv,)})
        if variant == "olmoe":
            t.update({p + "self_attn.q_norm.weight": (h,), p + "self_attn.k_norm.weight": (kv,)})
        if variant == "qwen3_moe":  # per head, shared by the heads
            t.update({p + "self_attn.q_norm.weight": (head_dim(),), p + "self_attn.k_norm.weight": (head_dim(),)})
        m = moe_prefix(variant, i)
        t[m + "gate.weight"] = (N_EXPERTS, h)
        for e in range(N_EXPERTS):
            t.update({
                f"{m}experts.{e}.{g}.weight": (EXPERT_FFN, h),
                f"{m}experts.{e}.{u}.weight": (EXPERT_FFN, h),
                f"{m}experts.{e}.{d}.weight": (h, EXPERT_FFN),
            })
        if variant == "qwen2_moe":
            t.update({
                m + "shared_expert.gate_proj.weight": (SHARED_FFN, h),
                m + "shared_expert.up_proj.weight": (SHARED_FFN, h),
                m + "shared_expert.down_proj.weight": (h, SHARED_FFN),
                m + "shared_expert_gate.weight": (1, h),
            })
    return dict(sorted(t.items()))


def make_config(variant):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(**SIZES, tie_word_embeddings=False, hidden_act="silu", bos_token_id=None,
                  eos_token_id=None, pad_token_id=None, num_experts_per_tok=TOP_K,
                  experts_implementation="eager")
    if variant == "mixtral":
        cfg = MixtralConfig(**common, num_local_experts=N_EXPERTS, intermediate_size=EXPERT_FFN,
                            sliding_window=None)
    elif variant == "qwen2_moe":
        cfg = Qwen2MoeConfig(**common, num_experts=N_EXPERTS, moe_intermediate_size=EXPERT_FFN,
                             shared_expert_intermediate_size=SHARED_FFN,
                             intermediate_size=QWEN2_MOE_DENSE_FFN, norm_topk_prob=False,
                             decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True,
                             use_sliding_window=False, sliding_window=None,
                             max_window_layers=SIZES["num_hidden_layers"])
    elif variant == "qwen3_moe":
        cfg = Qwen3MoeConfig(**common, num_experts=N_EXPERTS, moe_intermediate_size=EXPERT_FFN,
                             intermediate_size=QWEN3_MOE_DENSE_FFN, head_dim=head_dim(),
                             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                             attention_bias=False, use_sliding_window=False, sliding_window=None)
        assert cfg.head_dim == head_dim() and cfg.norm_topk_prob is True, cfg
    else:
        cfg = OlmoeConfig(**common, num_experts=N_EXPERTS, intermediate_size=EXPERT_FFN,
                          norm_topk_prob=False, attention_bias=False, clip_qkv=None)
    cfg._attn_implementation = "sdpa"
    return cfg


def config_json(variant, cfg, arch):
    """The config.json written next to the weights (checkpoint layout, both the top-level
    rope_theta and transformers 5's rope_parameters); the same as tests/src/tiny.rs."""
    c = {
        "architectures": [arch],
        "model_type": cfg.model_type,
        **SIZES,
        "intermediate_size": cfg.intermediate_size,
        "head_dim": head_dim(),
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": SIZES["rope_theta"]},
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": "float32",
        "num_experts_per_tok": TOP_K,
    }
    if variant == "mixtral":
        c.update(num_local_experts=N_EXPERTS, sliding_window=None)
    elif variant == "qwen2_moe":
        c.update(num_experts=N_EXPERTS, moe_intermediate_size=EXPERT_FFN,
                 shared_expert_intermediate_size=SHARED_FFN, norm_topk_prob=False,
                 decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
                 sliding_window=None, max_window_layers=SIZES["num_hidden_layers"])
    elif variant == "qwen3_moe":
        c.update(num_experts=N_EXPERTS, moe_intermediate_size=EXPERT_FFN, norm_topk_prob=True,
                 decoder_sparse_step=1, mlp_only_layers=[], attention_bias=False,
                 use_sliding_window=False, sliding_window=None)
    else:
        c.update(num_experts=N_EXPERTS, norm_topk_prob=False, attention_bias=False,
                 clip_qkv=None, pad_token_id=None)
    return c


def internal_tensors(variant, tensors):
    """The canonical tensors in transformers 5's parameter layout: per layer, the router as
    mlp.gate.weight and the experts fused into mlp.experts.gate_up_proj [E, 2F, H] (expert e:
    rows 0..F-1 its gate, F..2F-1 its up weight) and mlp.experts.down_proj [E, H, F]."""
    out = {}
    g, u, d = expert_names(variant)
    fused = set()
    for i in range(SIZES["num_hidden_layers"]):
        m = moe_prefix(variant, i)
        t = f"model.layers.{i}.mlp."
        out[t + "experts.gate_up_proj"] = np.stack([
            np.concatenate([tensors[f"{m}experts.{e}.{g}.weight"], tensors[f"{m}experts.{e}.{u}.weight"]], 0)
            for e in range(N_EXPERTS)])
        out[t + "experts.down_proj"] = np.stack([tensors[f"{m}experts.{e}.{d}.weight"] for e in range(N_EXPERTS)])
        out[t + "gate.weight"] = tensors[m + "gate.weight"]
        fused |= {f"{m}experts.{e}.{w}.weight" for e in range(N_EXPERTS) for w in (g, u, d)}
        fused.add(m + "gate.weight")
    for name, v in tensors.items():
        if name not in fused:
            out[name] = v
    return out


def build(variant):
    from transformers import MixtralForCausalLM, OlmoeForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

    cls = {"mixtral": MixtralForCausalLM, "qwen2_moe": Qwen2MoeForCausalLM, "olmoe": OlmoeForCausalLM,
           "qwen3_moe": Qwen3MoeForCausalLM}[variant]
    cfg = make_config(variant)
    model = cls(cfg).to(torch.float32).eval()
    assert model.config._experts_implementation == "eager", model.config._experts_implementation
    tensors = {name: tensor_values(name, shape) for name, shape in tensor_shapes(variant).items()}
    internal = internal_tensors(variant, tensors)
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(internal), (sorted(set(params) ^ set(internal)))
    with torch.no_grad():
        for name, p in params.items():
            assert tuple(p.shape) == internal[name].shape, (name, p.shape, internal[name].shape)
            p.copy_(torch.from_numpy(np.ascontiguousarray(internal[name])))
            assert np.array_equal(p.numpy(), internal[name])
    # No buffer other than RoPE's inv_freq (nothing else is left at a default).
    assert all(n.endswith("inv_freq") for n, _ in model.named_buffers()), list(model.named_buffers())
    return cfg, model, tensors


def save(variant, cfg, model, tensors, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.safetensors")
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, path,
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config_json(variant, cfg, type(model).__name__), f, indent=2, sort_keys=True)
        f.write("\n")
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    back = load_file(path)
    assert sorted(back) == sorted(tensors) and all(np.array_equal(back[k], tensors[k]) for k in back)
    return sha, weights_checksum(back)


def check_save_pretrained(model, tensors):
    """transformers 5 saves its fused experts back in the legacy per-expert layout: that file
    must hold exactly the canonical names and values (proves the fusing in build() is the
    inverse of transformers' own conversion)."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        sd = load_file(os.path.join(d, "model.safetensors"))
    assert sorted(sd) == sorted(tensors), sorted(set(sd) ^ set(tensors))
    assert all(np.array_equal(sd[k], tensors[k]) for k in sd)
    return True


# ---- an independent float64 forward from the canonical tensors (numpy) ----

def _rms(x, w, eps):
    return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def manual_forward(variant, tensors, ids):
    """Logits [n, vocab] and per-layer top-k expert ids [n, k], computed from the description in
    the module docstring only (rotate-half RoPE, GQA, causal softmax attention, the MoE block)."""
    W = {k: v.astype(np.float64) for k, v in tensors.items()}
    H, nh, nkv, hd = SIZES["hidden_size"], SIZES["num_attention_heads"], SIZES["num_key_value_heads"], head_dim()
    eps, n = SIZES["rms_norm_eps"], len(ids)
    inv = 1.0 / (SIZES["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = np.arange(n, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(q):  # [n, heads, hd]
        rot = np.concatenate([-q[..., hd // 2:], q[..., :hd // 2]], -1)
        return q * cos[:, None, :] + rot * sin[:, None, :]

    def lin(x, name):
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    g, u, d = expert_names(variant)
    x = W["model.embed_tokens.weight"][ids]
    routes = []
    for i in range(SIZES["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, W[p + "input_layernorm.weight"], eps)
        q, k, v = lin(h, p + "self_attn.q_proj"), lin(h, p + "self_attn.k_proj"), lin(h, p + "self_attn.v_proj")
        if variant == "olmoe":  # over the whole projection, all heads together
            q, k = _rms(q, W[p + "self_attn.q_norm.weight"], eps), _rms(k, W[p + "self_attn.k_norm.weight"], eps)
        q, k, v = q.reshape(n, nh, hd), k.reshape(n, nkv, hd), v.reshape(n, nkv, hd)
        if variant == "qwen3_moe":  # per head: each head's hd values, one weight shared by the heads
            q, k = _rms(q, W[p + "self_attn.q_norm.weight"], eps), _rms(k, W[p + "self_attn.k_norm.weight"], eps)
        q, k = rope(q), rope(k)
        att = np.zeros((n, nh, hd))
        causal = np.triu(np.ones((n, n), dtype=bool), 1)
        for hh in range(nh):
            kh = hh // (nh // nkv)
            s = q[:, hh] @ k[:, kh].T / np.sqrt(hd)
            s[causal] = -np.inf
            att[:, hh] = _softmax(s) @ v[:, kh]
        x = x + lin(att.reshape(n, H), p + "self_attn.o_proj")
        h = _rms(x, W[p + "post_attention_layernorm.weight"], eps)
        m = moe_prefix(variant, i)
        probs = _softmax(h @ W[m + "gate.weight"].T)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :TOP_K]
        routes.append(top)
        y = np.zeros_like(h)
        for t in range(n):
            w = probs[t, top[t]]
            if variant in RENORMALIZED:
                w = w / w.sum()
            for j, e in enumerate(top[t]):
                a = _silu(h[t] @ W[f"{m}experts.{e}.{g}.weight"].T) * (h[t] @ W[f"{m}experts.{e}.{u}.weight"].T)
                y[t] += w[j] * (a @ W[f"{m}experts.{e}.{d}.weight"].T)
        if variant == "qwen2_moe":
            a = _silu(h @ W[m + "shared_expert.gate_proj.weight"].T) * (h @ W[m + "shared_expert.up_proj.weight"].T)
            gate = 1.0 / (1.0 + np.exp(-(h @ W[m + "shared_expert_gate.weight"].T)))  # [n, 1]
            y = y + gate * (a @ W[m + "shared_expert.down_proj.weight"].T)
        x = x + y
    x = _rms(x, W["model.norm.weight"], eps)
    return x @ W["lm_head.weight"].T, routes


# ---- what llama.cpp's convert_hf_to_gguf.py makes of the checkpoint (from gguf-py) ----

def gguf_expectation(variant, tensors):
    """Names and ggml dims of the GGUF tensors, from gguf-py's TensorNameMap and the merged
    expert names convert_hf_to_gguf.py (LlamaModel for Mixtral, Qwen2MoeModel, OlmoeModel)
    stacks the E per-expert matrices under (torch.stack(dim=0): [E, out, in], ggml dims
    [in, out, E]); the metadata those converter classes write (the keys shared with the dense
    tiny GGUFs plus the expert ones); the tensors llama-quantize leaves f32 (ggml n_dims < 2
    with trailing 1s dropped, *_norm.weight, *ffn_gate_inp.weight: the router)."""
    import gguf

    arch = {"mixtral": gguf.MODEL_ARCH.LLAMA, "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE,
            "olmoe": gguf.MODEL_ARCH.OLMOE, "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE}[variant]
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    tmap = gguf.get_tensor_name_map(arch, SIZES["num_hidden_layers"])
    allowed = {gguf.TENSOR_NAMES[t].format(bid=b) for t in gguf.MODEL_TENSORS[arch]
               for b in range(SIZES["num_hidden_layers"])}
    out, seen = {}, set()
    g, u, d = expert_names(variant)
    for name, shape in tensors.items():
        parts = name.split(".")
        if "experts" in parts:
            bid, wid = int(parts[2]), parts[-2]
            if (bid, wid) in seen:
                continue
            seen.add((bid, wid))
            merged = (f"layers.{bid}.feed_forward.experts.{wid}.weight" if variant == "mixtral"
                      else f"model.layers.{bid}.mlp.experts.{wid}.weight")
            shape = (N_EXPERTS, *shape)
            src = merged
        else:
            src = name
        new = tmap.get_name(src, try_suffixes=(".weight", ".bias"))
        assert new is not None, src
        assert new.rsplit(".", 1)[0] in allowed, (new, arch_name)
        out[new] = list(reversed(shape))
    for w in (g, u, d):
        assert all((b, w) in seen for b in range(SIZES["num_hidden_layers"]))

    def ggml_ndims(dims):
        nd = len(dims)
        while nd > 1 and dims[nd - 1] == 1:
            nd -= 1
        return nd

    f32_kept = sorted(n for n, dims in out.items()
                      if ggml_ndims(dims) < 2 or n.endswith("_norm.weight") or "ffn_gate_inp.weight" in n
                      or not n.endswith(".weight"))
    K = gguf.Keys.LLM
    md = {
        "general.architecture": arch_name,
        K.BLOCK_COUNT.format(arch=arch_name): SIZES["num_hidden_layers"],
        K.CONTEXT_LENGTH.format(arch=arch_name): SIZES["max_position_embeddings"],
        K.EMBEDDING_LENGTH.format(arch=arch_name): SIZES["hidden_size"],
        K.FEED_FORWARD_LENGTH.format(arch=arch_name): {"qwen2_moe": QWEN2_MOE_DENSE_FFN,
                                                       "qwen3_moe": QWEN3_MOE_DENSE_FFN}.get(variant, EXPERT_FFN),
        gguf.Keys.Attention.HEAD_COUNT.format(arch=arch_name): SIZES["num_attention_heads"],
        gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch_name): SIZES["num_key_value_heads"],
        gguf.Keys.Rope.FREQ_BASE.format(arch=arch_name): SIZES["rope_theta"],
        gguf.Keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch_name): SIZES["rms_norm_eps"],
        K.EXPERT_COUNT.format(arch=arch_name): N_EXPERTS,
        K.EXPERT_USED_COUNT.format(arch=arch_name): TOP_K,
    }
    if variant in ("qwen2_moe", "qwen3_moe"):  # Qwen3MoeModel is a Qwen2MoeModel in the converter
        md[K.EXPERT_FEED_FORWARD_LENGTH.format(arch=arch_name)] = EXPERT_FFN
    if variant == "qwen2_moe":
        md[K.EXPERT_SHARED_FEED_FORWARD_LENGTH.format(arch=arch_name)] = SHARED_FFN
    if variant == "qwen3_moe":
        # TextModel.set_gguf_parameters writes them from config.json's head_dim (llama.cpp
        # renormalizes qwen3moe's top-k weights in its graph: no expert_weights_norm key).
        md[gguf.Keys.Attention.KEY_LENGTH.format(arch=arch_name)] = head_dim()
        md[gguf.Keys.Attention.VALUE_LENGTH.format(arch=arch_name)] = head_dim()
    return {
        "architecture": arch_name,
        "source": f"gguf-py {importlib.metadata.version('gguf')} TensorNameMap "
                  "+ the merged expert names of convert_hf_to_gguf.py",
        "qk_rows_permuted": variant == "mixtral",
        "expert_layout": "ffn_{gate,up,down}_exps: the E per-expert HF [out, in] matrices stacked in "
                         "expert order, row-major [E][out][in], ggml dims [in, out, E]",
        "metadata": dict(sorted(md.items())),
        "tensors": dict(sorted(out.items())),
        "f32_when_quantized": f32_kept,
        # llama-quantize stops ("Unsupported tensor size encountered") on a Q8_0/Q4_0/Q4_1
        # weight whose rows are not whole 32-element blocks; tests/src/tiny.rs keeps them f32.
        "rows_not_whole_32_blocks": sorted(n for n, dims in out.items()
                                           if n not in f32_kept and dims[0] % 32 != 0),
    }


# ---- reference runs ----

def route_hooks(model, sink):
    """Forward hooks on each layer's router (mlp.gate) appending (layer, router logits, top-k
    weights, top-k expert ids) to `sink` at every forward."""
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(mod, inp, out, i=i):
            logits, weights, ids = out
            sink.append((i, logits.detach().to(torch.float64).numpy(),
                         weights.detach().to(torch.float64).numpy(), ids.detach().numpy()))
        handles.append(layer.mlp.gate.register_forward_hook(hook))
    return handles


def routed(model, x):
    sink = []
    hs = route_hooks(model, sink)
    try:
        logits = model(x, use_cache=False).logits[0].to(torch.float64).numpy()
    finally:
        for h in hs:
            h.remove()
    assert [s[0] for s in sink] == list(range(SIZES["num_hidden_layers"])), [s[0] for s in sink]
    return logits, sink


def route_gap(sink):
    """Smallest gap between the k-th and (k+1)-th largest router probability."""
    gaps = []
    for _, logits, _, _ in sink:
        p = np.sort(_softmax(logits), -1)[:, ::-1]
        gaps.append((p[:, TOP_K - 1] - p[:, TOP_K]).min())
    return float(min(gaps))


def run_prompt(model, ids):
    with torch.no_grad():
        x = torch.tensor([ids], dtype=torch.long)
        model.to(torch.float64)
        lg, sink = routed(model, x)
        model.to(torch.float32)
        lg32, sink32 = routed(model, x)
        model.to(torch.float64)
        argmax = [int(v) for v in lg.argmax(-1)]
        margins = [margin(r) for r in lg]
        seq, greedy = list(ids), []
        for _ in range(N_GREEDY):
            row = model(torch.tensor([seq]), use_cache=False).logits[0, -1].numpy()
            t = int(row.argmax())
            margins.append(margin(row))
            greedy.append(t)
            seq.append(t)
    rec = {
        "ids": ids,
        "logits_last": [f32(v) for v in lg[-1]],
        "argmax": argmax,
        "greedy": greedy,
        "min_top2_margin": min(margins),
        "min_route_gap": route_gap(sink),
        "f32_max_abs_diff": float(np.abs(lg32 - lg).max()),
        "f32_argmax_same": [int(v) for v in lg32.argmax(-1)] == argmax,
        "f32_routing_same": all(np.array_equal(a[3], b[3]) for a, b in zip(sink, sink32)),
    }
    return rec, lg, sink


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", default=None, help="model directory to write")
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="mixtral")
    ap.add_argument("--fixture", default=None, help="fixture JSON path (default per variant)")
    ap.add_argument("--no-fixture", action="store_true", help="only write the model directory")
    args = ap.parse_args()
    out_dir = args.out_dir or VARIANTS[args.variant][0]
    fixture = args.fixture or os.path.join(ROOT, VARIANTS[args.variant][1])

    import transformers

    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)  # only the default init that build() overwrites draws from it
    check_generator()
    cfg, model, tensors = build(args.variant)
    sha, checksum = save(args.variant, cfg, model, tensors, out_dir)
    print(f"{args.variant}: wrote {out_dir} (weights_checksum {checksum:016x}, "
          f"model.safetensors sha256 {sha})", file=sys.stderr)
    if args.no_fixture:
        return
    checks = {"save_pretrained_writes_canonical_layout": check_save_pretrained(model, tensors)}

    # The written directory must load back in transformers to the very same model.
    from transformers import AutoModelForCausalLM
    back = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="sdpa",
                                                experts_implementation="eager").eval()
    assert type(back) is type(model), type(back)
    bp, mp = dict(back.named_parameters()), dict(model.named_parameters())
    assert sorted(bp) == sorted(mp) and all(torch.equal(bp[k], mp[k]) for k in mp)
    with torch.no_grad():
        x = torch.tensor([PROMPTS[2]])
        assert torch.equal(back(x, use_cache=False).logits, model(x, use_cache=False).logits), "reload differs"
    checks["from_pretrained_identical"] = True
    del back

    make_float64_exact(model)
    # The stock router (float32 softmax) in the otherwise float64-exact model, for scale.
    routers = [layer.mlp.gate for layer in model.model.layers]
    assert all(hasattr(r, "_orig_forward") for r in routers)
    patched = [r.forward for r in routers]
    with torch.no_grad():
        for r in routers:
            r.forward = r._orig_forward
        stock64, stock_sink = routed(model, torch.tensor([PROMPTS[2]]))
        for r, f in zip(routers, patched):
            r.forward = f
    prompts, routing = [], None
    for i, ids in enumerate(PROMPTS):
        rec, lg, sink = run_prompt(model, ids)
        man, man_routes = manual_forward(args.variant, tensors, ids)
        assert all(np.array_equal(s[3], r) for s, r in zip(sink, man_routes)), "manual routing differs"
        checks.setdefault("manual_forward_max_abs_diff", 0.0)
        checks["manual_forward_max_abs_diff"] = max(checks["manual_forward_max_abs_diff"],
                                                   float(np.abs(man - lg).max()))
        if i == 2:
            checks["stock_float32_router_max_abs_diff"] = float(np.abs(stock64 - lg).max())
            checks["stock_float32_router_same_experts"] = all(
                np.array_equal(a[3], b[3]) for a, b in zip(stock_sink, sink))
        if i == ROUTE_PROMPT:
            routing = {
                "ids": ids,
                "order": "per token the top-k expert ids as torch.topk returns them: largest router "
                         "probability first; weights are the factors applied to those experts' outputs",
                "layers": [{
                    "layer": li,
                    "experts": ids_.tolist(),
                    "weights": w.tolist(),
                    "probs": _softmax(logits).tolist(),
                } for li, logits, w, ids_ in sink],
            }
        prompts.append(rec)
    assert checks["manual_forward_max_abs_diff"] < 1e-10, checks

    shapes = tensor_shapes(args.variant)
    moe = {"num_experts": N_EXPERTS, "num_experts_per_tok": TOP_K, "expert_intermediate_size": EXPERT_FFN,
           "norm_topk_prob": args.variant in RENORMALIZED,
           "router": "softmax over all experts, then top-k" + (", renormalized" if args.variant in RENORMALIZED else ""),
           "router_key": moe_prefix(args.variant, 0).replace("model.layers.0.", "model.layers.{i}.") + "gate.weight",
           "expert_keys": [moe_prefix(args.variant, 0).replace("model.layers.0.", "model.layers.{i}.")
                           + f"experts.{{e}}.{w}.weight" for w in expert_names(args.variant)],
           "expert_keys_are": "gate, up, down"}
    if args.variant == "qwen2_moe":
        moe["shared_expert_intermediate_size"] = SHARED_FFN
        moe["shared_expert"] = ("every token: sigmoid(mlp.shared_expert_gate.weight [1, 64] . x) * "
                                "down(silu(gate x) * up x), added to the routed experts' sum")
    if args.variant == "olmoe":
        moe["qk_norm"] = {"q_norm": list(shapes["model.layers.0.self_attn.q_norm.weight"]),
                          "k_norm": list(shapes["model.layers.0.self_attn.k_norm.weight"]),
                          "applied_to": "the whole q_proj / k_proj output (num_heads * head_dim = 64, "
                                        "num_kv_heads * head_dim = 32), before the head split and RoPE"}
    if args.variant == "qwen3_moe":
        moe["qk_norm"] = {"q_norm": list(shapes["model.layers.0.self_attn.q_norm.weight"]),
                          "k_norm": list(shapes["model.layers.0.self_attn.k_norm.weight"]),
                          "applied_to": "each head's q / k (head_dim = 16 values, one weight shared by "
                                        "all heads), after the projection and head split, before RoPE"}
    out = {
        "variant": args.variant,
        "architecture": type(model).__name__,
        "config": {
            "model_type": cfg.model_type,
            **SIZES,
            "intermediate_size": cfg.intermediate_size,
            "head_dim": head_dim(),
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "num_experts_per_tok": TOP_K,
            **({"num_local_experts": N_EXPERTS} if args.variant == "mixtral" else {"num_experts": N_EXPERTS}),
            **({"moe_intermediate_size": EXPERT_FFN, "shared_expert_intermediate_size": SHARED_FFN}
               if args.variant == "qwen2_moe" else {}),
            **({"moe_intermediate_size": EXPERT_FFN, "decoder_sparse_step": 1, "mlp_only_layers": []}
               if args.variant == "qwen3_moe" else {}),
            **({"norm_topk_prob": args.variant in RENORMALIZED} if args.variant != "mixtral" else {}),
            "attention_bias_qkv": args.variant == "qwen2_moe",
        },
        "moe": moe,
        "init": "per tensor SplitMix64 (ember::util::Rng) seeded 0x454D424552 + FNV-1a-64(name); "
                "w = (2u - 1) * f32(0.2*sqrt(3)) in f32, RMSNorm weights 1 + w; "
                "see scripts/ref/tiny_llama.py or tests/src/tiny.rs",
        "weights_checksum": f"{checksum:016x}",
        "model_sha256": sha,
        "tensors": sorted(shapes),
        "tensor_shapes": {k: list(v) for k, v in shapes.items()},
        "reference": "float64 forward (sdpa, eager experts, RMSNorm/RoPE/router in float64), "
                     "logits rounded to float32",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "prompts": prompts,
        "routing": routing,
        "gguf": gguf_expectation(args.variant, shapes),
        "checks": checks,
    }
    os.makedirs(os.path.dirname(fixture), exist_ok=True)
    with open(fixture, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    for p in prompts:
        print(f"  prompt len {len(p['ids'])}: greedy {p['greedy']}, min margin {p['min_top2_margin']:.4f}, "
              f"min route gap {p['min_route_gap']:.4f}, f32 max diff {p['f32_max_abs_diff']:.2e}, "
              f"f32 argmax same {p['f32_argmax_same']}, f32 routing same {p['f32_routing_same']}",
              file=sys.stderr)
    print(f"  checks {checks}", file=sys.stderr)
    print(f"  wrote {fixture} ({os.path.getsize(fixture)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
