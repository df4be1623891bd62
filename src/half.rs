//! Conversions between `f32` and the 16-bit float formats, as raw `u16` bits (no dependency on
//! a half-float crate). Rounding is to nearest, ties to even, as GPUs convert.

/// Decodes IEEE binary16 bits.
///
/// ```
/// assert_eq!(lsce::half::f16_to_f32(0x3c00), 1.0);
/// assert_eq!(lsce::half::f16_to_f32(0xfc00), f32::NEG_INFINITY);
/// ```
pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits >> 15) << 31;
    let exp = u32::from((bits >> 10) & 0x1f);
    let man = u32::from(bits & 0x3ff);
    let magnitude = match (exp, man) {
        (0, 0) => 0,
        // Subnormal: man * 2^-24, exact in f32.
        (0, _) => (man as f32 * f32::from_bits(0x3380_0000)).to_bits(),
        (0x1f, 0) => 0x7f80_0000,
        (0x1f, _) => 0x7fc0_0000 | (man << 13),
        _ => ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(sign | magnitude)
}

/// Encodes to IEEE binary16 bits, rounding to nearest even; overflow gives infinity.
///
/// ```
/// use lsce::half::{f16_to_f32, f32_to_f16};
/// assert_eq!(f32_to_f16(1.0), 0x3c00);
/// assert_eq!(f16_to_f32(f32_to_f16(0.1)), 0.099975586);
/// assert_eq!(f32_to_f16(1e6), 0x7c00);
/// ```
pub fn f32_to_f16(value: f32) -> u16 {
    let bits = value.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let abs = bits & 0x7fff_ffff;
    if abs >= 0x7f80_0000 {
        // Infinity stays infinity; NaN stays a quiet NaN.
        return sign | if abs > 0x7f80_0000 { 0x7e00 } else { 0x7c00 };
    }
    let exp = (abs >> 23) as i32 - 127;
    if exp > 15 {
        return sign | 0x7c00;
    }
    if exp >= -14 {
        // Normal: keep 10 mantissa bits, round the 13 dropped ones to nearest even. A carry out
        // of the mantissa correctly bumps the exponent (up to infinity).
        let base = (((exp + 15) as u32) << 10) | ((abs >> 13) & 0x3ff);
        return sign | round_shifted(base, abs & 0x1fff, 13) as u16;
    }
    if exp < -25 {
        return sign;
    }
    // Subnormal: the value is man24 * 2^(exp - 23) and the result counts units of 2^-24.
    let man24 = (abs & 0x7f_ffff) | 0x80_0000;
    let shift = (-1 - exp) as u32; // 14..=24
    let base = man24 >> shift;
    sign | round_shifted(base, man24 & ((1 << shift) - 1), shift) as u16
}

/// Decodes bfloat16 bits.
///
/// ```
/// assert_eq!(lsce::half::bf16_to_f32(0x3f80), 1.0);
/// ```
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Encodes to bfloat16 bits, rounding to nearest even.
///
/// ```
/// use lsce::half::{bf16_to_f32, f32_to_bf16};
/// assert_eq!(f32_to_bf16(1.0), 0x3f80);
/// assert_eq!(bf16_to_f32(f32_to_bf16(0.1)), 0.10009765625);
/// ```
pub fn f32_to_bf16(value: f32) -> u16 {
    let bits = value.to_bits();
    if value.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    round_shifted(bits >> 16, bits & 0xffff, 16) as u16
}

/// `base` plus the rounding of the `shift` dropped bits `rest`, to nearest, ties to even.
fn round_shifted(base: u32, rest: u32, shift: u32) -> u32 {
    let half = 1u32 << (shift - 1);
    if rest > half || (rest == half && base & 1 == 1) {
        base + 1
    } else {
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_round_trips_every_finite_value() {
        for bits in 0..=u16::MAX {
            let v = f16_to_f32(bits);
            if v.is_nan() {
                assert!(f16_to_f32(f32_to_f16(v)).is_nan());
            } else {
                assert_eq!(f32_to_f16(v), bits, "bits {bits:#06x} value {v}");
            }
        }
    }

    #[test]
    fn f16_rounds_to_nearest_even() {
        // 1 + 2^-11 is halfway between 1 and the next f16 (1 + 2^-10): ties to even (1).
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3c00);
        // 1 + 3 * 2^-11 is halfway between 1 + 2^-10 (odd) and 1 + 2^-9: rounds up.
        assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        // The largest f16 is 65504; 65520 rounds to infinity.
        assert_eq!(f32_to_f16(65504.0), 0x7bff);
        assert_eq!(f32_to_f16(65520.0), 0x7c00);
        // Smallest subnormal 2^-24, and half of it ties to even (0).
        assert_eq!(f32_to_f16(2f32.powi(-24)), 1);
        assert_eq!(f32_to_f16(2f32.powi(-25)), 0);
        assert_eq!(f32_to_f16(1.5 * 2f32.powi(-24)), 2);
    }

    #[test]
    fn bf16_round_trips_and_rounds() {
        for bits in (0..=u16::MAX).step_by(7) {
            let v = bf16_to_f32(bits);
            if !v.is_nan() {
                assert_eq!(f32_to_bf16(v), bits);
            }
        }
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
    }
}
