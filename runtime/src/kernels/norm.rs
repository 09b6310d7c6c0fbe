//! RMSNorm and LayerNorm over rows (`shaders/norm.wgsl`).

use crate::error::{Error, Result};
use crate::gpu::{grid, Bind, Context, DType, Dispatch, PipelineKey, Tensor};
use crate::uniform;

uniform! {
    /// Uniform of `shaders/norm.wgsl`.
    pub struct NormParams {
        rows: u32,
        cols: u32,
        ld_x: u32,
        ld_out: u32,
        eps: f32,
        x_off: u32,
        out_off: u32,
        heads: u32,
    }
}

/// Which normalization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `x / sqrt(mean(x^2) + eps) * w` (Llama family).
    Rms,
    /// `(x - mean) / sqrt(var + eps) * w + b`.
    Layer,
}

/// Rows, strides and offsets of a normalization.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormDesc {
    /// RMSNorm or LayerNorm.
    pub kind: NormKind,
    /// Rows normalized.
    pub rows: usize,
    /// Values per row.
    pub cols: usize,
    /// Epsilon added to the variance.
    pub eps: f32,
    /// Row stride of x (elements).
    pub ld_x: usize,
    /// Row stride of out.
    pub ld_out: usize,
    /// First element of x.
    pub x_off: usize,
    /// First element of out.
    pub out_off: usize,
    /// Segments per strided row: rows come in groups of `heads` consecutive `cols`-wide
    /// segments (per-head norms); 1 for plain rows.
    pub heads: usize,
}

impl NormDesc {
    /// Packed rows.
    pub fn new(kind: NormKind, rows: usize, cols: usize, eps: f32) -> Self {
        NormDesc {
            kind,
            rows,
            cols,
            eps,
            ld_x: cols,
            ld_out: cols,
            x_off: 0,
            out_off: 0,
            heads: 1,
        }
    }
}

/// Normalizes each of `rows` rows of `x` (`[rows][cols]`) into `out`, scaled by `weight`
/// (`[cols]`, optional) and shifted by `bias` (`[cols]`, LayerNorm only).
pub fn norm(
    ctx: &Context,
    kind: NormKind,
    out: &Tensor,
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<Dispatch> {
    norm_with(
        ctx,
        out,
        x,
        weight,
        bias,
        &NormDesc::new(kind, rows, cols, eps),
    )
}

/// [`norm`] with explicit strides and offsets (`x` and `out` must not share a buffer).
pub fn norm_with(
    ctx: &Context,
    out: &Tensor,
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    d: &NormDesc,
) -> Result<Dispatch> {
    norm_impl(ctx, out, x, weight, bias, d, false)
}

/// RMSNorm of `t`'s rows where they are (`d.x_off == d.out_off`, `d.ld_x == d.ld_out`),
/// scaled by `weight`: the q/k norms of OLMoE and Qwen3 on the fused q|k|v rows.
pub fn rms_norm_in_place(
    ctx: &Context,
    t: &Tensor,
    weight: &Tensor,
    d: &NormDesc,
) -> Result<Dispatch> {
    if d.kind != NormKind::Rms || d.x_off != d.out_off || d.ld_x != d.ld_out {
        return Err(Error::InvalidArgument(format!(
            "an in-place norm reads and writes the same rows: {d:?}"
        )));
    }
    // x is unused in place: bind the weight there (a different buffer than t).
    norm_impl(ctx, t, weight, Some(weight), None, d, true)
}

fn norm_impl(
    ctx: &Context,
    out: &Tensor,
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    d: &NormDesc,
    in_place: bool,
) -> Result<Dispatch> {
    let (rows, cols, kind) = (d.rows, d.cols, d.kind);
    let fits = |t: &Tensor, n: usize| t.dtype() == DType::F32 && t.numel() >= n;
    let heads = d.heads.max(1);
    let need = |off: usize, ld: usize| {
        let last = rows.saturating_sub(1);
        off + (last / heads) * ld + (last % heads) * cols + cols
    };
    let x_need = if in_place { 0 } else { need(d.x_off, d.ld_x) };
    if rows == 0
        || cols == 0
        || d.ld_x < cols * heads
        || d.ld_out < cols * heads
        || rows % heads != 0
        || !fits(x, x_need)
        || !fits(out, need(d.out_off, d.ld_out))
    {
        return Err(Error::shape(
            "norm",
            format!("x {:?} / out {:?} for {d:?}", x.shape(), out.shape()),
        ));
    }
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if let Some(t) = t {
            if !fits(t, cols) {
                return Err(Error::shape(
                    "norm",
                    format!("{name} {:?} for {cols} columns", t.shape()),
                ));
            }
        }
    }
    if bias.is_some() && kind == NormKind::Rms {
        return Err(Error::InvalidArgument("RMSNorm takes no bias".into()));
    }
    let wg = if cols >= 1024 { 256 } else { 64 };
    let key = key(
        kind == NormKind::Layer,
        weight.is_some(),
        bias.is_some(),
        wg,
    )
    .constant("IN_PLACE", in_place as u32 as f64);
    let u = ctx.uniform(&NormParams {
        rows: rows as u32,
        cols: cols as u32,
        ld_x: d.ld_x as u32,
        ld_out: d.ld_out as u32,
        eps: d.eps,
        x_off: d.x_off as u32,
        out_off: d.out_off as u32,
        heads: heads as u32,
    });
    ctx.dispatch(
        "norm",
        &key,
        &[
            Bind::U(&u),
            Bind::T(x),
            // Unused slots still exist in the layout: bind x there (read-only aliasing).
            Bind::T(weight.unwrap_or(x)),
            Bind::T(bias.unwrap_or(x)),
            Bind::T(out),
        ],
        grid(ctx, rows as u32)?,
    )
}

fn key(layer: bool, weight: bool, bias: bool, wg: u32) -> PipelineKey {
    PipelineKey::new("norm", "norm")
        .constant("LAYER", layer as u32 as f64)
        .constant("HAS_WEIGHT", weight as u32 as f64)
        .constant("HAS_BIAS", bias as u32 as f64)
        .constant("WG", wg as f64)
}

/// Every specialization (for the portability test).
#[cfg(test)]
pub(crate) fn keys() -> Vec<PipelineKey> {
    let mut v = Vec::new();
    for bits in 0..8u32 {
        for wg in [64, 256] {
            v.push(key(bits & 1 != 0, bits & 2 != 0, bits & 4 != 0, wg));
            if bits == 2 {
                v.push(key(false, true, false, wg).constant("IN_PLACE", 1.0));
            }
        }
    }
    v
}

/// CPU reference (f64 statistics).
pub fn norm_ref(
    kind: NormKind,
    x: &[f32],
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    cols: usize,
    eps: f32,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(cols) {
        let n = cols as f64;
        let mean = if kind == NormKind::Layer {
            row.iter().map(|&v| v as f64).sum::<f64>() / n
        } else {
            0.0
        };
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let scale = 1.0 / (var + eps as f64).sqrt();
        for (c, &v) in row.iter().enumerate() {
            let mut y = (v as f64 - mean) * scale;
            if let Some(w) = weight {
                y *= w[c] as f64;
            }
            if let Some(b) = bias {
                y += b[c] as f64;
            }
            out.push(y as f32);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_close, ctx};
    use crate::util::Rng;

    #[test]
    fn rms_and_layer_norm_match_reference() {
        let ctx = ctx();
        let mut rng = Rng::new(11);
        for &(rows, cols) in &[
            (1, 1),
            (3, 17),
            (5, 63),
            (2, 65),
            (4, 1000),
            (17, 576),
            (1, 2049),
        ] {
            for kind in [NormKind::Rms, NormKind::Layer] {
                for with_weight in [true, false] {
                    let xv: Vec<f32> = (0..rows * cols)
                        .map(|_| rng.range(-3.0, 3.0) + 0.5)
                        .collect();
                    let wv = rng.vec(cols, 0.5, 1.5);
                    let bv = rng.vec(cols, -1.0, 1.0);
                    let x = Tensor::from_f32(ctx, &[rows, cols], &xv).unwrap();
                    let w = Tensor::from_f32(ctx, &[cols], &wv).unwrap();
                    let b = Tensor::from_f32(ctx, &[cols], &bv).unwrap();
                    let out = Tensor::zeros(ctx, &[rows, cols], DType::F32).unwrap();
                    let bias = (kind == NormKind::Layer && with_weight).then_some(&b);
                    let op = norm(
                        ctx,
                        kind,
                        &out,
                        &x,
                        with_weight.then_some(&w),
                        bias,
                        rows,
                        cols,
                        1e-5,
                    )
                    .unwrap();
                    ctx.run(&[op]).unwrap();
                    let want = norm_ref(
                        kind,
                        &xv,
                        with_weight.then_some(&wv[..]),
                        bias.map(|_| &bv[..]),
                        cols,
                        1e-5,
                    );
                    assert_close(
                        &format!("{kind:?} {rows}x{cols} w={with_weight}"),
                        &out.read_f32(ctx).unwrap(),
                        &want,
                        2e-6,
                        2e-6,
                    );
                }
            }
        }
    }

    #[test]
    fn strided_rows_with_offsets() {
        // The last row of a [3][10] buffer into the middle of a [2][12] one.
        let ctx = ctx();
        let xv = Rng::new(4).vec(30, -2.0, 2.0);
        let x = Tensor::from_f32(ctx, &[30], &xv).unwrap();
        let out = Tensor::zeros(ctx, &[24], DType::F32).unwrap();
        let mut d = NormDesc::new(NormKind::Rms, 1, 10, 1e-6);
        d.x_off = 20;
        d.out_off = 13;
        ctx.run(&[norm_with(ctx, &out, &x, None, None, &d).unwrap()])
            .unwrap();
        let got = out.read_f32(ctx).unwrap();
        let want = norm_ref(NormKind::Rms, &xv[20..30], None, None, 10, 1e-6);
        assert_close("offset row", &got[13..23], &want, 1e-6, 1e-6);
        assert!(got[..13].iter().chain(&got[23..]).all(|&v| v == 0.0));
        d.x_off = 21;
        assert!(norm_with(ctx, &out, &x, None, None, &d).is_err());
    }

    #[test]
    fn rejects_bad_shapes() {
        let ctx = ctx();
        let x = Tensor::zeros(ctx, &[2, 8], DType::F32).unwrap();
        let w = Tensor::zeros(ctx, &[4], DType::F32).unwrap();
        let e = norm(ctx, NormKind::Rms, &x, &x, Some(&w), None, 2, 8, 1e-5).unwrap_err();
        assert!(e.to_string().contains("weight"), "{e}");
        assert!(norm(ctx, NormKind::Rms, &x, &x, None, None, 3, 8, 1e-5).is_err());
    }

    /// q/k norms on fused q|k|v rows, in place: over all heads of q (OLMoE) and per head
    /// (Qwen3), leaving the other columns alone.
    #[test]
    fn in_place_norms_over_strided_heads() {
        let ctx = ctx();
        let mut rng = Rng::new(5);
        let (m, heads, hd, ld) = (3, 4, 16, 4 * 16 + 2 * 32 + 8);
        let xv = rng.vec(m * ld, -2.0, 2.0);
        let t = Tensor::from_f32(ctx, &[m, ld], &xv).unwrap();
        for per_head in [false, true] {
            t.write(ctx, &xv).unwrap();
            let cols = if per_head { hd } else { heads * hd };
            let wv = rng.vec(cols, 0.5, 1.5);
            let w = Tensor::from_f32(ctx, &[cols], &wv).unwrap();
            let mut d = NormDesc::new(NormKind::Rms, m, cols, 1e-5);
            d.ld_x = ld;
            d.ld_out = ld;
            d.x_off = 2;
            d.out_off = 2;
            if per_head {
                d.rows = m * heads;
                d.heads = heads;
            }
            ctx.run(&[rms_norm_in_place(ctx, &t, &w, &d).unwrap()])
                .unwrap();
            let got = t.read_f32(ctx).unwrap();
            let mut want = xv.clone();
            for r in 0..m {
                let span = &mut want[r * ld + 2..r * ld + 2 + heads * hd];
                let normed: Vec<f32> = span
                    .chunks(cols)
                    .flat_map(|c| norm_ref(NormKind::Rms, c, Some(&wv), None, cols, 1e-5))
                    .collect();
                span.copy_from_slice(&normed);
            }
            assert_close(&format!("per_head={per_head}"), &got, &want, 1e-5, 1e-5);
        }
        let mut bad = NormDesc::new(NormKind::Rms, 1, 8, 1e-5);
        bad.out_off = 1;
        let w = Tensor::from_f32(ctx, &[8], &[1.0; 8]).unwrap();
        assert!(rms_norm_in_place(ctx, &t, &w, &bad).is_err());
    }
}
