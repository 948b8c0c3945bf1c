// Paged prefill / varlen attention on tensor cores (FlashAttention-2 style).
//
// One block = BM query rows of one request and one query head: 4 warps, each with 32 rows (two m16
// tiles sharing every K/V fragment) up to head size 128, 16 rows above. K/V tiles of BN keys (64 up
// to head size 128, 32 above) are gathered through the block table into shared memory with 16-byte
// cp.async copies (double buffered; the cache row offsets of the tile after next are computed from
// block-table entries read while the current tile is computed). S = Q K^T and O += P V run on
// mma.sync m16n8k16 (f16/bf16 in, f32 accumulate) with ldmatrix operand loads from padded
// (bank-conflict-free) shared rows. The softmax is online, in the log2 domain, with the scale
// folded into the exponent and the rescale of O skipped once a warp's row maxima stop moving. The
// key range of the block is cut to what its rows can see (bottom-right causal, sliding window), so
// fully masked tiles are never loaded; a warp skips the tiles none of its rows can see, a tile
// that straddles one of its rows' bounds gets -inf at the hidden keys (pa::mask_scores), and only
// soft-cap / ALiBi take the element-wise exact-score pass.
//
// Blocks are launched on a flat grid in longest-first order: every request's and head's last row
// block (the one that sees the most keys under a causal mask) before any second-to-last one, etc.
//
// Handles any query length (chunked prefills, prefix-cached prompts, multi-token decodes) through
// query_start_loc and seq_lens.
//
// Design notes (the measured steps behind them are in docs/PERFORMANCE.md, "Kernel design history
// (moved from the .cu headers)"): 32 rows per warp (two m16 tiles sharing every K/V fragment) and
// 64-key tiles up to head 128 halve the barriers and softmax bookkeeping per key; head 128 then
// sits at the 255-register limit with a few spills (loop-invariant addresses outside the mma body).
// One barrier per tile (issue tile n + 1 after the top barrier, wait_group 0) was slower than two
// barriers with tile n + 1 in flight before the wait on tile n. Three stages do not fit 2 blocks/SM
// in shared memory at head 128 (Q 34 KB + 6 x 17 KB). The mma.sync path is register-bound at 4 warps
// x 32 rows; the sm_90a kernel (paged_prefill_sm90.cu) moves to wgmma.

#include <climits>

#include "attention/common.cuh"
#include "attention/fp8_tile.cuh"
#include "attention/scores.cuh"
#include "attention/softmax_state.cuh"

namespace {

using pa::KernelParams;

#ifndef PA_PREFILL_BN
#define PA_PREFILL_BN(D) ((D) <= 128 ? 64 : 32)
#endif

// kFp8: the cache holds FP8 bytes (either format). Those tiles are copied into a double-buffered
// staging area of [BN][D] bytes and widened into ONE compute-type K / V pair per tile (see
// attention/fp8_tile.cuh), so the FP8 configuration uses no more shared memory than the 16-bit one
// (head 128: 101 KB against 104 KB) and keeps two blocks per SM.
template <int D, bool kFp8 = false> struct PrefillCfg {
  // 4 warps; each takes kMT m16 tiles (32 rows up to head 128, so every K/V fragment loaded from
  // shared memory feeds twice the tensor-core work), 16 rows above.
  static constexpr int kWarps = 4;
  static constexpr int kMT = D <= 128 ? 2 : 1;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBM = 16 * kMT * kWarps;
  static constexpr int kBN = PA_PREFILL_BN(D);  // keys per tile (registers: S is kMT x kBN)
  static constexpr int kRS = D + 8;  // padded row (elements): rows start 16 bytes apart mod 128
  static constexpr int kChunks = D / 8;
  static constexpr bool kQInRegs = D <= 64;
  static constexpr size_t kQBytes = size_t(kBM) * kRS * 2;
  static constexpr size_t kTileBytes = size_t(kBN) * kRS * 2;
  static constexpr int kComputeTiles = kFp8 ? 2 : 4;  // [stage][K|V], one stage with FP8
  static constexpr size_t kStageBytes = kFp8 ? size_t(kBN) * D : 0;  // one staged FP8 K or V tile
  static constexpr size_t kSmemBytes = kQBytes + kComputeTiles * kTileBytes + 4 * kStageBytes + 2 * kBN * 8;
};

// O += P V over one tile of BN keys (see the call site). With kSanitize, the 16-key steps that hold
// a key outside [mask_below, mask_above] have the non-finite elements of their V fragments zeroed
// and noted in `vbad`; without it, the plain product.
template <typename T, int MT, int NT, int DT, int D, int BN, int RS, bool kSanitize>
__device__ __forceinline__ void pv_tile(float (&o)[MT][DT][4], const uint32_t (&pk)[MT][NT][2], const T* vs, int lane,
                                        int n0, int mask_above, int mask_below, uint32_t& vbad) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    const int k0 = n0 + kk * 16;
    const bool sanitize = kSanitize && (k0 + 15 > mask_above || k0 < mask_below);  // warp-uniform
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      a[mt][0] = pk[mt][2 * kk][0];
      a[mt][1] = pk[mt][2 * kk][1];
      a[mt][2] = pk[mt][2 * kk + 1][0];
      a[mt][3] = pk[mt][2 * kk + 1][1];
    }
#pragma unroll
    for (int dn = 0; dn < D / 16; ++dn) {
      uint32_t b[4];
      pa::ldsm_x4_trans(b, vs + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * RS + dn * 16 + (lane / 16) * 8);
      if (kSanitize && sanitize) {
        // b[0], b[2]: keys 2 t4, 2 t4 + 1 (columns g, g + 8); b[1], b[3]: the same keys + 8.
        const uint32_t lo = pa::sanitize_pair<T>(b[0]) | pa::sanitize_pair<T>(b[2]);
        const uint32_t hi = pa::sanitize_pair<T>(b[1]) | pa::sanitize_pair<T>(b[3]);
        vbad |= (lo | (hi << 2)) << (kk * 4);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pa::Mma<T>::run(o[mt][2 * dn], a[mt], b[0], b[1]);
        pa::Mma<T>::run(o[mt][2 * dn + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

template <typename T, int D, bool kFp8>
__global__ void __launch_bounds__(PrefillCfg<D, kFp8>::kThreads) prefill_kernel(const KernelParams p) {
  using Cfg = PrefillCfg<D, kFp8>;
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, RS = Cfg::kRS, C = Cfg::kChunks, MT = Cfg::kMT;
  constexpr int NT = BN / 8;  // score n-tiles per warp
  constexpr int DT = D / 8;   // output n-tiles per warp
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);
  T* kv_s = reinterpret_cast<T*>(smem + Cfg::kQBytes);  // [stage][K|V][BN][RS] (one stage with FP8)
  // FP8 only: the staged cache bytes, [stage][K|V][BN][D].
  unsigned char* stg_s = smem + Cfg::kQBytes + Cfg::kComputeTiles * Cfg::kTileBytes;
  // Cache row offset (elements) of each key of the next two tiles, -1 past the sequence.
  int64_t* ro_s = reinterpret_cast<int64_t*>(stg_s + 4 * Cfg::kStageBytes);  // [2][BN]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, t4 = lane & 3;
  // Flat grid, heaviest row blocks first across all requests and heads (longest-processing-time
  // order: causal row blocks near the end of a query see the most keys, and starting them first
  // keeps a long block from landing in the last wave): blockIdx.x = (mb * reqs + r) * H + h with
  // mb counted from the last row block.
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

  const T* q = static_cast<const T*>(p.query);
  const T* kc = static_cast<const T*>(p.key_cache);
  const T* vc = static_cast<const T*>(p.value_cache);
  // FP8: the cache holds fp8(x / scale). k_scale joins the score scale (exact tiles and the fused
  // exponent alike), v_scale multiplies the output once in the epilogue; both 1 otherwise.
  const float k_scale = kFp8 ? pa::fp8::scale_of(p.k_scale, p.kv_scale_per_head, kvh) : 1.f;
  const float v_scale = kFp8 ? pa::fp8::scale_of(p.v_scale, p.kv_scale_per_head, kvh) : 1.f;
  const float qk_scale = kFp8 ? p.scale * k_scale : p.scale;

  // Q tile (rows past the query are zero-filled).
  for (int idx = tid; idx < BM * C; idx += Cfg::kThreads) {
    const int r = idx / C, c = idx % C;
    const bool valid = r < rows;
    const int64_t off = valid ? pa::q_row(p, q_start + m0 + r, h) + c * 8 : 0;
    pa::cp_async16(q_s + r * RS + c * 8, q + off, valid);
  }

  float o[MT][DT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < DT; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
  pa::SoftmaxState st[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) st[mt][0].reset(), st[mt][1].reset();
  // Rows that can see a key whose V row held a NaN / Inf zeroed by the sanitising below (this
  // thread's keys only; OR-ed across the quad in the epilogue).
  bool v_bad[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) v_bad[mt][0] = v_bad[mt][1] = false;
  const float slope = p.has_alibi ? p.alibi[h] : 0.f;
  const bool elementwise = p.softcap > 0.f || p.has_alibi;
  const float scale2 = qk_scale * pa::kLog2e;

  // This warp's rows: a tile none of them can see is skipped by the warp (the block still loads
  // it for the others); the element-wise mask runs where the tile straddles one of their bounds.
  int lo_w, hi_w, mask_above, mask_below;
  {
    const int rw0 = warp * MT * 16;
    const int rows_w = min(MT * 16, rows - rw0);  // <= 0: the warp holds no query row
    const int pw_first = ctx + m0 + rw0;
    const int pw_last = pw_first + max(rows_w, 1) - 1;
    pa::key_range(pw_first, pw_last, seq_len, p, lo_w, hi_w);
    if (rows_w <= 0) hi_w = -1;
    // Keys above mask_above or below mask_below are hidden from some row of the warp.
    mask_above = seq_len - 1;
    if (p.causal) mask_above = min(mask_above, pw_first);
    if (p.window_right >= 0) mask_above = min(mask_above, pw_first + p.window_right);
    mask_below = p.window_left >= 0 ? pw_last - p.window_left : INT_MIN;
  }

  const int n_first = hi >= lo ? lo / BN : 0;
  const int n_tiles = hi >= lo ? hi / BN - n_first + 1 : 0;

  if (tid < BN) {
    for (int t = 0; t < 2 && t < n_tiles; ++t) {
      const int key = (n_first + t) * BN + tid;
      ro_s[t * BN + tid] = key < seq_len ? pa::cache_row(p, pa::page_of(p, req, key), key, kvh, D) : -1;
    }
  }
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
    T* ks = kv_s + (stage * 2 + 0) * BN * RS;
    T* vs = kv_s + (stage * 2 + 1) * BN * RS;
    const int64_t* ro = ro_s + stage * BN;
#pragma unroll 4
    for (int idx = tid; idx < BN * C; idx += Cfg::kThreads) {
      const int r = idx / C, c = idx % C;
      const int64_t row = ro[r];
      const bool valid = row >= 0;
      const int64_t off = valid ? row + c * 8 : 0;
      pa::cp_async16(ks + r * RS + c * 8, kc + off, valid);
      pa::cp_async16(vs + r * RS + c * 8, vc + off, valid);
    }
  };

  if (n_tiles > 0) issue_tile(0);
  pa::cp_async_commit();  // Q and tile 0

  uint32_t qf[MT][Cfg::kQInRegs ? D / 16 : 1][4];
  const T* q_warp = q_s + warp * 16 * MT * RS;

  for (int n = 0; n < n_tiles; ++n) {
    if (n + 1 < n_tiles) issue_tile(n + 1);
    pa::cp_async_commit();
    int64_t next_pg = 0;
    const int next_key = (n_first + n + 2) * BN + tid;
    const bool prefetch = n + 2 < n_tiles && tid < BN;
    if (prefetch && next_key < seq_len) next_pg = pa::page_of(p, req, next_key);
    pa::cp_async_wait<1>();
    __syncthreads();

    if (Cfg::kQInRegs && n == 0) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int kk = 0; kk < (Cfg::kQInRegs ? D / 16 : 1); ++kk)
          pa::ldsm_x4(qf[mt][kk], q_warp + (mt * 16 + lane % 16) * RS + kk * 16 + (lane / 16) * 8);
    }

    const int stage = n & 1;
    if constexpr (kFp8) {
      // Widen the landed FP8 tile into the single compute K / V pair (free: its last readers, the
      // warps of tile n - 1, passed the barrier at the end of the previous iteration).
      T* kd = kv_s;
      T* vd = kv_s + BN * RS;
      pa::fp8tile::widen_kv<T, BN, D, Cfg::kThreads>(
          p.kv_dtype, stg_s + (stage * 2 + 0) * Cfg::kStageBytes, stg_s + (stage * 2 + 1) * Cfg::kStageBytes,
          [&](int r, int col) { return kd + r * RS + col; }, [&](int r, int col) { return vd + r * RS + col; }, tid);
      __syncthreads();
    }
    const int cst = kFp8 ? 0 : stage;  // compute-tile stage
    const T* ks = kv_s + (cst * 2 + 0) * BN * RS;
    const T* vs = kv_s + (cst * 2 + 1) * BN * RS;
    const int n0 = (n_first + n) * BN;
    const bool warp_work = n0 <= hi_w && n0 + BN - 1 >= lo_w;

    if (warp_work) {
    // S = Q K^T (this warp's 16 * MT rows x BN keys)
      float s[MT][NT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < NT; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if constexpr (Cfg::kQInRegs) {
            a[mt][0] = qf[mt][kk][0];
            a[mt][1] = qf[mt][kk][1];
            a[mt][2] = qf[mt][kk][2];
            a[mt][3] = qf[mt][kk][3];
          } else {
            pa::ldsm_x4(a[mt], q_warp + (mt * 16 + lane % 16) * RS + kk * 16 + (lane / 16) * 8);
          }
        }
#pragma unroll
        for (int nn = 0; nn < BN / 16; ++nn) {
          uint32_t b[4];
          pa::ldsm_x4(b, ks + (nn * 16 + (lane % 8) + (lane / 16) * 8) * RS + kk * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            pa::Mma<T>::run(s[mt][2 * nn], a[mt], b[0], b[1]);
            pa::Mma<T>::run(s[mt][2 * nn + 1], a[mt], b[2], b[3]);
          }
        }
      }

    // Scores: with soft-cap / ALiBi, every element's exact score (log2 domain, masked where this
    // tile straddles a bound of the warp's rows); otherwise the raw products, scaled inside the
    // exponent below, with -inf where a straddling tile's key is hidden from the row.
      const bool need_mask = n0 + BN - 1 > mask_above || n0 < mask_below;
      if (elementwise) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int r = (warp * MT + mt) * 16 + g + (e >= 2 ? 8 : 0);
              const int key = n0 + j * 8 + 2 * t4 + (e & 1);
              const int pos = ctx + m0 + r;
              float x = pa::fp8tile::score_log2_scaled(s[mt][j][e], qk_scale, p, slope, pos, key);
              if (need_mask && !pa::key_visible(pos, key, seq_len, p)) x = -INFINITY;
              s[mt][j][e] = x;
            }
          }
      } else if (need_mask) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          pa::mask_scores<NT>(reinterpret_cast<float(&)[NT * 4]>(s[mt]), n0, ctx + m0 + (warp * MT + mt) * 16 + g, t4,
                              p, seq_len);
        }
      }
      const float sc = elementwise ? 1.f : scale2;

    // Online softmax for the thread's rows (g and g + 8 of each m-tile). P is packed to 16-bit
    // pairs as soon as it is exponentiated, so the f32 scores die before O += P V.
      uint32_t pk[MT][NT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        float mu[2], al[2];
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          float mx = -INFINITY;
#pragma unroll
          for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(s[mt][j][2 * rr], s[mt][j][2 * rr + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          mu[rr] = st[mt][rr].advance(mx * sc, al[rr]);  // sc > 0; mx = -inf: a fully masked row
        }
        float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const float e0 = pa::fast_exp2(fmaf(s[mt][j][0], sc, -mu[0]));
          const float e1 = pa::fast_exp2(fmaf(s[mt][j][1], sc, -mu[0]));
          const float e2 = pa::fast_exp2(fmaf(s[mt][j][2], sc, -mu[1]));
          const float e3 = pa::fast_exp2(fmaf(s[mt][j][3], sc, -mu[1]));
          sum0 += e0 + e1;
          sum1 += e2 + e3;
          pk[mt][j][0] = pa::Elem<T>::pack(e0, e1);
          pk[mt][j][1] = pa::Elem<T>::pack(e2, e3);
        }
        st[mt][0].add(al[0], sum0);
        st[mt][1].add(al[1], sum1);
      // Once the row maxima settle, alpha is 1 for the whole warp and the rescale is skipped.
        if (__any_sync(0xffffffffu, al[0] != 1.f || al[1] != 1.f)) {
#pragma unroll
          for (int j = 0; j < DT; ++j) {
            o[mt][j][0] *= al[0];
            o[mt][j][1] *= al[0];
            o[mt][j][2] *= al[1];
            o[mt][j][3] *= al[1];
          }
        }
      }

    // O += P V. On a tile that straddles a bound of the warp's rows, a V row a row cannot see is
    // multiplied by that row's zero probability, and 0 x NaN = NaN: every 16-key step holding a
    // hidden key has its non-finite V elements zeroed in the B fragments, and `vbad` notes which of
    // the thread's keys had one (bit kk * 4 + i for keys kk * 16 + {2 t4, 2 t4 + 1, 2 t4 + 8,
    // 2 t4 + 9}, the keys of this thread's P fragment). Full tiles take the plain product: the
    // sanitising variant is a separate instantiation, so it costs the hot loop nothing.
      uint32_t vbad = 0;
      if (need_mask) {
        pv_tile<T, MT, NT, DT, D, BN, RS, true>(o, pk, vs, lane, n0, mask_above, mask_below, vbad);
      } else {
        pv_tile<T, MT, NT, DT, D, BN, RS, false>(o, pk, vs, lane, n0, mask_above, mask_below, vbad);
      }
      if (need_mask) {
      // A key is poisoned when any of its columns was: OR over the 8 lanes of each t4.
        vbad |= __shfl_xor_sync(0xffffffffu, vbad, 4);
        vbad |= __shfl_xor_sync(0xffffffffu, vbad, 8);
        vbad |= __shfl_xor_sync(0xffffffffu, vbad, 16);
        if (vbad != 0) {  // rare: only when a straddling tile holds a non-finite V element
#pragma unroll
          for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              if (!((vbad >> (kk * 4 + i)) & 1u)) continue;
              const int key = n0 + kk * 16 + 2 * t4 + (i & 1) + (i >> 1) * 8;
#pragma unroll
              for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int rr = 0; rr < 2; ++rr) {
                  const int pos = ctx + m0 + (warp * MT + mt) * 16 + g + rr * 8;
                  if (pa::key_visible(pos, key, seq_len, p)) v_bad[mt][rr] = true;
                }
            }
        }
      }
    }  // warp_work

    if (prefetch) ro_s[(n & 1) * BN + tid] = next_key < seq_len ? pa::cache_row(p, next_pg, next_key, kvh, D) : -1;
    __syncthreads();
  }
  pa::cp_async_wait<0>();

  // Epilogue: finish the row sums across the quad, normalise, write.
  T* out = static_cast<T*>(p.out);
  const float sink2 = p.has_sinks ? p.sinks[h] : -INFINITY;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float lr = st[mt][rr].l;
      lr += __shfl_xor_sync(0xffffffffu, lr, 1);
      lr += __shfl_xor_sync(0xffffffffu, lr, 2);
      int bad = v_bad[mt][rr];
      bad |= __shfl_xor_sync(0xffffffffu, bad, 1);
      bad |= __shfl_xor_sync(0xffffffffu, bad, 2);
      const int r = (warp * MT + mt) * 16 + g + rr * 8;
      if (r < rows) {
        const int64_t token = q_start + m0 + r;
        const pa::Finalised f = pa::finalise(st[mt][rr].m2, lr, sink2);
        // A row that saw a non-finite V element the sanitising zeroed gets NaN, as the plain
        // product would have given it.
        // An FP8 cache's V scale is applied here, once, in f32.
        const float os = bad ? __int_as_float(0x7fffffff) : (kFp8 ? f.out_scale * v_scale : f.out_scale);
        uint32_t* orow = reinterpret_cast<uint32_t*>(out + pa::o_row(p, token, h));
#pragma unroll
        for (int j = 0; j < DT; ++j)
          orow[j * 4 + t4] = pa::Elem<T>::pack(o[mt][j][2 * rr] * os, o[mt][j][2 * rr + 1] * os);
        if (t4 == 0 && p.lse) p.lse[token * H + h] = f.lse;
      }
    }
}

template <typename T, int D, bool kFp8>
cudaError_t launch_prefill(const PaAttnArgs& a, const KernelParams& kp, cudaStream_t stream) {
  using Cfg = PrefillCfg<D, kFp8>;
  const int n = a.req_end - a.req_begin;
  if (n == 0 || a.max_query_len <= 0) return cudaSuccess;
  const int64_t m_blocks = (a.max_query_len + Cfg::kBM - 1) / Cfg::kBM;
  const int64_t n_blocks = m_blocks * a.num_heads * n;
  if (n_blocks > INT_MAX) return cudaErrorInvalidValue;
  auto kernel = prefill_kernel<T, D, kFp8>;
  cudaError_t err = pa::set_max_dynamic_smem_once<prefill_kernel<T, D, kFp8>>(static_cast<int>(Cfg::kSmemBytes));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(n_blocks));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(kp);
  return pa_last_launch_status();
}

}  // namespace

// Query rows one prefill block computes for a head size (the grid has ceil(max_query_len / rows)
// row blocks per request and head); 0 if the head size is unsupported.
PA_EXPORT int32_t pa_paged_prefill_rows_per_block(int32_t head_size) {
  int32_t rows = 0;
  pa::dispatch_head_size(head_size, [&](auto tag) -> cudaError_t {
    rows = PrefillCfg<decltype(tag)::value>::kBM;
    return cudaSuccess;
  });
  return rows;
}

// Resident blocks per SM of the prefill kernel for (head size, dtype) on the current device, as the
// runtime's occupancy calculator reports it for the instantiation and dynamic shared memory that
// pa_paged_prefill launches. Needs a current CUDA context; writes *blocks only on success.
PA_EXPORT cudaError_t pa_paged_prefill_blocks_per_sm(int32_t head_size, int32_t dtype, int32_t* blocks) {
  if (blocks == nullptr || (dtype != 0 && dtype != 1)) return cudaErrorInvalidValue;
  return pa::dispatch_head_size(head_size, [&](auto tag) -> cudaError_t {
    constexpr int D = decltype(tag)::value;
    using Cfg = PrefillCfg<D>;
    auto occupancy = [&](auto kernel) -> cudaError_t {
      return pa::occupancy_blocks_per_sm(kernel, Cfg::kThreads, static_cast<int>(Cfg::kSmemBytes), blocks);
    };
    return dtype == 0 ? occupancy(prefill_kernel<__half, D, false>)
                      : occupancy(prefill_kernel<__nv_bfloat16, D, false>);
  });
}

// Varlen attention for requests [req_begin, req_end) of any query length; max_query_len must be at
// least the longest query of that range (it sizes the grid).
PA_EXPORT cudaError_t pa_paged_prefill(const PaAttnArgs* args, cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const PaAttnArgs& a = *args;
  cudaError_t err = pa::check_args(a);
  if (err != cudaSuccess) return err;
  pa::KernelParams kp;
  if (!pa::make_kernel_params(a, kp)) return cudaErrorNotSupported;
  const bool fp8 = a.kv_dtype != pa::fp8::kSame;
  // FP8 rows move as 16-byte vectors of 16 elements: the block stride must be a multiple of 16.
  if (fp8 && a.kv_block_stride % 16 != 0) return cudaErrorMisalignedAddress;
  return pa::dispatch_head_size(a.head_size, [&](auto tag) -> cudaError_t {
    constexpr int D = decltype(tag)::value;
    if (fp8) {
      return a.dtype == 0 ? launch_prefill<__half, D, true>(a, kp, stream)
                          : launch_prefill<__nv_bfloat16, D, true>(a, kp, stream);
    }
    return a.dtype == 0 ? launch_prefill<__half, D, false>(a, kp, stream)
                        : launch_prefill<__nv_bfloat16, D, false>(a, kp, stream);
  });
}
