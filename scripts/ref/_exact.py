"""Helpers shared by the reference scripts that run transformers models (torch env).

transformers' Llama/Qwen2/MoE code is not really float64 even after model.double():
  * *RMSNorm.forward casts its input to float32 before computing the mean square;
  * *RotaryEmbedding computes inv_freq and the rotation angles in float32;
  * eager attention does its softmax in float32;
  * the MoE routers (*TopKRouter, transformers 5) take their softmax in float32
    (Mixtral: softmax(logits.float()) and the top-k weights stay float32; Qwen2-MoE and
    OLMoE: softmax(..., dtype=torch.float), cast back only after top-k).
make_float64_exact() converts a model to float64 and patches the norm, rotary and router
modules of that instance so every step runs in float64; pair it with attn_implementation="sdpa"
(whose CPU kernel accumulates in the input dtype) rather than "eager", and for MoE models with
experts_implementation="eager" (the per-expert loop, rather than "grouped_mm", the default
on CPU).
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


# Whether each router class renormalizes its top-k probabilities to sum to 1 (transformers 5.x
# source): Mixtral always does; Qwen2-MoE and OLMoE only with config.norm_topk_prob.
_ROUTER_NORMALIZES = {
    "MixtralTopKRouter": lambda r: True,
    "Qwen2MoeTopKRouter": lambda r: bool(r.norm_topk_prob),
    "OlmoeTopKRouter": lambda r: bool(r.norm_topk_prob),
    # transformers 5's Qwen3MoeTopKRouter.forward is Qwen2MoeTopKRouter's.
    "Qwen3MoeTopKRouter": lambda r: bool(r.norm_topk_prob),
}


def _router_forward(self, hidden_states):
    """The same steps as transformers' *TopKRouter.forward, all in float64: logits = x W^T,
    p = softmax(logits) over all experts, (weights, ids) = topk(p, k) (descending, as
    torch.topk sorts), weights /= sum(weights) when the router normalizes."""
    if hidden_states.dtype != torch.float64:
        return self._orig_forward(hidden_states)
    x = hidden_states.reshape(-1, self.hidden_dim)
    logits = torch.nn.functional.linear(x, self.weight)
    probs = torch.softmax(logits, dim=-1)
    top_value, top_index = torch.topk(probs, self.top_k, dim=-1)
    if self._normalizes:
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    return logits, top_value, top_index


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
        if name.endswith("TopKRouter") and not hasattr(mod, "_orig_forward"):
            if name not in _ROUTER_NORMALIZES:
                raise NotImplementedError(f"{name}: check its forward and add it to _ROUTER_NORMALIZES")
            mod._orig_forward = mod.forward
            mod._normalizes = _ROUTER_NORMALIZES[name](mod)
            mod.forward = types.MethodType(_router_forward, mod)
        elif name.endswith("RMSNorm") and not hasattr(mod, "_orig_forward"):
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
