// FP8 KV-cache elements: the exact conversions the write, decode and prefill kernels share.
//
// Storage kinds follow PaAttnArgs::kv_dtype: 0 = the compute type itself, 1 = E4M3, 2 = E5M2.
// Quantisation is round-to-nearest-even with saturation to the format's finite range (infinities
// too) and NaN kept NaN, the PTX `cvt.rn.satfinite` rule; the Rust side (`attention_kernels::fp8`)
// implements the same rule bit for bit and the GPU tests compare the two. Widening is exact: every
// E4M3 and E5M2 value is an f16 (and a bf16) value, so a dequantised tile feeds the tensor cores
// without rounding; the per-layer or per-head scale is applied in f32 afterwards (folded into the
// score scale for K, into the output for V).
#pragma once

#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace pa {
namespace fp8 {

enum Kind : int { kSame = 0, kE4M3 = 1, kE5M2 = 2 };

template <int K>
__device__ __forceinline__ __nv_fp8_interpretation_t interpretation() {
  static_assert(K == kE4M3 || K == kE5M2, "not an FP8 kind");
  return K == kE4M3 ? __NV_E4M3 : __NV_E5M2;
}

// fp8(x), saturating; NaN stays NaN.
template <int K>
__device__ __forceinline__ uint8_t quantize(float x) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, interpretation<K>()));
}

// x / scale for many x and one scale, rounded exactly as __fdiv_rn (IEEE division) rounds, at
// three FMA-unit operations per quotient instead of a reciprocal each. With y = RN(1 / scale),
// q = RN(x * y) is within one ulp of x / scale, the residual r = x - scale * q is exact in one
// FMA, and RN(q + r * y) is then the correctly rounded quotient (Markstein's theorem; it is how
// the division itself finishes), provided nothing under- or overflows: so the fast path takes
// |x| and scale in [2^-60, 2^60] only, and everything else (zeros, whose sign the FMAs would not
// keep, subnormals, infinities, NaN, extreme scales) goes through __fdiv_rn.
struct Divider {
  float scale, inv;
  bool fast_scale;
  __device__ __forceinline__ explicit Divider(float s) {
    scale = s;
    inv = __frcp_rn(s);
    fast_scale = fabsf(s) >= 0x1p-60f && fabsf(s) <= 0x1p60f;
  }
  __device__ __forceinline__ float operator()(float x) const {
    if (scale == 1.f) return x;
    const float ax = fabsf(x);
    if (fast_scale && ax >= 0x1p-60f && ax <= 0x1p60f) {
      const float q = x * inv;
      const float r = fmaf(-scale, q, x);
      return fmaf(r, inv, q);
    }
    return __fdiv_rn(x, scale);
  }
};

// fp8(x[i] / scale) for four values, packed low byte first (x[0] in bits 0..7).
template <int K>
__device__ __forceinline__ uint32_t quantize4(const float x[4], const Divider& div) {
  const float2 a = make_float2(div(x[0]), div(x[1]));
  const float2 b = make_float2(div(x[2]), div(x[3]));
  const uint32_t lo = __nv_cvt_float2_to_fp8x2(a, __NV_SATFINITE, interpretation<K>());
  const uint32_t hi = __nv_cvt_float2_to_fp8x2(b, __NV_SATFINITE, interpretation<K>());
  return lo | (hi << 16);
}

// Two packed FP8 values (low byte first) widened exactly to an f16 pair, as the 32-bit register
// an f16 mma operand takes (the first value in the low half). One cvt on sm_89 and later.
template <int K>
__device__ __forceinline__ uint32_t to_half2_bits(uint32_t two) {
  const __half2_raw raw =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two & 0xffffu), interpretation<K>());
  return static_cast<uint32_t>(raw.x) | (static_cast<uint32_t>(raw.y) << 16);
}

// Two packed FP8 values (low byte first) widened exactly to an f16 pair.
template <int K>
__device__ __forceinline__ __half2 to_half2(uint16_t two) {
  const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two), interpretation<K>());
  return __half2(raw);
}

// Two packed FP8 values widened exactly to f32.
template <int K>
__device__ __forceinline__ float2 to_float2(uint16_t two) {
  return __half22float2(to_half2<K>(two));
}

// The scale of KV head `kv_head` (entry 0 when not per head); 1 when no scale buffer is given.
__device__ __forceinline__ float scale_of(const float* scales, int per_head, int kv_head) {
  return scales == nullptr ? 1.f : __ldg(scales + (per_head ? kv_head : 0));
}

}  // namespace fp8
}  // namespace pa
