//! Argument checks shared by the CPU and CUDA backends, run before any work.
//!
//! Both backends call the same functions with the shapes and dtypes of their tensors, so a bad
//! argument gets the same error whichever device would have run it.

use attention_kernels::DType;

use crate::error::{AttentionError, Result};
use crate::layout::CacheLayout;
use crate::slot_mapping::SlotMapping;

/// Shape and element type of one tensor argument, as the checks see it.
#[derive(Clone, Copy, Debug)]
pub struct TensorSpec<'a> {
    /// Argument name used in errors.
    pub name: &'static str,
    /// Shape.
    pub shape: &'a [usize],
    /// Element type.
    pub dtype: DType,
}

pub(crate) fn expect_dtype(op: &'static str, t: TensorSpec<'_>, expected: DType) -> Result<()> {
    if t.dtype != expected {
        return Err(AttentionError::DTypeMismatch { op, tensor: t.name, expected, actual: t.dtype });
    }
    Ok(())
}

pub(crate) fn expect_shape(op: &'static str, t: TensorSpec<'_>, expected: &[usize]) -> Result<()> {
    if t.shape != expected {
        return Err(AttentionError::ShapeMismatch {
            op,
            tensor: t.name,
            expected: expected.to_vec(),
            actual: t.shape.to_vec(),
        });
    }
    Ok(())
}

/// Checks one KV-cache write: `key` and `value` are `[num_tokens, num_kv_heads, head_size]` of the
/// cache's dtype, with `num_tokens = slot_mapping.len()`, and every slot lies inside the cache.
///
/// # Errors
/// [`AttentionError::ShapeMismatch`], [`AttentionError::DTypeMismatch`],
/// [`AttentionError::SlotOutOfRange`], or [`AttentionError::InvalidArgument`] for a bad layout.
pub fn kv_cache_update(
    op: &'static str,
    layout: &CacheLayout,
    cache_dtype: DType,
    key: TensorSpec<'_>,
    value: TensorSpec<'_>,
    slot_mapping: &SlotMapping,
) -> Result<()> {
    layout.check()?;
    let expected = [slot_mapping.len(), layout.num_kv_heads, layout.head_size];
    for t in [key, value] {
        expect_dtype(op, t, cache_dtype)?;
        expect_shape(op, t, &expected)?;
    }
    slot_mapping.check_within(op, layout.num_slots())
}
