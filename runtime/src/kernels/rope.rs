//! Rotary position embeddings (`shaders/rope.wgsl`) with the cos/sin table built on the
//! CPU in f64, including YaRN context extension as ggml defines it.

use crate::error::{Error, Result};
use crate::gpu::{grid, Bind, Context, DType, Dispatch, PipelineKey, Tensor};
use crate::uniform;

uniform! {
    /// Uniform of `shaders/rope.wgsl`.
    pub struct RopeParams {
        tokens: u32,
        heads: u32,
        head_dim: u32,
        n_rot: u32,
        ld: u32,
        offset: u32,
        max_pos: u32,
        _pad: u32,
    }
}

/// How positions become angles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    /// Rotated dimensions per head (even; usually the head size).
    pub n_rot: usize,
    /// Frequency base (`rope_theta`, 10000 for Llama 2).
    pub base: f64,
    /// Linear position scale (1 / scaling factor); 1 for none.
    pub freq_scale: f64,
    /// Pair dimension i with i + n_rot/2 (GPT-NeoX, Qwen2, Llama in HF layout) instead of
    /// 2i with 2i+1 (GGUF Llama layout).
    pub neox: bool,
    /// YaRN: extrapolation mix factor (0 disables YaRN).
    pub ext_factor: f64,
    /// YaRN: attention magnitude scale.
    pub attn_factor: f64,
    /// YaRN: low correction dimension parameter.
    pub beta_fast: f64,
    /// YaRN: high correction dimension parameter.
    pub beta_slow: f64,
    /// YaRN: training context length of the original model.
    pub orig_ctx: usize,
}

impl RopeConfig {
    /// Plain RoPE with `base` over `n_rot` dimensions.
    pub fn new(n_rot: usize, base: f64, neox: bool) -> Self {
        RopeConfig {
            n_rot,
            base,
            freq_scale: 1.0,
            neox,
            ext_factor: 0.0,
            attn_factor: 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            orig_ctx: 0,
        }
    }

    /// ggml's `ggml_rope_yarn_corr_dims`.
    fn corr_dims(&self) -> (f64, f64) {
        let n = self.n_rot as f64;
        let corr = |rot: f64| {
            n * (self.orig_ctx as f64 / (rot * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * self.base.ln())
        };
        let start = corr(self.beta_fast).floor();
        let end = corr(self.beta_slow).ceil();
        (start.max(0.0), end.min(n - 1.0))
    }

    /// (cos, sin) for position `pos` and pair `i` (ggml's `rope_yarn`, in f64).
    pub fn angle(&self, pos: usize, i: usize) -> (f64, f64) {
        let theta_scale = self.base.powf(-2.0 / self.n_rot as f64);
        let theta_extrap = pos as f64 * theta_scale.powi(i as i32);
        let theta_interp = self.freq_scale * theta_extrap;
        let mut theta = theta_interp;
        let mut mscale = self.attn_factor;
        if self.ext_factor != 0.0 {
            let (lo, hi) = self.corr_dims();
            let y = (i as f64 - lo) / (hi - lo).max(0.001);
            let ramp = 1.0 - y.clamp(0.0, 1.0);
            let mix = ramp * self.ext_factor;
            theta = theta_interp * (1.0 - mix) + theta_extrap * mix;
            mscale *= 1.0 + 0.1 * (1.0 / self.freq_scale).ln();
        }
        (theta.cos() * mscale, theta.sin() * mscale)
    }

    /// The `[max_pos][n_rot / 2]` table of (cos, sin) pairs, f32.
    pub fn table(&self, max_pos: usize) -> Vec<f32> {
        let half = self.n_rot / 2;
        let mut t = Vec::with_capacity(max_pos * half * 2);
        for pos in 0..max_pos {
            for i in 0..half {
                let (c, s) = self.angle(pos, i);
                t.push(c as f32);
                t.push(s as f32);
            }
        }
        t
    }
}

/// A RoPE table on the GPU.
#[derive(Debug, Clone)]
pub struct RopeTable {
    /// The configuration it was built from.
    pub config: RopeConfig,
    /// Positions covered.
    pub max_pos: usize,
    /// `[max_pos][n_rot/2]` vec2(cos, sin).
    pub table: Tensor,
}

impl RopeTable {
    /// Builds and uploads the table for positions `0 .. max_pos`.
    pub fn new(ctx: &Context, config: RopeConfig, max_pos: usize) -> Result<Self> {
        if config.n_rot == 0 || config.n_rot % 2 != 0 || max_pos == 0 {
            return Err(Error::InvalidArgument(format!(
                "rope: n_rot {} must be even and positive, max_pos {max_pos} positive",
                config.n_rot
            )));
        }
        let t = config.table(max_pos);
        Ok(RopeTable {
            config,
            max_pos,
            table: Tensor::from_f32(ctx, &[max_pos, config.n_rot], &t)?,
        })
    }
}

/// Layout of the heads to rotate inside `x`: head `h` of token `t` starts at element
/// `t * ld + offset + h * head_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLayout {
    /// Tokens (rows).
    pub tokens: usize,
    /// Heads per token.
    pub heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Row stride.
    pub ld: usize,
    /// First element of head 0 in each row.
    pub offset: usize,
}

/// Rotates the heads of `x` in place by the angles of positions `pos` (`[tokens]` u32);
/// `inverse` rotates back (the backward pass).
pub fn rope(
    ctx: &Context,
    x: &Tensor,
    pos: &Tensor,
    table: &RopeTable,
    l: HeadLayout,
    inverse: bool,
) -> Result<Dispatch> {
    let n_rot = table.config.n_rot;
    let need = l.tokens.saturating_sub(1) * l.ld + l.offset + l.heads * l.head_dim;
    if l.tokens == 0
        || l.heads == 0
        || n_rot > l.head_dim
        || x.dtype() != DType::F32
        || x.numel() < need
        || l.ld < l.offset + l.heads * l.head_dim
    {
        return Err(Error::shape(
            "rope",
            format!("x {:?} for {l:?} with n_rot {n_rot}", x.shape()),
        ));
    }
    if pos.dtype() != DType::U32 || pos.numel() < l.tokens {
        return Err(Error::shape(
            "rope",
            format!("positions {:?} for {} tokens", pos.shape(), l.tokens),
        ));
    }
    let key = key(table.config.neox, inverse);
    let u = ctx.uniform(&RopeParams {
        tokens: l.tokens as u32,
        heads: l.heads as u32,
        head_dim: l.head_dim as u32,
        n_rot: n_rot as u32,
        ld: l.ld as u32,
        offset: l.offset as u32,
        max_pos: table.max_pos as u32,
        _pad: 0,
    });
    let n = (l.tokens * l.heads * n_rot / 2) as u32;
    ctx.dispatch(
        "rope",
        &key,
        &[Bind::U(&u), Bind::T(x), Bind::T(pos), Bind::T(&table.table)],
        grid(ctx, n.div_ceil(64))?,
    )
}

fn key(neox: bool, inverse: bool) -> PipelineKey {
    PipelineKey::new("rope", "rope")
        .constant("NEOX", neox as u32 as f64)
        .constant("INVERSE", inverse as u32 as f64)
}

/// Every specialization (for the portability test).
#[cfg(test)]
pub(crate) fn keys() -> Vec<PipelineKey> {
    vec![
        key(false, false),
        key(false, true),
        key(true, false),
        key(true, true),
    ]
}

/// CPU reference, in place.
pub fn rope_ref(x: &mut [f32], pos: &[u32], cfg: &RopeConfig, l: HeadLayout, inverse: bool) {
    let half = cfg.n_rot / 2;
    for t in 0..l.tokens {
        for h in 0..l.heads {
            let base = t * l.ld + l.offset + h * l.head_dim;
            for i in 0..half {
                let (i0, i1) = if cfg.neox {
                    (base + i, base + i + half)
                } else {
                    (base + 2 * i, base + 2 * i + 1)
                };
                let (c, s) = cfg.angle(pos[t] as usize, i);
                let (c, s) = (
                    c as f32 as f64,
                    if inverse { -(s as f32) } else { s as f32 } as f64,
                );
                let (a, b) = (x[i0] as f64, x[i1] as f64);
                x[i0] = (a * c - b * s) as f32;
                x[i1] = (a * s + b * c) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_close, ctx};
    use crate::util::Rng;

    fn check(cfg: RopeConfig, l: HeadLayout, inverse: bool, seed: u64) {
        let ctx = ctx();
        let mut rng = Rng::new(seed);
        let n = (l.tokens - 1) * l.ld + l.offset + l.heads * l.head_dim;
        let xv = rng.vec(n, -2.0, 2.0);
        let pos: Vec<u32> = (0..l.tokens).map(|_| rng.below(600) as u32).collect();
        let table = RopeTable::new(ctx, cfg, 640).unwrap();
        let x = Tensor::from_f32(ctx, &[n], &xv).unwrap();
        let p = Tensor::from_slice(ctx, &[l.tokens], DType::U32, &pos).unwrap();
        ctx.run(&[rope(ctx, &x, &p, &table, l, inverse).unwrap()])
            .unwrap();
        let mut want = xv.clone();
        rope_ref(&mut want, &pos, &cfg, l, inverse);
        assert_close(
            &format!("{cfg:?} {l:?}"),
            &x.read_f32(ctx).unwrap(),
            &want,
            1e-6,
            1e-6,
        );
    }

    #[test]
    fn normal_neox_partial_inverse() {
        let l = HeadLayout {
            tokens: 17,
            heads: 3,
            head_dim: 64,
            ld: 3 * 64,
            offset: 0,
        };
        for neox in [false, true] {
            check(RopeConfig::new(64, 10000.0, neox), l, false, 1);
            check(RopeConfig::new(64, 500000.0, neox), l, true, 2);
            // Partial rotation (only the first 32 of 64 dims), inside a fused QKV row.
            let l2 = HeadLayout {
                tokens: 5,
                heads: 2,
                head_dim: 64,
                ld: 400,
                offset: 72,
            };
            check(RopeConfig::new(32, 10000.0, neox), l2, false, 3);
        }
        let one = HeadLayout {
            tokens: 1,
            heads: 1,
            head_dim: 2,
            ld: 2,
            offset: 0,
        };
        check(RopeConfig::new(2, 10000.0, false), one, false, 4);
    }

    #[test]
    fn yarn_and_linear_scaling() {
        let l = HeadLayout {
            tokens: 9,
            heads: 2,
            head_dim: 128,
            ld: 256,
            offset: 0,
        };
        let mut cfg = RopeConfig::new(128, 10000.0, true);
        cfg.freq_scale = 0.25;
        check(cfg, l, false, 5);
        cfg.ext_factor = 1.0;
        cfg.orig_ctx = 4096;
        check(cfg, l, false, 6);
        // ggml's corr dims for these parameters.
        let (lo, hi) = cfg.corr_dims();
        assert_eq!((lo, hi), (20.0, 46.0));
        // Inverse undoes forward.
        let ctx = ctx();
        let xv = Rng::new(9).vec(256 * 9, -1.0, 1.0);
        let x = Tensor::from_f32(ctx, &[256 * 9], &xv).unwrap();
        let pos: Vec<u32> = (0..9).map(|i| i * 50).collect();
        let p = Tensor::from_slice(ctx, &[9], DType::U32, &pos).unwrap();
        let t = RopeTable::new(ctx, RopeConfig::new(128, 10000.0, true), 512).unwrap();
        ctx.run(&[
            rope(ctx, &x, &p, &t, l, false).unwrap(),
            rope(ctx, &x, &p, &t, l, true).unwrap(),
        ])
        .unwrap();
        assert_close("round trip", &x.read_f32(ctx).unwrap(), &xv, 1e-6, 1e-5);
    }

    #[test]
    fn rejects_bad_layouts() {
        let ctx = ctx();
        let t = RopeTable::new(ctx, RopeConfig::new(64, 1e4, false), 8).unwrap();
        let x = Tensor::zeros(ctx, &[100], DType::F32).unwrap();
        let p = Tensor::zeros(ctx, &[2], DType::U32).unwrap();
        let l = HeadLayout {
            tokens: 2,
            heads: 1,
            head_dim: 64,
            ld: 64,
            offset: 0,
        };
        assert!(rope(ctx, &x, &p, &t, l, false).is_err());
        assert!(RopeTable::new(ctx, RopeConfig::new(63, 1e4, false), 8).is_err());
    }
}
