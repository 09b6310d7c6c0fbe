//! A quick run of every kernel family on random data against its CPU reference, on the
//! device at hand (`ember selfcheck`): the first thing to run on a new GPU or driver.

use serde::Serialize;

use crate::error::Result;
use crate::gpu::{blocking, Context, DType, Tensor};
use crate::kernels::attention::{attention_decode, attention_prefill, attention_ref, AttnLayout};
use crate::kernels::elementwise::{swiglu, UnaryOp};
use crate::kernels::matmul::{matmul, matmul_ref, MatmulDesc};
use crate::kernels::norm::{norm, norm_ref, NormKind};
use crate::kernels::quant::{qmatmul, QMatmulDesc, QMatrix, QShape};
use crate::kernels::rope::{rope, rope_ref, HeadLayout, RopeConfig, RopeTable};
use crate::kernels::sample::{argmax, sample, sample_ref, RowParams};
use crate::kernels::softmax::{softmax, softmax_ref};
use crate::kernels::Variant;
use crate::quant::{dequantize, random_blocks, repack, QuantType};
use crate::util::Rng;

/// One comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What ran (kernel and shape).
    pub kernel: String,
    /// Variant (`subgroup`, `tiled` or `-`).
    pub variant: String,
    /// Largest absolute difference from the reference.
    pub max_error: f32,
    /// Allowed absolute difference.
    pub tolerance: f32,
    /// Within tolerance.
    pub ok: bool,
}

/// All comparisons on one device.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Adapter name.
    pub device: String,
    /// Backend.
    pub backend: String,
    /// The comparisons.
    pub checks: Vec<Check>,
}

fn push(out: &mut Vec<Check>, kernel: String, variant: &str, got: &[f32], want: &[f32], tol: f32) {
    let err = if got.len() == want.len() {
        got.iter()
            .zip(want)
            .map(|(a, b)| {
                if a.is_finite() {
                    (a - b).abs()
                } else {
                    f32::INFINITY
                }
            })
            .fold(0.0, f32::max)
    } else {
        f32::INFINITY
    };
    out.push(Check {
        kernel,
        variant: variant.into(),
        max_error: err,
        tolerance: tol,
        ok: err <= tol,
    });
}

/// Token ids read back as f32, to compare through [`push`].
async fn ids_as_f32(ctx: &Context, ids: &Tensor) -> Result<Vec<f32>> {
    let ids = ids.read_u32_async(ctx).await?;
    Ok(ids.iter().map(|&i| i as f32).collect())
}

/// Runs the checks.
pub fn run(ctx: &Context) -> Result<Report> {
    blocking("selfcheck::run", run_async(ctx))
}

/// [`run`], awaiting the device (the form the browser needs).
pub async fn run_async(ctx: &Context) -> Result<Report> {
    let mut rng = Rng::new(2024);
    let mut out = Vec::new();
    for variant in Variant::all(ctx) {
        let vname = format!("{variant:?}").to_lowercase();
        // Dense matmul, f32 and f16 weights.
        let (m, n, k) = (67, 129, 200);
        let av = rng.vec(m * k, -1.0, 1.0);
        let mut bv = rng.vec(n * k, -1.0, 1.0);
        for f16 in [false, true] {
            if f16 {
                bv.iter_mut()
                    .for_each(|x| *x = half::f16::from_f32(*x).to_f32());
            }
            let a = Tensor::from_f32(ctx, &[m, k], &av)?;
            let b = if f16 {
                Tensor::from_f32_as_f16(ctx, &[n, k], &bv)?
            } else {
                Tensor::from_f32(ctx, &[n, k], &bv)?
            };
            let c = Tensor::zeros(ctx, &[m, n], DType::F32)?;
            let d = MatmulDesc::new(m, n, k);
            ctx.run(&[matmul(ctx, &c, &a, &b, &d, variant)?])?;
            let mut want = vec![0.0; m * n];
            matmul_ref(&av, &bv, &mut want, &d);
            let name = format!("matmul {m}x{n}x{k} {}", if f16 { "f16" } else { "f32" });
            push(
                &mut out,
                name,
                &vname,
                &c.read_f32_async(ctx).await?,
                &want,
                1e-4,
            );
        }
        // Quantized products, decode and prefill shapes.
        for ty in QuantType::ALL {
            let (n, k) = (65, 2 * ty.block_elems());
            let raw = random_blocks(ty, &mut rng, n * k / ty.block_elems());
            let w = QMatrix::upload(ctx, &repack(ty, n, k, &raw)?)?;
            let wf = dequantize(ty, &raw)?;
            for (m, shape) in [(1, QShape::Vector), (9, QShape::Matrix)] {
                let xv = rng.vec(m * k, -1.0, 1.0);
                let x = Tensor::from_f32(ctx, &[m, k], &xv)?;
                let y = Tensor::zeros(ctx, &[m, n], DType::F32)?;
                ctx.run(&qmatmul(
                    ctx,
                    &y,
                    &x,
                    &w,
                    &QMatmulDesc::new(m, &w),
                    variant,
                    shape,
                )?)?;
                let mut want = vec![0.0; m * n];
                matmul_ref(&xv, &wf, &mut want, &MatmulDesc::new(m, n, k));
                let name = format!("{} {m}x{n}x{k}", ty.name());
                push(
                    &mut out,
                    name,
                    &vname,
                    &y.read_f32_async(ctx).await?,
                    &want,
                    2e-4,
                );
            }
        }
        // Prefill attention through the matmul kernels.
        let l = AttnLayout::packed(9, 3, 64);
        let (t, first) = (12, 4);
        let kv = first + t;
        let qv = rng.vec(t * l.q_ld, -1.0, 1.0);
        let kvv = rng.vec(kv * l.kv_ld, -1.0, 1.0);
        let vvv = rng.vec(kv * l.kv_ld, -1.0, 1.0);
        let q = Tensor::from_f32(ctx, &[t, l.q_ld], &qv)?;
        let kt = Tensor::from_f32(ctx, &[kv, l.kv_ld], &kvv)?;
        let vt = Tensor::from_f32(ctx, &[kv, l.kv_ld], &vvv)?;
        let lens: Vec<u32> = (0..t).map(|i| (first + i + 1) as u32).collect();
        let lt = Tensor::from_slice(ctx, &[t], DType::U32, &lens)?;
        let s = Tensor::zeros(
            ctx,
            &[crate::kernels::attention::prefill_scores_len(9, t, kv)],
            DType::F32,
        )?;
        let o = Tensor::zeros(ctx, &[t, l.o_ld], DType::F32)?;
        ctx.run(&attention_prefill(
            ctx, &o, &q, &kt, &vt, &s, &lt, t, 0, kv, &l, 0.125, variant,
        )?)?;
        let ranges: Vec<(usize, usize)> = lens.iter().map(|&n| (0, n as usize)).collect();
        let mut want = vec![0.0; t * l.o_ld];
        attention_ref(&mut want, &qv, &kvv, &vvv, &ranges, &l, 0.125);
        push(
            &mut out,
            "attention prefill 9:3 heads".into(),
            &vname,
            &o.read_f32_async(ctx).await?,
            &want,
            1e-5,
        );
        // Decode attention over the same cache.
        let mv: Vec<u32> = ranges
            .iter()
            .flat_map(|&(b, n)| [b as u32, n as u32])
            .collect();
        let meta = Tensor::from_slice(ctx, &[t, 2], DType::U32, &mv)?;
        ctx.run(&[attention_decode(
            ctx, &o, &q, &kt, &vt, &meta, t, &l, 0.125,
        )?])?;
        push(
            &mut out,
            "attention decode 9:3 heads".into(),
            &vname,
            &o.read_f32_async(ctx).await?,
            &want,
            1e-5,
        );
    }
    // Kernels without variants.
    let (rows, cols) = (7, 576);
    let xv = rng.vec(rows * cols, -3.0, 3.0);
    let wv = rng.vec(cols, 0.5, 1.5);
    let x = Tensor::from_f32(ctx, &[rows, cols], &xv)?;
    let w = Tensor::from_f32(ctx, &[cols], &wv)?;
    let y = Tensor::zeros(ctx, &[rows, cols], DType::F32)?;
    ctx.run(&[norm(
        ctx,
        NormKind::Rms,
        &y,
        &x,
        Some(&w),
        None,
        rows,
        cols,
        1e-5,
    )?])?;
    let want = norm_ref(NormKind::Rms, &xv, Some(&wv), None, cols, 1e-5);
    push(
        &mut out,
        "rmsnorm 7x576".into(),
        "-",
        &y.read_f32_async(ctx).await?,
        &want,
        1e-5,
    );

    let cfg = RopeConfig::new(64, 100000.0, true);
    let table = RopeTable::new(ctx, cfg, 512)?;
    let hl = HeadLayout {
        tokens: 5,
        heads: 9,
        head_dim: 64,
        ld: 576,
        offset: 0,
    };
    let pos: Vec<u32> = vec![0, 1, 100, 300, 511];
    let pt = Tensor::from_slice(ctx, &[5], DType::U32, &pos)?;
    let xv = rng.vec(5 * 576, -1.0, 1.0);
    let x = Tensor::from_f32(ctx, &[5, 576], &xv)?;
    ctx.run(&[rope(ctx, &x, &pt, &table, hl, false)?])?;
    let mut want = xv.clone();
    rope_ref(&mut want, &pos, &cfg, hl, false);
    push(
        &mut out,
        "rope neox 5x9x64".into(),
        "-",
        &x.read_f32_async(ctx).await?,
        &want,
        1e-5,
    );

    let xv = rng.vec(3 * 1000, -10.0, 10.0);
    let x = Tensor::from_f32(ctx, &[3, 1000], &xv)?;
    ctx.run(&[softmax(ctx, &x, 3, 1000, 1.0)?])?;
    push(
        &mut out,
        "softmax 3x1000".into(),
        "-",
        &x.read_f32_async(ctx).await?,
        &softmax_ref(&xv, 1000, 1.0),
        1e-6,
    );

    let gu = rng.vec(4 * 2 * 1536, -4.0, 4.0);
    let g = Tensor::from_f32(ctx, &[4, 3072], &gu)?;
    let y = Tensor::zeros(ctx, &[4, 1536], DType::F32)?;
    ctx.run(&[swiglu(ctx, &y, &g, None, 4, 1536)?])?;
    let want: Vec<f32> = (0..4)
        .flat_map(|r| {
            let row = &gu[r * 3072..(r + 1) * 3072];
            (0..1536).map(move |j| UnaryOp::Silu.apply(row[j]) * row[1536 + j])
        })
        .collect();
    push(
        &mut out,
        "swiglu 4x1536".into(),
        "-",
        &y.read_f32_async(ctx).await?,
        &want,
        1e-4,
    );

    let vocab = 49152;
    let lv = rng.vec(2 * vocab, -8.0, 8.0);
    let logits = Tensor::from_f32(ctx, &[2, vocab], &lv)?;
    let ids = Tensor::zeros(ctx, &[2], DType::U32)?;
    ctx.run(&[argmax(ctx, &ids, &logits, 2, vocab, vocab)?])?;
    let got = ids_as_f32(ctx, &ids).await?;
    let rp = RowParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.9,
        u: 0.37,
        penalty: 1.0,
        ..Default::default()
    };
    let want: Vec<f32> = (0..2)
        .map(|r| {
            let row = &lv[r * vocab..(r + 1) * vocab];
            sample_ref(
                row,
                &RowParams {
                    temperature: 0.0,
                    ..rp
                },
            ) as f32
        })
        .collect();
    push(&mut out, "argmax 2x49152".into(), "-", &got, &want, 0.0);
    let params = Tensor::from_slice(
        ctx,
        &[16],
        DType::U32,
        bytemuck::cast_slice::<_, u32>(&[rp, rp]),
    )?;
    ctx.run(&[sample(ctx, &ids, &logits, &params, 2, vocab, vocab)?])?;
    let got = ids_as_f32(ctx, &ids).await?;
    let want: Vec<f32> = (0..2)
        .map(|r| sample_ref(&lv[r * vocab..(r + 1) * vocab], &rp) as f32)
        .collect();
    push(
        &mut out,
        "sample top-k/top-p 2x49152".into(),
        "-",
        &got,
        &want,
        0.0,
    );

    Ok(Report {
        device: ctx.info().name.clone(),
        backend: ctx.info().backend.clone(),
        checks: out,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn selfcheck_passes_here() {
        let r = super::run(crate::kernels::testing::ctx()).unwrap();
        let bad: Vec<_> = r.checks.iter().filter(|c| !c.ok).collect();
        assert!(bad.is_empty(), "{bad:#?}");
        assert!(r.checks.len() > 20);
    }
}
