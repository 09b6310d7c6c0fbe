//! Models: hyperparameters ([`config`]), weights on the GPU ([`weights`]), loading from
//! GGUF and HF safetensors ([`loader`]), and the forward pass as a list of dispatches
//! ([`forward`]).
//!
//! A [`Model`] is immutable once loaded and `Send + Sync`: many sessions on many threads
//! can share one.

pub mod config;
pub mod export;
pub mod forward;
pub mod loader;
mod merge;
pub mod moe;
pub mod upcycle;
pub mod weights;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::gguf::GgufFile;
use crate::gpu::{Context, Tensor};
use crate::kernels::Variant;
use crate::tokenizer::Tokenizer;
use config::ModelConfig;
use loader::{GgufSource, LayerWeight, SafetensorsSource, WeightName, WeightSource};
use weights::{HostMatrix, HostTensor, Linear, Mat};

/// The weights of one transformer block.
#[derive(Debug, Clone)]
pub struct Layer {
    /// RMSNorm weight before attention, `[hidden]`.
    pub attn_norm: Tensor,
    /// Fused q|k|v projection, `[q_dim + 2 kv_dim][hidden]`.
    pub qkv: Linear,
    /// Fused q|k|v bias, `[q_dim + 2 kv_dim]` (Qwen2).
    pub qkv_bias: Option<Tensor>,
    /// Attention output projection, `[hidden][q_dim]`.
    pub o: Linear,
    /// RMSNorms on q and k before RoPE (`[q_dim]` and `[kv_dim]`, or `[head_dim]` each
    /// per head; [`config::QkNorm`]).
    pub qk_norm: Option<(Tensor, Tensor)>,
    /// RMSNorm weight before the feed-forward, `[hidden]`.
    pub ffn_norm: Tensor,
    /// The feed-forward.
    pub ffn: Ffn,
}

/// A block's feed-forward.
#[derive(Debug, Clone)]
pub enum Ffn {
    /// A SwiGLU MLP.
    Dense {
        /// Fused gate|up projection, `[2 ff][hidden]`.
        gate_up: Linear,
        /// Down projection, `[hidden][ff]`.
        down: Linear,
    },
    /// Routed experts.
    Moe(Box<moe::MoeFfn>),
}

impl Layer {
    /// The dense MLP's gate|up and down projections; an error naming `what` for a
    /// Mixture-of-Experts block.
    pub fn mlp(&self, what: &str) -> Result<(&Linear, &Linear)> {
        match &self.ffn {
            Ffn::Dense { gate_up, down } => Ok((gate_up, down)),
            Ffn::Moe(_) => Err(Error::Unsupported(format!(
                "{what} on a Mixture-of-Experts model's expert feed-forward"
            ))),
        }
    }

    /// The routed experts, if the block has them.
    pub fn moe(&self) -> Option<&moe::MoeFfn> {
        match &self.ffn {
            Ffn::Moe(m) => Some(m),
            Ffn::Dense { .. } => None,
        }
    }

    /// Device bytes of the block's weights.
    pub fn bytes(&self) -> u64 {
        let ffn = match &self.ffn {
            Ffn::Dense { gate_up, down } => gate_up.bytes() + down.bytes(),
            Ffn::Moe(m) => m.bytes(),
        };
        let qkn = self
            .qk_norm
            .as_ref()
            .map_or(0, |(q, k)| q.bytes() + k.bytes());
        let bias = self.qkv_bias.as_ref().map_or(0, |b| b.bytes());
        self.qkv.bytes()
            + self.o.bytes()
            + self.attn_norm.bytes()
            + self.ffn_norm.bytes()
            + ffn
            + qkn
            + bias
    }
}

/// Where a model came from.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSource {
    /// The file or directory.
    pub path: PathBuf,
    /// `gguf` or `safetensors`.
    pub format: String,
    /// Formats of the weights, e.g. `Q4_1 x210, F32 x61, Q8_0 x1`.
    pub weight_formats: String,
}

/// A loaded model: configuration, tokenizer and weights on one device.
pub struct Model {
    ctx: Context,
    /// Hyperparameters.
    pub config: ModelConfig,
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
    /// Where it came from.
    pub source: ModelSource,
    /// Token embeddings `[vocab][hidden]`.
    pub embed: Mat,
    /// Transformer blocks.
    pub layers: Vec<Layer>,
    /// Final norm weight `[hidden]`.
    pub norm: Tensor,
    /// Output projection `[vocab][hidden]` (the embedding table when tied).
    pub lm_head: Linear,
    /// Kernel variant used by this model's forward passes.
    pub variant: Variant,
    /// q and k rows are in llama.cpp's permuted order (GGUF Llama/Mistral), so the model
    /// rotates adjacent pairs; HF order rotates halves. Adapters are converted on attach.
    pub qk_permuted: bool,
    /// A fingerprint of the weights' values (format-independent: a GGUF and its f32
    /// export agree), recorded in saved adapters so they refuse another base.
    pub identity: u64,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .field("source", &self.source)
            .finish()
    }
}

/// Options for [`Model::load`].
pub struct LoadOptions<'a> {
    /// Called with the fraction loaded (0..=1); returning `false` aborts the load.
    pub progress: Option<&'a mut dyn FnMut(f32) -> bool>,
    /// Kernel variant (default: by device).
    pub variant: Variant,
}

impl Default for LoadOptions<'_> {
    fn default() -> Self {
        LoadOptions {
            progress: None,
            variant: Variant::Auto,
        }
    }
}

pub(crate) fn f32_vector(ctx: &Context, t: &HostTensor, len: usize) -> Result<Tensor> {
    let v = t.to_f32()?;
    if v.len() != len {
        return Err(Error::format(
            t.source.as_deref(),
            format!("{} has {} values, the model needs {len}", t.name, v.len()),
        ));
    }
    Tensor::from_f32(ctx, &[len], &v)
}

pub(crate) fn count_formats(tensors: &[&HostTensor], counts: &mut Vec<(String, usize)>) {
    for t in tensors {
        let f = match &t.data {
            HostMatrix::F32(_) => "F32".to_string(),
            HostMatrix::F16(_) => "F16".to_string(),
            HostMatrix::Quant(q, _) => q.name().to_string(),
        };
        match counts.iter_mut().find(|(n, _)| *n == f) {
            Some((_, c)) => *c += 1,
            None => counts.push((f, 1)),
        }
    }
}

impl Model {
    /// Loads a GGUF file or an HF model directory (`config.json`, `model.safetensors` or
    /// shards, `tokenizer.json`).
    pub fn load(ctx: &Context, path: &Path, mut opts: LoadOptions<'_>) -> Result<Model> {
        let meta = std::fs::metadata(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.is_dir() {
            let cfg_path = path.join("config.json");
            let json = std::fs::read_to_string(&cfg_path).map_err(|source| Error::Io {
                path: cfg_path.clone(),
                source,
            })?;
            let config = ModelConfig::from_hf_config(&json, &cfg_path)?;
            let tokenizer = Tokenizer::from_hf_dir(path)?;
            let src = SafetensorsSource::open(path)?;
            Self::from_source(
                ctx,
                config,
                tokenizer,
                &src,
                "safetensors",
                false,
                &mut opts,
            )
        } else {
            let file = GgufFile::open(path)?;
            Self::from_gguf(ctx, &file, path, &mut opts)
        }
    }

    /// Loads a GGUF model held in memory (the browser has no files to map: the page reads
    /// the user's file or fetches it, and hands the bytes over). `name` stands for the file
    /// in error messages.
    pub fn from_gguf_bytes(
        ctx: &Context,
        bytes: Vec<u8>,
        name: &str,
        mut opts: LoadOptions<'_>,
    ) -> Result<Model> {
        let file = GgufFile::from_bytes(bytes).map_err(|e| match e {
            Error::Format { path: None, detail } => Error::Format {
                path: Some(name.into()),
                detail,
            },
            e => e,
        })?;
        Self::from_gguf(ctx, &file, Path::new(name), &mut opts)
    }

    fn from_gguf(
        ctx: &Context,
        file: &GgufFile,
        path: &Path,
        opts: &mut LoadOptions<'_>,
    ) -> Result<Model> {
        let config = ModelConfig::from_gguf(file)?;
        let tokenizer = Tokenizer::from_gguf(file)?;
        let src = GgufSource {
            file,
            path: path.to_path_buf(),
        };
        let permuted = !config.arch.gguf_neox();
        Self::from_source(ctx, config, tokenizer, &src, "gguf", permuted, opts)
    }

    fn from_source(
        ctx: &Context,
        config: ModelConfig,
        tokenizer: Tokenizer,
        src: &dyn WeightSource,
        format: &str,
        qk_permuted: bool,
        opts: &mut LoadOptions<'_>,
    ) -> Result<Model> {
        let c = &config;
        if tokenizer.vocab_size() > c.vocab {
            return Err(Error::format(
                Some(src.path()),
                format!(
                    "tokenizer has {} tokens but the model only {}",
                    tokenizer.vocab_size(),
                    c.vocab
                ),
            ));
        }
        let mut counts = Vec::new();
        let tick = |done: usize, opts: &mut LoadOptions<'_>| -> Result<()> {
            if let Some(p) = opts.progress.as_mut() {
                if !p(done as f32 / (c.n_layers + 1) as f32) {
                    return Err(Error::Aborted);
                }
            }
            Ok(())
        };
        tick(0, opts)?;
        let embed_t = src.need(WeightName::Embed)?;
        embed_t.expect_shape(c.vocab, c.hidden)?;
        let embed = Mat::upload(ctx, &embed_t)?;
        let norm_t = src.need(WeightName::Norm)?;
        let norm = f32_vector(ctx, &norm_t, c.hidden)?;
        // Identity: config, then values rounded to f16 (equal for a GGUF and its exports):
        // the final norm, three embedding rows, and every layer's norms and first q row.
        let mut idh = crate::util::Fnv64::new();
        for v in [
            c.vocab,
            c.hidden,
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.ff,
        ] {
            idh.update(&(v as u64).to_le_bytes());
        }
        idh.update(c.arch.name().as_bytes());
        idh.update(&[c.tied_embeddings as u8, c.qkv_bias as u8]);
        let hash_values = |h: &mut crate::util::Fnv64, v: &[f32]| {
            for x in v {
                h.update(&half::f16::from_f32(*x).to_bits().to_le_bytes());
            }
        };
        hash_values(&mut idh, &norm_t.to_f32()?);
        for r in [0, 1, c.vocab - 1] {
            hash_values(&mut idh, &embed_t.row_f32(r)?);
        }
        let lm_head = match src.get(WeightName::LmHead)? {
            Some(t) if !c.tied_embeddings => {
                t.expect_shape(c.vocab, c.hidden)?;
                count_formats(&[&t], &mut counts);
                Linear::from_parts(ctx, vec![t], "lm_head")?
            }
            _ => Linear {
                rows: c.vocab,
                cols: c.hidden,
                parts: vec![(0, embed.clone())],
            },
        };
        count_formats(&[&embed_t, &norm_t], &mut counts);
        drop(embed_t);
        tick(1, opts)?;
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let w = |lw| src.need(WeightName::Layer(i, lw));
            let (q, k, v) = (w(LayerWeight::Q)?, w(LayerWeight::K)?, w(LayerWeight::V)?);
            q.expect_shape(c.q_dim(), c.hidden)?;
            k.expect_shape(c.kv_dim(), c.hidden)?;
            v.expect_shape(c.kv_dim(), c.hidden)?;
            let o = w(LayerWeight::O)?;
            o.expect_shape(c.hidden, c.q_dim())?;
            let ffn = match &c.moe {
                None => {
                    let (gate, up, down) = (
                        w(LayerWeight::Gate)?,
                        w(LayerWeight::Up)?,
                        w(LayerWeight::Down)?,
                    );
                    gate.expect_shape(c.ff, c.hidden)?;
                    up.expect_shape(c.ff, c.hidden)?;
                    down.expect_shape(c.hidden, c.ff)?;
                    count_formats(&[&gate, &up, &down], &mut counts);
                    Ffn::Dense {
                        gate_up: Linear::from_parts(ctx, vec![gate, up], "gate_up")?,
                        down: Linear::from_parts(ctx, vec![down], "down")?,
                    }
                }
                Some(mc) => {
                    let m = moe::load_layer(ctx, src, i, c, mc, &mut counts)?;
                    hash_values(&mut idh, &m.1);
                    Ffn::Moe(Box::new(m.0))
                }
            };
            let qk_norm = match c.qk_norm {
                config::QkNorm::None => None,
                kind => {
                    let (nq, nk) = match kind {
                        config::QkNorm::PerHead => (c.head_dim, c.head_dim),
                        _ => (c.q_dim(), c.kv_dim()),
                    };
                    let (qn, kn) = (w(LayerWeight::QNorm)?, w(LayerWeight::KNorm)?);
                    count_formats(&[&qn, &kn], &mut counts);
                    Some((f32_vector(ctx, &qn, nq)?, f32_vector(ctx, &kn, nk)?))
                }
            };
            let an = w(LayerWeight::AttnNorm)?;
            let fnn = w(LayerWeight::FfnNorm)?;
            count_formats(&[&q, &k, &v, &o, &an, &fnn], &mut counts);
            hash_values(&mut idh, &an.to_f32()?);
            hash_values(&mut idh, &fnn.to_f32()?);
            hash_values(&mut idh, &q.row_f32(0)?);
            let qkv_bias = if c.qkv_bias {
                let mut b = Vec::with_capacity(c.qkv_dim());
                for (lw, n) in [
                    (LayerWeight::QBias, c.q_dim()),
                    (LayerWeight::KBias, c.kv_dim()),
                    (LayerWeight::VBias, c.kv_dim()),
                ] {
                    let t = w(lw)?;
                    let v = t.to_f32()?;
                    if v.len() != n {
                        return Err(Error::format(
                            Some(src.path()),
                            format!("{} has {} values, needs {n}", t.name, v.len()),
                        ));
                    }
                    b.extend(v);
                }
                Some(Tensor::from_f32(ctx, &[b.len()], &b)?)
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: f32_vector(ctx, &an, c.hidden)?,
                qkv: Linear::from_parts(ctx, vec![q, k, v], "qkv")?,
                qkv_bias,
                o: Linear::from_parts(ctx, vec![o], "o")?,
                qk_norm,
                ffn_norm: f32_vector(ctx, &fnn, c.hidden)?,
                ffn,
            });
            tick(i + 2, opts)?;
        }
        let weight_formats = counts
            .iter()
            .map(|(n, k)| format!("{n} x{k}"))
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Model {
            ctx: ctx.clone(),
            source: ModelSource {
                path: src.path().to_path_buf(),
                format: format.into(),
                weight_formats,
            },
            variant: opts.variant.resolve(ctx),
            qk_permuted,
            identity: idh.finish(),
            config,
            tokenizer,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// This model with one more expert in every Mixture-of-Experts layer (`experts[l]` for
    /// layer `l`), without reloading anything: the other weights are shared with `self`, the
    /// new ones uploaded. Sessions of the new model see `n_experts + 1` experts.
    ///
    /// Errors: [`Error::InvalidArgument`] for a dense model, a count of new experts other
    /// than the layer count, shapes or formats that do not match the layer's experts, or
    /// more than [`crate::kernels::moe::MAX_EXPERTS`] experts.
    pub fn with_expert(&self, experts: &[moe::NewExpert]) -> Result<Model> {
        let c = &self.config;
        let Some(mc) = &c.moe else {
            return Err(Error::InvalidArgument(format!(
                "{} is not a Mixture-of-Experts model",
                c.name
            )));
        };
        if experts.len() != c.n_layers {
            return Err(Error::InvalidArgument(format!(
                "{} new experts for {} layers",
                experts.len(),
                c.n_layers
            )));
        }
        crate::kernels::moe::check_top_k(mc.n_experts + 1, mc.top_k)?;
        let mut layers = self.layers.clone();
        for (l, (layer, x)) in layers.iter_mut().zip(experts).enumerate() {
            let Ffn::Moe(m) = &layer.ffn else {
                return Err(Error::Internal(format!(
                    "layer {l} of a MoE model is dense"
                )));
            };
            let grown = m
                .with_expert(&self.ctx, x)
                .map_err(|e| Error::InvalidArgument(format!("layer {l}: {e}")))?;
            layer.ffn = Ffn::Moe(Box::new(grown));
        }
        let mut config = c.clone();
        if let Some(m) = config.moe.as_mut() {
            m.n_experts += 1;
        }
        Ok(self.derived(config, layers, self.identity))
    }

    /// A model sharing this one's device, tokenizer, embedding, final norm and head, with
    /// other blocks (merged adapters, added experts).
    fn derived(&self, config: ModelConfig, layers: Vec<Layer>, identity: u64) -> Model {
        Model {
            ctx: self.ctx.clone(),
            config,
            tokenizer: self.tokenizer.clone(),
            source: self.source.clone(),
            embed: self.embed.clone(),
            layers,
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
            variant: self.variant,
            qk_permuted: self.qk_permuted,
            identity,
        }
    }

    /// The device the weights live on.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// The embedding rows of `ids` (dequantized), `[ids][hidden]`.
    pub fn embedding_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.config.vocab) {
            return Err(Error::InvalidArgument(format!(
                "token {bad} is outside the vocabulary of {}",
                self.config.vocab
            )));
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ctx = &self.ctx;
        let idt = Tensor::from_slice(ctx, &[ids.len()], crate::gpu::DType::U32, ids)?;
        let out = Tensor::zeros(
            ctx,
            &[ids.len(), self.config.hidden],
            crate::gpu::DType::F32,
        )?;
        ctx.run(&self.embed.gather(ctx, &out, &idt)?)?;
        out.read_f32(ctx)
    }

    /// Device bytes held by the weights.
    pub fn weight_bytes(&self) -> u64 {
        let l: u64 = self.layers.iter().map(Layer::bytes).sum();
        let head = if self.config.tied_embeddings {
            0
        } else {
            self.lm_head.bytes()
        };
        l + self.embed.bytes() + self.norm.bytes() + head
    }

    /// Parameter count (every expert of a Mixture-of-Experts model).
    pub fn n_params(&self) -> u64 {
        self.count_params(false)
    }

    /// Parameters one token goes through: a Mixture-of-Experts model's router, its top-k
    /// experts and shared expert (equal to [`Model::n_params`] for a dense model).
    pub fn n_active_params(&self) -> u64 {
        self.count_params(true)
    }

    fn count_params(&self, active: bool) -> u64 {
        count_params(&self.config, active)
    }
}

/// Parameters of a model shaped `c`: all of them, or (`active`) those one token uses.
pub(crate) fn count_params(c: &ModelConfig, active: bool) -> u64 {
    let ffn = match &c.moe {
        None => 3 * c.ff,
        Some(m) => {
            let experts = if active { m.top_k } else { m.n_experts };
            let gate = if m.shared_ff > 0 { 1 } else { 0 };
            m.n_experts + experts * 3 * m.expert_ff + 3 * m.shared_ff + gate
        }
    };
    let qkn = match c.qk_norm {
        config::QkNorm::None => 0,
        config::QkNorm::PerHead => 2 * c.head_dim,
        config::QkNorm::Whole => c.q_dim() + c.kv_dim(),
    };
    let bias = if c.qkv_bias { c.qkv_dim() } else { 0 };
    let per_layer = c.hidden * (c.qkv_dim() + c.q_dim() + ffn) + 2 * c.hidden + qkn + bias;
    let head = if c.tied_embeddings {
        0
    } else {
        c.vocab * c.hidden
    };
    (c.n_layers * per_layer + c.vocab * c.hidden + c.hidden + head) as u64
}
