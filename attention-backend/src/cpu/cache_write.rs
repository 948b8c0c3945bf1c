//! KV-cache write on the CPU: the reference the CUDA kernel is checked against, bit for bit.

use std::any::Any;

use attention_kernels::{Element, KvStorage};
use ndarray::{ArrayView3, ArrayViewMut4, Axis};

use crate::cache::CpuKvCache;
use crate::error::Result;
use crate::scales::KvScaleValues;
use crate::slot_mapping::SlotMapping;
use crate::validate;

/// Writes `key[t]` and `value[t]` (`[num_tokens, num_kv_heads, head_size]`) into the cache row
/// `slot_mapping[t]` for every token `t` whose slot is non-negative. Rows not named by a slot are
/// left as they were.
///
/// A cache of the compute type `T` receives the values bit for bit; an FP8 cache receives
/// `C::from_f32(x.to_f32() / scale)` with the cache's scale of the row's KV head (1.0 without
/// scales): round to nearest even, saturating to the format's largest finite value (infinities
/// included), NaN to the format's NaN, exactly what the GPU's conversion produces.
///
/// # Errors
/// The errors of [`validate::kv_cache_update`], returned before any row is written.
pub fn kv_cache_update<T: Element, C: KvStorage<T>>(
    key: ArrayView3<'_, T>,
    value: ArrayView3<'_, T>,
    cache: &mut CpuKvCache<C>,
    slot_mapping: &SlotMapping,
) -> Result<()> {
    const OP: &str = "kv_cache_update";
    let layout = *cache.layout();
    let _span = tracing::debug_span!("kv_cache_update", backend = "cpu", tokens = slot_mapping.len()).entered();
    validate::kv_cache_update_typed::<T>(OP, &layout, key.shape(), value.shape(), slot_mapping)?;
    // The cache checked its scales against its layout when they were set.
    let (key_cache, value_cache, scales) = cache.parts_mut();
    write_rows(key, value, key_cache, value_cache, scales, slot_mapping);
    Ok(())
}

/// One element as the cache stores it: the same bits when the cache has the compute type (no
/// round trip through `f32`, so NaN payloads survive as the GPU's copy keeps them), else the
/// quantised value. (`C` is either `T` itself or an FP8 type: [`KvStorage`] admits nothing else.)
#[inline]
fn store<T: Element, C: KvStorage<T>>(x: T, scale: f32) -> C {
    match (&x as &dyn Any).downcast_ref::<C>() {
        Some(c) => *c,
        None => C::from_f32(x.to_f32() / scale),
    }
}

/// The write itself into cache views (any strides), for callers that have already run
/// [`validate::kv_cache_update`] and the scale check on exactly these arguments (so shapes match,
/// every slot is inside the cache, and the scales have 1 or `num_kv_heads` entries).
pub(super) fn write_rows<T: Element, C: KvStorage<T>>(
    key: ArrayView3<'_, T>,
    value: ArrayView3<'_, T>,
    mut key_cache: ArrayViewMut4<'_, C>,
    mut value_cache: ArrayViewMut4<'_, C>,
    scales: Option<&KvScaleValues>,
    slot_mapping: &SlotMapping,
) {
    let block_size = key_cache.shape()[1];
    let num_kv_heads = key_cache.shape()[2];
    let head_scales: Vec<(f32, f32)> = (0..num_kv_heads).map(|h| scales.map_or((1.0, 1.0), |s| s.of_head(h))).collect();
    for (t, &slot) in slot_mapping.as_slice().iter().enumerate() {
        if slot < 0 {
            continue;
        }
        let (block, offset) = (slot as usize / block_size, slot as usize % block_size);
        for (h, &(ks, vs)) in head_scales.iter().enumerate() {
            let src_k = key.index_axis(Axis(0), t).index_axis_move(Axis(0), h);
            let src_v = value.index_axis(Axis(0), t).index_axis_move(Axis(0), h);
            let mut dst_k = key_cache.index_axis_mut(Axis(0), block);
            let mut dst_k = dst_k.index_axis_mut(Axis(0), offset);
            dst_k.index_axis_mut(Axis(0), h).zip_mut_with(&src_k, |d, &x| *d = store::<T, C>(x, ks));
            let mut dst_v = value_cache.index_axis_mut(Axis(0), block);
            let mut dst_v = dst_v.index_axis_mut(Axis(0), offset);
            dst_v.index_axis_mut(Axis(0), h).zip_mut_with(&src_v, |d, &x| *d = store::<T, C>(x, vs));
        }
    }
}
