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

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace pa {
namespace fp8 {

enum Kind : int { kSame = 0, kE4M3 = 1, kE5M2 = 2 };

template <int K> __device__ __forceinline__ __nv_fp8_interpretation_t interpretation() {
  static_assert(K == kE4M3 || K == kE5M2, "not an FP8 kind");
  return K == kE4M3 ? __NV_E4M3 : __NV_E5M2;
}

// fp8(x), saturating; NaN stays NaN.
template <int K> __device__ __forceinline__ uint8_t quantize(float x) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, interpretation<K>()));
}

// x / scale for many x and one scale, rounded exactly as __fdiv_rn (IEEE division) rounds, at
// three FMA-unit operations per quotient instead of a reciprocal each. With y = RN(1 / scale),
// q = RN(x * y) is within one ulp of x / scale, the residual r = x - scale * q is exact in one
// FMA, and RN(q + r * y) is then the correctly rounded quotient (Markstein's theorem; it is how
// the division itself finishes), provided nothing under- or overflows: so the fast path takes
// |x| and scale in [2^-60, 2^60] only, and everything else (zeros, whose sign the FMAs would not
// keep, subnormals, infinities, NaN, extreme scales) goes through __fdiv_rn.
//
// The per-scale work (the reciprocal, the range test of the scale) is done once, when the Divider
// is made. A vector kernel tests its whole vector once (`FastRange`) and then runs either `fast`
// or `exact` on every element, so the common case has no branch per element.
struct Divider {
  float scale, inv;
  bool fast_scale;
  __device__ __forceinline__ explicit Divider(float s) {
    scale = s;
    inv = __frcp_rn(s);
    fast_scale = fabsf(s) >= 0x1p-60f && fabsf(s) <= 0x1p60f;  // false for NaN
  }
  // x / scale, correctly rounded when fast_scale and |x| in [2^-60, 2^60] (see above).
  __device__ __forceinline__ float fast(float x) const {
    const float q = x * inv;
    const float r = fmaf(-scale, q, x);
    return fmaf(r, inv, q);
  }
  // x / scale, correctly rounded for every x and scale.
  __device__ __forceinline__ float exact(float x) const { return __fdiv_rn(x, scale); }
  // x / scale, correctly rounded, choosing the path per element.
  __device__ __forceinline__ float operator()(float x) const {
    const float ax = fabsf(x);
    return fast_scale && ax >= 0x1p-60f && ax <= 0x1p60f ? fast(x) : exact(x);
  }
};

// The largest of |a| and |b|, NaN when either is NaN (fmaxf would drop the NaN). sm_80 and later.
__device__ __forceinline__ float abs_max_nan(float a, float b) {
  float m;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(m) : "f"(fabsf(a)), "f"(fabsf(b)));
  return m;
}

// Whether every one of N values (N a power of two) is in the Divider's fast range [2^-60, 2^60]:
// the smallest and largest magnitude, reduced as a tree (depth log2 N, N - 1 min and max each),
// then two compares. A NaN makes the largest magnitude NaN and fails the test; a zero, a
// subnormal or an infinity fails it through the bounds.
template <int N> __device__ __forceinline__ bool in_fast_range(const float (&x)[N]) {
  static_assert(N >= 2 && (N & (N - 1)) == 0, "N must be a power of two");
  float lo[N / 2], hi[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    lo[i] = fminf(fabsf(x[2 * i]), fabsf(x[2 * i + 1]));
    hi[i] = abs_max_nan(x[2 * i], x[2 * i + 1]);
  }
#pragma unroll
  for (int n = N / 4; n >= 1; n /= 2) {
#pragma unroll
    for (int i = 0; i < n; ++i) {
      lo[i] = fminf(lo[i], lo[i + n]);
      hi[i] = abs_max_nan(hi[i], hi[i + n]);
    }
  }
  return lo[0] >= 0x1p-60f && hi[0] <= 0x1p60f;
}

// The same test for N f16 or bf16 values packed in pairs (T2 = __half2 or __nv_bfloat162) in W
// 32-bit words, made on the packed values before they are widened (half the min/max
// instructions, and no f32 copies live yet): widening is exact, so the magnitudes compare the
// same. __hmax2_nan keeps a NaN, and __hmin2 drops it only where the max already carries it.
template <typename T2, int W> __device__ __forceinline__ bool in_fast_range_packed(const uint32_t (&w)[W]) {
  static_assert(W >= 2 && (W & (W - 1)) == 0, "W must be a power of two");
  T2 lo[W / 2], hi[W / 2];
#pragma unroll
  for (int i = 0; i < W / 2; ++i) {
    const T2 a = __habs2(*reinterpret_cast<const T2*>(&w[2 * i]));
    const T2 b = __habs2(*reinterpret_cast<const T2*>(&w[2 * i + 1]));
    lo[i] = __hmin2(a, b);
    hi[i] = __hmax2_nan(a, b);
  }
#pragma unroll
  for (int n = W / 4; n >= 1; n /= 2) {
#pragma unroll
    for (int i = 0; i < n; ++i) {
      lo[i] = __hmin2(lo[i], lo[i + n]);
      hi[i] = __hmax2_nan(hi[i], hi[i + n]);
    }
  }
  const float l = fminf(__low2float(lo[0]), __high2float(lo[0]));
  const float h = abs_max_nan(__low2float(hi[0]), __high2float(hi[0]));
  return l >= 0x1p-60f && h <= 0x1p60f;
}

// fp8(y[i]) for eight f32 values, packed low byte first (y[0] in bits 0..7 of .x): four cvts of
// two values each.
template <int K> __device__ __forceinline__ uint2 pack8(const float (&y)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    w[i] = __nv_cvt_float2_to_fp8x2(make_float2(y[2 * i], y[2 * i + 1]), __NV_SATFINITE, interpretation<K>());
  }
  return make_uint2(w[0] | (w[1] << 16), w[2] | (w[3] << 16));
}

// Two packed FP8 values (low byte first) widened exactly to an f16 pair, as the 32-bit register
// an f16 mma operand takes (the first value in the low half). One cvt on sm_89 and later.
template <int K> __device__ __forceinline__ uint32_t to_half2_bits(uint32_t two) {
  const __half2_raw raw =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two & 0xffffu), interpretation<K>());
  return static_cast<uint32_t>(raw.x) | (static_cast<uint32_t>(raw.y) << 16);
}

// Two packed FP8 values (low byte first) widened exactly to an f16 pair.
template <int K> __device__ __forceinline__ __half2 to_half2(uint16_t two) {
  const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two), interpretation<K>());
  return __half2(raw);
}

// Two packed FP8 values widened exactly to f32.
template <int K> __device__ __forceinline__ float2 to_float2(uint16_t two) { return __half22float2(to_half2<K>(two)); }

// The scale of KV head `kv_head` (entry 0 when not per head); 1 when no scale buffer is given.
__device__ __forceinline__ float scale_of(const float* scales, int per_head, int kv_head) {
  return scales == nullptr ? 1.f : __ldg(scales + (per_head ? kv_head : 0));
}

}  // namespace fp8
}  // namespace pa
