//! End-to-end numerics of the tiny random models on the GPU (lavapipe in CI):
//!
//! - the HF safetensors checkpoint and the f32 GGUF that llama.cpp's converter would write
//!   from it (q/k rows permuted for Llama) both reproduce the transformers float64 fixture:
//!   last-position logits, the argmax at every position and the greedy continuation; so the
//!   permutation and both RoPE modes (rotate-half for HF and GGUF Qwen2, adjacent pairs for
//!   GGUF Llama) are right;
//! - Q8_0 / Q4_0 / Q4_1 GGUFs match a float64 CPU forward pass on the dequantized weights
//!   (`ember_tests::reference`), which itself reproduces the fixture from the f32 GGUF;
//! - sequences decoded together in one batch (joining and leaving at different steps)
//!   produce exactly the tokens each produces alone, greedy and seeded-sampled, for dense
//!   and Mixture-of-Experts models.
//!
//! The Mixture-of-Experts models (Mixtral, Qwen2-MoE with its shared expert, OLMoE with its
//! q/k norms) take the same checks as the dense ones.
//!
//! The measured differences are printed (`cargo test -- --nocapture` shows them).

use std::path::Path;
use std::sync::Arc;

use ember::kernels::Variant;
use ember::model::{LoadOptions, Model};
use ember::quant::QuantType;
use ember::session::{SamplerConfig, SeqId, Session, SessionParams};
use ember_tests::model::{ctx, TempDir};
use ember_tests::reference::{argmax, max_abs_diff, RefModel};
use ember_tests::tiny::{byte_char, write_tiny_gguf, write_tiny_model, TinyVariant, VOCAB};

/// Ember's logits against the transformers fixture.
const FIXTURE_TOL: f64 = 1e-3;
/// Ember's logits against the float64 reference on the same (dequantized) weights.
const REFERENCE_TOL: f64 = 1e-3;
/// The float64 reference against the transformers fixture (both exact math; the fixture's
/// logits are rounded to f32).
const REFERENCE_FIXTURE_TOL: f64 = 1e-4;

struct Prompt {
    ids: Vec<u32>,
    logits_last: Vec<f64>,
    argmax: Vec<usize>,
    greedy: Vec<u32>,
}

fn fixture(v: TinyVariant) -> Vec<Prompt> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(v.fixture_path());
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let fx: serde_json::Value = serde_json::from_str(&s).unwrap();
    let nums = |x: &serde_json::Value| -> Vec<f64> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_f64().unwrap())
            .collect()
    };
    fx["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Prompt {
            ids: nums(&p["ids"]).iter().map(|&x| x as u32).collect(),
            logits_last: nums(&p["logits_last"]),
            argmax: nums(&p["argmax"]).iter().map(|&x| x as usize).collect(),
            greedy: nums(&p["greedy"]).iter().map(|&x| x as u32).collect(),
        })
        .collect()
}

fn load(path: &Path) -> Arc<Model> {
    load_variant(path, Variant::Auto)
}

fn load_variant(path: &Path, variant: Variant) -> Arc<Model> {
    let opts = LoadOptions {
        variant,
        ..LoadOptions::default()
    };
    let m = Model::load(ctx(), path, opts).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Arc::new(m)
}

fn session(model: &Arc<Model>, n_seq: usize, n_batch: usize) -> Session {
    Session::new(
        model.clone(),
        SessionParams {
            n_ctx: 64,
            n_seq,
            n_batch,
            kv_budget: 0,
        },
    )
    .unwrap()
}

/// Ember's logits for `ids`, `[ids.len()][vocab]` as f64.
fn ember_logits(s: &mut Session, ids: &[u32]) -> Vec<Vec<f64>> {
    let flat = s.logits(ids).unwrap();
    assert_eq!(flat.len(), ids.len() * VOCAB);
    flat.chunks(VOCAB)
        .map(|r| r.iter().map(|&x| f64::from(x)).collect())
        .collect()
}

/// Greedy continuation: prefill, then `n - 1` decode steps.
fn greedy(s: &mut Session, prompt: &[u32], n: usize) -> Vec<u32> {
    let id = s.add_sequence(SamplerConfig::greedy()).unwrap();
    let mut out = vec![s.prefill(id, prompt).unwrap()];
    while out.len() < n {
        out.push(s.decode(&[id]).unwrap()[0]);
    }
    s.remove_sequence(id).unwrap();
    out
}

/// Checks a loaded model against the transformers fixture (logits at the last position,
/// argmax at every position, greedy tokens); returns the largest logit difference.
fn check_fixture(model: &Arc<Model>, v: TinyVariant, label: &str, n_batch: usize) -> f64 {
    let mut s = session(model, 1, n_batch);
    let mut worst = 0.0f64;
    for (k, p) in fixture(v).iter().enumerate() {
        let logits = ember_logits(&mut s, &p.ids);
        let last = logits.last().unwrap();
        let d = max_abs_diff(last, &p.logits_last);
        assert!(
            d < FIXTURE_TOL,
            "{label} prompt {k}: last-position logits differ from transformers by {d:e}"
        );
        worst = worst.max(d);
        let am: Vec<usize> = logits.iter().map(|r| argmax(r)).collect();
        assert_eq!(am, p.argmax, "{label} prompt {k}: argmax per position");
        let g = greedy(&mut s, &p.ids, p.greedy.len());
        assert_eq!(g, p.greedy, "{label} prompt {k}: greedy continuation");
    }
    worst
}

#[test]
fn hf_safetensors_matches_transformers() {
    for v in TinyVariant::ALL {
        let dir = TempDir::new(v.name());
        write_tiny_model(dir.path(), v).unwrap();
        let model = load(dir.path());
        assert_eq!(model.source.format, "safetensors");
        // One prefill chunk, and 7-token chunks (the 33-token prompt takes five).
        for n_batch in [256, 7] {
            let label = format!("{} safetensors n_batch={n_batch}", v.name());
            let d = check_fixture(&model, v, &label, n_batch);
            println!("{label}: max |logit - transformers| = {d:.3e}");
        }
    }
}

#[test]
fn f32_gguf_matches_transformers() {
    for v in TinyVariant::ALL {
        let dir = TempDir::new(v.name());
        let path = dir.path().join("tiny-f32.gguf");
        write_tiny_gguf(&path, v, None).unwrap();
        // Every kernel variant the device runs (subgroup and workgroup-memory ones).
        for variant in Variant::all(ctx()) {
            let model = load_variant(&path, variant);
            assert_eq!(model.source.format, "gguf");
            assert_eq!(model.config.tied_embeddings, v.tied());
            assert_eq!(model.config.qkv_bias, v.qkv_bias());
            assert_eq!(model.config.moe.is_some(), v.is_moe());
            let label = format!("{} gguf f32 {variant:?}", v.name());
            let d = check_fixture(&model, v, &label, 256);
            println!("{label}: max |logit - transformers| = {d:.3e}");
        }
    }
}

/// Without the converter's q/k permutation a GGUF Llama is a different model: the parity
/// above is not an accident of the test data.
#[test]
fn unpermuted_llama_gguf_differs() {
    use ember_tests::tiny::TinyGguf;
    let dir = TempDir::new("unpermuted");
    let path = dir.path().join("tiny.gguf");
    let mut g = TinyGguf::new(TinyVariant::Llama, None).unwrap();
    // Undo the permutation by writing the HF rows as they are.
    for (hf, _, values) in ember_tests::tiny::tiny_tensors(TinyVariant::Llama) {
        if hf.ends_with("q_proj.weight") || hf.ends_with("k_proj.weight") {
            let name = ember_tests::tiny::gguf_name(&hf).unwrap();
            g.tensor_mut(&name).unwrap().data =
                values.iter().flat_map(|x| x.to_le_bytes()).collect();
        }
    }
    g.write_to(&path).unwrap();
    let model = load(&path);
    let mut s = session(&model, 1, 256);
    let p = &fixture(TinyVariant::Llama)[2];
    let logits = ember_logits(&mut s, &p.ids);
    let d = max_abs_diff(logits.last().unwrap(), &p.logits_last);
    assert!(d > 1e-2, "unpermuted q/k still match ({d:e})");
}

#[test]
fn reference_reproduces_transformers() {
    for v in TinyVariant::ALL {
        let dir = TempDir::new(v.name());
        let path = dir.path().join("tiny-f32.gguf");
        write_tiny_gguf(&path, v, None).unwrap();
        let models = [
            ("gguf f32", RefModel::from_gguf(&path).unwrap()),
            ("hf", RefModel::from_tiny_hf(v)),
        ];
        for (what, r) in &models {
            let mut worst = 0.0f64;
            for (k, p) in fixture(v).iter().enumerate() {
                let logits = r.forward(&p.ids);
                let d = max_abs_diff(logits.last().unwrap(), &p.logits_last);
                assert!(
                    d < REFERENCE_FIXTURE_TOL,
                    "{} reference on {what}, prompt {k}: differs from transformers by {d:e}",
                    v.name()
                );
                worst = worst.max(d);
                let am: Vec<usize> = logits.iter().map(|r| argmax(r)).collect();
                assert_eq!(am, p.argmax, "{} reference on {what}, prompt {k}", v.name());
            }
            println!(
                "{} f64 reference on {what}: max |logit - transformers| = {worst:.3e}",
                v.name()
            );
        }
    }
}

fn check_quantized(q: QuantType) {
    for v in TinyVariant::ALL {
        let dir = TempDir::new(v.name());
        let path = dir.path().join(format!("tiny-{}.gguf", q.name()));
        write_tiny_gguf(&path, v, Some(q)).unwrap();
        let reference = RefModel::from_gguf(&path).unwrap();
        for variant in Variant::all(ctx()) {
            check_quantized_variant(q, v, &path, &reference, variant);
        }
    }
}

fn check_quantized_variant(
    q: QuantType,
    v: TinyVariant,
    path: &Path,
    reference: &RefModel,
    variant: Variant,
) {
    let model = load_variant(path, variant);
    assert!(
        model.source.weight_formats.contains(q.name()),
        "{}",
        model.source.weight_formats
    );
    let mut s = session(&model, 1, 256);
    let label = format!("{} gguf {} {variant:?}", v.name(), q.name());
    let mut worst = 0.0f64;
    let mut worst_fixture = 0.0f64;
    for (k, p) in fixture(v).iter().enumerate() {
        let got = ember_logits(&mut s, &p.ids);
        let want = reference.forward(&p.ids);
        for (pos, (g, w)) in got.iter().zip(&want).enumerate() {
            let d = max_abs_diff(g, w);
            assert!(
                d < REFERENCE_TOL,
                "{label} prompt {k} position {pos}: differs from the f64 reference by {d:e}"
            );
            worst = worst.max(d);
        }
        // Greedy decoding follows the reference's argmax chain.
        let mut ids = p.ids.clone();
        let mut want_tokens = Vec::new();
        for _ in 0..4 {
            let t = argmax(reference.forward(&ids).last().unwrap()) as u32;
            want_tokens.push(t);
            ids.push(t);
        }
        assert_eq!(greedy(&mut s, &p.ids, 4), want_tokens, "{label} prompt {k}");
        worst_fixture = worst_fixture.max(max_abs_diff(got.last().unwrap(), &p.logits_last));
    }
    // Chunked prefill (5-token chunks) through the quantized matmuls.
    let p = fixture(v).pop().unwrap();
    let got = ember_logits(&mut session(&model, 1, 5), &p.ids);
    for (pos, (g, w)) in got.iter().zip(reference.forward(&p.ids)).enumerate() {
        let d = max_abs_diff(g, &w);
        assert!(
            d < REFERENCE_TOL,
            "{label} n_batch=5 position {pos}: differs from the f64 reference by {d:e}"
        );
        worst = worst.max(d);
    }
    println!(
        "{label}: max |logit - f64 reference| = {worst:.3e} (all positions); \
         quantization moves the last logits by up to {worst_fixture:.3e}"
    );
}

#[test]
fn q8_0_gguf_matches_reference() {
    check_quantized(QuantType::Q8_0);
}

#[test]
fn q4_0_gguf_matches_reference() {
    check_quantized(QuantType::Q4_0);
}

#[test]
fn q4_1_gguf_matches_reference() {
    check_quantized(QuantType::Q4_1);
}

#[test]
fn gguf_vocabulary_is_byte_level() {
    let dir = TempDir::new("vocab");
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, TinyVariant::Qwen2, None).unwrap();
    let model = load(&path);
    let tok = &model.tokenizer;
    assert_eq!(tok.vocab_size(), VOCAB);
    assert_eq!((tok.bos(), tok.eos()), (None, None));
    for b in 0..=255u8 {
        assert_eq!(
            tok.token_to_id(&byte_char(b).to_string()),
            Some(u32::from(b))
        );
    }
    let text = "Hello, wörld!\n  tabs\tand 🔥 bytes";
    let ids = tok.encode(text, true, false).unwrap();
    assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>());
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
}

/// What one sequence does in the batched run: its prompt, sampler, the decode step it
/// joins at (prefilled just before that step) and how many tokens it makes in all.
struct Plan {
    prompt: Vec<u32>,
    sampler: SamplerConfig,
    join: usize,
    tokens: usize,
}

/// Runs each plan alone, then all together in one session of 3 sequences, and compares.
fn batch_matches_alone(model: &Arc<Model>, plans: &[Plan], label: &str) {
    let alone: Vec<Vec<u32>> = plans
        .iter()
        .map(|p| {
            let mut s = session(model, 1, 256);
            let id = s.add_sequence(p.sampler).unwrap();
            let mut out = vec![s.prefill(id, &p.prompt).unwrap()];
            while out.len() < p.tokens {
                out.push(s.decode(&[id]).unwrap()[0]);
            }
            out
        })
        .collect();

    let mut s = session(model, 3, 256);
    let mut ids: Vec<Option<SeqId>> = vec![None; plans.len()];
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); plans.len()];
    let mut max_batch = 0;
    for step in 0.. {
        // Leave when done (freeing the slot for a later sequence), join when due.
        for (k, p) in plans.iter().enumerate() {
            if let Some(id) = ids[k] {
                if got[k].len() == p.tokens {
                    s.remove_sequence(id).unwrap();
                    ids[k] = None;
                }
            }
        }
        for (k, p) in plans.iter().enumerate() {
            if p.join == step {
                let id = s.add_sequence(p.sampler).unwrap();
                got[k].push(s.prefill(id, &p.prompt).unwrap());
                ids[k] = Some(id);
            }
        }
        // Decode the active sequences that still need tokens, in a shuffled order.
        let mut batch: Vec<(usize, SeqId)> = ids
            .iter()
            .enumerate()
            .filter_map(|(k, id)| {
                id.filter(|_| got[k].len() < plans[k].tokens)
                    .map(|i| (k, i))
            })
            .collect();
        if batch.is_empty() && plans.iter().all(|p| p.join <= step) {
            break;
        }
        let r = step % batch.len().max(1);
        batch.rotate_left(r);
        let seq_ids: Vec<SeqId> = batch.iter().map(|&(_, id)| id).collect();
        let out = s.decode(&seq_ids).unwrap();
        max_batch = max_batch.max(batch.len());
        for (&(k, _), t) in batch.iter().zip(out) {
            got[k].push(t);
        }
    }
    assert_eq!(max_batch, 3, "{label}: the plans never filled the batch");
    for (k, (g, a)) in got.iter().zip(&alone).enumerate() {
        assert_eq!(g, a, "{label}: sequence {k} batched vs alone");
    }
    println!("{label}: {} sequences, batched == alone", plans.len());
}

fn plans(sampler: impl Fn(u64) -> SamplerConfig) -> Vec<Plan> {
    vec![
        // Starts at once, runs longest.
        Plan {
            prompt: vec![72, 101, 108, 108, 111],
            sampler: sampler(0),
            join: 0,
            tokens: 12,
        },
        // Starts at once with a long prompt, leaves early.
        Plan {
            prompt: (0..23).map(|i| (i * 37 + 11) % 256).collect(),
            sampler: sampler(1),
            join: 0,
            tokens: 4,
        },
        // Joins after 2 steps with a one-token prompt.
        Plan {
            prompt: vec![200],
            sampler: sampler(2),
            join: 2,
            tokens: 9,
        },
        // Joins later, in the slot the early leaver freed.
        Plan {
            prompt: vec![1, 2, 3, 250, 9, 9, 9, 40],
            sampler: sampler(3),
            join: 5,
            tokens: 6,
        },
    ]
}

#[test]
fn batched_decode_matches_alone_greedy() {
    let dir = TempDir::new("batch-greedy");
    write_tiny_model(dir.path(), TinyVariant::Llama).unwrap();
    let model = load(dir.path());
    batch_matches_alone(
        &model,
        &plans(|_| SamplerConfig::greedy()),
        "llama safetensors greedy",
    );
    let path = dir.path().join("tiny-q4_1.gguf");
    write_tiny_gguf(&path, TinyVariant::Qwen2, Some(QuantType::Q4_1)).unwrap();
    let model = load(&path);
    batch_matches_alone(
        &model,
        &plans(|_| SamplerConfig::greedy()),
        "qwen2 gguf Q4_1 greedy",
    );
}

/// Mixture-of-Experts models in a batch: each token is routed on its own, so a sequence's
/// experts (and tokens) do not depend on what else is in the batch.
#[test]
fn batched_moe_decode_matches_alone() {
    let dir = TempDir::new("batch-moe");
    write_tiny_model(dir.path(), TinyVariant::Qwen2Moe).unwrap();
    let model = load(dir.path());
    batch_matches_alone(
        &model,
        &plans(|_| SamplerConfig::greedy()),
        "qwen2_moe safetensors greedy",
    );
    let path = dir.path().join("tiny-mixtral-q4_1.gguf");
    write_tiny_gguf(&path, TinyVariant::Mixtral, Some(QuantType::Q4_1)).unwrap();
    let model = load(&path);
    assert!(model.source.weight_formats.contains("Q4_1"));
    let sampled = |k: u64| SamplerConfig {
        temperature: 0.9,
        top_k: 20,
        seed: 3 + k,
        ..SamplerConfig::default()
    };
    batch_matches_alone(&model, &plans(sampled), "mixtral gguf Q4_1 sampled");
}

#[test]
fn batched_decode_matches_alone_sampled() {
    let sampled = |k: u64| SamplerConfig {
        temperature: 0.9,
        top_k: 20,
        seed: 7 + k,
        ..SamplerConfig::default()
    };
    let dir = TempDir::new("batch-sampled");
    write_tiny_model(dir.path(), TinyVariant::Llama).unwrap();
    let model = load(dir.path());
    batch_matches_alone(&model, &plans(sampled), "llama safetensors sampled");
    // The same seed twice gives the same tokens; another seed, other tokens.
    let run = |seed: u64| {
        let mut s = session(&model, 1, 256);
        let id = s
            .add_sequence(SamplerConfig { seed, ..sampled(0) })
            .unwrap();
        let mut out = vec![s.prefill(id, &[72, 101, 108, 108, 111]).unwrap()];
        for _ in 0..11 {
            out.push(s.decode(&[id]).unwrap()[0]);
        }
        out
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
    let path = dir.path().join("tiny-q8_0.gguf");
    write_tiny_gguf(&path, TinyVariant::LlamaTied, Some(QuantType::Q8_0)).unwrap();
    let model = load(&path);
    batch_matches_alone(&model, &plans(sampled), "tied gguf Q8_0 sampled");
}

/// The expert loads a session counts are the routing transformers chose (the fixture's
/// `routing`: every layer's top-k for each token of a 7-token prompt); resetting zeroes
/// them; dense models have none.
#[test]
fn expert_counts_match_transformers_routing() {
    for v in TinyVariant::MOE {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(v.fixture_path());
        let fx: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let r = &fx["routing"];
        let ids: Vec<u32> = r["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let want: Vec<Vec<u64>> = r["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                let mut c = vec![0u64; ember_tests::tiny::EXPERTS];
                for tok in l["experts"].as_array().unwrap() {
                    for e in tok.as_array().unwrap() {
                        c[e.as_u64().unwrap() as usize] += 1;
                    }
                }
                c
            })
            .collect();
        let dir = TempDir::new(v.name());
        write_tiny_model(dir.path(), v).unwrap();
        let model = load(dir.path());
        let mut s = session(&model, 1, 256);
        assert_eq!(s.expert_counts().unwrap().unwrap(), vec![vec![0; 4]; 2]);
        ember_logits(&mut s, &ids);
        assert_eq!(s.expert_counts().unwrap().unwrap(), want, "{}", v.name());
        s.reset_expert_counts().unwrap();
        assert_eq!(s.expert_counts().unwrap().unwrap(), vec![vec![0; 4]; 2]);
    }
    let dir = TempDir::new("dense-counts");
    write_tiny_model(dir.path(), TinyVariant::Llama).unwrap();
    let s = session(&load(dir.path()), 1, 256);
    assert_eq!(s.expert_counts().unwrap(), None);
}

/// The browser's path: a GGUF handed over as bytes loads the same model as its file, and the
/// async generation (which the web page awaits token by token) produces the blocking one's
/// tokens, which equal the transformers fixture's greedy continuation.
#[test]
fn a_gguf_in_memory_loads_and_generates_as_its_file() {
    use ember::session::GenerateOptions;
    let v = TinyVariant::Llama;
    let dir = TempDir::new("from-bytes");
    let path = dir.path().join("tiny-q8.gguf");
    write_tiny_gguf(&path, v, Some(QuantType::Q8_0)).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let from_file = load_variant(&path, Variant::Auto);
    let from_mem = Arc::new(
        Model::from_gguf_bytes(ctx(), bytes.clone(), "tiny-q8.gguf", LoadOptions::default())
            .unwrap(),
    );
    assert_eq!(from_file.identity, from_mem.identity);
    assert_eq!(from_file.config.name, from_mem.config.name);

    let greedy = |sampler: SamplerConfig| GenerateOptions {
        sampler,
        max_tokens: 8,
        ..GenerateOptions::default()
    };
    let p = &fixture(v)[0];
    let blocking = session(&from_file, 1, 64)
        .generate(&p.ids, greedy(SamplerConfig::greedy()))
        .unwrap();
    let mut streamed = Vec::new();
    let mut on_token = |t: u32, _: &str| {
        streamed.push(t);
        true
    };
    let awaited = pollster::block_on(session(&from_mem, 1, 64).generate_async(
        &p.ids,
        GenerateOptions {
            on_token: Some(&mut on_token),
            ..greedy(SamplerConfig::greedy())
        },
    ))
    .unwrap();
    assert_eq!(awaited.tokens, blocking.tokens);
    assert_eq!(&streamed[..awaited.tokens.len()], &awaited.tokens[..]);
    let n = blocking.tokens.len().min(p.greedy.len());
    assert!(n > 0);
    assert_eq!(&blocking.tokens[..n], &p.greedy[..n]);

    // A cut buffer is refused with the name the caller gave.
    let err = Model::from_gguf_bytes(
        ctx(),
        bytes[..1000].to_vec(),
        "cut.gguf",
        LoadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("cut.gguf: "), "{err}");
}
