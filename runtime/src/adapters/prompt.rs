//! Soft prompts (PEFT prompt tuning) and prefixes (PEFT prefix tuning): learned virtual
//! tokens in front of every sequence.
//!
//! A soft prompt is `n` embedding rows that take the first `n` positions; the real tokens
//! follow at positions `n, n+1, ...`. A prefix is, per layer, `n` key and value rows that
//! every token attends to; they carry no RoPE. PEFT stores a prefix as one `[n][layers * 2 *
//! kv_dim]` matrix whose row splits, per layer, into the keys then the values (heads in
//! order); Ember keeps one `[n][2 kv_dim]` block per layer in that order, with HF's head
//! dimension order (bases with llama.cpp's q/k permutation get their keys permuted to
//! match on the way in and back on the way out).

use std::path::Path;

use serde_json::json;

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::Model;
use crate::util::Rng;

use super::lora::permute_rows;
use super::peft::{self, read_f32, PeftConfig};

/// The tensor name PEFT uses for both kinds.
const KEY: &str = "prompt_embeddings";

/// A soft prompt: `[n_virtual][hidden]` embeddings.
#[derive(Debug, Clone, PartialEq)]
pub struct SoftPrompt {
    /// Virtual tokens.
    pub n_virtual: usize,
    /// `[n_virtual][hidden]`.
    pub values: Vec<f32>,
    /// Identity of the base model it was made for, when known.
    pub base_identity: Option<u64>,
}

impl SoftPrompt {
    /// PEFT's `RANDOM` init: N(0, 1) entries.
    pub fn random(c: &ModelConfig, n_virtual: usize, seed: u64) -> Result<SoftPrompt> {
        check_n(n_virtual)?;
        let mut rng = Rng::new(seed);
        Ok(SoftPrompt {
            n_virtual,
            values: (0..n_virtual * c.hidden).map(|_| rng.normal()).collect(),
            base_identity: None,
        })
    }

    /// PEFT's `TEXT` init: the embeddings of `tokens`, repeated to fill `n_virtual` rows (a
    /// prompt that starts as a real instruction trains faster than noise).
    pub fn from_tokens(model: &Model, tokens: &[u32], n_virtual: usize) -> Result<SoftPrompt> {
        check_n(n_virtual)?;
        if tokens.is_empty() {
            return Err(Error::InvalidArgument(
                "soft prompt init text has no tokens".into(),
            ));
        }
        let ids: Vec<u32> = (0..n_virtual).map(|i| tokens[i % tokens.len()]).collect();
        Ok(SoftPrompt {
            n_virtual,
            values: model.embedding_rows(&ids)?,
            base_identity: Some(model.identity),
        })
    }

    /// Loads a PEFT prompt-tuning directory for `model`.
    pub fn load(dir: &Path, model: &Model) -> Result<SoftPrompt> {
        let pc = PeftConfig::read(dir)?;
        expect_type(&pc, "PROMPT_TUNING")?;
        let n = pc.usize("num_virtual_tokens")?;
        check_n(n)?;
        check_submodules(&pc)?;
        let h = model.config.hidden;
        if let Ok(d) = pc.usize("token_dim") {
            if d != h {
                return Err(pc.error(format!("token_dim {d}, the model's hidden size is {h}")));
            }
        }
        let base_identity = pc.check_base(dir, model)?;
        let values = read_matrix(dir, n, h)?;
        Ok(SoftPrompt {
            n_virtual: n,
            values,
            base_identity,
        })
    }

    /// Saves in PEFT's layout (atomically), recording the base model.
    pub fn save(&self, dir: &Path, model: &Model) -> Result<()> {
        let c = &model.config;
        let mut cfg = peft::common_fields(model);
        for (k, v) in [
            ("peft_type", json!("PROMPT_TUNING")),
            ("num_virtual_tokens", json!(self.n_virtual)),
            ("token_dim", json!(c.hidden)),
            ("num_transformer_submodules", json!(1)),
            ("num_attention_heads", json!(c.n_heads)),
            ("num_layers", json!(c.n_layers)),
            ("prompt_tuning_init", json!("RANDOM")),
        ] {
            cfg.insert(k.into(), v);
        }
        let t = vec![(
            KEY.to_string(),
            vec![self.n_virtual, c.hidden],
            &self.values[..],
        )];
        peft::save(dir, &t, &serde_json::Value::Object(cfg))
    }
}

/// Prefix keys and values for every layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Prefix {
    /// Virtual tokens.
    pub n_virtual: usize,
    /// Per layer `[n_virtual][2 kv_dim]`: keys then values, HF head-dimension order.
    pub layers: Vec<Vec<f32>>,
    /// Identity of the base model it was made for, when known.
    pub base_identity: Option<u64>,
}

impl Prefix {
    /// PEFT's init (an `nn.Embedding`): N(0, 1) entries.
    pub fn random(c: &ModelConfig, n_virtual: usize, seed: u64) -> Result<Prefix> {
        check_n(n_virtual)?;
        let mut rng = Rng::new(seed);
        let w = 2 * c.kv_dim();
        Ok(Prefix {
            n_virtual,
            layers: (0..c.n_layers)
                .map(|_| (0..n_virtual * w).map(|_| rng.normal()).collect())
                .collect(),
            base_identity: None,
        })
    }

    /// Loads a PEFT prefix-tuning directory (without the reparameterization MLP) for
    /// `model`.
    pub fn load(dir: &Path, model: &Model) -> Result<Prefix> {
        let pc = PeftConfig::read(dir)?;
        expect_type(&pc, "PREFIX_TUNING")?;
        if pc
            .get("prefix_projection")
            .and_then(|b| b.as_bool())
            .unwrap_or(false)
        {
            return Err(Error::Unsupported(format!(
                "{}: prefix_projection (save the projected prefix instead)",
                pc.path.display()
            )));
        }
        let n = pc.usize("num_virtual_tokens")?;
        check_n(n)?;
        check_submodules(&pc)?;
        let c = &model.config;
        if let Ok(l) = pc.usize("num_layers") {
            if l != c.n_layers {
                return Err(pc.error(format!("num_layers {l}, the model has {}", c.n_layers)));
            }
        }
        let base_identity = pc.check_base(dir, model)?;
        let w = 2 * c.kv_dim();
        let flat = read_matrix(dir, n, c.n_layers * w)?;
        let layers = (0..c.n_layers)
            .map(|l| {
                (0..n)
                    .flat_map(|j| flat[j * c.n_layers * w + l * w..][..w].iter().copied())
                    .collect()
            })
            .collect();
        Ok(Prefix {
            n_virtual: n,
            layers,
            base_identity,
        })
    }

    /// Saves in PEFT's layout (atomically), recording the base model.
    pub fn save(&self, dir: &Path, model: &Model) -> Result<()> {
        let c = &model.config;
        let w = 2 * c.kv_dim();
        let mut flat = vec![0.0f32; self.n_virtual * c.n_layers * w];
        for (l, blk) in self.layers.iter().enumerate() {
            for j in 0..self.n_virtual {
                flat[j * c.n_layers * w + l * w..][..w].copy_from_slice(&blk[j * w..][..w]);
            }
        }
        let mut cfg = peft::common_fields(model);
        for (k, v) in [
            ("peft_type", json!("PREFIX_TUNING")),
            ("num_virtual_tokens", json!(self.n_virtual)),
            // PEFT's own value for grouped-query models: one key/value row per layer.
            ("token_dim", json!(c.kv_dim())),
            ("num_transformer_submodules", json!(1)),
            ("num_attention_heads", json!(c.n_kv_heads)),
            ("num_layers", json!(c.n_layers)),
            ("encoder_hidden_size", json!(c.hidden)),
            ("prefix_projection", json!(false)),
        ] {
            cfg.insert(k.into(), v);
        }
        let t = vec![(
            KEY.to_string(),
            vec![self.n_virtual, c.n_layers * w],
            &flat[..],
        )];
        peft::save(dir, &t, &serde_json::Value::Object(cfg))
    }

    /// Layer `l` in the model's own head-dimension order (keys permuted for bases that
    /// store q/k in llama.cpp's order; inverse with `to_model = false`).
    pub fn layer_for_model(&self, l: usize, model: &Model, to_model: bool) -> Vec<f32> {
        let c = &model.config;
        let (kv, w) = (c.kv_dim(), 2 * c.kv_dim());
        let mut out = self.layers[l].clone();
        if model.qk_permuted {
            for j in 0..self.n_virtual {
                let k = &out[j * w..j * w + kv];
                let p = if to_model {
                    permute_rows(k, c.n_kv_heads, 1)
                } else {
                    crate::model::export::unpermute_rows(k, c.n_kv_heads, 1)
                };
                out[j * w..j * w + kv].copy_from_slice(&p);
            }
        }
        out
    }
}

fn check_n(n: usize) -> Result<()> {
    if n == 0 || n > 4096 {
        return Err(Error::InvalidArgument(format!(
            "{n} virtual tokens (1..=4096)"
        )));
    }
    Ok(())
}

fn expect_type(pc: &PeftConfig, want: &str) -> Result<()> {
    match pc.peft_type() {
        Some(t) if t == want => Ok(()),
        other => Err(Error::Unsupported(format!(
            "{}: PEFT type {} is not {want}",
            pc.path.display(),
            other.unwrap_or("(missing)")
        ))),
    }
}

fn check_submodules(pc: &PeftConfig) -> Result<()> {
    match pc
        .get("num_transformer_submodules")
        .and_then(|v| v.as_u64())
    {
        None | Some(1) => Ok(()),
        Some(n) => Err(Error::Unsupported(format!(
            "{}: {n} transformer submodules (encoder-decoder models)",
            pc.path.display()
        ))),
    }
}

fn read_matrix(dir: &Path, rows: usize, cols: usize) -> Result<Vec<f32>> {
    let (path, bytes) = peft::read_tensors(dir)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::format(Some(&path), format!("invalid safetensors: {e}")))?;
    let (v, shape) = read_f32(&st, KEY, &path)?
        .ok_or_else(|| Error::format(Some(&path), format!("no tensor {KEY}")))?;
    if shape != [rows, cols] {
        return Err(Error::format(
            Some(&path),
            format!("{KEY} has shape {shape:?}, the model needs [{rows}, {cols}]"),
        ));
    }
    Ok(v)
}
