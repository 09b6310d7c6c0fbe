//! Tokenizer tests: synthetic vocabularies (always), SmolLM2's GGUF against llama.cpp's ids
//! and transformers' chat rendering (when `EMBER_TEST_MODEL` names the GGUF).

use std::path::{Path, PathBuf};

use super::gguf_vocab::{byte_level_pre_tokenizer, pre_tokenizer_spec, GgufVocab};
use super::*;
use crate::format::gguf::{GgufWriter, Value};
use crate::ErrorKind;

// --- synthetic vocabularies -------------------------------------------------------------------

/// A byte-level BPE vocabulary: 3 control tokens, the 256 byte characters, then merged tokens.
fn bpe_vocab(pre: &str) -> GgufVocab {
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut types = vec![3i64, 3, 3];
    for b in 0..=255u8 {
        tokens.push(char_of_byte(b).to_string());
        types.push(1);
    }
    let merges = [
        "l l", "h e", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2",
    ];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    // A user-defined token: matched even when special tokens are not parsed.
    tokens.push("<tool>".into());
    types.push(4);
    GgufVocab {
        model: "gpt2".into(),
        pre: Some(pre.into()),
        tokens,
        token_types: Some(types),
        merges: Some(merges.iter().map(|s| s.to_string()).collect()),
        bos: Some(1),
        eos: Some(2),
        unk: Some(0),
        add_bos: Some(false),
        chat_template: Some(SMOL_TEMPLATE.into()),
        ..GgufVocab::default()
    }
}

/// SmolLM2's chat template (from its GGUF).
const SMOL_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn id_of(t: &Tokenizer, text: &str) -> u32 {
    t.token_to_id(text)
        .unwrap_or_else(|| panic!("{text:?} not in vocab"))
}

fn bpe(pre: &str) -> Tokenizer {
    Tokenizer::from_gguf_vocab(bpe_vocab(pre), None).unwrap()
}

#[test]
fn bpe_encode_decode_synthetic() {
    let t = bpe("gpt-2");
    assert_eq!(t.vocab_size(), 3 + 256 + 10 + 1);
    let ids = t.encode("hello world", true, true).unwrap();
    assert_eq!(ids, vec![id_of(&t, "hello"), id_of(&t, "Ġworld")]);
    assert_eq!(t.decode(&ids, false).unwrap(), "hello world");
    // Unmerged text falls back to one token per byte.
    let ids = t.encode("hé", false, true).unwrap();
    assert_eq!(
        ids,
        vec![
            id_of(&t, "h"),
            id_of(&t, &char_of_byte(0xC3).to_string()),
            id_of(&t, &char_of_byte(0xA9).to_string())
        ]
    );
    assert_eq!(t.decode(&ids, false).unwrap(), "hé");
    assert_eq!(t.token_bytes(id_of(&t, "Ġworld")).unwrap(), b" world");
    assert_eq!(t.token_bytes(1).unwrap(), b"<|im_start|>");
    assert_eq!(t.token_bytes(10_000), None);
    assert_eq!(t.bos(), Some(1));
    assert_eq!(t.eos(), Some(2));
    assert!(!t.adds_bos());
    assert!(t.is_end_of_generation(2));
    assert!(t.is_end_of_generation(0)); // <|endoftext|>
    assert!(!t.is_end_of_generation(1));
    assert!(t.decode(&[9999], false).is_err());
}

#[test]
fn bpe_special_tokens_follow_parse_special() {
    let t = bpe("gpt-2");
    let with = t
        .encode("<|im_start|>hello<|im_end|>", false, true)
        .unwrap();
    assert_eq!(with, vec![1, id_of(&t, "hello"), 2]);
    let without = t
        .encode("<|im_start|>hello<|im_end|>", false, false)
        .unwrap();
    assert!(!without.contains(&1) && !without.contains(&2));
    assert_eq!(
        t.decode(&without, false).unwrap(),
        "<|im_start|>hello<|im_end|>"
    );
    // Control tokens render only when asked.
    assert_eq!(
        t.decode(&with, false).unwrap(),
        "<|im_start|>hello<|im_end|>"
    );
    assert_eq!(t.decode(&with, true).unwrap(), "hello");
    // User-defined tokens are split out in both modes and always rendered.
    let tool = id_of(&t, "<tool>");
    for special in [true, false] {
        let ids = t.encode("hello<tool>", false, special).unwrap();
        assert_eq!(ids, vec![id_of(&t, "hello"), tool]);
        assert_eq!(t.decode(&ids, true).unwrap(), "hello<tool>");
    }
}

#[test]
fn add_bos_needs_the_model_flag() {
    let t = bpe("gpt-2");
    assert_eq!(
        t.encode("hello", true, true).unwrap(),
        vec![id_of(&t, "hello")]
    );
    let mut v = bpe_vocab("gpt-2");
    v.add_bos = Some(true);
    v.add_eos = Some(true);
    let t = Tokenizer::from_gguf_vocab(v, None).unwrap();
    let h = id_of(&t, "hello");
    assert_eq!(t.encode("hello", true, true).unwrap(), vec![1, h, 2]);
    assert_eq!(t.encode("hello", false, true).unwrap(), vec![h]);
    assert_eq!(t.encode("", true, true).unwrap(), vec![1, 2]);
}

#[test]
fn pre_tokenizer_digits() {
    // GPT-2 keeps digit runs together ("12" merges), SmolLM splits every digit.
    let gpt2 = bpe("gpt-2");
    let smol = bpe("smollm");
    assert_eq!(
        gpt2.encode("12", false, true).unwrap(),
        vec![id_of(&gpt2, "12")]
    );
    assert_eq!(
        smol.encode("12", false, true).unwrap(),
        vec![id_of(&smol, "1"), id_of(&smol, "2")]
    );
}

#[test]
fn every_mapped_pre_tokenizer_compiles_and_splits() {
    let names = [
        "default",
        "gpt-2",
        "llama3",
        "llama-bpe",
        "dbrx",
        "smollm",
        "starcoder",
        "qwen2",
        "stablelm2",
        "deepseek-llm",
        "deepseek-coder",
        "deepseek-v3",
        "falcon",
        "tekken",
        "gpt-4o",
        "chatglm-bpe",
        "bloom",
        "poro-chat",
    ];
    for name in names {
        let (spec, known) = pre_tokenizer_spec(Some(name));
        assert!(known, "{name}");
        let pt = byte_level_pre_tokenizer(&spec).unwrap();
        let mut t = tokenizers::Tokenizer::new(tokenizers::models::bpe::BPE::default());
        t.with_pre_tokenizer(Some(pt));
        // Must not fail on mixed text.
        let text = "Hello, World! It's 12345 dogs 😀 我喜欢\n\n  x";
        let pieces = t
            .get_pre_tokenizer()
            .map(|p| {
                use tokenizers::PreTokenizer;
                let mut s = tokenizers::PreTokenizedString::from(text);
                p.pre_tokenize(&mut s).unwrap();
                s.get_splits(
                    tokenizers::OffsetReferential::Original,
                    tokenizers::OffsetType::Byte,
                )
                .into_iter()
                .map(|(s, _, _)| s.to_string())
                .collect::<Vec<_>>()
            })
            .unwrap();
        let rejoined: String = pieces.iter().map(|p| byte_level_decode_str(p)).collect();
        assert_eq!(rejoined, text, "{name}: {pieces:?}");
    }
    assert!(!pre_tokenizer_spec(Some("no-such-pre")).1);
}

fn byte_level_decode_str(s: &str) -> String {
    String::from_utf8(byte_level_decode(s)).unwrap()
}

fn splits(pre: &str, text: &str) -> Vec<String> {
    use tokenizers::PreTokenizer;
    let (spec, _) = pre_tokenizer_spec(Some(pre));
    let pt = byte_level_pre_tokenizer(&spec).unwrap();
    let mut s = tokenizers::PreTokenizedString::from(text);
    pt.pre_tokenize(&mut s).unwrap();
    s.get_splits(
        tokenizers::OffsetReferential::Original,
        tokenizers::OffsetType::Byte,
    )
    .into_iter()
    .map(|(s, _, _)| byte_level_decode_str(s))
    .collect()
}

#[test]
fn pre_tokenizer_splits_match_llama_cpp_rules() {
    assert_eq!(
        splits("gpt-2", "Hello  world's 123"),
        ["Hello", " ", " world", "'s", " 123"]
    );
    assert_eq!(splits("smollm", "a 123"), ["a", " ", "1", "2", "3"]);
    assert_eq!(
        splits("llama3", "I'M 12345\n\nok"),
        ["I", "'M", " ", "123", "45", "\n\n", "ok"]
    );
    assert_eq!(splits("qwen2", "x 12"), ["x", " ", "1", "2"]);
}

// --- SentencePiece ------------------------------------------------------------------------------

/// `<unk> <s> </s>`, the 256 byte tokens, then pieces with scores chosen so that llama.cpp's
/// algorithm (merge the best-scoring adjacent pair) makes `▁hello ▁world`.
fn spm_vocab() -> GgufVocab {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2i64, 3, 3];
    let mut scores = vec![0.0f32, 0.0, 0.0];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    let pieces: &[(&str, f32)] = &[
        ("▁", -10.0),
        ("h", -11.0),
        ("e", -12.0),
        ("l", -13.0),
        ("o", -14.0),
        ("w", -15.0),
        ("r", -16.0),
        ("d", -17.0),
        ("ll", -3.0),
        ("llo", -4.0),
        ("▁h", -5.0),
        ("▁he", -6.0),
        ("▁hello", -1.0),
        ("or", -7.0),
        ("▁w", -8.0),
        ("▁wor", -9.0),
        ("ld", -2.5),
        ("▁world", -2.0),
    ];
    for (p, s) in pieces {
        tokens.push((*p).into());
        types.push(1);
        scores.push(*s);
    }
    GgufVocab {
        model: "llama".into(),
        tokens,
        token_types: Some(types),
        scores: Some(scores),
        bos: Some(1),
        eos: Some(2),
        unk: Some(0),
        ..GgufVocab::default()
    }
}

#[test]
fn spm_encode_decode_synthetic() {
    let t = Tokenizer::from_gguf_vocab(spm_vocab(), None).unwrap();
    // Ids: <unk>=0 <s>=1 </s>=2, <0xNN> = 3 + NN, then the pieces from 259 in order.
    let piece = |p: &str| id_of(&t, p);
    assert_eq!(piece("▁hello"), 259 + 12);
    assert_eq!(piece("▁world"), 259 + 17);
    assert!(t.adds_bos()); // SentencePiece default
    assert_eq!(
        t.encode("hello world", false, true).unwrap(),
        vec![271, 276]
    );
    assert_eq!(
        t.encode("hello world", true, true).unwrap(),
        vec![1, 271, 276]
    );
    // A character outside the vocabulary falls back to its UTF-8 bytes: é = C3 A9.
    assert_eq!(
        t.encode("hé", false, true).unwrap(),
        vec![piece("▁h"), 3 + 0xC3, 3 + 0xA9]
    );
    // Every fragment after a special token gets the leading space too (llama.cpp).
    assert_eq!(
        t.encode("hello</s>world", false, true).unwrap(),
        vec![271, 2, 276]
    );
    // Decoding strips the first token's leading space and joins byte tokens.
    assert_eq!(t.decode(&[271, 276], false).unwrap(), "hello world");
    assert_eq!(
        t.decode(&[piece("▁h"), 3 + 0xC3, 3 + 0xA9], false).unwrap(),
        "hé"
    );
    // A skipped BOS does not use up the space stripping; a rendered one does.
    assert_eq!(t.decode(&[1, 271, 276], true).unwrap(), "hello world");
    assert_eq!(t.decode(&[1, 271, 276], false).unwrap(), "<s> hello world");
    assert_eq!(t.token_bytes(271).unwrap(), b" hello");
    assert_eq!(t.token_bytes(3 + 0x41).unwrap(), b"A");
    assert!(t.is_end_of_generation(2));

    let mut v = spm_vocab();
    v.add_space_prefix = Some(false);
    let t = Tokenizer::from_gguf_vocab(v, None).unwrap();
    assert_eq!(
        t.encode(" hello", false, true).unwrap(),
        vec![271],
        "no prefix added"
    );
}

// --- tokenizer.json ------------------------------------------------------------------------------

#[test]
fn tokenizer_json_path_matches_the_gguf_path() {
    let dir = temp_dir("json");
    // Byte-level BPE.
    let g = bpe("smollm");
    let path = dir.join("bpe.json");
    std::fs::write(&path, g.to_hf_json(true).unwrap()).unwrap();
    let h = Tokenizer::from_json_file(&path).unwrap();
    assert_eq!(h.vocab_size(), g.vocab_size());
    for text in ["hello world", "<|im_start|>hello<tool> 12 😀", "<|im_end|>"] {
        for special in [true, false] {
            let ids = g.encode(text, false, special).unwrap();
            assert_eq!(
                h.encode(text, false, special).unwrap(),
                ids,
                "{text:?} {special}"
            );
            assert_eq!(h.decode(&ids, false).unwrap(), text);
        }
    }
    assert_eq!(h.token_bytes(id_of(&h, "Ġworld")).unwrap(), b" world");
    // No config: EOS from the well-known texts, no BOS (nothing looks like one).
    assert_eq!((h.bos(), h.eos()), (None, Some(0)));
    assert!(h.is_end_of_generation(0) && h.is_end_of_generation(2));
    assert!(h.chat_template().is_none());

    // SentencePiece.
    let g = Tokenizer::from_gguf_vocab(spm_vocab(), None).unwrap();
    let path = dir.join("spm.json");
    std::fs::write(&path, g.to_hf_json(false).unwrap()).unwrap();
    let h = Tokenizer::from_json_file(&path).unwrap();
    for text in ["hello world", "hé", " hello"] {
        assert_eq!(
            h.encode(text, false, true).unwrap(),
            g.encode(text, false, true).unwrap(),
            "{text:?}"
        );
    }
    assert_eq!(h.decode(&[271, 276], false).unwrap(), "hello world");
    assert_eq!(h.token_bytes(3 + 0xC3).unwrap(), [0xC3]);
    assert_eq!(h.token_bytes(271).unwrap(), b" hello");
    assert_eq!((h.bos(), h.eos()), (Some(1), Some(2)));

    // A config file that names a token the vocabulary lacks.
    std::fs::copy(&path, dir.join("tokenizer.json")).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<nope>"}"#,
    )
    .unwrap();
    let e = Tokenizer::from_hf_dir(&dir).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Format);
    assert!(
        e.to_string()
            .contains("\"<nope>\" is not in the vocabulary"),
        "{e}"
    );
    std::fs::write(dir.join("tokenizer_config.json"), "{not json").unwrap();
    assert_eq!(
        Tokenizer::from_hf_dir(&dir).unwrap_err().kind(),
        ErrorKind::Format
    );
    assert_eq!(
        Tokenizer::from_json_file(&dir.join("missing.json"))
            .unwrap_err()
            .kind(),
        ErrorKind::Io
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// --- malformed metadata ---------------------------------------------------------------------------

fn format_error(v: GgufVocab) -> String {
    let e = Tokenizer::from_gguf_vocab(v, Some(Path::new("bad.gguf"))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Format, "{e}");
    let s = e.to_string();
    assert!(s.starts_with("bad.gguf: "), "{s}");
    s
}

#[test]
fn malformed_vocabularies_are_clear_errors() {
    let mut v = bpe_vocab("gpt-2");
    v.token_types.as_mut().unwrap().pop();
    let e = format_error(v);
    assert!(
        e.contains("tokenizer.ggml.token_type has 269 entries but tokenizer.ggml.tokens has 270"),
        "{e}"
    );

    let mut v = bpe_vocab("gpt-2");
    v.merges.as_mut().unwrap().push("he zz".into());
    let e = format_error(v);
    assert!(
        e.contains("tokenizer.ggml.merges[10] = \"he zz\" names unknown token \"zz\""),
        "{e}"
    );

    let mut v = bpe_vocab("gpt-2");
    v.merges.as_mut().unwrap().push("nospace".into());
    assert!(format_error(v).contains("not two tokens separated by a space"));

    let mut v = bpe_vocab("gpt-2");
    v.bos = Some(270);
    let e = format_error(v);
    assert!(
        e.contains(
            "\"tokenizer.ggml.bos_token_id\" = 270 is out of range (vocabulary has 270 tokens)"
        ),
        "{e}"
    );

    let mut v = bpe_vocab("gpt-2");
    v.tokens[5] = "h".into();
    assert!(format_error(v).contains("duplicate token \"h\""));

    let mut v = spm_vocab();
    v.scores.as_mut().unwrap().push(0.0);
    assert!(format_error(v).contains("tokenizer.ggml.scores has 278 entries"));

    let mut v = bpe_vocab("gpt-2");
    v.merges = None;
    assert!(format_error(v).contains("without tokenizer.ggml.merges"));

    let mut v = bpe_vocab("gpt-2");
    v.model = "bert".into();
    let e = Tokenizer::from_gguf_vocab(v, None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("\"bert\""), "{e}");
}

/// Writes a vocabulary as GGUF metadata.
fn vocab_gguf(v: &GgufVocab) -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add("general.architecture", "llama");
    w.add("tokenizer.ggml.model", v.model.as_str());
    if let Some(p) = &v.pre {
        w.add("tokenizer.ggml.pre", p.as_str());
    }
    let strings = |s: &[String]| Value::Array(s.iter().map(|t| Value::String(t.clone())).collect());
    w.add("tokenizer.ggml.tokens", strings(&v.tokens));
    if let Some(m) = &v.merges {
        w.add("tokenizer.ggml.merges", strings(m));
    }
    if let Some(tt) = &v.token_types {
        w.add(
            "tokenizer.ggml.token_type",
            Value::Array(tt.iter().map(|&t| Value::I32(t as i32)).collect()),
        );
    }
    if let Some(s) = &v.scores {
        w.add(
            "tokenizer.ggml.scores",
            Value::Array(s.iter().map(|&x| Value::F32(x)).collect()),
        );
    }
    for (k, id) in [
        ("tokenizer.ggml.bos_token_id", v.bos),
        ("tokenizer.ggml.eos_token_id", v.eos),
        ("tokenizer.ggml.unknown_token_id", v.unk),
    ] {
        if let Some(id) = id {
            w.add(k, Value::U32(id as u32));
        }
    }
    if let Some(b) = v.add_bos {
        w.add("tokenizer.ggml.add_bos_token", Value::Bool(b));
    }
    if let Some(t) = &v.chat_template {
        w.add("tokenizer.chat_template", t.as_str());
    }
    w.to_bytes().unwrap()
}

#[test]
fn from_gguf_reads_the_metadata() {
    let g = GgufFile::from_bytes(vocab_gguf(&bpe_vocab("smollm"))).unwrap();
    let t = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(t.vocab_size(), 270);
    assert_eq!(
        t.encode("<|im_start|>hello world", false, true).unwrap(),
        vec![1, id_of(&t, "hello"), id_of(&t, "Ġworld")]
    );
    assert_eq!(t.chat_template(), Some(SMOL_TEMPLATE));

    let g = GgufFile::from_bytes(vocab_gguf(&spm_vocab())).unwrap();
    let t = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(
        t.encode("hello world", true, true).unwrap(),
        vec![1, 271, 276]
    );

    // A key of the wrong type names the key.
    let mut w = GgufWriter::new();
    w.add("tokenizer.ggml.model", "gpt2");
    w.add("tokenizer.ggml.tokens", Value::U32(3));
    let g = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
    let e = Tokenizer::from_gguf(&g).unwrap_err();
    assert!(e.to_string().contains("tokenizer.ggml.tokens"), "{e}");
}

// --- streaming ---------------------------------------------------------------------------------

#[test]
fn stream_decoder_holds_back_partial_characters() {
    let t = bpe("gpt-2");
    let ids = t.encode("a😀b", false, true).unwrap();
    // "a", four byte tokens for F0 9F 98 80, "b".
    assert_eq!(ids.len(), 6);
    let mut s = StreamDecoder::new(&t);
    let out: Vec<String> = ids.iter().map(|&id| s.push(id).unwrap()).collect();
    assert_eq!(out, ["a", "", "", "", "😀", "b"]);
    assert_eq!(s.finish(), "");

    // Control tokens are hidden unless asked for; an incomplete tail comes out on finish.
    let f0 = id_of(&t, &char_of_byte(0xF0).to_string());
    assert_eq!(s.push(2).unwrap(), "");
    assert_eq!(s.push(f0).unwrap(), "");
    assert_eq!(s.finish(), "\u{FFFD}");
    let mut s = StreamDecoder::with_special(&t, true);
    assert_eq!(s.push(2).unwrap(), "<|im_end|>");
    // A byte that can never start UTF-8 is replaced at once.
    let ff = id_of(&t, &char_of_byte(0xFF).to_string());
    assert_eq!(s.push(ff).unwrap(), "\u{FFFD}");
    assert!(s.push(100_000).is_err());
}

// --- chat templates ---------------------------------------------------------------------------

#[test]
fn chat_template_renders_with_python_methods() {
    let t = bpe("gpt-2");
    let msgs = [
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", "Hello!"),
    ];
    let out = t.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>assistant\n"
    );
    let tmpl = "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[{{ m.content.strip().upper() }}]{% elif m.content.startswith('Hel') %}<{{ m.content.split('!')[0] }}>{% endif %}\n{% endfor %}";
    let r = chat::render(tmpl, &msgs, false, "<s>", "</s>").unwrap();
    // trim_blocks: the newline after a block tag goes.
    assert_eq!(r, "<s>[HI]<Hello>");

    let e = chat::render(
        "{{ raise_exception('only user messages') }}",
        &msgs,
        false,
        "",
        "",
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("only user messages"), "{e}");
    let e = chat::render("{% for m in messages %}", &msgs, false, "", "").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Format);
    assert!(
        e.to_string().contains("chat template does not compile"),
        "{e}"
    );

    // 2024-02-29 12:34:56 UTC
    assert_eq!(
        chat::format_utc(1_709_210_096, "%d %b %Y %H:%M:%S %j %B %%"),
        "29 Feb 2024 12:34:56 060 February %"
    );

    let mut v = bpe_vocab("gpt-2");
    v.chat_template = None;
    let t = Tokenizer::from_gguf_vocab(v, None).unwrap();
    assert_eq!(
        t.apply_chat_template(&msgs, true).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
}

#[test]
fn byte_level_alphabet_round_trips() {
    for b in 0..=255u8 {
        assert_eq!(byte_of_char(char_of_byte(b)), Some(b));
    }
    assert_eq!(char_of_byte(b' '), 'Ġ');
    assert_eq!(char_of_byte(b'\n'), 'Ċ');
}

#[test]
fn tokenizer_is_send_sync_and_cheap_to_clone() {
    fn is<T: Send + Sync + Clone>() {}
    is::<Tokenizer>();
}

// --- the real model (EMBER_TEST_MODEL) -----------------------------------------------------------

fn test_model() -> Option<PathBuf> {
    match std::env::var_os("EMBER_TEST_MODEL") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            eprintln!("EMBER_TEST_MODEL is not set: skipping the SmolLM2 tokenizer checks");
            None
        }
    }
}

fn fixture(name: &str) -> Json {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

fn ids_of(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Checks every fixture case; returns (passed, total) comparisons.
fn check_token_fixture(t: &Tokenizer, check_decode: bool) -> (usize, usize) {
    let fx = fixture("smollm2_token_ids.json");
    let mut failures = Vec::new();
    let mut total = 0;
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        for (key, add_bos, special) in [
            ("ids_special", false, true),
            ("ids_nospecial", false, false),
            ("ids_bos_special", true, true),
        ] {
            total += 1;
            let want = ids_of(&case[key]);
            let got = t.encode(text, add_bos, special).unwrap();
            if got != want {
                failures.push(format!("{key} {text:?}:\n  want {want:?}\n  got  {got:?}"));
            }
        }
        if check_decode {
            for (key, skip) in [("ids_special", false), ("ids_nospecial", false)] {
                total += 1;
                let got = t.decode(&ids_of(&case[key]), skip).unwrap();
                if got != text {
                    failures.push(format!("decode {key} {text:?}: got {got:?}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    (total - failures.len(), total)
}

#[test]
fn smollm2_gguf_matches_llama_cpp_ids() {
    let Some(model) = test_model() else { return };
    let g = GgufFile::open(&model).unwrap();
    let t = Tokenizer::from_gguf(&g).unwrap();
    let fx = fixture("smollm2_token_ids.json");
    assert_eq!(t.vocab_size() as u64, fx["n_vocab"].as_u64().unwrap());
    assert_eq!(t.bos(), Some(fx["bos_id"].as_u64().unwrap() as u32));
    assert_eq!(t.eos(), Some(fx["eos_id"].as_u64().unwrap() as u32));
    assert!(!t.adds_bos());
    for id in [0, 2] {
        assert!(t.is_end_of_generation(id), "{id}");
    }
    assert!(!t.is_end_of_generation(1));
    let (ok, total) = check_token_fixture(&t, true);
    eprintln!("SmolLM2 GGUF: {ok}/{total} fixture checks match llama.cpp");

    // Streaming the ids of every case reproduces the text.
    for case in fx["cases"].as_array().unwrap() {
        let mut s = StreamDecoder::with_special(&t, true);
        let mut out = String::new();
        for id in ids_of(&case["ids_special"]) {
            out.push_str(&s.push(id).unwrap());
        }
        out.push_str(&s.finish());
        assert_eq!(out, case["text"].as_str().unwrap());
    }
}

fn conversations(fx: &Json) -> Vec<(Vec<ChatMessage>, bool, String)> {
    fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let msgs = c["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap())
                })
                .collect();
            (
                msgs,
                c["add_generation_prompt"].as_bool().unwrap(),
                c["rendered"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn check_chat_fixture(t: &Tokenizer) -> usize {
    let fx = fixture("smollm2_chat.json");
    let cases = conversations(&fx);
    for (msgs, agp, want) in &cases {
        let got = t.apply_chat_template(msgs, *agp).unwrap();
        assert_eq!(&got, want, "messages {msgs:?}, add_generation_prompt {agp}");
    }
    cases.len()
}

#[test]
fn smollm2_chat_template_matches_transformers() {
    let Some(model) = test_model() else { return };
    let t = Tokenizer::from_gguf(&GgufFile::open(&model).unwrap()).unwrap();
    let n = check_chat_fixture(&t);
    assert!(n >= 6);
}

/// A fresh temporary directory under the target dir.
fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ember-tok-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn smollm2_hf_dir_round_trip() {
    let Some(model) = test_model() else { return };
    let t = Tokenizer::from_gguf(&GgufFile::open(&model).unwrap()).unwrap();

    // 1. An HF directory written from the GGUF's own vocabulary.
    let dir = temp_dir("export");
    std::fs::write(dir.join("tokenizer.json"), t.to_hf_json(false).unwrap()).unwrap();
    let config = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": true},
        "add_bos_token": false,
        "chat_template": t.chat_template().unwrap(),
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"bos_token_id": 1, "eos_token_id": [2, 0]}"#,
    )
    .unwrap();
    let h = Tokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!(h.vocab_size(), t.vocab_size());
    assert_eq!((h.bos(), h.eos()), (Some(1), Some(2)));
    assert!(!h.adds_bos());
    assert!(h.is_end_of_generation(0) && h.is_end_of_generation(2));
    let (ok, total) = check_token_fixture(&h, false);
    eprintln!("SmolLM2 exported tokenizer.json: {ok}/{total} fixture checks match llama.cpp");
    check_chat_fixture(&h);
    for id in [0u32, 1, 2, 100, 30_000] {
        assert_eq!(h.token_bytes(id), t.token_bytes(id), "{id}");
    }
    let _ = std::fs::remove_dir_all(&dir);

    // 2. The directory transformers saves from the GGUF (scripts/ref/chat_template.py), when
    //    EMBER_TEST_HF_DIR names it: its ids must equal transformers' own, its template
    //    rendering transformers' rendering.
    let Some(hf_dir) = std::env::var_os("EMBER_TEST_HF_DIR").filter(|d| !d.is_empty()) else {
        eprintln!("EMBER_TEST_HF_DIR is not set: skipping the transformers-saved directory");
        return;
    };
    let h = Tokenizer::from_hf_dir(Path::new(&hf_dir)).unwrap();
    assert_eq!((h.bos(), h.eos()), (Some(1), Some(2)));
    check_chat_fixture(&h);
    let fx = fixture("smollm2_chat.json");
    for c in fx["hf_ids"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        assert_eq!(
            h.encode(text, false, true).unwrap(),
            ids_of(&c["ids"]),
            "{text:?}"
        );
    }
}
