//! Allocation on the backend's device and copies between host and device.

use attention_kernels::{CacheElement, Element};
use ndarray::ArrayD;

use super::{Backend, Inner};
use crate::cache::CpuKvCache;
use crate::error::{AttentionError, Result};
use crate::layout::CacheLayout;
#[cfg(feature = "cuda")]
use crate::tensor::{wrong_device, Device};
use crate::tensor::{KvCache, Tensor};

impl Backend {
    /// A tensor on this backend's device holding `array` (moved on the CPU, copied to the device
    /// on CUDA).
    ///
    /// # Errors
    /// [`AttentionError::Cuda`] when the upload fails.
    pub fn tensor<T: Element, D: ndarray::Dimension>(&self, array: ndarray::Array<T, D>) -> Result<Tensor<T>> {
        match &self.inner {
            Inner::Cpu => Ok(Tensor::from_array(array)),
            #[cfg(feature = "cuda")]
            Inner::Cuda { dev, .. } => {
                let shape = array.shape().to_vec();
                let data = array.as_standard_layout();
                let slice = data.as_slice().unwrap_or(&[]);
                Ok(Tensor::Cuda(crate::cuda::DeviceTensor::from_host(dev, slice, &shape)?))
            }
        }
    }

    /// A zero-filled tensor on this backend's device.
    ///
    /// # Errors
    /// [`AttentionError::InvalidArgument`] for a shape whose element count overflows `usize`;
    /// [`AttentionError::AllocationFailed`] when host memory cannot be had; [`AttentionError::Cuda`]
    /// when the device allocation fails.
    pub fn zeros<T: Element>(&self, shape: &[usize]) -> Result<Tensor<T>> {
        match &self.inner {
            Inner::Cpu => {
                const OP: &str = "zeros";
                let overflow =
                    || AttentionError::InvalidArgument { op: OP, what: format!("shape {shape:?} overflows usize") };
                let n = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(overflow)?;
                let data = crate::cache::zeroed_vec::<T>(OP, "tensor", n)?;
                Ok(Tensor::Cpu(ArrayD::from_shape_vec(shape, data).map_err(|_| overflow())?))
            }
            #[cfg(feature = "cuda")]
            Inner::Cuda { dev, .. } => Ok(Tensor::Cuda(crate::cuda::DeviceTensor::zeros(dev, shape)?)),
        }
    }

    /// A host copy of a tensor (synchronises on CUDA).
    ///
    /// # Errors
    /// [`AttentionError::Cuda`] when the download fails; [`AttentionError::InvalidArgument`] for a
    /// tensor of the other device.
    pub fn to_host<T: Element>(&self, tensor: &Tensor<T>) -> Result<ArrayD<T>> {
        match (&self.inner, tensor) {
            (_, Tensor::Cpu(a)) => Ok(a.clone()),
            #[cfg(feature = "cuda")]
            (Inner::Cuda { dev, .. }, Tensor::Cuda(t)) => {
                let data = t.to_host(dev)?;
                ArrayD::from_shape_vec(t.shape(), data).map_err(|_| AttentionError::ShapeMismatch {
                    op: "to_host",
                    tensor: "tensor",
                    expected: t.shape().to_vec(),
                    actual: vec![],
                })
            }
            #[cfg(feature = "cuda")]
            (Inner::Cpu, t) => Err(wrong_device("to_host", "tensor", t.device(), Device::Cpu)),
        }
    }

    /// A zero-filled KV cache on this backend's device.
    ///
    /// # Errors
    /// [`AttentionError::InvalidArgument`] for a bad layout, [`AttentionError::AllocationFailed`]
    /// when host memory cannot be had (see [`CpuKvCache::zeros`]), [`AttentionError::Cuda`] when
    /// the device allocation fails.
    pub fn kv_cache<T: CacheElement>(&self, layout: CacheLayout) -> Result<KvCache<T>> {
        match &self.inner {
            Inner::Cpu => Ok(KvCache::Cpu(CpuKvCache::zeros(layout)?)),
            #[cfg(feature = "cuda")]
            Inner::Cuda { dev, .. } => Ok(KvCache::Cuda(crate::cuda::CudaKvCache::zeros(dev, layout)?)),
        }
    }

    /// A KV cache on this backend's device holding a host cache's contents (and its scales).
    ///
    /// # Errors
    /// [`AttentionError::Cuda`] when the upload fails.
    pub fn kv_cache_from_host<T: CacheElement>(&self, cache: CpuKvCache<T>) -> Result<KvCache<T>> {
        match &self.inner {
            Inner::Cpu => Ok(KvCache::Cpu(cache)),
            #[cfg(feature = "cuda")]
            Inner::Cuda { dev, .. } => {
                let layout = *cache.layout();
                let scales = cache.scales().cloned();
                let (k, v) = cache.into_arrays();
                let (k, v) = (k.as_standard_layout(), v.as_standard_layout());
                let (k, v) = (k.as_slice().unwrap_or(&[]), v.as_slice().unwrap_or(&[]));
                let mut c = crate::cuda::CudaKvCache::from_host(dev, layout, k, v)?;
                c.set_scales(scales)?;
                Ok(KvCache::Cuda(c))
            }
        }
    }

    /// A host copy of a KV cache and its scales (synchronises on CUDA).
    ///
    /// # Errors
    /// [`AttentionError::Cuda`] when the download fails; [`AttentionError::InvalidArgument`] for a
    /// cache of the other device.
    pub fn kv_cache_to_host<T: CacheElement>(&self, cache: &KvCache<T>) -> Result<CpuKvCache<T>> {
        match (&self.inner, cache) {
            (_, KvCache::Cpu(c)) => Ok(c.clone()),
            #[cfg(feature = "cuda")]
            (Inner::Cuda { dev, .. }, KvCache::Cuda(c)) => {
                let layout = *c.layout();
                let (k, v) = c.to_host(dev)?;
                let shape = layout.shape();
                let err = |_| AttentionError::ShapeMismatch {
                    op: "kv_cache_to_host",
                    tensor: "cache",
                    expected: shape.to_vec(),
                    actual: vec![],
                };
                let mut host = CpuKvCache::from_arrays(
                    ndarray::Array4::from_shape_vec(shape, k).map_err(err)?,
                    ndarray::Array4::from_shape_vec(shape, v).map_err(err)?,
                )?;
                host.set_scales(c.scales().cloned())?;
                Ok(host)
            }
            #[cfg(feature = "cuda")]
            (Inner::Cpu, c) => Err(wrong_device("kv_cache_to_host", "cache", c.device(), Device::Cpu)),
        }
    }
}
