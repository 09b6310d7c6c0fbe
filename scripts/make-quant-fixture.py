#!/usr/bin/env python3
"""Writes tests/fixtures/quant_blocks.json: random ggml blocks of every quant type Ember
runs, with the values the `gguf` Python package's dequantizer produces for them. Ember's
CPU reference dequantizer is checked against it (runtime/src/quant/blocks.rs).

Usage: python3 scripts/make-quant-fixture.py  (needs `pip install gguf numpy`)
"""
import json
import os

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, quants

# Byte offsets of the f16 scale fields of each block, with the range of values written there
# (random bytes elsewhere cover every quant bit pattern; scales are kept finite and sane).
SCALES = {
    T.Q4_0: [(0, -0.2, 0.2)],
    T.Q4_1: [(0, 0.0, 0.2), (2, -1.0, 0.0)],
    T.Q5_0: [(0, -0.2, 0.2)],
    T.Q5_1: [(0, 0.0, 0.2), (2, -1.0, 0.0)],
    T.Q8_0: [(0, -0.02, 0.02)],
    T.Q4_K: [(0, 0.0, 0.005), (2, 0.0, 0.01)],
    T.Q5_K: [(0, 0.0, 0.005), (2, 0.0, 0.01)],
    T.Q6_K: [(208, -0.002, 0.002)],
}
BLOCKS = 2


def main():
    rng = np.random.RandomState(20261123)
    out = {}
    for t, fields in SCALES.items():
        _, size = GGML_QUANT_SIZES[t]
        raw = rng.randint(0, 256, size=size * BLOCKS, dtype=np.uint8)
        for b in range(BLOCKS):
            for off, lo, hi in fields:
                v = np.float16(rng.uniform(lo, hi))
                raw[b * size + off: b * size + off + 2] = np.frombuffer(v.tobytes(), dtype=np.uint8)
        vals = quants.dequantize(raw, t).astype(np.float32)
        out[t.name] = {"hex": raw.tobytes().hex(), "values": [float(x) for x in vals]}
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "quant_blocks.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
