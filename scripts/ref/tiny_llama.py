#!/usr/bin/env python3
"""Tiny random transformers models (safetensors) with reference logits for Ember's loader tests.

Writes a model directory (config.json + model.safetensors, float32), NOT committed: a test
regenerates it with this script and checks model_sha256 against the committed fixture, which
holds the config, the sha256 of model.safetensors and, for three prompts of token ids
(lengths 1, 7 and 33):
  logits_last   the full logits of the prompt's last position (float32 values),
  argmax        the argmax token at every prompt position,
  greedy        8 greedily generated tokens (argmax, full recompute each step, no sampling),
plus margins (smallest top1-top2 logit gap over all argmax/greedy steps), so a test can tell
how robust an argmax comparison is, and f32_max_abs_diff (stock transformers float32 forward
vs the reference) as a sense of float32 error.

The reference numbers come from a float64 forward (transformers, sdpa attention, RMSNorm and
RoPE kept in float64, see _exact.py); logits are then rounded to float32.

Variants (--variant):
  llama  LlamaConfig(vocab 256, hidden 64, ffn 128, 2 layers, 4 heads, 2 kv heads,
         max_pos 128, eps 1e-5, rope_theta 1e4, untied)   -> /tmp/ember-tiny-llama,
                                                           tests/fixtures/tiny_llama/logits.json
  qwen2  Qwen2Config, same sizes (bias on q/k/v, none on o) -> /tmp/ember-tiny-qwen2,
                                                           tests/fixtures/tiny_qwen2/logits.json
  tied   llama with tie_word_embeddings=True (no lm_head.weight in the file)
                                                        -> /tmp/ember-tiny-llama-tied,
                                                           tests/fixtures/tiny_llama_tied/logits.json
Weights: torch.manual_seed(0), then every parameter, in sorted name order, is redrawn from the
global generator re-seeded with 0: matrices/embeddings/biases ~ N(0, 0.2^2), RMSNorm weights
~ 1 + N(0, 0.2^2) (so activations are not tiny and the norm weights matter).

Environment: torch, transformers, safetensors (e.g. /tmp/peers/hf/bin/python).
Usage (from the repo root):
  /tmp/peers/hf/bin/python scripts/ref/tiny_llama.py [--variant llama|qwen2|tied] [OUT_DIR]
      [--fixture PATH] [--no-fixture]
"""
import argparse
import hashlib
import json
import os
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
STD = 0.2


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
    torch.manual_seed(0)
    model = cls(cfg).to(torch.float32).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            r = torch.randn(p.shape, dtype=torch.float32) * STD
            if "norm" in name:
                r += 1.0
            p.copy_(r)
    if variant == "tied":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return cfg, model


def save(cfg, model, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    sd = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    # Remove buffers that are not weights (none for these classes, but be explicit).
    sd = {k: v for k, v in sd.items() if not k.endswith("inv_freq")}
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
    return sha, sorted(sd)


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
    cfg, model = build(args.variant)
    sha, names = save(cfg, model, out_dir)
    print(f"{args.variant}: wrote {out_dir} (model.safetensors sha256 {sha})", file=sys.stderr)
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
        "init": "torch.manual_seed(0); params redrawn in sorted-name order after torch.manual_seed(0): "
                "N(0, 0.2^2), RMSNorm weights 1 + N(0, 0.2^2)",
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
