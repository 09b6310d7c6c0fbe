//! LoRA adapters: `y = W x + s * B (A x)` on chosen linear layers, `s = alpha / r`
//! (`alpha / sqrt(r)` with rsLoRA). Stored in the PEFT layout: `adapter_config.json` and
//! `adapter_model.safetensors` with keys
//! `base_model.model.model.layers.{i}.{self_attn|mlp}.{q_proj|...}.lora_{A|B}.weight`,
//! A `[r][in]`, B `[out][r]`, in HF row order (Ember permutes q/k rows for GGUF bases).
//!
//! A *mixture of LoRA experts* ([`LoraExperts`]) puts `E` LoRA pairs of rank `r` behind a
//! router on each adapted layer: `y = W x + s * sum_{e in top-k} g_e B_e A_e x`, the gates
//! `g` a softmax of the router's logits `R x` over the chosen `k` (or over all experts, kept
//! for the chosen ones, without renormalization). Its A and B are stored stacked: A
//! `[E r][in]` (expert `e` is rows `e r ..`), B `[out][E r]` (expert `e` is columns `e r ..`),
//! the router `[E][in]` beside them (`lora_router.weight`), with `peft_type`
//! `EMBER_MOE_LORA` so that no tool mistakes it for a plain LoRA adapter.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::Model;
use crate::util::Rng;

use super::peft::{self, read_f32, PeftConfig};

/// A linear layer LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Attention output projection.
    O,
    /// SwiGLU gate.
    Gate,
    /// SwiGLU up projection.
    Up,
    /// Down projection.
    Down,
}

impl Target {
    /// All targets, in PEFT module order.
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// PEFT / HF module name (`q_proj`).
    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    fn parent(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            _ => "mlp",
        }
    }

    /// Parses a module name (`q_proj` or `q`).
    pub fn parse(s: &str) -> Result<Target> {
        let s = s.trim();
        Target::ALL
            .into_iter()
            .find(|t| t.module() == s || t.module().trim_end_matches("_proj") == s)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown LoRA target {s:?} (q, k, v, o, gate, up, down)"
                ))
            })
    }

    /// (output, input) features of this layer.
    pub fn dims(self, c: &ModelConfig) -> (usize, usize) {
        match self {
            Target::Q => (c.q_dim(), c.hidden),
            Target::K | Target::V => (c.kv_dim(), c.hidden),
            Target::O => (c.hidden, c.q_dim()),
            Target::Gate | Target::Up => (c.ff, c.hidden),
            Target::Down => (c.hidden, c.ff),
        }
    }

    /// The PEFT tensor key of this layer's A or B matrix.
    pub fn peft_key(self, layer: usize, b: bool) -> String {
        self.key(layer, if b { "B" } else { "A" })
    }

    /// The tensor key of this layer's router (a mixture of LoRA experts).
    pub fn router_key(self, layer: usize) -> String {
        self.key(layer, "router")
    }

    fn key(self, layer: usize, what: &str) -> String {
        format!(
            "base_model.model.model.layers.{layer}.{}.{}.lora_{what}.weight",
            self.parent(),
            self.module(),
        )
    }
}

/// Shape and scaling of a LoRA adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank r.
    pub rank: usize,
    /// Alpha (scale numerator).
    pub alpha: f32,
    /// rsLoRA: scale by alpha / sqrt(r) instead of alpha / r.
    pub rslora: bool,
    /// Adapted layers.
    pub targets: Vec<Target>,
    /// A mixture of LoRA experts instead of one pair per layer (`rank` is each expert's).
    #[serde(default)]
    pub experts: Option<LoraExperts>,
}

/// Routing of a mixture of LoRA experts: every adapted layer has `n_experts` pairs of rank
/// `rank` and its own router, and each token uses the `top_k` experts the router scores
/// highest.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoraExperts {
    /// Experts per adapted layer (2..=32).
    pub n_experts: usize,
    /// Experts each token uses (1..=n_experts).
    pub top_k: usize,
    /// Gates are the softmax over the chosen experts (they sum to 1); otherwise the
    /// chosen experts keep their softmax-over-all weight (Switch Transformer's top-1 gate,
    /// through which the router learns from the task loss even with one expert).
    pub renormalize: bool,
}

impl LoraExperts {
    /// Most experts per layer (the route kernels keep a token's choice in one 32-bit mask).
    pub const MAX_EXPERTS: usize = 32;

    fn validate(&self) -> Result<()> {
        if !(2..=Self::MAX_EXPERTS).contains(&self.n_experts)
            || self.top_k == 0
            || self.top_k > self.n_experts
        {
            return Err(Error::InvalidArgument(format!(
                "mixture of LoRA experts: {} experts, top-{} (2..={} experts, 1 <= top-k <= experts)",
                self.n_experts,
                self.top_k,
                Self::MAX_EXPERTS
            )));
        }
        Ok(())
    }
}

impl LoraConfig {
    /// Plain LoRA of `rank` on `targets` with alpha `alpha`.
    pub fn new(rank: usize, alpha: f32, targets: Vec<Target>) -> LoraConfig {
        LoraConfig {
            rank,
            alpha,
            rslora: false,
            targets,
            experts: None,
        }
    }

    /// Experts per layer (1 for plain LoRA).
    pub fn n_experts(&self) -> usize {
        self.experts.map_or(1, |e| e.n_experts)
    }

    /// Rows of the stored A (columns of B): the rank times the experts.
    pub fn width(&self) -> usize {
        self.rank * self.n_experts()
    }

    /// The scale s of `s * B A x`.
    pub fn scale(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }

    fn validate(&self) -> Result<()> {
        if self.rank == 0 || self.rank > 256 {
            return Err(Error::InvalidArgument(format!(
                "LoRA rank {} (1..=256)",
                self.rank
            )));
        }
        if !self.alpha.is_finite() || self.targets.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "LoRA alpha {} / targets {:?}",
                self.alpha, self.targets
            )));
        }
        if let Some(e) = &self.experts {
            e.validate()?;
            if self.width() > 256 {
                return Err(Error::InvalidArgument(format!(
                    "mixture of LoRA experts: {} experts of rank {} exceed 256 stacked rows",
                    e.n_experts, self.rank
                )));
            }
        }
        Ok(())
    }
}

/// One adapted layer: A `[rank][in]` and B `[out][rank]`, HF row order (a mixture's
/// experts stacked: A `[E rank][in]`, B `[out][E rank]`, and its router `[E][in]`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    /// Down projection.
    pub a: Vec<f32>,
    /// Up projection.
    pub b: Vec<f32>,
    /// The router of a mixture of experts (empty for plain LoRA).
    pub router: Vec<f32>,
}

/// A LoRA adapter's weights on the host.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// Shape and scaling.
    pub config: LoraConfig,
    /// `(layer, target)` -> matrices (layers not listed are not adapted).
    pub weights: BTreeMap<(usize, Target), LoraPair>,
    /// Identity of the base model it was made for ([`Model::identity`]), when known.
    pub base_identity: Option<u64>,
    /// Name of the base model (informational).
    pub base_name: String,
}

/// `peft_type` of a mixture of LoRA experts (not a PEFT type: PEFT refuses it instead of
/// loading it as plain LoRA without its router).
pub const MOE_LORA: &str = "EMBER_MOE_LORA";

fn fmt_err(path: &Path, d: impl Into<String>) -> Error {
    Error::format(Some(path), d)
}

impl LoraAdapter {
    /// A fresh adapter initialized as PEFT does: A Kaiming-uniform (`a = sqrt(5)`, i.e.
    /// uniform in `±1/sqrt(in)`), B zero, so it starts as the identity. A mixture's
    /// experts each draw their own A, and its router is uniform in `±1/sqrt(in)` (as
    /// `nn.Linear`), so that tokens spread over the experts from the start.
    pub fn init(model: &ModelConfig, config: LoraConfig, seed: u64) -> Result<LoraAdapter> {
        config.validate()?;
        let mut rng = Rng::new(seed);
        let mut weights = BTreeMap::new();
        let width = config.width();
        for layer in 0..model.n_layers {
            for &t in &config.targets {
                let (out, inp) = t.dims(model);
                let bound = 1.0 / (inp as f32).sqrt();
                let a = rng.vec(width * inp, -bound, bound);
                let router = match config.experts {
                    Some(e) => rng.vec(e.n_experts * inp, -bound, bound),
                    None => Vec::new(),
                };
                weights.insert(
                    (layer, t),
                    LoraPair {
                        a,
                        b: vec![0.0; out * width],
                        router,
                    },
                );
            }
        }
        Ok(LoraAdapter {
            config,
            weights,
            base_identity: None,
            base_name: String::new(),
        })
    }

    /// One adapter equal to applying all of `parts` (adapter, strength) at once: their
    /// ranks are concatenated, `A = [s1 A1; s2 A2; ...]` (scales folded into A),
    /// `B = [B1 B2 ...]`, scale 1 — so `B A x = sum_i s_i B_i A_i x` exactly.
    pub fn stack(parts: &[(&LoraAdapter, f32)]) -> Result<LoraAdapter> {
        let first = parts
            .first()
            .ok_or_else(|| Error::InvalidArgument("no adapters to stack".into()))?;
        if parts.len() == 1 && first.1 == 1.0 {
            return Ok(first.0.clone());
        }
        if parts.iter().any(|(a, _)| a.config.experts.is_some()) {
            return Err(Error::Unsupported(
                "stacking a mixture of LoRA experts with other adapters (its router decides per token)".into(),
            ));
        }
        let rank: usize = parts.iter().map(|(a, _)| a.config.rank).sum();
        if rank > 256 {
            return Err(Error::InvalidArgument(format!(
                "stacked rank {rank} exceeds 256"
            )));
        }
        if parts
            .iter()
            .any(|(a, _)| a.base_identity != first.0.base_identity)
        {
            return Err(Error::InvalidArgument(
                "adapters for different base models".into(),
            ));
        }
        let mut keys: Vec<(usize, Target)> = parts
            .iter()
            .flat_map(|(a, _)| a.weights.keys().copied())
            .collect();
        keys.sort();
        keys.dedup();
        let mut targets: Vec<Target> = keys.iter().map(|k| k.1).collect();
        targets.sort();
        targets.dedup();
        let mut weights = BTreeMap::new();
        for key in keys {
            // Dimensions from any adapter that has this layer.
            let (out, inp) = parts
                .iter()
                .find_map(|(a, _)| {
                    a.weights
                        .get(&key)
                        .map(|p| (p.b.len() / a.config.rank, p.a.len() / a.config.rank))
                })
                .unwrap_or((0, 0));
            let mut a_rows: Vec<f32> = Vec::with_capacity(rank * inp);
            let mut b = vec![0.0f32; out * rank];
            let mut col = 0;
            for (ad, strength) in parts {
                let r = ad.config.rank;
                let s = ad.config.scale() * strength;
                match ad.weights.get(&key) {
                    Some(p) => {
                        a_rows.extend(p.a.iter().map(|v| v * s));
                        for o in 0..out {
                            b[o * rank + col..o * rank + col + r]
                                .copy_from_slice(&p.b[o * r..(o + 1) * r]);
                        }
                    }
                    None => a_rows.extend(std::iter::repeat_n(0.0, r * inp)),
                }
                col += r;
            }
            weights.insert(
                key,
                LoraPair {
                    a: a_rows,
                    b,
                    router: Vec::new(),
                },
            );
        }
        Ok(LoraAdapter {
            config: LoraConfig::new(rank, rank as f32, targets),
            weights,
            base_identity: first.0.base_identity,
            base_name: first.0.base_name.clone(),
        })
    }

    /// Checks that every pair fits `c` (layer in range, A, B and router sizes), naming the
    /// adapter as `what` in the error.
    pub fn check_fits(&self, c: &ModelConfig, what: &str) -> Result<()> {
        let width = self.config.width();
        for (&(l, t), p) in &self.weights {
            let (out, inp) = t.dims(c);
            let router = self.config.experts.map_or(0, |e| e.n_experts * inp);
            if l >= c.n_layers
                || p.a.len() != width * inp
                || p.b.len() != out * width
                || p.router.len() != router
            {
                return Err(Error::InvalidArgument(format!(
                    "{what}: layer {l} {} does not fit this model",
                    t.module()
                )));
            }
        }
        Ok(())
    }

    /// Trainable parameter count.
    pub fn n_params(&self) -> usize {
        self.weights
            .values()
            .map(|p| p.a.len() + p.b.len() + p.router.len())
            .sum()
    }

    /// Loads a PEFT adapter directory and checks it against `model` (shapes, and the base
    /// identity when the adapter records one).
    pub fn load(dir: &Path, model: &Model) -> Result<LoraAdapter> {
        let pc = PeftConfig::read(dir)?;
        let cfg_path = pc.path.clone();
        let get = |k: &str| pc.get(k);
        let mixture = match pc.peft_type() {
            None | Some("LORA") => false,
            Some(MOE_LORA) => true,
            Some(t) => {
                return Err(Error::Unsupported(format!(
                    "{}: PEFT type {t} is not LORA",
                    cfg_path.display()
                )))
            }
        };
        for unsupported in ["use_dora", "lora_bias"] {
            if get(unsupported).and_then(|b| b.as_bool()).unwrap_or(false) {
                return Err(Error::Unsupported(format!(
                    "{}: {unsupported}",
                    cfg_path.display()
                )));
            }
        }
        if get("bias")
            .and_then(|b| b.as_str())
            .is_some_and(|b| b != "none")
        {
            return Err(Error::Unsupported(format!(
                "{}: trained biases (bias = {})",
                cfg_path.display(),
                get("bias").unwrap_or(&serde_json::Value::Null)
            )));
        }
        if get("modules_to_save")
            .and_then(|m| m.as_array())
            .is_some_and(|m| !m.is_empty())
        {
            return Err(Error::Unsupported(format!(
                "{}: modules_to_save (fully trained modules besides LoRA)",
                cfg_path.display()
            )));
        }
        for pattern in ["rank_pattern", "alpha_pattern"] {
            if get(pattern)
                .and_then(|m| m.as_object())
                .is_some_and(|m| !m.is_empty())
            {
                return Err(Error::Unsupported(format!(
                    "{}: per-module {pattern}",
                    cfg_path.display()
                )));
            }
        }
        if get("fan_in_fan_out")
            .and_then(|b| b.as_bool())
            .unwrap_or(false)
        {
            return Err(Error::Unsupported(format!(
                "{}: fan_in_fan_out",
                cfg_path.display()
            )));
        }
        let rank = get("r")
            .and_then(|r| r.as_u64())
            .ok_or_else(|| fmt_err(&cfg_path, "missing r"))? as usize;
        let alpha = get("lora_alpha")
            .and_then(|a| a.as_f64())
            .unwrap_or(rank as f64) as f32;
        let rslora = get("use_rslora").and_then(|b| b.as_bool()).unwrap_or(false);
        let targets: Vec<Target> = match get("target_modules") {
            Some(serde_json::Value::String(s)) if s == "all-linear" => Target::ALL.to_vec(),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|m| {
                    m.as_str()
                        .ok_or_else(|| fmt_err(&cfg_path, "target_modules holds a non-string"))
                        .and_then(Target::parse)
                })
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(Error::Unsupported(format!(
                    "{}: target_modules {other}",
                    cfg_path.display()
                )))
            }
            None => return Err(fmt_err(&cfg_path, "missing target_modules")),
        };
        let experts = if mixture {
            Some(LoraExperts {
                n_experts: pc.usize("moe_experts")?,
                top_k: pc.usize("moe_top_k")?,
                renormalize: get("moe_renormalize")
                    .and_then(|b| b.as_bool())
                    .unwrap_or(true),
            })
        } else {
            None
        };
        let config = LoraConfig {
            rank,
            alpha,
            rslora,
            targets,
            experts,
        };
        config.validate()?;
        let width = config.width();
        let base_identity = pc.check_base(dir, model)?;
        let (st_path, bytes) = peft::read_tensors(dir)?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| fmt_err(&st_path, format!("invalid safetensors: {e}")))?;
        let mc = &model.config;
        let mut weights = BTreeMap::new();
        let mut used = 0;
        for layer in 0..mc.n_layers {
            for &t in &config.targets {
                let (ka, kb) = (t.peft_key(layer, false), t.peft_key(layer, true));
                let (a, b) = match (read_f32(&st, &ka, &st_path)?, read_f32(&st, &kb, &st_path)?) {
                    (Some(a), Some(b)) => (a, b),
                    (None, None) => continue,
                    _ => {
                        return Err(fmt_err(
                            &st_path,
                            format!("layer {layer} {}: only one of lora_A/lora_B", t.module()),
                        ))
                    }
                };
                let (out, inp) = t.dims(mc);
                if a.1 != [width, inp] || b.1 != [out, width] {
                    return Err(fmt_err(
                        &st_path,
                        format!(
                            "{ka}: A {:?} and B {:?}, the model needs [{width}, {inp}] and [{out}, {width}]",
                            a.1, b.1
                        ),
                    ));
                }
                let router = match config.experts {
                    None => Vec::new(),
                    Some(e) => {
                        let kr = t.router_key(layer);
                        match read_f32(&st, &kr, &st_path)? {
                            Some((r, shape)) if shape == [e.n_experts, inp] => r,
                            Some((_, shape)) => {
                                return Err(fmt_err(
                                    &st_path,
                                    format!(
                                        "{kr}: {shape:?}, the model needs [{}, {inp}]",
                                        e.n_experts
                                    ),
                                ))
                            }
                            None => {
                                return Err(fmt_err(
                                    &st_path,
                                    format!("layer {layer} {}: no router", t.module()),
                                ))
                            }
                        }
                    }
                };
                used += 2 + !router.is_empty() as usize;
                weights.insert(
                    (layer, t),
                    LoraPair {
                        a: a.0,
                        b: b.0,
                        router,
                    },
                );
            }
        }
        if used == 0 {
            return Err(fmt_err(&st_path, "no LoRA weights for this model's layers"));
        }
        if let Some(extra) = st.names().into_iter().find(|n| {
            n.contains("lora_")
                && !weights.iter().any(|((l, t), p)| {
                    t.peft_key(*l, false) == **n
                        || t.peft_key(*l, true) == **n
                        || (!p.router.is_empty() && t.router_key(*l) == **n)
                })
        }) {
            return Err(fmt_err(
                &st_path,
                format!("tensor {extra} does not belong to this model's layers"),
            ));
        }
        Ok(LoraAdapter {
            config,
            weights,
            base_identity,
            base_name: pc.base_name(),
        })
    }

    /// Saves the adapter in the PEFT layout (each file written atomically), recording the
    /// base model's identity.
    pub fn save(&self, dir: &Path, model: &Model) -> Result<()> {
        let (r, mc) = (self.config.rank, &model.config);
        let width = self.config.width();
        let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
        for ((layer, t), p) in &self.weights {
            let (out, inp) = t.dims(mc);
            tensors.push((t.peft_key(*layer, false), vec![width, inp], &p.a));
            tensors.push((t.peft_key(*layer, true), vec![out, width], &p.b));
            if !p.router.is_empty() {
                let n = p.router.len() / inp;
                tensors.push((t.router_key(*layer), vec![n, inp], &p.router));
            }
        }
        let mut layers: Vec<usize> = self.weights.keys().map(|(l, _)| *l).collect();
        layers.dedup();
        let mut cfg = peft::common_fields(model);
        if let Some(e) = &self.config.experts {
            for (k, v) in [
                ("moe_experts", json!(e.n_experts)),
                ("moe_top_k", json!(e.top_k)),
                ("moe_renormalize", json!(e.renormalize)),
            ] {
                cfg.insert(k.into(), v);
            }
        }
        let kind = if self.config.experts.is_some() {
            MOE_LORA
        } else {
            "LORA"
        };
        for (k, v) in [
            ("peft_type", json!(kind)),
            ("r", json!(r)),
            ("lora_alpha", json!(self.config.alpha)),
            ("lora_dropout", json!(0.0)),
            ("use_rslora", json!(self.config.rslora)),
            ("use_dora", json!(false)),
            ("bias", json!("none")),
            ("fan_in_fan_out", json!(false)),
            ("init_lora_weights", json!(true)),
            (
                "target_modules",
                json!(self
                    .config
                    .targets
                    .iter()
                    .map(|t| t.module())
                    .collect::<Vec<_>>()),
            ),
            (
                "layers_to_transform",
                if layers.len() == mc.n_layers {
                    serde_json::Value::Null
                } else {
                    json!(layers)
                },
            ),
        ] {
            cfg.insert(k.into(), v);
        }
        peft::save(dir, &tensors, &serde_json::Value::Object(cfg))
    }
}

/// llama.cpp's q/k row permutation (HF row `h*hd + j*hd/2 + i` -> row `h*hd + 2i + j`),
/// applied to B of q and k when the base model stores q/k permuted (GGUF Llama).
pub fn permute_rows(data: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = data.len() / cols.max(1);
    let hd = rows / heads.max(1);
    let mut out = vec![0.0; data.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let (src, dst) = (h * hd + j * hd / 2 + i, h * hd + 2 * i + j);
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

impl LoraPair {
    /// This pair in the model's own row order (B of q/k permuted for GGUF Llama bases).
    pub fn for_model(&self, t: Target, model: &Model, rank: usize) -> LoraPair {
        let c = &model.config;
        match t {
            Target::Q if model.qk_permuted => LoraPair {
                b: permute_rows(&self.b, c.n_heads, rank),
                ..self.clone()
            },
            Target::K if model.qk_permuted => LoraPair {
                b: permute_rows(&self.b, c.n_kv_heads, rank),
                ..self.clone()
            },
            _ => self.clone(),
        }
    }
}
