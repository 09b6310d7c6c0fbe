//! Training data: chat records score exactly the assistant turns (with their end-of-turn
//! tokens), prompt/completion records the completion and EOS, plain text everything;
//! shuffling is seeded; `"distill": true` marks a record distilled; bad records name their
//! line.

use ember::format::gguf::GgufFile;
use ember::tokenizer::Tokenizer;
use ember::train::data::record;
use ember::train::Dataset;
use ember_tests::model::test_model;

fn smollm_tokenizer() -> Option<Tokenizer> {
    let path = test_model()?;
    Some(Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap())
}

fn scored_text(tok: &Tokenizer, e: &ember::train::Example) -> String {
    let ids: Vec<u32> = e
        .tokens
        .iter()
        .zip(&e.loss)
        .filter(|(_, &l)| l)
        .map(|(&t, _)| t)
        .collect();
    tok.decode(&ids, false).unwrap()
}

#[test]
fn chat_records_score_only_the_assistant_turns() {
    let Some(tok) = smollm_tokenizer() else {
        eprintln!("EMBER_TEST_MODEL not set; skipping");
        return;
    };
    let v: serde_json::Value = serde_json::from_str(
        r#"{"messages":[{"role":"system","content":"Be brief."},
            {"role":"user","content":"What is Zorblax?"},
            {"role":"assistant","content":"A purple gadget."},
            {"role":"user","content":"Who makes it?"},
            {"role":"assistant","content":"Quillon Labs."}]}"#,
    )
    .unwrap();
    let e = record(&v, &tok).unwrap();
    assert_eq!(
        scored_text(&tok, &e),
        "A purple gadget.<|im_end|>\nQuillon Labs.<|im_end|>\n"
    );
    // The pieces tokenized apart equal the whole conversation tokenized at once.
    let msgs: Vec<ember::tokenizer::ChatMessage> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            ember::tokenizer::ChatMessage::new(
                m["role"].as_str().unwrap(),
                m["content"].as_str().unwrap(),
            )
        })
        .collect();
    let whole = tok
        .encode(&tok.apply_chat_template(&msgs, false).unwrap(), true, true)
        .unwrap();
    assert_eq!(e.tokens, whole);

    let pc: serde_json::Value =
        serde_json::from_str(r#"{"prompt":"The capital of Zorbia is","completion":" Quill."}"#)
            .unwrap();
    let e = record(&pc, &tok).unwrap();
    assert_eq!(scored_text(&tok, &e), " Quill.<|im_end|>");
    let bad = Dataset::from_jsonl("{\"text\":\"ok\"}\n{\"oops\":1}\n", &tok, 64).unwrap_err();
    assert!(bad.to_string().contains("line 2"), "{bad}");
    let no_assistant = record(
        &serde_json::json!({"messages":[{"role":"user","content":"hi"}]}),
        &tok,
    )
    .unwrap_err();
    assert!(
        no_assistant.to_string().contains("assistant"),
        "{no_assistant}"
    );
    // "distill": true keeps the same tokens and mask, marked for distillation.
    let d = Dataset::from_jsonl(
        "{\"text\":\"the same words\",\"distill\":true}\n{\"text\":\"the same words\"}\n",
        &tok,
        64,
    )
    .unwrap();
    let (a, b) = (&d.examples[0], &d.examples[1]);
    assert!(a.distill && !b.distill);
    assert_eq!((&a.tokens, &a.loss), (&b.tokens, &b.loss));
    assert!(Dataset::from_jsonl("{\"text\":\"x y\"}\n", &tok, 64)
        .unwrap()
        .distilled()
        .examples
        .iter()
        .all(|e| e.distill));
    let bad = Dataset::from_jsonl("{\"text\":\"ok\",\"distill\":1}\n", &tok, 64).unwrap_err();
    assert!(bad.to_string().contains("distill"), "{bad}");
}

#[test]
fn datasets_truncate_and_shuffle_by_seed() {
    let Some(tok) = smollm_tokenizer() else {
        eprintln!("EMBER_TEST_MODEL not set; skipping");
        return;
    };
    let lines: String = (0..10)
        .map(|i| format!("{{\"text\":\"record number {i} with a few words in it\"}}\n"))
        .collect();
    let d = Dataset::from_jsonl(&lines, &tok, 5).unwrap();
    assert_eq!((d.examples.len(), d.truncated), (10, 10));
    assert!(d.examples.iter().all(|e| e.tokens.len() == 5));
    let a = d.epoch(3, 7, 0);
    assert_eq!(
        a.iter().map(|b| b.len()).collect::<Vec<_>>(),
        vec![3, 3, 3, 1]
    );
    assert_eq!(a, d.epoch(3, 7, 0));
    assert_ne!(a, d.epoch(3, 7, 1));
    assert_ne!(a, d.epoch(3, 8, 0));
    let plain = Dataset::from_text("one two three four five six seven eight", &tok, 3).unwrap();
    assert!(plain
        .examples
        .iter()
        .all(|e| e.tokens.len() <= 3 && e.loss.iter().all(|&l| l)));
}
