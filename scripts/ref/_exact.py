"""Helpers shared by the reference scripts that run transformers models (torch env).

transformers' Llama/Qwen2 code is not really float64 even after model.double():
  * *RMSNorm.forward casts its input to float32 before computing the mean square;
  * *RotaryEmbedding computes inv_freq and the rotation angles in float32;
  * eager attention does its softmax in float32.
make_float64_exact() converts a model to float64 and patches the norm and rotary modules of
that instance so every step runs in float64; pair it with attn_implementation="sdpa" (whose
CPU kernel accumulates in the input dtype) rather than "eager".
"""
import types

import torch


def _rmsnorm_forward(self, x):
    if x.dtype != torch.float64:
        return self._orig_forward(x)
    var = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))


def _rope_forward(self, x, position_ids):
    if x.dtype != torch.float64:
        return self._orig_forward(x, position_ids)
    freqs = position_ids[..., None].to(torch.float64) * self._inv_freq64.to(x.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def make_float64_exact(model):
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or {"rope_type": "default", "rope_theta": cfg.rope_theta}
    assert rope.get("rope_type", "default") == "default", rope
    base = float(rope["rope_theta"])
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv64 = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    n_norm = n_rope = 0
    for mod in model.modules():
        name = type(mod).__name__
        if name.endswith("RMSNorm") and not hasattr(mod, "_orig_forward"):
            mod._orig_forward = mod.forward
            mod.forward = types.MethodType(_rmsnorm_forward, mod)
            n_norm += 1
        elif name.endswith("RotaryEmbedding") and not hasattr(mod, "_orig_forward"):
            mod._orig_forward = mod.forward
            mod._inv_freq64 = inv64
            mod.forward = types.MethodType(_rope_forward, mod)
            n_rope += 1
    assert n_norm > 0 and n_rope > 0, (n_norm, n_rope)
    return model.to(torch.float64)
