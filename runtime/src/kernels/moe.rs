//! Mixture-of-Experts routing on the GPU (`shaders/moe.wgsl`): each token's router logits
//! become the k experts it is sent to and their mixing weights, by the convention of the
//! model family ([`Gating`]).

use crate::error::{Error, Result};
use crate::gpu::{grid, Bind, Context, DType, Dispatch, PipelineKey, Tensor};
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
    }
}

/// Most experts a router may have.
pub const MAX_EXPERTS: usize = 256;
/// Most experts a token may use.
pub const MAX_TOP_K: usize = 16;

/// How router logits become expert weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gating {
    /// Softmax over all experts, then the top k renormalized to sum 1 (Mixtral,
    /// Qwen3-MoE; `norm_topk_prob = true`).
    SoftmaxRenorm,
    /// Softmax over all experts, the top k as they are (Qwen2-MoE, OLMoE;
    /// `norm_topk_prob = false`).
    Softmax,
    /// Sigmoid of each logit, the top k renormalized.
    SigmoidRenorm,
}

impl Gating {
    fn mode(self) -> u32 {
        match self {
            Gating::SoftmaxRenorm => 0,
            Gating::Softmax => 1,
            Gating::SigmoidRenorm => 2,
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

/// For each of `rows` rows of router logits (`n_experts` values, stride `ld`): the `k`
/// chosen experts into `ids` (`[rows][k]` u32, highest logit first, ties to the lower
/// index) and their weights into `weights` (`[rows][k]` f32).
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
    let u = ctx.uniform(&MoeParams {
        rows: rows as u32,
        n_experts: n_experts as u32,
        k: k as u32,
        ld: ld as u32,
        mode: gating.mode(),
        cols: 0,
        ld_out: 0,
        accumulate: 0,
    });
    ctx.dispatch(
        "moe_route",
        &key("moe_route"),
        &[Bind::U(&u), Bind::T(logits), Bind::T(ids), Bind::T(weights)],
        grid(ctx, (rows as u32).div_ceil(64))?,
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
        n_experts: 0,
        k: k as u32,
        ld: ld as u32,
        mode: 0,
        cols: cols as u32,
        ld_out: ld_out as u32,
        accumulate: accumulate as u32,
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

/// Every specialization (for the portability test).
#[cfg(test)]
pub(crate) fn keys() -> Vec<PipelineKey> {
    vec![key("moe_route"), key("moe_combine")]
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
            Gating::SigmoidRenorm => 1.0 / (1.0 + (-(logits[e] as f64)).exp()),
            _ => (logits[e] as f64 - mx).exp() / sum,
        })
        .collect();
    if gating != Gating::Softmax {
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
            ] {
                let ids = Tensor::zeros(ctx, &[rows * k], DType::U32).unwrap();
                let w = Tensor::zeros(ctx, &[rows * k], DType::F32).unwrap();
                ctx.run(&[route(ctx, &l, &ids, &w, rows, n, k, ld, gating).unwrap()])
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
        let e = route(ctx, &l, &ids, &w, 4, 8, 9, 8, Gating::Softmax)
            .unwrap_err()
            .to_string();
        assert!(e.contains("top-k of 9 experts with 8 experts"), "{e}");
        assert!(route(ctx, &l, &ids, &w, 4, 8, 0, 8, Gating::Softmax).is_err());
        assert!(route(ctx, &l, &ids, &w, 4, 300, 2, 300, Gating::Softmax).is_err());
        // ids too small for 4 rows of top-4.
        assert!(route(ctx, &l, &ids, &w, 4, 8, 4, 8, Gating::Softmax).is_err());
        // logits too small for 5 rows.
        assert!(route(ctx, &l, &ids, &w, 5, 8, 1, 8, Gating::Softmax).is_err());
    }
}
