//! One step's attention metadata on the device, uploaded once and shared by every layer.

use attention_kernels::attention::{
    self as kernels, decode_heads_per_block, decode_max_group, decode_tile_keys, decode_workspace_len, AttentionKernel,
    DecodeVariant,
};
use attention_kernels::{DType, Element, KvStorage};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaSlice};
use std::sync::{Arc, OnceLock};

use super::{driver_error, CudaDevice, DeviceSlotMapping};
use crate::error::Result;
use crate::metadata::AttentionMetadata;
use crate::partition::{mixed_prefill_sms, DeviceRates, MixedPartition};

/// How one attention call splits the batch between the two kernels, decided on the host from the
/// batch shape alone (so a CUDA graph captured for a shape replays the same launches).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitPlan {
    /// Requests `0..decode_reqs` run on the split-KV decode kernel (single-token decodes).
    pub decode_reqs: usize,
    /// Partitions of each decode request's keys (1 = no combine step).
    pub num_splits: usize,
    /// Longest query among requests `decode_reqs..num_reqs` (they run on the prefill kernel).
    pub prefill_max_query_len: usize,
    /// Floats of workspace the decode partials need.
    pub workspace_len: usize,
    /// SMs the prefill part of a mixed step is confined to, launched before the decode part (0:
    /// no partition), planned for the warp-specialised prefill and the process's
    /// [`MixedPartition`] setting ([`crate::cuda::MIXED_PARTITION_ENV`]); a launch whose prefill
    /// runs on another kernel keeps the decode-first order.
    pub prefill_sms: usize,
}

/// A step's [`AttentionMetadata`] in device memory: `query_start_loc`, `seq_lens`, the block table
/// (all `i32`) and the slot mapping (`i64`, as a [`DeviceSlotMapping`]), plus the host copy and the
/// host-side facts the split plan needs.
///
/// Upload it once per step with [`DeviceMetadata::upload`] and pass it to every layer's
/// [`super::forward`] / [`super::paged_attention`]. The metadata is checked against itself at
/// upload ([`AttentionMetadata::check`]); each call checks it against that layer's cache.
#[derive(Debug)]
pub struct DeviceMetadata {
    pub(crate) host: AttentionMetadata,
    query_start_loc: CudaSlice<i32>,
    seq_lens: CudaSlice<i32>,
    block_table: CudaSlice<i32>,
    slot_mapping: DeviceSlotMapping,
    num_sms: usize,
    /// K/V bytes each SM keeps in flight at its share of the bandwidth ([`device_saturation_bytes`]).
    saturation: usize,
    /// The device figures of the mixed-step partition.
    rates: DeviceRates,
    /// Leading requests with exactly one query token.
    single_token_decodes: usize,
    /// Longest sequence among those.
    decode_max_seq_len: usize,
    /// Longest query after them.
    rest_max_query_len: usize,
    /// The mixed-step partition planned for the first attention shape asked about (query heads,
    /// KV heads, head size, cache type) and its SM count: every layer of a model usually shares
    /// one shape, so the others reuse it instead of running the cost model again.
    partition: OnceLock<((usize, usize, usize, DType), usize)>,
}

fn upload_i32(dev: &CudaDevice, data: &[i32]) -> Result<CudaSlice<i32>> {
    let r = if data.is_empty() { dev.stream().alloc_zeros::<i32>(1) } else { dev.stream().clone_htod(data) };
    r.map_err(|e| driver_error("DeviceMetadata::upload", e))
}

impl DeviceMetadata {
    /// Checks `meta` against itself and copies its arrays to the device (asynchronously, on the
    /// device's stream).
    ///
    /// # Errors
    /// [`crate::AttentionError::InvalidMetadata`] from [`AttentionMetadata::check`];
    /// [`crate::AttentionError::Cuda`] on a driver failure.
    pub fn upload(dev: &CudaDevice, meta: &AttentionMetadata) -> Result<Self> {
        meta.check()?;
        let num_sms = dev
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver_error("DeviceMetadata::upload", e))?
            .max(1) as usize;
        let single_token_decodes = (0..meta.num_decodes).take_while(|&r| meta.query_len(r) == 1).count();
        let decode_max_seq_len =
            meta.seq_lens[..single_token_decodes].iter().copied().max().unwrap_or(0).max(0) as usize;
        let rest_max_query_len = (single_token_decodes..meta.num_reqs()).map(|r| meta.query_len(r)).max().unwrap_or(0);
        Ok(DeviceMetadata {
            query_start_loc: upload_i32(dev, &meta.query_start_loc)?,
            seq_lens: upload_i32(dev, &meta.seq_lens)?,
            block_table: upload_i32(dev, meta.block_table.as_slice())?,
            slot_mapping: DeviceSlotMapping::upload(dev, &meta.slot_mapping)?,
            host: meta.clone(),
            num_sms,
            saturation: saturation_with_sms(dev.context(), num_sms),
            rates: device_rates(dev.context(), num_sms),
            single_token_decodes,
            decode_max_seq_len,
            rest_max_query_len,
            partition: OnceLock::new(),
        })
    }

    /// The host copy.
    pub fn host(&self) -> &AttentionMetadata {
        &self.host
    }

    /// The slot mapping on the device (for [`super::kv_cache_update`]).
    pub fn slot_mapping(&self) -> &DeviceSlotMapping {
        &self.slot_mapping
    }

    /// `[num_reqs + 1]` on the device (at least one element).
    pub fn query_start_loc(&self) -> &CudaSlice<i32> {
        &self.query_start_loc
    }

    /// `[num_reqs]` on the device (at least one element).
    pub fn seq_lens(&self) -> &CudaSlice<i32> {
        &self.seq_lens
    }

    /// `[num_reqs, max_blocks_per_req]` on the device (at least one element).
    pub fn block_table(&self) -> &CudaSlice<i32> {
        &self.block_table
    }

    /// Streaming multiprocessors of the device it was uploaded to.
    pub fn num_sms(&self) -> usize {
        self.num_sms
    }

    /// The launch plan for a layer with these heads over a cache of the compute type (bf16 /
    /// f16: both have the same decode occupancy); [`Self::split_plan_for_cache`] for FP8 caches.
    pub fn split_plan(&self, num_heads: usize, num_kv_heads: usize, head_size: usize) -> SplitPlan {
        self.split_plan_for_cache(num_heads, num_kv_heads, head_size, DType::BF16)
    }

    /// The launch plan for a layer with these heads over a cache of `cache_dtype` elements (the
    /// compute type's, or an FP8 format).
    ///
    /// Single-token decodes at the front of the batch go to the split-KV kernel when it supports
    /// the head size and GQA group. The decode kernel runs one block per (request, kv head, chunk
    /// of up to 16 query heads, split); the split count (at most 64, at least four key tiles per
    /// split) minimises a wave-quantisation cost model of that grid, see [`decode_split_count`],
    /// with the blocks per SM the runtime reports for the decode kernel that will run (the process
    /// variant, the cache type), of which only as many count as add bandwidth (see
    /// [`decode_slots_per_sm`]). Everything else goes to the prefill kernel.
    pub fn split_plan_for_cache(
        &self,
        num_heads: usize,
        num_kv_heads: usize,
        head_size: usize,
        cache_dtype: DType,
    ) -> SplitPlan {
        let group = num_heads / num_kv_heads.max(1);
        let decode_ok = group >= 1 && group <= decode_max_group(head_size);
        let num_reqs = self.host.num_reqs();
        if !decode_ok || self.single_token_decodes == 0 {
            return SplitPlan {
                decode_reqs: 0,
                num_splits: 1,
                prefill_max_query_len: self.host.max_query_len,
                workspace_len: 0,
                prefill_sms: 0,
            };
        }
        let n = self.single_token_decodes;
        let blocks = n * num_kv_heads.max(1) * group.div_ceil(decode_heads_per_block(head_size).max(1));
        let tile = decode_tile_keys(head_size).max(1);
        let (resident, slots) = decode_slots(self.seq_lens.context(), head_size, cache_dtype, self.saturation);
        let num_splits = decode_split_count(blocks, self.num_sms, resident, slots, self.decode_max_seq_len, tile);
        // A malformed PAGED_ATTN_MIXED_PARTITION fails the mixed launches themselves; planning no
        // partition until then changes nothing.
        let prefill_sms = match MixedPartition::process() {
            Ok(setting) if n < num_reqs => {
                let key = (num_heads, num_kv_heads, head_size, cache_dtype);
                let plan =
                    || mixed_prefill_sms(setting, &self.rates, &self.host, n, (key.0, key.1, key.2), cache_dtype);
                let &(first, sms) = self.partition.get_or_init(|| (key, plan()));
                if first == key {
                    sms
                } else {
                    plan()
                }
            }
            _ => 0,
        };
        SplitPlan {
            decode_reqs: n,
            num_splits,
            prefill_max_query_len: if n < num_reqs { self.rest_max_query_len } else { 0 },
            workspace_len: decode_workspace_len(num_splits, n, num_heads, head_size),
            prefill_sms,
        }
    }
}

/// The figures the mixed-step partition scales its model by, from `ctx`'s device attributes.
pub(crate) fn device_rates(ctx: &Arc<CudaContext>, num_sms: usize) -> DeviceRates {
    DeviceRates::from_attributes(
        num_sms,
        device_attribute(ctx, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLOCK_RATE),
        device_attribute(ctx, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE),
        device_attribute(ctx, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH),
    )
}

/// Whether a prefill of `dtype` over a cache of `cache_dtype` runs on the warp-specialised kernel
/// on `ctx`'s device (the process's prefill path, the device and the head size decide too): the
/// only prefill with a persistent grid a mixed step's partition can cap.
pub(crate) fn ws_prefill(ctx: &Arc<CudaContext>, head_size: usize, dtype: DType, cache_dtype: DType) -> bool {
    matches!(kernels::prefill_kernel_for_cache(ctx, head_size, dtype, cache_dtype), Ok(kernels::PrefillKernel::Sm90Ws))
}

/// The SMs a planned partition (`planned`, 0 for none) confines a mixed step's prefill part to as
/// it is launched: `planned` where the two parts overlap on two streams and the prefill of `T` over
/// `C` runs on the warp-specialised kernel (a cache of another type than the one planned for may
/// not), else 0, and the step keeps the decode-first order.
pub(crate) fn launched_prefill_sms<T: Element, C: KvStorage<T>>(
    dev: &CudaDevice,
    head_size: usize,
    planned: usize,
    overlapping: bool,
) -> usize {
    if planned > 0 && overlapping && ws_prefill(dev.context(), head_size, T::DTYPE, C::DTYPE) {
        planned
    } else {
        0
    }
}

/// The decode blocks per SM that add bandwidth ([`decode_slots_per_sm`]) for the decode kernel that
/// will run on `ctx`'s device: the process's [`kernels::decode_variant`] over a cache of
/// `cache_dtype` (f16 and bf16 share their kernels' shapes; FP8 caches have a pipeline of their
/// own), with the occupancy the runtime reports, or [`decode_blocks_per_sm`] if it cannot be asked,
/// against the `saturation` bytes in flight the device's SMs need ([`device_saturation_bytes`]).
///
/// Returns `(resident, slots)`: the blocks per SM the runtime reports and the
/// [`decode_slots_per_sm`] among them, as [`decode_split_count`] takes them.
pub(crate) fn decode_slots(
    ctx: &Arc<CudaContext>,
    head_size: usize,
    cache_dtype: DType,
    saturation: usize,
) -> (usize, usize) {
    let probe = AttentionKernel::Decode { num_splits: 1, split_keys: 0 };
    let compute = if cache_dtype.is_fp8() { DType::BF16 } else { cache_dtype };
    // A malformed PAGED_ATTN_DECODE_VARIANT fails the decode launches themselves (and
    // StepPlanner::new); planning for the default variant until then changes nothing.
    let variant = kernels::decode_variant().unwrap_or_default();
    let per_sm = kernels::blocks_per_sm_for_cache(ctx, probe, variant, head_size, compute, cache_dtype)
        .ok()
        .filter(|&b| b > 0)
        .unwrap_or_else(|| decode_blocks_per_sm(head_size));
    (per_sm, decode_variant_slots(per_sm, variant, head_size, compute, cache_dtype, saturation))
}

/// [`decode_slots_per_sm`] for the decode kernel of `variant` over a `cache_dtype` cache with
/// `per_sm` resident blocks, on a device whose SMs each need `saturation` bytes in flight
/// ([`device_saturation_bytes`]; [`DECODE_SATURATION_BYTES`] is the H200's figure).
pub fn decode_variant_slots(
    per_sm: usize,
    variant: DecodeVariant,
    head_size: usize,
    compute: DType,
    cache_dtype: DType,
    saturation: usize,
) -> usize {
    kernels::decode_bytes_in_flight(variant, head_size, compute, cache_dtype)
        .map_or(per_sm, |bytes| decode_slots_per_sm(per_sm, bytes, saturation))
}

/// Decode blocks resident on one SM (shared memory bound: 3 stages of 64-key K/V tiles up to head
/// size 128, 2 stages above): the fallback where the device's occupancy cannot be queried (the
/// planner asks the runtime, see `attention_kernels::attention::blocks_per_sm`).
pub(crate) fn decode_blocks_per_sm(head_size: usize) -> usize {
    match head_size {
        0..=80 => 3,
        81..=192 => 2,
        _ => 1,
    }
}

/// K/V bytes an SM needs outstanding to read at its share of the memory bandwidth. Measured on the
/// H200: one bf16 block of the default pipeline (64 KiB in flight at head size 128) per SM read as
/// fast as two (b16 x 16384: 0.2731 ms with one split, 0.2743 with two; b1 x 32768: 16 splits,
/// one block on each of 128 SMs, 0.0488 ms against 0.0518 for 32), while the FP8 pipeline's blocks
/// (16 KiB each) needed all four slots (b16 x 16384: 0.1509 ms with 4 splits, 0.1530 with 3).
/// By Little's law 64 KiB covers about 2 us of latency at an SM's 1/132 share of 4.3 TB/s.
/// Other devices scale it by their own bandwidth per SM ([`decode_saturation_bytes`]); this is
/// the figure where the device's attributes cannot be read.
pub const DECODE_SATURATION_BYTES: usize = 64 * 1024;

/// The load latency, in seconds, that the bytes an SM keeps in flight must cover (Little's law:
/// bytes in flight = bandwidth x latency). Chosen so that the H200's own attributes (memory clock
/// 3201 MHz, 6144-bit bus: 4.92 TB/s peak, 132 SMs) give 62 KiB, which yields the same slot
/// count as the measured [`DECODE_SATURATION_BYTES`] for every decode pipeline (a unit test
/// checks each), so the plans measured on the H200 do not move.
pub const DECODE_LOAD_LATENCY_S: f64 = 1.7e-6;

/// K/V bytes each SM must keep in flight to read at its share of a device's peak DRAM bandwidth:
/// `mem_clock_khz` (the memory clock, double data rate) times `bus_width_bits`, divided among
/// `num_sms`, over [`DECODE_LOAD_LATENCY_S`]. Clamped to 16-256 KiB (a report outside that is not
/// a memory system this kernel was measured on); [`DECODE_SATURATION_BYTES`] when an attribute is
/// zero.
///
/// The latency is the H200's; on other devices the figure follows their bandwidth per SM (an
/// H100 SXM: 3.35 TB/s on 132 SMs, 42 KiB; an A100: 2.0 TB/s on 108 SMs, 31 KiB), which no run
/// has measured yet.
pub fn decode_saturation_bytes(mem_clock_khz: usize, bus_width_bits: usize, num_sms: usize) -> usize {
    if mem_clock_khz == 0 || bus_width_bits == 0 || num_sms == 0 {
        return DECODE_SATURATION_BYTES;
    }
    let bytes_per_s = mem_clock_khz as f64 * 1e3 * 2.0 * bus_width_bits as f64 / 8.0;
    let bytes = bytes_per_s / num_sms as f64 * DECODE_LOAD_LATENCY_S;
    (bytes as usize).clamp(16 * 1024, 256 * 1024)
}

/// [`decode_saturation_bytes`] from `ctx`'s device attributes, or [`DECODE_SATURATION_BYTES`]
/// where the driver does not report them.
pub fn device_saturation_bytes(ctx: &Arc<CudaContext>) -> usize {
    saturation_with_sms(ctx, device_attribute(ctx, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT))
}

/// [`device_saturation_bytes`] for a caller that has already read the SM count.
pub(crate) fn saturation_with_sms(ctx: &Arc<CudaContext>, num_sms: usize) -> usize {
    decode_saturation_bytes(
        device_attribute(ctx, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE),
        device_attribute(ctx, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH),
        num_sms,
    )
}

/// A device attribute, 0 where the driver does not report it.
fn device_attribute(ctx: &Arc<CudaContext>, attr: CUdevice_attribute) -> usize {
    ctx.attribute(attr).ok().and_then(|v| usize::try_from(v).ok()).unwrap_or(0)
}

/// Of `per_sm` resident decode blocks that each keep `bytes_in_flight` bytes of K/V outstanding,
/// the number that add bandwidth: enough to reach `saturation` bytes per SM
/// ([`device_saturation_bytes`]), at least one, at most `per_sm`. Blocks past that share the SM's
/// bytes per second, so they finish no sooner together than one after another: the split
/// planner's waves count these slots, not `per_sm`.
pub fn decode_slots_per_sm(per_sm: usize, bytes_in_flight: usize, saturation: usize) -> usize {
    let per_sm = per_sm.max(1);
    if bytes_in_flight == 0 {
        return per_sm;
    }
    saturation.max(1).div_ceil(bytes_in_flight).clamp(1, per_sm)
}

/// Key-equivalents of time one more split adds to a (request, kv head) group: its partial (one f32
/// row of head size + 2 per query row) is written, then read back and merged by the group's last
/// block, at the tail of the launch where nothing overlaps it. Fitted on the H200 (b1 x 32768, FP8:
/// 24 splits 0.0456 ms, 32 0.0436, 48 0.0464, 64 0.0508, where a pure wave model prefers 64):
/// values from 19 to 43 order those four as measured, and the low end keeps the 2% rule below
/// from settling on fewer splits than the measured best (26 at 32 key-equivalents).
pub const SPLIT_MERGE_KEYS: f64 = 20.0;

/// The share of a wave that the drain at the end of a launch of several waves costs (see
/// [`decode_split_count`]). Fitted on the H100 (`bench_decode_variants --batches`, nineteenth
/// session, one split, bf16 b N x 4096): the read rate rose from 0.971 of a copy at 1.0 wave of
/// blocks (b33, 264 blocks on 132 SMs x 2) to 0.978 at 1.9 waves (b64) and 0.996 at 3.0 (b99),
/// which a fixed cost of 0.2-0.25 of a wave per launch matches.
pub const DECODE_TAIL_WAVES: f64 = 0.25;

/// Split count for `blocks` decode blocks (before splitting) on `num_sms` SMs that each hold
/// `resident` blocks at once, of which `slots` run at full speed (see [`decode_slots_per_sm`]),
/// the longest context `max_len` and `tile` keys per tile.
///
/// Cost of `s` splits = waves x (keys per block + one tile of start-up) + `s` x
/// [`SPLIT_MERGE_KEYS`], where the waves are counted two ways. A grid that is resident all at
/// once (at most `num_sms x resident` blocks) spreads evenly, so the busiest SM runs `L =
/// ceil(blocks * s / num_sms)` of them in `L / slots` waves, and a partial wave costs at least
/// nine tenths of a full one: an SM's byte rate grows with the blocks it holds (more loads in
/// flight, more warps to hide the latency of each), so an SM holding three of four blocks is not
/// 25% faster per block (FP8 b16 x 16384 on the H200: 3 splits filling 73% of the slots took 2.8%
/// longer than 4 filling 97%). A larger grid is bound by the device's bandwidth, not by its
/// busiest SM: the blocks left at the end have the memory system to themselves and run faster,
/// so the waves are `blocks * s / (num_sms * slots)` plus [`DECODE_TAIL_WAVES`] for the drain.
/// (Counting whole blocks per SM there chose 3-4 splits for 60-68 requests x 8 kv heads at 4096
/// keys on the H100, 5% slower than one split: 0.924-0.929 of a copy's rate against 0.98.) A
/// split must keep at least four tiles; at most 64 splits. The smallest `s` within 2% of the
/// best wins (fewer splits: less combine work).
pub fn decode_split_count(
    blocks: usize,
    num_sms: usize,
    resident: usize,
    slots: usize,
    max_len: usize,
    tile: usize,
) -> usize {
    let blocks = blocks.max(1);
    let num_sms = num_sms.max(1);
    let slots = slots.max(1);
    let resident = resident.max(slots);
    let max_splits = max_len.div_ceil(tile * 4).clamp(1, 64);
    let cost = |s: usize| -> f64 {
        let n = blocks * s;
        let waves = if n <= num_sms * resident {
            let load = n.div_ceil(num_sms);
            let full = (load / slots) as f64;
            let rem = (load % slots) as f64 / slots as f64;
            full + if rem > 0.0 { rem.max(0.9) } else { 0.0 }
        } else {
            n as f64 / (num_sms * slots) as f64 + DECODE_TAIL_WAVES
        };
        let keys = max_len.div_ceil(s).div_ceil(tile) * tile + tile;
        waves * keys as f64 + if s > 1 { s as f64 * SPLIT_MERGE_KEYS } else { 0.0 }
    };
    let best = (1..=max_splits).map(cost).fold(f64::INFINITY, f64::min);
    (1..=max_splits).find(|&s| cost(s) <= best * 1.02).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::{decode_saturation_bytes, decode_slots_per_sm, decode_split_count, DECODE_SATURATION_BYTES};

    #[test]
    fn slots_count_the_blocks_that_add_bandwidth() {
        // bf16, default pipeline, head 128: 64 KiB in flight, one block saturates an SM.
        let sat = DECODE_SATURATION_BYTES;
        assert_eq!(decode_slots_per_sm(2, 64 * 1024, sat), 1);
        // FP8 pipeline: 16 KiB a block, all four resident blocks count.
        assert_eq!(decode_slots_per_sm(4, 16 * 1024, sat), 4);
        // 48 KiB a block: two; never more than resident, never fewer than one.
        assert_eq!(decode_slots_per_sm(3, 48 * 1024, sat), 2);
        assert_eq!(decode_slots_per_sm(2, 1024, sat), 2);
        assert_eq!(decode_slots_per_sm(0, 1 << 20, sat), 1);
        assert_eq!(decode_slots_per_sm(3, 0, sat), 3);
        assert_eq!(decode_slots_per_sm(4, 16 * 1024, 0), 1);
    }

    /// Bytes in flight from the device's bandwidth: the H200's own attributes keep the slot count
    /// the measured constant gives for every decode pipeline, so the plans it was tuned on do not
    /// move; slower memories need fewer bytes per SM.
    #[test]
    fn saturation_follows_the_bandwidth_per_sm() {
        use attention_kernels::attention::{decode_bytes_in_flight, DecodeVariant};
        use attention_kernels::DType;
        // nvidia-smi's memory clock on the H200 (3201 MHz), 6144-bit bus, 132 SMs.
        let h200 = decode_saturation_bytes(3_201_000, 6144, 132);
        assert!(h200 > 48 * 1024 && h200 <= DECODE_SATURATION_BYTES, "{h200}");
        for head in [64, 80, 96, 112, 128, 160, 192, 256] {
            for cache in [DType::BF16, DType::Fp8E4M3] {
                for v in DecodeVariant::ALL {
                    let Ok(bytes) = decode_bytes_in_flight(v, head, DType::BF16, cache) else { continue };
                    for per_sm in 1..=8 {
                        let want = decode_slots_per_sm(per_sm, bytes, DECODE_SATURATION_BYTES);
                        assert_eq!(decode_slots_per_sm(per_sm, bytes, h200), want, "head {head} {cache:?} {v}");
                    }
                }
            }
        }
        // H100 SXM (2619 MHz, 5120 bits, 132 SMs) and A100 80GB (1593 MHz, 5120 bits, 108 SMs).
        let h100 = decode_saturation_bytes(2_619_000, 5120, 132);
        let a100 = decode_saturation_bytes(1_593_000, 5120, 108);
        assert_eq!(h100 / 1024, 42);
        assert_eq!(a100 / 1024, 31);
        assert_eq!(decode_slots_per_sm(4, 16 * 1024, h100), 3);
        // Unknown attributes fall back to the H200's measured figure.
        assert_eq!(decode_saturation_bytes(0, 6144, 132), DECODE_SATURATION_BYTES);
        assert_eq!(decode_saturation_bytes(3_201_000, 0, 132), DECODE_SATURATION_BYTES);
        assert_eq!(decode_saturation_bytes(3_201_000, 6144, 0), DECODE_SATURATION_BYTES);
        // Reports outside any measured memory system are clamped.
        assert_eq!(decode_saturation_bytes(1, 8, 1000), 16 * 1024);
        assert_eq!(decode_saturation_bytes(usize::MAX / 4, 8192, 1), 256 * 1024);
    }

    #[test]
    fn split_count_fills_the_device() {
        // bf16 at head 128 (two blocks resident per SM, one saturates it), 64 decodes x 8 kv
        // heads: 3.9 waves, no split.
        assert_eq!(decode_split_count(512, 132, 2, 1, 4096, 64), 1);
        // 33 decodes: every block resident at once, no drain; two splits measured 4% slower.
        assert_eq!(decode_split_count(264, 132, 2, 1, 4096, 64), 1);
        // 60, 67 and 100 / 133 decodes: a few blocks past whole waves are not worth splitting
        // every request for (counting whole blocks per SM chose 3, 4 and 2 splits; measured 5%
        // and 1-2% slower than one split on the H100).
        assert_eq!(decode_split_count(480, 132, 2, 1, 4096, 64), 1);
        assert_eq!(decode_split_count(536, 132, 2, 1, 4096, 64), 1);
        assert_eq!(decode_split_count(800, 132, 2, 1, 4096, 64), 1);
        assert_eq!(decode_split_count(1064, 132, 2, 1, 4096, 64), 1);
        // W4S2 (three resident, two to saturate an SM): 512 blocks are 1.9 waves, and two splits
        // shorten the drain (measured on the H100: 0.97 of a copy against 0.91-0.93 unsplit).
        assert_eq!(decode_split_count(512, 132, 3, 2, 4096, 64), 2);
        // 16 x 8 blocks, two slots per SM: two splits give every SM two blocks.
        assert_eq!(decode_split_count(128, 132, 2, 2, 16384, 64), 2);
        // ... but with one slot (bf16: one block saturates an SM) one split already fills it.
        assert_eq!(decode_split_count(128, 132, 2, 1, 16384, 64), 1);
        // One request, one slot: one block on each of 128 SMs (measured best on the H200).
        assert_eq!(decode_split_count(8, 132, 2, 1, 32768, 64), 16);
        // One request on FP8's four slots: 32 splits, not the 64 that would fill every slot,
        // whose merge tail costs more than the fuller wave saves (measured best on the H200).
        assert_eq!(decode_split_count(8, 132, 4, 4, 32768, 64), 32);
        // FP8's 4 blocks per SM: four splits fill the slots, three would leave a quarter empty.
        assert_eq!(decode_split_count(128, 132, 4, 4, 16384, 64), 4);
        // Short contexts are not split below four tiles.
        assert_eq!(decode_split_count(8, 132, 2, 2, 200, 64), 1);
        assert!(decode_split_count(1, 132, 2, 2, 1 << 20, 64) <= 64);
        // A resident count below the slots is read as the slots.
        assert_eq!(decode_split_count(128, 132, 0, 4, 16384, 64), 4);
    }
}
