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

/// The per-layer tensors of one attention call, as [`paged_attention`] sees them.
#[derive(Clone, Copy, Debug)]
pub struct AttentionSpecs<'a> {
    /// The queries, `[num_tokens, num_heads, head_size]` of the cache's dtype.
    pub query: TensorSpec<'a>,
    /// The output, shaped and typed like `query`.
    pub out: TensorSpec<'a>,
    /// The optional log-sum-exp output's shape, `[num_tokens, num_heads]` (always `f32`).
    pub lse: Option<&'a [usize]>,
}

impl<'a> AttentionSpecs<'a> {
    /// The specs of `query`, `out` and `lse` when query and output have the element type `T` by
    /// construction (the typed entry points of both backends).
    pub fn of<T: Element>(query: &'a [usize], out: &'a [usize], lse: Option<&'a [usize]>) -> Self {
        AttentionSpecs {
            query: TensorSpec { name: "query", shape: query, dtype: T::DTYPE },
            out: TensorSpec { name: "out", shape: out, dtype: T::DTYPE },
            lse,
        }
    }
}

/// [`paged_attention`] for callers whose cache has the element type `T` by construction (the
/// typed entry points of both backends; build `tensors` with [`AttentionSpecs::of`]).
///
/// # Errors
/// As [`paged_attention`].
pub fn paged_attention_typed<T: Element>(
    op: &'static str,
    params: &AttentionParams,
    layout: &CacheLayout,
    tensors: AttentionSpecs<'_>,
    meta: &AttentionMetadata,
) -> Result<()> {
    paged_attention(op, params, layout, T::DTYPE, tensors, meta)
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
    kv_shapes(op, layout, cache_dtype, key, value, slot_mapping.len())?;
    slot_mapping.check_within(op, layout.num_slots())
}

/// The shape and dtype half of [`kv_cache_update`] for a step of `num_tokens` rows (the slots are
/// the step contract's business).
pub(crate) fn kv_shapes(
    op: &'static str,
    layout: &CacheLayout,
    cache_dtype: DType,
    key: TensorSpec<'_>,
    value: TensorSpec<'_>,
    num_tokens: usize,
) -> Result<()> {
    let expected = [num_tokens, layout.num_kv_heads, layout.head_size];
    for t in [key, value] {
        expect_dtype(op, t, cache_dtype)?;
        expect_shape(op, t, &expected)?;
    }
    Ok(())
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
pub fn paged_attention(
    op: &'static str,
    params: &AttentionParams,
    layout: &CacheLayout,
    cache_dtype: DType,
    tensors: AttentionSpecs<'_>,
    meta: &AttentionMetadata,
) -> Result<()> {
    attention_shapes(op, params, layout, cache_dtype, tensors, meta.num_tokens())?;
    // `check_against` runs `AttentionMetadata::check` first: the whole step contract, one call.
    meta.check_against(op, layout)
}

/// Everything [`paged_attention`] checks except the metadata, for a step of `num_tokens` rows:
/// what a planned step still checks per layer.
pub(crate) fn attention_shapes(
    op: &'static str,
    params: &AttentionParams,
    layout: &CacheLayout,
    cache_dtype: DType,
    tensors: AttentionSpecs<'_>,
    num_tokens: usize,
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
    let expected = [num_tokens, params.num_heads, params.head_size];
    for t in [tensors.query, tensors.out] {
        expect_dtype(op, t, cache_dtype)?;
        expect_shape(op, t, &expected)?;
    }
    if let Some(shape) = tensors.lse {
        expect_shape(op, TensorSpec { name: "lse", shape, dtype: DType::F32 }, &[num_tokens, params.num_heads])?;
    }
    Ok(())
}
