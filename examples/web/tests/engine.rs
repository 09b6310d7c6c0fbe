//! The web page's engine, natively (the browser run is scripts/test-web.sh): a GGUF from
//! bytes, greedy generation equal to the transformers fixture of the tiny model, training
//! that lowers the loss and changes the answer, forgetting that restores it, and clear
//! errors for bad input.

use ember_tests::model::TempDir;
use ember_tests::tiny::{write_tiny_gguf, TinyVariant};
use ember_web::{Engine, GenerateRequest, TrainRequest};

fn engine() -> Engine {
    let dir = TempDir::new("web-engine");
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, TinyVariant::Llama, None).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let mut seen = Vec::new();
    let e = pollster::block_on(Engine::load(bytes, "tiny.gguf", &mut |f| seen.push(f))).unwrap();
    assert_eq!(
        seen.last().copied(),
        Some(1.0),
        "progress ends at 1: {seen:?}"
    );
    e
}

fn ask(e: &mut Engine, prompt: &str, use_adapter: bool) -> (Vec<u32>, String) {
    let req = GenerateRequest {
        prompt: prompt.into(),
        max_tokens: 8,
        chat: false,
        temperature: 0.0,
        use_adapter,
    };
    let mut streamed = String::new();
    let r = pollster::block_on(e.generate(&req, &mut |p| streamed.push_str(p))).unwrap();
    let tokens: Vec<u32> = serde_json::from_value(r["tokens"].clone()).unwrap();
    let text = r["text"].as_str().unwrap().to_string();
    assert_eq!(streamed, text);
    (tokens, text)
}

fn teach(steps: u32) -> TrainRequest {
    TrainRequest {
        jsonl: "{\"text\": \"the cat sat on the mat and the cat sat on the mat\"}\n".into(),
        steps,
        batch_size: 1,
        lr: 1e-2,
        rank: 4,
        seq: 32,
        seed: 1,
    }
}

#[test]
fn generates_trains_and_forgets() {
    let mut e = engine();
    let info = e.info();
    assert_eq!(info["trained"], false);
    assert!(info["params"].as_u64().unwrap() > 0, "{info}");

    let prompt = "the cat";
    let (base, _) = ask(&mut e, prompt, true);
    assert_eq!(base.len(), 8);

    let mut seen = Vec::new();
    let r = pollster::block_on(e.train(&teach(6), &mut |s| seen.push(s.loss))).unwrap();
    let losses: Vec<f64> = serde_json::from_value(r["losses"].clone()).unwrap();
    assert_eq!(losses, seen);
    assert_eq!(losses.len(), 6);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(
        losses[5] < 0.5 * losses[0],
        "the loss should fall: {losses:?}"
    );
    assert_eq!(e.info()["trained"], true);

    let (taught, _) = ask(&mut e, prompt, true);
    assert_ne!(taught, base, "training did not change the answer");
    let (without, _) = ask(&mut e, prompt, false);
    assert_eq!(without, base, "use_adapter = false must be the base model");

    // Training again continues from the adapter: the first loss is where the last run ended.
    let r = pollster::block_on(e.train(&teach(1), &mut |_| {})).unwrap();
    let again = r["losses"][0].as_f64().unwrap();
    assert!(again < losses[0] * 0.5, "{again} vs {losses:?}");

    e.forget().unwrap();
    assert_eq!(e.info()["trained"], false);
    assert_eq!(ask(&mut e, prompt, true).0, base);
}

#[test]
fn selfcheck_passes() {
    let e = engine();
    let r = pollster::block_on(e.selfcheck()).unwrap();
    let checks = r["checks"].as_array().unwrap();
    assert!(checks.len() > 20, "{r}");
    let bad: Vec<_> = checks.iter().filter(|c| c["ok"] != true).collect();
    assert!(bad.is_empty(), "{bad:?}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let mut none = Vec::new();
    let err = pollster::block_on(Engine::load(
        b"GGUF\x03\0\0\0".to_vec(),
        "cut.gguf",
        &mut |f| none.push(f),
    ))
    .err()
    .unwrap()
    .to_string();
    assert!(err.starts_with("cut.gguf: "), "{err}");

    let mut e = engine();
    let mut bad = teach(1);
    bad.jsonl = "{\"text\": ".into();
    let err = pollster::block_on(e.train(&bad, &mut |_| {})).unwrap_err();
    assert!(err.to_string().contains("line 1"), "{err}");
    let err = pollster::block_on(e.train(
        &TrainRequest {
            steps: 0,
            ..teach(1)
        },
        &mut |_| {},
    ))
    .unwrap_err();
    assert!(err.to_string().contains("steps"), "{err}");
    let err = pollster::block_on(e.train(
        &TrainRequest {
            jsonl: String::new(),
            ..teach(1)
        },
        &mut |_| {},
    ))
    .unwrap_err();
    assert!(err.to_string().contains("no training records"), "{err}");
    assert_eq!(e.info()["trained"], false);
}
