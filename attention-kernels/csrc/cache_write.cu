// KV-cache write (vLLM's reshape_and_cache_flash for the "NHD" layout).
//
// key/value:               [num_tokens, num_kv_heads, head_size], token rows `*_stride` elements apart
// key_cache/value_cache:   [num_blocks, block_size, num_kv_heads, head_size], blocks
//                          `cache_block_stride` elements apart (>= one block; 2 blocks for an
//                          interleaved [num_blocks, 2, ...] cache read through two base pointers)
// slot_mapping (int64):    [num_tokens]; slot = block_id * block_size + offset; negative = padding
//
// In the NHD layout the destination of one token is one contiguous row of num_kv_heads * head_size
// elements at `(slot / block_size) * cache_block_stride + (slot % block_size) * row_elems`, so the
// write is a gather-free row scatter: no dtype arithmetic, just bytes. The element type only matters for the vector width, chosen on the host.
//
// Threads: blockDim.x lanes walk the vectors of one row, blockDim.y rows (tokens) share a block so
// that small rows (one kv head of 64) still fill a block of 256 threads.
//
// Latency: a thread issues its source loads (which depend only on the token, and are always in
// bounds) together with the slot load, and only then waits on the slot; a padding token's row is
// read for nothing but never written. So the slot and source latencies overlap instead of adding
// up: each thread lives for about one memory latency, not two, which is what a scatter of a few
// vectors per thread needs to come near a plain copy.

#include "common/check.cuh"
#include "common/fp8.cuh"
#include "common/vec.cuh"

#include <cuda_bf16.h>

#include <type_traits>

namespace {

// The longest row (num_kv_heads * head_size) the launchers take: the kernels walk a row with
// 32-bit indices (at most 2 vectors per element, plus a block's lanes, stay below 2^32).
constexpr int64_t kMaxRowElems = int64_t{1} << 30;

// A cache's block size, with its log2 when it is a power of two (as it nearly always is): a
// slot's block and offset then cost a shift and a mask instead of a 64-bit division.
struct BlockSize {
  int64_t size;
  int shift;  // log2(size) for a power of two, else -1
  static BlockSize of(int64_t size) {
    int shift = -1;
    if ((size & (size - 1)) == 0) {
      shift = 0;
      while ((int64_t{1} << shift) < size) ++shift;
    }
    return BlockSize{size, shift};
  }
  // Where the row of `slot` (>= 0) starts: blocks `block_stride` apart, rows `row` apart.
  __device__ __forceinline__ int64_t row_offset(int64_t slot, int64_t block_stride, int64_t row) const {
    if (shift >= 0) return (slot >> shift) * block_stride + (slot & (size - 1)) * row;
    return (slot / size) * block_stride + (slot % size) * row;
  }
};

template <int VecBytes>
__global__ void __launch_bounds__(256)
    kv_write_kernel(const char* __restrict__ key, const char* __restrict__ value, char* __restrict__ key_cache,
                    char* __restrict__ value_cache, const int64_t* __restrict__ slot_mapping, int64_t num_tokens,
                    unsigned row_vecs, int64_t key_stride_vecs, int64_t value_stride_vecs, int64_t block_stride_vecs,
                    BlockSize block_size, int64_t num_slots) {
  using V = typename pa::Vec<VecBytes>::type;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  unsigned i = threadIdx.x;
  // Lanes past the row: the lane count is the row's vector count rounded up to a warp.
  if (token >= num_tokens || i >= row_vecs) return;
  const int64_t slot = slot_mapping[token];
  // The first vectors' loads depend only on the token, so they are issued before the slot is
  // known and the three latencies (slot, source, store) overlap instead of adding up. A padding
  // token's row is read for nothing: it lies inside the key and value tensors.
  const V* k_src = reinterpret_cast<const V*>(key) + token * key_stride_vecs;
  const V* v_src = reinterpret_cast<const V*>(value) + token * value_stride_vecs;
  V k = pa::ldg_now(k_src + i);
  V v = pa::ldg_now(v_src + i);
  // Padding tokens (negative slots) leave the cache untouched. Slots past the cache are rejected on
  // the host before the launch; the second test keeps a bad device-side value from ever writing
  // out of bounds.
  if (slot < 0 || slot >= num_slots) return;

  const int64_t dst = block_size.row_offset(slot, block_stride_vecs, row_vecs);
  V* k_dst = reinterpret_cast<V*>(key_cache) + dst;
  V* v_dst = reinterpret_cast<V*>(value_cache) + dst;
  for (;;) {
    k_dst[i] = k;
    v_dst[i] = v;
    i += blockDim.x;
    if (i >= row_vecs) break;
    // Rows longer than a block's lanes (> 256 vectors): both loads of the next step are issued
    // together, two requests in flight per thread.
    k = __ldg(k_src + i);
    v = __ldg(v_src + i);
  }
}

// The grid of a row scatter: blockDim.x lanes walk a row's `row_vecs` vectors (the count rounded
// up to a warp, at most 256), blockDim.y rows share a 256-thread block. `ok` is false when the
// token count needs more blocks than a grid holds.
struct RowGrid {
  dim3 block;
  unsigned blocks;
  bool ok;
};
inline RowGrid row_grid(int64_t row_vecs, int64_t num_tokens) {
  int lanes = static_cast<int>(row_vecs < 256 ? row_vecs : 256);
  lanes = ((lanes + 31) / 32) * 32;
  const int rows_per_block = 256 / lanes;
  const int64_t blocks = (num_tokens + rows_per_block - 1) / rows_per_block;
  return RowGrid{dim3(lanes, rows_per_block), static_cast<unsigned>(blocks), blocks <= 0x7fffffff};
}

template <int VecBytes>
cudaError_t launch(const void* key, const void* value, void* key_cache, void* value_cache, const int64_t* slot_mapping,
                   int64_t num_tokens, int64_t row_bytes, int64_t key_stride_bytes, int64_t value_stride_bytes,
                   int64_t block_stride_bytes, int64_t block_size, int64_t num_slots, cudaStream_t stream) {
  const int64_t row_vecs = row_bytes / VecBytes;
  const RowGrid g = row_grid(row_vecs, num_tokens);
  if (!g.ok) return cudaErrorInvalidConfiguration;
  kv_write_kernel<VecBytes><<<g.blocks, g.block, 0, stream>>>(
      static_cast<const char*>(key), static_cast<const char*>(value), static_cast<char*>(key_cache),
      static_cast<char*>(value_cache), slot_mapping, num_tokens, static_cast<unsigned>(row_vecs),
      key_stride_bytes / VecBytes, value_stride_bytes / VecBytes, block_stride_bytes / VecBytes,
      BlockSize::of(block_size), num_slots);
  return pa_last_launch_status();
}

// ---- FP8 caches ---------------------------------------------------------------------------------
//
// The quantising write: the same row scatter, with stored = fp8(x / scale) per element (IEEE f32
// division, then the saturating conversion; see common/fp8.cuh). VE elements per thread and
// tensor: 16 when every row, stride, head span and base address allows it (32 input bytes of
// f16/bf16 in two 16-byte loads become one 16-byte cache store), else 8 (one load of f16/bf16,
// one 8-byte store), else 1. f32 inputs take two 16-byte loads per 8 elements.
//
// Per thread: the slot, source and scale loads are all issued before any of them is waited on;
// the scale's reciprocal is taken once; then one range test over all 2 x VE elements picks the
// branch-free fast quotient for all of them (the common case) or the exact division for all.

// Loading (`Raw8` / `load8`: 16 or 32 bytes in 16-byte loads, kept raw so the registers in flight
// hold the input bytes, not their f32 widening; `pa::ldg_now`, so they stay ahead of the slot
// test) and widening to f32 (`widen8`, exact).
template <typename T> struct Widen;
template <> struct Widen<float> {
  struct Raw8 {
    float4 a, b;
  };
  static __device__ __forceinline__ Raw8 load8(const float* p) {
    const uint4 a = pa::ldg_now(reinterpret_cast<const uint4*>(p));
    const uint4 b = pa::ldg_now(reinterpret_cast<const uint4*>(p) + 1);
    return Raw8{make_float4(__uint_as_float(a.x), __uint_as_float(a.y), __uint_as_float(a.z), __uint_as_float(a.w)),
                make_float4(__uint_as_float(b.x), __uint_as_float(b.y), __uint_as_float(b.z), __uint_as_float(b.w))};
  }
  static __device__ __forceinline__ void widen8(const Raw8& r, float* f) {
    f[0] = r.a.x;
    f[1] = r.a.y;
    f[2] = r.a.z;
    f[3] = r.a.w;
    f[4] = r.b.x;
    f[5] = r.b.y;
    f[6] = r.b.z;
    f[7] = r.b.w;
  }
  static __device__ __forceinline__ float load1(const float* p) { return pa::ldg_now(p); }
};
template <> struct Widen<__half> {
  using Raw8 = uint4;
  static __device__ __forceinline__ Raw8 load8(const __half* p) {
    return pa::ldg_now(reinterpret_cast<const uint4*>(p));
  }
  static __device__ __forceinline__ void widen8(const Raw8& r, float* f) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  static __device__ __forceinline__ float load1(const __half* p) {
    return __half2float(__ushort_as_half(pa::ldg_now(reinterpret_cast<const uint16_t*>(p))));
  }
};
template <> struct Widen<__nv_bfloat16> {
  using Raw8 = uint4;
  static __device__ __forceinline__ Raw8 load8(const __nv_bfloat16* p) {
    return pa::ldg_now(reinterpret_cast<const uint4*>(p));
  }
  static __device__ __forceinline__ void widen8(const Raw8& r, float* f) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // bf16 -> f32 is exact: the bits move up 16 places.
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  static __device__ __forceinline__ float load1(const __nv_bfloat16* p) {
    return __uint_as_float(static_cast<uint32_t>(pa::ldg_now(reinterpret_cast<const uint16_t*>(p))) << 16);
  }
};

// One thread's VE source elements of one tensor, as loaded.
template <typename T, int VE> struct Src {
  static constexpr int kParts = VE / 8;
  typename Widen<T>::Raw8 part[kParts];
  static __device__ __forceinline__ Src load(const T* p) {
    Src s;
#pragma unroll
    for (int j = 0; j < kParts; ++j) s.part[j] = Widen<T>::load8(p + 8 * j);
    return s;
  }
  __device__ __forceinline__ void widen(float (&f)[VE]) const {
#pragma unroll
    for (int j = 0; j < kParts; ++j) Widen<T>::widen8(part[j], f + 8 * j);
  }
};
template <typename T> struct Src<T, 1> {
  float x;
  static __device__ __forceinline__ Src load(const T* p) { return Src{Widen<T>::load1(p)}; }
};

// The scale at `head` (0 for the layer's one scale); 1 without a scale buffer.
__device__ __forceinline__ float scale_at(const float* __restrict__ scales, unsigned head) {
  return scales == nullptr ? 1.f : pa::ldg_now(scales + head);
}

// fp8 of VE (16 or 8) quotients, packed low byte first, stored in one 16- or 8-byte store.
template <int K, int VE> __device__ __forceinline__ void store_fp8(const float (&q)[VE], uint8_t* dst) {
  static_assert(VE == 16 || VE == 8, "a 16- or 8-byte store");
  float h[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) h[j] = q[j];
  const uint2 lo = pa::fp8::pack8<K>(h);
  if constexpr (VE == 16) {
#pragma unroll
    for (int j = 0; j < 8; ++j) h[j] = q[8 + j];
    const uint2 hi = pa::fp8::pack8<K>(h);
    *reinterpret_cast<uint4*>(dst) = make_uint4(lo.x, lo.y, hi.x, hi.y);
  } else {
    *reinterpret_cast<uint2*>(dst) = lo;
  }
}

// Quantises one thread's K and V vectors (VE = 16 or 8 elements each) and stores them. One test
// covers all 2 x VE elements and both scales: in the common case every quotient takes the fast
// path with no branch per element; otherwise (a zero, subnormal, infinity, NaN or extreme value
// anywhere among them, or an extreme scale) all of them take the exact division. Either way each
// stored byte is fp8(__fdiv_rn(x, scale)).
template <typename T, int K, int VE>
__device__ __forceinline__ void quantize_store(const Src<T, VE>& kr, const Src<T, VE>& vr, const pa::fp8::Divider& ks,
                                               const pa::fp8::Divider& vs, bool scales_fast, uint8_t* k_dst,
                                               uint8_t* v_dst) {
  float kf[VE], vf[VE];
  kr.widen(kf);
  vr.widen(vf);
  bool in_range;
  if constexpr (std::is_same_v<T, float>) {
    float all[2 * VE];
#pragma unroll
    for (int j = 0; j < VE; ++j) {
      all[j] = kf[j];
      all[VE + j] = vf[j];
    }
    in_range = pa::fp8::in_fast_range(all);
  } else {
    // f16 / bf16: the test runs on the loaded pairs (see in_fast_range_packed).
    uint32_t w[VE];
#pragma unroll
    for (int j = 0; j < VE / 8; ++j) {
      const uint4 a = kr.part[j], b = vr.part[j];
      w[4 * j] = a.x;
      w[4 * j + 1] = a.y;
      w[4 * j + 2] = a.z;
      w[4 * j + 3] = a.w;
      w[VE / 2 + 4 * j] = b.x;
      w[VE / 2 + 4 * j + 1] = b.y;
      w[VE / 2 + 4 * j + 2] = b.z;
      w[VE / 2 + 4 * j + 3] = b.w;
    }
    using T2 = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
    in_range = pa::fp8::in_fast_range_packed<T2>(w);
  }
  if (scales_fast && in_range) {
#pragma unroll
    for (int j = 0; j < VE; ++j) {
      kf[j] = ks.fast(kf[j]);
      vf[j] = vs.fast(vf[j]);
    }
  } else {
    // Rare: one rolled loop keeps 2 x VE inlined divisions (and their registers) out of the
    // kernel; the array lives in local memory on this path only.
    float y[2 * VE];
#pragma unroll
    for (int j = 0; j < VE; ++j) {
      y[j] = kf[j];
      y[VE + j] = vf[j];
    }
#pragma unroll 1
    for (int j = 0; j < 2 * VE; ++j) y[j] = (j < VE ? ks : vs).exact(y[j]);
#pragma unroll
    for (int j = 0; j < VE; ++j) {
      kf[j] = y[j];
      vf[j] = y[VE + j];
    }
  }
  store_fp8<K>(kf, k_dst);
  store_fp8<K>(vf, v_dst);
}

template <typename T, int K, int VE>
__global__ void __launch_bounds__(256)
    kv_write_fp8_kernel(const T* __restrict__ key, const T* __restrict__ value, uint8_t* __restrict__ key_cache,
                        uint8_t* __restrict__ value_cache, const int64_t* __restrict__ slot_mapping,
                        const float* __restrict__ k_scale, const float* __restrict__ v_scale, unsigned head_vecs,
                        int64_t num_tokens, unsigned row_vecs, int64_t key_stride, int64_t value_stride,
                        int64_t block_stride, BlockSize block_size, int64_t num_slots) {
  static_assert(VE == 16 || VE == 8 || VE == 1, "16, 8 or 1 elements per thread");
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  unsigned i = threadIdx.x;
  if (token >= num_tokens || i >= row_vecs) return;
  const int64_t slot = slot_mapping[token];
  // As in kv_write_kernel: the source and scale loads depend only on the token and the lane, so
  // they are all in flight before the slot is tested (a padding token's row is read for nothing).
  const T* k_src = key + token * key_stride;
  const T* v_src = value + token * value_stride;
  Src<T, VE> kr = Src<T, VE>::load(k_src + i * VE);
  Src<T, VE> vr = Src<T, VE>::load(v_src + i * VE);
  // head_vecs = 0: one scale for the layer; else the scales' index is the KV head of this vector
  // (a vector never straddles two heads: the launcher checks head_size % VE == 0).
  auto head_of = [&](unsigned v) -> unsigned { return head_vecs > 0 ? v / head_vecs : 0; };
  unsigned head = head_of(i);
  const float ksc = scale_at(k_scale, head);
  const float vsc = scale_at(v_scale, head);
  if (slot < 0 || slot >= num_slots) return;  // padding, or a bad device value: never written

  const int64_t dst = block_size.row_offset(slot, block_stride, static_cast<int64_t>(row_vecs) * VE);
  uint8_t* k_dst = key_cache + dst;
  uint8_t* v_dst = value_cache + dst;
  // The per-scale work is done once per thread (and again per step only for per-head scales).
  pa::fp8::Divider ks(ksc), vs(vsc);
  bool scales_fast = ks.fast_scale && vs.fast_scale;
  for (;;) {
    if constexpr (VE == 1) {
      k_dst[i] = pa::fp8::quantize<K>(ks(kr.x));
      v_dst[i] = pa::fp8::quantize<K>(vs(vr.x));
    } else {
      quantize_store<T, K, VE>(kr, vr, ks, vs, scales_fast, k_dst + i * VE, v_dst + i * VE);
    }
    i += blockDim.x;
    if (i >= row_vecs) break;
    // Rows longer than a block's lanes (> 256 vectors).
    kr = Src<T, VE>::load(k_src + i * VE);
    vr = Src<T, VE>::load(v_src + i * VE);
    if (head_of(i) != head) {  // only with per-head scales, at a head boundary
      head = head_of(i);
      ks = pa::fp8::Divider(scale_at(k_scale, head));
      vs = pa::fp8::Divider(scale_at(v_scale, head));
      scales_fast = ks.fast_scale && vs.fast_scale;
    }
  }
}

template <typename T, int K, int VE>
cudaError_t launch_fp8(const void* key, const void* value, void* key_cache, void* value_cache,
                       const int64_t* slot_mapping, const float* k_scale, const float* v_scale, int64_t head_elems,
                       int64_t num_tokens, int64_t row_elems, int64_t key_stride, int64_t value_stride,
                       int64_t block_stride, int64_t block_size, int64_t num_slots, cudaStream_t stream) {
  const int64_t row_vecs = row_elems / VE;
  const RowGrid g = row_grid(row_vecs, num_tokens);
  if (!g.ok) return cudaErrorInvalidConfiguration;
  kv_write_fp8_kernel<T, K, VE><<<g.blocks, g.block, 0, stream>>>(
      static_cast<const T*>(key), static_cast<const T*>(value), static_cast<uint8_t*>(key_cache),
      static_cast<uint8_t*>(value_cache), slot_mapping, k_scale, v_scale, static_cast<unsigned>(head_elems / VE),
      num_tokens, static_cast<unsigned>(row_vecs), key_stride, value_stride, block_stride, BlockSize::of(block_size),
      num_slots);
  return pa_last_launch_status();
}

template <typename T>
cudaError_t dispatch_fp8(int32_t kv_dtype, int ve, const void* key, const void* value, void* key_cache,
                         void* value_cache, const int64_t* slot_mapping, const float* k_scale, const float* v_scale,
                         int64_t head_elems, int64_t num_tokens, int64_t row_elems, int64_t key_stride,
                         int64_t value_stride, int64_t block_stride, int64_t block_size, int64_t num_slots,
                         cudaStream_t stream) {
  auto go = [&](auto kind) {
    auto run = [&](auto v) {
      return launch_fp8<T, decltype(kind)::value, decltype(v)::value>(
          key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, head_elems, num_tokens, row_elems,
          key_stride, value_stride, block_stride, block_size, num_slots, stream);
    };
    if (ve == 16) return run(std::integral_constant<int, 16>{});
    if (ve == 8) return run(std::integral_constant<int, 8>{});
    return run(std::integral_constant<int, 1>{});
  };
  if (kv_dtype == pa::fp8::kE4M3) return go(std::integral_constant<int, pa::fp8::kE4M3>{});
  return go(std::integral_constant<int, pa::fp8::kE5M2>{});
}

template <typename T> struct Tag {
  using Type = T;
};

}  // namespace

// Quantising KV-cache write into FP8 caches: stored = fp8(x / scale), round to nearest even,
// saturating to the format's finite range (infinities too), NaN -> NaN (0x7f).
//   key/value: in_dtype 0 = f16, 1 = bf16, 2 = f32; token rows *_stride elements apart
//   caches: one byte per element; blocks cache_block_stride elements (bytes) apart
//   kv_dtype: 1 = E4M3, 2 = E5M2
//   k_scale / v_scale: DEVICE pointers to num_scales floats each (1 = the layer's scale, else one
//     per KV head: num_scales divides row_elems and head = element / (row_elems / num_scales)),
//     or null = 1.0 (the values are converted unscaled)
// Returns cudaErrorInvalidValue for an unknown dtype, inconsistent sizes or a row of more than 2^30
// elements.
PA_EXPORT cudaError_t pa_kv_cache_write_fp8(const void* key, const void* value, void* key_cache, void* value_cache,
                                            const int64_t* slot_mapping, const float* k_scale, const float* v_scale,
                                            int64_t num_scales, int64_t num_tokens, int64_t row_elems,
                                            int64_t key_stride, int64_t value_stride, int64_t num_blocks,
                                            int64_t block_size, int64_t cache_block_stride, int32_t in_dtype,
                                            int32_t kv_dtype, cudaStream_t stream) {
  if (in_dtype < 0 || in_dtype > 2) return cudaErrorInvalidValue;
  if (kv_dtype != pa::fp8::kE4M3 && kv_dtype != pa::fp8::kE5M2) return cudaErrorInvalidValue;
  if (block_size <= 0 || num_blocks < 0 || row_elems <= 0 || row_elems > kMaxRowElems) return cudaErrorInvalidValue;
  if (cache_block_stride < block_size * row_elems) return cudaErrorInvalidValue;
  if (num_scales < 1 || row_elems % num_scales != 0) return cudaErrorInvalidValue;
  if (num_tokens == 0) return cudaSuccess;
  const int64_t num_slots = num_blocks * block_size;
  // 0 = one scale for the whole row.
  const int64_t head_elems = num_scales > 1 ? row_elems / num_scales : 0;
  // 16 (else 8) elements per thread when every row start, both caches' rows and the head
  // boundaries are multiples of that many elements, the sources are aligned for 16-byte loads and
  // the caches for the 16- (8-) byte stores.
  const uint64_t in_align = reinterpret_cast<uintptr_t>(key) | reinterpret_cast<uintptr_t>(value);
  const uint64_t out_align = reinterpret_cast<uintptr_t>(key_cache) | reinterpret_cast<uintptr_t>(value_cache);
  const uint64_t elems = static_cast<uint64_t>(row_elems) | static_cast<uint64_t>(key_stride) |
                         static_cast<uint64_t>(value_stride) | static_cast<uint64_t>(cache_block_stride) |
                         static_cast<uint64_t>(head_elems);
  const int ve = in_align % 16 != 0                       ? 1
                 : elems % 16 == 0 && out_align % 16 == 0 ? 16
                 : elems % 8 == 0 && out_align % 8 == 0   ? 8
                                                          : 1;
  auto go = [&](auto tag) {
    return dispatch_fp8<typename decltype(tag)::Type>(kv_dtype, ve, key, value, key_cache, value_cache, slot_mapping,
                                                      k_scale, v_scale, head_elems, num_tokens, row_elems, key_stride,
                                                      value_stride, cache_block_stride, block_size, num_slots, stream);
  };
  switch (in_dtype) {
    case 0:
      return go(Tag<__half>{});
    case 1:
      return go(Tag<__nv_bfloat16>{});
    default:
      return go(Tag<float>{});
  }
}

// Writes num_tokens rows of K and V into the paged caches.
//   row_elems    = num_kv_heads * head_size
//   *_stride     = distance between consecutive tokens of key / value, in elements (>= row_elems)
//   num_blocks, block_size: the caches' blocks; slots >= num_blocks * block_size are skipped
//   cache_block_stride = distance between consecutive blocks of each cache, in elements
//                        (>= block_size * row_elems)
//   elem_bytes   = 2 (f16, bf16) or 4 (f32)
// Returns cudaErrorInvalidValue for an element size other than 2 or 4, inconsistent sizes or a row
// of more than 2^30 elements.
PA_EXPORT cudaError_t pa_kv_cache_write(const void* key, const void* value, void* key_cache, void* value_cache,
                                        const int64_t* slot_mapping, int64_t num_tokens, int64_t row_elems,
                                        int64_t key_stride, int64_t value_stride, int64_t num_blocks,
                                        int64_t block_size, int64_t cache_block_stride, int32_t elem_bytes,
                                        cudaStream_t stream) {
  if (elem_bytes != 2 && elem_bytes != 4) return cudaErrorInvalidValue;
  if (block_size <= 0 || num_blocks < 0 || row_elems <= 0 || row_elems > kMaxRowElems) return cudaErrorInvalidValue;
  if (cache_block_stride < block_size * row_elems) return cudaErrorInvalidValue;
  if (num_tokens == 0) return cudaSuccess;
  const int64_t num_slots = num_blocks * block_size;
  const int64_t row_bytes = row_elems * elem_bytes;
  const int64_t ks = key_stride * elem_bytes;
  const int64_t vs = value_stride * elem_bytes;
  const int64_t bs = cache_block_stride * elem_bytes;
  const uint64_t combined = static_cast<uint64_t>(row_bytes) | static_cast<uint64_t>(ks) | static_cast<uint64_t>(vs) |
                            static_cast<uint64_t>(bs) | reinterpret_cast<uintptr_t>(key) |
                            reinterpret_cast<uintptr_t>(value) | reinterpret_cast<uintptr_t>(key_cache) |
                            reinterpret_cast<uintptr_t>(value_cache);
  // `combined` has a low bit set wherever any operand does, so it is a multiple of N only when
  // every byte count and address is.
  switch (pa::widest_vector(combined)) {
    case 16:
      return launch<16>(key, value, key_cache, value_cache, slot_mapping, num_tokens, row_bytes, ks, vs, bs, block_size,
                        num_slots, stream);
    case 8:
      return launch<8>(key, value, key_cache, value_cache, slot_mapping, num_tokens, row_bytes, ks, vs, bs, block_size,
                       num_slots, stream);
    case 4:
      return launch<4>(key, value, key_cache, value_cache, slot_mapping, num_tokens, row_bytes, ks, vs, bs, block_size,
                       num_slots, stream);
    default:
      return launch<2>(key, value, key_cache, value_cache, slot_mapping, num_tokens, row_bytes, ks, vs, bs, block_size,
                       num_slots, stream);
  }
}

// The message of a CUDA runtime status, for error reports on the Rust side.
PA_EXPORT const char* pa_error_string(cudaError_t status) { return cudaGetErrorString(status); }
