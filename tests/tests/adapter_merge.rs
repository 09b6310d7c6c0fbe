//! Adapter merging (issue 8): task arithmetic, magnitude pruning and TIES against PEFT's own
//! merge functions (`scripts/ref/merge_fixture.py`, fixture `tests/fixtures/lora/merge.json`),
//! DARE's drop-and-rescale by its properties, and refusals.

use std::collections::BTreeMap;

use ember::adapters::lora::{LoraExperts, LoraPair};
use ember::adapters::{LoraAdapter, LoraConfig, Target};
use ember::learn::merge::{magnitude_prune, random_prune};
use ember::learn::{merge_adapters, MergeMethod};
use ember::util::Rng;
use ember_tests::model::fixture;

fn floats(v: &serde_json::Value) -> Vec<f32> {
    let flat = |x: &serde_json::Value| -> Vec<f32> {
        match x.as_array() {
            Some(a) => a
                .iter()
                .flat_map(|y| match y.as_array() {
                    Some(r) => r
                        .iter()
                        .map(|z| z.as_f64().unwrap() as f32)
                        .collect::<Vec<_>>(),
                    None => vec![y.as_f64().unwrap() as f32],
                })
                .collect(),
            None => vec![],
        }
    };
    flat(v)
}

fn adapters() -> (Vec<LoraAdapter>, Vec<f32>, serde_json::Value) {
    let f = fixture("lora/merge.json");
    let rank = f["rank"].as_u64().unwrap() as usize;
    let ads = f["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ad| {
            let mut weights = BTreeMap::new();
            weights.insert(
                (0, Target::Q),
                LoraPair {
                    a: floats(&ad["a"]),
                    b: floats(&ad["b"]),
                    router: Vec::new(),
                },
            );
            LoraAdapter {
                config: LoraConfig::new(
                    rank,
                    ad["alpha"].as_f64().unwrap() as f32,
                    vec![Target::Q],
                ),
                weights,
                base_identity: Some(7),
                base_name: "tiny".into(),
            }
        })
        .collect();
    let w = floats(&f["weights"]);
    (ads, w, f)
}

fn merged(method: MergeMethod) -> LoraPair {
    let (ads, w, _) = adapters();
    let parts: Vec<(&LoraAdapter, f32)> = ads.iter().zip(w).collect();
    let m = merge_adapters(&parts, method).unwrap();
    assert_eq!((m.config.rank, m.config.scale()), (4, 1.0));
    m.weights[&(0, Target::Q)].clone()
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

#[test]
fn linear_magnitude_prune_and_ties_match_peft() {
    let (_, _, f) = adapters();
    for (name, method) in [
        ("linear", MergeMethod::Linear),
        (
            "magnitude_prune",
            MergeMethod::MagnitudePrune { density: 0.5 },
        ),
        ("ties", MergeMethod::Ties { density: 0.5 }),
    ] {
        let p = merged(method);
        close(&format!("{name} A"), &p.a, &floats(&f[name]["a"]));
        close(&format!("{name} B"), &p.b, &floats(&f[name]["b"]));
    }
}

#[test]
fn dare_drops_rescales_and_is_linear_in_expectation() {
    let t: Vec<f32> = (0..4000)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 10.0)
        .collect();
    let mut rng = Rng::new(3);
    let p = random_prune(&t, 0.25, &mut rng);
    let kept = p.iter().filter(|&&v| v != 0.0).count() as f64
        / t.iter().filter(|&&v| v != 0.0).count() as f64;
    assert!((kept - 0.25).abs() < 0.03, "kept {kept}");
    for (a, b) in t.iter().zip(&p) {
        assert!(*b == 0.0 || (b - a * 4.0).abs() < 1e-5);
    }
    // Density 1 keeps everything: DARE is then task arithmetic.
    assert_eq!(
        merged(MergeMethod::DareLinear {
            density: 1.0,
            seed: 1
        }),
        merged(MergeMethod::Linear)
    );
    // The same seed gives the same merge; averaged over seeds it approaches the linear one.
    let d = |seed| merged(MergeMethod::DareLinear { density: 0.5, seed });
    assert_eq!(d(5), d(5));
    assert_ne!(d(5), d(6));
    let lin = merged(MergeMethod::Linear);
    let n = 400;
    let mut mean = vec![0.0f64; lin.a.len()];
    for s in 0..n {
        for (m, v) in mean.iter_mut().zip(&d(s).a) {
            *m += *v as f64 / n as f64;
        }
    }
    let scale = lin.a.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
    let worst = mean
        .iter()
        .zip(&lin.a)
        .fold(0.0f64, |w, (m, l)| w.max((m - *l as f64).abs()));
    assert!(worst < 0.2 * scale, "{worst} of {scale}");
    // Magnitude pruning keeps exactly floor(density * n) values.
    assert_eq!(
        magnitude_prune(&t, 0.3)
            .iter()
            .filter(|&&v| v != 0.0)
            .count(),
        1200
    );
}

#[test]
fn merging_refuses_mixed_ranks_mixtures_and_bases() {
    let (ads, _, _) = adapters();
    let mut other = ads[1].clone();
    other.config.rank = 2;
    let err = merge_adapters(&[(&ads[0], 1.0), (&other, 1.0)], MergeMethod::Linear).unwrap_err();
    assert!(err.to_string().contains("rank"), "{err}");
    let mut mix = ads[1].clone();
    mix.config.experts = Some(LoraExperts {
        n_experts: 2,
        top_k: 1,
        renormalize: false,
    });
    assert!(merge_adapters(&[(&ads[0], 1.0), (&mix, 1.0)], MergeMethod::Linear).is_err());
    let mut foreign = ads[1].clone();
    foreign.base_identity = Some(8);
    assert!(merge_adapters(&[(&ads[0], 1.0), (&foreign, 1.0)], MergeMethod::Linear).is_err());
    assert!(MergeMethod::parse("ties", 0.0, 0).is_err());
    assert!(MergeMethod::parse("svd", 0.5, 0).is_err());
    assert_eq!(
        MergeMethod::parse("dare-ties", 0.5, 3).unwrap(),
        MergeMethod::DareTies {
            density: 0.5,
            seed: 3
        }
    );
}
