//! Dense matrix multiply, `C = alpha * op(A) . op(B)` (`+ C` when accumulating), batched.
//!
//! Layouts (row-major, leading dimensions in elements):
//! - `A`: `[batch][M][K]`, or `[batch][K][M]` with [`MatmulDesc::a_km`];
//! - `B`: `[batch][N][K]` (the weight layout: one row per output feature), or `[batch][K][N]`
//!   with [`MatmulDesc::b_kn`]; f32 or f16;
//! - `C`: `[batch][M][ldc]` f32, written at columns `c_offset .. c_offset + N`.
//!
//! Inference uses `A . B^T` with B the weights (`[N][K]`); training's input gradient is
//! `dY . W` (`b_kn`) and its weight gradient `dY^T . X` (`a_km` + `b_kn`).

use crate::error::{Error, Result};
use crate::gpu::{Bind, Context, DType, Dispatch, PipelineKey, Tensor};
use crate::kernels::Variant;
use crate::uniform;

uniform! {
    /// Uniform of `shaders/matmul.wgsl`.
    pub struct MatmulParams {
        m: u32,
        n: u32,
        k: u32,
        batch: u32,
        lda: u32,
        ldb: u32,
        ldc: u32,
        c_offset: u32,
        stride_a: u32,
        stride_b: u32,
        stride_c: u32,
        alpha: f32,
        off_a: u32,
        off_b: u32,
        off_c: u32,
        b_div: u32,
    }
}

/// Shapes, layouts and epilogue of one matmul.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatmulDesc {
    /// Rows of op(A) and C.
    pub m: usize,
    /// Columns of op(B) and C (the part written).
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// Independent products (workgroup z).
    pub batch: usize,
    /// A is stored `[K][M]`.
    pub a_km: bool,
    /// B is stored `[K][N]`.
    pub b_kn: bool,
    /// Leading dimension of A (default: K, or M with `a_km`).
    pub lda: usize,
    /// Leading dimension of B (default: K, or N with `b_kn`).
    pub ldb: usize,
    /// Leading dimension of C (default: N).
    pub ldc: usize,
    /// First column of C written.
    pub c_offset: usize,
    /// Elements between batches of A, B and C (default: packed).
    pub stride_a: usize,
    /// See `stride_a`.
    pub stride_b: usize,
    /// See `stride_a`.
    pub stride_c: usize,
    /// Element offsets of A, B and C in their tensors.
    pub off_a: usize,
    /// See `off_a`.
    pub off_b: usize,
    /// See `off_a`.
    pub off_c: usize,
    /// Batch `z` uses B's batch `z / b_div` (query heads sharing a key/value head).
    pub b_div: usize,
    /// Scale applied to the product.
    pub alpha: f32,
    /// Add to C instead of overwriting it (fuses a residual add).
    pub accumulate: bool,
}

impl MatmulDesc {
    /// `C[M][N] = A[M][K] . B[N][K]^T`, packed, one batch.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        MatmulDesc {
            m,
            n,
            k,
            batch: 1,
            a_km: false,
            b_kn: false,
            lda: k,
            ldb: k,
            ldc: n,
            c_offset: 0,
            stride_a: m * k,
            stride_b: n * k,
            stride_c: m * n,
            off_a: 0,
            off_b: 0,
            off_c: 0,
            b_div: 1,
            alpha: 1.0,
            accumulate: false,
        }
    }

    /// Sets the layouts, resetting leading dimensions and strides to packed.
    pub fn layout(mut self, a_km: bool, b_kn: bool) -> Self {
        self.a_km = a_km;
        self.b_kn = b_kn;
        self.lda = if a_km { self.m } else { self.k };
        self.ldb = if b_kn { self.n } else { self.k };
        self
    }

    /// Sets the batch count with packed strides.
    pub fn batched(mut self, batch: usize) -> Self {
        self.batch = batch;
        self.stride_a = self.m * self.k;
        self.stride_b = self.n * self.k;
        self.stride_c = self.m * self.ldc;
        self
    }

    /// Index one past the last element of A, B and C that the product touches.
    fn extents(&self) -> Option<(usize, usize, usize)> {
        let last_batch = self.batch.checked_sub(1)?;
        let a_rows = if self.a_km { self.k } else { self.m };
        let a_cols = if self.a_km { self.m } else { self.k };
        let b_rows = if self.b_kn { self.k } else { self.n };
        let b_cols = if self.b_kn { self.n } else { self.k };
        let end = |stride: usize, rows: usize, ld: usize, cols: usize| {
            last_batch
                .checked_mul(stride)?
                .checked_add((rows - 1).checked_mul(ld)?)?
                .checked_add(cols)
        };
        let b_batches = (last_batch / self.b_div.max(1)) * self.stride_b;
        let b_end = b_batches
            .checked_add((b_rows - 1).checked_mul(self.ldb)?)?
            .checked_add(b_cols)?;
        Some((
            self.off_a
                .checked_add(end(self.stride_a, a_rows, self.lda, a_cols)?)?,
            self.off_b.checked_add(b_end)?,
            self.off_c.checked_add(end(
                self.stride_c,
                self.m,
                self.ldc,
                self.c_offset + self.n,
            )?)?,
        ))
    }

    fn check(&self, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<()> {
        let d = self;
        if d.m == 0 || d.n == 0 || d.k == 0 || d.batch == 0 || d.b_div == 0 {
            return Err(Error::shape("matmul", format!("empty product {d:?}")));
        }
        let lda_min = if d.a_km { d.m } else { d.k };
        let ldb_min = if d.b_kn { d.n } else { d.k };
        if d.lda < lda_min || d.ldb < ldb_min || d.ldc < d.c_offset + d.n {
            return Err(Error::shape(
                "matmul",
                format!(
                    "leading dimensions lda={} ldb={} ldc={} too small for M={} N={} K={} (c_offset {})",
                    d.lda, d.ldb, d.ldc, d.m, d.n, d.k, d.c_offset
                ),
            ));
        }
        let (ea, eb, ec) = d
            .extents()
            .ok_or_else(|| Error::shape("matmul", format!("sizes overflow: {d:?}")))?;
        for (name, t, need) in [("A", a, ea), ("B", b, eb), ("C", c, ec)] {
            if t.numel() < need {
                return Err(Error::shape(
                    "matmul",
                    format!(
                        "{name} has {} elements {:?} but M={} N={} K={} batch={} needs {need}",
                        t.numel(),
                        t.shape(),
                        d.m,
                        d.n,
                        d.k,
                        d.batch
                    ),
                ));
            }
        }
        if a.dtype() != DType::F32 || c.dtype() != DType::F32 {
            return Err(Error::shape(
                "matmul",
                format!(
                    "A and C must be f32, got {:?} and {:?}",
                    a.dtype(),
                    c.dtype()
                ),
            ));
        }
        if !matches!(b.dtype(), DType::F32 | DType::F16) {
            return Err(Error::shape(
                "matmul",
                format!("B must be f32 or f16, got {:?}", b.dtype()),
            ));
        }
        let max = u32::MAX as usize;
        if ea > max || eb > max || ec > max {
            return Err(Error::shape("matmul", "tensor indices exceed 32 bits"));
        }
        Ok(())
    }
}

/// Pipeline of one specialization: defines `[A_VEC4, B_VEC4, B_F16, F16]`, overrides
/// `[A_KM, B_KN, ACCUMULATE]`.
fn key(entry: &'static str, defs: [bool; 4], overrides: [bool; 3], rs: u32) -> PipelineKey {
    let k = PipelineKey::new("matmul", entry)
        .def("A_VEC4", defs[0])
        .def("B_VEC4", defs[1])
        .def("B_F16", defs[2])
        .def("F16", defs[3])
        .def("SUBGROUP", entry == "matmul_sg")
        .constant("A_KM", overrides[0] as u32 as f64)
        .constant("B_KN", overrides[1] as u32 as f64)
        .constant("ACCUMULATE", overrides[2] as u32 as f64);
    if entry == "matmul_sg" {
        k.constant("RS", rs as f64)
    } else {
        k
    }
}

/// Row splits of `matmul_sg` for a product `n` columns wide: a workgroup covers
/// `8 * rs` rows and `256 / rs` columns.
fn row_splits(n: usize) -> u32 {
    match n {
        0..=32 => 8,
        33..=64 => 4,
        65..=128 => 2,
        _ => 1,
    }
}

/// Every specialization [`matmul`] can build (for the portability test).
#[cfg(test)]
pub(crate) fn keys() -> Vec<PipelineKey> {
    let mut v = Vec::new();
    for entry in ["matmul_sg", "matmul_tiled"] {
        for bits in 0..16u32 {
            let defs = [bits & 1 != 0, bits & 2 != 0, bits & 4 != 0, bits & 8 != 0];
            if defs[3] && !defs[2] {
                continue; // native f16 loads only for f16 weights
            }
            for o in 0..8u32 {
                for rs in [1, 2, 4, 8] {
                    v.push(key(entry, defs, [o & 1 != 0, o & 2 != 0, o & 4 != 0], rs));
                }
            }
        }
    }
    v
}

/// Builds the dispatch for `desc` over `a`, `b` into `c`.
pub fn matmul(
    ctx: &Context,
    c: &Tensor,
    a: &Tensor,
    b: &Tensor,
    desc: &MatmulDesc,
    variant: Variant,
) -> Result<Dispatch> {
    desc.check(a, b, c)?;
    let variant = variant.resolve(ctx);
    if variant == Variant::Subgroup && !Variant::subgroup_available(ctx) {
        return Err(Error::Unsupported(
            "matmul: subgroup variant needs 8-wide subgroups".into(),
        ));
    }
    let b_f16 = b.dtype() == DType::F16;
    let d = desc;
    // vec4 views need 4-aligned leading dimensions, strides and byte offsets.
    let a_vec4 = !d.a_km
        && d.lda % 4 == 0
        && d.stride_a % 4 == 0
        && d.off_a % 4 == 0
        && a.offset() % 16 == 0;
    let b_align = if b_f16 { 8 } else { 16 };
    let b_vec4 =
        d.ldb % 4 == 0 && d.stride_b % 4 == 0 && d.off_b % 4 == 0 && b.offset() % b_align == 0;
    let rs = row_splits(d.n);
    let (entry, groups) = match variant {
        Variant::Subgroup => (
            "matmul_sg",
            [
                d.n.div_ceil(256 / rs as usize),
                d.m.div_ceil(8 * rs as usize),
                d.batch,
            ],
        ),
        _ => (
            "matmul_tiled",
            [d.n.div_ceil(64), d.m.div_ceil(64), d.batch],
        ),
    };
    let key = key(
        entry,
        [a_vec4, b_vec4, b_f16, b_f16 && ctx.caps().f16],
        [d.a_km, d.b_kn, d.accumulate],
        rs,
    );
    let params = MatmulParams {
        m: d.m as u32,
        n: d.n as u32,
        k: d.k as u32,
        batch: d.batch as u32,
        lda: d.lda as u32,
        ldb: d.ldb as u32,
        ldc: d.ldc as u32,
        c_offset: d.c_offset as u32,
        stride_a: d.stride_a as u32,
        stride_b: d.stride_b as u32,
        stride_c: d.stride_c as u32,
        alpha: d.alpha,
        off_a: d.off_a as u32,
        off_b: d.off_b as u32,
        off_c: d.off_c as u32,
        b_div: d.b_div as u32,
    };
    let u = ctx.uniform(&params);
    let groups = [groups[0] as u32, groups[1] as u32, groups[2] as u32];
    ctx.dispatch(
        "matmul",
        &key,
        &[Bind::U(&u), Bind::T(a), Bind::T(b), Bind::T(c)],
        groups,
    )
}

/// CPU reference: `c` is updated as the GPU kernel would (f64 accumulation).
pub fn matmul_ref(a: &[f32], b: &[f32], c: &mut [f32], d: &MatmulDesc) {
    for z in 0..d.batch {
        for i in 0..d.m {
            for j in 0..d.n {
                let mut s = 0.0f64;
                for kk in 0..d.k {
                    let ab = d.off_a + z * d.stride_a;
                    let bb = d.off_b + (z / d.b_div) * d.stride_b;
                    let av = if d.a_km {
                        a[ab + kk * d.lda + i]
                    } else {
                        a[ab + i * d.lda + kk]
                    };
                    let bv = if d.b_kn {
                        b[bb + kk * d.ldb + j]
                    } else {
                        b[bb + j * d.ldb + kk]
                    };
                    s += av as f64 * bv as f64;
                }
                let o = &mut c[d.off_c + z * d.stride_c + i * d.ldc + d.c_offset + j];
                let v = d.alpha as f64 * s;
                *o = if d.accumulate {
                    (*o as f64 + v) as f32
                } else {
                    v as f32
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{assert_close, contexts, ctx};
    use crate::util::Rng;

    fn run_case(ctx: &Context, desc: MatmulDesc, b_f16: bool, variant: Variant, seed: u64) {
        let mut rng = Rng::new(seed);
        let (ea, eb, ec) = desc.extents().unwrap();
        let av = rng.vec(ea, -1.0, 1.0);
        let mut bv = rng.vec(eb, -1.0, 1.0);
        if b_f16 {
            // The reference sees exactly the f16 values the GPU reads.
            for x in &mut bv {
                *x = half::f16::from_f32(*x).to_f32();
            }
        }
        let c0 = rng.vec(ec, -1.0, 1.0);
        let a = Tensor::from_f32(ctx, &[ea], &av).unwrap();
        let b = if b_f16 {
            Tensor::from_f32_as_f16(ctx, &[eb], &bv).unwrap()
        } else {
            Tensor::from_f32(ctx, &[eb], &bv).unwrap()
        };
        let c = Tensor::from_f32(ctx, &[ec], &c0).unwrap();
        let op = matmul(ctx, &c, &a, &b, &desc, variant).unwrap();
        ctx.run(&[op]).unwrap();
        let got = c.read_f32(ctx).unwrap();
        let mut want = c0.clone();
        matmul_ref(&av, &bv, &mut want, &desc);
        let atol = 2e-6 * (desc.k as f32).sqrt() * desc.alpha.abs().max(1.0);
        assert_close(
            &format!("{variant:?} f16={b_f16} {desc:?}"),
            &got,
            &want,
            atol,
            1e-5,
        );
    }

    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (3, 17, 5),
        (17, 63, 65),
        (65, 3, 17),
        (64, 256, 64),
        (8, 1030, 12),
        (2, 5, 1001),
        (1003, 9, 7),
    ];

    #[test]
    fn matches_reference_all_layouts_and_variants() {
        for ctx in contexts() {
            for variant in Variant::all(ctx) {
                for (i, &(m, n, k)) in SHAPES.iter().enumerate() {
                    for (a_km, b_kn) in [(false, false), (false, true), (true, false), (true, true)]
                    {
                        let d = MatmulDesc::new(m, n, k).layout(a_km, b_kn);
                        run_case(ctx, d, false, variant, i as u64);
                    }
                }
            }
        }
    }

    #[test]
    fn f16_weights() {
        // Native f16 loads (SHADER_F16) and the unpack2x16float fallback, same inputs.
        for ctx in contexts() {
            for variant in Variant::all(ctx) {
                for (i, &(m, n, k)) in SHAPES.iter().enumerate() {
                    for b_kn in [false, true] {
                        let d = MatmulDesc::new(m, n, k).layout(false, b_kn);
                        run_case(ctx, d, true, variant, 100 + i as u64);
                    }
                }
            }
        }
    }

    #[test]
    fn batched_strided_accumulate() {
        let ctx = ctx();
        for variant in Variant::all(ctx) {
            let mut d = MatmulDesc::new(9, 13, 20).batched(3);
            d.ldc = 20;
            d.c_offset = 5;
            d.stride_c = 9 * 20;
            d.alpha = 0.5;
            d.accumulate = true;
            run_case(ctx, d, false, variant, 7);
            let d = MatmulDesc::new(5, 6, 4).layout(true, true).batched(2);
            run_case(ctx, d, false, variant, 8);
            // Offsets and grouped B batches, as attention uses them: 6 query heads over 2
            // key heads, interleaved [token][head][dim] rows.
            let (t, hd, l) = (5, 8, 7);
            let mut d = MatmulDesc::new(t, l, hd).batched(6);
            d.lda = 6 * hd;
            d.stride_a = hd;
            d.ldb = 2 * hd;
            d.stride_b = hd;
            d.b_div = 3;
            d.off_a = 4;
            d.off_b = 8;
            d.off_c = 3;
            d.alpha = 0.25;
            for vec4_offsets in [true, false] {
                if !vec4_offsets {
                    d.off_a = 1;
                    d.off_b = 2;
                }
                run_case(ctx, d, false, variant, 9);
            }
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let ctx = ctx();
        let a = Tensor::zeros(ctx, &[4, 4], DType::F32).unwrap();
        let b = Tensor::zeros(ctx, &[4, 4], DType::F32).unwrap();
        let c = Tensor::zeros(ctx, &[4, 3], DType::F32).unwrap();
        let e = matmul(ctx, &c, &a, &b, &MatmulDesc::new(4, 4, 4), Variant::Auto).unwrap_err();
        assert!(e.to_string().contains("C has 12 elements"), "{e}");
        let e = matmul(ctx, &c, &a, &b, &MatmulDesc::new(0, 4, 4), Variant::Auto).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let u = Tensor::zeros(ctx, &[16], DType::U32).unwrap();
        let c = Tensor::zeros(ctx, &[16], DType::F32).unwrap();
        assert!(matmul(ctx, &c, &a, &u, &MatmulDesc::new(4, 4, 4), Variant::Auto).is_err());
    }
}
