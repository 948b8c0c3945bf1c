//! Dispatch of the per-layer work to the backend's device, after validation.

use attention_kernels::{Element, KvStorage};
use ndarray::{Ix2, Ix3};

use super::{Backend, Inner, SlotSource, StepMetadata};
use crate::error::{AttentionError, Result};
use crate::params::AttentionParams;
use crate::tensor::{wrong_device, Device, KvCache, Tensor};
use crate::validate;

fn cpu_view<'a, T: Element>(
    op: &'static str,
    name: &'static str,
    t: &'a Tensor<T>,
) -> Result<ndarray::ArrayViewD<'a, T>> {
    t.as_array().ok_or_else(|| wrong_device(op, name, t.device(), Device::Cpu))
}

fn dims_error(op: &'static str, tensor: &'static str, expected_ndim: usize, actual: &[usize]) -> AttentionError {
    AttentionError::InvalidArgument {
        op,
        what: format!("`{tensor}` must have {expected_ndim} dimensions, its shape is {actual:?}"),
    }
}

impl Backend {
    /// Writes the new tokens' `key` / `value` (`[num_tokens, num_kv_heads, head_size]`) into the
    /// cache at `slot_mapping` (negative slots skipped); vLLM's `reshape_and_cache_flash`.
    /// `slot_mapping` is a [`StepSlotMapping`](super::StepSlotMapping) ([`Backend::slot_mapping`]) or a whole
    /// [`StepMetadata`].
    ///
    /// # Errors
    /// Arguments on the other device ([`AttentionError::InvalidArgument`]), the errors of
    /// [`validate::kv_cache_update`], or [`AttentionError::Cuda`].
    pub fn kv_cache_update<T: Element, C: KvStorage<T>>(
        &self,
        key: &Tensor<T>,
        value: &Tensor<T>,
        cache: &mut KvCache<C>,
        slot_mapping: &impl SlotSource,
    ) -> Result<()> {
        const OP: &str = "kv_cache_update";
        self.expect_device(OP, "key", key.device())?;
        self.expect_device(OP, "value", value.device())?;
        self.expect_device(OP, "cache", cache.device())?;
        self.expect_device(OP, "slot_mapping", slot_mapping.slots_device())?;
        validate::kv_cache_update_typed::<T>(
            OP,
            cache.layout(),
            key.shape(),
            value.shape(),
            slot_mapping.host_slots(),
        )?;
        // A step's slots obey the whole step contract, not just the cache's bounds.
        slot_mapping.check_slots(OP, cache.layout())?;
        match (&self.inner, key, value, cache) {
            (Inner::Cpu, Tensor::Cpu(k), Tensor::Cpu(v), KvCache::Cpu(c)) => {
                let k = k.view().into_dimensionality::<Ix3>().map_err(|_| dims_error(OP, "key", 3, k.shape()))?;
                let v = v.view().into_dimensionality::<Ix3>().map_err(|_| dims_error(OP, "value", 3, v.shape()))?;
                crate::cpu::kv_cache_update(k, v, c, slot_mapping.host_slots())
            }
            #[cfg(feature = "cuda")]
            (Inner::Cuda { dev, .. }, Tensor::Cuda(k), Tensor::Cuda(v), KvCache::Cuda(c)) => {
                let slots = slot_mapping
                    .cuda_slots()
                    .ok_or_else(|| wrong_device(OP, "slot_mapping", Device::Cpu, Device::Cuda))?;
                crate::cuda::kv_cache_update(dev, k, v, c, slots)
            }
            #[allow(unreachable_patterns)]
            _ => Err(AttentionError::InvalidArgument { op: OP, what: "arguments on different devices".into() }),
        }
    }

    /// Attention over the paged cache for every real token of the step, with the semantics of
    /// [`AttentionParams`]; the cache must already hold the step's keys and values. The tensors
    /// are described on [`AttentionTensors`]; padding rows of the outputs are left untouched (see
    /// [`crate::cpu::paged_attention`]).
    ///
    /// The step contract is checked on the step's first call with a cache of a given layout and
    /// not again (see [`StepMetadata`]); shapes and parameters are checked on every call.
    ///
    /// # Errors
    /// Arguments on the other device ([`AttentionError::InvalidArgument`]), the errors of
    /// [`validate::paged_attention`], [`AttentionError::Unsupported`] for what a backend cannot run,
    /// or [`AttentionError::Cuda`].
    pub fn paged_attention<T: Element, C: KvStorage<T>>(
        &self,
        step: &StepMetadata,
        params: &AttentionParams,
        io: AttentionTensors<'_, T, C>,
    ) -> Result<()> {
        const OP: &str = "paged_attention";
        let AttentionTensors { query, cache, out, lse } = io;
        self.check_attention(OP, step, params, Checked { query, cache, out, lse: lse.as_deref() })?;
        match &self.inner {
            Inner::Cpu => {
                let q = cpu_view(OP, "query", query)?;
                let q = q.into_dimensionality::<Ix3>().map_err(|_| dims_error(OP, "query", 3, query.shape()))?;
                let c = cache.as_cpu().ok_or_else(|| wrong_device(OP, "cache", cache.device(), Device::Cpu))?;
                let plan = crate::cpu::StepPlan::assume_checked(&step.meta, *c.layout());
                with_cpu_outputs(OP, out, lse, |o, l| plan.attend_as(OP, params, q, c, o, l))
            }
            #[cfg(feature = "cuda")]
            Inner::Cuda { dev, workspace, .. } => {
                let wrong = |name| wrong_device(OP, name, Device::Cpu, Device::Cuda);
                let (Tensor::Cuda(query), KvCache::Cuda(cache), Tensor::Cuda(out)) = (query, cache, out) else {
                    return Err(wrong("query"));
                };
                let lse = cuda_lse(OP, lse)?;
                let m = step.cuda().ok_or_else(|| wrong("metadata"))?;
                let mut ws = workspace.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                crate::cuda::attention::launch(
                    dev,
                    m,
                    params,
                    crate::cuda::AttentionIo { query, cache, out, lse },
                    &mut ws,
                )
            }
        }
    }

    /// One attention layer's step: [`Backend::kv_cache_update`] with the step's slot mapping, then
    /// [`Backend::paged_attention`] (vLLM's `FlashAttentionImpl.forward`). Everything is
    /// validated before the cache is written; the step contract once per step and cache layout
    /// (see [`StepMetadata`]).
    ///
    /// # Errors
    /// The errors of both.
    pub fn forward<T: Element, C: KvStorage<T>>(
        &self,
        step: &StepMetadata,
        params: &AttentionParams,
        io: ForwardTensors<'_, T, C>,
    ) -> Result<()> {
        const OP: &str = "forward";
        let ForwardTensors { query, key, value, cache, out, lse } = io;
        self.expect_device(OP, "key", key.device())?;
        self.expect_device(OP, "value", value.device())?;
        validate::kv_cache_update_typed::<T>(OP, cache.layout(), key.shape(), value.shape(), &step.meta.slot_mapping)?;
        self.check_attention(OP, step, params, Checked { query, cache, out, lse: lse.as_deref() })?;
        match &self.inner {
            Inner::Cpu => {
                let q = cpu_view(OP, "query", query)?;
                let q = q.into_dimensionality::<Ix3>().map_err(|_| dims_error(OP, "query", 3, query.shape()))?;
                let k = cpu_view(OP, "key", key)?;
                let k = k.into_dimensionality::<Ix3>().map_err(|_| dims_error(OP, "key", 3, key.shape()))?;
                let v = cpu_view(OP, "value", value)?;
                let v = v.into_dimensionality::<Ix3>().map_err(|_| dims_error(OP, "value", 3, value.shape()))?;
                let device = cache.device();
                let c = cache.as_cpu_mut().ok_or_else(|| wrong_device(OP, "cache", device, Device::Cpu))?;
                let plan = crate::cpu::StepPlan::assume_checked(&step.meta, *c.layout());
                let (key_cache, value_cache, kv_scales) = c.parts_mut();
                with_cpu_outputs(OP, out, lse, |out, lse| {
                    let layer = crate::cpu::LayerViews {
                        query: q,
                        new_kv: Some((k, v)),
                        key_cache,
                        value_cache,
                        kv_scales,
                        out,
                        lse,
                    };
                    plan.run_as(OP, params, layer)
                })
            }
            #[cfg(feature = "cuda")]
            Inner::Cuda { dev, workspace, .. } => {
                let wrong = |name| wrong_device(OP, name, Device::Cpu, Device::Cuda);
                let (Tensor::Cuda(key), Tensor::Cuda(value)) = (key, value) else { return Err(wrong("key")) };
                let KvCache::Cuda(cache) = cache else { return Err(wrong("cache")) };
                let (Tensor::Cuda(query), Tensor::Cuda(out)) = (query, out) else { return Err(wrong("query")) };
                let lse = cuda_lse(OP, lse)?;
                let m = step.cuda().ok_or_else(|| wrong("metadata"))?;
                let mut ws = workspace.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let io = crate::cuda::ForwardIo { query, key, value, cache, out, lse };
                crate::cuda::attention::forward_checked(dev, m, params, io, &mut ws)
            }
        }
    }

    /// Device checks, the shape and parameter checks of [`validate::paged_attention`] (and on
    /// CUDA what the kernels support), and the step contract once per step and layout.
    fn check_attention<T: Element, C: KvStorage<T>>(
        &self,
        op: &'static str,
        step: &StepMetadata,
        params: &AttentionParams,
        t: Checked<'_, T, C>,
    ) -> Result<()> {
        self.expect_device(op, "query", t.query.device())?;
        self.expect_device(op, "cache", t.cache.device())?;
        self.expect_device(op, "metadata", step.device())?;
        self.expect_device(op, "out", t.out.device())?;
        if let Some(l) = t.lse {
            self.expect_device(op, "lse", l.device())?;
        }
        let layout = t.cache.layout();
        let specs = validate::AttentionSpecs::of::<T>(t.query.shape(), t.out.shape(), t.lse.map(|l| l.shape()));
        match &self.inner {
            Inner::Cpu => validate::attention_shapes(op, params, layout, T::DTYPE, specs, step.meta.num_tokens())?,
            #[cfg(feature = "cuda")]
            Inner::Cuda { .. } => {
                crate::cuda::attention::check_layer::<T>(op, step.meta.num_tokens(), params, layout, specs)?
            }
        }
        step.check_contract(op, layout)
    }
}

/// One layer's tensors for [`Backend::paged_attention`].
#[derive(Debug)]
pub struct AttentionTensors<'a, T: Element, C: KvStorage<T> = T> {
    /// `[num_tokens, num_heads, head_size]`, `num_tokens` the step's slot-mapping length.
    pub query: &'a Tensor<T>,
    /// Already holds every key and value of the step; of the compute type `T`, or an FP8 type
    /// read with its own scales.
    pub cache: &'a KvCache<C>,
    /// `[num_tokens, num_heads, head_size]`; padding rows are left untouched.
    pub out: &'a mut Tensor<T>,
    /// Optional `[num_tokens, num_heads]` `f32` natural-log sum-exp per row.
    pub lse: Option<&'a mut Tensor<f32>>,
}

/// One layer's tensors for [`Backend::forward`]: [`AttentionTensors`] plus the step's new keys
/// and values, and the cache mutably (they are written into it first).
#[derive(Debug)]
pub struct ForwardTensors<'a, T: Element, C: KvStorage<T> = T> {
    /// `[num_tokens, num_heads, head_size]`.
    pub query: &'a Tensor<T>,
    /// The new tokens' keys, `[num_tokens, num_kv_heads, head_size]`.
    pub key: &'a Tensor<T>,
    /// The new tokens' values, `[num_tokens, num_kv_heads, head_size]`.
    pub value: &'a Tensor<T>,
    /// The layer's cache; the new keys and values are written at the step's slot mapping
    /// (quantised with the cache's scales when it is FP8).
    pub cache: &'a mut KvCache<C>,
    /// `[num_tokens, num_heads, head_size]`; padding rows are left untouched.
    pub out: &'a mut Tensor<T>,
    /// Optional `[num_tokens, num_heads]` `f32` natural-log sum-exp per row.
    pub lse: Option<&'a mut Tensor<f32>>,
}

/// The tensors [`Backend::check_attention`] looks at, borrowed shared.
struct Checked<'a, T: Element, C: KvStorage<T>> {
    query: &'a Tensor<T>,
    cache: &'a KvCache<C>,
    out: &'a Tensor<T>,
    lse: Option<&'a Tensor<f32>>,
}

/// Runs `f` on 3-D / 2-D mutable views of CPU `out` / `lse`.
fn with_cpu_outputs<T: Element>(
    op: &'static str,
    out: &mut Tensor<T>,
    lse: Option<&mut Tensor<f32>>,
    f: impl FnOnce(ndarray::ArrayViewMut3<'_, T>, Option<ndarray::ArrayViewMut2<'_, f32>>) -> Result<()>,
) -> Result<()> {
    let out_shape = out.shape().to_vec();
    let o = out.as_array_mut().ok_or_else(|| wrong_device(op, "out", Device::Cuda, Device::Cpu))?;
    let o = o.into_dimensionality::<Ix3>().map_err(|_| dims_error(op, "out", 3, &out_shape))?;
    let l = match lse {
        None => None,
        Some(t) => {
            let shape = t.shape().to_vec();
            let a = t.as_array_mut().ok_or_else(|| wrong_device(op, "lse", Device::Cuda, Device::Cpu))?;
            Some(a.into_dimensionality::<Ix2>().map_err(|_| dims_error(op, "lse", 2, &shape))?)
        }
    };
    f(o, l)
}

/// The device buffer of an optional CUDA `lse` (device checks were done before).
#[cfg(feature = "cuda")]
fn cuda_lse<'a>(
    op: &'static str,
    lse: Option<&'a mut Tensor<f32>>,
) -> Result<Option<&'a mut crate::cuda::DeviceTensor<f32>>> {
    match lse {
        None => Ok(None),
        Some(Tensor::Cuda(l)) => Ok(Some(l)),
        Some(_) => Err(wrong_device(op, "lse", Device::Cpu, Device::Cuda)),
    }
}
