//! Plan once per step, run once per layer: the CUDA side of the engine-facing API.
//!
//! An engine runs one step's batch through 30-80 layers, and often replays a decode step from a
//! captured CUDA graph. Everything that depends only on the step (checking the metadata against the
//! step contract, uploading it, choosing the split-KV plan) therefore happens once, in
//! [`StepPlanner::plan`]; each layer's [`StepPlan::run`] does O(1) checks on the layer's own buffers
//! and enqueues kernels, without allocating or synchronising.
//!
//! The planner owns the step's device metadata at fixed addresses (sized once for the largest
//! step it will see) and a pinned staging area the uploads go through, so a graph captured over
//! `run` reads each new step's metadata after the next `plan` without being captured again. In
//! graph mode ([`StepPlanner::plan_graph`]) the launch plan depends only on the padded batch size,
//! as vLLM's full decode graphs require.

use attention_kernels::attention::{
    self as kernels, decode_max_group, decode_tile_keys, decode_workspace_len, AttentionBuffers, AttentionDims,
    AttentionKernel, AttentionStrides, SideStream,
};
use attention_kernels::launch::{self, KvCacheMut, KvScales, KvWriteDims};
use attention_kernels::staging::Staging;
use attention_kernels::{DType, Element, KvStorage};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaEvent, CudaSlice, CudaView, CudaViewMut};

use super::metadata::{
    decode_slots, decode_split_count, device_rates, launched_prefill_sms, saturation_with_sms, ws_prefill,
};
use super::{driver_error, kernel_error, CudaDevice};
use crate::error::{AttentionError, Result};
use crate::layout::CacheLayout;
use crate::metadata::{AttentionMetadata, StepCheckScratch};
use crate::params::AttentionParams;
use crate::partition::{mixed_prefill_sms, DeviceRates, MixedPartition};

const OP: &str = "plan";

/// What a [`StepPlanner`] is built for: the attention shape every layer shares, the cache layout,
/// and the largest step it must hold. The capacities size the persistent device buffers; a step
/// over any of them is refused with [`AttentionError::InvalidArgument`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannerConfig {
    /// Query heads of every layer.
    pub num_heads: usize,
    /// Key/value heads of every layer (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_size: usize,
    /// The layout of every layer's cache (all layers share one shape).
    pub layout: CacheLayout,
    /// Most requests in one step (graph capture sizes included).
    pub max_num_reqs: usize,
    /// Most tokens (rows of query and output, padding included) in one step.
    pub max_num_tokens: usize,
    /// Columns of the block table: blocks of the longest sequence the engine admits.
    pub max_blocks_per_req: usize,
}

impl PlannerConfig {
    /// The longest sequence the planner's block table can describe.
    pub fn max_seq_len(&self) -> usize {
        self.max_blocks_per_req.saturating_mul(self.layout.block_size)
    }

    fn check(&self) -> Result<()> {
        self.layout.check()?;
        let bad = |what: String| Err(AttentionError::InvalidArgument { op: "StepPlanner::new", what });
        if self.num_heads == 0 || self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_heads ({}) must be a positive multiple of num_kv_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.num_kv_heads != self.layout.num_kv_heads || self.head_size != self.layout.head_size {
            return bad(format!(
                "the attention shape ({} kv heads, head size {}) differs from the cache's ({}, {})",
                self.num_kv_heads, self.head_size, self.layout.num_kv_heads, self.layout.head_size
            ));
        }
        if self.max_num_reqs == 0 || self.max_num_tokens == 0 || self.max_blocks_per_req == 0 {
            return bad("max_num_reqs, max_num_tokens and max_blocks_per_req must be positive".into());
        }
        // The kernels index tokens, requests and key positions with i32.
        let limit = i32::MAX as usize;
        if self.max_num_tokens > limit || self.max_num_reqs >= limit || self.max_seq_len() > limit {
            return bad("capacities must stay below 2^31 (tokens, requests, max_blocks_per_req * block_size)".into());
        }
        Ok(())
    }
}

/// The environment variable that turns on [`PlanOptions::batch_invariant`] for binaries built on
/// the planner: `1`, `true` or `on` (any case); `0`, `false`, `off` or unset leave it off.
pub const BATCH_INVARIANT_ENV: &str = "PAGED_ATTN_BATCH_INVARIANT";

/// Choices a [`StepPlanner`] makes once, at construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    /// In a step with both single-token decodes and prefills, run the decode kernel on a side
    /// stream beside the prefill kernel (fork and join by events, so graph capture works):
    /// decode is bound by memory bandwidth, prefill by the tensor cores. On by default; off, the
    /// two run back to back. Skipped where cudarc tracks events across streams on the context.
    pub overlap_mixed: bool,
    /// Every request's reduction order depends only on that request: decode splits cover a fixed
    /// number of keys (a constant of the planner, never a count derived from the batch), so a
    /// request's output and LSE are bit-identical whatever else is in its batch, in eager and graph
    /// plans alike (vLLM's `VLLM_BATCH_INVARIANT`; RL and evaluation users need it). The prefill
    /// kernels are batch-invariant by construction. Off by default: splits are then chosen for
    /// speed from the batch. Single-token decodes must lead the batch, as the model runner orders
    /// it. Run-to-run determinism holds in both modes (no floating-point atomics anywhere).
    pub batch_invariant: bool,
    /// The storage type of the caches the plans run over when it is not the compute type (an
    /// FP8 type): the decode kernel's occupancy, and so the split count, depends on it. `None`
    /// (the default) plans for a cache of the compute type; a plan still runs over any cache, only
    /// its split count may be less well chosen.
    pub kv_cache_dtype: Option<DType>,
    /// How a mixed step shares the SMs between its decode and prefill parts when they overlap
    /// ([`MixedPartition`]; needs `overlap_mixed` and the warp-specialised Hopper prefill).
    /// [`MixedPartition::Auto`] by default.
    pub mixed_partition: MixedPartition,
}

impl PlanOptions {
    /// The options [`BATCH_INVARIANT_ENV`] and [`MIXED_PARTITION_ENV`](super::MIXED_PARTITION_ENV) ask for.
    ///
    /// # Errors
    /// [`AttentionError::InvalidArgument`] for a value that is not a switch, or not a partition
    /// ([`MixedPartition::parse`]).
    pub fn from_env() -> Result<Self> {
        let switch = |v: &str| match v.trim().to_ascii_lowercase().as_str() {
            "" | "0" | "false" | "off" => Some(false),
            "1" | "true" | "on" => Some(true),
            _ => None,
        };
        let on =
            attention_kernels::env_setting::read(std::env::var(BATCH_INVARIANT_ENV), false, switch).map_err(|v| {
                AttentionError::InvalidArgument {
                    op: "PlanOptions::from_env",
                    what: format!("{BATCH_INVARIANT_ENV}=`{v}`: expected 1/true/on or 0/false/off"),
                }
            })?;
        Ok(PlanOptions { batch_invariant: on, mixed_partition: MixedPartition::from_env()?, ..PlanOptions::default() })
    }
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            overlap_mixed: true,
            batch_invariant: false,
            kv_cache_dtype: None,
            mixed_partition: MixedPartition::Auto,
        }
    }
}

/// Keys per decode split in batch-invariant mode: 1024 (16 tiles; splits that long keep the
/// combine's share of the bytes small), or more where the planner admits sequences so long that
/// 1024-key splits would pass 64 per request, rounded to the decode kernel's tile.
fn invariant_split_keys(config: &PlannerConfig) -> usize {
    let tile = decode_tile_keys(config.head_size).max(1);
    config.max_seq_len().div_ceil(64).max(1024).div_ceil(tile) * tile
}

/// How one planned step is launched, per layer. In graph mode two plans of the same padded batch
/// size are equal, which is what lets one captured graph serve both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchPlan {
    /// Requests launched over (the padded count in graph mode).
    pub num_reqs: usize,
    /// Rows of query / output / lse the layers pass (padding included).
    pub num_tokens: usize,
    /// Requests `0..decode_reqs` run on the split-KV decode kernel.
    pub decode_reqs: usize,
    /// Partitions of each decode request's keys (1 = no combine).
    pub num_splits: usize,
    /// Keys per decode split in batch-invariant mode (0: keys divided evenly into `num_splits`).
    pub split_keys: usize,
    /// Longest query among requests `decode_reqs..num_reqs` (0 when there are none).
    pub prefill_max_query_len: usize,
    /// Floats of split-KV workspace the decode partials use.
    pub workspace_len: usize,
    /// SMs the prefill part of a mixed step is confined to, launched before the decode part so
    /// that the decode runs on the other SMs from the start (0: no partition, the decode part
    /// first). See [`MixedPartition`].
    pub prefill_sms: usize,
    /// Planned by [`StepPlanner::plan_graph`].
    pub graph: bool,
}

/// One device's per-step planner: persistent device metadata, the pinned staging it is uploaded
/// through, the split-KV workspace, and the launch plan of the current step. Create one per
/// engine (per device and attention shape) and call [`StepPlanner::plan`] once per step.
#[derive(Debug)]
pub struct StepPlanner {
    dev: CudaDevice,
    config: PlannerConfig,
    num_sms: usize,
    /// Decode blocks resident per SM and those among them that add bandwidth, for the selected
    /// decode variant and cache type (`metadata::decode_slots`): the split planner's figures.
    decode_slots: (usize, usize),
    options: PlanOptions,
    /// The stream the decode part of a mixed step runs on (`None` without `overlap_mixed`).
    side: Option<SideStream>,
    /// Keys per decode split in batch-invariant mode (0 otherwise): a constant of the planner.
    split_keys: usize,
    /// The device figures the mixed-step partition is planned with.
    rates: DeviceRates,
    /// Whether prefills of the planned cache type run on the warp-specialised kernel (the only
    /// one with a persistent grid a mixed step's partition can cap).
    ws_prefill: bool,
    query_start_loc: CudaSlice<i32>,
    seq_lens: CudaSlice<i32>,
    block_table: CudaSlice<i32>,
    slot_mapping: CudaSlice<i64>,
    workspace: CudaSlice<f32>,
    /// `query_start_loc`, `seq_lens` and the block table, back to back, staged for one upload each.
    staging_i32: Staging<i32>,
    staging_i64: Staging<i64>,
    /// Recorded after each step's uploads; waited on before the staging area is written again, so
    /// a step never overwrites bytes the previous step's copies still read.
    uploaded: CudaEvent,
    /// The contract check's per-block scratch, kept so a step allocates nothing.
    scratch: StepCheckScratch,
    launch: Option<LaunchPlan>,
}

fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    dev: &CudaDevice,
    len: usize,
) -> Result<CudaSlice<T>> {
    dev.stream().alloc_zeros::<T>(len.max(1)).map_err(|e| driver_error("StepPlanner::new", e))
}

impl StepPlanner {
    /// Allocates the planner's device buffers, staging area and workspace, once.
    ///
    /// # Errors
    /// [`AttentionError::InvalidArgument`] for an inconsistent config or a
    /// `PAGED_ATTN_DECODE_VARIANT` that names no decode variant,
    /// [`AttentionError::UnsupportedHeadSize`] for a head size no kernel is compiled for,
    /// [`AttentionError::Cuda`] when an allocation fails (see [`AttentionError::is_out_of_memory`]).
    pub fn new(dev: &CudaDevice, config: PlannerConfig) -> Result<Self> {
        StepPlanner::with_options(dev, config, PlanOptions::default())
    }

    /// [`StepPlanner::new`] with [`PlanOptions`] (the batch-invariant mode).
    ///
    /// # Errors
    /// As [`StepPlanner::new`].
    pub fn with_options(dev: &CudaDevice, config: PlannerConfig, options: PlanOptions) -> Result<Self> {
        config.check()?;
        // Refused here, once, rather than at the first decode launch of some later step.
        attention_kernels::attention::decode_variant().map_err(|e| kernel_error("StepPlanner::new", e))?;
        if decode_tile_keys(config.head_size) == 0 {
            return Err(AttentionError::UnsupportedHeadSize {
                op: "StepPlanner::new",
                backend: "cuda",
                head_size: config.head_size,
                supported: "64, 80, 96, 112, 128, 192, 256",
            });
        }
        let num_sms = dev
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver_error("StepPlanner::new", e))?
            .max(1) as usize;
        let overflow = || AttentionError::InvalidArgument {
            op: "StepPlanner::new",
            what: "max_num_reqs * max_blocks_per_req overflows".into(),
        };
        let table = config.max_num_reqs.checked_mul(config.max_blocks_per_req).ok_or_else(overflow)?;
        let staged = table.checked_add(2 * config.max_num_reqs + 1).ok_or_else(overflow)?;
        let ws_prefill =
            ws_prefill(dev.context(), config.head_size, DType::BF16, options.kv_cache_dtype.unwrap_or(DType::BF16));
        let decode_slots = decode_slots(
            dev.context(),
            config.head_size,
            options.kv_cache_dtype.unwrap_or(DType::BF16),
            saturation_with_sms(dev.context(), num_sms),
        );
        let mut planner = StepPlanner {
            dev: dev.clone(),
            config,
            num_sms,
            decode_slots,
            options,
            side: if options.overlap_mixed {
                Some(SideStream::new(dev.context()).map_err(|e| kernel_error("StepPlanner::new", e))?)
            } else {
                None
            },
            split_keys: if options.batch_invariant { invariant_split_keys(&config) } else { 0 },
            rates: device_rates(dev.context(), num_sms),
            ws_prefill,
            query_start_loc: alloc(dev, config.max_num_reqs + 1)?,
            seq_lens: alloc(dev, config.max_num_reqs)?,
            block_table: alloc(dev, table)?,
            slot_mapping: alloc(dev, config.max_num_tokens)?,
            workspace: alloc(dev, 1)?,
            staging_i32: Staging::new(dev.context(), staged).map_err(|e| kernel_error("StepPlanner::new", e))?,
            staging_i64: Staging::new(dev.context(), config.max_num_tokens)
                .map_err(|e| kernel_error("StepPlanner::new", e))?,
            uploaded: dev.context().new_event(None).map_err(|e| driver_error("StepPlanner::new", e))?,
            scratch: StepCheckScratch::new(),
            launch: None,
        };
        let ws = planner.workspace_capacity();
        if ws > 1 {
            planner.workspace = alloc(dev, ws)?;
        }
        Ok(planner)
    }

    /// The configuration it was built for.
    pub fn config(&self) -> &PlannerConfig {
        &self.config
    }

    /// The device it plans for.
    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// The current step's launch plan (`None` before the first [`StepPlanner::plan`]).
    pub fn launch_plan(&self) -> Option<LaunchPlan> {
        self.launch
    }

    /// Floats of split-KV workspace the planner keeps: enough for the split count the cost model
    /// picks for any batch up to `max_num_reqs` at the longest context (graph plans use exactly
    /// that); eager plans are capped to it.
    fn workspace_capacity(&self) -> usize {
        let c = &self.config;
        if decode_max_group(c.head_size) < c.num_heads / c.num_kv_heads {
            return 0;
        }
        if self.split_keys > 0 {
            let splits = c.max_seq_len().div_ceil(self.split_keys);
            return decode_workspace_len(splits, c.max_num_reqs, c.num_heads, c.head_size);
        }
        (1..=c.max_num_reqs)
            .map(|n| decode_workspace_len(self.split_count(n, c.max_seq_len()), n, c.num_heads, c.head_size))
            .max()
            .unwrap_or(0)
    }

    /// The options it was built with.
    pub fn options(&self) -> PlanOptions {
        self.options
    }

    /// Split-KV partitions for `n` single-token decodes whose longest context is `max_len`.
    fn split_count(&self, n: usize, max_len: usize) -> usize {
        let c = &self.config;
        let group = c.num_heads / c.num_kv_heads;
        let blocks = n * c.num_kv_heads * group.div_ceil(kernels::decode_heads_per_block(c.head_size).max(1));
        let tile = decode_tile_keys(c.head_size).max(1);
        let (resident, slots) = self.decode_slots;
        decode_split_count(blocks, self.num_sms, resident, slots, max_len, tile)
    }

    /// Checks the step against the step contract and the planner's capacities, uploads its
    /// metadata into the persistent buffers, and plans its launches for speed (split counts from the
    /// step's actual lengths). Call once per step, before the layers' [`StepPlan::run`].
    ///
    /// Host cost: the contract check (linear in tokens and used blocks), one copy into pinned
    /// memory, two asynchronous uploads. It waits only for the previous step's uploads to have left
    /// the staging area, never for kernels.
    ///
    /// # Errors
    /// The metadata's own errors ([`AttentionMetadata::check`], [`AttentionMetadata::check_against`]),
    /// [`AttentionError::InvalidArgument`] when the step exceeds a capacity of the
    /// [`PlannerConfig`], [`AttentionError::Cuda`] when an upload fails. On error the previous
    /// plan is forgotten: [`StepPlanner::launch_plan`] is `None` until a plan succeeds.
    pub fn plan(&mut self, meta: &AttentionMetadata) -> Result<StepPlan<'_>> {
        let _span = tracing::debug_span!("plan", reqs = meta.num_reqs(), tokens = meta.num_tokens()).entered();
        self.launch = None;
        self.check_step(meta)?;
        let num_reqs = meta.num_reqs();
        let c = self.config;
        let decode_ok = decode_max_group(c.head_size) >= c.num_heads / c.num_kv_heads;
        let single = if decode_ok { (0..meta.num_decodes).take_while(|&r| meta.query_len(r) == 1).count() } else { 0 };
        let mut launch = LaunchPlan {
            num_reqs,
            num_tokens: meta.num_tokens(),
            decode_reqs: single,
            num_splits: 1,
            split_keys: self.split_keys,
            prefill_max_query_len: (single..num_reqs).map(|r| meta.query_len(r)).max().unwrap_or(0),
            workspace_len: 0,
            prefill_sms: 0,
            graph: false,
        };
        if single > 0 {
            let max_len = meta.seq_lens[..single].iter().copied().max().unwrap_or(0).max(0) as usize;
            let s = if self.split_keys > 0 {
                // Enough fixed-size splits for the longest request; the workspace was sized for
                // the longest sequence the planner admits, so this always fits.
                max_len.div_ceil(self.split_keys).max(1)
            } else {
                let mut s = self.split_count(single, max_len);
                while s > 1 && decode_workspace_len(s, single, c.num_heads, c.head_size) > self.workspace.len() {
                    s -= 1;
                }
                s
            };
            launch.num_splits = s;
            launch.workspace_len = decode_workspace_len(s, single, c.num_heads, c.head_size);
        }
        if single > 0 && single < num_reqs && self.side.is_some() && self.ws_prefill {
            let kv_dtype = self.options.kv_cache_dtype.unwrap_or(DType::BF16);
            let heads = (c.num_heads, c.num_kv_heads, c.head_size);
            launch.prefill_sms =
                mixed_prefill_sms(self.options.mixed_partition, &self.rates, meta, single, heads, kv_dtype);
            tracing::debug!(prefill_sms = launch.prefill_sms, "mixed step");
        }
        self.upload(meta, num_reqs, launch.num_tokens)?;
        self.launch = Some(launch);
        Ok(StepPlan { planner: self, launch })
    }

    /// [`StepPlanner::plan`] for a decode-only step replayed from a CUDA graph captured for
    /// `padded_reqs` requests: every request must decode exactly one token; the metadata is padded
    /// to `padded_reqs` requests and tokens the way vLLM pads graph batches (`query_start_loc`
    /// repeating its last value, `seq_lens` 0, slots -1; padded requests compute nothing and write
    /// nothing), and the launch plan depends on `padded_reqs` alone (split count chosen for the
    /// longest context the planner admits), so every step of that size launches identically.
    ///
    /// # Errors
    /// As [`StepPlanner::plan`]; [`AttentionError::InvalidArgument`] when a request is not a
    /// single-token decode, when the step has more requests or tokens than `padded_reqs`, or when
    /// `padded_reqs` exceeds the planner's capacities; [`AttentionError::Unsupported`] when the
    /// decode kernel cannot take this attention shape.
    pub fn plan_graph(&mut self, meta: &AttentionMetadata, padded_reqs: usize) -> Result<StepPlan<'_>> {
        let _span = tracing::debug_span!("plan_graph", reqs = meta.num_reqs(), padded = padded_reqs).entered();
        self.launch = None;
        self.check_step(meta)?;
        let c = self.config;
        let bad = |what: String| Err(AttentionError::InvalidArgument { op: "plan_graph", what });
        if let Some(r) = (0..meta.num_reqs()).find(|&r| meta.query_len(r) != 1) {
            return bad(format!(
                "request {r} schedules {} tokens; graph mode serves single-token decodes",
                meta.query_len(r)
            ));
        }
        if padded_reqs < meta.num_reqs() || padded_reqs < meta.num_tokens() {
            return bad(format!(
                "padded size {padded_reqs} is smaller than the step ({} requests, {} tokens)",
                meta.num_reqs(),
                meta.num_tokens()
            ));
        }
        if padded_reqs > c.max_num_reqs || padded_reqs > c.max_num_tokens {
            return bad(format!(
                "padded size {padded_reqs} exceeds the planner's capacity ({} requests, {} tokens)",
                c.max_num_reqs, c.max_num_tokens
            ));
        }
        if decode_max_group(c.head_size) < c.num_heads / c.num_kv_heads {
            return Err(AttentionError::Unsupported {
                op: "plan_graph",
                backend: "cuda",
                what: format!(
                    "graph mode for GQA group {} at head size {} (the decode kernel takes at most {})",
                    c.num_heads / c.num_kv_heads,
                    c.head_size,
                    decode_max_group(c.head_size)
                ),
            });
        }
        let num_splits = if self.split_keys > 0 {
            c.max_seq_len().div_ceil(self.split_keys).max(1)
        } else {
            self.split_count(padded_reqs, c.max_seq_len())
        };
        let launch = LaunchPlan {
            num_reqs: padded_reqs,
            num_tokens: padded_reqs,
            decode_reqs: padded_reqs,
            num_splits,
            split_keys: self.split_keys,
            prefill_max_query_len: 0,
            workspace_len: decode_workspace_len(num_splits, padded_reqs, c.num_heads, c.head_size),
            prefill_sms: 0,
            graph: true,
        };
        self.upload(meta, padded_reqs, padded_reqs)?;
        self.launch = Some(launch);
        Ok(StepPlan { planner: self, launch })
    }

    /// The contract and capacity checks shared by both plan modes.
    fn check_step(&mut self, meta: &AttentionMetadata) -> Result<()> {
        // `check_against_with` runs the metadata's own check first.
        meta.check_against_with(OP, &self.config.layout, &mut self.scratch)?;
        let c = &self.config;
        let over = |what: &str, n: usize, cap: usize| {
            Err(AttentionError::InvalidArgument {
                op: OP,
                what: format!("the step has {n} {what}, the planner holds at most {cap}"),
            })
        };
        if meta.num_reqs() > c.max_num_reqs {
            return over("requests", meta.num_reqs(), c.max_num_reqs);
        }
        if meta.num_tokens() > c.max_num_tokens {
            return over("tokens", meta.num_tokens(), c.max_num_tokens);
        }
        // Rows only need the blocks their sequences use; a wider table is fine if its extra
        // columns are unused, but they must fit the planner's fixed row stride.
        let needed =
            meta.seq_lens.iter().map(|&s| (s.max(0) as usize).div_ceil(c.layout.block_size)).max().unwrap_or(0);
        if needed > c.max_blocks_per_req {
            return over("blocks in its longest sequence", needed, c.max_blocks_per_req);
        }
        Ok(())
    }

    /// Stages the step's arrays (padded to `reqs` requests and `tokens` tokens) and uploads them
    /// into the persistent buffers at fixed addresses.
    fn upload(&mut self, meta: &AttentionMetadata, reqs: usize, tokens: usize) -> Result<()> {
        const UP: &str = "plan (upload)";
        let c = self.config;
        let width = c.max_blocks_per_req;
        let n = meta.num_reqs();
        // The previous step's copies read the staging area asynchronously: wait for them (they
        // are long done unless the host runs ahead of the device by a whole step).
        if !self.uploaded.is_complete() {
            self.uploaded.synchronize().map_err(|e| driver_error(UP, e))?;
        }
        let staged = self.staging_i32.as_mut_slice();
        let (qsl, rest) = staged.split_at_mut(c.max_num_reqs + 1);
        let (lens, table) = rest.split_at_mut(c.max_num_reqs);
        qsl[..=n].copy_from_slice(&meta.query_start_loc);
        let last = meta.query_start_loc[n];
        qsl[n + 1..=reqs].fill(last);
        lens[..n].copy_from_slice(&meta.seq_lens);
        lens[n..reqs].fill(0);
        let src_w = meta.block_table.max_blocks_per_req();
        let copy_w = src_w.min(width);
        for r in 0..n {
            let row = &meta.block_table.row(r)[..copy_w];
            table[r * width..r * width + copy_w].copy_from_slice(row);
        }
        let slots = self.staging_i64.as_mut_slice();
        let given = meta.slot_mapping.as_slice();
        slots[..given.len()].copy_from_slice(given);
        slots[given.len()..tokens].fill(-1);

        let stream = self.dev.stream().clone();
        let staged = self.staging_i32.as_slice();
        let table_at = 2 * c.max_num_reqs + 1;
        let copies = [
            (&staged[..=reqs], &mut self.query_start_loc),
            (&staged[c.max_num_reqs + 1..c.max_num_reqs + 1 + reqs.max(1)], &mut self.seq_lens),
            (&staged[table_at..table_at + (reqs * width).max(1)], &mut self.block_table),
        ];
        for (src, dst) in copies {
            let mut dst = dst.slice_mut(..src.len());
            stream.memcpy_htod(src, &mut dst).map_err(|e| driver_error(UP, e))?;
        }
        let slots = self.staging_i64.as_slice();
        let mut dst = self.slot_mapping.slice_mut(..tokens.max(1));
        stream.memcpy_htod(&slots[..tokens.max(1)], &mut dst).map_err(|e| driver_error(UP, e))?;
        self.uploaded.record(&stream).map_err(|e| driver_error(UP, e))?;
        Ok(())
    }
}

/// A planned step, borrowed from its [`StepPlanner`]: the next `plan` needs the planner back, so
/// a stale plan cannot be run.
#[derive(Debug)]
pub struct StepPlan<'p> {
    planner: &'p mut StepPlanner,
    launch: LaunchPlan,
}

impl StepPlan<'_> {
    /// How each layer of this step launches.
    pub fn launch(&self) -> LaunchPlan {
        self.launch
    }

    /// The planner it came from.
    pub fn planner(&self) -> &StepPlanner {
        self.planner
    }
}

/// Element strides of one layer's borrowed buffers. Inside a head the elements are contiguous;
/// everything else may have gaps, so slices of a fused QKV projection and caches interleaved per
/// block are read and written in place. Every stride must be a multiple of 16 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerStrides {
    /// Between consecutive tokens of `query`.
    pub query_token: usize,
    /// Between consecutive heads of `query`.
    pub query_head: usize,
    /// Between consecutive tokens of the new `key` (heads packed inside a token).
    pub key_token: usize,
    /// Between consecutive tokens of the new `value` (heads packed inside a token).
    pub value_token: usize,
    /// Between consecutive tokens of `out`.
    pub out_token: usize,
    /// Between consecutive heads of `out`.
    pub out_head: usize,
    /// Between consecutive blocks of each cache (`block_size * num_kv_heads * head_size` packed).
    pub cache_block: usize,
}

impl LayerStrides {
    /// Packed buffers: query / out `[num_tokens, num_heads, head_size]`, key / value
    /// `[num_tokens, num_kv_heads, head_size]`, caches `[num_blocks, block_size, num_kv_heads,
    /// head_size]`.
    pub fn contiguous(config: &PlannerConfig) -> Self {
        let q_row = config.num_heads.saturating_mul(config.head_size);
        let kv_row = config.layout.row_elems();
        LayerStrides {
            query_token: q_row,
            query_head: config.head_size,
            key_token: kv_row,
            value_token: kv_row,
            out_token: q_row,
            out_head: config.head_size,
            cache_block: config.layout.block_size.saturating_mul(kv_row),
        }
    }

    /// A fused QKV projection `[num_tokens, (num_heads + 2 * num_kv_heads) * head_size]` read in
    /// place (query heads first, then keys, then values, as vLLM's `QKVParallelLinear` lays them
    /// out), packed output and caches. Slice the buffer at 0, `num_heads * head_size` and
    /// `(num_heads + num_kv_heads) * head_size` for the three views.
    pub fn fused_qkv(config: &PlannerConfig) -> Self {
        let fused = (config.num_heads + 2 * config.num_kv_heads).saturating_mul(config.head_size);
        LayerStrides { query_token: fused, key_token: fused, value_token: fused, ..LayerStrides::contiguous(config) }
    }
}

/// One layer's buffers for [`StepPlan::run`], all borrowed from the engine (cudarc views: a
/// `CudaSlice` lends one with `as_view` / `as_view_mut`, a sub-range with `slice` / `slice_mut`).
/// Rows are `LaunchPlan::num_tokens` long, padding included; padding rows of `out` and `lse` are
/// left untouched.
#[derive(Debug)]
pub struct LayerBuffers<'a, T: Element, C: KvStorage<T> = T> {
    /// `[num_tokens, num_heads, head_size]` with `strides.query_*`.
    pub query: CudaView<'a, T>,
    /// The step's new keys and values `[num_tokens, num_kv_heads, head_size]`, written into the
    /// caches at the step's slot mapping before attention; `None` when the caches already hold
    /// them (the engine wrote them itself).
    pub new_kv: Option<(CudaView<'a, T>, CudaView<'a, T>)>,
    /// The layer's caches, `[num_blocks, block_size, num_kv_heads, head_size]` each with blocks
    /// `strides.cache_block` apart: two buffers, or one interleaving K and V per block. Of the
    /// compute type `T`, or an FP8 type (`strides.cache_block` then counts FP8 elements).
    pub cache: KvCacheMut<'a, C>,
    /// The device scales of an FP8 cache, 1 (per layer) or `num_kv_heads` (per head) floats each
    /// for keys and values; `None` means 1.0 and is required for a cache of type `T`.
    ///
    /// Device views, not host values, so that a CUDA graph captured over `run` reads the values
    /// current at replay time: the engine updates its scale buffers in place. Their count is
    /// checked here; their values cannot be without a read-back, so keeping them finite and
    /// positive is the caller's responsibility ([`crate::KvScaleValues::check`] checks host values
    /// before they are uploaded; [`super::CudaKvCache`] does this for its own buffer).
    pub kv_scales: Option<KvScales<'a>>,
    /// `[num_tokens, num_heads, head_size]` with `strides.out_*`.
    pub out: CudaViewMut<'a, T>,
    /// `[num_tokens, num_heads]` natural-log sum-exp per row, packed, or `None`.
    pub lse: Option<CudaViewMut<'a, f32>>,
    /// Element strides of the buffers above.
    pub strides: LayerStrides,
}

impl StepPlan<'_> {
    /// One layer of the planned step: the KV-cache write of `layer.new_kv` (when given), then
    /// attention of every real token, enqueued on the planner's stream. O(1) host work (the
    /// parameters' own check is linear in the number of heads): no allocation, no host
    /// synchronisation, no metadata traffic, so it can be captured into a CUDA graph and replayed
    /// after later `plan` calls of the same launch plan.
    ///
    /// # Errors
    /// [`AttentionError::InvalidArgument`] for parameters that disagree with the planner's shape or
    /// buffers that are too small, misaligned or overlapping (the launchers' checks);
    /// [`AttentionError::Unsupported`] for f32 storage or ALiBi/sinks with too many heads;
    /// [`AttentionError::Cuda`] when a launch fails. Nothing is launched when a check fails.
    /// [`AttentionError::InvalidKvScales`] for scales with a cache of type `T`, or scale buffers
    /// of a count other than 1 or `num_kv_heads` (or key and value counts that differ).
    pub fn run<T: Element, C: KvStorage<T>>(
        &mut self,
        params: &AttentionParams,
        layer: LayerBuffers<'_, T, C>,
    ) -> Result<()> {
        const RUN: &str = "run";
        let _span = tracing::trace_span!("run", tokens = self.launch.num_tokens).entered();
        let p = &mut *self.planner;
        let c = p.config;
        params.check(RUN)?;
        if (params.num_heads, params.num_kv_heads, params.head_size) != (c.num_heads, c.num_kv_heads, c.head_size) {
            return Err(AttentionError::InvalidArgument {
                op: RUN,
                what: format!(
                    "params are for {} heads / {} kv heads / head size {}, the plan for {} / {} / {}",
                    params.num_heads, params.num_kv_heads, params.head_size, c.num_heads, c.num_kv_heads, c.head_size
                ),
            });
        }
        super::attention::check_kernel_support::<T>(RUN, params)?;
        let l = self.launch;
        let LayerBuffers { query, new_kv, mut cache, kv_scales, mut out, mut lse, strides } = layer;
        if let Some(sc) = &kv_scales {
            let (k, v, h) = (sc.key.len(), sc.value.len(), c.num_kv_heads);
            if !C::QUANTISED {
                return Err(crate::scales::unquantised::<C>(RUN));
            }
            if k != v || (k != 1 && k != h) {
                return Err(AttentionError::InvalidKvScales {
                    op: RUN,
                    what: format!("{k} key and {v} value scales; both must be 1 or num_kv_heads = {h}"),
                });
            }
        }
        let scales = || kv_scales.as_ref().map(|sc| KvScales { key: sc.key.slice(..), value: sc.value.slice(..) });
        let stream = p.dev.stream().clone();
        if let Some((key, value)) = new_kv {
            let dims = KvWriteDims {
                num_tokens: l.num_tokens,
                row_elems: c.layout.row_elems(),
                key_stride: strides.key_token,
                value_stride: strides.value_token,
                num_blocks: c.layout.num_blocks,
                block_size: c.layout.block_size,
                cache_block_stride: strides.cache_block,
            };
            let target = match &mut cache {
                KvCacheMut::Separate { key, value } => {
                    KvCacheMut::Separate { key: key.slice_mut(..), value: value.slice_mut(..) }
                }
                KvCacheMut::Interleaved { cache, value_offset } => {
                    KvCacheMut::Interleaved { cache: cache.slice_mut(..), value_offset: *value_offset }
                }
            };
            launch::kv_cache_write(
                &stream,
                key,
                value,
                target,
                p.slot_mapping.slice(..l.num_tokens.max(1)),
                dims,
                scales(),
            )
            .map_err(|e| kernel_error(RUN, e))?;
        }
        if l.num_reqs == 0 {
            return Ok(());
        }
        let features = super::attention::features(params);
        let dims = |req_begin: usize, req_end: usize| AttentionDims {
            num_tokens: l.num_tokens,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_size: c.head_size,
            num_blocks: c.layout.num_blocks,
            block_size: c.layout.block_size,
            num_reqs: l.num_reqs,
            max_blocks_per_req: c.max_blocks_per_req,
            req_begin,
            req_end,
        };
        let kernel_strides = AttentionStrides {
            query_token: strides.query_token,
            query_head: strides.query_head,
            out_token: strides.out_token,
            out_head: strides.out_head,
            cache_block: strides.cache_block,
        };
        let (key_cache, value_cache) = match &cache {
            KvCacheMut::Separate { key, value } => (key.as_view(), value.as_view()),
            KvCacheMut::Interleaved { cache, value_offset } => (
                cache.as_view(),
                cache.try_slice(*value_offset..).ok_or_else(|| AttentionError::InvalidArgument {
                    op: RUN,
                    what: format!("the interleaved cache's value offset {value_offset} is past its end"),
                })?,
            ),
        };
        // The decode part of a mixed step runs on the side stream, beside the prefill part.
        let mixed = l.decode_reqs > 0 && l.decode_reqs < l.num_reqs;
        let overlap = match (&p.side, mixed) {
            (Some(side), true) => side.fork(&stream).map_err(|e| kernel_error(RUN, e))?,
            _ => None,
        };
        // A partitioned mixed step launches its prefill part first, on `prefill_sms` SMs, so that
        // the decode blocks take the others (see MixedPartition).
        let prefill_sms = launched_prefill_sms::<T, C>(&p.dev, c.head_size, l.prefill_sms, overlap.is_some());
        let mut launch_range = |kernel: AttentionKernel, begin: usize, end: usize, ws: bool, on_side: bool| {
            let bufs = AttentionBuffers {
                query: query.slice(..),
                key_cache: key_cache.slice(..),
                value_cache: value_cache.slice(..),
                kv_scales: scales(),
                query_start_loc: p.query_start_loc.slice(..l.num_reqs + 1),
                seq_lens: p.seq_lens.slice(..l.num_reqs),
                block_table: p.block_table.slice(..l.num_reqs * c.max_blocks_per_req),
                out: out.slice_mut(..),
                lse: lse.as_mut().map(|v| v.slice_mut(..)),
                workspace: if ws { Some(p.workspace.slice_mut(..)) } else { None },
                strides: kernel_strides,
            };
            let d = dims(begin, end);
            match (&overlap, on_side) {
                (Some(o), true) => o.launch(kernel, &d, &features, bufs),
                _ => kernels::paged_attention(&stream, kernel, &d, &features, bufs),
            }
            .map_err(|e| kernel_error(RUN, e))
        };
        let prefill = AttentionKernel::Prefill { max_query_len: l.prefill_max_query_len, max_sms: prefill_sms };
        if prefill_sms > 0 {
            launch_range(prefill, l.decode_reqs, l.num_reqs, false, false)?;
        }
        if l.decode_reqs > 0 {
            launch_range(
                AttentionKernel::Decode { num_splits: l.num_splits, split_keys: l.split_keys },
                0,
                l.decode_reqs,
                l.num_splits > 1,
                true,
            )?;
        }
        if l.decode_reqs < l.num_reqs && prefill_sms == 0 {
            launch_range(prefill, l.decode_reqs, l.num_reqs, false, false)?;
        }
        if let Some(o) = overlap {
            o.join().map_err(|e| kernel_error(RUN, e))?;
        }
        Ok(())
    }
}
