//! KV-cache write on the CPU: the reference the CUDA kernel is checked against, bit for bit.

use attention_kernels::Element;
use ndarray::{ArrayView3, ArrayViewMut4, Axis};

use crate::cache::CpuKvCache;
use crate::error::Result;
use crate::slot_mapping::SlotMapping;
use crate::validate;

/// Writes `key[t]` and `value[t]` (`[num_tokens, num_kv_heads, head_size]`) into the cache row
/// `slot_mapping[t]` for every token `t` whose slot is non-negative. Rows not named by a slot are
/// left as they were.
///
/// # Errors
/// The errors of [`validate::kv_cache_update`], returned before any row is written.
pub fn kv_cache_update<T: Element>(
    key: ArrayView3<'_, T>,
    value: ArrayView3<'_, T>,
    cache: &mut CpuKvCache<T>,
    slot_mapping: &SlotMapping,
) -> Result<()> {
    const OP: &str = "kv_cache_update";
    let layout = *cache.layout();
    let _span = tracing::debug_span!("kv_cache_update", backend = "cpu", tokens = slot_mapping.len()).entered();
    validate::kv_cache_update_typed::<T>(OP, &layout, key.shape(), value.shape(), slot_mapping)?;
    let (key_cache, value_cache) = cache.key_value_mut();
    write_rows(key, value, key_cache, value_cache, slot_mapping);
    Ok(())
}

/// The write itself into cache views (any strides), for callers that have already run
/// [`validate::kv_cache_update`] on exactly these arguments (so shapes match and every slot is
/// inside the cache).
pub(super) fn write_rows<T: Element>(
    key: ArrayView3<'_, T>,
    value: ArrayView3<'_, T>,
    mut key_cache: ArrayViewMut4<'_, T>,
    mut value_cache: ArrayViewMut4<'_, T>,
    slot_mapping: &SlotMapping,
) {
    let block_size = key_cache.shape()[1];
    for (t, &slot) in slot_mapping.as_slice().iter().enumerate() {
        if slot < 0 {
            continue;
        }
        let (block, offset) = (slot as usize / block_size, slot as usize % block_size);
        key_cache.index_axis_mut(Axis(0), block).index_axis_mut(Axis(0), offset).assign(&key.index_axis(Axis(0), t));
        value_cache
            .index_axis_mut(Axis(0), block)
            .index_axis_mut(Axis(0), offset)
            .assign(&value.index_axis(Axis(0), t));
    }
}
