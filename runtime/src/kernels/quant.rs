//! Products with GGUF-quantized weights and the quantized embedding gather
//! (`shaders/quant.wgsl`). Weights stay quantized on the GPU, in the repacked layout of
//! [`crate::quant`], and are dequantized inside the kernels.

use crate::error::{Error, Result};
use crate::gpu::{Bind, Context, DType, Dispatch, PipelineKey, Tensor};
use crate::kernels::Variant;
use crate::quant::{QuantType, Repacked};
use crate::uniform;

uniform! {
    /// Uniform of `shaders/quant.wgsl`.
    pub struct QuantParams {
        m: u32,
        n: u32,
        k: u32,
        ldx: u32,
        ldy: u32,
        y_offset: u32,
        row_start: u32,
        n_ids: u32,
        glu4: u32,
        experts: u32,
        all_experts: u32,
        _pad2: u32,
    }
}

/// Rows `row_start .. row_start + rows` of a quantized matrix, in buffers that each fit one
/// storage binding.
#[derive(Debug, Clone)]
pub struct QChunk {
    /// First row held.
    pub row_start: usize,
    /// Rows held.
    pub rows: usize,
    /// Quant words, `[rows][blocks][q_words]` u32.
    pub q: Tensor,
    /// Scale words, `[rows][blocks][s_words]` u32.
    pub s: Tensor,
}

/// A `rows x cols` quantized matrix on the GPU, split by rows into chunks that fit the
/// device's largest storage binding.
#[derive(Debug, Clone)]
pub struct QMatrix {
    /// Format.
    pub ty: QuantType,
    /// Rows (output features, or vocabulary entries for an embedding table).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// Row chunks, in order.
    pub chunks: Vec<QChunk>,
}

impl QMatrix {
    /// Uploads a repacked matrix, splitting it by rows where one binding cannot hold it.
    pub fn upload(ctx: &Context, r: &Repacked) -> Result<QMatrix> {
        Self::upload_aligned(ctx, r, 1)
    }

    /// [`QMatrix::upload`] with chunks of a multiple of `align` rows (whole experts).
    fn upload_aligned(ctx: &Context, r: &Repacked, align: usize) -> Result<QMatrix> {
        let blocks = r.cols / r.ty.block_elems();
        let row_q = blocks * r.ty.q_words();
        let row_s = blocks * r.ty.s_words();
        let max_words = (ctx.caps().max_binding / 4) as usize;
        let per_chunk = (max_words / row_q.max(row_s)).min(r.rows) / align * align;
        if per_chunk == 0 {
            return Err(Error::Limit {
                what: format!("{align} {} row(s) of {} columns", r.ty.name(), r.cols),
                needed: (align * row_q * 4) as u64,
                limit: ctx.caps().max_binding,
            });
        }
        let mut chunks = Vec::new();
        let mut start = 0;
        while start < r.rows {
            let rows = per_chunk.min(r.rows - start);
            let q = &r.q[start * row_q..(start + rows) * row_q];
            let s = &r.s[start * row_s..(start + rows) * row_s];
            chunks.push(QChunk {
                row_start: start,
                rows,
                q: Tensor::from_slice(ctx, &[q.len()], DType::U32, q)?,
                s: Tensor::from_slice(ctx, &[s.len()], DType::U32, s)?,
            });
            start += rows;
        }
        Ok(QMatrix {
            ty: r.ty,
            rows: r.rows,
            cols: r.cols,
            chunks,
        })
    }

    /// Device bytes held.
    pub fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.q.bytes() + c.s.bytes()).sum()
    }
}

/// Which kernel shape to run: one activation row at a time (decode) or tiles of rows
/// (prefill). `Auto` picks by the number of rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QShape {
    /// By row count.
    #[default]
    Auto,
    /// Matrix-vector kernel, one dispatch row per activation row.
    Vector,
    /// Matrix-matrix kernel.
    Matrix,
}

impl QShape {
    /// Whether `m` activation rows run the matrix-vector kernel (`subgroup`: the 8-wide
    /// subgroup kernels, whose matrix kernel pays off from 3 rows; the tiled ones from 5).
    pub fn vector(self, m: usize, subgroup: bool) -> bool {
        match self {
            QShape::Vector => true,
            QShape::Matrix => false,
            QShape::Auto => m <= if subgroup { 2 } else { 4 },
        }
    }
}

/// `Y[m][y_offset + j] (+)= sum_k X[m][k] * W[j][k]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QMatmulDesc {
    /// Activation rows.
    pub m: usize,
    /// Row stride of X (elements, a multiple of 4).
    pub ldx: usize,
    /// Row stride of Y.
    pub ldy: usize,
    /// First column of Y written.
    pub y_offset: usize,
    /// Add to Y instead of overwriting it.
    pub accumulate: bool,
    /// SwiGLU input: X rows hold a gate at columns `0..k` and the up projection at
    /// `glu..glu + k`, and the product reads `silu(gate) * up` (0: plain X).
    pub glu: usize,
}

impl QMatmulDesc {
    /// Packed `Y[m][n] = X[m][k] . W^T`.
    pub fn new(m: usize, w: &QMatrix) -> Self {
        QMatmulDesc {
            m,
            ldx: w.cols,
            ldy: w.rows,
            y_offset: 0,
            accumulate: false,
            glu: 0,
        }
    }
}

fn base_key(
    entry: &'static str,
    ty: QuantType,
    sg: bool,
    accumulate: bool,
    glu: bool,
) -> PipelineKey {
    expert_key(entry, ty, sg, accumulate, glu, false)
}

fn expert_key(
    entry: &'static str,
    ty: QuantType,
    sg: bool,
    accumulate: bool,
    glu: bool,
    experts: bool,
) -> PipelineKey {
    PipelineKey::new("quant", entry)
        .def("SUBGROUP", sg)
        .def("GLU", glu)
        .def("EXPERTS", experts)
        .constant("QTYPE", ty.shader_id() as f64)
        .constant("ACCUMULATE", accumulate as u32 as f64)
}

/// Every specialization of `shaders/quant.wgsl` (for the portability test).
#[cfg(test)]
pub(crate) fn keys() -> Vec<PipelineKey> {
    let mut v = Vec::new();
    for ty in QuantType::ALL {
        for acc in [false, true] {
            for (entry, sg) in [
                ("qmv_sg", true),
                ("qmm_sg", true),
                ("qmv_tiled", false),
                ("qmm_tiled", false),
            ] {
                for glu in [false, true] {
                    v.push(base_key(entry, ty, sg, acc, glu));
                    if entry.starts_with("qmv") {
                        v.push(expert_key(entry, ty, sg, acc, glu, true));
                    }
                    if entry == "qmm_tiled" {
                        v.push(base_key(entry, ty, sg, acc, glu).def("GROUPED", true));
                    }
                }
            }
        }
        for t in [false, true] {
            v.push(
                base_key("gather", ty, false, false, false).constant("TRANSPOSE", t as u32 as f64),
            );
        }
    }
    v
}

fn to_u32(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::shape("quant", format!("{what} = {v} exceeds 32 bits")))
}

/// Builds the dispatches (one per row chunk of `w`) of `Y = X . W^T`.
pub fn qmatmul(
    ctx: &Context,
    y: &Tensor,
    x: &Tensor,
    w: &QMatrix,
    d: &QMatmulDesc,
    variant: Variant,
    shape: QShape,
) -> Result<Vec<Dispatch>> {
    let op = "qmatmul";
    if d.m == 0 || d.ldx < w.cols + d.glu || d.ldx % 4 != 0 || d.ldy < d.y_offset + w.rows {
        return Err(Error::shape(
            op,
            format!(
                "m={} ldx={} ldy={} y_offset={} for a {}x{} {} matrix",
                d.m,
                d.ldx,
                d.ldy,
                d.y_offset,
                w.rows,
                w.cols,
                w.ty.name()
            ),
        ));
    }
    if d.glu % 4 != 0 || (d.glu > 0 && d.glu < w.cols) {
        return Err(Error::shape(
            op,
            format!("SwiGLU offset {} for {} columns", d.glu, w.cols),
        ));
    }
    let need_x = (d.m - 1) * d.ldx + w.cols + d.glu;
    let need_y = (d.m - 1) * d.ldy + d.y_offset + w.rows;
    if x.dtype() != DType::F32 || x.numel() < need_x || x.offset() % 16 != 0 {
        return Err(Error::shape(
            op,
            format!("X is {:?} {:?}, needs {need_x} f32", x.dtype(), x.shape()),
        ));
    }
    if y.dtype() != DType::F32 || y.numel() < need_y {
        return Err(Error::shape(
            op,
            format!("Y is {:?} {:?}, needs {need_y} f32", y.dtype(), y.shape()),
        ));
    }
    let variant = variant.resolve(ctx);
    let sg = variant == Variant::Subgroup;
    if sg && !Variant::subgroup_available(ctx) {
        return Err(Error::Unsupported(format!("{op}: no 8-wide subgroups")));
    }
    let vector = shape.vector(d.m, sg);
    let entry = match (sg, vector) {
        (true, true) => "qmv_sg",
        (true, false) => "qmm_sg",
        (false, true) => "qmv_tiled",
        (false, false) => "qmm_tiled",
    };
    let key = base_key(entry, w.ty, sg, d.accumulate, d.glu > 0);
    let mut ops = Vec::with_capacity(w.chunks.len());
    for c in &w.chunks {
        let params = QuantParams {
            m: to_u32(d.m, "m")?,
            n: to_u32(c.rows, "rows")?,
            k: to_u32(w.cols, "cols")?,
            ldx: to_u32(d.ldx, "ldx")?,
            ldy: to_u32(d.ldy, "ldy")?,
            y_offset: to_u32(d.y_offset + c.row_start, "y_offset")?,
            row_start: 0,
            n_ids: 0,
            glu4: (d.glu / 4) as u32,
            ..Default::default()
        };
        let groups = match entry {
            "qmv_sg" => [c.rows.div_ceil(128), d.m, 1],
            "qmm_sg" => [c.rows.div_ceil(128), d.m.div_ceil(8), 1],
            "qmv_tiled" => [c.rows.div_ceil(4), d.m, 1],
            _ => [c.rows.div_ceil(64), d.m.div_ceil(64), 1],
        };
        let u = ctx.uniform(&params);
        ops.push(ctx.dispatch(
            "qmatmul",
            &key,
            &[
                Bind::U(&u),
                Bind::T(x),
                Bind::T(&c.q),
                Bind::T(&c.s),
                Bind::T(y),
            ],
            [groups[0] as u32, groups[1] as u32, 1],
        )?);
    }
    Ok(ops)
}

/// The quantized weights of a Mixture-of-Experts layer's experts: `n_experts` matrices of
/// `rows` rows each, stacked (expert `e` is rows `e * rows ..`), in row chunks that hold
/// whole experts.
#[derive(Debug, Clone)]
pub struct QExperts {
    /// The stacked matrix (`n_experts * rows` rows).
    pub mat: QMatrix,
    /// Experts.
    pub n_experts: usize,
    /// Rows (output features) per expert.
    pub rows: usize,
}

impl QExperts {
    /// Uploads `n_experts` stacked experts (`r.rows` must be a multiple of `n_experts`).
    pub fn upload(ctx: &Context, r: &Repacked, n_experts: usize) -> Result<QExperts> {
        if n_experts == 0 || r.rows % n_experts != 0 {
            return Err(Error::shape(
                "experts",
                format!("{} rows for {n_experts} experts", r.rows),
            ));
        }
        let rows = r.rows / n_experts;
        Ok(QExperts {
            mat: QMatrix::upload_aligned(ctx, r, rows)?,
            n_experts,
            rows,
        })
    }
}

/// A product of routed (token, expert) pairs with their experts:
/// `Y[p][y_offset + j] (+)= sum_k X[p / pairs_per_x][k] * W_{ids[p]}[j][k]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertDesc {
    /// Pairs (rows of Y and of `ids`).
    pub pairs: usize,
    /// Consecutive pairs that share one activation row (a token's top-k for the gate and
    /// up projections; 1 when every pair has its own input, as for the down projection).
    pub pairs_per_x: usize,
    /// Row stride of X (elements, a multiple of 4).
    pub ldx: usize,
    /// Row stride of Y.
    pub ldy: usize,
    /// First column of Y written.
    pub y_offset: usize,
    /// Add to Y instead of overwriting it.
    pub accumulate: bool,
    /// SwiGLU input, as in [`QMatmulDesc::glu`].
    pub glu: usize,
}

impl ExpertDesc {
    /// Checks the product against experts of `rows x cols` and the sizes of `x` and `y`
    /// (both f32).
    pub fn check(
        &self,
        op: &'static str,
        y: &Tensor,
        x: &Tensor,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let d = self;
        let bad = |what: String| Err(Error::shape(op, what));
        if d.pairs == 0 || d.pairs_per_x == 0 || d.ldx < cols + d.glu {
            return bad(format!(
                "{} pairs ({} per activation row), ldx {} for {cols} columns",
                d.pairs, d.pairs_per_x, d.ldx
            ));
        }
        if (d.glu > 0 && d.glu < cols) || d.ldy < d.y_offset + rows {
            return bad(format!(
                "glu {} ldy {} y_offset {}",
                d.glu, d.ldy, d.y_offset
            ));
        }
        let x_rows = d.pairs.div_ceil(d.pairs_per_x);
        let need_x = (x_rows - 1) * d.ldx + cols + d.glu;
        if x.dtype() != DType::F32 || x.numel() < need_x {
            return bad(format!("X {:?} needs {need_x} f32", x.shape()));
        }
        if y.dtype() != DType::F32 || y.numel() < (d.pairs - 1) * d.ldy + d.y_offset + rows {
            return bad(format!("Y {:?} for {} pairs", y.shape(), d.pairs));
        }
        Ok(())
    }
}

/// Builds the dispatches of [`ExpertDesc`]'s product: each pair reads only its own expert's
/// rows (llama.cpp's MUL_MAT_ID idea), so a token costs k experts, not all of them. `ids`
/// holds one u32 expert index per pair; a pair whose index is not below `w.n_experts` is
/// left untouched. One dispatch per chunk of experts.
pub fn qmatmul_experts(
    ctx: &Context,
    y: &Tensor,
    x: &Tensor,
    ids: &Tensor,
    w: &QExperts,
    d: &ExpertDesc,
    variant: Variant,
) -> Result<Vec<Dispatch>> {
    let op = "qmatmul_experts";
    validate_experts(op, y, x, w, d)?;
    if ids.dtype() != DType::U32 || ids.numel() < d.pairs {
        return Err(Error::shape(
            op,
            format!("ids {:?} for {} pairs", ids.shape(), d.pairs),
        ));
    }
    let sg = variant.resolve(ctx) == Variant::Subgroup;
    if sg && !Variant::subgroup_available(ctx) {
        return Err(Error::Unsupported(format!("{op}: no 8-wide subgroups")));
    }
    let entry = if sg { "qmv_sg" } else { "qmv_tiled" };
    let key = expert_key(entry, w.mat.ty, sg, d.accumulate, d.glu > 0, true);
    let per_wg = if sg { 128 } else { 4 };
    let grid = [
        to_u32(w.rows.div_ceil(per_wg), "rows")?,
        to_u32(d.pairs, "pairs")?,
    ];
    expert_dispatches(ctx, op, &key, y, x, ids, w, d, |_| {
        Ok([grid[0], grid[1], 1])
    })
}

/// [`qmatmul_experts`] for many tokens at once (prefill): `group` holds the pairs grouped
/// by expert as [`crate::kernels::moe::group`] writes them (`[n_experts]` counts,
/// `[n_experts]` offsets, the sorted pair indices), and each expert multiplies its own
/// pairs as one matrix product, reading its weights once per 64 of them. The tiled
/// (workgroup-memory) kernel runs it on every device. One dispatch per chunk of experts.
pub fn qmatmul_experts_grouped(
    ctx: &Context,
    y: &Tensor,
    x: &Tensor,
    group: &Tensor,
    w: &QExperts,
    d: &ExpertDesc,
) -> Result<Vec<Dispatch>> {
    let op = "qmatmul_experts_grouped";
    validate_experts(op, y, x, w, d)?;
    if group.dtype() != DType::U32 || group.numel() < 2 * w.n_experts + d.pairs {
        return Err(Error::shape(
            op,
            format!(
                "group {:?} for {} experts and {} pairs",
                group.shape(),
                w.n_experts,
                d.pairs
            ),
        ));
    }
    let key = expert_key("qmm_tiled", w.mat.ty, false, d.accumulate, d.glu > 0, false)
        .def("GROUPED", true);
    let (tiles_n, tiles_m) = (
        to_u32(w.rows.div_ceil(64), "rows")?,
        to_u32(d.pairs.div_ceil(64), "pairs")?,
    );
    expert_dispatches(ctx, op, &key, y, x, group, w, d, |c| {
        Ok([tiles_n, tiles_m, to_u32(c.rows / w.rows, "experts")?])
    })
}

/// One dispatch per chunk of `w` with the expert products' bindings (`index`: the pairs'
/// expert ids, or the grouping) over the workgroup grid `grid(chunk)`.
#[allow(clippy::too_many_arguments)]
fn expert_dispatches(
    ctx: &Context,
    op: &'static str,
    key: &PipelineKey,
    y: &Tensor,
    x: &Tensor,
    index: &Tensor,
    w: &QExperts,
    d: &ExpertDesc,
    grid: impl Fn(&QChunk) -> Result<[u32; 3]>,
) -> Result<Vec<Dispatch>> {
    let mut ops = Vec::with_capacity(w.mat.chunks.len());
    for c in &w.mat.chunks {
        let u = ctx.uniform(&expert_params(w, c, d)?);
        ops.push(ctx.dispatch(
            op,
            key,
            &[
                Bind::U(&u),
                Bind::T(x),
                Bind::T(&c.q),
                Bind::T(&c.s),
                Bind::T(y),
                Bind::T(index),
            ],
            grid(c)?,
        )?);
    }
    Ok(ops)
}

/// The uniform of an expert product over chunk `c` of `w`.
fn expert_params(w: &QExperts, c: &QChunk, d: &ExpertDesc) -> Result<QuantParams> {
    Ok(QuantParams {
        m: to_u32(d.pairs, "pairs")?,
        n: to_u32(w.rows, "rows")?,
        k: to_u32(w.mat.cols, "cols")?,
        ldx: to_u32(d.ldx, "ldx")?,
        ldy: to_u32(d.ldy, "ldy")?,
        y_offset: to_u32(d.y_offset, "y_offset")?,
        row_start: to_u32(c.row_start / w.rows, "first expert")?,
        n_ids: to_u32(d.pairs_per_x, "pairs_per_x")?,
        glu4: (d.glu / 4) as u32,
        experts: to_u32(c.rows / w.rows, "experts")?,
        all_experts: to_u32(w.n_experts, "experts")?,
        ..Default::default()
    })
}

/// Checks a quantized expert product: [`ExpertDesc::check`], plus the vec4 alignment of
/// the activations the quantized kernels read.
fn validate_experts(
    op: &'static str,
    y: &Tensor,
    x: &Tensor,
    w: &QExperts,
    d: &ExpertDesc,
) -> Result<()> {
    d.check(op, y, x, w.rows, w.mat.cols)?;
    if d.ldx % 4 != 0 || d.glu % 4 != 0 || x.offset() % 16 != 0 {
        return Err(Error::shape(
            op,
            format!(
                "ldx {} / glu {} / X offset {} not vec4-aligned",
                d.ldx,
                d.glu,
                x.offset()
            ),
        ));
    }
    Ok(())
}

/// Builds the dispatches that write `out[t][..] = dequantized row ids[t]` (`out` is
/// `[n_ids][w.cols]` f32; `ids` are u32 row indices below `w.rows`, checked by the caller
/// when written — rows out of range are left untouched).
pub fn gather(ctx: &Context, out: &Tensor, ids: &Tensor, w: &QMatrix) -> Result<Vec<Dispatch>> {
    gather_impl(ctx, out, ids, w, false)
}

/// [`gather`] into columns: `out[c][t]` (`[w.cols][n_ids]`) is element `c` of row `ids[t]`,
/// i.e. the dequantized rows transposed (training multiplies by `W` from this layout at
/// full speed).
pub fn gather_transposed(
    ctx: &Context,
    out: &Tensor,
    ids: &Tensor,
    w: &QMatrix,
) -> Result<Vec<Dispatch>> {
    gather_impl(ctx, out, ids, w, true)
}

fn gather_impl(
    ctx: &Context,
    out: &Tensor,
    ids: &Tensor,
    w: &QMatrix,
    transpose: bool,
) -> Result<Vec<Dispatch>> {
    let n_ids = ids.numel();
    if ids.dtype() != DType::U32 || out.dtype() != DType::F32 || out.numel() < n_ids * w.cols {
        return Err(Error::shape(
            "gather",
            format!(
                "{n_ids} ids into {:?} {:?} from a {}x{} table",
                out.dtype(),
                out.shape(),
                w.rows,
                w.cols
            ),
        ));
    }
    let key = base_key("gather", w.ty, false, false, false)
        .constant("TRANSPOSE", transpose as u32 as f64);
    let mut ops = Vec::new();
    for c in &w.chunks {
        let params = QuantParams {
            m: 0,
            n: to_u32(c.rows, "rows")?,
            k: to_u32(w.cols, "cols")?,
            ldx: 0,
            ldy: to_u32(if transpose { n_ids } else { w.cols }, "ldy")?,
            y_offset: 0,
            row_start: to_u32(c.row_start, "row_start")?,
            n_ids: to_u32(n_ids, "ids")?,
            ..Default::default()
        };
        let u = ctx.uniform(&params);
        ops.push(ctx.dispatch(
            "gather",
            &key,
            &[
                Bind::U(&u),
                Bind::Skip,
                Bind::T(&c.q),
                Bind::T(&c.s),
                Bind::T(out),
                Bind::T(ids),
            ],
            [(w.cols / 32).div_ceil(64) as u32, n_ids as u32, 1],
        )?);
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::{matmul_ref, MatmulDesc};
    use crate::kernels::testing::{assert_close, contexts, ctx};
    use crate::quant::{dequantize, random_blocks, repack};
    use crate::util::Rng;

    fn random_matrix(ty: QuantType, rows: usize, cols: usize, seed: u64) -> (Repacked, Vec<f32>) {
        let mut rng = Rng::new(seed);
        let raw = random_blocks(ty, &mut rng, rows * cols / ty.block_elems());
        (
            repack(ty, rows, cols, &raw).unwrap(),
            dequantize(ty, &raw).unwrap(),
        )
    }

    fn check(
        ctx: &Context,
        ty: QuantType,
        m: usize,
        n: usize,
        k: usize,
        variant: Variant,
        shape: QShape,
    ) {
        let seed = (m * 7919 + n * 31 + k) as u64 ^ ty.ggml_id() as u64;
        let (r, wf) = random_matrix(ty, n, k, seed);
        let w = QMatrix::upload(ctx, &r).unwrap();
        let mut rng = Rng::new(seed + 1);
        let xv = rng.vec(m * k, -1.0, 1.0);
        let x = Tensor::from_f32(ctx, &[m, k], &xv).unwrap();
        let y0 = rng.vec(m * n, -1.0, 1.0);
        let y = Tensor::from_f32(ctx, &[m, n], &y0).unwrap();
        let mut d = QMatmulDesc::new(m, &w);
        d.accumulate = m % 2 == 1;
        let ops = qmatmul(ctx, &y, &x, &w, &d, variant, shape).unwrap();
        ctx.run(&ops).unwrap();
        let got = y.read_f32(ctx).unwrap();
        let mut want = y0.clone();
        let mut md = MatmulDesc::new(m, n, k);
        md.accumulate = d.accumulate;
        matmul_ref(&xv, &wf, &mut want, &md);
        let wmax = wf.iter().fold(0.0f32, |a, b| a.max(b.abs()));
        assert_close(
            &format!("{} {variant:?} {shape:?} m={m} n={n} k={k}", ty.name()),
            &got,
            &want,
            3e-6 * wmax * (k as f32).sqrt(),
            1e-5,
        );
    }

    #[test]
    fn matmul_all_formats_variants_and_shapes() {
        for ctx in contexts() {
            for ty in QuantType::ALL {
                let be = ty.block_elems();
                for variant in Variant::all(ctx) {
                    for shape in [QShape::Vector, QShape::Matrix] {
                        for &(m, n, kb) in
                            &[(1, 3, 1), (2, 65, 3), (9, 17, 2), (3, 1030, 1), (17, 63, 1)]
                        {
                            check(ctx, ty, m, n, kb * be, variant, shape);
                        }
                    }
                }
            }
        }
    }

    /// Routed pairs against `e` random experts of `n` x `k`; returns the chunk count.
    fn check_experts(ctx: &Context, ty: QuantType, e: usize, n: usize, k: usize) -> usize {
        let (r, wf) = random_matrix(ty, e * n, k, 40 + ty.ggml_id() as u64);
        let w = QExperts::upload(ctx, &r, e).unwrap();
        let mut rng = Rng::new(3);
        for (pairs, per_x) in [(6usize, 2usize), (7, 1), (1, 1)] {
            // Expert e does not exist: that pair's output stays as it was.
            let ids: Vec<u32> = (0..pairs)
                .map(|i| {
                    if i == 3 {
                        e as u32
                    } else {
                        rng.below(e as u64) as u32
                    }
                })
                .collect();
            let xr = pairs.div_ceil(per_x);
            let xv = rng.vec(xr * k, -1.0, 1.0);
            let y0 = rng.vec(pairs * n, -1.0, 1.0);
            let (x, y) = (
                Tensor::from_f32(ctx, &[xr, k], &xv).unwrap(),
                Tensor::from_f32(ctx, &[pairs, n], &y0).unwrap(),
            );
            let it = Tensor::from_slice(ctx, &[pairs], DType::U32, &ids).unwrap();
            let d = ExpertDesc {
                pairs,
                pairs_per_x: per_x,
                ldx: k,
                ldy: n,
                y_offset: 0,
                accumulate: per_x == 2,
                glu: 0,
            };
            let mut want = y0.clone();
            for (p, &ex) in ids.iter().enumerate() {
                if ex as usize >= e {
                    continue;
                }
                for j in 0..n {
                    let wrow = &wf[(ex as usize * n + j) * k..][..k];
                    let xrow = &xv[(p / per_x) * k..][..k];
                    let dot: f32 = wrow.iter().zip(xrow).map(|(a, b)| a * b).sum();
                    let o = &mut want[p * n + j];
                    *o = if d.accumulate { *o + dot } else { dot };
                }
            }
            let wmax = wf.iter().fold(0.0f32, |a, b| a.max(b.abs()));
            for variant in Variant::all(ctx) {
                y.write(ctx, &y0).unwrap();
                let ops = qmatmul_experts(ctx, &y, &x, &it, &w, &d, variant).unwrap();
                ctx.run(&ops).unwrap();
                assert_close(
                    &format!("{} {variant:?} {pairs} pairs", ty.name()),
                    &y.read_f32(ctx).unwrap(),
                    &want,
                    3e-6 * wmax * (k as f32).sqrt(),
                    1e-5,
                );
            }
        }
        let bad = QExperts::upload(ctx, &r, e + 1).unwrap_err().to_string();
        assert!(bad.contains(&format!("for {} experts", e + 1)), "{bad}");
        w.mat.chunks.len()
    }

    #[test]
    fn expert_pairs_read_only_their_experts() {
        for ctx in contexts() {
            for ty in [
                QuantType::Q4_1,
                QuantType::Q8_0,
                QuantType::Q4_K,
                QuantType::Q6_K,
            ] {
                check_experts(ctx, ty, 5, 33, 2 * ty.block_elems());
            }
        }
        // A 1 KiB binding limit splits the experts over several chunks (whole experts each).
        let small = crate::gpu::Context::with_options(crate::gpu::ContextOptions {
            max_binding_override: Some(1024),
            ..crate::gpu::ContextOptions::from_env().unwrap()
        })
        .unwrap();
        assert!(check_experts(&small, QuantType::Q4_1, 16, 5, 32) > 1);
    }

    #[test]
    fn split_bindings_give_the_same_result() {
        // A 1 KiB binding limit forces the weights into many row chunks (activations are
        // kept under it too).
        let ctx = crate::gpu::Context::with_options(crate::gpu::ContextOptions {
            max_binding_override: Some(1024),
            ..crate::gpu::ContextOptions::from_env().unwrap()
        })
        .unwrap();
        // (type, m, n, k, ids): 32-byte Q4_1 rows and 192-byte Q6_K rows.
        let cases: [(QuantType, usize, usize, usize, &[u32]); 2] = [
            (QuantType::Q4_1, 2, 100, 64, &[99, 0, 40]),
            (QuantType::Q6_K, 1, 37, 256, &[36]),
        ];
        for (ty, m, n, k, ids) in cases {
            let (r, wf) = random_matrix(ty, n, k, 99);
            let w = QMatrix::upload(&ctx, &r).unwrap();
            assert!(w.chunks.len() > 2, "{} chunks", w.chunks.len());
            let xv = Rng::new(5).vec(m * k, -1.0, 1.0);
            let x = Tensor::from_f32(&ctx, &[m, k], &xv).unwrap();
            let y = Tensor::zeros(&ctx, &[m, n], DType::F32).unwrap();
            let mut want = vec![0.0; m * n];
            matmul_ref(&xv, &wf, &mut want, &MatmulDesc::new(m, n, k));
            for variant in Variant::all(&ctx) {
                for shape in [QShape::Vector, QShape::Matrix] {
                    let d = QMatmulDesc::new(m, &w);
                    let ops = qmatmul(&ctx, &y, &x, &w, &d, variant, shape).unwrap();
                    assert_eq!(ops.len(), w.chunks.len());
                    ctx.run(&ops).unwrap();
                    assert_close(
                        "split qmatmul",
                        &y.read_f32(&ctx).unwrap(),
                        &want,
                        1e-4,
                        1e-5,
                    );
                }
            }
            // The gather reads each row from whichever chunk holds it.
            let idt = Tensor::from_slice(&ctx, &[ids.len()], DType::U32, ids).unwrap();
            let out = Tensor::zeros(&ctx, &[ids.len(), k], DType::F32).unwrap();
            ctx.run(&gather(&ctx, &out, &idt, &w).unwrap()).unwrap();
            let want: Vec<f32> = ids
                .iter()
                .flat_map(|&i| wf[i as usize * k..(i as usize + 1) * k].to_vec())
                .collect();
            assert_close(
                "split gather",
                &out.read_f32(&ctx).unwrap(),
                &want,
                1e-30,
                2.5e-7,
            );
        }
    }

    #[test]
    fn gather_dequantizes_rows_exactly() {
        let ctx = ctx();
        for ty in QuantType::ALL {
            let (n, k) = (19, 2 * ty.block_elems());
            let (r, wf) = random_matrix(ty, n, k, 3);
            let w = QMatrix::upload(ctx, &r).unwrap();
            let ids: Vec<u32> = vec![18, 0, 7, 7, 3];
            let idt = Tensor::from_slice(ctx, &[ids.len()], DType::U32, &ids).unwrap();
            let out = Tensor::zeros(ctx, &[ids.len(), k], DType::F32).unwrap();
            ctx.run(&gather(ctx, &out, &idt, &w).unwrap()).unwrap();
            let want: Vec<f32> = ids
                .iter()
                .flat_map(|&i| wf[i as usize * k..(i as usize + 1) * k].to_vec())
                .collect();
            // One rounding of a*q+b against ggml's: within an ulp.
            assert_close(ty.name(), &out.read_f32(ctx).unwrap(), &want, 1e-30, 2.5e-7);
        }
    }

    #[test]
    fn swiglu_input_is_fused() {
        // y = down(silu(gate) * up) with gate|up in one [m][2k] buffer.
        for ctx in contexts() {
            for variant in Variant::all(ctx) {
                for shape in [QShape::Vector, QShape::Matrix] {
                    let (ty, m, n, k) = (QuantType::Q4_1, 3, 19, 64);
                    let (r, wf) = random_matrix(ty, n, k, 21);
                    let w = QMatrix::upload(ctx, &r).unwrap();
                    let gu = Rng::new(6).vec(m * 2 * k, -3.0, 3.0);
                    let x = Tensor::from_f32(ctx, &[m, 2 * k], &gu).unwrap();
                    let y = Tensor::zeros(ctx, &[m, n], DType::F32).unwrap();
                    let mut d = QMatmulDesc::new(m, &w);
                    d.ldx = 2 * k;
                    d.glu = k;
                    ctx.run(&qmatmul(ctx, &y, &x, &w, &d, variant, shape).unwrap())
                        .unwrap();
                    let act: Vec<f32> = (0..m)
                        .flat_map(|i| {
                            let row = &gu[i * 2 * k..(i + 1) * 2 * k];
                            (0..k).map(move |j| row[j] / (1.0 + (-row[j]).exp()) * row[k + j])
                        })
                        .collect();
                    let mut want = vec![0.0; m * n];
                    matmul_ref(&act, &wf, &mut want, &MatmulDesc::new(m, n, k));
                    assert_close(
                        &format!("glu {variant:?} {shape:?}"),
                        &y.read_f32(ctx).unwrap(),
                        &want,
                        1e-4,
                        1e-4,
                    );
                }
            }
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let ctx = ctx();
        let (r, _) = random_matrix(QuantType::Q8_0, 4, 64, 1);
        let w = QMatrix::upload(ctx, &r).unwrap();
        let x = Tensor::zeros(ctx, &[2, 32], DType::F32).unwrap();
        let y = Tensor::zeros(ctx, &[2, 4], DType::F32).unwrap();
        let e = qmatmul(
            ctx,
            &y,
            &x,
            &w,
            &QMatmulDesc::new(2, &w),
            Variant::Auto,
            QShape::Auto,
        )
        .unwrap_err();
        assert!(e.to_string().contains("X is"), "{e}");
    }
}
