//! The Rust tiny-model generator (`ember_tests::tiny`) and `scripts/ref/tiny_llama.py` /
//! `scripts/ref/tiny_moe.py` make the very same weights: the checksum of a freshly written
//! model matches the one the script recorded in the committed fixture next to its reference
//! logits. The MoE variants' GGUF files have the tensors and metadata llama.cpp's converter
//! gives them (the fixtures' `gguf` section, which the script takes from gguf-py).

use std::collections::BTreeMap;
use std::path::Path;

use ember::format::gguf::{GgufFile, TensorType};
use ember::quant::QuantType;
use ember_tests::model::TempDir;
use ember_tests::tiny::{
    byte_char, config_json, permute_qk, tensor_shapes, tiny_tensors, weights_checksum,
    write_tiny_model, TinyGguf, TinyVariant, EXPERTS, HEADS, HIDDEN, KV_HEADS, LAYERS,
};

fn fixture(v: TinyVariant) -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(v.fixture_path());
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap()
}

#[test]
fn weights_match_the_python_reference() {
    for v in TinyVariant::ALL {
        let dir = TempDir::new(v.name());
        write_tiny_model(&dir.0, v).unwrap();
        let fx = fixture(v);
        let want = fx["weights_checksum"]
            .as_str()
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .unwrap_or_else(|| panic!("{}: no weights_checksum", v.name()));
        let got = weights_checksum(&dir.0);
        assert_eq!(got, want, "{}: {got:016x} != {want:016x}", v.name());

        // Same tensor list and configuration as the script's.
        let names: Vec<String> = tensor_shapes(v).into_iter().map(|(n, _)| n).collect();
        let fx_names: Vec<String> = fx["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, fx_names, "{}", v.name());
        if let Some(fx_shapes) = fx.get("tensor_shapes") {
            for (n, shape) in tensor_shapes(v) {
                let want: Vec<usize> = serde_json::from_value(fx_shapes[&n].clone()).unwrap();
                assert_eq!(shape, want, "{}: {n}", v.name());
            }
        }
        let cfg = config_json(v);
        for (k, want) in fx["config"].as_object().unwrap() {
            if k == "attention_bias_qkv" {
                assert_eq!(want.as_bool(), Some(v.qkv_bias()), "{}", v.name());
                continue;
            }
            assert_eq!(&cfg[k], want, "{}: config {k}", v.name());
        }
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.0.join("config.json")).unwrap()).unwrap();
        assert_eq!(written, cfg);
    }
}

#[test]
fn writing_twice_gives_identical_files() {
    let a = TempDir::new("a");
    let b = TempDir::new("b");
    write_tiny_model(&a.0, TinyVariant::Qwen2).unwrap();
    write_tiny_model(&b.0, TinyVariant::Qwen2).unwrap();
    write_tiny_model(&b.0, TinyVariant::Qwen2).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert_eq!(
            std::fs::read(a.0.join(f)).unwrap(),
            std::fs::read(b.0.join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn byte_level_tokenizer_loads_and_round_trips() {
    let dir = TempDir::new("tok");
    write_tiny_model(&dir.0, TinyVariant::Llama).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.0.join("tokenizer.json")).unwrap();
    assert_eq!(tok.get_vocab_size(true), 256);
    for b in 0..=255u8 {
        assert_eq!(
            tok.token_to_id(&byte_char(b).to_string()),
            Some(u32::from(b))
        );
    }
    let text = "Hello, wörld!\n  tabs\tand 🔥 bytes";
    let enc = tok.encode(text, false).unwrap();
    let ids: Vec<u32> = text.bytes().map(u32::from).collect();
    assert_eq!(enc.get_ids(), ids.as_slice());
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
}

/// The HF tensors of `v` by name.
fn hf_tensors(v: TinyVariant) -> BTreeMap<String, Vec<f32>> {
    tiny_tensors(v)
        .into_iter()
        .map(|(n, _, values)| (n, values))
        .collect()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn moe_gguf_has_llama_cpp_names_dims_and_metadata() {
    for v in TinyVariant::MOE {
        let fx = fixture(v);
        let want = &fx["gguf"];
        let g = TinyGguf::new(v, None).unwrap();
        let f = GgufFile::from_bytes(g.to_bytes().unwrap()).unwrap();
        let name = v.name();
        assert_eq!(f.architecture().unwrap(), v.gguf_arch(), "{name}");
        assert_eq!(want["architecture"].as_str(), Some(v.gguf_arch()), "{name}");

        // Exactly the converter's tensors, with its ggml dims (`[in, out, E]` for experts).
        let got: BTreeMap<String, Vec<u64>> = f
            .tensors()
            .iter()
            .map(|t| (t.name.clone(), t.dims.clone()))
            .collect();
        let expected: BTreeMap<String, Vec<u64>> =
            serde_json::from_value(want["tensors"].clone()).unwrap();
        assert_eq!(got, expected, "{name}");
        assert!(
            f.tensors().iter().all(|t| t.ty == TensorType::F32),
            "{name}"
        );

        // The converter's metadata values.
        for (key, value) in want["metadata"].as_object().unwrap() {
            let have = f
                .get(key)
                .unwrap_or_else(|| panic!("{name}: no metadata key {key}"));
            match value {
                serde_json::Value::String(s) => assert_eq!(have.as_str(), Some(s.as_str())),
                serde_json::Value::Number(n) if n.is_u64() => {
                    assert_eq!(have.as_u64(), n.as_u64(), "{name}: {key}")
                }
                serde_json::Value::Number(n) => {
                    let (h, w) = (have.as_f64().unwrap(), n.as_f64().unwrap());
                    assert_eq!(h as f32, w as f32, "{name}: {key}");
                }
                other => panic!("{name}: {key}: unexpected {other}"),
            }
        }

        // The data: experts stacked in expert order, router and norms as stored, q/k rows
        // permuted only for the llama architecture.
        let hf = hf_tensors(v);
        let llama = v.gguf_arch() == "llama";
        assert_eq!(want["qk_rows_permuted"].as_bool(), Some(llama), "{name}");
        let (moe, [gate, up, down]) = match v {
            TinyVariant::Mixtral => ("block_sparse_moe", ["w1", "w3", "w2"]),
            _ => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
        };
        for layer in 0..LAYERS {
            let p = format!("model.layers.{layer}.");
            let data = |t: &str| {
                let info = f.tensor(&format!("blk.{layer}.{t}")).unwrap();
                f32s(f.tensor_data(info).unwrap())
            };
            for (t, w) in [
                ("ffn_gate_exps.weight", gate),
                ("ffn_up_exps.weight", up),
                ("ffn_down_exps.weight", down),
            ] {
                let stacked: Vec<f32> = (0..EXPERTS)
                    .flat_map(|e| hf[&format!("{p}{moe}.experts.{e}.{w}.weight")].clone())
                    .collect();
                assert_eq!(data(t), stacked, "{name}: blk.{layer}.{t}");
            }
            assert_eq!(
                data("ffn_gate_inp.weight"),
                hf[&format!("{p}{moe}.gate.weight")]
            );
            let q = &hf[&format!("{p}self_attn.q_proj.weight")];
            let k = &hf[&format!("{p}self_attn.k_proj.weight")];
            if llama {
                assert_eq!(data("attn_q.weight"), permute_qk(q, HEADS, HIDDEN));
                assert_eq!(data("attn_k.weight"), permute_qk(k, KV_HEADS, HIDDEN));
            } else {
                assert_eq!(&data("attn_q.weight"), q);
                assert_eq!(&data("attn_k.weight"), k);
            }
            if v == TinyVariant::Qwen2Moe {
                for (t, w) in [
                    (
                        "ffn_gate_shexp.weight",
                        "mlp.shared_expert.gate_proj.weight",
                    ),
                    ("ffn_up_shexp.weight", "mlp.shared_expert.up_proj.weight"),
                    (
                        "ffn_down_shexp.weight",
                        "mlp.shared_expert.down_proj.weight",
                    ),
                    ("ffn_gate_inp_shexp.weight", "mlp.shared_expert_gate.weight"),
                    ("attn_q.bias", "self_attn.q_proj.bias"),
                    ("attn_k.bias", "self_attn.k_proj.bias"),
                ] {
                    assert_eq!(data(t), hf[&format!("{p}{w}")], "{name}: {t}");
                }
            }
            if v == TinyVariant::Olmoe {
                assert_eq!(
                    data("attn_q_norm.weight"),
                    hf[&format!("{p}self_attn.q_norm.weight")]
                );
                assert_eq!(
                    data("attn_k_norm.weight"),
                    hf[&format!("{p}self_attn.k_norm.weight")]
                );
            }
        }
    }
}

#[test]
fn moe_gguf_quantizes_experts_row_by_row() {
    for v in TinyVariant::MOE {
        let fx = fixture(v);
        let mut f32_kept: Vec<String> =
            serde_json::from_value(fx["gguf"]["f32_when_quantized"].clone()).unwrap();
        // Rows of 48 (Qwen2-MoE's shared expert down): not quantizable in 32-blocks.
        let odd: Vec<String> =
            serde_json::from_value(fx["gguf"]["rows_not_whole_32_blocks"].clone()).unwrap();
        assert_eq!(odd.is_empty(), v != TinyVariant::Qwen2Moe, "{}", v.name());
        f32_kept.extend(odd);
        f32_kept.sort();
        let f32_gguf = TinyGguf::new(v, None).unwrap();
        for q in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1] {
            let g = TinyGguf::new(v, Some(q)).unwrap();
            let f = GgufFile::from_bytes(g.to_bytes().unwrap()).unwrap();
            let mut kept: Vec<String> = f
                .tensors()
                .iter()
                .filter(|t| t.ty == TensorType::F32)
                .map(|t| t.name.clone())
                .collect();
            kept.sort();
            assert_eq!(kept, f32_kept, "{} {}", v.name(), q.name());
            for t in f.tensors().iter().filter(|t| t.ty != TensorType::F32) {
                assert_eq!(t.ty, TensorType::Quant(q), "{}", t.name);
                // An expert tensor is its experts' quantized matrices one after the other.
                let values = f32s(
                    &f32_gguf
                        .tensors
                        .iter()
                        .find(|x| x.name == t.name)
                        .unwrap()
                        .data,
                );
                let per = values.len() / t.dims[2..].iter().product::<u64>() as usize;
                let want: Vec<u8> = values
                    .chunks(per)
                    .flat_map(|m| ember_tests::quantize::quantize(q, m).unwrap())
                    .collect();
                assert_eq!(f.tensor_data(t).unwrap(), want.as_slice(), "{}", t.name);
            }
        }
    }
}

#[test]
fn moe_models_carry_the_same_tokenizer_files() {
    let a = TempDir::new("dense-tok");
    write_tiny_model(&a.0, TinyVariant::Llama).unwrap();
    for v in TinyVariant::MOE {
        let b = TempDir::new(v.name());
        write_tiny_model(&b.0, v).unwrap();
        for file in ["tokenizer.json", "tokenizer_config.json"] {
            assert_eq!(
                std::fs::read(a.0.join(file)).unwrap(),
                std::fs::read(b.0.join(file)).unwrap(),
                "{} {file}",
                v.name()
            );
        }
    }
}
