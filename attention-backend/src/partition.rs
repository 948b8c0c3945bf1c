//! How a mixed step shares the SMs between its decode part and its prefill part.
//!
//! The decode part of a mixed step is bound by memory bandwidth, the prefill part by the tensor
//! cores, and the two run on two streams. Launched decode first, the decode blocks take every SM
//! and the prefill mostly waits for them: the step costs the sum of its parts (0.210 ms against
//! 0.141 + 0.065 on the H200, 64 decodes of 2048 keys + 2 prefills of 1024). Launched prefill
//! first, on the warp-specialised kernel with its persistent grid capped at P blocks (one block
//! per SM), the decode runs on the other SMs from the start and takes the prefill's SMs as they
//! free up (0.188 ms at P = 66). The capped grid keeps its P SMs to its end, so P has to follow
//! the step: too few starve the prefill (P = 44: 0.255 ms, with an older prefill kernel), too many
//! the decode, and a fixed half would lose on every prefill-heavy step. [`prefill_sms`] chooses P
//! per step from predicted times of the two parts, and leaves the step unpartitioned where the
//! prediction shows no gain.
//!
//! The model (docs/PERFORMANCE.md, thirteenth and eighteenth sessions, has its fits):
//! - the decode part alone takes [`DECODE_FIXED_US`] plus its K/V bytes at a rate two limits set
//!   together, the device's peak DRAM bandwidth and [`DECODE_SM_BYTES_PER_CYCLE`] per SM (each
//!   costs its own time per byte: the H100's memory bound it, the H200's faster memory leaves the
//!   SMs' side a larger part, [`decode_bytes_per_s`]). On `k` of `n` SMs it reads at
//!   [`decode_rate`] of that: a rate that saturates, since a fraction of the SMs already keeps the
//!   memory system busy, and saturates sooner where the SMs are fast against the memory;
//! - the prefill part on a grid of `g` blocks takes [`PREFILL_FIXED_US`] plus as long as its
//!   busiest block, which takes one work item per round of the kernel's heaviest-first order (in
//!   the kernel's item order, `attention_kernels::WsOrder`), each item costing a fixed number of
//!   SM cycles plus a number per key tile ([`prefill_cycles`]);
//! - while both run, the prefill is stretched by [`PREFILL_CONTENTION`] and the decode by
//!   [`DECODE_CONTENTION`] (memory, L2 and issue slots shared); whichever ends first leaves the
//!   other to run alone;
//! - unpartitioned, the step takes the sum of the two parts alone plus [`UNPARTITIONED_GAP_US`].
//!
//! Fitted on the H100 with the sixteenth session's kernels: 8 decode shapes and 10 prefill shapes
//! alone (decodes within 4%, prefills within 5% but one at 6%), and the 35 partitioned points of
//! seven mixed steps at five grids (3.8% RMS, worst 8.4%); the decode's SM-side limit and the
//! unpartitioned gap from the H200's sweep (twenty-first session), where the H100's constants had
//! picked 18% and 6% off the best setting on two of seven steps (now 4% on one, best on the
//! others). Other devices enter through their SM count, SM clock and DRAM bandwidth only.

use std::sync::OnceLock;

use attention_kernels::{ws_item_rows, DType, WsOrder};

use crate::error::{AttentionError, Result};
use crate::metadata::AttentionMetadata;

/// The environment variable that sets [`MixedPartition`] for the eager API and for
/// `PlanOptions::from_env`: `auto` (or unset), `off`, or a count of SMs.
pub const MIXED_PARTITION_ENV: &str = "PAGED_ATTN_MIXED_PARTITION";

/// How a mixed step (single-token decodes and prefills together) shares the SMs. It changes the
/// order and the grid of the two launches, never a result: every work item computes the same
/// arithmetic whichever block runs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MixedPartition {
    /// The prefill part confined to the SM count a cost model predicts fastest for the step (from
    /// its decode bytes, its prefill work items and the device's SM count, clock and bandwidth),
    /// or no partition where the model predicts no gain over the two parts one after the other.
    #[default]
    Auto,
    /// No partition: the decode part is launched first, on every SM, and the prefill part beside
    /// it takes SMs as the decode blocks leave them.
    Off,
    /// The prefill part on at most this many SMs (at least one; at most all but one), for every
    /// mixed step: for measuring the model against the device.
    Sms(usize),
}

impl MixedPartition {
    /// Parses [`MIXED_PARTITION_ENV`]'s forms: `auto` or blank, `off`, a positive SM count (`0`
    /// is `off`). Case and surrounding blanks do not matter. `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "" | "auto" => Some(MixedPartition::Auto),
            "off" | "0" => Some(MixedPartition::Off),
            _ if s.bytes().all(|b| b.is_ascii_digit()) => {
                Some(MixedPartition::Sms(s.parse::<usize>().unwrap_or(usize::MAX)))
            }
            _ => None,
        }
    }

    /// The setting [`MIXED_PARTITION_ENV`] asks for ([`MixedPartition::Auto`] when unset), read
    /// each call.
    ///
    /// # Errors
    /// [`AttentionError::InvalidArgument`] for a value [`MixedPartition::parse`] refuses (one that
    /// is not UTF-8 included).
    pub fn from_env() -> Result<Self> {
        from_var(std::env::var(MIXED_PARTITION_ENV))
    }

    /// [`MixedPartition::from_env`] read once per process (the eager API's setting).
    pub(crate) fn process() -> Result<Self> {
        static ENV: OnceLock<Result<MixedPartition>> = OnceLock::new();
        ENV.get_or_init(MixedPartition::from_env).clone()
    }
}

fn from_var(var: std::result::Result<String, std::env::VarError>) -> Result<MixedPartition> {
    attention_kernels::env_setting::read(var, MixedPartition::Auto, MixedPartition::parse).map_err(|v| {
        AttentionError::InvalidArgument {
            op: "MixedPartition::from_env",
            what: format!("{MIXED_PARTITION_ENV}=`{v}`: expected auto, off or a count of SMs"),
        }
    })
}

/// The device figures the model scales by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceRates {
    /// Streaming multiprocessors.
    pub num_sms: usize,
    /// SM clock, Hz (the device's reported maximum).
    pub sm_clock_hz: f64,
    /// Peak DRAM bandwidth, bytes per second (memory clock, double data rate, times bus width).
    pub dram_bytes_per_s: f64,
}

impl DeviceRates {
    /// The H200 SXM (the issues' card), whose figures stand in for any the driver does not report:
    /// 132 SMs, 1980 MHz, 3201 MHz x 6144-bit memory.
    pub const H200: DeviceRates =
        DeviceRates { num_sms: 132, sm_clock_hz: 1.98e9, dram_bytes_per_s: 3.201e9 * 2.0 * 6144.0 / 8.0 };

    /// From the driver's attributes (kHz, kHz, bits); each one the driver reports as 0 takes the
    /// H200's figure.
    pub fn from_attributes(num_sms: usize, sm_clock_khz: usize, mem_clock_khz: usize, bus_width_bits: usize) -> Self {
        let h = DeviceRates::H200;
        DeviceRates {
            num_sms: if num_sms == 0 { h.num_sms } else { num_sms },
            sm_clock_hz: if sm_clock_khz == 0 { h.sm_clock_hz } else { sm_clock_khz as f64 * 1e3 },
            dram_bytes_per_s: if mem_clock_khz == 0 || bus_width_bits == 0 {
                h.dram_bytes_per_s
            } else {
                mem_clock_khz as f64 * 1e3 * 2.0 * bus_width_bits as f64 / 8.0
            },
        }
    }
}

/// Bytes per SM cycle the decode kernel's copies move at most, the SM side of its rate (see
/// [`decode_bytes_per_s`]). With the peak DRAM bandwidth as the other limit it gives the H100's
/// fitted rate on 8 decode shapes of 67 MB to 2.1 GB (3.04 of 3.35 TB/s, as the earlier constant
/// fraction of the peak did) and the H200's decode part of the bench's mixed step (537 MB in 140.4
/// us, predicted 137.5: 4.28 of 4.92 TB/s), where a fixed fraction of the peak predicted 132.
pub const DECODE_SM_BYTES_PER_CYCLE: f64 = 126.0;

/// The unpartitioned step (decode first, the prefill taking SMs as the decode's blocks leave)
/// costs this much more than its two parts' predicted times: the median over the fourteen
/// unpartitioned steps of both devices' sweeps (6.8 us; H100 -9 to +17, H200 -10 to +14). Without
/// it the plan compared partitions against a step 7-14 us too fast on the H200 and left two
/// steps whole that a partition sped up by 6% and 15%.
pub const UNPARTITIONED_GAP_US: f64 = 7.0;

/// The decode part's cost that does not scale with its bytes (launch, ramp, the split merge):
/// 35 us for 67 MB against 189 us for 537 MB on the H100.
pub const DECODE_FIXED_US: f64 = 12.0;

/// How quickly the decode's read rate saturates with its share of the SMs, per unit of the
/// device's SM throughput against its memory (see [`decode_rate`]). Fitted on the H100's
/// partitioned points with [`PREFILL_CONTENTION`] and [`DECODE_CONTENTION`]: there the decode on
/// half the SMs reads at 0.96 of its full rate, on a third at 0.88; the H200's faster memory needs
/// more SMs (0.89 on half).
pub const DECODE_SATURATION: f64 = 80.0;

/// How much slower the prefill's blocks run while the decode part shares the memory system, L2
/// and the SMs' issue slots with them.
pub const PREFILL_CONTENTION: f64 = 1.66;

/// How much slower the decode reads while the prefill runs beside it (the prefill's own K/V and
/// Q traffic in the same memory system and L2).
pub const DECODE_CONTENTION: f64 = 1.17;

/// The prefill part's cost that does not scale with its work (launch, the first tiles' latency,
/// the last items' epilogues): 18 us for one 512-token request on the H100.
pub const PREFILL_FIXED_US: f64 = 6.5;

/// A partition must be predicted this much faster than the unpartitioned step (the sum of the
/// parts and [`UNPARTITIONED_GAP_US`]) to be used. On the
/// H100's sweep the best grid's predicted gain was never more than 2 points above its measured
/// one (64 decodes + 1 x 512: 5.0% predicted, 3.3% measured; the bench's step 11.3% and 11.2%;
/// 8 decodes + 1 x 1024: 3.5% and 14%).
pub const MIN_PREDICTED_GAIN: f64 = 0.97;

/// Keys of one key tile of the warp-specialised prefill (its item rows are the kernels' own,
/// `attention_kernels::ws_item_rows`).
const TILE_KEYS: usize = 128;

/// Most SMs the model plans for (its per-block loads live on the stack).
const MAX_SMS: usize = 512;

/// SM cycles per key tile and per work item (its Q load, pipeline fill and epilogue, not all
/// hidden) of the warp-specialised prefill at `head_size`, or `None` off that kernel's head sizes.
/// Head 128: fitted with [`PREFILL_FIXED_US`] on ten shapes alone on the H100 (1.84 us per tile,
/// 4.3 us per item at 1.98 GHz; causal 8 x 2048, 2 x 8192, 4 x 2048, 1 x 2048, 2 x 1024, 1 x 1024,
/// 1 x 512, 4 x 256, the chunked q512 on 7.5k x 4 and q512 on 4k: all within 5% but 2 x 8192,
/// 6% under its measured time and inside its run-to-run spread). Head 64, three consumers (192-row
/// items): fitted on five shapes alone on the H100 (1.64 us per tile, 3.4 us per item; causal
/// 8 x 2048, 2 x 8192, 32 x 512, 1 x 2048 and the chunked q512 on 7.5k x 4, zig-zag order: all
/// within 5%). Head 64 in a two-consumer build (128-row items): the tile cost from causal 8 x 2048,
/// with the item cost taken as 0.6 of head 128's (one point cannot separate the two). All three
/// were fitted before Q became a bulk tensor copy (twenty-seventh session), which shortened the
/// short-item shapes on the H100 (head 128's causal 8 x 2048 by 6%, 32 x 512 by 12%, head 64's by
/// 1-5%): until a new sweep refits them, the model overstates those prefills.
pub fn prefill_cycles(head_size: usize) -> Option<(f64, f64)> {
    match (head_size, ws_item_rows(head_size)) {
        (128, _) => Some((3640.0, 8500.0)),
        (64, 192) => Some((3250.0, 6750.0)),
        (64, _) => Some((2600.0, 5100.0)),
        _ => None,
    }
}

/// The shape of a mixed step as the model sees it.
#[derive(Clone, Copy, Debug)]
pub struct MixedShape<F: Fn(usize) -> (usize, usize)> {
    /// K/V bytes the decode part reads (every decode's visible keys, K and V, all KV heads).
    pub decode_bytes: f64,
    /// Requests of the prefill part.
    pub prefill_reqs: usize,
    /// `(query length, sequence length)` of prefill request `r` (`r < prefill_reqs`).
    pub prefill_req: F,
    /// Query heads (one work item per query head).
    pub num_heads: usize,
    /// Head size.
    pub head_size: usize,
    /// The order the kernel's persistent blocks take the work items in.
    pub order: WsOrder,
}

/// Predicted microseconds of the prefill part alone on a persistent grid of `grid` blocks: its
/// busiest block's items (the kernel's order: row blocks last first, then requests, then heads,
/// shared among the blocks in `shape.order`). `None` off the warp-specialised kernel's head sizes
/// or past [`MAX_SMS`] blocks.
pub fn prefill_alone_us<F: Fn(usize) -> (usize, usize)>(
    rates: &DeviceRates,
    shape: &MixedShape<F>,
    grid: usize,
) -> Option<f64> {
    let (tile_cycles, item_cycles) = prefill_cycles(shape.head_size)?;
    let n = shape.prefill_reqs;
    let heads = shape.num_heads.max(1);
    let n_mb = row_blocks(shape);
    let item_rows = ws_item_rows(shape.head_size);
    let items = n_mb * n * heads;
    if items == 0 {
        return Some(0.0);
    }
    let g = grid.clamp(1, items);
    if g > MAX_SMS {
        return None;
    }
    // Items of one (row block, request) are `heads` consecutive ones of equal cost. A run of them
    // covers the rest of one round, some whole rounds (every block once each) and the start of a
    // later round; within a round the run's items go to one contiguous range of blocks in either
    // order, kept as a difference array.
    let mut diff = [0.0f64; MAX_SMS + 1];
    let mut every = 0.0;
    let mut add = |first_item: usize, len: usize, cost: f64| {
        let (round, pos) = (first_item / g, first_item % g);
        let mut segment = |round: usize, from: usize, to: usize| {
            // Positions from..to of `round` go to a contiguous range of blocks, forwards or
            // backwards: its ends are the blocks of the first and the last.
            let (a, b) = (shape.order.block_of(round * g + from, g), shape.order.block_of(round * g + to - 1, g));
            diff[a.min(b)] += cost;
            diff[a.max(b) + 1] -= cost;
        };
        let head = len.min(g - pos);
        segment(round, pos, pos + head);
        let rest = len - head;
        every += (rest / g) as f64 * cost;
        if !rest.is_multiple_of(g) {
            segment(round + 1 + rest / g, 0, rest % g);
        }
    };
    let mut item = 0;
    for mb_rev in 0..n_mb {
        let m0 = (n_mb - 1 - mb_rev) * item_rows;
        for r in 0..n {
            let first = item;
            item += heads;
            let (q, seq) = (shape.prefill_req)(r);
            if m0 >= q {
                continue;
            }
            let rows = (q - m0).min(item_rows);
            let last_key = seq.saturating_sub(q) + m0 + rows - 1;
            let cost = (last_key / TILE_KEYS + 1) as f64 * tile_cycles + item_cycles;
            add(first, heads, cost);
        }
    }
    let mut run = 0.0;
    let mut busiest = 0.0f64;
    for d in &diff[..g] {
        run += d;
        busiest = busiest.max(run);
    }
    Some(PREFILL_FIXED_US + (every + busiest) / rates.sm_clock_hz * 1e6)
}

/// The decode part's read rate alone on every SM, bytes per second: each byte costs the DRAM's
/// time and the SMs' ([`DECODE_SM_BYTES_PER_CYCLE`] per SM cycle), one after the other. 3.04 TB/s
/// on the H100 (of 3.35 peak), 4.28 on the H200 (of 4.92).
pub fn decode_bytes_per_s(rates: &DeviceRates) -> f64 {
    let sm_side = rates.num_sms.max(1) as f64 * rates.sm_clock_hz * DECODE_SM_BYTES_PER_CYCLE;
    1.0 / (1.0 / rates.dram_bytes_per_s + 1.0 / sm_side)
}

/// Predicted microseconds of the decode part alone on every SM.
pub fn decode_alone_us(rates: &DeviceRates, decode_bytes: f64) -> f64 {
    DECODE_FIXED_US + decode_bytes / decode_bytes_per_s(rates) * 1e6
}

/// The decode part's read rate on `sms` of the device's SMs, as a fraction of its rate on all of
/// them: `(1 - exp(-k f)) / (1 - exp(-k))` for the fraction `f` of the SMs, with `k` =
/// [`DECODE_SATURATION`] times SMs x SM clock / DRAM bandwidth (6.2 on the H100, 4.3 on the H200).
/// The sweep alone cannot tell this curve from a straight line capped at 1 (`min(1, 2.7 f)` fits
/// it as well); the curve is kept for its reading, a rate that rises ever more slowly as the
/// memory system fills, and because it sits slightly closer to the H200's points (9% RMS against
/// 10%).
pub fn decode_rate(rates: &DeviceRates, sms: usize) -> f64 {
    let n = rates.num_sms.max(1);
    let f = sms.min(n) as f64 / n as f64;
    let k = DECODE_SATURATION * n as f64 * rates.sm_clock_hz / rates.dram_bytes_per_s;
    (1.0 - (-k * f).exp()) / (1.0 - (-k).exp())
}

/// Predicted microseconds of the step with the prefill part (`prefill_us` alone on its grid of
/// `g` blocks) launched first and the decode part (`decode_us` alone) on the other SMs, taking the
/// prefill's SMs when it ends.
pub fn partitioned_us(rates: &DeviceRates, decode_us: f64, prefill_us: f64, g: usize) -> f64 {
    let rate = decode_rate(rates, rates.num_sms.saturating_sub(g)) / DECODE_CONTENTION;
    let prefill_beside = prefill_us * PREFILL_CONTENTION;
    if rate > 0.0 && decode_us <= rate * prefill_beside {
        // The decode ends first; the prefill's rest runs without it.
        let decode_end = decode_us / rate;
        decode_end + (prefill_beside - decode_end) / PREFILL_CONTENTION
    } else {
        // The prefill ends first; the decode's rest has every SM to itself.
        prefill_beside + (decode_us - rate * prefill_beside)
    }
}

/// The SM count to confine a mixed step's prefill part to, or 0 for no partition (decode first,
/// as before). `Auto` tries grids from an eighth of the SMs to all but an eighth, in steps of
/// about a thirty-second (a sixteenth for prefills of over 256 row blocks), and takes the fastest
/// prediction if it beats the unpartitioned step's (the sum of the parts and
/// [`UNPARTITIONED_GAP_US`]) by [`MIN_PREDICTED_GAIN`]. Only for a prefill that
/// runs on the warp-specialised kernel (the caller checks): no other prefill kernel has a
/// persistent grid to cap.
pub fn prefill_sms<F: Fn(usize) -> (usize, usize)>(
    setting: MixedPartition,
    rates: &DeviceRates,
    shape: &MixedShape<F>,
) -> usize {
    let n = rates.num_sms;
    if shape.prefill_reqs == 0 || shape.decode_bytes <= 0.0 || n < 2 {
        return 0;
    }
    match setting {
        MixedPartition::Off => 0,
        MixedPartition::Sms(p) => p.clamp(1, n - 1),
        MixedPartition::Auto => {
            let decode = decode_alone_us(rates, shape.decode_bytes);
            let Some(whole) = prefill_alone_us(rates, shape, n) else { return 0 };
            let sequential = decode + whole + UNPARTITIONED_GAP_US;
            // No partition beats either part alone on the whole device: where the larger part is
            // already within the required gain of the sum, no grid is worth trying.
            if decode.max(whole) >= MIN_PREDICTED_GAIN * sequential {
                return 0;
            }
            // Each candidate costs a walk over the (row block, request) pairs: half as many
            // candidates where those pass 256 (a plan stays within tens of microseconds).
            let items = grid_items(shape);
            let pairs = items / shape.num_heads.max(1);
            let step = (if pairs > 256 { n / 16 } else { n / 32 }).max(1);
            let (lo, hi) = ((n / 8).max(1), n - (n / 8).max(1));
            // Predictions of the candidate grids: at most 50 (about 3n/4 grids in steps of 1 below
            // 64 SMs; in steps of at least n / 32 from 64 up).
            let mut tried = [(0usize, f64::INFINITY); 64];
            let mut count = 0;
            let mut p = lo;
            while p <= hi && count < tried.len() {
                if let Some(prefill) = prefill_alone_us(rates, shape, p) {
                    // The grid is never larger than the item count: the decode gets the rest.
                    let g = p.min(items).max(1);
                    tried[count] = (p, partitioned_us(rates, decode, prefill, g));
                    count += 1;
                }
                p += step;
            }
            let tried = &tried[..count];
            let best = tried.iter().map(|t| t.1).fold(f64::INFINITY, f64::min);
            if best >= MIN_PREDICTED_GAIN * sequential {
                return 0;
            }
            // Where several grids predict within 1% of the best (a decode-bound step predicts
            // the decode's time for a whole range of small grids), the middle one of them: it
            // leaves the most room for the model's error on either side.
            let near = tried.iter().filter(|t| t.1 <= best * 1.01).count();
            tried.iter().filter(|t| t.1 <= best * 1.01).nth(near / 2).map_or(0, |t| t.0)
        }
    }
}

/// [`prefill_sms`] for the mixed step `meta` describes: requests `0..decode_reqs` are single-token
/// decodes over a `kv_dtype` cache, the rest prefills; `heads` is (query heads, KV heads, head
/// size). The caller has checked that the prefill runs on the warp-specialised kernel. No
/// allocation; O(requests + grid) per candidate grid.
pub(crate) fn mixed_prefill_sms(
    setting: MixedPartition,
    rates: &DeviceRates,
    meta: &AttentionMetadata,
    decode_reqs: usize,
    heads: (usize, usize, usize),
    kv_dtype: DType,
) -> usize {
    let (num_heads, num_kv_heads, head_size) = heads;
    let decode_reqs = decode_reqs.min(meta.num_reqs());
    let decode_keys: usize = meta.seq_lens[..decode_reqs].iter().map(|&l| l.max(0) as usize).sum();
    let key_bytes = 2 * num_kv_heads * head_size * kv_dtype.size_in_bytes();
    let shape = MixedShape {
        decode_bytes: decode_keys as f64 * key_bytes as f64,
        prefill_reqs: meta.num_reqs() - decode_reqs,
        prefill_req: |r: usize| {
            let r = decode_reqs + r;
            (meta.query_len(r), meta.seq_lens[r].max(0) as usize)
        },
        num_heads,
        head_size,
        // A bad setting fails the launch itself; the plan just assumes the default.
        order: WsOrder::from_env().unwrap_or(WsOrder::DEFAULT),
    };
    prefill_sms(setting, rates, &shape)
}

/// Row blocks per request in the kernel's launch: its longest query's, in item rows.
fn row_blocks<F: Fn(usize) -> (usize, usize)>(shape: &MixedShape<F>) -> usize {
    let rows = ws_item_rows(shape.head_size);
    (0..shape.prefill_reqs).map(|r| (shape.prefill_req)(r).0.div_ceil(rows)).max().unwrap_or(0)
}

/// Work items (the kernel's grid without a cap) of the prefill part.
fn grid_items<F: Fn(usize) -> (usize, usize)>(shape: &MixedShape<F>) -> usize {
    row_blocks(shape) * shape.prefill_reqs * shape.num_heads.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(
        decodes: usize,
        ctx: usize,
        prefills: &[(usize, usize)],
        head: usize,
    ) -> MixedShape<impl Fn(usize) -> (usize, usize) + '_> {
        // bf16, 8 KV heads: 2 (K, V) x 8 x head x 2 bytes per key.
        let per_key = (2 * 8 * head * 2) as f64;
        MixedShape {
            decode_bytes: (decodes * ctx) as f64 * per_key,
            prefill_reqs: prefills.len(),
            prefill_req: move |r| prefills[r],
            num_heads: 32,
            head_size: head,
            // The order the fits were measured with.
            order: WsOrder::Strided,
        }
    }

    /// The H100 SXM the model was fitted on: 132 SMs, 1980 MHz, 2619 MHz x 5120-bit memory.
    fn h100() -> DeviceRates {
        DeviceRates::from_attributes(132, 1_980_000, 2_619_000, 5120)
    }

    /// The two parts alone against the H100's measurements they were fitted on (bench_attention
    /// and its mixed sweep, sixteenth session, strided item order): decodes within 4%, prefills
    /// within 5% except 2 x 8192 (within 7%, inside its run-to-run spread).
    #[test]
    fn parts_alone_match_the_h100_fit() {
        let h = h100();
        for (decodes, ctx, us) in [
            (64, 2048, 188.5),
            (8, 2048, 35.0),
            (16, 1024, 33.0),
            (128, 4096, 717.2),
            (256, 1024, 371.5),
            (64, 4096, 361.8),
            (16, 16384, 360.2),
        ] {
            let got = decode_alone_us(&h, shape(decodes, ctx, &[], 128).decode_bytes);
            assert!((got / us - 1.0).abs() < 0.04, "{decodes} x {ctx}: {got} us against {us}");
        }
        for (reqs, us, tol) in [
            (vec![(2048, 2048); 8], 631.3, 0.05),
            (vec![(8192, 8192); 2], 2181.0, 0.07),
            (vec![(512, 8192); 4], 486.2, 0.05),
            (vec![(1024, 1024); 2], 60.2, 0.05),
            (vec![(512, 512)], 18.0, 0.05),
            (vec![(512, 4096)], 68.5, 0.05),
            (vec![(1024, 1024)], 36.5, 0.05),
            (vec![(2048, 2048)], 97.0, 0.05),
            (vec![(256, 256); 4], 21.5, 0.05),
            (vec![(2048, 2048); 4], 317.5, 0.05),
        ] {
            let got = prefill_alone_us(&h, &shape(0, 0, &reqs, 128), 132).unwrap();
            assert!((got / us - 1.0).abs() < tol, "{reqs:?}: {got} us against {us}");
        }
    }

    /// The H100's mixed sweep (sixteenth session, strided order): each step's time (us) with the
    /// prefill on 28 / 44 / 56 / 66 / 88 SMs, and unpartitioned.
    type SweepRow = (usize, usize, &'static [(usize, usize)], [f64; 5], f64);
    const H100_SWEEP: [SweepRow; 7] = [
        (64, 2048, &[(1024, 1024); 2], [331.0, 249.0, 228.0, 223.0, 234.0], 251.0),
        (64, 2048, &[(512, 512)], [209.0, 212.0, 207.0, 205.0, 207.0], 212.0),
        (64, 2048, &[(512, 4096)], [402.0, 277.0, 256.0, 218.0, 231.0], 262.0),
        (8, 2048, &[(1024, 1024)], [152.0, 109.0, 95.0, 83.0, 68.0], 79.0),
        (128, 4096, &[(2048, 2048)], [783.0, 769.0, 756.0, 754.0, 770.0], 806.0),
        (256, 1024, &[(256, 256); 4], [386.0, 384.0, 387.0, 390.0, 390.0], 402.0),
        (16, 1024, &[(2048, 2048); 4], [1450.0, 939.0, 746.0, 639.0, 492.0], 356.0),
    ];
    const SWEEP_GRIDS: [usize; 5] = [28, 44, 56, 66, 88];

    /// Head 64's prefills alone against the H100's measurements they were fitted on, zig-zag order:
    /// three consumers (`bench_prefill_paths`, twenty-sixth session), or in a two-consumer build
    /// the one point its costs came from (the issues' bench, twenty-fourth session). Each within 5%.
    #[test]
    fn head64_prefills_alone_match_the_h100_fit() {
        let h = h100();
        let points = if ws_item_rows(64) == 192 {
            vec![
                (vec![(2048, 2048); 8], 411.7),
                (vec![(8192, 8192); 2], 1274.0),
                (vec![(512, 8192); 4], 315.0),
                (vec![(512, 512); 32], 199.0),
                (vec![(2048, 2048)], 61.1),
            ]
        } else {
            vec![(vec![(2048, 2048); 8], 440.0)]
        };
        for (reqs, us) in points {
            let s = MixedShape { order: WsOrder::ZigZag, ..shape(0, 0, &reqs, 64) };
            let got = prefill_alone_us(&h, &s, 132).unwrap();
            assert!((got / us - 1.0).abs() < 0.05, "{reqs:?}: {got} us against {us}");
        }
    }

    /// The partitioned model against the 35 points it was fitted on: each within 9%, 4% RMS.
    #[test]
    fn partitioned_steps_match_the_h100_sweep() {
        let h = h100();
        let mut squares = 0.0;
        for (decodes, ctx, reqs, measured, _) in H100_SWEEP {
            let s = shape(decodes, ctx, reqs, 128);
            let decode = decode_alone_us(&h, s.decode_bytes);
            for (g, us) in SWEEP_GRIDS.into_iter().zip(measured) {
                let got = partitioned_us(&h, decode, prefill_alone_us(&h, &s, g).unwrap(), g);
                let e = (got / us).ln();
                assert!(e.abs() < 0.09, "{decodes} x {ctx} + {reqs:?} on {g}: {got} us against {us}");
                squares += e * e;
            }
        }
        assert!((squares / 35.0).sqrt() < 0.04);
    }

    /// What the plan is for: on every step of the H100's sweep, the grid it picks (or no
    /// partition) measured within 5% of the step's best measured setting (the nearest measured
    /// grid standing for the one picked). The thirteenth session's model picked 44 SMs for the
    /// bench's step (249 us against 223 at 66) and 44 for the chunk on a 4k prefix (277 against
    /// 218).
    #[test]
    fn auto_picks_a_near_best_setting_on_the_h100_sweep() {
        for (decodes, ctx, reqs, measured, off) in H100_SWEEP {
            let what = format!("{decodes} x {ctx} + {reqs:?}");
            assert_auto_near_best(&what, &h100(), &shape(decodes, ctx, reqs, 128), &SWEEP_GRIDS, &measured, off);
        }
    }

    /// The plan's pick for `step` (named `what`) on `rates` (the nearest of the measured `grids`
    /// standing for it, or `off` for no partition) within 5% of the best of `measured` (times on
    /// `grids`) and `off`.
    fn assert_auto_near_best<F: Fn(usize) -> (usize, usize)>(
        what: &str,
        rates: &DeviceRates,
        step: &MixedShape<F>,
        grids: &[usize],
        measured: &[f64],
        off: f64,
    ) {
        let p = prefill_sms(MixedPartition::Auto, rates, step);
        let at = if p == 0 {
            off
        } else {
            let nearest = (0..grids.len()).min_by_key(|&i| grids[i].abs_diff(p)).unwrap();
            measured[nearest]
        };
        let best = measured.iter().fold(off, |a, &b| a.min(b));
        assert!(at <= best * 1.05, "{what}: P = {p}, {at} us against {best}");
    }

    /// The H200's mixed sweep (twentieth session, main `3987a13`, zig-zag order): each step's time
    /// (us) with the prefill on 44 / 56 / 72 / 88 SMs, and unpartitioned.
    type H200Row = (usize, usize, &'static [(usize, usize)], [f64; 4], f64);
    const H200_SWEEP: [H200Row; 7] = [
        (64, 2048, &[(1024, 1024); 2], [202.0, 191.0, 195.0, 200.0], 201.0),
        (64, 2048, &[(512, 512)], [165.0, 166.0, 160.0, 159.0], 164.0),
        (64, 2048, &[(512, 4096)], [232.0, 218.0, 190.0, 192.0], 214.0),
        (8, 2048, &[(1024, 1024)], [97.0, 83.0, 70.0, 62.0], 73.0),
        (128, 4096, &[(2048, 2048)], [563.0, 562.0, 562.0, 606.0], 607.0),
        (256, 1024, &[(256, 256); 4], [278.0, 276.0, 283.0, 285.0], 293.0),
        (16, 1024, &[(2048, 2048); 4], [932.0, 733.0, 577.0, 475.0], 343.0),
    ];
    const H200_GRIDS: [usize; 4] = [44, 56, 72, 88];

    /// The same on the H200's sweep: the picked grid (the nearest measured one standing for it) or
    /// no partition within 5% of the best measured setting on every step. With the H100's
    /// constants alone the plan kept 8 decodes + 1 x 1024 whole (73 us against 62 at 88 SMs) and
    /// 256 decodes + 4 x 256 (293 against 276).
    #[test]
    fn auto_picks_a_near_best_setting_on_the_h200_sweep() {
        for (decodes, ctx, reqs, measured, off) in H200_SWEEP {
            let step = MixedShape { order: WsOrder::ZigZag, ..shape(decodes, ctx, reqs, 128) };
            let what = format!("{decodes} x {ctx} + {reqs:?}");
            assert_auto_near_best(&what, &DeviceRates::H200, &step, &H200_GRIDS, &measured, off);
        }
    }

    /// The decode part alone against the H200's bench (64 decodes of 2048 keys, 140.4 us) within
    /// 3%, and its rate between the H100's fitted 3.04 TB/s and the H200's peak.
    #[test]
    fn decode_alone_matches_the_h200_bench() {
        let got = decode_alone_us(&DeviceRates::H200, shape(64, 2048, &[], 128).decode_bytes);
        assert!((got / 140.4 - 1.0).abs() < 0.03, "{got} us");
        let h100 = decode_bytes_per_s(&h100());
        assert!((h100 / 3.04e12 - 1.0).abs() < 0.01, "{h100}");
        let h200 = decode_bytes_per_s(&DeviceRates::H200);
        assert!(h200 > h100 && h200 < DeviceRates::H200.dram_bytes_per_s, "{h200}");
    }

    /// The decode's rate on part of the SMs: 1 on all, 0 on none, rising and concave between, and
    /// saturating sooner on the H100 (slower memory for the same SMs) than on the H200.
    #[test]
    fn decode_rate_saturates() {
        for r in [h100(), DeviceRates::H200] {
            assert!((decode_rate(&r, 132) - 1.0).abs() < 1e-12);
            assert_eq!(decode_rate(&r, 0), 0.0);
            assert_eq!(decode_rate(&r, 500), decode_rate(&r, 132));
            let rates: Vec<f64> = (0..=132).map(|k| decode_rate(&r, k)).collect();
            assert!(rates.windows(2).all(|w| w[1] > w[0]));
            assert!(rates.windows(3).all(|w| w[1] - w[0] >= w[2] - w[1]));
        }
        assert!(decode_rate(&h100(), 66) > decode_rate(&DeviceRates::H200, 66));
    }

    #[test]
    fn auto_partitions_the_bench_step_near_half_the_sms() {
        let h = DeviceRates::H200;
        let s = shape(64, 2048, &[(1024, 1024); 2], 128);
        let p = prefill_sms(MixedPartition::Auto, &h, &s);
        assert!((48..=72).contains(&p), "P = {p}");
    }

    #[test]
    fn auto_leaves_prefill_heavy_steps_unpartitioned() {
        let h = DeviceRates::H200;
        // 16 short decodes beside 4 x 2048 of prefill: the decode is a few percent of the step.
        assert_eq!(prefill_sms(MixedPartition::Auto, &h, &shape(16, 1024, &[(2048, 2048); 4], 128)), 0);
        // A long chunked prefill beside a handful of decodes.
        assert_eq!(prefill_sms(MixedPartition::Auto, &h, &shape(4, 4096, &[(8192, 8192)], 128)), 0);
    }

    #[test]
    fn no_partition_without_both_parts_or_off_the_kernel() {
        let h = DeviceRates::H200;
        assert_eq!(prefill_sms(MixedPartition::Auto, &h, &shape(0, 0, &[(1024, 1024)], 128)), 0);
        assert_eq!(prefill_sms(MixedPartition::Auto, &h, &shape(64, 2048, &[], 128)), 0);
        assert_eq!(prefill_sms(MixedPartition::Auto, &h, &shape(64, 2048, &[(1024, 1024); 2], 96)), 0);
        assert_eq!(prefill_sms(MixedPartition::Off, &h, &shape(64, 2048, &[(1024, 1024); 2], 128)), 0);
    }

    #[test]
    fn a_fixed_count_is_kept_within_the_device() {
        let h = DeviceRates::H200;
        let s = shape(64, 2048, &[(1024, 1024); 2], 128);
        assert_eq!(prefill_sms(MixedPartition::Sms(40), &h, &s), 40);
        assert_eq!(prefill_sms(MixedPartition::Sms(1000), &h, &s), 131);
        // Head 96 runs on another prefill kernel, but a fixed count is what the caller asked for.
        assert_eq!(prefill_sms(MixedPartition::Sms(40), &h, &shape(64, 2048, &[(1024, 1024)], 96)), 40);
    }

    /// The busiest block's load by brute force, item by item, against the difference array, in
    /// both orders (five heads: runs of equal items that span several rounds of small grids).
    #[test]
    fn busiest_block_matches_a_direct_count() {
        let h = DeviceRates::H200;
        let reqs = [(300usize, 900usize), (1024, 1024), (129, 129), (40, 4000)];
        let (tc, ic) = prefill_cycles(128).unwrap();
        let n_mb = 8;
        let items = n_mb * 4 * 5;
        for order in [WsOrder::Strided, WsOrder::ZigZag] {
            let s = MixedShape {
                decode_bytes: 0.0,
                prefill_reqs: 4,
                prefill_req: |r| reqs[r],
                num_heads: 5,
                head_size: 128,
                order,
            };
            for g in [1, 2, 3, 5, 7, 20, 64, items - 1, items, items + 9] {
                let gg = g.min(items);
                let mut load = vec![0.0; gg];
                for i in 0..items {
                    let mb = n_mb - 1 - i / 20;
                    let (q, seq) = reqs[(i % 20) / 5];
                    if mb * 128 >= q {
                        continue;
                    }
                    let rows = (q - mb * 128).min(128);
                    load[order.block_of(i, gg)] += ((seq - q + mb * 128 + rows - 1) / 128 + 1) as f64 * tc + ic;
                }
                let want = PREFILL_FIXED_US + load.iter().cloned().fold(0.0, f64::max) / h.sm_clock_hz * 1e6;
                let got = prefill_alone_us(&h, &s, g).unwrap();
                assert!((got - want).abs() < 1e-9 * want.max(1.0), "{order:?} g = {g}: {got} against {want}");
            }
        }
    }

    /// The zig-zag order's point: on one causal request (16 row blocks of 32 heads on 132 SMs, the
    /// first blocks of the strided order take the heaviest item of every round) it predicts a
    /// shorter busiest block, and never a longer one on the bench's prefill shapes.
    #[test]
    fn zigzag_evens_out_the_rounds() {
        let h = DeviceRates::H200;
        let time = |reqs: &[(usize, usize)], order| {
            let s = MixedShape { order, ..shape(0, 0, reqs, 128) };
            prefill_alone_us(&h, &s, 132).unwrap()
        };
        let one = [(2048, 2048)];
        assert!(time(&one, WsOrder::ZigZag) < 0.95 * time(&one, WsOrder::Strided));
        for reqs in [vec![(2048, 2048); 8], vec![(8192, 8192); 2], vec![(1024, 1024); 2], vec![(512, 8192); 4]] {
            assert!(time(&reqs, WsOrder::ZigZag) <= time(&reqs, WsOrder::Strided) * 1.0001, "{reqs:?}");
        }
    }

    /// The step adapter reads the decode bytes and the prefill requests from the metadata the
    /// way the shape tests above state them (the bench's step: the same plan), and an FP8 cache
    /// halves the decode bytes.
    #[test]
    fn the_step_adapter_reads_the_metadata() {
        use crate::{BlockTable, SlotMapping};
        let h = DeviceRates::H200;
        let mut q_lens = vec![1usize; 64];
        q_lens.extend([1024, 1024]);
        let mut seq_lens = vec![2048i32; 64];
        seq_lens.extend([1024, 1024]);
        let mut qsl = vec![0i32];
        for q in &q_lens {
            qsl.push(qsl.last().unwrap() + *q as i32);
        }
        let width = 2048 / 16;
        let table = BlockTable::new((0..66 * width as i32).collect(), 66, width).unwrap();
        let tokens = *qsl.last().unwrap() as usize;
        let meta = AttentionMetadata::new(qsl, seq_lens, table, SlotMapping::new(vec![-1; tokens]), 1).unwrap();
        let got = mixed_prefill_sms(MixedPartition::Auto, &h, &meta, 64, (32, 8, 128), DType::BF16);
        // The adapter plans with the process's item order.
        let order = WsOrder::from_env().unwrap_or(WsOrder::DEFAULT);
        let step = MixedShape { order, ..shape(64, 2048, &[(1024, 1024); 2], 128) };
        let want = prefill_sms(MixedPartition::Auto, &h, &step);
        assert!(got > 0 && got == want, "{got} against {want}");
        let fp8 = mixed_prefill_sms(MixedPartition::Auto, &h, &meta, 64, (32, 8, 128), DType::Fp8E4M3);
        let mut half = step;
        half.decode_bytes /= 2.0;
        assert_eq!(fp8, prefill_sms(MixedPartition::Auto, &h, &half));
        assert_eq!(mixed_prefill_sms(MixedPartition::Auto, &h, &meta, 66, (32, 8, 128), DType::BF16), 0);
        assert_eq!(mixed_prefill_sms(MixedPartition::Auto, &h, &meta, 0, (32, 8, 128), DType::BF16), 0);
        assert_eq!(mixed_prefill_sms(MixedPartition::Sms(9), &h, &meta, 64, (32, 8, 128), DType::BF16), 9);
    }

    #[test]
    fn parse_and_env_forms() {
        assert_eq!(MixedPartition::parse(""), Some(MixedPartition::Auto));
        assert_eq!(MixedPartition::parse(" AUTO "), Some(MixedPartition::Auto));
        assert_eq!(MixedPartition::parse("off"), Some(MixedPartition::Off));
        assert_eq!(MixedPartition::parse("0"), Some(MixedPartition::Off));
        assert_eq!(MixedPartition::parse("66"), Some(MixedPartition::Sms(66)));
        assert_eq!(MixedPartition::parse("99999999999999999999999"), Some(MixedPartition::Sms(usize::MAX)));
        assert_eq!(MixedPartition::parse("-3"), None);
        assert_eq!(MixedPartition::parse("half"), None);
        assert_eq!(from_var(Err(std::env::VarError::NotPresent)).unwrap(), MixedPartition::Auto);
        assert_eq!(from_var(Ok("12".into())).unwrap(), MixedPartition::Sms(12));
        let e = from_var(Ok("most".into())).unwrap_err().to_string();
        assert!(e.contains("PAGED_ATTN_MIXED_PARTITION=`most`"), "{e}");
    }

    #[test]
    fn rates_fall_back_per_attribute() {
        let r = DeviceRates::from_attributes(0, 0, 0, 0);
        assert_eq!(r, DeviceRates::H200);
        let r = DeviceRates::from_attributes(114, 1_755_000, 2_619_000, 5120);
        assert_eq!(r.num_sms, 114);
        assert!((r.sm_clock_hz - 1.755e9).abs() < 1.0);
        assert!((r.dram_bytes_per_s - 2.619e9 * 2.0 * 640.0).abs() < 1e3);
    }
}
