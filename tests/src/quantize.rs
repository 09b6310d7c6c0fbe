//! Round-to-nearest quantizers for the ggml block formats Q8_0, Q4_0 and Q4_1, following
//! ggml's reference implementations (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`,
//! `quantize_row_q4_1_ref` in llama.cpp's `ggml/src/ggml-quants.c`) step for step in f32,
//! so the tests can write quantized GGUF files the way llama.cpp's `llama-quantize` does
//! for these types (its non-imatrix path). K-quants are not implemented.
//!
//! Block layouts (little-endian, `d`/`m` are IEEE half floats):
//! - Q8_0, 34 bytes: `d`, then 32 x i8 `q`; `x = q * d`.
//! - Q4_0, 18 bytes: `d`, then 16 bytes; byte `j` holds element `j` in its low nibble and
//!   element `j + 16` in its high nibble; `x = (q - 8) * d`.
//! - Q4_1, 20 bytes: `d`, `m`, then 16 bytes as Q4_0; `x = q * d + m`.

use ember::quant::QuantType;
use ember::{Error, Result};

/// Elements per block of every format here.
pub const QK: usize = 32;

/// The IEEE half-precision bits nearest to `x` (round to nearest, ties to even), as ggml's
/// `GGML_FP32_TO_FP16`: overflow gives infinity, NaN stays NaN, subnormals are kept.
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x007f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x0200 } else { 0 };
    }
    // Exponent rebiased to half's bias of 15.
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    let round = |v: u32, shift: u32| -> u32 {
        let h = v >> shift;
        let rem = v & ((1u32 << shift) - 1);
        let half = 1u32 << (shift - 1);
        if rem > half || (rem == half && h & 1 == 1) {
            h + 1
        } else {
            h
        }
    };
    if e <= 0 {
        // Subnormal half (or zero): value = h * 2^-24.
        if e < -10 {
            return sign;
        }
        let m = man | 0x0080_0000;
        return sign | round(m, (14 - e) as u32) as u16;
    }
    // A carry out of the mantissa correctly bumps the exponent (up to infinity).
    sign | round(((e as u32) << 23) | man, 13) as u16
}

fn check_len(ty: QuantType, x: &[f32]) -> Result<()> {
    if !x.chunks_exact(QK).remainder().is_empty() {
        return Err(Error::InvalidArgument(format!(
            "quantize {}: {} values are not a whole number of {QK}-element blocks",
            ty.name(),
            x.len()
        )));
    }
    Ok(())
}

/// `quantize_row_q8_0_ref`: `d = amax / 127`, `q = round(x / d)` (half away from zero).
pub fn quantize_q8_0(x: &[f32]) -> Result<Vec<u8>> {
    check_len(QuantType::Q8_0, x)?;
    let mut out = Vec::with_capacity(x.len() / QK * 34);
    for b in x.chunks_exact(QK) {
        let amax = b.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f32_to_f16_bits(d).to_le_bytes());
        out.extend(b.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    Ok(out)
}

/// `quantize_row_q4_0_ref`: `d = max / -8` where `max` is the (first) element of largest
/// magnitude, `q = min(15, trunc(x / d + 8.5))`.
pub fn quantize_q4_0(x: &[f32]) -> Result<Vec<u8>> {
    check_len(QuantType::Q4_0, x)?;
    let mut out = Vec::with_capacity(x.len() / QK * 18);
    for b in x.chunks_exact(QK) {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in b {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f32_to_f16_bits(d).to_le_bytes());
        // C's `(int8_t)(float)` truncates toward zero, as Rust's `as` does in range.
        let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
        out.extend((0..QK / 2).map(|j| q(b[j]) | (q(b[j + QK / 2]) << 4)));
    }
    Ok(out)
}

/// `quantize_row_q4_1_ref`: `d = (max - min) / 15`, `m = min`,
/// `q = min(15, trunc((x - min) / d + 0.5))`.
pub fn quantize_q4_1(x: &[f32]) -> Result<Vec<u8>> {
    check_len(QuantType::Q4_1, x)?;
    let mut out = Vec::with_capacity(x.len() / QK * 20);
    for b in x.chunks_exact(QK) {
        let (mut min, mut max) = (f32::MAX, -f32::MAX);
        for &v in b {
            if v < min {
                min = v;
            }
            if v > max {
                max = v;
            }
        }
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f32_to_f16_bits(d).to_le_bytes());
        out.extend_from_slice(&f32_to_f16_bits(min).to_le_bytes());
        let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
        out.extend((0..QK / 2).map(|j| q(b[j]) | (q(b[j + QK / 2]) << 4)));
    }
    Ok(out)
}

/// Quantizes `x` (row-major, rows a whole number of blocks) into `ty`'s file layout.
///
/// Errors: [`Error::Unsupported`] for types other than Q8_0, Q4_0 and Q4_1,
/// [`Error::InvalidArgument`] when `x.len()` is not a multiple of 32.
pub fn quantize(ty: QuantType, x: &[f32]) -> Result<Vec<u8>> {
    match ty {
        QuantType::Q8_0 => quantize_q8_0(x),
        QuantType::Q4_0 => quantize_q4_0(x),
        QuantType::Q4_1 => quantize_q4_1(x),
        other => Err(Error::Unsupported(format!(
            "the test quantizer writes Q8_0, Q4_0 and Q4_1, not {}",
            other.name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember::quant::dequantize;
    use ember::util::Rng;

    fn f16_le(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    #[test]
    fn f16_known_values() {
        for (x, h) in [
            (0.0f32, 0x0000u16),
            (-0.0, 0x8000),
            (1.0, 0x3c00),
            (-2.0, 0xc000),
            (0.5, 0x3800),
            (0.1, 0x2e66),
            (1.0 / 3.0, 0x3555),
            (65504.0, 0x7bff),
            (65519.0, 0x7bff),
            (65520.0, 0x7c00),
            (1e6, 0x7c00),
            (f32::INFINITY, 0x7c00),
            (f32::NEG_INFINITY, 0xfc00),
            (2f32.powi(-24), 0x0001),
            (2f32.powi(-25), 0x0000),
            (1.5 * 2f32.powi(-25), 0x0001),
            (2f32.powi(-14), 0x0400),
            (1.0 + 2f32.powi(-11), 0x3c00),
            (1.0 + 3.0 * 2f32.powi(-11), 0x3c02),
        ] {
            assert_eq!(f32_to_f16_bits(x), h, "{x:e}");
        }
        assert_eq!(f32_to_f16_bits(f32::NAN) & 0x7c00, 0x7c00);
        assert_ne!(f32_to_f16_bits(f32::NAN) & 0x03ff, 0);
    }

    /// Every finite half converts back to its own bits: Ember's Q8_0 dequantizer turns a
    /// block with scale `h` and `q[0] = 1` into exactly `f16(h)` as f32.
    #[test]
    fn f16_round_trips_every_finite_half() {
        let mut blocks = Vec::new();
        let mut halves = Vec::new();
        for h in 0..=u16::MAX {
            if h & 0x7c00 == 0x7c00 {
                continue;
            }
            halves.push(h);
            blocks.extend_from_slice(&h.to_le_bytes());
            blocks.push(1);
            blocks.extend_from_slice(&[0u8; 31]);
        }
        let v = dequantize(QuantType::Q8_0, &blocks).unwrap();
        for (k, &h) in halves.iter().enumerate() {
            let x = v[k * QK];
            assert_eq!(f32_to_f16_bits(x), h, "{h:#06x} -> {x:e}");
            // Halfway between two halves rounds to the even one.
            if h & 0x7fff < 0x7bff {
                let next = v[(k + 1) * QK];
                if next.is_sign_positive() == x.is_sign_positive() && (h & 0x7fff) != 0 {
                    let mid = ((f64::from(x) + f64::from(next)) / 2.0) as f32;
                    let even = if h & 1 == 0 { h } else { h + 1 };
                    assert_eq!(f32_to_f16_bits(mid), even, "midpoint after {h:#06x}");
                }
            }
        }
    }

    #[test]
    fn known_blocks() {
        // Q8_0: amax 127 -> d = 1, q = x.
        let mut x: Vec<f32> = (0..32).map(|j| j as f32 - 16.0).collect();
        x[0] = -127.0;
        let b = quantize_q8_0(&x).unwrap();
        assert_eq!(b.len(), 34);
        assert_eq!(f16_le(&b, 0), 0x3c00);
        let q: Vec<f32> = b[2..].iter().map(|&q| f32::from(q as i8)).collect();
        assert_eq!(q, x);

        // Q4_0: max magnitude -8 -> d = 1, q = x + 8; element j low nibble, j + 16 high.
        let mut x: Vec<f32> = (0..16).map(|j| j as f32 - 8.0).collect();
        x.extend([0.0f32; 16]);
        let b = quantize_q4_0(&x).unwrap();
        assert_eq!(b.len(), 18);
        assert_eq!(f16_le(&b, 0), 0x3c00);
        let want: Vec<u8> = (0..16u8).map(|j| j | (8 << 4)).collect();
        assert_eq!(&b[2..], want.as_slice());

        // Q4_0 with a positive maximum: d = -max / 8 is negative.
        let x: Vec<f32> = (0..32).map(|j| if j == 5 { 4.0 } else { 0.0 }).collect();
        let b = quantize_q4_0(&x).unwrap();
        assert_eq!(f16_le(&b, 0), f32_to_f16_bits(-0.5));
        assert_eq!(b[2 + 5] & 0x0f, 0);
        assert_eq!(b[2] & 0x0f, 8);

        // Q4_1: min 1, max 8.5 -> d = 0.5, m = 1, q = j % 16.
        let x: Vec<f32> = (0..32).map(|j| (j % 16) as f32 * 0.5 + 1.0).collect();
        let b = quantize_q4_1(&x).unwrap();
        assert_eq!(b.len(), 20);
        assert_eq!((f16_le(&b, 0), f16_le(&b, 2)), (0x3800, 0x3c00));
        let want: Vec<u8> = (0..16u8).map(|j| j | (j << 4)).collect();
        assert_eq!(&b[4..], want.as_slice());

        // All zeros: d = 0, every value decodes to 0.
        for ty in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1] {
            let b = quantize(ty, &[0.0; 64]).unwrap();
            assert_eq!(b.len(), 2 * ty.block_bytes());
            assert!(dequantize(ty, &b).unwrap().iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn errors() {
        assert!(quantize(QuantType::Q8_0, &[0.0; 33]).is_err());
        let e = quantize(QuantType::Q4_K, &[0.0; 256]).unwrap_err();
        assert_eq!(e.kind(), ember::ErrorKind::Unsupported);
    }

    /// Ember's dequantizer reads the blocks back within the rounding error of each format,
    /// and Q8_0 / Q4_0 are idempotent (re-quantizing dequantized values gives the same
    /// bytes), as ggml's round-to-nearest reference is.
    #[test]
    fn round_trip_through_ember_dequantize() {
        let mut rng = Rng::new(42);
        for scale in [1e-3f32, 0.3, 7.0] {
            let x: Vec<f32> = (0..32 * 64)
                .map(|_| (2.0 * rng.uniform() - 1.0) * scale)
                .collect();
            for ty in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1] {
                let b = quantize(ty, &x).unwrap();
                assert_eq!(b.len(), x.len() / QK * ty.block_bytes());
                let y = dequantize(ty, &b).unwrap();
                for (blk, (xb, yb)) in x.chunks(QK).zip(y.chunks(QK)).enumerate() {
                    let raw = &b[blk * ty.block_bytes()..];
                    let d = half_to_f32(f16_le(raw, 0)).abs();
                    // The absolute error of rounding a value of size `v` to f16 (subnormal
                    // halves, below 2^-14, have a fixed step of 2^-24).
                    let f16_err = |v: f32| (v * 2f32.powi(-11)).max(2f32.powi(-25));
                    let bound = match ty {
                        // Half a step, plus the scale's own f16 rounding times 127.
                        QuantType::Q8_0 => 0.5 * d + 127.0 * f16_err(d) + 1e-7,
                        // The largest positive values clip at +7 steps when max is negative.
                        QuantType::Q4_0 => d + 16.0 * f16_err(d) + 1e-7,
                        _ => 0.5 * d + 16.0 * f16_err(d) + f16_err(scale) + 1e-7,
                    };
                    for (a, c) in xb.iter().zip(yb) {
                        assert!((a - c).abs() <= bound, "{}: {a} -> {c} (d {d})", ty.name());
                    }
                }
                if ty != QuantType::Q4_1 {
                    assert_eq!(quantize(ty, &y).unwrap(), b, "{} idempotent", ty.name());
                } else {
                    let z = dequantize(ty, &quantize(ty, &y).unwrap()).unwrap();
                    let err = y
                        .iter()
                        .zip(&z)
                        .fold(0f32, |m, (a, c)| m.max((a - c).abs()));
                    assert!(err <= scale * 0.02, "Q4_1 re-quantized drifts by {err}");
                }
            }
        }
    }

    fn half_to_f32(h: u16) -> f32 {
        let mut block = h.to_le_bytes().to_vec();
        block.push(1);
        block.extend_from_slice(&[0u8; 31]);
        dequantize(QuantType::Q8_0, &block).unwrap()[0]
    }
}
