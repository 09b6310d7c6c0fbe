#!/usr/bin/env python3
"""Writes two synthetic GGUF models for the MoE-vs-dense benchmark (scripts/bench-moe.sh):

  OUT/moe.gguf    llama arch, E experts, top-k routing (llama.cpp's Mixtral layout:
                  blk.N.ffn_gate_inp / ffn_{gate,up,down}_exps)
  OUT/dense.gguf  the same model with a plain SwiGLU feed-forward of width k x expert width,
                  i.e. the same ACTIVE parameters per token as the MoE model

Every tensor both files share (embedding, attention, norms) is byte-identical: each tensor's
random stream is seeded from (seed, tensor name). The weights are random (normal * 0.02,
norms 1.0, router normal * --router-std) so activations stay finite and routing spreads over
the experts. The tokenizer.* metadata is copied from a reference GGUF (the SmolLM2 test
model by default) so Ember and llama.cpp both accept the files.

    python make_bench_moe.py OUT_DIR --tokenizer-from SMOLLM2.gguf [--layers 12 ...]

Needs numpy and the `gguf` Python package (the hf peer's python has both).
"""
import argparse
import os
import sys
import time
import zlib

import numpy as np
import gguf
from gguf import GGMLQuantizationType, GGUFValueType

QTYPES = {
    "q4_0": GGMLQuantizationType.Q4_0,
    "q8_0": GGMLQuantizationType.Q8_0,
    "f16": GGMLQuantizationType.F16,
    "f32": GGMLQuantizationType.F32,
}


def rng_for(seed, name):
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def tokenizer_fields(path):
    """(key, value, vtype, sub_type) for every tokenizer.* key of a GGUF, arrays included."""
    r = gguf.GGUFReader(path)
    out, vocab = [], None
    for key, f in r.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        val = f.contents()
        if vtype == GGUFValueType.ARRAY and sub != GGUFValueType.STRING:
            val = [v.item() if hasattr(v, "item") else v for v in val]
        if key == "tokenizer.ggml.tokens":
            vocab = len(val)
        out.append((key, val, vtype, sub))
    if vocab is None:
        sys.exit(f"{path}: no tokenizer.ggml.tokens")
    return out, vocab


class Builder:
    def __init__(self, a):
        self.a = a
        self.qtype = QTYPES[a.qtype]

    def normal(self, name, shape, std):
        return (rng_for(self.a.seed, name).standard_normal(shape, dtype=np.float32) * std)

    def mat(self, w, name, shape, std=0.02):
        """A 2-D/3-D weight, numpy shape [.., rows, cols] (GGUF ne reversed), quantized."""
        x = self.normal(name, shape, std)
        if self.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            w.add_tensor(name, gguf.quants.quantize(x, self.qtype))
        else:
            q = gguf.quants.quantize(x, self.qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=self.qtype)

    @staticmethod
    def f32(w, name, x):
        w.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32))

    def write(self, path, moe, tok, vocab):
        a = self.a
        hd = a.head_dim
        ff = a.expert_ff if moe else a.expert_ff * a.top_k
        tmp = path + ".part"
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(f"ember-bench-{'moe' if moe else 'dense'}")
        w.add_block_count(a.layers)
        w.add_context_length(a.ctx)
        w.add_embedding_length(a.hidden)
        w.add_feed_forward_length(ff)
        w.add_head_count(a.heads)
        w.add_head_count_kv(a.kv_heads)
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_rope_dimension_count(hd)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_vocab_size(vocab)
        if moe:
            w.add_expert_count(a.experts)
            w.add_expert_used_count(a.top_k)
            w.add_expert_feed_forward_length(a.expert_ff)
        ftype = {"q4_0": 2, "q8_0": 7, "f16": 1, "f32": 0}[a.qtype]
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, val, vtype, sub in tok:
            w.add_key_value(key, val, vtype, sub_type=sub)

        h = a.hidden
        self.mat(w, "token_embd.weight", (vocab, h), std=a.embd_std)
        self.f32(w, "output_norm.weight", np.ones(h))
        if not a.tied:
            self.mat(w, "output.weight", (vocab, h))
        for i in range(a.layers):
            b = f"blk.{i}."
            self.f32(w, b + "attn_norm.weight", np.ones(h))
            self.mat(w, b + "attn_q.weight", (a.heads * hd, h))
            self.mat(w, b + "attn_k.weight", (a.kv_heads * hd, h))
            self.mat(w, b + "attn_v.weight", (a.kv_heads * hd, h))
            self.mat(w, b + "attn_output.weight", (h, a.heads * hd))
            self.f32(w, b + "ffn_norm.weight", np.ones(h))
            if moe:
                e = a.experts
                self.f32(w, b + "ffn_gate_inp.weight",
                         self.normal(b + "ffn_gate_inp.weight", (e, h), a.router_std))
                self.mat(w, b + "ffn_gate_exps.weight", (e, ff, h))
                self.mat(w, b + "ffn_up_exps.weight", (e, ff, h))
                self.mat(w, b + "ffn_down_exps.weight", (e, h, ff))
            else:
                self.mat(w, b + "ffn_gate.weight", (ff, h))
                self.mat(w, b + "ffn_up.weight", (ff, h))
                self.mat(w, b + "ffn_down.weight", (h, ff))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--tokenizer-from", required=True, help="GGUF whose tokenizer.* keys to copy")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expert-ff", type=int, default=768, help="expert width (dense width = top-k x this)")
    ap.add_argument("--ctx", type=int, default=2048, help="context_length metadata")
    ap.add_argument("--qtype", choices=sorted(QTYPES), default="q4_0",
                    help="type of the 2-D/3-D matrices (norms and router stay f32)")
    ap.add_argument("--router-std", type=float, default=0.5)
    ap.add_argument("--embd-std", type=float, default=1.0,
                    help="token embedding std: large enough that the token, not the attention "
                         "average, dominates the residual stream (else every token picks the "
                         "same experts)")
    ap.add_argument("--tied", action="store_true",
                    help="no output.weight: tie the head to token_embd (with random weights a "
                         "tied model just repeats its last token, so routing barely varies while "
                         "decoding; the default writes a separate random head, same compute)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--only", choices=["moe", "dense"], help="write just one of the two")
    a = ap.parse_args()
    if a.hidden % 32 or a.expert_ff % 32:
        sys.exit("hidden and expert-ff must be multiples of 32 (quant block size)")
    os.makedirs(a.out_dir, exist_ok=True)
    tok, vocab = tokenizer_fields(a.tokenizer_from)
    b = Builder(a)
    for kind in ("moe", "dense"):
        if a.only and a.only != kind:
            continue
        t0 = time.perf_counter()
        path = os.path.join(a.out_dir, f"{kind}.gguf")
        b.write(path, kind == "moe", tok, vocab)
        print(f"make_bench_moe: wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB, "
              f"{time.perf_counter() - t0:.1f}s)", file=sys.stderr)


if __name__ == "__main__":
    main()
