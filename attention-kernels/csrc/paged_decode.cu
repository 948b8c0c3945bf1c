// Split-KV paged decode ("flash decoding") for single-token queries, plus the combine step.
//
// One block (256 threads) = one (decode request, kv head, split). The block's query heads (the
// whole GQA group) share every K/V tile it loads: tiles of TK keys are gathered through the block
// table into shared memory with 16-byte cp.async copies, PA_DECODE_STAGES deep, the cache row
// offsets of upcoming tiles computed from block-table entries read a tile ahead. Per tile:
//   1. QK: thread (key, head subset) dot products from shared memory (q kept in f32, pre-scaled);
//      each warp also reduces the max of its 32 keys per head;
//   2. PV with the online softmax folded in: every PV thread (16-byte slice of the head dim, key
//      subset, up to 4 heads) derives the new running max from the warp maxima, rescales its
//      accumulators and partial row sums, and exponentiates its scores on the fly; each V element
//      is converted once for all its heads. Two barriers per tile.
// Each split writes an unnormalised partial (acc, max, sum) to the workspace; the combine kernel
// merges them by log-sum-exp, adds the sink, normalises and writes out / lse. With one split the
// decode kernel finalises directly and no combine runs.
//
// The split count is chosen on the host (attention-backend), so the launch shape depends only on
// the batch shape: CUDA-graph friendly.
//
// Measured on an H100 (batch 64 x 4096 context, 32/8 heads, head 128, bf16, block 16; ratio =
// K/V bytes read per second over a device-to-device copy's read+write rate in the same run):
//   128 threads, 4 barriers/tile, 3 blocks/SM ............................ 0.39
//   256 threads, row offsets precomputed, 2 blocks/SM ..................... 0.55
//   same, 3 stages / 2 blocks/SM 0.56; 4 stages of 32 keys / 3 blocks/SM .. 0.48
//   same, 2 stages of 64 keys, 3 blocks/SM (4 barriers, softmax phase) .... 0.69
//   this version (softmax folded into PV, 2 barriers), 3 blocks/SM ........ 0.65 (0.60 at 2/SM)
// It is latency-bound (few eligible warps; barrier stalls dominated before the fold); the next
// step is tensor-core QK/PV with the GQA group packed into the rows of an m16 tile.

#include "attention/common.cuh"

#ifndef PA_DECODE_STAGES
#define PA_DECODE_STAGES 2
#endif
#ifndef PA_DECODE_TILE
#define PA_DECODE_TILE 64
#endif
#ifndef PA_DECODE_MIN_BLOCKS
#define PA_DECODE_MIN_BLOCKS 3
#endif

namespace {

using pa::KernelParams;

template <int D> struct DecodeCfg {
  static constexpr int kThreads = 256;
  static constexpr int kChunks = D / 8;            // 16-byte chunks per row
  static constexpr int kStages = PA_DECODE_STAGES;            // K/V tiles in the pipeline
  static constexpr int kTK = D <= 128 ? PA_DECODE_TILE : 32;  // keys per tile
  static constexpr int kRS = D + 8;                // shared row stride (elements): 16-byte pad
  static constexpr int kR = kThreads / kChunks;    // PV thread rows
  static constexpr int kMaxHpt = 4;                // PV heads per thread
  static constexpr int kQkGroups = kThreads / kTK; // QK head groups
  static constexpr int kMaxGroup = kR * kMaxHpt;   // largest GQA group this kernel takes
  static constexpr size_t kKvBytes = size_t(2) * kStages * kTK * kRS * 2;
  static constexpr size_t kRowOffBytes = size_t(kStages) * kTK * 8;
  // The key-group reduction reuses the K/V tiles: [KG][G][D + 1] floats, KG * G <= kR * kMaxHpt.
  static_assert(kKvBytes >= size_t(kR) * kMaxHpt * (D + 1) * 4, "reduction buffer does not fit");
  static_assert(kStages >= 2 && kTK % 32 == 0, "pipeline shape");
  static size_t smem_bytes(int G) {
    return kKvBytes + kRowOffBytes + size_t(G) * D * 4 + size_t(G) * kTK * 4 + size_t(4) * G * 4;
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(256, PA_DECODE_MIN_BLOCKS) decode_split_kernel(const KernelParams p) {
  using Cfg = DecodeCfg<D>;
  constexpr int TK = Cfg::kTK, RS = Cfg::kRS, C = Cfg::kChunks, R = Cfg::kR, NQG = Cfg::kQkGroups;
  constexpr int S = Cfg::kStages;
  extern __shared__ __align__(16) unsigned char smem[];
  const int G = p.num_heads / p.num_kv_heads;
  T* kv_s = reinterpret_cast<T*>(smem);
  // Cache row offset (elements) of each key of the next two tiles, -1 past the split's end.
  int64_t* ro_s = reinterpret_cast<int64_t*>(smem + Cfg::kKvBytes);  // [S][TK]
  float* q_s = reinterpret_cast<float*>(smem + Cfg::kKvBytes + Cfg::kRowOffBytes);  // [G][D]
  float* s_s = q_s + G * D;                                                         // [G][TK]
  float* m_s = s_s + G * TK;                                                        // [G] final max
  float* tmax_s = m_s + G;  // [G][TK / 32]: each QK warp's max over its 32 keys of the tile

  const int tid = threadIdx.x;
  const int local = blockIdx.x;
  const int req = p.req_begin + local;
  const int kvh = blockIdx.y;
  const int split = blockIdx.z;
  const int H = p.num_heads;

  // Device metadata is clamped so that bad values cannot move any access out of its buffer.
  const int token = p.qsl[req];
  if (token < 0 || token >= p.num_tokens) return;
  const int seq_len = pa::clamp_int(p.seq_lens[req], 0, p.max_blocks_per_req * p.block_size);
  const int pos = seq_len - 1;
  int lo, hi;
  pa::key_range(pos, pos, seq_len, p, lo, hi);
  const int len = hi - lo + 1;
  int k_begin = lo, k_end = lo;
  if (len > 0) {
    int chunk = (len + p.num_splits - 1) / p.num_splits;
    chunk = (chunk + TK - 1) / TK * TK;
    k_begin = lo + split * chunk;
    k_end = min(hi + 1, k_begin + chunk);
    if (k_end < k_begin) k_end = k_begin;
  }
  const int n_tiles = (k_end - k_begin + TK - 1) / TK;

  const T* q = static_cast<const T*>(p.query);
  const T* kc = static_cast<const T*>(p.key_cache);
  const T* vc = static_cast<const T*>(p.value_cache);
  const int head0 = kvh * G;

  // Query of the whole group, f32, pre-scaled.
  for (int idx = tid; idx < G * C; idx += Cfg::kThreads) {
    const int hl = idx / C, c = idx % C;
    const uint4 v = *reinterpret_cast<const uint4*>(q + (static_cast<int64_t>(token) * H + head0 + hl) * D + c * 8);
    float f[8];
    pa::unpack8<T>(v, f);
    float4* dst = reinterpret_cast<float4*>(q_s + hl * D + c * 8);
    dst[0] = make_float4(f[0] * p.scale, f[1] * p.scale, f[2] * p.scale, f[3] * p.scale);
    dst[1] = make_float4(f[4] * p.scale, f[5] * p.scale, f[6] * p.scale, f[7] * p.scale);
  }
  // Row offsets of the first S tiles.
  if (tid < TK) {
    for (int t = 0; t < S && t < n_tiles; ++t) {
      const int key = k_begin + t * TK + tid;
      ro_s[t * TK + tid] = key < k_end ? pa::cache_row(p, pa::page_of(p, req, key), key, kvh, D) : -1;
    }
  }
  __syncthreads();

  auto issue_tile = [&](int t) {
    const int stage = t % S;
    T* ks = kv_s + (stage * 2 + 0) * TK * RS;
    T* vs = kv_s + (stage * 2 + 1) * TK * RS;
    const int64_t* ro = ro_s + stage * TK;
#pragma unroll 4
    for (int idx = tid; idx < TK * C; idx += Cfg::kThreads) {
      const int r = idx / C, c = idx % C;
      const int64_t row = ro[r];
      const bool valid = row >= 0;
      const int64_t off = valid ? row + c * 8 : 0;
      pa::cp_async16(ks + r * RS + c * 8, kc + off, valid);
      pa::cp_async16(vs + r * RS + c * 8, vc + off, valid);
    }
  };

  // PV thread layout.
  const int HGn = (G + Cfg::kMaxHpt - 1) / Cfg::kMaxHpt;
  const int KG = R / HGn;  // >= 1: the launcher only takes G <= kMaxGroup
  const int pv_c = tid % C;
  const int pv_rest = tid / C;
  const int pv_hg = pv_rest % HGn;
  const int pv_kg = pv_rest / HGn;
  const bool pv_active = tid < C * R && pv_kg < KG;
  // Every PV thread keeps the running max of its heads itself (all see the same tile maxima, so
  // all agree) and a partial row sum over its keys; no separate softmax phase, no extra barrier.
  float acc[Cfg::kMaxHpt][8], m_run[Cfg::kMaxHpt], l_run[Cfg::kMaxHpt];
#pragma unroll
  for (int i = 0; i < Cfg::kMaxHpt; ++i) {
    m_run[i] = -INFINITY;
    l_run[i] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[i][e] = 0.f;
  }

  // QK thread layout.
  const int qk_k = tid % TK;
  const int qk_hq = tid / TK;
  const int lane = tid % 32;

  // Pipeline: tiles 0..S-2 in flight before the loop; iteration n waits for tile n, then issues
  // tile n+S-1, reads the block-table entries of tile n+S and computes tile n. Two barriers per
  // tile: the one after the wait also orders the previous iteration's reads before any overwrite.
#pragma unroll
  for (int t = 0; t < S - 1; ++t) {
    if (t < n_tiles) issue_tile(t);
    pa::cp_async_commit();
  }
  for (int n = 0; n < n_tiles; ++n) {
    pa::cp_async_wait<S - 2>();
    __syncthreads();
    if (n + S - 1 < n_tiles) issue_tile(n + S - 1);
    pa::cp_async_commit();
    int64_t next_pg = 0;
    const int next_key = k_begin + (n + S) * TK + tid;
    const bool prefetch = n + S < n_tiles && tid < TK;
    if (prefetch && next_key < k_end) next_pg = pa::page_of(p, req, next_key);

    const int stage = n % S;
    const T* ks = kv_s + (stage * 2 + 0) * TK * RS;
    const T* vs = kv_s + (stage * 2 + 1) * TK * RS;
    const int tile_start = k_begin + n * TK;
    const int nk = min(TK, k_end - tile_start);

    // 1. scores
    for (int h0 = qk_hq; h0 < G; h0 += 4 * NQG) {
      // Two independent accumulation chains per head (even / odd elements) for ILP.
      float dot[4][2] = {{0.f, 0.f}, {0.f, 0.f}, {0.f, 0.f}, {0.f, 0.f}};
      const T* krow = ks + qk_k * RS;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const uint4 kv = *reinterpret_cast<const uint4*>(krow + c * 8);
        float kf[8];
        pa::unpack8<T>(kv, kf);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int h = h0 + j * NQG;
          if (h < G) {
            const float4* qp = reinterpret_cast<const float4*>(q_s + h * D + c * 8);
            const float4 qa = qp[0], qb = qp[1];
            dot[j][0] = fmaf(qa.x, kf[0], dot[j][0]);
            dot[j][1] = fmaf(qa.y, kf[1], dot[j][1]);
            dot[j][0] = fmaf(qa.z, kf[2], dot[j][0]);
            dot[j][1] = fmaf(qa.w, kf[3], dot[j][1]);
            dot[j][0] = fmaf(qb.x, kf[4], dot[j][0]);
            dot[j][1] = fmaf(qb.y, kf[5], dot[j][1]);
            dot[j][0] = fmaf(qb.z, kf[6], dot[j][0]);
            dot[j][1] = fmaf(qb.w, kf[7], dot[j][1]);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int h = h0 + j * NQG;
        if (h < G) {
          const int key = tile_start + qk_k;
          float s = -INFINITY;
          if (qk_k < nk) {
            // q is pre-scaled: undo nothing, the transform applies scale once more only via p.scale,
            // so pass the scaled dot with a unit scale.
            float x = dot[j][0] + dot[j][1];
            if (p.softcap > 0.f) x = p.softcap * tanhf(x / p.softcap);
            if (p.has_alibi) x -= p.alibi[head0 + h] * fabsf(static_cast<float>(pos - key));
            s = x * pa::kLog2e;
          }
          s_s[h * TK + qk_k] = s;
          // The warp's 32 lanes hold 32 consecutive keys of head h (h is uniform in the warp).
          const float wmax = pa::warp_max(s);
          if (lane == 0) tmax_s[h * (TK / 32) + qk_k / 32] = wmax;
        }
      }
    }
    __syncthreads();

    // 2. online softmax folded into PV: new max from the tile maxima, rescale, exp2 on the fly.
    if (pv_active) {
#pragma unroll
      for (int i = 0; i < Cfg::kMaxHpt; ++i) {
        const int h = pv_hg * Cfg::kMaxHpt + i;
        if (h < G) {
          float tm = tmax_s[h * (TK / 32)];
#pragma unroll
          for (int q = 1; q < TK / 32; ++q) tm = fmaxf(tm, tmax_s[h * (TK / 32) + q]);
          const float m_new = fmaxf(m_run[i], tm);
          const float mu = m_new == -INFINITY ? 0.f : m_new;
          const float a = pa::fast_exp2(m_run[i] - mu);  // 0 when m_run = -inf
          m_run[i] = m_new;
          l_run[i] *= a;
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[i][e] *= a;
        }
      }
#pragma unroll 2
      for (int k = pv_kg; k < nk; k += KG) {
        const uint4 vv = *reinterpret_cast<const uint4*>(vs + k * RS + pv_c * 8);
        float vf[8];
        pa::unpack8<T>(vv, vf);
#pragma unroll
        for (int i = 0; i < Cfg::kMaxHpt; ++i) {
          const int h = pv_hg * Cfg::kMaxHpt + i;
          if (h < G) {
            // m_run is finite here: the tile holds at least one key.
            const float pk = pa::fast_exp2(s_s[h * TK + k] - m_run[i]);
            l_run[i] += pk;
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[i][e] = fmaf(pk, vf[e], acc[i][e]);
          }
        }
      }
    }
    if (prefetch) ro_s[(n % S) * TK + tid] = next_key < k_end ? pa::cache_row(p, next_pg, next_key, kvh, D) : -1;
  }
  pa::cp_async_wait<0>();
  __syncthreads();

  // Reduce the key groups' partial accumulators and row sums through shared memory (the K/V
  // tiles are free); all of them are relative to the same final max.
  float* red = reinterpret_cast<float*>(smem);  // [KG][G][D]
  float* red_l = red + KG * G * D;              // [KG][G]
  if (pv_active) {
#pragma unroll
    for (int i = 0; i < Cfg::kMaxHpt; ++i) {
      const int h = pv_hg * Cfg::kMaxHpt + i;
      if (h < G) {
        float4* dst = reinterpret_cast<float4*>(red + (pv_kg * G + h) * D + pv_c * 8);
        dst[0] = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
        dst[1] = make_float4(acc[i][4], acc[i][5], acc[i][6], acc[i][7]);
        if (pv_c == 0) red_l[pv_kg * G + h] = l_run[i];
        if (pv_c == 0 && pv_kg == 0) m_s[h] = m_run[i];
      }
    }
  }
  __syncthreads();

  const int num_splits = p.num_splits;
  const int n_local = p.num_launch_reqs;
  for (int idx = tid; idx < G * D; idx += Cfg::kThreads) {
    const int h = idx / D, d = idx % D;
    float sum = 0.f, l_sum = 0.f;
    for (int kg = 0; kg < KG; ++kg) {
      sum += red[(kg * G + h) * D + d];
      l_sum += red_l[kg * G + h];
    }
    const int qh = head0 + h;
    if (num_splits == 1) {
      const pa::Finalised f = pa::finalise(m_s[h], l_sum, p.has_sinks ? p.sinks[qh] : -INFINITY);
      T* out = static_cast<T*>(p.out);
      out[(static_cast<int64_t>(token) * H + qh) * D + d] = static_cast<T>(sum * f.out_scale);
      if (d == 0 && p.lse) p.lse[static_cast<int64_t>(token) * H + qh] = f.lse;
    } else {
      const int64_t row = (static_cast<int64_t>(split) * n_local + local) * H + qh;
      p.workspace[row * D + d] = sum;
      if (d == 0) {
        float* ml = p.workspace + static_cast<int64_t>(num_splits) * n_local * H * D;
        ml[row * 2 + 0] = m_s[h];
        ml[row * 2 + 1] = l_sum;
      }
    }
  }
}

// Merges the splits of each (request, head): one warp per row.
template <typename T>
__global__ void __launch_bounds__(128) decode_combine_kernel(const KernelParams p, int D) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int H = p.num_heads;
  const int n_local = p.num_launch_reqs;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + warp;
  if (row >= static_cast<int64_t>(n_local) * H) return;
  const int local = static_cast<int>(row / H), qh = static_cast<int>(row % H);
  const int token = p.qsl[p.req_begin + local];
  if (token < 0 || token >= p.num_tokens) return;
  const int S = p.num_splits;
  const float* ml = p.workspace + static_cast<int64_t>(S) * n_local * H * D;
  const int64_t stride = static_cast<int64_t>(n_local) * H;  // rows per split
  float M = -INFINITY;
  for (int s = 0; s < S; ++s) M = fmaxf(M, ml[(s * stride + row) * 2]);
  const float mu = M == -INFINITY ? 0.f : M;
  float L = 0.f;
  for (int s = 0; s < S; ++s) L += ml[(s * stride + row) * 2 + 1] * exp2f(ml[(s * stride + row) * 2] - mu);
  const pa::Finalised f = pa::finalise(M, L, p.has_sinks ? p.sinks[qh] : -INFINITY);
  T* out = static_cast<T*>(p.out);
  for (int d = lane; d < D; d += 32) {
    float o = 0.f;
    for (int s = 0; s < S; ++s) {
      const float w = exp2f(ml[(s * stride + row) * 2] - mu);
      o += w * p.workspace[(s * stride + row) * D + d];
    }
    out[(static_cast<int64_t>(token) * H + qh) * D + d] = static_cast<T>(o * f.out_scale);
  }
  if (lane == 0 && p.lse) p.lse[static_cast<int64_t>(token) * H + qh] = f.lse;
}

template <typename T, int D>
cudaError_t launch_decode(const PaAttnArgs& a, const KernelParams& kp, cudaStream_t stream) {
  using Cfg = DecodeCfg<D>;
  const int G = a.num_heads / a.num_kv_heads;
  if (G > Cfg::kMaxGroup) return cudaErrorNotSupported;
  const int n = a.req_end - a.req_begin;
  if (n == 0) return cudaSuccess;
  const int S = a.num_splits;
  if (S < 1 || S > 65535) return cudaErrorInvalidValue;
  if (S > 1) {
    const int64_t need = static_cast<int64_t>(S) * n * a.num_heads * (D + 2);
    if (a.workspace == nullptr || a.workspace_len < need) return cudaErrorInvalidValue;
  }
  const size_t smem = Cfg::smem_bytes(G);
  if (smem > 227 * 1024) return cudaErrorNotSupported;
  auto kernel = decode_split_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(n, a.num_kv_heads, S);
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(kp);
  err = pa_last_launch_status();
  if (err != cudaSuccess || S == 1) return err;
  const int64_t rows = static_cast<int64_t>(n) * a.num_heads;
  const int64_t blocks = (rows + 3) / 4;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  decode_combine_kernel<T><<<static_cast<unsigned>(blocks), 128, 0, stream>>>(kp, D);
  return pa_last_launch_status();
}

}  // namespace

// The largest GQA group (num_heads / num_kv_heads) the decode kernel takes for a head size;
// 0 when the head size is not supported.
PA_EXPORT int32_t pa_paged_decode_max_group(int32_t head_size) {
  switch (head_size) {
    case 64: return DecodeCfg<64>::kMaxGroup;
    case 80: return DecodeCfg<80>::kMaxGroup;
    case 96: return DecodeCfg<96>::kMaxGroup;
    case 112: return DecodeCfg<112>::kMaxGroup;
    case 128: return DecodeCfg<128>::kMaxGroup;
    case 192: return DecodeCfg<192>::kMaxGroup;
    case 256: return DecodeCfg<256>::kMaxGroup;
    default: return 0;
  }
}

// Keys per tile of the decode kernel for a head size (the split granularity); 0 if unsupported.
PA_EXPORT int32_t pa_paged_decode_tile_keys(int32_t head_size) {
  if (!pa::head_size_supported(head_size)) return 0;
  return head_size <= 128 ? 64 : 32;
}

// Decode attention for requests [req_begin, req_end), each with exactly one query token.
// With num_splits > 1, `workspace` must hold num_splits * n * num_heads * (head_size + 2) floats.
PA_EXPORT cudaError_t pa_paged_decode(const PaAttnArgs* args, cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const PaAttnArgs& a = *args;
  cudaError_t err = pa::check_args(a);
  if (err != cudaSuccess) return err;
  pa::KernelParams kp;
  if (!pa::make_kernel_params(a, kp)) return cudaErrorNotSupported;
  return pa::dispatch_head_size(a.head_size, [&](auto tag) -> cudaError_t {
    constexpr int D = decltype(tag)::value;
    return a.dtype == 0 ? launch_decode<__half, D>(a, kp, stream) : launch_decode<__nv_bfloat16, D>(a, kp, stream);
  });
}
