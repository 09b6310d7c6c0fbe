//! The float64 CPU reference (`ember_tests::reference`) on the tiny Mixture-of-Experts models
//! (Mixtral, Qwen2-MoE with its shared expert, OLMoE with its q/k norms), no GPU needed:
//!
//! - built from the HF tensors and from the f32 GGUF, it reproduces the transformers float64
//!   fixture (last-position logits, argmax at every position) and the fixture's routing
//!   (experts chosen and their weights, per layer and position);
//! - built from Q8_0 / Q4_0 / Q4_1 GGUFs (experts dequantized from the stacked 3-D tensors) it
//!   loads and stays near the fixture, its experts being exactly the HF experts quantized and
//!   dequantized one by one (so the stacked 3-D tensors are split at the right rows) and its
//!   routers, shared-expert gates and norms the f32 HF values.
//!
//! The measured differences are printed (`cargo test -- --nocapture` shows them).

use std::path::PathBuf;

use ember::quant::QuantType;
use ember_tests::model::TempDir;
use ember_tests::reference::{argmax, max_abs_diff, RefFfn, RefMlp, RefModel, RefRoute};
use ember_tests::tiny::{write_tiny_gguf, TinyVariant, EXPERTS_USED};
use serde_json::Value;

/// The float64 reference against the transformers fixture (both exact math; the fixture's
/// logits are rounded to f32).
const FIXTURE_TOL: f64 = 1e-4;
/// Routing weights against the fixture's (both float64 on the same f32 weights).
const ROUTE_TOL: f64 = 1e-9;

fn fixture(v: TinyVariant) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(v.fixture_path());
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// The worst |logit - fixture| over the prompts' last positions; asserts the argmax at every
/// position.
fn check_prompts(label: &str, r: &RefModel, fx: &Value, tol: f64, exact_argmax: bool) -> f64 {
    let mut worst = 0.0f64;
    for (k, p) in fx["prompts"].as_array().unwrap().iter().enumerate() {
        let logits = r.forward(&ids(&p["ids"]));
        let d = max_abs_diff(logits.last().unwrap(), &floats(&p["logits_last"]));
        assert!(
            d < tol,
            "{label}, prompt {k}: differs from the fixture by {d:e}"
        );
        worst = worst.max(d);
        if exact_argmax {
            let am: Vec<u64> = logits.iter().map(|l| argmax(l) as u64).collect();
            let want: Vec<u64> = p["argmax"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            assert_eq!(am, want, "{label}, prompt {k}: argmax");
        }
    }
    worst
}

/// The worst |weight - fixture| of the routing of the fixture's `routing.ids`; asserts the
/// experts are the fixture's, in its order.
fn check_routing(label: &str, r: &RefModel, fx: &Value) -> f64 {
    let routing = &fx["routing"];
    let (_, routes) = r.forward_routed(&ids(&routing["ids"]));
    let layers = routing["layers"].as_array().unwrap();
    assert_eq!(routes.len(), layers.len(), "{label}: layers");
    let mut worst = 0.0f64;
    for (got, want) in routes.iter().zip(layers) {
        let l = want["layer"].as_u64().unwrap();
        let experts = want["experts"].as_array().unwrap();
        let weights = want["weights"].as_array().unwrap();
        assert_eq!(got.len(), experts.len(), "{label} layer {l}: positions");
        for (
            pos,
            (
                RefRoute {
                    experts: e,
                    weights: w,
                },
                (we, ww),
            ),
        ) in got.iter().zip(experts.iter().zip(weights)).enumerate()
        {
            let we: Vec<usize> = ids(we).into_iter().map(|x| x as usize).collect();
            assert_eq!(e, &we, "{label} layer {l} position {pos}: experts");
            let d = max_abs_diff(w, &floats(ww));
            assert!(
                d < ROUTE_TOL,
                "{label} layer {l} position {pos}: weights differ by {d:e}"
            );
            worst = worst.max(d);
        }
    }
    worst
}

#[test]
fn moe_reference_reproduces_transformers() {
    for v in TinyVariant::MOE {
        let fx = fixture(v);
        let dir = TempDir::new(v.name());
        let path = dir.0.join("tiny-f32.gguf");
        write_tiny_gguf(&path, v, None).unwrap();
        let models = [
            ("hf", RefModel::from_tiny_hf(v)),
            ("gguf f32", RefModel::from_gguf(&path).unwrap()),
        ];
        for (what, r) in &models {
            let label = format!("{} reference on {what}", v.name());
            let worst = check_prompts(&label, r, &fx, FIXTURE_TOL, true);
            let route = if fx.get("routing").is_some() {
                check_routing(&label, r, &fx)
            } else {
                f64::NAN
            };
            println!(
                "{label}: max |logit - transformers| = {worst:.3e}, \
                 max |route weight - transformers| = {route:.3e}"
            );
        }
        // Both builds compute the same thing (up to the GGUF Mixtral's permuted q/k rows).
        let p = ids(&fx["prompts"][2]["ids"]);
        let (a, b) = (models[0].1.forward(&p), models[1].1.forward(&p));
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| max_abs_diff(x, y))
            .fold(0.0, f64::max);
        assert!(d < 1e-9, "{}: hf and gguf f32 differ by {d:e}", v.name());
    }
}

#[test]
fn moe_reference_loads_quantized_gguf() {
    // Sanity bounds against the fixture (measured worst: Q8_0 0.17, Q4_0 2.1, Q4_1 3.6).
    // Rounding the weights moves the logits a little, and may flip a close routing decision,
    // which moves that position's logits by up to about 1: no exact argmax here.
    for (q, tol) in [
        (QuantType::Q8_0, 1.5),
        (QuantType::Q4_0, 4.0),
        (QuantType::Q4_1, 6.0),
    ] {
        for v in TinyVariant::MOE {
            let fx = fixture(v);
            let dir = TempDir::new(&format!("{}-{}", v.name(), q.name()));
            let path = dir.0.join("tiny.gguf");
            write_tiny_gguf(&path, v, Some(q)).unwrap();
            let r = RefModel::from_gguf(&path).unwrap();
            let label = format!("{} reference on gguf {}", v.name(), q.name());
            let worst = check_prompts(&label, &r, &fx, tol, false);
            let p = ids(&fx["prompts"][1]["ids"]);
            let (_, routes) = r.forward_routed(&p);
            assert!(
                routes.iter().all(
                    |l| l.len() == p.len() && l.iter().all(|r| r.experts.len() == EXPERTS_USED)
                ),
                "{label}: {routes:?}"
            );
            println!("{label}: max |logit - transformers| = {worst:.3e}");
        }
    }
}

#[test]
fn quantized_gguf_experts_are_the_hf_experts_rounded() {
    let round = |q: QuantType, w: &[f64]| -> Vec<f64> {
        let x: Vec<f32> = w.iter().map(|&v| v as f32).collect();
        let bytes = ember_tests::quantize::quantize(q, &x).unwrap();
        ember::quant::dequantize(q, &bytes)
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    };
    for q in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1] {
        for v in TinyVariant::MOE {
            let dir = TempDir::new(&format!("rounded-{}-{}", v.name(), q.name()));
            let path = dir.0.join("tiny.gguf");
            write_tiny_gguf(&path, v, Some(q)).unwrap();
            let g = RefModel::from_gguf(&path).unwrap();
            let h = RefModel::from_tiny_hf(v);
            let label = format!("{} gguf {}", v.name(), q.name());
            for (i, (lg, lh)) in g.layers.iter().zip(&h.layers).enumerate() {
                assert_eq!(lg.qk_norm, lh.qk_norm, "{label} layer {i}: q/k norms");
                assert_eq!(lg.bias, lh.bias, "{label} layer {i}: biases");
                let (RefFfn::Moe(mg), RefFfn::Moe(mh)) = (&lg.ffn, &lh.ffn) else {
                    panic!("{label} layer {i}: not a MoE layer");
                };
                assert_eq!(mg.router, mh.router, "{label} layer {i}: router");
                assert_eq!((mg.top_k, mg.renormalize), (mh.top_k, mh.renormalize));
                assert_eq!(mg.shared_gate, mh.shared_gate, "{label} layer {i}");
                assert_eq!(mg.experts.len(), mh.experts.len(), "{label} layer {i}");
                let rounded = |m: &RefMlp| RefMlp {
                    gate: round(q, &m.gate),
                    up: round(q, &m.up),
                    down: round(q, &m.down),
                };
                for (e, (xg, xh)) in mg.experts.iter().zip(&mh.experts).enumerate() {
                    let want = rounded(xh);
                    assert!(
                        xg.gate == want.gate && xg.up == want.up && xg.down == want.down,
                        "{label} layer {i} expert {e}"
                    );
                }
                match (&mg.shared, &mh.shared) {
                    (None, None) => {}
                    (Some(sg), Some(sh)) => {
                        // The 48-wide down projection is no whole number of blocks: f32.
                        assert!(sg.gate == round(q, &sh.gate) && sg.up == round(q, &sh.up));
                        assert_eq!(sg.down, sh.down, "{label} layer {i}: shared down");
                    }
                    _ => panic!("{label} layer {i}: shared expert mismatch"),
                }
            }
        }
    }
}
