// The synthetic model of `paged-serve` on the device: Q/K/V from a hash of
// (seed, projection, layer, head, token id, position), and next tokens from a hash of a few values
// of the last layer's attention output.
//
// Both must be bit-identical to the CPU model (paged-serve/src/model.rs): the same 64-bit mixer,
// the same key layout, the same four 16-bit values per 64 random bits, the same exact scaling
// (an int16 times 2^-15 is exact in f32) and round-to-nearest-even to the storage type, which is
// what the `half` crate does on the host.
//
// qkv:   fused  [num_layers][num_tokens][(num_heads + 2 * num_kv_heads) * head_size], token rows
//        `row_stride` and layers `layer_stride` elements apart: query heads, then keys, then
//        values (the layout attention reads in place).
//        inputs (int64): positions [num_tokens], then token ids [num_tokens].
// sample: out    [num_tokens, num_heads, head_size] strided; last_rows (int64) [num_reqs] (outside
//        0..num_tokens = none, token 0);
//        next (uint32) [num_reqs].

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common/check.cuh"

namespace {

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T> __device__ __forceinline__ float to_f32(T x);
template <> __device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

// One thread = four consecutive elements of one head of one token of one layer.
template <typename T>
__global__ void __launch_bounds__(256)
    qkv_kernel(T* __restrict__ fused, const int64_t* __restrict__ inputs, int64_t num_tokens, int num_heads,
               int num_kv_heads, int head_size, int64_t row_stride, int64_t layer_stride, uint64_t seed) {
  const int chunks = head_size / 4;
  const int slots = num_heads + 2 * num_kv_heads;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t per_token = static_cast<int64_t>(slots) * chunks;
  if (idx >= num_tokens * per_token) return;
  const int layer = blockIdx.y;
  const int64_t token = idx / per_token;
  const int rem = static_cast<int>(idx - token * per_token);
  const int slot = rem / chunks;
  const int chunk = rem - slot * chunks;

  uint64_t proj, head;
  if (slot < num_heads) {
    proj = 1;
    head = slot;
  } else if (slot < num_heads + num_kv_heads) {
    proj = 2;
    head = slot - num_heads;
  } else {
    proj = 3;
    head = slot - num_heads - num_kv_heads;
  }
  const int64_t position = inputs[token];
  const uint64_t token_id = static_cast<uint64_t>(inputs[num_tokens + token]);
  const uint64_t key =
      seed ^ (proj << 60) ^ ((static_cast<uint64_t>(layer) & 0xfff) << 48) ^ ((head & 0xffff) << 32) ^ token_id;
  const uint64_t state = mix64(mix64(key) ^ (static_cast<uint64_t>(position) * kGolden));
  const uint64_t bits = mix64(state + static_cast<uint64_t>(chunk + 1) * kGolden);

  T* dst = fused + layer * layer_stride + token * row_stride + static_cast<int64_t>(slot) * head_size + chunk * 4;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float x =
        static_cast<float>(static_cast<int16_t>(static_cast<uint16_t>(bits >> (16 * i)))) * (1.0f / 32768.0f);
    dst[i] = from_f32<T>(x);
  }
}

// One thread per request: the hash of the first four values of the first two heads of its last row.
template <typename T>
__global__ void sample_kernel(const T* __restrict__ out, int64_t token_stride, int64_t head_stride,
                              const int64_t* __restrict__ last_rows, int64_t num_reqs, int64_t num_tokens,
                              int num_heads, int head_size, uint64_t seed, uint32_t vocab,
                              uint32_t* __restrict__ next) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= num_reqs) return;
  const int64_t row = last_rows[r];
  // Rows are device data: anything outside the output reads nothing.
  if (row < 0 || row >= num_tokens) {
    next[r] = 0;
    return;
  }
  uint64_t h = seed ^ 0x5eedull;
  const int heads = num_heads < 2 ? num_heads : 2;
  const int dims = head_size < 4 ? head_size : 4;
  for (int head = 0; head < heads; ++head) {
    for (int d = 0; d < dims; ++d) {
      const float x = to_f32<T>(out[row * token_stride + head * head_stride + d]);
      h = mix64(h ^ static_cast<uint64_t>(__float_as_uint(x)));
    }
  }
  next[r] = static_cast<uint32_t>(h % vocab);
}

template <typename T>
cudaError_t launch_qkv(void* fused, const int64_t* inputs, int64_t num_layers, int64_t num_tokens, int num_heads,
                       int num_kv_heads, int head_size, int64_t row_stride, int64_t layer_stride, uint64_t seed,
                       cudaStream_t stream) {
  const int64_t threads = num_tokens * (num_heads + 2 * num_kv_heads) * (head_size / 4);
  if (threads == 0 || num_layers == 0) return cudaSuccess;
  const int block = 256;
  const dim3 grid(static_cast<unsigned>((threads + block - 1) / block), static_cast<unsigned>(num_layers));
  qkv_kernel<T><<<grid, block, 0, stream>>>(static_cast<T*>(fused), inputs, num_tokens, num_heads, num_kv_heads,
                                            head_size, row_stride, layer_stride, seed);
  return pa_last_launch_status();
}

template <typename T>
cudaError_t launch_sample(const void* out, int64_t token_stride, int64_t head_stride, const int64_t* last_rows,
                          int64_t num_reqs, int64_t num_tokens, int num_heads, int head_size, uint64_t seed,
                          uint32_t vocab, uint32_t* next, cudaStream_t stream) {
  if (num_reqs == 0) return cudaSuccess;
  const int block = 128;
  const unsigned grid = static_cast<unsigned>((num_reqs + block - 1) / block);
  sample_kernel<T><<<grid, block, 0, stream>>>(static_cast<const T*>(out), token_stride, head_stride, last_rows,
                                               num_reqs, num_tokens, num_heads, head_size, seed, vocab, next);
  return pa_last_launch_status();
}

}  // namespace

// dtype: 0 = f16, 1 = bf16, 2 = f32. Sizes are checked by the Rust launcher: head_size is a
// multiple of 4, num_layers fits a grid's y dimension, the grid's x dimension fits 2^31 - 1.
PA_EXPORT cudaError_t pa_synthetic_qkv(void* fused, const int64_t* inputs, int64_t num_layers, int64_t num_tokens,
                                       int32_t num_heads, int32_t num_kv_heads, int32_t head_size, int64_t row_stride,
                                       int64_t layer_stride, uint64_t seed, int32_t dtype, cudaStream_t stream) {
  switch (dtype) {
    case 0:
      return launch_qkv<__half>(fused, inputs, num_layers, num_tokens, num_heads, num_kv_heads, head_size, row_stride,
                                layer_stride, seed, stream);
    case 1:
      return launch_qkv<__nv_bfloat16>(fused, inputs, num_layers, num_tokens, num_heads, num_kv_heads, head_size,
                                       row_stride, layer_stride, seed, stream);
    case 2:
      return launch_qkv<float>(fused, inputs, num_layers, num_tokens, num_heads, num_kv_heads, head_size, row_stride,
                               layer_stride, seed, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

PA_EXPORT cudaError_t pa_synthetic_sample(const void* out, int64_t token_stride, int64_t head_stride,
                                          const int64_t* last_rows, int64_t num_reqs, int64_t num_tokens,
                                          int32_t num_heads, int32_t head_size, uint64_t seed, uint32_t vocab,
                                          uint32_t* next, int32_t dtype, cudaStream_t stream) {
  switch (dtype) {
    case 0:
      return launch_sample<__half>(out, token_stride, head_stride, last_rows, num_reqs, num_tokens, num_heads,
                                   head_size, seed, vocab, next, stream);
    case 1:
      return launch_sample<__nv_bfloat16>(out, token_stride, head_stride, last_rows, num_reqs, num_tokens, num_heads,
                                          head_size, seed, vocab, next, stream);
    case 2:
      return launch_sample<float>(out, token_stride, head_stride, last_rows, num_reqs, num_tokens, num_heads, head_size,
                                  seed, vocab, next, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
