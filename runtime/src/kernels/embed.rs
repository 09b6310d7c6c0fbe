//! Dense (f32 / f16) weight matrices split by rows to fit storage bindings, and the
//! embedding gather from them (`shaders/embed.wgsl`). Quantized tables gather through
//! [`crate::kernels::quant::gather`].

use crate::error::{Error, Result};
use crate::gpu::{Bind, Context, DType, Dispatch, PipelineKey, Tensor};
use crate::uniform;

uniform! {
    /// Uniform of `shaders/embed.wgsl`.
    pub struct EmbedParams {
        n_ids: u32,
        cols: u32,
        row_start: u32,
        rows: u32,
    }
}

/// Rows `row_start .. row_start + rows` of a dense matrix, in one binding.
#[derive(Debug, Clone)]
pub struct DenseChunk {
    /// First row held.
    pub row_start: usize,
    /// Rows held.
    pub rows: usize,
    /// `[rows][cols]`, f32 or f16.
    pub t: Tensor,
}

/// A `rows x cols` f32 or f16 matrix on the GPU, split by rows into chunks that each fit a
/// storage binding.
#[derive(Debug, Clone)]
pub struct DenseMatrix {
    /// Element type (F32 or F16).
    pub dtype: DType,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Row chunks in order.
    pub chunks: Vec<DenseChunk>,
}

impl DenseMatrix {
    /// Uploads `data` (`[rows][cols]`) as `dtype` (F32, or F16 converted with rounding).
    pub fn upload(
        ctx: &Context,
        data: &[f32],
        rows: usize,
        cols: usize,
        dtype: DType,
    ) -> Result<Self> {
        Self::upload_aligned(ctx, data, rows, cols, dtype, 1)
    }

    /// [`DenseMatrix::upload`] with chunks of a multiple of `align` rows (whole experts;
    /// `rows` must be a multiple of it).
    pub fn upload_aligned(
        ctx: &Context,
        data: &[f32],
        rows: usize,
        cols: usize,
        dtype: DType,
        align: usize,
    ) -> Result<Self> {
        if align == 0 || rows % align != 0 {
            return Err(Error::shape(
                "dense upload",
                format!("{rows} rows in chunks of {align}"),
            ));
        }
        if data.len() != rows * cols || !matches!(dtype, DType::F32 | DType::F16) {
            return Err(Error::shape(
                "dense upload",
                format!("{} values as {dtype:?} for {rows}x{cols}", data.len()),
            ));
        }
        // f16 rows are bound as 32-bit words: keep every chunk a whole number of words.
        let row_bytes = cols as u64 * dtype.size();
        let mut per_chunk = (ctx.caps().max_binding / row_bytes.max(1)) as usize;
        if dtype == DType::F16 && cols % 2 == 1 {
            per_chunk &= !1;
        }
        let per_chunk = per_chunk.min(rows) / align * align;
        if per_chunk == 0 {
            return Err(Error::Limit {
                what: format!("{align} {dtype:?} row(s) of {cols} columns"),
                needed: row_bytes * align as u64,
                limit: ctx.caps().max_binding,
            });
        }
        let mut chunks = Vec::new();
        let mut start = 0;
        while start < rows {
            let n = per_chunk.min(rows - start);
            let part = &data[start * cols..(start + n) * cols];
            let t = match dtype {
                DType::F32 => Tensor::from_f32(ctx, &[n, cols], part)?,
                _ => Tensor::from_f32_as_f16(ctx, &[n, cols], part)?,
            };
            chunks.push(DenseChunk {
                row_start: start,
                rows: n,
                t,
            });
            start += n;
        }
        Ok(DenseMatrix {
            dtype,
            rows,
            cols,
            chunks,
        })
    }

    /// Device bytes held.
    pub fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.t.bytes()).sum()
    }
}

/// `out[t][..] = table[ids[t]]` for `ids` (`[n]` u32); rows outside the table are left
/// untouched (callers check ids when they write them).
pub fn embed(
    ctx: &Context,
    out: &Tensor,
    ids: &Tensor,
    table: &DenseMatrix,
) -> Result<Vec<Dispatch>> {
    let n = ids.numel();
    if ids.dtype() != DType::U32
        || out.dtype() != DType::F32
        || out.numel() < n * table.cols
        || n > 65535
    {
        return Err(Error::shape(
            "embed",
            format!(
                "{n} ids into {:?} {:?} from {}x{}",
                out.dtype(),
                out.shape(),
                table.rows,
                table.cols
            ),
        ));
    }
    let key = PipelineKey::new("embed", "embed")
        .constant("HALF", (table.dtype == DType::F16) as u32 as f64);
    table
        .chunks
        .iter()
        .map(|c| {
            let u = ctx.uniform(&EmbedParams {
                n_ids: n as u32,
                cols: table.cols as u32,
                row_start: c.row_start as u32,
                rows: c.rows as u32,
            });
            ctx.dispatch(
                "embed",
                &key,
                &[Bind::U(&u), Bind::T(&c.t), Bind::T(ids), Bind::T(out)],
                [table.cols.div_ceil(64) as u32, n as u32, 1],
            )
        })
        .collect()
}

/// Every specialization (for the portability test).
#[cfg(test)]
pub(crate) fn keys() -> Vec<PipelineKey> {
    vec![
        PipelineKey::new("embed", "embed").constant("HALF", 0.0),
        PipelineKey::new("embed", "embed").constant("HALF", 1.0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::ContextOptions;
    use crate::kernels::testing::{assert_close, ctx};
    use crate::util::Rng;

    fn check(ctx: &Context, rows: usize, cols: usize, dtype: DType, min_chunks: usize) {
        let mut data = Rng::new(rows as u64).vec(rows * cols, -1.0, 1.0);
        if dtype == DType::F16 {
            for v in &mut data {
                *v = half::f16::from_f32(*v).to_f32();
            }
        }
        let m = DenseMatrix::upload(ctx, &data, rows, cols, dtype).unwrap();
        assert!(m.chunks.len() >= min_chunks, "{} chunks", m.chunks.len());
        let ids: Vec<u32> = vec![0, rows as u32 - 1, (rows / 2) as u32, 0];
        let idt = Tensor::from_slice(ctx, &[ids.len()], DType::U32, &ids).unwrap();
        let out = Tensor::zeros(ctx, &[ids.len(), cols], DType::F32).unwrap();
        ctx.run(&embed(ctx, &out, &idt, &m).unwrap()).unwrap();
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&i| data[i as usize * cols..(i as usize + 1) * cols].to_vec())
            .collect();
        assert_close(
            &format!("embed {dtype:?} {rows}x{cols}"),
            &out.read_f32(ctx).unwrap(),
            &want,
            0.0,
            0.0,
        );
    }

    #[test]
    fn gathers_rows_f32_and_f16() {
        for (rows, cols) in [(1, 1), (17, 3), (1000, 65)] {
            check(ctx(), rows, cols, DType::F32, 1);
            check(ctx(), rows, cols, DType::F16, 1);
        }
    }

    #[test]
    fn split_table_gives_the_same_rows() {
        let small = Context::with_options(ContextOptions {
            max_binding_override: Some(512),
            ..ContextOptions::from_env().unwrap()
        })
        .unwrap();
        check(&small, 100, 24, DType::F32, 4);
        check(&small, 101, 27, DType::F16, 4);
    }
}
