//! Training parity with transformers + peft (float64 on CPU torch, `scripts/ref/tiny_lora.py`,
//! fixtures in `tests/fixtures/lora/`): gradients of one batch, then 20 AdamW steps of LoRA
//! on q,v, on all seven linears, with clipping, with a loss mask, and of prompt tuning,
//! starting from the same initialization. Each step's loss must match within 1e-3
//! relative and the final adapter within 1e-4.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ember::adapters::{LoraAdapter, SoftPrompt, Target};
use ember::kernels::train::AdamConfig;
use ember::model::{LoadOptions, Model};
use ember::train::{Example, LrSchedule, ParamKey, TrainConfig, Trainables, Trainer};
use ember::Context;
use ember_tests::model::temp_dir;
use ember_tests::tiny::{write_tiny_model, TinyVariant};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/lora")
}

fn training() -> Value {
    let t = std::fs::read_to_string(fixtures().join("training.json")).unwrap();
    serde_json::from_str(&t).unwrap()
}

fn tiny() -> Arc<Model> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = temp_dir(&format!("train-parity-{n}"));
    write_tiny_model(&dir, TinyVariant::Llama).unwrap();
    let ctx = Context::new().unwrap();
    let m = Model::load(&ctx, &dir, LoadOptions::default()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    Arc::new(m)
}

fn batch(t: &Value, i: usize, mask_last: Option<usize>) -> Vec<Example> {
    t["batches"][i]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let tokens: Vec<u32> = s
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let n = tokens.len();
            let loss = (0..n)
                .map(|j| mask_last.is_none_or(|k| j + k >= n))
                .collect();
            Example { tokens, loss }
        })
        .collect()
}

fn adam(run: &Value) -> AdamConfig {
    let o = &run["optimizer"];
    AdamConfig {
        lr: o["lr"].as_f64().unwrap() as f32,
        beta1: o["betas"][0].as_f64().unwrap() as f32,
        beta2: o["betas"][1].as_f64().unwrap() as f32,
        eps: o["eps"].as_f64().unwrap() as f32,
        weight_decay: o["weight_decay"].as_f64().unwrap() as f32,
        max_norm: run["clip_grad_norm"].as_f64().unwrap_or(0.0) as f32,
    }
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Trains `name` for 20 steps and checks losses, gradient norms and the final values.
fn train_run(model: &Arc<Model>, name: &str, mask_last: Option<usize>) {
    let t = training();
    let run = &t["runs"][name];
    let init = fixtures().join(run["init"].as_str().unwrap());
    let prompt = name.starts_with("prompt");
    let trainables = if prompt {
        Trainables {
            prompt: Some(SoftPrompt::load(&init, model).unwrap()),
            ..Default::default()
        }
    } else {
        Trainables {
            lora: Some(LoraAdapter::load(&init, model).unwrap()),
            ..Default::default()
        }
    };
    let config = TrainConfig {
        rows: 32,
        adam: adam(run),
        schedule: LrSchedule::Constant,
        ..Default::default()
    };
    let mut tr = Trainer::new(model.clone(), trainables, config).unwrap();
    let (losses, norms) = (floats(&run["losses"]), floats(&run["grad_norms"]));
    for i in 0..losses.len() {
        let s = tr.step(&batch(&t, i, mask_last)).unwrap();
        assert!(!s.skipped);
        let rel = (s.loss - losses[i]).abs() / losses[i];
        assert!(
            rel < 1e-3,
            "{name} step {i}: loss {} vs peft {}",
            s.loss,
            losses[i]
        );
        let nrel = (s.grad_norm as f64 - norms[i]).abs() / norms[i];
        assert!(
            nrel < 1e-3,
            "{name} step {i}: grad norm {} vs {}",
            s.grad_norm,
            norms[i]
        );
    }
    let fin = fixtures().join(run["final"].as_str().unwrap());
    let worst = if prompt {
        let want = SoftPrompt::load(&fin, model).unwrap();
        let got = tr.soft_prompt().unwrap().unwrap();
        ember::util::max_abs_diff(&got.values, &want.values)
    } else {
        let want = LoraAdapter::load(&fin, model).unwrap();
        let got = tr.lora().unwrap().unwrap();
        assert_eq!(got.weights.len(), want.weights.len());
        want.weights
            .iter()
            .map(|(k, w)| {
                let g = &got.weights[k];
                ember::util::max_abs_diff(&g.a, &w.a).max(ember::util::max_abs_diff(&g.b, &w.b))
            })
            .fold(0.0, f32::max)
    };
    eprintln!("{name}: final max abs diff {worst:e}");
    assert!(worst < 1e-4, "{name}: final parameters differ by {worst}");
}

#[test]
fn gradients_of_one_batch_match_peft() {
    let model = tiny();
    let t = training();
    let ad = LoraAdapter::load(&fixtures().join("qv_random"), &model).unwrap();
    let config = TrainConfig {
        rows: 32,
        adam: AdamConfig {
            lr: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut tr = Trainer::new(
        model.clone(),
        Trainables {
            lora: Some(ad),
            ..Default::default()
        },
        config,
    )
    .unwrap();
    let s = tr.step(&batch(&t, 0, None)).unwrap();
    let logits: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("logits.json")).unwrap())
            .unwrap();
    let want_loss = logits["checks"]["qv_random_batch0_loss"].as_f64().unwrap();
    assert!(
        (s.loss - want_loss).abs() < 1e-5 * want_loss,
        "{} vs {want_loss}",
        s.loss
    );
    let grads = tr.gradients().unwrap();
    let bytes = std::fs::read(fixtures().join("grads.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut checked = 0;
    for l in 0..2 {
        for tg in [Target::Q, Target::V] {
            for b in [false, true] {
                let name = format!("qv_random/{}", tg.peft_key(l, b));
                let view = st.tensor(&name).unwrap();
                let want: Vec<f64> = view
                    .data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                let key = if b {
                    ParamKey::LoraB(l, tg)
                } else {
                    ParamKey::LoraA(l, tg)
                };
                let got = &grads[&key];
                let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - w).abs() < 1e-5 * scale + 1e-7,
                        "{name}[{i}]: {g} vs {w} (max {scale})"
                    );
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 8);
}

#[test]
fn lora_on_q_and_v_trains_like_peft() {
    train_run(&tiny(), "train_qv", None);
}

#[test]
fn lora_on_every_linear_trains_like_peft() {
    train_run(&tiny(), "train_all", None);
}

#[test]
fn clipping_by_global_norm_trains_like_peft() {
    train_run(&tiny(), "train_qv_clip", None);
}

#[test]
fn loss_mask_trains_like_peft() {
    train_run(&tiny(), "train_qv_mask", Some(4));
}

#[test]
fn prompt_tuning_trains_like_peft() {
    train_run(&tiny(), "prompt_tuning", None);
}
