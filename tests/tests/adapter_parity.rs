//! Adapters made by peft load in Ember and give transformers + peft's logits (float64
//! reference, `scripts/ref/tiny_lora.py`, fixture `tests/fixtures/lora/logits.json`): LoRA
//! on q,v and rsLoRA on all linears, a soft prompt and a prefix, on the HF base and on its
//! GGUF conversion (q/k rows permuted). Prompt adapters also serve in batched decoding:
//! sequences with different (or no) prompt adapters share one decode step and produce what
//! each produces alone.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ember::adapters::{load_dir, Loaded, PromptAdapter};
use ember::model::{LoadOptions, Model};
use ember::session::{SamplerConfig, SeqAdapters, Session, SessionParams};
use ember::Context;
use ember_tests::model::temp_dir;
use ember_tests::tiny::{write_tiny_gguf, write_tiny_model, TinyVariant};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/lora")
}

fn tiny(gguf: bool) -> Arc<Model> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = temp_dir(&format!("adapter-parity-{n}"));
    let path = if gguf {
        let p = dir.join("tiny.gguf");
        write_tiny_gguf(&p, TinyVariant::Llama, None).unwrap();
        p
    } else {
        write_tiny_model(&dir, TinyVariant::Llama).unwrap();
        dir.clone()
    };
    let ctx = Context::new().unwrap();
    let m = Model::load(&ctx, &path, LoadOptions::default()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    Arc::new(m)
}

fn session(m: &Arc<Model>, n_seq: usize) -> Session {
    Session::new(
        m.clone(),
        SessionParams {
            n_ctx: 64,
            n_seq,
            n_batch: 16,
            kv_budget: 0,
        },
    )
    .unwrap()
}

/// The adapters of fixture directory `rel` as one sequence's choice (LoRA attached to `s`).
fn adapters(s: &mut Session, rel: &str) -> SeqAdapters {
    let mut out = SeqAdapters::default();
    for l in load_dir(&fixtures().join(rel), s.model()).unwrap() {
        match l {
            Loaded::Lora(a) => out.lora = Some((s.attach_adapter(rel, Arc::new(a)).unwrap(), 1.0)),
            Loaded::Prompt(p) => out.prompt = Some(p),
        }
    }
    out
}

#[test]
fn peft_adapters_give_peft_logits_on_hf_and_gguf_bases() {
    let fx: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("logits.json")).unwrap())
            .unwrap();
    let cases = fx["cases"].as_object().unwrap();
    for gguf in [false, true] {
        let m = tiny(gguf);
        let mut s = session(&m, 1);
        let vocab = m.config.vocab;
        for (name, case) in cases {
            let ad = match case["adapter"].as_str() {
                Some(rel) => adapters(&mut s, rel),
                None => SeqAdapters::default(),
            };
            let mut worst = 0.0f32;
            for p in case["prompts"].as_array().unwrap() {
                let ids: Vec<u32> = p["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect();
                let want: Vec<f32> = p["logits_last"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect();
                let got = s.logits_with(&ids, ad.clone()).unwrap();
                assert_eq!(got.len(), ids.len() * vocab);
                let last = &got[(ids.len() - 1) * vocab..];
                let d = ember::util::max_abs_diff(last, &want);
                worst = worst.max(d);
                // The greedy choice is the reference's wherever its margin is not a tie.
                if p["min_top2_margin"].as_f64().unwrap_or(0.0) > 1e-3 {
                    let argmax = last
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .unwrap()
                        .0;
                    let want = p["argmax"].as_array().unwrap().last().unwrap();
                    assert_eq!(argmax as u64, want.as_u64().unwrap(), "{name}");
                }
            }
            eprintln!("{name} (gguf {gguf}): max abs diff {worst:.2e}");
            assert!(worst < 1e-3, "{name} (gguf {gguf}): max abs diff {worst}");
        }
    }
}

/// Greedy continuation of `prompt` by one sequence, alone in a session (prompt adapters
/// only: LoRA ids belong to another session).
fn alone(m: &Arc<Model>, prompt: &[u32], ad: &SeqAdapters, n: usize) -> Vec<u32> {
    let mut s = session(m, 1);
    let id = s.start_sequence(SamplerConfig::greedy(), ad).unwrap();
    let mut out = vec![s.prefill(id, prompt).unwrap()];
    while out.len() < n {
        out.push(s.decode(&[id]).unwrap()[0]);
    }
    out
}

#[test]
fn prompt_adapters_share_a_decode_batch_and_match_single_runs() {
    let m = tiny(true);
    let mut s = session(&m, 3);
    let prompt = adapters(&mut s, "prompt_tuning/final");
    let prefix = adapters(&mut s, "prefix_tuning/final");
    let choices = [prompt, SeqAdapters::default(), prefix];
    let prompts: [&[u32]; 3] = [&[5, 17, 200, 3], &[9, 8, 7], &[100, 1, 2, 3, 4]];
    let n = 6;
    let want: Vec<Vec<u32>> = (0..3)
        .map(|k| alone(&m, prompts[k], &choices[k], n))
        .collect();

    // Attached prompt adapters, chosen by id like LoRA adapters.
    let ids: Vec<_> = (0..3)
        .map(|k| {
            let seq = s.add_sequence(SamplerConfig::greedy()).unwrap();
            if let Some(p) = &choices[k].prompt {
                let a = s.attach_prompt(&format!("p{k}"), p.clone()).unwrap();
                s.set_sequence_adapter(seq, Some(a), 1.0).unwrap();
            }
            seq
        })
        .collect();
    let mut got: Vec<Vec<u32>> = (0..3)
        .map(|k| vec![s.prefill(ids[k], prompts[k]).unwrap()])
        .collect();
    while got[0].len() < n {
        for (k, t) in s.decode(&ids).unwrap().into_iter().enumerate() {
            got[k].push(t);
        }
    }
    assert_eq!(got, want);
    // The adapters change what the base would say.
    assert_ne!(want[0], alone(&m, prompts[0], &SeqAdapters::default(), n));

    // A prompt adapter goes only on an empty sequence; the context counts its tokens.
    let e = s
        .set_sequence_prompt(ids[1], choices[0].prompt.clone())
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty sequence"), "{e}");
    assert_eq!(s.tokens(ids[0]).unwrap().len(), prompts[0].len() + n - 1);
}

#[test]
fn prompt_adapters_for_another_model_are_refused() {
    let m = tiny(false);
    let mut s = session(&m, 1);
    let Some(PromptAdapter::Prefix(p)) = adapters(&mut s, "prefix_tuning/final").prompt else {
        panic!("the fixture holds a prefix");
    };
    let mut wrong = (*p).clone();
    wrong.layers.pop();
    let e = s
        .attach_prompt("short", PromptAdapter::Prefix(Arc::new(wrong)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not fit"), "{e}");
    let mut other = (*p).clone();
    other.base_identity = Some(m.identity ^ 1);
    let e = s
        .attach_prompt("other", PromptAdapter::Prefix(Arc::new(other)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("another base model"), "{e}");
    let mut long = (*p).clone();
    long.n_virtual = 64;
    long.layers = vec![vec![0.0; 64 * 2 * m.config.kv_dim()]; m.config.n_layers];
    let e = s
        .attach_prompt("long", PromptAdapter::Prefix(Arc::new(long)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no room"), "{e}");
}
