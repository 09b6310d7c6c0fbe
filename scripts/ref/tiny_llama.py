#!/usr/bin/env python3
"""Tiny random transformers models (safetensors) with reference logits for Ember's loader tests.

Writes a model directory (config.json + model.safetensors, float32), NOT committed, and the
committed fixture, which holds the config, the tensor names, weights_checksum (see below), the
sha256 of model.safetensors and, for three prompts of token ids (lengths 1, 7 and 33):
  logits_last   the full logits of the prompt's last position (float32 values),
  argmax        the argmax token at every prompt position,
  greedy        8 greedily generated tokens (argmax, full recompute each step, no sampling),
plus margins (smallest top1-top2 logit gap over all argmax/greedy steps), so a test can tell
how robust an argmax comparison is, and f32_max_abs_diff (stock transformers float32 forward
vs the reference) as a sense of float32 error.

The reference numbers come from a float64 forward (transformers, sdpa attention, RMSNorm and
RoPE kept in float64, see _exact.py) of the float32 weights; logits are then rounded to float32.

Variants (--variant):
  llama  LlamaConfig(vocab 256, hidden 64, ffn 128, 2 layers, 4 heads, 2 kv heads,
         max_pos 128, eps 1e-5, rope_theta 1e4, untied)   -> /tmp/ember-tiny-llama,
                                                           tests/fixtures/tiny_llama/logits.json
  qwen2  Qwen2Config, same sizes (bias on q/k/v, none on o) -> /tmp/ember-tiny-qwen2,
                                                           tests/fixtures/tiny_qwen2/logits.json
  tied   llama with tie_word_embeddings=True (no lm_head.weight in the file)
                                                        -> /tmp/ember-tiny-llama-tied,
                                                           tests/fixtures/tiny_llama_tied/logits.json

Weights: a portable generator, implemented bit-for-bit the same by the Rust test helper
tests/src/tiny.rs (ember_tests::tiny::write_tiny_model), so tests regenerate the models without
torch or Python; no torch RNG is involved. Every tensor is generated on its own:
  1. h = FNV-1a-64 of the tensor's HF name (UTF-8 bytes; offset basis 0xCBF29CE484222325;
     per byte h ^= byte, h = h * 0x100000001B3 mod 2^64);
  2. seed = (SEED + h) mod 2^64, SEED = 0x454D424552 ("EMBER");
  3. SplitMix64 exactly as ember::util::Rng: state = seed ^ 0x9E3779B97F4A7C15; next_u64:
     state += 0x9E3779B97F4A7C15; z = state; z = (z ^ z>>30) * 0xBF58476D1CE4E5B9;
     z = (z ^ z>>27) * 0x94D049BB133111EB; return z ^ z>>31 (all mod 2^64);
     uniform() = float32(next_u64() >> 40) / float32(2^24);
  4. one draw per element in row-major order of the HF shape ([out, in] for linear weights):
     w = (2*u - 1) * A in float32 (2u - 1 is exact; one rounding for the product), with
     A = float32(0.2*sqrt(3)) (bits 0x3EB15CAC), i.e. uniform in [-A, A), std 0.2;
     RMSNorm weights (names containing "norm") are float32(1 + w), everything else
     (embeddings, projections, lm_head, Qwen2 q/k/v biases) is w.
weights_checksum = FNV-1a-64 over, in sorted tensor-name order, each name's UTF-8 bytes followed
by its float32 little-endian data (16 hex digits in the fixture).

Environment: torch, transformers, safetensors, numpy (e.g. /tmp/peers/hf/bin/python).
Usage (from the repo root):
  /tmp/peers/hf/bin/python scripts/ref/tiny_llama.py [--variant llama|qwen2|tied] [OUT_DIR]
      [--fixture PATH] [--no-fixture]
"""
import argparse
import hashlib
import json
import math
import os
import struct
import sys

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _exact import make_float64_exact  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {
    "llama": ("/tmp/ember-tiny-llama", "tests/fixtures/tiny_llama/logits.json"),
    "qwen2": ("/tmp/ember-tiny-qwen2", "tests/fixtures/tiny_qwen2/logits.json"),
    "tied": ("/tmp/ember-tiny-llama-tied", "tests/fixtures/tiny_llama_tied/logits.json"),
}
SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             rms_norm_eps=1e-5, rope_theta=10000.0)
PROMPTS = [
    [42],
    [1, 17, 99, 200, 3, 255, 128],
    [(i * 37 + 11) % 256 for i in range(33)],
]
N_GREEDY = 8

# ---- portable weight generator (the same as tests/src/tiny.rs; see the module docstring) ----
M64 = (1 << 64) - 1
SEED = 0x454D424552  # "EMBER"
GOLDEN = 0x9E3779B97F4A7C15
A_BITS = 0x3EB15CAC
A = np.float32(0.2 * math.sqrt(3.0))
assert struct.unpack("<I", struct.pack("<f", A))[0] == A_BITS


def fnv1a64(data, h=0xCBF29CE484222325):
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def splitmix64(seed, n):
    """n outputs of SplitMix64 seeded like ember::util::Rng::new(seed), as Python ints."""
    state = (seed ^ GOLDEN) & M64
    out = []
    for _ in range(n):
        state = (state + GOLDEN) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return out


def tensor_values(name, shape):
    """float32 array of `shape` for the tensor `name`, every step rounded as Rust's f32 ops."""
    n = int(np.prod(shape))
    seed = (SEED + fnv1a64(name.encode())) & M64
    top24 = np.array([r >> 40 for r in splitmix64(seed, n)], dtype=np.uint32)
    u = top24.astype(np.float32) / np.float32(1 << 24)                   # exact
    w = (np.float32(2.0) * u - np.float32(1.0)) * A                       # f32 ops, one rounding
    if "norm" in name:
        w = np.float32(1.0) + w                                           # f32 add
    assert w.dtype == np.float32
    return w.reshape(shape)


def tensor_shapes(variant):
    """{HF name: shape} of a variant, as tests/src/tiny.rs tensor_shapes()."""
    h, f, v = SIZES["hidden_size"], SIZES["intermediate_size"], SIZES["vocab_size"]
    kv = SIZES["num_key_value_heads"] * (h // SIZES["num_attention_heads"])
    t = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if variant != "tied":
        t["lm_head.weight"] = (v, h)
    for i in range(SIZES["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        })
        if variant == "qwen2":
            t.update({p + "self_attn.q_proj.bias": (h,), p + "self_attn.k_proj.bias": (kv,),
                      p + "self_attn.v_proj.bias": (kv,)})
    return dict(sorted(t.items()))


def weights_checksum(tensors):
    """FNV-1a-64 over sorted names: name bytes, then float32 little-endian data."""
    h = 0xCBF29CE484222325
    for name in sorted(tensors):
        h = fnv1a64(name.encode(), h)
        h = fnv1a64(np.ascontiguousarray(tensors[name], dtype="<f4").tobytes(), h)
    return h


def check_generator():
    """Known-answer checks of the pieces (FNV-1a test vectors; SplitMix64 from seed 0)."""
    assert fnv1a64(b"") == 0xCBF29CE484222325 and fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8
    # SplitMix64 reference outputs for internal state 0 (seed = GOLDEN, so state starts at 0).
    assert splitmix64(GOLDEN, 3) == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def build(variant):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if variant == "qwen2":
        cfg = Qwen2Config(**SIZES, tie_word_embeddings=False, use_sliding_window=False,
                          hidden_act="silu", bos_token_id=None, eos_token_id=None)
        cls = Qwen2ForCausalLM
    else:
        cfg = LlamaConfig(**SIZES, tie_word_embeddings=(variant == "tied"), hidden_act="silu",
                          attention_bias=False, mlp_bias=False, bos_token_id=None,
                          eos_token_id=None, pad_token_id=None)
        cls = LlamaForCausalLM
    cfg._attn_implementation = "sdpa"
    model = cls(cfg).to(torch.float32).eval()
    tensors = {name: tensor_values(name, shape) for name, shape in tensor_shapes(variant).items()}
    params = dict(model.named_parameters())  # a tied lm_head is listed once, as embed_tokens
    assert sorted(params) == sorted(tensors), (sorted(params), sorted(tensors))
    with torch.no_grad():
        for name, p in params.items():
            assert tuple(p.shape) == tensors[name].shape, (name, p.shape)
            p.copy_(torch.from_numpy(tensors[name]))
            assert np.array_equal(p.numpy(), tensors[name])
    if variant == "tied":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return cfg, model, tensors


def save(cfg, model, tensors, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    sd = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    # Remove buffers that are not weights (none for these classes, but be explicit).
    sd = {k: v for k, v in sd.items() if not k.endswith("inv_freq")}
    assert sorted(sd) == sorted(tensors) and all(np.array_equal(sd[k].numpy(), tensors[k]) for k in sd)
    path = os.path.join(out_dir, "model.safetensors")
    save_file(sd, path, metadata={"format": "pt"})
    # A config.json in the usual checkpoint layout (top-level rope_theta as older checkpoints
    # have it, plus transformers 5's rope_parameters), not transformers' full to_dict() dump.
    cfg_dict = {
        "architectures": [type(model).__name__],
        "model_type": cfg.model_type,
        **SIZES,
        "head_dim": cfg.hidden_size // cfg.num_attention_heads,
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": SIZES["rope_theta"]},
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": "float32",
    }
    if cfg.model_type == "qwen2":
        cfg_dict.update(use_sliding_window=False, sliding_window=None, max_window_layers=SIZES["num_hidden_layers"])
    else:
        cfg_dict.update(attention_bias=False, mlp_bias=False)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    # The file read back must hold exactly the generated tensors.
    from safetensors.numpy import load_file
    back = load_file(path)
    assert sorted(back) == sorted(tensors) and all(np.array_equal(back[k], tensors[k]) for k in back)
    return sha, sorted(sd), weights_checksum(back)


def f32(x):
    """Shortest decimal that round-trips to the same float32."""
    return float(str(np.float32(x)))


def margin(row):
    top = np.sort(row)[-2:]
    return float(top[1] - top[0])


def run_prompt(model, ids):
    with torch.no_grad():
        x = torch.tensor([ids], dtype=torch.long)
        m64 = model.to(torch.float64)
        lg = m64(x, use_cache=False).logits[0].numpy()
        lg32 = model.to(torch.float32)(x, use_cache=False).logits[0].to(torch.float64).numpy()
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
    return {
        "ids": ids,
        "logits_last": [f32(v) for v in lg[-1]],
        "argmax": argmax,
        "greedy": greedy,
        "min_top2_margin": min(margins),
        "f32_max_abs_diff": float(np.abs(lg32 - lg).max()),
        "f32_argmax_same": [int(v) for v in lg32.argmax(-1)] == argmax,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", default=None, help="model directory to write")
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="llama")
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
    sha, names, checksum = save(cfg, model, tensors, out_dir)
    print(f"{args.variant}: wrote {out_dir} (weights_checksum {checksum:016x}, "
          f"model.safetensors sha256 {sha})", file=sys.stderr)
    if args.no_fixture:
        return

    # The written directory must load back in transformers to the very same model.
    from transformers import AutoModelForCausalLM
    back = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    assert type(back) is type(model), type(back)
    with torch.no_grad():
        x = torch.tensor([PROMPTS[2]])
        assert torch.equal(back(x, use_cache=False).logits, model(x, use_cache=False).logits), "reload differs"
    del back

    make_float64_exact(model)
    prompts = [run_prompt(model, p) for p in PROMPTS]
    out = {
        "variant": args.variant,
        "architecture": type(model).__name__,
        "config": {
            "model_type": cfg.model_type,
            **SIZES,
            "head_dim": cfg.hidden_size // cfg.num_attention_heads,
            "hidden_act": "silu",
            "tie_word_embeddings": bool(cfg.tie_word_embeddings),
            "attention_bias_qkv": args.variant == "qwen2",
        },
        "init": "per tensor SplitMix64 (ember::util::Rng) seeded 0x454D424552 + FNV-1a-64(name); "
                "w = (2u - 1) * f32(0.2*sqrt(3)) in f32, RMSNorm weights 1 + w; "
                "see scripts/ref/tiny_llama.py or tests/src/tiny.rs",
        "weights_checksum": f"{checksum:016x}",
        "model_sha256": sha,
        "tensors": names,
        "reference": "float64 forward (sdpa, RMSNorm/RoPE in float64), logits rounded to float32",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "prompts": prompts,
    }
    os.makedirs(os.path.dirname(fixture), exist_ok=True)
    with open(fixture, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    for p in prompts:
        print(f"  prompt len {len(p['ids'])}: greedy {p['greedy']}, min margin {p['min_top2_margin']:.4f}, "
              f"f32 max diff {p['f32_max_abs_diff']:.2e}, f32 argmax same {p['f32_argmax_same']}",
              file=sys.stderr)
    print(f"  wrote {fixture} ({os.path.getsize(fixture)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
