//! Input gradients through frozen weights in any stored format: `dX (+)= dY . W`.
//!
//! Dense (f32/f16) weights feed the matmul directly (`B` read as `[K][N]`). Quantized ones
//! are dequantized on the fly, QLoRA-style: a chunk of rows at a time is expanded to f32
//! in a scratch buffer by the embedding-gather kernel (bit-exact ggml dequantization),
//! transposed so that the product reads it in the matmul's fast layout, then multiplied. The scratch is bounded, so the lm_head of a large vocabulary costs a few
//! chunks rather than an f32 copy of the whole table.

use crate::error::{Error, Result};
use crate::gpu::{Context, DType, Dispatch, Tensor};
use crate::kernels::embed::embed;
use crate::kernels::matmul::{matmul, MatmulDesc};
use crate::kernels::quant::{gather, gather_transposed};
use crate::kernels::Variant;
use crate::model::moe::ExpertMats;
use crate::model::weights::{Linear, Mat};

/// Shared resources for dequantize-and-multiply: row ids `0..n` and an f32 scratch.
pub struct Dequant {
    /// `[max_rows]` u32 holding `0, 1, 2, ...` (views select a chunk's rows).
    iota: Tensor,
    /// `[chunk elements]` f32.
    scratch: Tensor,
    /// Floats the scratch holds.
    capacity: usize,
}

/// Rows per dequantized chunk are a multiple of this (keeps id views aligned for binding).
const ROW_ALIGN: usize = 64;

impl Dequant {
    /// Resources for the linears in `layers` and the stacked experts `experts`, with at most
    /// `budget` floats of scratch (at least one aligned row block of the widest matrix).
    pub fn new<'a>(
        ctx: &Context,
        linears: impl Iterator<Item = &'a Linear>,
        experts: impl Iterator<Item = &'a ExpertMats>,
        budget: usize,
    ) -> Result<Dequant> {
        let (mut max_rows, mut need) = (ROW_ALIGN, ROW_ALIGN);
        for l in linears {
            for (_, m) in &l.parts {
                if let Mat::Quant(q) = m {
                    max_rows = max_rows.max(q.rows);
                    need = need.max(chunk_rows(q.rows, q.cols, budget) * q.cols);
                }
            }
        }
        for x in experts {
            need = need.max(chunk_rows(x.rows(), x.cols(), budget) * x.cols());
        }
        let iota: Vec<u32> = (0..max_rows.next_multiple_of(ROW_ALIGN) as u32).collect();
        Ok(Dequant {
            iota: Tensor::from_slice(ctx, &[iota.len()], DType::U32, &iota)?,
            scratch: Tensor::zeros(ctx, &[need], DType::F32)?,
            capacity: need,
        })
    }

    /// Device bytes held.
    pub fn bytes(&self) -> u64 {
        self.iota.bytes() + self.scratch.bytes()
    }
}

fn chunk_rows(rows: usize, cols: usize, budget: usize) -> usize {
    let fit = (budget / cols.max(1)) / ROW_ALIGN * ROW_ALIGN;
    fit.max(ROW_ALIGN).min(rows.next_multiple_of(ROW_ALIGN))
}

/// Where the output gradient is read and the input gradient written.
#[derive(Debug, Clone, Copy)]
pub struct GradRows {
    /// Token rows.
    pub m: usize,
    /// Row stride of `dy`.
    pub ld_dy: usize,
    /// First column of `dy` that belongs to this linear (fused q|k|v, gate|up).
    pub dy_off: usize,
    /// Row stride of `dx`.
    pub ld_dx: usize,
    /// Add into `dx` instead of overwriting it.
    pub accumulate: bool,
}

/// Dispatches of `dx[m][cols] (+)= dy[m][rows] . W` for the frozen linear `w`.
pub fn linear_backward(
    ctx: &Context,
    w: &Linear,
    dx: &Tensor,
    dy: &Tensor,
    r: GradRows,
    dq: &Dequant,
    variant: Variant,
) -> Result<Vec<Dispatch>> {
    let mut ops = Vec::new();
    let mut first = !r.accumulate;
    // `b` holds the block's rows as `[n][cols]` (b_kn), or transposed `[cols][n]`.
    let mut push = |ops: &mut Vec<Dispatch>,
                    b: &Tensor,
                    row0: usize,
                    n: usize,
                    transposed: bool|
     -> Result<()> {
        let mut d = MatmulDesc::new(r.m, w.cols, n).layout(false, !transposed);
        d.lda = r.ld_dy;
        d.off_a = r.dy_off + row0;
        d.ldc = r.ld_dx;
        d.ldb = if transposed { n } else { w.cols };
        d.accumulate = !first;
        first = false;
        let mut op = matmul(ctx, dx, dy, b, &d, variant)?;
        op.name = "frozen_dx";
        ops.push(op);
        Ok(())
    };
    for (off, mat) in &w.parts {
        match mat {
            Mat::Dense(d) => {
                for c in &d.chunks {
                    push(&mut ops, &c.t, off + c.row_start, c.rows, false)?;
                }
            }
            Mat::Quant(q) => {
                let step = chunk_rows(q.rows, q.cols, dq.capacity);
                if step * q.cols > dq.capacity {
                    return Err(Error::Internal(format!(
                        "dequantization scratch of {} floats for {step} rows of {}",
                        dq.capacity, q.cols
                    )));
                }
                let mut r0 = 0;
                while r0 < q.rows {
                    let n = step.min(q.rows - r0);
                    let ids = Tensor::view(
                        dq.iota.buffer().clone(),
                        dq.iota.offset() + 4 * r0 as u64,
                        &[n],
                        DType::U32,
                    )?;
                    for mut op in gather_transposed(ctx, &dq.scratch, &ids, q)? {
                        op.name = "dequant";
                        ops.push(op);
                    }
                    push(&mut ops, &dq.scratch, off + r0, n, true)?;
                    r0 += n;
                }
            }
        }
    }
    Ok(ops)
}

/// Which rows of an expert product: `m` activation rows, `x` rows `ldx` apart, `y` rows
/// `ldy` apart.
#[derive(Debug, Clone, Copy)]
pub struct ExpertRows {
    /// Activation rows.
    pub m: usize,
    /// Row stride of the input.
    pub ldx: usize,
    /// Row stride of the output.
    pub ldy: usize,
    /// Add into the output instead of overwriting it.
    pub accumulate: bool,
}

/// Dispatches of expert `e`'s product over every row, a chunk of its rows at a time
/// expanded to f32 in the scratch (any format: dense experts are copied, quantized ones
/// dequantized bit-exactly): forward `y (+)= x W_e^T`, or with `backward` the input
/// gradient `y (+)= x W_e` (`x` then the output gradient).
#[allow(clippy::too_many_arguments)]
pub fn expert_product(
    ctx: &Context,
    w: &ExpertMats,
    e: usize,
    y: &Tensor,
    x: &Tensor,
    r: ExpertRows,
    backward: bool,
    dq: &Dequant,
    variant: Variant,
) -> Result<Vec<Dispatch>> {
    let (rows, cols) = (w.rows(), w.cols());
    if e >= w.n_experts() {
        return Err(Error::Internal(format!("expert {e} of {}", w.n_experts())));
    }
    let step = chunk_rows(rows, cols, dq.capacity).min(rows);
    if step * cols > dq.capacity {
        return Err(Error::Internal(format!(
            "dequantization scratch of {} floats for {step} rows of {cols}",
            dq.capacity
        )));
    }
    let mut ops = Vec::new();
    let mut r0 = 0;
    while r0 < rows {
        let n = step.min(rows - r0);
        let base = (e * rows + r0) as u32;
        let ids: Vec<u32> = (base..base + n as u32).collect();
        let ids = Tensor::from_slice(ctx, &[n], DType::U32, &ids)?;
        let expand = match w {
            ExpertMats::Quant(q) => gather(ctx, &dq.scratch, &ids, &q.mat)?,
            ExpertMats::Dense(d) => embed(ctx, &dq.scratch, &ids, &d.mat)?,
        };
        ops.extend(expand.into_iter().map(|mut op| {
            op.name = "dequant";
            op
        }));
        // The scratch holds the chunk's rows `[n][cols]`.
        let accumulate = r.accumulate || r0 > 0;
        let mut op = if backward {
            let mut d = MatmulDesc::new(r.m, cols, n).layout(false, true);
            d.lda = r.ldx;
            d.off_a = r0;
            d.ldb = cols;
            d.ldc = r.ldy;
            d.accumulate = accumulate;
            matmul(ctx, y, x, &dq.scratch, &d, variant)?
        } else {
            let mut d = MatmulDesc::new(r.m, n, cols);
            d.lda = r.ldx;
            d.ldc = r.ldy;
            d.c_offset = r0;
            d.accumulate = r.accumulate;
            matmul(ctx, y, x, &dq.scratch, &d, variant)?
        };
        op.name = if backward { "expert_dx" } else { "expert_fwd" };
        ops.push(op);
        r0 += n;
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_close, ctx};
    use crate::model::weights::{HostMatrix, HostTensor};
    use crate::quant::{random_blocks, QuantType};
    use crate::util::Rng;

    fn host(name: &str, rows: usize, cols: usize, data: HostMatrix) -> HostTensor {
        HostTensor {
            name: name.into(),
            source: None,
            rows,
            cols,
            data,
        }
    }

    /// `dX = dY . W` through dense, half and quantized blocks of one fused linear, with a
    /// scratch small enough to force several chunks, against the f64 product of the
    /// dequantized weights.
    #[test]
    fn input_gradient_through_every_format_matches_the_dequantized_product() {
        let ctx = ctx();
        let (m, cols) = (5, 256);
        let mut rng = Rng::new(3);
        let half = |v: Vec<f32>| -> Vec<u16> {
            v.iter()
                .map(|&x| half::f16::from_f32(x).to_bits())
                .collect()
        };
        let q_rows = 200; // not a multiple of the chunk
        let parts = vec![
            host(
                "f32",
                3,
                cols,
                HostMatrix::F32(rng.vec(3 * cols, -1.0, 1.0)),
            ),
            host(
                "f16",
                4,
                cols,
                HostMatrix::F16(half(rng.vec(4 * cols, -1.0, 1.0))),
            ),
            host(
                "q4_k",
                q_rows,
                cols,
                HostMatrix::Quant(
                    QuantType::Q4_K,
                    random_blocks(QuantType::Q4_K, &mut rng, q_rows * cols / 256),
                ),
            ),
        ];
        let w_rows: usize = parts.iter().map(|p| p.rows).sum();
        let full: Vec<f32> = parts.iter().flat_map(|p| p.to_f32().unwrap()).collect();
        let lin = Linear::from_parts(ctx, parts, "mixed").unwrap();
        assert_eq!(lin.parts.len(), 3);
        // 64 rows per chunk: the quantized block takes 4 chunks.
        let dq = Dequant::new(ctx, std::iter::once(&lin), std::iter::empty(), 64 * cols).unwrap();
        let (ld_dy, dy_off) = (w_rows + 3, 2);
        let dy_h = rng.vec(m * ld_dy, -1.0, 1.0);
        let dy = Tensor::from_f32(ctx, &[m, ld_dy], &dy_h).unwrap();
        let dx0 = rng.vec(m * cols, -1.0, 1.0);
        for accumulate in [false, true] {
            let dx = Tensor::from_f32(ctx, &[m, cols], &dx0).unwrap();
            let r = GradRows {
                m,
                ld_dy,
                dy_off,
                ld_dx: cols,
                accumulate,
            };
            let ops = linear_backward(ctx, &lin, &dx, &dy, r, &dq, Variant::Auto).unwrap();
            assert!(ops.len() >= 2 + 2 * 4, "{} dispatches", ops.len());
            ctx.run(&ops).unwrap();
            let mut want = vec![0f32; m * cols];
            for i in 0..m {
                for k in 0..cols {
                    let mut s = if accumulate {
                        dx0[i * cols + k] as f64
                    } else {
                        0.0
                    };
                    for o in 0..w_rows {
                        s += dy_h[i * ld_dy + dy_off + o] as f64 * full[o * cols + k] as f64;
                    }
                    want[i * cols + k] = s as f32;
                }
            }
            assert_close("dX", &dx.read_f32(ctx).unwrap(), &want, 1e-4, 1e-4);
        }
    }

    /// One expert's forward and input-gradient products, in chunks of 64 rows, for f32,
    /// f16 and quantized stacked experts, against the f64 products of the dequantized rows.
    #[test]
    fn expert_products_in_every_format_match_the_dequantized_rows() {
        let ctx = ctx();
        let (m, n_experts, rows, cols) = (5, 3, 160, 256);
        let mut rng = Rng::new(9);
        let n = n_experts * rows;
        let half: Vec<u16> = rng
            .vec(n * cols, -1.0, 1.0)
            .iter()
            .map(|&x| half::f16::from_f32(x).to_bits())
            .collect();
        for data in [
            HostMatrix::F32(rng.vec(n * cols, -1.0, 1.0)),
            HostMatrix::F16(half),
            HostMatrix::Quant(
                QuantType::Q4_K,
                random_blocks(QuantType::Q4_K, &mut rng, n * cols / 256),
            ),
        ] {
            let t = host("experts", n, cols, data);
            let full = t.to_f32().unwrap();
            let w = ExpertMats::upload(ctx, &t, n_experts).unwrap();
            let dq = Dequant::new(ctx, std::iter::empty(), std::iter::once(&w), 64 * cols).unwrap();
            let e = 1;
            let row = |o: usize| &full[(e * rows + o) * cols..(e * rows + o + 1) * cols];
            // Forward: y[:, ..rows] = x W_e^T, into rows of stride rows + 4.
            let x_h = rng.vec(m * cols, -1.0, 1.0);
            let x = Tensor::from_f32(ctx, &[m, cols], &x_h).unwrap();
            let ldy = rows + 4;
            let y = Tensor::zeros(ctx, &[m, ldy], DType::F32).unwrap();
            let r = ExpertRows {
                m,
                ldx: cols,
                ldy,
                accumulate: false,
            };
            let ops = expert_product(ctx, &w, e, &y, &x, r, false, &dq, Variant::Auto).unwrap();
            assert_eq!(ops.len(), 2 * 3, "three chunks of 64, 64 and 32 rows");
            ctx.run(&ops).unwrap();
            let got = y.read_f32(ctx).unwrap();
            let mut want = vec![0f32; m * ldy];
            for i in 0..m {
                for o in 0..rows {
                    let s: f64 = (0..cols)
                        .map(|k| x_h[i * cols + k] as f64 * row(o)[k] as f64)
                        .sum();
                    want[i * ldy + o] = s as f32;
                }
            }
            assert_close("expert forward", &got, &want, 1e-4, 1e-4);
            // Backward: dx += dy W_e.
            let dy_h = rng.vec(m * rows, -1.0, 1.0);
            let dy = Tensor::from_f32(ctx, &[m, rows], &dy_h).unwrap();
            let dx0 = rng.vec(m * cols, -1.0, 1.0);
            let dx = Tensor::from_f32(ctx, &[m, cols], &dx0).unwrap();
            let r = ExpertRows {
                m,
                ldx: rows,
                ldy: cols,
                accumulate: true,
            };
            ctx.run(&expert_product(ctx, &w, e, &dx, &dy, r, true, &dq, Variant::Auto).unwrap())
                .unwrap();
            let mut want = dx0.clone();
            for i in 0..m {
                for k in 0..cols {
                    let s: f64 = (0..rows)
                        .map(|o| dy_h[i * rows + o] as f64 * row(o)[k] as f64)
                        .sum();
                    want[i * cols + k] += s as f32;
                }
            }
            assert_close("expert dx", &dx.read_f32(ctx).unwrap(), &want, 1e-4, 1e-4);
        }
    }
}
