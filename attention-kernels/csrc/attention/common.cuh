// Shared pieces of the paged attention kernels: the argument block, element conversions,
// cp.async / ldmatrix / mma.sync wrappers and the score transform (the softmax state and the final
// normalisation: softmax_state.cuh).
//
// Semantics (attention-backend's params.rs): for request r with q_len new tokens and seq_len keys,
// query row i sits at position p = seq_len - q_len + i; key j gets
//   s = scale * <q, k_j>;  s = cap * tanh(s / cap) (soft-cap);  s -= slope * |p - j| (ALiBi)
// and is visible iff j < seq_len, j <= p (causal), j <= p + window_right, j >= p - window_left.
// The softmax denominator also holds exp(sink) when sinks are on. A row that sees nothing is 0
// with lse = -inf (or lse = sink with sinks).
//
// All softmax state is kept in the log2 domain (scores multiplied by log2(e)) so exp2f serves.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common/fp8.cuh"

#include <atomic>
#include <cstdint>

#include "common/check.cuh"

namespace pa {

// Raises Kernel's dynamic shared-memory limit to `bytes` once per device rather than before every
// launch: the attribute is per function and context, and the call costs about a microsecond of
// host time, several per layer otherwise. A device is marked only after the call succeeds; devices
// past the 64th are configured on every launch.
template <auto Kernel> inline cudaError_t set_max_dynamic_smem_once(int bytes) {
  static std::atomic<unsigned long long> done{0};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const unsigned long long bit = (dev >= 0 && dev < 64) ? (1ull << dev) : 0ull;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && bit != 0) done.fetch_or(bit, std::memory_order_release);
  return err;
}

// The global timer, ns (the hang guards of the prefill's producer and the decode's group merge,
// and the trace builds' marks).
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Device ordinals whose per-device figures are cached (per_device_cached); later ones are asked
// every time.
constexpr int kCachedDevices = 64;

// A positive figure of the current device, worked out by `compute(dev, &value)` once per device
// ordinal and process and kept in `cache` (kCachedDevices zero-initialised slots, 0: not yet
// known). `compute` returns an error rather than a value <= 0. Writes *value only on success.
template <typename F> inline cudaError_t per_device_cached(std::atomic<int>* cache, F compute, int* value) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const bool slot = dev >= 0 && dev < kCachedDevices;
  if (slot) {
    const int c = cache[dev].load(std::memory_order_relaxed);
    if (c > 0) {
      *value = c;
      return cudaSuccess;
    }
  }
  int c = 0;
  err = compute(dev, &c);
  if (err != cudaSuccess) return err;
  if (slot) cache[dev].store(c, std::memory_order_relaxed);
  *value = c;
  return cudaSuccess;
}

// Streaming multiprocessors of the current device, asked once per device and process (a persistent
// kernel sizes its grid with it; the attribute query is cheap but not free on every launch).
inline cudaError_t sm_count(int* n) {
  static std::atomic<int> cached[kCachedDevices] = {};
  return per_device_cached(
      cached,
      [](int dev, int* c) {
        const cudaError_t err = cudaDeviceGetAttribute(c, cudaDevAttrMultiProcessorCount, dev);
        if (err != cudaSuccess) return err;
        return *c > 0 ? cudaSuccess : cudaErrorInvalidDevice;
      },
      n);
}

// Resident blocks per SM of `kernel` launched with `threads` threads and `smem` bytes of dynamic
// shared memory, as the runtime's occupancy calculator reports it (after allowing that much
// shared memory, as the launch does). Needs a current CUDA context; writes *blocks only on success.
template <typename K> inline cudaError_t occupancy_blocks_per_sm(K kernel, int threads, int smem, int32_t* blocks) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  int n = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem);
  if (err == cudaSuccess) *blocks = n;
  return err;
}

// The diagnostic trace reads (pa_decode_trace_read, pa_prefill_trace_read): up to `max_records`
// of the `records` records of `words` u64 each in the __device__ array `symbol` copied to `host`,
// after a device synchronisation so the last launch has written them; a request of none (a probe)
// does not wait.
template <typename Symbol>
inline cudaError_t read_trace_records(uint64_t* host, int32_t max_records, int records, int words,
                                      const Symbol& symbol) {
  const int n = max_records < 0 ? 0 : (max_records < records ? max_records : records);
  if (n == 0) return cudaSuccess;
  const cudaError_t err = cudaDeviceSynchronize();
  if (err != cudaSuccess) return err;
  return cudaMemcpyFromSymbol(host, symbol, static_cast<size_t>(n) * words * sizeof(uint64_t));
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Per-head feature vectors (ALiBi slopes, sinks) travel by value in the kernel parameters.
constexpr int kMaxFeatureHeads = 256;

}  // namespace pa

// The argument block of both launchers; mirrored by `PaAttnArgs` in src/ffi.rs (repr(C)).
// Pointers first, then 64-bit, then 32-bit fields, so the C and Rust layouts agree trivially.
//
// Query and out are [num_tokens, num_heads, head_size] views with a token stride and a head stride
// (elements; the last dimension is contiguous), so rows of a fused QKV buffer are read in place.
// Each cache is [num_blocks, block_size, num_kv_heads, head_size] with consecutive blocks
// `kv_block_stride` elements apart (>= one block), so separate caches and one interleaved
// [num_blocks, 2, block_size, num_kv_heads, head_size] buffer (two base pointers) both work. Every
// base pointer and stride is a multiple of 16 bytes: the kernels move 16-byte vectors.
struct PaAttnArgs {
  const void* query;               // [num_tokens, num_heads, head_size], strided
  const void* key_cache;           // [num_blocks, block_size, num_kv_heads, head_size], strided
  const void* value_cache;         // same
  void* out;                       // [num_tokens, num_heads, head_size], strided
  float* lse;                      // [num_tokens, num_heads] or null
  const int32_t* query_start_loc;  // [num_reqs + 1]
  const int32_t* seq_lens;         // [num_reqs]
  const int32_t* block_table;      // [num_reqs, max_blocks_per_req]
  const float* alibi_slopes;       // HOST pointer, [num_heads], or null
  const float* sinks;              // HOST pointer, [num_heads], or null
  float* workspace;                // split-KV partials (decode), or null
  int64_t workspace_len;           // elements of `workspace`
  int64_t num_tokens;              // rows of query / out / lse
  int64_t num_blocks;              // blocks of each cache
  int64_t q_token_stride;          // elements between consecutive tokens of query
  int64_t q_head_stride;           // elements between consecutive heads of query
  int64_t o_token_stride;          // same for out
  int64_t o_head_stride;
  int64_t kv_block_stride;         // elements between consecutive blocks of each cache
  int32_t num_reqs;                // rows of seq_lens / block_table
  int32_t req_begin;               // first request of this launch
  int32_t req_end;                 // one past the last
  int32_t num_heads;
  int32_t num_kv_heads;
  int32_t head_size;
  int32_t block_size;
  int32_t max_blocks_per_req;
  int32_t max_query_len;  // longest query of [req_begin, req_end) (prefill grid)
  int32_t num_splits;     // split-KV partitions (decode)
  int32_t causal;
  int32_t window_left;   // -1 = unlimited
  int32_t window_right;  // -1 = unlimited
  float scale;
  float softcap;  // 0 = off
  int32_t dtype;  // 0 = f16, 1 = bf16
  // Decode only: > 0 = every split covers exactly this many keys (a multiple of 64) from the
  // request's first visible key, so a request's reduction order depends on its own length alone
  // (batch-invariant mode; splits past its keys are empty); 0 = keys divided evenly into
  // num_splits.
  int32_t split_keys;
  // Decode only: pipeline variant (low byte, see paged_decode.cu) and bit 8 = fold the split-KV
  // combine into the last split to finish. 0 = the default.
  int32_t decode_variant;
  // KV-cache storage: 0 = the compute type (`dtype`), 1 = FP8 E4M3, 2 = FP8 E5M2. An FP8 cache
  // holds fp8(x / scale); the kernels read stored * scale, folding the K scale into the score
  // scale and the V scale into the output.
  int32_t kv_dtype;
  // 1 = `k_scale` / `v_scale` hold one float per KV head, 0 = one float for the whole layer.
  int32_t kv_scale_per_head;
  const float* k_scale;            // DEVICE pointer, or null = 1.0 (FP8 caches only)
  const float* v_scale;            // DEVICE pointer, or null = 1.0 (FP8 caches only)
  // Warp-specialised prefill only: its persistent grid. 0 = one block per SM (the default),
  // N > 0 = at most N blocks (tests make every block walk many items), -1 = one block per item
  // (the launch before the grid was persistent, for benchmarks).
  int32_t prefill_grid;
  // Warp-specialised prefill only: the order its persistent blocks walk the work items in. 0 =
  // strided (block b takes items b, b + grid, b + 2 grid, ...), 1 = zig-zag (every other round
  // walks the blocks in reverse, so the block that took the heaviest item of one round takes the
  // lightest of the next; the Rust launcher's default). Anything else: cudaErrorInvalidValue.
  int32_t prefill_order;
};
// The Rust mirror asserts the same size; a field added on one side only fails both builds.
static_assert(sizeof(PaAttnArgs) == 256, "PaAttnArgs layout changed: update src/ffi.rs too");

namespace pa {

// What the kernels read: the argument block with device pointers and the per-head vectors inlined.
struct KernelParams {
  const void* query;
  const void* key_cache;
  const void* value_cache;
  void* out;
  float* lse;
  const int32_t* qsl;
  const int32_t* seq_lens;
  const int32_t* block_table;
  float* workspace;
  int64_t num_tokens;
  int64_t num_blocks;
  int64_t q_ts, q_hs, o_ts, o_hs;  // query / out token and head strides (elements)
  int64_t kv_bs;                   // cache block stride (elements)
  int32_t req_begin;
  int32_t num_launch_reqs;
  int32_t num_heads;
  int32_t num_kv_heads;
  int32_t block_size;
  int32_t max_blocks_per_req;
  int32_t num_splits;
  int32_t causal;
  int32_t window_left;
  int32_t window_right;
  int32_t has_alibi;
  int32_t has_sinks;
  int32_t split_keys;  // decode: keys per split (0 = even division into num_splits)
  int32_t fold;        // decode: the last split to finish merges the partials (set by the launcher)
  int32_t kv_dtype;           // 0 = compute type, 1 = FP8 E4M3, 2 = FP8 E5M2 (see PaAttnArgs)
  int32_t kv_scale_per_head;  // k_scale / v_scale indexed by KV head (else entry 0)
  const float* k_scale;       // device, null = 1.0
  const float* v_scale;       // device, null = 1.0
  float scale;
  float softcap;
  float alibi[kMaxFeatureHeads];
  float sinks[kMaxFeatureHeads];  // already multiplied by log2(e)
};

// Host side: builds KernelParams; false when the arguments cannot be honoured.
inline bool make_kernel_params(const PaAttnArgs& a, KernelParams& k) {
  if ((a.alibi_slopes || a.sinks) && a.num_heads > kMaxFeatureHeads) return false;
  k.query = a.query;
  k.key_cache = a.key_cache;
  k.value_cache = a.value_cache;
  k.out = a.out;
  k.lse = a.lse;
  k.qsl = a.query_start_loc;
  k.seq_lens = a.seq_lens;
  k.block_table = a.block_table;
  k.workspace = a.workspace;
  k.num_tokens = a.num_tokens;
  k.num_blocks = a.num_blocks;
  k.q_ts = a.q_token_stride;
  k.q_hs = a.q_head_stride;
  k.o_ts = a.o_token_stride;
  k.o_hs = a.o_head_stride;
  k.kv_bs = a.kv_block_stride;
  k.req_begin = a.req_begin;
  k.num_launch_reqs = a.req_end - a.req_begin;
  k.num_heads = a.num_heads;
  k.num_kv_heads = a.num_kv_heads;
  k.block_size = a.block_size;
  k.max_blocks_per_req = a.max_blocks_per_req;
  k.num_splits = a.num_splits;
  k.causal = a.causal;
  k.window_left = a.window_left;
  k.window_right = a.window_right;
  k.has_alibi = a.alibi_slopes != nullptr;
  k.has_sinks = a.sinks != nullptr;
  k.split_keys = a.split_keys;
  k.fold = 0;
  if (a.kv_dtype < 0 || a.kv_dtype > 2) return false;
  k.kv_dtype = a.kv_dtype;
  k.kv_scale_per_head = a.kv_scale_per_head;
  k.k_scale = a.k_scale;
  k.v_scale = a.v_scale;
  k.scale = a.scale;
  k.softcap = a.softcap;
  for (int h = 0; h < kMaxFeatureHeads; ++h) {
    const bool in = h < a.num_heads;
    k.alibi[h] = (a.alibi_slopes && in) ? a.alibi_slopes[h] : 0.f;
    k.sinks[h] = (a.sinks && in) ? a.sinks[h] * kLog2e : -INFINITY;
  }
  return true;
}

// ---- element conversions -------------------------------------------------------------------

template <typename T> struct Elem;
template <> struct Elem<__half> {
  static __device__ __forceinline__ float2 to_float2(uint32_t u) {
    __half2 h = *reinterpret_cast<__half2*>(&u);
    return __half22float2(h);
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float2 to_float2(uint32_t u) {
    // bf16 -> f32 is a shift: exact and cheaper than the conversion instruction.
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <typename T> __device__ __forceinline__ void unpack8(const uint4& v, float f[8]) {
  float2 a = Elem<T>::to_float2(v.x), b = Elem<T>::to_float2(v.y);
  float2 c = Elem<T>::to_float2(v.z), d = Elem<T>::to_float2(v.w);
  f[0] = a.x;
  f[1] = a.y;
  f[2] = b.x;
  f[3] = b.y;
  f[4] = c.x;
  f[5] = c.y;
  f[6] = d.x;
  f[7] = d.y;
}

// ---- async copies, ldmatrix, mma -----------------------------------------------------------

// One predicated 16-byte cp.async: SETP turns operand %2 into the ignore-source predicate (the
// copy then zero-fills its destination and reads nothing), L2 is the prefetch qualifier ("" or
// ".L2::128B"). One text for the variants below.
#define PA_CP_ASYNC16_PRED(SETP, L2, dst, src, v)                                               \
  asm volatile("{\n  .reg .pred skip;\n  " SETP " skip, %2, 0;\n  cp.async.cg.shared.global" L2 \
               " [%0], [%1], 16, skip;\n}\n" ::"r"(dst),                                        \
               "l"(src), "r"(v))

// 16-byte global -> shared copy; when !pred the destination is zero-filled and nothing is read.
// The predicate goes to the instruction's ignore-src operand as is (a source size of `pred ? 16 :
// 0` made the compiler rebuild the predicate from the size: five integer instructions per copy,
// in loops that issue-rate bounds).
// PF: the L2 prefetch size the copy asks for on a miss (0: none, or 128 bytes: the decode's page
// rows, see paged_decode.cu).
template <int PF = 0> __device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  static_assert(PF == 0 || PF == 128, "L2 prefetch size");
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const unsigned v = static_cast<unsigned>(pred);
  if constexpr (PF == 128) {
    PA_CP_ASYNC16_PRED("setp.eq.u32", ".L2::128B", s, gmem, v);
  } else {
    PA_CP_ASYNC16_PRED("setp.eq.u32", "", s, gmem, v);
  }
}
// The same for a paged row: zero-fill when `row` (an element offset, -1 for a key that must not be
// loaded) is negative; the source is `base + max(row, 0) + col`, so no address outside the
// buffer is ever formed. Taking the sign bit as the predicate keeps it one shift and one compare.
// PF as for cp_async16.
template <int PF = 0, typename E>
__device__ __forceinline__ void cp_async16_row(void* smem, const E* base, int64_t row, int col) {
  static_assert(PF == 0 || PF == 128, "L2 prefetch size");
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int64_t neg = row >> 63;  // -1 when the row is not to be loaded, else 0
  const E* src = base + ((row & ~neg) + col);
  const int v = static_cast<int>(neg);
  if constexpr (PF == 128) {
    PA_CP_ASYNC16_PRED("setp.ne.s32", ".L2::128B", s, src, v);
  } else {
    PA_CP_ASYNC16_PRED("setp.ne.s32", "", s, src, v);
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t r[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

template <typename T> struct Mma;
template <> struct Mma<__half> {
  static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// ---- scores, masks, normalisation ------------------------------------------------------------

// Scaled (soft-capped, ALiBi-biased) score of a raw dot product, in the log2 domain.
__device__ __forceinline__ float score_log2(float dot, const KernelParams& p, float slope, int pos, int key) {
  float s = dot * p.scale;
  if (p.softcap > 0.f) s = p.softcap * tanhf(s / p.softcap);
  if (p.has_alibi) s -= slope * fabsf(static_cast<float>(pos - key));
  return s * kLog2e;
}

__device__ __forceinline__ bool key_visible(int pos, int key, int seq_len, const KernelParams& p) {
  if (key < 0 || key >= seq_len) return false;
  if (p.causal && key > pos) return false;
  if (p.window_right >= 0 && key > pos + p.window_right) return false;
  if (p.window_left >= 0 && key < pos - p.window_left) return false;
  return true;
}

// Keys [lo, hi] that some row with position in [p_first, p_last] may see (hi < lo: none).
__device__ __forceinline__ void key_range(int p_first, int p_last, int seq_len, const KernelParams& p, int& lo,
                                          int& hi) {
  lo = 0;
  hi = seq_len - 1;
  if (p.causal) hi = min(hi, p_last);
  if (p.window_right >= 0) hi = min(hi, p_last + p.window_right);
  if (p.window_left >= 0) lo = max(lo, p_first - p.window_left);
}

// What a span of `rows` query rows at sequence positions p_first.. sees: keys [lo, hi] (hi < lo:
// none; rows <= 0 is an empty span), and the bounds past which some row of the span sees nothing,
// so a key tile reaching above mask_above or below mask_below needs the element-wise mask (and, in
// the prefill kernels, its V sanitised). One definition for the blocks, warpgroups and warps of
// every prefill kernel.
struct KeySpan {
  int lo, hi, mask_above, mask_below;
};
__device__ __forceinline__ KeySpan key_span(int p_first, int rows, int seq_len, const KernelParams& p) {
  KeySpan s;
  const int p_last = p_first + max(rows, 1) - 1;
  key_range(p_first, p_last, seq_len, p, s.lo, s.hi);
  if (rows <= 0) s.hi = -1;
  s.mask_above = seq_len - 1;
  if (p.causal) s.mask_above = min(s.mask_above, p_first);
  if (p.window_right >= 0) s.mask_above = min(s.mask_above, p_first + p.window_right);
  s.mask_below = p.window_left >= 0 ? p_last - p.window_left : INT_MIN;
  return s;
}

// The online-softmax state, its merge weights and the finalisation: attention/softmax_state.cuh.

// Reads a device-side metadata value with clamping, so that inconsistent device data can never
// make a kernel touch memory outside the buffers the launcher checked.
__device__ __forceinline__ int clamp_int(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Cache block in column idx of request req's block-table row: 0 for a column past the row or an
// entry outside the cache, so no address formed from it leaves the cache.
__device__ __forceinline__ int64_t page_at(const KernelParams& p, int req, int idx) {
  int b = (idx < p.max_blocks_per_req) ? p.block_table[static_cast<int64_t>(req) * p.max_blocks_per_req + idx] : 0;
  if (b < 0 || b >= p.num_blocks) b = 0;
  return b;
}

// Cache block holding request req's key.
__device__ __forceinline__ int64_t page_of(const KernelParams& p, int req, int key) {
  return page_at(p, req, key / p.block_size);
}

// Row offset (in elements) of (key, kv head) in the NHD cache, given its page.
__device__ __forceinline__ int64_t cache_row(const KernelParams& p, int64_t page, int key, int kvh, int head_size) {
  return page * p.kv_bs +
         (static_cast<int64_t>(key % p.block_size) * p.num_kv_heads + kvh) * static_cast<int64_t>(head_size);
}

// Element offsets of (token, head) rows of query and out.
__device__ __forceinline__ int64_t q_row(const KernelParams& p, int64_t token, int head) {
  return token * p.q_ts + head * p.q_hs;
}
__device__ __forceinline__ int64_t o_row(const KernelParams& p, int64_t token, int head) {
  return token * p.o_ts + head * p.o_hs;
}

// ---- non-finite values in V --------------------------------------------------------------------
//
// A probability that the mask set to 0 still multiplies V inside the tensor-core product, and
// 0 x NaN = NaN (0 x Inf too), so a NaN or Inf in a V row that some query row cannot see would
// reach that row. On tiles that straddle a mask bound the kernels therefore zero every non-finite
// V element in the B fragments before the product and note which keys had one; a row that can see
// such a key gets a NaN output, so a visible NaN still propagates while an unseen one cannot leak.

// Exponent bits of one 16-bit element, in both halves of a packed pair.
template <typename T> struct NonFinite;
template <> struct NonFinite<__half> {
  static constexpr uint32_t kExp = 0x7c00u;
};
template <> struct NonFinite<__nv_bfloat16> {
  static constexpr uint32_t kExp = 0x7f80u;
};

// Zeroes the non-finite halves of a packed pair; bit 0 / bit 1 of the result say whether the low
// / high half was non-finite.
template <typename T> __device__ __forceinline__ uint32_t sanitize_pair(uint32_t& u) {
  constexpr uint32_t E = NonFinite<T>::kExp;
  const bool lo = (u & E) == E;
  const bool hi = (u & (E << 16)) == (E << 16);
  u &= (lo ? 0xffff0000u : 0xffffffffu) & (hi ? 0x0000ffffu : 0xffffffffu);
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 1);
}

// Whether any half of four packed pairs is non-finite (exponent all ones), in three integer
// operations per pair: the masked exponent plus its lowest bit carries into the half's sign bit
// only when every exponent bit was set. A cheap verdict for a scan whose answer is almost always no.
template <typename T> __device__ __forceinline__ bool any_nonfinite(uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  constexpr uint32_t E = NonFinite<T>::kExp;
  constexpr uint32_t M = E | (E << 16);
  constexpr uint32_t L = (E & (~E + 1u)) * 0x00010001u;  // the exponent's lowest bit, both halves
  const uint32_t x = ((a & M) + L) | ((b & M) + L) | ((c & M) + L) | ((d & M) + L);
  return (x & 0x80008000u) != 0u;
}

// 2^x on the special-function unit (relative error ~2^-22; 2^-inf = 0, flushes denormals).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Dispatch over the supported head sizes; F is called with an integral_constant-like tag.
template <int D> struct HeadDim {
  static constexpr int value = D;
};

template <typename F> inline cudaError_t dispatch_head_size(int head_size, F&& f) {
  switch (head_size) {
    case 64:
      return f(HeadDim<64>{});
    case 80:
      return f(HeadDim<80>{});
    case 96:
      return f(HeadDim<96>{});
    case 112:
      return f(HeadDim<112>{});
    case 128:
      return f(HeadDim<128>{});
    case 192:
      return f(HeadDim<192>{});
    case 256:
      return f(HeadDim<256>{});
    default:
      return cudaErrorNotSupported;
  }
}

// The head sizes both Hopper prefills (paged_prefill_sm90.cu, paged_prefill_sm90ws.cu) are compiled
// for; F is called with a HeadDim tag.
template <typename F> inline cudaError_t dispatch_sm90_head_size(int head_size, F&& f) {
  switch (head_size) {
    case 64:
      return f(HeadDim<64>{});
    case 128:
      return f(HeadDim<128>{});
    default:
      return cudaErrorNotSupported;
  }
}

inline bool head_size_supported(int head_size) {
  return head_size == 64 || head_size == 80 || head_size == 96 || head_size == 112 || head_size == 128 ||
         head_size == 192 || head_size == 256;
}

// Common host-side checks of an argument block.
inline cudaError_t check_args(const PaAttnArgs& a) {
  if (!head_size_supported(a.head_size)) return cudaErrorNotSupported;
  if (a.dtype != 0 && a.dtype != 1) return cudaErrorNotSupported;
  if (a.num_heads <= 0 || a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads != 0) return cudaErrorInvalidValue;
  if (a.block_size <= 0 || a.max_blocks_per_req < 0 || a.num_blocks <= 0) return cudaErrorInvalidValue;
  if (a.req_begin < 0 || a.req_end < a.req_begin || a.req_end > a.num_reqs) return cudaErrorInvalidValue;
  if (a.num_heads > 65535) return cudaErrorInvalidValue;
  // 16-byte vectors: every base pointer and stride a multiple of 16 bytes (8 elements).
  const uint64_t ptrs = reinterpret_cast<uintptr_t>(a.query) | reinterpret_cast<uintptr_t>(a.out) |
                        reinterpret_cast<uintptr_t>(a.key_cache) | reinterpret_cast<uintptr_t>(a.value_cache);
  const uint64_t strides = static_cast<uint64_t>(a.q_token_stride | a.q_head_stride | a.o_token_stride |
                                                 a.o_head_stride | a.kv_block_stride);
  if (ptrs % 16 != 0 || strides % 8 != 0) return cudaErrorMisalignedAddress;
  if (a.q_token_stride < 0 || a.q_head_stride < 0 || a.o_token_stride < 0 || a.o_head_stride < 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t block_elems = static_cast<int64_t>(a.block_size) * a.num_kv_heads * a.head_size;
  if (a.kv_block_stride < block_elems) return cudaErrorInvalidValue;
  return cudaSuccess;
}

}  // namespace pa
