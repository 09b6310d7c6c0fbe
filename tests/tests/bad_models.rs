//! Broken model files and directories: `Model::load` returns an error of the right kind whose
//! message names the problem, and never panics. Each case starts from a valid tiny model
//! (`ember_tests::tiny`) and breaks one thing.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use ember::format::gguf::{TensorType, Value};
use ember::model::{LoadOptions, Model};
use ember::{Error, ErrorKind};
use ember_tests::model::{ctx, TempDir};
use ember_tests::tiny::{
    safetensors_bytes, tiny_tensors, write_tiny_model, TinyGguf, TinyVariant, HIDDEN, VOCAB,
};
use safetensors::tensor::{Dtype, TensorView};

/// Loads `path`, which must fail without panicking, with an error of `kind` whose message
/// contains every one of `needles`.
fn expect_error(path: &Path, kind: ErrorKind, needles: &[&str]) -> Error {
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
        Model::load(ctx(), path, LoadOptions::default())
    }));
    let err = match r {
        Ok(Ok(_)) => panic!("{}: loaded, but it is broken", path.display()),
        Ok(Err(e)) => e,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{}: Model::load panicked: {msg}", path.display())
        }
    };
    let msg = err.to_string();
    println!("{:?}: {msg}", err.kind());
    assert_eq!(
        err.kind(),
        kind,
        "{}: wrong kind for: {msg}",
        path.display()
    );
    for n in needles {
        assert!(
            msg.contains(n),
            "{}: the message does not mention {n:?}: {msg}",
            path.display()
        );
    }
    err
}

/// A valid f32 tiny GGUF, to break.
fn gguf(v: TinyVariant) -> TinyGguf {
    TinyGguf::new(v, None).unwrap()
}

fn write(dir: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn write_gguf(dir: &TempDir, name: &str, g: &TinyGguf) -> PathBuf {
    write(dir, name, &g.to_bytes().unwrap())
}

fn f32_bytes(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (i as f32 * 1e-3).to_le_bytes())
        .collect()
}

/// Byte offset of the ggml type field of tensor `name`'s info in a GGUF file.
fn type_field_offset(bytes: &[u8], name: &str) -> usize {
    let mut pat = (name.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(name.as_bytes());
    let at = bytes
        .windows(pat.len())
        .position(|w| w == pat.as_slice())
        .unwrap_or_else(|| panic!("no tensor info for {name}"))
        + pat.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    at + 4 + 8 * n_dims
}

#[test]
fn valid_files_load() {
    // The starting points of every case below are fine.
    let dir = TempDir::new("valid");
    let p = write_gguf(&dir, "ok.gguf", &gguf(TinyVariant::Qwen2));
    Model::load(ctx(), &p, LoadOptions::default()).unwrap();
    write_tiny_model(&dir.0, TinyVariant::Llama).unwrap();
    Model::load(ctx(), &dir.0, LoadOptions::default()).unwrap();
}

#[test]
fn gguf_missing_tensor() {
    let dir = TempDir::new("missing");
    let mut g = gguf(TinyVariant::Llama);
    assert!(g.remove_tensor("blk.0.ffn_up.weight"));
    let p = write_gguf(&dir, "missing.gguf", &g);
    expect_error(
        &p,
        ErrorKind::Format,
        &["missing.gguf", "missing tensor", "blk.0.ffn_up.weight"],
    );

    // block_count says 3 but the file has 2 blocks.
    let mut g = gguf(TinyVariant::Llama);
    g.set("llama.block_count", Value::U32(3));
    let p = write_gguf(&dir, "blocks.gguf", &g);
    expect_error(&p, ErrorKind::Format, &["missing tensor", "blk.2."]);

    // Qwen2 with one of its biases gone.
    let mut g = gguf(TinyVariant::Qwen2);
    assert!(g.remove_tensor("blk.1.attn_v.bias"));
    let p = write_gguf(&dir, "bias.gguf", &g);
    expect_error(&p, ErrorKind::Format, &["missing tensor", "attn_v.bias"]);
}

#[test]
fn gguf_wrong_dims() {
    let dir = TempDir::new("dims");
    // attn_q with 48 rows instead of 64.
    let mut g = gguf(TinyVariant::Llama);
    let t = g.tensor_mut("blk.0.attn_q.weight").unwrap();
    t.dims = vec![HIDDEN as u64, 48];
    t.data = f32_bytes(48 * HIDDEN);
    let p = write_gguf(&dir, "q.gguf", &g);
    expect_error(
        &p,
        ErrorKind::Format,
        &["blk.0.attn_q.weight", "[48, 64]", "[64, 64]"],
    );

    // attn_k transposed (dims in HF order instead of ggml order).
    let mut g = gguf(TinyVariant::Llama);
    let t = g.tensor_mut("blk.1.attn_k.weight").unwrap();
    t.dims = vec![32, HIDDEN as u64];
    let p = write_gguf(&dir, "k.gguf", &g);
    expect_error(
        &p,
        ErrorKind::Format,
        &["blk.1.attn_k.weight", "[64, 32]", "[32, 64]"],
    );

    // A bias of the wrong length.
    let mut g = gguf(TinyVariant::Qwen2);
    let t = g.tensor_mut("blk.0.attn_q.bias").unwrap();
    t.dims = vec![60];
    t.data = f32_bytes(60);
    let p = write_gguf(&dir, "bias.gguf", &g);
    expect_error(
        &p,
        ErrorKind::Format,
        &["blk.0.attn_q.bias", "60 values", "64"],
    );

    // A norm of the wrong length.
    let mut g = gguf(TinyVariant::Llama);
    let t = g.tensor_mut("output_norm.weight").unwrap();
    t.dims = vec![32];
    t.data = f32_bytes(32);
    let p = write_gguf(&dir, "norm.gguf", &g);
    expect_error(
        &p,
        ErrorKind::Format,
        &["output_norm.weight", "32 values", "64"],
    );
}

#[test]
fn gguf_unsupported_tensor_type() {
    let dir = TempDir::new("type");
    let mut bytes = gguf(TinyVariant::Llama).to_bytes().unwrap();
    // GgufWriter only writes types Ember reads: patch blk.0.attn_v.weight's type id to 10
    // (Q2_K), then to an id ggml does not define.
    let at = type_field_offset(&bytes, "blk.0.attn_v.weight");
    assert_eq!(
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()),
        TensorType::F32.ggml_id()
    );
    bytes[at..at + 4].copy_from_slice(&10u32.to_le_bytes());
    let p = write(&dir, "q2k.gguf", &bytes);
    expect_error(
        &p,
        ErrorKind::Unsupported,
        &["blk.0.attn_v.weight", "Q2_K", "id 10"],
    );
    bytes[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
    let p = write(&dir, "t77.gguf", &bytes);
    expect_error(
        &p,
        ErrorKind::Unsupported,
        &["blk.0.attn_v.weight", "unknown ggml type id 77"],
    );
}

#[test]
fn gguf_unsupported_architecture() {
    let dir = TempDir::new("arch");
    let mut g = gguf(TinyVariant::Llama);
    g.set("general.architecture", "gpt_neox");
    let p = write_gguf(&dir, "neox.gguf", &g);
    expect_error(
        &p,
        ErrorKind::Unsupported,
        &["\"gpt_neox\"", "architecture"],
    );

    let mut g = gguf(TinyVariant::Llama);
    assert!(g.remove_key("general.architecture"));
    let p = write_gguf(&dir, "noarch.gguf", &g);
    expect_error(&p, ErrorKind::Format, &["general.architecture"]);

    let mut g = gguf(TinyVariant::Llama);
    g.set("general.architecture", Value::U32(1));
    let p = write_gguf(&dir, "numarch.gguf", &g);
    expect_error(&p, ErrorKind::Format, &["general.architecture", "string"]);
}

#[test]
fn gguf_bad_hyperparameters() {
    let dir = TempDir::new("hparams");
    let case = |name: &str, key: &str, value: Value, kind: ErrorKind, needles: &[&str]| {
        let mut g = gguf(TinyVariant::Llama);
        g.set(key, value);
        let p = write_gguf(&dir, name, &g);
        expect_error(&p, kind, needles);
    };
    case(
        "heads0.gguf",
        "llama.attention.head_count",
        Value::U32(0),
        ErrorKind::Format,
        &["heads = 0"],
    );
    case(
        "kv3.gguf",
        "llama.attention.head_count_kv",
        Value::U32(3),
        ErrorKind::Format,
        &["4 heads are not a multiple of 3 kv heads"],
    );
    case(
        "kv0.gguf",
        "llama.attention.head_count_kv",
        Value::U32(0),
        ErrorKind::Format,
        &["kv heads = 0"],
    );
    case(
        "layers.gguf",
        "llama.block_count",
        Value::U64(1 << 40),
        ErrorKind::Format,
        &["layers", "out of range"],
    );
    case(
        "width.gguf",
        "llama.embedding_length",
        Value::U64(u64::MAX),
        ErrorKind::Format,
        &["hidden size", "out of range"],
    );
    case(
        "rot.gguf",
        "llama.rope.dimension_count",
        Value::U32(15),
        ErrorKind::Format,
        &["rope dimension 15"],
    );
    case(
        "eps.gguf",
        "llama.attention.layer_norm_rms_epsilon",
        Value::F32(f32::NAN),
        ErrorKind::Format,
        &["epsilon"],
    );
    case(
        "heads-str.gguf",
        "llama.attention.head_count",
        Value::String("four".into()),
        ErrorKind::Format,
        &["llama.attention.head_count", "non-negative integer"],
    );
    let mut g = gguf(TinyVariant::Llama);
    assert!(g.remove_key("llama.feed_forward_length"));
    let p = write_gguf(&dir, "noff.gguf", &g);
    expect_error(&p, ErrorKind::Format, &["llama.feed_forward_length"]);
}

#[test]
fn gguf_vocab_mismatch() {
    let dir = TempDir::new("vocab");
    // 300 tokens in the tokenizer, 256 embedding rows.
    let mut g = gguf(TinyVariant::Llama);
    let mut tokens: Vec<Value> = (0..=255u8)
        .map(|b| Value::String(ember_tests::tiny::byte_char(b).to_string()))
        .collect();
    tokens.extend((0..44).map(|i| Value::String(format!("<extra_{i}>"))));
    g.set("tokenizer.ggml.tokens", Value::Array(tokens));
    g.set(
        "tokenizer.ggml.token_type",
        Value::Array(vec![Value::I32(1); 300]),
    );
    let p = write_gguf(&dir, "tok300.gguf", &g);
    expect_error(&p, ErrorKind::Format, &["300 tokens", "256"]);

    // vocab_size says 300, the embedding has 256 rows.
    let mut g = gguf(TinyVariant::Llama);
    g.set("llama.vocab_size", Value::U32(300));
    let p = write_gguf(&dir, "vocab300.gguf", &g);
    expect_error(
        &p,
        ErrorKind::Format,
        &["token_embd.weight", "[256, 64]", "[300, 64]"],
    );

    // The output projection has fewer rows than the vocabulary.
    let mut g = gguf(TinyVariant::Llama);
    let t = g.tensor_mut("output.weight").unwrap();
    t.dims = vec![HIDDEN as u64, 200];
    t.data = f32_bytes(200 * HIDDEN);
    let p = write_gguf(&dir, "out200.gguf", &g);
    expect_error(&p, ErrorKind::Format, &["output.weight", "[200, 64]"]);

    // token_type shorter than tokens.
    let mut g = gguf(TinyVariant::Llama);
    g.set(
        "tokenizer.ggml.token_type",
        Value::Array(vec![Value::I32(1); 100]),
    );
    let p = write_gguf(&dir, "types.gguf", &g);
    expect_error(&p, ErrorKind::Format, &["tokenizer.ggml.token_type", "100"]);

    // No tokenizer at all.
    let mut g = gguf(TinyVariant::Llama);
    assert!(g.remove_key("tokenizer.ggml.model"));
    let p = write_gguf(&dir, "notok.gguf", &g);
    expect_error(&p, ErrorKind::Format, &["tokenizer.ggml.model"]);
}

#[test]
fn gguf_truncated_or_not_gguf() {
    let dir = TempDir::new("trunc");
    let bytes = gguf(TinyVariant::Llama).to_bytes().unwrap();
    // The last tensor's data runs past the end.
    let p = write(&dir, "cut100.gguf", &bytes[..bytes.len() - 100]);
    expect_error(
        &p,
        ErrorKind::Format,
        &["cut100.gguf", "blk.1.ffn_down.weight", "past the end"],
    );
    // Cut inside the header, and inside the metadata (the vocabulary cannot fit).
    let p = write(&dir, "cut20.gguf", &bytes[..20]);
    expect_error(&p, ErrorKind::Format, &["truncated", "metadata count"]);
    let p = write(&dir, "cut1000.gguf", &bytes[..1000]);
    expect_error(
        &p,
        ErrorKind::Format,
        &["tokenizer.ggml.tokens", "cannot fit", "left in the file"],
    );
    // Empty.
    let p = write(&dir, "empty.gguf", &[]);
    expect_error(&p, ErrorKind::Format, &["truncated", "magic"]);
    // Wrong magic.
    let mut b = bytes.clone();
    b[..4].copy_from_slice(b"GGUG");
    let p = write(&dir, "magic.gguf", &b);
    expect_error(
        &p,
        ErrorKind::Format,
        &["magic.gguf", "not a GGUF file", "GGUG"],
    );
    // A safetensors file given instead of its directory.
    let p = write(
        &dir,
        "model.safetensors",
        &safetensors_bytes(TinyVariant::Llama).unwrap(),
    );
    expect_error(&p, ErrorKind::Format, &["not a GGUF file"]);
    // Nothing there.
    expect_error(&dir.join("absent.gguf"), ErrorKind::Io, &["absent.gguf"]);
}

#[test]
fn gguf_absurd_counts() {
    let dir = TempDir::new("counts");
    let bytes = gguf(TinyVariant::Llama).to_bytes().unwrap();
    // Header: magic, version u32, n_tensors u64 at 8, n_kv u64 at 16.
    let mut b = bytes.clone();
    b[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let p = write(&dir, "tensors.gguf", &b);
    expect_error(
        &p,
        ErrorKind::Format,
        &["tensor count 1152921504606846976", "cannot fit"],
    );
    let mut b = bytes.clone();
    b[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let p = write(&dir, "kv.gguf", &b);
    expect_error(
        &p,
        ErrorKind::Format,
        &["metadata count 1152921504606846976", "cannot fit"],
    );
    let mut b = bytes;
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let p = write(&dir, "max.gguf", &b);
    expect_error(&p, ErrorKind::Format, &["cannot fit"]);
    // A tensor whose dims overflow the element count: [64, 2^62].
    let mut b = gguf(TinyVariant::Llama).to_bytes().unwrap();
    let at = type_field_offset(&b, "blk.0.ffn_gate.weight");
    b[at - 8..at].copy_from_slice(&(1u64 << 62).to_le_bytes());
    let p = write(&dir, "dims.gguf", &b);
    expect_error(
        &p,
        ErrorKind::Format,
        &["blk.0.ffn_gate.weight", "overflow"],
    );
}

#[test]
fn hf_dir_without_weights() {
    let dir = TempDir::new("noweights");
    write_tiny_model(&dir.0, TinyVariant::Llama).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    expect_error(&dir.0, ErrorKind::Format, &["no model.safetensors"]);

    // No config.json.
    let dir = TempDir::new("noconfig");
    write_tiny_model(&dir.0, TinyVariant::Llama).unwrap();
    std::fs::remove_file(dir.join("config.json")).unwrap();
    expect_error(&dir.0, ErrorKind::Io, &["config.json"]);

    // A config.json without a required field, or not JSON at all.
    let dir = TempDir::new("badconfig");
    write_tiny_model(&dir.0, TinyVariant::Llama).unwrap();
    let mut cfg = ember_tests::tiny::config_json(TinyVariant::Llama);
    cfg.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    expect_error(&dir.0, ErrorKind::Format, &["config.json", "hidden_size"]);
    std::fs::write(dir.join("config.json"), "{\"model_type\": ").unwrap();
    expect_error(&dir.0, ErrorKind::Format, &["config.json", "JSON"]);
    let mut cfg = ember_tests::tiny::config_json(TinyVariant::Llama);
    cfg["model_type"] = "gpt_neox".into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    expect_error(&dir.0, ErrorKind::Unsupported, &["\"gpt_neox\""]);
}

/// The tiny checkpoint's tensors with `edit` applied (name, dtype, shape, bytes).
type Raw = (String, Dtype, Vec<usize>, Vec<u8>);

fn raw_tensors(v: TinyVariant) -> Vec<Raw> {
    tiny_tensors(v)
        .into_iter()
        .map(|(n, s, vals)| {
            let b = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
            (n, Dtype::F32, s, b)
        })
        .collect()
}

fn safetensors_of(tensors: &[Raw]) -> Vec<u8> {
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

fn hf_dir_with(tag: &str, tensors: &[Raw]) -> TempDir {
    hf_variant_dir_with(TinyVariant::Llama, tag, tensors)
}

fn hf_variant_dir_with(v: TinyVariant, tag: &str, tensors: &[Raw]) -> TempDir {
    let dir = TempDir::new(tag);
    write_tiny_model(&dir.0, v).unwrap();
    std::fs::write(dir.join("model.safetensors"), safetensors_of(tensors)).unwrap();
    dir
}

#[test]
fn safetensors_wrong_dtype_or_shape() {
    let name = "model.layers.0.mlp.up_proj.weight";
    let mut t = raw_tensors(TinyVariant::Llama);
    let e = t.iter_mut().find(|e| e.0 == name).unwrap();
    e.1 = Dtype::I64;
    e.3 = vec![0u8; e.2.iter().product::<usize>() * 8];
    let dir = hf_dir_with("i64", &t);
    expect_error(&dir.0, ErrorKind::Unsupported, &[name, "I64"]);

    let name = "model.layers.1.self_attn.q_proj.weight";
    let mut t = raw_tensors(TinyVariant::Llama);
    let e = t.iter_mut().find(|e| e.0 == name).unwrap();
    e.2 = vec![HIDDEN, 32];
    e.3.truncate(HIDDEN * 32 * 4);
    let dir = hf_dir_with("shape", &t);
    expect_error(&dir.0, ErrorKind::Format, &[name, "[64, 32]", "[64, 64]"]);

    let mut t = raw_tensors(TinyVariant::Llama);
    let e = t.iter_mut().find(|e| e.0 == name).unwrap();
    e.2 = vec![2, 32, HIDDEN];
    let dir = hf_dir_with("rank3", &t);
    expect_error(&dir.0, ErrorKind::Format, &[name, "[2, 32, 64]"]);

    // The embedding with fewer rows than config.json's vocab_size.
    let name = "model.embed_tokens.weight";
    let mut t = raw_tensors(TinyVariant::Llama);
    let e = t.iter_mut().find(|e| e.0 == name).unwrap();
    e.2 = vec![VOCAB - 6, HIDDEN];
    e.3.truncate((VOCAB - 6) * HIDDEN * 4);
    let dir = hf_dir_with("embed", &t);
    expect_error(&dir.0, ErrorKind::Format, &[name, "[250, 64]", "[256, 64]"]);

    // A missing tensor.
    let mut t = raw_tensors(TinyVariant::Llama);
    t.retain(|e| e.0 != "model.layers.1.mlp.down_proj.weight");
    let dir = hf_dir_with("missing", &t);
    expect_error(
        &dir.0,
        ErrorKind::Format,
        &["missing tensor", "mlp.down_proj.weight"],
    );

    // Not a safetensors file.
    let dir = hf_dir_with("garbage", &raw_tensors(TinyVariant::Llama));
    std::fs::write(
        dir.join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk",
    )
    .unwrap();
    expect_error(
        &dir.0,
        ErrorKind::Format,
        &["model.safetensors", "safetensors"],
    );
}

#[test]
fn sharded_index_problems() {
    let all = raw_tensors(TinyVariant::Llama);
    let (a, b): (Vec<Raw>, Vec<Raw>) = all
        .iter()
        .cloned()
        .partition(|e| e.0.as_str() < "model.layers.1");
    let shard = |i: usize| format!("model-0000{i}-of-00002.safetensors");
    let index = |map: serde_json::Map<String, serde_json::Value>| {
        serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map}).to_string()
    };
    let map_to = |names: &[Raw], file: &str| -> Vec<(String, serde_json::Value)> {
        names
            .iter()
            .map(|e| (e.0.clone(), serde_json::Value::from(file)))
            .collect()
    };
    let sharded = |tag: &str, map: serde_json::Map<String, serde_json::Value>, write2: bool| {
        let dir = TempDir::new(tag);
        write_tiny_model(&dir.0, TinyVariant::Llama).unwrap();
        std::fs::remove_file(dir.join("model.safetensors")).unwrap();
        std::fs::write(dir.join(&shard(1)), safetensors_of(&a)).unwrap();
        if write2 {
            std::fs::write(dir.join(&shard(2)), safetensors_of(&b)).unwrap();
        }
        std::fs::write(dir.join("model.safetensors.index.json"), index(map)).unwrap();
        dir
    };
    let good: serde_json::Map<_, _> = map_to(&a, &shard(1))
        .into_iter()
        .chain(map_to(&b, &shard(2)))
        .collect();

    // The valid sharded checkpoint loads.
    let dir = sharded("shards-ok", good.clone(), true);
    Model::load(ctx(), &dir.0, LoadOptions::default()).unwrap();

    // The second shard is missing.
    let dir = sharded("shards-missing", good.clone(), false);
    expect_error(&dir.0, ErrorKind::Io, &[shard(2).as_str()]);

    // The index names a tensor no shard holds.
    let mut m = good.clone();
    m.insert("model.layers.7.mlp.up_proj.weight".into(), shard(1).into());
    let dir = sharded("shards-wrong", m, true);
    expect_error(
        &dir.0,
        ErrorKind::Format,
        &[
            "model.layers.7.mlp.up_proj.weight",
            "not in shard",
            shard(1).as_str(),
        ],
    );

    // A shard path that leaves the directory.
    let mut m = good.clone();
    m.insert(
        "model.layers.1.mlp.up_proj.weight".into(),
        "../model-00002-of-00002.safetensors".into(),
    );
    let dir = sharded("shards-escape", m, true);
    expect_error(&dir.0, ErrorKind::Format, &["leaves the directory"]);

    // An index that is not an index.
    let dir = sharded("shards-nomap", good, true);
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        "{\"metadata\": {}}",
    )
    .unwrap();
    expect_error(&dir.0, ErrorKind::Format, &["weight_map"]);
}

/// DESIGN.md: "a bad file is an `Error` naming what is wrong and where".
#[test]
fn shape_errors_name_the_file() {
    let dir = TempDir::new("where");
    let mut g = gguf(TinyVariant::Llama);
    let t = g.tensor_mut("blk.0.attn_q.weight").unwrap();
    t.dims = vec![HIDDEN as u64, 48];
    t.data = f32_bytes(48 * HIDDEN);
    let p = write_gguf(&dir, "where-q.gguf", &g);
    let e = expect_error(&p, ErrorKind::Format, &["blk.0.attn_q.weight"]);
    assert!(!e.to_string().contains("<memory>"), "{e}");
    assert!(e.to_string().contains("where-q.gguf"), "{e}");

    let mut g = gguf(TinyVariant::Llama);
    let t = g.tensor_mut("output_norm.weight").unwrap();
    t.dims = vec![32];
    t.data = f32_bytes(32);
    let p = write_gguf(&dir, "where-norm.gguf", &g);
    let e = expect_error(&p, ErrorKind::Format, &["output_norm.weight"]);
    assert!(e.to_string().contains("where-norm.gguf"), "{e}");
}

#[test]
fn missing_tensor_errors_name_the_tensor() {
    let dir = TempDir::new("which");
    let mut g = gguf(TinyVariant::Llama);
    assert!(g.remove_tensor("blk.0.ffn_up.weight"));
    let p = write_gguf(&dir, "which.gguf", &g);
    expect_error(&p, ErrorKind::Format, &["blk.0.ffn_up.weight"]);

    let mut t = raw_tensors(TinyVariant::Llama);
    t.retain(|e| e.0 != "model.layers.1.mlp.down_proj.weight");
    let dir = hf_dir_with("which-hf", &t);
    expect_error(
        &dir.0,
        ErrorKind::Format,
        &["model.layers.1.mlp.down_proj.weight"],
    );
}

/// Mixture-of-Experts files with one thing wrong: top-k above the expert count, missing or
/// mis-shaped expert tensors, a router whose expert count disagrees with the experts'.
#[test]
fn moe_bad_inputs() {
    let dir = TempDir::new("moe");
    let case = |name: &str, edit: &dyn Fn(&mut TinyGguf), kind: ErrorKind, needles: &[&str]| {
        let mut g = gguf(TinyVariant::Mixtral);
        edit(&mut g);
        let p = write_gguf(&dir, name, &g);
        expect_error(&p, kind, needles);
    };
    case(
        "topk.gguf",
        &|g| {
            g.set("llama.expert_used_count", Value::U32(5));
        },
        ErrorKind::Format,
        &["top-k of 5", "4 experts"],
    );
    case(
        "nok.gguf",
        &|g| {
            assert!(g.remove_key("llama.expert_used_count"));
        },
        ErrorKind::Format,
        &["llama.expert_used_count"],
    );
    case(
        "many.gguf",
        &|g| {
            g.set("llama.expert_count", Value::U32(300));
        },
        ErrorKind::Unsupported,
        &["300 experts"],
    );
    case(
        "noup.gguf",
        &|g| {
            assert!(g.remove_tensor("blk.1.ffn_up_exps.weight"));
        },
        ErrorKind::Format,
        &["missing tensor blk.1.ffn_up_exps.weight"],
    );
    case(
        "norouter.gguf",
        &|g| {
            assert!(g.remove_tensor("blk.0.ffn_gate_inp.weight"));
        },
        ErrorKind::Format,
        &["missing tensor blk.0.ffn_gate_inp.weight"],
    );
    // The router knows 3 experts, the file and the metadata 4.
    case(
        "router3.gguf",
        &|g| {
            let t = g.tensor_mut("blk.0.ffn_gate_inp.weight").unwrap();
            t.dims = vec![HIDDEN as u64, 3];
            t.data = f32_bytes(3 * HIDDEN);
        },
        ErrorKind::Format,
        &["blk.0.ffn_gate_inp.weight", "[3, 64]", "[4, 64]"],
    );
    // 3 experts' worth of down projections.
    case(
        "down3.gguf",
        &|g| {
            let t = g.tensor_mut("blk.1.ffn_down_exps.weight").unwrap();
            t.dims = vec![32, HIDDEN as u64, 3];
            t.data = f32_bytes(3 * 32 * HIDDEN);
        },
        ErrorKind::Format,
        &["blk.1.ffn_down_exps.weight", "[192, 32]", "[256, 32]"],
    );

    // HF checkpoints: top-k above the expert count, a missing expert, an expert the config
    // does not declare, a mis-shaped expert.
    let d = TempDir::new("moe-hf");
    write_tiny_model(&d.0, TinyVariant::Mixtral).unwrap();
    let mut cfg = ember_tests::tiny::config_json(TinyVariant::Mixtral);
    cfg["num_experts_per_tok"] = 5.into();
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    expect_error(&d.0, ErrorKind::Format, &["config.json", "top-k of 5"]);
    let mut cfg = ember_tests::tiny::config_json(TinyVariant::Mixtral);
    cfg["num_local_experts"] = 3.into();
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    expect_error(
        &d.0,
        ErrorKind::Format,
        &[
            "model.layers.0.block_sparse_moe.gate.weight",
            "[4, 64]",
            "[3, 64]",
        ],
    );

    let missing = "model.layers.1.block_sparse_moe.experts.3.w2.weight";
    let t: Vec<Raw> = raw_tensors(TinyVariant::Mixtral)
        .into_iter()
        .filter(|r| r.0 != missing)
        .collect();
    let d = hf_variant_dir_with(TinyVariant::Mixtral, "moe-missing", &t);
    expect_error(&d.0, ErrorKind::Format, &["missing tensor", missing]);

    let mut t = raw_tensors(TinyVariant::Qwen2Moe);
    let name = "model.layers.0.mlp.experts.2.up_proj.weight";
    let e = t.iter_mut().find(|e| e.0 == name).unwrap();
    e.2 = vec![31, HIDDEN];
    e.3.truncate(31 * HIDDEN * 4);
    let d = hf_variant_dir_with(TinyVariant::Qwen2Moe, "moe-shape", &t);
    expect_error(&d.0, ErrorKind::Format, &[name, "[31, 64]", "[32, 64]"]);

    let mut t = raw_tensors(TinyVariant::Olmoe);
    let extra = t
        .iter()
        .find(|r| r.0 == "model.layers.0.mlp.experts.0.gate_proj.weight")
        .unwrap()
        .clone();
    t.push((
        "model.layers.0.mlp.experts.4.gate_proj.weight".into(),
        extra.1,
        extra.2,
        extra.3,
    ));
    let d = hf_variant_dir_with(TinyVariant::Olmoe, "moe-extra", &t);
    expect_error(&d.0, ErrorKind::Format, &["more than the 4 experts"]);
}
