//! The dispatches of a training step over a fixed block of rows, built once and replayed
//! (per-step inputs are written into small buffers).
//!
//! Forward: embeddings (soft prompt rows gathered in), each layer from its checkpointed
//! input `xs[l]` to `xs[l+1]`, the final norm, logits in row chunks and the fused
//! softmax + cross-entropy that leaves the logits' gradient in place. Backward, layer by
//! layer from the top: the layer's forward is recomputed from `xs[l]` (per-layer activation
//! recomputation: only the residual stream is kept for every layer), then gradients flow
//! through the FFN, the attention and the norms. Frozen weights pass input gradients only;
//! trainables (LoRA A/B, soft prompt, prefix keys/values) accumulate into the gradient
//! buffer, so several blocks of rows make one optimizer step (gradient accumulation).

use std::cell::Cell;
use std::collections::HashMap;

use crate::adapters::lora::LoraExperts;
use crate::adapters::Target;
use crate::error::{Error, Result};
use crate::gpu::{Context, DType, Dispatch, Tensor};
use crate::kernels::elementwise::{binary, swiglu, unary, BinaryOp, UnaryOp};
use crate::kernels::lora_moe::{
    mix_aux_stats, mix_gate, mix_gate_backward, mix_route, mix_router_backward, MixRoute, MixShape,
    MixStats,
};
use crate::kernels::matmul::{matmul, MatmulDesc};
use crate::kernels::norm::{norm_with, rms_norm_in_place, NormDesc, NormKind};
use crate::kernels::quant::QShape;
use crate::kernels::rope::{rope, HeadLayout, RopeTable};
use crate::kernels::train::{
    rmsnorm_backward, rows_accumulate, rows_gather, swiglu_backward, xent, xent_distill, RowCopy,
};
use crate::model::config::QkNorm;
use crate::model::weights::{Linear, Rows};
use crate::model::Model;
use crate::train::attention::{AttnShape, TrainAttention};
use crate::train::batch::Virtual;
use crate::train::frozen::{linear_backward, Dequant, GradRows};
use crate::train::moe::MoeTrain;
use crate::train::params::{ParamKey, ParamStore};

/// Memory budgets of the step's scratch buffers, in floats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    /// Attention scores of one query block (each of two buffers).
    pub scores: usize,
    /// Dequantized rows of a frozen matrix.
    pub dequant: usize,
    /// Logits of one row chunk (shared with the base model's when distillation is possible).
    pub logits: usize,
    /// Activations kept for the backward. When every layer's fit, the backward reads
    /// them; otherwise each layer's forward is recomputed from its input (per-layer
    /// activation recomputation: only the residual stream is kept), so long sequences fit.
    pub activations: usize,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            scores: 8 << 20,
            dequant: 4 << 20,
            logits: 8 << 20,
            activations: 64 << 20,
        }
    }
}

/// LoRA as trained: rank, scale and, for a mixture of LoRA experts, its routing and
/// auxiliary loss weights.
#[derive(Debug, Clone)]
pub struct LoraShape {
    /// Rank (of each expert in a mixture).
    pub rank: usize,
    /// Scale `s` of `s B A x`.
    pub scale: f32,
    /// The mixture's routing.
    pub experts: Option<LoraExperts>,
    /// Weight of the load-balancing loss (a mixture only).
    pub balance_loss: f32,
    /// Weight of the router z-loss (a mixture only).
    pub z_loss: f32,
}

impl LoraShape {
    /// Rows of the stacked A: the rank times the experts.
    pub fn width(&self) -> usize {
        self.rank * self.experts.map_or(1, |e| e.n_experts)
    }
}

/// A mixture's shape on one adapted layer, its route and gated activations, and the
/// statistics every layer shares.
type MixLayer<'a> = (MixShape, &'a (MixRoute, Tensor), &'a MixStats);

/// Per-row inputs of a block, written before each replay.
pub struct Inputs {
    /// Token ids `[rows]`.
    pub ids: Tensor,
    /// Positions `[rows]`.
    pub pos: Tensor,
    /// Predicted token per row (`u32::MAX`: none) `[rows]`.
    pub targets: Tensor,
    /// Loss weight per row `[rows]` (1 / tokens scored in the whole step).
    pub weights: Tensor,
    /// Key ranges `[rows][2]`.
    pub ranges: Tensor,
    /// Virtual row index per row (`u32::MAX`: a token row) `[rows]`.
    pub virt: Tensor,
    /// Weight of each row in a mixture's auxiliary losses `[rows]`: 1 / tokens of the step
    /// on token rows, 0 on virtual and padding rows.
    pub route_w: Tensor,
}

/// A step's dispatches and buffers.
pub struct Graph {
    /// Rows per block.
    pub rows: usize,
    /// Inputs to write before replaying.
    pub inputs: Inputs,
    /// Per-row weighted loss after a replay `[rows]`.
    pub loss: Tensor,
    /// Forward and loss only.
    pub eval_ops: Vec<Dispatch>,
    /// Forward, loss and backward (gradients accumulate).
    pub train_ops: Vec<Dispatch>,
    /// [`Graph::eval_ops`] for blocks with distilled rows: the base model's forward (no
    /// adapter) first, its logits the teacher of those rows. Empty when distillation does
    /// not apply (no LoRA, or virtual tokens).
    pub distill_eval_ops: Vec<Dispatch>,
    /// [`Graph::train_ops`] likewise.
    pub distill_train_ops: Vec<Dispatch>,
    /// Device bytes of activations and scratch.
    pub bytes: u64,
    /// A mixture of LoRA experts' load counters and auxiliary loss terms, and the
    /// (layer, target) of each counter slot.
    pub mix: Option<(MixStats, Vec<(usize, Target)>)>,
}

/// One layer's activations that the backward reads.
struct Acts {
    xmid: Tensor,
    h1: Tensor,
    h2: Tensor,
    qkv: Tensor,
    attn: Tensor,
    gu: Tensor,
    ff: Tensor,
    /// LoRA `A x` per target (`[rows][width]`).
    t: HashMap<Target, Tensor>,
    /// A mixture's route and gated `A x` per target.
    mix: HashMap<Target, (MixRoute, Tensor)>,
    /// q|k|v before the q/k norms (models that have them), `[rows][qkv_dim]`.
    qkv_raw: Option<Tensor>,
}

impl Acts {
    fn new(
        ctx: &Context,
        c: &crate::model::config::ModelConfig,
        m: usize,
        targets: &[Target],
        lora: Option<&LoraShape>,
    ) -> Result<Acts> {
        let f = |n: usize| Tensor::zeros(ctx, &[m, n], DType::F32);
        let width = lora.map_or(1, |l| l.width());
        let mut t = HashMap::new();
        let mut mix = HashMap::new();
        for &tg in targets {
            t.insert(tg, f(width)?);
            if let Some(e) = lora.and_then(|l| l.experts) {
                let route = MixRoute {
                    z: f(e.n_experts)?,
                    g: f(e.n_experts)?,
                    pr: f(e.n_experts)?,
                    sel: Tensor::zeros(ctx, &[m], DType::U32)?,
                };
                mix.insert(tg, (route, f(width)?));
            }
        }
        Ok(Acts {
            xmid: f(c.hidden)?,
            h1: f(c.hidden)?,
            h2: f(c.hidden)?,
            qkv: f(c.qkv_dim())?,
            attn: f(c.q_dim())?,
            gu: f(2 * c.ff)?,
            ff: f(c.ff)?,
            t,
            mix,
            qkv_raw: if c.qk_norm == QkNorm::None {
                None
            } else {
                Some(f(c.qkv_dim())?)
            },
        })
    }

    /// Floats per row.
    fn per_row(
        c: &crate::model::config::ModelConfig,
        n_targets: usize,
        lora: Option<&LoraShape>,
    ) -> usize {
        let width = lora.map_or(1, |l| l.width());
        let mix = match lora.and_then(|l| l.experts) {
            Some(e) => width + 3 * e.n_experts + 1,
            None => 0,
        };
        let raw = if c.qk_norm == QkNorm::None {
            0
        } else {
            c.qkv_dim()
        };
        3 * c.hidden + c.qkv_dim() + raw + c.q_dim() + 3 * c.ff + n_targets * (width + mix)
    }

    fn bytes(&self) -> u64 {
        [
            &self.xmid, &self.h1, &self.h2, &self.qkv, &self.attn, &self.gu, &self.ff,
        ]
        .iter()
        .map(|t| t.bytes())
        .sum::<u64>()
            + self.t.values().map(|t| t.bytes()).sum::<u64>()
            + self
                .mix
                .values()
                .map(|(r, u)| r.z.bytes() + r.g.bytes() + r.pr.bytes() + r.sel.bytes() + u.bytes())
                .sum::<u64>()
            + self.qkv_raw.as_ref().map_or(0, |t| t.bytes())
    }
}

struct Bufs {
    xs: Vec<Tensor>,
    /// Every layer's activations when they fit the budget, else one set reused.
    acts: Vec<Acts>,
    /// Final norm output.
    hf: Tensor,
    dx: Tensor,
    dh: Tensor,
    dqkv: Tensor,
    dattn: Tensor,
    dgu: Tensor,
    dff: Tensor,
    dt: Tensor,
    /// A mixture's gate / router-logit gradients `[rows][E]`.
    dz: Tensor,
    /// q/k norms' backward: raw values, output and input gradients packed `[rows][q_dim]`,
    /// and the identity row map that copies them out of and into the fused rows.
    qk_norm: Option<([Tensor; 3], Tensor)>,
    logits: Tensor,
    logit_rows: usize,
    zeros: Tensor,
    /// The base model's final hidden states and one chunk of its logits (distillation).
    teacher: Option<(Tensor, Tensor)>,
}

struct Builder<'a> {
    ctx: &'a Context,
    model: &'a Model,
    params: &'a ParamStore,
    lora: Option<LoraShape>,
    virt: Virtual,
    rows: usize,
    rope: &'a RopeTable,
    keep: bool,
    att: TrainAttention,
    dq: Dequant,
    inputs: Inputs,
    loss: Tensor,
    b: Bufs,
    /// Building the base model's (teacher's) forward: adapters left out.
    base_only: Cell<bool>,
    /// A mixture's shared statistics and the counter slot of each (layer, target).
    mix: Option<(MixStats, Vec<(usize, Target)>)>,
    /// A Mixture-of-Experts base's feed-forward buffers.
    moe: Option<MoeTrain>,
}

/// A view of `rows` rows of `cols` starting at row `r0` (r0 * cols * 4 must be a multiple
/// of 256 bytes: row chunks are multiples of 64).
fn rows_of(t: &Tensor, r0: usize, rows: usize, cols: usize) -> Result<Tensor> {
    Tensor::view(
        t.buffer().clone(),
        t.offset() + 4 * (r0 * cols) as u64,
        &[rows, cols],
        t.dtype(),
    )
}

impl Graph {
    /// Builds the step for blocks of `rows` rows (a multiple of 32).
    pub fn new(
        model: &Model,
        params: &ParamStore,
        lora: Option<LoraShape>,
        virt: Virtual,
        rows: usize,
        rope: &RopeTable,
        budgets: Budgets,
    ) -> Result<Graph> {
        let ctx = model.context();
        let c = &model.config;
        let m = rows;
        let f = |n: usize| Tensor::zeros(ctx, &[m, n], DType::F32);
        let u = |n: usize| Tensor::zeros(ctx, &[m * n], DType::U32);
        let inputs = Inputs {
            ids: u(1)?,
            pos: u(1)?,
            targets: u(1)?,
            weights: Tensor::zeros(ctx, &[m], DType::F32)?,
            ranges: u(2)?,
            virt: u(1)?,
            route_w: Tensor::zeros(ctx, &[m], DType::F32)?,
        };
        let att = TrainAttention::new(
            ctx,
            AttnShape {
                rows: m,
                n_heads: c.n_heads,
                n_kv: c.n_kv_heads,
                head_dim: c.head_dim,
                scale: 1.0 / (c.head_dim as f32).sqrt(),
            },
            &inputs.ranges,
            budgets.scores,
        )?;
        let mut linears = vec![&model.lm_head];
        let mut experts = Vec::new();
        for l in &model.layers {
            linears.extend([&l.qkv, &l.o]);
            match l.moe() {
                Some(f) => {
                    linears.push(&f.router);
                    experts.extend([&f.gate_up, &f.down]);
                    if let Some(sh) = &f.shared {
                        linears.extend([&sh.gate_up, &sh.down]);
                        linears.extend(sh.gate.as_ref());
                    }
                }
                None => linears.extend(<[&Linear; 2]>::from(l.mlp("training")?)),
            }
        }
        let dq = Dequant::new(
            ctx,
            linears.into_iter(),
            experts.into_iter(),
            budgets.dequant,
        )?;
        let moe = MoeTrain::new(ctx, model, m, &inputs.route_w)?;
        // Distillation needs the base model's logits beside the adapted ones: the two chunks
        // share the logits budget, so training without it costs no extra memory.
        let distill = lora.is_some() && virt == Virtual::None;
        let logits_budget = budgets.logits / if distill { 2 } else { 1 };
        let logit_rows = if m <= 64 {
            m
        } else {
            (logits_budget / c.vocab / 64 * 64).clamp(64, m)
        };
        let width = lora.as_ref().map_or(1, |l| l.width());
        let mut targets: Vec<Target> = params
            .keys()
            .iter()
            .filter_map(|k| match k {
                ParamKey::LoraA(_, tg) => Some(*tg),
                _ => None,
            })
            .collect();
        targets.sort();
        targets.dedup();
        let keep =
            Acts::per_row(c, targets.len(), lora.as_ref()) * m * c.n_layers <= budgets.activations;
        let acts = (0..if keep { c.n_layers } else { 1 })
            .map(|_| Acts::new(ctx, c, m, &targets, lora.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let mix = match lora.as_ref().and_then(|l| l.experts) {
            Some(e) => {
                let slots: Vec<(usize, Target)> = params
                    .keys()
                    .iter()
                    .filter_map(|k| match k {
                        ParamKey::Router(l, tg) => Some((*l, *tg)),
                        _ => None,
                    })
                    .collect();
                let n = slots.len().max(1);
                let stats = MixStats {
                    w: inputs.route_w.clone(),
                    f: Tensor::zeros(ctx, &[LoraExperts::MAX_EXPERTS], DType::F32)?,
                    counts: Tensor::zeros(ctx, &[n * e.n_experts], DType::U32)?,
                    loss: Tensor::zeros(ctx, &[n * (e.n_experts + 1)], DType::F32)?,
                };
                Some((stats, slots))
            }
            None => None,
        };
        let b = Bufs {
            xs: (0..=c.n_layers)
                .map(|_| f(c.hidden))
                .collect::<Result<_>>()?,
            acts,
            hf: f(c.hidden)?,
            dx: f(c.hidden)?,
            dh: f(c.hidden)?,
            dqkv: f(c.qkv_dim())?,
            dattn: f(c.q_dim())?,
            dgu: f(2 * c.ff)?,
            dff: f(c.ff)?,
            dt: f(width)?,
            dz: f(LoraExperts::MAX_EXPERTS)?,
            qk_norm: if c.qk_norm == QkNorm::None {
                None
            } else {
                let iota: Vec<u32> = (0..m as u32).collect();
                Some((
                    [f(c.q_dim())?, f(c.q_dim())?, f(c.q_dim())?],
                    Tensor::from_slice(ctx, &[m], DType::U32, &iota)?,
                ))
            },
            logits: Tensor::zeros(ctx, &[logit_rows, c.vocab], DType::F32)?,
            logit_rows,
            zeros: Tensor::zeros(ctx, &[virt.rows().max(1) * 2 * c.kv_dim()], DType::F32)?,
            teacher: if distill {
                Some((
                    f(c.hidden)?,
                    Tensor::zeros(ctx, &[logit_rows, c.vocab], DType::F32)?,
                ))
            } else {
                None
            },
        };
        let bld = Builder {
            ctx,
            model,
            params,
            lora,
            virt,
            rows: m,
            rope,
            keep,
            att,
            dq,
            loss: Tensor::zeros(ctx, &[m], DType::F32)?,
            inputs,
            b,
            base_only: Cell::new(false),
            mix,
            moe,
        };
        let eval_ops = bld.forward(false, false)?;
        let train_ops = bld.train(false)?;
        let (distill_eval_ops, distill_train_ops) = if bld.b.teacher.is_some() {
            (bld.forward(false, true)?, bld.train(true)?)
        } else {
            (Vec::new(), Vec::new())
        };
        let bytes = bld.bytes();
        Ok(Graph {
            rows: m,
            inputs: bld.inputs,
            loss: bld.loss,
            eval_ops,
            train_ops,
            distill_eval_ops,
            distill_train_ops,
            bytes,
            mix: bld.mix,
        })
    }
}

impl Builder<'_> {
    fn bytes(&self) -> u64 {
        let b = &self.b;
        let mut n: u64 = b.xs.iter().map(|t| t.bytes()).sum();
        for t in [
            &b.hf, &b.dx, &b.dh, &b.dqkv, &b.dattn, &b.dgu, &b.dff, &b.dt, &b.dz, &b.logits,
            &b.zeros,
        ] {
            n += t.bytes();
        }
        n += b.acts.iter().map(|a| a.bytes()).sum::<u64>();
        if let Some((h, logits)) = &b.teacher {
            n += h.bytes() + logits.bytes();
        }
        if let Some((st, _)) = &self.mix {
            n += st.f.bytes() + st.counts.bytes() + st.loss.bytes();
        }
        if let Some(moe) = &self.moe {
            n += moe.bytes();
        }
        if let Some((t, map)) = &b.qk_norm {
            n += t.iter().map(|t| t.bytes()).sum::<u64>() + map.bytes();
        }
        n + self.att.bytes() + self.dq.bytes() + 7 * 4 * self.rows as u64
    }

    fn moe_bufs(&self) -> Result<&MoeTrain> {
        self.moe
            .as_ref()
            .ok_or_else(|| Error::Internal("MoE layer without MoE training buffers".into()))
    }

    fn acts(&self, l: usize) -> &Acts {
        &self.b.acts[if self.keep { l } else { 0 }]
    }

    fn variant(&self) -> crate::kernels::Variant {
        self.model.variant
    }

    fn norm_desc(&self) -> NormDesc {
        let c = &self.model.config;
        NormDesc::new(NormKind::Rms, self.rows, c.hidden, c.norm_eps)
    }

    /// The q/k norm over `heads` heads of a row: per head (`rows * heads` rows of
    /// `head_dim`) or over all of them (`rows` rows).
    fn qk_norm_desc(&self, heads: usize) -> NormDesc {
        let c = &self.model.config;
        if c.qk_norm == QkNorm::PerHead {
            let mut d = NormDesc::new(NormKind::Rms, self.rows * heads, c.head_dim, c.norm_eps);
            d.heads = heads;
            d
        } else {
            NormDesc::new(NormKind::Rms, self.rows, heads * c.head_dim, c.norm_eps)
        }
    }

    fn lora_on(&self, l: usize, t: Target) -> bool {
        !self.base_only.get() && self.params.has(ParamKey::LoraA(l, t))
    }

    /// Forward, loss and the whole backward.
    fn train(&self, distill: bool) -> Result<Vec<Dispatch>> {
        let mut ops = self.forward(true, distill)?;
        for l in (0..self.model.config.n_layers).rev() {
            ops.extend(self.layer_backward(l)?);
        }
        ops.extend(self.embed_backward()?);
        Ok(ops)
    }

    /// The base model's forward over the block (no adapter), leaving its final hidden
    /// states in the teacher buffer; the adapted forward that follows overwrites every
    /// activation it used.
    fn teacher_forward(&self, h: &Tensor) -> Result<Vec<Dispatch>> {
        let (ctx, c, b) = (self.ctx, &self.model.config, &self.b);
        let mut ops = self.model.embed.gather(ctx, &b.xs[0], &self.inputs.ids)?;
        self.base_only.set(true);
        let layers: Result<Vec<Vec<Dispatch>>> = (0..c.n_layers)
            .map(|l| self.layer_forward(l, &b.xs[l], Some(&b.xs[l + 1])))
            .collect();
        self.base_only.set(false);
        ops.extend(layers?.into_iter().flatten());
        ops.push(norm_with(
            ctx,
            h,
            &b.xs[c.n_layers],
            Some(&self.model.norm),
            None,
            &self.norm_desc(),
        )?);
        Ok(ops)
    }

    fn linear(
        &self,
        w: &Linear,
        y: &Tensor,
        x: &Tensor,
        ldx: usize,
        ldy: usize,
        accumulate: bool,
    ) -> Result<Vec<Dispatch>> {
        let r = Rows {
            m: self.rows,
            ldx,
            ldy,
            y_off: 0,
            accumulate,
            glu: 0,
        };
        w.forward(self.ctx, y, x, r, self.variant(), QShape::Auto)
    }

    /// `t = x A^T` for LoRA target `tg` of layer `l` (nothing when not adapted).
    fn lora_t(&self, l: usize, tg: Target, x: &Tensor, ldx: usize) -> Result<Vec<Dispatch>> {
        if !self.lora_on(l, tg) {
            return Ok(Vec::new());
        }
        let (_, inp) = tg.dims(&self.model.config);
        let r = self.rank();
        let mut d = MatmulDesc::new(self.rows, r, inp);
        d.lda = ldx;
        let t = &self.acts(l).t[&tg];
        let mut ops = vec![matmul(
            self.ctx,
            t,
            x,
            &self.params.value(ParamKey::LoraA(l, tg))?,
            &d,
            self.variant(),
        )?];
        if let Some((s, (route, u), _)) = self.mix_shape(l, tg)? {
            // Router logits, the top-k route, then each expert's columns scaled by its gate.
            let mut d = MatmulDesc::new(self.rows, s.n_experts, inp);
            d.lda = ldx;
            let router = self.params.value(ParamKey::Router(l, tg))?;
            ops.push(matmul(self.ctx, &route.z, x, &router, &d, self.variant())?);
            ops.push(mix_route(self.ctx, &s, route)?);
            ops.push(mix_gate(self.ctx, &s, route, t, u)?);
        }
        Ok(ops.into_iter().map(|o| tagged("lora_fwd", o)).collect())
    }

    /// A mixture's shape for (layer, target), with its activations.
    fn mix_shape(&self, l: usize, tg: Target) -> Result<Option<MixLayer<'_>>> {
        let (Some(lora), Some((stats, slots))) = (&self.lora, &self.mix) else {
            return Ok(None);
        };
        let Some(e) = lora.experts else {
            return Ok(None);
        };
        let slot = slots
            .iter()
            .position(|&k| k == (l, tg))
            .ok_or_else(|| Error::Internal(format!("no router for layer {l} {tg:?}")))?;
        let s = MixShape {
            rows: self.rows,
            n_experts: e.n_experts,
            top_k: e.top_k,
            renormalize: e.renormalize,
            rank: lora.rank,
            slot,
            aux_loss: lora.balance_loss,
            z_loss: lora.z_loss,
        };
        Ok(Some((s, &self.acts(l).mix[&tg], stats)))
    }

    /// The LoRA activations B multiplies: `A x`, gated per expert in a mixture.
    fn lora_act(&self, l: usize, tg: Target) -> &Tensor {
        match self.acts(l).mix.get(&tg) {
            Some((_, u)) => u,
            None => &self.acts(l).t[&tg],
        }
    }

    /// `y[:, off..] += s t B^T`.
    fn lora_out(
        &self,
        l: usize,
        tg: Target,
        y: &Tensor,
        ldy: usize,
        off: usize,
    ) -> Result<Vec<Dispatch>> {
        if !self.lora_on(l, tg) {
            return Ok(Vec::new());
        }
        let (out, _) = tg.dims(&self.model.config);
        let mut d = MatmulDesc::new(self.rows, out, self.rank());
        d.ldc = ldy;
        d.c_offset = off;
        d.alpha = self.scale();
        d.accumulate = true;
        Ok(vec![tagged(
            "lora_fwd",
            matmul(
                self.ctx,
                y,
                self.lora_act(l, tg),
                &self.params.value(ParamKey::LoraB(l, tg))?,
                &d,
                self.variant(),
            )?,
        )])
    }

    /// LoRA gradients of target `tg` from `dy[:, off..]` and input `x`, and the input
    /// gradient's LoRA part into `dx` (accumulated).
    #[allow(clippy::too_many_arguments)]
    fn lora_backward(
        &self,
        l: usize,
        tg: Target,
        dy: &Tensor,
        ld_dy: usize,
        off: usize,
        x: &Tensor,
        ldx: usize,
        dx: &Tensor,
    ) -> Result<Vec<Dispatch>> {
        if !self.lora_on(l, tg) {
            return Ok(Vec::new());
        }
        let (out, inp) = tg.dims(&self.model.config);
        let (m, r, s, v) = (self.rows, self.rank(), self.scale(), self.variant());
        let a = self.params.value(ParamKey::LoraA(l, tg))?;
        let bm = self.params.value(ParamKey::LoraB(l, tg))?;
        let ga = self.params.gradient(ParamKey::LoraA(l, tg))?;
        let gb = self.params.gradient(ParamKey::LoraB(l, tg))?;
        let mut ops = Vec::new();
        // dB += s dY^T t (t gated per expert in a mixture)
        let mut d = MatmulDesc::new(out, r, m).layout(true, true);
        d.lda = ld_dy;
        d.off_a = off;
        d.alpha = s;
        d.accumulate = true;
        ops.push(matmul(self.ctx, &gb, dy, self.lora_act(l, tg), &d, v)?);
        // dt = s dY B
        let mut d = MatmulDesc::new(m, r, out).layout(false, true);
        d.lda = ld_dy;
        d.off_a = off;
        d.alpha = s;
        ops.push(matmul(self.ctx, &self.b.dt, dy, &bm, &d, v)?);
        if let Some((ms, (route, _), stats)) = self.mix_shape(l, tg)? {
            // The gates' gradient (dt becomes the ungated t's), the block's load and
            // auxiliary losses, the router logits' gradient, then the router's gradient
            // and its share of dx.
            let t = &self.acts(l).t[&tg];
            let ne = ms.n_experts;
            ops.push(mix_gate_backward(
                self.ctx, &ms, route, t, &self.b.dt, &self.b.dz,
            )?);
            ops.push(mix_aux_stats(self.ctx, &ms, route, stats)?);
            ops.push(mix_router_backward(
                self.ctx, &ms, route, stats, &self.b.dz,
            )?);
            let router = self.params.value(ParamKey::Router(l, tg))?;
            let grouter = self.params.gradient(ParamKey::Router(l, tg))?;
            let mut d = MatmulDesc::new(ne, inp, m).layout(true, true);
            d.ldb = ldx;
            d.accumulate = true;
            ops.push(matmul(self.ctx, &grouter, &self.b.dz, x, &d, v)?);
            let mut d = MatmulDesc::new(m, inp, ne).layout(false, true);
            d.ldc = ldx;
            d.accumulate = true;
            ops.push(matmul(self.ctx, dx, &self.b.dz, &router, &d, v)?);
        }
        // dA += dt^T x
        let mut d = MatmulDesc::new(r, inp, m).layout(true, true);
        d.ldb = ldx;
        d.accumulate = true;
        ops.push(matmul(self.ctx, &ga, &self.b.dt, x, &d, v)?);
        // dx += dt A
        let mut d = MatmulDesc::new(m, inp, r).layout(false, true);
        d.ldc = ldx;
        d.accumulate = true;
        ops.push(matmul(self.ctx, dx, &self.b.dt, &a, &d, v)?);
        Ok(ops.into_iter().map(|o| tagged("lora_bwd", o)).collect())
    }

    /// Columns of the LoRA activations: the rank, times the experts in a mixture.
    fn rank(&self) -> usize {
        self.lora.as_ref().map_or(1, |l| l.width())
    }

    fn scale(&self) -> f32 {
        self.lora.as_ref().map(|l| l.scale).unwrap_or(0.0)
    }

    fn virt_copy(&self, cols: usize, ld_dst: usize, off_dst: usize) -> RowCopy {
        RowCopy {
            rows: self.rows,
            cols,
            ld_src: cols,
            ld_dst,
            off_src: 0,
            off_dst,
        }
    }

    /// Layer `l` from `x_in`: the attention half's output (the FFN's input) into the
    /// layer's `xmid`, and with `x_out`, the layer's output (a copy plus residual adds).
    /// Without `x_out` only the activations the backward needs are computed.
    fn layer_forward(
        &self,
        l: usize,
        x_in: &Tensor,
        x_out: Option<&Tensor>,
    ) -> Result<Vec<Dispatch>> {
        let (ctx, c, m) = (self.ctx, &self.model.config, self.rows);
        let a = self.acts(l);
        let layer = &self.model.layers[l];
        let (hd, qkv_dim, q_dim, kv_dim) = (c.head_dim, c.qkv_dim(), c.q_dim(), c.kv_dim());
        let nd = self.norm_desc();
        let mut ops = vec![unary(
            ctx,
            UnaryOp::Copy,
            &a.xmid,
            Some(x_in),
            m * c.hidden,
        )?];
        ops.push(norm_with(
            ctx,
            &a.h1,
            x_in,
            Some(&layer.attn_norm),
            None,
            &nd,
        )?);
        // With q/k norms the projections go to the raw buffer, normalized into qkv.
        let raw = a.qkv_raw.as_ref().unwrap_or(&a.qkv);
        ops.extend(self.linear(&layer.qkv, raw, &a.h1, c.hidden, qkv_dim, false)?);
        if let Some(bias) = &layer.qkv_bias {
            ops.push(binary(
                ctx,
                BinaryOp::Add,
                raw,
                None,
                bias,
                m * qkv_dim,
                qkv_dim,
            )?);
        }
        for (tg, off) in [
            (Target::Q, 0),
            (Target::K, q_dim),
            (Target::V, q_dim + kv_dim),
        ] {
            ops.extend(self.lora_t(l, tg, &a.h1, c.hidden)?);
            ops.extend(self.lora_out(l, tg, raw, qkv_dim, off)?);
        }
        if let (Some(raw), Some((qn, kn))) = (&a.qkv_raw, &layer.qk_norm) {
            ops.push(unary(ctx, UnaryOp::Copy, &a.qkv, Some(raw), m * qkv_dim)?);
            for (w, off, heads) in [(qn, 0, c.n_heads), (kn, q_dim, c.n_kv_heads)] {
                let mut d = self.qk_norm_desc(heads);
                d.ld_x = qkv_dim;
                d.ld_out = qkv_dim;
                d.x_off = off;
                d.out_off = off;
                ops.push(rms_norm_in_place(ctx, &a.qkv, w, &d)?);
            }
        }
        for (heads, offset) in [(c.n_heads, 0), (c.n_kv_heads, q_dim)] {
            let hl = HeadLayout {
                tokens: m,
                heads,
                head_dim: hd,
                ld: qkv_dim,
                offset,
            };
            ops.push(rope(ctx, &a.qkv, &self.inputs.pos, self.rope, hl, false)?);
        }
        if let Virtual::Prefix(_) = self.virt {
            let p = self.params.value(ParamKey::Prefix(l))?;
            let rc = self.virt_copy(2 * kv_dim, qkv_dim, q_dim);
            ops.push(rows_gather(ctx, &a.qkv, &p, &self.inputs.virt, &rc)?);
        }
        ops.extend(self.att.forward(ctx, &a.qkv, &a.attn, self.variant())?);
        ops.extend(self.linear(&layer.o, &a.xmid, &a.attn, q_dim, c.hidden, true)?);
        ops.extend(self.lora_t(l, Target::O, &a.attn, q_dim)?);
        ops.extend(self.lora_out(l, Target::O, &a.xmid, c.hidden, 0)?);
        ops.push(norm_with(
            ctx,
            &a.h2,
            &a.xmid,
            Some(&layer.ffn_norm),
            None,
            &nd,
        )?);
        if let Some(f) = layer.moe() {
            // The routed block: only its output is needed (the backward recomputes the
            // experts one at a time).
            if let Some(x_out) = x_out {
                let moe = self.moe_bufs()?;
                ops.push(unary(
                    ctx,
                    UnaryOp::Copy,
                    x_out,
                    Some(&a.xmid),
                    m * c.hidden,
                )?);
                ops.extend(moe.forward(ctx, f, l, x_out, &a.h2, self.variant())?);
            }
            return Ok(ops);
        }
        let (gate_up, down) = layer.mlp("training")?;
        ops.extend(self.linear(gate_up, &a.gu, &a.h2, c.hidden, 2 * c.ff, false)?);
        for (tg, off) in [(Target::Gate, 0), (Target::Up, c.ff)] {
            ops.extend(self.lora_t(l, tg, &a.h2, c.hidden)?);
            ops.extend(self.lora_out(l, tg, &a.gu, 2 * c.ff, off)?);
        }
        ops.push(swiglu(ctx, &a.ff, &a.gu, None, m, c.ff)?);
        ops.extend(self.lora_t(l, Target::Down, &a.ff, c.ff)?);
        if let Some(x_out) = x_out {
            ops.push(unary(
                ctx,
                UnaryOp::Copy,
                x_out,
                Some(&a.xmid),
                m * c.hidden,
            )?);
            ops.extend(self.linear(down, x_out, &a.ff, c.ff, c.hidden, true)?);
            ops.extend(self.lora_out(l, Target::Down, x_out, c.hidden, 0)?);
        }
        Ok(ops)
    }

    /// The whole forward and the loss; with `grad`, the loss gradient reaches `dx`. With
    /// `distill`, the base model's forward runs first and its logits are the targets of
    /// distilled rows.
    fn forward(&self, grad: bool, distill: bool) -> Result<Vec<Dispatch>> {
        let (ctx, c, b, m) = (self.ctx, &self.model.config, &self.b, self.rows);
        let teacher = if distill {
            let t = b.teacher.as_ref().ok_or_else(|| {
                Error::InvalidArgument(
                    "distillation needs a LoRA adapter trained without virtual tokens".into(),
                )
            })?;
            Some(t)
        } else {
            None
        };
        let mut ops = match teacher {
            Some((h, _)) => self.teacher_forward(h)?,
            None => Vec::new(),
        };
        ops.extend(self.model.embed.gather(ctx, &b.xs[0], &self.inputs.ids)?);
        if let Virtual::Prompt(_) = self.virt {
            let p = self.params.value(ParamKey::Prompt)?;
            let rc = self.virt_copy(c.hidden, c.hidden, 0);
            ops.push(rows_gather(ctx, &b.xs[0], &p, &self.inputs.virt, &rc)?);
        }
        for l in 0..c.n_layers {
            ops.extend(self.layer_forward(l, &b.xs[l], Some(&b.xs[l + 1]))?);
        }
        let top = &b.xs[c.n_layers];
        ops.push(norm_with(
            ctx,
            &b.hf,
            top,
            Some(&self.model.norm),
            None,
            &self.norm_desc(),
        )?);
        let tl = b.logit_rows;
        let mut r0 = 0;
        while r0 < m {
            let n = tl.min(m - r0);
            let h = rows_of(&b.hf, r0, n, c.hidden)?;
            let r = Rows {
                m: n,
                ldx: c.hidden,
                ldy: c.vocab,
                y_off: 0,
                accumulate: false,
                glu: 0,
            };
            ops.extend(self.model.lm_head.forward(
                ctx,
                &b.logits,
                &h,
                r,
                self.variant(),
                QShape::Auto,
            )?);
            let (tg, w, loss) = (
                rows_of(&self.inputs.targets, r0, n, 1)?,
                rows_of(&self.inputs.weights, r0, n, 1)?,
                rows_of(&self.loss, r0, n, 1)?,
            );
            match teacher {
                Some((th, tlog)) => {
                    ops.extend(self.model.lm_head.forward(
                        ctx,
                        tlog,
                        &rows_of(th, r0, n, c.hidden)?,
                        r,
                        self.variant(),
                        QShape::Auto,
                    )?);
                    ops.push(xent_distill(
                        ctx, &b.logits, tlog, &tg, &w, &loss, n, c.vocab, c.vocab,
                    )?);
                }
                None => ops.push(xent(ctx, &b.logits, &tg, &w, &loss, n, c.vocab, c.vocab)?),
            }
            if grad {
                let dh = rows_of(&b.dh, r0, n, c.hidden)?;
                let gr = GradRows {
                    m: n,
                    ld_dy: c.vocab,
                    dy_off: 0,
                    ld_dx: c.hidden,
                    accumulate: false,
                };
                ops.extend(linear_backward(
                    ctx,
                    &self.model.lm_head,
                    &dh,
                    &b.logits,
                    gr,
                    &self.dq,
                    self.variant(),
                )?);
            }
            r0 += n;
        }
        if grad {
            ops.push(rmsnorm_backward(
                ctx,
                &b.dx,
                top,
                &self.model.norm,
                &b.dh,
                m,
                c.hidden,
                c.hidden,
                c.hidden,
                c.norm_eps,
                false,
            )?);
        }
        Ok(ops)
    }

    fn frozen_backward(
        &self,
        w: &Linear,
        dx: &Tensor,
        dy: &Tensor,
        ld_dy: usize,
        ld_dx: usize,
    ) -> Result<Vec<Dispatch>> {
        let gr = GradRows {
            m: self.rows,
            ld_dy,
            dy_off: 0,
            ld_dx,
            accumulate: false,
        };
        linear_backward(self.ctx, w, dx, dy, gr, &self.dq, self.variant())
    }

    /// `dx` holds dL/dxs[l+1] on entry and dL/dxs[l] on exit.
    fn layer_backward(&self, l: usize) -> Result<Vec<Dispatch>> {
        let (ctx, c, b, m) = (self.ctx, &self.model.config, &self.b, self.rows);
        let layer = &self.model.layers[l];
        let (hd, qkv_dim, q_dim, kv_dim, ff) =
            (c.head_dim, c.qkv_dim(), c.q_dim(), c.kv_dim(), c.ff);
        let a = self.acts(l);
        let mut ops = if self.keep {
            Vec::new()
        } else {
            self.layer_forward(l, &b.xs[l], None)?
        };
        // FFN: x' = xmid + down(swiglu(gate_up(norm(xmid)))), or the routed experts.
        if let Some(f) = layer.moe() {
            let moe = self.moe_bufs()?;
            ops.extend(moe.backward(ctx, f, &a.h2, &b.dx, &b.dh, &self.dq, self.variant())?);
        } else {
            let (gate_up, down) = layer.mlp("training")?;
            ops.extend(self.frozen_backward(down, &b.dff, &b.dx, c.hidden, ff)?);
            ops.extend(self.lora_backward(
                l,
                Target::Down,
                &b.dx,
                c.hidden,
                0,
                &a.ff,
                ff,
                &b.dff,
            )?);
            ops.push(swiglu_backward(ctx, &b.dgu, &a.gu, &b.dff, m, ff)?);
            ops.extend(self.frozen_backward(gate_up, &b.dh, &b.dgu, 2 * ff, c.hidden)?);
            for (tg, off) in [(Target::Gate, 0), (Target::Up, ff)] {
                ops.extend(self.lora_backward(
                    l,
                    tg,
                    &b.dgu,
                    2 * ff,
                    off,
                    &a.h2,
                    c.hidden,
                    &b.dh,
                )?);
            }
        }
        ops.push(rmsnorm_backward(
            ctx,
            &b.dx,
            &a.xmid,
            &layer.ffn_norm,
            &b.dh,
            m,
            c.hidden,
            c.hidden,
            c.hidden,
            c.norm_eps,
            true,
        )?);
        // Attention: xmid = x + o(attention(rope(qkv(norm(x))))).
        ops.extend(self.frozen_backward(&layer.o, &b.dattn, &b.dx, c.hidden, q_dim)?);
        ops.extend(self.lora_backward(
            l,
            Target::O,
            &b.dx,
            c.hidden,
            0,
            &a.attn,
            q_dim,
            &b.dattn,
        )?);
        ops.extend(
            self.att
                .backward(ctx, &a.qkv, &b.dattn, &b.dqkv, self.keep, self.variant())?,
        );
        if let Virtual::Prefix(_) = self.virt {
            // The prefix rows' keys and values are parameters: their gradient goes there
            // and stops (their q/k/v projections were never used).
            let g = self.params.gradient(ParamKey::Prefix(l))?;
            let acc = RowCopy {
                rows: m,
                cols: 2 * kv_dim,
                ld_src: qkv_dim,
                ld_dst: 2 * kv_dim,
                off_src: q_dim,
                off_dst: 0,
            };
            ops.push(rows_accumulate(ctx, &g, &b.dqkv, &self.inputs.virt, &acc)?);
            let rc = self.virt_copy(2 * kv_dim, qkv_dim, q_dim);
            ops.push(rows_gather(ctx, &b.dqkv, &b.zeros, &self.inputs.virt, &rc)?);
        }
        for (heads, offset) in [(c.n_heads, 0), (c.n_kv_heads, q_dim)] {
            let hl = HeadLayout {
                tokens: m,
                heads,
                head_dim: hd,
                ld: qkv_dim,
                offset,
            };
            ops.push(rope(ctx, &b.dqkv, &self.inputs.pos, self.rope, hl, true)?);
        }
        if let (Some(raw), Some((qn, kn)), Some((tmp, map))) =
            (&a.qkv_raw, &layer.qk_norm, &b.qk_norm)
        {
            // Through the q/k norms: each part packed, its RMSNorm backward, copied back.
            for (w, off, heads) in [(qn, 0, c.n_heads), (kn, q_dim, c.n_kv_heads)] {
                let cols = heads * hd;
                let out = RowCopy {
                    rows: m,
                    cols,
                    ld_src: qkv_dim,
                    ld_dst: cols,
                    off_src: off,
                    off_dst: 0,
                };
                ops.push(rows_gather(ctx, &tmp[0], raw, map, &out)?);
                ops.push(rows_gather(ctx, &tmp[1], &b.dqkv, map, &out)?);
                let d = self.qk_norm_desc(heads);
                ops.push(rmsnorm_backward(
                    ctx, &tmp[2], &tmp[0], w, &tmp[1], d.rows, d.cols, d.cols, d.cols, c.norm_eps,
                    false,
                )?);
                let back = RowCopy {
                    rows: m,
                    cols,
                    ld_src: cols,
                    ld_dst: qkv_dim,
                    off_src: 0,
                    off_dst: off,
                };
                ops.push(rows_gather(ctx, &b.dqkv, &tmp[2], map, &back)?);
            }
        }
        ops.extend(self.frozen_backward(&layer.qkv, &b.dh, &b.dqkv, qkv_dim, c.hidden)?);
        for (tg, off) in [
            (Target::Q, 0),
            (Target::K, q_dim),
            (Target::V, q_dim + kv_dim),
        ] {
            ops.extend(self.lora_backward(l, tg, &b.dqkv, qkv_dim, off, &a.h1, c.hidden, &b.dh)?);
        }
        ops.push(rmsnorm_backward(
            ctx,
            &b.dx,
            &b.xs[l],
            &layer.attn_norm,
            &b.dh,
            m,
            c.hidden,
            c.hidden,
            c.hidden,
            c.norm_eps,
            true,
        )?);
        Ok(ops)
    }

    /// Soft prompt rows take the gradient of their embeddings.
    fn embed_backward(&self) -> Result<Vec<Dispatch>> {
        let c = &self.model.config;
        match self.virt {
            Virtual::Prompt(_) => {
                let g = self.params.gradient(ParamKey::Prompt)?;
                let rc = RowCopy::packed(self.rows, c.hidden);
                Ok(vec![rows_accumulate(
                    self.ctx,
                    &g,
                    &self.b.dx,
                    &self.inputs.virt,
                    &rc,
                )?])
            }
            _ => Ok(Vec::new()),
        }
    }
}

fn tagged(name: &'static str, mut op: Dispatch) -> Dispatch {
    op.name = name;
    op
}

/// Checks that `rows` suits a step block.
pub fn check_rows(rows: usize) -> Result<()> {
    if rows == 0 || rows % crate::train::attention::BLOCK_ALIGN != 0 {
        return Err(Error::InvalidArgument(format!(
            "training rows per block must be a positive multiple of {} (got {rows})",
            crate::train::attention::BLOCK_ALIGN
        )));
    }
    Ok(())
}
