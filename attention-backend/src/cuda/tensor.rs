//! Device tensors: a cudarc buffer with its shape, and the cache and slot mapping built on them.

use attention_kernels::Element;
use cudarc::driver::CudaSlice;

use super::{driver_error, CudaDevice};
use crate::error::{AttentionError, Result};
use crate::layout::CacheLayout;
use crate::slot_mapping::SlotMapping;

/// A dense, row-major tensor in device memory.
#[derive(Debug)]
pub struct DeviceTensor<T: Element> {
    buf: CudaSlice<T>,
    shape: Vec<usize>,
}

impl<T: Element> DeviceTensor<T> {
    /// Copies a host slice to the device with the given shape.
    ///
    /// # Errors
    /// [`AttentionError::ShapeMismatch`] when `data.len()` is not the shape's product;
    /// [`AttentionError::Cuda`] on a driver failure.
    pub fn from_host(dev: &CudaDevice, data: &[T], shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(AttentionError::ShapeMismatch {
                op: "DeviceTensor::from_host",
                tensor: "data",
                expected: shape.to_vec(),
                actual: vec![data.len()],
            });
        }
        let buf = dev.stream().clone_htod(data).map_err(|e| driver_error("DeviceTensor::from_host", e))?;
        Ok(DeviceTensor { buf, shape: shape.to_vec() })
    }

    /// A zero-filled tensor.
    ///
    /// # Errors
    /// [`AttentionError::Cuda`] when the allocation fails.
    pub fn zeros(dev: &CudaDevice, shape: &[usize]) -> Result<Self> {
        let n = shape.iter().product();
        let buf = dev.stream().alloc_zeros(n).map_err(|e| driver_error("DeviceTensor::zeros", e))?;
        Ok(DeviceTensor { buf, shape: shape.to_vec() })
    }

    /// Copies back to the host (synchronises the stream).
    ///
    /// # Errors
    /// [`AttentionError::Cuda`] on a driver failure, including an earlier asynchronous one.
    pub fn to_host(&self, dev: &CudaDevice) -> Result<Vec<T>> {
        dev.stream().clone_dtoh(&self.buf).map_err(|e| driver_error("DeviceTensor::to_host", e))
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The underlying buffer.
    pub fn buffer(&self) -> &CudaSlice<T> {
        &self.buf
    }

    /// The underlying buffer, mutably.
    pub fn buffer_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.buf
    }
}

/// One layer's key and value caches in device memory, `[num_blocks, block_size, num_kv_heads,
/// head_size]` each.
#[derive(Debug)]
pub struct CudaKvCache<T: Element> {
    layout: CacheLayout,
    pub(crate) key: CudaSlice<T>,
    pub(crate) value: CudaSlice<T>,
}

impl<T: Element> CudaKvCache<T> {
    /// A zero-filled cache.
    ///
    /// # Errors
    /// [`AttentionError::InvalidArgument`] for a bad layout, [`AttentionError::Cuda`] when the
    /// allocation fails.
    pub fn zeros(dev: &CudaDevice, layout: CacheLayout) -> Result<Self> {
        layout.check()?;
        let n = layout.num_elements().unwrap_or(0);
        let alloc = |what| dev.stream().alloc_zeros::<T>(n).map_err(|e| driver_error(what, e));
        Ok(CudaKvCache { layout, key: alloc("CudaKvCache::zeros")?, value: alloc("CudaKvCache::zeros")? })
    }

    /// A cache holding copies of host data (each `layout.num_elements()` long, row-major NHD).
    ///
    /// # Errors
    /// [`AttentionError::ShapeMismatch`] for a wrong length, [`AttentionError::Cuda`] on failure.
    pub fn from_host(dev: &CudaDevice, layout: CacheLayout, key: &[T], value: &[T]) -> Result<Self> {
        layout.check()?;
        let n = layout.num_elements().unwrap_or(0);
        for (name, data) in [("key_cache", key), ("value_cache", value)] {
            if data.len() != n {
                return Err(AttentionError::ShapeMismatch {
                    op: "CudaKvCache::from_host",
                    tensor: name,
                    expected: layout.shape().to_vec(),
                    actual: vec![data.len()],
                });
            }
        }
        let up = |d: &[T]| dev.stream().clone_htod(d).map_err(|e| driver_error("CudaKvCache::from_host", e));
        Ok(CudaKvCache { layout, key: up(key)?, value: up(value)? })
    }

    /// The cache's dimensions.
    pub fn layout(&self) -> &CacheLayout {
        &self.layout
    }

    /// Copies both caches back to the host (synchronises).
    ///
    /// # Errors
    /// [`AttentionError::Cuda`] on a driver failure.
    pub fn to_host(&self, dev: &CudaDevice) -> Result<(Vec<T>, Vec<T>)> {
        let down = |b: &CudaSlice<T>| dev.stream().clone_dtoh(b).map_err(|e| driver_error("CudaKvCache::to_host", e));
        Ok((down(&self.key)?, down(&self.value)?))
    }

    /// The key cache buffer.
    pub fn key_buffer(&self) -> &CudaSlice<T> {
        &self.key
    }

    /// The value cache buffer.
    pub fn value_buffer(&self) -> &CudaSlice<T> {
        &self.value
    }
}

/// A [`SlotMapping`] uploaded to the device: `i64` there too, and it remembers its largest slot so
/// range checks against a cache need no read-back.
#[derive(Debug)]
pub struct DeviceSlotMapping {
    buf: CudaSlice<i64>,
    host: SlotMapping,
}

impl DeviceSlotMapping {
    /// Uploads a slot mapping (asynchronously, on the device's stream).
    ///
    /// # Errors
    /// [`AttentionError::Cuda`] on a driver failure.
    pub fn upload(dev: &CudaDevice, slots: &SlotMapping) -> Result<Self> {
        let buf = if slots.is_empty() {
            dev.stream().alloc_zeros::<i64>(1)
        } else {
            dev.stream().clone_htod(slots.as_slice())
        }
        .map_err(|e| driver_error("DeviceSlotMapping::upload", e))?;
        Ok(DeviceSlotMapping { buf, host: slots.clone() })
    }

    /// The host copy it was uploaded from.
    pub fn host(&self) -> &SlotMapping {
        &self.host
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.host.len()
    }

    /// True when there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }

    /// The device buffer (`i64`, at least one element).
    pub fn buffer(&self) -> &CudaSlice<i64> {
        &self.buf
    }
}
