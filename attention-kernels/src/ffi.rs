//! Raw declarations of the `extern "C"` launchers in `csrc/`. Nothing here is called directly
//! outside this crate: the safe wrappers in [`crate::launch`] check buffer sizes first.
//!
//! Every launcher returns a `cudaError_t` (0 = success) and never synchronises.

use std::ffi::{c_char, c_void};

/// `cudaError_t`.
pub type CudaStatus = i32;

extern "C" {
    /// KV-cache write (`csrc/cache_write.cu`).
    ///
    /// - `key`, `value`: `[num_tokens, row_elems]` with token rows `key_stride` / `value_stride`
    ///   elements apart (`row_elems = num_kv_heads * head_size`).
    /// - `key_cache`, `value_cache`: `[num_blocks, block_size, row_elems]` with blocks
    ///   `cache_block_stride` elements apart (`>= block_size * row_elems`; the NHD layout).
    /// - `slot_mapping`: `[num_tokens]` i64; negative entries and entries `>= num_blocks *
    ///   block_size` are skipped.
    /// - `elem_bytes`: 2 or 4.
    pub fn pa_kv_cache_write(
        key: *const c_void,
        value: *const c_void,
        key_cache: *mut c_void,
        value_cache: *mut c_void,
        slot_mapping: *const i64,
        num_tokens: i64,
        row_elems: i64,
        key_stride: i64,
        value_stride: i64,
        num_blocks: i64,
        block_size: i64,
        cache_block_stride: i64,
        elem_bytes: i32,
        stream: *mut c_void,
    ) -> CudaStatus;

    /// Quantising KV-cache write into FP8 caches (`csrc/cache_write.cu`): the layout of
    /// [`pa_kv_cache_write`] with one-byte cache elements, storing `fp8(x / scale)` (IEEE f32
    /// division, round to nearest even, saturating to the finite range, NaN -> `0x7f`).
    ///
    /// - `k_scale`, `v_scale`: device pointers to `num_scales` floats each, or null = 1.0;
    ///   `num_scales` is 1 (one scale for the layer) or divides `row_elems` (one per KV head:
    ///   element `e` of a row uses entry `e / (row_elems / num_scales)`).
    /// - `in_dtype`: 0 = f16, 1 = bf16, 2 = f32; `kv_dtype`: 1 = E4M3, 2 = E5M2.
    pub fn pa_kv_cache_write_fp8(
        key: *const c_void,
        value: *const c_void,
        key_cache: *mut c_void,
        value_cache: *mut c_void,
        slot_mapping: *const i64,
        k_scale: *const f32,
        v_scale: *const f32,
        num_scales: i64,
        num_tokens: i64,
        row_elems: i64,
        key_stride: i64,
        value_stride: i64,
        num_blocks: i64,
        block_size: i64,
        cache_block_stride: i64,
        in_dtype: i32,
        kv_dtype: i32,
        stream: *mut c_void,
    ) -> CudaStatus;

    /// Split-KV decode for requests `[req_begin, req_end)` of `args`, each with exactly one query
    /// token or none (CUDA-graph padding, skipped: nothing is read or written for it)
    /// (`csrc/paged_decode.cu`); with `num_splits > 1` it also merges the splits (a combine
    /// kernel, or the last split of each group when the variant folds it) and needs `workspace` of
    /// `counter_slots + num_splits * n * num_heads * (head_size + 2)` floats whose first
    /// `counter_slots` ([`pa_paged_decode_counter_slots`]) are zero; the launch leaves them zero.
    ///
    /// Every device-side metadata value is clamped before use (tokens to `num_tokens`, sequence
    /// lengths to `max_blocks_per_req * block_size`, block ids to `num_blocks`), so the kernel
    /// touches only the buffers' first elements as sized by `args`, whatever the device data holds.
    pub fn pa_paged_decode(args: *const PaAttnArgs, stream: *mut c_void) -> CudaStatus;

    /// Tensor-core varlen attention for requests `[req_begin, req_end)` of any query length
    /// (`csrc/paged_prefill.cu`); `max_query_len` sizes the grid. Same clamping as the decode.
    pub fn pa_paged_prefill(args: *const PaAttnArgs, stream: *mut c_void) -> CudaStatus;

    /// The Hopper (sm_90a, wgmma) prefill for requests `[req_begin, req_end)`
    /// (`csrc/paged_prefill_sm90.cu`): the same contract and clamping as [`pa_paged_prefill`];
    /// `cudaErrorNotSupported` for a head size off this path (only 64 and 128) or a current device
    /// that is not compute capability 9.0.
    pub fn pa_paged_prefill_sm90(args: *const PaAttnArgs, stream: *mut c_void) -> CudaStatus;

    /// 1 when [`pa_paged_prefill_sm90`] runs `head_size` / `dtype` (0 = f16, 1 = bf16) on the
    /// current device, else 0. Needs a current CUDA context.
    pub fn pa_paged_prefill_sm90_supported(head_size: i32, dtype: i32) -> i32;

    /// 1 when the current device is compute capability 9.0, else 0. Needs a current CUDA context.
    pub fn pa_paged_prefill_sm90_device() -> i32;

    /// Query rows one sm90 prefill block computes (0: head size not on that path).
    pub fn pa_paged_prefill_sm90_rows_per_block(head_size: i32) -> i32;

    /// Resident blocks per SM of the sm90 prefill kernel, like [`pa_paged_prefill_blocks_per_sm`].
    pub fn pa_paged_prefill_sm90_blocks_per_sm(head_size: i32, dtype: i32, blocks: *mut i32) -> CudaStatus;

    /// The warp-specialised Hopper prefill (`csrc/paged_prefill_sm90ws.cu`: a cp.async producer
    /// warpgroup and two ping-ponged wgmma consumer warpgroups) for requests `[req_begin,
    /// req_end)`: the same contract and clamping as [`pa_paged_prefill`]; `cudaErrorNotSupported`
    /// for a shape off this path (see [`pa_paged_prefill_sm90ws_supported`]).
    pub fn pa_paged_prefill_sm90ws(args: *const PaAttnArgs, stream: *mut c_void) -> CudaStatus;

    /// 1 when [`pa_paged_prefill_sm90ws`] runs `head_size` / `dtype` (0 = f16, 1 = bf16) with a
    /// cache of storage `kv_dtype` (0 = the compute type; FP8 caches are not on this path) on the
    /// current device, else 0. Needs a current CUDA context.
    pub fn pa_paged_prefill_sm90ws_supported(head_size: i32, dtype: i32, kv_dtype: i32) -> i32;

    /// Query rows one block of [`pa_paged_prefill_sm90ws`] computes (0: head size not on that path).
    pub fn pa_paged_prefill_sm90ws_rows_per_block(head_size: i32) -> i32;

    /// Resident blocks per SM of the warp-specialised prefill, like [`pa_paged_prefill_blocks_per_sm`].
    pub fn pa_paged_prefill_sm90ws_blocks_per_sm(head_size: i32, dtype: i32, blocks: *mut i32) -> CudaStatus;

    /// Largest GQA group the decode kernel takes for a head size (0: head size unsupported).
    pub fn pa_paged_decode_max_group(head_size: i32) -> i32;

    /// Keys per tile of the decode kernel for a head size (0: unsupported).
    pub fn pa_paged_decode_tile_keys(head_size: i32) -> i32;

    /// Query heads one decode block computes (0: head size unsupported).
    pub fn pa_paged_decode_heads_per_block(head_size: i32) -> i32;

    /// Query rows one prefill block computes (0: head size unsupported).
    pub fn pa_paged_prefill_rows_per_block(head_size: i32) -> i32;

    /// Resident blocks per SM of the decode kernel for `head_size`, `dtype` (0 = f16, 1 = bf16)
    /// and `variant` (as in [`PaAttnArgs::decode_variant`]) on the current context's device,
    /// written to `*blocks` on success.
    pub fn pa_paged_decode_blocks_per_sm(head_size: i32, dtype: i32, variant: i32, blocks: *mut i32) -> CudaStatus;

    /// [`pa_paged_decode_blocks_per_sm`] for a KV cache of kind `kv_dtype` (0 = the compute type,
    /// 1 = FP8 E4M3, 2 = FP8 E5M2): FP8 caches run their own instantiation (more pipeline stages
    /// of half-size tiles), whose occupancy may differ.
    pub fn pa_paged_decode_blocks_per_sm_kv(
        head_size: i32,
        dtype: i32,
        kv_dtype: i32,
        variant: i32,
        blocks: *mut i32,
    ) -> CudaStatus;

    /// K/V bytes one block of the decode instantiation for these arguments keeps in flight (the
    /// tiles of every pipeline stage but the one being computed). Needs no CUDA context.
    pub fn pa_paged_decode_bytes_in_flight(
        head_size: i32,
        dtype: i32,
        kv_dtype: i32,
        variant: i32,
        bytes: *mut i64,
    ) -> CudaStatus;

    /// The pipeline (a [`PaAttnArgs::decode_variant`] code without the fold bit) the auto variant
    /// runs on the current context's device for a grid of `blocks` decode blocks and `split_keys`
    /// (batch-invariant mode when positive), written to `*pipeline` on success.
    pub fn pa_paged_decode_auto_pipeline(
        head_size: i32,
        dtype: i32,
        kv_dtype: i32,
        blocks: i64,
        split_keys: i32,
        pipeline: *mut i32,
    ) -> CudaStatus;

    /// Floats at the front of the decode workspace that hold the folded combine's counters.
    pub fn pa_paged_decode_counter_slots() -> i32;

    /// The per-block timeline of the last decode launch on the current device, in a build with
    /// `PAGED_ATTN_DECODE_TRACE` set: writes the number of blocks the build records to
    /// `*built_blocks` (0, and nothing copied, in a normal build), then, for `max_blocks > 0`,
    /// synchronises the device and copies up to `max_blocks` records of 8 `u64` (global timer at
    /// each mark, then the SM) to `host`.
    pub fn pa_decode_trace_read(host: *mut u64, max_blocks: i32, built_blocks: *mut i32) -> CudaStatus;

    /// The per-round timeline of the last warp-specialised prefill launch on the current device,
    /// in a build with `PAGED_ATTN_PREFILL_TRACE` set: writes the number of records the build
    /// keeps (blocks x rounds; 0, and nothing copied, in a normal build) to `*built_records` and
    /// the rounds per block to `*rounds_per_block`, then, for `max_records > 0`, synchronises the
    /// device and copies up to `max_records` records of 29 `u64` (block-major) to `host`.
    pub fn pa_prefill_trace_read(
        host: *mut u64,
        max_records: i32,
        built_records: *mut i32,
        rounds_per_block: *mut i32,
    ) -> CudaStatus;

    /// Resident blocks per SM of the sm80 prefill kernel for `head_size` and `dtype` (0 = f16,
    /// 1 = bf16) on the current context's device, written to `*blocks` on success.
    pub fn pa_paged_prefill_blocks_per_sm(head_size: i32, dtype: i32, blocks: *mut i32) -> CudaStatus;

    /// The synthetic model's Q/K/V for every layer of a step (`csrc/synthetic_model.cu`):
    /// `fused` is `[num_layers][num_tokens][(num_heads + 2 * num_kv_heads) * head_size]` with
    /// token rows `row_stride` and layers `layer_stride` elements apart; `inputs` holds the
    /// positions (`[num_tokens]` i64) then the token ids (`[num_tokens]` i64). `head_size` is a
    /// multiple of 4; `dtype` 0 = f16, 1 = bf16, 2 = f32.
    pub fn pa_synthetic_qkv(
        fused: *mut c_void,
        inputs: *const i64,
        num_layers: i64,
        num_tokens: i64,
        num_heads: i32,
        num_kv_heads: i32,
        head_size: i32,
        row_stride: i64,
        layer_stride: i64,
        seed: u64,
        dtype: i32,
        stream: *mut c_void,
    ) -> CudaStatus;

    /// The synthetic model's next token per request (`csrc/synthetic_model.cu`): a hash of the first
    /// 4 values of the first 2 heads of row `last_rows[r]` of `out` (token / head strides in
    /// elements), modulo `vocab`, into `next[r]`; a row outside `0..num_tokens` gives token 0 and
    /// reads nothing.
    pub fn pa_synthetic_sample(
        out: *const c_void,
        token_stride: i64,
        head_stride: i64,
        last_rows: *const i64,
        num_reqs: i64,
        num_tokens: i64,
        num_heads: i32,
        head_size: i32,
        seed: u64,
        vocab: u32,
        next: *mut u32,
        dtype: i32,
        stream: *mut c_void,
    ) -> CudaStatus;

    /// A side stream (`csrc/side_stream.cu`): a non-blocking stream and fork/join events on the
    /// current context, written to `*out` as an opaque handle.
    pub fn pa_side_stream_create(out: *mut *mut c_void) -> CudaStatus;

    /// Destroys a handle of [`pa_side_stream_create`] (its context current).
    pub fn pa_side_stream_destroy(side: *mut c_void);

    /// The side stream itself (a `cudaStream_t`), for launches on it.
    pub fn pa_side_stream_handle(side: *mut c_void) -> *mut c_void;

    /// Work on the side stream after this waits for work queued on `stream` before it.
    pub fn pa_side_stream_fork(side: *mut c_void, stream: *mut c_void) -> CudaStatus;

    /// Work on `stream` after this waits for work queued on the side stream before it.
    pub fn pa_side_stream_join(side: *mut c_void, stream: *mut c_void) -> CudaStatus;

    /// The runtime's message for a status; a static string.
    pub fn pa_error_string(status: CudaStatus) -> *const c_char;
}

/// The argument block of [`pa_paged_decode`] and [`pa_paged_prefill`]; mirrors `PaAttnArgs` in
/// `csrc/attention/common.cuh` field for field.
///
/// Query and out are strided `[num_tokens, num_heads, head_size]` views (token and head strides
/// in elements, the last dimension contiguous); each cache is `[num_blocks, block_size,
/// num_kv_heads, head_size]` with blocks `kv_block_stride` elements apart. Base pointers and strides
/// are multiples of 16 bytes.
///
/// `alibi_slopes` and `sinks` are **host** pointers (`[num_heads]` floats or null): the launcher
/// copies them into the kernel parameters, so a captured CUDA graph holds their values.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PaAttnArgs {
    /// `[num_tokens, num_heads, head_size]`, strided.
    pub query: *const c_void,
    /// `[num_blocks, block_size, num_kv_heads, head_size]`, strided blocks.
    pub key_cache: *const c_void,
    /// Same shape and block stride as `key_cache`.
    pub value_cache: *const c_void,
    /// `[num_tokens, num_heads, head_size]`, strided.
    pub out: *mut c_void,
    /// `[num_tokens, num_heads]` or null.
    pub lse: *mut f32,
    /// `[num_reqs + 1]`.
    pub query_start_loc: *const i32,
    /// `[num_reqs]`.
    pub seq_lens: *const i32,
    /// `[num_reqs, max_blocks_per_req]`.
    pub block_table: *const i32,
    /// Host `[num_heads]` or null.
    pub alibi_slopes: *const f32,
    /// Host `[num_heads]` or null.
    pub sinks: *const f32,
    /// Split-KV partials or null.
    pub workspace: *mut f32,
    /// Elements of `workspace`.
    pub workspace_len: i64,
    /// Rows of query / out / lse.
    pub num_tokens: i64,
    /// Blocks of each cache.
    pub num_blocks: i64,
    /// Elements between consecutive tokens of `query`.
    pub q_token_stride: i64,
    /// Elements between consecutive heads of `query`.
    pub q_head_stride: i64,
    /// Elements between consecutive tokens of `out`.
    pub o_token_stride: i64,
    /// Elements between consecutive heads of `out`.
    pub o_head_stride: i64,
    /// Elements between consecutive blocks of each cache.
    pub kv_block_stride: i64,
    /// Rows of seq_lens / block_table.
    pub num_reqs: i32,
    /// First request of this launch.
    pub req_begin: i32,
    /// One past the last request of this launch.
    pub req_end: i32,
    /// Query heads.
    pub num_heads: i32,
    /// Key/value heads.
    pub num_kv_heads: i32,
    /// Elements per head.
    pub head_size: i32,
    /// Tokens per cache block.
    pub block_size: i32,
    /// Columns of the block table.
    pub max_blocks_per_req: i32,
    /// Longest query of the launch's requests (prefill grid).
    pub max_query_len: i32,
    /// Split-KV partitions (decode).
    pub num_splits: i32,
    /// 1 = bottom-right causal.
    pub causal: i32,
    /// -1 = unlimited.
    pub window_left: i32,
    /// -1 = unlimited.
    pub window_right: i32,
    /// Softmax scale.
    pub scale: f32,
    /// 0 = off.
    pub softcap: f32,
    /// 0 = f16, 1 = bf16.
    pub dtype: i32,
    /// Decode: keys per split (a multiple of 64), or 0 = keys divided evenly into `num_splits`.
    pub split_keys: i32,
    /// Decode: pipeline variant in the low byte, bit 8 = fold the combine into the last split.
    pub decode_variant: i32,
    /// KV-cache storage: 0 = the compute type, 1 = FP8 E4M3, 2 = FP8 E5M2.
    pub kv_dtype: i32,
    /// 1 = `k_scale` / `v_scale` hold one float per KV head, 0 = one for the layer.
    pub kv_scale_per_head: i32,
    /// Device `[1]` or `[num_kv_heads]` K dequantisation scale, or null = 1.0 (FP8 caches only).
    pub k_scale: *const f32,
    /// Device V dequantisation scale, like `k_scale`.
    pub v_scale: *const f32,
    /// Warp-specialised prefill only: 0 = one block per SM (the default), `N > 0` = at most N
    /// blocks, -1 = one block per work item (see `attention::WS_GRID_ENV`).
    pub prefill_grid: i32,
    /// Warp-specialised prefill only: the persistent blocks' item order, `WsOrder::code` (0 =
    /// strided, 1 = zig-zag).
    pub prefill_order: i32,
}

// The C side asserts the same size (`static_assert` in csrc/attention/common.cuh): a field added on
// one side only breaks both builds instead of shifting every later field at run time.
const _: () = assert!(std::mem::size_of::<PaAttnArgs>() == 256);
