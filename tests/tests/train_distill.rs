//! Distillation from the base model: a distilled sequence's loss is the KL divergence from
//! the frozen base model's next-token distribution to the adapted model's, computed here
//! independently from the inference path's logits (with and without the adapter); its
//! gradient matches finite differences of that loss; the adapter at its initialization
//! (B = 0) is the base itself, so loss and gradient are zero; and distillation with
//! virtual tokens is refused with a clear error.

use std::path::Path;
use std::sync::Arc;

use ember::adapters::{LoraAdapter, LoraConfig, SoftPrompt, Target};
use ember::model::{LoadOptions, Model};
use ember::session::{Session, SessionParams};
use ember::train::{Budgets, Example, ParamKey, TrainConfig, Trainables, Trainer};
use ember::util::Rng;
use ember::Context;
use ember_tests::model::temp_dir;
use ember_tests::tiny::{write_tiny_model, TinyVariant};

const DISTILL_WEIGHT: f32 = 0.7;

fn load(dir: &Path) -> Arc<Model> {
    let ctx = Context::new().unwrap();
    Arc::new(Model::load(&ctx, dir, LoadOptions::default()).unwrap())
}

/// A rank-4 adapter on every projection with B uniform in [-b_scale, b_scale] (0: the
/// initialization, B = 0).
fn adapter(m: &Model, b_scale: f32) -> LoraAdapter {
    let mut a = LoraAdapter::init(
        &m.config,
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            rslora: false,
            targets: Target::ALL.to_vec(),
            experts: None,
        },
        3,
    )
    .unwrap();
    let mut rng = Rng::new(4);
    for p in a.weights.values_mut() {
        p.b = rng.vec(p.b.len(), -b_scale, b_scale);
    }
    a
}

/// A distilled sequence (first two tokens unscored) and a plain one.
fn batch() -> Vec<Example> {
    let mut rng = Rng::new(9);
    let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| 3 + rng.below(250) as u32).collect() };
    let d = ids(13);
    let mut mask = vec![true; d.len()];
    mask[1] = false;
    vec![Example::new(d, mask).distilled(), Example::all(ids(10))]
}

fn trainer(m: &Arc<Model>, lora: LoraAdapter) -> Trainer {
    let config = TrainConfig {
        rows: 32,
        distill_weight: DISTILL_WEIGHT,
        ..Default::default()
    };
    let t = Trainables {
        lora: Some(lora),
        ..Default::default()
    };
    Trainer::new(m.clone(), t, config).unwrap()
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
    let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// The batch's mean loss from the inference path: CE of the plain tokens, and
/// `DISTILL_WEIGHT` * KL(base || adapted) at the distilled positions.
fn reference_loss(m: &Arc<Model>, lora: &LoraAdapter, batch: &[Example]) -> f64 {
    let mut s = Session::new(
        m.clone(),
        SessionParams {
            n_ctx: 32,
            n_seq: 1,
            n_batch: 16,
            kv_budget: 0,
        },
    )
    .unwrap();
    let id = s.attach_adapter("a", Arc::new(lora.clone())).unwrap();
    let v = m.config.vocab;
    let (mut total, mut n) = (0.0f64, 0usize);
    for e in batch {
        let adapted = s.logits_with(&e.tokens, Some((id, 1.0))).unwrap();
        let base = s.logits(&e.tokens).unwrap();
        for i in 1..e.tokens.len() {
            if !e.loss[i] {
                continue;
            }
            n += 1;
            let lq = log_softmax(&adapted[(i - 1) * v..i * v]);
            total += if e.distill {
                let lp = log_softmax(&base[(i - 1) * v..i * v]);
                let kl: f64 = lp.iter().zip(&lq).map(|(p, q)| p.exp() * (p - q)).sum();
                DISTILL_WEIGHT as f64 * kl
            } else {
                -lq[e.tokens[i] as usize]
            };
        }
    }
    total / n as f64
}

#[test]
fn distilled_loss_is_the_kl_to_the_base_and_its_gradient_matches_finite_differences() {
    let dir = temp_dir("train-distill");
    write_tiny_model(&dir, TinyVariant::Llama).unwrap();
    let m = load(&dir);
    let b = batch();

    // At initialization (B = 0) the adapted model is the base: a distilled-only batch has
    // zero loss and zero gradient.
    let mut tr = trainer(&m, adapter(&m, 0.0));
    let s = tr.step(&b[..1]).unwrap();
    assert_eq!(s.tokens, 11);
    assert!(s.loss.abs() < 1e-6 && s.grad_norm < 1e-6, "{s:?}");

    // With a nonzero adapter: the loss equals the reference built from inference logits.
    let lora = adapter(&m, 0.2);
    let tr = trainer(&m, lora.clone());
    let got = tr.evaluate(&b).unwrap();
    let want = reference_loss(&m, &lora, &b);
    assert!(want > 0.01, "the adapter changes the distribution ({want})");
    assert!(
        (got - want).abs() < 1e-4 * want.max(1.0),
        "distilled loss {got} vs reference {want}"
    );
    // The distilled part alone is positive and differs from its plain-CE counterpart.
    let kl_only = tr.evaluate(&b[..1]).unwrap();
    let ce_only = tr
        .evaluate(&[Example::new(b[0].tokens.clone(), b[0].loss.clone())])
        .unwrap();
    assert!(
        kl_only > 0.0 && (kl_only - ce_only).abs() > 0.1,
        "{kl_only} {ce_only}"
    );

    // Gradient of the mixed batch vs central differences of the loss.
    let mut tr = trainer(&m, lora.clone());
    tr.set_lr(0.0);
    tr.step(&b).unwrap();
    let grads = tr.gradients().unwrap();
    let h = 1e-2f32;
    let mut checked = 0;
    for (layer, tg, in_a, idx) in [
        (0, Target::V, false, 5),
        (1, Target::Down, false, 17),
        (0, Target::Q, true, 3),
        (1, Target::Up, true, 40),
    ] {
        let key = if in_a {
            ParamKey::LoraA(layer, tg)
        } else {
            ParamKey::LoraB(layer, tg)
        };
        let g = grads[&key][idx] as f64;
        let at = |delta: f32| {
            let mut l = lora.clone();
            let p = l.weights.get_mut(&(layer, tg)).unwrap();
            if in_a {
                p.a[idx] += delta;
            } else {
                p.b[idx] += delta;
            }
            trainer(&m, l).evaluate(&b).unwrap()
        };
        let fd = (at(h) - at(-h)) / (2.0 * h as f64);
        assert!(
            (g - fd).abs() < 2e-3 + 0.03 * fd.abs(),
            "layer {layer} {tg:?} {}[{idx}]: gradient {g} vs finite difference {fd}",
            if in_a { "A" } else { "B" }
        );
        checked += (fd.abs() > 1e-4) as usize;
    }
    assert!(checked >= 2, "the checked gradients are not all zero");
}

#[test]
fn distilled_rows_in_a_later_logits_chunk_give_the_same_loss() {
    let dir = temp_dir("train-distill-chunks");
    write_tiny_model(&dir, TinyVariant::Llama).unwrap();
    let m = load(&dir);
    let lora = adapter(&m, 0.2);
    // A 70-token plain sequence first, so the distilled rows land past row 64.
    let mut b = vec![Example::all(
        (0..70).map(|i| 3 + (i * 7 % 250) as u32).collect(),
    )];
    b.extend(batch());
    let loss = |logits_budget: usize| {
        let config = TrainConfig {
            rows: 128,
            distill_weight: DISTILL_WEIGHT,
            budgets: Budgets {
                logits: logits_budget,
                ..Budgets::default()
            },
            ..Default::default()
        };
        let t = Trainables {
            lora: Some(lora.clone()),
            ..Default::default()
        };
        Trainer::new(m.clone(), t, config)
            .unwrap()
            .evaluate(&b)
            .unwrap()
    };
    // One chunk of 128 rows (budget for both models' logits) vs two chunks of 64.
    let (one, two) = (loss(2 * 128 * 256), loss(2 * 64 * 256));
    assert!(
        (one - two).abs() < 1e-6 * one.abs().max(1.0),
        "{one} vs {two}"
    );
}

#[test]
fn distillation_needs_plain_lora() {
    let dir = temp_dir("train-distill-prompt");
    write_tiny_model(&dir, TinyVariant::Llama).unwrap();
    let m = load(&dir);
    let t = Trainables {
        prompt: Some(SoftPrompt::random(&m.config, 2, 1).unwrap()),
        ..Default::default()
    };
    let tr = Trainer::new(
        m.clone(),
        t,
        TrainConfig {
            rows: 32,
            ..Default::default()
        },
    )
    .unwrap();
    let e = tr.evaluate(&batch()).unwrap_err().to_string();
    assert!(e.contains("distilled"), "{e}");
}
