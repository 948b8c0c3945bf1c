// Paged prefill / varlen attention on Hopper (sm_90a): warpgroup MMA (wgmma) fed from swizzled
// shared memory. First step of the Hopper path: correctness and the instruction set first, the
// FlashAttention-3 scheduling (producer warp group, TMA, ping-pong consumers, persistent grid)
// later.
//
// One block = 128 query rows of one request and one query head: two warpgroups of 128 threads,
// each owning 64 rows (wgmma's M). Every thread also loads: K/V tiles of BN keys (128 at head 128,
// 64 at head 64) are gathered through the block table with 16-byte cp.async copies into 128-byte
// swizzled shared memory, two stages deep (tile n + 1 in flight while tile n is computed), with the
// cache row offsets of the tile after next read from the block table while the current tile is
// computed (as in paged_prefill.cu). Per tile and warpgroup:
//   S = Q K^T    wgmma m64nBNk16, A = Q and B = K from shared memory (both K-major), D / 16 steps;
//   softmax      online, in registers, log2 domain (scale folded into the exponent unless soft-cap
//                or ALiBi need each element's exact score; lazy rescale of O);
//   O += P V     wgmma m64nDk16 with A = P from registers (the S accumulator packed to 16-bit
//                pairs is already the A fragment) and B = V from shared memory, MN-major.
// The key range of the block is cut to what its rows can see (bottom-right causal, sliding window),
// so fully masked tiles are never loaded; a warpgroup skips tiles none of its rows can see, and the
// element-wise mask runs only on tiles that straddle a bound of its rows (or when soft-cap / ALiBi
// need the element-wise pass). Blocks run heaviest first (flat longest-first grid).
//
// Unseen V: wgmma reads V from shared memory, so a non-finite V element cannot be zeroed in a
// register fragment as the sm80 kernel does. On a tile that straddles a mask bound of any row of
// the block, the block zeroes every non-finite V element of the tile in shared memory before the
// product and records which keys had one; a row that can see such a key gets a NaN output, so a
// visible NaN / Inf still propagates while an unseen one never reaches a row.
//
// FP8 caches (E4M3 / E5M2, one instantiation per compute type for both): the cache rows are copied
// with cp.async into a double-buffered staging area of plain FP8 bytes (half the traffic), and
// once a tile has landed every thread widens its share into ONE swizzled compute K / V pair
// (attention/fp8_tile.cuh), zeroing non-finite V elements during the widening on tiles that
// straddle a mask bound; then the same wgmma steps run. k_scale joins the score scale, v_scale
// multiplies the output in the epilogue. Shared memory is what a 16-bit cache takes (the staging
// pair is the size of the compute pair it replaces): head 128 163 KB, one block per SM.
//
// Supported here: f16 / bf16, head sizes 64 and 128, every mask and feature of the sm80 kernel
// (GQA/MQA, causal or not, sliding windows, soft-cap, ALiBi, sinks, LSE). Other head sizes stay on
// paged_prefill.cu; the Rust launcher chooses (PAGED_ATTN_PREFILL=auto|sm90|sm80).
//
// Device code exists only in the sm_90a image (PA_SM90_ENABLED); the sm_80 image holds empty
// kernels, and the host launcher refuses every device that is not compute capability 9.0 (a newer
// GPU would JIT the empty compute_80 PTX), so they can never run.

#include <atomic>
#include <climits>

#include "attention/common.cuh"
#include "attention/fp8_tile.cuh"
#include "attention/scores.cuh"
#include "attention/softmax_state.cuh"
#include "attention/wgmma_sm90.cuh"

namespace {

using pa::KernelParams;

template <int D, bool kFp8 = false> struct Sm90Cfg {
  static constexpr int kWarpGroups = 2;
  static constexpr int kThreads = 128 * kWarpGroups;
  static constexpr int kBM = 64 * kWarpGroups;
  // Keys per tile: S is BN / 2 floats per thread beside O's D / 2; head 64 runs two blocks per SM
  // (128 registers a thread), head 128 one block with up to 255 registers.
  static constexpr int kBN = D <= 64 ? 64 : 128;
  static constexpr int kMinBlocks = D <= 64 ? 2 : 1;
  static constexpr int kChunks = D / 8;  // 16-byte units per row (C below)
  static constexpr int kQBytes = kBM * D * 2;
  static constexpr int kTileBytes = kBN * D * 2;  // one K or one V tile
  static constexpr int kStages = 2;
  // Compute K / V tiles: two stages for a 16-bit cache, one widened pair for FP8 (whose stages are
  // the FP8 staging buffers, [stage][K|V][BN][D] bytes).
  static constexpr int kKvBytes = (kFp8 ? 1 : kStages) * 2 * kTileBytes;
  static constexpr int kStageBytes = kFp8 ? kBN * D : 0;  // one staged FP8 K or V tile
  static constexpr int kStgBytes = kStages * 2 * kStageBytes;
  static constexpr int kRowOffBytes = 2 * kBN * 8;      // int64 cache row offsets, two tiles
  static constexpr int kBadWords = kBN / 32;            // non-finite-V key bits of one tile
  static constexpr int kBadBytes = 2 * kBadWords * 4;   // two tiles (parity)
  static constexpr int kAlignSlack = 1024;              // swizzle atoms need 1024-byte alignment
  static constexpr size_t kSmemBytes = size_t(kAlignSlack) + kQBytes + kKvBytes + kStgBytes + kRowOffBytes + kBadBytes;
  static_assert(D % 64 == 0, "tiles are stored as 64-column swizzled panels");
  static_assert(kQBytes % 1024 == 0 && kTileBytes % 1024 == 0, "panels must keep 1024-byte alignment");
};

template <typename T, int D, bool kFp8>
__global__ void __launch_bounds__(Sm90Cfg<D, kFp8>::kThreads, Sm90Cfg<D, kFp8>::kMinBlocks)
    prefill_sm90_kernel(const KernelParams p) {
#if PA_SM90_ENABLED
  using Cfg = Sm90Cfg<D, kFp8>;
  namespace w = pa::sm90;
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, C = Cfg::kChunks;
  constexpr int NS = BN / 2;  // S accumulator floats per thread
  constexpr int NO = D / 2;   // O accumulator floats per thread
  constexpr int NJ = BN / 8;  // n8 column groups of S
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t pad = (1024u - (raw_addr & 1023u)) & 1023u;
  unsigned char* smem = smem_raw + pad;
  const uint32_t q_addr = raw_addr + pad;
  unsigned char* kv_s = smem + Cfg::kQBytes;  // [stage][K | V] tiles
  const uint32_t kv_addr = q_addr + Cfg::kQBytes;
  unsigned char* stg_s = smem + Cfg::kQBytes + Cfg::kKvBytes;  // FP8 only: [stage][K|V][BN][D]
  int64_t* ro_s = reinterpret_cast<int64_t*>(stg_s + Cfg::kStgBytes);  // [2][BN]
  uint32_t* bad_s = reinterpret_cast<uint32_t*>(ro_s + 2 * BN);                     // [2][BN / 32]

  const int tid = threadIdx.x;
  const int wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const int g = lane >> 2, t4 = lane & 3;
  // Flat grid, heaviest row blocks first (see paged_prefill.cu): blockIdx.x = (mb * reqs + r) * H + h
  // with mb counted from the last row block.
  const int H = p.num_heads;
  const int hr = p.num_launch_reqs * H;
  const int mb_rev = blockIdx.x / hr;
  const int req = p.req_begin + (blockIdx.x % hr) / H;
  const int h = blockIdx.x % H;
  const int kvh = h / (H / p.num_kv_heads);

  const int q_start = pa::clamp_int(p.qsl[req], 0, static_cast<int>(p.num_tokens));
  const int q_end = pa::clamp_int(p.qsl[req + 1], q_start, static_cast<int>(p.num_tokens));
  const int q_len = q_end - q_start;
  const int m0 = (gridDim.x / hr - 1 - mb_rev) * BM;
  if (m0 >= q_len) return;
  const int rows = min(BM, q_len - m0);
  const int seq_len = pa::clamp_int(p.seq_lens[req], 0, p.max_blocks_per_req * p.block_size);
  const int ctx = seq_len - q_len;
  const int p_first = ctx + m0, p_last = ctx + m0 + rows - 1;
  int lo, hi;
  pa::key_range(p_first, p_last, seq_len, p, lo, hi);
  // Keys above mask_above_b or below mask_below_b are hidden from some row of the block: the
  // tiles holding them get their V sanitised.
  int mask_above_b = seq_len - 1;
  if (p.causal) mask_above_b = min(mask_above_b, p_first);
  if (p.window_right >= 0) mask_above_b = min(mask_above_b, p_first + p.window_right);
  const int mask_below_b = p.window_left >= 0 ? p_last - p.window_left : INT_MIN;

  const T* q = static_cast<const T*>(p.query);
  const T* kc = static_cast<const T*>(p.key_cache);
  const T* vc = static_cast<const T*>(p.value_cache);
  // FP8: k_scale joins the score scale, v_scale multiplies the output once (both 1 otherwise).
  const float k_scale = kFp8 ? pa::fp8::scale_of(p.k_scale, p.kv_scale_per_head, kvh) : 1.f;
  const float v_scale = kFp8 ? pa::fp8::scale_of(p.v_scale, p.kv_scale_per_head, kvh) : 1.f;
  const float qk_scale = kFp8 ? p.scale * k_scale : p.scale;

  // Q tile, swizzled 64-column panels (rows past the query are zero-filled).
  for (int idx = tid; idx < BM * C; idx += Cfg::kThreads) {
    const int r = idx / C, c = idx % C;
    const bool valid = r < rows;
    const int64_t off = valid ? pa::q_row(p, q_start + m0 + r, h) + c * 8 : 0;
    pa::cp_async16(smem + w::swizzled_offset(BM, r, c * 8), q + off, valid);
  }

  float o[NO];
#pragma unroll
  for (int i = 0; i < NO; ++i) o[i] = 0.f;
  pa::SoftmaxState st[2];
  st[0].reset();
  st[1].reset();
  bool v_bad[2] = {false, false};  // this thread's rows saw a sanitised non-finite V element
  const float slope = p.has_alibi ? p.alibi[h] : 0.f;
  const bool elementwise = p.softcap > 0.f || p.has_alibi;
  const float scale2 = qk_scale * pa::kLog2e;

  // This warpgroup's rows (wgmma is warpgroup-wide, so every decision below is warpgroup-uniform).
  const int rw0 = wg * 64;
  int lo_w, hi_w, mask_above, mask_below;
  {
    const int rows_w = min(64, rows - rw0);  // <= 0: the warpgroup holds no query row
    const int pw_first = ctx + m0 + rw0;
    const int pw_last = pw_first + max(rows_w, 1) - 1;
    pa::key_range(pw_first, pw_last, seq_len, p, lo_w, hi_w);
    if (rows_w <= 0) hi_w = -1;
    mask_above = seq_len - 1;
    if (p.causal) mask_above = min(mask_above, pw_first);
    if (p.window_right >= 0) mask_above = min(mask_above, pw_first + p.window_right);
    mask_below = p.window_left >= 0 ? pw_last - p.window_left : INT_MIN;
  }
  // The thread's two rows within the block (accumulator rows g and g + 8 of its warp).
  const int r_thr = rw0 + warp * 16 + g;

  const int n_first = hi >= lo ? lo / BN : 0;
  const int n_tiles = hi >= lo ? hi / BN - n_first + 1 : 0;

  if (tid < BN) {
    for (int t = 0; t < 2 && t < n_tiles; ++t) {
      const int key = (n_first + t) * BN + tid;
      ro_s[t * BN + tid] = key < seq_len ? pa::cache_row(p, pa::page_of(p, req, key), key, kvh, D) : -1;
    }
  }
  if (tid < 2 * Cfg::kBadWords) bad_s[tid] = 0u;
  __syncthreads();

  auto issue_tile = [&](int t) {
    const int stage = t & 1;
    if constexpr (kFp8) {
      // Raw FP8 rows, D bytes each, into the staging buffer of this stage.
      pa::fp8tile::stage_rows<BN, D, Cfg::kThreads>(stg_s + (stage * 2 + 0) * Cfg::kStageBytes,
                                                    stg_s + (stage * 2 + 1) * Cfg::kStageBytes, p.key_cache,
                                                    p.value_cache, ro_s + stage * BN, tid);
      return;
    }
    unsigned char* ks = kv_s + (stage * 2 + 0) * Cfg::kTileBytes;
    unsigned char* vs = kv_s + (stage * 2 + 1) * Cfg::kTileBytes;
    const int64_t* ro = ro_s + stage * BN;
#pragma unroll 4
    for (int idx = tid; idx < BN * C; idx += Cfg::kThreads) {
      const int r = idx / C, c = idx % C;
      const int64_t row = ro[r];
      const bool valid = row >= 0;
      const int64_t off = valid ? row + c * 8 : 0;
      const uint32_t so = w::swizzled_offset(BN, r, c * 8);
      pa::cp_async16(ks + so, kc + off, valid);
      pa::cp_async16(vs + so, vc + off, valid);
    }
  };

  if (n_tiles > 0) issue_tile(0);
  pa::cp_async_commit();  // Q and tile 0

  for (int n = 0; n < n_tiles; ++n) {
    if (n + 1 < n_tiles) issue_tile(n + 1);
    pa::cp_async_commit();
    int64_t next_pg = 0;
    const int next_key = (n_first + n + 2) * BN + tid;
    const bool prefetch = n + 2 < n_tiles && tid < BN;
    if (prefetch && next_key < seq_len) next_pg = pa::page_of(p, req, next_key);
    pa::cp_async_wait<1>();
    // This thread's copies of tile n (and Q) are done; make them visible to wgmma's async proxy,
    // then to every thread.
    w::fence_proxy_async_smem();
    __syncthreads();

    const int stage = n & 1;
    const int cst = kFp8 ? 0 : stage;  // compute-tile stage
    const uint32_t k_addr = kv_addr + (cst * 2 + 0) * Cfg::kTileBytes;
    const uint32_t v_addr = kv_addr + (cst * 2 + 1) * Cfg::kTileBytes;
    const int n0 = (n_first + n) * BN;
    uint32_t* bad = bad_s + stage * Cfg::kBadWords;  // zero here (cleared a tile ago / at start)
    const bool block_mask = n0 + BN - 1 > mask_above_b || n0 < mask_below_b;  // block-uniform
    if constexpr (kFp8) {
      // Widen the landed FP8 tile into the compute pair (its last wgmma readers, tile n - 1, were
      // waited for before the barrier that ended the previous iteration), sanitising V on tiles
      // that straddle a mask bound; then publish it to the async proxy.
      unsigned char* kd = kv_s;
      unsigned char* vd = kv_s + Cfg::kTileBytes;
      pa::fp8tile::widen_kv<T, BN, D, Cfg::kThreads>(
          p.kv_dtype, stg_s + (stage * 2 + 0) * Cfg::kStageBytes, stg_s + (stage * 2 + 1) * Cfg::kStageBytes,
          [&](int r, int col) { return kd + w::swizzled_offset(BN, r, col); },
          [&](int r, int col) { return vd + w::swizzled_offset(BN, r, col); }, tid, block_mask, bad);
      w::fence_proxy_async_smem();
      __syncthreads();
    } else if (block_mask) {
      // Zero non-finite V elements of the tile in shared memory, noting their keys.
      unsigned char* vs = kv_s + (stage * 2 + 1) * Cfg::kTileBytes;
      for (int idx = tid; idx < BN * C; idx += Cfg::kThreads) {
        const int r = idx / C, c = idx % C;
        uint4* ptr = reinterpret_cast<uint4*>(vs + w::swizzled_offset(BN, r, c * 8));
        uint4 v = *ptr;
        const uint32_t f = pa::sanitize_pair<T>(v.x) | pa::sanitize_pair<T>(v.y) | pa::sanitize_pair<T>(v.z) |
                           pa::sanitize_pair<T>(v.w);
        if (f != 0u) {
          *ptr = v;
          atomicOr(&bad[r >> 5], 1u << (r & 31));
        }
      }
      w::fence_proxy_async_smem();
      __syncthreads();
    }

    const bool wg_work = n0 <= hi_w && n0 + BN - 1 >= lo_w;
    if (wg_work) {
      // S = Q K^T (this warpgroup's 64 rows x BN keys).
      float s[NS];
#pragma unroll
      for (int i = 0; i < NS; ++i) s[i] = 0.f;
      w::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t pan = kk >> 2, sub = (kk & 3) * 32;
        const uint64_t da = w::smem_desc(q_addr + pan * (BM * 128) + rw0 * 128 + sub, 1, 64);
        const uint64_t db = w::smem_desc(k_addr + pan * (BN * 128) + sub, 1, 64);
        w::WgmmaSS<T, BN>::run(s, da, db, 1);
      }
      w::wgmma_commit();
      w::wgmma_wait<0>();
      w::fence_regs(s);

      // Scores: with soft-cap / ALiBi, every element's exact score (log2 domain, masked where this
      // tile straddles a bound of the warpgroup's rows); otherwise the raw products, scaled inside
      // the exponent, with -inf where a straddling tile's key is hidden from the row.
      const bool need_mask = n0 + BN - 1 > mask_above || n0 < mask_below;
      if (elementwise) {
        w::exact_scores<NJ>(s, n0, ctx + m0 + r_thr, t4, qk_scale, p, slope, seq_len, need_mask);
      } else if (need_mask) {
        pa::mask_scores<NJ>(s, n0, ctx + m0 + r_thr, t4, p, seq_len);
      }
      const float sc = elementwise ? 1.f : scale2;

      // Online softmax for rows g and g + 8 of the warp; P packed to 16-bit pairs at the exp.
      uint32_t pk[BN / 4];
      {
        float mu[2], al[2];
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          float mx = -INFINITY;
#pragma unroll
          for (int j = 0; j < NJ; ++j) mx = fmaxf(mx, fmaxf(s[j * 4 + 2 * rr], s[j * 4 + 2 * rr + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          mu[rr] = st[rr].advance(mx * sc, al[rr]);  // sc > 0; mx = -inf: a fully masked row
        }
        float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
          const float e0 = pa::fast_exp2(fmaf(s[j * 4 + 0], sc, -mu[0]));
          const float e1 = pa::fast_exp2(fmaf(s[j * 4 + 1], sc, -mu[0]));
          const float e2 = pa::fast_exp2(fmaf(s[j * 4 + 2], sc, -mu[1]));
          const float e3 = pa::fast_exp2(fmaf(s[j * 4 + 3], sc, -mu[1]));
          sum0 += e0 + e1;
          sum1 += e2 + e3;
          pk[j * 2 + 0] = pa::Elem<T>::pack(e0, e1);
          pk[j * 2 + 1] = pa::Elem<T>::pack(e2, e3);
        }
        st[0].add(al[0], sum0);
        st[1].add(al[1], sum1);
        if (__any_sync(0xffffffffu, al[0] != 1.f || al[1] != 1.f)) {
#pragma unroll
          for (int j = 0; j < D / 8; ++j) {
            o[j * 4 + 0] *= al[0];
            o[j * 4 + 1] *= al[0];
            o[j * 4 + 2] *= al[1];
            o[j * 4 + 3] *= al[1];
          }
        }
      }

      // O += P V: k-step kk takes keys kk * 16 .. + 15, whose A fragment is pk[4 kk .. 4 kk + 3]
      // (rows g / g + 8, keys 2t.. and 2t + 8..). V is MN-major: 64-column panels BN * 128 bytes
      // apart (LBO), 8-key groups 1024 bytes apart (SBO).
      w::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        const uint32_t a[4] = {pk[4 * kk + 0], pk[4 * kk + 1], pk[4 * kk + 2], pk[4 * kk + 3]};
        const uint64_t dv = w::smem_desc(v_addr + kk * 16 * 128, BN * 128 / 16, 64);
        w::WgmmaRS<T, D>::run(o, a, dv);
      }
      w::wgmma_commit();
      w::wgmma_wait<0>();
      w::fence_regs(o);
      w::fence_regs(pk);

      if (block_mask) {
        // Rare: keys of this tile whose V held a non-finite element (zeroed above).
#pragma unroll 1
        for (int wd = 0; wd < Cfg::kBadWords; ++wd) {
          uint32_t word = bad[wd];
          while (word != 0u) {
            const int b = __ffs(word) - 1;
            word &= word - 1u;
            const int key = n0 + wd * 32 + b;
#pragma unroll
            for (int rr = 0; rr < 2; ++rr)
              if (pa::key_visible(ctx + m0 + r_thr + rr * 8, key, seq_len, p)) v_bad[rr] = true;
          }
        }
      }
    }  // wg_work

    if (prefetch) ro_s[(n & 1) * BN + tid] = next_key < seq_len ? pa::cache_row(p, next_pg, next_key, kvh, D) : -1;
    // The other parity's key bits were last read in the previous tile (before the barrier above);
    // clear them for the next tile.
    if (tid < Cfg::kBadWords) bad_s[((n + 1) & 1) * Cfg::kBadWords + tid] = 0u;
    __syncthreads();
  }
  pa::cp_async_wait<0>();

  // Epilogue: finish the row sums across the quad, normalise, write.
  T* out = static_cast<T*>(p.out);
  const float sink2 = p.has_sinks ? p.sinks[h] : -INFINITY;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float lr = st[rr].l;
    lr += __shfl_xor_sync(0xffffffffu, lr, 1);
    lr += __shfl_xor_sync(0xffffffffu, lr, 2);
    int bad = v_bad[rr];
    bad |= __shfl_xor_sync(0xffffffffu, bad, 1);
    bad |= __shfl_xor_sync(0xffffffffu, bad, 2);
    const int r = r_thr + rr * 8;
    if (r < rows) {
      const int64_t token = q_start + m0 + r;
      const pa::Finalised f = pa::finalise(st[rr].m2, lr, sink2);
      const float os = bad ? __int_as_float(0x7fffffff) : (kFp8 ? f.out_scale * v_scale : f.out_scale);
      uint32_t* orow = reinterpret_cast<uint32_t*>(out + pa::o_row(p, token, h));
#pragma unroll
      for (int j = 0; j < D / 8; ++j)
        orow[j * 4 + t4] = pa::Elem<T>::pack(o[j * 4 + 2 * rr] * os, o[j * 4 + 2 * rr + 1] * os);
      if (t4 == 0 && p.lse) p.lse[token * H + h] = f.lse;
    }
  }
#endif  // PA_SM90_ENABLED
}

// Whether the current device is compute capability 9.0 exactly (the only one the sm_90a image
// runs on), asked once per device ordinal.
bool current_device_is_sm90() {
  static std::atomic<int> cached[pa::kCachedDevices] = {};  // 0 unknown, 1 yes, 2 no
  int c = 0;
  const cudaError_t err = pa::per_device_cached(
      cached,
      [](int dev, int* answer) {
        int major = 0, minor = 0;
        cudaError_t e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        if (e == cudaSuccess) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
        *answer = major == 9 && minor == 0 ? 1 : 2;
        return e;
      },
      &c);
  return err == cudaSuccess && c == 1;
}

template <typename T, int D, bool kFp8>
cudaError_t launch_sm90(const PaAttnArgs& a, const KernelParams& kp, cudaStream_t stream) {
  using Cfg = Sm90Cfg<D, kFp8>;
  const int n = a.req_end - a.req_begin;
  if (n == 0 || a.max_query_len <= 0) return cudaSuccess;
  const int64_t m_blocks = (a.max_query_len + Cfg::kBM - 1) / Cfg::kBM;
  const int64_t n_blocks = m_blocks * a.num_heads * n;
  if (n_blocks > INT_MAX) return cudaErrorInvalidValue;
  auto kernel = prefill_sm90_kernel<T, D, kFp8>;
  cudaError_t err = pa::set_max_dynamic_smem_once<prefill_sm90_kernel<T, D, kFp8>>(static_cast<int>(Cfg::kSmemBytes));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(n_blocks));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(kp);
  return pa_last_launch_status();
}

}  // namespace

// 1 when pa_paged_prefill_sm90 can run (head_size, dtype) on the current device: a head size this
// path is compiled for, f16 (0) or bf16 (1), and a compute capability 9.0 device; else 0.
PA_EXPORT int32_t pa_paged_prefill_sm90_supported(int32_t head_size, int32_t dtype) {
  if (head_size != 64 && head_size != 128) return 0;
  if (dtype != 0 && dtype != 1) return 0;
  return current_device_is_sm90() ? 1 : 0;
}

// 1 when the current device is compute capability 9.0 (whatever the shape), else 0.
PA_EXPORT int32_t pa_paged_prefill_sm90_device(void) { return current_device_is_sm90() ? 1 : 0; }

// Query rows one sm90 prefill block computes (0 if the head size is not on this path).
PA_EXPORT int32_t pa_paged_prefill_sm90_rows_per_block(int32_t head_size) {
  int32_t rows = 0;
  pa::dispatch_sm90_head_size(head_size, [&](auto tag) -> cudaError_t {
    rows = Sm90Cfg<decltype(tag)::value>::kBM;
    return cudaSuccess;
  });
  return rows;
}

// Resident blocks per SM of the sm90 prefill kernel for (head size, dtype) on the current device.
PA_EXPORT cudaError_t pa_paged_prefill_sm90_blocks_per_sm(int32_t head_size, int32_t dtype, int32_t* blocks) {
  if (blocks == nullptr || (dtype != 0 && dtype != 1)) return cudaErrorInvalidValue;
  return pa::dispatch_sm90_head_size(head_size, [&](auto tag) -> cudaError_t {
    constexpr int D = decltype(tag)::value;
    using Cfg = Sm90Cfg<D>;
    auto occupancy = [&](auto kernel) -> cudaError_t {
      return pa::occupancy_blocks_per_sm(kernel, Cfg::kThreads, static_cast<int>(Cfg::kSmemBytes), blocks);
    };
    return dtype == 0 ? occupancy(prefill_sm90_kernel<__half, D, false>)
                      : occupancy(prefill_sm90_kernel<__nv_bfloat16, D, false>);
  });
}

// Varlen attention for requests [req_begin, req_end) on the Hopper path; same contract as
// pa_paged_prefill. cudaErrorNotSupported for a head size off this path or a device that is not
// compute capability 9.0 (the caller falls back to pa_paged_prefill).
PA_EXPORT cudaError_t pa_paged_prefill_sm90(const PaAttnArgs* args, cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const PaAttnArgs& a = *args;
  cudaError_t err = pa::check_args(a);
  if (err != cudaSuccess) return err;
  if (!current_device_is_sm90()) return cudaErrorNotSupported;
  pa::KernelParams kp;
  if (!pa::make_kernel_params(a, kp)) return cudaErrorNotSupported;
  const bool fp8 = a.kv_dtype != pa::fp8::kSame;
  // FP8 rows move as 16-byte vectors of 16 elements: the block stride must be a multiple of 16.
  if (fp8 && a.kv_block_stride % 16 != 0) return cudaErrorMisalignedAddress;
  return pa::dispatch_sm90_head_size(a.head_size, [&](auto tag) -> cudaError_t {
    constexpr int D = decltype(tag)::value;
    if (fp8) {
      return a.dtype == 0 ? launch_sm90<__half, D, true>(a, kp, stream)
                          : launch_sm90<__nv_bfloat16, D, true>(a, kp, stream);
    }
    return a.dtype == 0 ? launch_sm90<__half, D, false>(a, kp, stream)
                        : launch_sm90<__nv_bfloat16, D, false>(a, kp, stream);
  });
}
