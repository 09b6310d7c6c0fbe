//! Row softmax, in place (`shaders/softmax.wgsl`).

use crate::error::{Error, Result};
use crate::gpu::{grid, Bind, Context, DType, Dispatch, PipelineKey, Tensor};
use crate::uniform;

uniform! {
    /// Uniform of `shaders/softmax.wgsl`.
    pub struct SoftmaxParams {
        rows: u32,
        cols: u32,
        scale: f32,
        _pad: u32,
    }
}

/// `x[r] = softmax(scale * x[r])` for each of `rows` rows of `cols` values.
pub fn softmax(
    ctx: &Context,
    x: &Tensor,
    rows: usize,
    cols: usize,
    scale: f32,
) -> Result<Dispatch> {
    if rows == 0 || cols == 0 || x.dtype() != DType::F32 || x.numel() < rows * cols {
        return Err(Error::shape(
            "softmax",
            format!("x {:?} for {rows}x{cols}", x.shape()),
        ));
    }
    let wg = if cols >= 2048 { 256 } else { 64 };
    let key = PipelineKey::new("softmax", "softmax").constant("WG", wg as f64);
    let u = ctx.uniform(&SoftmaxParams {
        rows: rows as u32,
        cols: cols as u32,
        scale,
        _pad: 0,
    });
    ctx.dispatch(
        "softmax",
        &key,
        &[Bind::U(&u), Bind::T(x)],
        grid(ctx, rows as u32)?,
    )
}

/// Every specialization (for the portability test).
#[cfg(test)]
pub(crate) fn keys() -> Vec<PipelineKey> {
    [64, 256]
        .iter()
        .map(|&wg| PipelineKey::new("softmax", "softmax").constant("WG", wg as f64))
        .collect()
}

/// CPU reference (f64).
pub fn softmax_ref(x: &[f32], cols: usize, scale: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(cols) {
        let m = row
            .iter()
            .map(|&v| scale as f64 * v as f64)
            .fold(f64::MIN, f64::max);
        let e: Vec<f64> = row
            .iter()
            .map(|&v| (scale as f64 * v as f64 - m).exp())
            .collect();
        let s: f64 = e.iter().sum();
        out.extend(e.iter().map(|v| (v / s) as f32));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_close, ctx};
    use crate::util::Rng;

    #[test]
    fn matches_reference() {
        let ctx = ctx();
        let mut rng = Rng::new(3);
        for &(rows, cols, scale) in &[
            (1, 1, 1.0),
            (3, 17, 0.5),
            (2, 1000, 1.0),
            (5, 49152, 1.0),
            (65, 63, 8.0),
        ] {
            let xv = rng.vec(rows * cols, -20.0, 20.0);
            let x = Tensor::from_f32(ctx, &[rows, cols], &xv).unwrap();
            ctx.run(&[softmax(ctx, &x, rows, cols, scale).unwrap()])
                .unwrap();
            assert_close(
                &format!("{rows}x{cols}"),
                &x.read_f32(ctx).unwrap(),
                &softmax_ref(&xv, cols, scale),
                1e-7,
                1e-5,
            );
        }
    }
}
