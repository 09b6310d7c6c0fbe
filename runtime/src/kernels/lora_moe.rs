//! Training kernels of a mixture of LoRA experts (`shaders/lora_moe.wgsl`): the router's
//! top-k route, the per-expert gating of the stacked LoRA activations and its backward, the
//! block's load statistics with the Switch Transformer load-balancing loss and the router
//! z-loss, and the router's backward through the gates, the balancing term and the z-loss.
//! The products with A, B and the router are ordinary matmuls around these. The route and
//! the router backward also serve a frozen Mixture-of-Experts base's own router in
//! training, with [`mix_rows_dot`] and [`mix_rows_scale`] for its experts' gates.
//!
//! Tests compare every kernel with a CPU reference and the backward with finite
//! differences of the whole mixture's loss.

use crate::error::{Error, Result};
use crate::gpu::{grid, Bind, Context, Dispatch, PipelineKey, Tensor};
use crate::kernels::train::need;
use crate::uniform;

uniform! {
    /// Uniform of `shaders/lora_moe.wgsl`.
    pub struct MixParams {
        rows: u32,
        n_experts: u32,
        top_k: u32,
        renorm: u32,
        rank: u32,
        slot: u32,
        aux_w: f32,
        z_w: f32,
    }
}

/// Shape and loss weights of one adapted layer's mixture over a block of rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixShape {
    /// Rows of the block.
    pub rows: usize,
    /// Experts (2..=256; at most 32 with the auxiliary losses' statistics).
    pub n_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Gates renormalized over the chosen experts.
    pub renormalize: bool,
    /// Rank of each expert.
    pub rank: usize,
    /// This layer's slot in the load counters and loss terms.
    pub slot: usize,
    /// Load-balancing loss weight alpha (the kernels use alpha * E).
    pub aux_loss: f32,
    /// Router z-loss weight.
    pub z_loss: f32,
}

/// A layer's routing over a block: router logits, gates, the full softmax and the chosen
/// experts' bit mask per row.
pub struct MixRoute {
    /// Router logits `[rows][E]` (the router matmul's output).
    pub z: Tensor,
    /// Gates `[rows][E]` (0 for experts not chosen).
    pub g: Tensor,
    /// Softmax over all experts `[rows][E]`.
    pub pr: Tensor,
    /// Chosen experts `[rows]` u32 bit masks.
    pub sel: Tensor,
}

/// Buffers the load statistics share across layers.
pub struct MixStats {
    /// Per-row weight of the balancing and z-losses `[rows]`: 1 / tokens of the step on
    /// token rows, 0 on padding and virtual rows.
    pub w: Tensor,
    /// The block's load fraction per expert `[32]` (scratch between a layer's
    /// [`mix_aux_stats`] and [`mix_router_backward`]).
    pub f: Tensor,
    /// Tokens that chose each expert `[slots][E]` u32, accumulated.
    pub counts: Tensor,
    /// Loss terms `[slots][E + 1]` (balancing per expert, then the z-loss), accumulated.
    pub loss: Tensor,
}

impl MixShape {
    fn check(&self, op: &'static str) -> Result<()> {
        if self.rows == 0
            || !(if op.starts_with("mix_route")
                || op.starts_with("mix_router")
                || op == "mix_aux_stats"
            {
                2
            } else {
                1
            }..=256)
                .contains(&self.n_experts)
            || (op == "mix_aux_stats" && self.n_experts > 32)
            || self.top_k == 0
            || self.top_k > self.n_experts
            || self.rank == 0
            || !self.aux_loss.is_finite()
            || !self.z_loss.is_finite()
        {
            return Err(Error::shape(op, format!("{self:?}")));
        }
        Ok(())
    }

    fn uniform(&self, ctx: &Context) -> wgpu::Buffer {
        ctx.uniform(&MixParams {
            rows: self.rows as u32,
            n_experts: self.n_experts as u32,
            top_k: self.top_k as u32,
            renorm: self.renormalize as u32,
            rank: self.rank as u32,
            slot: self.slot as u32,
            aux_w: self.aux_loss * self.n_experts as f32,
            z_w: self.z_loss,
        })
    }
}

fn dispatch(
    ctx: &Context,
    op: &'static str,
    s: &MixShape,
    binds: &[(usize, &Tensor)],
    groups: [u32; 3],
) -> Result<Dispatch> {
    s.check(op)?;
    let u = s.uniform(ctx);
    let mut all: Vec<Bind<'_>> = (0..12).map(|_| Bind::Skip).collect();
    all[0] = Bind::U(&u);
    for &(i, t) in binds {
        all[i] = Bind::T(t);
    }
    ctx.dispatch(op, &PipelineKey::new("lora_moe", op), &all, groups)
}

fn check_route(op: &'static str, s: &MixShape, r: &MixRoute) -> Result<()> {
    let n = s.rows * s.n_experts;
    need(op, &r.z, n, "z")?;
    need(op, &r.g, n, "g")?;
    need(op, &r.pr, n, "pr")?;
    need(op, &r.sel, s.rows, "sel")
}

/// Routes every row: `r.g`, `r.pr` and `r.sel` from the logits `r.z`.
pub fn mix_route(ctx: &Context, s: &MixShape, r: &MixRoute) -> Result<Dispatch> {
    let op = "mix_route";
    check_route(op, s, r)?;
    let b = [(1, &r.z), (2, &r.g), (3, &r.pr), (4, &r.sel)];
    dispatch(ctx, op, s, &b, [s.rows.div_ceil(64) as u32, 1, 1])
}

/// `u = t` with each expert's columns scaled by its gate (`t`, `u`: `[rows][E rank]`).
pub fn mix_gate(
    ctx: &Context,
    s: &MixShape,
    r: &MixRoute,
    t: &Tensor,
    u: &Tensor,
) -> Result<Dispatch> {
    let op = "mix_gate";
    check_route(op, s, r)?;
    let n = s.rows * s.n_experts * s.rank;
    need(op, t, n, "t")?;
    need(op, u, n, "u")?;
    let b = [(2, &r.g), (5, t), (6, u)];
    dispatch(ctx, op, s, &b, grid(ctx, (n as u32).div_ceil(64))?)
}

/// From `du` (the gated activations' gradient, overwritten with `t`'s): the gates'
/// gradient into `dg` `[rows][E]`.
pub fn mix_gate_backward(
    ctx: &Context,
    s: &MixShape,
    r: &MixRoute,
    t: &Tensor,
    du: &Tensor,
    dg: &Tensor,
) -> Result<Dispatch> {
    let op = "mix_gate_backward";
    check_route(op, s, r)?;
    let n = s.rows * s.n_experts * s.rank;
    need(op, t, n, "t")?;
    need(op, du, n, "du")?;
    need(op, dg, s.rows * s.n_experts, "dg")?;
    let b = [(2, &r.g), (5, t), (6, du), (7, dg)];
    let groups = ((s.rows * s.n_experts) as u32).div_ceil(64);
    dispatch(ctx, op, s, &b, grid(ctx, groups)?)
}

fn check_stats(op: &'static str, s: &MixShape, st: &MixStats) -> Result<()> {
    need(op, &st.w, s.rows, "w")?;
    need(op, &st.f, s.n_experts, "f")?;
    need(op, &st.counts, (s.slot + 1) * s.n_experts, "counts")?;
    need(op, &st.loss, (s.slot + 1) * (s.n_experts + 1), "loss")
}

/// The block's load per expert into `st.f`, and (accumulated at `s.slot`) the choice
/// counts, the balancing loss terms and the z-loss.
pub fn mix_aux_stats(ctx: &Context, s: &MixShape, r: &MixRoute, st: &MixStats) -> Result<Dispatch> {
    let op = "mix_aux_stats";
    check_route(op, s, r)?;
    check_stats(op, s, st)?;
    let b = [
        (1, &r.z),
        (3, &r.pr),
        (4, &r.sel),
        (8, &st.w),
        (9, &st.f),
        (10, &st.counts),
        (11, &st.loss),
    ];
    dispatch(ctx, op, s, &b, [s.n_experts as u32 + 1, 1, 1])
}

/// `dg` (the gates' gradient) becomes the router logits' gradient, in place, with the
/// balancing loss (through the softmax, the block's load `st.f` held constant) and the
/// z-loss added.
pub fn mix_router_backward(
    ctx: &Context,
    s: &MixShape,
    r: &MixRoute,
    st: &MixStats,
    dg: &Tensor,
) -> Result<Dispatch> {
    let op = "mix_router_backward";
    check_route(op, s, r)?;
    check_stats(op, s, st)?;
    need(op, dg, s.rows * s.n_experts, "dg")?;
    let b = [
        (1, &r.z),
        (2, &r.g),
        (3, &r.pr),
        (7, dg),
        (8, &st.w),
        (9, &st.f),
    ];
    dispatch(ctx, op, s, &b, [s.rows.div_ceil(64) as u32, 1, 1])
}

/// `dg[row][expert] = sum_c a[row][c] * b[row][c]` over `cols` columns (`a`, `b` packed
/// `[rows][cols]`; `s.rank` is ignored): a gate's gradient from the output gradient and
/// the expert's output.
pub fn mix_rows_dot(
    ctx: &Context,
    s: &MixShape,
    expert: usize,
    cols: usize,
    a: &Tensor,
    b: &Tensor,
    dg: &Tensor,
) -> Result<Dispatch> {
    let op = "mix_rows_dot";
    let s = MixShape {
        rank: cols,
        slot: expert,
        ..*s
    };
    need(op, a, s.rows * cols, "a")?;
    need(op, b, s.rows * cols, "b")?;
    need(op, dg, s.rows * s.n_experts, "dg")?;
    if expert >= s.n_experts {
        return Err(Error::shape(
            op,
            format!("expert {expert} of {}", s.n_experts),
        ));
    }
    let binds = [(5, a), (6, b), (7, dg)];
    dispatch(ctx, op, &s, &binds, [s.rows.div_ceil(64) as u32, 1, 1])
}

/// `y[row][c] = g[row][expert] * x[row][c]` over `cols` columns (packed): an expert's share
/// of the output gradient.
pub fn mix_rows_scale(
    ctx: &Context,
    s: &MixShape,
    expert: usize,
    cols: usize,
    g: &Tensor,
    x: &Tensor,
    y: &Tensor,
) -> Result<Dispatch> {
    let op = "mix_rows_scale";
    let s = MixShape {
        rank: cols,
        slot: expert,
        ..*s
    };
    need(op, g, s.rows * s.n_experts, "g")?;
    need(op, x, s.rows * cols, "x")?;
    need(op, y, s.rows * cols, "y")?;
    if expert >= s.n_experts {
        return Err(Error::shape(
            op,
            format!("expert {expert} of {}", s.n_experts),
        ));
    }
    let binds = [(2, g), (5, x), (6, y)];
    let n = (s.rows * cols) as u32;
    dispatch(ctx, op, &s, &binds, grid(ctx, n.div_ceil(64))?)
}

/// `dg[row] *= g[row] (1 - g[row])` over `s.rows` rows: a sigmoid gate's logit gradient
/// from its output's (`g` the sigmoid; `s.n_experts` must be 1).
pub fn mix_sigmoid_backward(
    ctx: &Context,
    s: &MixShape,
    g: &Tensor,
    dg: &Tensor,
) -> Result<Dispatch> {
    let op = "mix_sigmoid_backward";
    if s.n_experts != 1 {
        return Err(Error::shape(op, format!("{} gates per row", s.n_experts)));
    }
    need(op, g, s.rows, "g")?;
    need(op, dg, s.rows, "dg")?;
    dispatch(
        ctx,
        op,
        s,
        &[(2, g), (7, dg)],
        [s.rows.div_ceil(64) as u32, 1, 1],
    )
}

/// Every entry point (for the portability test).
#[cfg(test)]
pub(crate) fn keys() -> Vec<PipelineKey> {
    [
        "mix_route",
        "mix_gate",
        "mix_gate_backward",
        "mix_aux_stats",
        "mix_router_backward",
        "mix_rows_dot",
        "mix_rows_scale",
        "mix_sigmoid_backward",
    ]
    .into_iter()
    .map(|e| PipelineKey::new("lora_moe", e))
    .collect()
}

/// CPU reference of one row's route: (chosen mask of experts 0..31, gates, softmax over
/// all), the top k by logit with ties to the lower index.
pub fn route_ref(z: &[f64], top_k: usize, renormalize: bool) -> (u32, Vec<f64>, Vec<f64>) {
    let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let ex: Vec<f64> = z.iter().map(|v| (v - mx).exp()).collect();
    let sum: f64 = ex.iter().sum();
    let mut chosen = vec![false; z.len()];
    for _ in 0..top_k {
        let best = (0..z.len())
            .filter(|&e| !chosen[e])
            .fold(None, |b: Option<usize>, e| match b {
                Some(b) if z[b] >= z[e] => Some(b),
                _ => Some(e),
            })
            .unwrap_or(0);
        chosen[best] = true;
    }
    let ssum: f64 = (0..z.len()).filter(|&e| chosen[e]).map(|e| ex[e]).sum();
    let g = (0..z.len())
        .map(|e| match (chosen[e], renormalize) {
            (false, _) => 0.0,
            (true, true) => ex[e] / ssum,
            (true, false) => ex[e] / sum,
        })
        .collect();
    let mask = (0..z.len().min(32))
        .filter(|&e| chosen[e])
        .fold(0u32, |m, e| m | 1 << e);
    (mask, g, ex.iter().map(|v| v / sum).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::DType;
    use crate::kernels::testing::{assert_close, ctx};
    use crate::util::Rng;

    struct Case {
        rows: usize,
        e: usize,
        k: usize,
        rank: usize,
        renorm: bool,
        z: Vec<f32>,
        t: Vec<f32>,
        c: Vec<f32>,
        w: Vec<f32>,
    }

    fn case(renorm: bool, k: usize, seed: u64) -> Case {
        let (rows, e, rank) = (70, 5, 3);
        let mut rng = Rng::new(seed);
        let mut w: Vec<f32> = (0..rows).map(|_| 1.0 / 60.0).collect();
        for r in [3, 17, 50] {
            w[r] = 0.0; // padding rows take no part in the losses
        }
        Case {
            rows,
            e,
            k,
            rank,
            renorm,
            z: rng.vec(rows * e, -2.0, 2.0),
            t: rng.vec(rows * e * rank, -1.0, 1.0),
            c: rng.vec(rows * e * rank, -1.0, 1.0),
            w,
        }
    }

    /// The mixture's loss in f64: `sum c * u` (a stand-in for what follows the gated
    /// activations) plus the balancing loss (the load `f` held at `f_fixed`) and the z-loss.
    fn loss_ref(cs: &Case, z: &[f64], f_fixed: &[f64], aux: f64, zl: f64) -> f64 {
        let (e, rank) = (cs.e, cs.rank);
        let mut l = 0.0;
        let mut pe = vec![0.0; e];
        for r in 0..cs.rows {
            let zr = &z[r * e..(r + 1) * e];
            let (_, g, p) = route_ref(zr, cs.k, cs.renorm);
            for c in 0..e * rank {
                let i = r * e * rank + c;
                l += cs.c[i] as f64 * cs.t[i] as f64 * g[c / rank];
            }
            let w = cs.w[r] as f64;
            for x in 0..e {
                pe[x] += w * p[x];
            }
            let mx = zr.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = mx + zr.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
            l += zl * w * lse * lse;
        }
        l + aux * e as f64 * (0..e).map(|x| f_fixed[x] * pe[x]).sum::<f64>()
    }

    fn run(cs: &Case, aux: f32, zl: f32) {
        let ctx = ctx();
        let (rows, e, rank) = (cs.rows, cs.e, cs.rank);
        let f32s = |v: &[f32]| Tensor::from_f32(ctx, &[v.len()], v).unwrap();
        let zeros = |n: usize| Tensor::zeros(ctx, &[n], DType::F32).unwrap();
        let s = MixShape {
            rows,
            n_experts: e,
            top_k: cs.k,
            renormalize: cs.renorm,
            rank,
            slot: 1,
            aux_loss: aux,
            z_loss: zl,
        };
        let route = MixRoute {
            z: f32s(&cs.z),
            g: zeros(rows * e),
            pr: zeros(rows * e),
            sel: Tensor::zeros(ctx, &[rows], DType::U32).unwrap(),
        };
        let st = MixStats {
            w: f32s(&cs.w),
            f: zeros(32),
            counts: Tensor::zeros(ctx, &[2 * e], DType::U32).unwrap(),
            loss: zeros(2 * (e + 1)),
        };
        let t = f32s(&cs.t);
        let u = zeros(rows * e * rank);
        let du = f32s(&cs.c);
        let dg = zeros(rows * e);
        let ops = vec![
            mix_route(ctx, &s, &route).unwrap(),
            mix_gate(ctx, &s, &route, &t, &u).unwrap(),
            mix_aux_stats(ctx, &s, &route, &st).unwrap(),
            mix_gate_backward(ctx, &s, &route, &t, &du, &dg).unwrap(),
            mix_router_backward(ctx, &s, &route, &st, &dg).unwrap(),
        ];
        ctx.run(&ops).unwrap();

        // Forward against the CPU route.
        let z64: Vec<f64> = cs.z.iter().map(|&v| v as f64).collect();
        let mut want_g = Vec::new();
        let mut want_u = Vec::new();
        let mut want_dt = Vec::new();
        let mut counts = vec![0u32; e];
        let tokens = cs.w.iter().filter(|&&w| w > 0.0).count();
        let sel = route.sel.read_u32(ctx).unwrap();
        for r in 0..rows {
            let (mask, g, _) = route_ref(&z64[r * e..(r + 1) * e], cs.k, cs.renorm);
            assert_eq!(sel[r], mask, "row {r} chose other experts");
            if cs.w[r] > 0.0 {
                for (x, c) in counts.iter_mut().enumerate() {
                    *c += (mask >> x) & 1;
                }
            }
            for c in 0..e * rank {
                let i = r * e * rank + c;
                want_u.push((cs.t[i] as f64 * g[c / rank]) as f32);
                want_dt.push((cs.c[i] as f64 * g[c / rank]) as f32);
            }
            want_g.extend(g.iter().map(|&v| v as f32));
        }
        assert_close(
            "gates",
            &route.g.read_f32(ctx).unwrap(),
            &want_g,
            1e-6,
            1e-5,
        );
        assert_close("gated t", &u.read_f32(ctx).unwrap(), &want_u, 1e-6, 1e-5);
        assert_close("dt", &du.read_f32(ctx).unwrap(), &want_dt, 1e-6, 1e-5);
        let got_counts = st.counts.read_u32(ctx).unwrap();
        assert_eq!(&got_counts[e..], &counts[..], "choice counts at slot 1");
        assert!(got_counts[..e].iter().all(|&c| c == 0), "slot 0 untouched");
        let f: Vec<f64> = counts
            .iter()
            .map(|&c| c as f64 / (cs.k * tokens) as f64)
            .collect();
        let got_f = st.f.read_f32(ctx).unwrap();
        let want_f: Vec<f32> = f.iter().map(|&v| v as f32).collect();
        assert_close("load", &got_f[..e], &want_f, 1e-6, 1e-5);

        // Loss terms: the balancing and z parts of loss_ref.
        let with = loss_ref(cs, &z64, &f, aux as f64, zl as f64);
        let without = loss_ref(cs, &z64, &f, 0.0, 0.0);
        let got_loss: f64 = st.loss.read_f32(ctx).unwrap()[e + 1..]
            .iter()
            .map(|&v| v as f64)
            .sum();
        assert!(
            (got_loss - (with - without)).abs() < 1e-5 * (1.0 + with.abs()),
            "aux + z loss {got_loss} vs {}",
            with - without
        );

        // Router gradient against central differences of loss_ref (load held fixed).
        let got = dg.read_f32(ctx).unwrap();
        let h = 1e-4;
        let mut worst = 0.0f64;
        for i in 0..rows * e {
            let mut zp = z64.clone();
            zp[i] += h;
            let mut zm = z64.clone();
            zm[i] -= h;
            let (mp, _, _) = route_ref(&zp[i / e * e..(i / e + 1) * e], cs.k, cs.renorm);
            let (mm, _, _) = route_ref(&zm[i / e * e..(i / e + 1) * e], cs.k, cs.renorm);
            if mp != mm {
                continue; // the choice flips inside the step: not differentiable here
            }
            let fd = (loss_ref(cs, &zp, &f, aux as f64, zl as f64)
                - loss_ref(cs, &zm, &f, aux as f64, zl as f64))
                / (2.0 * h);
            worst = worst.max((fd - got[i] as f64).abs() / (1e-3 + fd.abs()));
        }
        assert!(
            worst < 2e-3,
            "router gradient vs finite differences: {worst}"
        );
    }

    #[test]
    fn renormalized_top2_matches_reference_and_finite_differences() {
        run(&case(true, 2, 1), 0.05, 0.01);
    }

    #[test]
    fn switch_top1_matches_reference_and_finite_differences() {
        run(&case(false, 1, 2), 0.1, 0.0);
    }

    #[test]
    fn top3_without_auxiliary_losses() {
        run(&case(true, 3, 3), 0.0, 0.0);
    }

    #[test]
    fn many_experts_route_and_expert_helpers_match_the_cpu() {
        let ctx = ctx();
        let (rows, e, k, cols) = (37, 40, 3, 21);
        let mut rng = Rng::new(8);
        let z = rng.vec(rows * e, -3.0, 3.0);
        let a = rng.vec(rows * cols, -1.0, 1.0);
        let b = rng.vec(rows * cols, -1.0, 1.0);
        let f32s = |v: &[f32]| Tensor::from_f32(ctx, &[v.len()], v).unwrap();
        let zeros = |n: usize| Tensor::zeros(ctx, &[n], DType::F32).unwrap();
        let s = MixShape {
            rows,
            n_experts: e,
            top_k: k,
            renormalize: false,
            rank: 1,
            slot: 0,
            aux_loss: 0.0,
            z_loss: 0.0,
        };
        let route = MixRoute {
            z: f32s(&z),
            g: zeros(rows * e),
            pr: zeros(rows * e),
            sel: Tensor::zeros(ctx, &[rows], DType::U32).unwrap(),
        };
        let (at, bt, dg, y) = (f32s(&a), f32s(&b), zeros(rows * e), zeros(rows * cols));
        let ops = vec![
            mix_route(ctx, &s, &route).unwrap(),
            mix_rows_dot(ctx, &s, 33, cols, &at, &bt, &dg).unwrap(),
            mix_rows_scale(ctx, &s, 35, cols, &route.g, &at, &y).unwrap(),
        ];
        ctx.run(&ops).unwrap();
        let g = route.g.read_f32(ctx).unwrap();
        let (dgv, yv) = (dg.read_f32(ctx).unwrap(), y.read_f32(ctx).unwrap());
        for r in 0..rows {
            let zr: Vec<f64> = z[r * e..(r + 1) * e].iter().map(|&v| v as f64).collect();
            let (_, want, _) = route_ref(&zr, k, false);
            let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
            assert_close("gates", &g[r * e..(r + 1) * e], &want, 1e-6, 1e-5);
            let dot: f64 = (0..cols)
                .map(|c| a[r * cols + c] as f64 * b[r * cols + c] as f64)
                .sum();
            assert_close("rows_dot", &[dgv[r * e + 33]], &[dot as f32], 1e-5, 1e-5);
            let scaled: Vec<f32> = (0..cols).map(|c| g[r * e + 35] * a[r * cols + c]).collect();
            assert_close(
                "rows_scale",
                &yv[r * cols..(r + 1) * cols],
                &scaled,
                1e-6,
                1e-6,
            );
        }
    }
}
