//! Training against a quantized GGUF base (QLoRA-style: weights dequantized on the fly,
//! q/k rows in llama.cpp's permuted order) equals training against its f32 HF export: the
//! same losses step by step and the same adapter (in HF order) at the end, for LoRA on every
//! linear and for a prefix (whose keys follow the q/k permutation). The f32 side also
//! recomputes activations and splits attention into query blocks.

use std::path::Path;
use std::sync::Arc;

use ember::adapters::{LoraAdapter, LoraConfig, Prefix, Target};
use ember::kernels::train::AdamConfig;
use ember::model::export::{export_hf, ExportDtype};
use ember::model::{LoadOptions, Model};
use ember::quant::QuantType;
use ember::train::{Budgets, Example, TrainConfig, Trainables, Trainer};
use ember::util::{max_abs_diff, Rng};
use ember::Context;
use ember_tests::model::temp_dir;
use ember_tests::tiny::{write_tiny_gguf, TinyVariant};

fn load(p: &Path) -> Arc<Model> {
    let ctx = Context::new().unwrap();
    Arc::new(Model::load(&ctx, p, LoadOptions::default()).unwrap())
}

fn batches(n: usize) -> Vec<Vec<Example>> {
    let mut rng = Rng::new(77);
    (0..n)
        .map(|_| {
            (0..3)
                .map(|s| {
                    let len = 9 + 4 * s;
                    Example::all((0..len).map(|_| 3 + rng.below(250) as u32).collect())
                })
                .collect()
        })
        .collect()
}

fn train(m: &Arc<Model>, t: Trainables, budgets: Budgets) -> (Vec<f64>, Trainer) {
    let config = TrainConfig {
        budgets,
        rows: 64,
        adam: AdamConfig {
            lr: 1e-2,
            weight_decay: 0.01,
            max_norm: 1.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut tr = Trainer::new(m.clone(), t, config).unwrap();
    let losses = batches(6)
        .iter()
        .map(|b| {
            let s = tr.step(b).unwrap();
            assert!(!s.skipped && s.blocks == 1);
            s.loss
        })
        .collect();
    (losses, tr)
}

#[test]
fn quantized_gguf_base_trains_like_its_f32_export() {
    let dir = temp_dir("train-quantized");
    let gguf = dir.join("tiny-q4_1.gguf");
    write_tiny_gguf(&gguf, TinyVariant::Llama, Some(QuantType::Q4_1)).unwrap();
    let hf_dir = dir.join("hf");
    export_hf(&gguf, &hf_dir, ExportDtype::F32).unwrap();
    let (q, f) = (load(&gguf), load(&hf_dir));
    assert!(q.qk_permuted && !f.qk_permuted);
    assert!(
        q.source.weight_formats.contains("Q4_1"),
        "{}",
        q.source.weight_formats
    );

    let mut lora = LoraAdapter::init(
        &f.config,
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            rslora: false,
            targets: Target::ALL.to_vec(),
            experts: None,
        },
        5,
    )
    .unwrap();
    // Nonzero B so the q/k permutation of B matters from the first step.
    let mut rng = Rng::new(6);
    for p in lora.weights.values_mut() {
        p.b = rng.vec(p.b.len(), -0.05, 0.05);
    }
    let prefix = Prefix::random(&f.config, 3, 9).unwrap();
    let cases = [
        (
            "lora",
            Trainables {
                lora: Some(lora),
                ..Default::default()
            },
        ),
        (
            "prefix",
            Trainables {
                prefix: Some(prefix),
                ..Default::default()
            },
        ),
    ];
    for (name, t) in cases {
        let (lq, tq) = train(&q, t.clone(), Budgets::default());
        // The f32 run recomputes every layer's activations in the backward and takes the
        // attention in two query blocks: the same math in another order.
        let small = Budgets {
            activations: 0,
            scores: f.config.n_heads * 32 * 64,
            ..Budgets::default()
        };
        let (lf, tf) = train(&f, t, small);
        for (i, (a, b)) in lq.iter().zip(&lf).enumerate() {
            assert!((a - b).abs() < 1e-4 * b, "{name} step {i}: {a} vs {b}");
        }
        assert!(lq.last() < lq.first(), "{name} did not learn: {lq:?}");
        let d = if name == "lora" {
            let (aq, af) = (tq.lora().unwrap().unwrap(), tf.lora().unwrap().unwrap());
            af.weights
                .iter()
                .map(|(k, w)| {
                    max_abs_diff(&aq.weights[k].a, &w.a).max(max_abs_diff(&aq.weights[k].b, &w.b))
                })
                .fold(0.0, f32::max)
        } else {
            let (pq, pf) = (tq.prefix().unwrap().unwrap(), tf.prefix().unwrap().unwrap());
            pq.layers
                .iter()
                .zip(&pf.layers)
                .map(|(a, b)| max_abs_diff(a, b))
                .fold(0.0, f32::max)
        };
        assert!(d < 1e-4, "{name}: trained values differ by {d}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
