//! Causal attention with grouped-query heads over a key/value cache
//! (`shaders/attention.wgsl` and, for long prefills, the matmul kernel).

use crate::error::{Error, Result};
use crate::gpu::{grid, Bind, Context, DType, Dispatch, PipelineKey, Tensor};
use crate::kernels::matmul::{matmul, MatmulDesc};
use crate::kernels::Variant;
use crate::uniform;

uniform! {
    /// Uniform of `shaders/attention.wgsl`.
    pub struct AttnParams {
        n_tokens: u32,
        n_heads: u32,
        q_ld: u32,
        q_off: u32,
        kv_ld: u32,
        o_ld: u32,
        scale: f32,
        rows: u32,
        cols: u32,
        q_tokens: u32,
        s_ld: u32,
        _pad1: u32,
    }
}

/// Where heads live in the query, cache and output tensors (all f32, elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnLayout {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (divides `n_heads`).
    pub n_kv: usize,
    /// Elements per head (a multiple of 4, at most 256).
    pub head_dim: usize,
    /// Row stride of the query tensor (per token).
    pub q_ld: usize,
    /// Offset of query head 0 in a row (e.g. inside a fused QKV row).
    pub q_off: usize,
    /// Row stride of the caches (per slot), usually `n_kv * head_dim`.
    pub kv_ld: usize,
    /// Row stride of the output.
    pub o_ld: usize,
}

impl AttnLayout {
    /// Packed layout: `q` and `o` are `[tokens][n_heads * head_dim]`, caches
    /// `[slots][n_kv * head_dim]`.
    pub fn packed(n_heads: usize, n_kv: usize, head_dim: usize) -> Self {
        AttnLayout {
            n_heads,
            n_kv,
            head_dim,
            q_ld: n_heads * head_dim,
            q_off: 0,
            kv_ld: n_kv * head_dim,
            o_ld: n_heads * head_dim,
        }
    }

    fn group(&self) -> usize {
        self.n_heads / self.n_kv.max(1)
    }

    fn check(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        tokens: usize,
        slots: usize,
    ) -> Result<()> {
        let l = self;
        let bad = |d: String| Err(Error::shape("attention", d));
        if l.n_kv == 0 || l.n_heads % l.n_kv != 0 || l.group() > 8 {
            return bad(format!(
                "{} query heads over {} kv heads (a whole group of at most 8 per kv head)",
                l.n_heads, l.n_kv
            ));
        }
        if l.head_dim == 0 || l.head_dim % 4 != 0 || l.head_dim > 256 {
            return bad(format!(
                "head_dim {} (a multiple of 4 up to 256)",
                l.head_dim
            ));
        }
        if l.q_ld % 4 != 0 || l.q_off % 4 != 0 || l.kv_ld % 4 != 0 || l.o_ld % 4 != 0 {
            return bad(format!("strides must be multiples of 4: {l:?}"));
        }
        if l.q_ld < l.q_off + l.n_heads * l.head_dim
            || l.kv_ld < l.n_kv * l.head_dim
            || l.o_ld < l.n_heads * l.head_dim
        {
            return bad(format!("strides too small: {l:?}"));
        }
        for (name, t, need) in [
            ("q", q, tokens * l.q_ld),
            ("o", o, tokens * l.o_ld),
            ("k", k, slots * l.kv_ld),
            ("v", v, slots * l.kv_ld),
        ] {
            if t.dtype() != DType::F32 || t.numel() < need {
                return bad(format!(
                    "{name} is {:?} {:?}, needs {need} f32",
                    t.dtype(),
                    t.shape()
                ));
            }
        }
        Ok(())
    }
}

/// Attention for `tokens` query tokens of any sequences: token `t` attends to cache slots
/// `meta[t].0 .. meta[t].0 + meta[t].1` (`meta` is `[tokens][2]` u32). Scores are scaled by
/// `scale` (usually `1/sqrt(head_dim)`).
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    ctx: &Context,
    o: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    meta: &Tensor,
    tokens: usize,
    l: &AttnLayout,
    scale: f32,
) -> Result<Dispatch> {
    let slots = k.numel().min(v.numel()) / l.kv_ld.max(1);
    l.check(q, k, v, o, tokens, slots)?;
    if tokens == 0 || tokens > 65535 || meta.dtype() != DType::U32 || meta.numel() < 2 * tokens {
        return Err(Error::shape(
            "attention",
            format!("{tokens} tokens with meta {:?}", meta.shape()),
        ));
    }
    let key = decode_key(l.head_dim, l.group());
    let u = ctx.uniform(&AttnParams {
        n_tokens: tokens as u32,
        n_heads: l.n_heads as u32,
        q_ld: l.q_ld as u32,
        q_off: l.q_off as u32,
        kv_ld: l.kv_ld as u32,
        o_ld: l.o_ld as u32,
        scale,
        ..Default::default()
    });
    ctx.dispatch(
        "attn_decode",
        &key,
        &[
            Bind::U(&u),
            Bind::T(q),
            Bind::T(k),
            Bind::T(v),
            Bind::T(meta),
            Bind::T(o),
        ],
        [l.n_kv as u32, tokens as u32, 1],
    )
}

fn decode_key(head_dim: usize, group: usize) -> PipelineKey {
    PipelineKey::new("attention", "attn_decode")
        .constant("HD", head_dim as f64)
        .constant("GROUP", group as f64)
}

/// Specializations for common head sizes and groups (for the portability test).
#[cfg(test)]
pub(crate) fn keys() -> Vec<PipelineKey> {
    let mut v = vec![
        PipelineKey::new("attention", "softmax_masked"),
        PipelineKey::new("attention", "softmax_rows"),
    ];
    for hd in [4, 32, 64, 80, 128, 256] {
        for g in [1, 2, 3, 4, 8] {
            v.push(decode_key(hd, g));
        }
    }
    v
}

/// Attention for `q_tokens` consecutive query tokens of one sequence through two batched
/// matmuls and a masked softmax: the keys are cache slots `first .. first + kv_len`, and
/// query `t` sees the first `lens[t]` of them (`lens` is `[q_tokens]` u32; causal prefill
/// has `lens[t] = position(t) + 1`). `scores` is scratch of
/// [`prefill_scores_len`]`(n_heads, q_tokens, kv_len)` f32.
#[allow(clippy::too_many_arguments)]
pub fn attention_prefill(
    ctx: &Context,
    o: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scores: &Tensor,
    lens: &Tensor,
    q_tokens: usize,
    first: usize,
    kv_len: usize,
    l: &AttnLayout,
    scale: f32,
    variant: Variant,
) -> Result<Vec<Dispatch>> {
    l.check(q, k, v, o, q_tokens, first + kv_len)?;
    let s_len = prefill_scores_len(l.n_heads, q_tokens, kv_len);
    // Score rows padded to a multiple of 4, so both the softmax and P.V read vec4s.
    let s_ld = kv_len.div_ceil(4) * 4;
    if q_tokens == 0 || kv_len == 0 || scores.dtype() != DType::F32 || scores.numel() < s_len {
        return Err(Error::shape(
            "attention",
            format!(
                "scores {:?} for {} heads x {q_tokens} x {kv_len}",
                scores.shape(),
                l.n_heads
            ),
        ));
    }
    if lens.dtype() != DType::U32 || lens.numel() < q_tokens {
        return Err(Error::shape(
            "attention",
            format!("lens {:?} for {q_tokens} tokens", lens.shape()),
        ));
    }
    let hd = l.head_dim;
    let g = l.group();
    // S[h][t][j] = scale * Q[t][h] . K[first + j][h / g]
    let mut qk = MatmulDesc::new(q_tokens, kv_len, hd).batched(l.n_heads);
    qk.lda = l.q_ld;
    qk.stride_a = hd;
    qk.off_a = l.q_off;
    qk.ldb = l.kv_ld;
    qk.stride_b = hd;
    qk.off_b = first * l.kv_ld;
    qk.b_div = g;
    qk.alpha = scale;
    qk.ldc = s_ld;
    qk.stride_c = q_tokens * s_ld;
    // O[t][h] = P[h][t] . V[first ..][h / g]
    let mut pv = MatmulDesc::new(q_tokens, hd, kv_len)
        .layout(false, true)
        .batched(l.n_heads);
    pv.ldb = l.kv_ld;
    pv.stride_b = hd;
    pv.off_b = first * l.kv_ld;
    pv.b_div = g;
    pv.ldc = l.o_ld;
    pv.stride_c = hd;
    pv.lda = s_ld;
    pv.stride_a = q_tokens * s_ld;
    let rows = l.n_heads * q_tokens;
    let u = ctx.uniform(&AttnParams {
        rows: rows as u32,
        cols: kv_len as u32,
        q_tokens: q_tokens as u32,
        s_ld: s_ld as u32,
        ..Default::default()
    });
    let per_row = variant.resolve(ctx) == Variant::Subgroup;
    let (entry, groups) = if per_row {
        ("softmax_rows", grid(ctx, (rows as u32).div_ceil(64))?)
    } else {
        ("softmax_masked", grid(ctx, rows as u32)?)
    };
    let mut binds = vec![
        Bind::U(&u),
        Bind::Skip,
        Bind::Skip,
        Bind::Skip,
        Bind::Skip,
        Bind::Skip,
    ];
    if per_row {
        binds.extend([Bind::Skip, Bind::T(lens), Bind::T(scores)]);
    } else {
        binds.extend([Bind::T(scores), Bind::T(lens)]);
    }
    let sm = ctx.dispatch(entry, &PipelineKey::new("attention", entry), &binds, groups)?;
    Ok(vec![
        matmul(ctx, scores, q, k, &qk, variant)?,
        sm,
        matmul(ctx, o, scores, v, &pv, variant)?,
    ])
}

/// Floats of score scratch [`attention_prefill`] needs.
pub fn prefill_scores_len(n_heads: usize, q_tokens: usize, kv_len: usize) -> usize {
    n_heads * q_tokens * kv_len.div_ceil(4) * 4
}

/// CPU reference: `o` for tokens with key ranges `meta` (f64 softmax).
#[allow(clippy::too_many_arguments)]
pub fn attention_ref(
    o: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    meta: &[(usize, usize)],
    l: &AttnLayout,
    scale: f32,
) {
    let hd = l.head_dim;
    for (t, &(base, len)) in meta.iter().enumerate() {
        for h in 0..l.n_heads {
            let g = h / l.group();
            let qr = &q[t * l.q_ld + l.q_off + h * hd..][..hd];
            let s: Vec<f64> = (0..len)
                .map(|j| {
                    let kr = &k[(base + j) * l.kv_ld + g * hd..][..hd];
                    scale as f64
                        * qr.iter()
                            .zip(kr)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..hd {
                let mut acc = 0.0;
                for j in 0..len {
                    acc += e[j] / sum * v[(base + j) * l.kv_ld + g * hd + d] as f64;
                }
                o[t * l.o_ld + h * hd + d] = if len == 0 { 0.0 } else { acc as f32 };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_close, ctx};
    use crate::util::Rng;

    struct Case {
        l: AttnLayout,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        slots: usize,
    }

    fn case(l: AttnLayout, tokens: usize, slots: usize, seed: u64) -> Case {
        let mut rng = Rng::new(seed);
        Case {
            l,
            q: rng.vec(tokens * l.q_ld, -1.0, 1.0),
            k: rng.vec(slots * l.kv_ld, -1.0, 1.0),
            v: rng.vec(slots * l.kv_ld, -1.0, 1.0),
            slots,
        }
    }

    fn run_decode(c: &Case, meta: &[(usize, usize)], scale: f32) -> Vec<f32> {
        let ctx = ctx();
        let tokens = meta.len();
        let q = Tensor::from_f32(ctx, &[c.q.len()], &c.q).unwrap();
        let k = Tensor::from_f32(ctx, &[c.slots * c.l.kv_ld], &c.k).unwrap();
        let v = Tensor::from_f32(ctx, &[c.slots * c.l.kv_ld], &c.v).unwrap();
        let mv: Vec<u32> = meta
            .iter()
            .flat_map(|&(b, n)| [b as u32, n as u32])
            .collect();
        let mt = Tensor::from_slice(ctx, &[tokens, 2], DType::U32, &mv).unwrap();
        let o = Tensor::zeros(ctx, &[tokens * c.l.o_ld], DType::F32).unwrap();
        let op = attention_decode(ctx, &o, &q, &k, &v, &mt, tokens, &c.l, scale).unwrap();
        ctx.run(&[op]).unwrap();
        o.read_f32(ctx).unwrap()
    }

    #[test]
    fn decode_matches_reference() {
        // (heads, kv heads, head_dim): MHA, GQA 3:1 (SmolLM2), 4:1, 8:1, wide heads.
        for (i, &(nh, nkv, hd)) in [
            (2, 2, 64),
            (9, 3, 64),
            (8, 2, 128),
            (8, 1, 32),
            (2, 1, 256),
            (4, 4, 4),
        ]
        .iter()
        .enumerate()
        {
            let l = AttnLayout::packed(nh, nkv, hd);
            let slots = 300;
            // Token key ranges crossing the 64-key block edges, at different cache bases.
            let meta = [(0, 1), (10, 63), (0, 64), (100, 65), (3, 200), (0, 300)];
            let c = case(l, meta.len(), slots, i as u64);
            let scale = 1.0 / (hd as f32).sqrt();
            let got = run_decode(&c, &meta, scale);
            let mut want = vec![0.0; meta.len() * l.o_ld];
            attention_ref(&mut want, &c.q, &c.k, &c.v, &meta, &l, scale);
            assert_close(&format!("decode {l:?}"), &got, &want, 2e-6, 1e-5);
        }
    }

    #[test]
    fn decode_reads_heads_inside_fused_rows() {
        // q inside a fused QKV row: [q | k | v] with q at offset 0 and a padded output.
        let mut l = AttnLayout::packed(6, 2, 16);
        l.q_ld = 6 * 16 + 2 * 2 * 16;
        l.o_ld = 6 * 16 + 8;
        l.q_off = 0;
        let meta = [(0, 5), (0, 6), (2, 7)];
        let c = case(l, meta.len(), 9, 42);
        let got = run_decode(&c, &meta, 0.3);
        let mut want = vec![0.0; meta.len() * l.o_ld];
        attention_ref(&mut want, &c.q, &c.k, &c.v, &meta, &l, 0.3);
        for t in 0..meta.len() {
            let r = t * l.o_ld..t * l.o_ld + 6 * 16;
            assert_close("fused rows", &got[r.clone()], &want[r], 2e-6, 1e-5);
        }
    }

    #[test]
    fn prefill_matches_reference_and_decode() {
        let ctx = ctx();
        for variant in Variant::all(ctx) {
            for &(nh, nkv, hd, t_q, first) in
                &[(9, 3, 64, 17, 5), (4, 4, 32, 1, 0), (8, 2, 128, 70, 3)]
            {
                let l = AttnLayout::packed(nh, nkv, hd);
                let kv_len = first + t_q;
                let c = case(l, t_q, kv_len + 4, (nh * hd + t_q) as u64);
                let meta: Vec<(usize, usize)> = (0..t_q).map(|t| (0, first + t + 1)).collect();
                let scale = 1.0 / (hd as f32).sqrt();
                let q = Tensor::from_f32(ctx, &[c.q.len()], &c.q).unwrap();
                let k = Tensor::from_f32(ctx, &[c.k.len()], &c.k).unwrap();
                let v = Tensor::from_f32(ctx, &[c.v.len()], &c.v).unwrap();
                let lens: Vec<u32> = meta.iter().map(|m| m.1 as u32).collect();
                let lt = Tensor::from_slice(ctx, &[t_q], DType::U32, &lens).unwrap();
                let s =
                    Tensor::zeros(ctx, &[prefill_scores_len(nh, t_q, kv_len)], DType::F32).unwrap();
                let o = Tensor::zeros(ctx, &[t_q * l.o_ld], DType::F32).unwrap();
                let ops = attention_prefill(
                    ctx, &o, &q, &k, &v, &s, &lt, t_q, 0, kv_len, &l, scale, variant,
                )
                .unwrap();
                ctx.run(&ops).unwrap();
                let got = o.read_f32(ctx).unwrap();
                let mut want = vec![0.0; t_q * l.o_ld];
                attention_ref(&mut want, &c.q, &c.k, &c.v, &meta, &l, scale);
                assert_close(
                    &format!("prefill {variant:?} {l:?}"),
                    &got,
                    &want,
                    2e-6,
                    1e-5,
                );
                assert_close(
                    "prefill vs decode",
                    &got,
                    &run_decode(&c, &meta, scale),
                    2e-6,
                    1e-5,
                );
            }
        }
    }

    #[test]
    fn rejects_bad_layouts() {
        let ctx = ctx();
        let t = Tensor::zeros(ctx, &[4096], DType::F32).unwrap();
        let m = Tensor::zeros(ctx, &[2], DType::U32).unwrap();
        for l in [
            AttnLayout::packed(9, 2, 64),
            AttnLayout::packed(2, 2, 6),
            AttnLayout::packed(18, 1, 64),
        ] {
            assert!(
                attention_decode(ctx, &t, &t, &t, &t, &m, 1, &l, 1.0).is_err(),
                "{l:?}"
            );
        }
    }
}
