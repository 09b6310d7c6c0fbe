"""Fixture for Ember's adapter merging (runtime/src/learn/merge.rs): PEFT's merge functions
(peft.utils.merge_utils: task_arithmetic, magnitude_prune, ties) applied to the A and B
matrices of three small random LoRA adapters, weighted as PEFT's add_weighted_adapter does
(sqrt(|w * scale|), the sign on A's side). Deterministic methods only (DARE draws torch
random masks). Writes tests/fixtures/lora/merge.json.

    python scripts/ref/merge_fixture.py   # with torch and peft installed
"""

import json
import math
from pathlib import Path

import numpy as np
import torch
from peft.utils.merge_utils import magnitude_prune, task_arithmetic, ties

rng = np.random.default_rng(20261204)
RANK, IN, OUT = 4, 8, 6
weights = [1.0, 0.5, -0.7]
alphas = [8.0, 4.0, 2.0]  # scale = alpha / rank
adapters = [
    {
        "a": rng.uniform(-1, 1, (RANK, IN)).round(6).tolist(),
        "b": rng.uniform(-1, 1, (OUT, RANK)).round(6).tolist(),
        "alpha": alpha,
    }
    for alpha in alphas
]
wa, wb = [], []
for w, ad in zip(weights, adapters):
    ws = w * ad["alpha"] / RANK
    root = math.sqrt(abs(ws))
    wa.append(root if ws >= 0 else -root)
    wb.append(root)
out = {"rank": RANK, "in": IN, "out": OUT, "weights": weights, "density": 0.5, "adapters": adapters}
A = [torch.tensor(ad["a"], dtype=torch.float64) for ad in adapters]
B = [torch.tensor(ad["b"], dtype=torch.float64) for ad in adapters]
twa, twb = torch.tensor(wa, dtype=torch.float64), torch.tensor(wb, dtype=torch.float64)
out["linear"] = {"a": task_arithmetic(A, twa).flatten().tolist(), "b": task_arithmetic(B, twb).flatten().tolist()}
out["magnitude_prune"] = {
    "a": magnitude_prune(A, twa, 0.5).flatten().tolist(),
    "b": magnitude_prune(B, twb, 0.5).flatten().tolist(),
}
out["ties"] = {"a": ties(A, twa, 0.5).flatten().tolist(), "b": ties(B, twb, 0.5).flatten().tolist()}
path = Path(__file__).resolve().parents[2] / "tests/fixtures/lora/merge.json"
path.write_text(json.dumps(out, indent=1) + "\n")
print(f"wrote {path}")
