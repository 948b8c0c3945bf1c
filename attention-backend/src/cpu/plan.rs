//! Plan once per step, run once per layer: the CPU side of the engine-facing API, in the shape of
//! the CUDA backend's `cuda::StepPlanner::plan` / `cuda::StepPlan::run`.
//!
//! Checking a step against the step contract is linear in its tokens and used blocks; an engine
//! runs the same step through every layer of its model, so [`plan`] does that check once and each
//! layer's [`StepPlan::run`] checks only what can differ between layers: the parameters and the
//! shapes of the layer's own arrays. The arrays are the engine's ndarray views with any strides
//! ndarray allows, so the query, key and value sliced out of one fused QKV projection (along the
//! head axis) are read in place, without copies.

use attention_kernels::{Element, KvStorage};
use ndarray::{ArrayView3, ArrayViewMut2, ArrayViewMut3, ArrayViewMut4};

use super::attention::{attend, CacheViews};
use super::cache_write::write_rows;
use crate::cache::CpuKvCache;
use crate::error::{AttentionError, Result};
use crate::layout::CacheLayout;
use crate::metadata::{AttentionMetadata, StepCheckScratch};
use crate::params::AttentionParams;
use crate::scales::{self, KvScaleValues};
use crate::validate::{self, AttentionSpecs, TensorSpec};

/// Checks one step against the step contract for caches of `layout` (every check
/// [`super::forward`] makes on the metadata, [`AttentionMetadata::check_against`]) and returns
/// the plan every layer of the step runs with. Call once per step.
///
/// # Errors
/// [`AttentionError::InvalidArgument`] for a bad layout; the errors of
/// [`AttentionMetadata::check_against`].
pub fn plan<'m>(meta: &'m AttentionMetadata, layout: &CacheLayout) -> Result<StepPlan<'m>> {
    plan_as("plan", meta, layout, None)
}

/// [`plan`] under another operation name, optionally with a caller-owned scratch.
pub(super) fn plan_as<'m>(
    op: &'static str,
    meta: &'m AttentionMetadata,
    layout: &CacheLayout,
    scratch: Option<&mut StepCheckScratch>,
) -> Result<StepPlan<'m>> {
    layout.check()?;
    match scratch {
        Some(s) => meta.check_against_with(op, layout, s)?,
        None => meta.check_against(op, layout)?,
    }
    Ok(StepPlan { meta, layout: *layout })
}

/// A planner that owns the contract check's scratch (one entry per cache block), for an engine
/// that plans every step from one place and wants no thread-local state; [`plan`] uses a
/// per-thread scratch instead. Both check the same.
#[derive(Debug, Default)]
pub struct StepPlanner {
    scratch: StepCheckScratch,
}

impl StepPlanner {
    /// A planner with an empty scratch (it grows to the largest cache it is used with).
    pub fn new() -> Self {
        Self::default()
    }

    /// [`plan`] with this planner's scratch.
    ///
    /// # Errors
    /// As [`plan`].
    pub fn plan<'m>(&mut self, meta: &'m AttentionMetadata, layout: &CacheLayout) -> Result<StepPlan<'m>> {
        plan_as("plan", meta, layout, Some(&mut self.scratch))
    }
}

/// A checked step, borrowed from its metadata: what every layer's [`StepPlan::run`] relies on.
#[derive(Clone, Copy, Debug)]
pub struct StepPlan<'m> {
    meta: &'m AttentionMetadata,
    layout: CacheLayout,
}

/// One layer's arrays for [`StepPlan::run`], all borrowed from the engine, with any strides
/// ndarray allows. Rows are `meta.num_tokens()` long, padding included; padding rows of `out`
/// and `lse` are left untouched.
#[derive(Debug)]
pub struct LayerViews<'a, T: Element, C: KvStorage<T> = T> {
    /// `[num_tokens, num_heads, head_size]`.
    pub query: ArrayView3<'a, T>,
    /// The step's new keys and values `[num_tokens, num_kv_heads, head_size]`, written into the
    /// caches at the step's slot mapping before attention; `None` when the caches already hold
    /// them.
    pub new_kv: Option<(ArrayView3<'a, T>, ArrayView3<'a, T>)>,
    /// The layer's key cache, `[num_blocks, block_size, num_kv_heads, head_size]` of the planned
    /// layout, of the compute type `T` or an FP8 type.
    pub key_cache: ArrayViewMut4<'a, C>,
    /// The layer's value cache, shaped and typed like `key_cache`.
    pub value_cache: ArrayViewMut4<'a, C>,
    /// The scales of an FP8 cache (`None`: 1.0); must be `None` for a cache of type `T`.
    ///
    /// Borrowed here, like the caches, because the engine owns both: the plan/run API never owns
    /// a layer's state, and the scales are checked (count, finite, positive) on every run, which
    /// costs `num_kv_heads` comparisons.
    pub kv_scales: Option<&'a KvScaleValues>,
    /// `[num_tokens, num_heads, head_size]`.
    pub out: ArrayViewMut3<'a, T>,
    /// `[num_tokens, num_heads]` natural-log sum-exp per row (see
    /// [`super::AttentionIo::lse`]), or `None`.
    pub lse: Option<ArrayViewMut2<'a, f32>>,
}

impl<'m> StepPlan<'m> {
    /// The planned step's metadata.
    pub fn meta(&self) -> &'m AttentionMetadata {
        self.meta
    }

    /// The cache layout it was checked against.
    pub fn layout(&self) -> &CacheLayout {
        &self.layout
    }

    /// One layer of the planned step: the KV-cache write of `layer.new_kv` (when given), then
    /// attention of every real token, with the semantics of [`AttentionParams`]. The metadata is
    /// not checked again: only the parameters (linear in the number of heads) and the arrays'
    /// shapes, all before anything is written. Results are bit-identical to
    /// [`super::forward`] / [`super::paged_attention`] on the same values, whatever the strides.
    ///
    /// # Errors
    /// [`AttentionError::InvalidArgument`] for parameters that disagree with the cache layout
    /// (or fail [`AttentionParams::check`]); [`AttentionError::ShapeMismatch`] for an array of
    /// the wrong shape. Nothing is written when a check fails.
    /// [`AttentionError::InvalidKvScales`] for scales with a cache of type `T`, or scales of the
    /// wrong count or value.
    pub fn run<T: Element, C: KvStorage<T>>(
        &self,
        params: &AttentionParams,
        layer: LayerViews<'_, T, C>,
    ) -> Result<()> {
        self.run_as("run", params, layer)
    }

    /// A plan for metadata the caller has already checked against `layout` (the run-time
    /// `Backend` checks each step once and remembers it).
    pub(crate) fn assume_checked(meta: &'m AttentionMetadata, layout: CacheLayout) -> Self {
        StepPlan { meta, layout }
    }

    pub(crate) fn run_as<T: Element, C: KvStorage<T>>(
        &self,
        op: &'static str,
        params: &AttentionParams,
        layer: LayerViews<'_, T, C>,
    ) -> Result<()> {
        let LayerViews { query, new_kv, mut key_cache, mut value_cache, kv_scales, out, lse } = layer;
        let _span = tracing::debug_span!("run", backend = "cpu", tokens = self.meta.num_tokens()).entered();
        self.check_layer::<T>(
            op,
            params,
            LayerShapes {
                query: query.shape(),
                new_kv: new_kv.as_ref().map(|(k, v)| (k.shape(), v.shape())),
                key_cache: key_cache.shape(),
                value_cache: value_cache.shape(),
                out: out.shape(),
                lse: lse.as_ref().map(|l| l.shape()),
            },
        )?;
        scales::check_for::<C>(op, kv_scales, self.layout.num_kv_heads)?;
        if let Some((key, value)) = new_kv {
            // Every slot is inside the cache: the plan checked the step contract for this layout.
            write_rows(key, value, key_cache.view_mut(), value_cache.view_mut(), kv_scales, &self.meta.slot_mapping);
        }
        let cache = CacheViews { key: key_cache.view(), value: value_cache.view(), scales: kv_scales };
        attend(self.meta, params, query, cache, out, lse);
        Ok(())
    }

    /// Attention only, over a cache borrowed immutably (the run-time `Backend`'s
    /// `paged_attention`).
    pub(crate) fn attend_as<T: Element, C: KvStorage<T>>(
        &self,
        op: &'static str,
        params: &AttentionParams,
        query: ArrayView3<'_, T>,
        cache: &CpuKvCache<C>,
        out: ArrayViewMut3<'_, T>,
        lse: Option<ArrayViewMut2<'_, f32>>,
    ) -> Result<()> {
        let (key_cache, value_cache) = (cache.key(), cache.value());
        self.check_layer::<T>(
            op,
            params,
            LayerShapes {
                query: query.shape(),
                new_kv: None,
                key_cache: key_cache.shape(),
                value_cache: value_cache.shape(),
                out: out.shape(),
                lse: lse.as_ref().map(|l| l.shape()),
            },
        )?;
        attend(
            self.meta,
            params,
            query,
            CacheViews { key: key_cache, value: value_cache, scales: cache.scales() },
            out,
            lse,
        );
        Ok(())
    }

    /// The per-layer checks: parameters, and every array's shape against them and the plan.
    fn check_layer<T: Element>(&self, op: &'static str, params: &AttentionParams, s: LayerShapes<'_>) -> Result<()> {
        let (layout, num_tokens) = (&self.layout, self.meta.num_tokens());
        if let Some((key, value)) = s.new_kv {
            let spec = |name, shape| TensorSpec { name, shape, dtype: T::DTYPE };
            validate::kv_shapes(op, layout, T::DTYPE, spec("key", key), spec("value", value), num_tokens)?;
        }
        let specs = AttentionSpecs::of::<T>(s.query, s.out, s.lse);
        validate::attention_shapes(op, params, layout, T::DTYPE, specs, num_tokens)?;
        for (name, cache) in [("key_cache", s.key_cache), ("value_cache", s.value_cache)] {
            if cache != layout.shape() {
                return Err(AttentionError::ShapeMismatch {
                    op,
                    tensor: name,
                    expected: layout.shape().to_vec(),
                    actual: cache.to_vec(),
                });
            }
        }
        Ok(())
    }
}

/// The shapes of one layer's arrays, for [`StepPlan::check_layer`].
struct LayerShapes<'a> {
    query: &'a [usize],
    new_kv: Option<(&'a [usize], &'a [usize])>,
    key_cache: &'a [usize],
    value_cache: &'a [usize],
    out: &'a [usize],
    lse: Option<&'a [usize]>,
}
