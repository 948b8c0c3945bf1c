//! Safe launchers of the paged attention kernels (split-KV decode, tensor-core prefill).
//!
//! Like [`crate::launch`], each launcher checks what memory safety depends on (every buffer long
//! enough for the dimensions and strides, every buffer on the stream's context, the element type
//! one the kernels are compiled for, base pointers and strides aligned for 16-byte vectors) and
//! then makes its one `unsafe` call. The buffers are borrowed cudarc views, so an engine's own
//! tensors (a strided slice of a fused QKV projection, an interleaved K/V cache) are read and
//! written in place. The kernels clamp every value
//! they read from the device-side metadata (query offsets, sequence lengths, block ids), so
//! inconsistent metadata can give a wrong answer but never an access outside these buffers; the
//! semantic checks that rule out wrong answers live in `attention-backend` and run first.

use std::collections::HashMap;
use std::ffi::c_void;
use std::ptr;
use std::sync::{Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceSlice};

mod decode_trace;
mod decode_variant;
mod prefill_path;
mod prefill_trace;
mod side_stream;

pub use decode_trace::{decode_trace, DecodeBlockTrace};
pub use decode_variant::{
    decode_variant, set_decode_variant, DecodePipeline, DecodeVariant, UnknownDecodeVariant, DECODE_GROUP_MERGE_ENV,
    DECODE_VARIANT_ENV,
};
pub use prefill_path::{
    parse_ws_grid, prefill_kernel, prefill_kernel_for_cache, prefill_path, with_prefill_path, PrefillKernel,
    PrefillPath, PREFILL_PATH_ENV, WS_GRID_ENV,
};
pub use prefill_trace::{prefill_trace, PrefillConsumerMarks, PrefillRoundTrace};
pub use side_stream::{Overlap, SideStream};

use prefill_path::{resolve_prefill, ws_grid};

use crate::ffi;
use crate::launch::{bind_ctx, check_len, same_context, status_to_result, to_i64, KvScales};
use crate::{DType, Element, KernelError, KvStorage};

/// Head sizes both attention kernels are compiled for.
pub const SUPPORTED_HEAD_SIZES: [usize; 7] = [64, 80, 96, 112, 128, 192, 256];

/// Most query heads for which ALiBi slopes or sinks can be passed (they travel by value in the
/// kernel parameters).
pub const MAX_FEATURE_HEADS: usize = 256;

/// Which kernel to launch over a range of requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// Split-KV decode: every request of the range has exactly one query token. With
    /// `num_splits > 1` the splits are merged (by a combine kernel, or by the last split of each
    /// group to finish when the [`DecodeVariant`] folds it) and the workspace must hold
    /// [`decode_workspace_len`] floats.
    Decode {
        /// Partitions of each request's keys (the grid's split count).
        num_splits: usize,
        /// 0: each request's keys are divided evenly into `num_splits` (the split boundaries, and
        /// so the reduction order, depend on the batch through `num_splits`). > 0 (a multiple of
        /// [`decode_tile_keys`]): every split covers exactly this many keys from the request's
        /// first visible key, so a request's result depends only on its own inputs: the
        /// batch-invariant mode. `num_splits` must then be at least
        /// `ceil(longest visible key range / split_keys)` over the launch (splits past a request's
        /// keys are empty and change nothing, bit for bit); with fewer, the last split takes the
        /// remaining keys (correct, but no longer batch-invariant).
        split_keys: usize,
    },
    /// Tensor-core varlen attention for requests of any query length: the Hopper (wgmma) kernel or
    /// the sm80 one, as [`prefill_path`] and the device decide (see [`prefill_kernel`]).
    Prefill {
        /// At least the longest query of the range (it sizes the grid).
        max_query_len: usize,
        /// At most this many SMs for the warp-specialised Hopper kernel's persistent grid (0: one
        /// block per SM, its default). It runs one block per SM, so a capped grid leaves the other
        /// SMs free for a kernel launched beside it on another stream: a mixed step's decode part
        /// (see `attention_backend`'s mixed-step partition). The other prefill kernels, whose grids
        /// are one block per work item, ignore it; [`WS_GRID_ENV`], when set, takes precedence.
        max_sms: usize,
    },
}

/// The dimensions of one attention launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionDims {
    /// Rows of query / out / lse (padding included).
    pub num_tokens: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Elements per head (one of [`SUPPORTED_HEAD_SIZES`]).
    pub head_size: usize,
    /// Blocks of each cache.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Requests of the batch (rows of `seq_lens` and of the block table).
    pub num_reqs: usize,
    /// Columns of the block table.
    pub max_blocks_per_req: usize,
    /// First request this launch computes.
    pub req_begin: usize,
    /// One past the last request this launch computes.
    pub req_end: usize,
}

/// The attention variant, with host-side per-head vectors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionFeatures<'a> {
    /// Softmax scale.
    pub scale: f32,
    /// Bottom-right causal mask.
    pub causal: bool,
    /// Keys visible left of the query position (`None` = unlimited).
    pub window_left: Option<usize>,
    /// Keys visible right of the query position (`None` = unlimited).
    pub window_right: Option<usize>,
    /// Logit soft-cap (`None` = off).
    pub softcap: Option<f32>,
    /// ALiBi slope per query head.
    pub alibi_slopes: Option<&'a [f32]>,
    /// Sink logit per query head.
    pub sinks: Option<&'a [f32]>,
}

/// Strides, in elements, of the strided buffers of one launch. The last dimension (the elements of
/// one head) is always contiguous.
///
/// Every stride must be a multiple of 16 bytes (8 f16/bf16 elements) and every base pointer
/// 16-byte aligned: the kernels move 16-byte vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionStrides {
    /// Between consecutive tokens of `query` (`num_heads * head_size` when packed; larger for a
    /// slice of a fused QKV buffer).
    pub query_token: usize,
    /// Between consecutive heads of `query`.
    pub query_head: usize,
    /// Between consecutive tokens of `out`.
    pub out_token: usize,
    /// Between consecutive heads of `out`.
    pub out_head: usize,
    /// Between consecutive blocks of each cache (`block_size * num_kv_heads * head_size` when
    /// packed; twice that for an interleaved `[num_blocks, 2, block_size, num_kv_heads,
    /// head_size]` cache read through a key view and a value view offset by one block).
    pub cache_block: usize,
}

impl AttentionStrides {
    /// The strides of packed `[num_tokens, num_heads, head_size]` query / out and packed
    /// `[num_blocks, block_size, num_kv_heads, head_size]` caches. A product that overflows
    /// saturates, and the launcher then refuses the launch.
    pub fn contiguous(dims: &AttentionDims) -> Self {
        let row = dims.num_heads.saturating_mul(dims.head_size);
        AttentionStrides {
            query_token: row,
            query_head: dims.head_size,
            out_token: row,
            out_head: dims.head_size,
            cache_block: dims.block_size.saturating_mul(dims.num_kv_heads).saturating_mul(dims.head_size),
        }
    }
}

/// The device buffers of one attention launch, borrowed (`CudaSlice::as_view` /
/// `as_view_mut`, or sub-ranges through `slice` / `slice_mut`).
#[derive(Debug)]
pub struct AttentionBuffers<'a, T: Element, C: KvStorage<T> = T> {
    /// `[num_tokens, num_heads, head_size]` with strides `strides.query_*`.
    pub query: CudaView<'a, T>,
    /// `[num_blocks, block_size, num_kv_heads, head_size]`, blocks `strides.cache_block` apart;
    /// of the compute type `T` or an FP8 type (then read as `stored * kv_scales.key`).
    pub key_cache: CudaView<'a, C>,
    /// Same shape, type and block stride as `key_cache` (may be a view of the same buffer).
    pub value_cache: CudaView<'a, C>,
    /// The dequantisation scales of an FP8 cache (`None` = 1.0); must be `None` for an
    /// unquantised one.
    pub kv_scales: Option<KvScales<'a>>,
    /// `[num_reqs + 1]` cumulative query lengths.
    pub query_start_loc: CudaView<'a, i32>,
    /// `[num_reqs]`.
    pub seq_lens: CudaView<'a, i32>,
    /// `[num_reqs, max_blocks_per_req]`.
    pub block_table: CudaView<'a, i32>,
    /// `[num_tokens, num_heads, head_size]` with strides `strides.out_*`; only rows of the launch's
    /// requests are written.
    pub out: CudaViewMut<'a, T>,
    /// `[num_tokens, num_heads]` natural-log sum-exp (packed), or `None`.
    pub lse: Option<CudaViewMut<'a, f32>>,
    /// Split-KV partials (decode with more than one split), [`decode_workspace_len`] floats from
    /// the start of a zero-initialised buffer (its first [`DECODE_COUNTER_SLOTS`] floats are the
    /// folded combine's counters, kept zero by every launch).
    pub workspace: Option<CudaViewMut<'a, f32>>,
    /// Element strides of `query`, `out` and the caches.
    pub strides: AttentionStrides,
}

const DECODE: &str = "paged_decode";
const PREFILL: &str = "paged_prefill";

/// Floats at the front of every decode workspace that hold the folded combine's arrival counters
/// (`kDecodeCounters` in `csrc/paged_decode.cu`; the launcher refuses a workspace sized with
/// another value, so a mismatch fails loudly).
pub const DECODE_COUNTER_SLOTS: usize = 16384;

/// Floats of workspace the decode kernel needs for `num_reqs` requests split `num_splits` ways:
/// [`DECODE_COUNTER_SLOTS`] counters, then the partials.
///
/// The counters must be zero before the workspace's first launch (allocate it zeroed) and every
/// launch leaves them zero, so one workspace serves any number of launches, CUDA-graph replays
/// included. Always pass the workspace from its start: the counters live at fixed offsets.
pub fn decode_workspace_len(num_splits: usize, num_reqs: usize, num_heads: usize, head_size: usize) -> usize {
    if num_splits <= 1 {
        return 0;
    }
    num_splits
        .saturating_mul(num_reqs)
        .saturating_mul(num_heads)
        .saturating_mul(head_size + 2)
        .saturating_add(DECODE_COUNTER_SLOTS)
}

/// The kernels' compile-time geometry, queried per head size.
#[derive(Clone, Copy)]
enum Geometry {
    DecodeMaxGroup,
    DecodeTileKeys,
    DecodeHeadsPerBlock,
    PrefillRowsPerBlock,
    PrefillWsRowsPerBlock,
}

/// `which` at `head_size` (0 when the head size does not fit an `int` or is not supported).
fn geometry(head_size: usize, which: Geometry) -> usize {
    let Ok(h) = i32::try_from(head_size) else { return 0 };
    let query = match which {
        Geometry::DecodeMaxGroup => ffi::pa_paged_decode_max_group,
        Geometry::DecodeTileKeys => ffi::pa_paged_decode_tile_keys,
        Geometry::DecodeHeadsPerBlock => ffi::pa_paged_decode_heads_per_block,
        Geometry::PrefillRowsPerBlock => ffi::pa_paged_prefill_rows_per_block,
        Geometry::PrefillWsRowsPerBlock => ffi::pa_paged_prefill_sm90ws_rows_per_block,
    };
    // SAFETY: each of these is a pure function of its integer argument; it touches no memory and
    // no CUDA state.
    let n = unsafe { query(h) };
    n.max(0) as usize
}

/// Largest GQA group (`num_heads / num_kv_heads`) the decode kernel takes for `head_size`
/// (0 when the head size is not supported).
pub fn decode_max_group(head_size: usize) -> usize {
    geometry(head_size, Geometry::DecodeMaxGroup)
}

/// Keys per tile of the decode kernel (the granularity of its splits); 0 when unsupported.
pub fn decode_tile_keys(head_size: usize) -> usize {
    geometry(head_size, Geometry::DecodeTileKeys)
}

/// Query heads one decode block computes (GQA groups larger than this run as several blocks);
/// 0 when the head size is not supported.
pub fn decode_heads_per_block(head_size: usize) -> usize {
    geometry(head_size, Geometry::DecodeHeadsPerBlock)
}

/// Query rows one prefill block computes (a launch has `ceil(max_query_len / rows)` row blocks per
/// request and head); 0 when the head size is not supported.
pub fn prefill_rows_per_block(head_size: usize) -> usize {
    geometry(head_size, Geometry::PrefillRowsPerBlock)
}

/// Query rows of one work item of the warp-specialised Hopper prefill, as its compiled
/// configuration says; 0 off its head sizes. The host's planning uses [`crate::ws_item_rows`],
/// which needs no CUDA build; the two come from the same build setting and must agree.
pub fn prefill_ws_rows_per_block(head_size: usize) -> usize {
    geometry(head_size, Geometry::PrefillWsRowsPerBlock)
}

/// Resident blocks per SM of `kernel`'s instantiation for `head_size` and `dtype` on `ctx`'s
/// device, as the CUDA runtime's occupancy calculator reports it with the kernel's dynamic shared
/// memory: the number a wave model should use (a table written for one GPU would be wrong on the
/// next). Only the variant of `kernel` matters, not its fields; for the decode kernel, the
/// process-wide [`decode_variant`] picks the instantiation, as it does for the launches.
///
/// # Errors
/// [`KernelError::InvalidArgument`] for an unsupported head size or element type;
/// [`KernelError::Cuda`] when the context cannot be bound or the runtime fails (no kernel image
/// for this GPU, for instance).
pub fn blocks_per_sm(
    ctx: &CudaContext,
    kernel: AttentionKernel,
    head_size: usize,
    dtype: DType,
) -> Result<usize, KernelError> {
    blocks_per_sm_with_variant(ctx, kernel, decode_variant()?, head_size, dtype)
}

/// [`blocks_per_sm`] for an explicit [`DecodeVariant`] (ignored for prefill).
///
/// # Errors
/// As [`blocks_per_sm`].
pub fn blocks_per_sm_with_variant(
    ctx: &CudaContext,
    kernel: AttentionKernel,
    variant: DecodeVariant,
    head_size: usize,
    dtype: DType,
) -> Result<usize, KernelError> {
    blocks_per_sm_for_cache(ctx, kernel, variant, head_size, dtype, dtype)
}

/// [`blocks_per_sm_with_variant`] for a KV cache stored as `cache_dtype`: `dtype` itself, or
/// [`DType::Fp8E4M3`] / [`DType::Fp8E5M2`]. The decode kernel of an FP8 cache is its own
/// instantiation (the default pipeline, whatever `variant` asks, with more stages of half-size
/// tiles), so a wave model for FP8 caches must ask with the cache type. The prefill kernels'
/// occupancy does not depend on the cache type here.
///
/// # Errors
/// As [`blocks_per_sm`]; [`KernelError::InvalidArgument`] also for a cache type that is neither
/// `dtype` nor FP8.
pub fn blocks_per_sm_for_cache(
    ctx: &CudaContext,
    kernel: AttentionKernel,
    variant: DecodeVariant,
    head_size: usize,
    dtype: DType,
    cache_dtype: DType,
) -> Result<usize, KernelError> {
    const OCC: &str = "blocks_per_sm";
    let (h, d, kv) = instance_codes(OCC, head_size, dtype, cache_dtype)?;
    bind_ctx(OCC, ctx)?;
    // The prefill kernel the launches on this thread would run.
    let prefill = match kernel {
        AttentionKernel::Prefill { .. } => resolve_prefill(prefill_path()?, h, d, kv)?,
        AttentionKernel::Decode { .. } => PrefillKernel::Sm80,
    };
    // The answer depends only on the device and the instantiation: asked of the runtime once per
    // process (planners ask once per layer and step).
    let is_decode = matches!(kernel, AttentionKernel::Decode { .. });
    let key = (ctx.ordinal(), is_decode, if is_decode { variant.code() } else { 0 }, h, d, kv, prefill);
    type OccKey = (usize, bool, u32, i32, i32, i32, PrefillKernel);
    static MEMO: OnceLock<Mutex<HashMap<OccKey, usize>>> = OnceLock::new();
    let memo = MEMO.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(&n) = memo.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(n);
    }
    let mut blocks: i32 = 0;
    // SAFETY: `blocks` is a live local the function writes one i32 to; the context is bound to this
    // thread (above), which is all the runtime's occupancy query and function-attribute call need.
    // No memory of the caller is otherwise touched.
    let status = unsafe {
        match kernel {
            AttentionKernel::Decode { .. } => {
                ffi::pa_paged_decode_blocks_per_sm_kv(h, d, kv, variant.code() as i32, &mut blocks)
            }
            AttentionKernel::Prefill { .. } => match prefill {
                PrefillKernel::Sm90 => ffi::pa_paged_prefill_sm90_blocks_per_sm(h, d, &mut blocks),
                PrefillKernel::Sm90Ws => ffi::pa_paged_prefill_sm90ws_blocks_per_sm(h, d, &mut blocks),
                PrefillKernel::Sm80 => ffi::pa_paged_prefill_blocks_per_sm(h, d, &mut blocks),
            },
        }
    };
    status_to_result(OCC, status)?;
    let n = blocks.max(0) as usize;
    memo.lock().unwrap_or_else(|e| e.into_inner()).insert(key, n);
    Ok(n)
}

/// K/V bytes one decode block keeps in flight (the tiles of every pipeline stage but the one being
/// computed) for this variant, head size, compute type and cache type; an SM holding `n` such
/// blocks has `n` times this outstanding towards memory. A split planner compares that with the
/// bytes an SM needs in flight to reach its share of the bandwidth: beyond it, more resident
/// blocks do not make an SM read faster. Needs no CUDA context.
///
/// # Errors
/// [`KernelError::InvalidArgument`] for what [`blocks_per_sm_for_cache`] refuses.
pub fn decode_bytes_in_flight(
    variant: DecodeVariant,
    head_size: usize,
    dtype: DType,
    cache_dtype: DType,
) -> Result<usize, KernelError> {
    const WHAT: &str = "decode_bytes_in_flight";
    let (h, d, kv) = instance_codes(WHAT, head_size, dtype, cache_dtype)?;
    let mut bytes: i64 = 0;
    // SAFETY: `bytes` is a live local the function writes one i64 to; it reads compile-time
    // constants only (no CUDA call, no context needed) and touches no other memory.
    let status = unsafe { ffi::pa_paged_decode_bytes_in_flight(h, d, kv, variant.code() as i32, &mut bytes) };
    status_to_result(WHAT, status)?;
    Ok(bytes.max(0) as usize)
}

/// The pipeline a decode launch with the [`DecodePipeline::Auto`] variant runs on `ctx`'s device
/// for a grid of `blocks` decode blocks (requests x kv heads x chunks of 16 query heads x splits)
/// and `split_keys` (batch-invariant mode when positive): [`DecodePipeline::W4S2`] or
/// [`DecodePipeline::W4S3`]. For engines that log their plan, and for tests; the launch decides
/// the same way on its own.
///
/// # Errors
/// As [`blocks_per_sm_for_cache`].
pub fn decode_auto_pipeline(
    ctx: &CudaContext,
    head_size: usize,
    dtype: DType,
    cache_dtype: DType,
    blocks: usize,
    split_keys: usize,
) -> Result<DecodePipeline, KernelError> {
    const WHAT: &str = "decode_auto_pipeline";
    let (h, d, kv) = instance_codes(WHAT, head_size, dtype, cache_dtype)?;
    let blocks = i64::try_from(blocks).map_err(|_| invalid(WHAT, format!("{blocks} blocks overflow i64")))?;
    let split_keys = to_i32(WHAT, "split_keys", split_keys)?;
    bind_ctx(WHAT, ctx)?;
    let mut code: i32 = -1;
    // SAFETY: `code` is a live local the function writes one i32 to; the context is bound to this
    // thread (above), which the runtime's occupancy and attribute queries need. No memory of the
    // caller is otherwise touched.
    let status = unsafe { ffi::pa_paged_decode_auto_pipeline(h, d, kv, blocks, split_keys, &mut code) };
    status_to_result(WHAT, status)?;
    u32::try_from(code)
        .ok()
        .and_then(DecodePipeline::from_code)
        .ok_or_else(|| invalid(WHAT, format!("the kernels answered pipeline code {code}")))
}

/// The FFI codes of (head size, compute type, cache type), checked: `(head_size, dtype, kv_dtype)`
/// as the occupancy and in-flight queries take them.
fn instance_codes(
    what: &'static str,
    head_size: usize,
    dtype: DType,
    cache_dtype: DType,
) -> Result<(i32, i32, i32), KernelError> {
    let (d, kv) = type_codes(what, dtype, cache_dtype)?;
    if !SUPPORTED_HEAD_SIZES.contains(&head_size) {
        return Err(invalid(what, format!("head size {head_size} is not supported")));
    }
    Ok((to_i32(what, "head_size", head_size)?, d, kv))
}

/// The FFI codes of a compute type (0 = f16, 1 = bf16) and of a cache type for it (0 = the compute
/// type, 1 = FP8 E4M3, 2 = FP8 E5M2), checked.
fn type_codes(what: &'static str, dtype: DType, cache_dtype: DType) -> Result<(i32, i32), KernelError> {
    let d = match dtype {
        DType::F16 => 0,
        DType::BF16 => 1,
        other => return Err(invalid(what, format!("element type {other} is not supported on the GPU"))),
    };
    let kv = match cache_dtype {
        DType::Fp8E4M3 => 1,
        DType::Fp8E5M2 => 2,
        c if c == dtype => 0,
        other => return Err(invalid(what, format!("a {other} cache cannot serve {dtype} attention"))),
    };
    Ok((d, kv))
}

fn invalid(kernel: &'static str, what: String) -> KernelError {
    KernelError::InvalidArgument { kernel, what }
}

fn to_i32(kernel: &'static str, name: &str, v: usize) -> Result<i32, KernelError> {
    i32::try_from(v).map_err(|_| invalid(kernel, format!("{name} = {v} exceeds i32")))
}

fn window(kernel: &'static str, name: &str, w: Option<usize>) -> Result<i32, KernelError> {
    match w {
        None => Ok(-1),
        // Any window of 2^30 or more covers every sequence the kernels index with i32.
        Some(w) => to_i32(kernel, name, w.min(1 << 30)),
    }
}

/// Elements a strided `[num_tokens, num_heads, head_size]` view must hold: one past the last
/// element of the last (token, head) row; 0 without tokens.
fn strided_rows_len(
    tokens: usize,
    heads: usize,
    head_size: usize,
    token_stride: usize,
    head_stride: usize,
) -> Option<usize> {
    if tokens == 0 || heads == 0 {
        return Some(0);
    }
    (tokens - 1).checked_mul(token_stride)?.checked_add((heads - 1).checked_mul(head_stride)?)?.checked_add(head_size)
}

/// True when the rows of a strided `[tokens, heads, head_size]` view never share an element: the
/// inner of the two strides clears a head, the outer clears all rows of the inner dimension. (A
/// sufficient test; the layouts engines use all pass it.)
fn rows_disjoint(tokens: usize, heads: usize, head_size: usize, token_stride: usize, head_stride: usize) -> bool {
    let mut dims = [(token_stride, tokens), (head_stride, heads)];
    dims.sort_unstable();
    let mut extent = head_size; // elements one step of the next dimension must clear
    for (stride, count) in dims {
        if count <= 1 {
            continue;
        }
        if stride < extent {
            return false;
        }
        let Some(e) = stride.checked_mul(count - 1).and_then(|x| x.checked_add(extent)) else { return false };
        extent = e;
    }
    true
}

/// Launches one paged attention kernel over requests `dims.req_begin..dims.req_end` on `stream`,
/// without synchronising.
///
/// # Errors
/// [`KernelError::InvalidArgument`] for an element type other than f16/bf16, an unsupported head
/// size, inconsistent dimensions, per-head vectors of the wrong length, a buffer on another
/// context, a stride or base pointer not a multiple of 16 bytes, a cache block stride shorter than
/// a block, or `out` rows that overlap; [`KernelError::BufferTooSmall`] when a buffer is shorter
/// than `dims` and `bufs.strides` require; [`KernelError::Cuda`] when the runtime rejects the
/// launch.
pub fn paged_attention<T: Element, C: KvStorage<T>>(
    stream: &CudaStream,
    kernel: AttentionKernel,
    dims: &AttentionDims,
    features: &AttentionFeatures<'_>,
    bufs: AttentionBuffers<'_, T, C>,
) -> Result<(), KernelError> {
    paged_attention_with_variant(stream, kernel, decode_variant()?, dims, features, bufs)
}

/// [`paged_attention`] with an explicit [`DecodeVariant`] for a decode launch instead of the
/// process-wide one (ignored for prefill): what tests and benchmarks use to compare variants in
/// one process without touching the global setting other launches read.
///
/// # Errors
/// As [`paged_attention`].
pub fn paged_attention_with_variant<T: Element, C: KvStorage<T>>(
    stream: &CudaStream,
    kernel: AttentionKernel,
    variant: DecodeVariant,
    dims: &AttentionDims,
    features: &AttentionFeatures<'_>,
    bufs: AttentionBuffers<'_, T, C>,
) -> Result<(), KernelError> {
    launch(stream, None, kernel, variant, dims, features, bufs)
}

/// The launcher shared by [`paged_attention_with_variant`] and [`Overlap::launch`]: checks, then
/// one launch on `stream`, or on `side`'s stream after a fork from `stream`.
fn launch<T: Element, C: KvStorage<T>>(
    stream: &CudaStream,
    side: Option<&SideStream>,
    kernel: AttentionKernel,
    variant: DecodeVariant,
    dims: &AttentionDims,
    features: &AttentionFeatures<'_>,
    bufs: AttentionBuffers<'_, T, C>,
) -> Result<(), KernelError> {
    let name = match kernel {
        AttentionKernel::Decode { .. } => DECODE,
        AttentionKernel::Prefill { .. } => PREFILL,
    };
    let dtype = match T::DTYPE {
        DType::F16 => 0,
        DType::BF16 => 1,
        other => return Err(invalid(name, format!("element type {other} is not supported on the GPU"))),
    };
    let kv_dtype = match C::DTYPE {
        DType::Fp8E4M3 => 1,
        DType::Fp8E5M2 => 2,
        _ => 0,
    };
    if kv_dtype == 0 && bufs.kv_scales.is_some() {
        return Err(invalid(name, format!("KV scales given for a {} cache (only FP8 caches are scaled)", C::DTYPE)));
    }
    let kv_scale_per_head = match &bufs.kv_scales {
        Some(sc) => sc.per_head(name, dims.num_kv_heads)?,
        None => false,
    };
    let d = *dims;
    let st = bufs.strides;
    if !SUPPORTED_HEAD_SIZES.contains(&d.head_size) {
        return Err(invalid(name, format!("head size {} is not supported", d.head_size)));
    }
    if d.num_heads == 0 || d.num_kv_heads == 0 || !d.num_heads.is_multiple_of(d.num_kv_heads) {
        return Err(invalid(
            name,
            format!("num_heads {} must be a positive multiple of num_kv_heads {}", d.num_heads, d.num_kv_heads),
        ));
    }
    if d.block_size == 0 || d.num_blocks == 0 {
        return Err(invalid(name, "block_size and num_blocks must be positive".into()));
    }
    if d.req_begin > d.req_end || d.req_end > d.num_reqs {
        return Err(invalid(name, format!("request range {}..{} outside 0..{}", d.req_begin, d.req_end, d.num_reqs)));
    }
    let overflow = || invalid(name, "dimensions overflow".into());
    let span = d.max_blocks_per_req.checked_mul(d.block_size).ok_or_else(overflow)?;
    to_i32(name, "max_blocks_per_req * block_size", span)?;
    to_i32(name, "num_tokens", d.num_tokens)?;
    // 16-byte vectors: every stride a whole number of them (T is 2 bytes here).
    let vec_elems = 16 / std::mem::size_of::<T>();
    for (s_name, s) in [
        ("query token stride", st.query_token),
        ("query head stride", st.query_head),
        ("out token stride", st.out_token),
        ("out head stride", st.out_head),
        ("cache block stride", st.cache_block),
    ] {
        // The cache stride counts cache elements, which may be narrower than `T`.
        let elems = if s_name == "cache block stride" { 16 / std::mem::size_of::<C>() } else { vec_elems };
        if !s.is_multiple_of(elems) {
            return Err(invalid(name, format!("{s_name} {s} is not a multiple of {elems} elements (16 bytes)")));
        }
    }
    let block_elems =
        d.block_size.checked_mul(d.num_kv_heads).and_then(|x| x.checked_mul(d.head_size)).ok_or_else(overflow)?;
    if st.cache_block < block_elems {
        return Err(invalid(
            name,
            format!("cache block stride {} is shorter than a block ({block_elems})", st.cache_block),
        ));
    }
    if !rows_disjoint(d.num_tokens, d.num_heads, d.head_size, st.out_token, st.out_head) {
        return Err(invalid(
            name,
            format!("out rows overlap (token stride {}, head stride {})", st.out_token, st.out_head),
        ));
    }
    let rows = d.num_tokens.checked_mul(d.num_heads).ok_or_else(overflow)?;
    let q_elems =
        strided_rows_len(d.num_tokens, d.num_heads, d.head_size, st.query_token, st.query_head).ok_or_else(overflow)?;
    let o_elems =
        strided_rows_len(d.num_tokens, d.num_heads, d.head_size, st.out_token, st.out_head).ok_or_else(overflow)?;
    let cache_elems =
        (d.num_blocks - 1).checked_mul(st.cache_block).and_then(|x| x.checked_add(block_elems)).ok_or_else(overflow)?;
    check_len(name, "query", bufs.query.len(), q_elems)?;
    check_len(name, "out", bufs.out.len(), o_elems)?;
    check_len(name, "key_cache", bufs.key_cache.len(), cache_elems)?;
    check_len(name, "value_cache", bufs.value_cache.len(), cache_elems)?;
    check_len(name, "query_start_loc", bufs.query_start_loc.len(), d.num_reqs + 1)?;
    check_len(name, "seq_lens", bufs.seq_lens.len(), d.num_reqs)?;
    let table = d.num_reqs.checked_mul(d.max_blocks_per_req).ok_or_else(overflow)?;
    check_len(name, "block_table", bufs.block_table.len(), table)?;
    if let Some(lse) = &bufs.lse {
        check_len(name, "lse", lse.len(), rows)?;
    }
    for (vec_name, v) in [("alibi_slopes", features.alibi_slopes), ("sinks", features.sinks)] {
        if let Some(v) = v {
            if v.len() != d.num_heads {
                return Err(invalid(name, format!("{vec_name} has {} entries for {} heads", v.len(), d.num_heads)));
            }
            if d.num_heads > MAX_FEATURE_HEADS {
                return Err(invalid(name, format!("{vec_name} with more than {MAX_FEATURE_HEADS} heads")));
            }
        }
    }
    let n = d.req_end - d.req_begin;
    let (num_splits, split_keys, max_query_len) = match kernel {
        AttentionKernel::Decode { num_splits, split_keys } => {
            if num_splits == 0 || num_splits > 65535 {
                return Err(invalid(name, format!("num_splits {num_splits} outside 1..=65535")));
            }
            let granule = decode_tile_keys(d.head_size).max(1);
            if !split_keys.is_multiple_of(granule) || i32::try_from(split_keys).is_err() {
                return Err(invalid(
                    name,
                    format!("split_keys {split_keys} is not a multiple of {granule} below 2^31"),
                ));
            }
            let group = d.num_heads / d.num_kv_heads;
            if group > decode_max_group(d.head_size) {
                return Err(invalid(name, format!("GQA group {group} too large for head size {}", d.head_size)));
            }
            let need = decode_workspace_len(num_splits, n, d.num_heads, d.head_size);
            if need > 0 {
                let have = bufs.workspace.as_ref().map_or(0, |w| w.len());
                check_len(name, "workspace", have, need)?;
            }
            (num_splits, split_keys, 0)
        }
        AttentionKernel::Prefill { max_query_len, .. } => (1, 0, max_query_len),
    };
    if n == 0 {
        return Ok(());
    }
    for (buf_name, s) in [
        ("query", bufs.query.stream()),
        ("key_cache", bufs.key_cache.stream()),
        ("value_cache", bufs.value_cache.stream()),
        ("query_start_loc", bufs.query_start_loc.stream()),
        ("seq_lens", bufs.seq_lens.stream()),
        ("block_table", bufs.block_table.stream()),
        ("out", bufs.out.stream()),
    ] {
        same_context(name, buf_name, stream, s)?;
    }
    if let Some(lse) = &bufs.lse {
        same_context(name, "lse", stream, lse.stream())?;
    }
    if let Some(w) = &bufs.workspace {
        same_context(name, "workspace", stream, w.stream())?;
    }
    if let Some(sc) = &bufs.kv_scales {
        same_context(name, "kv_scales.key", stream, sc.key.stream())?;
        same_context(name, "kv_scales.value", stream, sc.value.stream())?;
    }
    bind_ctx(name, stream.context())?;

    let AttentionBuffers {
        query,
        key_cache,
        value_cache,
        query_start_loc,
        seq_lens,
        block_table,
        mut out,
        lse,
        workspace,
        kv_scales,
        strides: _,
    } = bufs;
    let (q, _q_guard) = query.device_ptr(stream);
    let (kc, _kc_guard) = key_cache.device_ptr(stream);
    let (vc, _vc_guard) = value_cache.device_ptr(stream);
    let (qsl, _qsl_guard) = query_start_loc.device_ptr(stream);
    let (sl, _sl_guard) = seq_lens.device_ptr(stream);
    let (bt, _bt_guard) = block_table.device_ptr(stream);
    let (o, _o_guard) = out.device_ptr_mut(stream);
    for (ptr_name, p) in [("query", q), ("key_cache", kc), ("value_cache", vc), ("out", o)] {
        if !p.is_multiple_of(16) {
            return Err(invalid(name, format!("{ptr_name} base address {p:#x} is not 16-byte aligned")));
        }
    }
    let mut lse = lse;
    let (lse_ptr, _lse_guard) = match lse.as_mut() {
        Some(l) => {
            let (p, g) = l.device_ptr_mut(stream);
            (p as *mut f32, Some(g))
        }
        None => (ptr::null_mut(), None),
    };
    let mut workspace = workspace;
    let (ws_ptr, ws_len, _ws_guard) = match workspace.as_mut() {
        Some(w) => {
            let len = w.len();
            let (p, g) = w.device_ptr_mut(stream);
            (p as *mut f32, len, Some(g))
        }
        None => (ptr::null_mut(), 0, None),
    };
    let (k_scale, v_scale, _scale_guards) = match &kv_scales {
        Some(sc) => {
            let (k, kg) = sc.key.device_ptr(stream);
            let (v, vg) = sc.value.device_ptr(stream);
            (k as *const f32, v as *const f32, Some((kg, vg)))
        }
        None => (ptr::null(), ptr::null(), None),
    };
    let args = ffi::PaAttnArgs {
        query: q as *const c_void,
        key_cache: kc as *const c_void,
        value_cache: vc as *const c_void,
        out: o as *mut c_void,
        lse: lse_ptr,
        query_start_loc: qsl as *const i32,
        seq_lens: sl as *const i32,
        block_table: bt as *const i32,
        alibi_slopes: features.alibi_slopes.map_or(ptr::null(), |v| v.as_ptr()),
        sinks: features.sinks.map_or(ptr::null(), |v| v.as_ptr()),
        workspace: ws_ptr,
        workspace_len: to_i64(name, "workspace_len", ws_len)?,
        num_tokens: to_i64(name, "num_tokens", d.num_tokens)?,
        num_blocks: to_i64(name, "num_blocks", d.num_blocks)?,
        q_token_stride: to_i64(name, "query token stride", st.query_token)?,
        q_head_stride: to_i64(name, "query head stride", st.query_head)?,
        o_token_stride: to_i64(name, "out token stride", st.out_token)?,
        o_head_stride: to_i64(name, "out head stride", st.out_head)?,
        kv_block_stride: to_i64(name, "cache block stride", st.cache_block)?,
        num_reqs: to_i32(name, "num_reqs", d.num_reqs)?,
        req_begin: to_i32(name, "req_begin", d.req_begin)?,
        req_end: to_i32(name, "req_end", d.req_end)?,
        num_heads: to_i32(name, "num_heads", d.num_heads)?,
        num_kv_heads: to_i32(name, "num_kv_heads", d.num_kv_heads)?,
        head_size: to_i32(name, "head_size", d.head_size)?,
        block_size: to_i32(name, "block_size", d.block_size)?,
        max_blocks_per_req: to_i32(name, "max_blocks_per_req", d.max_blocks_per_req)?,
        max_query_len: to_i32(name, "max_query_len", max_query_len)?,
        num_splits: to_i32(name, "num_splits", num_splits)?,
        causal: i32::from(features.causal),
        window_left: window(name, "window_left", features.window_left)?,
        window_right: window(name, "window_right", features.window_right)?,
        scale: features.scale,
        softcap: features.softcap.unwrap_or(0.0),
        dtype,
        split_keys: to_i32(name, "split_keys", split_keys)?,
        decode_variant: match kernel {
            AttentionKernel::Decode { .. } => {
                // Beside another kernel (a mixed step's side stream) the group merge's blocks could
                // spin on SMs while the group's later blocks wait for SMs the other kernel holds.
                let group = side.is_none() && decode_variant::group_merge()?;
                let off = if group { 0 } else { decode_variant::GROUP_MERGE_OFF_BIT };
                (variant.code() | off) as i32
            }
            AttentionKernel::Prefill { .. } => 0,
        },
        kv_dtype,
        kv_scale_per_head: i32::from(kv_scale_per_head),
        k_scale,
        v_scale,
        prefill_grid: match kernel {
            AttentionKernel::Prefill { max_sms, .. } => match ws_grid()? {
                0 => i32::try_from(max_sms).unwrap_or(i32::MAX),
                env => env,
            },
            AttentionKernel::Decode { .. } => 0,
        },
        prefill_order: match kernel {
            AttentionKernel::Prefill { .. } => crate::WsOrder::from_env()?.code(),
            AttentionKernel::Decode { .. } => 0,
        },
    };
    let prefill = match kernel {
        AttentionKernel::Prefill { .. } => resolve_prefill(prefill_path()?, args.head_size, dtype, args.kv_dtype)?,
        AttentionKernel::Decode { .. } => PrefillKernel::Sm80,
    };
    let cu_stream = match side {
        // SAFETY: `raw` is the side stream's live handle; the call only reads it.
        Some(side) => unsafe { ffi::pa_side_stream_handle(side.raw) },
        None => stream.cu_stream() as *mut c_void,
    };
    // SAFETY: every device pointer comes from a live cudarc view on `stream`'s context (checked
    // above), borrowed for the duration of this call; the guards keep cudarc's event tracking
    // ordered around the launch. A side stream belongs to the same context and was forked from
    // `stream` (`SideStream::fork`, which refuses when cudarc tracks events across streams), so
    // the launch runs after the work that produced the buffers, and `stream` waits for it at the
    // join. The lengths checked above cover everything the kernels can
    // address through the strides: query/out rows of tokens `< num_tokens` (device offsets are
    // clamped to it) and heads `< num_heads`, cache blocks of ids clamped to `num_blocks` at
    // `cache_block` apart, block-table entries of rows `< num_reqs` and columns
    // `< max_blocks_per_req` (sequence lengths are clamped to `max_blocks_per_req * block_size`),
    // lse rows `< num_tokens`, and workspace elements below the size checked for the decode split
    // count (the C launcher re-checks `workspace_len`). Base pointers and strides are 16-byte
    // multiples (checked above) as the kernels' vector accesses need, and `out` rows are disjoint,
    // so no two threads write one element. The host vectors `alibi_slopes` / `sinks` hold
    // `num_heads <= MAX_FEATURE_HEADS` floats and are only read during this call. `T` is f16 or
    // bf16, matching `dtype`. The launcher does not synchronise and keeps no pointer.
    let status = unsafe {
        match kernel {
            AttentionKernel::Decode { .. } => ffi::pa_paged_decode(&args, cu_stream),
            AttentionKernel::Prefill { .. } => match prefill {
                PrefillKernel::Sm90 => ffi::pa_paged_prefill_sm90(&args, cu_stream),
                PrefillKernel::Sm90Ws => ffi::pa_paged_prefill_sm90ws(&args, cu_stream),
                PrefillKernel::Sm80 => ffi::pa_paged_prefill(&args, cu_stream),
            },
        }
    };
    status_to_result(name, status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_bytes_in_flight_follow_the_pipelines() {
        let bytes = |v: DecodeVariant, head: usize, cache: DType| decode_bytes_in_flight(v, head, DType::BF16, cache);
        // The default (auto) answers with W4S3's figures: the pipeline wherever splits matter.
        let w4s3 = DecodeVariant { pipeline: DecodePipeline::W4S3, fold_combine: true };
        assert_eq!(bytes(DecodeVariant::default(), 128, DType::BF16), bytes(w4s3, 128, DType::BF16));
        // Two of three stages of 64-key K and V tiles in flight, two bytes an element.
        assert_eq!(bytes(w4s3, 128, DType::BF16), Ok(2 * 64 * 128 * 2 * 2));
        assert_eq!(bytes(w4s3, 64, DType::BF16), Ok(2 * 64 * 64 * 2 * 2));
        // Above head 128: two stages, one tile in flight.
        assert_eq!(bytes(w4s3, 256, DType::BF16), Ok(64 * 256 * 2 * 2));
        // FP8 up to head 128: two stages of 64-key tiles (2 warps x 2 groups of 16 keys), one byte.
        assert_eq!(bytes(w4s3, 128, DType::Fp8E4M3), Ok(64 * 128 * 2));
        assert_eq!(bytes(w4s3, 128, DType::Fp8E5M2), Ok(64 * 128 * 2));
        // FP8 above head 128: 4 warps, 3 stages.
        assert_eq!(bytes(w4s3, 256, DType::Fp8E4M3), Ok(2 * 64 * 256 * 2));
        // The other pipelines (bf16, head 128): W2S6 keeps five 32-key tiles in flight.
        let w2s6 = DecodeVariant { pipeline: DecodePipeline::W2S6, fold_combine: false };
        assert_eq!(bytes(w2s6, 128, DType::BF16), Ok(5 * 32 * 128 * 2 * 2));
        // W4S2 exists for both 16-bit types: one 64-key tile in flight.
        let w4s2 = DecodeVariant { pipeline: DecodePipeline::W4S2, fold_combine: false };
        assert_eq!(bytes(w4s2, 128, DType::BF16), Ok(64 * 128 * 2 * 2));
        assert_eq!(decode_bytes_in_flight(w4s2, 128, DType::F16, DType::F16), Ok(64 * 128 * 2 * 2));
        assert_eq!(bytes(w4s2, 64, DType::BF16), bytes(w4s3, 64, DType::BF16));
        // Refused as the occupancy query refuses.
        assert!(matches!(bytes(w4s3, 100, DType::BF16), Err(KernelError::InvalidArgument { .. })));
        assert!(matches!(
            decode_bytes_in_flight(w4s3, 128, DType::F32, DType::F32),
            Err(KernelError::InvalidArgument { .. })
        ));
    }

    #[test]
    fn workspace_holds_counters_and_partials() {
        assert_eq!(decode_workspace_len(1, 64, 32, 128), 0);
        assert_eq!(decode_workspace_len(2, 1, 1, 64), DECODE_COUNTER_SLOTS + 2 * 66);
    }
}
