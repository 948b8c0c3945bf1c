//! Device tensors: a cudarc buffer with its shape, and the cache and slot mapping built on them.

use attention_kernels::launch::KvScales;
use attention_kernels::{CacheElement, Element};
use cudarc::driver::CudaSlice;

use super::{driver_error, CudaDevice};
use crate::error::{AttentionError, Result};
use crate::layout::CacheLayout;
use crate::scales::{self, KvScaleValues};
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
/// head_size]` each, of storage type `T` (a compute type, or an FP8 type: see
/// [`crate::CpuKvCache`] for the semantics).
///
/// An FP8 cache owns a small device buffer of scales, `num_kv_heads` floats for keys and as many
/// for values (a per-layer scale is stored repeated per head), allocated once with the cache and
/// set to 1.0. [`CudaKvCache::set_scales`] copies new values into it in place: the address the
/// kernels read never changes, so a CUDA graph captured over a layer replays with the scales
/// current at replay time (vLLM's calibrated `k_scale` / `v_scale` can be loaded after capture).
#[derive(Debug)]
pub struct CudaKvCache<T: CacheElement> {
    layout: CacheLayout,
    pub(crate) key: CudaSlice<T>,
    pub(crate) value: CudaSlice<T>,
    /// The device scales of an FP8 cache (`None` for an unquantised one).
    pub(crate) device_scales: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
    /// The scales as last set (`None`: 1.0).
    scales: Option<KvScaleValues>,
}

impl<T: CacheElement> CudaKvCache<T> {
    /// A zero-filled cache.
    ///
    /// # Errors
    /// [`AttentionError::InvalidArgument`] for a bad layout, [`AttentionError::Cuda`] when the
    /// allocation fails.
    pub fn zeros(dev: &CudaDevice, layout: CacheLayout) -> Result<Self> {
        layout.check()?;
        let n = layout.num_elements().unwrap_or(0);
        let alloc = |what| dev.stream().alloc_zeros::<T>(n).map_err(|e| driver_error(what, e));
        let (key, value) = (alloc("CudaKvCache::zeros")?, alloc("CudaKvCache::zeros")?);
        let device_scales = Self::alloc_scales(dev, &layout)?;
        Ok(CudaKvCache { layout, key, value, device_scales, scales: None })
    }

    /// A zero-filled FP8 cache with its scales.
    ///
    /// # Errors
    /// As [`CudaKvCache::zeros`] and [`CudaKvCache::set_scales`].
    pub fn with_scales(dev: &CudaDevice, layout: CacheLayout, scales: KvScaleValues) -> Result<Self> {
        scales::check_for::<T>("CudaKvCache::with_scales", Some(&scales), layout.num_kv_heads)?;
        let mut cache = CudaKvCache::zeros(dev, layout)?;
        cache.set_scales(Some(scales))?;
        Ok(cache)
    }

    /// The scale buffers of an FP8 cache, `num_kv_heads` ones each; `None` for another type.
    fn alloc_scales(dev: &CudaDevice, layout: &CacheLayout) -> Result<Option<(CudaSlice<f32>, CudaSlice<f32>)>> {
        if !T::DTYPE.is_fp8() {
            return Ok(None);
        }
        let ones = vec![1.0f32; layout.num_kv_heads];
        let up = || dev.stream().clone_htod(&ones).map_err(|e| driver_error("CudaKvCache::zeros", e));
        Ok(Some((up()?, up()?)))
    }

    /// Replaces the scales (`None`: 1.0), copying them into the cache's device buffer in place,
    /// asynchronously on the cache's stream (ordered after work already enqueued there, before
    /// work enqueued later). Not to be called while a graph is being captured on that stream.
    ///
    /// # Errors
    /// [`AttentionError::InvalidKvScales`] as [`crate::CpuKvCache::set_scales`];
    /// [`AttentionError::Cuda`] when the copy fails. The cache keeps its old scales on an error.
    pub fn set_scales(&mut self, scales: Option<KvScaleValues>) -> Result<()> {
        const OP: &str = "CudaKvCache::set_scales";
        scales::check_for::<T>(OP, scales.as_ref(), self.layout.num_kv_heads)?;
        if let Some((k_dev, v_dev)) = &mut self.device_scales {
            let h = self.layout.num_kv_heads;
            let (k, v) = match &scales {
                Some(s) => s.expanded(h),
                None => (vec![1.0; h], vec![1.0; h]),
            };
            let stream = self.key.stream().clone();
            stream.memcpy_htod(&k, k_dev).map_err(|e| driver_error(OP, e))?;
            stream.memcpy_htod(&v, v_dev).map_err(|e| driver_error(OP, e))?;
        }
        self.scales = scales;
        Ok(())
    }

    /// The scales as last set (`None` for an unquantised cache, or an FP8 one read with 1.0).
    pub fn scales(&self) -> Option<&KvScaleValues> {
        self.scales.as_ref()
    }

    /// Views of the device scales (`num_kv_heads` floats each) for the launchers; `None` for an
    /// unquantised cache.
    pub fn device_scales(&self) -> Option<KvScales<'_>> {
        self.device_scales.as_ref().map(|(k, v)| KvScales { key: k.as_view(), value: v.as_view() })
    }

    /// A cache holding copies of host data (each `layout.num_elements()` long, row-major NHD); an
    /// FP8 one starts with scales 1.0 ([`CudaKvCache::set_scales`] sets others).
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
        let (key, value) = (up(key)?, up(value)?);
        let device_scales = Self::alloc_scales(dev, &layout)?;
        Ok(CudaKvCache { layout, key, value, device_scales, scales: None })
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
