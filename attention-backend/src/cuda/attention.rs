//! Paged attention on the GPU: the split-KV decode kernel for the batch's single-token decodes,
//! the tensor-core varlen kernel for everything else, both enqueued on the device's stream.

use attention_kernels::attention::{
    self as kernels, AttentionBuffers, AttentionDims, AttentionFeatures, AttentionKernel, AttentionStrides, SideStream,
    MAX_FEATURE_HEADS, SUPPORTED_HEAD_SIZES,
};
use attention_kernels::{DType, Element, KvStorage};
use cudarc::driver::CudaSlice;

use super::metadata::launched_prefill_sms;
use super::{driver_error, kernel_error, CudaDevice, CudaKvCache, DeviceMetadata, DeviceTensor};
use crate::error::{AttentionError, Result};
use crate::params::AttentionParams;
use crate::partition::MixedPartition;
use crate::validate;

const BACKEND: &str = "cuda";

/// Scratch memory of the attention kernels (split-KV partial outputs), reused across calls and
/// layers. It grows when a call needs more and never shrinks; a call that fits allocates nothing.
#[derive(Debug, Default)]
pub struct AttentionWorkspace {
    partial: Option<CudaSlice<f32>>,
    /// The stream the decode part of a mixed batch runs on beside the prefill part, made by the
    /// first mixed call and kept.
    side: Option<SideStream>,
}

impl AttentionWorkspace {
    /// An empty workspace; the first call that needs scratch memory allocates it.
    pub fn new() -> Self {
        AttentionWorkspace { partial: None, side: None }
    }

    /// A workspace with room for `floats` partial values already allocated (to keep allocation out
    /// of the first step, or out of CUDA-graph capture).
    ///
    /// # Errors
    /// [`AttentionError::Cuda`] when the allocation fails.
    pub fn with_capacity(dev: &CudaDevice, floats: usize) -> Result<Self> {
        let mut ws = AttentionWorkspace::new();
        ws.reserve(dev, floats)?;
        Ok(ws)
    }

    /// Floats currently allocated.
    pub fn capacity(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| p.len())
    }

    /// Makes room for at least `floats` values.
    ///
    /// # Errors
    /// [`AttentionError::Cuda`] when the allocation fails.
    pub fn reserve(&mut self, dev: &CudaDevice, floats: usize) -> Result<()> {
        if floats == 0 || self.capacity() >= floats {
            return Ok(());
        }
        // Grow geometrically so that a slowly growing batch reallocates rarely.
        let n = floats.max(self.capacity().saturating_mul(3) / 2);
        self.partial = None;
        let buf = dev.stream().alloc_zeros::<f32>(n).map_err(|e| driver_error("AttentionWorkspace::reserve", e))?;
        self.partial = Some(buf);
        Ok(())
    }
}

/// One layer's tensors for [`paged_attention`].
#[derive(Debug)]
pub struct AttentionIo<'a, T: Element, C: KvStorage<T> = T> {
    /// `[num_tokens, num_heads, head_size]`.
    pub query: &'a DeviceTensor<T>,
    /// Already holds every key and value of the step; of the compute type `T`, or an FP8 type
    /// read with the cache's device scales.
    pub cache: &'a CudaKvCache<C>,
    /// `[num_tokens, num_heads, head_size]`; rows of padding tokens are left untouched.
    pub out: &'a mut DeviceTensor<T>,
    /// Optional `[num_tokens, num_heads]` natural-log sum-exp per row.
    pub lse: Option<&'a mut DeviceTensor<f32>>,
}

/// One layer's tensors for [`forward`]: [`AttentionIo`] plus the step's new keys and values, and
/// the cache mutably (they are written into it first).
#[derive(Debug)]
pub struct ForwardIo<'a, T: Element, C: KvStorage<T> = T> {
    /// `[num_tokens, num_heads, head_size]`.
    pub query: &'a DeviceTensor<T>,
    /// The new tokens' keys, `[num_tokens, num_kv_heads, head_size]`.
    pub key: &'a DeviceTensor<T>,
    /// The new tokens' values, `[num_tokens, num_kv_heads, head_size]`.
    pub value: &'a DeviceTensor<T>,
    /// The layer's cache; the new keys and values are written at the step's slot mapping
    /// (quantised with the cache's scales when it is FP8).
    pub cache: &'a mut CudaKvCache<C>,
    /// `[num_tokens, num_heads, head_size]`; rows of padding tokens are left untouched.
    pub out: &'a mut DeviceTensor<T>,
    /// Optional `[num_tokens, num_heads]` natural-log sum-exp per row.
    pub lse: Option<&'a mut DeviceTensor<f32>>,
}

/// The attention variant of `params` as the launchers take it (per-head vectors borrowed).
pub(crate) fn features(params: &AttentionParams) -> AttentionFeatures<'_> {
    AttentionFeatures {
        scale: params.scale,
        causal: params.causal,
        window_left: params.window_left,
        window_right: params.window_right,
        softcap: params.softcap,
        alibi_slopes: params.alibi_slopes.as_deref(),
        sinks: params.sinks.as_deref(),
    }
}

/// The shapes of one attention call, for [`validate`].
fn specs<'a, T: Element, C: KvStorage<T>>(io: &'a AttentionIo<'_, T, C>) -> validate::AttentionSpecs<'a> {
    validate::AttentionSpecs::of::<T>(io.query.shape(), io.out.shape(), io.lse.as_ref().map(|l| l.shape()))
}

/// Everything [`paged_attention`] checks except the metadata: shapes, parameters, and what the
/// kernels support. The caller checks the metadata (each call, or once per step).
pub(crate) fn check_layer<T: Element>(
    op: &'static str,
    num_tokens: usize,
    params: &AttentionParams,
    layout: &crate::layout::CacheLayout,
    tensors: validate::AttentionSpecs<'_>,
) -> Result<()> {
    validate::attention_shapes(op, params, layout, T::DTYPE, tensors, num_tokens)?;
    check_kernel_support::<T>(op, params)
}

/// What the CUDA kernels can run: f16/bf16 storage, a compiled head size, per-head vectors that
/// fit the kernel parameters. Shared by every CUDA entry point, the planner's `run` included.
pub(crate) fn check_kernel_support<T: Element>(op: &'static str, params: &AttentionParams) -> Result<()> {
    if T::DTYPE == DType::F32 {
        return Err(AttentionError::Unsupported {
            op,
            backend: BACKEND,
            what: "f32 storage (the CUDA kernels take f16 and bf16; f32 runs on the CPU backend)".into(),
        });
    }
    if !SUPPORTED_HEAD_SIZES.contains(&params.head_size) {
        return Err(AttentionError::UnsupportedHeadSize {
            op,
            backend: BACKEND,
            head_size: params.head_size,
            supported: "64, 80, 96, 112, 128, 192, 256",
        });
    }
    if (params.alibi_slopes.is_some() || params.sinks.is_some()) && params.num_heads > MAX_FEATURE_HEADS {
        return Err(AttentionError::Unsupported {
            op,
            backend: BACKEND,
            what: format!("ALiBi slopes or sinks with more than {MAX_FEATURE_HEADS} query heads"),
        });
    }
    Ok(())
}

/// Attention of the batch described by `meta` over the paged cache of `io`, written to `io.out`
/// (rows of padding tokens untouched) and, when given, the natural-log sum-exp of each row to
/// `io.lse`. Enqueued on the device's stream; no host synchronisation, no allocation unless
/// `workspace` must grow.
///
/// Semantics: [`AttentionParams`]. Single-token decodes at the front of the batch run on the
/// split-KV decode kernel, everything else on the tensor-core varlen kernel (see
/// [`DeviceMetadata::split_plan`]).
///
/// # Errors
/// The errors of [`validate::paged_attention`]; [`AttentionError::Unsupported`] for f32 storage or
/// ALiBi/sinks with more than 256 heads; [`AttentionError::UnsupportedHeadSize`];
/// [`AttentionError::Cuda`] when a launch fails. Nothing is launched when an error is returned
/// before the first launch.
pub fn paged_attention<T: Element, C: KvStorage<T>>(
    dev: &CudaDevice,
    meta: &DeviceMetadata,
    params: &AttentionParams,
    io: AttentionIo<'_, T, C>,
    workspace: &mut AttentionWorkspace,
) -> Result<()> {
    const OP: &str = "paged_attention";
    let _span = tracing::debug_span!("paged_attention", backend = "cuda", reqs = meta.host.num_reqs()).entered();
    check_layer::<T>(OP, meta.host.num_tokens(), params, io.cache.layout(), specs(&io))?;
    meta.host.check_against(OP, io.cache.layout())?;
    launch(dev, meta, params, io, workspace)
}

/// The launches of one attention call whose arguments have been checked.
pub(crate) fn launch<T: Element, C: KvStorage<T>>(
    dev: &CudaDevice,
    meta: &DeviceMetadata,
    params: &AttentionParams,
    io: AttentionIo<'_, T, C>,
    workspace: &mut AttentionWorkspace,
) -> Result<()> {
    const OP: &str = "paged_attention";
    let AttentionIo { query, cache, out, mut lse } = io;
    let layout = *cache.layout();
    let host = &meta.host;
    let num_reqs = host.num_reqs();
    if num_reqs == 0 {
        return Ok(());
    }
    let plan = meta.split_plan_for_cache(params.num_heads, params.num_kv_heads, params.head_size, C::DTYPE);
    workspace.reserve(dev, plan.workspace_len)?;
    let features = features(params);
    let dims = |req_begin: usize, req_end: usize| AttentionDims {
        num_tokens: host.num_tokens(),
        num_heads: params.num_heads,
        num_kv_heads: params.num_kv_heads,
        head_size: params.head_size,
        num_blocks: layout.num_blocks,
        block_size: layout.block_size,
        num_reqs,
        max_blocks_per_req: host.block_table.max_blocks_per_req(),
        req_begin,
        req_end,
    };
    // A mixed batch: the decode part runs on a side stream, beside the prefill part.
    let mixed = plan.decode_reqs > 0 && plan.decode_reqs < num_reqs;
    if mixed && workspace.side.is_none() {
        workspace.side = Some(SideStream::new(dev.context()).map_err(|e| kernel_error(OP, e))?);
    }
    // Refused before the fork, so nothing is enqueued for a malformed setting.
    if mixed {
        MixedPartition::process()?;
    }
    let overlap = match (&workspace.side, mixed) {
        (Some(side), true) => side.fork(dev.stream()).map_err(|e| kernel_error(OP, e))?,
        _ => None,
    };
    // A partitioned mixed step launches its prefill part first, on `prefill_sms` SMs, so that the
    // decode blocks take the others (see MixedPartition).
    let prefill_sms = launched_prefill_sms::<T, C>(dev, params.head_size, plan.prefill_sms, overlap.is_some());
    // One launch over requests `begin..end`: on the side stream when `on_side` and overlapping.
    let mut launch_range = |kernel: AttentionKernel, begin: usize, end: usize, on_side: bool| {
        let d = dims(begin, end);
        let ws = matches!(kernel, AttentionKernel::Decode { .. });
        let bufs = AttentionBuffers {
            query: query.buffer().as_view(),
            key_cache: cache.key_buffer().as_view(),
            value_cache: cache.value_buffer().as_view(),
            kv_scales: cache.device_scales(),
            query_start_loc: meta.query_start_loc().as_view(),
            seq_lens: meta.seq_lens().as_view(),
            block_table: meta.block_table().as_view(),
            out: out.buffer_mut().as_view_mut(),
            lse: lse.as_mut().map(|l| l.buffer_mut().as_view_mut()),
            workspace: if ws { workspace.partial.as_mut().map(|w| w.as_view_mut()) } else { None },
            strides: AttentionStrides::contiguous(&d),
        };
        match (&overlap, on_side) {
            (Some(o), true) => o.launch(kernel, &d, &features, bufs),
            _ => kernels::paged_attention(dev.stream(), kernel, &d, &features, bufs),
        }
        .map_err(|e| kernel_error(OP, e))
    };
    let prefill = AttentionKernel::Prefill { max_query_len: plan.prefill_max_query_len, max_sms: prefill_sms };
    if prefill_sms > 0 {
        launch_range(prefill, plan.decode_reqs, num_reqs, false)?;
    }
    if plan.decode_reqs > 0 {
        launch_range(
            AttentionKernel::Decode { num_splits: plan.num_splits, split_keys: 0 },
            0,
            plan.decode_reqs,
            true,
        )?;
    }
    if plan.decode_reqs < num_reqs && prefill_sms == 0 {
        launch_range(prefill, plan.decode_reqs, num_reqs, false)?;
    }
    if let Some(o) = overlap {
        o.join().map_err(|e| kernel_error(OP, e))?;
    }
    Ok(())
}

/// One attention layer's work for a step: writes the step's `io.key` / `io.value` into
/// `io.cache` at `meta`'s slot mapping ([`super::kv_cache_update`]), then runs [`paged_attention`] over
/// the updated cache. Everything is enqueued on the device's stream; nothing synchronises. All
/// arguments are checked before the cache is written.
///
/// # Errors
/// As [`paged_attention`] and [`super::kv_cache_update`].
pub fn forward<T: Element, C: KvStorage<T>>(
    dev: &CudaDevice,
    meta: &DeviceMetadata,
    params: &AttentionParams,
    io: ForwardIo<'_, T, C>,
    workspace: &mut AttentionWorkspace,
) -> Result<()> {
    const OP: &str = "forward";
    let _span = tracing::debug_span!("forward", backend = "cuda", reqs = meta.host.num_reqs()).entered();
    let ForwardIo { query, key, value, cache, out, lse } = io;
    let layout = *cache.layout();
    let shapes = validate::AttentionSpecs::of::<T>(query.shape(), out.shape(), lse.as_ref().map(|l| l.shape()));
    check_layer::<T>(OP, meta.host.num_tokens(), params, &layout, shapes)?;
    validate::kv_cache_update_typed::<T>(OP, &layout, key.shape(), value.shape(), meta.slot_mapping().host())?;
    meta.host.check_against(OP, &layout)?;
    forward_checked(dev, meta, params, ForwardIo { query, key, value, cache, out, lse }, workspace)
}

/// [`forward`] after its checks (the caller ran them, or their equivalent once per step).
pub(crate) fn forward_checked<T: Element, C: KvStorage<T>>(
    dev: &CudaDevice,
    meta: &DeviceMetadata,
    params: &AttentionParams,
    io: ForwardIo<'_, T, C>,
    workspace: &mut AttentionWorkspace,
) -> Result<()> {
    let ForwardIo { query, key, value, cache, out, lse } = io;
    super::cache_write::write(dev, key, value, cache, meta.slot_mapping())?;
    launch(dev, meta, params, AttentionIo { query, cache, out, lse }, workspace)
}
