//! The forward pass of a Llama-family model as a list of dispatches over preallocated
//! buffers: built once per batch shape and replayed (DESIGN.md, "plan once, replay per
//! token"). Per-step inputs (token ids, positions, cache slots, attention ranges) are
//! written into small buffers before each submission.

use crate::adapters::Target;
use crate::error::{Error, Result};
use crate::gpu::{Context, DType, Dispatch, Tensor};
use crate::kernels::attention::{
    attention_decode, attention_prefill, prefill_scores_len, AttnLayout,
};
use crate::kernels::elementwise::{binary, swiglu, BinaryOp};
use crate::kernels::kv::{rope_store, QkvLayout};
use crate::kernels::lora::{lora_apply, LoraPack, LoraRows};
use crate::kernels::norm::{norm_with, rms_norm_in_place, NormDesc, NormKind};
use crate::kernels::quant::QShape;
use crate::kernels::rope::RopeTable;
use crate::model::config::{ModelConfig, QkNorm};
use crate::model::moe::MoeScratch;
use crate::model::weights::Rows;
use crate::model::{Ffn, Model};

/// Keys and values of every layer, `[slots][kv_dim]` f32 each.
pub struct KvCache {
    /// Per-layer key caches.
    pub k: Vec<Tensor>,
    /// Per-layer value caches.
    pub v: Vec<Tensor>,
    /// Slots (positions) each cache holds.
    pub slots: usize,
}

impl KvCache {
    /// Bytes a cache of `slots` positions takes for `cfg`.
    pub fn bytes_for(cfg: &ModelConfig, slots: usize) -> u64 {
        2 * cfg.n_layers as u64 * slots as u64 * cfg.kv_dim() as u64 * 4
    }

    /// Allocates a cache of `slots` positions.
    pub fn new(ctx: &Context, cfg: &ModelConfig, slots: usize) -> Result<KvCache> {
        let kv = cfg.kv_dim();
        if slots == 0 || (slots * kv * 4) as u64 > ctx.caps().max_binding {
            return Err(Error::Limit {
                what: format!("a {slots}-slot key/value cache layer"),
                needed: (slots * kv * 4) as u64,
                limit: ctx.caps().max_binding,
            });
        }
        let mut k = Vec::with_capacity(cfg.n_layers);
        let mut v = Vec::with_capacity(cfg.n_layers);
        for _ in 0..cfg.n_layers {
            k.push(Tensor::zeros(ctx, &[slots, kv], DType::F32)?);
            v.push(Tensor::zeros(ctx, &[slots, kv], DType::F32)?);
        }
        Ok(KvCache { k, v, slots })
    }
}

/// Preallocated activations and per-step inputs for up to `rows` tokens at once.
pub struct Activations {
    /// Token rows these buffers hold.
    pub rows: usize,
    /// Residual stream `[rows][hidden]`.
    pub x: Tensor,
    /// Normalized rows `[rows][hidden]`.
    pub h: Tensor,
    /// Fused q|k|v `[rows][qkv_dim]`.
    pub qkv: Tensor,
    /// Attention output `[rows][q_dim]`.
    pub attn: Tensor,
    /// Fused gate|up `[rows][2 ff]`.
    pub gu: Tensor,
    /// SwiGLU output `[rows][ff]`.
    pub ff: Tensor,
    /// Token ids `[rows]` u32.
    pub ids: Tensor,
    /// Positions `[rows]` u32.
    pub pos: Tensor,
    /// Cache slots `[rows]` u32.
    pub slots: Tensor,
    /// Attention key ranges `[rows][2]` u32 (decode kernel).
    pub ranges: Tensor,
    /// Keys visible to each query `[rows]` u32 (prefill path).
    pub lens: Tensor,
    /// Logits `[logit_rows][vocab]`.
    pub logits: Tensor,
    /// Rows of logits held.
    pub logit_rows: usize,
    /// Attention scores scratch for the prefill path.
    pub scores: Tensor,
    /// Router and expert buffers of a Mixture-of-Experts model.
    pub moe: Option<MoeScratch>,
}

impl Activations {
    /// Buffers for `rows` tokens, `logit_rows` rows of logits and `scores` floats of
    /// attention scratch.
    pub fn new(
        ctx: &Context,
        cfg: &ModelConfig,
        rows: usize,
        logit_rows: usize,
        scores: usize,
    ) -> Result<Self> {
        let f = |n: usize| Tensor::zeros(ctx, &[rows, n], DType::F32);
        let u = |n: usize| Tensor::zeros(ctx, &[rows * n], DType::U32);
        Ok(Activations {
            rows,
            x: f(cfg.hidden)?,
            h: f(cfg.hidden)?,
            qkv: f(cfg.qkv_dim())?,
            attn: f(cfg.q_dim())?,
            gu: f(2 * cfg.ff)?,
            ff: f(cfg.ff)?,
            ids: u(1)?,
            pos: u(1)?,
            slots: u(1)?,
            ranges: u(2)?,
            lens: u(1)?,
            logits: Tensor::zeros(ctx, &[logit_rows, cfg.vocab], DType::F32)?,
            logit_rows,
            scores: Tensor::zeros(ctx, &[scores.max(1)], DType::F32)?,
            moe: match &cfg.moe {
                None => None,
                Some(mc) => Some(MoeScratch::for_shape(
                    ctx,
                    rows,
                    cfg.n_layers,
                    mc.n_experts,
                    mc.top_k,
                    mc.expert_ff,
                    cfg.hidden,
                    (mc.shared_ff > 0).then_some(mc.shared_ff),
                )?),
            },
        })
    }
}

/// LoRA adapters active in a forward pass: packed per (layer, target), and each row's
/// adapter and scale.
pub struct LoraState {
    /// Packed adapters by (layer, target).
    pub packs: std::collections::HashMap<(usize, Target), LoraPack>,
    /// `[rows]` u32 adapter index per row (u32::MAX: none).
    pub row_ad: Tensor,
    /// `[rows]` f32 scale per row.
    pub row_scale: Tensor,
    /// `[rows][max_rank]` scratch.
    pub t: Tensor,
}

impl LoraState {
    /// Whether layer `l` has adapters on `t`.
    pub fn has(&self, l: usize, t: Target) -> bool {
        self.packs.contains_key(&(l, t))
    }

    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        ctx: &Context,
        l: usize,
        t: Target,
        y: &Tensor,
        x: &Tensor,
        m: usize,
        ldx: usize,
        ldy: usize,
        y_off: usize,
    ) -> Result<Vec<Dispatch>> {
        match self.packs.get(&(l, t)) {
            None => Ok(Vec::new()),
            Some(p) => lora_apply(
                ctx,
                y,
                x,
                p,
                &self.row_ad,
                &self.row_scale,
                &self.t,
                LoraRows {
                    rows: m,
                    ldx,
                    x_off: 0,
                    ldy,
                    y_off,
                },
            ),
        }
    }
}

/// How attention sees the cache in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnMode {
    /// Each token attends to its own range in `ranges` (any mix of sequences).
    Ranges,
    /// The tokens are consecutive positions of one sequence whose cache starts at slot
    /// `first`; `kv_len` keys are visible to the last token and `lens[t]` to token t.
    Prefill {
        /// First cache slot of the sequence.
        first: usize,
        /// Keys visible to the last token of the step.
        kv_len: usize,
    },
}

/// Which rows get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// None (a prefill chunk that is not the last).
    None,
    /// The last row only, into logits row 0.
    Last,
    /// Every row.
    All,
}

impl Model {
    /// The dispatches of one forward step over `m` tokens whose inputs are in `a`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        a: &Activations,
        kv: &KvCache,
        rope_table: &RopeTable,
        m: usize,
        attn: AttnMode,
        logits: LogitRows,
        lora: Option<&LoraState>,
    ) -> Result<Vec<Dispatch>> {
        self.forward_input(a, kv, rope_table, m, attn, logits, lora, true)
    }

    /// [`Model::forward`]; with `gather` false the rows of `a.x` are taken as they are
    /// (embeddings the caller wrote, e.g. a soft prompt's) instead of gathered from `a.ids`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_input(
        &self,
        a: &Activations,
        kv: &KvCache,
        rope_table: &RopeTable,
        m: usize,
        attn: AttnMode,
        logits: LogitRows,
        lora: Option<&LoraState>,
        gather: bool,
    ) -> Result<Vec<Dispatch>> {
        let ctx = self.context();
        let c = &self.config;
        if m == 0 || m > a.rows || (logits == LogitRows::All && m > a.logit_rows) {
            return Err(Error::shape(
                "forward",
                format!(
                    "{m} tokens with buffers for {} ({} logit rows)",
                    a.rows, a.logit_rows
                ),
            ));
        }
        let (hd, qkv_dim, q_dim, kv_dim) = (c.head_dim, c.qkv_dim(), c.q_dim(), c.kv_dim());
        let variant = self.variant;
        let shape = match attn {
            AttnMode::Ranges => QShape::Vector,
            AttnMode::Prefill { .. } => QShape::Auto,
        };
        let rows = |ldx: usize, ldy: usize, accumulate: bool| Rows {
            m,
            ldx,
            ldy,
            y_off: 0,
            accumulate,
            glu: 0,
        };
        let layout = AttnLayout {
            n_heads: c.n_heads,
            n_kv: c.n_kv_heads,
            head_dim: hd,
            q_ld: qkv_dim,
            q_off: 0,
            kv_ld: kv_dim,
            o_ld: q_dim,
        };
        let scale = 1.0 / (hd as f32).sqrt();
        let nd = NormDesc::new(NormKind::Rms, m, c.hidden, c.norm_eps);
        let mut ops = Vec::with_capacity(12 * c.n_layers + 4);
        if gather {
            ops.extend(self.embed.gather(ctx, &a.x, &a.ids.first(m)?)?);
        }
        for (l, layer) in self.layers.iter().enumerate() {
            ops.push(norm_with(
                ctx,
                &a.h,
                &a.x,
                Some(&layer.attn_norm),
                None,
                &nd,
            )?);
            ops.extend(layer.qkv.forward(
                ctx,
                &a.qkv,
                &a.h,
                rows(c.hidden, qkv_dim, false),
                variant,
                shape,
            )?);
            if let Some(b) = &layer.qkv_bias {
                ops.push(binary(
                    ctx,
                    BinaryOp::Add,
                    &a.qkv,
                    None,
                    b,
                    m * qkv_dim,
                    qkv_dim,
                )?);
            }
            for (t, off) in [
                (Target::Q, 0),
                (Target::K, q_dim),
                (Target::V, q_dim + kv_dim),
            ] {
                if let Some(ls) = lora {
                    ops.extend(ls.apply(ctx, l, t, &a.qkv, &a.h, m, c.hidden, qkv_dim, off)?);
                }
            }
            if let Some((qn, kn)) = &layer.qk_norm {
                let per_head = c.qk_norm == QkNorm::PerHead;
                for (w, off, heads) in [(qn, 0, c.n_heads), (kn, q_dim, c.n_kv_heads)] {
                    let mut d = NormDesc::new(NormKind::Rms, m, heads * hd, c.norm_eps);
                    if per_head {
                        d = NormDesc::new(NormKind::Rms, m * heads, hd, c.norm_eps);
                        d.heads = heads;
                    }
                    d.ld_x = qkv_dim;
                    d.ld_out = qkv_dim;
                    d.x_off = off;
                    d.out_off = off;
                    ops.push(rms_norm_in_place(ctx, &a.qkv, w, &d)?);
                }
            }
            // RoPE on q (in place) and k (into the cache), v into the cache: one pass.
            let qkv_l = QkvLayout {
                n_heads: c.n_heads,
                n_kv: c.n_kv_heads,
                head_dim: hd,
                src_ld: qkv_dim,
            };
            ops.push(rope_store(
                ctx, &kv.k[l], &kv.v[l], &a.qkv, &a.pos, &a.slots, rope_table, m, qkv_l,
            )?);
            match attn {
                AttnMode::Ranges => ops.push(attention_decode(
                    ctx, &a.attn, &a.qkv, &kv.k[l], &kv.v[l], &a.ranges, m, &layout, scale,
                )?),
                AttnMode::Prefill { first, kv_len } => {
                    if prefill_scores_len(c.n_heads, m, kv_len) <= a.scores.numel() {
                        ops.extend(attention_prefill(
                            ctx, &a.attn, &a.qkv, &kv.k[l], &kv.v[l], &a.scores, &a.lens, m, first,
                            kv_len, &layout, scale, variant,
                        )?);
                    } else {
                        // Scores would not fit the scratch: the per-token kernel reads the
                        // same ranges (the session fills them for prefill steps too).
                        ops.push(attention_decode(
                            ctx, &a.attn, &a.qkv, &kv.k[l], &kv.v[l], &a.ranges, m, &layout, scale,
                        )?);
                    }
                }
            }
            ops.extend(layer.o.forward(
                ctx,
                &a.x,
                &a.attn,
                rows(q_dim, c.hidden, true),
                variant,
                shape,
            )?);
            if let Some(ls) = lora {
                ops.extend(ls.apply(ctx, l, Target::O, &a.x, &a.attn, m, q_dim, c.hidden, 0)?);
            }
            ops.push(norm_with(
                ctx,
                &a.h,
                &a.x,
                Some(&layer.ffn_norm),
                None,
                &nd,
            )?);
            let (gate_up, down) = match &layer.ffn {
                Ffn::Dense { gate_up, down } => (gate_up, down),
                Ffn::Moe(moe) => {
                    let scratch = a
                        .moe
                        .as_ref()
                        .ok_or_else(|| Error::Internal("activations without MoE buffers".into()))?;
                    ops.extend(moe.forward(ctx, &a.x, &a.h, scratch, l, m, shape, variant)?);
                    continue;
                }
            };
            ops.extend(gate_up.forward(
                ctx,
                &a.gu,
                &a.h,
                rows(c.hidden, 2 * c.ff, false),
                variant,
                shape,
            )?);
            for (t, off) in [(Target::Gate, 0), (Target::Up, c.ff)] {
                if let Some(ls) = lora {
                    ops.extend(ls.apply(ctx, l, t, &a.gu, &a.h, m, c.hidden, 2 * c.ff, off)?);
                }
            }
            let down_lora = lora.is_some_and(|ls| ls.has(l, Target::Down));
            if down.fuses_glu() && !down_lora {
                // The down projection reads silu(gate) * up straight from the gate|up rows.
                let r = Rows {
                    glu: c.ff,
                    ..rows(2 * c.ff, c.hidden, true)
                };
                ops.extend(down.forward(ctx, &a.x, &a.gu, r, variant, shape)?);
            } else {
                ops.push(swiglu(ctx, &a.ff, &a.gu, None, m, c.ff)?);
                let r = rows(c.ff, c.hidden, true);
                ops.extend(down.forward(ctx, &a.x, &a.ff, r, variant, shape)?);
                if let Some(ls) = lora {
                    ops.extend(ls.apply(
                        ctx,
                        l,
                        Target::Down,
                        &a.x,
                        &a.ff,
                        m,
                        c.ff,
                        c.hidden,
                        0,
                    )?);
                }
            }
        }
        match logits {
            LogitRows::None => {}
            LogitRows::Last => {
                let mut d = NormDesc::new(NormKind::Rms, 1, c.hidden, c.norm_eps);
                d.x_off = (m - 1) * c.hidden;
                ops.push(norm_with(ctx, &a.h, &a.x, Some(&self.norm), None, &d)?);
                let r = Rows {
                    m: 1,
                    ldx: c.hidden,
                    ldy: c.vocab,
                    y_off: 0,
                    accumulate: false,
                    glu: 0,
                };
                ops.extend(self.lm_head.forward(
                    ctx,
                    &a.logits,
                    &a.h,
                    r,
                    variant,
                    QShape::Vector,
                )?);
            }
            LogitRows::All => {
                ops.push(norm_with(ctx, &a.h, &a.x, Some(&self.norm), None, &nd)?);
                let r = Rows {
                    m,
                    ldx: c.hidden,
                    ldy: c.vocab,
                    y_off: 0,
                    accumulate: false,
                    glu: 0,
                };
                ops.extend(
                    self.lm_head
                        .forward(ctx, &a.logits, &a.h, r, variant, shape)?,
                );
            }
        }
        Ok(ops)
    }
}
