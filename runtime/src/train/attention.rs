//! Causal attention for training, forward and backward, over packed rows.
//!
//! Rows of several sequences (and padding) are packed one after another; row `t` attends to
//! the keys `[ranges[t].0, ranges[t].1)` (its own sequence up to itself). Queries are taken in
//! blocks so that the score matrix of one block (`[heads][block][keys]`) fits a fixed
//! budget: nothing of size `heads x rows x rows` is kept for long sequences. The backward
//! recomputes each block's probabilities from q and k (as FlashAttention does) unless the
//! whole matrix fit one block, in which case the forward's probabilities are still there.
//!
//! With scores `S = scale Q K^T` and `P = softmax(S)` per query row (masked by the ranges):
//! `dV = P^T dO`, `dP = dO V^T`, `dS = P (dP - rowsum(P dP))`, `dQ = scale dS K`,
//! `dK = scale dS^T Q`. Grouped-query heads share K and V: their dK and dV are summed with
//! one accumulating product per head of a group.

use crate::error::{Error, Result};
use crate::gpu::{Context, DType, Dispatch, Tensor};
use crate::kernels::matmul::{matmul, MatmulDesc};
use crate::kernels::train::{fill, softmax_backward, softmax_ranges};
use crate::kernels::Variant;

/// Head shapes of the fused q|k|v rows (`[rows][q_dim + 2 kv_dim]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    /// Packed rows (a multiple of 32).
    pub rows: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (dividing `n_heads`).
    pub n_kv: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Score scale (`1 / sqrt(head_dim)`).
    pub scale: f32,
}

impl AttnShape {
    fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    fn kv_dim(&self) -> usize {
        self.n_kv * self.head_dim
    }
    fn qkv_dim(&self) -> usize {
        self.q_dim() + 2 * self.kv_dim()
    }
    fn group(&self) -> usize {
        self.n_heads / self.n_kv
    }
}

/// Query rows of one block and the keys they may see (`0 .. span`, causal).
#[derive(Debug)]
struct Block {
    q0: usize,
    tq: usize,
    span: usize,
    ld: usize,
    ranges: Tensor,
}

/// Attention over packed rows with preallocated score buffers.
pub struct TrainAttention {
    shape: AttnShape,
    blocks: Vec<Block>,
    /// Probabilities of the current block `[heads][tq][ld]`.
    probs: Tensor,
    /// dP, then dS, of the current block.
    dp: Tensor,
}

/// Rows per query block are a multiple of this (keeps every view aligned for binding).
pub const BLOCK_ALIGN: usize = 32;

impl TrainAttention {
    /// Plans the blocks for `shape` with `ranges` (`[rows][2]` u32, absolute row indices,
    /// written before each step) and score buffers of at most `budget` floats each (at
    /// least one 32-row block).
    pub fn new(ctx: &Context, shape: AttnShape, ranges: &Tensor, budget: usize) -> Result<Self> {
        let s = shape;
        if s.rows == 0
            || s.rows % BLOCK_ALIGN != 0
            || s.n_kv == 0
            || s.n_heads % s.n_kv != 0
            || s.head_dim == 0
        {
            return Err(Error::shape("train attention", format!("{s:?}")));
        }
        if ranges.dtype() != DType::U32 || ranges.numel() < 2 * s.rows {
            return Err(Error::shape(
                "train attention",
                format!("ranges {:?} for {} rows", ranges.shape(), s.rows),
            ));
        }
        let ld_all = s.rows.next_multiple_of(4);
        let fit = budget / (s.n_heads * ld_all).max(1) / BLOCK_ALIGN * BLOCK_ALIGN;
        let tq_max = fit.clamp(BLOCK_ALIGN, s.rows);
        let mut blocks = Vec::new();
        let mut q0 = 0;
        let mut need = 0;
        while q0 < s.rows {
            let tq = tq_max.min(s.rows - q0);
            let span = q0 + tq;
            let ld = span.next_multiple_of(4);
            need = need.max(s.n_heads * tq * ld);
            let ranges = Tensor::view(
                ranges.buffer().clone(),
                ranges.offset() + 8 * q0 as u64,
                &[tq, 2],
                DType::U32,
            )?;
            blocks.push(Block {
                q0,
                tq,
                span,
                ld,
                ranges,
            });
            q0 += tq;
        }
        Ok(TrainAttention {
            shape,
            blocks,
            probs: Tensor::zeros(ctx, &[need], DType::F32)?,
            dp: Tensor::zeros(ctx, &[need], DType::F32)?,
        })
    }

    /// Query blocks in the plan.
    pub fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Device bytes of the score buffers.
    pub fn bytes(&self) -> u64 {
        self.probs.bytes() + self.dp.bytes()
    }

    /// `P = softmax(scale Q K^T)` of block `b` into `probs`.
    fn probabilities(
        &self,
        ctx: &Context,
        b: &Block,
        qkv: &Tensor,
        variant: Variant,
    ) -> Result<Vec<Dispatch>> {
        let s = &self.shape;
        let (hd, qkv_dim, q_dim) = (s.head_dim, s.qkv_dim(), s.q_dim());
        let mut d = MatmulDesc::new(b.tq, b.span, hd).batched(s.n_heads);
        d.lda = qkv_dim;
        d.off_a = b.q0 * qkv_dim;
        d.stride_a = hd;
        d.ldb = qkv_dim;
        d.off_b = q_dim;
        d.stride_b = hd;
        d.b_div = s.group();
        d.ldc = b.ld;
        d.stride_c = b.tq * b.ld;
        d.alpha = s.scale;
        Ok(vec![
            matmul(ctx, &self.probs, qkv, qkv, &d, variant)?,
            softmax_ranges(
                ctx,
                &self.probs,
                &b.ranges,
                s.n_heads * b.tq,
                b.span,
                b.ld,
                b.tq,
            )?,
        ])
    }

    /// Dispatches of `out[rows][q_dim] = attention(q, k, v)` reading the fused `qkv` rows.
    pub fn forward(
        &self,
        ctx: &Context,
        qkv: &Tensor,
        out: &Tensor,
        variant: Variant,
    ) -> Result<Vec<Dispatch>> {
        Ok(tag(self.forward_ops(ctx, qkv, out, variant)?, "attn_fwd"))
    }

    fn forward_ops(
        &self,
        ctx: &Context,
        qkv: &Tensor,
        out: &Tensor,
        variant: Variant,
    ) -> Result<Vec<Dispatch>> {
        let s = &self.shape;
        let (hd, qkv_dim, q_dim, kv_dim) = (s.head_dim, s.qkv_dim(), s.q_dim(), s.kv_dim());
        let mut ops = Vec::new();
        for b in &self.blocks {
            ops.extend(self.probabilities(ctx, b, qkv, variant)?);
            let mut d = MatmulDesc::new(b.tq, hd, b.span)
                .layout(false, true)
                .batched(s.n_heads);
            d.lda = b.ld;
            d.stride_a = b.tq * b.ld;
            d.ldb = qkv_dim;
            d.off_b = q_dim + kv_dim;
            d.stride_b = hd;
            d.b_div = s.group();
            d.ldc = q_dim;
            d.off_c = b.q0 * q_dim;
            d.stride_c = hd;
            ops.push(matmul(ctx, out, &self.probs, qkv, &d, variant)?);
        }
        Ok(ops)
    }

    /// Dispatches of the backward: `dqkv[rows][qkv_dim]` (overwritten) from `d_out`
    /// (`[rows][q_dim]`). The probabilities are recomputed from q and k when `recompute`
    /// or when the plan has several blocks; otherwise the forward of the same inputs must
    /// have been the last use of this object (its probabilities are reused).
    pub fn backward(
        &self,
        ctx: &Context,
        qkv: &Tensor,
        d_out: &Tensor,
        dqkv: &Tensor,
        recompute: bool,
        variant: Variant,
    ) -> Result<Vec<Dispatch>> {
        let recompute = recompute || self.blocks.len() > 1;
        let ops = self.backward_ops(ctx, qkv, d_out, dqkv, recompute, variant)?;
        Ok(tag(ops, "attn_bwd"))
    }

    fn backward_ops(
        &self,
        ctx: &Context,
        qkv: &Tensor,
        d_out: &Tensor,
        dqkv: &Tensor,
        recompute: bool,
        variant: Variant,
    ) -> Result<Vec<Dispatch>> {
        let s = &self.shape;
        let (hd, qkv_dim, q_dim, kv_dim, g) =
            (s.head_dim, s.qkv_dim(), s.q_dim(), s.kv_dim(), s.group());
        let mut ops = vec![fill(ctx, dqkv, 0.0, s.rows * qkv_dim)?];
        for b in &self.blocks {
            if recompute {
                ops.extend(self.probabilities(ctx, b, qkv, variant)?);
            }
            // dP = dO V^T
            let mut d = MatmulDesc::new(b.tq, b.span, hd).batched(s.n_heads);
            d.lda = q_dim;
            d.off_a = b.q0 * q_dim;
            d.stride_a = hd;
            d.ldb = qkv_dim;
            d.off_b = q_dim + kv_dim;
            d.stride_b = hd;
            d.b_div = g;
            d.ldc = b.ld;
            d.stride_c = b.tq * b.ld;
            ops.push(matmul(ctx, &self.dp, d_out, qkv, &d, variant)?);
            // dS = P (dP - rowsum(P dP)), over dP
            ops.push(softmax_backward(
                ctx,
                &self.dp,
                &self.probs,
                s.n_heads * b.tq,
                b.ld,
            )?);
            // dQ = scale dS K
            let mut d = MatmulDesc::new(b.tq, hd, b.span)
                .layout(false, true)
                .batched(s.n_heads);
            d.lda = b.ld;
            d.stride_a = b.tq * b.ld;
            d.ldb = qkv_dim;
            d.off_b = q_dim;
            d.stride_b = hd;
            d.b_div = g;
            d.ldc = qkv_dim;
            d.off_c = b.q0 * qkv_dim;
            d.stride_c = hd;
            d.alpha = s.scale;
            ops.push(matmul(ctx, dqkv, &self.dp, qkv, &d, variant)?);
            // Per head j of a group, batched over key/value heads:
            // dK += scale dS^T Q and dV += P^T dO.
            for j in 0..g {
                let mut d = MatmulDesc::new(b.span, hd, b.tq)
                    .layout(true, true)
                    .batched(s.n_kv);
                d.lda = b.ld;
                d.off_a = j * b.tq * b.ld;
                d.stride_a = g * b.tq * b.ld;
                d.ldb = qkv_dim;
                d.off_b = b.q0 * qkv_dim + j * hd;
                d.stride_b = g * hd;
                d.ldc = qkv_dim;
                d.off_c = q_dim;
                d.stride_c = hd;
                d.alpha = s.scale;
                d.accumulate = true;
                ops.push(matmul(ctx, dqkv, &self.dp, qkv, &d, variant)?);
                d.ldb = q_dim;
                d.off_b = b.q0 * q_dim + j * hd;
                d.off_c = q_dim + kv_dim;
                d.alpha = 1.0;
                ops.push(matmul(ctx, dqkv, &self.probs, d_out, &d, variant)?);
            }
        }
        Ok(ops)
    }
}

/// Labels matmuls for profiles (other kernels keep their names).
fn tag(mut ops: Vec<Dispatch>, name: &'static str) -> Vec<Dispatch> {
    for op in &mut ops {
        if op.name == "matmul" {
            op.name = name;
        }
    }
    ops
}

/// CPU reference of the forward in f64: `out[rows][q_dim]`.
pub fn attention_train_ref(qkv: &[f64], ranges: &[(usize, usize)], s: &AttnShape) -> Vec<f64> {
    let (hd, qkv_dim, q_dim, kv_dim, g) =
        (s.head_dim, s.qkv_dim(), s.q_dim(), s.kv_dim(), s.group());
    let mut out = vec![0.0; s.rows * q_dim];
    for t in 0..s.rows {
        let (a, e) = ranges[t];
        for h in 0..s.n_heads {
            let kvh = h / g;
            let q = &qkv[t * qkv_dim + h * hd..][..hd];
            let sc: Vec<f64> = (a..e)
                .map(|u| {
                    let k = &qkv[u * qkv_dim + q_dim + kvh * hd..][..hd];
                    s.scale as f64 * q.iter().zip(k).map(|(x, y)| x * y).sum::<f64>()
                })
                .collect();
            let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = sc.iter().map(|v| (v - mx).exp()).sum();
            for (i, u) in (a..e).enumerate() {
                let p = (sc[i] - mx).exp() / z;
                let v = &qkv[u * qkv_dim + q_dim + kv_dim + kvh * hd..][..hd];
                for c in 0..hd {
                    out[t * q_dim + h * hd + c] += p * v[c];
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_close, ctx};
    use crate::util::Rng;

    /// Two packed sequences and padding rows, GQA, a budget forcing several query blocks,
    /// and the one-block plan: outputs against the f64 reference, gradients against finite
    /// differences of `sum(out * R)`.
    #[test]
    fn forward_and_backward_match_reference_and_finite_differences() {
        let ctx = ctx();
        let s = AttnShape {
            rows: 64,
            n_heads: 4,
            n_kv: 2,
            head_dim: 8,
            scale: 1.0 / 8f32.sqrt(),
        };
        let (qkv_dim, q_dim) = (s.qkv_dim(), s.q_dim());
        let seqs = [(0usize, 21usize), (21, 50)];
        let ranges: Vec<(usize, usize)> = (0..s.rows)
            .map(|t| match seqs.iter().find(|(a, e)| t >= *a && t < *e) {
                Some(&(a, _)) => (a, t + 1),
                None => (t, t + 1),
            })
            .collect();
        let flat: Vec<u32> = ranges
            .iter()
            .flat_map(|&(a, e)| [a as u32, e as u32])
            .collect();
        let rt = Tensor::from_slice(ctx, &[s.rows, 2], DType::U32, &flat).unwrap();
        let mut rng = Rng::new(11);
        let x = rng.vec(s.rows * qkv_dim, -1.5, 1.5);
        let r = rng.vec(s.rows * q_dim, -1.0, 1.0);
        let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let want = attention_train_ref(&xd, &ranges, &s);
        let loss = |v: &[f64]| -> f64 {
            attention_train_ref(v, &ranges, &s)
                .iter()
                .zip(&r)
                .map(|(o, w)| o * *w as f64)
                .sum()
        };
        let qkv = Tensor::from_f32(ctx, &[s.rows, qkv_dim], &x).unwrap();
        let dout = Tensor::from_f32(ctx, &[s.rows, q_dim], &r).unwrap();
        for (budget, blocks) in [(4 * 32 * 64, 2), (1 << 20, 1)] {
            let att = TrainAttention::new(ctx, s, &rt, budget).unwrap();
            assert_eq!(att.n_blocks(), blocks);
            let out = Tensor::zeros(ctx, &[s.rows, q_dim], DType::F32).unwrap();
            let dqkv = Tensor::zeros(ctx, &[s.rows, qkv_dim], DType::F32).unwrap();
            let mut ops = att.forward(ctx, &qkv, &out, Variant::Auto).unwrap();
            ops.extend(
                att.backward(ctx, &qkv, &dout, &dqkv, false, Variant::Auto)
                    .unwrap(),
            );
            ctx.run(&ops).unwrap();
            let want32: Vec<f32> = want.iter().map(|&v| v as f32).collect();
            assert_close(
                "attention out",
                &out.read_f32(ctx).unwrap(),
                &want32,
                1e-5,
                1e-4,
            );
            let got = dqkv.read_f32(ctx).unwrap();
            // Every row of q, k and v of a few tokens of each sequence and the padding.
            for t in [0usize, 5, 20, 21, 33, 49, 50, 63] {
                for c in (0..qkv_dim).step_by(3) {
                    let i = t * qkv_dim + c;
                    let h = 1e-5;
                    let mut a = xd.clone();
                    a[i] += h;
                    let mut b = xd.clone();
                    b[i] -= h;
                    let fd = (loss(&a) - loss(&b)) / (2.0 * h);
                    assert!(
                        (got[i] as f64 - fd).abs() < 2e-4 + 1e-3 * fd.abs(),
                        "blocks {blocks}: d qkv[{t}][{c}] = {} vs {fd}",
                        got[i]
                    );
                }
            }
        }
    }
}
