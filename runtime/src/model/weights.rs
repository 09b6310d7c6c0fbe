//! Weights on the GPU: matrices that stay in their file's format (f32, f16, or a GGUF
//! quantization, repacked), linear layers made of one or more row blocks (fused q|k|v and
//! gate|up), and the dispatches that multiply by them.

use half::f16;

use crate::error::{Error, Result};
use crate::gpu::{Context, DType, Dispatch, Tensor};
use crate::kernels::embed::{embed, DenseMatrix};
use crate::kernels::matmul::{matmul, MatmulDesc};
use crate::kernels::quant::{gather, qmatmul, QMatmulDesc, QMatrix, QShape};
use crate::kernels::Variant;
use crate::quant::{repack, QuantType};

/// A weight as read from a file, before upload.
#[derive(Debug, Clone)]
pub enum HostMatrix {
    /// f32 values, row-major.
    F32(Vec<f32>),
    /// f16 bit patterns, row-major.
    F16(Vec<u16>),
    /// ggml blocks, row-major.
    Quant(QuantType, Vec<u8>),
}

/// A host weight with its shape (`rows` output features of `cols` inputs).
#[derive(Debug, Clone)]
pub struct HostTensor {
    /// Tensor name in the file (for error messages).
    pub name: String,
    /// The file (or checkpoint directory) it came from, for error messages.
    pub source: Option<std::path::PathBuf>,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// The data.
    pub data: HostMatrix,
}

impl HostTensor {
    /// The values as f32 (dequantized if needed).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        Ok(match &self.data {
            HostMatrix::F32(v) => v.clone(),
            HostMatrix::F16(v) => v.iter().map(|&b| f16::from_bits(b).to_f32()).collect(),
            HostMatrix::Quant(ty, b) => crate::quant::dequantize(*ty, b)?,
        })
    }

    /// Row `r` as f32 (dequantized if needed), without converting the rest.
    pub fn row_f32(&self, r: usize) -> Result<Vec<f32>> {
        if r >= self.rows {
            return Err(Error::Internal(format!(
                "row {r} of {} in {}",
                self.rows, self.name
            )));
        }
        let c = self.cols;
        Ok(match &self.data {
            HostMatrix::F32(v) => v[r * c..(r + 1) * c].to_vec(),
            HostMatrix::F16(v) => v[r * c..(r + 1) * c]
                .iter()
                .map(|&b| f16::from_bits(b).to_f32())
                .collect(),
            HostMatrix::Quant(ty, b) => {
                let rb = ty.row_bytes(c)?;
                crate::quant::dequantize(*ty, &b[r * rb..(r + 1) * rb])?
            }
        })
    }

    /// Checks the shape is `rows x cols`.
    pub fn expect_shape(&self, rows: usize, cols: usize) -> Result<()> {
        if self.rows != rows || self.cols != cols {
            return Err(Error::format(
                self.source.as_deref(),
                format!(
                    "tensor {} has shape [{}, {}] (rows, cols) but the model needs [{rows}, {cols}]",
                    self.name, self.rows, self.cols
                ),
            ));
        }
        Ok(())
    }

    /// Stacks tensors of the same format and column count by rows (q|k|v, gate|up).
    pub fn concat_rows(parts: &[HostTensor], name: &str) -> Option<HostTensor> {
        let first = parts.first()?;
        let cols = first.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        let data = match &first.data {
            HostMatrix::F32(_) => HostMatrix::F32(
                parts
                    .iter()
                    .map(|p| match &p.data {
                        HostMatrix::F32(v) => Some(v.as_slice()),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()?
                    .concat(),
            ),
            HostMatrix::F16(_) => HostMatrix::F16(
                parts
                    .iter()
                    .map(|p| match &p.data {
                        HostMatrix::F16(v) => Some(v.as_slice()),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()?
                    .concat(),
            ),
            HostMatrix::Quant(ty, _) => HostMatrix::Quant(
                *ty,
                parts
                    .iter()
                    .map(|p| match &p.data {
                        HostMatrix::Quant(t, b) if t == ty => Some(b.as_slice()),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()?
                    .concat(),
            ),
        };
        Some(HostTensor {
            name: name.into(),
            source: first.source.clone(),
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            data,
        })
    }
}

/// A matrix on the GPU.
#[derive(Debug, Clone)]
pub enum Mat {
    /// f32 or f16.
    Dense(DenseMatrix),
    /// GGUF-quantized.
    Quant(QMatrix),
}

impl Mat {
    /// Uploads a host tensor, keeping its format.
    pub fn upload(ctx: &Context, t: &HostTensor) -> Result<Mat> {
        let n = t.rows.checked_mul(t.cols).ok_or_else(|| {
            Error::format(
                t.source.as_deref(),
                format!("tensor {} is too large", t.name),
            )
        })?;
        Ok(match &t.data {
            HostMatrix::F32(v) => {
                if v.len() != n {
                    return Err(Error::format(
                        None,
                        format!("tensor {}: {} values for {n}", t.name, v.len()),
                    ));
                }
                Mat::Dense(DenseMatrix::upload(ctx, v, t.rows, t.cols, DType::F32)?)
            }
            HostMatrix::F16(v) => {
                if v.len() != n {
                    return Err(Error::format(
                        None,
                        format!("tensor {}: {} values for {n}", t.name, v.len()),
                    ));
                }
                let f: Vec<f32> = v.iter().map(|&b| f16::from_bits(b).to_f32()).collect();
                Mat::Dense(DenseMatrix::upload(ctx, &f, t.rows, t.cols, DType::F16)?)
            }
            HostMatrix::Quant(ty, b) => {
                Mat::Quant(QMatrix::upload(ctx, &repack(*ty, t.rows, t.cols, b)?)?)
            }
        })
    }

    /// Device bytes.
    pub fn bytes(&self) -> u64 {
        match self {
            Mat::Dense(d) => d.bytes(),
            Mat::Quant(q) => q.bytes(),
        }
    }

    /// Format name (`f32`, `f16`, `Q4_1`, ...).
    pub fn format(&self) -> String {
        match self {
            Mat::Dense(d) if d.dtype == DType::F16 => "f16".into(),
            Mat::Dense(_) => "f32".into(),
            Mat::Quant(q) => q.ty.name().into(),
        }
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        match self {
            Mat::Dense(d) => d.rows,
            Mat::Quant(q) => q.rows,
        }
    }

    /// Embedding gather: `out[t] = row ids[t]`.
    pub fn gather(&self, ctx: &Context, out: &Tensor, ids: &Tensor) -> Result<Vec<Dispatch>> {
        match self {
            Mat::Dense(d) => embed(ctx, out, ids, d),
            Mat::Quant(q) => gather(ctx, out, ids, q),
        }
    }
}

/// Where a product reads its input rows and writes its output rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rows {
    /// Activation rows.
    pub m: usize,
    /// Input row stride.
    pub ldx: usize,
    /// Output row stride.
    pub ldy: usize,
    /// First output column written.
    pub y_off: usize,
    /// Add into the output (residual) instead of overwriting.
    pub accumulate: bool,
    /// SwiGLU input: each x row holds the gate at `0..cols` and the up projection `glu`
    /// columns later; the product reads `silu(gate) * up` ([`Linear::fuses_glu`]).
    pub glu: usize,
}

/// A linear layer `y = x W^T`: one or more row blocks of the weight, each its own matrix
/// (blocks of different formats stay apart; equal ones are stacked at load).
#[derive(Debug, Clone)]
pub struct Linear {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// (first output row, matrix) blocks.
    pub parts: Vec<(usize, Mat)>,
}

impl Linear {
    /// Uploads `parts` as one linear layer, stacking blocks of equal format.
    pub fn from_parts(ctx: &Context, parts: Vec<HostTensor>, name: &str) -> Result<Linear> {
        let cols = parts.first().map(|p| p.cols).unwrap_or(0);
        let rows = parts.iter().map(|p| p.rows).sum();
        if let Some(stacked) = HostTensor::concat_rows(&parts, name) {
            return Ok(Linear {
                rows,
                cols,
                parts: vec![(0, Mat::upload(ctx, &stacked)?)],
            });
        }
        let mut out = Vec::new();
        let mut off = 0;
        for p in &parts {
            if p.cols != cols {
                return Err(Error::format(
                    None,
                    format!("{name}: blocks with {} and {cols} columns", p.cols),
                ));
            }
            out.push((off, Mat::upload(ctx, p)?));
            off += p.rows;
        }
        Ok(Linear {
            rows,
            cols,
            parts: out,
        })
    }

    /// Device bytes.
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|(_, m)| m.bytes()).sum()
    }

    /// Whether [`Linear::forward`] can apply SwiGLU to its input itself (quantized
    /// weights; dense ones need a separate SwiGLU pass).
    pub fn fuses_glu(&self) -> bool {
        self.parts.iter().all(|(_, m)| matches!(m, Mat::Quant(_)))
    }

    /// Dispatches of `y[rows] (+)= x[rows] W^T`. `shape` picks the quantized kernel shape
    /// (decode steps use the vector kernel whatever the batch, so that a sequence's results
    /// do not depend on what else is in the batch).
    pub fn forward(
        &self,
        ctx: &Context,
        y: &Tensor,
        x: &Tensor,
        r: Rows,
        variant: Variant,
        shape: QShape,
    ) -> Result<Vec<Dispatch>> {
        if r.glu > 0 && !self.fuses_glu() {
            return Err(Error::Internal("SwiGLU input on dense weights".into()));
        }
        let mut ops = Vec::new();
        for (off, mat) in &self.parts {
            match mat {
                Mat::Dense(d) => {
                    for c in &d.chunks {
                        let mut desc = MatmulDesc::new(r.m, c.rows, self.cols);
                        desc.lda = r.ldx;
                        desc.ldc = r.ldy;
                        desc.c_offset = r.y_off + off + c.row_start;
                        desc.accumulate = r.accumulate;
                        ops.push(matmul(ctx, y, x, &c.t, &desc, variant)?);
                    }
                }
                Mat::Quant(q) => {
                    let desc = QMatmulDesc {
                        m: r.m,
                        ldx: r.ldx,
                        ldy: r.ldy,
                        y_offset: r.y_off + off,
                        accumulate: r.accumulate,
                        glu: r.glu,
                    };
                    ops.extend(qmatmul(ctx, y, x, q, &desc, variant, shape)?);
                }
            }
        }
        Ok(ops)
    }
}
