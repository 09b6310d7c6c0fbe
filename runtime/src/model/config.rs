//! Model hyperparameters, read from GGUF metadata or an HF `config.json`, validated so
//! that nothing later can overflow or divide by zero.

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::gguf::GgufFile;
use crate::kernels::moe::{check_top_k, Gating};
use crate::kernels::rope::RopeConfig;

/// Architectures of the Llama family that Ember runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama 1/2/3, SmolLM, TinyLlama and friends.
    Llama,
    /// Qwen2 / Qwen2.5 (biases on q, k and v).
    Qwen2,
    /// Mistral (a Llama layout).
    Mistral,
    /// Mixtral: Mistral with a Mixture-of-Experts feed-forward (GGUF files call it `llama`
    /// with an expert count).
    Mixtral,
    /// Qwen2-MoE: Qwen2 attention, routed experts plus a gated shared expert.
    Qwen2Moe,
    /// Qwen3-MoE: per-head q/k RMSNorms, routed experts renormalized.
    Qwen3Moe,
    /// OLMoE: q/k RMSNorms over all heads, routed experts.
    Olmoe,
}

impl Arch {
    /// The GGUF `general.architecture` / HF `model_type` name.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Mistral => "mistral",
            Arch::Mixtral => "mixtral",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Olmoe => "olmoe",
        }
    }

    /// Rotary embedding rotates halves of each head (GPT-NeoX style) in GGUF files; the
    /// Llama-layout families rotate adjacent pairs there, because llama.cpp's converter
    /// permutes their q and k rows.
    pub fn gguf_neox(self) -> bool {
        !matches!(self, Arch::Llama | Arch::Mistral | Arch::Mixtral)
    }

    /// A Mixture-of-Experts family.
    pub fn is_moe(self) -> bool {
        matches!(
            self,
            Arch::Mixtral | Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::Olmoe
        )
    }

    /// Whether the family renormalizes its top-k expert weights when the file does not say
    /// (`norm_topk_prob`; Mixtral always does).
    fn default_topk_renorm(self) -> bool {
        matches!(self, Arch::Mixtral | Arch::Qwen3Moe)
    }

    fn parse(s: &str, path: Option<&Path>) -> Result<Arch> {
        match s {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            "mistral" => Ok(Arch::Mistral),
            "mixtral" => Ok(Arch::Mixtral),
            "qwen2_moe" | "qwen2moe" => Ok(Arch::Qwen2Moe),
            "qwen3_moe" | "qwen3moe" => Ok(Arch::Qwen3Moe),
            "olmoe" => Ok(Arch::Olmoe),
            other => Err(Error::Unsupported(format!(
                "{}model architecture {other:?} (Ember runs llama, qwen2, mistral, mixtral, \
                 qwen2_moe, qwen3_moe and olmoe)",
                path.map(|p| format!("{}: ", p.display()))
                    .unwrap_or_default()
            ))),
        }
    }
}

/// RMSNorms on the query and key projections before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QkNorm {
    /// None (most families).
    None,
    /// One norm over the whole q (and k) output, all heads together (OLMoE).
    Whole,
    /// One norm per head, weights `[head_dim]` shared by the heads (Qwen3).
    PerHead,
}

/// The Mixture-of-Experts feed-forward of every layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MoeConfig {
    /// Routed experts per layer.
    pub n_experts: usize,
    /// Experts each token goes to.
    pub top_k: usize,
    /// Width of each expert's SwiGLU MLP.
    pub expert_ff: usize,
    /// How router logits become weights.
    pub gating: Gating,
    /// Width of the shared expert every token also goes through (0: none; Qwen2-MoE).
    pub shared_ff: usize,
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    /// Architecture.
    pub arch: Arch,
    /// Display name (GGUF `general.name` or the directory name).
    pub name: String,
    /// Vocabulary size (rows of the embedding table).
    pub vocab: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Feed-forward (intermediate) size.
    pub ff: usize,
    /// RMSNorm epsilon.
    pub norm_eps: f32,
    /// Rotary embedding parameters.
    #[serde(skip)]
    pub rope: RopeConfig,
    /// Context length the model was trained for.
    pub train_ctx: usize,
    /// The output projection is the embedding table.
    pub tied_embeddings: bool,
    /// q, k and v projections carry biases.
    pub qkv_bias: bool,
    /// RMSNorms on q and k.
    pub qk_norm: QkNorm,
    /// Mixture-of-Experts feed-forward ([`MoeConfig::expert_ff`] is each expert's width;
    /// `ff` keeps the file's dense feed-forward width, used by no MoE layer).
    pub moe: Option<MoeConfig>,
}

impl ModelConfig {
    /// Query width (`n_heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Key (and value) width (`n_kv_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Width of a fused q|k|v row.
    pub fn qkv_dim(&self) -> usize {
        self.q_dim() + 2 * self.kv_dim()
    }

    /// Reads the hyperparameters of a GGUF file.
    pub fn from_gguf(g: &GgufFile) -> Result<ModelConfig> {
        let path = g.path();
        let a = g.architecture()?.to_string();
        let a = a.as_str();
        let mut arch = Arch::parse(a, path)?;
        let need = |key: &str| -> Result<usize> {
            let k = format!("{a}.{key}");
            g.get_u64(&k)?
                .map(|v| v as usize)
                .ok_or_else(|| Error::format(path, format!("missing metadata {k}")))
        };
        let opt = |key: &str| -> Result<Option<usize>> {
            Ok(g.get_u64(&format!("{a}.{key}"))?.map(|v| v as usize))
        };
        let optf = |key: &str| -> Result<Option<f64>> { g.get_f64(&format!("{a}.{key}")) };
        let hidden = need("embedding_length")?;
        let n_heads = need("attention.head_count")?;
        let n_kv_heads = opt("attention.head_count_kv")?.unwrap_or(n_heads);
        let head_dim = match opt("attention.key_length")? {
            Some(h) => h,
            None if n_heads > 0 => hidden / n_heads,
            None => 0,
        };
        let vocab = match opt("vocab_size")? {
            Some(v) => v,
            None => g
                .tensor("token_embd.weight")
                .map(|t| t.rows() as usize)
                .ok_or_else(|| Error::format(path, "no token_embd.weight tensor"))?,
        };
        let n_rot = opt("rope.dimension_count")?.unwrap_or(head_dim);
        let base = optf("rope.freq_base")?.unwrap_or(10000.0);
        let n_experts = opt("expert_count")?.unwrap_or(0);
        if arch == Arch::Llama && n_experts > 0 {
            arch = Arch::Mixtral;
        }
        // GGUF Llama/Mistral/Mixtral q and k rows are permuted by the converter for
        // adjacent-pair rotation; the others keep the HF layout and rotate halves.
        let mut rope = RopeConfig::new(n_rot, base, arch.gguf_neox());
        let train_ctx = opt("context_length")?.unwrap_or(2048);
        match g.get_str(&format!("{a}.rope.scaling.type"))? {
            None | Some("none") => {}
            Some("linear") => {
                let f = optf("rope.scaling.factor")?.unwrap_or(1.0);
                rope.freq_scale = 1.0 / f;
            }
            Some("yarn") => {
                let f = optf("rope.scaling.factor")?.unwrap_or(1.0);
                rope.freq_scale = 1.0 / f;
                rope.ext_factor = 1.0;
                rope.orig_ctx = opt("rope.scaling.original_context_length")?.unwrap_or(train_ctx);
                rope.attn_factor = optf("rope.scaling.attn_factor")?.unwrap_or(1.0);
                rope.beta_fast = optf("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0);
                rope.beta_slow = optf("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0);
            }
            Some(other) => {
                return Err(Error::Unsupported(format!("rope scaling type {other:?}")));
            }
        }
        let moe = if n_experts > 0 || arch.is_moe() {
            let top_k = need("expert_used_count")?;
            let ff = need("feed_forward_length");
            let expert_ff = match opt("expert_feed_forward_length")? {
                Some(f) => f,
                None => ff?,
            };
            let renorm = match g.get_bool(&format!("{a}.expert_weights_norm"))? {
                Some(b) => b,
                None => arch.default_topk_renorm(),
            };
            // llama.cpp's expert_gating_func: 1 softmax, 2 sigmoid.
            let gating = match (opt("expert_gating_func")?, renorm) {
                (None | Some(0) | Some(1), true) => Gating::SoftmaxRenorm,
                (None | Some(0) | Some(1), false) => Gating::Softmax,
                (Some(2), true) => Gating::SigmoidRenorm,
                (Some(f), _) => {
                    return Err(Error::Unsupported(format!(
                        "{}expert gating function {f} (softmax, or sigmoid renormalized)",
                        path.map(|p| format!("{}: ", p.display()))
                            .unwrap_or_default()
                    )))
                }
            };
            Some(MoeConfig {
                n_experts,
                top_k,
                expert_ff,
                gating,
                shared_ff: opt("expert_shared_feed_forward_length")?.unwrap_or(0),
            })
        } else {
            None
        };
        let qk_norm = match g.tensor("blk.0.attn_q_norm.weight") {
            None => QkNorm::None,
            Some(t) if t.n_elements() == head_dim as u64 => QkNorm::PerHead,
            Some(_) => QkNorm::Whole,
        };
        let ff = match (opt("feed_forward_length")?, &moe) {
            (Some(f), _) => f,
            (None, Some(m)) => m.expert_ff,
            (None, None) => need("feed_forward_length")?,
        };
        let cfg = ModelConfig {
            arch,
            name: g.get_str("general.name")?.unwrap_or("model").to_string(),
            vocab,
            hidden,
            n_layers: need("block_count")?,
            n_heads,
            n_kv_heads,
            head_dim,
            ff,
            norm_eps: optf("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5) as f32,
            rope,
            train_ctx,
            tied_embeddings: g.tensor("output.weight").is_none(),
            qkv_bias: g.tensor("blk.0.attn_q.bias").is_some(),
            qk_norm,
            moe,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads an HF `config.json`.
    pub fn from_hf_config(json: &str, path: &Path) -> Result<ModelConfig> {
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| Error::format(Some(path), format!("invalid JSON: {e}")))?;
        let p = Some(path);
        let get = |k: &str| v.get(k).filter(|x| !x.is_null());
        let num = |k: &str| -> Result<Option<usize>> {
            match get(k) {
                None => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| Error::format(p, format!("{k} is not a non-negative integer"))),
            }
        };
        let need = |k: &str| num(k)?.ok_or_else(|| Error::format(p, format!("missing {k}")));
        let float = |x: Option<&serde_json::Value>, k: &str| -> Result<Option<f64>> {
            match x {
                None => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| Error::format(p, format!("{k} is not a number"))),
            }
        };
        let model_type = get("model_type")
            .and_then(|x| x.as_str())
            .ok_or_else(|| Error::format(p, "missing model_type"))?;
        let arch = Arch::parse(model_type, p)?;
        let hidden = need("hidden_size")?;
        let n_heads = need("num_attention_heads")?;
        let head_dim = match num("head_dim")? {
            Some(h) => h,
            None if n_heads > 0 => hidden / n_heads,
            None => 0,
        };
        // transformers 5 moved rope_theta into rope_parameters.
        let rp = get("rope_parameters");
        let theta = float(
            rp.and_then(|r| r.get("rope_theta")),
            "rope_parameters.rope_theta",
        )?
        .or(float(get("rope_theta"), "rope_theta")?)
        .unwrap_or(10000.0);
        let mut rope = RopeConfig::new(head_dim, theta, true);
        let scaling = get("rope_scaling").or(rp.filter(|r| r.get("rope_type").is_some()));
        let train_ctx = num("max_position_embeddings")?.unwrap_or(2048);
        if let Some(s) = scaling {
            let ty = s
                .get("rope_type")
                .or(s.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            let factor = float(s.get("factor"), "rope_scaling.factor")?.unwrap_or(1.0);
            match ty {
                "default" => {}
                "linear" => rope.freq_scale = 1.0 / factor,
                "yarn" => {
                    rope.freq_scale = 1.0 / factor;
                    rope.ext_factor = 1.0;
                    rope.orig_ctx = s
                        .get("original_max_position_embeddings")
                        .and_then(|x| x.as_u64())
                        .map(|x| x as usize)
                        .unwrap_or(train_ctx);
                    rope.beta_fast = float(s.get("beta_fast"), "beta_fast")?.unwrap_or(32.0);
                    rope.beta_slow = float(s.get("beta_slow"), "beta_slow")?.unwrap_or(1.0);
                    rope.attn_factor =
                        float(s.get("attention_factor"), "attention_factor")?.unwrap_or(1.0);
                }
                other => {
                    return Err(Error::Unsupported(format!(
                        "{}: rope scaling {other:?}",
                        path.display()
                    )))
                }
            }
        }
        let qkv_bias = match arch {
            Arch::Qwen2 | Arch::Qwen2Moe => true,
            _ => get("attention_bias")
                .and_then(|b| b.as_bool())
                .unwrap_or(false),
        };
        let moe = if arch.is_moe() {
            let n_experts = match arch {
                Arch::Mixtral => need("num_local_experts")?,
                _ => need("num_experts")?,
            };
            let expert_ff = match num("moe_intermediate_size")? {
                Some(f) => f,
                None => need("intermediate_size")?,
            };
            let renorm = match arch {
                Arch::Mixtral => true,
                _ => get("norm_topk_prob")
                    .and_then(|b| b.as_bool())
                    .unwrap_or(arch.default_topk_renorm()),
            };
            if num("decoder_sparse_step")?.is_some_and(|s| s != 1)
                || get("mlp_only_layers")
                    .and_then(|l| l.as_array())
                    .is_some_and(|l| !l.is_empty())
            {
                return Err(Error::Unsupported(format!(
                    "{}: dense layers among the MoE layers (decoder_sparse_step / \
                     mlp_only_layers)",
                    path.display()
                )));
            }
            if get("clip_qkv").is_some() {
                return Err(Error::Unsupported(format!("{}: clip_qkv", path.display())));
            }
            Some(MoeConfig {
                n_experts,
                top_k: need("num_experts_per_tok")?,
                expert_ff,
                gating: if renorm {
                    Gating::SoftmaxRenorm
                } else {
                    Gating::Softmax
                },
                shared_ff: num("shared_expert_intermediate_size")?.unwrap_or(0),
            })
        } else {
            None
        };
        let qk_norm = match arch {
            Arch::Olmoe => QkNorm::Whole,
            Arch::Qwen3Moe => QkNorm::PerHead,
            _ => QkNorm::None,
        };
        let cfg = ModelConfig {
            arch,
            name: path
                .parent()
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into()),
            vocab: need("vocab_size")?,
            hidden,
            n_layers: need("num_hidden_layers")?,
            n_heads,
            n_kv_heads: num("num_key_value_heads")?.unwrap_or(n_heads),
            head_dim,
            ff: need("intermediate_size")?,
            norm_eps: float(get("rms_norm_eps"), "rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope,
            train_ctx,
            tied_embeddings: get("tie_word_embeddings")
                .and_then(|b| b.as_bool())
                .unwrap_or(false),
            qkv_bias,
            qk_norm,
            moe,
        };
        cfg.validate(p)?;
        Ok(cfg)
    }

    /// Rejects shapes no kernel can run, or absurd ones that would overflow sizes.
    pub fn validate(&self, path: Option<&Path>) -> Result<()> {
        let bad = |d: String| Err(Error::format(path, d));
        let c = self;
        const MAX: usize = 1 << 24;
        for (name, v) in [
            ("vocab", c.vocab),
            ("hidden size", c.hidden),
            ("layers", c.n_layers),
            ("heads", c.n_heads),
            ("kv heads", c.n_kv_heads),
            ("head size", c.head_dim),
            ("feed-forward size", c.ff),
        ] {
            if v == 0 || v > MAX {
                return bad(format!("{name} = {v} is out of range"));
            }
        }
        if c.n_layers > 4096 || c.n_heads > 4096 {
            return bad(format!(
                "{} layers / {} heads is out of range",
                c.n_layers, c.n_heads
            ));
        }
        if c.n_heads % c.n_kv_heads != 0 {
            return bad(format!(
                "{} heads are not a multiple of {} kv heads",
                c.n_heads, c.n_kv_heads
            ));
        }
        if c.n_heads / c.n_kv_heads > 8 {
            return Err(Error::Unsupported(format!(
                "{} query heads per kv head (at most 8)",
                c.n_heads / c.n_kv_heads
            )));
        }
        if c.head_dim % 4 != 0 || c.head_dim > 256 {
            return Err(Error::Unsupported(format!(
                "head size {} (a multiple of 4, at most 256)",
                c.head_dim
            )));
        }
        if c.rope.n_rot == 0 || c.rope.n_rot % 2 != 0 || c.rope.n_rot > c.head_dim {
            return bad(format!(
                "rope dimension {} for head size {}",
                c.rope.n_rot, c.head_dim
            ));
        }
        let finite_eps = c.norm_eps.is_finite() && c.norm_eps >= 0.0;
        let finite_base = c.rope.base.is_finite() && c.rope.base > 1.0;
        if !finite_eps || !finite_base {
            return bad(format!(
                "norm epsilon {} / rope base {}",
                c.norm_eps, c.rope.base
            ));
        }
        if !(c.rope.freq_scale.is_finite() && c.rope.freq_scale > 0.0) {
            return bad(format!("rope scale {}", c.rope.freq_scale));
        }
        if let Some(m) = &c.moe {
            check_top_k(m.n_experts, m.top_k).map_err(|e| match e {
                Error::InvalidArgument(d) => Error::format(path, d),
                other => other,
            })?;
            if m.expert_ff == 0 || m.expert_ff > MAX || m.shared_ff > MAX {
                return bad(format!(
                    "expert width {} / shared expert width {}",
                    m.expert_ff, m.shared_ff
                ));
            }
        }
        Ok(())
    }
}
