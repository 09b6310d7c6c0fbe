//! Elementwise operations (`shaders/elementwise.wgsl`): add / mul / sub with broadcasting,
//! SiLU, GELU (tanh and erf forms), scaling, copies, and SwiGLU.

use crate::error::{Error, Result};
use crate::gpu::{grid, Bind, Context, DType, Dispatch, PipelineKey, Tensor};
use crate::uniform;

uniform! {
    /// Uniform of `shaders/elementwise.wgsl`.
    pub struct EltParams {
        n: u32,
        b_len: u32,
        ff: u32,
        scale: f32,
    }
}

/// Binary operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    /// `a + b`
    Add = 0,
    /// `a * b`
    Mul = 1,
    /// `a - b`
    Sub = 2,
}

/// Unary functions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnaryOp {
    /// `x * sigmoid(x)`
    Silu,
    /// GELU, tanh approximation (ggml's `gelu`, HF `gelu_pytorch_tanh`).
    GeluTanh,
    /// GELU with erf (HF `gelu`).
    GeluErf,
    /// `x * s`
    Scale(f32),
    /// `x`
    Copy,
}

impl UnaryOp {
    fn code(self) -> (u32, f32) {
        match self {
            UnaryOp::Silu => (0, 1.0),
            UnaryOp::GeluTanh => (1, 1.0),
            UnaryOp::GeluErf => (2, 1.0),
            UnaryOp::Scale(s) => (3, s),
            UnaryOp::Copy => (4, 1.0),
        }
    }

    /// CPU reference of one value (f64).
    pub fn apply(self, x: f32) -> f32 {
        let x = x as f64;
        (match self {
            UnaryOp::Silu => x / (1.0 + (-x).exp()),
            UnaryOp::GeluTanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * x * (1.0 + 0.044715 * x * x)).tanh())
            }
            UnaryOp::GeluErf => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
            UnaryOp::Scale(s) => x * s as f64,
            UnaryOp::Copy => x,
        }) as f32
    }
}

/// erf for the CPU reference (series / continued fraction, ~1e-15).
fn erf(x: f64) -> f64 {
    let t = x.abs();
    let r = if t < 2.5 {
        // Maclaurin series.
        let mut sum = t;
        let mut term = t;
        let mut n = 0.0;
        loop {
            n += 1.0;
            term *= -t * t / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        // Continued fraction for erfc.
        let mut f = 0.0;
        for k in (1..60).rev() {
            f = (k as f64 / 2.0) / (t + f);
        }
        1.0 - (-t * t).exp() / std::f64::consts::PI.sqrt() / (t + f)
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

/// Every specialization (for the portability test).
#[cfg(test)]
pub(crate) fn keys() -> Vec<PipelineKey> {
    let mut v = Vec::new();
    for op in 0..3 {
        for e in ["binary", "binary_inplace"] {
            v.push(PipelineKey::new("elementwise", e).constant("OP", op as f64));
        }
    }
    for f in 0..5 {
        for e in ["unary", "unary_inplace"] {
            v.push(PipelineKey::new("elementwise", e).constant("F", f as f64));
        }
    }
    for sep in [0.0, 1.0] {
        v.push(PipelineKey::new("elementwise", "swiglu").constant("SEPARATE", sep));
    }
    v
}

fn n_u32(n: usize) -> Result<u32> {
    u32::try_from(n)
        .map_err(|_| Error::shape("elementwise", format!("{n} elements exceed 32 bits")))
}

fn check_f32(op: &'static str, t: &Tensor, n: usize, name: &str) -> Result<()> {
    if t.dtype() != DType::F32 || t.numel() < n {
        return Err(Error::shape(
            op,
            format!("{name} is {:?} {:?}, needs {n} f32", t.dtype(), t.shape()),
        ));
    }
    Ok(())
}

/// `out[i] = a[i] op b[i % b_len]` for `i < n`, or `out[i] = out[i] op b[..]` when `a` is
/// `None` (in place). `b_len` divides `n` (a broadcast row, or 1 for a scalar).
pub fn binary(
    ctx: &Context,
    op: BinaryOp,
    out: &Tensor,
    a: Option<&Tensor>,
    b: &Tensor,
    n: usize,
    b_len: usize,
) -> Result<Dispatch> {
    if n == 0 || b_len == 0 || n % b_len != 0 {
        return Err(Error::shape("binary", format!("n={n} b_len={b_len}")));
    }
    check_f32("binary", out, n, "out")?;
    check_f32("binary", b, b_len, "b")?;
    if let Some(a) = a {
        check_f32("binary", a, n, "a")?;
    }
    let entry = if a.is_some() {
        "binary"
    } else {
        "binary_inplace"
    };
    let key = PipelineKey::new("elementwise", entry).constant("OP", op as u32 as f64);
    let u = ctx.uniform(&EltParams {
        n: n_u32(n)?,
        b_len: n_u32(b_len)?,
        ff: 0,
        scale: 1.0,
    });
    ctx.dispatch(
        "binary",
        &key,
        &[
            Bind::U(&u),
            a.map(Bind::T).unwrap_or(Bind::Skip),
            Bind::T(b),
            Bind::T(out),
        ],
        grid(ctx, n_u32(n)?.div_ceil(64))?,
    )
}

/// `out[i] = f(a[i])`, or in place when `a` is `None`.
pub fn unary(
    ctx: &Context,
    f: UnaryOp,
    out: &Tensor,
    a: Option<&Tensor>,
    n: usize,
) -> Result<Dispatch> {
    if n == 0 {
        return Err(Error::shape("unary", "no elements"));
    }
    check_f32("unary", out, n, "out")?;
    if let Some(a) = a {
        check_f32("unary", a, n, "a")?;
    }
    let (code, scale) = f.code();
    let entry = if a.is_some() {
        "unary"
    } else {
        "unary_inplace"
    };
    let key = PipelineKey::new("elementwise", entry).constant("F", code as f64);
    let u = ctx.uniform(&EltParams {
        n: n_u32(n)?,
        b_len: 1,
        ff: 0,
        scale,
    });
    ctx.dispatch(
        "unary",
        &key,
        &[
            Bind::U(&u),
            a.map(Bind::T).unwrap_or(Bind::Skip),
            Bind::Skip,
            Bind::T(out),
        ],
        grid(ctx, n_u32(n)?.div_ceil(64))?,
    )
}

/// SwiGLU: `out[r][j] = silu(gate) * up`. With `up = None`, `gate_up` is `[rows][2 * ff]`
/// holding gate then up in each row (one fused matmul); otherwise `gate_up` is the gate
/// `[rows][ff]` and `up` the up projection.
pub fn swiglu(
    ctx: &Context,
    out: &Tensor,
    gate_up: &Tensor,
    up: Option<&Tensor>,
    rows: usize,
    ff: usize,
) -> Result<Dispatch> {
    let n = rows * ff;
    if n == 0 {
        return Err(Error::shape("swiglu", "no elements"));
    }
    check_f32("swiglu", out, n, "out")?;
    check_f32(
        "swiglu",
        gate_up,
        if up.is_some() { n } else { 2 * n },
        "gate_up",
    )?;
    if let Some(u) = up {
        check_f32("swiglu", u, n, "up")?;
    }
    let key =
        PipelineKey::new("elementwise", "swiglu").constant("SEPARATE", up.is_some() as u32 as f64);
    let u = ctx.uniform(&EltParams {
        n: n_u32(n)?,
        b_len: 1,
        ff: n_u32(ff)?,
        scale: 1.0,
    });
    ctx.dispatch(
        "swiglu",
        &key,
        // The fused form never reads `b`, but the layout still has it: bind gate_up twice.
        &[
            Bind::U(&u),
            Bind::T(gate_up),
            Bind::T(up.unwrap_or(gate_up)),
            Bind::T(out),
        ],
        grid(ctx, n_u32(n)?.div_ceil(64))?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_close, ctx};
    use crate::util::Rng;

    #[test]
    fn binary_ops_with_broadcast_and_in_place() {
        let ctx = ctx();
        let mut rng = Rng::new(1);
        for &(n, b_len) in &[(1, 1), (17, 17), (65, 5), (1000, 1), (4099, 4099)] {
            for op in [BinaryOp::Add, BinaryOp::Mul, BinaryOp::Sub] {
                let av = rng.vec(n, -2.0, 2.0);
                let bv = rng.vec(b_len, -2.0, 2.0);
                let f = |x: f32, y: f32| match op {
                    BinaryOp::Add => x + y,
                    BinaryOp::Mul => x * y,
                    BinaryOp::Sub => x - y,
                };
                let want: Vec<f32> = (0..n).map(|i| f(av[i], bv[i % b_len])).collect();
                let a = Tensor::from_f32(ctx, &[n], &av).unwrap();
                let b = Tensor::from_f32(ctx, &[b_len], &bv).unwrap();
                let out = Tensor::zeros(ctx, &[n], DType::F32).unwrap();
                ctx.run(&[binary(ctx, op, &out, Some(&a), &b, n, b_len).unwrap()])
                    .unwrap();
                assert_close("binary", &out.read_f32(ctx).unwrap(), &want, 0.0, 1e-7);
                ctx.run(&[binary(ctx, op, &a, None, &b, n, b_len).unwrap()])
                    .unwrap();
                assert_close(
                    "binary in place",
                    &a.read_f32(ctx).unwrap(),
                    &want,
                    0.0,
                    1e-7,
                );
            }
        }
        let a = Tensor::zeros(ctx, &[10], DType::F32).unwrap();
        assert!(binary(ctx, BinaryOp::Add, &a, None, &a, 10, 3).is_err());
    }

    #[test]
    fn unary_functions() {
        let ctx = ctx();
        let mut rng = Rng::new(2);
        for n in [1, 63, 1000] {
            for f in [
                UnaryOp::Silu,
                UnaryOp::GeluTanh,
                UnaryOp::GeluErf,
                UnaryOp::Scale(-0.5),
                UnaryOp::Copy,
            ] {
                let av = rng.vec(n, -8.0, 8.0);
                let want: Vec<f32> = av.iter().map(|&x| f.apply(x)).collect();
                let a = Tensor::from_f32(ctx, &[n], &av).unwrap();
                let out = Tensor::zeros(ctx, &[n], DType::F32).unwrap();
                ctx.run(&[unary(ctx, f, &out, Some(&a), n).unwrap()])
                    .unwrap();
                assert_close(
                    &format!("{f:?}"),
                    &out.read_f32(ctx).unwrap(),
                    &want,
                    5e-7,
                    2e-6,
                );
                ctx.run(&[unary(ctx, f, &a, None, n).unwrap()]).unwrap();
                assert_close(
                    &format!("{f:?} in place"),
                    &a.read_f32(ctx).unwrap(),
                    &want,
                    5e-7,
                    2e-6,
                );
            }
        }
    }

    #[test]
    fn swiglu_fused_and_separate() {
        let ctx = ctx();
        let mut rng = Rng::new(3);
        for &(rows, ff) in &[(1, 1), (3, 17), (9, 1536)] {
            let gu = rng.vec(rows * 2 * ff, -4.0, 4.0);
            let mut want = Vec::new();
            for r in 0..rows {
                for j in 0..ff {
                    want.push(UnaryOp::Silu.apply(gu[r * 2 * ff + j]) * gu[r * 2 * ff + ff + j]);
                }
            }
            let t = Tensor::from_f32(ctx, &[rows, 2 * ff], &gu).unwrap();
            let out = Tensor::zeros(ctx, &[rows, ff], DType::F32).unwrap();
            ctx.run(&[swiglu(ctx, &out, &t, None, rows, ff).unwrap()])
                .unwrap();
            assert_close(
                "swiglu fused",
                &out.read_f32(ctx).unwrap(),
                &want,
                1e-6,
                2e-6,
            );
            let g: Vec<f32> = (0..rows)
                .flat_map(|r| gu[r * 2 * ff..r * 2 * ff + ff].to_vec())
                .collect();
            let u: Vec<f32> = (0..rows)
                .flat_map(|r| gu[r * 2 * ff + ff..(r + 1) * 2 * ff].to_vec())
                .collect();
            let gt = Tensor::from_f32(ctx, &[rows, ff], &g).unwrap();
            let ut = Tensor::from_f32(ctx, &[rows, ff], &u).unwrap();
            ctx.run(&[swiglu(ctx, &out, &gt, Some(&ut), rows, ff).unwrap()])
                .unwrap();
            assert_close(
                "swiglu separate",
                &out.read_f32(ctx).unwrap(),
                &want,
                1e-6,
                2e-6,
            );
        }
    }

    #[test]
    fn erf_reference_is_accurate() {
        // Known values.
        assert!((erf(0.5) - 0.520_499_877_813_046_5).abs() < 1e-14);
        assert!((erf(3.0) - 0.999_977_909_503_001_4).abs() < 1e-14);
        assert!((erf(-1.0) + 0.842_700_792_949_714_9).abs() < 1e-14);
    }
}
