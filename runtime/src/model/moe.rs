//! A Mixture-of-Experts feed-forward block on the GPU: the router's logits, top-k routing
//! ([`crate::kernels::moe::route`]), the routed (token, expert) pairs through their own
//! experts only ([`crate::kernels::quant::qmatmul_experts`]: gate|up, then down with
//! SwiGLU fused into its input), and the weighted sum of each token's k outputs added to
//! the residual stream ([`crate::kernels::moe::combine`]). All on the device: the CPU never
//! sees which experts a token chose.

use crate::error::{Error, Result};
use crate::gpu::{Context, DType, Dispatch, Tensor};
use crate::kernels::moe::{check_top_k, combine, route, Gating};
use crate::kernels::quant::{qmatmul_experts, ExpertDesc, QExperts, QShape};
use crate::kernels::Variant;
use crate::model::weights::{Linear, Rows};

/// The weights of one MoE feed-forward block.
#[derive(Debug, Clone)]
pub struct MoeFfn {
    /// Router (gating) weights, `[n_experts][hidden]`.
    pub router: Linear,
    /// Every expert's gate and up projections: expert `e` is rows `e * 2 ff ..`, its gate
    /// rows first, then its up rows (`[n_experts][2 ff][hidden]`).
    pub gate_up: QExperts,
    /// Every expert's down projection, `[n_experts][hidden][ff]`.
    pub down: QExperts,
    /// Experts each token uses.
    pub top_k: usize,
    /// How router logits become weights.
    pub gating: Gating,
}

/// Scratch buffers of [`MoeFfn::forward`] for up to `rows` tokens.
pub struct MoeScratch {
    rows: usize,
    logits: Tensor,
    ids: Tensor,
    weights: Tensor,
    gu: Tensor,
    out: Tensor,
}

impl MoeScratch {
    /// Buffers for `rows` tokens through `ffn`.
    pub fn new(ctx: &Context, ffn: &MoeFfn, rows: usize) -> Result<MoeScratch> {
        let pairs = rows * ffn.top_k;
        let f = |n: usize| Tensor::zeros(ctx, &[n], DType::F32);
        Ok(MoeScratch {
            rows,
            logits: f(rows * ffn.n_experts())?,
            ids: Tensor::zeros(ctx, &[pairs], DType::U32)?,
            weights: f(pairs)?,
            gu: f(pairs * ffn.gate_up.rows)?,
            out: f(pairs * ffn.down.rows)?,
        })
    }
}

impl MoeFfn {
    /// Checks that the parts fit together (expert counts, sizes, top-k).
    pub fn new(
        router: Linear,
        gate_up: QExperts,
        down: QExperts,
        top_k: usize,
        gating: Gating,
    ) -> Result<MoeFfn> {
        let e = router.rows;
        check_top_k(e, top_k)?;
        let hidden = router.cols;
        let ff = down.mat.cols;
        if gate_up.n_experts != e || down.n_experts != e {
            return Err(Error::InvalidArgument(format!(
                "the router has {e} experts but the expert tensors hold {} and {}",
                gate_up.n_experts, down.n_experts
            )));
        }
        if gate_up.rows != 2 * ff || gate_up.mat.cols != hidden || down.rows != hidden {
            return Err(Error::InvalidArgument(format!(
                "expert shapes: gate|up {}x{}, down {}x{} for hidden {hidden}",
                gate_up.rows, gate_up.mat.cols, down.rows, ff
            )));
        }
        Ok(MoeFfn {
            router,
            gate_up,
            down,
            top_k,
            gating,
        })
    }

    /// Experts.
    pub fn n_experts(&self) -> usize {
        self.router.rows
    }

    /// Dispatches of `x[..m] += MoE(h[..m])` (`x` and `h` are `[m][hidden]`).
    pub fn forward(
        &self,
        ctx: &Context,
        x: &Tensor,
        h: &Tensor,
        s: &MoeScratch,
        m: usize,
        variant: Variant,
    ) -> Result<Vec<Dispatch>> {
        if m == 0 || m > s.rows {
            return Err(Error::shape(
                "moe",
                format!("{m} tokens with scratch for {}", s.rows),
            ));
        }
        let (e, k, hidden) = (self.n_experts(), self.top_k, self.router.cols);
        let ff = self.down.mat.cols;
        let pairs = m * k;
        let rows = Rows {
            m,
            ldx: hidden,
            ldy: e,
            y_off: 0,
            accumulate: false,
            glu: 0,
        };
        let mut ops = self
            .router
            .forward(ctx, &s.logits, h, rows, variant, QShape::Auto)?;
        ops.push(route(
            ctx,
            &s.logits,
            &s.ids,
            &s.weights,
            m,
            e,
            k,
            e,
            self.gating,
        )?);
        let gate_up = ExpertDesc {
            pairs,
            pairs_per_x: k,
            ldx: hidden,
            ldy: 2 * ff,
            y_offset: 0,
            accumulate: false,
            glu: 0,
        };
        ops.extend(qmatmul_experts(
            ctx,
            &s.gu,
            h,
            &s.ids,
            &self.gate_up,
            &gate_up,
            variant,
        )?);
        let down = ExpertDesc {
            pairs,
            pairs_per_x: 1,
            ldx: 2 * ff,
            ldy: hidden,
            y_offset: 0,
            accumulate: false,
            glu: ff,
        };
        ops.extend(qmatmul_experts(
            ctx, &s.out, &s.gu, &s.ids, &self.down, &down, variant,
        )?);
        ops.push(combine(
            ctx, x, &s.out, &s.weights, m, k, hidden, hidden, hidden, true,
        )?);
        Ok(ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::moe::route_ref;
    use crate::kernels::testing::{assert_close, ctx};
    use crate::model::weights::{HostMatrix, HostTensor};
    use crate::quant::{dequantize, random_blocks, repack, QuantType};
    use crate::util::Rng;

    fn experts(
        ctx: &Context,
        ty: QuantType,
        e: usize,
        rows: usize,
        cols: usize,
        seed: u64,
    ) -> (QExperts, Vec<f32>) {
        let raw = random_blocks(ty, &mut Rng::new(seed), e * rows * cols / ty.block_elems());
        let r = repack(ty, e * rows, cols, &raw).unwrap();
        (
            QExperts::upload(ctx, &r, e).unwrap(),
            dequantize(ty, &raw).unwrap(),
        )
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    /// A token's MoE output by the textbook formula, in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        h: &[f32],
        router: &[f32],
        gu: &[f32],
        down: &[f32],
        e: usize,
        k: usize,
        ff: usize,
        gating: Gating,
    ) -> Vec<f64> {
        let hidden = h.len();
        let logits: Vec<f32> = (0..e)
            .map(|i| dot(&router[i * hidden..][..hidden], h) as f32)
            .collect();
        let (ids, w) = route_ref(&logits, k, gating);
        let mut out = vec![0.0f64; hidden];
        for (&ex, &wt) in ids.iter().zip(&w) {
            let base = ex as usize * 2 * ff;
            let act: Vec<f32> = (0..ff)
                .map(|j| {
                    let g = dot(&gu[(base + j) * hidden..][..hidden], h);
                    let u = dot(&gu[(base + ff + j) * hidden..][..hidden], h);
                    (g / (1.0 + (-g).exp()) * u) as f32
                })
                .collect();
            for (c, o) in out.iter_mut().enumerate() {
                *o += wt as f64 * dot(&down[(ex as usize * hidden + c) * ff..][..ff], &act);
            }
        }
        out
    }

    #[test]
    fn moe_block_matches_the_textbook_formula() {
        let ctx = ctx();
        let (hidden, ff, e, k, m) = (64, 32, 4, 2, 5);
        let mut rng = Rng::new(21);
        let router_w = rng.vec(e * hidden, -0.5, 0.5);
        let router = Linear::from_parts(
            ctx,
            vec![HostTensor {
                name: "router".into(),
                source: None,
                rows: e,
                cols: hidden,
                data: HostMatrix::F32(router_w.clone()),
            }],
            "router",
        )
        .unwrap();
        let (gu, guf) = experts(ctx, QuantType::Q8_0, e, 2 * ff, hidden, 1);
        let (dn, dnf) = experts(ctx, QuantType::Q4_1, e, hidden, ff, 2);
        for gating in [Gating::SoftmaxRenorm, Gating::Softmax] {
            let ffn = MoeFfn::new(router.clone(), gu.clone(), dn.clone(), k, gating).unwrap();
            let s = MoeScratch::new(ctx, &ffn, 8).unwrap();
            let hv = rng.vec(m * hidden, -1.0, 1.0);
            let xv = rng.vec(m * hidden, -1.0, 1.0);
            let h = Tensor::from_f32(ctx, &[m, hidden], &hv).unwrap();
            let x = Tensor::from_f32(ctx, &[m, hidden], &xv).unwrap();
            for variant in Variant::all(ctx) {
                x.write(ctx, &xv).unwrap();
                ctx.run(&ffn.forward(ctx, &x, &h, &s, m, variant).unwrap())
                    .unwrap();
                let mut want = Vec::new();
                for t in 0..m {
                    let r = reference(
                        &hv[t * hidden..][..hidden],
                        &router_w,
                        &guf,
                        &dnf,
                        e,
                        k,
                        ff,
                        gating,
                    );
                    want.extend((0..hidden).map(|c| (xv[t * hidden + c] as f64 + r[c]) as f32));
                }
                assert_close(
                    &format!("MoE {gating:?} {variant:?}"),
                    &x.read_f32(ctx).unwrap(),
                    &want,
                    2e-4,
                    1e-4,
                );
            }
        }
        // Mismatched parts are refused.
        let (gu3, _) = experts(ctx, QuantType::Q8_0, 3, 2 * ff, hidden, 1);
        let err = MoeFfn::new(router.clone(), gu3, dn.clone(), k, Gating::Softmax)
            .unwrap_err()
            .to_string();
        assert!(err.contains("router has 4 experts"), "{err}");
        let err = MoeFfn::new(router, gu, dn, 5, Gating::Softmax)
            .unwrap_err()
            .to_string();
        assert!(err.contains("top-k of 5"), "{err}");
    }
}
