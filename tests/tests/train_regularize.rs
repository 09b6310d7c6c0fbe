//! Continual-learning regularizers of the trainer (issue 8): the L2 pull toward an anchor,
//! EWC's Fisher-weighted pull (the Fisher estimated on the GPU, checked against squared
//! gradients read back), and the EMA of the parameters, each against a CPU computation
//! from the trainer's own gradients and parameters.

use std::collections::HashMap;
use std::sync::Arc;

use ember::adapters::{LoraAdapter, LoraConfig, Target};
use ember::kernels::train::AdamConfig;
use ember::model::{LoadOptions, Model};
use ember::train::{Example, ParamKey, TrainConfig, Trainables, Trainer};
use ember::util::Rng;
use ember_tests::model::{ctx, TempDir};
use ember_tests::tiny::{write_tiny_model, TinyVariant};

fn tiny() -> Arc<Model> {
    let dir = TempDir::new("reg-model");
    write_tiny_model(dir.path(), TinyVariant::Llama).unwrap();
    Arc::new(Model::load(ctx(), dir.path(), LoadOptions::default()).unwrap())
}

fn adapter(m: &Model, seed: u64) -> LoraAdapter {
    let mut a = LoraAdapter::init(
        &m.config,
        LoraConfig::new(2, 4.0, vec![Target::Q, Target::V, Target::Down]),
        seed,
    )
    .unwrap();
    let mut rng = Rng::new(seed + 10);
    for p in a.weights.values_mut() {
        p.b = rng.vec(p.b.len(), -0.2, 0.2);
    }
    a.base_identity = Some(m.identity);
    a
}

fn batch(seed: u64) -> Vec<Example> {
    let mut rng = Rng::new(seed);
    (0..3)
        .map(|_| Example::all((0..10).map(|_| rng.below(256) as u32).collect()))
        .collect()
}

/// Rows of 64 tokens, rate `lr`, no clipping.
fn train_config(lr: f32) -> TrainConfig {
    TrainConfig {
        rows: 64,
        adam: AdamConfig {
            lr,
            max_norm: 0.0,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn trainer(m: &Arc<Model>, a: &LoraAdapter, lr: f32) -> Trainer {
    trainer_with(m, a, train_config(lr))
}

fn trainer_with(m: &Arc<Model>, a: &LoraAdapter, config: TrainConfig) -> Trainer {
    let t = Trainables {
        lora: Some(a.clone()),
        ..Default::default()
    };
    Trainer::new(m.clone(), t, config).unwrap()
}

/// `a` moved by a small random step.
fn moved(a: &LoraAdapter, seed: u64) -> LoraAdapter {
    let mut b = a.clone();
    let mut rng = Rng::new(seed);
    for p in b.weights.values_mut() {
        for v in p.a.iter_mut().chain(p.b.iter_mut()) {
            *v += rng.range(-0.05, 0.05);
        }
    }
    b
}

/// Per key: the values of `a`.
fn values(a: &LoraAdapter) -> HashMap<ParamKey, Vec<f32>> {
    let mut out = HashMap::new();
    for (&(l, t), p) in &a.weights {
        out.insert(ParamKey::LoraA(l, t), p.a.clone());
        out.insert(ParamKey::LoraB(l, t), p.b.clone());
    }
    out
}

/// Per key: the values of `a` minus those of `b`.
fn delta(a: &LoraAdapter, b: &LoraAdapter) -> HashMap<ParamKey, Vec<f32>> {
    let mut out = HashMap::new();
    for (&(l, t), p) in &a.weights {
        let q = &b.weights[&(l, t)];
        let d = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(u, v)| u - v).collect::<Vec<_>>();
        out.insert(ParamKey::LoraA(l, t), d(&p.a, &q.a));
        out.insert(ParamKey::LoraB(l, t), d(&p.b, &q.b));
    }
    out
}

fn check(what: &str, got: &[f32], want: &[f32]) {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 2e-4 * scale + 1e-7,
            "{what}[{i}]: {g} vs {w} (scale {scale})"
        );
    }
}

/// With the anchor at `a0` and the parameters at `a1`, the step's gradient is the task
/// gradient at `a1` plus `lambda [F] (a1 - a0)`.
fn check_pull(fisher_batches: &[Vec<Example>]) {
    let m = tiny();
    let (a0, lambda) = (adapter(&m, 1), 0.7f32);
    let a1 = moved(&a0, 2);
    let b = batch(5);
    // The Fisher on the CPU: mean over batches of squared gradients at a0, normalized.
    let fisher: Option<HashMap<ParamKey, Vec<f32>>> = if fisher_batches.is_empty() {
        None
    } else {
        let mut t0 = trainer(&m, &a0, 0.0);
        let mut sum: HashMap<ParamKey, Vec<f64>> = HashMap::new();
        for fb in fisher_batches {
            t0.step(fb).unwrap();
            for (k, g) in t0.gradients().unwrap() {
                let e = sum.entry(k).or_insert_with(|| vec![0.0; g.len()]);
                for (s, v) in e.iter_mut().zip(&g) {
                    *s += (*v as f64) * (*v as f64);
                }
            }
        }
        let n: usize = sum.values().map(|v| v.len()).sum();
        let mean = sum.values().flatten().sum::<f64>() / n as f64;
        Some(
            sum.into_iter()
                .map(|(k, v)| (k, v.iter().map(|x| (x / mean) as f32).collect()))
                .collect(),
        )
    };
    let mut plain = trainer(&m, &a1, 0.0);
    plain.step(&b).unwrap();
    let g_task = plain.gradients().unwrap();
    let mut tr = trainer(&m, &a0, 0.0);
    tr.anchor_here(lambda, fisher_batches).unwrap();
    tr.set_lora(&a1).unwrap();
    tr.step(&b).unwrap();
    let g = tr.gradients().unwrap();
    for (k, d) in delta(&a1, &a0) {
        let want: Vec<f32> = d
            .iter()
            .enumerate()
            .map(|(i, dv)| {
                let f = fisher.as_ref().map_or(1.0, |f| f[&k][i]);
                g_task[&k][i] + lambda * f * dv
            })
            .collect();
        check(&format!("{k:?}"), &g[&k], &want);
    }
}

#[test]
fn l2_pull_toward_the_anchor() {
    check_pull(&[]);
}

#[test]
fn ewc_pull_weighted_by_the_gpu_fisher() {
    check_pull(&[batch(11), batch(12), batch(13)]);
}

#[test]
fn ema_of_the_parameters() {
    let m = tiny();
    let a = adapter(&m, 3);
    let beta = 0.8f32;
    let mut tr = trainer(&m, &a, 1e-2);
    tr.set_ema(Some(beta)).unwrap();
    let mut ema = values(&a);
    for s in 0..4 {
        tr.step(&batch(20 + s)).unwrap();
        let now = values(&tr.lora().unwrap().unwrap());
        for (k, e) in ema.iter_mut() {
            for (x, y) in e.iter_mut().zip(&now[k]) {
                *x = beta * *x + (1.0 - beta) * y;
            }
        }
    }
    let got = values(&tr.lora_ema().unwrap().unwrap());
    for (k, want) in &ema {
        check(&format!("ema {k:?}"), &got[k], want);
    }
    // The EMA lags the parameters.
    let last = values(&tr.lora().unwrap().unwrap());
    assert!(ema.iter().any(|(k, e)| e != &last[k]));
    // A rollback to an adapter restarts the EMA there.
    tr.set_lora(&a).unwrap();
    let restarted = values(&tr.lora_ema().unwrap().unwrap());
    for (k, v) in values(&a) {
        check(&format!("restart {k:?}"), &restarted[&k], &v);
    }
}

/// A continual learner's warmup runs once over the adapter's life: with the schedule's
/// clock set past the warmup, a fresh trainer's first step uses the full rate; set inside
/// it, the rate of that point of the warmup.
#[test]
fn the_schedule_clock_carries_a_warmup_across_trainers() {
    use ember::train::LrSchedule;
    let m = tiny();
    let a = adapter(&m, 3);
    let make = || {
        let config = TrainConfig {
            schedule: LrSchedule::WarmupConstant { warmup: 4 },
            ..train_config(1e-3)
        };
        trainer_with(&m, &a, config)
    };
    let mut fresh = make();
    let lrs: Vec<f32> = (0..2).map(|i| fresh.step(&batch(i)).unwrap().lr).collect();
    assert_eq!(lrs, vec![0.0, 0.25e-3], "a fresh trainer warms up from 0");
    let mut later = make();
    later.set_schedule_clock(2);
    let lrs: Vec<f32> = (0..3).map(|i| later.step(&batch(i)).unwrap().lr).collect();
    assert_eq!(lrs, vec![0.5e-3, 0.75e-3, 1e-3], "continues the warmup");
    later.set_schedule_clock(40);
    assert_eq!(later.step(&batch(9)).unwrap().lr, 1e-3, "past it: constant");
}
