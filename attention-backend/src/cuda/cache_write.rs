//! KV-cache write on the GPU.

use attention_kernels::launch::{self, KvCacheMut, KvScales, KvWriteDims};
use attention_kernels::{Element, KvStorage};

use super::{kernel_error, CudaDevice, CudaKvCache, DeviceSlotMapping, DeviceTensor};
use crate::error::Result;
use crate::validate;

/// Writes `key[t]` / `value[t]` (`[num_tokens, num_kv_heads, head_size]`) into the cache row
/// `slot_mapping[t]`, skipping negative slots; enqueued on the device's stream, no sync. An FP8
/// cache stores `fp8(x / scale)` with the scales in its device buffer (see
/// [`crate::cpu::kv_cache_update`], which it matches bit for bit).
///
/// # Errors
/// The errors of [`validate::kv_cache_update`] (checked on the host before the launch), or
/// [`crate::AttentionError::Cuda`] when the launch fails.
pub fn kv_cache_update<T: Element, C: KvStorage<T>>(
    dev: &CudaDevice,
    key: &DeviceTensor<T>,
    value: &DeviceTensor<T>,
    cache: &mut CudaKvCache<C>,
    slot_mapping: &DeviceSlotMapping,
) -> Result<()> {
    const OP: &str = "kv_cache_update";
    let layout = *cache.layout();
    let _span = tracing::debug_span!("kv_cache_update", backend = "cuda", tokens = slot_mapping.len()).entered();
    validate::kv_cache_update_typed::<T>(OP, &layout, key.shape(), value.shape(), slot_mapping.host())?;
    write(dev, key, value, cache, slot_mapping)
}

/// The launch of [`kv_cache_update`] for arguments already checked.
pub(crate) fn write<T: Element, C: KvStorage<T>>(
    dev: &CudaDevice,
    key: &DeviceTensor<T>,
    value: &DeviceTensor<T>,
    cache: &mut CudaKvCache<C>,
    slot_mapping: &DeviceSlotMapping,
) -> Result<()> {
    const OP: &str = "kv_cache_update";
    let layout = *cache.layout();
    let dims = KvWriteDims::contiguous(slot_mapping.len(), layout.row_elems(), layout.num_blocks, layout.block_size);
    let scales = cache.device_scales.as_ref().map(|(k, v)| KvScales { key: k.as_view(), value: v.as_view() });
    launch::kv_cache_write(
        dev.stream(),
        key.buffer().as_view(),
        value.buffer().as_view(),
        KvCacheMut::Separate { key: cache.key.as_view_mut(), value: cache.value.as_view_mut() },
        slot_mapping.buffer().as_view(),
        dims,
        scales,
    )
    .map_err(|e| kernel_error(OP, e))
}
