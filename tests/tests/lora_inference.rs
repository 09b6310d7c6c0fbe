//! LoRA at inference: an adapter applied on the fly gives the logits of the base whose
//! weights were merged with it (W + s B A), on HF and on GGUF bases (whose q/k rows are
//! permuted), alone and stacked; sequences with different adapters share one batch;
//! adapters round-trip through the PEFT files and refuse another base.

use std::path::Path;
use std::sync::Arc;

use ember::adapters::{LoraAdapter, LoraConfig, Target};
use ember::model::{LoadOptions, Model};
use ember::session::{SamplerConfig, Session, SessionParams};
use ember::util::Rng;
use ember::Context;
use ember_tests::model::temp_dir;
use ember_tests::tiny::{tiny_tensors, write_tiny_gguf, write_tiny_model, TinyVariant};
use safetensors::{tensor::TensorView, Dtype};

const PROMPT: [u32; 9] = [5, 17, 200, 3, 99, 42, 7, 250, 1];

fn load(dir: &Path) -> Arc<Model> {
    let ctx = Context::new().unwrap();
    Arc::new(Model::load(&ctx, dir, LoadOptions::default()).unwrap())
}

fn session(m: &Arc<Model>, n_seq: usize) -> Session {
    Session::new(
        m.clone(),
        SessionParams {
            n_ctx: 64,
            n_seq,
            n_batch: 16,
            kv_budget: 0,
        },
    )
    .unwrap()
}

/// A random adapter with nonzero A and B on every target of every layer.
fn random_adapter(m: &Model, rank: usize, seed: u64, targets: &[Target]) -> LoraAdapter {
    let mut a = LoraAdapter::init(
        &m.config,
        LoraConfig {
            rank,
            alpha: 2.0 * rank as f32,
            rslora: false,
            targets: targets.to_vec(),
            experts: None,
        },
        seed,
    )
    .unwrap();
    let mut rng = Rng::new(seed + 1);
    for p in a.weights.values_mut() {
        p.b = rng.vec(p.b.len(), -0.1, 0.1);
    }
    a
}

/// The tiny HF model with `adapters` (strength each) merged into its weights.
fn write_merged(dir: &Path, v: TinyVariant, m: &Model, adapters: &[(&LoraAdapter, f32)]) {
    write_merged_with(dir, v, m, adapters, Dtype::F32);
}

/// [`write_merged`] on the weights rounded to `dtype` (F32 or F16), stored as `dtype`
/// after the merge (rounded once more).
fn write_merged_with(
    dir: &Path,
    v: TinyVariant,
    m: &Model,
    adapters: &[(&LoraAdapter, f32)],
    dtype: Dtype,
) {
    write_tiny_model(dir, v).unwrap();
    let mut tensors = tiny_tensors(v);
    let round = |x: f32| match dtype {
        Dtype::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    };
    for t in tensors.iter_mut() {
        t.2.iter_mut().for_each(|x| *x = round(*x));
    }
    for (ad, strength) in adapters {
        let s = ad.config.scale() * strength;
        let r = ad.config.rank;
        for ((l, t), p) in &ad.weights {
            let name = format!(
                "model.layers.{l}.{}.{}.weight",
                if matches!(t, Target::Gate | Target::Up | Target::Down) {
                    "mlp"
                } else {
                    "self_attn"
                },
                t.module()
            );
            let (out, inp) = t.dims(&m.config);
            let w = &mut tensors.iter_mut().find(|(n, _, _)| *n == name).unwrap().2;
            for o in 0..out {
                for i in 0..inp {
                    let d: f32 = (0..r).map(|j| p.b[o * r + j] * p.a[j * inp + i]).sum();
                    w[o * inp + i] += s * d;
                }
            }
        }
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| {
            let b = match dtype {
                Dtype::F16 => v
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect(),
                _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            };
            (n, s, b)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn adapter_equals_merged_weights_on_hf_and_gguf_bases() {
    let base = temp_dir("lora-merge");
    let v = TinyVariant::Llama;
    let hf_dir = base.join("hf");
    write_tiny_model(&hf_dir, v).unwrap();
    let gguf_path = base.join("tiny.gguf");
    write_tiny_gguf(&gguf_path, v, None).unwrap();
    let hf = load(&hf_dir);
    let gguf = load(&gguf_path);
    assert!(gguf.qk_permuted && !hf.qk_permuted);
    assert_eq!(
        hf.identity, gguf.identity,
        "a GGUF and its HF twin share an identity"
    );
    let a1 = random_adapter(&hf, 4, 1, &Target::ALL);
    let a2 = random_adapter(&hf, 2, 7, &[Target::Q, Target::V]);
    let merged_dir = base.join("merged");
    write_merged(&merged_dir, v, &hf, &[(&a1, 1.0)]);
    let want = session(&load(&merged_dir), 1).logits(&PROMPT).unwrap();
    for m in [&hf, &gguf] {
        let mut s = session(m, 1);
        let id = s.attach_adapter("a1", Arc::new(a1.clone())).unwrap();
        let got = s.logits_with(&PROMPT, Some((id, 1.0))).unwrap();
        let d = max_diff(&got, &want);
        assert!(
            d < 2e-5,
            "adapter vs merged (permuted={}): {d}",
            m.qk_permuted
        );
        // Without the adapter the base is unchanged.
        let base_logits = s.logits(&PROMPT).unwrap();
        assert!(max_diff(&base_logits, &want) > 1e-3);
    }
    // Two adapters at strengths 0.5 and 2 stacked = both merged.
    let merged2 = base.join("merged2");
    write_merged(&merged2, v, &hf, &[(&a1, 0.5), (&a2, 2.0)]);
    let want2 = session(&load(&merged2), 1).logits(&PROMPT).unwrap();
    let stacked = LoraAdapter::stack(&[(&a1, 0.5), (&a2, 2.0)]).unwrap();
    let mut s = session(&gguf, 1);
    let id = s.attach_adapter("stack", Arc::new(stacked)).unwrap();
    let d = max_diff(&s.logits_with(&PROMPT, Some((id, 1.0))).unwrap(), &want2);
    assert!(d < 2e-5, "stacked adapters vs merged: {d}");
    // The adapter's strength scales the delta: strength 0.5 of a1 = merged at 0.5.
    let half_dir = base.join("half");
    write_merged(&half_dir, v, &hf, &[(&a1, 0.5)]);
    let want_half = session(&load(&half_dir), 1).logits(&PROMPT).unwrap();
    let mut s = session(&hf, 1);
    let id = s.attach_adapter("a1", Arc::new(a1.clone())).unwrap();
    let d = max_diff(
        &s.logits_with(&PROMPT, Some((id, 0.5))).unwrap(),
        &want_half,
    );
    assert!(d < 2e-5, "half strength: {d}");
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn sequences_with_different_adapters_share_a_batch() {
    let base = temp_dir("lora-batch");
    let path = base.join("tiny.gguf");
    write_tiny_gguf(
        &path,
        TinyVariant::Qwen2,
        Some(ember::quant::QuantType::Q8_0),
    )
    .unwrap();
    let m = load(&path);
    let ads = [
        random_adapter(&m, 4, 3, &Target::ALL),
        random_adapter(&m, 8, 5, &[Target::Q, Target::Down]),
    ];
    let prompts: [&[u32]; 3] = [&[1, 2, 3, 4], &[9, 8, 7], &[100, 101, 102, 103, 104]];
    let choice = [Some(0usize), None, Some(1)];
    // Alone, each with its adapter.
    let mut alone = Vec::new();
    for k in 0..3 {
        let mut s = session(&m, 1);
        let ids: Vec<_> = ads
            .iter()
            .map(|a| s.attach_adapter("x", Arc::new(a.clone())).unwrap())
            .collect();
        let q = s.add_sequence(SamplerConfig::greedy()).unwrap();
        s.set_sequence_adapter(q, choice[k].map(|i| ids[i]), 1.0)
            .unwrap();
        let mut out = vec![s.prefill(q, prompts[k]).unwrap()];
        for _ in 0..6 {
            out.push(s.decode(&[q]).unwrap()[0]);
        }
        alone.push(out);
    }
    // Together in one batch.
    let mut s = session(&m, 3);
    let ids: Vec<_> = ads
        .iter()
        .map(|a| s.attach_adapter("x", Arc::new(a.clone())).unwrap())
        .collect();
    let seqs: Vec<_> = (0..3)
        .map(|_| s.add_sequence(SamplerConfig::greedy()).unwrap())
        .collect();
    let mut got: Vec<Vec<u32>> = Vec::new();
    for k in 0..3 {
        s.set_sequence_adapter(seqs[k], choice[k].map(|i| ids[i]), 1.0)
            .unwrap();
        got.push(vec![s.prefill(seqs[k], prompts[k]).unwrap()]);
    }
    for _ in 0..6 {
        let out = s.decode(&seqs).unwrap();
        for k in 0..3 {
            got[k].push(out[k]);
        }
    }
    assert_eq!(got, alone);
    // Adapters change the outputs at all.
    assert_ne!(alone[0], {
        let mut s = session(&m, 1);
        let q = s.add_sequence(SamplerConfig::greedy()).unwrap();
        let mut out = vec![s.prefill(q, prompts[0]).unwrap()];
        for _ in 0..6 {
            out.push(s.decode(&[q]).unwrap()[0]);
        }
        out
    });
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn peft_files_round_trip_and_refuse_another_base() {
    let base = temp_dir("lora-files");
    let v = TinyVariant::Llama;
    let gguf_path = base.join("tiny.gguf");
    write_tiny_gguf(&gguf_path, v, None).unwrap();
    let m = load(&gguf_path);
    let a = random_adapter(&m, 4, 11, &[Target::Q, Target::K, Target::Down]);
    let dir = base.join("adapter");
    a.save(&dir, &m).unwrap();
    let back = LoraAdapter::load(&dir, &m).unwrap();
    assert_eq!(back.weights, a.weights);
    assert_eq!(back.config.rank, 4);
    assert_eq!(back.base_identity, Some(m.identity));
    // Another base (the tied variant) refuses it.
    let other_path = base.join("tied.gguf");
    write_tiny_gguf(&other_path, TinyVariant::LlamaTied, None).unwrap();
    let other = load(&other_path);
    let Err(e) = LoraAdapter::load(&dir, &other) else {
        panic!("another base must be refused")
    };
    assert!(e.to_string().contains("another base model"), "{e}");
    // Wrong shape: a rank-4 A for a layer of another size.
    let cfg = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        cfg.replace("\"r\": 4", "\"r\": 5"),
    )
    .unwrap();
    let Err(e) = LoraAdapter::load(&dir, &m) else {
        panic!("a wrong rank must be refused")
    };
    assert!(e.to_string().contains("the model needs"), "{e}");
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn merge_into_f32_and_f16_bases_and_unmerge_exactly() {
    let base = temp_dir("lora-merge-into");
    let v = TinyVariant::Llama;
    let hf_dir = base.join("hf");
    write_tiny_model(&hf_dir, v).unwrap();
    let gguf_path = base.join("tiny.gguf");
    write_tiny_gguf(&gguf_path, v, None).unwrap();
    let hf = load(&hf_dir);
    let gguf = load(&gguf_path);
    let a1 = random_adapter(&hf, 4, 1, &Target::ALL);
    let a2 = random_adapter(&hf, 2, 7, &[Target::Q, Target::V]);
    // Task arithmetic: add a1 at half strength, subtract a2.
    let parts = [(&a1, 0.5f32), (&a2, -1.0f32)];
    let ref_dir = base.join("ref");
    write_merged(&ref_dir, v, &hf, &parts);
    let want = session(&load(&ref_dir), 1).logits(&PROMPT).unwrap();
    for m in [&hf, &gguf] {
        let before = session(m, 1).logits(&PROMPT).unwrap();
        let merged = Arc::new(m.merge_lora(&parts).unwrap());
        let d = max_diff(&session(&merged, 1).logits(&PROMPT).unwrap(), &want);
        assert!(d < 2e-5, "merged (permuted={}): {d}", m.qk_permuted);
        assert_ne!(merged.identity, m.identity);
        // Unmerging is exact: the base was never touched.
        assert_eq!(session(m, 1).logits(&PROMPT).unwrap(), before);
        // Adapters made for the base refuse the merged model.
        let mut tagged = a1.clone();
        tagged.base_identity = Some(m.identity);
        let e = merged
            .merge_lora(&[(&tagged, 1.0)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("another base model"), "{e}");
    }

    // f16 base: the sum is rounded to f16 once.
    let f16_dir = base.join("f16");
    write_merged_with(&f16_dir, v, &hf, &[], Dtype::F16);
    let f16 = load(&f16_dir);
    let ref16 = base.join("ref16");
    write_merged_with(&ref16, v, &hf, &parts, Dtype::F16);
    let want16 = session(&load(&ref16), 1).logits(&PROMPT).unwrap();
    let merged16 = Arc::new(f16.merge_lora(&parts).unwrap());
    let d = max_diff(&session(&merged16, 1).logits(&PROMPT).unwrap(), &want16);
    assert!(d < 1e-3, "f16 merged: {d}");

    // Quantized weights are refused, with the reason.
    let q_path = base.join("q8.gguf");
    write_tiny_gguf(&q_path, v, Some(ember::quant::QuantType::Q8_0)).unwrap();
    let e = load(&q_path)
        .merge_lora(&[(&a1, 1.0)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("quantized"), "{e}");
    let _ = std::fs::remove_dir_all(&base);
}
