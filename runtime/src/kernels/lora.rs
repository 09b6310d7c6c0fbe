//! LoRA products for a batch whose rows may each use a different adapter
//! (`shaders/lora.wgsl`): `y[r] += s * B_k (A_k x[r])` with `k = row_ad[r]`. An adapter that
//! is a mixture of LoRA experts (stacked A and B) also has a router: each row's top-k
//! experts get their gates and the others are zeroed between the two products.

use crate::adapters::lora::LoraExperts;
use crate::error::{Error, Result};
use crate::gpu::{Bind, Context, DType, Dispatch, PipelineKey, Tensor};
use crate::uniform;

uniform! {
    /// Uniform of `shaders/lora.wgsl`.
    pub struct LoraParams {
        rows: u32,
        in_dim: u32,
        out_dim: u32,
        ldx: u32,
        x_off: u32,
        ldy: u32,
        y_off: u32,
        max_rank: u32,
    }
}

/// Packed adapters of one target layer: every adapter's A and B, and a table of offsets.
#[derive(Debug, Clone)]
pub struct LoraPack {
    /// Input features.
    pub in_dim: usize,
    /// Output features.
    pub out_dim: usize,
    /// Largest rank among the adapters.
    pub max_rank: usize,
    /// Concatenated A matrices (`[rank][in_dim]` each).
    pub a: Tensor,
    /// Concatenated B matrices (`[out_dim][rank]` each).
    pub b: Tensor,
    /// `[adapters][4]` u32: a offset, b offset, rank, scale (f32 bits).
    pub table: Tensor,
    /// Concatenated routers of the mixtures (`[experts][in_dim]` each).
    pub router: Tensor,
    /// `[adapters][4]` u32: router offset, experts (0: plain LoRA), top k, renormalize.
    pub routes: Tensor,
    /// Whether some adapter is a mixture (the gating dispatch runs).
    pub routed: bool,
}

/// One adapter's matrices for a target, for [`LoraPack::new`].
pub struct LoraPart<'a> {
    /// `[rank][in_dim]`.
    pub a: &'a [f32],
    /// `[out_dim][rank]`.
    pub b: &'a [f32],
    /// Rank.
    pub rank: usize,
    /// Scale (alpha / rank, or alpha / sqrt(rank)).
    pub scale: f32,
    /// A mixture's router `[experts][in_dim]` (empty otherwise).
    pub router: &'a [f32],
    /// A mixture's routing (`rank` is then the stacked rank, experts times their rank).
    pub experts: Option<LoraExperts>,
}

impl LoraPart<'static> {
    /// No adapter on this layer.
    pub const NONE: LoraPart<'static> = LoraPart {
        a: &[],
        b: &[],
        rank: 0,
        scale: 0.0,
        router: &[],
        experts: None,
    };
}

impl LoraPack {
    /// Packs `parts` (adapter `k` = `parts[k]`; an absent adapter has rank 0).
    pub fn new(
        ctx: &Context,
        in_dim: usize,
        out_dim: usize,
        parts: &[LoraPart<'_>],
    ) -> Result<LoraPack> {
        let mut a = Vec::new();
        let mut b = Vec::new();
        let mut table = Vec::new();
        let mut router = Vec::new();
        let mut routes = Vec::new();
        let mut max_rank = 1;
        for (k, p) in parts.iter().enumerate() {
            let n_experts = p.experts.map_or(0, |e| e.n_experts);
            if p.a.len() != p.rank * in_dim
                || p.b.len() != out_dim * p.rank
                || p.rank > 256
                || p.router.len() != n_experts * in_dim
                || (n_experts > 0 && (n_experts > 32 || p.rank % n_experts != 0))
            {
                return Err(Error::shape(
                    "lora",
                    format!(
                        "adapter {k}: A has {} values, B {}, router {} for rank {} and {n_experts} experts of a {out_dim}x{in_dim} layer",
                        p.a.len(),
                        p.b.len(),
                        p.router.len(),
                        p.rank
                    ),
                ));
            }
            match p.experts {
                Some(e) => routes.extend([
                    router.len() as u32,
                    e.n_experts as u32,
                    e.top_k as u32,
                    e.renormalize as u32,
                ]),
                None => routes.extend([0; 4]),
            }
            router.extend_from_slice(p.router);
            table.extend([
                a.len() as u32,
                b.len() as u32,
                p.rank as u32,
                p.scale.to_bits(),
            ]);
            a.extend_from_slice(p.a);
            b.extend_from_slice(p.b);
            max_rank = max_rank.max(p.rank);
        }
        let up = |v: &[f32]| {
            if v.is_empty() {
                Tensor::zeros(ctx, &[1], DType::F32)
            } else {
                Tensor::from_f32(ctx, &[v.len()], v)
            }
        };
        let u32s = |v: Vec<u32>| {
            Tensor::from_slice(
                ctx,
                &[v.len().max(4)],
                DType::U32,
                &if v.is_empty() { vec![0; 4] } else { v },
            )
        };
        Ok(LoraPack {
            in_dim,
            out_dim,
            max_rank,
            a: up(&a)?,
            b: up(&b)?,
            table: u32s(table)?,
            routed: !router.is_empty(),
            router: up(&router)?,
            routes: u32s(routes)?,
        })
    }
}

/// Where the rows are: `rows` activation rows of stride `ldx` from element `x_off` in, output
/// rows of stride `ldy` written from column `y_off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraRows {
    /// Rows.
    pub rows: usize,
    /// Input row stride.
    pub ldx: usize,
    /// First input element.
    pub x_off: usize,
    /// Output row stride.
    pub ldy: usize,
    /// First output column.
    pub y_off: usize,
}

/// The two dispatches of `y[r][y_off..] += scale_r * B_k A_k x[r]`, `k = row_ad[r]`.
/// `t` is scratch of `rows * pack.max_rank` floats.
#[allow(clippy::too_many_arguments)]
pub fn lora_apply(
    ctx: &Context,
    y: &Tensor,
    x: &Tensor,
    pack: &LoraPack,
    row_ad: &Tensor,
    row_scale: &Tensor,
    t: &Tensor,
    r: LoraRows,
) -> Result<Vec<Dispatch>> {
    if r.rows == 0
        || r.rows > 65535
        || x.numel() < r.x_off + (r.rows - 1) * r.ldx + pack.in_dim
        || y.numel() < (r.rows - 1) * r.ldy + r.y_off + pack.out_dim
        || t.numel() < r.rows * pack.max_rank
        || row_ad.numel() < r.rows
        || row_scale.numel() < r.rows
    {
        return Err(Error::shape(
            "lora",
            format!(
                "{r:?} over x {:?}, y {:?}, t {:?} for a {}x{} pack",
                x.shape(),
                y.shape(),
                t.shape(),
                pack.out_dim,
                pack.in_dim
            ),
        ));
    }
    let u = ctx.uniform(&LoraParams {
        rows: r.rows as u32,
        in_dim: pack.in_dim as u32,
        out_dim: pack.out_dim as u32,
        ldx: r.ldx as u32,
        x_off: r.x_off as u32,
        ldy: r.ldy as u32,
        y_off: r.y_off as u32,
        max_rank: pack.max_rank as u32,
    });
    let binds_down = [
        Bind::U(&u),
        Bind::T(x),
        Bind::T(&pack.a),
        Bind::Skip,
        Bind::T(&pack.table),
        Bind::T(row_ad),
        Bind::Skip,
        Bind::T(t),
    ];
    let binds_up = [
        Bind::U(&u),
        Bind::Skip,
        Bind::Skip,
        Bind::T(&pack.b),
        Bind::T(&pack.table),
        Bind::T(row_ad),
        Bind::T(row_scale),
        Bind::T(t),
        Bind::T(y),
    ];
    let mut ops = vec![ctx.dispatch(
        "lora_down",
        &PipelineKey::new("lora", "lora_down"),
        &binds_down,
        [r.rows as u32, 1, 1],
    )?];
    if pack.routed {
        let binds_gate = [
            Bind::U(&u),
            Bind::T(x),
            Bind::Skip,
            Bind::Skip,
            Bind::T(&pack.table),
            Bind::T(row_ad),
            Bind::Skip,
            Bind::T(t),
            Bind::Skip,
            Bind::T(&pack.router),
            Bind::T(&pack.routes),
        ];
        ops.push(ctx.dispatch(
            "lora_gate",
            &PipelineKey::new("lora", "lora_gate"),
            &binds_gate,
            [r.rows as u32, 1, 1],
        )?);
    }
    ops.push(ctx.dispatch(
        "lora_up",
        &PipelineKey::new("lora", "lora_up"),
        &binds_up,
        [pack.out_dim.div_ceil(64) as u32, r.rows as u32, 1],
    )?);
    Ok(ops)
}

/// Every specialization (for the portability test).
#[cfg(test)]
pub(crate) fn keys() -> Vec<PipelineKey> {
    vec![
        PipelineKey::new("lora", "lora_down"),
        PipelineKey::new("lora", "lora_gate"),
        PipelineKey::new("lora", "lora_up"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_close, ctx};
    use crate::util::Rng;

    #[test]
    fn rows_use_their_own_adapter() {
        let ctx = ctx();
        let (rows, ind, outd, ldy) = (7, 37, 19, 30);
        let mut rng = Rng::new(4);
        // Adapter 1 is a mixture of 4 experts of rank 2 (top 2), adapter 3 of 3 experts of
        // rank 1 (top 1, Switch gates); the others are plain.
        let ranks = [3usize, 8, 1, 3];
        let scales = [0.5f32, 2.0, -1.0, 1.5];
        let experts = [
            None,
            Some(LoraExperts {
                n_experts: 4,
                top_k: 2,
                renormalize: true,
            }),
            None,
            Some(LoraExperts {
                n_experts: 3,
                top_k: 1,
                renormalize: false,
            }),
        ];
        let mats: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = ranks
            .iter()
            .zip(&experts)
            .map(|(&r, e)| {
                let n = e.map_or(0, |e| e.n_experts);
                (
                    rng.vec(r * ind, -1.0, 1.0),
                    rng.vec(outd * r, -1.0, 1.0),
                    rng.vec(n * ind, -1.0, 1.0),
                )
            })
            .collect();
        let parts: Vec<LoraPart<'_>> = (0..ranks.len())
            .map(|k| LoraPart {
                a: &mats[k].0,
                b: &mats[k].1,
                rank: ranks[k],
                scale: scales[k],
                router: &mats[k].2,
                experts: experts[k],
            })
            .collect();
        let pack = LoraPack::new(ctx, ind, outd, &parts).unwrap();
        assert!(pack.routed);
        let xv = rng.vec(rows * ind, -1.0, 1.0);
        let y0 = rng.vec(rows * ldy, -1.0, 1.0);
        let ad: Vec<u32> = vec![1, u32::MAX, 0, 2, 1, 3, 3];
        let rs: Vec<f32> = vec![1.0, 1.0, 0.25, 1.0, 3.0, 1.0, 0.5];
        let x = Tensor::from_f32(ctx, &[rows, ind], &xv).unwrap();
        let y = Tensor::from_f32(ctx, &[rows, ldy], &y0).unwrap();
        let adt = Tensor::from_slice(ctx, &[rows], DType::U32, &ad).unwrap();
        let rst = Tensor::from_f32(ctx, &[rows], &rs).unwrap();
        let t = Tensor::zeros(ctx, &[rows, pack.max_rank], DType::F32).unwrap();
        let r = LoraRows {
            rows,
            ldx: ind,
            x_off: 0,
            ldy,
            y_off: 7,
        };
        let ops = lora_apply(ctx, &y, &x, &pack, &adt, &rst, &t, r).unwrap();
        assert_eq!(ops.len(), 3, "down, gate, up");
        ctx.run(&ops).unwrap();
        let mut want = y0.clone();
        for row in 0..rows {
            if ad[row] == u32::MAX {
                continue;
            }
            let k = ad[row] as usize;
            let (a, b, router) = &mats[k];
            let rank = ranks[k];
            let xr = &xv[row * ind..(row + 1) * ind];
            let dot =
                |w: &[f32]| -> f64 { w.iter().zip(xr).map(|(&p, &q)| p as f64 * q as f64).sum() };
            let mut tv: Vec<f64> = (0..rank).map(|j| dot(&a[j * ind..(j + 1) * ind])).collect();
            if let Some(e) = experts[k] {
                let z: Vec<f64> = (0..e.n_experts)
                    .map(|x| dot(&router[x * ind..(x + 1) * ind]))
                    .collect();
                let (_, g, _) = crate::kernels::lora_moe::route_ref(&z, e.top_k, e.renormalize);
                let er = rank / e.n_experts;
                for (j, v) in tv.iter_mut().enumerate() {
                    *v *= g[j / er];
                }
            }
            for o in 0..outd {
                let s: f64 = (0..rank).map(|j| b[o * rank + j] as f64 * tv[j]).sum();
                want[row * ldy + 7 + o] += (scales[k] as f64 * rs[row] as f64 * s) as f32;
            }
        }
        assert_close("lora", &y.read_f32(ctx).unwrap(), &want, 1e-5, 1e-5);
    }
}
