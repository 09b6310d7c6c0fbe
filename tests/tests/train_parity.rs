//! Training parity with transformers + peft (float64 on CPU torch, `scripts/ref/tiny_lora.py`,
//! fixtures in `tests/fixtures/lora/`): the gradients of one batch, then 20 AdamW steps of
//! LoRA on q,v, on all seven linears, with clipping, with a loss mask, with warmup + cosine,
//! and of prompt tuning and prefix tuning, starting from the same initialization. Each
//! step's loss must match within 1e-3 relative and the final values within 1e-4.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ember::adapters::{LoraAdapter, Prefix, SoftPrompt, Target};
use ember::kernels::train::AdamConfig;
use ember::model::{LoadOptions, Model};
use ember::train::{Example, LrSchedule, ParamKey, TrainConfig, Trainables, Trainer};
use ember::util::max_abs_diff;
use ember::Context;
use ember_tests::model::temp_dir;
use ember_tests::tiny::{write_tiny_model, TinyVariant};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/lora")
}

fn json(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(rel)).unwrap()).unwrap()
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

/// Batch `i`; with `masked`, the first `masked` positions of each sequence are not scored.
fn batch(i: usize, masked: usize) -> Vec<Example> {
    json("batches.json")["batches"][i]
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
            let loss = (0..tokens.len()).map(|j| j >= masked).collect();
            Example::new(tokens, loss)
        })
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn adam(run: &Value) -> AdamConfig {
    let o = &run["config"]["optimizer"];
    AdamConfig {
        lr: o["lr"].as_f64().unwrap() as f32,
        beta1: o["betas"][0].as_f64().unwrap() as f32,
        beta2: o["betas"][1].as_f64().unwrap() as f32,
        eps: o["eps"].as_f64().unwrap() as f32,
        weight_decay: o["weight_decay"].as_f64().unwrap() as f32,
        max_norm: run["config"]["max_grad_norm"].as_f64().unwrap_or(0.0) as f32,
    }
}

enum Kind {
    Lora,
    Prompt,
    Prefix,
}

fn trainables(model: &Model, kind: &Kind, dir: &Path) -> Trainables {
    match kind {
        Kind::Lora => Trainables {
            lora: Some(LoraAdapter::load(dir, model).unwrap()),
            ..Default::default()
        },
        Kind::Prompt => Trainables {
            prompt: Some(SoftPrompt::load(dir, model).unwrap()),
            ..Default::default()
        },
        Kind::Prefix => Trainables {
            prefix: Some(Prefix::load(dir, model).unwrap()),
            ..Default::default()
        },
    }
}

/// The largest difference between the trained values and the fixture's `final/`.
fn final_diff(tr: &Trainer, model: &Model, kind: &Kind, dir: &Path) -> f32 {
    match kind {
        Kind::Lora => {
            let want = LoraAdapter::load(dir, model).unwrap();
            let got = tr.lora().unwrap().unwrap();
            assert_eq!(got.weights.len(), want.weights.len());
            want.weights
                .iter()
                .map(|(k, w)| {
                    let g = &got.weights[k];
                    max_abs_diff(&g.a, &w.a).max(max_abs_diff(&g.b, &w.b))
                })
                .fold(0.0, f32::max)
        }
        Kind::Prompt => {
            let want = SoftPrompt::load(dir, model).unwrap();
            max_abs_diff(&tr.soft_prompt().unwrap().unwrap().values, &want.values)
        }
        Kind::Prefix => {
            let want = Prefix::load(dir, model).unwrap();
            let got = tr.prefix().unwrap().unwrap();
            got.layers
                .iter()
                .zip(&want.layers)
                .map(|(a, b)| max_abs_diff(a, b))
                .fold(0.0, f32::max)
        }
    }
}

/// Trains run `name` for 20 steps and checks losses, gradient norms, learning rates and the
/// final values.
fn train_run(name: &str, kind: Kind, masked: usize, schedule: LrSchedule) {
    let model = tiny();
    let run = json(&format!("{name}/run.json"));
    let base = fixtures().join(name);
    let config = TrainConfig {
        rows: 32,
        adam: adam(&run),
        schedule,
        ..Default::default()
    };
    let mut tr = Trainer::new(
        model.clone(),
        trainables(&model, &kind, &base.join("init")),
        config,
    )
    .unwrap();
    let (losses, norms, lrs) = (
        floats(&run["losses"]),
        floats(&run["grad_norms"]),
        floats(&run["lr"]),
    );
    let mut worst = 0.0f64;
    for i in 0..losses.len() {
        let s = tr.step(&batch(i, masked)).unwrap();
        assert!(!s.skipped);
        let rel = (s.loss - losses[i]).abs() / losses[i];
        worst = worst.max(rel);
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
        assert!(
            (s.lr as f64 - lrs[i]).abs() <= 1e-7 * lrs[i].max(1e-3),
            "{name} step {i}: lr {} vs {}",
            s.lr,
            lrs[i]
        );
    }
    let d = final_diff(&tr, &model, &kind, &base.join("final"));
    eprintln!("{name}: worst loss rel err {worst:.2e}, final max abs diff {d:.2e}");
    assert!(d < 1e-4, "{name}: final values differ by {d}");
}

fn grads_fixture() -> Vec<(String, Vec<f64>)> {
    let bytes = std::fs::read(fixtures().join("grads.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.names()
        .into_iter()
        .map(|n| {
            let v = st
                .tensor(n)
                .unwrap()
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n.to_string(), v)
        })
        .collect()
}

fn assert_grad(name: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() < 1e-5 * scale + 1e-7,
            "{name}[{i}]: {g} vs {w} (max {scale})"
        );
    }
}

/// One step at learning rate 0 leaves the batch-0 gradients in the trainer.
fn gradients(
    model: &Arc<Model>,
    t: Trainables,
) -> (f64, std::collections::HashMap<ParamKey, Vec<f32>>) {
    let config = TrainConfig {
        rows: 32,
        adam: AdamConfig {
            lr: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut tr = Trainer::new(model.clone(), t, config).unwrap();
    let s = tr.step(&batch(0, 0)).unwrap();
    (s.loss, tr.gradients().unwrap())
}

#[test]
fn gradients_of_one_batch_match_peft() {
    let model = tiny();
    let want = grads_fixture();
    let get = |k: &str| &want.iter().find(|(n, _)| n == k).unwrap().1;
    // LoRA with random A and B: both gradients nonzero.
    let (loss, g) = gradients(
        &model,
        trainables(&model, &Kind::Lora, &fixtures().join("qv_random")),
    );
    let want_loss = json("logits.json")["checks"]["qv_random_batch0_loss"]
        .as_f64()
        .unwrap();
    assert!(
        (loss - want_loss).abs() < 1e-5 * want_loss,
        "{loss} vs {want_loss}"
    );
    let mut checked = 0;
    for l in 0..2 {
        for tg in [Target::Q, Target::V] {
            for b in [false, true] {
                let key = if b {
                    ParamKey::LoraB(l, tg)
                } else {
                    ParamKey::LoraA(l, tg)
                };
                let name = format!("qv_random/{}", tg.peft_key(l, b));
                assert_grad(&name, &g[&key], get(&name));
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 8);
    // Soft prompt and prefix at their initial values.
    let (_, g) = gradients(
        &model,
        trainables(
            &model,
            &Kind::Prompt,
            &fixtures().join("prompt_tuning/init"),
        ),
    );
    assert_grad(
        "prompt",
        &g[&ParamKey::Prompt],
        get("prompt_tuning/step0/prompt_embeddings"),
    );
    let (_, g) = gradients(
        &model,
        trainables(
            &model,
            &Kind::Prefix,
            &fixtures().join("prefix_tuning/init"),
        ),
    );
    // PEFT's [n][layers * 2 kv] rows against Ember's per-layer [n][2 kv] blocks.
    let want = get("prefix_tuning/step0/prompt_embeddings");
    let (n, w) = (4, 2 * model.config.kv_dim());
    for l in 0..model.config.n_layers {
        let wl: Vec<f64> = (0..n)
            .flat_map(|j| want[j * 2 * w + l * w..][..w].iter().copied())
            .collect();
        assert_grad(&format!("prefix layer {l}"), &g[&ParamKey::Prefix(l)], &wl);
    }
}

#[test]
fn lora_on_q_and_v_trains_like_peft() {
    train_run("train_qv", Kind::Lora, 0, LrSchedule::Constant);
}

#[test]
fn lora_on_every_linear_trains_like_peft() {
    train_run("train_all", Kind::Lora, 0, LrSchedule::Constant);
}

#[test]
fn clipping_by_global_norm_trains_like_peft() {
    train_run("train_qv_clip", Kind::Lora, 0, LrSchedule::Constant);
}

#[test]
fn loss_mask_trains_like_peft() {
    train_run("train_qv_mask", Kind::Lora, 5, LrSchedule::Constant);
}

#[test]
fn warmup_and_cosine_schedule_trains_like_peft() {
    let schedule = LrSchedule::Cosine {
        warmup: 3,
        total: 20,
    };
    train_run("train_qv_cosine", Kind::Lora, 0, schedule);
}

#[test]
fn prompt_tuning_trains_like_peft() {
    train_run("prompt_tuning", Kind::Prompt, 0, LrSchedule::Constant);
}

#[test]
fn prefix_tuning_trains_like_peft() {
    train_run("prefix_tuning", Kind::Prefix, 0, LrSchedule::Constant);
}
