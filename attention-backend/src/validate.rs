//! Argument checks shared by the CPU and CUDA backends, run before any work.
//!
//! Both backends call the same functions with the shapes and dtypes of their tensors, so a bad
//! argument gets the same error whichever device would have run it.

use attention_kernels::{DType, Element};

use crate::error::{AttentionError, Result};
use crate::layout::CacheLayout;
use crate::metadata::AttentionMetadata;
use crate::params::AttentionParams;
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

/// [`paged_attention`] for callers whose query, output and cache share the element type `T` by
/// construction (the typed entry points of both backends): only shapes, parameters and metadata can
/// be wrong.
///
/// # Errors
/// As [`paged_attention`].
pub fn paged_attention_typed<T: Element>(
    op: &'static str,
    params: &AttentionParams,
    layout: &CacheLayout,
    query_shape: &[usize],
    out_shape: &[usize],
    lse_shape: Option<&[usize]>,
    meta: &AttentionMetadata,
) -> Result<()> {
    paged_attention(
        op,
        params,
        layout,
        T::DTYPE,
        TensorSpec { name: "query", shape: query_shape, dtype: T::DTYPE },
        TensorSpec { name: "out", shape: out_shape, dtype: T::DTYPE },
        lse_shape,
        meta,
    )
}

/// [`kv_cache_update`] for callers whose key, value and cache share the element type `T` by
/// construction (the typed entry points of both backends): only shapes and slots can be wrong.
///
/// # Errors
/// As [`kv_cache_update`].
pub fn kv_cache_update_typed<T: Element>(
    op: &'static str,
    layout: &CacheLayout,
    key_shape: &[usize],
    value_shape: &[usize],
    slot_mapping: &SlotMapping,
) -> Result<()> {
    kv_cache_update(
        op,
        layout,
        T::DTYPE,
        TensorSpec { name: "key", shape: key_shape, dtype: T::DTYPE },
        TensorSpec { name: "value", shape: value_shape, dtype: T::DTYPE },
        slot_mapping,
    )
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

/// Checks one attention call before any work.
///
/// In order: the parameters on their own ([`AttentionParams::check`]); the parameters against the
/// cache (`head_size` and `num_kv_heads` equal to the layout's); `query` and `out` of the cache's
/// dtype and of shape `[num_tokens, num_heads, head_size]`, where `num_tokens` is the length of the
/// slot mapping (padding rows included); `lse`, when given, of shape `[num_tokens, num_heads]`; the
/// metadata against itself ([`AttentionMetadata::check`]) and against the cache
/// ([`AttentionMetadata::check_against`]: the step contract of ARCHITECTURE.md, slots following
/// the block table, padding slots negative, no block written by two users, every used block inside
/// the cache).
///
/// Both backends call this with the shapes and dtypes of their own tensors, so a bad argument gets
/// the same error on either device, and nothing has been read or written when it comes back.
///
/// # Errors
/// [`AttentionError::InvalidArgument`], [`AttentionError::ShapeMismatch`],
/// [`AttentionError::DTypeMismatch`], [`AttentionError::InvalidMetadata`], or one of the step
/// contract's errors listed on [`AttentionMetadata::check_against`], naming the first problem found.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    op: &'static str,
    params: &AttentionParams,
    layout: &CacheLayout,
    cache_dtype: DType,
    query: TensorSpec<'_>,
    out: TensorSpec<'_>,
    lse_shape: Option<&[usize]>,
    meta: &AttentionMetadata,
) -> Result<()> {
    params.check(op)?;
    layout.check()?;
    if params.head_size != layout.head_size {
        return Err(AttentionError::InvalidArgument {
            op,
            what: format!("params.head_size ({}) != the cache's head_size ({})", params.head_size, layout.head_size),
        });
    }
    if params.num_kv_heads != layout.num_kv_heads {
        return Err(AttentionError::InvalidArgument {
            op,
            what: format!(
                "params.num_kv_heads ({}) != the cache's num_kv_heads ({})",
                params.num_kv_heads, layout.num_kv_heads
            ),
        });
    }
    let num_tokens = meta.num_tokens();
    let expected = [num_tokens, params.num_heads, params.head_size];
    for t in [query, out] {
        expect_dtype(op, t, cache_dtype)?;
        expect_shape(op, t, &expected)?;
    }
    if let Some(shape) = lse_shape {
        expect_shape(op, TensorSpec { name: "lse", shape, dtype: DType::F32 }, &[num_tokens, params.num_heads])?;
    }
    // `check_against` runs `AttentionMetadata::check` first: the whole step contract, one call.
    meta.check_against(op, layout)
}
