//! Dispatch of the per-layer work to the backend's device, after validation.

use attention_kernels::Element;
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
    /// `slot_mapping` is a [`StepSlotMapping`] ([`Backend::slot_mapping`]) or a whole
    /// [`StepMetadata`].
    ///
    /// # Errors
    /// Arguments on the other device ([`AttentionError::InvalidArgument`]), the errors of
    /// [`validate::kv_cache_update`], or [`AttentionError::Cuda`].
    pub fn kv_cache_update<T: Element>(
        &self,
        key: &Tensor<T>,
        value: &Tensor<T>,
        cache: &mut KvCache<T>,
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
    /// [`AttentionParams`]; the cache must already hold the step's keys and values. `out` is
    /// `[num_tokens, num_heads, head_size]`, `lse` optionally `[num_tokens, num_heads]` `f32`;
    /// padding rows of both are left untouched (see [`crate::cpu::paged_attention`]).
    ///
    /// # Errors
    /// Arguments on the other device ([`AttentionError::InvalidArgument`]), the errors of
    /// [`validate::paged_attention`], [`AttentionError::Unsupported`] for what a backend cannot run,
    /// or [`AttentionError::Cuda`].
    pub fn paged_attention<T: Element>(
        &self,
        query: &Tensor<T>,
        cache: &KvCache<T>,
        step: &StepMetadata,
        params: &AttentionParams,
        out: &mut Tensor<T>,
        lse: Option<&mut Tensor<f32>>,
    ) -> Result<()> {
        const OP: &str = "paged_attention";
        self.check_attention(OP, query, cache, step, params, out, lse.as_deref())?;
        match &self.inner {
            Inner::Cpu => {
                let q = cpu_view(OP, "query", query)?;
                let q = q.into_dimensionality::<Ix3>().map_err(|_| dims_error(OP, "query", 3, query.shape()))?;
                let c = cache.as_cpu().ok_or_else(|| wrong_device(OP, "cache", cache.device(), Device::Cpu))?;
                with_cpu_outputs(OP, out, lse, |o, l| crate::cpu::paged_attention(q, c, &step.meta, params, o, l))
            }
            #[cfg(feature = "cuda")]
            Inner::Cuda { dev, workspace, .. } => {
                let (q, c, m, o, l) = cuda_args(OP, query, cache, step, out, lse)?;
                let mut ws = workspace.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                crate::cuda::paged_attention(dev, q, c, m, params, o, l, &mut ws)
            }
        }
    }

    /// One attention layer's step: [`Backend::kv_cache_update`] with the step's slot mapping, then
    /// [`Backend::paged_attention`] (vLLM's `FlashAttentionImpl.forward`). Everything is
    /// validated before the cache is written.
    ///
    /// # Errors
    /// The errors of both.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<T: Element>(
        &self,
        query: &Tensor<T>,
        key: &Tensor<T>,
        value: &Tensor<T>,
        cache: &mut KvCache<T>,
        step: &StepMetadata,
        params: &AttentionParams,
        out: &mut Tensor<T>,
        lse: Option<&mut Tensor<f32>>,
    ) -> Result<()> {
        const OP: &str = "forward";
        self.expect_device(OP, "key", key.device())?;
        self.expect_device(OP, "value", value.device())?;
        validate::kv_cache_update_typed::<T>(OP, cache.layout(), key.shape(), value.shape(), &step.meta.slot_mapping)?;
        self.check_attention(OP, query, cache, step, params, out, lse.as_deref())?;
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
                with_cpu_outputs(OP, out, lse, |o, l| crate::cpu::forward(q, k, v, c, &step.meta, params, o, l))
            }
            #[cfg(feature = "cuda")]
            Inner::Cuda { dev, workspace, .. } => {
                let (Tensor::Cuda(k), Tensor::Cuda(v)) = (key, value) else {
                    return Err(wrong_device(OP, "key", Device::Cpu, Device::Cuda));
                };
                let KvCache::Cuda(c) = cache else {
                    return Err(wrong_device(OP, "cache", Device::Cpu, Device::Cuda));
                };
                let (Tensor::Cuda(q), Tensor::Cuda(o), Some(m)) = (query, out, step.cuda()) else {
                    return Err(wrong_device(OP, "query", Device::Cpu, Device::Cuda));
                };
                let l = match lse {
                    None => None,
                    Some(Tensor::Cuda(l)) => Some(l),
                    Some(_) => return Err(wrong_device(OP, "lse", Device::Cpu, Device::Cuda)),
                };
                let mut ws = workspace.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                crate::cuda::forward(dev, q, k, v, c, m, params, o, l, &mut ws)
            }
        }
    }

    /// Device checks and [`validate::paged_attention`] on the tensors' shapes.
    #[allow(clippy::too_many_arguments)]
    fn check_attention<T: Element>(
        &self,
        op: &'static str,
        query: &Tensor<T>,
        cache: &KvCache<T>,
        step: &StepMetadata,
        params: &AttentionParams,
        out: &Tensor<T>,
        lse: Option<&Tensor<f32>>,
    ) -> Result<()> {
        self.expect_device(op, "query", query.device())?;
        self.expect_device(op, "cache", cache.device())?;
        self.expect_device(op, "metadata", step.device())?;
        self.expect_device(op, "out", out.device())?;
        if let Some(l) = lse {
            self.expect_device(op, "lse", l.device())?;
        }
        validate::paged_attention_typed::<T>(
            op,
            params,
            cache.layout(),
            query.shape(),
            out.shape(),
            lse.map(|l| l.shape()),
            &step.meta,
        )
    }
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

/// The device-side arguments of a CUDA attention call (device checks were done before).
#[cfg(feature = "cuda")]
#[allow(clippy::type_complexity)]
fn cuda_args<'a, T: Element>(
    op: &'static str,
    query: &'a Tensor<T>,
    cache: &'a KvCache<T>,
    step: &'a StepMetadata,
    out: &'a mut Tensor<T>,
    lse: Option<&'a mut Tensor<f32>>,
) -> Result<(
    &'a crate::cuda::DeviceTensor<T>,
    &'a crate::cuda::CudaKvCache<T>,
    &'a crate::cuda::DeviceMetadata,
    &'a mut crate::cuda::DeviceTensor<T>,
    Option<&'a mut crate::cuda::DeviceTensor<f32>>,
)> {
    let wrong = |name| wrong_device(op, name, Device::Cpu, Device::Cuda);
    let Tensor::Cuda(q) = query else { return Err(wrong("query")) };
    let KvCache::Cuda(c) = cache else { return Err(wrong("cache")) };
    let m = step.cuda().ok_or_else(|| wrong("metadata"))?;
    let Tensor::Cuda(o) = out else { return Err(wrong("out")) };
    let l = match lse {
        None => None,
        Some(Tensor::Cuda(l)) => Some(l),
        Some(_) => return Err(wrong("lse")),
    };
    Ok((q, c, m, o, l))
}
