//! Mixture of LoRA experts (issue 7, MoE-of-LoRA): E LoRA experts behind a trainable router
//! on each adapted layer of a frozen base, trained with the training engine and a
//! Switch-style load-balancing loss plus an optional router z-loss.
//!
//! Checked against a float64 reference ([`RefModel::forward_adapted`] with the mixture
//! written out in plain Rust, `route_ref` choosing the experts): the step's task loss and
//! auxiliary losses, and the gradients of routers, A and B against central finite
//! differences of the whole reference loss; inference through a [`Session`] gives the
//! reference logits; the PEFT-style files round-trip; training lowers the loss while the
//! expert load stays within a stated balance bound. On a frozen Mixture-of-Experts base
//! (Mixtral, f32 and Q8_0) the gradient through its routed experts and router matches the
//! reference too, for plain LoRA and for a mixture, through the q/k norms of OLMoE and
//! Qwen3-MoE and through Qwen2-MoE's gated shared expert; LoRA on the experts themselves is
//! refused by name.

use std::collections::HashMap;
use std::sync::Arc;

use ember::adapters::lora::{LoraExperts, LoraPair};
use ember::adapters::{LoraAdapter, LoraConfig, Target};
use ember::kernels::lora_moe::route_ref;
use ember::kernels::train::AdamConfig;
use ember::model::{LoadOptions, Model};
use ember::quant::QuantType;
use ember::session::{Session, SessionParams};
use ember::train::{Example, ParamKey, TrainConfig, Trainables, Trainer};
use ember::util::Rng;
use ember_tests::model::{ctx, TempDir};
use ember_tests::reference::{RefModel, Site};
use ember_tests::tiny::{write_tiny_gguf, write_tiny_model, TinyVariant};

fn tiny() -> (Arc<Model>, RefModel) {
    tiny_of(TinyVariant::Llama)
}

fn tiny_of(v: TinyVariant) -> (Arc<Model>, RefModel) {
    let dir = TempDir::new("moe-lora-model");
    write_tiny_model(dir.path(), v).unwrap();
    let m = Model::load(ctx(), dir.path(), LoadOptions::default()).unwrap();
    (Arc::new(m), RefModel::from_tiny_hf(v))
}

/// The tiny model as a GGUF of quantized weights, and the reference of those weights.
fn tiny_gguf(v: TinyVariant, q: QuantType) -> (Arc<Model>, RefModel) {
    let dir = TempDir::new("moe-lora-gguf");
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, v, Some(q)).unwrap();
    let m = Model::load(ctx(), &path, LoadOptions::default()).unwrap();
    (Arc::new(m), RefModel::from_gguf(&path).unwrap())
}

/// A mixture on `targets` with random B (so the routers and A get task gradients) and
/// routers scaled up so that routes are clear of ties.
fn mixture(m: &Model, experts: LoraExperts, targets: &[Target], seed: u64) -> LoraAdapter {
    adapter(m, Some(experts), targets, seed)
}

/// [`mixture`], or plain LoRA (random B too) without `experts`.
fn adapter(m: &Model, experts: Option<LoraExperts>, targets: &[Target], seed: u64) -> LoraAdapter {
    let config = LoraConfig {
        experts,
        ..LoraConfig::new(2, 4.0, targets.to_vec())
    };
    let mut a = LoraAdapter::init(&m.config, config, seed).unwrap();
    let mut rng = Rng::new(seed + 1);
    for p in a.weights.values_mut() {
        p.b = rng.vec(p.b.len(), -0.3, 0.3);
        for r in &mut p.router {
            *r *= 8.0;
        }
    }
    a.base_identity = Some(m.identity);
    a
}

/// The batch: three sequences of different lengths, every token after the first scored
/// except the first two of the second sequence.
fn batch(seed: u64) -> Vec<Example> {
    let mut rng = Rng::new(seed);
    [12usize, 9, 15]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let tokens: Vec<u32> = (0..n).map(|_| rng.below(256) as u32).collect();
            let loss = (0..n).map(|j| i != 1 || j >= 2).collect();
            Example::new(tokens, loss)
        })
        .collect()
}

/// The mixture at one site of the reference forward: the delta `s B (g * A x)`, and the
/// route (chosen experts' mask, softmax over all experts, log-sum-exp of the logits).
struct Mixed {
    delta: Vec<f64>,
    mask: u32,
    pr: Vec<f64>,
    lse: f64,
}

/// Plain LoRA is one expert with gate 1.
fn mixed(a: &LoraAdapter, s: Site<'_>) -> Option<Mixed> {
    let p: &LoraPair = a.weights.get(&(s.layer, s.target))?;
    let (rank, width, scale) = (a.config.rank, a.config.width(), a.config.scale() as f64);
    let inp = s.x.len();
    let dot = |w: &[f32]| -> f64 { w.iter().zip(s.x).map(|(&a, b)| a as f64 * b).sum() };
    let (mask, g, pr, lse) = match a.config.experts {
        Some(e) => {
            let z: Vec<f64> = (0..e.n_experts)
                .map(|x| dot(&p.router[x * inp..(x + 1) * inp]))
                .collect();
            let (mask, g, pr) = route_ref(&z, e.top_k, e.renormalize);
            let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = mx + z.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
            (mask, g, pr, lse)
        }
        None => (1, vec![1.0], vec![1.0], 0.0),
    };
    let u: Vec<f64> = (0..width)
        .map(|j| g[j / rank] * dot(&p.a[j * inp..(j + 1) * inp]))
        .collect();
    let delta = (0..p.b.len() / width)
        .map(|o| {
            scale
                * (0..width)
                    .map(|j| p.b[o * width + j] as f64 * u[j])
                    .sum::<f64>()
        })
        .collect();
    Some(Mixed {
        delta,
        mask,
        pr,
        lse,
    })
}

/// Per adapted layer over a batch: choices per expert, summed probabilities, summed
/// squared log-sum-exp.
#[derive(Default)]
struct RouteSums {
    chosen: Vec<f64>,
    prob: Vec<f64>,
    lse2: f64,
}

/// What the reference computes for one batch (one block of rows).
struct RefLoss {
    /// Mean cross-entropy over scored tokens.
    task: f64,
    /// Load-balancing plus z-loss, summed over adapted layers.
    aux: f64,
}

/// The float64 loss of `adapter` on `batch`: the mixture applied at every adapted site,
/// the task loss, and per adapted layer `alpha E sum_e f_e P_e` and the z-loss over the
/// batch's tokens.
fn reference_loss(
    r: &RefModel,
    adapter: &LoraAdapter,
    batch: &[Example],
    alpha: f64,
    zw: f64,
) -> RefLoss {
    let e = adapter.config.experts.unwrap_or(LoraExperts {
        n_experts: 1,
        top_k: 1,
        renormalize: true,
    });
    let mut stats: HashMap<(usize, Target), RouteSums> = HashMap::new();
    let (mut task, mut scored, mut tokens) = (0.0, 0usize, 0usize);
    for ex in batch {
        let mut hook = |s: Site<'_>| -> Option<Vec<f64>> {
            let m = mixed(adapter, s)?;
            let st = stats
                .entry((s.layer, s.target))
                .or_insert_with(|| RouteSums {
                    chosen: vec![0.0; e.n_experts],
                    prob: vec![0.0; e.n_experts],
                    lse2: 0.0,
                });
            for x in 0..e.n_experts {
                st.chosen[x] += ((m.mask >> x) & 1) as f64;
                st.prob[x] += m.pr[x];
            }
            st.lse2 += m.lse * m.lse;
            Some(m.delta)
        };
        let (logits, _) = r.forward_adapted(&ex.tokens, &mut hook);
        tokens += ex.tokens.len();
        for i in 1..ex.tokens.len() {
            if !ex.loss[i] {
                continue;
            }
            let l = &logits[i - 1];
            let mx = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = mx + l.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
            task += lse - l[ex.tokens[i] as usize];
            scored += 1;
        }
    }
    let t = tokens as f64;
    let aux = stats
        .values()
        .filter(|_| adapter.config.experts.is_some())
        .map(|st| {
            let bal: f64 = (0..e.n_experts)
                .map(|x| st.chosen[x] / (e.top_k as f64 * t) * st.prob[x] / t)
                .sum();
            alpha * e.n_experts as f64 * bal + zw * st.lse2 / t
        })
        .sum();
    RefLoss {
        task: task / scored as f64,
        aux,
    }
}

fn trainer(m: &Arc<Model>, a: &LoraAdapter, alpha: f32, z: f32, lr: f32) -> Trainer {
    let config = TrainConfig {
        rows: 64,
        adam: AdamConfig {
            lr,
            max_norm: 0.0,
            ..Default::default()
        },
        balance_loss: alpha,
        z_loss: z,
        ..Default::default()
    };
    let t = Trainables {
        lora: Some(a.clone()),
        ..Default::default()
    };
    Trainer::new(m.clone(), t, config).unwrap()
}

/// Which value of the adapter a gradient coordinate is.
#[derive(Debug, Clone, Copy)]
enum Coord {
    Router,
    A,
    B,
}

fn value(a: &mut LoraAdapter, key: (usize, Target), c: Coord, i: usize) -> &mut f32 {
    let p = a.weights.get_mut(&key).unwrap();
    match c {
        Coord::Router => &mut p.router[i],
        Coord::A => &mut p.a[i],
        Coord::B => &mut p.b[i],
    }
}

fn check_gradients(
    base: (Arc<Model>, RefModel),
    experts: Option<LoraExperts>,
    targets: &[Target],
    alpha: f32,
    z: f32,
) {
    let (m, r) = base;
    let a = adapter(&m, experts, targets, 7);
    let b = batch(3);
    let mut tr = trainer(&m, &a, alpha, z, 0.0);
    let stats = tr.step(&b).unwrap();
    let want = reference_loss(&r, &a, &b, alpha as f64, z as f64);
    eprintln!(
        "loss {} (reference {}), aux {} (reference {})",
        stats.loss, want.task, stats.aux_loss, want.aux
    );
    assert!((stats.loss - want.task).abs() < 2e-5 * want.task.abs().max(1.0));
    assert!((stats.aux_loss - want.aux).abs() < 2e-5 * want.aux.abs().max(1e-3));
    let grads = tr.gradients().unwrap();
    let total = |ad: &LoraAdapter| {
        let l = reference_loss(&r, ad, &b, alpha as f64, z as f64);
        l.task + l.aux
    };
    let mut rng = Rng::new(11);
    let h = 1e-4f64;
    let mut worst = 0.0f64;
    let mut checked = 0;
    for &key in a.weights.keys() {
        for (c, pk, n) in [
            (
                Coord::Router,
                ParamKey::Router(key.0, key.1),
                a.weights[&key].router.len(),
            ),
            (
                Coord::A,
                ParamKey::LoraA(key.0, key.1),
                a.weights[&key].a.len(),
            ),
            (
                Coord::B,
                ParamKey::LoraB(key.0, key.1),
                a.weights[&key].b.len(),
            ),
        ] {
            if n == 0 {
                continue; // plain LoRA has no router
            }
            let g = &grads[&pk];
            let scale = g.iter().fold(0.0f32, |s, v| s.max(v.abs())) as f64;
            for _ in 0..3 {
                let i = rng.below(n as u64) as usize;
                let mut ap = a.clone();
                let v = *value(&mut ap, key, c, i) as f64;
                *value(&mut ap, key, c, i) = (v + h) as f32;
                let vp = *value(&mut ap, key, c, i) as f64;
                let lp = total(&ap);
                *value(&mut ap, key, c, i) = (v - h) as f32;
                let vm = *value(&mut ap, key, c, i) as f64;
                let lm = total(&ap);
                let fd = (lp - lm) / (vp - vm);
                let err = (fd - g[i] as f64).abs() / (scale + 1e-6);
                if err > 2e-3 {
                    eprintln!("{key:?} {c:?}[{i}]: ember {} fd {fd} (scale {scale})", g[i]);
                }
                worst = worst.max(err);
                checked += 1;
            }
        }
    }
    eprintln!("{checked} gradient coordinates, worst error {worst:.2e} of each tensor's largest");
    assert!(worst < 5e-3, "gradients vs finite differences: {worst}");
}

#[test]
fn top2_mixture_gradients_match_finite_differences() {
    let e = LoraExperts {
        n_experts: 4,
        top_k: 2,
        renormalize: true,
    };
    check_gradients(tiny(), Some(e), &Target::ALL, 0.05, 0.01);
}

#[test]
fn switch_top1_mixture_gradients_match_finite_differences() {
    let e = LoraExperts {
        n_experts: 3,
        top_k: 1,
        renormalize: false,
    };
    check_gradients(
        tiny(),
        Some(e),
        &[Target::Q, Target::O, Target::Up],
        0.1,
        0.0,
    );
}

/// A frozen Mixture-of-Experts base (Mixtral: softmax top-2, renormalized): the gradient
/// passes through its routed experts and router, for plain LoRA and for a mixture.
#[test]
fn lora_and_mixtures_train_on_a_moe_base() {
    let attn = [Target::Q, Target::K, Target::V, Target::O];
    check_gradients(tiny_of(TinyVariant::Mixtral), None, &attn, 0.0, 0.0);
    let e = LoraExperts {
        n_experts: 3,
        top_k: 2,
        renormalize: true,
    };
    check_gradients(
        tiny_of(TinyVariant::Mixtral),
        Some(e),
        &[Target::Q, Target::O],
        0.05,
        0.01,
    );
    // Quantized experts (dequantized chunk by chunk in the backward). Adapting v and o
    // keeps the reference free of GGUF's q/k row permutation.
    let base = tiny_gguf(TinyVariant::Mixtral, QuantType::Q8_0);
    check_gradients(base, Some(e), &[Target::V, Target::O], 0.05, 0.0);
}

/// OLMoE (q/k norms over all heads, softmax top-k not renormalized) and Qwen3-MoE (per-head
/// q/k norms, renormalized): the gradient also passes through the q/k norms.
#[test]
fn lora_trains_on_bases_with_qk_norms() {
    let all = [Target::Q, Target::K, Target::V, Target::O];
    check_gradients(tiny_of(TinyVariant::Olmoe), None, &all, 0.0, 0.0);
    let e = LoraExperts {
        n_experts: 2,
        top_k: 1,
        renormalize: false,
    };
    check_gradients(tiny_of(TinyVariant::Qwen3Moe), Some(e), &all, 0.05, 0.0);
}

/// Qwen2-MoE: the gradient also passes through its shared expert and that expert's sigmoid
/// gate.
#[test]
fn lora_trains_on_a_base_with_a_shared_expert() {
    let all = [Target::Q, Target::K, Target::V, Target::O];
    check_gradients(tiny_of(TinyVariant::Qwen2Moe), None, &all, 0.0, 0.0);
}

/// What training on a MoE base does not cover is refused by name.
#[test]
fn moe_bases_refuse_what_training_does_not_cover() {
    let (m, _) = tiny_of(TinyVariant::Mixtral);
    let a = adapter(&m, None, &[Target::Q, Target::Up], 1);
    let t = Trainables {
        lora: Some(a),
        ..Default::default()
    };
    let err = Trainer::new(m.clone(), t, TrainConfig::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("up_proj of layer 0"), "{err}");
}

#[test]
fn session_inference_matches_the_reference_and_files_round_trip() {
    let (m, r) = tiny();
    let e = LoraExperts {
        n_experts: 4,
        top_k: 2,
        renormalize: true,
    };
    let a = mixture(&m, e, &Target::ALL, 21);
    let dir = TempDir::new("moe-lora-files");
    a.save(dir.path(), &m).unwrap();
    let cfg = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
    assert!(cfg.contains("EMBER_MOE_LORA"), "{cfg}");
    let back = LoraAdapter::load(dir.path(), &m).unwrap();
    assert_eq!(back.config, a.config);
    assert_eq!(back.weights, a.weights);

    let tokens: Vec<u32> = (0..21).map(|i| (i * 37 + 5) % 256).collect();
    let ex = [Example::all(tokens.clone())];
    let mut s = Session::new(
        m.clone(),
        SessionParams {
            n_ctx: 64,
            n_seq: 1,
            n_batch: 16,
            kv_budget: 0,
        },
    )
    .unwrap();
    let id = s.attach_adapter("mix", Arc::new(back)).unwrap();
    let got = s.logits_with(&tokens, Some((id, 1.0))).unwrap();
    let (want, _) = r.forward_adapted(&tokens, &mut |site: Site<'_>| {
        mixed(&a, site).map(|m| m.delta)
    });
    let want: Vec<f64> = want.into_iter().flatten().collect();
    let d = got
        .iter()
        .zip(&want)
        .fold(0.0f64, |d, (&g, &w)| d.max((g as f64 - w).abs()));
    eprintln!("session logits vs reference: max abs diff {d:.2e}");
    assert!(d < 1e-3, "{d}");
    // The mixture changes the output (it is not the base model).
    let base = s.logits(&tokens).unwrap();
    let moved = base
        .iter()
        .zip(&got)
        .fold(0.0f32, |d, (a, b)| d.max((a - b).abs()));
    assert!(moved > 1e-2, "{moved}");
    // The task loss a trainer evaluates is the reference's.
    let tr = trainer(&m, &a, 0.0, 0.0, 0.0);
    let l = tr.evaluate(&ex).unwrap();
    let want_l = reference_loss(&r, &a, &ex, 0.0, 0.0).task;
    assert!((l - want_l).abs() < 2e-5 * want_l, "{l} vs {want_l}");
}

#[test]
fn mixture_refuses_bad_shapes_and_merging() {
    let (m, _) = tiny();
    let bad = |n_experts, top_k| {
        let config = LoraConfig {
            experts: Some(LoraExperts {
                n_experts,
                top_k,
                renormalize: true,
            }),
            ..LoraConfig::new(2, 4.0, vec![Target::Q])
        };
        LoraAdapter::init(&m.config, config, 0)
            .unwrap_err()
            .to_string()
    };
    assert!(bad(4, 5).contains("top-5"), "{}", bad(4, 5));
    assert!(bad(1, 1).contains("1 experts"));
    assert!(bad(33, 2).contains("33 experts"));
    let e = LoraExperts {
        n_experts: 4,
        top_k: 2,
        renormalize: true,
    };
    let a = mixture(&m, e, &[Target::Q], 1);
    assert!(m.merge_lora(&[(&a, 1.0)]).is_err());
    assert!(LoraAdapter::stack(&[(&a, 1.0), (&a, 0.5)]).is_err());
    // A file whose router is missing or mis-shaped, or whose top-k exceeds its experts.
    let dir = TempDir::new("moe-lora-bad");
    a.save(dir.path(), &m).unwrap();
    let cfg_path = dir.path().join("adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["moe_top_k"] = 9.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = LoraAdapter::load(dir.path(), &m).unwrap_err().to_string();
    assert!(err.contains("top-9"), "{err}");
    // A mixture's config over a plain adapter's tensors (same stacked rank): no router.
    let plain = LoraAdapter::init(&m.config, LoraConfig::new(8, 4.0, vec![Target::Q]), 0).unwrap();
    plain.save(dir.path(), &m).unwrap();
    cfg["moe_top_k"] = 2.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = LoraAdapter::load(dir.path(), &m).unwrap_err().to_string();
    assert!(err.contains("no router"), "{err}");
    let mut no_router = a.clone();
    no_router
        .weights
        .values_mut()
        .for_each(|p| p.router.clear());
    let t = Trainables {
        lora: Some(no_router.clone()),
        ..Default::default()
    };
    let err = Trainer::new(m.clone(), t, TrainConfig::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("does not fit"), "{err}");
    let mut s = Session::new(m.clone(), SessionParams::default()).unwrap();
    assert!(s.attach_adapter("x", Arc::new(no_router)).is_err());
}

/// Trains a top-2 mixture of 4 experts on q, v, up and down for 30 steps with balancing
/// weight `alpha` on four "tasks" (sequences repeating one of four token patterns, which
/// the routers can send to different experts). Returns the loss before and after, the
/// expert share furthest from fair (1 = 1/E of the choices) over 8 more steps, and the
/// trainer.
fn train_mixture(m: &Arc<Model>, alpha: f32) -> (f64, f64, f64, Trainer) {
    let e = LoraExperts {
        n_experts: 4,
        top_k: 2,
        renormalize: true,
    };
    let config = LoraConfig {
        experts: Some(e),
        ..LoraConfig::new(4, 8.0, vec![Target::Q, Target::V, Target::Up, Target::Down])
    };
    let mut a = LoraAdapter::init(&m.config, config, 5).unwrap();
    a.base_identity = Some(m.identity);
    let mut rng = Rng::new(9);
    let data: Vec<Example> = (0..16)
        .map(|i| {
            let pattern: Vec<u32> = (0..4).map(|j| ((i % 4) * 60 + j * 7 + 3) as u32).collect();
            let noise = rng.below(200) as u32 + 20;
            let tokens: Vec<u32> = (0..24)
                .map(|j| if j == 0 { noise } else { pattern[j % 4] })
                .collect();
            Example::all(tokens)
        })
        .collect();
    let mut tr = trainer(m, &a, alpha, 0.001, 1e-2);
    let first = tr.evaluate(&data).unwrap();
    let batch = |step: usize| &data[(step * 4) % 16..(step * 4) % 16 + 4];
    for step in 0..30 {
        let s = tr.step(batch(step)).unwrap();
        assert!(!s.skipped && s.aux_loss > 0.0, "{s:?}");
    }
    let after = tr.evaluate(&data).unwrap();
    tr.reset_expert_load().unwrap();
    for step in 0..8 {
        tr.step(batch(step)).unwrap();
    }
    let load = tr.expert_load().unwrap();
    assert_eq!(load.len(), 4 * m.config.n_layers);
    let mut worst: f64 = 1.0;
    for l in &load {
        let total: u32 = l.counts.iter().sum();
        assert_eq!(total as usize, 8 * 4 * 24 * e.top_k, "{l:?}");
        for &c in &l.counts {
            let share = c as f64 * e.n_experts as f64 / total as f64;
            if (share - 1.0).abs() > (worst - 1.0).abs() {
                worst = share;
            }
        }
    }
    eprintln!("balance weight {alpha}: loss {first:.4} -> {after:.4}, most unbalanced expert {worst:.2} x its fair share");
    (first, after, worst, tr)
}

#[test]
fn training_lowers_the_loss_and_keeps_the_experts_balanced() {
    let (m, _) = tiny();
    let (first, after, worst, tr) = train_mixture(&m, 0.05);
    assert!(after < 0.5 * first, "loss {first} -> {after}");
    // The stated bound: with the balancing loss at 0.05, every adapted layer sends each
    // expert between 2/3 and 3/2 of its fair share of the choices.
    assert!((2.0 / 3.0..=1.5).contains(&worst), "{worst}");
    // Without it the same run is less balanced.
    let (_, after0, worst0, _) = train_mixture(&m, 0.0);
    assert!(after0 < 0.5 * first);
    assert!(
        (worst0 - 1.0).abs() > (worst - 1.0).abs(),
        "{worst0} vs {worst}"
    );
    // The trained mixture saves and loads back.
    let trained = tr.lora().unwrap().unwrap();
    assert!(trained.config.experts.is_some());
    let dir = TempDir::new("moe-lora-trained");
    trained.save(dir.path(), &m).unwrap();
    assert_eq!(
        LoraAdapter::load(dir.path(), &m).unwrap().weights,
        trained.weights
    );
}
