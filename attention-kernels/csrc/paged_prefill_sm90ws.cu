// Paged prefill on Hopper (sm_90a), warp-specialised: one warpgroup gathers K/V pages, two
// warpgroups (three at head 64) run the matrix products, and neither waits for the other except
// through shared-memory barriers. The default prefill at head sizes 64 and 128 over a 16-bit cache
// (the Rust launcher's Auto path; PAGED_ATTN_PREFILL=sm90ws forces it for FP8 caches too);
// paged_prefill_sm90.cu (every thread loads, then computes, in lockstep) stays the default for FP8
// caches, where it measured faster.
//
// Why: in the lockstep kernel the tensor cores idle during every load wait, every softmax and every
// block-wide barrier. Here the loads run on their own warps, each consumer warpgroup overlaps its
// own softmax with its next QK^T, and the consumers take turns on the tensor cores so that one
// group's softmax runs while another's products do.
//
// Block: one producer warpgroup and two consumer warpgroups (384 threads; three, 512 threads, at
// head 64 unless built with PA_WS_HEAD64_CONSUMERS = 2, below), one block per SM (shared memory
// and registers). A work item is 64 query rows per consumer of one request and one query head
// (BM = 128; 192 with three consumers); keys come in tiles of BN = 128.
//
// Persistent grid: one block per SM, each taking one item per round of the heaviest-first order:
// block b takes item k * gridDim.x + b of round k, or, in the zig-zag order (the Rust launcher's
// default, PaAttnArgs::prefill_order = 1), k * gridDim.x + gridDim.x - 1 - b in odd rounds. In the
// strided order block 0 takes the heaviest item of every round; over the rounds of a causal request
// (items one key tile lighter per row block) the first blocks gather a surplus of up to a tile per
// round and the launch ends waiting for them. The zig-zag pairs each round's heaviest item with the
// next round's lightest: +12% on causal 1 x 2048, +9% on 1 x 4096, +5% on 2 x 1024, within 2%
// elsewhere (H100, docs/PERFORMANCE.md, sixteenth session). A block per item (the first
// version) paid every item's pipeline fill -- the Q load, then the first K tile's latency with
// nothing to overlap it -- and its epilogue with the tensor cores idle, and with one block per SM
// no other block filled those gaps. Now the
// producer moves on to the next item once it has issued the last V copy of the current one (and,
// when that tile straddles a mask bound, sanitised it: see "Unseen non-finite V" below) and loads
// the next Q and K tiles while the consumers still run the last PV product and write their rows.
// Over a 16-bit cache Q has two buffers, item i's in buffer i % 2, so the next item's Q waits only
// for the item before the current one to release its buffer (q_empty), not for the current item's
// last QK^T; an FP8 cache keeps one buffer (its staging buffers take that space). (Streaming tiles
// across items instead, one stream of K and V tiles with no item boundary in the producer,
// measured 3-9% slower: docs/PERFORMANCE.md, ninth session.) All stage indices, barrier phases and
// offset-ring slots follow the block's running count of key tiles (g), so the pipelines carry
// over from item to item without a reset; q_full / q_empty of buffer b alternate their phase per
// item that uses it. The turn alternation of the consumers simply continues.
//
// Tile order (16-bit caches): each item's key tiles are walked last first, as FlashAttention-3
// does. A causal item's last tile is its diagonal, the one tile that straddles the mask and whose
// V the producer sanitises; walked first, the products of the tiles after it hide that wait, and
// the item ends on an unmasked tile, so the producer turns to the next item without waiting for
// copies to land. The consumers see their rows' run of tiles mirrored; nothing else changes (the
// online softmax does not care about key order). FP8 caches keep the ascending order.
//
// Warpgroup 0, the producer (72 registers after `setmaxnreg.dec` over a 16-bit cache, 56 over FP8,
// 32 beside three consumers; with 40 beside two, ptxas spilled the item loop's state inside the
// tile loop): loads the item's Q tile, then walks its key tiles. Q is the one operand that is not
// paged, a dense [tokens][heads][D] tensor, so over a 16-bit cache one producer thread loads it
// with a bulk tensor copy (TMA) per 64-column panel, counted on the buffer's full barrier by its
// bytes, while the other 127 start on the item's first K tile at once. When every thread issued 16
// cp.async of Q (8 at head 64) first, those took 2.1 us of the producer's time at each item
// boundary and the consumers waited for the next item's first K tile behind them; Q by TMA measured
// +7% on causal 8 x 2048, +13% on 32 x 512, +5-7% on 2 x 1024 and 4 x 1024, -1 to -5% on 1 x 8192
// and 2 x 8192 (H100, docs/PERFORMANCE.md, twenty-seventh session). FP8 caches, and query views
// whose heads are not adjacent in a token's row, keep the threads' copies. Each producer thread
// copies one 16-byte column of RT consecutive key rows of every tile (RT = 16 at head 128, 8 at
// head 64): when RT divides the block size those rows lie in one page, so the thread reads one
// block-table entry per tile (a tile ahead, into a register) and steps through the page by the
// token stride, with no shared memory and no barrier between producer threads. Over a 16-bit cache
// the thread carries its rows' page index and row in the page from tile to tile (tiles are BN keys
// apart) instead of dividing by the block size for each tile: the producer's address arithmetic was
// on the critical path (measured, docs/PERFORMANCE.md, twelfth session).
// (The first version had one thread per key row write its row's offset to a ring in shared memory
// for the others to read after a producer barrier; Nsight Compute showed every copy waiting on its
// offset's shared-memory load, and the consumers waiting on FULL barriers for 16% of their time.
// Block sizes RT does not divide still take that form.) Each thread then arrives on the stage's
// FULL barrier with `cp.async.mbarrier.arrive.noinc` (count 128: one arrival per producer thread,
// each fired when that thread's copies have landed). K and V have separate stages and barriers.
// The grouped gather issues K(n), V(n), K(n+1), ...: with SV = 3 > SK = 2 (6 > 4 at head 64),
// V(n)'s stage frees (every consumer's PV(n - SV) done) before K(n+1)'s (their S(n - SK + 1)), so
// V(n) first never holds K(n+1) back and V lands a tile earlier than behind K(n+1) (the
// consumers' FULL_V wait was 4.9% of their steady-state loop's samples; +1-2% on most causal
// shapes, docs/PERFORMANCE.md, twenty-first session). Where V(n) must be sanitised (below), its
// wait for the copies to land comes before K(n+1) is issued: issuing K(n+1) first, so that its
// latency overlapped V(n)'s, measured slower. The offset-ring form (two V stages) keeps K(n+1)
// before V(n). Before overwriting a stage the producer waits on its EMPTY barrier (count 128 per
// consumer warpgroup: every consumer thread arrives once per use).
// K and V do not use TMA: a tile spans several pages at arbitrary places and the cache row stride
// is not one a tensor map could describe cheaply per page; cp.async gathers any layout (FlashInfer's
// Hopper paged prefill does the same; a box per page measured 4-11% slower at block size 16,
// docs/PERFORMANCE.md, fifteenth session).
//
// Warpgroups 1.., the consumers (two at head 128: 216 registers after `setmaxnreg.inc`, 224 with
// an FP8 cache; three at head 64: 160), own 64 query rows each.
// Per key tile n, a consumer (all go through every tile in the same order, see "skipped tiles"):
//   wait FULL_K(n); [turn] issue S(n) = Q K(n)^T; wait FULL_V(n-1); rescale O by the factor
//   of tile n-1's softmax, issue O += P(n-1) V(n-1); [hand the turn over]; wait for S(n) only
//   (wgmma.wait_group 1 while the PV product still runs); release K(n); mask + softmax of
//   S(n) in place; wait for the PV product; release V(n-1); pack P(n) to 16-bit pairs.
// So the exponentials of tile n overlap the PV product of tile n-1 inside one warpgroup (ptxas
// undid this until the wait after the softmax was pinned: see the steady-state loop). [turn]
// is a named barrier per consumer (`bar.sync 1 + c, 256` waits for the previous consumer's
// `bar.arrive`): consumer 0 gets the first turn, and each consumer hands the turn to the next (the
// last to consumer 0) right after issuing its two products, so their issue phases take turns and
// one group's softmax runs while another's products fill the tensor cores (FlashAttention-3's
// "ping-pong"). Every consumer takes exactly one turn per tile; consumer 0 takes one extra sync at
// the end to consume the last hand-over, so no named barrier is left half-arrived when the block
// exits.
//
// Skipped tiles: a consumer whose rows see no key of a tile issues no product for it, but still
// waits on the tile's FULL barriers, arrives on its EMPTY barriers and takes its turn. Waiting
// on FULL before releasing keeps each barrier's phase in step with the producer (a release without
// the wait could complete an EMPTY phase while copies of that stage are still in flight); taking
// the turn keeps the alternation balanced. The producer only waits for stages it is about to reuse,
// and every stage it fills is one every consumer will wait on and release. The tiles a consumer
// does see form one contiguous run (its rows' key interval), so its loop is: skip the tiles before
// the run, the run itself with the first (S only) and last (PV only) tiles peeled off so that
// every wgmma inside the steady-state loop is unconditional (conditional issue makes ptxas
// serialise the wgmma pipeline), then skip the tiles after it.
//
// Barrier phases: K and V are two pipelines with their own stage counts, SK and SV (see "Shared
// memory"), and no barrier in common. Stage s of the K pipeline serves K tiles s, s + SK,
// s + 2 SK...; use k = tile / SK waits FULL_K(tile % SK) with parity k & 1, and the producer waits
// EMPTY_K with parity (k - 1) & 1 before use k >= 1 (a fresh stage needs no wait). The V pipeline
// is the same with SV: stage tile % SV, use tile / SV. Before exiting, the producer waits for the
// release of the last V tile (stage (n_tiles - 1) % SV, parity ((n_tiles - 1) / SV) & 1), which
// comes after every other release, so no copy or barrier arrival of this block is still pending
// when its warps retire.
//
// Hang guard: the producer's waits trap after 30 s (see mbar_wait_guarded), so a protocol error
// shows up as a failed launch instead of a hung process.
//
// Proxies: cp.async writes shared memory through the generic proxy and wgmma reads it through the
// async proxy, so each consumer thread executes `fence.proxy.async` after every FULL wait.
//
// Masks and features are the lockstep kernel's, computed the same way (identical arithmetic, so
// the two Hopper kernels agree to rounding of the same operations): the key range of the block is
// cut by the causal / window bounds and only its tiles are loaded; a consumer skips tiles none of
// its rows sees; a tile straddling a bound of its rows gets -inf at the hidden keys (two compares
// per element against each row's visible interval, attention/scores.cuh), and only soft-cap /
// ALiBi take the element-wise exact-score pass; sinks and LSE in the epilogue; GQA through the KV
// head of the query head. Unseen non-finite V: on a tile that straddles a mask bound of any row of
// the block the PRODUCER zeroes every non-finite V element in shared memory, records the keys that
// had one in a per-V-stage bit set, and arrives on FULL_V with a plain release arrive instead of
// the cp.async one; a consumer row that can see such a key outputs NaN (same rule as
// paged_prefill_sm90.cu's header). With the grouped gather each producer thread waits for its own
// copies only and checks what it copied (a warp's groups cover one 32-key word of the bit set,
// written whole: no barrier, no atomics); the offset-ring form waits for every producer thread's
// copies (cp.async.wait_all + a producer barrier) and scans the whole tile.
//
// Shared memory (BN = 128): NQ Q buffers of BM x D (two over a 16-bit cache), then SK stages of K
// and SV of V, BN x D each, as 64-column swizzled panels, then the barriers, the row-offset ring
// (3 x BN int64; only where the block size needs it, below), a BN-bit set of sanitised keys per V
// stage and a float per consumer thread that pins a wait (see the steady-state loop).
// Head 128 over a 16-bit cache, block sizes RT = 16 divides (the grouped gather, no ring): SK = 2,
// SV = 3, 2 x 32 KB + 2 x 32 KB + 3 x 32 KB = 224 KB of tiles, about 226 KB with the rest and the
// 1 KB alignment slack; other block sizes keep the ring in the third V stage's place (SV = 2). Head
// 64 over a 16-bit cache: SK = 4, SV = 6. The deeper V pipelines measured +2% to +7% on causal
// shapes (H100, fifteenth session, docs/PERFORMANCE.md): with the tiles walked last first, V's
// slack behind QK^T no longer covered the gather's latency on every tile.
// Before that, with SK = SV = 2 at head 128 (192 KB of tiles): the second Q buffer
// took the place of a third K stage, which an earlier version had (next paragraph). They were not
// measured apart: the variant with the second Q buffer and the last-first order but the old
// producer ran as fast as the three-stage kernel (twelfth session, variant 5).
// With SK = SV = 2 (the first version) Nsight Compute
// on an H200 (causal, 8 requests x 2048 tokens) showed the consumer warpgroups stalled on their
// FULL_K and FULL_V waits (about 14% of their stall samples) while the producer waited on EMPTY
// barriers, which looked like a pipeline too shallow for the gather's latency. Three stages of
// both do not fit in 227 KB, so K got the third stage (every consumer step starts with a FULL_K
// wait; its FULL_V wait has the QK^T product as slack). Measured: no
// change (229 / 330 TFLOP/s on causal 8 x 2048 / 2 x 8192 against 230 / 332 with two stages), so
// depth was not what the consumers waited for (docs/PERFORMANCE.md, fourth H200 session). Head
// 64 had SK = SV = 4 then, 160 KB of tiles (a tile of head 64 is half the compute, so twice the
// depth covers the same latency).
//
// Epilogue (16-bit caches): once a consumer's last PV product has completed, its 64 output rows
// pass through its own rows of the item's Q buffer (no wgmma reads Q any more; the buffer is
// released to the producer only after them), laid out as Q's swizzled panels so that the
// fragment-ordered 4-byte stores of a warp hit 32 distinct banks, and leave as 16-byte stores of
// whole rows: one warp instruction writes two full 256-byte rows at head 128 (four of 128 at head
// 64) instead of 16 bytes in each of 8 rows. Measured +8% on causal 8 x 2048 and +7-11% on items
// of 512-1024 rows (H100); with the deeper V pipelines +13% and +9-19%. An FP8 cache's single Q
// buffer keeps the direct stores.
// A warpgroup's 64 staged rows, when all of them belong to the item, leave by bulk tensor stores
// instead: the launcher encodes the output as a [tokens][heads][D] tensor map whose 64-row x
// 64-column boxes with the 128-byte swizzle are exactly a staged panel, and one thread issues a
// store per panel and waits only for the engine's reads of shared memory before the buffer's
// release. The threads' own 16-byte stores took 0.9 us per item at head 128, queued behind the
// producer's copies in the SM's memory pipeline (docs/PERFORMANCE.md, twenty-second session);
// the bulk stores measured +1 to +2.7% over every causal shape (twenty-third session). A
// request's last, partial row block, and an output whose address or token stride is not a 16-byte
// multiple or whose heads are not adjacent in a token's row (no map), keep the threads' stores: a
// box never reaches rows outside the item. The map is a by-value kernel argument encoded at each
// launch, so a captured CUDA graph holds it.
//
// FP8 caches (E4M3 / E5M2; one instantiation per compute type for both, the format a block-uniform
// branch): the producer copies each tile's raw bytes (half the traffic) into one staging buffer for
// K and one for V while the consumers work, and at its next step widens them exactly into the
// swizzled compute stages (attention/fp8_tile.cuh), sanitising V on mask-straddling tiles as it
// goes, then arrives on FULL with a plain release arrive (see produce_fp8). The consumers are
// unchanged but for the scales: k_scale joins the score scale, v_scale multiplies the output. The
// staging buffers cost the third K stage at head 128 (2 + 2 stages, 192 KB of tiles and staging).
// Measured on the H200 before the grid was persistent (causal 8 x 2048, head 128): 1.52 / 1.55 ms
// (E4M3 / E5M2) against 1.40 / 1.41 on the
// lockstep kernel, so the Rust launcher's Auto path keeps FP8 caches there: one warpgroup widening
// every tile, a step behind its own copies, is the critical path (PAGED_ATTN_PREFILL=sm90ws
// selects this one).
//
// Not on this path (the Rust launcher runs paged_prefill.cu instead): head sizes other than 64 and
// 128. Device code exists only in the sm_90a image, and the launcher refuses devices that are not
// compute capability 9.0.

#include <algorithm>
#include <climits>

#include <cuda.h>  // CUtensorMap (a type only: the encoder comes through the runtime's driver entry point)
#include <cudaTypedefs.h>

#include "attention/common.cuh"
#include "attention/fp8_tile.cuh"
#include "attention/scores.cuh"
#include "attention/softmax_state.cuh"
#include "attention/wgmma_sm90.cuh"

// Consumer warpgroups at head 64: 3 (the default; +5.7% on causal 8 x 2048 at head 64, +4.6% on
// 2 x 8192, +2.4% on the chunked q512 on 7.5k x 4, within 1.5% on short requests: H100,
// docs/PERFORMANCE.md, twenty-sixth session) or 2, built with PAGED_ATTN_WS_HEAD64_CONSUMERS=2 set,
// for comparison. The host side plans with the same item rows (ws_item_rows in ws_order.rs).
#ifndef PA_WS_HEAD64_CONSUMERS
#define PA_WS_HEAD64_CONSUMERS 3
#endif
static_assert(PA_WS_HEAD64_CONSUMERS == 2 || PA_WS_HEAD64_CONSUMERS == 3, "two or three consumers at head 64");

namespace {

using pa::global_ns;
using pa::KernelParams;

// Named barrier ids (0 is __syncthreads): the consumers' turns from kBarTurn0 (one per consumer),
// then the producer's own and the staged epilogue's (one per consumer): WsCfg::kBarProducer,
// WsCfg::kBarEpi0.
constexpr int kBarTurn0 = 1;

// kGrouped: the launcher sends only block sizes the grouped gather serves (RT divides them), so
// at head 128 over a 16-bit cache the offset ring's room goes to a third V stage (see "Shared
// memory" in the header). Other block sizes run the configuration with the ring.
template <int D, bool kFp8 = false, bool kGrouped = false> struct WsCfg {
  // The ring-less third V stage (head 128, 16-bit cache, grouped block sizes only).
  static constexpr bool kRing = !(kGrouped && !kFp8 && D > 64);
  // The epilogue stages each consumer's output rows in its own rows of the item's Q buffer and
  // stores them as 16-byte row chunks (16-bit caches; the FP8 path keeps direct stores).
  static constexpr bool kStageO = !kFp8;
  // Head 64 (unless built with PA_WS_HEAD64_CONSUMERS = 2, see above): three consumer warpgroups
  // (192-row items), so that two of them keep the tensor cores busy while the third runs its
  // softmax (a head-64 tile has half the products of a head-128 one per exponential). Otherwise two.
  static constexpr int kConsumers = D <= 64 ? PA_WS_HEAD64_CONSUMERS : 2;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kBarProducer = kBarTurn0 + kConsumers;
  static constexpr int kBarEpi0 = kBarProducer + 1;
  static_assert(kBarEpi0 + kConsumers <= 16, "named barriers");
  static constexpr int kBM = 64 * kConsumers;
  static constexpr int kBN = 128;
  // K and V stage counts (see "Shared memory" in the header: at head 128 a 16-bit cache spends the
  // room of a third stage on a second Q buffer, an FP8 cache on its staging buffers).
  static constexpr int kStagesK = D <= 64 ? 4 : 2;
  static constexpr int kStagesV = D <= 64 ? (kFp8 ? 4 : 6) : (kRing ? 2 : 3);
  static constexpr int kChunks = D / 8;  // 16-byte units per row
  // Key rows per producer thread in the grouped gather (RT); the launcher picks kGrouped by it.
  static constexpr int kGroupRows = kBN * kChunks / 128;
  static constexpr int kQBytes = kBM * D * 2;
  // Q buffers: two over a 16-bit cache, so the next item's Q loads while the current item's
  // rows still use theirs; one with an FP8 cache, whose staging buffers take that space.
  static constexpr int kQBufs = kFp8 ? 1 : 2;
  static constexpr int kTileBytes = kBN * D * 2;
  static constexpr int kStageBytes8 = kFp8 ? kBN * D : 0;  // one staged FP8 K or V tile, [BN][D] bytes
  static constexpr int kBadWords = kBN / 32;
  // Register split, at most the launch allocation (65536 registers over kThreads, in steps of 8).
  // Two consumers: 128 x 72 + 256 x 216 (16-bit cache) or 128 x 56 + 256 x 224 (FP8) = 64512 =
  // 384 x 168. The producer keeps the persistent item loop's state, and over a 16-bit cache the
  // carried page cursors of K and V, without spilling inside its tile loop (with an FP8 cache: 16
  // live values per widened 16-byte vector); the consumers do not spill at 216. Three consumers
  // (head 64): 128 x 32 + 384 x 160 = 65536 = 512 x 128, FlashAttention-3's split for three MMA
  // warpgroups; at 152 (with a 56-register producer) ptxas serialised every wgmma for want of
  // registers (warning C7512), and at 32 the producer reloads a few spilled values per tile.
  static constexpr int kLaunchRegs = (65536 / kThreads) / 8 * 8;
  static constexpr int kProducerRegs = kConsumers == 3 ? 32 : (kFp8 ? 56 : 72);
  static constexpr int kConsumerRegs = kConsumers == 3 ? 160 : (kFp8 ? 224 : 216);
  static_assert(128 * kProducerRegs + 128 * kConsumers * kConsumerRegs == kThreads * kLaunchRegs, "register split");
  // Byte offsets from the 1024-aligned base.
  static constexpr int kOffK = kQBufs * kQBytes;
  static constexpr int kOffV = kOffK + kStagesK * kTileBytes;
  static constexpr int kOffStg = kOffV + kStagesV * kTileBytes;  // FP8 only: staged K, then V
  // full_k, full_v, empty_k, empty_v, q_full, q_empty
  static constexpr int kOffBar = kOffStg + 2 * kStageBytes8;
  static constexpr int kNumBars = 2 * kStagesK + 2 * kStagesV + 2 * kQBufs;
  static constexpr int kOffRo = kOffBar + kNumBars * 8;  // int64 row offsets, ring of 3 tiles
  // Non-finite-V key bits per V stage, after the ring where there is one.
  static constexpr int kOffBad = kOffRo + (kRing ? 3 * kBN * 8 : 0);
  static constexpr int kAlignSlack = 1024;
  static constexpr int kOffPin = kOffBad + kStagesV * kBadWords * 4;  // a float per consumer thread
  static constexpr size_t kSmemBytes = size_t(kAlignSlack) + kOffPin + 128 * kConsumers * 4;
  static_assert(kStagesK >= 1 && kStagesV >= 1, "each pipeline needs a stage");
  static_assert(D % 64 == 0, "tiles are stored as 64-column swizzled panels");
  static_assert(kBN <= 128, "one producer thread computes one key row's offset");
  static_assert((kBN * kChunks) % 128 == 0, "producer copies divide evenly");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block");
};

// Per-item timeline (a diagnostic build: PAGED_ATTN_PREFILL_TRACE=1 at build time defines
// PA_PREFILL_TRACE; otherwise every mark compiles to nothing and the kernel is unchanged). For the
// first kPtRounds rounds of each of the first kPtBlocks blocks of a launch, the producer's thread 0
// and each consumer warpgroup's thread 0 write the global timer (ns) at the marks below into one
// record per round; pa_prefill_trace_read copies the last launch's records to the host. Why: an
// item costs about 4.3 us beyond its key tiles at head 128 (attention-backend's prefill_cycles,
// 22% of causal 8 x 2048), and neither the bench nor a profiler's per-range samples say which
// role waits for which at an item boundary (docs/PERFORMANCE.md, twenty-first session).
enum PrefillTraceWord : int {
  kPtItem = 0,       // the round's item id (producer; -1: the block had no round left)
  kPtTiles = 1,      // its key tiles
  kPtSm = 2,         // the SM the block runs on
  kPtProdStart = 3,  // producer: item decoded
  kPtProdQ = 4,      // producer: Q's copies issued (after waiting for its buffer)
  kPtProdK0 = 5,     // producer: the first K tile's copies issued
  kPtProdEnd = 6,    // producer: the item's last V issued (and sanitised where needed)
  kPtCons = 7,       // consumer c's marks start at kPtCons + kPtConsWords * c (PrefillConsMark)
  kPtConsWords = 11,
  kPtWords = 40,  // room for three consumers; a kernel with two leaves the third's words zero
};
static_assert(kPtWords == kPtCons + 3 * kPtConsWords, "a record holds three consumers' marks");
enum PrefillConsMark : int {
  kPcStart = 0,       // item decoded
  kPcQ = 1,           // its Q landed
  kPcS0Issued = 2,    // the first S product issued (the turn taken and handed over)
  kPcS0Done = 3,      // the first S product done
  kPcSoftmax0 = 4,    // the first tile's softmax done, P packed
  kPcLoopEnd = 5,     // the steady-state loop done
  kPcLastPv = 6,      // the last PV product done
  kPcEnd = 7,         // rows written, the Q buffer released
  kPcFinal = 8,       // epilogue: the rows' sums, statistics and output scale final
  kPcStaged = 9,      // epilogue: the rows staged in shared memory (after the warpgroup's barrier)
  kPcStored = 10,     // epilogue: the rows' stores issued (bulk stores: their shared reads done)
};
#ifdef PA_PREFILL_TRACE
constexpr int kPtBlocks = 160;
constexpr int kPtRounds = 64;
__device__ unsigned long long g_prefill_trace[kPtBlocks * kPtRounds * kPtWords];
__device__ __forceinline__ unsigned long long* prefill_trace_rec(int round) {
  if (blockIdx.x >= static_cast<unsigned>(kPtBlocks) || round < 0 || round >= kPtRounds) return nullptr;
  return g_prefill_trace + (static_cast<size_t>(blockIdx.x) * kPtRounds + round) * kPtWords;
}
// The producer opens round `round`'s record: its item (or -1 past the block's last round), tile
// count and SM, its own marks cleared.
__device__ __forceinline__ void prefill_trace_open(bool who, int round, long long item, int tiles) {
  unsigned long long* rec = who ? prefill_trace_rec(round) : nullptr;
  if (rec == nullptr) return;
  unsigned sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  rec[kPtItem] = static_cast<unsigned long long>(item);
  rec[kPtTiles] = static_cast<unsigned long long>(tiles);
  rec[kPtSm] = sm;
  for (int w = kPtProdQ; w <= kPtProdEnd; ++w) rec[w] = 0;
  rec[kPtProdStart] = global_ns();
}
// Consumer c of n opens its part of a round's record (its marks cleared, then its start);
// consumer 0 also clears the words of consumers the kernel does not have, which an earlier launch
// with more consumers may have left.
__device__ __forceinline__ void prefill_trace_cons_open(bool who, int round, int c, int n) {
  unsigned long long* rec = who ? prefill_trace_rec(round) : nullptr;
  if (rec == nullptr) return;
  for (int w = 1; w < kPtConsWords; ++w) rec[kPtCons + kPtConsWords * c + w] = 0;
  if (c == 0) {
    for (int w = kPtCons + kPtConsWords * n; w < kPtWords; ++w) rec[w] = 0;
  }
  rec[kPtCons + kPtConsWords * c + kPcStart] = global_ns();
}
__device__ __forceinline__ void prefill_trace_mark(bool who, int round, int word) {
  unsigned long long* rec = who ? prefill_trace_rec(round) : nullptr;
  if (rec != nullptr) rec[word] = global_ns();
}
#define PA_PT_OPEN(who, round, item, tiles) prefill_trace_open((who), (round), (item), (tiles))
#define PA_PT_CONS_OPEN(who, round, c, n) prefill_trace_cons_open((who), (round), (c), (n))
#define PA_PT_MARK(who, round, word) prefill_trace_mark((who), (round), (word))
#else
// Arguments evaluated for nothing (no side effects): no unused-variable warning in normal builds.
#define PA_PT_OPEN(who, round, item, tiles) ((void)(who), (void)(round), (void)(item), (void)(tiles))
#define PA_PT_CONS_OPEN(who, round, c, n) ((void)(who), (void)(round), (void)(c), (void)(n))
#define PA_PT_MARK(who, round, word) ((void)(who), (void)(round), (void)(word))
#endif

#if PA_SM90_ENABLED
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Whether the phase of `bar` with parity `parity` has completed (acquire when it has); the
// instruction itself may suspend the thread for a while before answering no.
__device__ __forceinline__ bool mbar_try(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
               : "=r"(done)
               : "r"(bar), "r"(parity)
               : "memory");
  return done != 0;
}
// Waits until the phase of `bar` with parity `parity` has completed (acquire).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  while (!mbar_try(bar, parity)) {
  }
}
// The producer's wait, with a deadlock guard: no wait of a correct block lasts anywhere near
// kHangNs (a block's whole work takes milliseconds, even under compute-sanitizer), so a barrier
// protocol error traps -- a launch failure the caller sees -- instead of hanging the process. Only
// the producer carries it: in the consumers its two live registers make ptxas spill and serialise
// the wgmma pipeline. Any stall of the consumers still reaches a guarded wait, because the
// producer ends every block (n_tiles > 0) waiting for the consumers' last release.
constexpr uint64_t kHangNs = 30ull * 1000 * 1000 * 1000;
__device__ __forceinline__ void mbar_wait_guarded(uint32_t bar, uint32_t parity) {
  if (mbar_try(bar, parity)) return;
  const uint64_t t0 = global_ns();
  uint32_t n = 0;
  while (!mbar_try(bar, parity)) {
    if ((++n & 255u) == 0u && global_ns() - t0 > kHangNs) __trap();
  }
}
// One arrival (release: this thread's earlier shared-memory writes are visible to the waiters).
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}
// One arrival that also expects `bytes` more of asynchronous (TMA) transactions in this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// A tensor-map tile load into shared memory, its bytes counted on `bar`'s transaction count.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
      "[%5];\n" ::"r"(dst),
      "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}
// One arrival, fired once every cp.async this thread issued before it has completed.
__device__ __forceinline__ void mbar_arrive_cp_async(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void st_shared_f32(uint32_t addr, float v) {
  asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(addr), "f"(v) : "memory");
}
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(pred ? 16 : 0) : "memory");
}
// 16 bytes from base + row (element offset), or zeros when row < 0 (a key that must not be
// loaded; the source is then base itself): the sign is the ignore-source predicate.
template <typename E> __device__ __forceinline__ void cp_async16_row(uint32_t dst, const E* base, int64_t row) {
  const int64_t neg = row >> 63;  // -1 when the row is not to be loaded, else 0
  asm volatile(
      "{\n"
      "  .reg .pred skip;\n"
      "  setp.ne.s32 skip, %2, 0;\n"
      "  cp.async.cg.shared.global [%0], [%1], 16, skip;\n"
      "}\n" ::"r"(dst),
      "l"(base + (row & ~neg)), "r"(static_cast<int>(neg))
      : "memory");
}
template <int N> __device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N> __device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
#endif

template <typename T, int D, bool kFp8, bool kGrouped>
__global__ void __launch_bounds__(WsCfg<D, kFp8, kGrouped>::kThreads, 1)
    prefill_sm90ws_kernel(const KernelParams p, const int n_items, const int zigzag,
                          const __grid_constant__ CUtensorMap o_map, const int o_tma,
                          const __grid_constant__ CUtensorMap q_map, const int q_tma) {
#if PA_SM90_ENABLED
  using Cfg = WsCfg<D, kFp8, kGrouped>;
  constexpr int kBarProducer = Cfg::kBarProducer, kBarEpi0 = Cfg::kBarEpi0;
  constexpr bool kStO = Cfg::kStageO;
  namespace w = pa::sm90;
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, C = Cfg::kChunks;
  constexpr int SK = Cfg::kStagesK, SV = Cfg::kStagesV, NQ = Cfg::kQBufs;
  // An item's key tiles walked last first over a 16-bit cache (see "Tile order" in the header).
  constexpr bool kRev = !kFp8;
  constexpr int NS = BN / 2;  // S accumulator floats per thread
  constexpr int NO = D / 2;   // O accumulator floats per thread
  constexpr int NJ = BN / 8;  // n8 column groups of S
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t pad = (1024u - (raw_addr & 1023u)) & 1023u;
  unsigned char* smem = smem_raw + pad;
  const uint32_t base = raw_addr + pad;  // Q buffers, then K and V stages
  const uint32_t k_base = base + Cfg::kOffK, v_base = base + Cfg::kOffV, bars = base + Cfg::kOffBar;
  int64_t* ro_s = reinterpret_cast<int64_t*>(smem + Cfg::kOffRo);  // [3][BN]
  uint32_t* bad_s = reinterpret_cast<uint32_t*>(smem + Cfg::kOffBad);  // [SV][BN / 32]
  // Barriers: full_k[SK], full_v[SV], empty_k[SK], empty_v[SV], q_full[NQ], q_empty[NQ] (kNumBars).
  auto full_k = [&](int s) { return bars + 8u * s; };
  auto full_v = [&](int s) { return bars + 8u * (SK + s); };
  auto empty_k = [&](int s) { return bars + 8u * (SK + SV + s); };
  auto empty_v = [&](int s) { return bars + 8u * (2 * SK + SV + s); };
  auto q_full = [&](uint32_t b) { return bars + 8u * (2 * SK + 2 * SV + b); };
  auto q_empty = [&](uint32_t b) { return bars + 8u * (2 * SK + 2 * SV + NQ + b); };
  auto q_buf = [&](uint32_t b) { return base + b * Cfg::kQBytes; };
  static_assert(2 * SK + 2 * SV + 2 * NQ == Cfg::kNumBars, "barrier layout");
  // The producer's claim on the stage of the block's K (V) tile gt: waits until the consumers
  // released that stage's previous use (a fresh stage needs no wait), then returns the stage.
  auto acquire_k = [&](uint32_t gt) {
    const uint32_t s = gt % SK;
    if (gt >= SK) mbar_wait_guarded(empty_k(s), ((gt / SK) - 1) & 1);
    return s;
  };
  auto acquire_v = [&](uint32_t gt) {
    const uint32_t s = gt % SV;
    if (gt >= SV) mbar_wait_guarded(empty_v(s), ((gt / SV) - 1) & 1);
    return s;
  };

  const int tid = threadIdx.x;
  // Work items in heaviest-first order (as paged_prefill_sm90.cu's flat grid): item i is row block
  // (n_mb - 1 - i / hr) of request req_begin + (i % hr) / H, query head i % H. The grid is
  // persistent: block b takes one item per round, item k * gridDim.x + b of round k, or with
  // `zigzag` set k * gridDim.x + (gridDim.x - 1 - b) in odd rounds (see "Persistent grid" in the
  // header). The launcher keeps 3 n_items within int: an item id seen by the walk is below
  // (k + 2) gridDim.x for a round k with k gridDim.x < n_items, so below 3 n_items.
  const int H = p.num_heads;
  const int hr = p.num_launch_reqs * H;
  const int n_mb = n_items / hr;
  // The walk, two ways that give the same items: the producer computes round k's item from k;
  // the consumers carry a step that alternates between two values summing to 2 gridDim.x
  // (gridDim.x both in the strided order; in the zig-zag, from position b of one round to
  // position gridDim.x - 1 - b of the next and back). Each form is the one ptxas handled best in
  // its role: with the round's index in the consumers' loop, the FP8 head-64 consumers lost their
  // uniform wgmma descriptors (R2UR in the turn); with the step in the producer's, its spills
  // grew (36 / 44 bytes against 24 / 36 stored / loaded at head 128).
  const int first_step =
      zigzag != 0 ? 2 * static_cast<int>(gridDim.x - 1 - blockIdx.x) + 1 : static_cast<int>(gridDim.x);
  auto round_item = [&](int k) {
    const int g = static_cast<int>(gridDim.x), b = static_cast<int>(blockIdx.x);
    return k * g + ((zigzag & k & 1) != 0 ? g - 1 - b : b);
  };
  struct Item {
    int req, h, kvh, q_start, q_len, m0, rows, seq_len, ctx, n_first, n_tiles, mask_above_b, mask_below_b;
  };
  // m0 >= q_len: an item past its request's rows, which every role skips.
  auto decode_item = [&](int item) {
    Item it;
    const int mb_rev = item / hr;
    it.req = p.req_begin + (item % hr) / H;
    it.h = item % H;
    it.kvh = it.h / (H / p.num_kv_heads);
    it.q_start = pa::clamp_int(p.qsl[it.req], 0, static_cast<int>(p.num_tokens));
    const int q_end = pa::clamp_int(p.qsl[it.req + 1], it.q_start, static_cast<int>(p.num_tokens));
    it.q_len = q_end - it.q_start;
    it.m0 = (n_mb - 1 - mb_rev) * BM;
    it.rows = max(min(BM, it.q_len - it.m0), 0);
    it.seq_len = pa::clamp_int(p.seq_lens[it.req], 0, p.max_blocks_per_req * p.block_size);
    it.ctx = it.seq_len - it.q_len;
    // Tiles holding keys above mask_above_b or below mask_below_b are hidden from some row of the
    // block: their V gets sanitised (producer and consumers evaluate this identically). No row
    // (m0 >= q_len) is an empty span: no tile.
    const pa::KeySpan span = pa::key_span(it.ctx + it.m0, it.rows, it.seq_len, p);
    it.mask_above_b = span.mask_above;
    it.mask_below_b = span.mask_below;
    it.n_first = span.hi >= span.lo ? span.lo / BN : 0;
    it.n_tiles = span.hi >= span.lo ? span.hi / BN - it.n_first + 1 : 0;
    return it;
  };
  // First key of item `it`'s tile t (t counts tiles in the order they are walked).
  auto tile_key0 = [&](const Item& it, int t) {
    return (kRev ? it.n_first + it.n_tiles - 1 - t : it.n_first + t) * BN;
  };
  auto block_mask = [&](const Item& it, int t) {
    const int n0 = tile_key0(it, t);
    return n0 + BN - 1 > it.mask_above_b || n0 < it.mask_below_b;
  };

  // The producer's loop for an FP8 cache, over item `it`'s key tiles, which are this block's key
  // tiles g, g + 1, ... (stage, barrier phase and offset-ring slot follow that count across items).
  // Each step j copies the raw bytes of K(j + 1) and V(j) into one staging buffer each (cp.async,
  // half a 16-bit tile's traffic) while the consumers work, and at the next step, once they have
  // landed (cp.async.wait_all: every copy of this thread; then the producer barrier: every producer
  // thread's), widens K(j + 1) into its K stage and V(j) into its V stage, each as soon as the
  // consumers released that stage, and arrives on the stage's FULL barrier with a plain release
  // arrive. V is sanitised while it is widened on tiles that straddle a mask bound (the same rule as
  // the 16-bit path). The staging buffers are refilled only after every producer thread has read
  // them (the barrier before the copies).
  auto produce_fp8 = [&](const Item& it, uint32_t g) {
    if constexpr (kFp8) {
      const int pt = tid;
      const int tiles = it.n_tiles;
      constexpr int C16 = D / 16;  // 16-byte FP8 units per row
      const uint32_t stg_k = base + Cfg::kOffStg, stg_v = stg_k + Cfg::kStageBytes8;
      const unsigned char* stg_k_ptr = smem + Cfg::kOffStg;
      const unsigned char* stg_v_ptr = stg_k_ptr + Cfg::kStageBytes8;
      const unsigned char* kc8 = static_cast<const unsigned char*>(p.key_cache);
      const unsigned char* vc8 = static_cast<const unsigned char*>(p.value_cache);
      auto stage_tile = [&](uint32_t dst, const unsigned char* src, const int64_t* ro) {
#pragma unroll 4
        for (int idx = pt; idx < BN * C16; idx += 128)
          cp_async16_row(dst + idx * 16, src + (idx % C16) * 16, ro[idx / C16]);
      };
      auto row_offset = [&](int t, int64_t page) {
        const int key = tile_key0(it, t) + pt;
        return key < it.seq_len ? pa::cache_row(p, page, key, it.kvh, D) : int64_t{-1};
      };
      auto page_for = [&](int t) {
        const int key = tile_key0(it, t) + pt;
        return t < tiles && key < it.seq_len ? pa::page_of(p, it.req, key) : int64_t{0};
      };
      auto slot = [&](int j) { return ro_s + ((g + j) % 3u) * BN; };
      int64_t pg = pt < BN ? page_for(0) : 0;
      if (pt < BN) {
        slot(0)[pt] = row_offset(0, pg);
        pg = page_for(1);
      }
      named_sync(kBarProducer, 128);
      stage_tile(stg_k, kc8, slot(0));  // K(0)
#pragma unroll 1
      for (int j = 0; j <= tiles; ++j) {
        if (j + 1 < tiles && pt < BN) {
          slot(j + 1)[pt] = row_offset(j + 1, pg);
          pg = page_for(j + 2);
        }
        cp_async_wait_all();
        named_sync(kBarProducer, 128);  // staged K(j) / V(j - 1) and the offsets of tile j + 1 visible
        if (j < tiles) {
          const uint32_t s = acquire_k(g + j);
          unsigned char* kd = smem + Cfg::kOffK + s * Cfg::kTileBytes;
          pa::fp8tile::widen_tile<T, BN, D, 128>(
              p.kv_dtype, stg_k_ptr, [&](int r, int col) { return kd + w::swizzled_offset(BN, r, col); }, pt);
          w::fence_proxy_async_smem();
          mbar_arrive(full_k(s));
        }
        if (j >= 1) {
          const uint32_t s = acquire_v(g + j - 1);
          uint32_t* bad = bad_s + s * Cfg::kBadWords;
          const bool sanitize = block_mask(it, j - 1);
          if (sanitize) {
            if (pt < Cfg::kBadWords) bad[pt] = 0u;
            named_sync(kBarProducer, 128);  // cleared before any thread sets a bit
          }
          unsigned char* vd = smem + Cfg::kOffV + s * Cfg::kTileBytes;
          pa::fp8tile::widen_tile<T, BN, D, 128>(
              p.kv_dtype, stg_v_ptr, [&](int r, int col) { return vd + w::swizzled_offset(BN, r, col); }, pt, sanitize,
              bad);
          w::fence_proxy_async_smem();
          mbar_arrive(full_v(s));
        }
        named_sync(kBarProducer, 128);  // both staging buffers read by every producer thread
        if (j + 1 < tiles) stage_tile(stg_k, kc8, slot(j + 1));
        if (j < tiles) stage_tile(stg_v, vc8, slot(j));
      }
    }
  };

  // Every consumer thread releases each stage once per use.
  constexpr int kReleases = 128 * Cfg::kConsumers;
  if (tid == 0) {
    for (int s = 0; s < SK; ++s) {
      mbar_init(full_k(s), 128);
      mbar_init(empty_k(s), kReleases);
    }
    for (int s = 0; s < SV; ++s) {
      mbar_init(full_v(s), 128);
      mbar_init(empty_v(s), kReleases);
    }
    for (int b = 0; b < NQ; ++b) {
      mbar_init(q_full(b), !kFp8 && q_tma != 0 ? 1 : 128);
      mbar_init(q_empty(b), kReleases);
    }
  }
  __syncthreads();  // the only block-wide barrier: the roles below never meet in bar 0 again

  const int wg = tid / 128;
  if (wg == 0) {
    // ---------------------------------------------------------------- producer
    setmaxnreg_dec<Cfg::kProducerRegs>();
    const int pt = tid;
    const T* q = static_cast<const T*>(p.query);
    const T* kc = static_cast<const T*>(p.key_cache);
    const T* vc = static_cast<const T*>(p.value_cache);
    // This thread copies 16-byte unit c of rows r0, r0 + RPI, r0 + 2 RPI...: RPI is a multiple of 8,
    // so every one of its rows has the same swizzle phase and its destinations are RPI rows apart.
    constexpr int RPI = 128 / C;
    static_assert(RPI % 8 == 0, "rows per pass must keep the swizzle phase");
    constexpr int RT = Cfg::kGroupRows;  // rows per thread in the grouped gather
    static_assert(RT % 8 == 0 && 128 % C == 0, "grouped gather: whole swizzle phases, whole groups");
    const int c_thr = pt % C, r0 = pt / C;
    const uint32_t dst0 = w::swizzled_offset(BN, r0, c_thr * 8);
    // Nsight Compute counted 19 instructions per copy in the first version (the zero-fill size
    // rebuilt from the row's validity, a select between two 64-bit sources); the row's sign now
    // drives cp.async's ignore-source predicate directly, and the row is clamped to 0 with a mask,
    // so no address outside the cache is ever formed.
    auto issue = [&](uint32_t dst, const T* src, const int64_t* ro) {
      const T* src_c = src + c_thr * 8;
#pragma unroll 4
      for (int i = 0; i < BN / RPI; ++i) {
        cp_async16_row(dst + dst0 + i * RPI * 128, src_c, ro[r0 + i * RPI]);
      }
    };
    // Q of item `it` into buffer qn % NQ (qn: the block's earlier Q loads): the buffer is free once
    // every consumer finished the last QK^T of the item that used it before (NQ loads ago).
    auto load_q = [&](const Item& it, uint32_t qn) {
      const uint32_t b = qn % NQ;
      if (!kFp8 && q_tma != 0) {
        if (pt == 0) {
          if (qn >= NQ) mbar_wait_guarded(q_empty(b), ((qn / NQ) - 1) & 1);
          w::fence_proxy_async_smem();
          mbar_arrive_expect_tx(q_full(b), static_cast<uint32_t>(BM * D * sizeof(T)));
#pragma unroll
          for (int pn = 0; pn < D / 64; ++pn) {
            tma_load_3d(q_buf(b) + static_cast<uint32_t>(pn) * (BM * 128), &q_map, pn * 64, it.h, it.q_start + it.m0,
                        q_full(b));
          }
        }
        return;
      }
      if (qn >= NQ) mbar_wait_guarded(q_empty(b), ((qn / NQ) - 1) & 1);
      for (int idx = pt; idx < BM * C; idx += 128) {
        const int r = idx / C, c = idx % C;
        const bool valid = r < it.rows;
        const int64_t off = valid ? pa::q_row(p, it.q_start + it.m0 + r, it.h) + c * 8 : 0;
        cp_async16(q_buf(b) + w::swizzled_offset(BM, r, c * 8), q + off, valid);
      }
      mbar_arrive_cp_async(q_full(b));
    };
    if constexpr (kFp8) {
      uint32_t g = 0;   // key tiles of earlier items (the stage / phase / ring-slot count)
      uint32_t qn = 0;  // earlier items that loaded Q
#pragma unroll 1
      for (int k = 0;; ++k) {
        const int item = round_item(k);
        if (item >= n_items) break;
        const Item it = decode_item(item);
        if (it.n_tiles == 0) continue;  // no key tile: the consumers write the rows alone
        load_q(it, qn++);
        produce_fp8(it, g);
        g += it.n_tiles;
      }
      // Retire only after the consumers released the last V stage (their last release of all).
      if (g > 0) mbar_wait_guarded(empty_v((g - 1) % SV), ((g - 1) / SV) & 1);
      return;
    }

    // 16-bit cache: per item, its Q into buffer qi % NQ, then step j issues K and V of tile j
    // (grouped gather) or K of tile j and V of tile j - 1 (offset ring); tiles in walking order,
    // see "Tile order" in the header, and the issue order in "Warpgroup 0".
    //
    // Grouped gather (RT divides the block size): this thread copies 16-byte unit c_thr of the
    // tile's RT consecutive rows grp * RT.., which lie in one page (RT divides the block size and
    // the tile start), so one block-table entry per tile and a constant token stride give every
    // source address, and nothing passes through shared memory or a producer barrier. Otherwise each
    // key row's offset is computed by the thread that owns the row (pt < BN) and shared through a
    // ring of 3 tiles in shared memory. Either way the page a thread needs is read a tile ahead.
    // Without the ring (kGrouped) the launcher sends only block sizes RT divides.
    const bool grouped = !Cfg::kRing || p.block_size % RT == 0;
    const int grp = pt / C;
    const int64_t ts = static_cast<int64_t>(p.num_kv_heads) * D;  // elements between a page's tokens
    const uint32_t x16 = (c_thr & 7) * 16;
    const uint32_t dgrp = (c_thr >> 3) * (BN * 128) + grp * RT * 128;  // panel, then the group's first row
    // Offset-ring path: page of this thread's key row in tile j of `it` (0: no key of the sequence,
    // or no row of its own).
    auto page_for = [&](const Item& it, int j) -> int64_t {
      const int key = tile_key0(it, j) + pt;
      return pt < BN && key < it.seq_len ? pa::page_of(p, it.req, key) : int64_t{0};
    };
    // V of a tile straddling a mask bound has been issued into stage s (grouped gather): once this
    // thread's own copies have landed, zero every non-finite element among them, publish which of
    // its group's keys had one (a warp covers 32 keys, one word of the stage's bit set, written
    // whole, so no clearing and no atomics), then arrive with a plain release arrive. No producer
    // barrier: each thread checks only what it copied.
    auto sanitize_own = [&](uint32_t s, uint32_t vs) {
      cp_async_wait_all();
      unsigned char* vp = smem + (vs - base) + dgrp;
      uint32_t bits = 0;
#pragma unroll
      for (int i = 0; i < RT; ++i) {
        uint4* ptr = reinterpret_cast<uint4*>(vp + i * 128 + (x16 ^ ((i & 7) * 16)));
        uint4 v = *ptr;
        if (pa::any_nonfinite<T>(v.x, v.y, v.z, v.w)) {
          pa::sanitize_pair<T>(v.x);
          pa::sanitize_pair<T>(v.y);
          pa::sanitize_pair<T>(v.z);
          pa::sanitize_pair<T>(v.w);
          *ptr = v;
          bits |= 1u << i;
        }
      }
      static_assert(BN == 128 && 32 * RT / C == 32, "a warp's groups cover one 32-key word");
      const int lane = pt & 31;
      const uint32_t word = __reduce_or_sync(0xffffffffu, bits << ((lane / C) * RT));
      if (lane == 0) bad_s[s * Cfg::kBadWords + (pt >> 5)] = word;
      mbar_arrive(full_v(s));
    };
    // The same with a ring-path tile, whose rows a thread copies RPI apart: every producer thread's
    // copies landed (cp.async.wait_all, then the producer barrier), then a scan of the whole tile
    // with atomic bit sets into the cleared bit set.
    auto sanitize_all = [&](uint32_t s, uint32_t vs) {
      uint32_t* bad = bad_s + s * Cfg::kBadWords;
      if (pt < Cfg::kBadWords) bad[pt] = 0u;
      cp_async_wait_all();
      named_sync(kBarProducer, 128);
      unsigned char* vp = smem + (vs - base);
      for (int idx = pt; idx < BN * C; idx += 128) {
        const int r = idx / C, c = idx % C;
        uint4* ptr = reinterpret_cast<uint4*>(vp + w::swizzled_offset(BN, r, c * 8));
        uint4 v = *ptr;
        const uint32_t f = pa::sanitize_pair<T>(v.x) | pa::sanitize_pair<T>(v.y) | pa::sanitize_pair<T>(v.z) |
                           pa::sanitize_pair<T>(v.w);
        if (f != 0u) {
          *ptr = v;
          atomicOr(&bad[r >> 5], 1u << (r & 31));
        }
      }
      mbar_arrive(full_v(s));
    };

    uint32_t g = 0, qi = 0;
#pragma unroll 1
    for (int k = 0;; ++k) {
      const int item = round_item(k);
      if (item >= n_items) {
        PA_PT_OPEN(pt == 0, k, -1, 0);
        break;
      }
      const Item it = decode_item(item);
      PA_PT_OPEN(pt == 0, k, item, it.n_tiles);
      if (it.n_tiles == 0) continue;
      load_q(it, qi);
      PA_PT_MARK(pt == 0, k, kPtProdQ);
      if (grouped) {
        // The group's first key of each tile as a block-table index and a row in the page, carried
        // from tile to tile instead of divided by the block size twice per tile. Tiles are walked
        // last first (only 16-bit caches reach this loop), so the cursor steps down by BN keys.
        const int bs = p.block_size, dq = BN / bs, dr = BN % bs;
        const int k00 = tile_key0(it, 0) + grp * RT;
        int q = k00 / bs, r = k00 - (k00 / bs) * bs;
        // Block 0 for a group past the sequence: its column is moved past the row, where page_at
        // reads block 0 (one predicate, no branch in the tile loop).
        auto page_q = [&](int qq, int key) {
          return pa::page_at(p, it.req, key < it.seq_len ? qq : p.max_blocks_per_req);
        };
        // Rows past the sequence are zero-filled (cp.async's source size 0). Every address formed
        // lies inside the cache: the group's RT rows from row rr stay inside its page (block 0 when
        // the group holds no key of the sequence or its table entry is out of range).
        auto issue_r = [&](uint32_t dst, const T* cache, int key0, int rr, int64_t page) {
          const int nvalid = pa::clamp_int(it.seq_len - key0, 0, RT);
          const int64_t row = page * p.kv_bs + (static_cast<int64_t>(rr) * p.num_kv_heads + it.kvh) * D;
          const T* src = cache + (nvalid > 0 ? row : 0) + c_thr * 8;
          const uint32_t d0 = dst + dgrp;
#pragma unroll
          for (int i = 0; i < RT; ++i) cp_async16(d0 + i * 128 + (x16 ^ ((i & 7) * 16)), src + i * ts, i < nvalid);
        };
        int key_k = k00, r_k = r;
        int64_t pg_k = page_q(q, key_k);
#pragma unroll 1
        for (int j = 0; j < it.n_tiles; ++j) {
          const int key_kk = key_k, r_kk = r_k;
          const int64_t pg_kk = pg_k;
          if (j + 1 < it.n_tiles) {
            key_k -= BN;
            q -= dq;
            r -= dr;
            if (r < 0) {
              r += bs;
              --q;
            }
            r_k = r;
            pg_k = page_q(q, key_k);
          }
          const uint32_t sk = acquire_k(g + j);
          issue_r(k_base + sk * Cfg::kTileBytes, kc, key_kk, r_kk, pg_kk);
          mbar_arrive_cp_async(full_k(sk));
          PA_PT_MARK(pt == 0 && j == 0, k, kPtProdK0);
          const uint32_t sv = acquire_v(g + j);
          const uint32_t vs = v_base + sv * Cfg::kTileBytes;
          issue_r(vs, vc, key_kk, r_kk, pg_kk);
          if (!block_mask(it, j)) {
            mbar_arrive_cp_async(full_v(sv));
          } else {
            sanitize_own(sv, vs);
          }
        }
      } else {
        int64_t pg = page_for(it, 0);
#pragma unroll 1
        for (int j = 0; j <= it.n_tiles; ++j) {
          if (j < it.n_tiles && pt < BN) {
            const int key = tile_key0(it, j) + pt;
            ro_s[((g + j) % 3u) * BN + pt] = key < it.seq_len ? pa::cache_row(p, pg, key, it.kvh, D) : -1;
            pg = j + 1 < it.n_tiles ? page_for(it, j + 1) : 0;
          }
          // Row offsets of tile j visible to every producer thread; every producer thread is past
          // step j - 1, so the slot step j + 1 overwrites (that of tile j - 2) has no reader left.
          // The slots follow the block's tile count g + j, so this holds across items too.
          named_sync(kBarProducer, 128);
          if (j < it.n_tiles) {
            const uint32_t s = acquire_k(g + j);
            issue(k_base + s * Cfg::kTileBytes, kc, ro_s + ((g + j) % 3u) * BN);
            mbar_arrive_cp_async(full_k(s));
            PA_PT_MARK(pt == 0 && j == 0, k, kPtProdK0);
          }
          if (j >= 1) {
            const uint32_t s = acquire_v(g + j - 1);
            const uint32_t vs = v_base + s * Cfg::kTileBytes;
            issue(vs, vc, ro_s + ((g + j - 1) % 3u) * BN);
            if (!block_mask(it, j - 1)) {
              mbar_arrive_cp_async(full_v(s));
            } else {
              sanitize_all(s, vs);
            }
          }
        }
      }
      PA_PT_MARK(pt == 0, k, kPtProdEnd);
      g += it.n_tiles;
      ++qi;
    }
    // Retire only after the consumers released the last V stage (their last release of all).
    if (g > 0) mbar_wait_guarded(empty_v((g - 1) % SV), ((g - 1) / SV) & 1);
    return;
  }

  // ------------------------------------------------------------------ consumers
  setmaxnreg_inc<Cfg::kConsumerRegs>();
  // Consumer 0 / 1, broadcast from lane 0 so that ptxas knows it is the same in every lane of the
  // warp: the tile loop's stage indices, phases and wgmma descriptors then live in uniform
  // registers. Computed per thread (wg - 1), they did not: the steady-state loop carried 48
  // R2UR moves and 28 more IMADs per tile (597 instructions per thread, now 546; SASS of the
  // bf16 head-128 instantiation with the mask branches compiled out).
  const int cw = __shfl_sync(0xffffffffu, wg - 1, 0);
  const int ct = tid - 128 * wg;
  const int warp = ct / 32, lane = ct % 32;
  const int g4 = lane >> 2, t4 = lane & 3;
  const int rw0 = cw * 64;
  const int r_thr = rw0 + warp * 16 + g4;  // this thread's rows r_thr and r_thr + 8 of a block
  // The turn passes round the consumers in order: this one's barrier, then the next one's (two
  // consumers keep the form 1 - cw, the same turn, which ptxas compiles to the code measured before
  // three consumers existed).
  const int bar_self = kBarTurn0 + cw;
  const int bar_other = Cfg::kConsumers == 2 ? kBarTurn0 + 1 - cw : kBarTurn0 + (cw + 1) % Cfg::kConsumers;
  const uint32_t pin_addr = base + Cfg::kOffPin + 4u * static_cast<uint32_t>(ct + 128 * cw);
  T* out = static_cast<T*>(p.out);
  const bool elementwise = p.softcap > 0.f || p.has_alibi;
  if (cw == 0) named_arrive(kBarTurn0, 256);  // consumer 0 has the first turn
  uint32_t g = 0;   // key tiles of earlier items (as the producer counts them)
  uint32_t qi = 0;  // earlier items that loaded Q

  // The round of the walk (the producer's k): only the trace reads it.
  int walk_round = -1;
  const bool tracer = ct == 0;  // the thread that writes this warpgroup's marks in a trace build
#pragma unroll 1
  for (int item = blockIdx.x, step = first_step; item < n_items;
       item += step, step = 2 * static_cast<int>(gridDim.x) - step) {
    ++walk_round;
    const Item it = decode_item(item);
    PA_PT_CONS_OPEN(tracer, walk_round, cw, Cfg::kConsumers);
    if (it.m0 >= it.q_len) continue;
    const int n_first = it.n_first, n_tiles = it.n_tiles, seq_len = it.seq_len;
    const int ctx = it.ctx, m0 = it.m0, rows = it.rows;
    // This warpgroup's rows (<= 0: it holds none of the item's).
    const pa::KeySpan span_w = pa::key_span(ctx + m0 + rw0, min(64, rows - rw0), seq_len, p);
    const int lo_w = span_w.lo, hi_w = span_w.hi, mask_above = span_w.mask_above, mask_below = span_w.mask_below;

    float o[NO];
#pragma unroll
    for (int i = 0; i < NO; ++i) o[i] = 0.f;
    pa::SoftmaxState st[2];
    st[0].reset();
    st[1].reset();
    bool v_bad[2] = {false, false};
    const float slope = p.has_alibi ? p.alibi[it.h] : 0.f;
    // FP8: k_scale joins the score scale, v_scale multiplies the output once (both 1 otherwise).
    const float k_scale = kFp8 ? pa::fp8::scale_of(p.k_scale, p.kv_scale_per_head, it.kvh) : 1.f;
    const float v_scale = kFp8 ? pa::fp8::scale_of(p.v_scale, p.kv_scale_per_head, it.kvh) : 1.f;
    const float qk_scale = kFp8 ? p.scale * k_scale : p.scale;
    const float scale2 = qk_scale * pa::kLog2e;

    if (n_tiles > 0) {
      // The tiles this warpgroup's rows see: one contiguous run [wa, wb] of the block's tiles (the
      // condition n0 <= hi_w && n0 + BN - 1 >= lo_w is an interval in n0); wa > wb: none.
      int wa = n_tiles, wb = n_tiles - 1;
      if (hi_w >= lo_w) {
        wa = max(lo_w / BN - n_first, 0);
        wb = min(hi_w / BN - n_first, n_tiles - 1);
        if (kRev && wa <= wb) {
          const int fa = wa;
          wa = n_tiles - 1 - wb;
          wb = n_tiles - 1 - fa;
        }
        if (wa > wb) {
          wa = n_tiles;
          wb = n_tiles - 1;
        }
      }
      // Stage and barrier phase of the item's tile t: the block's tile g + t.
      auto ks = [&](int t) { return (g + t) % SK; };
      auto kpar = [&](int t) { return ((g + t) / SK) & 1; };
      auto vs = [&](int t) { return (g + t) % SV; };
      auto vpar = [&](int t) { return ((g + t) / SV) & 1; };
      // A tile none of this warpgroup's rows sees: keep the barrier phases and the turns in step.
      auto skip_tile = [&](int t) {
        mbar_wait(full_k(ks(t)), kpar(t));
        named_sync(bar_self, 256);
        named_arrive(bar_other, 256);
        mbar_arrive(empty_k(ks(t)));
        mbar_wait(full_v(vs(t)), vpar(t));
        mbar_arrive(empty_v(vs(t)));
      };
#pragma unroll 1
      for (int t = 0; t < wa; ++t) skip_tile(t);
      // Every consumer waits for the item's Q before releasing it, so that its release can never
      // count towards the previous item's phase of q_empty.
      mbar_wait(q_full(qi % NQ), (qi / NQ) & 1);
      PA_PT_MARK(tracer, walk_round, kPtCons + kPtConsWords * cw + kPcQ);

      if (wa <= wb) {
        float s[NS];
        uint32_t pk[BN / 4];
        float alpha[2];
        const w::SmemDesc qd = w::smem_desc_parts(q_buf(qi % NQ) + rw0 * 128, 1, 64);  // this warpgroup's Q rows
        // S = Q K(n)^T into s (issued and committed, not waited for).
        auto issue_s = [&](int n) {
          const w::SmemDesc kd = w::smem_desc_parts(k_base + ks(n) * Cfg::kTileBytes, 1, 64);
          w::wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk) {
            const uint32_t pan = kk >> 2, sub = (kk & 3) * 32;
            const uint64_t da = w::desc_at(qd, pan * (BM * 128) + sub);
            const uint64_t db = w::desc_at(kd, pan * (BN * 128) + sub);
            w::WgmmaSS<T, BN>::run(s, da, db, kk > 0 ? 1 : 0);
          }
          w::wgmma_commit();
        };
        // O = alpha O + P V(t) (issued and committed, not waited for). V is MN-major: 64-column
        // panels BN * 128 bytes apart (LBO), 8-key groups 1024 bytes apart (SBO); k-step kk takes
        // keys 16 kk.., whose A fragment is pk[4 kk..]. Multiplying by an alpha of exactly 1
        // changes no bit, so the rescale is unconditional.
        auto issue_pv = [&](int t) {
#pragma unroll
          for (int j = 0; j < D / 8; ++j) {
            o[j * 4 + 0] *= alpha[0];
            o[j * 4 + 1] *= alpha[0];
            o[j * 4 + 2] *= alpha[1];
            o[j * 4 + 3] *= alpha[1];
          }
          const w::SmemDesc vd = w::smem_desc_parts(v_base + vs(t) * Cfg::kTileBytes, BN * 128 / 16, 64);
          w::wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < BN / 16; ++kk) {
            const uint32_t a[4] = {pk[4 * kk + 0], pk[4 * kk + 1], pk[4 * kk + 2], pk[4 * kk + 3]};
            const uint64_t dv = w::desc_at(vd, kk * 16 * 128);
            w::WgmmaRS<T, D>::run(o, a, dv);
          }
          w::wgmma_commit();
        };
        // Mask and online softmax of tile n in place: s becomes exp2(s - base) (unpacked), the
        // row sums join st, al gets the factor O owes before P(n) V(n) is added.
        auto softmax = [&](int n, float(&al)[2]) {
          const int n0 = tile_key0(it, n);
          const bool need_mask = n0 + BN - 1 > mask_above || n0 < mask_below;
          // Soft-cap / ALiBi: every element's exact score (and the mask); the mask alone: -inf where
          // hidden, the raw products scaled below as on unmasked tiles.
          if (elementwise) {
            w::exact_scores<NJ>(s, n0, ctx + m0 + r_thr, t4, qk_scale, p, slope, seq_len, need_mask);
          } else if (need_mask) {
            pa::mask_scores<NJ>(s, n0, ctx + m0 + r_thr, t4, p, seq_len);
          }
          const float sc = elementwise ? 1.f : scale2;
          float mu[2];
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
            s[j * 4 + 0] = e0;
            s[j * 4 + 1] = e1;
            s[j * 4 + 2] = e2;
            s[j * 4 + 3] = e3;
          }
          st[0].add(al[0], sum0);
          st[1].add(al[1], sum1);
        };
        auto pack_p = [&]() {
#pragma unroll
          for (int j = 0; j < NJ; ++j) {
            pk[j * 2 + 0] = pa::Elem<T>::pack(s[j * 4 + 0], s[j * 4 + 1]);
            pk[j * 2 + 1] = pa::Elem<T>::pack(s[j * 4 + 2], s[j * 4 + 3]);
          }
        };
        // After the PV product of tile t: rows that see a key whose V the producer sanitised.
        auto note_bad_v = [&](int t) {
          if (!block_mask(it, t)) return;
          const uint32_t* bad = bad_s + vs(t) * Cfg::kBadWords;
          const int t0 = tile_key0(it, t);
#pragma unroll 1
          for (int wd = 0; wd < Cfg::kBadWords; ++wd) {
            uint32_t word = bad[wd];
            while (word != 0u) {
              const int b = __ffs(word) - 1;
              word &= word - 1u;
              const int key = t0 + wd * 32 + b;
#pragma unroll
              for (int rr = 0; rr < 2; ++rr)
                if (pa::key_visible(ctx + m0 + r_thr + rr * 8, key, seq_len, p)) v_bad[rr] = true;
            }
          }
        };

        // First tile of the run: S only.
        mbar_wait(full_k(ks(wa)), kpar(wa));
        w::fence_proxy_async_smem();
        named_sync(bar_self, 256);
        issue_s(wa);
        named_arrive(bar_other, 256);
        PA_PT_MARK(tracer, walk_round, kPtCons + kPtConsWords * cw + kPcS0Issued);
        w::wgmma_wait<0>();
        w::fence_regs(s);
        PA_PT_MARK(tracer, walk_round, kPtCons + kPtConsWords * cw + kPcS0Done);
        mbar_arrive(empty_k(ks(wa)));
        softmax(wa, alpha);
        pack_p();
        PA_PT_MARK(tracer, walk_round, kPtCons + kPtConsWords * cw + kPcSoftmax0);
        // Steady state: S(n) runs while O catches up with tile n - 1, then the softmax of tile n
        // runs while P(n - 1) V(n - 1) does.
#pragma unroll 1
        for (int n = wa + 1; n <= wb; ++n) {
          mbar_wait(full_k(ks(n)), kpar(n));
          w::fence_proxy_async_smem();
          named_sync(bar_self, 256);
          issue_s(n);
          mbar_wait(full_v(vs(n - 1)), vpar(n - 1));
          w::fence_proxy_async_smem();
          issue_pv(n - 1);
          named_arrive(bar_other, 256);
          w::wgmma_wait<1>();  // S(n) done; PV(n - 1) may still run
          w::fence_regs(s);
          mbar_arrive(empty_k(ks(n)));
          float al[2];
          softmax(n, al);
          // Pin the wait for P(n - 1) V(n - 1) after the softmax. ptxas (CUDA 13.0) hoists this
          // wgmma.wait_group 0 up to the first row maximum, before the exponentials, so the
          // softmax no longer overlapped the PV product at all (FlashInfer 0.7.2's prebuilt sm90
          // prefill shows the same hoist). A shared-memory store keeps its place before the wait,
          // and storing the row sums, which depend on every exponential, keeps those before it:
          // the SASS of every instantiation now has the tile's 64 MUFU.EX2 between the two waits.
          st_shared_f32(pin_addr, st[0].l + st[1].l);
          w::wgmma_wait<0>();
          w::fence_regs(o);
          w::fence_regs(pk);
          note_bad_v(n - 1);
          mbar_arrive(empty_v(vs(n - 1)));
          pack_p();
          alpha[0] = al[0];
          alpha[1] = al[1];
        }
        PA_PT_MARK(tracer, walk_round, kPtCons + kPtConsWords * cw + kPcLoopEnd);
        // Every QK^T of this item has completed: Q's buffer may take a later item's rows (with the
        // staged epilogue, once the output rows have passed through it).
        if constexpr (!kStO) mbar_arrive(q_empty(qi % NQ));
        // Last tile of the run: PV only.
        mbar_wait(full_v(vs(wb)), vpar(wb));
        w::fence_proxy_async_smem();
        issue_pv(wb);
        w::wgmma_wait<0>();
        w::fence_regs(o);
        PA_PT_MARK(tracer, walk_round, kPtCons + kPtConsWords * cw + kPcLastPv);
        note_bad_v(wb);
        mbar_arrive(empty_v(vs(wb)));
      } else {
        if constexpr (!kStO) mbar_arrive(q_empty(qi % NQ));
      }

#pragma unroll 1
      for (int t = max(wb + 1, wa); t < n_tiles; ++t) skip_tile(t);
    }
    // Epilogue: finish the row sums across the quad, normalise, write.
    const float sink2 = p.has_sinks ? p.sinks[it.h] : -INFINITY;
    float os[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float lr = st[rr].l;
      lr += __shfl_xor_sync(0xffffffffu, lr, 1);
      lr += __shfl_xor_sync(0xffffffffu, lr, 2);
      int bad = v_bad[rr];
      bad |= __shfl_xor_sync(0xffffffffu, bad, 1);
      bad |= __shfl_xor_sync(0xffffffffu, bad, 2);
      const pa::Finalised f = pa::finalise(st[rr].m2, lr, sink2);
      os[rr] = bad ? __int_as_float(0x7fffffff) : (kFp8 ? f.out_scale * v_scale : f.out_scale);
      const int r = r_thr + rr * 8;
      if (r < rows && t4 == 0 && p.lse) p.lse[(it.q_start + m0 + r) * H + it.h] = f.lse;
    }
    PA_PT_MARK(tracer, walk_round, kPtCons + kPtConsWords * cw + kPcFinal);
    if (kStO && n_tiles > 0) {
      // Staged: this warpgroup's 64 rows of the item's Q buffer (no wgmma reads them any more),
      // laid out as Q's swizzled 64-column panels, so a warp's 4-byte stores hit 32 distinct banks
      // and 8 threads' 16-byte loads one row's 8 distinct chunks; then each row leaves as 16-byte
      // coalesced stores instead of a warp's 4-byte stores to 8 rows.
      const uint32_t ob = q_buf(qi % NQ) + static_cast<uint32_t>(rw0) * 128u;
      // Byte offset of 16-byte chunk c of local row lr: 64-column panel, row, swizzled chunk.
      auto chunk_at = [&](int lr, int c) {
        return static_cast<uint32_t>((c >> 3) * (BM * 128) + lr * 128 + (((c & 7) ^ (lr & 7)) << 4));
      };
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int lr = warp * 16 + g4 + rr * 8;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          const float lo = o[j * 4 + 2 * rr] * os[rr], hi = o[j * 4 + 2 * rr + 1] * os[rr];
          st_shared_u32(ob + chunk_at(lr, j) + t4 * 4, pa::Elem<T>::pack(lo, hi));
        }
      }
      // The bulk tensor store reads the staged rows through the async proxy.
      const bool tma = o_tma != 0 && rows - rw0 >= 64;
      if (tma) w::fence_proxy_async_smem();
      named_sync(kBarEpi0 + cw, 128);
      PA_PT_MARK(tracer, walk_round, kPtCons + kPtConsWords * cw + kPcStaged);
      if (tma) {
        // All 64 rows belong to the item: one bulk tensor store per 64-column panel (the staged
        // panels are the 128-byte swizzle the map names), issued by one thread, which waits only
        // for the engine's reads of shared memory before the buffer's release.
        if (ct == 0) {
#pragma unroll
          for (int pn = 0; pn < D / 64; ++pn) {
            asm volatile(
                "cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%1, %2, %3}], [%4];\n" ::"l"(&o_map),
                "r"(pn * 64), "r"(it.h), "r"(it.q_start + m0 + rw0), "r"(ob + static_cast<uint32_t>(pn) * (BM * 128))
                : "memory");
          }
          asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
          asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
        }
      } else {
        constexpr int CH = D / 8;  // 16-byte chunks per row
#pragma unroll 4
        for (int idx = ct; idx < 64 * CH; idx += 128) {
          const int lr = idx / CH, c = idx % CH;
          if (rw0 + lr < rows) {
            const uint4 v = ld_shared_v4(ob + chunk_at(lr, c));
            T* orow = out + pa::o_row(p, it.q_start + m0 + rw0 + lr, it.h);
            *reinterpret_cast<uint4*>(orow + c * 8) = v;
          }
        }
      }
      PA_PT_MARK(tracer, walk_round, kPtCons + kPtConsWords * cw + kPcStored);
      // This thread's loads are done (ld.shared completes in order); the release arrive orders
      // them before the producer's next copies into the buffer.
      mbar_arrive(q_empty(qi % NQ));
    } else {
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int r = r_thr + rr * 8;
        if (r < rows) {
          uint32_t* orow = reinterpret_cast<uint32_t*>(out + pa::o_row(p, it.q_start + m0 + r, it.h));
#pragma unroll
          for (int j = 0; j < D / 8; ++j) {
            const float lo = o[j * 4 + 2 * rr] * os[rr], hi = o[j * 4 + 2 * rr + 1] * os[rr];
            orow[j * 4 + t4] = pa::Elem<T>::pack(lo, hi);
          }
        }
      }
    }
    PA_PT_MARK(tracer, walk_round, kPtCons + kPtConsWords * cw + kPcEnd);
    if (n_tiles > 0) {
      g += n_tiles;
      ++qi;
    }
  }
  // Consume the last consumer's last hand-over so every turn barrier ends complete.
  if (cw == 0) named_sync(kBarTurn0, 256);
#endif  // PA_SM90_ENABLED
}

// The driver's tensor-map encoder, through the runtime (no link against the driver library);
// null where the driver has none.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      f = nullptr;
    }
#else
    if (cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      f = nullptr;
    }
#endif
    (void)cudaGetLastError();
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// One of the launch's [tokens][heads][D] tensors (the query or the output) as a tensor map for bulk
// copies of one head's 64 columns x `rows` tokens, 128-byte swizzle: the layout of the kernel's
// swizzled panels, which its wgmma descriptors read and its epilogue stages. False where the base
// address or token stride is not a 16-byte multiple, where a token's heads are not adjacent (a
// head-major view: the layout the tests have not run through the bulk copies), or where no encoder
// exists: the kernel then moves those rows with its threads.
template <typename T, int D>
bool encode_rows_map(const PaAttnArgs& a, const void* base, int64_t token_stride, int64_t head_stride, int rows,
                     CUtensorMapL2promotion l2, CUtensorMap* map) {
  PFN_cuTensorMapEncodeTiled_v12000 enc = tensor_map_encoder();
  if (enc == nullptr || base == nullptr) return false;
  const uint64_t ts = static_cast<uint64_t>(token_stride) * sizeof(T);
  const uint64_t hs = static_cast<uint64_t>(head_stride) * sizeof(T);
  if (head_stride != D || token_stride < static_cast<int64_t>(a.num_heads) * D || ts % 16 != 0 ||
      reinterpret_cast<uintptr_t>(base) % 16 != 0 || a.num_tokens <= 0) {
    return false;
  }
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(a.num_heads),
                              static_cast<cuuint64_t>(a.num_tokens)};
  const cuuint64_t strides[2] = {hs, ts};
  const cuuint32_t box[3] = {64, 1, static_cast<cuuint32_t>(rows)};
  const cuuint32_t estr[3] = {1, 1, 1};
  const CUtensorMapDataType dt =
      std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return enc(map, dt, 3, const_cast<void*>(base), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, l2, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <typename T, int D, bool kFp8, bool kGrouped>
cudaError_t launch_ws(const PaAttnArgs& a, const KernelParams& kp, cudaStream_t stream) {
  using Cfg = WsCfg<D, kFp8, kGrouped>;
  const int n = a.req_end - a.req_begin;
  if (n == 0 || a.max_query_len <= 0) return cudaSuccess;
  const int64_t m_blocks = (a.max_query_len + Cfg::kBM - 1) / Cfg::kBM;
  const int64_t n_blocks = m_blocks * a.num_heads * n;
  // Room for the item walk's ids in an int (below 3 n_blocks, see the kernel).
  if (n_blocks > INT_MAX / 3) return cudaErrorInvalidValue;
  cudaError_t err =
      pa::set_max_dynamic_smem_once<prefill_sm90ws_kernel<T, D, kFp8, kGrouped>>(static_cast<int>(Cfg::kSmemBytes));
  if (err != cudaSuccess) return err;
  // Persistent grid: one block per SM (the kernel's occupancy), each walking items gridDim.x apart,
  // unless the caller capped it (PaAttnArgs::prefill_grid).
  int sms = 0;
  err = pa::sm_count(&sms);
  if (err != cudaSuccess) return err;
  const int cap = a.prefill_grid;
  const int64_t grid = cap < 0 ? n_blocks : std::min<int64_t>(n_blocks, cap > 0 ? cap : sms);
  const dim3 blocks(static_cast<unsigned>(grid));
  // The output for the epilogue's bulk stores: 64-row boxes, one consumer warpgroup's rows.
  CUtensorMap o_map{};
  const int o_tma =
      static_cast<int>(Cfg::kStageO && encode_rows_map<T, D>(a, a.out, a.o_token_stride, a.o_head_stride, 64,
                                                             CU_TENSOR_MAP_L2_PROMOTION_NONE, &o_map));
  // The query for the producer's Q loads: boxes of an item's rows. Tokens past the tensor's last
  // arrive as zeros; rows of the next request past an item's own are loaded and never written out
  // (each output row depends on its own query row only). 16-bit caches only (see the producer).
  CUtensorMap q_map{};
  const int q_tma =
      static_cast<int>(!kFp8 && encode_rows_map<T, D>(a, a.query, a.q_token_stride, a.q_head_stride, Cfg::kBM,
                                                      CU_TENSOR_MAP_L2_PROMOTION_L2_128B, &q_map));
  prefill_sm90ws_kernel<T, D, kFp8, kGrouped><<<blocks, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(
      kp, static_cast<int>(n_blocks), a.prefill_order, o_map, o_tma, q_map, q_tma);
  return pa_last_launch_status();
}

}  // namespace

// From paged_prefill_sm90.cu: 1 when the current device is compute capability 9.0.
extern "C" int32_t pa_paged_prefill_sm90_device(void);

// 1 when pa_paged_prefill_sm90ws runs (head_size, dtype, kv_dtype) on the current device: head
// 64 or 128, f16 (0) or bf16 (1), a cache of the compute type or FP8 (kv_dtype 0, 1 or 2), and a
// compute capability 9.0 device; else 0.
PA_EXPORT int32_t pa_paged_prefill_sm90ws_supported(int32_t head_size, int32_t dtype, int32_t kv_dtype) {
  if (head_size != 64 && head_size != 128) return 0;
  if (dtype != 0 && dtype != 1) return 0;
  if (kv_dtype < 0 || kv_dtype > 2) return 0;
  return pa_paged_prefill_sm90_device();
}

// Query rows one block of the warp-specialised kernel computes (0 off this path).
PA_EXPORT int32_t pa_paged_prefill_sm90ws_rows_per_block(int32_t head_size) {
  int32_t rows = 0;
  pa::dispatch_sm90_head_size(head_size, [&](auto tag) -> cudaError_t {
    rows = WsCfg<decltype(tag)::value, false>::kBM;
    return cudaSuccess;
  });
  return rows;
}

// Resident blocks per SM of the warp-specialised kernel for (head size, dtype) on the current
// device (1 where it fits at all: it is built for one block per SM).
PA_EXPORT cudaError_t pa_paged_prefill_sm90ws_blocks_per_sm(int32_t head_size, int32_t dtype, int32_t* blocks) {
  if (blocks == nullptr || (dtype != 0 && dtype != 1)) return cudaErrorInvalidValue;
  return pa::dispatch_sm90_head_size(head_size, [&](auto tag) -> cudaError_t {
    constexpr int D = decltype(tag)::value;
    // The larger of the 16-bit configurations (at head 128 the ring-less one, a third V stage).
    constexpr bool kG = D > 64;
    using Cfg = WsCfg<D, false, kG>;
    auto occupancy = [&](auto kernel) -> cudaError_t {
      return pa::occupancy_blocks_per_sm(kernel, Cfg::kThreads, static_cast<int>(Cfg::kSmemBytes), blocks);
    };
    return dtype == 0 ? occupancy(prefill_sm90ws_kernel<__half, D, false, kG>)
                      : occupancy(prefill_sm90ws_kernel<__nv_bfloat16, D, false, kG>);
  });
}

// The per-round timeline of the last warp-specialised prefill launch on the current device (see
// PrefillTraceWord): the number of records a build keeps written to `*built_records` (blocks x
// rounds; 0 when the library was built without the trace) and the rounds per block to
// `*rounds_per_block`, then, for max_records > 0, up to `max_records` records of kPtWords words
// (block-major) copied to `host` after a device synchronisation (a probe with max_records = 0
// does not wait).
PA_EXPORT cudaError_t pa_prefill_trace_read(uint64_t* host, int32_t max_records, int32_t* built_records,
                                            int32_t* rounds_per_block) {
#ifdef PA_PREFILL_TRACE
  constexpr int kRecords = kPtBlocks * kPtRounds;
  *built_records = kRecords;
  *rounds_per_block = kPtRounds;
  return pa::read_trace_records(host, max_records, kRecords, kPtWords, g_prefill_trace);
#else
  (void)host;
  (void)max_records;
  *built_records = 0;
  *rounds_per_block = 0;
  return cudaSuccess;
#endif
}

// Varlen attention for requests [req_begin, req_end) on the warp-specialised Hopper kernel; same
// contract and clamping as pa_paged_prefill. cudaErrorNotSupported for a shape off this path (see
// pa_paged_prefill_sm90ws_supported): the caller runs pa_paged_prefill_sm90 instead.
PA_EXPORT cudaError_t pa_paged_prefill_sm90ws(const PaAttnArgs* args, cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const PaAttnArgs& a = *args;
  cudaError_t err = pa::check_args(a);
  if (err != cudaSuccess) return err;
  if (pa_paged_prefill_sm90ws_supported(a.head_size, a.dtype, a.kv_dtype) != 1) return cudaErrorNotSupported;
  if (a.prefill_grid < -1) return cudaErrorInvalidValue;
  if (a.prefill_order != 0 && a.prefill_order != 1) return cudaErrorInvalidValue;
  pa::KernelParams kp;
  if (!pa::make_kernel_params(a, kp)) return cudaErrorNotSupported;
  const bool fp8 = a.kv_dtype != pa::fp8::kSame;
  // FP8 rows move as 16-byte vectors of 16 elements: the block stride must be a multiple of 16.
  if (fp8 && a.kv_block_stride % 16 != 0) return cudaErrorMisalignedAddress;
  return pa::dispatch_sm90_head_size(a.head_size, [&](auto tag) -> cudaError_t {
    constexpr int D = decltype(tag)::value;
    if (fp8) {
      return a.dtype == 0 ? launch_ws<__half, D, true, false>(a, kp, stream)
                          : launch_ws<__nv_bfloat16, D, true, false>(a, kp, stream);
    }
    // Head 128: the ring-less configuration (a third V stage) for block sizes the grouped gather
    // serves, the ring for the rest; head 64 has room for both (one configuration).
    if constexpr (D > 64) {
      if (a.block_size % WsCfg<D, false>::kGroupRows == 0) {
        return a.dtype == 0 ? launch_ws<__half, D, false, true>(a, kp, stream)
                            : launch_ws<__nv_bfloat16, D, false, true>(a, kp, stream);
      }
    }
    return a.dtype == 0 ? launch_ws<__half, D, false, false>(a, kp, stream)
                        : launch_ws<__nv_bfloat16, D, false, false>(a, kp, stream);
  });
}
