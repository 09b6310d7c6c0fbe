//! CPU dequantization of ggml blocks, written to match ggml's `dequantize_row_*` exactly
//! (same integer decoding, same f32 operation order), and random blocks for tests.

use half::f16;

use super::QuantType;
use crate::error::{Error, Result};
use crate::util::Rng;

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and minimum of sub-block `j` (0..8).
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Dequantizes one block (`ty.block_bytes()` bytes) into `y` (`ty.block_elems()` values).
pub fn dequantize_block(ty: QuantType, b: &[u8], y: &mut [f32]) {
    debug_assert_eq!(b.len(), ty.block_bytes());
    debug_assert_eq!(y.len(), ty.block_elems());
    match ty {
        QuantType::Q8_0 => {
            let d = h(b, 0);
            for j in 0..32 {
                y[j] = (b[2 + j] as i8) as f32 * d;
            }
        }
        QuantType::Q4_0 => {
            let d = h(b, 0);
            for j in 0..16 {
                let q = b[2 + j];
                y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
            }
        }
        QuantType::Q4_1 => {
            let (d, m) = (h(b, 0), h(b, 2));
            for j in 0..16 {
                let q = b[4 + j];
                y[j] = (q & 0x0F) as f32 * d + m;
                y[j + 16] = (q >> 4) as f32 * d + m;
            }
        }
        QuantType::Q5_0 | QuantType::Q5_1 => {
            let (d, m, qh_at, qs_at) = if ty == QuantType::Q5_0 {
                (h(b, 0), 0.0, 2, 6)
            } else {
                (h(b, 0), h(b, 2), 4, 8)
            };
            let qh = u32::from_le_bytes([b[qh_at], b[qh_at + 1], b[qh_at + 2], b[qh_at + 3]]);
            for j in 0..16 {
                let xh0 = ((qh >> j) << 4) & 0x10;
                let xh1 = (qh >> (j + 12)) & 0x10;
                let q = b[qs_at + j] as u32;
                if ty == QuantType::Q5_0 {
                    y[j] = (((q & 0x0F) | xh0) as i32 - 16) as f32 * d;
                    y[j + 16] = (((q >> 4) | xh1) as i32 - 16) as f32 * d;
                } else {
                    y[j] = ((q & 0x0F) | xh0) as f32 * d + m;
                    y[j + 16] = ((q >> 4) | xh1) as f32 * d + m;
                }
            }
        }
        QuantType::Q4_K | QuantType::Q5_K => {
            let (d, dmin) = (h(b, 0), h(b, 2));
            let scales = &b[4..16];
            let (qh, qs) = if ty == QuantType::Q5_K {
                (&b[16..48], &b[48..176])
            } else {
                (&b[0..0], &b[16..144])
            };
            let mut o = 0;
            for c in 0..4 {
                let (sc, m) = scale_min_k4(2 * c, scales);
                let (d1, m1) = (d * sc as f32, dmin * m as f32);
                let (sc, m) = scale_min_k4(2 * c + 1, scales);
                let (d2, m2) = (d * sc as f32, dmin * m as f32);
                let q = &qs[32 * c..32 * c + 32];
                let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
                for l in 0..32 {
                    let hi = if ty == QuantType::Q5_K && qh[l] & u1 != 0 {
                        16.0
                    } else {
                        0.0
                    };
                    y[o + l] = d1 * ((q[l] & 0xF) as f32 + hi) - m1;
                }
                for l in 0..32 {
                    let hi = if ty == QuantType::Q5_K && qh[l] & u2 != 0 {
                        16.0
                    } else {
                        0.0
                    };
                    y[o + 32 + l] = d2 * ((q[l] >> 4) as f32 + hi) - m2;
                }
                o += 64;
            }
        }
        QuantType::Q6_K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = h(b, 208);
            for n in 0..2 {
                let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                let y = &mut y[128 * n..];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }
    }
}

/// Dequantizes `data` (whole blocks) to f32.
pub fn dequantize(ty: QuantType, data: &[u8]) -> Result<Vec<f32>> {
    let bb = ty.block_bytes();
    if data.len() % bb != 0 {
        return Err(Error::InvalidArgument(format!(
            "{} data of {} bytes is not a whole number of {bb}-byte blocks",
            ty.name(),
            data.len()
        )));
    }
    let n = data.len() / bb;
    let be = ty.block_elems();
    let mut out = vec![0.0f32; n * be];
    for (b, y) in data.chunks_exact(bb).zip(out.chunks_exact_mut(be)) {
        dequantize_block(ty, b, y);
    }
    Ok(out)
}

/// `n` random blocks: every quant bit random, scales random f16 of a size that gives values
/// of order one (negative scales included where the format allows them).
pub fn random_blocks(ty: QuantType, rng: &mut Rng, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * ty.block_bytes());
    let f16b = |x: f32| f16::from_f32(x).to_le_bytes();
    for _ in 0..n {
        let start = out.len();
        out.extend((0..ty.block_bytes()).map(|_| rng.next_u32() as u8));
        let b = &mut out[start..];
        match ty {
            QuantType::Q8_0 => b[0..2].copy_from_slice(&f16b(rng.range(-0.02, 0.02))),
            QuantType::Q4_0 | QuantType::Q5_0 => {
                b[0..2].copy_from_slice(&f16b(rng.range(-0.2, 0.2)))
            }
            QuantType::Q4_1 | QuantType::Q5_1 => {
                b[0..2].copy_from_slice(&f16b(rng.range(0.0, 0.2)));
                b[2..4].copy_from_slice(&f16b(rng.range(-1.0, 0.0)));
            }
            QuantType::Q4_K | QuantType::Q5_K => {
                b[0..2].copy_from_slice(&f16b(rng.range(0.0, 0.005)));
                b[2..4].copy_from_slice(&f16b(rng.range(0.0, 0.01)));
            }
            QuantType::Q6_K => b[208..210].copy_from_slice(&f16b(rng.range(-0.002, 0.002))),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_by_hand() {
        let mut b = vec![0u8; 34];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2] = 4;
        b[3] = (-6i8) as u8;
        let y = dequantize(QuantType::Q8_0, &b).unwrap();
        assert_eq!(&y[..3], &[2.0, -3.0, 0.0]);
    }

    #[test]
    fn q4_1_by_hand() {
        let mut b = vec![0u8; 20];
        b[0..2].copy_from_slice(&f16::from_f32(2.0).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        b[4] = 0x73; // element 0 = 3, element 16 = 7
        let y = dequantize(QuantType::Q4_1, &b).unwrap();
        assert_eq!(y[0], 5.0);
        assert_eq!(y[16], 13.0);
        assert_eq!(y[1], -1.0);
    }

    #[test]
    fn q5_0_high_bits() {
        let mut b = vec![0u8; 22];
        b[0..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        // element 0's fifth bit is qh bit 0, element 16's is qh bit 16.
        b[2..6].copy_from_slice(&(1u32 | 1 << 16).to_le_bytes());
        let y = dequantize(QuantType::Q5_0, &b).unwrap();
        assert_eq!(y[0], 0.0); // 16 - 16
        assert_eq!(y[16], 0.0);
        assert_eq!(y[1], -16.0);
    }

    #[test]
    fn k_scales_decode() {
        // sub-blocks 0..4 use the low 6 bits; 4..8 combine nibbles with the high 2 bits.
        let q = [63u8 | 0xC0, 1, 2, 3, 5, 6, 7, 8, 0x21, 0x43, 0x65, 0x87];
        assert_eq!(scale_min_k4(0, &q), (63, 5));
        assert_eq!(scale_min_k4(4, &q), (0x1 | (3 << 4), 0x2));
    }

    /// Blocks and values from the `gguf` Python package's dequantizer
    /// (scripts/make-quant-fixture.py).
    #[test]
    fn matches_gguf_python_dequantizer() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../../tests/fixtures/quant_blocks.json"))
                .unwrap();
        for ty in QuantType::ALL {
            let case = &fixture[ty.name()];
            let hex = case["hex"].as_str().unwrap();
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            let want: Vec<f32> = case["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let got = dequantize(ty, &bytes).unwrap();
            assert_eq!(got.len(), want.len(), "{}", ty.name());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // numpy may order the scale products differently: allow 2 ulp.
                assert!(
                    (g - w).abs() <= 2.0 * f32::EPSILON * w.abs().max(1e-30),
                    "{} element {i}: {g} vs gguf {w}",
                    ty.name()
                );
            }
        }
    }

    #[test]
    fn rejects_partial_blocks() {
        assert!(dequantize(QuantType::Q4_K, &[0u8; 100]).is_err());
    }
}
