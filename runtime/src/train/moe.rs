//! Training adapters on a frozen Mixture-of-Experts base: the gradient through its routed
//! feed-forward blocks.
//!
//! The forward is the inference path's ([`MoeFfn::forward`]: the router, the top-k route,
//! the chosen experts only). The backward treats the experts as frozen but passes the
//! gradient through everything that depends on the input: for each expert `e`, over every
//! row (rows that did not choose `e` have gate 0), the expert's SwiGLU is recomputed from
//! its dequantized weights, its gate gets `dg_e = dy . out_e`, and `dh += W_gu_e^T
//! swiglu'(g_e W_down_e^T dy)`; then the router logits' gradient through the softmax and
//! the top-k renormalization (the route held fixed) adds `W_router^T dz`. Computing every
//! expert on every row costs E/k times the routed forward; it keeps one fixed list of
//! dispatches whatever the routing, which the replayed step graph needs. A shared expert
//! (Qwen2-MoE) is a dense SwiGLU MLP on every row, scaled by `sigmoid(w . h)` when it has
//! that gate; its gradient adds the MLP's and the gate's.

use crate::error::{Error, Result};
use crate::gpu::{Context, DType, Dispatch, Tensor};
use crate::kernels::elementwise::swiglu;
use crate::kernels::lora_moe::{
    mix_route, mix_router_backward, mix_rows_dot, mix_rows_scale, mix_sigmoid_backward, MixRoute,
    MixShape, MixStats,
};
use crate::kernels::moe::{route, Gating};
use crate::kernels::quant::QShape;
use crate::kernels::train::{fill, swiglu_backward};
use crate::kernels::Variant;
use crate::model::moe::{MoeFfn, MoeScratch, SharedExpert};
use crate::model::weights::Rows;
use crate::model::Model;
use crate::train::frozen::{expert_product, linear_backward, Dequant, ExpertRows, GradRows};

/// Buffers of the MoE blocks' forward and backward over a block of rows (shared by every
/// MoE layer: the backward recomputes what it needs, one expert at a time).
pub struct MoeTrain {
    rows: usize,
    scratch: MoeScratch,
    route: MixRoute,
    stats: MixStats,
    dg: Tensor,
    gu: Tensor,
    act: Tensor,
    out: Tensor,
    dout: Tensor,
    dact: Tensor,
    dgu: Tensor,
    shared: Option<SharedBufs>,
}

/// A shared expert's recomputed activations and gradients.
struct SharedBufs {
    gu: Tensor,
    act: Tensor,
    out: Tensor,
    dout: Tensor,
    dact: Tensor,
    dgu: Tensor,
    /// Gate logit, its sigmoid and the route's (single) expert id, `[rows]`.
    logit: Tensor,
    sigma: Tensor,
    id: Tensor,
    /// The gate's gradient `[rows]`.
    dsigma: Tensor,
}

/// Refuses what the backward does not cover, naming the layer.
fn check(l: usize, f: &MoeFfn) -> Result<()> {
    if !matches!(f.gating, Gating::SoftmaxRenorm | Gating::Softmax) {
        return Err(Error::Unsupported(format!(
            "training on a Mixture-of-Experts base with {:?} gating (layer {l})",
            f.gating
        )));
    }
    if f.n_experts() > 256 {
        return Err(Error::Unsupported(format!(
            "training on a Mixture-of-Experts base with {} experts (at most 256)",
            f.n_experts()
        )));
    }
    Ok(())
}

impl MoeTrain {
    /// Buffers for `rows` rows of `model` (None for a dense model); `route_w` is the
    /// graph's per-row weight input (unused by the base's router, bound for its kernels).
    pub fn new(
        ctx: &Context,
        model: &Model,
        rows: usize,
        route_w: &Tensor,
    ) -> Result<Option<MoeTrain>> {
        let mut first = None;
        for (l, layer) in model.layers.iter().enumerate() {
            if let Some(f) = layer.moe() {
                check(l, f)?;
                first.get_or_insert(f);
            }
        }
        let Some(f) = first else {
            return Ok(None);
        };
        let (e, hidden, ff) = (f.n_experts(), f.router.cols, f.ff());
        let z = |n: usize| Tensor::zeros(ctx, &[rows, n], DType::F32);
        Ok(Some(MoeTrain {
            rows,
            scratch: MoeScratch::new(ctx, f, rows, model.layers.len())?,
            route: MixRoute {
                z: z(e)?,
                g: z(e)?,
                pr: z(e)?,
                sel: Tensor::zeros(ctx, &[rows], DType::U32)?,
            },
            stats: MixStats {
                w: route_w.clone(),
                f: Tensor::zeros(ctx, &[e], DType::F32)?,
                counts: Tensor::zeros(ctx, &[e], DType::U32)?,
                loss: Tensor::zeros(ctx, &[e + 1], DType::F32)?,
            },
            dg: z(e)?,
            gu: z(2 * ff)?,
            act: z(ff)?,
            out: z(hidden)?,
            dout: z(hidden)?,
            dact: z(ff)?,
            dgu: z(2 * ff)?,
            shared: match &f.shared {
                Some(sh) => {
                    let sff = sh.ff();
                    Some(SharedBufs {
                        gu: z(2 * sff)?,
                        act: z(sff)?,
                        out: z(hidden)?,
                        dout: z(hidden)?,
                        dact: z(sff)?,
                        dgu: z(2 * sff)?,
                        logit: z(1)?,
                        sigma: z(1)?,
                        id: Tensor::zeros(ctx, &[rows], DType::U32)?,
                        dsigma: z(1)?,
                    })
                }
                None => None,
            },
        }))
    }

    /// Device bytes held.
    pub fn bytes(&self) -> u64 {
        [
            &self.route.z,
            &self.route.g,
            &self.route.pr,
            &self.route.sel,
            &self.stats.f,
            &self.dg,
            &self.gu,
            &self.act,
            &self.out,
            &self.dout,
            &self.dact,
            &self.dgu,
        ]
        .iter()
        .map(|t| t.bytes())
        .sum::<u64>()
            + self.scratch.bytes()
            + self.shared.as_ref().map_or(0, |b| {
                [
                    &b.gu, &b.act, &b.out, &b.dout, &b.dact, &b.dgu, &b.logit, &b.sigma, &b.id,
                    &b.dsigma,
                ]
                .iter()
                .map(|t| t.bytes())
                .sum::<u64>()
            })
    }

    /// `x += ffn(h)` for layer `l` (the inference path's routed forward).
    pub fn forward(
        &self,
        ctx: &Context,
        f: &MoeFfn,
        l: usize,
        x: &Tensor,
        h: &Tensor,
        variant: Variant,
    ) -> Result<Vec<Dispatch>> {
        f.forward(
            ctx,
            x,
            h,
            &self.scratch,
            l,
            self.rows,
            QShape::Auto,
            variant,
        )
    }

    /// `dh = d ffn(h) / dh . dy` (overwritten) for the block `f` with input `h`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        ctx: &Context,
        f: &MoeFfn,
        h: &Tensor,
        dy: &Tensor,
        dh: &Tensor,
        dq: &Dequant,
        variant: Variant,
    ) -> Result<Vec<Dispatch>> {
        let (m, e, hidden, ff) = (self.rows, f.n_experts(), f.router.cols, f.ff());
        let s = MixShape {
            rows: m,
            n_experts: e,
            top_k: f.top_k,
            renormalize: f.gating == Gating::SoftmaxRenorm,
            rank: 1,
            slot: 0,
            aux_loss: 0.0,
            z_loss: 0.0,
        };
        let r = Rows {
            m,
            ldx: hidden,
            ldy: e,
            y_off: 0,
            accumulate: false,
            glu: 0,
        };
        let mut ops = f
            .router
            .forward(ctx, &self.route.z, h, r, variant, QShape::Vector)?;
        ops.push(mix_route(ctx, &s, &self.route)?);
        ops.push(fill(ctx, dh, 0.0, m * hidden)?);
        let er = |ldx: usize, ldy: usize, accumulate: bool| ExpertRows {
            m,
            ldx,
            ldy,
            accumulate,
        };
        for x in 0..e {
            // Recompute the expert's output on every row.
            let gu = er(hidden, 2 * ff, false);
            ops.extend(expert_product(
                ctx, &f.gate_up, x, &self.gu, h, gu, false, dq, variant,
            )?);
            ops.push(swiglu(ctx, &self.act, &self.gu, None, m, ff)?);
            let down = er(ff, hidden, false);
            ops.extend(expert_product(
                ctx, &f.down, x, &self.out, &self.act, down, false, dq, variant,
            )?);
            // Its gate's gradient, then the gradient through the expert.
            ops.push(mix_rows_dot(ctx, &s, x, hidden, dy, &self.out, &self.dg)?);
            ops.push(mix_rows_scale(
                ctx,
                &s,
                x,
                hidden,
                &self.route.g,
                dy,
                &self.dout,
            )?);
            let back_down = er(hidden, ff, false);
            ops.extend(expert_product(
                ctx, &f.down, x, &self.dact, &self.dout, back_down, true, dq, variant,
            )?);
            ops.push(swiglu_backward(
                ctx, &self.dgu, &self.gu, &self.dact, m, ff,
            )?);
            let back_gu = er(2 * ff, hidden, true);
            ops.extend(expert_product(
                ctx, &f.gate_up, x, dh, &self.dgu, back_gu, true, dq, variant,
            )?);
        }
        // The router: dz through the route, then W_router^T dz.
        ops.push(mix_router_backward(
            ctx,
            &s,
            &self.route,
            &self.stats,
            &self.dg,
        )?);
        let gr = GradRows {
            m,
            ld_dy: e,
            dy_off: 0,
            ld_dx: hidden,
            accumulate: true,
        };
        ops.extend(linear_backward(
            ctx, &f.router, dh, &self.dg, gr, dq, variant,
        )?);
        if let (Some(sh), Some(b)) = (&f.shared, &self.shared) {
            ops.extend(self.shared_backward(ctx, sh, b, h, dy, dh, dq, variant)?);
        }
        Ok(ops)
    }

    /// `dh += d shared(h) / dh . dy`.
    #[allow(clippy::too_many_arguments)]
    fn shared_backward(
        &self,
        ctx: &Context,
        sh: &SharedExpert,
        b: &SharedBufs,
        h: &Tensor,
        dy: &Tensor,
        dh: &Tensor,
        dq: &Dequant,
        variant: Variant,
    ) -> Result<Vec<Dispatch>> {
        let (m, hidden, sff) = (self.rows, sh.gate_up.cols, sh.ff());
        let rows = |ldx: usize, ldy: usize| Rows {
            m,
            ldx,
            ldy,
            y_off: 0,
            accumulate: false,
            glu: 0,
        };
        let grad = |ld_dy: usize, ld_dx: usize, accumulate: bool| GradRows {
            m,
            ld_dy,
            dy_off: 0,
            ld_dx,
            accumulate,
        };
        let one = MixShape {
            rows: m,
            n_experts: 1,
            top_k: 1,
            renormalize: false,
            rank: 1,
            slot: 0,
            aux_loss: 0.0,
            z_loss: 0.0,
        };
        let mut ops = sh.gate_up.forward(
            ctx,
            &b.gu,
            h,
            rows(hidden, 2 * sff),
            variant,
            QShape::Vector,
        )?;
        ops.push(swiglu(ctx, &b.act, &b.gu, None, m, sff)?);
        // The gradient reaching the MLP's output: dy, scaled by the gate when there is one
        // (whose logit then gets dy . out * sigma (1 - sigma)).
        let dout = match &sh.gate {
            Some(gate) => {
                ops.extend(sh.down.forward(
                    ctx,
                    &b.out,
                    &b.act,
                    rows(sff, hidden),
                    variant,
                    QShape::Vector,
                )?);
                ops.extend(gate.forward(
                    ctx,
                    &b.logit,
                    h,
                    rows(hidden, 1),
                    variant,
                    QShape::Vector,
                )?);
                ops.push(route(
                    ctx,
                    &b.logit,
                    &b.id,
                    &b.sigma,
                    m,
                    1,
                    1,
                    1,
                    Gating::Sigmoid,
                    None,
                )?);
                ops.push(mix_rows_dot(ctx, &one, 0, hidden, dy, &b.out, &b.dsigma)?);
                ops.push(mix_sigmoid_backward(ctx, &one, &b.sigma, &b.dsigma)?);
                ops.extend(linear_backward(
                    ctx,
                    gate,
                    dh,
                    &b.dsigma,
                    grad(1, hidden, true),
                    dq,
                    variant,
                )?);
                ops.push(mix_rows_scale(ctx, &one, 0, hidden, &b.sigma, dy, &b.dout)?);
                &b.dout
            }
            None => dy,
        };
        ops.extend(linear_backward(
            ctx,
            &sh.down,
            &b.dact,
            dout,
            grad(hidden, sff, false),
            dq,
            variant,
        )?);
        ops.push(swiglu_backward(ctx, &b.dgu, &b.gu, &b.dact, m, sff)?);
        ops.extend(linear_backward(
            ctx,
            &sh.gate_up,
            dh,
            &b.dgu,
            grad(2 * sff, hidden, true),
            dq,
            variant,
        )?);
        Ok(ops)
    }
}
