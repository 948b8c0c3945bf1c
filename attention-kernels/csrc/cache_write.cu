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

#include "common/check.cuh"
#include "common/fp8.cuh"
#include "common/vec.cuh"

#include <cuda_bf16.h>

#include <type_traits>

namespace {

template <int VecBytes>
__global__ void __launch_bounds__(256) kv_write_kernel(
    const char* __restrict__ key, const char* __restrict__ value, char* __restrict__ key_cache,
    char* __restrict__ value_cache, const int64_t* __restrict__ slot_mapping, int64_t num_tokens,
    int64_t row_vecs, int64_t key_stride_vecs, int64_t value_stride_vecs, int64_t block_stride_vecs,
    int64_t block_size, int64_t num_slots) {
  using V = typename pa::Vec<VecBytes>::type;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (token >= num_tokens) return;
  const int64_t slot = slot_mapping[token];
  // Padding tokens (negative slots) leave the cache untouched. Slots past the cache are rejected on
  // the host before the launch; the second test keeps a bad device-side value from ever writing
  // out of bounds.
  if (slot < 0 || slot >= num_slots) return;

  const V* k_src = reinterpret_cast<const V*>(key) + token * key_stride_vecs;
  const V* v_src = reinterpret_cast<const V*>(value) + token * value_stride_vecs;
  const int64_t dst = (slot / block_size) * block_stride_vecs + (slot % block_size) * row_vecs;
  V* k_dst = reinterpret_cast<V*>(key_cache) + dst;
  V* v_dst = reinterpret_cast<V*>(value_cache) + dst;
  for (int64_t i = threadIdx.x; i < row_vecs; i += blockDim.x) {
    // Both loads are issued before either store so two requests are in flight per thread.
    const V k = __ldg(k_src + i);
    const V v = __ldg(v_src + i);
    k_dst[i] = k;
    v_dst[i] = v;
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
cudaError_t launch(const void* key, const void* value, void* key_cache, void* value_cache,
                   const int64_t* slot_mapping, int64_t num_tokens, int64_t row_bytes,
                   int64_t key_stride_bytes, int64_t value_stride_bytes, int64_t block_stride_bytes,
                   int64_t block_size, int64_t num_slots, cudaStream_t stream) {
  const int64_t row_vecs = row_bytes / VecBytes;
  const RowGrid g = row_grid(row_vecs, num_tokens);
  if (!g.ok) return cudaErrorInvalidConfiguration;
  kv_write_kernel<VecBytes><<<g.blocks, g.block, 0, stream>>>(
      static_cast<const char*>(key), static_cast<const char*>(value), static_cast<char*>(key_cache),
      static_cast<char*>(value_cache), slot_mapping, num_tokens, row_vecs,
      key_stride_bytes / VecBytes, value_stride_bytes / VecBytes, block_stride_bytes / VecBytes, block_size,
      num_slots);
  return pa_last_launch_status();
}

// ---- FP8 caches ---------------------------------------------------------------------------------
//
// The quantising write: the same row scatter, with stored = fp8(x / scale) per element (IEEE f32
// division, then the saturating conversion; see common/fp8.cuh). VE elements per thread: 8 when
// every row, stride, base address and per-head scale span allows it (16 input bytes of f16/bf16,
// or 32 of f32, become 8 cache bytes: one load or two, one 8-byte store), else 1.

template <typename T> struct Widen;
template <> struct Widen<float> {
  static __device__ __forceinline__ void load8(const float* p, float f[8]) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
  }
  static __device__ __forceinline__ float load1(const float* p) { return __ldg(p); }
};
template <> struct Widen<__half> {
  static __device__ __forceinline__ void load8(const __half* p, float f[8]) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  static __device__ __forceinline__ float load1(const __half* p) { return __half2float(p[0]); }
};
template <> struct Widen<__nv_bfloat16> {
  static __device__ __forceinline__ void load8(const __nv_bfloat16* p, float f[8]) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // bf16 -> f32 is exact: the bits move up 16 places.
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  static __device__ __forceinline__ float load1(const __nv_bfloat16* p) { return __bfloat162float(p[0]); }
};

template <typename T, int K, int VE>
__global__ void __launch_bounds__(256) kv_write_fp8_kernel(
    const T* __restrict__ key, const T* __restrict__ value, uint8_t* __restrict__ key_cache,
    uint8_t* __restrict__ value_cache, const int64_t* __restrict__ slot_mapping, const float* __restrict__ k_scale,
    const float* __restrict__ v_scale, int64_t head_vecs, int64_t num_tokens, int64_t row_vecs, int64_t key_stride,
    int64_t value_stride, int64_t block_stride, int64_t block_size, int64_t num_slots) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (token >= num_tokens) return;
  const int64_t slot = slot_mapping[token];
  if (slot < 0 || slot >= num_slots) return;  // padding, or a bad device value: never written
  const T* k_src = key + token * key_stride;
  const T* v_src = value + token * value_stride;
  const int64_t dst = (slot / block_size) * block_stride + (slot % block_size) * row_vecs * VE;
  uint8_t* k_dst = key_cache + dst;
  uint8_t* v_dst = value_cache + dst;
  for (int64_t i = threadIdx.x; i < row_vecs; i += blockDim.x) {
    // head_vecs = 0: one scale for the layer; else the scales' index is the KV head of this vector
    // (a vector never straddles two heads: the launcher checks head_size % VE == 0).
    const int64_t head = head_vecs > 0 ? i / head_vecs : 0;
    const pa::fp8::Divider ks(k_scale == nullptr ? 1.f : __ldg(k_scale + head));
    const pa::fp8::Divider vs(v_scale == nullptr ? 1.f : __ldg(v_scale + head));
    if constexpr (VE == 8) {
      float kf[8], vf[8];
      Widen<T>::load8(k_src + i * 8, kf);
      Widen<T>::load8(v_src + i * 8, vf);
      uint2 kq, vq;
      kq.x = pa::fp8::quantize4<K>(kf, ks);
      kq.y = pa::fp8::quantize4<K>(kf + 4, ks);
      vq.x = pa::fp8::quantize4<K>(vf, vs);
      vq.y = pa::fp8::quantize4<K>(vf + 4, vs);
      *reinterpret_cast<uint2*>(k_dst + i * 8) = kq;
      *reinterpret_cast<uint2*>(v_dst + i * 8) = vq;
    } else {
      k_dst[i] = pa::fp8::quantize<K>(ks(Widen<T>::load1(k_src + i)));
      v_dst[i] = pa::fp8::quantize<K>(vs(Widen<T>::load1(v_src + i)));
    }
  }
}

template <typename T, int K, int VE>
cudaError_t launch_fp8(const void* key, const void* value, void* key_cache, void* value_cache,
                       const int64_t* slot_mapping, const float* k_scale, const float* v_scale,
                       int64_t head_elems, int64_t num_tokens, int64_t row_elems, int64_t key_stride,
                       int64_t value_stride, int64_t block_stride, int64_t block_size, int64_t num_slots,
                       cudaStream_t stream) {
  const int64_t row_vecs = row_elems / VE;
  const RowGrid g = row_grid(row_vecs, num_tokens);
  if (!g.ok) return cudaErrorInvalidConfiguration;
  kv_write_fp8_kernel<T, K, VE><<<g.blocks, g.block, 0, stream>>>(
      static_cast<const T*>(key), static_cast<const T*>(value), static_cast<uint8_t*>(key_cache),
      static_cast<uint8_t*>(value_cache), slot_mapping, k_scale, v_scale, head_elems / VE, num_tokens, row_vecs,
      key_stride, value_stride, block_stride, block_size, num_slots);
  return pa_last_launch_status();
}

template <typename T>
cudaError_t dispatch_fp8(int32_t kv_dtype, bool vec8, const void* key, const void* value, void* key_cache,
                         void* value_cache, const int64_t* slot_mapping, const float* k_scale,
                         const float* v_scale, int64_t head_elems, int64_t num_tokens, int64_t row_elems,
                         int64_t key_stride, int64_t value_stride, int64_t block_stride, int64_t block_size,
                         int64_t num_slots, cudaStream_t stream) {
  auto go = [&](auto kind, auto ve) {
    return launch_fp8<T, decltype(kind)::value, decltype(ve)::value>(
        key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, head_elems, num_tokens, row_elems,
        key_stride, value_stride, block_stride, block_size, num_slots, stream);
  };
  using E4 = std::integral_constant<int, pa::fp8::kE4M3>;
  using E5 = std::integral_constant<int, pa::fp8::kE5M2>;
  using V8 = std::integral_constant<int, 8>;
  using V1 = std::integral_constant<int, 1>;
  if (kv_dtype == pa::fp8::kE4M3) return vec8 ? go(E4{}, V8{}) : go(E4{}, V1{});
  return vec8 ? go(E5{}, V8{}) : go(E5{}, V1{});
}

}  // namespace

// Quantising KV-cache write into FP8 caches: stored = fp8(x / scale), round to nearest even,
// saturating to the format's finite range (infinities too), NaN -> NaN (0x7f).
//   key/value: in_dtype 0 = f16, 1 = bf16, 2 = f32; token rows *_stride elements apart
//   caches: one byte per element; blocks cache_block_stride elements (bytes) apart
//   kv_dtype: 1 = E4M3, 2 = E5M2
//   k_scale / v_scale: DEVICE pointers to num_scales floats each (1 = the layer's scale, else one
//     per KV head: num_scales divides row_elems and head = element / (row_elems / num_scales)),
//     or null = 1.0 (the values are converted unscaled)
// Returns cudaErrorInvalidValue for an unknown dtype or inconsistent sizes.
PA_EXPORT cudaError_t pa_kv_cache_write_fp8(const void* key, const void* value, void* key_cache, void* value_cache,
                                            const int64_t* slot_mapping, const float* k_scale,
                                            const float* v_scale, int64_t num_scales, int64_t num_tokens,
                                            int64_t row_elems, int64_t key_stride, int64_t value_stride,
                                            int64_t num_blocks, int64_t block_size, int64_t cache_block_stride,
                                            int32_t in_dtype, int32_t kv_dtype, cudaStream_t stream) {
  if (in_dtype < 0 || in_dtype > 2) return cudaErrorInvalidValue;
  if (kv_dtype != pa::fp8::kE4M3 && kv_dtype != pa::fp8::kE5M2) return cudaErrorInvalidValue;
  if (block_size <= 0 || num_blocks < 0 || row_elems <= 0) return cudaErrorInvalidValue;
  if (cache_block_stride < block_size * row_elems) return cudaErrorInvalidValue;
  if (num_scales < 1 || row_elems % num_scales != 0) return cudaErrorInvalidValue;
  if (num_tokens == 0) return cudaSuccess;
  const int64_t num_slots = num_blocks * block_size;
  // 0 = one scale for the whole row.
  const int64_t head_elems = num_scales > 1 ? row_elems / num_scales : 0;
  const int64_t in_bytes = in_dtype == 2 ? 4 : 2;
  // Eight elements per thread when every row start, both caches' rows and the head boundaries
  // are multiples of 8 elements and the bases are aligned for the 8 x in_bytes loads and 8-byte
  // stores.
  const bool vec8 =
      row_elems % 8 == 0 && key_stride % 8 == 0 && value_stride % 8 == 0 && cache_block_stride % 8 == 0 &&
      head_elems % 8 == 0 && reinterpret_cast<uintptr_t>(key) % (8 * in_bytes) == 0 &&
      reinterpret_cast<uintptr_t>(value) % (8 * in_bytes) == 0 && reinterpret_cast<uintptr_t>(key_cache) % 8 == 0 &&
      reinterpret_cast<uintptr_t>(value_cache) % 8 == 0;
  switch (in_dtype) {
    case 0:
      return dispatch_fp8<__half>(kv_dtype, vec8, key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale,
                                  head_elems, num_tokens, row_elems, key_stride, value_stride, cache_block_stride,
                                  block_size, num_slots, stream);
    case 1:
      return dispatch_fp8<__nv_bfloat16>(kv_dtype, vec8, key, value, key_cache, value_cache, slot_mapping, k_scale,
                                         v_scale, head_elems, num_tokens, row_elems, key_stride, value_stride,
                                         cache_block_stride, block_size, num_slots, stream);
    default:
      return dispatch_fp8<float>(kv_dtype, vec8, key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale,
                                 head_elems, num_tokens, row_elems, key_stride, value_stride, cache_block_stride,
                                 block_size, num_slots, stream);
  }
}

// Writes num_tokens rows of K and V into the paged caches.
//   row_elems    = num_kv_heads * head_size
//   *_stride     = distance between consecutive tokens of key / value, in elements (>= row_elems)
//   num_blocks, block_size: the caches' blocks; slots >= num_blocks * block_size are skipped
//   cache_block_stride = distance between consecutive blocks of each cache, in elements
//                        (>= block_size * row_elems)
//   elem_bytes   = 2 (f16, bf16) or 4 (f32)
// Returns cudaErrorInvalidValue for an element size other than 2 or 4 or inconsistent sizes.
PA_EXPORT cudaError_t pa_kv_cache_write(const void* key, const void* value, void* key_cache,
                                        void* value_cache, const int64_t* slot_mapping,
                                        int64_t num_tokens, int64_t row_elems, int64_t key_stride,
                                        int64_t value_stride, int64_t num_blocks, int64_t block_size,
                                        int64_t cache_block_stride, int32_t elem_bytes,
                                        cudaStream_t stream) {
  if (elem_bytes != 2 && elem_bytes != 4) return cudaErrorInvalidValue;
  if (block_size <= 0 || num_blocks < 0 || row_elems <= 0) return cudaErrorInvalidValue;
  if (cache_block_stride < block_size * row_elems) return cudaErrorInvalidValue;
  if (num_tokens == 0) return cudaSuccess;
  const int64_t num_slots = num_blocks * block_size;
  const int64_t row_bytes = row_elems * elem_bytes;
  const int64_t ks = key_stride * elem_bytes;
  const int64_t vs = value_stride * elem_bytes;
  const int64_t bs = cache_block_stride * elem_bytes;
  const uint64_t combined = static_cast<uint64_t>(row_bytes) | static_cast<uint64_t>(ks) |
                            static_cast<uint64_t>(vs) | static_cast<uint64_t>(bs) |
                            reinterpret_cast<uintptr_t>(key) |
                            reinterpret_cast<uintptr_t>(value) |
                            reinterpret_cast<uintptr_t>(key_cache) |
                            reinterpret_cast<uintptr_t>(value_cache);
  // `combined` has a low bit set wherever any operand does, so it is a multiple of N only when
  // every byte count and address is.
  switch (pa::widest_vector(combined)) {
    case 16:
      return launch<16>(key, value, key_cache, value_cache, slot_mapping, num_tokens, row_bytes, ks,
                        vs, bs, block_size, num_slots, stream);
    case 8:
      return launch<8>(key, value, key_cache, value_cache, slot_mapping, num_tokens, row_bytes, ks,
                       vs, bs, block_size, num_slots, stream);
    case 4:
      return launch<4>(key, value, key_cache, value_cache, slot_mapping, num_tokens, row_bytes, ks,
                       vs, bs, block_size, num_slots, stream);
    default:
      return launch<2>(key, value, key_cache, value_cache, slot_mapping, num_tokens, row_bytes, ks,
                       vs, bs, block_size, num_slots, stream);
  }
}

// The message of a CUDA runtime status, for error reports on the Rust side.
PA_EXPORT const char* pa_error_string(cudaError_t status) { return cudaGetErrorString(status); }
