//! SmolLM2-135M-Instruct Q4_1 end to end: perplexity against exact math and llama.cpp,
//! greedy generation against the committed lavapipe run (the cross-driver check), batching,
//! seeded sampling, the allocation-free decode loop, context overflow, and the GGUF path
//! against the same weights exported as f32 safetensors.

use std::sync::Arc;

use ember::model::{LoadOptions, Model};
use ember::session::{SamplerConfig, Session, SessionParams};
use ember::Context;
use ember_tests::model::{fixture, fixture_path, temp_dir, test_model, text};

fn load(path: &std::path::Path) -> (Context, Arc<Model>) {
    let ctx = Context::new().expect("GPU adapter");
    let m = Model::load(&ctx, path, LoadOptions::default()).expect("load model");
    (ctx, Arc::new(m))
}

fn session(m: &Arc<Model>, n_ctx: usize, n_seq: usize) -> Session {
    Session::new(
        m.clone(),
        SessionParams {
            n_ctx,
            n_seq,
            n_batch: 128,
            kv_budget: 0,
        },
    )
    .unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn perplexity_matches_exact_math_and_llama_cpp() {
    let Some(path) = test_model() else { return };
    let (_ctx, m) = load(&path);
    let fx = fixture("smollm2_ppl.json");
    let mut s = session(&m, 512, 1);
    for case in fx["cases"].as_array().unwrap() {
        let file = case["file"].as_str().unwrap();
        let window = case["ctx"].as_u64().unwrap() as usize;
        let tokens = m
            .tokenizer
            .encode(&text(&format!("text/{file}")), false, false)
            .unwrap();
        assert_eq!(
            tokens.len() as u64,
            case["n_tokens"].as_u64().unwrap(),
            "{file}: token count"
        );
        let r = s.perplexity(&tokens, window).unwrap();
        let exact = case["ppl"].as_f64().unwrap();
        let llama = case["llamacpp_ppl"].as_f64().unwrap();
        let want_top1 = ids(&case["top1"]);
        assert_eq!(r.scored, want_top1.len(), "{file}: scored");
        let agree = r
            .top1
            .iter()
            .zip(&want_top1)
            .filter(|(a, b)| a == b)
            .count() as f64
            / r.scored as f64;
        let rel = (r.ppl - exact).abs() / exact;
        eprintln!(
            "{file}: ember ppl {:.6}, exact {exact:.6} (rel {rel:.2e}), top-1 agreement {:.4}, llama.cpp {llama:.6} ({:+.3}%)",
            r.ppl,
            agree,
            100.0 * (r.ppl - llama) / llama
        );
        assert!(rel < 0.002, "{file}: ppl {} vs exact {exact}", r.ppl);
        assert!(agree >= 0.99, "{file}: top-1 agreement {agree}");
        assert!(
            (r.ppl - llama).abs() / llama < 0.01 || r.tokens < 100,
            "{file}: ppl {} vs llama.cpp {llama}",
            r.ppl
        );
    }
}

fn greedy_alone(m: &Arc<Model>, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut s = session(m, 256, 1);
    let id = s.add_sequence(SamplerConfig::greedy()).unwrap();
    let mut out = vec![s.prefill(id, prompt).unwrap()];
    while out.len() < n {
        out.push(s.decode(&[id]).unwrap()[0]);
    }
    out
}

const GREEDY_FIXTURE: &str = "smollm2_greedy.json";

/// The adapter, backend, driver and enabled features, for the fixture and the failure text.
fn driver(ctx: &Context) -> String {
    let i = ctx.info();
    format!(
        "{} ({} {}; {})",
        i.name,
        i.backend,
        i.driver_info,
        i.enabled_features.join(", ")
    )
}

/// The greedy continuation of fixed prompts, token for token, as Mesa's lavapipe produced it
/// (`EMBER_BLESS_FIXTURES=1` rewrites the fixture from the driver at hand). Every other
/// driver, and the restricted-limits run without f16 or subgroups, must produce the same
/// tokens (`scripts/test-drivers.sh`).
#[test]
fn greedy_generation_matches_the_committed_lavapipe_run() {
    let Some(path) = test_model() else { return };
    let (ctx, m) = load(&path);
    let n = 32;
    let prompts = [
        "The three primary colors are",
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "def fibonacci(n):",
    ];
    let runs: Vec<(Vec<u32>, Vec<u32>)> = prompts
        .iter()
        .map(|p| {
            let prompt_ids = m.tokenizer.encode(p, false, true).unwrap();
            let out = greedy_alone(&m, &prompt_ids, n);
            (prompt_ids, out)
        })
        .collect();
    if std::env::var_os("EMBER_BLESS_FIXTURES").is_some() {
        let cases: Vec<_> = prompts
            .iter()
            .zip(&runs)
            .map(|(p, (prompt_ids, out))| {
                serde_json::json!({"prompt": p, "prompt_ids": prompt_ids, "greedy": out,
                                   "text": m.tokenizer.decode(out, false).unwrap()})
            })
            .collect();
        let fx = serde_json::json!({
            "note": "ember's greedy continuations (tests/tests/smollm2.rs, EMBER_BLESS_FIXTURES=1)",
            "driver": driver(&ctx),
            "n": n,
            "cases": cases,
        });
        let text = serde_json::to_string_pretty(&fx).unwrap() + "\n";
        std::fs::write(fixture_path(GREEDY_FIXTURE), text).unwrap();
        return;
    }
    let fx = fixture(GREEDY_FIXTURE);
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), prompts.len(), "{GREEDY_FIXTURE}: cases");
    for (case, (prompt_ids, out)) in cases.iter().zip(&runs) {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(
            prompt_ids,
            &ids(&case["prompt_ids"]),
            "{prompt:?}: prompt tokens"
        );
        let want = ids(&case["greedy"]);
        let same = out.iter().zip(&want).take_while(|(a, b)| a == b).count();
        assert!(
            same == want.len() && out.len() == want.len(),
            "{prompt:?} on {}: greedy tokens differ from {} from token {same}:\n got  {:?}\n want {:?}",
            driver(&ctx),
            fx["driver"],
            m.tokenizer.decode(out, false).unwrap(),
            case["text"]
        );
    }
}

#[test]
fn batched_sequences_equal_their_single_runs() {
    let Some(path) = test_model() else { return };
    let (_ctx, m) = load(&path);
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "Once upon a time, in a small village,",
        "1, 2, 3, 4,",
    ]
    .iter()
    .map(|p| m.tokenizer.encode(p, true, false).unwrap())
    .collect();
    let n = 10;
    let alone: Vec<Vec<u32>> = prompts.iter().map(|p| greedy_alone(&m, p, n)).collect();
    // Together: sequence 0 and 1 start, 2 joins after two steps, 1 leaves after six.
    let mut s = session(&m, 256, 3);
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); 3];
    let ids: Vec<_> = (0..3)
        .map(|_| s.add_sequence(SamplerConfig::greedy()).unwrap())
        .collect();
    got[0].push(s.prefill(ids[0], &prompts[0]).unwrap());
    got[1].push(s.prefill(ids[1], &prompts[1]).unwrap());
    for step in 0.. {
        if step == 2 {
            got[2].push(s.prefill(ids[2], &prompts[2]).unwrap());
        }
        let active: Vec<usize> = (0..3)
            .filter(|&i| !got[i].is_empty() && got[i].len() < n && !(i == 1 && got[i].len() >= 6))
            .collect();
        if active.is_empty() {
            break;
        }
        let batch: Vec<_> = active.iter().map(|&i| ids[i]).collect();
        let out = s.decode(&batch).unwrap();
        for (k, &i) in active.iter().enumerate() {
            got[i].push(out[k]);
        }
        if step == 6 {
            s.remove_sequence(ids[1]).unwrap();
        }
    }
    assert_eq!(got[0], alone[0]);
    assert_eq!(got[1][..], alone[1][..got[1].len()]);
    assert_eq!(got[2], alone[2]);
    let text = m.tokenizer.decode(&alone[0], true).unwrap();
    assert!(text.contains("Paris"), "{text:?}");
}

#[test]
fn seeded_sampling_is_reproducible_and_seed_dependent() {
    let Some(path) = test_model() else { return };
    let (_ctx, m) = load(&path);
    let prompt = m
        .tokenizer
        .encode("Write a poem about the sea:", true, false)
        .unwrap();
    let run = |seed: u64| {
        let mut s = session(&m, 128, 1);
        let cfg = SamplerConfig {
            temperature: 1.2,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed,
            ..Default::default()
        };
        let id = s.add_sequence(cfg).unwrap();
        let mut out = vec![s.prefill(id, &prompt).unwrap()];
        for _ in 0..15 {
            out.push(s.decode(&[id]).unwrap()[0]);
        }
        out
    };
    assert_eq!(run(11), run(11));
    assert_ne!(run(11), run(12));
}

#[test]
fn decode_steps_allocate_nothing_and_compile_nothing() {
    let Some(path) = test_model() else { return };
    let (ctx, m) = load(&path);
    let mut s = session(&m, 128, 2);
    let p = m.tokenizer.encode("Hello", true, false).unwrap();
    let a = s.add_sequence(SamplerConfig::default()).unwrap();
    let b = s.add_sequence(SamplerConfig::greedy()).unwrap();
    s.prefill(a, &p).unwrap();
    s.prefill(b, &p).unwrap();
    s.decode(&[a, b]).unwrap();
    let (bytes, pipelines) = (ctx.allocated_bytes(), ctx.pipelines_compiled());
    for _ in 0..5 {
        s.decode(&[a, b]).unwrap();
    }
    assert_eq!(
        ctx.allocated_bytes(),
        bytes,
        "decode steps allocated device memory"
    );
    assert_eq!(
        ctx.pipelines_compiled(),
        pipelines,
        "decode steps compiled pipelines"
    );
    assert!(s.last_dispatches > 100);
}

#[test]
fn context_overflow_is_a_clear_error() {
    let Some(path) = test_model() else { return };
    let (_ctx, m) = load(&path);
    let mut s = session(&m, 12, 1);
    let id = s.add_sequence(SamplerConfig::greedy()).unwrap();
    let long: Vec<u32> = (0..13).map(|i| 100 + i).collect();
    let e = s.prefill(id, &long).unwrap_err();
    assert!(e.to_string().contains("context full"), "{e}");
    assert!(
        s.tokens(id).unwrap().is_empty(),
        "a failed prefill changed the sequence"
    );
    s.prefill(id, &long[..10]).unwrap();
    s.decode(&[id]).unwrap();
    s.decode(&[id]).unwrap();
    assert_eq!(s.tokens(id).unwrap().len(), 12);
    let e = s.decode(&[id]).unwrap_err();
    assert!(e.to_string().contains("context full"), "{e}");
    assert_eq!(s.tokens(id).unwrap().len(), 12);
    let e = s.prefill(id, &[999_999]).unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
}

#[test]
fn gguf_and_exported_f32_safetensors_agree() {
    let Some(path) = test_model() else { return };
    let dir = temp_dir("smollm2-f32");
    ember::model::export::export_hf(&path, &dir, ember::model::export::ExportDtype::F32).unwrap();
    let (_c1, gguf) = load(&path);
    let (_c2, hf) = load(&dir);
    assert_eq!(hf.config.vocab, gguf.config.vocab);
    let all = gguf
        .tokenizer
        .encode(&text("text/general.txt"), false, false)
        .unwrap();
    let tokens = &all[..1024];
    assert_eq!(
        hf.tokenizer
            .encode(&text("text/general.txt"), false, false)
            .unwrap()[..1024],
        *tokens
    );
    let p1 = session(&gguf, 512, 1).perplexity(tokens, 512).unwrap();
    let p2 = session(&hf, 512, 1).perplexity(tokens, 512).unwrap();
    let rel = (p1.ppl - p2.ppl).abs() / p1.ppl;
    eprintln!(
        "gguf ppl {:.6}, f32 safetensors ppl {:.6}, rel {rel:.2e}",
        p1.ppl, p2.ppl
    );
    assert!(rel < 5e-4, "{} vs {}", p1.ppl, p2.ppl);
    let _ = std::fs::remove_dir_all(&dir);
}
