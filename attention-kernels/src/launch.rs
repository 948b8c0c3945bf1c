//! Safe launchers over borrowed cudarc views.
//!
//! Each launcher checks what the kernel's memory safety depends on (every buffer large enough for
//! the dimensions and strides, every buffer on the stream's context) and then makes the single
//! `unsafe` call.
//! Checks on the *meaning* of the arguments (head counts, slot ranges, dtypes against a cache) are
//! `attention-backend`'s job and come first there, with richer errors.

use std::ffi::CStr;

use cudarc::driver::{CudaContext, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceSlice};

use crate::ffi;
use crate::{DType, Element, KernelError, KvStorage};

/// The dequantisation scales of an FP8 KV cache, in device memory so that a CUDA-graph replay
/// reads the values current at replay time: `[1]` (one per layer) or `[num_kv_heads]` floats each.
///
/// An FP8 cache stores `fp8(x / scale)` (saturating) and is read as `stored * scale`, vLLM's
/// `k_scale` / `v_scale` semantics. `None` where a launcher takes `Option<KvScales>` means 1.0.
#[derive(Debug)]
pub struct KvScales<'a> {
    /// The key scale(s).
    pub key: CudaView<'a, f32>,
    /// The value scale(s); the same length as `key`.
    pub value: CudaView<'a, f32>,
}

impl KvScales<'_> {
    /// Whether the scales are per KV head (`num_kv_heads` entries, more than one), after checking
    /// that both have 1 or `num_kv_heads` entries.
    pub(crate) fn per_head(&self, kernel: &'static str, num_kv_heads: usize) -> Result<bool, KernelError> {
        let (k, v) = (self.key.len(), self.value.len());
        if k != v || (k != 1 && k != num_kv_heads) {
            return Err(KernelError::InvalidArgument {
                kernel,
                what: format!(
                    "KV scales have {k} (key) and {v} (value) entries; both must be 1 or num_kv_heads = {num_kv_heads}"
                ),
            });
        }
        Ok(k > 1)
    }
}

/// Dimensions and strides of one KV-cache write, in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvWriteDims {
    /// Tokens to write (rows of `key` / `value` and entries of `slot_mapping`).
    pub num_tokens: usize,
    /// Elements of one token row: `num_kv_heads * head_size`.
    pub row_elems: usize,
    /// Distance between consecutive token rows of `key` (`>= row_elems`; equal when packed, larger
    /// for a slice of a fused QKV buffer).
    pub key_stride: usize,
    /// Distance between consecutive token rows of `value`.
    pub value_stride: usize,
    /// Blocks of each cache.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Distance between consecutive blocks of each cache (`>= block_size * row_elems`; twice that
    /// for an interleaved `[num_blocks, 2, block_size, row]` cache).
    pub cache_block_stride: usize,
}

impl KvWriteDims {
    /// Packed `key` / `value` rows and packed caches. A product that overflows saturates, and
    /// the launcher then refuses the write.
    pub fn contiguous(num_tokens: usize, row_elems: usize, num_blocks: usize, block_size: usize) -> Self {
        KvWriteDims {
            num_tokens,
            row_elems,
            key_stride: row_elems,
            value_stride: row_elems,
            num_blocks,
            block_size,
            cache_block_stride: block_size.saturating_mul(row_elems),
        }
    }
}

/// The caches a KV write fills, borrowed.
#[derive(Debug)]
pub enum KvCacheMut<'a, T> {
    /// One buffer per cache, each `[num_blocks, block_size, row]` with blocks
    /// `cache_block_stride` apart.
    Separate {
        /// The key cache.
        key: CudaViewMut<'a, T>,
        /// The value cache.
        value: CudaViewMut<'a, T>,
    },
    /// One buffer holding both: block `b`'s keys at `b * cache_block_stride`, its values
    /// `value_offset` elements later (for `[num_blocks, 2, block_size, row]`, `value_offset` is
    /// one block and the block stride two). The K and V regions of all blocks must be disjoint.
    Interleaved {
        /// The whole cache.
        cache: CudaViewMut<'a, T>,
        /// Elements from a block's keys to its values.
        value_offset: usize,
    },
}

const KV_WRITE: &str = "kv_cache_write";

pub(crate) fn check_len(
    kernel: &'static str,
    buffer: &'static str,
    actual: usize,
    required: usize,
) -> Result<(), KernelError> {
    if actual < required {
        return Err(KernelError::BufferTooSmall { kernel, buffer, required, actual });
    }
    Ok(())
}

pub(crate) fn same_context(
    kernel: &'static str,
    buffer: &'static str,
    stream: &CudaStream,
    buffer_stream: &CudaStream,
) -> Result<(), KernelError> {
    if stream.context() != buffer_stream.context() {
        return Err(KernelError::InvalidArgument {
            kernel,
            what: format!("buffer `{buffer}` lives on another CUDA context than the launch stream"),
        });
    }
    Ok(())
}

/// Makes `ctx` current on this thread (every launch and runtime query needs it), the driver's
/// refusal reported as `kernel`'s [`KernelError::Cuda`].
pub(crate) fn bind_ctx(kernel: &'static str, ctx: &CudaContext) -> Result<(), KernelError> {
    ctx.bind_to_thread().map_err(|e| KernelError::Cuda { kernel, code: e.0 as i32, message: format!("{e:?}") })
}

pub(crate) fn status_to_result(kernel: &'static str, status: ffi::CudaStatus) -> Result<(), KernelError> {
    if status == 0 {
        return Ok(());
    }
    // SAFETY: pa_error_string returns a pointer to a static, NUL-terminated string owned by the
    // CUDA runtime, valid for the life of the process, for any status value.
    let message = unsafe { CStr::from_ptr(ffi::pa_error_string(status)) }.to_string_lossy().into_owned();
    Err(KernelError::Cuda { kernel, code: status, message })
}

pub(crate) fn to_i64(kernel: &'static str, name: &str, v: usize) -> Result<i64, KernelError> {
    i64::try_from(v).map_err(|_| KernelError::InvalidArgument { kernel, what: format!("{name} = {v} exceeds i64") })
}

/// Writes `dims.num_tokens` rows of `key` and `value` into the caches at the rows named by
/// `slot_mapping` (slot `s` is row `s % block_size` of block `s / block_size`; negative = padding,
/// skipped), on `stream`, without synchronising.
///
/// An FP8 cache (`C` = [`crate::Fp8E4M3`] / [`crate::Fp8E5M2`]) stores `fp8(x / scale)`: IEEE f32
/// division, round to nearest even, saturating to the format's finite range (infinities too), NaN
/// kept NaN (`0x7f`): bit for bit what `C::from_f32(x.to_f32() / scale)` gives on the host.
/// `scales` holds 1 entry (the layer's) or one per KV head (the row's elements split into that
/// many equal heads); `None` means 1.0. A cache of the compute type takes no scales.
/// Dimensions and strides of the caches count elements of `C` (bytes for FP8).
///
/// # Errors
/// [`KernelError::BufferTooSmall`] when a buffer is shorter than `dims` require,
/// [`KernelError::InvalidArgument`] for a token stride shorter than a row, a block stride shorter
/// than a block, interleaved K and V regions that overlap, a buffer on another context, scales
/// for an unquantised cache or scales whose length is neither 1 nor a divisor of the row (or
/// differs between key and value),
/// [`KernelError::Cuda`] when the runtime rejects the launch.
///
/// Slots `>= num_blocks * block_size` are skipped by the kernel, never written; callers that must
/// report them check the slot mapping on the host first (as `attention-backend` does).
pub fn kv_cache_write<T: Element, C: KvStorage<T>>(
    stream: &CudaStream,
    key: CudaView<'_, T>,
    value: CudaView<'_, T>,
    cache: KvCacheMut<'_, C>,
    slot_mapping: CudaView<'_, i64>,
    dims: KvWriteDims,
    scales: Option<KvScales<'_>>,
) -> Result<(), KernelError> {
    if !C::QUANTISED && scales.is_some() {
        return Err(KernelError::InvalidArgument {
            kernel: KV_WRITE,
            what: format!("KV scales given for a {} cache (only FP8 caches are scaled)", C::DTYPE),
        });
    }
    let KvWriteDims { num_tokens, row_elems, key_stride, value_stride, num_blocks, block_size, cache_block_stride } =
        dims;
    let invalid = |what: String| KernelError::InvalidArgument { kernel: KV_WRITE, what };
    if row_elems == 0 || block_size == 0 {
        return Err(invalid("row_elems and block_size must be positive".into()));
    }
    if key_stride < row_elems || value_stride < row_elems {
        return Err(invalid(format!(
            "token strides ({key_stride}, {value_stride}) must be at least one row ({row_elems})"
        )));
    }
    let overflow = || invalid("dimensions overflow usize".into());
    let block_elems = block_size.checked_mul(row_elems).ok_or_else(overflow)?;
    if cache_block_stride < block_elems {
        return Err(invalid(format!(
            "cache block stride {cache_block_stride} is shorter than a block ({block_elems})"
        )));
    }
    // Elements one cache must hold from its base: one past the last block's last row.
    let cache_span = match num_blocks {
        0 => 0,
        n => (n - 1).checked_mul(cache_block_stride).and_then(|x| x.checked_add(block_elems)).ok_or_else(overflow)?,
    };
    let num_slots = num_blocks.checked_mul(block_size).ok_or_else(overflow)?;
    let (value_offset, cache_len) = match &cache {
        KvCacheMut::Separate { key: kc, value: vc } => {
            check_len(KV_WRITE, "value_cache", vc.len(), cache_span)?;
            (None, kc.len())
        }
        KvCacheMut::Interleaved { cache: c, value_offset } => {
            // K of block b: [b * stride, b * stride + block); V: the same + value_offset. Disjoint
            // for every pair of blocks exactly when V starts after K ends and ends before the next
            // block's K starts.
            let end = value_offset.checked_add(block_elems).ok_or_else(overflow)?;
            if *value_offset < block_elems || end > cache_block_stride {
                return Err(invalid(format!(
                    "interleaved cache: value offset {value_offset} must leave the keys ({block_elems} \
                     elements) and the values inside a block stride of {cache_block_stride}"
                )));
            }
            (Some(*value_offset), c.len())
        }
    };
    let need_cache = match value_offset {
        Some(off) if num_blocks > 0 => cache_span.checked_add(off).ok_or_else(overflow)?,
        _ => cache_span,
    };
    check_len(KV_WRITE, "key_cache", cache_len, need_cache)?;
    // FP8: 1 scale for the layer, or one per KV head (a count that divides the row; the row's
    // elements then split into that many heads of equal size).
    let num_scales = match &scales {
        Some(sc) => {
            let (k, v) = (sc.key.len(), sc.value.len());
            if k != v || k == 0 || !row_elems.is_multiple_of(k) {
                return Err(invalid(format!(
                    "KV scales have {k} (key) and {v} (value) entries; both must be 1 or num_kv_heads (a divisor \
                     of row_elems = {row_elems})"
                )));
            }
            same_context(KV_WRITE, "kv_scales.key", stream, sc.key.stream())?;
            same_context(KV_WRITE, "kv_scales.value", stream, sc.value.stream())?;
            k
        }
        None => 1,
    };
    if num_tokens == 0 {
        return Ok(());
    }
    let span = |stride: usize| (num_tokens - 1).checked_mul(stride).and_then(|x| x.checked_add(row_elems));
    check_len(KV_WRITE, "key", key.len(), span(key_stride).ok_or_else(overflow)?)?;
    check_len(KV_WRITE, "value", value.len(), span(value_stride).ok_or_else(overflow)?)?;
    check_len(KV_WRITE, "slot_mapping", slot_mapping.len(), num_tokens)?;
    for (name, s) in [("key", key.stream()), ("value", value.stream()), ("slot_mapping", slot_mapping.stream())] {
        same_context(KV_WRITE, name, stream, s)?;
    }
    match &cache {
        KvCacheMut::Separate { key: kc, value: vc } => {
            same_context(KV_WRITE, "key_cache", stream, kc.stream())?;
            same_context(KV_WRITE, "value_cache", stream, vc.stream())?;
        }
        KvCacheMut::Interleaved { cache: c, .. } => same_context(KV_WRITE, "cache", stream, c.stream())?,
    }
    let args = (
        to_i64(KV_WRITE, "num_tokens", num_tokens)?,
        to_i64(KV_WRITE, "row_elems", row_elems)?,
        to_i64(KV_WRITE, "key_stride", key_stride)?,
        to_i64(KV_WRITE, "value_stride", value_stride)?,
        to_i64(KV_WRITE, "num_blocks", num_blocks)?,
        to_i64(KV_WRITE, "block_size", block_size)?,
        to_i64(KV_WRITE, "cache_block_stride", cache_block_stride)?,
    );
    to_i64(KV_WRITE, "num_slots", num_slots)?;
    bind_ctx(KV_WRITE, stream.context())?;

    let (k, _k_guard) = key.device_ptr(stream);
    let (v, _v_guard) = value.device_ptr(stream);
    let (slots, _s_guard) = slot_mapping.device_ptr(stream);
    let (k_scale, v_scale, _scale_guards) = match &scales {
        Some(sc) => {
            let (k, kg) = sc.key.device_ptr(stream);
            let (v, vg) = sc.value.device_ptr(stream);
            (k as *const f32, v as *const f32, Some((kg, vg)))
        }
        None => (std::ptr::null(), std::ptr::null(), None),
    };
    let (mut kc_view, mut vc_view, value_offset) = match cache {
        KvCacheMut::Separate { key, value } => (key, Some(value), 0),
        KvCacheMut::Interleaved { cache, value_offset } => (cache, None, value_offset),
    };
    let (kc, _kc_guard) = kc_view.device_ptr_mut(stream);
    let (vc, _vc_guard) = match vc_view.as_mut() {
        Some(vc) => {
            let (p, g) = vc.device_ptr_mut(stream);
            (p, Some(g))
        }
        // In bytes: value_offset elements, inside the view (its length was checked above).
        None => (kc + (value_offset * std::mem::size_of::<C>()) as u64, None),
    };
    if C::QUANTISED {
        let in_dtype = match T::DTYPE {
            DType::F16 => 0,
            DType::BF16 => 1,
            _ => 2,
        };
        let kv_dtype = match C::DTYPE {
            DType::Fp8E4M3 => 1,
            _ => 2,
        };
        // SAFETY: as for the unquantised write below (same pointers, lengths, strides and
        // disjointness checks, all counted in elements of `T` for key/value and of `C` for the
        // caches), with one-byte cache elements: `C` is one of the two FP8 types (the only
        // quantised `KvStorage` types), `repr(transparent)` over `u8`, as the kernel writes them.
        // `T` is f16, bf16 or f32 (sealed), matching `in_dtype`. The scale pointers are null or
        // point to `num_scales` live f32 of `stream`'s context (both views hold `num_scales`
        // entries, checked above), borrowed for this call; the kernel reads entries below
        // `row_elems / (row_elems / num_scales) = num_scales` only.
        let status = unsafe {
            ffi::pa_kv_cache_write_fp8(
                k as *const _,
                v as *const _,
                kc as *mut _,
                vc as *mut _,
                slots as *const i64,
                k_scale,
                v_scale,
                to_i64(KV_WRITE, "num_scales", num_scales)?,
                args.0,
                args.1,
                args.2,
                args.3,
                args.4,
                args.5,
                args.6,
                in_dtype,
                kv_dtype,
                stream.cu_stream() as *mut _,
            )
        };
        return status_to_result(KV_WRITE, status);
    }
    // SAFETY: every pointer comes from a live cudarc view on `stream`'s context (checked above),
    // borrowed for the duration of this call, and the guards keep cudarc's event tracking ordered
    // around the launch. The kernel reads at most `span(stride)` elements of key/value and
    // `num_tokens` slots, and writes only rows of blocks `0..num_blocks` (it skips any slot
    // outside `0..num_slots`), i.e. below `cache_span` elements from each cache pointer (plus
    // `value_offset` for the interleaved values), all within the lengths checked above; the
    // interleaved K and V regions are disjoint (checked above), as are two separate mutable views.
    // `T` is one of the three sealed element types, so `size_of::<T>()` is 2 or 4 as the kernel
    // requires, and `C` is `T` here (an unquantised cache: `KvStorage` admits no other), so the
    // kernel's byte copy moves whole elements.
    let status = unsafe {
        ffi::pa_kv_cache_write(
            k as *const _,
            v as *const _,
            kc as *mut _,
            vc as *mut _,
            slots as *const i64,
            args.0,
            args.1,
            args.2,
            args.3,
            args.4,
            args.5,
            args.6,
            std::mem::size_of::<T>() as i32,
            stream.cu_stream() as *mut _,
        )
    };
    status_to_result(KV_WRITE, status)
}
