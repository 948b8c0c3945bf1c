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
#include "common/vec.cuh"

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

template <int VecBytes>
cudaError_t launch(const void* key, const void* value, void* key_cache, void* value_cache,
                   const int64_t* slot_mapping, int64_t num_tokens, int64_t row_bytes,
                   int64_t key_stride_bytes, int64_t value_stride_bytes, int64_t block_stride_bytes,
                   int64_t block_size, int64_t num_slots, cudaStream_t stream) {
  const int64_t row_vecs = row_bytes / VecBytes;
  // Lanes per row: the row's vector count rounded up to a warp, at most 256.
  int lanes = static_cast<int>(row_vecs < 256 ? row_vecs : 256);
  lanes = ((lanes + 31) / 32) * 32;
  const int rows_per_block = 256 / lanes;
  const dim3 block(lanes, rows_per_block);
  const int64_t blocks = (num_tokens + rows_per_block - 1) / rows_per_block;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  kv_write_kernel<VecBytes><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
      static_cast<const char*>(key), static_cast<const char*>(value), static_cast<char*>(key_cache),
      static_cast<char*>(value_cache), slot_mapping, num_tokens, row_vecs,
      key_stride_bytes / VecBytes, value_stride_bytes / VecBytes, block_stride_bytes / VecBytes, block_size,
      num_slots);
  return pa_last_launch_status();
}

}  // namespace

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
