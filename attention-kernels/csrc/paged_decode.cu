// Split-KV paged decode ("flash decoding") for single-token queries, plus the combine step.
//
// One block (4 warps; 2 for FP8 caches up to head 128, see fp8_pipeline) = one (decode request,
// kv head, row chunk of up to 16 query heads of its GQA group, split); the blocks of one request
// are adjacent in the grid. The chunk's query heads are the 16 rows of the A operand of mma.sync
// m16n8k16 (f16/bf16 in, f32 accumulate; rows past the chunk are zero), so QK and PV run on tensor
// cores: a group of 4 uses 4 of 16 rows, which costs nothing since the kernel is bound by K/V
// bytes, and groups above 16 take several row chunks (adjacent blocks), their K/V re-reads served
// by L2.
// Tiles of 64 keys are gathered through the block table into padded shared rows with 16-byte
// cp.async copies, PA_DECODE_STAGES deep, the cache row offsets of upcoming tiles computed from
// block-table entries read a tile ahead. Each warp owns 16 keys of every tile (two groups of 16
// in the FP8 pipeline) and keeps its own online softmax (rows = heads, in the log2 domain) and
// output accumulator in registers: S = Q K^T (ldmatrix K), P packed to 16-bit straight from the
// accumulator fragments, O += P V (ldmatrix.trans V). No shared-memory traffic between warps
// during the loop, one barrier per tile. At the end the warps' (m, l, O) are merged through
// shared memory; each split writes an unnormalised partial (acc, max, sum) to the workspace and
// the last split of each group to finish merges them by log-sum-exp (the folded combine, the
// default) or the combine kernel does; either adds the sink, normalises and writes out / lse.
// With one split the decode kernel finalises directly.
//
// The split count is chosen on the host (attention-backend's split_plan, from the batch shape
// only: CUDA-graph friendly) with a wave-quantisation cost model.
//
// Variants (PaAttnArgs::decode_variant; the Rust side names them auto, w4s3, w4s4, w4s2, w2s6,
// w2s4, each optionally "-fold", and reads PAGED_ATTN_DECODE_VARIANT once): the pipeline (warps
// per block = 64- or 32-key tiles, cp.async stages; w4s2 compiled for 16-bit types at head 128,
// the others but w4s3 for bf16 / head 128 only; auto, the default, picks w4s2 or w4s3 per
// launch, see auto_pipeline) and whether the combine is folded into the decode kernel: each split
// block writes its partial, fences, bumps a per-(request, kv head, row chunk) counter at the front
// of the workspace, and the last to arrive merges all partials in split order (the same merge
// functions as the combine kernel: same bits), then resets the counter, so replays need no memset.
// Where the whole grid fits on the device at once (one wave: a few long requests split many ways)
// and has at least kGroupMergeMinSplits splits, the launch is cooperative and the group's blocks
// wait for its last arrival and merge equal shares of the group's output side by side instead
// (group_merge; the same bits again).
// Batch-invariant mode (split_keys > 0): every split covers a fixed number of keys from the
// request's first visible key, the grid's split count is the batch maximum and extra splits are
// empty; the merge of one non-empty split with empty ones reproduces the single-split
// finalisation exactly (weights exactly 1 and 0, partial sums never -0), so a request's output
// and LSE are the same bits in any batch.
//
// Why tensor cores for a memory-bound kernel: the earlier CUDA-core QK/PV versions were latency /
// issue-bound (the FMAs and conversions per byte of K/V), never reaching the copy's bandwidth; the
// mma.sync form above is bandwidth-bound. The measured steps that led here, and every later bench
// run, are in docs/PERFORMANCE.md ("Kernel design history (moved from the .cu headers)").

#include "attention/common.cuh"
#include "attention/softmax_state.cuh"

#include <cstdint>
#include <type_traits>

#ifndef PA_DECODE_STAGES
#define PA_DECODE_STAGES 3
#endif

namespace {

using pa::KernelParams;

// Keys per warp per tile (one m16n8k16 K step) and the split granularity: every split but a
// request's last starts at a multiple of 64 keys past its first visible key, in every variant.
constexpr int kKeysPerWarp = 16;
constexpr int kSplitGranule = 64;

// The K/V copies ask L2 to fetch 128 bytes on a miss (cp.async's .L2::128B prefetch size): a
// kv head's row of a page is 128 (FP8) or 256 bytes (16-bit, head 128) at a stride of all the
// kv heads' rows, and each 16-byte copy alone would leave L2 to request 32-byte sectors. Measured
// on the H200 (bench_decode_variants, same bundle): b64 x 4096 0.2695 -> 0.2645 ms, b16 x 16384
// 0.2697 -> 0.2628, b256 x 1024 0.2800 -> 0.2747, MHA b32 x 4096 0.5266 -> 0.5150 (0.94-0.96 ->
// 0.96-0.98 of a copy's bandwidth); a 256-byte prefetch was 0-3% slower than none.
constexpr int kL2Prefetch = 128;

// Arrival counters of the folded combine: the first kDecodeCounters floats of the workspace,
// read as u32, one per pre-split block (request, kv head, row chunk). They start zero (the owners
// allocate the workspace zeroed) and every launch leaves them zero (the last block of each group
// resets its own), so no launch ever needs a memset and CUDA-graph replays see fresh counters.
// Partials start after them in every mode, so a launch of any shape never writes the counters
// with anything else. Keep in sync with DECODE_COUNTER_SLOTS in src/attention.rs.
constexpr int kDecodeCounters = 16384;

// Per-block timeline (a diagnostic build: PAGED_ATTN_DECODE_TRACE=1 at build time defines
// PA_DECODE_TRACE; otherwise every mark compiles to nothing and the kernels are unchanged). Thread
// 0 of each of the first kTraceBlocks blocks of a launch writes the global timer (ns) at the
// marks below (0 for a mark the block does not reach) and its SM; pa_decode_trace_read copies the
// last launch's record to the host. Why:
// a launch's time is the slowest block's, and neither a profiler's averages nor the bench's
// totals show where the last block spends it (the start chain, the stream, the wait for the
// other splits, the folded merge; docs/PERFORMANCE.md, twentieth session).
enum TraceMark : int {
  kMarkStart = 0,      // block entry
  kMarkIssued = 1,     // the prologue done, the first tiles' copies issued
  kMarkFirstTile = 2,  // the first tile landed
  kMarkLoopEnd = 3,    // every tile computed
  kMarkWritten = 4,    // output or split partial written
  kMarkMerged = 5,     // the folded merge done (the group's last block only)
  kMarkArrived = 6,    // the fold's arrival counted (blocks of split, folded launches only)
  kMarkSm = 7,         // the SM the block ran on
  kTraceWords = 8,
};
#ifdef PA_DECODE_TRACE
constexpr int kTraceBlocks = 16384;
__device__ unsigned long long g_decode_trace[kTraceBlocks * kTraceWords];
__device__ __forceinline__ void trace_mark(int mark) {
  const unsigned b = blockIdx.x + blockIdx.z * gridDim.x;
  if (threadIdx.x != 0 || b >= static_cast<unsigned>(kTraceBlocks)) return;
  unsigned long long* rec = g_decode_trace + static_cast<size_t>(b) * kTraceWords;
  if (mark == kMarkStart) {  // marks this launch does not reach read 0, not an older launch's
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    for (int m = kMarkIssued; m < kMarkSm; ++m) rec[m] = 0;
    rec[kMarkSm] = sm;
  }
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  rec[mark] = t;
}
#define PA_TRACE_MARK(mark) trace_mark(mark)
#else
#define PA_TRACE_MARK(mark) ((void)0)
#endif

// The pipeline variants (low byte of PaAttnArgs::decode_variant). Variants other than the
// default are compiled for bf16 at head size 128 only (the benchmarked shape; every other dtype
// and head size runs the default), which keeps the build to a few extra instantiations.
enum DecodeVariant : int {
  kW4S3 = 0,  // 4 warps, 64-key tiles, 3 stages: 2 blocks/SM at head 128 (the default)
  kW4S4 = 1,  // 4 warps, 64-key tiles, 4 stages: 1 block/SM, 3 tiles in flight
  kW4S2 = 2,  // 4 warps, 64-key tiles, 2 stages: 3 blocks/SM, 1 tile in flight each
  kW2S6 = 3,  // 2 warps, 32-key tiles, 6 stages: 2 blocks/SM, 5 tiles in flight each
  kW2S4 = 4,  // 2 warps, 32-key tiles, 4 stages: 3 blocks/SM, 3 tiles in flight each
  kAuto = 5,  // per launch: kW4S2 on grids of at least kAutoWaves full waves of it, else kW4S3
  kNumVariants = 6,
};
constexpr int kFoldBit = 1 << 8;
// The folded combine merges by the group's last block only, even where the grid is resident at
// once (see group_merge; the Rust side sets it from PAGED_ATTN_DECODE_GROUP_MERGE=0 for tests).
constexpr int kGroupMergeOffBit = 1 << 9;
// Fewest splits the group merge is used at. Below it the last block's merge is short and the
// waiting costs more than it saves: on an H100 the group merge measured 0.9-2.2% slower at 8
// splits, level at 16 and 5-8% faster at 32, where the last block's merge had grown to 7 us
// (docs/PERFORMANCE.md, thirty-second session).
constexpr int kGroupMergeMinSplits = 16;

template <int D> constexpr int default_stages() { return D <= 128 ? PA_DECODE_STAGES : 2; }

// FP8 caches: a tile is half the bytes of a 16-bit one, so the per-key work (conversions,
// MMAs, the softmax) is twice as large per byte, and the 16-bit pipeline with two warps per
// scheduler left the kernel latency-bound (0.78 of the copy's bandwidth). Up to head size 128 the
// FP8 pipeline runs 2 warps per block, each with two independent 16-key groups per 64-key tile
// (twice the instruction-level parallelism of one group, and half the barriers and softmax
// reductions per key), 2 stages: 4 blocks (8 warps) per SM on H100/H200. Measured on the H200
// (bench_fp8 --sweep): b64 x 4096 0.1444 ms against 0.1661 for 4 warps x 5 stages of one group,
// b16 x 16384 0.1478 against 0.1653, b256 x 1024 0.1574 against 0.2120. Larger heads keep 4 warps
// of one group and 3 stages.
struct Fp8Pipe {
  int warps, stages, groups;
};
template <int D> constexpr Fp8Pipe fp8_pipeline() { return D <= 128 ? Fp8Pipe{2, 2, 2} : Fp8Pipe{4, 3, 1}; }

// KV: the cache's storage kind (pa::fp8::Kind): 0 = the compute type, else an FP8 format, whose
// rows are staged in shared memory as bytes and widened to f16 in registers after ldmatrix.
// KG: 16-key groups per warp per tile (independent QK^T chains a warp keeps in flight).
template <int D, int W = 4, int S = default_stages<D>(), int KV = 0, int KG = 1> struct DecodeCfg {
  static constexpr int kWarps = W;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kKW = kKeysPerWarp * KG;           // keys per warp per tile
  static constexpr int kTK = kKW * kWarps;                // keys per tile
  static constexpr int kStages = S;
  static constexpr bool kFp8 = KV != 0;
  static constexpr int kRS = D + 8;                       // padded Q row (elements): 16-byte skew
  static constexpr int kQChunks = D / 8;                  // 16-byte chunks per Q row
  static constexpr int kEB = kFp8 ? 1 : 2;                // bytes per cache element
  static constexpr int kChunks = D * kEB / 16;            // 16-byte chunks per K/V row
  // Padded K/V row in shared memory (bytes): an odd number of 16-byte units, so the 8 rows of an
  // ldmatrix 8x8 tile fall in 8 different bank groups.
  static constexpr int kRSB = kFp8 ? D + 16 * ((D / 16) % 2 == 0 ? 1 : 2) : kRS * 2;
  static constexpr int kRows = 16;                        // query heads per block (one m16 tile)
  static constexpr bool kQInRegs = D <= 128;              // Q fragments in registers, else ldmatrix
  static constexpr size_t kKvBytes = size_t(2) * kStages * kTK * kRSB;
  static constexpr size_t kRowOffBytes = size_t(kStages) * kTK * 8;
  static constexpr size_t kQBytes = size_t(kRows) * kRS * 2;
  static constexpr size_t kSmemBytes = kKvBytes + kRowOffBytes + kQBytes;
  // The warps' merge reuses the K/V tiles: [W][16][D] accumulators, [W][16] maxima and sums.
  static_assert(size_t(kWarps) * kRows * (D + 2) * 4 <= kKvBytes, "merge buffer does not fit");
  static_assert(kStages >= 2 && kTK <= kThreads && D % 16 == 0, "pipeline shape");
  static_assert(kSplitGranule % kTK == 0, "splits must be whole tiles");
  static_assert((kRSB / 16) % 2 == 1 && kRSB % 16 == 0, "K/V rows: an odd number of 16-byte units");
};

// Largest GQA group the decode launcher takes (any group works: row chunks of 16 heads).
constexpr int kDecodeMaxGroup = 65535;

// The split-KV merge of one output element, in split order: the one definition of the reduction
// order across splits, shared by the combine kernel and the folded combine so that both give the
// same bits. `acc` is [S][rows][D], `ml` [S][rows][2] (max in the log2 domain, sum); reads bypass
// L1 (other blocks wrote them). Explicit FMAs keep the arithmetic fixed whatever the compiler
// contracts. With one non-empty split s the weights are exactly 1 for s and 0 for the rest, so the
// result equals that split's own finalisation bit for bit (empty splits add exact zeros).
__device__ __forceinline__ void merge_stats(const float* ml, int S, int64_t stride, int64_t row, float& M, float& L) {
  M = -INFINITY;
#pragma unroll 8
  for (int s = 0; s < S; ++s) M = fmaxf(M, __ldcg(ml + (s * stride + row) * 2));
  const float mu = pa::exp_base(M);
  L = 0.f;
#pragma unroll 8
  for (int s = 0; s < S; ++s) {
    const float w = pa::merge_weight_exact(__ldcg(ml + (s * stride + row) * 2), mu);
    L = __fmaf_rn(__ldcg(ml + (s * stride + row) * 2 + 1), w, L);
  }
}
__device__ __forceinline__ float merge_elem(const float* acc, const float* ml, int S, int64_t stride, int64_t row,
                                            int D, int d, float M) {
  const float mu = pa::exp_base(M);
  float o = 0.f;
  // Unrolled so that several splits' loads are in flight at once (a small batch's combine is a
  // chain of L2 round trips otherwise); the additions stay in split order.
#pragma unroll 8
  for (int s = 0; s < S; ++s) {
    const float w = pa::merge_weight_exact(__ldcg(ml + (s * stride + row) * 2), mu);
    o = __fmaf_rn(w, __ldcg(acc + (s * stride + row) * D + d), o);
  }
  return o;
}

// The folded combine's merge for the last block of a group, when the group's statistics fit in
// the (now free) shared memory `sm`: the row statistics once per row, not once per element. Every
// split's (max, sum) of the group's rows is staged in shared memory in one round of loads, one
// thread per row turns the maxima into merge weights and finalises, then each thread sums its
// elements' splits with several elements' loads in flight. The operations and their order are
// merge_stats' and merge_elem's (the combine kernel's), so the result is the same bits. Not
// inlined: the decode loop's register allocation stays as it was without this tail.
template <typename T, int D, int kThreads>
__device__ __forceinline__ void fold_merge(const KernelParams& p, float* sm, const float* acc_ws, const float* ml_ws,
                                           int64_t stride, int local, int head0, int gc, int token) {
  constexpr int NR = 16;
  const int tid = threadIdx.x;
  const int H = p.num_heads;
  const int SP = p.num_splits;
  float* m_sm = sm;              // [gc][SP]: maxima, then weights
  float* l_sm = m_sm + NR * SP;  // [gc][SP]: sums
  float* f_sm = l_sm + NR * SP;  // [gc][2]: out_scale, lse
  for (int idx = tid; idx < gc * SP; idx += kThreads) {
    const int h = idx / SP, sp = idx % SP;
    const int64_t row = static_cast<int64_t>(local) * H + head0 + h;
    m_sm[idx] = __ldcg(ml_ws + (sp * stride + row) * 2);
    l_sm[idx] = __ldcg(ml_ws + (sp * stride + row) * 2 + 1);
  }
  __syncthreads();
  if (tid < gc) {
    float* m_row = m_sm + tid * SP;
    const float* l_row = l_sm + tid * SP;
    float M = -INFINITY;
    for (int sp = 0; sp < SP; ++sp) M = fmaxf(M, m_row[sp]);
    const float mu = pa::exp_base(M);
    float L = 0.f;
    for (int sp = 0; sp < SP; ++sp) {
      const float w = pa::merge_weight_exact(m_row[sp], mu);
      m_row[sp] = w;
      L = __fmaf_rn(l_row[sp], w, L);
    }
    const int qh = head0 + tid;
    const pa::Finalised f = pa::finalise(M, L, p.has_sinks ? p.sinks[qh] : -INFINITY);
    f_sm[2 * tid] = f.out_scale;
    f_sm[2 * tid + 1] = f.lse;
  }
  __syncthreads();
  constexpr int E = 4;  // elements per thread in flight
  T* out = static_cast<T*>(p.out);
  for (int i0 = tid; i0 < gc * D; i0 += E * kThreads) {
    float o[E];
    int h[E], d[E];
    bool ok[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int idx = i0 + e * kThreads;
      ok[e] = idx < gc * D;
      h[e] = ok[e] ? idx / D : 0;
      d[e] = ok[e] ? idx % D : 0;
      o[e] = 0.f;
    }
#pragma unroll 4
    for (int sp = 0; sp < SP; ++sp) {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        if (!ok[e]) continue;
        const int64_t row = static_cast<int64_t>(local) * H + head0 + h[e];
        o[e] = __fmaf_rn(m_sm[h[e] * SP + sp], __ldcg(acc_ws + (sp * stride + row) * D + d[e]), o[e]);
      }
    }
#pragma unroll
    for (int e = 0; e < E; ++e) {
      if (!ok[e]) continue;
      const int qh = head0 + h[e];
      out[pa::o_row(p, token, qh) + d[e]] = static_cast<T>(o[e] * f_sm[2 * h[e]]);
      if (d[e] == 0 && p.lse) p.lse[static_cast<int64_t>(token) * H + qh] = f_sm[2 * h[e] + 1];
    }
  }
}

// The group merge (the folded combine of a launch whose blocks are all resident at once, kp.fold
// == 2): every block of the group merges an equal share of the group's output elements once all
// of its splits have arrived. Why: in fold_merge one block merges every element of the group after
// the last arrival, a chain of L2 round trips on the launch's critical path that grows with the
// splits (3.9 us at 16 splits, 7.1 at 32, b1 x 32768 on an H100); here each block fetches its
// share's statistics and partials in one round of loads (about gc * D floats per block whatever
// the split count) and the group's blocks merge side by side. Measured (H100, docs/PERFORMANCE.md,
// thirty-second session): a block's share takes 2.5 us and the wait for the last arrival 1.8, so
// at 16 splits the launch is level with fold_merge and at 32 it is 5-8% faster. Block `split`
// takes elements [split * E, split * E + E) of the group's gc * D (E = gc * D / S rounded up to a
// multiple of 4). Same operations in the same order as merge_stats and merge_elem: the same bits
// as fold_merge and the combine kernel.
template <typename T, int D, int kThreads>
__device__ __forceinline__ void group_merge(const KernelParams& p, float* sm, const float* acc_ws, const float* ml_ws,
                                            int64_t stride, int local, int head0, int gc, int token, int split) {
  constexpr int NR = 16;
  const int tid = threadIdx.x;
  const int H = p.num_heads;
  const int SP = p.num_splits;
  const int n_el = gc * D;
  const int E = ((n_el + SP - 1) / SP + 3) & ~3;
  const int e0 = split * E;
  const int ne = max(0, min(E, n_el - e0));
  if (ne == 0) return;
  const int h_lo = e0 / D, h_hi = (e0 + ne - 1) / D;  // the rows of this share
  const int nh = h_hi - h_lo + 1;
  const int64_t row0 = static_cast<int64_t>(local) * H + head0;
  float* a_sm = sm;                 // [SP][ne]: the share's partials
  float* m_sm = a_sm + SP * E;      // [nh][SP]: maxima, then weights
  float* l_sm = m_sm + NR * SP;     // [nh][SP]: sums
  float* f_sm = l_sm + NR * SP;     // [nh][2]: out_scale, lse
  // One round of loads: every thread issues all of its loads before storing any.
  constexpr int kPer = 8;
  const int n_a = SP * ne, n_s = nh * SP;
  for (int base = 0; base < n_a + n_s; base += kPer * kThreads) {
    float v[kPer], w[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = base + i * kThreads + tid;
      v[i] = 0.f;
      w[i] = 0.f;
      if (idx < n_a) {
        const int sp = idx / ne, e = idx % ne;
        v[i] = __ldcg(acc_ws + (sp * stride + row0) * D + e0 + e);
      } else if (idx < n_a + n_s) {
        const int j = idx - n_a, h = j / SP, sp = j % SP;
        const float* ml = ml_ws + (sp * stride + row0 + h_lo + h) * 2;
        v[i] = __ldcg(ml);
        w[i] = __ldcg(ml + 1);
      }
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = base + i * kThreads + tid;
      if (idx < n_a) {
        a_sm[(idx / ne) * E + idx % ne] = v[i];
      } else if (idx < n_a + n_s) {
        m_sm[idx - n_a] = v[i];
        l_sm[idx - n_a] = w[i];
      }
    }
  }
  __syncthreads();
  // A warp per row: every lane takes the maximum in split order (its loads independent of the
  // chain), the lanes turn the maxima into weights side by side (one exp2f each instead of SP in a
  // chain), and lane 0 sums in split order.
  const int warp = tid / 32, lane = tid % 32;
  for (int h = warp; h < nh; h += kThreads / 32) {
    float* m_row = m_sm + h * SP;
    const float* l_row = l_sm + h * SP;
    const int qh = head0 + h_lo + h;
    const float sink = lane == 0 && p.has_sinks ? p.sinks[qh] : -INFINITY;  // loaded early
    float M = -INFINITY;
#pragma unroll 8
    for (int sp = 0; sp < SP; ++sp) M = fmaxf(M, m_row[sp]);
    const float mu = pa::exp_base(M);
    __syncwarp();  // every lane has read the maxima
    for (int sp = lane; sp < SP; sp += 32) m_row[sp] = pa::merge_weight_exact(m_row[sp], mu);
    __syncwarp();
    if (lane == 0) {
      float L = 0.f;
#pragma unroll 8
      for (int sp = 0; sp < SP; ++sp) L = __fmaf_rn(l_row[sp], m_row[sp], L);
      const pa::Finalised f = pa::finalise(M, L, sink);
      f_sm[2 * h] = f.out_scale;
      f_sm[2 * h + 1] = f.lse;
    }
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out);
  for (int e = tid; e < ne; e += kThreads) {
    const int h = (e0 + e) / D - h_lo, d = (e0 + e) % D;
    const float* w_row = m_sm + h * SP;
    float o = 0.f;
#pragma unroll 8
    for (int sp = 0; sp < SP; ++sp) o = __fmaf_rn(w_row[sp], a_sm[sp * E + e], o);
    const int qh = head0 + h_lo + h;
    out[pa::o_row(p, token, qh) + d] = static_cast<T>(o * f_sm[2 * h]);
    if (d == 0 && p.lse) p.lse[static_cast<int64_t>(token) * H + qh] = f_sm[2 * h + 1];
  }
}

// Bytes of shared memory group_merge needs for a group of gc rows at head size D split SP ways.
__host__ __device__ constexpr size_t group_merge_bytes(int gc, int D, int SP) {
  return (static_cast<size_t>(SP) * (((gc * D + SP - 1) / SP + 3) & ~3) + static_cast<size_t>(16) * (2 * SP + 2)) *
         sizeof(float);
}

__device__ __forceinline__ void ldsm_x2(uint32_t r[2], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
}
__device__ __forceinline__ void ldsm_x2_trans(uint32_t r[2], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
}

// FP8 caches (KV != 0). The MMAs run in f16 whatever the compute type: every FP8 value is exact
// in f16, and bf16 queries are scaled by a power of two per row into f16's range (exact: bf16's 8
// significant bits fit f16's 11; only elements below 2^-28 of the row's largest are rounded, far
// below the product's own rounding). The scales fold into the f32 score scale (K scale, the row's
// power of two) and the f32 output (V scale), so no per-element multiply is needed.
//
// K (S = Q K^T, B[k = dim][n = key]): an ldmatrix of FP8 bytes read as 16-bit pairs gives lane
// (g, t4) the four bytes of key g at dims 4t4..4t4+3 of a 16-dim step; the step's k indices are
// permuted so that those dims are k = {2t4, 2t4+1, 2t4+8, 2t4+9}: the low byte pair is the b0
// operand and the high pair b1, and Q's A fragments take the same dims (a0/a1: dims 4t4, 4t4+1;
// a2/a3: 4t4+2, 4t4+3). A dot product does not depend on the order of its terms.
// V (O += P V, B[k = key][n = dim]): ldmatrix.trans of the bytes gives lane (g, t4) keys 2t4 and
// 2t4+1 at dims 2g and 2g+1; one byte permute makes the key pairs of dim 2g and of dim 2g+1, the
// b operands of two n8 tiles, one over the even dims of the 16-dim unit, one over the odd. The
// accumulator of unit u therefore holds dims u*16 + 4t4 + {0, 2} (even tile) and {1, 3} (odd).
template <int KV> __device__ __forceinline__ uint32_t fp8_pair(uint32_t two) {
  if constexpr (KV == pa::fp8::kE5M2) {
    // An E5M2 byte is the top byte of the f16 with the same value (infinities and NaN included):
    // one byte permute places bytes 0 and 1 as the high bytes of the two halves.
    return __byte_perm(two, 0u, 0x1404);
  } else {
    return pa::fp8::to_half2_bits<KV>(two);
  }
}

// Launch bounds: w4s2 at head sizes up to 128 must keep three blocks per SM (at most 168
// registers); every other configuration asks for two. Without a minimum, ptxas held the head-128
// w4s3 kernel to 168 registers with 12 / 16 bytes of spills; with it, 195 and none (two blocks
// per SM, as its shared memory allows), and the default decode ran 0.1-0.9% faster (b64 x 4096
// 0.45%, MHA b32 x 4096 0.9%, b1 x 32768 0.6%; w4s3 on b256 x 1024 2.2%; H100,
// docs/PERFORMANCE.md, twenty-ninth session). The configurations whose shared memory allows more
// blocks keep them under these bounds (ptxas -v, sm_90a): w4s3 at heads 64 and 80 uses at most
// 156 registers (three blocks), the FP8 pipelines' 64-thread blocks at most 200 (four).
template <typename T, int D, int W, int NS, int KV = 0, int KG = 1>
__global__ void __launch_bounds__(32 * W, (W == 4 && NS == 2 && D <= 128) ? 3 : 2)
    decode_split_kernel(const KernelParams p) {
  using Cfg = DecodeCfg<D, W, NS, KV, KG>;
  constexpr int TK = Cfg::kTK, RS = Cfg::kRS, C = Cfg::kChunks, S = Cfg::kStages;
  constexpr int KW = Cfg::kKW, KT = D / 16, DT = D / 8, NR = Cfg::kRows;
  constexpr int QC = Cfg::kQChunks, RSB = Cfg::kRSB;
  constexpr bool kFp8 = Cfg::kFp8;
  using KvT = std::conditional_t<kFp8, uint8_t, T>;  // a cache element
  using MT = std::conditional_t<kFp8, __half, T>;     // the MMA operand type
  constexpr int EPC = 16 / Cfg::kEB;                  // cache elements per 16-byte chunk
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* kv_s = smem;                                             // [S][K|V][TK][RSB bytes]
  int64_t* ro_s = reinterpret_cast<int64_t*>(smem + Cfg::kKvBytes);      // [S][TK]
  T* q_s = reinterpret_cast<T*>(smem + Cfg::kKvBytes + Cfg::kRowOffBytes);  // [16][RS]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, t4 = lane & 3;
  const int H = p.num_heads;
  const int G = H / p.num_kv_heads;
  const int RC = (G + NR - 1) / NR;
  // blockIdx.x = request * (kv heads * row chunks) + kv head * row chunks + chunk: the blocks of
  // one request run side by side, so they read each cache page (all kv heads) at about one time.
  const int gy = p.num_kv_heads * RC;
  const int local = blockIdx.x / gy;
  const int req = p.req_begin + local;
  const int kvh = (blockIdx.x % gy) / RC;
  const int hb = (blockIdx.x % gy % RC) * NR;
  const int gc = min(NR, G - hb);   // query heads of this block
  const int head0 = kvh * G + hb;   // first of them
  const int split = blockIdx.z;
  PA_TRACE_MARK(kMarkStart);

  // Device metadata is clamped so that bad values cannot move any access out of its buffer.
  const int token = p.qsl[req];
  if (token < 0 || token >= p.num_tokens) return;
  // A request without a query token is CUDA-graph padding (vLLM's rule: query_start_loc repeats
  // its last value, seq_len 0): nothing to compute and no row of its own to write.
  if (p.qsl[req + 1] - token != 1) return;
  const int seq_len = pa::clamp_int(p.seq_lens[req], 0, p.max_blocks_per_req * p.block_size);
  const int pos = seq_len - 1;
  // For a single query row the visible keys are exactly [lo, hi], and only keys of [k_begin, k_end)
  // within it are ever loaded (later keys of a tile are zero-filled), so no cache row this row
  // cannot see (window, block tail, other requests' blocks) reaches shared memory: NaN or Inf there
  // cannot leak into the product, and no sanitising is needed here.
  int lo, hi;
  pa::key_range(pos, pos, seq_len, p, lo, hi);
  const int len = hi - lo + 1;
  // Keys of this split: a fixed count per split (split_keys > 0: the boundaries depend on this
  // request alone, so its reduction order is the same in any batch) or an even share of the
  // request's keys rounded to whole granules. The last split also takes any keys past the others
  // (only reachable when the grid has fewer splits than the request needs), so nothing is lost.
  int k_begin = lo, k_end = lo;
  if (len > 0) {
    int chunk = p.split_keys > 0 ? p.split_keys : (len + p.num_splits - 1) / p.num_splits;
    chunk = (chunk + kSplitGranule - 1) / kSplitGranule * kSplitGranule;
    const int64_t begin = lo + static_cast<int64_t>(split) * chunk;
    k_begin = static_cast<int>(min(begin, static_cast<int64_t>(hi) + 1));
    k_end = split == p.num_splits - 1 ? hi + 1 : min(hi + 1, k_begin + chunk);
    if (k_end < k_begin) k_end = k_begin;
  }
  const int n_tiles = (k_end - k_begin + TK - 1) / TK;

  const T* q = static_cast<const T*>(p.query);
  const KvT* kc = static_cast<const KvT*>(p.key_cache);
  const KvT* vc = static_cast<const KvT*>(p.value_cache);

  // Query rows of the chunk (rows past it zero).
  for (int idx = tid; idx < NR * QC; idx += Cfg::kThreads) {
    const int r = idx / QC, c = idx % QC;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (r < gc) v = *reinterpret_cast<const uint4*>(q + pa::q_row(p, token, head0 + r) + c * 8);
    *reinterpret_cast<uint4*>(q_s + r * RS + c * 8) = v;
  }
  // Row offsets of the first S tiles.
  if (tid < TK) {
    for (int t = 0; t < S && t < n_tiles; ++t) {
      const int key = k_begin + t * TK + tid;
      ro_s[t * TK + tid] = key < k_end ? pa::cache_row(p, pa::page_of(p, req, key), key, kvh, D) : -1;
    }
  }
  __syncthreads();

  // The block-table entries of the keys ahead, in shared memory, a chunk of kPageChunk pages at
  // a time (covering `tiles_per_chunk` whole tiles). The loop used to read the entry of tile n+S
  // from global memory at the start of iteration n and needed it at the end: one load latency of
  // a memory system saturated by the K/V stream (thousands of cycles) every tile, whatever the
  // stage count, which capped the tile rate. A chunk costs one exposed load per
  // `tiles_per_chunk` tiles (about 65 at block size 16).
  constexpr int kPageChunk = 256;
  __shared__ int pages_s[kPageChunk];
  const int tiles_per_chunk = max(1, ((kPageChunk - 1) * p.block_size) / TK);
  int chunk_end = 0;    // first tile past the chunk held in pages_s (0: none held yet)
  int chunk_page0 = 0;  // block-table column of pages_s[0]
  // Block-uniform: every thread calls it with the same tile, tiles in increasing order, and it
  // holds two barriers. The common case (the tile's chunk is already held) is one comparison.
  auto load_pages = [&](int t) {
    if (t < chunk_end) return;
    const int c = t / tiles_per_chunk;
    __syncthreads();  // every read of the previous chunk is done
    chunk_end = (c + 1) * tiles_per_chunk;
    chunk_page0 = (k_begin + c * tiles_per_chunk * TK) / p.block_size;
    const int64_t base = static_cast<int64_t>(req) * p.max_blocks_per_req;
    for (int i = tid; i < kPageChunk; i += Cfg::kThreads) {
      const int col = chunk_page0 + i;
      int b = col < p.max_blocks_per_req ? p.block_table[base + col] : 0;
      if (b < 0 || b >= p.num_blocks) b = 0;  // as pa::page_of: a bad id never reaches an address
      pages_s[i] = b;
    }
    __syncthreads();
  };
  // The key whose cache row offset this thread (tid < TK) prefetches for tile n + S, kept as a
  // block-table column and an offset in its page, advanced by one tile per iteration without a
  // division (the kernel was bound by instruction issue, not bytes: see PERFORMANCE.md).
  const int tile_cols = TK / p.block_size, tile_rem = TK % p.block_size;
  int pf_key = k_begin + S * TK + tid;
  int pf_col = pf_key / p.block_size, pf_in = pf_key % p.block_size;
  const int64_t key_stride = static_cast<int64_t>(p.num_kv_heads) * D;  // elements between keys of a page
  const int64_t head_off = static_cast<int64_t>(kvh) * D;

  // Each thread copies fixed 16-byte columns of the tile's rows: with the thread count a multiple
  // of the chunks per row, a thread's column is the same in every row it copies, so the shared
  // addresses are one base plus constants and only the rows' cache offsets are read per copy.
  auto issue_tile = [&](int t) {
    const int stage = t % S;
    unsigned char* ks = kv_s + (stage * 2 + 0) * TK * RSB;
    unsigned char* vs = kv_s + (stage * 2 + 1) * TK * RSB;
    const int64_t* ro = ro_s + stage * TK;
    if constexpr (Cfg::kThreads % C == 0 && TK % (Cfg::kThreads / C) == 0) {
      constexpr int kRowStep = Cfg::kThreads / C;
      const int c = tid % C, r0 = tid / C;
#pragma unroll
      for (int i = 0; i < TK / kRowStep; ++i) {
        const int r = r0 + i * kRowStep;
        const int64_t row = ro[r];
        pa::cp_async16_row<kL2Prefetch>(ks + r * RSB + c * 16, kc, row, c * EPC);
        pa::cp_async16_row<kL2Prefetch>(vs + r * RSB + c * 16, vc, row, c * EPC);
      }
    } else {
#pragma unroll 4
      for (int idx = tid; idx < TK * C; idx += Cfg::kThreads) {
        const int r = idx / C, c = idx % C;
        const int64_t row = ro[r];
        const bool valid = row >= 0;
        const int64_t off = valid ? row + c * EPC : 0;
        pa::cp_async16<kL2Prefetch>(ks + r * RSB + c * 16, kc + off, valid);
        pa::cp_async16<kL2Prefetch>(vs + r * RSB + c * 16, vc + off, valid);
      }
    }
  };

#pragma unroll
  for (int t = 0; t < S - 1; ++t) {
    if (t < n_tiles) issue_tile(t);
    pa::cp_async_commit();
  }

  // FP8: the K scale of this KV head and each row's power of two (bf16 queries) fold into the
  // score scale; the V scale multiplies the merged accumulator once, before any split partial or
  // output is written.
  float kq[2] = {1.f, 1.f};
  float v_scale = 1.f;
  if constexpr (kFp8) {
    __shared__ int q_exp_s[NR];
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      // Row maxima, 8 lanes per row (every lane of a warp takes part in each pass).
      static_assert(NR % (Cfg::kThreads / 8) == 0, "rows per pass");
      for (int r = tid / 8; r < NR; r += Cfg::kThreads / 8) {
        float mx = 0.f;
        for (int c = tid % 8; c < D / 2; c += 8) {
          const float2 f = pa::Elem<T>::to_float2(*reinterpret_cast<const uint32_t*>(q_s + r * RS + 2 * c));
          mx = fmaxf(mx, fmaxf(fabsf(f.x), fabsf(f.y)));
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        // 2^e takes the row's largest magnitude into [2^14, 2^15); zero, subnormal, Inf or NaN
        // maxima keep e = 0.
        const int ex = static_cast<int>(__float_as_uint(mx) >> 23);
        const int e = (ex == 0 || ex >= 255) ? 0 : max(-100, min(100, 141 - ex));
        if (tid % 8 == 0) q_exp_s[r] = e;
      }
      __syncthreads();
      // In place, one 16-byte chunk per thread at a time: bf16 * 2^e (exact in f32) -> f16.
      for (int idx = tid; idx < NR * QC; idx += Cfg::kThreads) {
        const int r = idx / QC, c = idx % QC;
        const float f = __uint_as_float(static_cast<uint32_t>(127 + q_exp_s[r]) << 23);
        uint4 v = *reinterpret_cast<const uint4*>(q_s + r * RS + c * 8);
        uint32_t* w = reinterpret_cast<uint32_t*>(&v);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float2 x = pa::Elem<T>::to_float2(w[i]);
          w[i] = pa::Elem<__half>::pack(x.x * f, x.y * f);
        }
        *reinterpret_cast<uint4*>(q_s + r * RS + c * 8) = v;
      }
    } else {
      if (tid < NR) q_exp_s[tid] = 0;
    }
    __syncthreads();
    const float ks = pa::fp8::scale_of(p.k_scale, p.kv_scale_per_head, kvh);
    v_scale = pa::fp8::scale_of(p.v_scale, p.kv_scale_per_head, kvh);
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      kq[rr] = ks * __uint_as_float(static_cast<uint32_t>(127 - q_exp_s[g + rr * 8]) << 23);
    }
  }

  // A fragments of Q for the 16-dim step kk: the standard ldmatrix layout, or for FP8 caches the
  // permuted dims described above (two 8-byte loads).
  auto q_frag = [&](int kk, uint32_t a[4]) {
    if constexpr (kFp8) {
      const uint2 x = *reinterpret_cast<const uint2*>(q_s + g * RS + kk * 16 + 4 * t4);
      const uint2 y = *reinterpret_cast<const uint2*>(q_s + (g + 8) * RS + kk * 16 + 4 * t4);
      a[0] = x.x;
      a[1] = y.x;
      a[2] = x.y;
      a[3] = y.y;
    } else {
      pa::ldsm_x4(a, q_s + (lane % 16) * RS + kk * 16 + (lane / 16) * 8);
    }
  };
  uint32_t qf[Cfg::kQInRegs ? KT : 1][4];
  if constexpr (Cfg::kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) q_frag(kk, qf[kk]);
  }

  float o[DT][4];
#pragma unroll
  for (int j = 0; j < DT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  pa::SoftmaxState st[2];
  st[0].reset();
  st[1].reset();
  const float scale2 = p.scale * pa::kLog2e;
  const float sc2[2] = {scale2 * kq[0], scale2 * kq[1]};  // FP8: the folded score scales per row
  const bool elementwise = p.softcap > 0.f || p.has_alibi;
  float slope[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = g + rr * 8;
    slope[rr] = (p.has_alibi && r < gc) ? p.alibi[head0 + r] : 0.f;
  }
  const int kw0 = warp * KW;  // this warp's keys within each tile

  // Pipeline: tiles 0..S-2 in flight before the loop; iteration n waits for tile n, then issues
  // tile n+S-1 (into the stage computed in iteration n-1: the barrier orders those reads first),
  // reads the block-table entries of tile n+S and computes tile n.
  PA_TRACE_MARK(kMarkIssued);
  for (int n = 0; n < n_tiles; ++n) {
    pa::cp_async_wait<S - 2>();
    __syncthreads();
    if (n == 0) PA_TRACE_MARK(kMarkFirstTile);
    if (n + S - 1 < n_tiles) issue_tile(n + S - 1);
    pa::cp_async_commit();
    int64_t next_pg = 0;
    const bool prefetch = n + S < n_tiles && tid < TK;
    if (n + S < n_tiles) load_pages(n + S);
    if (prefetch && pf_key < k_end) next_pg = pages_s[pf_col - chunk_page0];

    const int stage = n % S;
    [[maybe_unused]] const T* ks = reinterpret_cast<const T*>(kv_s + (stage * 2 + 0) * TK * RSB);
    [[maybe_unused]] const T* vs = reinterpret_cast<const T*>(kv_s + (stage * 2 + 1) * TK * RSB);
    [[maybe_unused]] const unsigned char* ks8 = kv_s + (stage * 2 + 0) * TK * RSB;
    [[maybe_unused]] const unsigned char* vs8 = kv_s + (stage * 2 + 1) * TK * RSB;
    const int tile_start = k_begin + n * TK;
    const int nk = min(TK, k_end - tile_start);

    if (kw0 < nk) {  // warp-uniform: the warp holds at least one visible key
      // S = Q K^T: 16 rows (heads) x 16 keys. Even and odd 16-dim steps accumulate into separate
      // fragments (summed below): two dependent chains of KT / 2 MMAs instead of one of KT, which
      // halves the latency the online softmax waits for (the loop is latency-bound, not MMA-bound).
      float s[KG][2][4], s_odd[KG][2][4];
#pragma unroll
      for (int kg = 0; kg < KG; ++kg)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[kg][j][e] = s_odd[kg][j][e] = 0.f;
      auto q_at = [&](int kk, uint32_t a[4]) {
        if constexpr (Cfg::kQInRegs) {
          a[0] = qf[kk][0];
          a[1] = qf[kk][1];
          a[2] = qf[kk][2];
          a[3] = qf[kk][3];
        } else {
          q_frag(kk, a);
        }
      };
      if constexpr (kFp8) {
        // Two 16-dim steps per ldmatrix.x4: r[0] / r[1] = keys 0-7 at steps 2c / 2c+1, r[2] / r[3]
        // = keys 8-15 (of each 16-key group).
#pragma unroll
        for (int c2 = 0; c2 < KT / 2; ++c2) {
          uint32_t r[KG][4];
#pragma unroll
          for (int kg = 0; kg < KG; ++kg) {
            pa::ldsm_x4(r[kg],
                        ks8 + (kw0 + kg * 16 + (lane % 8) + (lane / 16) * 8) * RSB + c2 * 32 + ((lane / 8) % 2) * 16);
          }
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            uint32_t a[4];
            q_at(2 * c2 + h, a);
#pragma unroll
            for (int kg = 0; kg < KG; ++kg) {
              float(&acc)[2][4] = h == 0 ? s[kg] : s_odd[kg];
              pa::Mma<MT>::run(acc[0], a, fp8_pair<KV>(r[kg][h]), fp8_pair<KV>(r[kg][h] >> 16));
              pa::Mma<MT>::run(acc[1], a, fp8_pair<KV>(r[kg][2 + h]), fp8_pair<KV>(r[kg][2 + h] >> 16));
            }
          }
        }
        if constexpr (KT % 2 == 1) {
          uint32_t a[4];
          q_at(KT - 1, a);
#pragma unroll
          for (int kg = 0; kg < KG; ++kg) {
            uint32_t r[2];
            ldsm_x2(r, ks8 + (kw0 + kg * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * RSB + (KT - 1) * 16);
            pa::Mma<MT>::run(s[kg][0], a, fp8_pair<KV>(r[0]), fp8_pair<KV>(r[0] >> 16));
            pa::Mma<MT>::run(s[kg][1], a, fp8_pair<KV>(r[1]), fp8_pair<KV>(r[1] >> 16));
          }
        }
      } else {
#pragma unroll
        for (int kk = 0; kk < KT; ++kk) {
          uint32_t a[4];
          q_at(kk, a);
#pragma unroll
          for (int kg = 0; kg < KG; ++kg) {
            uint32_t b[4];
            pa::ldsm_x4(b, ks + (kw0 + kg * 16 + (lane % 8) + (lane / 16) * 8) * RS + kk * 16 + ((lane / 8) % 2) * 8);
            float(&acc)[2][4] = kk % 2 == 0 ? s[kg] : s_odd[kg];
            pa::Mma<T>::run(acc[0], a, b[0], b[1]);
            pa::Mma<T>::run(acc[1], a, b[2], b[3]);
          }
        }
      }
#pragma unroll
      for (int kg = 0; kg < KG; ++kg)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[kg][j][e] += s_odd[kg][j][e];
      // Scores in the log2 domain; keys past the split's end are masked. Warp-uniform fast path:
      // all 16 keys visible and no element-wise term (every tile but a split's last).
      if (kw0 + KW <= nk && !elementwise) {
#pragma unroll
        for (int kg = 0; kg < KG; ++kg)
#pragma unroll
          for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[kg][j][e] *= kFp8 ? sc2[e >> 1] : scale2;
      } else {
#pragma unroll
        for (int kg = 0; kg < KG; ++kg)
#pragma unroll
          for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int kl = kw0 + kg * 16 + j * 8 + 2 * t4 + (e & 1);
              float x = s[kg][j][e];
              if (kl >= nk) x = -INFINITY;
              else if (elementwise)
                x = pa::score_log2(kFp8 ? x * kq[e >> 1] : x, p, slope[e >> 1], pos, tile_start + kl);
              else x *= kFp8 ? sc2[e >> 1] : scale2;
              s[kg][j][e] = x;
            }
      }
      // Online softmax for rows g and g + 8.
      float alpha[2];
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        float mx = fmaxf(fmaxf(s[0][0][2 * rr], s[0][0][2 * rr + 1]), fmaxf(s[0][1][2 * rr], s[0][1][2 * rr + 1]));
#pragma unroll
        for (int kg = 1; kg < KG; ++kg) {
          mx = fmaxf(
              mx, fmaxf(fmaxf(s[kg][0][2 * rr], s[kg][0][2 * rr + 1]), fmaxf(s[kg][1][2 * rr], s[kg][1][2 * rr + 1])));
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mu = st[rr].advance(mx, alpha[rr]);
        float sum = 0.f;
#pragma unroll
        for (int kg = 0; kg < KG; ++kg)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            s[kg][j][2 * rr] = pa::fast_exp2(s[kg][j][2 * rr] - mu);
            s[kg][j][2 * rr + 1] = pa::fast_exp2(s[kg][j][2 * rr + 1] - mu);
            sum += s[kg][j][2 * rr] + s[kg][j][2 * rr + 1];
          }
        st[rr].add(alpha[rr], sum);
      }
      // Once the maxima settle, alpha is 1 for the whole warp and the rescale is skipped.
      if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
        for (int j = 0; j < DT; ++j) {
          o[j][0] *= alpha[0];
          o[j][1] *= alpha[0];
          o[j][2] *= alpha[1];
          o[j][3] *= alpha[1];
        }
      }
      // O += P V: P's accumulator fragments are the A fragment of a 16-key step (one per group).
      uint32_t a[KG][4];
#pragma unroll
      for (int kg = 0; kg < KG; ++kg) {
        a[kg][0] = pa::Elem<MT>::pack(s[kg][0][0], s[kg][0][1]);
        a[kg][1] = pa::Elem<MT>::pack(s[kg][0][2], s[kg][0][3]);
        a[kg][2] = pa::Elem<MT>::pack(s[kg][1][0], s[kg][1][1]);
        a[kg][3] = pa::Elem<MT>::pack(s[kg][1][2], s[kg][1][3]);
      }
      if constexpr (kFp8) {
        // Two 16-dim units per ldmatrix.x4.trans: r[0] / r[1] = keys 0-7 / 8-15 of unit 2c,
        // r[2] / r[3] of unit 2c+1. o[2u] holds unit u's even dims, o[2u+1] its odd dims.
        auto pv_unit = [&](const uint32_t(&pa_)[4], int u, uint32_t r_lo, uint32_t r_hi) {
          const uint32_t p0 = __byte_perm(r_lo, 0u, 0x3120);  // (key 2t4, 2t4+1) at dim 2g | at 2g+1
          const uint32_t p1 = __byte_perm(r_hi, 0u, 0x3120);
          pa::Mma<MT>::run(o[2 * u], pa_, fp8_pair<KV>(p0), fp8_pair<KV>(p1));
          pa::Mma<MT>::run(o[2 * u + 1], pa_, fp8_pair<KV>(p0 >> 16), fp8_pair<KV>(p1 >> 16));
        };
#pragma unroll
        for (int c2 = 0; c2 < KT / 2; ++c2) {
#pragma unroll
          for (int kg = 0; kg < KG; ++kg) {
            uint32_t r[4];
            pa::ldsm_x4_trans(
                r, vs8 + (kw0 + kg * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * RSB + c2 * 32 + (lane / 16) * 16);
            pv_unit(a[kg], 2 * c2, r[0], r[1]);
            pv_unit(a[kg], 2 * c2 + 1, r[2], r[3]);
          }
        }
        if constexpr (KT % 2 == 1) {
#pragma unroll
          for (int kg = 0; kg < KG; ++kg) {
            uint32_t r[2];
            ldsm_x2_trans(r, vs8 + (kw0 + kg * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * RSB + (KT - 1) * 16);
            pv_unit(a[kg], KT - 1, r[0], r[1]);
          }
        }
      } else {
#pragma unroll
        for (int dn = 0; dn < KT; ++dn) {
#pragma unroll
          for (int kg = 0; kg < KG; ++kg) {
            uint32_t b[4];
            pa::ldsm_x4_trans(
                b, vs + (kw0 + kg * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * RS + dn * 16 + (lane / 16) * 8);
            pa::Mma<T>::run(o[2 * dn], a[kg], b[0], b[1]);
            pa::Mma<T>::run(o[2 * dn + 1], a[kg], b[2], b[3]);
          }
        }
      }
    }
    if (prefetch) {
      ro_s[(n % S) * TK + tid] = pf_key < k_end ? next_pg * p.kv_bs + pf_in * key_stride + head_off : -1;
    }
    pf_key += TK;
    pf_col += tile_cols;
    pf_in += tile_rem;
    if (pf_in >= p.block_size) {
      pf_in -= p.block_size;
      ++pf_col;
    }
  }
  pa::cp_async_wait<0>();
  __syncthreads();
  PA_TRACE_MARK(kMarkLoopEnd);

  // Merge the warps' partial states through shared memory (the K/V tiles are free now).
  float* red_o = reinterpret_cast<float*>(smem);  // [W][16][D]
  float* red_m = red_o + W * NR * D;              // [W][16]
  float* red_l = red_m + W * NR;                  // [W][16]
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float lr = st[rr].l;
    lr += __shfl_xor_sync(0xffffffffu, lr, 1);
    lr += __shfl_xor_sync(0xffffffffu, lr, 2);
    const int r = g + rr * 8;
    if (r < gc) {
      if constexpr (kFp8) {
        // Unit u's dims u*16 + 4t4 + {0, 1, 2, 3} = even tile, odd tile, even, odd.
        float* dst = red_o + (warp * NR + r) * D + 4 * t4;
#pragma unroll
        for (int u = 0; u < KT; ++u) {
          *reinterpret_cast<float4*>(dst + u * 16) =
              make_float4(o[2 * u][2 * rr], o[2 * u + 1][2 * rr], o[2 * u][2 * rr + 1], o[2 * u + 1][2 * rr + 1]);
        }
      } else {
        float* dst = red_o + (warp * NR + r) * D + 2 * t4;
#pragma unroll
        for (int j = 0; j < DT; ++j)
          *reinterpret_cast<float2*>(dst + j * 8) = make_float2(o[j][2 * rr], o[j][2 * rr + 1]);
      }
      if (t4 == 0) {
        red_m[warp * NR + r] = st[rr].m2;
        red_l[warp * NR + r] = lr;
      }
    }
  }
  __syncthreads();

  const int num_splits = p.num_splits;
  const int n_local = p.num_launch_reqs;
  float* acc_ws = p.workspace + kDecodeCounters;                                    // [S][n][H][D]
  float* ml_ws = acc_ws + static_cast<int64_t>(num_splits) * n_local * H * D;    // [S][n][H][2]
  const int64_t stride = static_cast<int64_t>(n_local) * H;  // rows per split
  for (int idx = tid; idx < gc * D; idx += Cfg::kThreads) {
    const int h = idx / D, d = idx % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < W; ++w) M = fmaxf(M, red_m[w * NR + h]);
    const float mu = pa::exp_base(M);
    float sum = 0.f, l_sum = 0.f;
#pragma unroll
    for (int w = 0; w < W; ++w) {
      const float wt = pa::merge_weight_fast(red_m[w * NR + h], mu);  // 0 for a warp that saw nothing
      sum += wt * red_o[(w * NR + h) * D + d];
      l_sum += wt * red_l[w * NR + h];
    }
    // FP8: the V scale, applied here once for every path (direct output, split partials, and so
    // the combine kernel and the folded combine, which only merge partials).
    if constexpr (kFp8) sum *= v_scale;
    const int qh = head0 + h;
    if (num_splits == 1) {
      const pa::Finalised f = pa::finalise(M, l_sum, p.has_sinks ? p.sinks[qh] : -INFINITY);
      T* out = static_cast<T*>(p.out);
      out[pa::o_row(p, token, qh) + d] = static_cast<T>(sum * f.out_scale);
      if (d == 0 && p.lse) p.lse[static_cast<int64_t>(token) * H + qh] = f.lse;
    } else {
      const int64_t row = split * stride + static_cast<int64_t>(local) * H + qh;
      acc_ws[row * D + d] = sum;
      if (d == 0) {
        ml_ws[row * 2 + 0] = M;
        ml_ws[row * 2 + 1] = l_sum;
      }
    }
  }
  PA_TRACE_MARK(kMarkWritten);
  if (num_splits == 1 || !p.fold) return;

  // Folded combine: the last of this group's num_splits blocks to finish merges every split's
  // partial, in split order, and resets the group's counter. The fence before the arrival makes
  // this block's partials visible to whichever block turns out last; the fence after it orders
  // the last block's reads after every other arrival. No floating-point atomics: the merge order
  // is fixed, so the result does not depend on which block arrives last.
  __shared__ int s_last;
  // The group merge (kp.fold == 2, where its shared memory fits): see group_merge.
  const bool gm = p.fold == 2 && group_merge_bytes(gc, D, num_splits) <= Cfg::kKvBytes;
  unsigned departed = 0;  // thread 0, group merge: this block's departure count
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    unsigned* counter = reinterpret_cast<unsigned*>(p.workspace) + blockIdx.x;
    const unsigned S = static_cast<unsigned>(num_splits);
    const unsigned arrived = atomicAdd(counter, 1u) + 1u;
    const bool last = arrived == S;
    if (!gm) {
      if (last) atomicExch(counter, 0u);  // every other block of the group has arrived
    } else {
      // Every block of the launch is resident (a cooperative launch), so the group's last
      // arrival comes: wait for the count to reach S (an acquire load; each arrival was preceded
      // by its block's fence, so every partial is visible after it). Then count this block out
      // (S more arrivals); the last to leave resets the counter, when no block of the group
      // reads it any more. Its return is only needed after the merge, so its round trip
      // overlaps the merge. Hang guard as in the prefill.
      if (!last) {
        const unsigned long long t0 = pa::global_ns();
        unsigned c;
        do {
          asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(c) : "l"(counter) : "memory");
          if (c < S && pa::global_ns() - t0 > 30000000000ull) __trap();
        } while (c < S);
      }
      __threadfence();
      departed = atomicAdd(counter, 1u) + 1u;
    }
    s_last = last;
  }
  __syncthreads();
  PA_TRACE_MARK(kMarkArrived);
  if (gm) {
    group_merge<T, D, Cfg::kThreads>(p, reinterpret_cast<float*>(smem), acc_ws, ml_ws, stride, local, head0, gc, token,
                                     split);
    if (tid == 0 && departed == 2u * static_cast<unsigned>(num_splits)) {
      atomicExch(reinterpret_cast<unsigned*>(p.workspace) + blockIdx.x, 0u);
    }
#ifdef PA_DECODE_TRACE
    __syncthreads();
    PA_TRACE_MARK(kMarkMerged);
#endif
    return;
  }
  if (!s_last) return;
  __threadfence();
  if (static_cast<size_t>(NR) * (2 * num_splits + 2) * sizeof(float) <= Cfg::kKvBytes) {
    fold_merge<T, D, Cfg::kThreads>(p, reinterpret_cast<float*>(smem), acc_ws, ml_ws, stride, local, head0, gc, token);
#ifdef PA_DECODE_TRACE
    __syncthreads();
    PA_TRACE_MARK(kMarkMerged);
#endif
    return;
  }
  for (int idx = tid; idx < gc * D; idx += Cfg::kThreads) {
    const int h = idx / D, d = idx % D;
    const int qh = head0 + h;
    const int64_t row = static_cast<int64_t>(local) * H + qh;
    float M, L;
    merge_stats(ml_ws, num_splits, stride, row, M, L);
    const pa::Finalised f = pa::finalise(M, L, p.has_sinks ? p.sinks[qh] : -INFINITY);
    const float o = merge_elem(acc_ws, ml_ws, num_splits, stride, row, D, d, M);
    T* out = static_cast<T*>(p.out);
    out[pa::o_row(p, token, qh) + d] = static_cast<T>(o * f.out_scale);
    if (d == 0 && p.lse) p.lse[static_cast<int64_t>(token) * H + qh] = f.lse;
  }
#ifdef PA_DECODE_TRACE
  __syncthreads();
  PA_TRACE_MARK(kMarkMerged);
#endif
}

// Merges the splits of each (request, head): one warp per row (the separate-launch combine; the
// folded combine in decode_split_kernel does the same arithmetic through the same functions).
template <typename T> __global__ void __launch_bounds__(128) decode_combine_kernel(const KernelParams p, int D) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int H = p.num_heads;
  const int n_local = p.num_launch_reqs;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + warp;
  if (row >= static_cast<int64_t>(n_local) * H) return;
  const int local = static_cast<int>(row / H), qh = static_cast<int>(row % H);
  const int token = p.qsl[p.req_begin + local];
  if (token < 0 || token >= p.num_tokens) return;
  if (p.qsl[p.req_begin + local + 1] - token != 1) return;  // graph padding, as above
  const int S = p.num_splits;
  const float* acc = p.workspace + kDecodeCounters;
  const float* ml = acc + static_cast<int64_t>(S) * n_local * H * D;
  const int64_t stride = static_cast<int64_t>(n_local) * H;  // rows per split
  T* out = static_cast<T*>(p.out);
  if (S <= 64 && D <= 256) {
    // Each lane loads the (max, sum) of splits lane and lane + 32 once; the row's maximum, the
    // weights and the sum are then taken in split order through shuffles, and each lane sums its
    // (at most 8) elements with all their loads of a split in flight. The operations and their
    // order are merge_stats' and merge_elem's: the same bits.
    float m_r[2], l_r[2], w_r[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int sp = lane + 32 * k;
      m_r[k] = sp < S ? __ldcg(ml + (sp * stride + row) * 2) : -INFINITY;
      l_r[k] = sp < S ? __ldcg(ml + (sp * stride + row) * 2 + 1) : 0.f;
    }
    float M = -INFINITY;
    for (int sp = 0; sp < S; ++sp) M = fmaxf(M, __shfl_sync(0xffffffffu, sp < 32 ? m_r[0] : m_r[1], sp & 31));
    const float mu = pa::exp_base(M);
    w_r[0] = pa::merge_weight_exact(m_r[0], mu);
    w_r[1] = pa::merge_weight_exact(m_r[1], mu);
    float L = 0.f;
    for (int sp = 0; sp < S; ++sp) {
      const float l = __shfl_sync(0xffffffffu, sp < 32 ? l_r[0] : l_r[1], sp & 31);
      const float w = __shfl_sync(0xffffffffu, sp < 32 ? w_r[0] : w_r[1], sp & 31);
      L = __fmaf_rn(l, w, L);
    }
    const pa::Finalised f = pa::finalise(M, L, p.has_sinks ? p.sinks[qh] : -INFINITY);
    float o[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = 0.f;
#pragma unroll 2
    for (int sp = 0; sp < S; ++sp) {
      const float w = __shfl_sync(0xffffffffu, sp < 32 ? w_r[0] : w_r[1], sp & 31);
      const float* a = acc + (sp * stride + row) * D;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (lane + 32 * j < D) o[j] = __fmaf_rn(w, __ldcg(a + lane + 32 * j), o[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (lane + 32 * j < D) out[pa::o_row(p, token, qh) + lane + 32 * j] = static_cast<T>(o[j] * f.out_scale);
    }
    if (lane == 0 && p.lse) p.lse[static_cast<int64_t>(token) * H + qh] = f.lse;
    return;
  }
  float M, L;
  merge_stats(ml, S, stride, row, M, L);
  const pa::Finalised f = pa::finalise(M, L, p.has_sinks ? p.sinks[qh] : -INFINITY);
  for (int d = lane; d < D; d += 32) {
    const float o = merge_elem(acc, ml, S, stride, row, D, d, M);
    out[pa::o_row(p, token, qh) + d] = static_cast<T>(o * f.out_scale);
  }
  if (lane == 0 && p.lse) p.lse[static_cast<int64_t>(token) * H + qh] = f.lse;
}

// Floats of workspace a decode launch needs (0 without splits).
inline int64_t decode_workspace_need(int S, int n, int H, int D) {
  return S > 1 ? kDecodeCounters + static_cast<int64_t>(S) * n * H * (D + 2) : 0;
}

// Decode blocks of one split: requests x kv heads x row chunks of each GQA group (the grid's x).
inline int64_t decode_blocks_per_split(const PaAttnArgs& a) {
  constexpr int R = DecodeCfg<64>::kRows;  // the same for every configuration
  const int G = a.num_heads / a.num_kv_heads;
  return static_cast<int64_t>(a.req_end - a.req_begin) * a.num_kv_heads * ((G + R - 1) / R);
}

// Resident blocks per SM of a decode instantiation (as the runtime's occupancy calculator reports
// it for the dynamic shared memory the launch asks for).
template <typename Cfg, typename K> cudaError_t instance_blocks_per_sm(Cfg, K kernel, int32_t* blocks) {
  return pa::occupancy_blocks_per_sm(kernel, Cfg::kThreads, static_cast<int>(Cfg::kSmemBytes), blocks);
}

// Blocks of a decode instantiation the device holds at once (resident per SM x SMs), worked out
// once per device.
template <typename Cfg, typename K> cudaError_t coresident_blocks(K kernel, int32_t* blocks) {
  static std::atomic<int> cached[pa::kCachedDevices] = {};
  return pa::per_device_cached(
      cached,
      [kernel](int, int* c) {
        int sms = 0;
        cudaError_t err = pa::sm_count(&sms);
        if (err != cudaSuccess) return err;
        int32_t per_sm = 0;
        err = instance_blocks_per_sm(Cfg{}, kernel, &per_sm);
        if (err != cudaSuccess) return err;
        *c = per_sm * sms;
        return *c > 0 ? cudaSuccess : cudaErrorInvalidConfiguration;
      },
      blocks);
}

template <typename T, int D, int W, int NS, int KV, int KG>
cudaError_t launch_decode_cfg(const PaAttnArgs& a, KernelParams kp, bool fold, bool group, cudaStream_t stream) {
  using Cfg = DecodeCfg<D, W, NS, KV, KG>;
  const int n = a.req_end - a.req_begin;
  const int S = a.num_splits;
  const int64_t gx = decode_blocks_per_split(a);
  if (gx > 0x7fffffff) return cudaErrorInvalidConfiguration;
  // The folded combine needs one counter per pre-split block; a larger grid takes the separate
  // combine (same merge arithmetic, same bits).
  kp.fold = (fold && S > 1 && gx <= kDecodeCounters) ? 1 : 0;
  const size_t smem = Cfg::kSmemBytes;
  auto kernel = decode_split_kernel<T, D, W, NS, KV, KG>;
  cudaError_t err = pa::set_max_dynamic_smem_once<decode_split_kernel<T, D, W, NS, KV, KG>>(static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(gx), 1, S);
  if (kp.fold != 0 && group && S >= kGroupMergeMinSplits) {
    // The group merge needs every block resident at once: launched cooperatively (the driver
    // refuses a grid that cannot be), where the grid fits the device's resident blocks.
    int32_t resident = 0;
    if (coresident_blocks<Cfg>(kernel, &resident) == cudaSuccess && gx * S <= resident) {
      kp.fold = 2;
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = grid;
      cfg.blockDim = dim3(Cfg::kThreads);
      cfg.dynamicSmemBytes = smem;
      cfg.stream = stream;
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeCooperative;
      attr[0].val.cooperative = 1;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      if (cudaLaunchKernelEx(&cfg, kernel, kp) == cudaSuccess) return cudaSuccess;
      // Refused (a partitioned device holds fewer blocks): the last block merges. A sticky error
      // of an earlier launch fails the plain launch below as well.
      cudaGetLastError();
      kp.fold = 1;
    } else {
      cudaGetLastError();
    }
  }
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(kp);
  err = pa_last_launch_status();
  if (err != cudaSuccess || S == 1 || kp.fold) return err;
  const int64_t rows = static_cast<int64_t>(n) * a.num_heads;
  const int64_t blocks = (rows + 3) / 4;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  decode_combine_kernel<T><<<static_cast<unsigned>(blocks), 128, 0, stream>>>(kp, D);
  return pa_last_launch_status();
}

// Calls f with the kernel configuration (warps, stages, key groups per warp) of a variant: w4s2
// exists for both 16-bit types at head size 128, the other non-default pipelines for bf16 at head
// size 128 only, each over a cache of the compute type; everything else runs the default (an FP8
// cache runs fp8_pipeline whatever the variant asks; the fold bit is honoured everywhere). kAuto
// runs the default here: launch_decode resolves it before calling this, and the planner's queries
// (occupancy, bytes in flight) see w4s3, which is what auto_pipeline keeps wherever the split
// count matters.
template <typename T, int D, int KV = 0> constexpr bool has_w4s2() {
  return KV == 0 && D == 128 && (std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>);
}
template <typename T, int D, int KV = 0, typename F> cudaError_t with_variant(int variant, F&& f) {
  if constexpr (KV != 0) {
    constexpr Fp8Pipe pipe = fp8_pipeline<D>();
    return f(pa::HeadDim<pipe.warps>{}, pa::HeadDim<pipe.stages>{}, pa::HeadDim<pipe.groups>{});
  } else {
    if constexpr (has_w4s2<T, D, KV>()) {
      if ((variant & 0xff) == kW4S2) return f(pa::HeadDim<4>{}, pa::HeadDim<2>{}, pa::HeadDim<1>{});
    }
    if constexpr (D == 128 && std::is_same_v<T, __nv_bfloat16>) {
      switch (variant & 0xff) {
        case kW4S4:
          return f(pa::HeadDim<4>{}, pa::HeadDim<4>{}, pa::HeadDim<1>{});
        case kW2S6:
          return f(pa::HeadDim<2>{}, pa::HeadDim<6>{}, pa::HeadDim<1>{});
        case kW2S4:
          return f(pa::HeadDim<2>{}, pa::HeadDim<4>{}, pa::HeadDim<1>{});
        default:
          break;
      }
    }
    return f(pa::HeadDim<4>{}, pa::HeadDim<default_stages<D>()>{}, pa::HeadDim<1>{});
  }
}

// The pipeline kAuto runs for a grid of `blocks` decode blocks (all splits) of this type, head
// size and cache: w4s2 where it has more resident blocks per SM than w4s3 (3 against 2 at head
// 128 on H100 / H200: 228 KB of shared memory) and the grid fills at least kAutoWaves full waves
// of them, else w4s3. Measured on two H100s (bench_decode_variants, nineteenth session): on b256 x
// 1024 (2048 blocks, 5.2 waves of 396) w4s2 read 4% and 2.6% faster (on the H200 in the twelfth
// session 6%); on MHA b32 x 4096 (2.6 waves) 2% faster on one and 4% slower on the other; on b64 x
// 4096 (1.3 waves) 7% and 5% slower, where the SMs that get one more block than the others run it
// alone with one tile in flight, below an SM's share of the bandwidth (w4s3 runs its blocks two at
// a time with two tiles in flight each). Grids of four waves have one split in every plan (a split
// only adds waves there), so the planner's w4s3 figures stay right. The batch-invariant mode keeps
// w4s3: its output must not depend on the batch, and the batch decides the grid. The smallest grid
// that takes w4s2 is worked out once per device (the SM count and both pipelines' occupancies).
constexpr int kAutoWaves = 4;
template <typename T, int D, int KV> int auto_pipeline(int64_t blocks, int split_keys) {
  if constexpr (has_w4s2<T, D, KV>()) {
    if (split_keys > 0) return kW4S3;
    // Per device: the smallest grid that runs w4s2 (INT64_MAX: none); 0 = not worked out yet.
    static std::atomic<int64_t> least_blocks[64] = {};
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return kW4S3;
    int64_t least = (dev >= 0 && dev < 64) ? least_blocks[dev].load(std::memory_order_relaxed) : 0;
    if (least == 0) {
      int sms = 0;
      if (pa::sm_count(&sms) != cudaSuccess) return kW4S3;
      int32_t r2 = 0, r3 = 0;
      auto resident = [](int variant, int32_t* r) {
        return with_variant<T, D, KV>(variant, [&](auto w, auto ns, auto kg) -> cudaError_t {
          constexpr int W = decltype(w)::value, S = decltype(ns)::value, G = decltype(kg)::value;
          return instance_blocks_per_sm(DecodeCfg<D, W, S, KV, G>{}, decode_split_kernel<T, D, W, S, KV, G>, r);
        });
      };
      if (resident(kW4S2, &r2) != cudaSuccess || resident(kW4S3, &r3) != cudaSuccess) {
        cudaGetLastError();  // a failed query is not the launch's error: run the default
        return kW4S3;
      }
      least = r2 > r3 ? int64_t{kAutoWaves} * r2 * sms : INT64_MAX;
      if (dev >= 0 && dev < 64) least_blocks[dev].store(least, std::memory_order_relaxed);
    }
    if (blocks >= least) return kW4S2;
  } else {
    (void)blocks;
    (void)split_keys;
  }
  return kW4S3;
}

template <typename T, int D, int KV>
cudaError_t launch_decode(const PaAttnArgs& a, const KernelParams& kp, cudaStream_t stream) {
  const int G = a.num_heads / a.num_kv_heads;
  if (G > kDecodeMaxGroup) return cudaErrorNotSupported;
  const int n = a.req_end - a.req_begin;
  if (n == 0) return cudaSuccess;
  const int S = a.num_splits;
  if (S < 1 || S > 65535) return cudaErrorInvalidValue;
  if (a.split_keys < 0 || a.split_keys % kSplitGranule != 0) return cudaErrorInvalidValue;
  if (a.decode_variant < 0 || (a.decode_variant & 0xff) >= kNumVariants ||
      (a.decode_variant & ~(0xff | kFoldBit | kGroupMergeOffBit)) != 0) {
    return cudaErrorInvalidValue;
  }
  if (S > 1) {
    const int64_t need = decode_workspace_need(S, n, a.num_heads, D);
    if (a.workspace == nullptr || a.workspace_len < need) return cudaErrorInvalidValue;
  }
  const bool fold = (a.decode_variant & kFoldBit) != 0;
  const bool group = (a.decode_variant & kGroupMergeOffBit) == 0;
  int variant = a.decode_variant & 0xff;
  if (variant == kAuto) {
    variant = auto_pipeline<T, D, KV>(decode_blocks_per_split(a) * S, a.split_keys);
  }
  return with_variant<T, D, KV>(variant, [&](auto w, auto ns, auto kg) -> cudaError_t {
    return launch_decode_cfg<T, D, decltype(w)::value, decltype(ns)::value, KV, decltype(kg)::value>(a, kp, fold, group,
                                                                                                     stream);
  });
}

}  // namespace

// The largest GQA group (num_heads / num_kv_heads) the decode kernel takes for a head size (groups
// above 16 run as several row chunks); 0 when the head size is not supported.
PA_EXPORT int32_t pa_paged_decode_max_group(int32_t head_size) {
  return pa::head_size_supported(head_size) ? kDecodeMaxGroup : 0;
}

// Keys per tile of the decode kernel for a head size (the split granularity); 0 if unsupported.
PA_EXPORT int32_t pa_paged_decode_tile_keys(int32_t head_size) {
  if (!pa::head_size_supported(head_size)) return 0;
  return kSplitGranule;  // the same for every head size and variant
}

// Query heads of one GQA group one decode block computes (larger groups take several blocks); 0 if
// the head size is unsupported.
PA_EXPORT int32_t pa_paged_decode_heads_per_block(int32_t head_size) {
  if (!pa::head_size_supported(head_size)) return 0;
  return DecodeCfg<64>::kRows;  // the same for every head size
}

// Calls f(Cfg{}, kernel) for the decode instantiation that pa_paged_decode runs for (head size,
// dtype, KV-cache kind, variant); cudaErrorInvalidValue for arguments it would refuse.
template <typename F>
cudaError_t with_decode_instance(int32_t head_size, int32_t dtype, int32_t kv_dtype, int32_t variant, F&& f) {
  if (dtype != 0 && dtype != 1) return cudaErrorInvalidValue;
  if (kv_dtype < 0 || kv_dtype > 2) return cudaErrorInvalidValue;
  if (variant < 0 || (variant & 0xff) >= kNumVariants) return cudaErrorInvalidValue;
  return pa::dispatch_head_size(head_size, [&](auto tag) -> cudaError_t {
    constexpr int D = decltype(tag)::value;
    auto one = [&](auto t, auto kv) -> cudaError_t {
      using T = decltype(t);
      constexpr int KV = decltype(kv)::value;
      return with_variant<T, D, KV>(variant, [&](auto w, auto ns, auto kg) -> cudaError_t {
        constexpr int W = decltype(w)::value, S = decltype(ns)::value, G = decltype(kg)::value;
        return f(DecodeCfg<D, W, S, KV, G>{}, decode_split_kernel<T, D, W, S, KV, G>);
      });
    };
    using K0 = pa::HeadDim<pa::fp8::kSame>;
    using K1 = pa::HeadDim<pa::fp8::kE4M3>;
    using K2 = pa::HeadDim<pa::fp8::kE5M2>;
    if (dtype == 0) {
      return kv_dtype == 0 ? one(__half{}, K0{}) : kv_dtype == 1 ? one(__half{}, K1{}) : one(__half{}, K2{});
    }
    return kv_dtype == 0   ? one(__nv_bfloat16{}, K0{})
           : kv_dtype == 1 ? one(__nv_bfloat16{}, K1{})
                           : one(__nv_bfloat16{}, K2{});
  });
}

// Resident blocks per SM of the decode kernel for (head size, dtype, KV-cache kind) on the current
// device, as the runtime's occupancy calculator reports it for the instantiation and dynamic
// shared memory that pa_paged_decode launches. Needs a current CUDA context; writes *blocks only
// on success.
PA_EXPORT cudaError_t pa_paged_decode_blocks_per_sm_kv(int32_t head_size, int32_t dtype, int32_t kv_dtype,
                                                       int32_t variant, int32_t* blocks) {
  if (blocks == nullptr) return cudaErrorInvalidValue;
  return with_decode_instance(head_size, dtype, kv_dtype, variant, [&](auto cfg, auto kernel) -> cudaError_t {
    return instance_blocks_per_sm(cfg, kernel, blocks);
  });
}

// K/V bytes one decode block keeps in flight: the tiles of every pipeline stage but the one being
// computed, K and V, at the cache's element size. The split planner divides the bytes an SM needs
// in flight to reach its share of the memory bandwidth by this. No CUDA context needed; writes
// *bytes only on success.
PA_EXPORT cudaError_t pa_paged_decode_bytes_in_flight(int32_t head_size, int32_t dtype, int32_t kv_dtype,
                                                      int32_t variant, int64_t* bytes) {
  if (bytes == nullptr) return cudaErrorInvalidValue;
  return with_decode_instance(head_size, dtype, kv_dtype, variant, [&](auto cfg, auto) -> cudaError_t {
    using Cfg = decltype(cfg);
    const int64_t elem = Cfg::kFp8 ? 1 : 2;
    *bytes = int64_t{2} * (Cfg::kStages - 1) * Cfg::kTK * head_size * elem;
    return cudaSuccess;
  });
}

// The pipeline (a DecodeVariant code without the fold bit) that pa_paged_decode runs for the auto
// variant on the current device, for a grid of `blocks` decode blocks (requests x kv heads x row
// chunks x splits) and `split_keys` (batch-invariant mode when positive); other variants run as
// named. Needs a current CUDA context; writes *pipeline only on success.
PA_EXPORT cudaError_t pa_paged_decode_auto_pipeline(int32_t head_size, int32_t dtype, int32_t kv_dtype, int64_t blocks,
                                                    int32_t split_keys, int32_t* pipeline) {
  if (pipeline == nullptr || blocks < 0 || split_keys < 0) return cudaErrorInvalidValue;
  if (dtype != 0 && dtype != 1) return cudaErrorInvalidValue;
  if (kv_dtype < 0 || kv_dtype > 2) return cudaErrorInvalidValue;
  return pa::dispatch_head_size(head_size, [&](auto tag) -> cudaError_t {
    constexpr int D = decltype(tag)::value;
    // Only a cache of the compute type has a choice; FP8 caches run their own pipeline.
    if (kv_dtype != pa::fp8::kSame) {
      *pipeline = kW4S3;
    } else {
      *pipeline = dtype == 0 ? auto_pipeline<__half, D, pa::fp8::kSame>(blocks, split_keys)
                             : auto_pipeline<__nv_bfloat16, D, pa::fp8::kSame>(blocks, split_keys);
    }
    return cudaSuccess;
  });
}

// pa_paged_decode_blocks_per_sm_kv for a cache of the compute type.
PA_EXPORT cudaError_t pa_paged_decode_blocks_per_sm(int32_t head_size, int32_t dtype, int32_t variant,
                                                    int32_t* blocks) {
  return pa_paged_decode_blocks_per_sm_kv(head_size, dtype, pa::fp8::kSame, variant, blocks);
}

// Counter slots at the front of the decode workspace (see kDecodeCounters).
PA_EXPORT int32_t pa_paged_decode_counter_slots() { return kDecodeCounters; }

// The per-block timeline of the last decode launch on the current device (see TraceMark): the
// count of blocks a build records written to `*built_blocks` (0 when the library was built
// without the trace), then, for max_blocks > 0, up to `max_blocks` records of kTraceWords words
// copied to `host` after a device synchronisation (a probe with max_blocks = 0 does not wait).
PA_EXPORT cudaError_t pa_decode_trace_read(uint64_t* host, int32_t max_blocks, int32_t* built_blocks) {
#ifdef PA_DECODE_TRACE
  *built_blocks = kTraceBlocks;
  return pa::read_trace_records(host, max_blocks, kTraceBlocks, kTraceWords, g_decode_trace);
#else
  (void)host;
  (void)max_blocks;
  *built_blocks = 0;
  return cudaSuccess;
#endif
}

// Decode attention for requests [req_begin, req_end), each with exactly one query token.
// With num_splits > 1, `workspace` must hold kDecodeCounters + num_splits * n * num_heads *
// (head_size + 2) floats, its first kDecodeCounters zero before the first launch (kept zero after).
PA_EXPORT cudaError_t pa_paged_decode(const PaAttnArgs* args, cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const PaAttnArgs& a = *args;
  cudaError_t err = pa::check_args(a);
  if (err != cudaSuccess) return err;
  pa::KernelParams kp;
  if (!pa::make_kernel_params(a, kp)) return cudaErrorNotSupported;
  // FP8 caches move 16 one-byte elements per copy: block strides in whole 16-byte units.
  if (a.kv_dtype != pa::fp8::kSame && a.kv_block_stride % 16 != 0) return cudaErrorMisalignedAddress;
  return pa::dispatch_head_size(a.head_size, [&](auto tag) -> cudaError_t {
    constexpr int D = decltype(tag)::value;
    switch (a.kv_dtype) {
      case pa::fp8::kE4M3:
        return a.dtype == 0 ? launch_decode<__half, D, pa::fp8::kE4M3>(a, kp, stream)
                            : launch_decode<__nv_bfloat16, D, pa::fp8::kE4M3>(a, kp, stream);
      case pa::fp8::kE5M2:
        return a.dtype == 0 ? launch_decode<__half, D, pa::fp8::kE5M2>(a, kp, stream)
                            : launch_decode<__nv_bfloat16, D, pa::fp8::kE5M2>(a, kp, stream);
      default:
        return a.dtype == 0 ? launch_decode<__half, D, pa::fp8::kSame>(a, kp, stream)
                            : launch_decode<__nv_bfloat16, D, pa::fp8::kSame>(a, kp, stream);
    }
  });
}
