// FP8 KV tiles for the prefill kernels: widening a staged FP8 K / V tile into the f16 / bf16 tile
// the tensor-core step reads, and the score transform with the K scale folded in.
//
// The prefill kernels copy FP8 cache rows (half the bytes of a 16-bit cache) with cp.async into a
// double-buffered staging area of plain [key][head_size] bytes, then, once a tile has landed, one
// pass over shared memory widens it into the compute-type tile (padded rows on sm80, swizzled panels
// on sm90). Widening is exact (every E4M3 / E5M2 value is an f16 and a bf16 value, NaN stays NaN,
// Inf stays Inf), so the tensor cores see the stored values unrounded; the scales stay out of the
// tile: k_scale multiplies the score scale, v_scale the output in the epilogue, each in f32 once.
//
// The kernels are instantiated once per compute type for "some FP8 format" and branch on the
// format (PaAttnArgs::kv_dtype) once per tile, block-uniformly: two instantiations rather than
// four, at the cost of a predictable branch around the conversion loop.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "attention/common.cuh"
#include "common/fp8.cuh"

namespace pa {
namespace fp8tile {

// Issues the cp.async copies of one FP8 K/V tile (BN rows of D bytes, row `r` at element offset
// ro[r] of each cache, -1 = zero-fill) into packed [BN][D]-byte staging buffers, NT threads.
template <int BN, int D, int NT>
__device__ __forceinline__ void stage_rows(unsigned char* ks8, unsigned char* vs8, const void* key_cache,
                                           const void* value_cache, const int64_t* ro, int tid) {
  constexpr int C16 = D / 16;
  const unsigned char* kc8 = static_cast<const unsigned char*>(key_cache);
  const unsigned char* vc8 = static_cast<const unsigned char*>(value_cache);
#pragma unroll 4
  for (int idx = tid; idx < BN * C16; idx += NT) {
    const int r = idx / C16, c = idx % C16;
    const int64_t row = ro[r];
    const bool valid = row >= 0;
    const int64_t off = valid ? row + c * 16 : 0;
    cp_async16(ks8 + idx * 16, kc8 + off, valid);
    cp_async16(vs8 + idx * 16, vc8 + off, valid);
  }
}

// Two packed FP8 values (low byte first) widened to a packed pair of T, exactly.
template <typename T> struct Widen;
template <> struct Widen<__half> {
  template <int K> static __device__ __forceinline__ uint32_t pair(uint32_t two) {
    __half2 h = fp8::to_half2<K>(static_cast<uint16_t>(two & 0xffffu));
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <> struct Widen<__nv_bfloat16> {
  template <int K> static __device__ __forceinline__ uint32_t pair(uint32_t two) {
    // FP8 -> f16 is exact and f16 -> f32 -> bf16 is exact for every FP8 value (3 or 2 mantissa
    // bits, exponents well inside bf16's range); NaN / Inf keep their class.
    const float2 f = fp8::to_float2<K>(static_cast<uint16_t>(two & 0xffffu));
    __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
    return *reinterpret_cast<uint32_t*>(&b);
  }
};

// 16 FP8 values (one 16-byte vector) widened to 16 T values (two 16-byte vectors).
template <typename T, int K> __device__ __forceinline__ void widen16(const uint4 v, uint4& a, uint4& b) {
  a.x = Widen<T>::template pair<K>(v.x);
  a.y = Widen<T>::template pair<K>(v.x >> 16);
  a.z = Widen<T>::template pair<K>(v.y);
  a.w = Widen<T>::template pair<K>(v.y >> 16);
  b.x = Widen<T>::template pair<K>(v.z);
  b.y = Widen<T>::template pair<K>(v.z >> 16);
  b.z = Widen<T>::template pair<K>(v.w);
  b.w = Widen<T>::template pair<K>(v.w >> 16);
}

// Widens one 16-byte vector of 16 FP8 values, `v`, of row r of a tile into the compute tile at
// columns 16 c ..; `dst(r, col)` returns the address of the 8 T elements of row r from column col
// (a multiple of 8) in the kernel's layout. With `sanitize`, non-finite widened elements are
// zeroed and a key that had one sets its bit in `bad` (bit r of the tile; see sanitize_pair in
// common.cuh): the Hopper kernels' unseen-V rule, fused into the conversion.
template <typename T, int K, typename Dst>
__device__ __forceinline__ void widen_store(const uint4 v, int r, int c, Dst dst, bool sanitize, uint32_t* bad) {
  uint4 a, b;
  widen16<T, K>(v, a, b);
  if (sanitize) {
    const uint32_t f = sanitize_pair<T>(a.x) | sanitize_pair<T>(a.y) | sanitize_pair<T>(a.z) | sanitize_pair<T>(a.w) |
                       sanitize_pair<T>(b.x) | sanitize_pair<T>(b.y) | sanitize_pair<T>(b.z) | sanitize_pair<T>(b.w);
    if (f != 0u) atomicOr(&bad[r >> 5], 1u << (r & 31));
  }
  *reinterpret_cast<uint4*>(dst(r, c * 16)) = a;
  *reinterpret_cast<uint4*>(dst(r, c * 16 + 8)) = b;
}

// Widens one staged K tile and one staged V tile ([BN][D] bytes each) into the compute tiles
// (see widen_store), V sanitised when `sanitize` (the sm90 kernel's unseen-V rule), NT threads.
template <typename T, int K, int BN, int D, int NT, typename DstK, typename DstV>
__device__ __forceinline__ void widen_kv_kind(const unsigned char* src_k, const unsigned char* src_v, DstK dst_k,
                                              DstV dst_v, int tid, bool sanitize, uint32_t* bad) {
  constexpr int C16 = D / 16;  // 16-byte FP8 vectors per row
  static_assert(D % 16 == 0, "FP8 rows are moved as 16-byte vectors");
#pragma unroll 2
  for (int idx = tid; idx < BN * C16; idx += NT) {
    const int r = idx / C16, c = idx % C16;
    // idx * 16 == r * D + c * 16: consecutive threads read consecutive vectors (no bank conflict).
    const uint4 kv = *reinterpret_cast<const uint4*>(src_k + idx * 16);
    const uint4 vv = *reinterpret_cast<const uint4*>(src_v + idx * 16);
    widen_store<T, K>(kv, r, c, dst_k, false, nullptr);
    widen_store<T, K>(vv, r, c, dst_v, sanitize, bad);
  }
}

// One staged tile widened (see widen_store), NT threads: for a kernel that publishes K before V.
template <typename T, int K, int BN, int D, int NT, typename Dst>
__device__ __forceinline__ void widen_tile_kind(const unsigned char* src, Dst dst, int tid, bool sanitize,
                                                uint32_t* bad) {
  constexpr int C16 = D / 16;
#pragma unroll 2
  for (int idx = tid; idx < BN * C16; idx += NT) {
    widen_store<T, K>(*reinterpret_cast<const uint4*>(src + idx * 16), idx / C16, idx % C16, dst, sanitize, bad);
  }
}

// widen_tile_kind for the run-time format `kind` (fp8::kE4M3 or fp8::kE5M2; block-uniform).
template <typename T, int BN, int D, int NT, typename Dst>
__device__ __forceinline__ void widen_tile(int kind, const unsigned char* src, Dst dst, int tid, bool sanitize = false,
                                           uint32_t* bad = nullptr) {
  if (kind == fp8::kE5M2) {
    widen_tile_kind<T, fp8::kE5M2, BN, D, NT>(src, dst, tid, sanitize, bad);
  } else {
    widen_tile_kind<T, fp8::kE4M3, BN, D, NT>(src, dst, tid, sanitize, bad);
  }
}

// widen_kv_kind for the run-time format `kind` (fp8::kE4M3 or fp8::kE5M2; block-uniform).
template <typename T, int BN, int D, int NT, typename DstK, typename DstV>
__device__ __forceinline__ void widen_kv(int kind, const unsigned char* src_k, const unsigned char* src_v, DstK dst_k,
                                         DstV dst_v, int tid, bool sanitize = false, uint32_t* bad = nullptr) {
  if (kind == fp8::kE5M2) {
    widen_kv_kind<T, fp8::kE5M2, BN, D, NT>(src_k, src_v, dst_k, dst_v, tid, sanitize, bad);
  } else {
    widen_kv_kind<T, fp8::kE4M3, BN, D, NT>(src_k, src_v, dst_k, dst_v, tid, sanitize, bad);
  }
}

// pa::score_log2 with the score scale given explicitly: `scale` = softmax scale * k_scale for an
// FP8 cache (the K dequantisation folded in), the plain softmax scale otherwise (then the same
// arithmetic as score_log2).
__device__ __forceinline__ float score_log2_scaled(float dot, float scale, const KernelParams& p, float slope, int pos,
                                                   int key) {
  float s = dot * scale;
  if (p.softcap > 0.f) s = p.softcap * tanhf(s / p.softcap);
  if (p.has_alibi) s -= slope * fabsf(static_cast<float>(pos - key));
  return s * kLog2e;
}

}  // namespace fp8tile
}  // namespace pa
