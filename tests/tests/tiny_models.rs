//! The Rust tiny-model generator (`ember_tests::tiny`) and `scripts/ref/tiny_llama.py` make
//! the very same weights: the checksum of a freshly written model matches the one the script
//! recorded in the committed fixture next to its reference logits.

use std::path::{Path, PathBuf};

use ember_tests::tiny::{
    byte_char, config_json, tensor_shapes, weights_checksum, write_tiny_model, TinyVariant,
};

/// A fresh, unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p =
            std::env::temp_dir().join(format!("ember-tiny-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fixture(v: TinyVariant) -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(v.fixture_path());
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap()
}

#[test]
fn weights_match_the_python_reference() {
    for v in TinyVariant::ALL {
        let dir = TempDir::new(v.name());
        write_tiny_model(&dir.0, v).unwrap();
        let fx = fixture(v);
        let want = fx["weights_checksum"]
            .as_str()
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .unwrap_or_else(|| panic!("{}: no weights_checksum", v.name()));
        let got = weights_checksum(&dir.0);
        assert_eq!(got, want, "{}: {got:016x} != {want:016x}", v.name());

        // Same tensor list and configuration as the script's.
        let names: Vec<String> = tensor_shapes(v).into_iter().map(|(n, _)| n).collect();
        let fx_names: Vec<String> = fx["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, fx_names, "{}", v.name());
        let cfg = config_json(v);
        for (k, want) in fx["config"].as_object().unwrap() {
            if k == "attention_bias_qkv" {
                assert_eq!(want.as_bool(), Some(v == TinyVariant::Qwen2));
                continue;
            }
            assert_eq!(&cfg[k], want, "{}: config {k}", v.name());
        }
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.0.join("config.json")).unwrap()).unwrap();
        assert_eq!(written, cfg);
    }
}

#[test]
fn writing_twice_gives_identical_files() {
    let a = TempDir::new("a");
    let b = TempDir::new("b");
    write_tiny_model(&a.0, TinyVariant::Qwen2).unwrap();
    write_tiny_model(&b.0, TinyVariant::Qwen2).unwrap();
    write_tiny_model(&b.0, TinyVariant::Qwen2).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert_eq!(
            std::fs::read(a.0.join(f)).unwrap(),
            std::fs::read(b.0.join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn byte_level_tokenizer_loads_and_round_trips() {
    let dir = TempDir::new("tok");
    write_tiny_model(&dir.0, TinyVariant::Llama).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.0.join("tokenizer.json")).unwrap();
    assert_eq!(tok.get_vocab_size(true), 256);
    for b in 0..=255u8 {
        assert_eq!(
            tok.token_to_id(&byte_char(b).to_string()),
            Some(u32::from(b))
        );
    }
    let text = "Hello, wörld!\n  tabs\tand 🔥 bytes";
    let enc = tok.encode(text, false).unwrap();
    let ids: Vec<u32> = text.bytes().map(u32::from).collect();
    assert_eq!(enc.get_ids(), ids.as_slice());
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
}
