//! Growing Mixture-of-Experts models:
//!
//! - `upcycle_gguf` turns a dense tiny Llama (f32 and Q8_0) into a 4-expert top-2 MoE whose
//!   experts are copies of the dense feed-forward: its logits equal the dense model's at
//!   every position (within float rounding of the renormalized weights) and its greedy
//!   tokens are the same, while its router really spreads tokens over the experts;
//! - `Model::with_expert` adds a fifth expert to a loaded tiny Mixtral (f32 and Q8_0
//!   experts) without reloading: the grown model computes what a file written with that
//!   fifth expert computes, and differs from the original;
//! - bad requests get errors that say what is wrong.

use std::path::Path;
use std::sync::Arc;

use ember::format::gguf::Value;
use ember::model::moe::NewExpert;
use ember::model::upcycle::{upcycle_gguf, UpcycleOptions};
use ember::model::weights::{HostMatrix, HostTensor};
use ember::model::{LoadOptions, Model};
use ember::quant::QuantType;
use ember::session::{SamplerConfig, Session, SessionParams};
use ember_tests::model::{ctx, TempDir};
use ember_tests::reference::max_abs_diff;
use ember_tests::tiny::{write_tiny_gguf, TinyGguf, TinyVariant, HIDDEN, VOCAB};

fn load(path: &Path) -> Arc<Model> {
    Arc::new(
        Model::load(ctx(), path, LoadOptions::default())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
}

fn session(model: &Arc<Model>) -> Session {
    Session::new(
        model.clone(),
        SessionParams {
            n_ctx: 64,
            n_seq: 1,
            n_batch: 256,
            kv_budget: 0,
        },
    )
    .unwrap()
}

const PROMPTS: [&[u32]; 3] = [
    &[7],
    &[72, 101, 108, 108, 111, 44, 32],
    &[
        1, 17, 99, 200, 3, 255, 128, 64, 32, 16, 8, 4, 2, 250, 251, 252, 9,
    ],
];

/// Logits at every position of every prompt, as f64 rows.
fn all_logits(model: &Arc<Model>) -> Vec<Vec<f64>> {
    let mut s = session(model);
    PROMPTS
        .iter()
        .flat_map(|p| {
            s.logits(p)
                .unwrap()
                .chunks(VOCAB)
                .map(|r| r.iter().map(|&x| f64::from(x)).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn greedy(model: &Arc<Model>, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut s = session(model);
    let id = s.add_sequence(SamplerConfig::greedy()).unwrap();
    let mut out = vec![s.prefill(id, prompt).unwrap()];
    while out.len() < n {
        out.push(s.decode(&[id]).unwrap()[0]);
    }
    out
}

fn worst(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| max_abs_diff(x, y))
        .fold(0.0, f64::max)
}

#[test]
fn upcycled_model_computes_the_dense_model() {
    let dir = TempDir::new("upcycle");
    for quant in [None, Some(QuantType::Q8_0)] {
        let label = quant.map_or("f32", |q| q.name());
        let dense_path = dir.join(&format!("dense-{label}.gguf"));
        write_tiny_gguf(&dense_path, TinyVariant::Llama, quant).unwrap();
        let moe_path = dir.join(&format!("moe-{label}.gguf"));
        let opts = UpcycleOptions {
            experts: 4,
            top_k: 2,
            router_std: 0.5,
            seed: 1,
        };
        let r = upcycle_gguf(&dense_path, &moe_path, &opts).unwrap();
        let dense = load(&dense_path);
        let moe = load(&moe_path);
        let mc = moe.config.moe.as_ref().expect("an MoE model");
        assert_eq!((mc.n_experts, mc.top_k), (4, 2));
        assert_eq!(r.dense_params, dense.n_params());
        assert_eq!(
            (r.moe_params, r.active_params),
            (moe.n_params(), moe.n_active_params())
        );
        assert!(r.active_params < r.moe_params);
        let d = worst(&all_logits(&dense), &all_logits(&moe));
        println!("upcycled {label}: max |logit - dense| = {d:.3e}");
        assert!(d < 1e-4, "{label}: upcycled logits differ by {d:e}");
        for p in PROMPTS {
            assert_eq!(greedy(&dense, p, 8), greedy(&moe, p, 8), "{label}");
        }
        // The random router spreads tokens: every expert of every layer gets some.
        let mut s = session(&moe);
        s.logits(PROMPTS[2]).unwrap();
        for (l, c) in s.expert_counts().unwrap().unwrap().iter().enumerate() {
            assert_eq!(c.iter().sum::<u64>(), 2 * PROMPTS[2].len() as u64);
            assert!(c.iter().all(|&n| n > 0), "layer {l} loads {c:?}");
        }
    }
}

#[test]
fn upcycling_refuses_what_it_cannot_do() {
    let dir = TempDir::new("upcycle-bad");
    let src = dir.join("dense.gguf");
    write_tiny_gguf(&src, TinyVariant::Llama, None).unwrap();
    let out = dir.join("out.gguf");
    let bad_k = UpcycleOptions {
        experts: 4,
        top_k: 5,
        ..UpcycleOptions::default()
    };
    let e = upcycle_gguf(&src, &out, &bad_k).unwrap_err().to_string();
    assert!(e.contains("top-k of 5"), "{e}");
    let qwen = dir.join("qwen2.gguf");
    write_tiny_gguf(&qwen, TinyVariant::Qwen2, None).unwrap();
    let e = upcycle_gguf(&qwen, &out, &UpcycleOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs a dense llama or mistral model"), "{e}");
    let mixtral = dir.join("mixtral.gguf");
    write_tiny_gguf(&mixtral, TinyVariant::Mixtral, None).unwrap();
    let e = upcycle_gguf(&mixtral, &out, &UpcycleOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("already MoE"), "{e}");
    assert!(!out.exists(), "nothing is written on refusal");
}

/// Bytes of expert `e` of a stacked `[experts][rows][cols]` tensor.
fn expert_bytes(data: &[u8], experts: usize, e: usize) -> Vec<u8> {
    let per = data.len() / experts;
    data[e * per..(e + 1) * per].to_vec()
}

#[test]
fn an_expert_added_at_runtime_equals_one_in_the_file() {
    let dir = TempDir::new("grow");
    for quant in [None, Some(QuantType::Q8_0)] {
        let label = quant.map_or("f32", |q| q.name());
        let base = TinyGguf::new(TinyVariant::Mixtral, quant).unwrap();
        let base_path = dir.join(&format!("base-{label}.gguf"));
        base.write_to(&base_path).unwrap();
        // The new expert of layer l: expert 2's gate, expert 0's up, expert 1's down, and a
        // router row 1.5 times expert 3's (so tokens do go to it).
        let mut grown = base.clone();
        let mut new = Vec::new();
        for l in 0..2 {
            let t = |name: &str| base.tensors.iter().find(|t| t.name == name).unwrap();
            let part = |what: &str, e: usize, rows: usize, cols: usize| {
                let src = t(&format!("blk.{l}.ffn_{what}_exps.weight"));
                let data = match src.ty {
                    ember::format::gguf::TensorType::Quant(q) => {
                        HostMatrix::Quant(q, expert_bytes(&src.data, 4, e))
                    }
                    _ => HostMatrix::F32(
                        expert_bytes(&src.data, 4, e)
                            .chunks(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                            .collect(),
                    ),
                };
                HostTensor {
                    name: format!("layer {l} new {what}"),
                    source: None,
                    rows,
                    cols,
                    data,
                }
            };
            let ff = ember_tests::tiny::EXPERT_FFN;
            let router = t(&format!("blk.{l}.ffn_gate_inp.weight"));
            let row3: Vec<f32> = router.data[3 * HIDDEN * 4..4 * HIDDEN * 4]
                .chunks(4)
                .map(|b| 1.5 * f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let x = NewExpert {
                router_row: row3.clone(),
                gate: part("gate", 2, ff, HIDDEN),
                up: part("up", 0, ff, HIDDEN),
                down: part("down", 1, HIDDEN, ff),
            };
            // The same expert written into the file.
            for (what, e) in [("gate", 2), ("up", 0), ("down", 1)] {
                let name = format!("blk.{l}.ffn_{what}_exps.weight");
                let g = grown.tensor_mut(&name).unwrap();
                let extra = expert_bytes(&g.data, 4, e);
                g.data.extend(extra);
                g.dims[2] += 1;
            }
            let r = grown
                .tensor_mut(&format!("blk.{l}.ffn_gate_inp.weight"))
                .unwrap();
            r.data.extend(row3.iter().flat_map(|v| v.to_le_bytes()));
            r.dims[1] += 1;
            new.push(x);
        }
        grown.set("llama.expert_count", Value::U32(5));
        let grown_path = dir.join(&format!("grown-{label}.gguf"));
        grown.write_to(&grown_path).unwrap();

        let model = load(&base_path);
        let before = all_logits(&model);
        let added = Arc::new(model.with_expert(&new).unwrap());
        assert_eq!(added.config.moe.as_ref().unwrap().n_experts, 5);
        assert_eq!(model.config.moe.as_ref().unwrap().n_experts, 4);
        let from_file = load(&grown_path);
        let got = all_logits(&added);
        let d = worst(&got, &all_logits(&from_file));
        println!("{label}: runtime-added vs file expert: max |diff| = {d:.3e}");
        assert!(d < 1e-5, "{label}: {d:e}");
        let moved = worst(&got, &before);
        assert!(
            moved > 1e-2,
            "{label}: the new expert changed nothing ({moved:e})"
        );
        // Its load is counted; the original model is untouched.
        let mut s = session(&added);
        s.logits(PROMPTS[2]).unwrap();
        let counts = s.expert_counts().unwrap().unwrap();
        assert!(
            counts.iter().all(|c| c.len() == 5 && c[4] > 0),
            "{counts:?}"
        );
        assert!(worst(&all_logits(&model), &before) == 0.0);

        // Mismatches are refused with the reason.
        let e = model.with_expert(&new[..1]).unwrap_err().to_string();
        assert!(e.contains("1 new experts for 2 layers"), "{e}");
        let mut bad = new.clone();
        bad[1].router_row.pop();
        let e = model.with_expert(&bad).unwrap_err().to_string();
        assert!(e.contains("router row has 63 values"), "{e}");
        let mut bad = new.clone();
        bad[0].down = bad[0].gate.clone();
        let e = model.with_expert(&bad).unwrap_err().to_string();
        assert!(e.contains("layer 0") && e.contains("shape"), "{e}");
        let mut bad = new.clone();
        bad[0].gate.data = match &bad[0].gate.data {
            HostMatrix::Quant(..) => HostMatrix::F32(vec![0.0; 32 * HIDDEN]),
            _ => HostMatrix::F16(vec![0; 32 * HIDDEN]),
        };
        let e = model.with_expert(&bad).unwrap_err().to_string();
        assert!(
            e.contains("different formats") || e.contains("experts are"),
            "{e}"
        );
    }
    let dir2 = TempDir::new("grow-dense");
    let p = dir2.join("dense.gguf");
    write_tiny_gguf(&p, TinyVariant::Llama, None).unwrap();
    let e = load(&p).with_expert(&[]).unwrap_err().to_string();
    assert!(e.contains("not a Mixture-of-Experts model"), "{e}");
}
