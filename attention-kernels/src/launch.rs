//! Safe launchers over cudarc buffers.
//!
//! Each launcher checks what the kernel's memory safety depends on (every buffer large enough for
//! the dimensions, every buffer on the stream's context) and then makes the single `unsafe` call.
//! Checks on the *meaning* of the arguments (head counts, slot ranges, dtypes against a cache) are
//! `attention-backend`'s job and come first there, with richer errors.

use std::ffi::CStr;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::ffi;
use crate::{Element, KernelError};

/// Dimensions of one KV-cache write, in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvWriteDims {
    /// Tokens to write (rows of `key` / `value` and entries of `slot_mapping`).
    pub num_tokens: usize,
    /// Elements of one token row: `num_kv_heads * head_size`.
    pub row_elems: usize,
    /// Distance between consecutive token rows of `key` (`>= row_elems`; equal when contiguous).
    pub key_stride: usize,
    /// Distance between consecutive token rows of `value`.
    pub value_stride: usize,
    /// Rows of each cache: `num_blocks * block_size`.
    pub num_slots: usize,
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

/// Writes `dims.num_tokens` rows of `key` and `value` into `key_cache` / `value_cache` at the rows
/// named by `slot_mapping` (negative = padding, skipped), on `stream`, without synchronising.
///
/// # Errors
/// [`KernelError::BufferTooSmall`] when a buffer is shorter than `dims` require,
/// [`KernelError::InvalidArgument`] for a stride shorter than a row or a buffer on another context,
/// [`KernelError::Cuda`] when the runtime rejects the launch.
///
/// Slots `>= dims.num_slots` are skipped by the kernel, never written; callers that must report them
/// check the slot mapping on the host first (as `attention-backend` does).
pub fn kv_cache_write<T: Element>(
    stream: &CudaStream,
    key: &impl DevicePtr<T>,
    value: &impl DevicePtr<T>,
    key_cache: &mut impl DevicePtrMut<T>,
    value_cache: &mut impl DevicePtrMut<T>,
    slot_mapping: &impl DevicePtr<i64>,
    dims: KvWriteDims,
) -> Result<(), KernelError> {
    let KvWriteDims { num_tokens, row_elems, key_stride, value_stride, num_slots } = dims;
    if row_elems == 0 {
        return Err(KernelError::InvalidArgument { kernel: KV_WRITE, what: "row_elems must be positive".into() });
    }
    if key_stride < row_elems || value_stride < row_elems {
        return Err(KernelError::InvalidArgument {
            kernel: KV_WRITE,
            what: format!("token strides ({key_stride}, {value_stride}) must be at least one row ({row_elems})"),
        });
    }
    if num_tokens == 0 {
        return Ok(());
    }
    let span = |stride: usize| (num_tokens - 1).checked_mul(stride).and_then(|x| x.checked_add(row_elems));
    let overflow = || KernelError::InvalidArgument { kernel: KV_WRITE, what: "dimensions overflow usize".into() };
    check_len(KV_WRITE, "key", key.len(), span(key_stride).ok_or_else(overflow)?)?;
    check_len(KV_WRITE, "value", value.len(), span(value_stride).ok_or_else(overflow)?)?;
    let cache_elems = num_slots.checked_mul(row_elems).ok_or_else(overflow)?;
    check_len(KV_WRITE, "key_cache", key_cache.len(), cache_elems)?;
    check_len(KV_WRITE, "value_cache", value_cache.len(), cache_elems)?;
    check_len(KV_WRITE, "slot_mapping", slot_mapping.len(), num_tokens)?;
    for (name, s) in [
        ("key", key.stream()),
        ("value", value.stream()),
        ("key_cache", key_cache.stream()),
        ("value_cache", value_cache.stream()),
        ("slot_mapping", slot_mapping.stream()),
    ] {
        same_context(KV_WRITE, name, stream, s)?;
    }
    let args = (
        to_i64(KV_WRITE, "num_tokens", num_tokens)?,
        to_i64(KV_WRITE, "row_elems", row_elems)?,
        to_i64(KV_WRITE, "key_stride", key_stride)?,
        to_i64(KV_WRITE, "value_stride", value_stride)?,
        to_i64(KV_WRITE, "num_slots", num_slots)?,
    );
    stream.context().bind_to_thread().map_err(|e| KernelError::Cuda {
        kernel: KV_WRITE,
        code: e.0 as i32,
        message: format!("{e:?}"),
    })?;

    let (k, _k_guard) = key.device_ptr(stream);
    let (v, _v_guard) = value.device_ptr(stream);
    let (kc, _kc_guard) = key_cache.device_ptr_mut(stream);
    let (vc, _vc_guard) = value_cache.device_ptr_mut(stream);
    let (slots, _s_guard) = slot_mapping.device_ptr(stream);
    // SAFETY: every pointer comes from a live cudarc allocation on `stream`'s context (checked
    // above), borrowed for the duration of this call, and the guards keep cudarc's event tracking
    // ordered around the launch. The kernel reads at most `span(stride)` elements of key/value and
    // `num_tokens` slots, and writes only rows `0..num_slots` of the caches (it skips any slot
    // outside that range), all within the lengths checked above. `T` is one of the three sealed
    // element types, so `size_of::<T>()` is 2 or 4 as the kernel requires.
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
            std::mem::size_of::<T>() as i32,
            stream.cu_stream() as *mut _,
        )
    };
    status_to_result(KV_WRITE, status)
}
