//! Typed tensors and KV caches that live on either device, for the run-time [`crate::Backend`].
//!
//! The element type is a type parameter (`f32`, `f16`, `bf16`), so a dtype mix-up between two
//! arguments of one call is a compile error; the shape travels with the data and is checked by
//! [`crate::validate`] before any work. Which device holds the data is a run-time property
//! ([`Tensor::device`]); the backend refuses a tensor that lives on the other device.

use std::fmt;

use attention_kernels::{CacheElement, DType, Element};
use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD, Dimension, IntoDimension};

use crate::cache::CpuKvCache;
use crate::error::AttentionError;
use crate::layout::CacheLayout;
use crate::scales::KvScaleValues;

/// Where a tensor lives and which backend runs the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Device {
    /// Host memory, the ndarray backend ([`crate::cpu`]).
    Cpu,
    /// A CUDA device (after `CUDA_VISIBLE_DEVICES`), the cudarc backend (feature `cuda`). Which
    /// one is the [`crate::Backend`]'s business ([`crate::Backend::cuda_ordinal`]).
    Cuda,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda => f.write_str("cuda"),
        }
    }
}

/// A dense, row-major tensor of element type `T` on either device.
///
/// Build one with [`Tensor::from_array`] / [`crate::Backend::tensor`] and read it back with
/// [`crate::Backend::to_host`]; on the CPU the array can also be reached directly through
/// [`Tensor::as_array`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Tensor<T: Element> {
    /// An ndarray in host memory.
    Cpu(ArrayD<T>),
    /// A cudarc buffer with its shape.
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::DeviceTensor<T>),
}

impl<T: Element> Tensor<T> {
    /// A host tensor from any ndarray (any dimensionality).
    pub fn from_array<D: Dimension>(array: ndarray::Array<T, D>) -> Self {
        Tensor::Cpu(array.into_dyn())
    }

    /// A zero-filled host tensor.
    pub fn zeros_cpu<Sh: IntoDimension>(shape: Sh) -> Self {
        Tensor::Cpu(ArrayD::default(shape.into_dimension().into_dyn()))
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::Cpu(a) => a.shape(),
            #[cfg(feature = "cuda")]
            Tensor::Cuda(t) => t.shape(),
        }
    }

    /// The element type, `T::DTYPE`.
    pub fn dtype(&self) -> DType {
        T::DTYPE
    }

    /// Where the data lives.
    pub fn device(&self) -> Device {
        match self {
            Tensor::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Tensor::Cuda(_) => Device::Cuda,
        }
    }

    /// The host array, `None` for a device tensor.
    pub fn as_array(&self) -> Option<ArrayViewD<'_, T>> {
        match self {
            Tensor::Cpu(a) => Some(a.view()),
            #[cfg(feature = "cuda")]
            Tensor::Cuda(_) => None,
        }
    }

    /// The host array, mutably; `None` for a device tensor.
    pub fn as_array_mut(&mut self) -> Option<ArrayViewMutD<'_, T>> {
        match self {
            Tensor::Cpu(a) => Some(a.view_mut()),
            #[cfg(feature = "cuda")]
            Tensor::Cuda(_) => None,
        }
    }
}

impl<T: Element, D: Dimension> From<ndarray::Array<T, D>> for Tensor<T> {
    fn from(array: ndarray::Array<T, D>) -> Self {
        Tensor::from_array(array)
    }
}

/// One layer's paged KV cache on either device, of storage type `T`: the compute type of the
/// queries that use it, or an FP8 type with its scales (see [`CpuKvCache`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum KvCache<T: CacheElement> {
    /// Host arrays.
    Cpu(CpuKvCache<T>),
    /// Device buffers.
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaKvCache<T>),
}

impl<T: CacheElement> KvCache<T> {
    /// The cache's dimensions.
    pub fn layout(&self) -> &CacheLayout {
        match self {
            KvCache::Cpu(c) => c.layout(),
            #[cfg(feature = "cuda")]
            KvCache::Cuda(c) => c.layout(),
        }
    }

    /// The storage type, `T::DTYPE`.
    pub fn dtype(&self) -> DType {
        T::DTYPE
    }

    /// The FP8 scales the cache holds (`None`: unquantised, or FP8 read with 1.0).
    pub fn scales(&self) -> Option<&KvScaleValues> {
        match self {
            KvCache::Cpu(c) => c.scales(),
            #[cfg(feature = "cuda")]
            KvCache::Cuda(c) => c.scales(),
        }
    }

    /// Replaces the scales of an FP8 cache (`None`: 1.0). On CUDA the new values are copied into
    /// the cache's device scale buffer in place (asynchronously, on the cache's stream), so a
    /// captured CUDA graph replays with them.
    ///
    /// # Errors
    /// [`AttentionError::InvalidKvScales`] (see [`CpuKvCache::set_scales`]);
    /// [`AttentionError::Cuda`] when the copy fails.
    pub fn set_scales(&mut self, scales: Option<KvScaleValues>) -> crate::error::Result<()> {
        match self {
            KvCache::Cpu(c) => c.set_scales(scales),
            #[cfg(feature = "cuda")]
            KvCache::Cuda(c) => c.set_scales(scales),
        }
    }

    /// Where the cache lives.
    pub fn device(&self) -> Device {
        match self {
            KvCache::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            KvCache::Cuda(_) => Device::Cuda,
        }
    }

    /// The host cache, `None` for a device cache.
    pub fn as_cpu(&self) -> Option<&CpuKvCache<T>> {
        match self {
            KvCache::Cpu(c) => Some(c),
            #[cfg(feature = "cuda")]
            KvCache::Cuda(_) => None,
        }
    }
}

impl<T: CacheElement> KvCache<T> {
    /// The host cache, mutably; `None` for a device cache.
    pub fn as_cpu_mut(&mut self) -> Option<&mut CpuKvCache<T>> {
        match self {
            KvCache::Cpu(c) => Some(c),
            #[cfg(feature = "cuda")]
            KvCache::Cuda(_) => None,
        }
    }
}

impl<T: CacheElement> From<CpuKvCache<T>> for KvCache<T> {
    fn from(cache: CpuKvCache<T>) -> Self {
        KvCache::Cpu(cache)
    }
}

/// The error for a tensor handed to the backend of the other device.
pub(crate) fn wrong_device(op: &'static str, name: &'static str, found: Device, backend: Device) -> AttentionError {
    AttentionError::InvalidArgument { op, what: format!("`{name}` lives on {found} but the backend runs on {backend}") }
}
