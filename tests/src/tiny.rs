//! Tiny random Llama / Qwen2 / tied-Llama models, generated bit-for-bit the same way as
//! `scripts/ref/tiny_llama.py` generates them, so tests can compare Ember against the committed
//! reference logits (`tests/fixtures/tiny_*/logits.json`) without torch and without committed
//! weights.
//!
//! # Weight generator (keep in sync with `scripts/ref/tiny_llama.py`)
//!
//! Every tensor is generated on its own, so the order in which tensors are made does not matter:
//!
//! 1. `h = fnv1a64(name)` over the UTF-8 bytes of the tensor's HF name (offset basis
//!    `0xCBF29CE484222325`; per byte: `h ^= byte; h = h * 0x100000001B3 mod 2^64`).
//! 2. `seed = (SEED + h) mod 2^64` with [`SEED`] `= 0x454D424552` ("EMBER").
//! 3. A SplitMix64 generator exactly as `ember::util::Rng`: state `= seed ^ 0x9E3779B97F4A7C15`;
//!    `next_u64`: `state += 0x9E3779B97F4A7C15 (mod 2^64); z = state;
//!    z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9; z = (z ^ z >> 27) * 0x94D049BB133111EB;
//!    return z ^ z >> 31` (wrapping products); `uniform() = (next_u64() >> 40) as f32 / 2^24`.
//! 4. One draw per element in row-major order of the HF-layout shape (`[out, in]` for linear
//!    weights): `w = (2.0 * u - 1.0) * A` in f32, where `u = uniform()` and [`A`] is the f32
//!    nearest `0.2 * sqrt(3)` (bits `0x3EB15CAC`), i.e. uniform in `[-A, A)` with standard
//!    deviation 0.2. `2u - 1` is exact in f32, so the only rounding is that of the product.
//!    RMSNorm weights (names containing `norm`) are `1.0 + w` (one more f32 rounding); every
//!    other tensor (embeddings, projections, `lm_head`, the Qwen2 q/k/v biases) is `w`.
//!
//! Tensors are stored as f32 in HF names and layouts: `model.embed_tokens.weight` `[256, 64]`,
//! `model.norm.weight`, `lm_head.weight` (absent when tied), and per layer `i`
//! `model.layers.{i}.input_layernorm.weight`, `.self_attn.{q,k,v,o}_proj.weight`,
//! `.self_attn.{q,k,v}_proj.bias` (Qwen2 only), `.post_attention_layernorm.weight`,
//! `.mlp.{gate,up,down}_proj.weight`.
//!
//! [`weights_checksum`] is FNV-1a-64 over, in sorted (byte-wise) tensor-name order, each name's
//! bytes followed by its f32 little-endian data; the fixtures record it as `weights_checksum`.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{json, Value};

/// The fixed seed added to each tensor name's FNV-1a-64 hash: ASCII "EMBER".
pub const SEED: u64 = 0x45_4D42_4552;

/// Half-width of the uniform distribution: the f32 nearest `0.2 * sqrt(3)` (std 0.2).
pub const A: f32 = f32::from_bits(0x3EB1_5CAC);

/// Vocabulary size (byte-level: token id = byte value).
pub const VOCAB: usize = 256;
/// Model width.
pub const HIDDEN: usize = 64;
/// MLP width.
pub const FFN: usize = 128;
/// Number of decoder layers.
pub const LAYERS: usize = 2;
/// Attention heads.
pub const HEADS: usize = 4;
/// Key/value heads.
pub const KV_HEADS: usize = 2;
/// Head width.
pub const HEAD_DIM: usize = HIDDEN / HEADS;
/// `max_position_embeddings`.
pub const MAX_POS: usize = 128;
/// `rms_norm_eps`.
pub const RMS_EPS: f64 = 1e-5;
/// `rope_theta`.
pub const ROPE_THETA: f64 = 10000.0;

/// The three tiny model variants of `scripts/ref/tiny_llama.py`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyVariant {
    /// `LlamaForCausalLM`, untied `lm_head` (`--variant llama`).
    Llama,
    /// `Qwen2ForCausalLM`: biases on q/k/v, none on o (`--variant qwen2`).
    Qwen2,
    /// `LlamaForCausalLM` with `tie_word_embeddings` (no `lm_head.weight`; `--variant tied`).
    LlamaTied,
}

impl TinyVariant {
    /// All variants.
    pub const ALL: [TinyVariant; 3] = [
        TinyVariant::Llama,
        TinyVariant::Qwen2,
        TinyVariant::LlamaTied,
    ];

    /// The script's `--variant` name.
    pub fn name(self) -> &'static str {
        match self {
            TinyVariant::Llama => "llama",
            TinyVariant::Qwen2 => "qwen2",
            TinyVariant::LlamaTied => "tied",
        }
    }

    /// The committed reference fixture, relative to the `tests` crate root.
    pub fn fixture_path(self) -> &'static str {
        match self {
            TinyVariant::Llama => "fixtures/tiny_llama/logits.json",
            TinyVariant::Qwen2 => "fixtures/tiny_qwen2/logits.json",
            TinyVariant::LlamaTied => "fixtures/tiny_llama_tied/logits.json",
        }
    }

    /// Whether `lm_head` is tied to the embeddings.
    pub fn tied(self) -> bool {
        self == TinyVariant::LlamaTied
    }

    /// HF `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            TinyVariant::Qwen2 => "qwen2",
            _ => "llama",
        }
    }

    /// HF architecture class name.
    pub fn architecture(self) -> &'static str {
        match self {
            TinyVariant::Qwen2 => "Qwen2ForCausalLM",
            _ => "LlamaForCausalLM",
        }
    }
}

/// FNV-1a, 64 bits.
#[derive(Debug, Clone)]
pub struct Fnv1a64(u64);

impl Default for Fnv1a64 {
    fn default() -> Self {
        Fnv1a64(0xCBF2_9CE4_8422_2325)
    }
}

impl Fnv1a64 {
    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01B3);
        }
    }

    /// The hash so far.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// FNV-1a-64 of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = Fnv1a64::default();
    h.update(bytes);
    h.finish()
}

/// SplitMix64, the same sequence as `ember::util::Rng` (a private copy so the committed
/// fixtures do not silently change with the runtime's generator; a test checks they agree).
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// The values of tensor `name` with `n` elements (see the module docs).
pub fn tensor_values(name: &str, n: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(SEED.wrapping_add(fnv1a64(name.as_bytes())));
    let norm = name.contains("norm");
    (0..n)
        .map(|_| {
            let w = (2.0 * rng.uniform() - 1.0) * A;
            if norm {
                1.0 + w
            } else {
                w
            }
        })
        .collect()
}

/// The HF names and shapes of a variant's tensors, in sorted name order.
pub fn tensor_shapes(v: TinyVariant) -> Vec<(String, Vec<usize>)> {
    let kv = KV_HEADS * HEAD_DIM;
    let mut t: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    t.insert("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN]);
    t.insert("model.norm.weight".into(), vec![HIDDEN]);
    if !v.tied() {
        t.insert("lm_head.weight".into(), vec![VOCAB, HIDDEN]);
    }
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}.");
        let mut add = |s: &str, shape: Vec<usize>| {
            t.insert(format!("{p}{s}"), shape);
        };
        add("input_layernorm.weight", vec![HIDDEN]);
        add("post_attention_layernorm.weight", vec![HIDDEN]);
        add("self_attn.q_proj.weight", vec![HIDDEN, HIDDEN]);
        add("self_attn.k_proj.weight", vec![kv, HIDDEN]);
        add("self_attn.v_proj.weight", vec![kv, HIDDEN]);
        add("self_attn.o_proj.weight", vec![HIDDEN, HIDDEN]);
        if v == TinyVariant::Qwen2 {
            add("self_attn.q_proj.bias", vec![HIDDEN]);
            add("self_attn.k_proj.bias", vec![kv]);
            add("self_attn.v_proj.bias", vec![kv]);
        }
        add("mlp.gate_proj.weight", vec![FFN, HIDDEN]);
        add("mlp.up_proj.weight", vec![FFN, HIDDEN]);
        add("mlp.down_proj.weight", vec![HIDDEN, FFN]);
    }
    t.into_iter().collect()
}

/// A variant's tensors (name, shape, values), in sorted name order.
pub fn tiny_tensors(v: TinyVariant) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    tensor_shapes(v)
        .into_iter()
        .map(|(name, shape)| {
            let values = tensor_values(&name, shape.iter().product());
            (name, shape, values)
        })
        .collect()
}

/// The `config.json` the script writes for a variant (the usual checkpoint layout, with both
/// the top-level `rope_theta` and transformers 5's `rope_parameters`).
pub fn config_json(v: TinyVariant) -> Value {
    let mut c = json!({
        "architectures": [v.architecture()],
        "model_type": v.model_type(),
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": MAX_POS,
        "rms_norm_eps": RMS_EPS,
        "rope_theta": ROPE_THETA,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "tie_word_embeddings": v.tied(),
        "bos_token_id": null,
        "eos_token_id": null,
        "torch_dtype": "float32",
    });
    let extra = if v == TinyVariant::Qwen2 {
        json!({"use_sliding_window": false, "sliding_window": null, "max_window_layers": LAYERS})
    } else {
        json!({"attention_bias": false, "mlp_bias": false})
    };
    if let (Value::Object(c), Value::Object(e)) = (&mut c, extra) {
        c.extend(e);
    }
    c
}

/// GPT-2's byte-to-unicode mapping: the character that stands for byte `b` in a byte-level
/// BPE vocabulary.
pub fn byte_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        char::from(b)
    } else {
        let n = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + n).expect("valid char")
    }
}

/// A byte-level BPE `tokenizer.json` with 256 single-byte tokens (id = byte value, GPT-2
/// byte-to-unicode characters), no merges, no special tokens, ByteLevel pre-tokenizer and
/// decoder.
pub fn tokenizer_json() -> Value {
    let vocab: serde_json::Map<String, Value> = (0..=255u8)
        .map(|b| (byte_char(b).to_string(), json!(b)))
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
        },
        "post_processor": null,
        "decoder": {
            "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": []
        }
    })
}

/// `tokenizer_config.json`: no BOS/EOS (the 256 ids are all bytes), nothing added.
pub fn tokenizer_config_json() -> Value {
    json!({
        "add_bos_token": false,
        "add_eos_token": false,
        "bos_token": null,
        "eos_token": null,
        "clean_up_tokenization_spaces": false,
        "model_max_length": MAX_POS,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
}

fn other_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Writes `bytes` to `dir/name` through a uniquely named temporary file and a rename, so a
/// concurrent reader never sees a partial file.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    static N: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, dir.join(name)).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

fn pretty(v: &Value) -> io::Result<Vec<u8>> {
    let mut s = serde_json::to_vec_pretty(v).map_err(other_err)?;
    s.push(b'\n');
    Ok(s)
}

/// The bytes of a variant's `model.safetensors` (f32 tensors, metadata `{"format": "pt"}`).
pub fn safetensors_bytes(v: TinyVariant) -> io::Result<Vec<u8>> {
    let tensors = tiny_tensors(v);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, vals)| (n, s, vals.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|t| (n.as_str(), t))
                .map_err(other_err)
        })
        .collect::<io::Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(meta)).map_err(other_err)
}

/// Writes a tiny model directory: `config.json`, `model.safetensors`, a byte-level
/// `tokenizer.json` and `tokenizer_config.json`. Creates `dir` if needed; overwrites the files.
pub fn write_tiny_model(dir: &Path, v: TinyVariant) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    write_atomic(dir, "model.safetensors", &safetensors_bytes(v)?)?;
    write_atomic(dir, "config.json", &pretty(&config_json(v))?)?;
    write_atomic(dir, "tokenizer.json", &pretty(&tokenizer_json())?)?;
    write_atomic(
        dir,
        "tokenizer_config.json",
        &pretty(&tokenizer_config_json())?,
    )?;
    Ok(())
}

/// FNV-1a-64 over the tensors of `dir/model.safetensors`: in sorted name order, each name's
/// bytes followed by its data (f32 little-endian, as stored).
///
/// # Panics
/// When the file cannot be read or parsed, or holds a tensor that is not f32.
pub fn weights_checksum(dir: &Path) -> u64 {
    let path = dir.join("model.safetensors");
    let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Fnv1a64::default();
    for (name, t) in tensors {
        assert_eq!(
            t.dtype(),
            Dtype::F32,
            "{}: {name} is not f32",
            path.display()
        );
        h.update(name.as_bytes());
        h.update(t.data());
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_ember_rng() {
        for seed in [0, 1, SEED, u64::MAX, fnv1a64(b"model.norm.weight")] {
            let mut a = SplitMix64::new(seed);
            let mut b = ember::util::Rng::new(seed);
            for _ in 0..100 {
                assert_eq!(a.uniform().to_bits(), b.uniform().to_bits());
                assert_eq!(a.next_u64(), b.next_u64());
            }
        }
    }

    #[test]
    fn constants() {
        assert_eq!(A, (0.2f64 * 3f64.sqrt()) as f32);
        assert_eq!(fnv1a64(b""), 0xCBF2_9CE4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xAF63_DC4C_8601_EC8C);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_F739_67E8);
        // SplitMix64 from internal state 0 (the same known answers the script checks).
        let mut r = SplitMix64::new(0x9E37_79B9_7F4A_7C15);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(r.next_u64(), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn gpt2_byte_chars() {
        assert_eq!(byte_char(b'A'), 'A');
        assert_eq!(byte_char(b' '), '\u{120}');
        assert_eq!(byte_char(b'\n'), '\u{10A}');
        assert_eq!(byte_char(0), '\u{100}');
        assert_eq!(byte_char(0xAD), '\u{143}');
        let set: std::collections::HashSet<char> = (0..=255u8).map(byte_char).collect();
        assert_eq!(set.len(), 256);
    }

    #[test]
    fn values_are_in_range() {
        let w = tensor_values("model.layers.0.mlp.up_proj.weight", 10_000);
        assert!(w.iter().all(|&x| (-A..A).contains(&x)));
        let mean = w.iter().map(|&x| f64::from(x)).sum::<f64>() / w.len() as f64;
        let var = w.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / w.len() as f64;
        assert!(
            mean.abs() < 0.01 && (var.sqrt() - 0.2).abs() < 0.01,
            "{mean} {var}"
        );
        let n = tensor_values("model.norm.weight", 64);
        assert!(n.iter().all(|&x| (1.0 - A..=1.0 + A).contains(&x)));
    }
}
