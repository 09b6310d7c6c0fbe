//! Repacking ggml blocks into the structure-of-arrays GPU layout (see the module docs of
//! [`crate::quant`]).

use super::blocks::scale_min_k4;
use super::QuantType;
use crate::error::{Error, Result};

/// A quantized matrix in the GPU layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Repacked {
    /// Format.
    pub ty: QuantType,
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features), a multiple of the block size.
    pub cols: usize,
    /// Quant words, `[rows][cols / block][q_words]`.
    pub q: Vec<u32>,
    /// Scale words, `[rows][cols / block][s_words]`.
    pub s: Vec<u32>,
}

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn half_word(b: &[u8], at: usize) -> u32 {
    u16::from_le_bytes([b[at], b[at + 1]]) as u32
}

fn bytes_to_words(b: &[u8], out: &mut Vec<u32>) {
    out.extend(
        b.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
}

/// Repacks one block's bytes, appending to `q` and `s`.
fn repack_block(ty: QuantType, b: &[u8], q: &mut Vec<u32>, s: &mut Vec<u32>) {
    match ty {
        QuantType::Q8_0 => {
            s.push(half_word(b, 0));
            bytes_to_words(&b[2..34], q);
        }
        QuantType::Q4_0 => {
            s.push(half_word(b, 0));
            bytes_to_words(&b[2..18], q);
        }
        QuantType::Q4_1 => {
            s.push(word(b, 0));
            bytes_to_words(&b[4..20], q);
        }
        QuantType::Q5_0 => {
            s.push(half_word(b, 0));
            s.push(word(b, 2));
            bytes_to_words(&b[6..22], q);
        }
        QuantType::Q5_1 => {
            s.push(word(b, 0));
            s.push(word(b, 4));
            bytes_to_words(&b[8..24], q);
        }
        QuantType::Q4_K | QuantType::Q5_K => {
            s.push(word(b, 0));
            let mut sc = [0u8; 8];
            let mut mn = [0u8; 8];
            for j in 0..8 {
                (sc[j], mn[j]) = scale_min_k4(j, &b[4..16]);
            }
            bytes_to_words(&sc, s);
            bytes_to_words(&mn, s);
            if ty == QuantType::Q5_K {
                bytes_to_words(&b[48..176], q);
                bytes_to_words(&b[16..48], q);
            } else {
                bytes_to_words(&b[16..144], q);
            }
        }
        QuantType::Q6_K => {
            s.push(half_word(b, 208));
            bytes_to_words(&b[192..208], s);
            bytes_to_words(&b[0..192], q);
        }
    }
}

/// Repacks a `rows x cols` matrix stored as ggml blocks (row-major, `ty.row_bytes(cols)`
/// bytes per row).
pub fn repack(ty: QuantType, rows: usize, cols: usize, data: &[u8]) -> Result<Repacked> {
    let row_bytes = ty.row_bytes(cols)?;
    let need = rows
        .checked_mul(row_bytes)
        .ok_or_else(|| Error::InvalidArgument("quantized matrix size overflows".into()))?;
    if data.len() != need {
        return Err(Error::InvalidArgument(format!(
            "{} matrix {rows}x{cols} needs {need} bytes, got {}",
            ty.name(),
            data.len()
        )));
    }
    let blocks = rows * (cols / ty.block_elems());
    let mut q = Vec::with_capacity(blocks * ty.q_words());
    let mut s = Vec::with_capacity(blocks * ty.s_words());
    for b in data.chunks_exact(ty.block_bytes()) {
        repack_block(ty, b, &mut q, &mut s);
    }
    debug_assert_eq!(q.len(), blocks * ty.q_words());
    debug_assert_eq!(s.len(), blocks * ty.s_words());
    Ok(Repacked {
        ty,
        rows,
        cols,
        q,
        s,
    })
}
