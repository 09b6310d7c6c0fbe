//! Kernels of the training path (`shaders/train.wgsl`): RMSNorm and SwiGLU backward, the
//! masked softmax of training attention and its backward, fused softmax + cross-entropy +
//! gradient, row accumulation, the global gradient norm and AdamW. Each has a CPU reference;
//! every backward is checked against finite differences of its forward.

use crate::error::{Error, Result};
use crate::gpu::{grid, Bind, Context, DType, Dispatch, PipelineKey, Tensor};
use crate::uniform;

uniform! {
    /// Uniform of `shaders/train.wgsl` (all entries but `adamw`).
    pub struct TrainParams {
        rows: u32,
        cols: u32,
        ld: u32,
        ld2: u32,
        eps: f32,
        accumulate: u32,
        q_rows: u32,
        n: u32,
        off_src: u32,
        off_dst: u32,
        _pad0: u32,
        _pad1: u32,
    }
}

uniform! {
    /// Uniform of the `adamw` entry.
    pub struct AdamParams {
        n: u32,
        clip: u32,
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        bc1: f32,
        bc2_sqrt: f32,
        max_norm: f32,
        _pad0: u32,
        _pad1: u32,
    }
}

fn key(entry: &'static str) -> PipelineKey {
    PipelineKey::new("train", entry)
}

/// An error naming `op` and `what` when `t` holds fewer than `n` values.
pub(crate) fn need(op: &'static str, t: &Tensor, n: usize, what: &str) -> Result<()> {
    if t.numel() < n {
        return Err(Error::shape(
            op,
            format!("{what} {:?} holds fewer than {n} values", t.shape()),
        ));
    }
    Ok(())
}

/// `dx (+)= RMSNorm'(x) dy` for `rows` rows of `cols`: x rows `ld_x` apart, dy and dx rows
/// `ld_d` apart; `w` is the (frozen) norm weight.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    ctx: &Context,
    dx: &Tensor,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    rows: usize,
    cols: usize,
    ld_x: usize,
    ld_d: usize,
    eps: f32,
    accumulate: bool,
) -> Result<Dispatch> {
    let op = "rmsnorm_backward";
    if rows == 0 || cols == 0 {
        return Err(Error::shape(op, "empty"));
    }
    need(op, x, (rows - 1) * ld_x + cols, "x")?;
    need(op, dy, (rows - 1) * ld_d + cols, "dy")?;
    need(op, dx, (rows - 1) * ld_d + cols, "dx")?;
    need(op, w, cols, "w")?;
    let u = ctx.uniform(&TrainParams {
        rows: rows as u32,
        cols: cols as u32,
        ld: ld_x as u32,
        ld2: ld_d as u32,
        eps,
        accumulate: accumulate as u32,
        ..Default::default()
    });
    ctx.dispatch(
        op,
        &key(op),
        &[
            Bind::U(&u),
            Bind::T(x),
            Bind::T(w),
            Bind::T(dy),
            Bind::T(dx),
        ],
        grid(ctx, rows as u32)?,
    )
}

/// `dgu = d/dgu [silu(gate) * up] . da` with `gu` and `dgu` `[rows][2 ff]`, `da` `[rows][ff]`.
pub fn swiglu_backward(
    ctx: &Context,
    dgu: &Tensor,
    gu: &Tensor,
    da: &Tensor,
    rows: usize,
    ff: usize,
) -> Result<Dispatch> {
    let op = "swiglu_backward";
    let n = rows * ff;
    if n == 0 {
        return Err(Error::shape(op, "empty"));
    }
    need(op, gu, 2 * n, "gu")?;
    need(op, dgu, 2 * n, "dgu")?;
    need(op, da, n, "da")?;
    let u = ctx.uniform(&TrainParams {
        rows: rows as u32,
        cols: ff as u32,
        ..Default::default()
    });
    ctx.dispatch(
        op,
        &key(op),
        &[
            Bind::U(&u),
            Bind::T(gu),
            Bind::Skip,
            Bind::T(da),
            Bind::T(dgu),
        ],
        grid(ctx, (n as u32).div_ceil(64))?,
    )
}

/// In place over score rows `s` (`rows` rows of `ld` floats, `ld` a multiple of 4, `cols`
/// used): softmax over keys `[ranges[q].0, ranges[q].1)` of row `r`, `q = r % q_rows`, zero
/// elsewhere. `ranges` is `[q_rows][2]` u32.
pub fn softmax_ranges(
    ctx: &Context,
    s: &Tensor,
    ranges: &Tensor,
    rows: usize,
    cols: usize,
    ld: usize,
    q_rows: usize,
) -> Result<Dispatch> {
    let op = "softmax_ranges";
    if rows == 0 || cols == 0 || ld % 4 != 0 || ld < cols || q_rows == 0 || s.offset() % 16 != 0 {
        return Err(Error::shape(
            op,
            format!("{rows} rows of {cols} (ld {ld}), {q_rows} queries"),
        ));
    }
    need(op, s, rows * ld, "scores")?;
    need(op, ranges, 2 * q_rows, "ranges")?;
    let u = ctx.uniform(&TrainParams {
        rows: rows as u32,
        cols: cols as u32,
        ld: ld as u32,
        q_rows: q_rows as u32,
        ..Default::default()
    });
    let binds = [
        Bind::U(&u),
        Bind::Skip,
        Bind::Skip,
        Bind::Skip,
        Bind::Skip,
        Bind::T(s),
        Bind::T(ranges),
    ];
    ctx.dispatch(op, &key(op), &binds, grid(ctx, (rows as u32).div_ceil(64))?)
}

/// In place over `dp` (`rows` rows of `ld`): `dS = P * (dP - sum(P * dP))`, `p` the
/// probabilities.
pub fn softmax_backward(
    ctx: &Context,
    dp: &Tensor,
    p: &Tensor,
    rows: usize,
    ld: usize,
) -> Result<Dispatch> {
    let op = "softmax_backward";
    if rows == 0 || ld % 4 != 0 || dp.offset() % 16 != 0 || p.offset() % 16 != 0 {
        return Err(Error::shape(op, format!("{rows} rows of ld {ld}")));
    }
    need(op, dp, rows * ld, "dP")?;
    need(op, p, rows * ld, "P")?;
    let u = ctx.uniform(&TrainParams {
        rows: rows as u32,
        ld: ld as u32,
        ..Default::default()
    });
    let binds = [
        Bind::U(&u),
        Bind::Skip,
        Bind::Skip,
        Bind::Skip,
        Bind::Skip,
        Bind::T(dp),
        Bind::Skip,
        Bind::T(p),
    ];
    ctx.dispatch(op, &key(op), &binds, grid(ctx, (rows as u32).div_ceil(64))?)
}

/// Target value marking a row without loss.
pub const IGNORE: u32 = u32::MAX;

/// In place over `logits` (`rows` rows of `vocab`, stride `ld`): becomes
/// `w[r] * (softmax - onehot(target[r]))`; `loss[r] = w[r] * (logsumexp - logit[target])`.
/// Rows with target [`IGNORE`] get zero gradient and loss.
#[allow(clippy::too_many_arguments)]
pub fn xent(
    ctx: &Context,
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
    loss: &Tensor,
    rows: usize,
    vocab: usize,
    ld: usize,
) -> Result<Dispatch> {
    loss_dispatch(ctx, logits, None, targets, weights, loss, rows, vocab, ld)
}

/// Target value marking a row distilled from a teacher ([`xent_distill`]).
pub const DISTILL: u32 = u32::MAX - 1;

/// [`xent`], except that rows whose target is [`DISTILL`] learn the teacher's whole
/// distribution: `loss[r] = w[r] * KL(softmax(teacher[r]) || softmax(logits[r]))` and the
/// logits become `w[r] * (softmax(logits[r]) - softmax(teacher[r]))`. `teacher` has the
/// logits' layout (the frozen base model's logits of the same rows, for distillation).
#[allow(clippy::too_many_arguments)]
pub fn xent_distill(
    ctx: &Context,
    logits: &Tensor,
    teacher: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
    loss: &Tensor,
    rows: usize,
    vocab: usize,
    ld: usize,
) -> Result<Dispatch> {
    let t = Some(teacher);
    loss_dispatch(ctx, logits, t, targets, weights, loss, rows, vocab, ld)
}

/// [`xent`] (no teacher) or [`xent_distill`].
#[allow(clippy::too_many_arguments)]
fn loss_dispatch(
    ctx: &Context,
    logits: &Tensor,
    teacher: Option<&Tensor>,
    targets: &Tensor,
    weights: &Tensor,
    loss: &Tensor,
    rows: usize,
    vocab: usize,
    ld: usize,
) -> Result<Dispatch> {
    let op = if teacher.is_some() {
        "xent_distill"
    } else {
        "xent"
    };
    if rows == 0 || vocab == 0 || ld < vocab {
        return Err(Error::shape(
            op,
            format!("{rows} rows of {vocab} (ld {ld})"),
        ));
    }
    need(op, logits, (rows - 1) * ld + vocab, "logits")?;
    if let Some(t) = teacher {
        need(op, t, (rows - 1) * ld + vocab, "teacher")?;
    }
    need(op, targets, rows, "targets")?;
    need(op, weights, rows, "weights")?;
    need(op, loss, rows, "loss")?;
    let u = ctx.uniform(&TrainParams {
        rows: rows as u32,
        cols: vocab as u32,
        ld: ld as u32,
        ..Default::default()
    });
    let binds = [
        Bind::U(&u),
        teacher.map_or(Bind::Skip, Bind::T),
        Bind::Skip,
        Bind::Skip,
        Bind::T(logits),
        Bind::Skip,
        Bind::Skip,
        Bind::Skip,
        Bind::T(targets),
        Bind::T(weights),
        Bind::T(loss),
    ];
    ctx.dispatch(op, &key(op), &binds, grid(ctx, rows as u32)?)
}

/// Rows moved between two matrices by a row map ([`rows_accumulate`], [`rows_gather`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowCopy {
    /// Entries of the map (rows of `src` for accumulate, of `dst` for gather).
    pub rows: usize,
    /// Columns moved per row.
    pub cols: usize,
    /// Row stride of `src`.
    pub ld_src: usize,
    /// Row stride of `dst`.
    pub ld_dst: usize,
    /// First element of `src` (a column offset for fused rows).
    pub off_src: usize,
    /// First element of `dst`.
    pub off_dst: usize,
}

impl RowCopy {
    /// Packed rows of `cols` columns.
    pub fn packed(rows: usize, cols: usize) -> Self {
        RowCopy {
            rows,
            cols,
            ld_src: cols,
            ld_dst: cols,
            off_src: 0,
            off_dst: 0,
        }
    }

    fn params(&self) -> TrainParams {
        TrainParams {
            rows: self.rows as u32,
            cols: self.cols as u32,
            ld: self.ld_src as u32,
            ld2: self.ld_dst as u32,
            off_src: self.off_src as u32,
            off_dst: self.off_dst as u32,
            ..Default::default()
        }
    }
}

fn row_map_dispatch(
    ctx: &Context,
    op: &'static str,
    dst: &Tensor,
    src: &Tensor,
    map: &Tensor,
    c: &RowCopy,
    groups: [u32; 3],
) -> Result<Dispatch> {
    if c.rows == 0 || c.cols == 0 || c.ld_src < c.cols || c.ld_dst < c.cols {
        return Err(Error::shape(op, format!("{c:?}")));
    }
    need(op, map, c.rows, "map")?;
    let u = ctx.uniform(&c.params());
    let mut binds = vec![
        Bind::U(&u),
        Bind::Skip,
        Bind::Skip,
        Bind::T(src),
        Bind::T(dst),
    ];
    binds.extend((0..6).map(|_| Bind::Skip));
    binds.push(Bind::T(map));
    ctx.dispatch(op, &key(op), &binds, groups)
}

/// `dst[map[r]][..cols] += src[r][..cols]` for every row `r < rows` whose map entry is not
/// `u32::MAX` (rows in order: deterministic). Gradients of rows that were gathered (soft
/// prompt and prefix rows shared by every sequence) flow back this way.
pub fn rows_accumulate(
    ctx: &Context,
    dst: &Tensor,
    src: &Tensor,
    map: &Tensor,
    c: &RowCopy,
) -> Result<Dispatch> {
    need(
        "rows_accumulate",
        src,
        c.off_src + (c.rows - 1) * c.ld_src + c.cols,
        "src",
    )?;
    row_map_dispatch(
        ctx,
        "rows_accumulate",
        dst,
        src,
        map,
        c,
        [c.cols.div_ceil(64) as u32, 1, 1],
    )
}

/// `dst[r][..cols] = src[map[r]][..cols]` for every row `r < rows` whose map entry is not
/// `u32::MAX` (others are left alone): places soft prompt rows among token embeddings, and
/// prefix keys/values among computed ones.
pub fn rows_gather(
    ctx: &Context,
    dst: &Tensor,
    src: &Tensor,
    map: &Tensor,
    c: &RowCopy,
) -> Result<Dispatch> {
    need(
        "rows_gather",
        dst,
        c.off_dst + (c.rows - 1) * c.ld_dst + c.cols,
        "dst",
    )?;
    row_map_dispatch(
        ctx,
        "rows_gather",
        dst,
        src,
        map,
        c,
        [c.cols.div_ceil(64) as u32, c.rows as u32, 1],
    )
}

/// `dst[..n] = value`.
pub fn fill(ctx: &Context, dst: &Tensor, value: f32, n: usize) -> Result<Dispatch> {
    let op = "fill";
    if n == 0 || dst.dtype() != DType::F32 {
        return Err(Error::shape(op, format!("{n} values of {:?}", dst.dtype())));
    }
    need(op, dst, n, "dst")?;
    let u = ctx.uniform(&TrainParams {
        n: n as u32,
        eps: value,
        ..Default::default()
    });
    let binds = [
        Bind::U(&u),
        Bind::Skip,
        Bind::Skip,
        Bind::Skip,
        Bind::T(dst),
    ];
    ctx.dispatch(op, &key(op), &binds, grid(ctx, (n as u32).div_ceil(64))?)
}

/// Floats of scratch [`grad_norm`] needs for `n` values.
pub fn grad_norm_scratch(n: usize) -> usize {
    n.div_ceil(4096).max(1)
}

/// `norm[0] = sqrt(sum(v^2))` over the first `n` values of `v`, in two deterministic passes
/// (`partial` holds [`grad_norm_scratch`] floats).
pub fn grad_norm(
    ctx: &Context,
    norm: &Tensor,
    partial: &Tensor,
    v: &Tensor,
    n: usize,
) -> Result<Vec<Dispatch>> {
    let op = "grad_norm";
    let parts = grad_norm_scratch(n);
    need(op, v, n, "values")?;
    need(op, partial, parts, "partial")?;
    if parts > 65535 {
        return Err(Error::shape(op, format!("{n} values")));
    }
    let u1 = ctx.uniform(&TrainParams {
        n: n as u32,
        ..Default::default()
    });
    let u2 = ctx.uniform(&TrainParams {
        rows: parts as u32,
        ..Default::default()
    });
    Ok(vec![
        ctx.dispatch(
            "sumsq_partial",
            &key("sumsq_partial"),
            &[
                Bind::U(&u1),
                Bind::Skip,
                Bind::Skip,
                Bind::T(v),
                Bind::T(partial),
            ],
            [parts as u32, 1, 1],
        )?,
        ctx.dispatch(
            "sumsq_final",
            &key("sumsq_final"),
            &[
                Bind::U(&u2),
                Bind::Skip,
                Bind::Skip,
                Bind::T(partial),
                Bind::T(norm),
            ],
            [1, 1, 1],
        )?,
    ])
}

/// AdamW hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamConfig {
    /// Learning rate (may change every step: schedules).
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Clip gradients to this global norm (0: no clipping).
    pub max_norm: f32,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_norm: 0.0,
        }
    }
}

/// A prepared AdamW update over `n` parameters: its uniform is rewritten every step.
pub struct AdamW {
    uniform: wgpu::Buffer,
    /// The update dispatch (replayed every step).
    pub dispatch: Dispatch,
    n: usize,
}

impl AdamW {
    /// Prepares the update of `param` with `grad`, moments `m`, `v`, and the global gradient
    /// norm in `norm[0]`.
    pub fn new(
        ctx: &Context,
        param: &Tensor,
        grad: &Tensor,
        m: &Tensor,
        v: &Tensor,
        norm: &Tensor,
        n: usize,
    ) -> Result<AdamW> {
        for (name, t) in [("param", param), ("grad", grad), ("m", m), ("v", v)] {
            if t.dtype() != DType::F32 || t.numel() < n {
                return Err(Error::shape(
                    "adamw",
                    format!("{name} {:?} for {n} parameters", t.shape()),
                ));
            }
        }
        let uniform = ctx.uniform(&AdamParams {
            n: n as u32,
            ..Default::default()
        });
        let mut binds: Vec<Bind<'_>> = (0..12).map(|_| Bind::Skip).collect();
        binds.extend([
            Bind::U(&uniform),
            Bind::T(param),
            Bind::T(grad),
            Bind::T(m),
            Bind::T(v),
            Bind::T(norm),
        ]);
        let dispatch = ctx.dispatch(
            "adamw",
            &key("adamw"),
            &binds,
            grid(ctx, (n as u32).div_ceil(64))?,
        )?;
        Ok(AdamW {
            uniform,
            dispatch,
            n,
        })
    }

    /// Writes the hyperparameters of update number `step` (1-based).
    pub fn set_step(&self, ctx: &Context, c: &AdamConfig, step: u32) {
        let p = AdamParams {
            n: self.n as u32,
            clip: (c.max_norm > 0.0) as u32,
            lr: c.lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            bc1: 1.0 - c.beta1.powi(step as i32),
            bc2_sqrt: (1.0 - c.beta2.powi(step as i32)).sqrt(),
            max_norm: c.max_norm,
            ..Default::default()
        };
        ctx.queue()
            .write_buffer(&self.uniform, 0, bytemuck::bytes_of(&p));
    }
}

/// CPU reference of one AdamW step (torch's formula); returns false when the norm is not
/// finite (step skipped).
pub fn adamw_ref(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    c: &AdamConfig,
    step: u32,
) -> bool {
    let norm = g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32;
    if !norm.is_finite() {
        return false;
    }
    let coef = if c.max_norm > 0.0 {
        (c.max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    };
    let bc1 = 1.0 - c.beta1.powi(step as i32);
    let bc2s = (1.0 - c.beta2.powi(step as i32)).sqrt();
    for i in 0..p.len() {
        let gi = g[i] * coef;
        let mut w = p[i] * (1.0 - c.lr * c.weight_decay);
        m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * gi;
        v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * gi * gi;
        w -= (c.lr / bc1) * m[i] / (v[i].sqrt() / bc2s + c.eps);
        p[i] = w;
    }
    true
}

/// Every specialization (for the portability test).
#[cfg(test)]
pub(crate) fn keys() -> Vec<PipelineKey> {
    [
        "rmsnorm_backward",
        "swiglu_backward",
        "softmax_ranges",
        "softmax_backward",
        "xent",
        "xent_distill",
        "rows_accumulate",
        "rows_gather",
        "fill",
        "sumsq_partial",
        "sumsq_final",
        "adamw",
    ]
    .iter()
    .map(|e| key(e))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::norm::{norm_ref, NormKind};
    use crate::kernels::testing::{assert_close, ctx};
    use crate::util::Rng;

    /// Central finite differences of `f` at `x` along every coordinate (f64).
    fn fd(x: &[f32], f: &dyn Fn(&[f64]) -> f64) -> Vec<f32> {
        let h = 1e-5;
        let mut xs: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        (0..x.len())
            .map(|i| {
                let o = xs[i];
                xs[i] = o + h;
                let a = f(&xs);
                xs[i] = o - h;
                let b = f(&xs);
                xs[i] = o;
                ((a - b) / (2.0 * h)) as f32
            })
            .collect()
    }

    #[test]
    fn rmsnorm_backward_matches_finite_differences() {
        let ctx = ctx();
        let (rows, cols) = (3, 17);
        let mut rng = Rng::new(1);
        let x = rng.vec(rows * cols, -2.0, 2.0);
        let w = rng.vec(cols, 0.5, 1.5);
        let c = rng.vec(rows * cols, -1.0, 1.0); // loss = sum(c * y)
        let prior = rng.vec(rows * cols, -1.0, 1.0);
        let eps = 1e-5;
        let loss = |xs: &[f64]| -> f64 {
            let mut s = 0.0;
            for r in 0..rows {
                let row = &xs[r * cols..(r + 1) * cols];
                let ms = row.iter().map(|v| v * v).sum::<f64>() / cols as f64;
                let inv = 1.0 / (ms + eps as f64).sqrt();
                for j in 0..cols {
                    s += c[r * cols + j] as f64 * row[j] * inv * w[j] as f64;
                }
            }
            s
        };
        let want: Vec<f32> = fd(&x, &loss)
            .iter()
            .zip(&prior)
            .map(|(g, p)| g + p)
            .collect();
        let xt = Tensor::from_f32(ctx, &[rows, cols], &x).unwrap();
        let wt = Tensor::from_f32(ctx, &[cols], &w).unwrap();
        let dyt = Tensor::from_f32(ctx, &[rows, cols], &c).unwrap();
        let dxt = Tensor::from_f32(ctx, &[rows, cols], &prior).unwrap();
        ctx.run(&[
            rmsnorm_backward(ctx, &dxt, &xt, &wt, &dyt, rows, cols, cols, cols, eps, true).unwrap(),
        ])
        .unwrap();
        assert_close(
            "rmsnorm backward vs FD",
            &dxt.read_f32(ctx).unwrap(),
            &want,
            2e-4,
            2e-3,
        );
        // The forward reference is the one the kernels use.
        let _ = norm_ref(NormKind::Rms, &x, Some(&w), None, cols, eps);
    }

    #[test]
    fn swiglu_backward_matches_finite_differences() {
        let ctx = ctx();
        let (rows, ff) = (2, 9);
        let mut rng = Rng::new(2);
        let gu = rng.vec(rows * 2 * ff, -3.0, 3.0);
        let c = rng.vec(rows * ff, -1.0, 1.0);
        let loss = |v: &[f64]| -> f64 {
            let mut s = 0.0;
            for r in 0..rows {
                for j in 0..ff {
                    let g = v[r * 2 * ff + j];
                    let u = v[r * 2 * ff + ff + j];
                    s += c[r * ff + j] as f64 * g / (1.0 + (-g).exp()) * u;
                }
            }
            s
        };
        let want = fd(&gu, &loss);
        let gut = Tensor::from_f32(ctx, &[rows, 2 * ff], &gu).unwrap();
        let dat = Tensor::from_f32(ctx, &[rows, ff], &c).unwrap();
        let dgu = Tensor::zeros(ctx, &[rows, 2 * ff], DType::F32).unwrap();
        ctx.run(&[swiglu_backward(ctx, &dgu, &gut, &dat, rows, ff).unwrap()])
            .unwrap();
        assert_close(
            "swiglu backward vs FD",
            &dgu.read_f32(ctx).unwrap(),
            &want,
            1e-4,
            1e-3,
        );
    }

    #[test]
    fn masked_softmax_and_its_backward() {
        let ctx = ctx();
        let (heads, q, keys, ld) = (2, 3, 7, 8);
        let rows = heads * q;
        let mut rng = Rng::new(3);
        let s = rng.vec(rows * ld, -3.0, 3.0);
        let ranges: Vec<u32> = vec![0, 3, 2, 6, 5, 7];
        let c = rng.vec(rows * ld, -1.0, 1.0);
        let probs = |v: &[f64]| -> Vec<f64> {
            let mut out = vec![0.0; rows * ld];
            for r in 0..rows {
                let (a, b) = (
                    ranges[2 * (r % q)] as usize,
                    ranges[2 * (r % q) + 1] as usize,
                );
                let m = (a..b).map(|j| v[r * ld + j]).fold(f64::MIN, f64::max);
                let z: f64 = (a..b).map(|j| (v[r * ld + j] - m).exp()).sum();
                for j in a..b {
                    out[r * ld + j] = (v[r * ld + j] - m).exp() / z;
                }
            }
            out
        };
        let st = Tensor::from_f32(ctx, &[rows * ld], &s).unwrap();
        let rt = Tensor::from_slice(ctx, &[q * 2], DType::U32, &ranges).unwrap();
        ctx.run(&[softmax_ranges(ctx, &st, &rt, rows, keys, ld, q).unwrap()])
            .unwrap();
        let sd: Vec<f64> = s.iter().map(|&v| v as f64).collect();
        let want: Vec<f32> = probs(&sd).iter().map(|&v| v as f32).collect();
        let pv = st.read_f32(ctx).unwrap();
        assert_close("masked softmax", &pv, &want, 1e-7, 1e-5);
        // Backward: loss = sum(c * P(s)); dP = c.
        let loss = |v: &[f64]| -> f64 { probs(v).iter().zip(&c).map(|(p, c)| p * *c as f64).sum() };
        let want = fd(&s, &loss);
        let dp = Tensor::from_f32(ctx, &[rows * ld], &c).unwrap();
        ctx.run(&[softmax_backward(ctx, &dp, &st, rows, ld).unwrap()])
            .unwrap();
        assert_close(
            "softmax backward vs FD",
            &dp.read_f32(ctx).unwrap(),
            &want,
            1e-4,
            1e-3,
        );
    }

    /// The logits' gradient at columns `cols` of every row against central differences of
    /// `loss(logits, row)` (the loss of that row, or of all).
    fn check_logit_gradient(
        grad: &[f32],
        logits: &[f64],
        rows: usize,
        vocab: usize,
        cols: &[usize],
        loss: impl Fn(&[f64], usize) -> f64,
    ) {
        for r in 0..rows {
            for &j in cols {
                let i = r * vocab + j;
                let h = 1e-4;
                let mut a = logits.to_vec();
                a[i] += h;
                let mut b = logits.to_vec();
                b[i] -= h;
                let want = (loss(&a, r) - loss(&b, r)) / (2.0 * h);
                assert!(
                    (grad[i] as f64 - want).abs() < 1e-5,
                    "row {r} col {j}: {} vs {want}",
                    grad[i]
                );
            }
        }
    }

    #[test]
    fn cross_entropy_loss_and_gradient() {
        let ctx = ctx();
        let (rows, vocab) = (4, 1000);
        let mut rng = Rng::new(4);
        let logits = rng.vec(rows * vocab, -5.0, 5.0);
        let targets: Vec<u32> = vec![3, IGNORE, 999, 0];
        let weights: Vec<f32> = vec![0.5, 0.5, 0.25, 1.0];
        let lt = Tensor::from_f32(ctx, &[rows, vocab], &logits).unwrap();
        let tt = Tensor::from_slice(ctx, &[rows], DType::U32, &targets).unwrap();
        let wt = Tensor::from_f32(ctx, &[rows], &weights).unwrap();
        let loss = Tensor::zeros(ctx, &[rows], DType::F32).unwrap();
        ctx.run(&[xent(ctx, &lt, &tt, &wt, &loss, rows, vocab, vocab).unwrap()])
            .unwrap();
        let total = |v: &[f64]| -> f64 {
            (0..rows)
                .filter(|&r| targets[r] != IGNORE)
                .map(|r| {
                    let row = &v[r * vocab..(r + 1) * vocab];
                    let m = row.iter().cloned().fold(f64::MIN, f64::max);
                    let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                    weights[r] as f64 * (lse - row[targets[r] as usize])
                })
                .sum()
        };
        let ld: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
        let got_loss: f32 = loss.read_f32(ctx).unwrap().iter().sum();
        assert!(
            (got_loss as f64 - total(&ld)).abs() < 1e-4,
            "{got_loss} vs {}",
            total(&ld)
        );
        // FD on a few coordinates of each row (the full vocabulary is slow in f64 FD).
        let grad = lt.read_f32(ctx).unwrap();
        check_logit_gradient(&grad, &ld, rows, vocab, &[0, 3, 500, 999], |v, _| total(v));
    }

    #[test]
    fn distillation_loss_and_gradient() {
        let ctx = ctx();
        let (rows, vocab) = (4, 777);
        let mut rng = Rng::new(5);
        let logits = rng.vec(rows * vocab, -5.0, 5.0);
        let teacher = rng.vec(rows * vocab, -6.0, 6.0);
        // A distilled row, an ignored one, a plain target, another distilled row.
        let targets: Vec<u32> = vec![DISTILL, IGNORE, 7, DISTILL];
        let weights: Vec<f32> = vec![0.5, 0.5, 0.25, 2.0];
        let lt = Tensor::from_f32(ctx, &[rows, vocab], &logits).unwrap();
        let tt = Tensor::from_f32(ctx, &[rows, vocab], &teacher).unwrap();
        let tg = Tensor::from_slice(ctx, &[rows], DType::U32, &targets).unwrap();
        let wt = Tensor::from_f32(ctx, &[rows], &weights).unwrap();
        let loss = Tensor::zeros(ctx, &[rows], DType::F32).unwrap();
        ctx.run(&[xent_distill(ctx, &lt, &tt, &tg, &wt, &loss, rows, vocab, vocab).unwrap()])
            .unwrap();
        let log_softmax = |row: &[f64]| -> Vec<f64> {
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            row.iter().map(|x| x - lse).collect()
        };
        let teach: Vec<f64> = teacher.iter().map(|&v| v as f64).collect();
        let row_loss = |v: &[f64], r: usize| -> f64 {
            let lq = log_softmax(&v[r * vocab..(r + 1) * vocab]);
            let w = weights[r] as f64;
            match targets[r] {
                IGNORE => 0.0,
                DISTILL => {
                    let lp = log_softmax(&teach[r * vocab..(r + 1) * vocab]);
                    w * lp
                        .iter()
                        .zip(&lq)
                        .map(|(p, q)| p.exp() * (p - q))
                        .sum::<f64>()
                }
                t => -w * lq[t as usize],
            }
        };
        let ld: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
        let got = loss.read_f32(ctx).unwrap();
        for r in 0..rows {
            let want = row_loss(&ld, r);
            assert!(
                (got[r] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                "row {r}: loss {} vs {want}",
                got[r]
            );
        }
        assert!(
            got[0] > 0.0 && got[3] > 0.0,
            "KL of different logits is positive"
        );
        let grad = lt.read_f32(ctx).unwrap();
        check_logit_gradient(&grad, &ld, rows, vocab, &[0, 7, 400, 776], row_loss);
        // Student equal to teacher: no loss, no gradient.
        let lt = Tensor::from_f32(ctx, &[rows, vocab], &teacher).unwrap();
        ctx.run(&[xent_distill(ctx, &lt, &tt, &tg, &wt, &loss, rows, vocab, vocab).unwrap()])
            .unwrap();
        let l = loss.read_f32(ctx).unwrap();
        let g = lt.read_f32(ctx).unwrap();
        assert!(l[0].abs() < 1e-5 && l[3].abs() < 1e-5, "{l:?}");
        assert!(g[..vocab].iter().all(|v| v.abs() < 1e-6));
    }

    #[test]
    fn rows_accumulate_adds_in_order() {
        let ctx = ctx();
        let src: Vec<f32> = (0..12).map(|i| i as f32).collect(); // 4 rows of 3
        let map: Vec<u32> = vec![1, u32::MAX, 1, 0];
        let dst = Tensor::from_f32(ctx, &[2, 3], &[1.0; 6]).unwrap();
        let st = Tensor::from_f32(ctx, &[4, 3], &src).unwrap();
        let mt = Tensor::from_slice(ctx, &[4], DType::U32, &map).unwrap();
        ctx.run(&[rows_accumulate(ctx, &dst, &st, &mt, &RowCopy::packed(4, 3)).unwrap()])
            .unwrap();
        assert_eq!(
            dst.read_f32(ctx).unwrap(),
            vec![10.0, 11.0, 12.0, 7.0, 9.0, 11.0]
        );
    }

    #[test]
    fn rows_gather_places_rows_at_offsets_and_fill_sets_values() {
        let ctx = ctx();
        // src: 2 rows of 4 (ld 5, from element 1); dst: 3 rows of stride 6, columns 2..6.
        let src: Vec<f32> = (0..11).map(|i| i as f32).collect();
        let st = Tensor::from_f32(ctx, &[11], &src).unwrap();
        let dst = Tensor::from_f32(ctx, &[18], &[-1.0; 18]).unwrap();
        let mt = Tensor::from_slice(ctx, &[3], DType::U32, &[1u32, u32::MAX, 0]).unwrap();
        let c = RowCopy {
            rows: 3,
            cols: 4,
            ld_src: 5,
            ld_dst: 6,
            off_src: 1,
            off_dst: 2,
        };
        ctx.run(&[rows_gather(ctx, &dst, &st, &mt, &c).unwrap()])
            .unwrap();
        let mut want = vec![-1.0; 18];
        want[2..6].copy_from_slice(&[6.0, 7.0, 8.0, 9.0]);
        want[14..18].copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(dst.read_f32(ctx).unwrap(), want);
        ctx.run(&[fill(ctx, &dst, 0.5, 17).unwrap()]).unwrap();
        let got = dst.read_f32(ctx).unwrap();
        assert!(got[..17].iter().all(|&v| v == 0.5) && got[17] == 4.0);
    }

    #[test]
    fn adamw_matches_torch_formula_with_clipping_and_nan_skip() {
        let ctx = ctx();
        let n = 10_000;
        let mut rng = Rng::new(5);
        let mut p = rng.vec(n, -1.0, 1.0);
        let mut m = vec![0.0; n];
        let mut v = vec![0.0; n];
        let pt = Tensor::from_f32(ctx, &[n], &p).unwrap();
        let gt = Tensor::zeros(ctx, &[n], DType::F32).unwrap();
        let mt = Tensor::zeros(ctx, &[n], DType::F32).unwrap();
        let vt = Tensor::zeros(ctx, &[n], DType::F32).unwrap();
        let norm = Tensor::zeros(ctx, &[1], DType::F32).unwrap();
        let part = Tensor::zeros(ctx, &[grad_norm_scratch(n)], DType::F32).unwrap();
        let adam = AdamW::new(ctx, &pt, &gt, &mt, &vt, &norm, n).unwrap();
        let mut ops = grad_norm(ctx, &norm, &part, &gt, n).unwrap();
        ops.push(adam.dispatch.clone());
        for step in 1..=4u32 {
            let c = AdamConfig {
                lr: 0.01,
                weight_decay: 0.1,
                max_norm: if step % 2 == 0 { 0.5 } else { 0.0 },
                ..Default::default()
            };
            let mut g = rng.vec(n, -0.1, 0.1);
            if step == 3 {
                g[7] = f32::NAN;
            }
            gt.write(ctx, &g).unwrap();
            adam.set_step(ctx, &c, step);
            ctx.run(&ops).unwrap();
            let stepped = adamw_ref(&mut p, &g, &mut m, &mut v, &c, step);
            assert_eq!(stepped, step != 3);
            let gn = norm.read_f32(ctx).unwrap()[0];
            if step != 3 {
                let want = g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32;
                assert!((gn - want).abs() < 1e-5 * want, "norm {gn} vs {want}");
            }
            assert_close(
                &format!("adamw step {step}"),
                &pt.read_f32(ctx).unwrap(),
                &p,
                1e-7,
                1e-5,
            );
        }
    }
}
