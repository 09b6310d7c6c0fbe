//! Mixture-of-Experts routing on the GPU (`shaders/moe.wgsl`): each token's router logits
//! become the k experts it is sent to and their mixing weights, by the convention of the
//! model family ([`Gating`]); and the routed products with f32/f16 experts
//! (`shaders/moe_dense.wgsl`, the dense twin of [`crate::kernels::quant::qmatmul_experts`]).

use crate::error::{Error, Result};
use crate::gpu::{grid, Bind, Context, DType, Dispatch, PipelineKey, Tensor};
use crate::kernels::embed::DenseMatrix;
use crate::kernels::quant::ExpertDesc;
use crate::uniform;

uniform! {
    /// Uniform of `shaders/moe.wgsl`.
    pub struct MoeParams {
        rows: u32,
        n_experts: u32,
        k: u32,
        ld: u32,
        mode: u32,
        cols: u32,
        ld_out: u32,
        accumulate: u32,
        stats_off: u32,
        _pad0: u32,
        _pad1: u32,
        _pad2: u32,
    }
}

uniform! {
    /// Uniform of `shaders/moe_dense.wgsl`.
    pub struct DenseExpertParams {
        pairs: u32,
        n: u32,
        k: u32,
        ldx: u32,
        ldy: u32,
        y_offset: u32,
        n_ids: u32,
        glu: u32,
        row_start: u32,
        experts: u32,
        accumulate: u32,
        _pad: u32,
    }
}

/// Most experts a router may have.
pub const MAX_EXPERTS: usize = 256;
/// Most experts a token may use.
pub const MAX_TOP_K: usize = 16;

/// How router logits become expert weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Gating {
    /// Softmax over all experts, then the top k renormalized to sum 1 (Mixtral,
    /// Qwen3-MoE; `norm_topk_prob = true`).
    SoftmaxRenorm,
    /// Softmax over all experts, the top k as they are (Qwen2-MoE, OLMoE;
    /// `norm_topk_prob = false`).
    Softmax,
    /// Sigmoid of each logit, the top k renormalized.
    SigmoidRenorm,
    /// Sigmoid of each logit as it is (with one expert and k = 1: a sigmoid gate, as on
    /// Qwen2-MoE's shared expert).
    Sigmoid,
}

impl Gating {
    fn mode(self) -> u32 {
        match self {
            Gating::SoftmaxRenorm => 0,
            Gating::Softmax => 1,
            Gating::SigmoidRenorm => 2,
            Gating::Sigmoid => 3,
        }
    }
}

/// Checks a router's shape: `k` of `n_experts` experts.
pub fn check_top_k(n_experts: usize, k: usize) -> Result<()> {
    if n_experts == 0 || n_experts > MAX_EXPERTS {
        return Err(Error::Unsupported(format!(
            "a router with {n_experts} experts (1..={MAX_EXPERTS} supported)"
        )));
    }
    if k == 0 || k > n_experts || k > MAX_TOP_K {
        return Err(Error::InvalidArgument(format!(
            "top-k of {k} experts with {n_experts} experts (1..={} allowed)",
            n_experts.min(MAX_TOP_K)
        )));
    }
    Ok(())
}

/// Where [`route`] counts its choices: `counts[offset + e]` (u32) gains 1 each time
/// expert `e` is chosen.
#[derive(Debug, Clone, Copy)]
pub struct RouteStats<'a> {
    /// `u32` counters.
    pub counts: &'a Tensor,
    /// Index of expert 0's counter.
    pub offset: usize,
}

/// For each of `rows` rows of router logits (`n_experts` values, stride `ld`): the `k`
/// chosen experts into `ids` (`[rows][k]` u32, highest logit first, ties to the lower
/// index) and their weights into `weights` (`[rows][k]` f32); with `stats`, also counts
/// each choice.
#[allow(clippy::too_many_arguments)]
pub fn route(
    ctx: &Context,
    logits: &Tensor,
    ids: &Tensor,
    weights: &Tensor,
    rows: usize,
    n_experts: usize,
    k: usize,
    ld: usize,
    gating: Gating,
    stats: Option<RouteStats<'_>>,
) -> Result<Dispatch> {
    check_top_k(n_experts, k)?;
    let bad = |what: String| Err(Error::shape("moe_route", what));
    if rows == 0 || ld < n_experts {
        return bad(format!("{rows} rows of {n_experts} logits (ld {ld})"));
    }
    if logits.dtype() != DType::F32 || logits.numel() < (rows - 1) * ld + n_experts {
        return bad(format!("logits {:?}", logits.shape()));
    }
    if ids.dtype() != DType::U32 || ids.numel() < rows * k {
        return bad(format!("ids {:?} for {rows}x{k}", ids.shape()));
    }
    if weights.dtype() != DType::F32 || weights.numel() < rows * k {
        return bad(format!("weights {:?} for {rows}x{k}", weights.shape()));
    }
    if let Some(st) = stats {
        if st.counts.dtype() != DType::U32 || st.counts.numel() < st.offset + n_experts {
            return bad(format!(
                "expert counters {:?} from {}",
                st.counts.shape(),
                st.offset
            ));
        }
    }
    let u = ctx.uniform(&MoeParams {
        rows: rows as u32,
        n_experts: n_experts as u32,
        k: k as u32,
        ld: ld as u32,
        mode: gating.mode(),
        stats_off: stats.map_or(0, |s| s.offset as u32),
        ..Default::default()
    });
    let mut binds = vec![Bind::U(&u), Bind::T(logits), Bind::T(ids), Bind::T(weights)];
    if let Some(st) = stats {
        binds.extend([Bind::Skip, Bind::Skip, Bind::T(st.counts)]);
    }
    ctx.dispatch(
        "moe_route",
        &route_key(stats.is_some()),
        &binds,
        grid(ctx, (rows as u32).div_ceil(64))?,
    )
}

/// Groups the `rows * k` routed pairs of `ids` by expert into `group`:
/// `[n_experts]` counts, `[n_experts]` offsets, then the pair indices sorted by expert (in
/// pair order within an expert), the input of
/// [`crate::kernels::quant::qmatmul_experts_grouped`].
pub fn group(
    ctx: &Context,
    ids: &Tensor,
    group: &Tensor,
    rows: usize,
    n_experts: usize,
    k: usize,
) -> Result<Dispatch> {
    check_top_k(n_experts, k)?;
    let pairs = rows * k;
    if rows == 0 || ids.dtype() != DType::U32 || ids.numel() < pairs {
        return Err(Error::shape(
            "moe_group",
            format!("ids {:?} for {rows}x{k}", ids.shape()),
        ));
    }
    if group.dtype() != DType::U32 || group.numel() < 2 * n_experts + pairs {
        return Err(Error::shape(
            "moe_group",
            format!("group {:?} for {n_experts} experts", group.shape()),
        ));
    }
    let u = ctx.uniform(&MoeParams {
        rows: rows as u32,
        n_experts: n_experts as u32,
        k: k as u32,
        ..Default::default()
    });
    ctx.dispatch(
        "moe_group",
        &key("moe_group"),
        &[
            Bind::U(&u),
            Bind::Skip,
            Bind::T(ids),
            Bind::Skip,
            Bind::Skip,
            Bind::Skip,
            Bind::Skip,
            Bind::T(group),
        ],
        [1, 1, 1],
    )
}

/// `out[t][..cols] (+)= sum_j weights[t][j] * expert_out[t * k + j][..cols]` for `tokens`
/// tokens: each token's k expert outputs (rows of stride `ld`) mixed by its routing
/// weights (`[tokens][k]`), written or added (`accumulate`, the residual) into `out` (rows
/// of stride `ld_out`).
#[allow(clippy::too_many_arguments)]
pub fn combine(
    ctx: &Context,
    out: &Tensor,
    expert_out: &Tensor,
    weights: &Tensor,
    tokens: usize,
    k: usize,
    cols: usize,
    ld: usize,
    ld_out: usize,
    accumulate: bool,
) -> Result<Dispatch> {
    let bad = |what: String| Err(Error::shape("moe_combine", what));
    if tokens == 0 || k == 0 || cols == 0 || ld < cols || ld_out < cols {
        return bad(format!(
            "{tokens} tokens x {k} experts of {cols} (ld {ld}, out {ld_out})"
        ));
    }
    if expert_out.dtype() != DType::F32 || expert_out.numel() < (tokens * k - 1) * ld + cols {
        return bad(format!("expert outputs {:?}", expert_out.shape()));
    }
    if weights.dtype() != DType::F32 || weights.numel() < tokens * k {
        return bad(format!("weights {:?}", weights.shape()));
    }
    if out.dtype() != DType::F32 || out.numel() < (tokens - 1) * ld_out + cols {
        return bad(format!("out {:?}", out.shape()));
    }
    let n = u32::try_from(tokens * cols)
        .map_err(|_| Error::shape("moe_combine", format!("{tokens} x {cols}")))?;
    let u = ctx.uniform(&MoeParams {
        rows: tokens as u32,
        k: k as u32,
        ld: ld as u32,
        cols: cols as u32,
        ld_out: ld_out as u32,
        accumulate: accumulate as u32,
        ..Default::default()
    });
    ctx.dispatch(
        "moe_combine",
        &key("moe_combine"),
        &[
            Bind::U(&u),
            Bind::Skip,
            Bind::Skip,
            Bind::T(weights),
            Bind::T(expert_out),
            Bind::T(out),
        ],
        grid(ctx, n.div_ceil(64))?,
    )
}

fn key(entry: &'static str) -> PipelineKey {
    PipelineKey::new("moe", entry)
}

fn route_key(stats: bool) -> PipelineKey {
    key("moe_route").def("STATS", stats)
}

fn dense_key(f16: bool) -> PipelineKey {
    PipelineKey::new("moe_dense", "moe_dense_mv").def("F16", f16)
}

/// Every specialization (for the portability test).
#[cfg(test)]
pub(crate) fn keys() -> Vec<PipelineKey> {
    vec![
        route_key(false),
        route_key(true),
        key("moe_combine"),
        key("moe_group"),
        dense_key(false),
        dense_key(true),
    ]
}

/// f32 or f16 experts of a Mixture-of-Experts layer: `n_experts` matrices of `rows` rows
/// stacked (expert `e` is rows `e * rows ..`), in chunks that hold whole experts.
#[derive(Debug, Clone)]
pub struct DenseExperts {
    /// The stacked matrix.
    pub mat: DenseMatrix,
    /// Experts.
    pub n_experts: usize,
    /// Rows (output features) per expert.
    pub rows: usize,
}

impl DenseExperts {
    /// Uploads `data` (`[n_experts * rows][cols]`) as `dtype` (F32, or F16 rounded).
    pub fn upload(
        ctx: &Context,
        data: &[f32],
        n_experts: usize,
        rows: usize,
        cols: usize,
        dtype: DType,
    ) -> Result<DenseExperts> {
        let total = n_experts * rows;
        let f16 = dtype == DType::F16;
        if n_experts == 0
            || rows == 0
            || data.len() != total * cols
            || !matches!(dtype, DType::F32 | DType::F16)
            || (f16 && cols % 2 == 1)
        {
            return Err(Error::shape(
                "experts",
                format!(
                    "{} values as {dtype:?} for {n_experts} experts of {rows}x{cols}",
                    data.len()
                ),
            ));
        }
        Ok(DenseExperts {
            mat: DenseMatrix::upload_aligned(ctx, data, total, cols, dtype, rows)?,
            n_experts,
            rows,
        })
    }
}

/// The routed product of [`ExpertDesc`] with f32/f16 experts: each (token, expert) pair
/// reads only its own expert's rows. One dispatch per chunk of experts.
pub fn dense_experts(
    ctx: &Context,
    y: &Tensor,
    x: &Tensor,
    ids: &Tensor,
    w: &DenseExperts,
    d: &ExpertDesc,
) -> Result<Vec<Dispatch>> {
    let op = "dense_experts";
    let k = w.mat.cols;
    d.check(op, y, x, w.rows, k)?;
    if ids.dtype() != DType::U32 || ids.numel() < d.pairs {
        return Err(Error::shape(
            op,
            format!("ids {:?} for {} pairs", ids.shape(), d.pairs),
        ));
    }
    let u32_of = |v: usize, what: &str| {
        u32::try_from(v).map_err(|_| Error::shape(op, format!("{what} {v} exceeds u32")))
    };
    let groups = u32_of(d.pairs * w.rows, "pairs x rows")?;
    let key = dense_key(w.mat.dtype == DType::F16);
    let mut ops = Vec::with_capacity(w.mat.chunks.len());
    for c in &w.mat.chunks {
        let u = ctx.uniform(&DenseExpertParams {
            pairs: u32_of(d.pairs, "pairs")?,
            n: u32_of(w.rows, "rows")?,
            k: u32_of(k, "cols")?,
            ldx: u32_of(d.ldx, "ldx")?,
            ldy: u32_of(d.ldy, "ldy")?,
            y_offset: u32_of(d.y_offset, "y_offset")?,
            n_ids: u32_of(d.pairs_per_x, "pairs_per_x")?,
            glu: u32_of(d.glu, "glu")?,
            row_start: u32_of(c.row_start / w.rows, "first expert")?,
            experts: u32_of(c.rows / w.rows, "experts")?,
            accumulate: d.accumulate as u32,
            _pad: 0,
        });
        ops.push(ctx.dispatch(
            op,
            &key,
            &[
                Bind::U(&u),
                Bind::T(x),
                Bind::T(&c.t),
                Bind::T(ids),
                Bind::T(y),
            ],
            grid(ctx, groups)?,
        )?);
    }
    Ok(ops)
}

/// CPU reference of [`route`] for one row of logits (f64 arithmetic).
pub fn route_ref(logits: &[f32], k: usize, gating: Gating) -> (Vec<u32>, Vec<f32>) {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Stable: equal logits keep the lower index first.
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let chosen = &order[..k.min(order.len())];
    let mx = logits.iter().fold(f64::MIN, |m, &v| m.max(v as f64));
    let sum: f64 = logits.iter().map(|&v| (v as f64 - mx).exp()).sum();
    let mut w: Vec<f64> = chosen
        .iter()
        .map(|&e| match gating {
            Gating::SigmoidRenorm | Gating::Sigmoid => 1.0 / (1.0 + (-(logits[e] as f64)).exp()),
            _ => (logits[e] as f64 - mx).exp() / sum,
        })
        .collect();
    if matches!(gating, Gating::SoftmaxRenorm | Gating::SigmoidRenorm) {
        let t: f64 = w.iter().sum();
        w.iter_mut().for_each(|v| *v /= t);
    }
    (
        chosen.iter().map(|&e| e as u32).collect(),
        w.into_iter().map(|v| v as f32).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_close, ctx};
    use crate::util::Rng;

    #[test]
    fn routes_like_the_reference() {
        let ctx = ctx();
        let mut rng = Rng::new(11);
        for &(rows, n, k, ld) in &[
            (1, 8, 2, 8),
            (7, 4, 2, 5),
            (3, 64, 8, 64),
            (130, 60, 4, 61),
            (2, 256, 16, 256),
            (5, 3, 3, 3),
        ] {
            let mut lv = rng.vec(rows * ld, -4.0, 4.0);
            // A tie in row 0: experts 1 and 2 share the top logit.
            lv[1] = 9.0;
            lv[2.min(n - 1)] = 9.0;
            let l = Tensor::from_f32(ctx, &[rows, ld], &lv).unwrap();
            for gating in [
                Gating::SoftmaxRenorm,
                Gating::Softmax,
                Gating::SigmoidRenorm,
                Gating::Sigmoid,
            ] {
                let ids = Tensor::zeros(ctx, &[rows * k], DType::U32).unwrap();
                let w = Tensor::zeros(ctx, &[rows * k], DType::F32).unwrap();
                // Counters after 3 unused slots, counted twice over.
                let counts = Tensor::zeros(ctx, &[3 + n], DType::U32).unwrap();
                let stats = RouteStats {
                    counts: &counts,
                    offset: 3,
                };
                let op = |st| route(ctx, &l, &ids, &w, rows, n, k, ld, gating, st).unwrap();
                ctx.run(&[op(None), op(Some(stats)), op(Some(stats))])
                    .unwrap();
                let (mut want_ids, mut want_w) = (Vec::new(), Vec::new());
                for r in 0..rows {
                    let (i, w) = route_ref(&lv[r * ld..r * ld + n], k, gating);
                    want_ids.extend(i);
                    want_w.extend(w);
                }
                let name = format!("{rows}x{n} top-{k} {gating:?}");
                let got: Vec<u32> = ids.read_u32(ctx).unwrap();
                assert_eq!(got, want_ids, "{name}");
                let mut want_counts = vec![0u32; 3 + n];
                for &e in &want_ids {
                    want_counts[3 + e as usize] += 2;
                }
                assert_eq!(counts.read_u32(ctx).unwrap(), want_counts, "{name} counts");
                assert_close(&name, &w.read_f32(ctx).unwrap(), &want_w, 1e-6, 1e-5);
            }
        }
    }

    #[test]
    fn combine_mixes_each_tokens_experts() {
        let ctx = ctx();
        let mut rng = Rng::new(12);
        for &(tokens, k, cols, ld, ld_out, acc) in &[
            (1, 2, 5, 5, 5, false),
            (9, 3, 70, 72, 80, true),
            (130, 1, 3, 4, 3, false),
        ] {
            let eo = rng.vec(tokens * k * ld, -2.0, 2.0);
            let wv = rng.vec(tokens * k, 0.0, 1.0);
            let o0 = rng.vec(tokens * ld_out, -1.0, 1.0);
            let et = Tensor::from_f32(ctx, &[tokens * k, ld], &eo).unwrap();
            let wt = Tensor::from_f32(ctx, &[tokens * k], &wv).unwrap();
            let ot = Tensor::from_f32(ctx, &[tokens, ld_out], &o0).unwrap();
            ctx.run(&[combine(ctx, &ot, &et, &wt, tokens, k, cols, ld, ld_out, acc).unwrap()])
                .unwrap();
            let mut want = o0.clone();
            for t in 0..tokens {
                for c in 0..cols {
                    let s: f32 = (0..k)
                        .map(|j| wv[t * k + j] * eo[(t * k + j) * ld + c])
                        .sum();
                    let o = &mut want[t * ld_out + c];
                    *o = if acc { *o + s } else { s };
                }
            }
            assert_close(
                &format!("combine {tokens}x{k}x{cols}"),
                &ot.read_f32(ctx).unwrap(),
                &want,
                1e-6,
                1e-6,
            );
        }
        let e = Tensor::zeros(ctx, &[4], DType::F32).unwrap();
        assert!(combine(ctx, &e, &e, &e, 2, 2, 3, 3, 3, false).is_err());
    }

    #[test]
    fn bad_router_shapes_are_errors() {
        let ctx = ctx();
        let l = Tensor::zeros(ctx, &[4, 8], DType::F32).unwrap();
        let ids = Tensor::zeros(ctx, &[8], DType::U32).unwrap();
        let w = Tensor::zeros(ctx, &[8], DType::F32).unwrap();
        let e = route(ctx, &l, &ids, &w, 4, 8, 9, 8, Gating::Softmax, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("top-k of 9 experts with 8 experts"), "{e}");
        assert!(route(ctx, &l, &ids, &w, 4, 8, 0, 8, Gating::Softmax, None).is_err());
        assert!(route(ctx, &l, &ids, &w, 4, 300, 2, 300, Gating::Softmax, None).is_err());
        // ids too small for 4 rows of top-4.
        assert!(route(ctx, &l, &ids, &w, 4, 8, 4, 8, Gating::Softmax, None).is_err());
        // logits too small for 5 rows.
        assert!(route(ctx, &l, &ids, &w, 5, 8, 1, 8, Gating::Softmax, None).is_err());
    }
}
