//! GGUF/ggml block-quantized formats: sizes, exact CPU dequantization (the reference every
//! GPU kernel is tested against), random blocks for tests, and the repacking into the
//! GPU layout the kernels read.
//!
//! ## GPU layout
//! A quantized matrix of `rows x cols` (cols a multiple of the block size) is split into two
//! arrays of 32-bit words, structure-of-arrays, row-major over blocks:
//! `q[row][block][q_words]` holds the quant bits in ggml's own order inside the block (a
//! whole number of `vec4<u32>`), and `s[row][block][s_words]` the scales (and Q5's fifth
//! bits). ggml's packed 6-bit K-quant scales are unpacked to
//! bytes at load so shaders read them with plain shifts; every f16 stays an f16 (converted
//! with `unpack2x16float`, exact), so the GPU sees bit-for-bit ggml's values.

mod blocks;
mod repack;

pub use blocks::{dequantize, dequantize_block, random_blocks};
pub use repack::{repack, Repacked};

use crate::error::{Error, Result};

/// The ggml block formats Ember's kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum QuantType {
    /// 32 x int8, one f16 scale.
    Q8_0,
    /// 32 x 4-bit, one f16 scale, offset -8.
    Q4_0,
    /// 32 x 4-bit, f16 scale and f16 minimum.
    Q4_1,
    /// 32 x 5-bit, one f16 scale, offset -16.
    Q5_0,
    /// 32 x 5-bit, f16 scale and minimum.
    Q5_1,
    /// 256 x 4-bit in 8 sub-blocks with 6-bit scales/minimums, f16 super-scales.
    Q4_K,
    /// 256 x 5-bit in 8 sub-blocks with 6-bit scales/minimums, f16 super-scales.
    Q5_K,
    /// 256 x 6-bit in 16 sub-blocks with int8 scales, f16 super-scale.
    Q6_K,
}

impl QuantType {
    /// Every format, in ggml id order.
    pub const ALL: [QuantType; 8] = [
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q8_0,
        QuantType::Q4_K,
        QuantType::Q5_K,
        QuantType::Q6_K,
    ];

    /// ggml's type id (as in GGUF tensor infos).
    pub fn ggml_id(self) -> u32 {
        match self {
            QuantType::Q4_0 => 2,
            QuantType::Q4_1 => 3,
            QuantType::Q5_0 => 6,
            QuantType::Q5_1 => 7,
            QuantType::Q8_0 => 8,
            QuantType::Q4_K => 12,
            QuantType::Q5_K => 13,
            QuantType::Q6_K => 14,
        }
    }

    /// The format with ggml type id `id`, if Ember runs it.
    pub fn from_ggml_id(id: u32) -> Option<QuantType> {
        QuantType::ALL.into_iter().find(|t| t.ggml_id() == id)
    }

    /// Name as ggml prints it (`Q4_1`).
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q4_1 => "Q4_1",
            QuantType::Q5_0 => "Q5_0",
            QuantType::Q5_1 => "Q5_1",
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q4_K => "Q4_K",
            QuantType::Q5_K => "Q5_K",
            QuantType::Q6_K => "Q6_K",
        }
    }

    /// Parses a name such as `q4_1` or `Q4_K`.
    pub fn parse(s: &str) -> Result<QuantType> {
        QuantType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| Error::InvalidArgument(format!("unknown quant type {s:?}")))
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            QuantType::Q4_K | QuantType::Q5_K | QuantType::Q6_K => 256,
            _ => 32,
        }
    }

    /// Bytes per block in the ggml file layout.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantType::Q8_0 => 34,
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q5_0 => 22,
            QuantType::Q5_1 => 24,
            QuantType::Q4_K => 144,
            QuantType::Q5_K => 176,
            QuantType::Q6_K => 210,
        }
    }

    /// 32-bit words of quant bits per block in the GPU layout.
    pub fn q_words(self) -> usize {
        match self {
            QuantType::Q8_0 => 8,
            QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q5_1 => 4,
            QuantType::Q4_K => 32,
            QuantType::Q5_K => 40,
            QuantType::Q6_K => 48,
        }
    }

    /// 32-bit words of scale data per block in the GPU layout (Q5_0/Q5_1 keep their 32
    /// fifth bits here, so that every format's quant words are whole `vec4<u32>`s).
    pub fn s_words(self) -> usize {
        match self {
            QuantType::Q4_K | QuantType::Q5_K | QuantType::Q6_K => 5,
            QuantType::Q5_0 | QuantType::Q5_1 => 2,
            _ => 1,
        }
    }

    /// Index used by the shaders' `QTYPE` override constant.
    pub fn shader_id(self) -> u32 {
        match self {
            QuantType::Q8_0 => 0,
            QuantType::Q4_0 => 1,
            QuantType::Q4_1 => 2,
            QuantType::Q5_0 => 3,
            QuantType::Q5_1 => 4,
            QuantType::Q4_K => 5,
            QuantType::Q5_K => 6,
            QuantType::Q6_K => 7,
        }
    }

    /// Bytes of a row of `cols` elements in the file layout, checking divisibility.
    pub fn row_bytes(self, cols: usize) -> Result<usize> {
        if cols % self.block_elems() != 0 {
            return Err(Error::InvalidArgument(format!(
                "{} rows must be a multiple of {} elements, got {cols}",
                self.name(),
                self.block_elems()
            )));
        }
        Ok(cols / self.block_elems() * self.block_bytes())
    }
}
