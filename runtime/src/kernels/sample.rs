//! Token selection on the GPU (`shaders/sample.wgsl`): temperature / top-k / top-p / min-p
//! sampling with a CPU-drawn uniform number per row, repetition penalties, argmax, and the
//! per-row negative log-likelihood used by perplexity. Only ids (or two floats per row)
//! come back to the host.

use crate::error::{Error, Result};
use crate::gpu::{Bind, Context, DType, Dispatch, PipelineKey, Tensor};
use crate::uniform;

uniform! {
    /// Uniform of `shaders/sample.wgsl`.
    pub struct SampleParams {
        rows: u32,
        vocab: u32,
        ld: u32,
        _pad: u32,
    }
}

uniform! {
    /// Per-row sampling settings (a storage array of these, one per logits row).
    pub struct RowParams {
        temperature: f32,
        top_k: u32,
        top_p: f32,
        min_p: f32,
        u: f32,
        penalty: f32,
        n_penalty: u32,
        penalty_off: u32,
    }
}

/// Most candidates the sampler considers (top-k is capped here; with top-k off, top-p and
/// min-p act on the 1024 most likely tokens).
pub const MAX_CANDIDATES: usize = 1024;

fn check_logits(
    op: &'static str,
    logits: &Tensor,
    rows: usize,
    vocab: usize,
    ld: usize,
) -> Result<()> {
    if rows == 0 || rows > 65535 || vocab == 0 || ld < vocab || logits.dtype() != DType::F32 {
        return Err(Error::shape(
            op,
            format!("{rows} rows of {vocab} (ld {ld})"),
        ));
    }
    if logits.numel() < (rows - 1) * ld + vocab {
        return Err(Error::shape(
            op,
            format!("logits {:?} for {rows}x{vocab}", logits.shape()),
        ));
    }
    Ok(())
}

fn params(ctx: &Context, rows: usize, vocab: usize, ld: usize) -> wgpu::Buffer {
    ctx.uniform(&SampleParams {
        rows: rows as u32,
        vocab: vocab as u32,
        ld: ld as u32,
        _pad: 0,
    })
}

/// Samples one id per row into `out` (`[rows]` u32) with `row_params` (`[rows]` of
/// [`RowParams`], as u32 words). `logits` are read only.
pub fn sample(
    ctx: &Context,
    out: &Tensor,
    logits: &Tensor,
    row_params: &Tensor,
    rows: usize,
    vocab: usize,
    ld: usize,
) -> Result<Dispatch> {
    check_logits("sample", logits, rows, vocab, ld)?;
    if out.dtype() != DType::U32 || out.numel() < rows || row_params.numel() < rows * 8 {
        return Err(Error::shape(
            "sample",
            format!("out {:?} / params {:?}", out.shape(), row_params.shape()),
        ));
    }
    let u = params(ctx, rows, vocab, ld);
    ctx.dispatch(
        "sample",
        &PipelineKey::new("sample", "sample"),
        &[
            Bind::U(&u),
            Bind::T(logits),
            Bind::T(row_params),
            Bind::T(out),
        ],
        [rows as u32, 1, 1],
    )
}

/// Applies each row's repetition penalty to the distinct token ids
/// `penalty_ids[penalty_off .. penalty_off + n_penalty]`, in place.
pub fn penalize(
    ctx: &Context,
    logits: &Tensor,
    row_params: &Tensor,
    penalty_ids: &Tensor,
    rows: usize,
    vocab: usize,
    ld: usize,
) -> Result<Dispatch> {
    check_logits("penalize", logits, rows, vocab, ld)?;
    let u = params(ctx, rows, vocab, ld);
    ctx.dispatch(
        "penalize",
        &PipelineKey::new("sample", "penalize"),
        &[
            Bind::U(&u),
            Bind::T(logits),
            Bind::T(row_params),
            Bind::Skip,
            Bind::T(penalty_ids),
        ],
        [rows as u32, 1, 1],
    )
}

/// `out[r]` = first index of the largest logit of row `r`.
pub fn argmax(
    ctx: &Context,
    out: &Tensor,
    logits: &Tensor,
    rows: usize,
    vocab: usize,
    ld: usize,
) -> Result<Dispatch> {
    check_logits("argmax", logits, rows, vocab, ld)?;
    if out.dtype() != DType::U32 || out.numel() < rows {
        return Err(Error::shape(
            "argmax",
            format!("out {:?} for {rows} rows", out.shape()),
        ));
    }
    let u = params(ctx, rows, vocab, ld);
    ctx.dispatch(
        "argmax",
        &PipelineKey::new("sample", "argmax"),
        &[Bind::U(&u), Bind::T(logits), Bind::Skip, Bind::T(out)],
        [rows as u32, 1, 1],
    )
}

/// `out[r] = (-log softmax(logits[r])[targets[r]], argmax as f32 bits)`; `out` is
/// `[rows][2]` f32.
pub fn nll(
    ctx: &Context,
    out: &Tensor,
    logits: &Tensor,
    targets: &Tensor,
    rows: usize,
    vocab: usize,
    ld: usize,
) -> Result<Dispatch> {
    check_logits("nll", logits, rows, vocab, ld)?;
    if out.numel() < 2 * rows || targets.dtype() != DType::U32 || targets.numel() < rows {
        return Err(Error::shape(
            "nll",
            format!("out {:?} / targets {:?}", out.shape(), targets.shape()),
        ));
    }
    let u = params(ctx, rows, vocab, ld);
    ctx.dispatch(
        "nll",
        &PipelineKey::new("sample", "nll"),
        &[
            Bind::U(&u),
            Bind::T(logits),
            Bind::Skip,
            Bind::Skip,
            Bind::Skip,
            Bind::T(targets),
            Bind::T(out),
        ],
        [rows as u32, 1, 1],
    )
}

/// Every specialization (for the portability test).
#[cfg(test)]
pub(crate) fn keys() -> Vec<PipelineKey> {
    ["sample", "penalize", "argmax", "nll"]
        .iter()
        .map(|e| PipelineKey::new("sample", e))
        .collect()
}

/// CPU reference of [`sample`] for one row (same candidate order and f32 sums).
pub fn sample_ref(logits: &[f32], rp: &RowParams) -> u32 {
    let greedy = rp.temperature <= 0.0;
    let inv_t = if greedy { 1.0 } else { 1.0 / rp.temperature };
    let mut k = MAX_CANDIDATES;
    if rp.top_k > 0 {
        k = k.min(rp.top_k as usize);
    }
    if greedy {
        k = 1;
    }
    let k = k.min(logits.len());
    let mut c: Vec<(f32, u32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let v = x * inv_t;
            (if v.is_nan() { f32::MIN } else { v }, i as u32)
        })
        .collect();
    c.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    c.truncate(k);
    if greedy {
        return c[0].1;
    }
    let top = c[0].0;
    let e: Vec<f32> = c.iter().map(|(v, _)| (v - top).exp()).collect();
    let total: f32 = e.iter().sum();
    let mut keep = k;
    if rp.top_p < 1.0 {
        let mut cum = 0.0;
        for (i, x) in e.iter().enumerate() {
            cum += x;
            if cum >= rp.top_p * total {
                keep = i + 1;
                break;
            }
        }
    }
    if rp.min_p > 0.0 {
        let mut i = 1;
        while i < keep && e[i] >= rp.min_p {
            i += 1;
        }
        keep = i;
    }
    let kept: f32 = e[..keep].iter().sum();
    let target = rp.u * kept;
    let mut cum = 0.0;
    for i in 0..keep {
        cum += e[i];
        if cum > target {
            return c[i].1;
        }
    }
    c[keep - 1].1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::ctx;
    use crate::util::Rng;

    #[test]
    fn sampling_matches_reference() {
        let ctx = ctx();
        let mut rng = Rng::new(77);
        for &vocab in &[1usize, 3, 17, 1000, 49152] {
            let settings = [
                (0.0, 0, 1.0, 0.0),
                (1.0, 0, 1.0, 0.0),
                (0.7, 40, 0.9, 0.0),
                (1.3, 5, 1.0, 0.0),
                (1.0, 0, 0.5, 0.05),
                (0.5, 2000, 0.95, 0.1),
            ];
            let rows = settings.len();
            let mut lv = rng.vec(rows * vocab, -6.0, 6.0);
            // Ties, so the id order rule matters.
            if vocab > 10 {
                lv[5] = lv[9];
                lv[vocab + 2] = 8.0;
                lv[vocab + 7] = 8.0;
            }
            let rp: Vec<RowParams> = settings
                .iter()
                .map(|&(t, k, p, m)| RowParams {
                    temperature: t,
                    top_k: k,
                    top_p: p,
                    min_p: m,
                    u: rng.uniform(),
                    penalty: 1.0,
                    ..Default::default()
                })
                .collect();
            let logits = Tensor::from_f32(ctx, &[rows, vocab], &lv).unwrap();
            let params = Tensor::from_slice(
                ctx,
                &[rows * 8],
                DType::U32,
                bytemuck::cast_slice::<_, u32>(&rp),
            )
            .unwrap();
            let out = Tensor::zeros(ctx, &[rows], DType::U32).unwrap();
            ctx.run(&[sample(ctx, &out, &logits, &params, rows, vocab, vocab).unwrap()])
                .unwrap();
            let got = out.read_u32(ctx).unwrap();
            for r in 0..rows {
                let want = sample_ref(&lv[r * vocab..(r + 1) * vocab], &rp[r]);
                assert_eq!(got[r], want, "vocab {vocab} row {r} {:?}", rp[r]);
            }
        }
    }

    #[test]
    fn sampled_frequencies_follow_probabilities() {
        // 400 draws from a 4-token distribution with top-k 3: frequencies within 5 sigma.
        let ctx = ctx();
        let lv = [2.0f32, 1.0, 0.5, -1.0];
        let rows = 400;
        let mut rng = Rng::new(5);
        let rp: Vec<RowParams> = (0..rows)
            .map(|_| RowParams {
                temperature: 1.0,
                top_k: 3,
                top_p: 1.0,
                u: rng.uniform(),
                penalty: 1.0,
                ..Default::default()
            })
            .collect();
        let all: Vec<f32> = (0..rows).flat_map(|_| lv).collect();
        let logits = Tensor::from_f32(ctx, &[rows, 4], &all).unwrap();
        let params = Tensor::from_slice(
            ctx,
            &[rows * 8],
            DType::U32,
            bytemuck::cast_slice::<_, u32>(&rp),
        )
        .unwrap();
        let out = Tensor::zeros(ctx, &[rows], DType::U32).unwrap();
        ctx.run(&[sample(ctx, &out, &logits, &params, rows, 4, 4).unwrap()])
            .unwrap();
        let got = out.read_u32(ctx).unwrap();
        let z: f64 = lv[..3].iter().map(|&x| (x as f64).exp()).sum();
        for id in 0..4 {
            let n = got.iter().filter(|&&g| g == id).count() as f64;
            let p = if id < 3 {
                (lv[id as usize] as f64).exp() / z
            } else {
                0.0
            };
            let sd = (rows as f64 * p * (1.0 - p)).sqrt().max(0.5);
            assert!(
                (n - rows as f64 * p).abs() <= 5.0 * sd,
                "token {id}: {n} of {rows}, p = {p}"
            );
        }
    }

    #[test]
    fn penalty_argmax_and_nll() {
        let ctx = ctx();
        let mut rng = Rng::new(8);
        let (rows, vocab) = (3, 5000);
        let mut lv = rng.vec(rows * vocab, -5.0, 5.0);
        lv[17] = 9.0;
        lv[vocab + 4999] = 9.5;
        lv[2 * vocab + 3] = 7.0;
        lv[2 * vocab + 4] = 7.0;
        let logits = Tensor::from_f32(ctx, &[rows, vocab], &lv).unwrap();
        let out = Tensor::zeros(ctx, &[rows], DType::U32).unwrap();
        ctx.run(&[argmax(ctx, &out, &logits, rows, vocab, vocab).unwrap()])
            .unwrap();
        assert_eq!(out.read_u32(ctx).unwrap(), vec![17, 4999, 3]);

        let targets: Vec<u32> = vec![17, 0, 4];
        let tt = Tensor::from_slice(ctx, &[rows], DType::U32, &targets).unwrap();
        let nl = Tensor::zeros(ctx, &[rows, 2], DType::F32).unwrap();
        ctx.run(&[nll(ctx, &nl, &logits, &tt, rows, vocab, vocab).unwrap()])
            .unwrap();
        let got = nl.read_f32(ctx).unwrap();
        for r in 0..rows {
            let row = &lv[r * vocab..(r + 1) * vocab];
            let m = row.iter().cloned().fold(f64::MIN, |a, b| a.max(b as f64));
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            let want = lse - row[targets[r] as usize] as f64;
            assert!(
                (got[2 * r] as f64 - want).abs() < 1e-5,
                "row {r}: {} vs {want}",
                got[2 * r]
            );
            assert_eq!(got[2 * r + 1].to_bits(), [17, 4999, 3][r]);
        }

        // Penalty 2 on tokens 17 (positive logit: divided) and 20 (scaled if negative).
        lv[20] = -1.5;
        let logits = Tensor::from_f32(ctx, &[rows, vocab], &lv).unwrap();
        let rp = [
            RowParams {
                penalty: 2.0,
                n_penalty: 2,
                penalty_off: 0,
                ..Default::default()
            },
            RowParams {
                penalty: 1.0,
                ..Default::default()
            },
            RowParams {
                penalty: 1.0,
                ..Default::default()
            },
        ];
        let params = Tensor::from_slice(
            ctx,
            &[rows * 8],
            DType::U32,
            bytemuck::cast_slice::<_, u32>(&rp),
        )
        .unwrap();
        let ids = Tensor::from_slice(ctx, &[2], DType::U32, &[17u32, 20]).unwrap();
        ctx.run(&[penalize(ctx, &logits, &params, &ids, rows, vocab, vocab).unwrap()])
            .unwrap();
        let got = logits.read_f32(ctx).unwrap();
        assert_eq!(got[17], 4.5);
        assert_eq!(got[20], -3.0);
        assert_eq!(got[21], lv[21]);
    }
}
