//! The two 8-bit floating-point formats a KV cache can be stored in, with the exact conversions
//! the CUDA kernels perform, so the CPU backend can reproduce a quantised cache bit for bit.
//!
//! Both are the OCP 8-bit formats NVIDIA's `__nv_fp8_e4m3` / `__nv_fp8_e5m2` implement:
//! - [`Fp8E4M3`]: 4 exponent bits (bias 7), 3 mantissa bits, no infinities, NaN = `S.1111.111`;
//!   finite range ±448, smallest subnormal 2^-9. More precision, less range: the usual choice.
//! - [`Fp8E5M2`]: 5 exponent bits (bias 15), 2 mantissa bits, IEEE-like (±inf = `S.11111.00`,
//!   NaN = `S.11111.xx`, `xx != 0`); finite range ±57344, smallest subnormal 2^-16.
//!
//! Quantisation ([`Fp8E4M3::from_f32`]) rounds to nearest, ties to even, and *saturates*: any
//! finite value or infinity beyond the finite range becomes the largest finite value of its sign
//! (the `satfinite` mode of the PTX `cvt` instruction, what vLLM's cache kernels use); NaN becomes
//! the canonical NaN `0x7f`. Widening ([`Fp8E4M3::to_f32`]) is exact.

use std::fmt;

/// Encodes `x` into an 8-bit float with `man` mantissa bits, exponent `bias`, largest finite
/// magnitude `max` and canonical NaN `0x7f`: round to nearest even, saturate, keep the sign
/// (also of zero).
fn encode(x: f32, man: u32, bias: i32, max: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    // Exponent of the smallest normal number; below it the quantum stays 2^(min_exp - man).
    let min_exp = 1 - bias;
    let exp = if a == 0.0 || a.is_infinite() {
        min_exp
    } else {
        // floor(log2(a)), exact for every finite f32 (subnormals included).
        let e = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
        let e = if e == -127 { -127 - (a.to_bits().leading_zeros() as i32 - 9) } else { e };
        e.max(min_exp)
    };
    let rounded = if a.is_infinite() || a >= 2.0 * max {
        max
    } else {
        // a / quantum and back are exact power-of-two scalings in f32 (no overflow below 2 * max,
        // no underflow: quantum >= 2^-16 and a < 2^18), so the only rounding is the one asked for.
        let quantum = pow2(exp - man as i32);
        ((a / quantum).round_ties_even() * quantum).min(max)
    };
    if rounded == 0.0 {
        return sign;
    }
    let e = ((rounded.to_bits() >> 23) & 0xff) as i32 - 127;
    let bits = if e < min_exp {
        // Subnormal: exponent field 0, mantissa = rounded / 2^(min_exp - man).
        (rounded / pow2(min_exp - man as i32)) as u32
    } else {
        let mantissa = (rounded / pow2(e - man as i32)) as u32 - (1 << man);
        (((e + bias) as u32) << man) | mantissa
    };
    sign | bits as u8
}

/// The value of an 8-bit float with `man` mantissa bits and exponent `bias`; `special` says
/// whether an all-ones exponent field means NaN/infinity (`e5m2`) or only `S.1111.111` is NaN
/// (`e4m3`).
fn decode(bits: u8, man: u32, bias: i32, ieee_specials: bool) -> f32 {
    let sign = if bits & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp_bits = 7 - man;
    let exp_field = ((bits >> man) & ((1 << exp_bits) - 1) as u8) as i32;
    let mantissa = (bits & ((1 << man) - 1) as u8) as u32;
    let exp_all_ones = exp_field == (1 << exp_bits) - 1;
    if ieee_specials && exp_all_ones {
        return if mantissa == 0 { sign * f32::INFINITY } else { f32::NAN };
    }
    if !ieee_specials && exp_all_ones && mantissa == (1 << man) - 1 {
        return f32::NAN;
    }
    let magnitude = if exp_field == 0 {
        mantissa as f32 * pow2(1 - bias - man as i32)
    } else {
        ((1 << man) | mantissa) as f32 * pow2(exp_field - bias - man as i32)
    };
    sign * magnitude
}

/// 2^e for the exponents these formats need (-30..=30), exactly.
fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

macro_rules! fp8_type {
    ($name:ident, $doc:literal, $man:expr, $bias:expr, $max:expr, $ieee:expr, $label:literal) => {
        #[doc = $doc]
        ///
        /// Equality compares the bits: `+0 != -0` and a NaN equals the same NaN bits, which is
        /// what a bit-exact comparison of two caches needs.
        #[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
        #[repr(transparent)]
        pub struct $name(u8);

        impl $name {
            /// The largest finite magnitude; quantisation saturates to it.
            pub const MAX: f32 = $max;
            /// The canonical NaN the conversion produces.
            pub const NAN: Self = $name(0x7f);

            /// The value with these bits.
            pub const fn from_bits(bits: u8) -> Self {
                $name(bits)
            }

            /// The stored bits.
            pub const fn to_bits(self) -> u8 {
                self.0
            }

            /// Rounds `x` to nearest even and saturates to `±MAX` (infinities included); NaN gives
            /// [`Self::NAN`]. Bit-identical to the GPU's `cvt.rn.satfinite` conversion.
            pub fn from_f32(x: f32) -> Self {
                $name(encode(x, $man, $bias, $max))
            }

            /// The exact value.
            pub fn to_f32(self) -> f32 {
                decode(self.0, $man, $bias, $ieee)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:#04x} = {})", $label, self.0, self.to_f32())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.to_f32(), f)
            }
        }
    };
}

fp8_type!(
    Fp8E4M3,
    "An OCP FP8 E4M3 number (`__nv_fp8_e4m3`): finite range ±448, no infinities.",
    3,
    7,
    448.0,
    false,
    "e4m3"
);
fp8_type!(
    Fp8E5M2,
    "An OCP FP8 E5M2 number (`__nv_fp8_e5m2`): finite range ±57344, with infinities.",
    2,
    15,
    57344.0,
    true,
    "e5m2"
);

// SAFETY: both types are `repr(transparent)` over `u8`: plain bytes with no padding and no
// invalid bit patterns, which is all cudarc needs to copy them to and from device memory and to
// hand them to a kernel by value.
#[cfg(feature = "cuda")]
unsafe impl cudarc::driver::DeviceRepr for Fp8E4M3 {}
// SAFETY: as above; the all-zero byte is +0.0.
#[cfg(feature = "cuda")]
unsafe impl cudarc::driver::ValidAsZeroBits for Fp8E4M3 {}
// SAFETY: as for `Fp8E4M3`.
#[cfg(feature = "cuda")]
unsafe impl cudarc::driver::DeviceRepr for Fp8E5M2 {}
// SAFETY: as for `Fp8E4M3`; the all-zero byte is +0.0.
#[cfg(feature = "cuda")]
unsafe impl cudarc::driver::ValidAsZeroBits for Fp8E5M2 {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value closest to `x` among all finite codes, ties to the even code, saturating: a
    /// brute-force restatement of the rule, independent of `encode`'s arithmetic.
    fn nearest<F: Fn(u8) -> f32>(x: f32, max: f32, decode: F) -> u8 {
        if x.is_nan() {
            return 0x7f;
        }
        if x.abs() >= max {
            // Saturation (f64 distances to codes near f32::MAX would all round to one value).
            return (0..=255u8).find(|&b| decode(b) == max.copysign(x)).unwrap_or(0);
        }
        let mut best: Option<(u8, f64)> = None;
        for b in 0..=255u8 {
            let v = decode(b);
            if !v.is_finite() || v.is_sign_negative() != x.is_sign_negative() {
                continue;
            }
            let d = (v as f64 - x as f64).abs();
            let better = match best {
                None => true,
                Some((bb, bd)) => d < bd || (d == bd && b & 1 == 0 && bb & 1 == 1),
            };
            if better {
                best = Some((b, d));
            }
        }
        best.map(|(b, _)| b).unwrap_or(0)
    }

    fn sample_values() -> Vec<f32> {
        let mut v = vec![0.0, -0.0, 1.0, -1.0, 448.0, 449.0, 464.0, 465.0, 480.0, 1e9, -1e9, f32::MAX, f32::MIN];
        v.extend([f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE, 1e-45, -1e-45, 57344.0, 61440.0, 61439.0]);
        // Every midpoint and neighbour of both formats' codes, plus a deterministic spread.
        for b in 0..=255u8 {
            for x in [Fp8E4M3::from_bits(b).to_f32(), Fp8E5M2::from_bits(b).to_f32()] {
                if x.is_finite() {
                    v.extend([x, x * 1.0625, x * 0.9375, x * 1.03125, x * 0.96875, f32::from_bits(x.to_bits() + 1)]);
                }
            }
        }
        let mut s = 0x2545_f491_u32;
        for _ in 0..20_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            // Exponents around the formats' ranges.
            let x = f32::from_bits((s & 0x807f_ffff) | ((100 + (s >> 8) % 60) << 23));
            v.push(x);
        }
        v
    }

    #[test]
    fn every_code_round_trips() {
        for b in 0..=255u8 {
            let (x, y) = (Fp8E4M3::from_bits(b), Fp8E5M2::from_bits(b));
            if !x.to_f32().is_nan() {
                assert_eq!(Fp8E4M3::from_f32(x.to_f32()), x, "{x:?}");
            }
            if !y.to_f32().is_nan() {
                let back = Fp8E5M2::from_f32(y.to_f32());
                // Infinities saturate.
                let want = if y.to_f32().is_infinite() { Fp8E5M2::from_bits(b & 0x80 | 0x7b) } else { y };
                assert_eq!(back, want, "{y:?}");
            }
        }
    }

    #[test]
    fn known_values() {
        assert_eq!(Fp8E4M3::from_f32(448.0).to_bits(), 0x7e);
        assert_eq!(Fp8E4M3::from_f32(1e30).to_bits(), 0x7e);
        assert_eq!(Fp8E4M3::from_f32(f32::NEG_INFINITY).to_bits(), 0xfe);
        assert_eq!(Fp8E4M3::from_f32(f32::NAN).to_bits(), 0x7f);
        assert_eq!(Fp8E4M3::from_f32(1.0).to_bits(), 0x38);
        assert_eq!(Fp8E4M3::from_bits(0x01).to_f32(), 2f32.powi(-9));
        assert_eq!(Fp8E4M3::from_f32(2f32.powi(-10)).to_bits(), 0x00, "tie to even (zero)");
        assert_eq!(Fp8E4M3::from_f32(3.0 * 2f32.powi(-10)).to_bits(), 0x02, "tie to even (2)");
        assert_eq!(Fp8E4M3::from_f32(-0.0).to_bits(), 0x80);
        assert!(Fp8E4M3::from_bits(0xff).to_f32().is_nan());
        assert_eq!(Fp8E5M2::from_f32(57344.0).to_bits(), 0x7b);
        assert_eq!(Fp8E5M2::from_f32(f32::INFINITY).to_bits(), 0x7b);
        assert_eq!(Fp8E5M2::from_f32(-1e10).to_bits(), 0xfb);
        assert_eq!(Fp8E5M2::from_f32(1.0).to_bits(), 0x3c);
        assert_eq!(Fp8E5M2::from_bits(0x7c).to_f32(), f32::INFINITY);
        assert!(Fp8E5M2::from_bits(0x7d).to_f32().is_nan());
        assert_eq!(Fp8E5M2::from_bits(0x01).to_f32(), 2f32.powi(-16));
    }

    #[test]
    fn conversion_is_the_nearest_code_with_saturation() {
        for x in sample_values() {
            let e4 = Fp8E4M3::from_f32(x).to_bits();
            let want4 = nearest(x, Fp8E4M3::MAX, |b| Fp8E4M3::from_bits(b).to_f32());
            assert_eq!(e4, want4, "e4m3 of {x:e} ({:#010x})", x.to_bits());
            let e5 = Fp8E5M2::from_f32(x).to_bits();
            let want5 = nearest(x, Fp8E5M2::MAX, |b| Fp8E5M2::from_bits(b).to_f32());
            assert_eq!(e5, want5, "e5m2 of {x:e} ({:#010x})", x.to_bits());
        }
    }

    #[test]
    fn e5m2_is_the_top_byte_of_f16_when_exact() {
        for b in 0..=255u8 {
            let x = Fp8E5M2::from_bits(b).to_f32();
            if x.is_finite() {
                assert_eq!(half::f16::from_f32(x).to_bits() >> 8, b as u16);
            }
        }
    }
}
