//! Tiny random Llama / Qwen2 / tied-Llama models and Mixture-of-Experts Mixtral / Qwen2-MoE /
//! OLMoE / Qwen3-MoE models, generated bit-for-bit the same way as `scripts/ref/tiny_llama.py`
//! and `scripts/ref/tiny_moe.py` generate them, so tests can compare Ember against the committed
//! reference logits (`tests/fixtures/tiny_*/logits.json`) without torch and without committed
//! weights. [`write_tiny_gguf`] writes the same weights as a GGUF file, laid out as llama.cpp's
//! converter lays them out (optionally quantized to Q8_0 / Q4_0 / Q4_1), see [`TinyGguf::new`].
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
//!    other tensor (embeddings, projections, `lm_head`, the Qwen2 q/k/v biases, routers,
//!    experts) is `w`.
//!
//! Tensors are stored as f32 in HF names and layouts: `model.embed_tokens.weight` `[256, 64]`,
//! `model.norm.weight`, `lm_head.weight` (absent when tied), and per layer `i`
//! `model.layers.{i}.input_layernorm.weight`, `.self_attn.{q,k,v,o}_proj.weight`,
//! `.self_attn.{q,k,v}_proj.bias` (Qwen2 and Qwen2-MoE only), `.post_attention_layernorm.weight`,
//! and for the dense variants `.mlp.{gate,up,down}_proj.weight`.
//!
//! The MoE variants ([`EXPERTS`] experts, top-[`EXPERTS_USED`], expert width [`EXPERT_FFN`],
//! every layer sparse, untied) use the canonical per-expert keys of published checkpoints
//! instead of the dense MLP (each `[out, in]`, layer `i`, expert `e`):
//!
//! * Mixtral: `model.layers.{i}.block_sparse_moe.gate.weight` `[4, 64]` (router),
//!   `.block_sparse_moe.experts.{e}.w1.weight` `[32, 64]` (gate), `.w3.weight` `[32, 64]` (up),
//!   `.w2.weight` `[64, 32]` (down).
//! * Qwen2-MoE: `model.layers.{i}.mlp.gate.weight` `[4, 64]`,
//!   `.mlp.experts.{e}.{gate_proj,up_proj}.weight` `[32, 64]`, `.down_proj.weight` `[64, 32]`,
//!   the shared expert `.mlp.shared_expert.{gate_proj,up_proj}.weight` `[48, 64]`,
//!   `.down_proj.weight` `[64, 48]` and its gate `.mlp.shared_expert_gate.weight` `[1, 64]`
//!   (output scaled by `sigmoid(w . x)`), plus the q/k/v biases.
//! * OLMoE: router and experts as Qwen2-MoE, no shared expert, plus
//!   `.self_attn.q_norm.weight` `[64]` and `.self_attn.k_norm.weight` `[32]`: RMSNorms over the
//!   whole q / k projection output (all heads together, before RoPE).
//! * Qwen3-MoE: router and experts as Qwen2-MoE, no shared expert, no q/k/v biases, plus
//!   per-head `.self_attn.q_norm.weight` and `.self_attn.k_norm.weight`, both `[16]`
//!   (`[HEAD_DIM]`): RMSNorms over each head's q / k (one weight shared by all heads, after the
//!   projection, before RoPE). `head_dim` is explicit in its config.
//!
//! The router takes the softmax over all experts, keeps the top 2 (largest first) and, for
//! Mixtral and Qwen3-MoE, renormalizes their weights to sum to 1 (`norm_topk_prob` false for
//! Qwen2-MoE and OLMoE, true for Qwen3-MoE). The fixtures describe all of it (`moe`,
//! `routing`, `gguf` keys).
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
/// Experts per MoE layer (`num_local_experts` / `num_experts`).
pub const EXPERTS: usize = 4;
/// Experts each token is routed to (`num_experts_per_tok`).
pub const EXPERTS_USED: usize = 2;
/// Width of each routed expert's SwiGLU MLP (Mixtral / OLMoE `intermediate_size`, Qwen2-MoE
/// `moe_intermediate_size`).
pub const EXPERT_FFN: usize = 32;
/// Width of Qwen2-MoE's shared expert (`shared_expert_intermediate_size`).
pub const SHARED_FFN: usize = 48;
/// Qwen2-MoE's `intermediate_size` (a dense MLP's width; no layer of the tiny model is dense).
pub const QWEN2_MOE_DENSE_FFN: usize = 128;
/// Qwen3-MoE's `intermediate_size` (a dense MLP's width; no layer of the tiny model is dense).
pub const QWEN3_MOE_DENSE_FFN: usize = 128;

/// The tiny model variants: the three dense ones of `scripts/ref/tiny_llama.py` and the four
/// Mixture-of-Experts ones of `scripts/ref/tiny_moe.py` (Qwen3-MoE not yet in [`Self::ALL`] /
/// [`Self::MOE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyVariant {
    /// `LlamaForCausalLM`, untied `lm_head` (`tiny_llama.py --variant llama`).
    Llama,
    /// `Qwen2ForCausalLM`: biases on q/k/v, none on o (`tiny_llama.py --variant qwen2`).
    Qwen2,
    /// `LlamaForCausalLM` with `tie_word_embeddings` (no `lm_head.weight`;
    /// `tiny_llama.py --variant tied`).
    LlamaTied,
    /// `MixtralForCausalLM` (`tiny_moe.py --variant mixtral`).
    Mixtral,
    /// `Qwen2MoeForCausalLM` with a shared expert and q/k/v biases
    /// (`tiny_moe.py --variant qwen2_moe`).
    Qwen2Moe,
    /// `OlmoeForCausalLM` with q/k RMSNorms (`tiny_moe.py --variant olmoe`).
    Olmoe,
    /// `Qwen3MoeForCausalLM`: per-head q/k RMSNorms, top-k weights renormalized
    /// (`tiny_moe.py --variant qwen3_moe`).
    Qwen3Moe,
}

impl TinyVariant {
    /// All variants, dense first.
    pub const ALL: [TinyVariant; 7] = [
        TinyVariant::Llama,
        TinyVariant::Qwen2,
        TinyVariant::LlamaTied,
        TinyVariant::Mixtral,
        TinyVariant::Qwen2Moe,
        TinyVariant::Olmoe,
        TinyVariant::Qwen3Moe,
    ];

    /// The dense variants (`scripts/ref/tiny_llama.py`).
    pub const DENSE: [TinyVariant; 3] = [
        TinyVariant::Llama,
        TinyVariant::Qwen2,
        TinyVariant::LlamaTied,
    ];

    /// The Mixture-of-Experts variants (`scripts/ref/tiny_moe.py`).
    pub const MOE: [TinyVariant; 4] = [
        TinyVariant::Mixtral,
        TinyVariant::Qwen2Moe,
        TinyVariant::Olmoe,
        TinyVariant::Qwen3Moe,
    ];

    /// The script's `--variant` name.
    pub fn name(self) -> &'static str {
        match self {
            TinyVariant::Llama => "llama",
            TinyVariant::Qwen2 => "qwen2",
            TinyVariant::LlamaTied => "tied",
            TinyVariant::Mixtral => "mixtral",
            TinyVariant::Qwen2Moe => "qwen2_moe",
            TinyVariant::Olmoe => "olmoe",
            TinyVariant::Qwen3Moe => "qwen3_moe",
        }
    }

    /// The committed reference fixture, relative to the `tests` crate root.
    pub fn fixture_path(self) -> &'static str {
        match self {
            TinyVariant::Llama => "fixtures/tiny_llama/logits.json",
            TinyVariant::Qwen2 => "fixtures/tiny_qwen2/logits.json",
            TinyVariant::LlamaTied => "fixtures/tiny_llama_tied/logits.json",
            TinyVariant::Mixtral => "fixtures/tiny_mixtral/logits.json",
            TinyVariant::Qwen2Moe => "fixtures/tiny_qwen2_moe/logits.json",
            TinyVariant::Olmoe => "fixtures/tiny_olmoe/logits.json",
            TinyVariant::Qwen3Moe => "fixtures/tiny_qwen3_moe/logits.json",
        }
    }

    /// Whether `lm_head` is tied to the embeddings.
    pub fn tied(self) -> bool {
        self == TinyVariant::LlamaTied
    }

    /// Whether the feed-forward blocks are Mixture-of-Experts blocks.
    pub fn is_moe(self) -> bool {
        matches!(
            self,
            TinyVariant::Mixtral
                | TinyVariant::Qwen2Moe
                | TinyVariant::Olmoe
                | TinyVariant::Qwen3Moe
        )
    }

    /// Whether q/k/v have biases (Qwen2, Qwen2-MoE).
    pub fn qkv_bias(self) -> bool {
        matches!(self, TinyVariant::Qwen2 | TinyVariant::Qwen2Moe)
    }

    /// HF `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            TinyVariant::Llama | TinyVariant::LlamaTied => "llama",
            TinyVariant::Qwen2 => "qwen2",
            TinyVariant::Mixtral => "mixtral",
            TinyVariant::Qwen2Moe => "qwen2_moe",
            TinyVariant::Olmoe => "olmoe",
            TinyVariant::Qwen3Moe => "qwen3_moe",
        }
    }

    /// HF architecture class name.
    pub fn architecture(self) -> &'static str {
        match self {
            TinyVariant::Llama | TinyVariant::LlamaTied => "LlamaForCausalLM",
            TinyVariant::Qwen2 => "Qwen2ForCausalLM",
            TinyVariant::Mixtral => "MixtralForCausalLM",
            TinyVariant::Qwen2Moe => "Qwen2MoeForCausalLM",
            TinyVariant::Olmoe => "OlmoeForCausalLM",
            TinyVariant::Qwen3Moe => "Qwen3MoeForCausalLM",
        }
    }

    /// llama.cpp's `general.architecture` for the variant: Mixtral is converted as `llama`
    /// (llama.cpp's Llama graph with `llama.expert_count` experts).
    pub fn gguf_arch(self) -> &'static str {
        match self {
            TinyVariant::Llama | TinyVariant::LlamaTied | TinyVariant::Mixtral => "llama",
            TinyVariant::Qwen2 => "qwen2",
            TinyVariant::Qwen2Moe => "qwen2moe",
            TinyVariant::Olmoe => "olmoe",
            TinyVariant::Qwen3Moe => "qwen3moe",
        }
    }

    /// The config's `intermediate_size`: the dense MLP width, the expert width for Mixtral and
    /// OLMoE, and Qwen2-MoE's / Qwen3-MoE's (unused) dense width.
    pub fn intermediate_size(self) -> usize {
        match self {
            TinyVariant::Llama | TinyVariant::Qwen2 | TinyVariant::LlamaTied => FFN,
            TinyVariant::Mixtral | TinyVariant::Olmoe => EXPERT_FFN,
            TinyVariant::Qwen2Moe => QWEN2_MOE_DENSE_FFN,
            TinyVariant::Qwen3Moe => QWEN3_MOE_DENSE_FFN,
        }
    }

    /// The per-expert weight names of the variant's checkpoints: (gate, up, down).
    fn expert_weight_names(self) -> [&'static str; 3] {
        if self == TinyVariant::Mixtral {
            ["w1", "w3", "w2"]
        } else {
            ["gate_proj", "up_proj", "down_proj"]
        }
    }

    /// The prefix of layer `i`'s MoE block in the checkpoint.
    fn moe_prefix(self, i: usize) -> String {
        if self == TinyVariant::Mixtral {
            format!("model.layers.{i}.block_sparse_moe.")
        } else {
            format!("model.layers.{i}.mlp.")
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
        if v.qkv_bias() {
            add("self_attn.q_proj.bias", vec![HIDDEN]);
            add("self_attn.k_proj.bias", vec![kv]);
            add("self_attn.v_proj.bias", vec![kv]);
        }
        if v == TinyVariant::Olmoe {
            add("self_attn.q_norm.weight", vec![HIDDEN]);
            add("self_attn.k_norm.weight", vec![kv]);
        }
        if v == TinyVariant::Qwen3Moe {
            // Per head: one [head_dim] weight shared by the heads.
            add("self_attn.q_norm.weight", vec![HEAD_DIM]);
            add("self_attn.k_norm.weight", vec![HEAD_DIM]);
        }
        if !v.is_moe() {
            add("mlp.gate_proj.weight", vec![FFN, HIDDEN]);
            add("mlp.up_proj.weight", vec![FFN, HIDDEN]);
            add("mlp.down_proj.weight", vec![HIDDEN, FFN]);
            continue;
        }
        let m = v.moe_prefix(i);
        let [g, u, d] = v.expert_weight_names();
        t.insert(format!("{m}gate.weight"), vec![EXPERTS, HIDDEN]);
        for e in 0..EXPERTS {
            t.insert(
                format!("{m}experts.{e}.{g}.weight"),
                vec![EXPERT_FFN, HIDDEN],
            );
            t.insert(
                format!("{m}experts.{e}.{u}.weight"),
                vec![EXPERT_FFN, HIDDEN],
            );
            t.insert(
                format!("{m}experts.{e}.{d}.weight"),
                vec![HIDDEN, EXPERT_FFN],
            );
        }
        if v == TinyVariant::Qwen2Moe {
            t.insert(
                format!("{m}shared_expert.gate_proj.weight"),
                vec![SHARED_FFN, HIDDEN],
            );
            t.insert(
                format!("{m}shared_expert.up_proj.weight"),
                vec![SHARED_FFN, HIDDEN],
            );
            t.insert(
                format!("{m}shared_expert.down_proj.weight"),
                vec![HIDDEN, SHARED_FFN],
            );
            t.insert(format!("{m}shared_expert_gate.weight"), vec![1, HIDDEN]);
        }
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
        "intermediate_size": v.intermediate_size(),
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
    let extra = match v {
        TinyVariant::Qwen2 => {
            json!({"use_sliding_window": false, "sliding_window": null, "max_window_layers": LAYERS})
        }
        TinyVariant::Llama | TinyVariant::LlamaTied => {
            json!({"attention_bias": false, "mlp_bias": false})
        }
        TinyVariant::Mixtral => json!({
            "num_experts_per_tok": EXPERTS_USED,
            "num_local_experts": EXPERTS,
            "sliding_window": null,
        }),
        TinyVariant::Qwen2Moe => json!({
            "num_experts_per_tok": EXPERTS_USED,
            "num_experts": EXPERTS,
            "moe_intermediate_size": EXPERT_FFN,
            "shared_expert_intermediate_size": SHARED_FFN,
            "norm_topk_prob": false,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "use_sliding_window": false,
            "sliding_window": null,
            "max_window_layers": LAYERS,
        }),
        TinyVariant::Olmoe => json!({
            "num_experts_per_tok": EXPERTS_USED,
            "num_experts": EXPERTS,
            "norm_topk_prob": false,
            "attention_bias": false,
            "clip_qkv": null,
            "pad_token_id": null,
        }),
        TinyVariant::Qwen3Moe => json!({
            "num_experts_per_tok": EXPERTS_USED,
            "num_experts": EXPERTS,
            "moe_intermediate_size": EXPERT_FFN,
            "norm_topk_prob": true,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "attention_bias": false,
            "use_sliding_window": false,
            "sliding_window": null,
        }),
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

// --- GGUF ------------------------------------------------------------------------------------

/// llama.cpp's GGUF name for one of the tiny models' HF tensor names (`None` for a name that
/// is not part of one of their checkpoints). Every expert's gate / up / down weight maps to
/// the layer's stacked `ffn_{gate,up,down}_exps.weight` (see [`expert_index`] for its place).
/// The names are those of gguf-py's `TensorNameMap` (`convert_hf_to_gguf.py`); the tests
/// compare them with the fixtures' `gguf` section, which the script takes from gguf-py.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, what) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if let Some((_, w)) = split_expert(what) {
        let g = match w {
            "w1.weight" | "gate_proj.weight" => "ffn_gate_exps.weight",
            "w3.weight" | "up_proj.weight" => "ffn_up_exps.weight",
            "w2.weight" | "down_proj.weight" => "ffn_down_exps.weight",
            _ => return None,
        };
        return Some(format!("blk.{layer}.{g}"));
    }
    let g = match what {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "block_sparse_moe.gate.weight" | "mlp.gate.weight" => "ffn_gate_inp.weight",
        "mlp.shared_expert.gate_proj.weight" => "ffn_gate_shexp.weight",
        "mlp.shared_expert.up_proj.weight" => "ffn_up_shexp.weight",
        "mlp.shared_expert.down_proj.weight" => "ffn_down_shexp.weight",
        "mlp.shared_expert_gate.weight" => "ffn_gate_inp_shexp.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}"))
}

/// `(expert, rest)` for a layer-relative name `block_sparse_moe.experts.{e}.{rest}` or
/// `mlp.experts.{e}.{rest}`.
fn split_expert(what: &str) -> Option<(usize, &str)> {
    let rest = what
        .strip_prefix("block_sparse_moe.experts.")
        .or_else(|| what.strip_prefix("mlp.experts."))?;
    let (e, w) = rest.split_once('.')?;
    Some((e.parse().ok()?, w))
}

/// The expert index of a per-expert HF tensor (`...experts.{e}...`), i.e. its place along the
/// outermost dimension of the stacked GGUF tensor; `None` for every other tensor.
pub fn expert_index(hf: &str) -> Option<usize> {
    let rest = hf.strip_prefix("model.layers.")?;
    let (_, what) = rest.split_once('.')?;
    split_expert(what).map(|(e, _)| e)
}

/// The row permutation llama.cpp's `convert_hf_to_gguf.py` applies to Llama q and k
/// weights (its `permute(weights, n_head, n_head_kv)`), so that ggml's adjacent-pair RoPE
/// computes what HF's rotate-half RoPE computes: in a `[n_head * hd][cols]` weight, HF row
/// `h*hd + j*hd/2 + i` becomes row `h*hd + 2*i + j` (`i < hd/2`, `j` in {0, 1}). Works on
/// 1-D biases too (`cols = 1`).
///
/// # Panics
/// When `w.len()` is not `n_head * hd * cols` for an even `hd`.
pub fn permute_qk(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    assert_eq!(rows * cols, w.len(), "permute_qk: ragged matrix");
    assert_eq!(
        rows % (2 * n_head),
        0,
        "permute_qk: {rows} rows, {n_head} heads"
    );
    let hd = rows / n_head;
    let mut out = vec![0.0f32; w.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..hd / 2 {
                let src = h * hd + j * hd / 2 + i;
                let dst = h * hd + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// One tensor of a GGUF file being assembled: ggml dims (`[cols, rows]` for a matrix).
#[derive(Debug, Clone)]
pub struct GgufTensor {
    /// llama.cpp name.
    pub name: String,
    /// ggml dims, `ne[0]` (the contiguous one) first.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: ember::format::gguf::TensorType,
    /// The bytes in the file layout of `ty`.
    pub data: Vec<u8>,
}

/// The contents of a tiny model's GGUF file, editable before writing (tests break it on
/// purpose): metadata in file order and tensors in file order.
#[derive(Debug, Clone)]
pub struct TinyGguf {
    /// Metadata keys and values, in file order.
    pub metadata: Vec<(String, ember::format::gguf::Value)>,
    /// Tensors, in file order.
    pub tensors: Vec<GgufTensor>,
}

/// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`) for a tiny GGUF's weight type.
fn file_type(quant: Option<ember::quant::QuantType>) -> u32 {
    use ember::quant::QuantType;
    match quant {
        None => 0,
        Some(QuantType::Q4_0) => 2,
        Some(QuantType::Q4_1) => 3,
        Some(QuantType::Q8_0) => 7,
        Some(QuantType::Q5_0) => 8,
        Some(QuantType::Q5_1) => 9,
        Some(QuantType::Q4_K) => 15,
        Some(QuantType::Q5_K) => 17,
        Some(QuantType::Q6_K) => 18,
    }
}

/// Whether `llama-quantize` quantizes a weight of these ggml dims (`src/llama-quant.cpp`):
/// it ends in `weight`, has at least 2 dims once trailing 1s are dropped (`ggml_n_dims`, so
/// Qwen2-MoE's `[64, 1]` shared-expert gate stays f32), is not a norm and is not a router
/// (`ffn_gate_inp.weight`, which the converter also always writes in f32).
fn llama_quantize_quantizes(name: &str, dims: &[u64]) -> bool {
    let n_dims = dims.iter().rposition(|&d| d != 1).map_or(1, |i| i + 1);
    name.ends_with("weight")
        && n_dims >= 2
        && !name.ends_with("_norm.weight")
        && !name.contains("ffn_gate_inp.weight")
}

impl TinyGguf {
    /// The same weights as [`write_tiny_model`]'s checkpoint, laid out the way llama.cpp's
    /// converter (`convert_hf_to_gguf.py`: `LlamaModel`, which also converts Mixtral,
    /// `Qwen2Model`, `Qwen2MoeModel`, `OlmoeModel`, `Qwen3MoeModel`) writes them: llama.cpp
    /// names, ggml dims, q/k rows permuted for the `llama` architecture (Llama and Mixtral; not
    /// for Qwen2, Qwen2-MoE, OLMoE or Qwen3-MoE, which llama.cpp runs with NeoX-style RoPE on
    /// the HF layout), the model's hyperparameters as `{arch}.*` keys and a byte-level `gpt2`
    /// vocabulary of 256 tokens. MoE variants add `{arch}.expert_count` and
    /// `{arch}.expert_used_count` (and `expert_feed_forward_length` for `qwen2moe` and
    /// `qwen3moe`, `expert_shared_feed_forward_length` for `qwen2moe`, and
    /// `attention.key_length` / `attention.value_length` for `qwen3moe`), and
    /// store each layer's experts as three 3-D tensors `blk.N.ffn_{gate,up,down}_exps.weight`:
    /// the per-expert HF `[out, in]` matrices stacked in expert order (row-major
    /// `[E][out][in]`, ggml dims `[in, out, E]`), next to the router `blk.N.ffn_gate_inp.weight`
    /// (`[64, 4]`), Qwen2-MoE's shared expert `blk.N.ffn_{gate,up,down}_shexp.weight` and its
    /// gate `blk.N.ffn_gate_inp_shexp.weight` (dims `[64, 1]`, as the converter writes the HF
    /// `[1, 64]`), OLMoE's `blk.N.attn_{q,k}_norm.weight` (`[64]`, `[32]`) and Qwen3-MoE's
    /// per-head `blk.N.attn_{q,k}_norm.weight` (`[16]` each).
    ///
    /// With `quant`, every weight `llama-quantize` would quantize is stored in that format
    /// by [`crate::quantize::quantize`]: the 2-D weights (the embedding and `output.weight`
    /// included) and the 3-D expert tensors, row by row (blocks never straddle rows, so an
    /// expert tensor is its experts' quantized matrices one after the other); norms, biases,
    /// routers and the shared-expert gate stay f32. So does a weight whose rows are not a whole
    /// number of blocks: Qwen2-MoE's `ffn_down_shexp` (48 wide), which `llama-quantize` would
    /// refuse ("Unsupported tensor size encountered") for Q8_0 / Q4_0 / Q4_1.
    ///
    /// Errors: [`ember::Error::Unsupported`] for a `quant` other than Q8_0, Q4_0 or Q4_1.
    pub fn new(v: TinyVariant, quant: Option<ember::quant::QuantType>) -> ember::Result<Self> {
        use ember::format::gguf::{TensorType, Value};
        let arch = v.gguf_arch();
        let k = |key: &str| format!("{arch}.{key}");
        let u32v = |x: usize| Value::U32(x as u32);
        let mut metadata: Vec<(String, Value)> = vec![
            ("general.architecture".into(), arch.into()),
            ("general.name".into(), format!("tiny-{}", v.name()).into()),
            ("general.file_type".into(), Value::U32(file_type(quant))),
            (k("block_count"), u32v(LAYERS)),
            (k("context_length"), u32v(MAX_POS)),
            (k("embedding_length"), u32v(HIDDEN)),
            (k("feed_forward_length"), u32v(v.intermediate_size())),
            (k("attention.head_count"), u32v(HEADS)),
            (k("attention.head_count_kv"), u32v(KV_HEADS)),
            (k("rope.freq_base"), Value::F32(ROPE_THETA as f32)),
            (
                k("attention.layer_norm_rms_epsilon"),
                Value::F32(RMS_EPS as f32),
            ),
        ];
        if v.is_moe() {
            metadata.push((k("expert_count"), u32v(EXPERTS)));
            metadata.push((k("expert_used_count"), u32v(EXPERTS_USED)));
        }
        if matches!(v, TinyVariant::Qwen2Moe | TinyVariant::Qwen3Moe) {
            metadata.push((k("expert_feed_forward_length"), u32v(EXPERT_FFN)));
        }
        if v == TinyVariant::Qwen2Moe {
            metadata.push((k("expert_shared_feed_forward_length"), u32v(SHARED_FFN)));
        }
        if v == TinyVariant::Qwen3Moe {
            // From config.json's explicit head_dim.
            metadata.push((k("attention.key_length"), u32v(HEAD_DIM)));
            metadata.push((k("attention.value_length"), u32v(HEAD_DIM)));
        }
        metadata.extend([
            (k("rope.dimension_count"), u32v(HEAD_DIM)),
            (k("vocab_size"), u32v(VOCAB)),
            ("tokenizer.ggml.model".into(), "gpt2".into()),
            ("tokenizer.ggml.pre".into(), "gpt-2".into()),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(
                    (0..=255u8)
                        .map(|b| Value::String(byte_char(b).to_string()))
                        .collect(),
                ),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(vec![Value::I32(1); VOCAB]),
            ),
            ("tokenizer.ggml.merges".into(), Value::Array(Vec::new())),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ]);

        // llama.cpp's order: embedding, output norm, output, then the blocks.
        let order = |gguf: &str| -> (usize, usize, usize) {
            const IN_BLOCK: [&str; 22] = [
                "attn_norm.weight",
                "attn_q.weight",
                "attn_q.bias",
                "attn_k.weight",
                "attn_k.bias",
                "attn_v.weight",
                "attn_v.bias",
                "attn_output.weight",
                "attn_q_norm.weight",
                "attn_k_norm.weight",
                "ffn_norm.weight",
                "ffn_gate.weight",
                "ffn_up.weight",
                "ffn_down.weight",
                "ffn_gate_inp.weight",
                "ffn_gate_exps.weight",
                "ffn_up_exps.weight",
                "ffn_down_exps.weight",
                "ffn_gate_inp_shexp.weight",
                "ffn_gate_shexp.weight",
                "ffn_up_shexp.weight",
                "ffn_down_shexp.weight",
            ];
            match gguf {
                "token_embd.weight" => (0, 0, 0),
                "output_norm.weight" => (0, 0, 1),
                "output.weight" => (0, 0, 2),
                _ => {
                    let rest = gguf.strip_prefix("blk.").unwrap_or(gguf);
                    let (l, w) = rest.split_once('.').unwrap_or(("0", rest));
                    let pos = IN_BLOCK.iter().position(|&x| x == w).unwrap_or(99);
                    (1, l.parse().unwrap_or(0), pos)
                }
            }
        };
        let mut named: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        // Per stacked expert tensor: (expert, HF shape, values) of each expert.
        type Expert = (usize, Vec<usize>, Vec<f32>);
        let mut stacks: BTreeMap<String, Vec<Expert>> = BTreeMap::new();
        for (hf, shape, values) in tiny_tensors(v) {
            let name = gguf_name(&hf).ok_or_else(|| {
                ember::Error::Internal(format!("no GGUF name for tiny tensor {hf}"))
            })?;
            if let Some(e) = expert_index(&hf) {
                stacks.entry(name).or_default().push((e, shape, values));
                continue;
            }
            let permute_heads = if arch != "llama" {
                None
            } else if name.ends_with("attn_q.weight") {
                Some(HEADS)
            } else if name.ends_with("attn_k.weight") {
                Some(KV_HEADS)
            } else {
                None
            };
            let cols = *shape.last().unwrap_or(&1);
            let values = match permute_heads {
                Some(n) => permute_qk(&values, n, cols),
                None => values,
            };
            named.push((name, shape, values));
        }
        for (name, mut experts) in stacks {
            // convert_hf_to_gguf.py: torch.stack of experts 0..E-1 along a new outer dim.
            experts.sort_by_key(|(e, ..)| *e);
            let shape = experts[0].1.clone();
            if experts.len() != EXPERTS
                || experts
                    .iter()
                    .enumerate()
                    .any(|(i, (e, s, _))| *e != i || *s != shape)
            {
                return Err(ember::Error::Internal(format!(
                    "{name}: experts do not stack"
                )));
            }
            let values: Vec<f32> = experts.into_iter().flat_map(|(_, _, x)| x).collect();
            let mut stacked = vec![EXPERTS];
            stacked.extend(shape);
            named.push((name, stacked, values));
        }
        named.sort_by_key(|(n, ..)| order(n));
        let mut tensors = Vec::with_capacity(named.len());
        for (name, shape, values) in named {
            let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
            let (ty, data) = match quant {
                Some(q)
                    if llama_quantize_quantizes(&name, &dims)
                        && (dims[0] as usize).is_multiple_of(q.block_elems()) =>
                {
                    (TensorType::Quant(q), crate::quantize::quantize(q, &values)?)
                }
                _ => (
                    TensorType::F32,
                    values.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ),
            };
            tensors.push(GgufTensor {
                name,
                dims,
                ty,
                data,
            });
        }
        Ok(TinyGguf { metadata, tensors })
    }

    /// Sets metadata `key` (in place when present, appended otherwise).
    pub fn set(&mut self, key: &str, value: impl Into<ember::format::gguf::Value>) -> &mut Self {
        let value = value.into();
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
        self
    }

    /// Removes metadata `key`; returns whether it was there.
    pub fn remove_key(&mut self, key: &str) -> bool {
        let n = self.metadata.len();
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.len() != n
    }

    /// The tensor called `name`.
    pub fn tensor_mut(&mut self, name: &str) -> Option<&mut GgufTensor> {
        self.tensors.iter_mut().find(|t| t.name == name)
    }

    /// Removes tensor `name`; returns whether it was there.
    pub fn remove_tensor(&mut self, name: &str) -> bool {
        let n = self.tensors.len();
        self.tensors.retain(|t| t.name != name);
        self.tensors.len() != n
    }

    /// A [`ember::format::gguf::GgufWriter`] holding everything.
    pub fn writer(&self) -> ember::format::gguf::GgufWriter {
        let mut w = ember::format::gguf::GgufWriter::new();
        for (k, v) in &self.metadata {
            w.add(k.clone(), v.clone());
        }
        for t in &self.tensors {
            w.add_tensor(t.name.clone(), &t.dims, t.ty, t.data.clone());
        }
        w
    }

    /// The file's bytes.
    ///
    /// Errors: as [`ember::format::gguf::GgufWriter::to_bytes`].
    pub fn to_bytes(&self) -> ember::Result<Vec<u8>> {
        self.writer().to_bytes()
    }

    /// Writes the file (atomically).
    ///
    /// Errors: as [`ember::format::gguf::GgufWriter::write_to`].
    pub fn write_to(&self, path: &Path) -> ember::Result<()> {
        self.writer().write_to(path)
    }
}

/// Writes the tiny model `v` as a GGUF file at `path`, the way llama.cpp's converter (and,
/// with `quant`, `llama-quantize`'s round-to-nearest path) would: see [`TinyGguf::new`].
///
/// Errors: [`ember::Error::Unsupported`] for a `quant` other than Q8_0, Q4_0 or Q4_1;
/// [`ember::Error::Io`] when the file cannot be written.
pub fn write_tiny_gguf(
    path: &Path,
    v: TinyVariant,
    quant: Option<ember::quant::QuantType>,
) -> ember::Result<()> {
    TinyGguf::new(v, quant)?.write_to(path)
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

    #[test]
    fn gguf_names_cover_every_tensor() {
        for v in TinyVariant::ALL {
            let shapes = tensor_shapes(v);
            let names: std::collections::HashSet<String> = shapes
                .iter()
                .map(|(n, _)| gguf_name(n).unwrap_or_else(|| panic!("{n}")))
                .collect();
            // The E gate / up / down weights of a layer share one stacked name.
            let n_experts = shapes
                .iter()
                .filter(|(n, _)| expert_index(n).is_some())
                .count();
            let stacked = if v.is_moe() { LAYERS * 3 } else { 0 };
            assert_eq!(n_experts, stacked * EXPERTS, "{}", v.name());
            assert_eq!(names.len(), shapes.len() - n_experts + stacked);
        }
        assert_eq!(
            gguf_name("model.layers.1.block_sparse_moe.experts.3.w3.weight").as_deref(),
            Some("blk.1.ffn_up_exps.weight")
        );
        assert_eq!(
            expert_index("model.layers.1.block_sparse_moe.experts.3.w3.weight"),
            Some(3)
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.experts.2.down_proj.weight").as_deref(),
            Some("blk.0.ffn_down_exps.weight")
        );
        assert_eq!(expert_index("model.layers.0.mlp.gate.weight"), None);
        assert_eq!(
            gguf_name("model.layers.0.mlp.gate.weight").as_deref(),
            Some("blk.0.ffn_gate_inp.weight")
        );
        assert_eq!(
            gguf_name("model.layers.1.mlp.down_proj.weight").as_deref(),
            Some("blk.1.ffn_down.weight")
        );
        assert_eq!(gguf_name("model.layers.x.mlp.down_proj.weight"), None);
    }

    /// The committed fixture of `v`.
    fn fixture(v: TinyVariant) -> Value {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(v.fixture_path());
        let s = fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        serde_json::from_str(&s).unwrap()
    }

    /// Qwen3-MoE is not in [`TinyVariant::ALL`] / [`TinyVariant::MOE`] yet, which the
    /// integration tests (`tests/tiny_models.rs`) iterate: the same checks against its fixture
    /// here. The Rust-written checkpoint has the script's weights (`weights_checksum`), tensor
    /// names, shapes and config; its GGUF has the converter's tensors, dims, metadata and the
    /// tensors `llama-quantize` keeps f32.
    #[test]
    fn qwen3_moe_matches_the_python_reference() {
        use ember::format::gguf::{GgufFile, TensorType};
        let v = TinyVariant::Qwen3Moe;
        let fx = fixture(v);
        assert_eq!(fx["variant"].as_str(), Some(v.name()));
        assert_eq!(fx["architecture"].as_str(), Some(v.architecture()));

        let dir = std::env::temp_dir().join(format!(
            "ember-tiny-unit-{}-{}",
            v.name(),
            std::process::id()
        ));
        write_tiny_model(&dir, v).unwrap();
        let got = weights_checksum(&dir);
        let written: Value =
            serde_json::from_slice(&fs::read(dir.join("config.json")).unwrap()).unwrap();
        let _ = fs::remove_dir_all(&dir);
        let want = u64::from_str_radix(fx["weights_checksum"].as_str().unwrap(), 16).unwrap();
        assert_eq!(got, want, "{got:016x} != {want:016x}");

        let shapes = tensor_shapes(v);
        let fx_shapes: BTreeMap<String, Vec<usize>> =
            serde_json::from_value(fx["tensor_shapes"].clone()).unwrap();
        assert_eq!(
            shapes.iter().cloned().collect::<BTreeMap<_, _>>(),
            fx_shapes
        );
        let names: Vec<&str> = shapes.iter().map(|(n, _)| n.as_str()).collect();
        let fx_names: Vec<&str> = fx["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        assert_eq!(names, fx_names);
        assert_eq!(
            fx_shapes["model.layers.1.self_attn.k_norm.weight"],
            vec![HEAD_DIM]
        );

        let cfg = config_json(v);
        assert_eq!(written, cfg);
        for (k, want) in fx["config"].as_object().unwrap() {
            if k == "attention_bias_qkv" {
                assert_eq!(want.as_bool(), Some(v.qkv_bias()));
            } else {
                assert_eq!(&cfg[k], want, "config {k}");
            }
        }
        assert_eq!(cfg["head_dim"], json!(HEAD_DIM));
        assert_eq!(cfg["norm_topk_prob"], json!(true));
        assert_eq!(fx["moe"]["norm_topk_prob"], json!(true));

        // GGUF: names (every HF tensor has one; E experts share a stacked one), dims, metadata.
        let gguf_names: std::collections::HashSet<String> =
            names.iter().map(|n| gguf_name(n).unwrap()).collect();
        let n_experts = names.iter().filter(|n| expert_index(n).is_some()).count();
        assert_eq!(n_experts, LAYERS * 3 * EXPERTS);
        assert_eq!(gguf_names.len(), names.len() - n_experts + LAYERS * 3);
        let want = &fx["gguf"];
        assert_eq!(want["architecture"].as_str(), Some(v.gguf_arch()));
        assert_eq!(want["qk_rows_permuted"].as_bool(), Some(false));
        let f = GgufFile::from_bytes(TinyGguf::new(v, None).unwrap().to_bytes().unwrap()).unwrap();
        assert_eq!(f.architecture().unwrap(), v.gguf_arch());
        let dims: BTreeMap<String, Vec<u64>> = f
            .tensors()
            .iter()
            .map(|t| (t.name.clone(), t.dims.clone()))
            .collect();
        let fx_dims: BTreeMap<String, Vec<u64>> =
            serde_json::from_value(want["tensors"].clone()).unwrap();
        assert_eq!(dims, fx_dims);
        assert_eq!(
            dims.keys()
                .cloned()
                .collect::<std::collections::HashSet<_>>(),
            gguf_names
        );
        for (key, value) in want["metadata"].as_object().unwrap() {
            let have = f
                .get(key)
                .unwrap_or_else(|| panic!("no metadata key {key}"));
            match value {
                Value::String(s) => assert_eq!(have.as_str(), Some(s.as_str()), "{key}"),
                Value::Number(n) if n.is_u64() => assert_eq!(have.as_u64(), n.as_u64(), "{key}"),
                Value::Number(n) => assert_eq!(
                    have.as_f64().unwrap() as f32,
                    n.as_f64().unwrap() as f32,
                    "{key}"
                ),
                other => panic!("{key}: unexpected {other}"),
            }
        }
        // The data: HF layout (no q/k permutation), experts stacked in expert order.
        let hf: BTreeMap<String, Vec<f32>> = tiny_tensors(v)
            .into_iter()
            .map(|(n, _, x)| (n, x))
            .collect();
        let data = |name: &str| -> Vec<f32> {
            f.tensor_data(f.tensor(name).unwrap())
                .unwrap()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        };
        for l in 0..LAYERS {
            let p = format!("model.layers.{l}.");
            for (g, h) in [
                ("attn_q.weight", "self_attn.q_proj.weight"),
                ("attn_k.weight", "self_attn.k_proj.weight"),
                ("attn_q_norm.weight", "self_attn.q_norm.weight"),
                ("attn_k_norm.weight", "self_attn.k_norm.weight"),
                ("ffn_gate_inp.weight", "mlp.gate.weight"),
            ] {
                assert_eq!(data(&format!("blk.{l}.{g}")), hf[&format!("{p}{h}")], "{g}");
            }
            for (g, w) in [
                ("ffn_gate_exps", "gate_proj"),
                ("ffn_up_exps", "up_proj"),
                ("ffn_down_exps", "down_proj"),
            ] {
                let stacked: Vec<f32> = (0..EXPERTS)
                    .flat_map(|e| hf[&format!("{p}mlp.experts.{e}.{w}.weight")].clone())
                    .collect();
                assert_eq!(data(&format!("blk.{l}.{g}.weight")), stacked, "{g}");
            }
        }
        // Quantized: exactly the fixture's f32_when_quantized stay f32 (no odd-width rows).
        let mut f32_kept: Vec<String> =
            serde_json::from_value(want["f32_when_quantized"].clone()).unwrap();
        assert_eq!(want["rows_not_whole_32_blocks"], json!([]));
        f32_kept.sort();
        let g = TinyGguf::new(v, Some(ember::quant::QuantType::Q8_0)).unwrap();
        let mut kept: Vec<String> = g
            .tensors
            .iter()
            .filter(|t| t.ty == TensorType::F32)
            .map(|t| t.name.clone())
            .collect();
        kept.sort();
        assert_eq!(kept, f32_kept);
    }

    #[test]
    fn permutation_matches_llama_cpp() {
        // 2 heads of width 4, 1 column: HF rows [h0: a0 a1 b0 b1][h1: ...] interleave.
        let w: Vec<f32> = (0..8).map(|x| x as f32).collect();
        assert_eq!(
            permute_qk(&w, 2, 1),
            vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
        );
        // Whole rows move.
        let w: Vec<f32> = (0..16).map(|x| x as f32).collect();
        assert_eq!(
            permute_qk(&w, 1, 4),
            [0, 2, 1, 3]
                .iter()
                .flat_map(|&r| (0..4).map(move |c| (r * 4 + c) as f32))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn gguf_layout() {
        use ember::format::gguf::{GgufFile, TensorType};
        let g = TinyGguf::new(TinyVariant::Qwen2, Some(ember::quant::QuantType::Q4_1)).unwrap();
        let f = GgufFile::from_bytes(g.to_bytes().unwrap()).unwrap();
        assert_eq!(f.architecture().unwrap(), "qwen2");
        let q = f.tensor("blk.0.attn_k.weight").unwrap();
        assert_eq!(q.dims, vec![HIDDEN as u64, (KV_HEADS * HEAD_DIM) as u64]);
        assert_eq!(q.ty.name(), "Q4_1");
        let b = f.tensor("blk.1.attn_v.bias").unwrap();
        assert_eq!((b.dims.clone(), b.ty), (vec![32], TensorType::F32));
        assert!(f.tensor("output.weight").is_some());
        assert_eq!(f.tensors()[0].name, "token_embd.weight");
        let t = TinyGguf::new(TinyVariant::LlamaTied, None).unwrap();
        assert!(t.tensors.iter().all(|t| t.name != "output.weight"));
        assert!(t.tensors.iter().all(|t| t.ty == TensorType::F32));
    }

    #[test]
    fn llama_quantize_rule() {
        assert!(llama_quantize_quantizes(
            "blk.0.ffn_up_exps.weight",
            &[64, 32, 4]
        ));
        assert!(llama_quantize_quantizes("token_embd.weight", &[64, 256]));
        assert!(!llama_quantize_quantizes(
            "blk.0.ffn_gate_inp.weight",
            &[64, 4]
        ));
        assert!(!llama_quantize_quantizes(
            "blk.0.ffn_gate_inp_shexp.weight",
            &[64, 1]
        ));
        assert!(!llama_quantize_quantizes("blk.0.attn_q_norm.weight", &[64]));
        assert!(!llama_quantize_quantizes("blk.0.attn_q.bias", &[64]));
    }
}
