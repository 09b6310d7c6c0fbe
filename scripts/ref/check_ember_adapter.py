#!/usr/bin/env python3
"""Check an adapter directory written by Ember against transformers + PEFT (float64).

DIR holds a PEFT-layout adapter for the tiny Llama of tiny_llama.py (LoRA, prompt tuning or
prefix tuning: adapter_config.json + adapter_model.safetensors) and DIR/ember_logits.json,
Ember's logits for a prompt:
    {"prompt": [token ids], "logits_last": [vocab floats]}
(or a list of such objects). The script builds the tiny model (float32 weights, run in float64
with scripts/ref/_exact.py), loads DIR with PeftModel.from_pretrained, checks that every tensor
of the file reached the model (PEFT only warns about keys it cannot place), computes the
logits of the prompt's last position (for prompt tuning the last real token; PEFT's virtual
positions come first) and prints one JSON object: per prompt the max abs difference and both
argmaxes, the overall max abs difference, and the config keys PEFT ignored. Exit status 0 when
the max abs difference is <= --tol (default 1e-3), 1 when it is larger (or not finite), 2 when
the directory cannot be loaded.

Extra keys in adapter_config.json (Ember writes `ember_base_model_identity`, `ember_version`):
PEFT 0.21 ignores keys its config class does not know, with a warning ("Unexpected keyword
arguments ... these are ignored"); the script lists them under `ignored_config_keys` and strips
nothing. Prefix tuning: PEFT recomputes `token_dim` / `num_attention_heads` from the base
model's config for GQA models (kv heads * head_dim), so a config that records the hidden size
as token_dim loads the same.

--self-test runs the check on the committed fixtures (tests/fixtures/lora: qv_random,
all_rslora, prompt_tuning/final, prefix_tuning/final), copied to a temporary directory with an
Ember-style adapter_config.json (extra ember_* keys; for prefix tuning also token_dim = hidden
as Ember writes it; for LoRA also a minimal config with only the keys Ember writes), with
ember_logits.json made from the fixture's own logits (expect pass) and with one logit moved by
0.01 (expect exit-status-1 verdict).

Environment: torch (CPU), transformers, peft, safetensors, numpy (e.g. /tmp/peers/hf/bin/python).
Usage (from the repo root):
  /tmp/peers/hf/bin/python scripts/ref/check_ember_adapter.py DIR [--tol 1e-3] [--variant llama]
  /tmp/peers/hf/bin/python scripts/ref/check_ember_adapter.py --self-test
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_llama  # noqa: E402
from _exact import make_float64_exact  # noqa: E402

ROOT = tiny_llama.ROOT


def load_peft(adapter_dir, variant):
    """(float64 PeftModel, ignored config keys, number of adapter tensors checked)."""
    from peft import PeftModel
    from safetensors.numpy import load_file

    _, base, _ = tiny_llama.build(variant)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    ignored = set()
    for w in caught:
        msg = str(w.message)
        if msg.startswith("Unexpected keyword arguments"):
            ignored.update(json.loads(msg[msg.index("["):msg.index("]") + 1].replace("'", '"')))
        elif "missing adapter keys" in msg or "unexpected" in msg.lower():
            raise RuntimeError(f"PEFT: {msg}")
    make_float64_exact(model.get_base_model())
    model.to(torch.float64).eval()

    # Every tensor of the file must be in the model, unchanged (PEFT loads non-strictly).
    st = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    placed = {}
    for name, p in params.items():
        if ".lora_" in name:
            placed[name.replace(".default.", ".")] = p
        elif name == "prompt_encoder.default.embedding.weight":
            placed["prompt_embeddings"] = p
    if sorted(placed) != sorted(st):
        raise RuntimeError(f"adapter tensors {sorted(st)} vs model adapter parameters {sorted(placed)}")
    for k, v in st.items():
        got = placed[k].detach().numpy()
        if got.shape != v.shape or not np.array_equal(got, v.astype(np.float64)):
            raise RuntimeError(f"{k}: the model does not hold the file's values")
    return model, sorted(ignored), len(st)


def check(adapter_dir, logits_path=None, variant="llama", tol=1e-3):
    """The result object (see the module docstring); result["pass"] is the verdict."""
    logits_path = logits_path or os.path.join(adapter_dir, "ember_logits.json")
    with open(logits_path) as f:
        ember = json.load(f)
    cases_in = ember if isinstance(ember, list) else [ember]
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        peft_type = json.load(f).get("peft_type")
    model, ignored, n_tensors = load_peft(adapter_dir, variant)
    cases, worst = [], 0.0
    for c in cases_in:
        ids = [int(i) for i in c["prompt"]]
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].numpy()
        got = np.asarray(c["logits_last"], dtype=np.float64)
        if got.shape != ref.shape:
            raise RuntimeError(f"logits_last has {got.shape[0]} values, the model's vocabulary {ref.shape[0]}")
        d = float(np.abs(got - ref).max())
        d = d if math.isfinite(d) else float("inf")
        worst = max(worst, d)
        cases.append({"prompt_len": len(ids), "max_abs_diff": d,
                      "argmax_ember": int(got.argmax()), "argmax_ref": int(ref.argmax())})
    return {"dir": adapter_dir, "peft_type": peft_type, "adapter_tensors": n_tensors,
            "ignored_config_keys": ignored, "cases": cases, "max_abs_diff": worst, "tol": tol,
            "pass": worst <= tol}


def self_test():
    fx = os.path.join(ROOT, "tests/fixtures/lora")
    with open(os.path.join(fx, "logits.json")) as f:
        ref = json.load(f)["cases"]
    ok = True
    tmp = tempfile.mkdtemp(prefix="ember-check-adapter-")
    try:
        plans = [("qv_random", "qv_random", "ember_keys"), ("qv_random", "qv_random", "ember_minimal"),
                 ("all_rslora", "all_rslora", "ember_keys"), ("all_rslora", "all_rslora", "ember_minimal"),
                 ("prompt_tuning/final", "prompt_tuning_final", "ember_keys"),
                 ("prefix_tuning/final", "prefix_tuning_final", "ember_prefix")]
        for src, case, style in plans:
            d = os.path.join(tmp, src.replace("/", "_") + "_" + style)
            os.makedirs(d)
            shutil.copy(os.path.join(fx, src, "adapter_model.safetensors"), d)
            with open(os.path.join(fx, src, "adapter_config.json")) as f:
                cfg = json.load(f)
            extra = {"ember_base_model_identity": "13792508d639a202", "ember_version": "0.0.0-test"}
            if style == "ember_minimal":  # the keys Ember's LoRA save writes, nothing else
                keep = ["task_type", "base_model_name_or_path", "peft_type", "r", "lora_alpha",
                        "lora_dropout", "use_rslora", "use_dora", "bias", "fan_in_fan_out",
                        "init_lora_weights", "target_modules", "layers_to_transform"]
                cfg = {k: cfg.get(k) for k in keep}
            if style == "ember_prefix":  # Ember records token_dim = hidden (PEFT recomputes it)
                cfg.update(token_dim=tiny_llama.SIZES["hidden_size"],
                           encoder_hidden_size=tiny_llama.SIZES["hidden_size"])
            cfg.update(extra)
            with open(os.path.join(d, "adapter_config.json"), "w") as f:
                json.dump(cfg, f, indent=2)
            prompts = ref[case]["prompts"]
            for variant_name, moved in (("exact", False), ("moved", True)):
                obj = [{"prompt": p["ids"], "logits_last": list(p["logits_last"])} for p in prompts]
                if moved:
                    obj[-1]["logits_last"][7] += 0.01
                # the single-object form for the first plan, the list form otherwise
                with open(os.path.join(d, "ember_logits.json"), "w") as f:
                    json.dump(obj[-1] if src == "qv_random" and style == "ember_keys" else obj, f)
                r = check(d)
                want = not moved
                good = r["pass"] == want and sorted(extra) == [k for k in r["ignored_config_keys"] if k in extra]
                ok &= good
                print(json.dumps({"self_test": f"{src} ({style}, {variant_name})", "expect_pass": want,
                                  "pass": r["pass"], "max_abs_diff": r["max_abs_diff"],
                                  "ignored_config_keys": r["ignored_config_keys"], "ok": good}))
    finally:
        shutil.rmtree(tmp)
    print(json.dumps({"self_test_ok": bool(ok)}))
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", nargs="?", help="adapter directory with ember_logits.json")
    ap.add_argument("--logits", default=None, help="Ember's logits JSON (default DIR/ember_logits.json)")
    ap.add_argument("--variant", choices=["llama", "qwen2", "tied"], default="llama")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--self-test", action="store_true", help="check the committed fixtures")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.self_test:
        return self_test()
    if not args.dir:
        ap.error("DIR is required (or --self-test)")
    try:
        r = check(args.dir, args.logits, args.variant, args.tol)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        print(json.dumps({"dir": args.dir, "error": f"{type(e).__name__}: {e}", "pass": False}))
        return 2
    print(json.dumps(r))
    return 0 if r["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
