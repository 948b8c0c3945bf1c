//! One attention API for both devices, chosen at run time: [`Backend`] and the per-step
//! [`StepMetadata`]. See [`Backend`] for device selection and an example.

use std::str::FromStr;

use attention_kernels::Element;
use ndarray::{ArrayD, Ix2, Ix3};

use crate::cache::CpuKvCache;
use crate::error::{AttentionError, Result};
use crate::layout::CacheLayout;
use crate::metadata::AttentionMetadata;
use crate::params::AttentionParams;
use crate::slot_mapping::SlotMapping;
use crate::tensor::{wrong_device, Device, KvCache, Tensor};
use crate::validate;

/// The environment variable that forces a device: `cpu`, `cuda`, `cuda:N` or `auto` (the default).
pub const DEVICE_ENV: &str = "PAGED_ATTN_DEVICE";

/// Which device a [`Backend`] should run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum DeviceRequest {
    /// CUDA device 0 if this build has `cuda` and a device is visible, the CPU otherwise.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// A CUDA device (an ordinal among the visible ones); an error if it cannot be had.
    Cuda {
        /// Device ordinal after `CUDA_VISIBLE_DEVICES`.
        ordinal: usize,
    },
}

impl FromStr for DeviceRequest {
    type Err = AttentionError;

    /// Parses `auto`, `cpu`, `cuda`, `cuda:N` (case-insensitive; empty = `auto`).
    fn from_str(s: &str) -> Result<Self> {
        let v = s.trim().to_ascii_lowercase();
        let bad = || AttentionError::InvalidArgument {
            op: "device_request",
            what: format!("{DEVICE_ENV}=`{s}`: expected `auto`, `cpu`, `cuda` or `cuda:N`"),
        };
        match v.as_str() {
            "" | "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" | "gpu" => Ok(DeviceRequest::Cuda { ordinal: 0 }),
            other => {
                let n = other.strip_prefix("cuda:").ok_or_else(bad)?;
                Ok(DeviceRequest::Cuda { ordinal: n.parse().map_err(|_| bad())? })
            }
        }
    }
}

impl DeviceRequest {
    /// Reads [`DEVICE_ENV`] (`PAGED_ATTN_DEVICE`); unset means [`DeviceRequest::Auto`].
    ///
    /// # Errors
    /// [`AttentionError::InvalidArgument`] for a value that is not a device.
    pub fn from_env() -> Result<Self> {
        match std::env::var(DEVICE_ENV) {
            Ok(v) => v.parse(),
            Err(std::env::VarError::NotPresent) => Ok(DeviceRequest::Auto),
            Err(std::env::VarError::NotUnicode(_)) => Err(AttentionError::InvalidArgument {
                op: "device_request",
                what: format!("{DEVICE_ENV} is not UTF-8"),
            }),
        }
    }
}

#[derive(Clone, Debug)]
enum Inner {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda {
        dev: crate::cuda::CudaDevice,
        ordinal: usize,
        /// Split-KV scratch of the attention kernels, shared by clones (all work is on one stream,
        /// so the calls that use it are ordered).
        workspace: std::sync::Arc<std::sync::Mutex<crate::cuda::AttentionWorkspace>>,
    },
}

/// The attention backend of a process: the CPU or one CUDA device, with one set of methods.
///
/// Cheap to clone (on CUDA the clones share the context, the stream and the attention workspace).
///
/// A [`Backend`] is either the CPU (ndarray, [`crate::cpu`]) or one CUDA device (cudarc, feature
/// `cuda`). [`Backend::from_env`] picks it the way vLLM's platform detection does:
///
/// | `PAGED_ATTN_DEVICE` | backend |
/// | --- | --- |
/// | unset, empty or `auto` | CUDA device 0 when built with `cuda` and a device is visible, the CPU otherwise |
/// | `cpu` | the CPU |
/// | `cuda` or `cuda:N` | CUDA device 0 (or `N`); an error when it cannot be had |
///
/// Device numbers count the devices visible to the process: the CUDA driver applies
/// `CUDA_VISIBLE_DEVICES` before this crate sees any device, so `CUDA_VISIBLE_DEVICES=2` with
/// `PAGED_ATTN_DEVICE=cuda` runs on physical GPU 2, and `CUDA_VISIBLE_DEVICES=` (empty) makes `auto`
/// fall back to the CPU. Without the `cuda` feature, asking for CUDA returns
/// [`AttentionError::CudaNotCompiled`]; nothing is missing from the API.
///
/// Tensors ([`Tensor`]) and caches ([`KvCache`]) carry their shape, element type and device; a
/// step's metadata is prepared once per step ([`Backend::prepare_step`], uploaded to the device on
/// CUDA) and shared by every layer. Every call is validated by [`crate::validate`] before any
/// work, with the same errors on both devices.
///
/// # Example: one step of one layer, prepare inputs -> forward
/// ```
/// use attention_backend::ndarray::Array3;
/// use attention_backend::{
///     AttentionMetadata, AttentionParams, Backend, BlockTable, CacheLayout, DeviceRequest, SlotMapping,
/// };
///
/// // PAGED_ATTN_DEVICE picks the device in a real program (`Backend::from_env()`); the example
/// // pins the CPU so it runs anywhere.
/// let backend = Backend::select(DeviceRequest::Cpu)?;
/// let (num_heads, num_kv_heads, head_size, block_size) = (4, 2, 64, 16);
/// let mut cache = backend.kv_cache::<f32>(CacheLayout::new(8, block_size, num_kv_heads, head_size)?)?;
///
/// // The step: request 0 decodes its 4th token (3 already cached in block 5), request 1 is a
/// // 3-token prompt in block 2; one padding token (slot -1) rounds the batch up to 5.
/// let block_table = BlockTable::from_rows(&[vec![5], vec![2]]);
/// let slots = SlotMapping::new(vec![5 * 16 + 3, 2 * 16, 2 * 16 + 1, 2 * 16 + 2, -1]);
/// let meta = AttentionMetadata::new(vec![0, 1, 4], vec![4, 3], block_table, slots, 1)?;
/// assert_eq!((meta.num_decodes, meta.num_prefills, meta.num_actual_tokens), (1, 1, 4));
/// let step = backend.prepare_step(meta)?; // once per step, shared by all layers
///
/// let n = step.host().num_tokens();
/// let query = backend.tensor(Array3::<f32>::from_elem((n, num_heads, head_size), 0.1))?;
/// let key = backend.tensor(Array3::<f32>::from_elem((n, num_kv_heads, head_size), 0.2))?;
/// let value = backend.tensor(Array3::<f32>::from_elem((n, num_kv_heads, head_size), 1.0))?;
/// let mut out = backend.zeros::<f32>(&[n, num_heads, head_size])?;
/// let mut lse = backend.zeros::<f32>(&[n, num_heads])?;
///
/// let params = AttentionParams::new(num_heads, num_kv_heads, head_size); // causal, 1/sqrt(d)
/// backend.forward(&query, &key, &value, &mut cache, &step, &params, &mut out, Some(&mut lse))?;
///
/// let out = backend.to_host(&out)?;
/// // Request 1 saw only its own values (all 1.0): its rows are 1.0.
/// assert!((out[[3, 0, 0]] - 1.0).abs() < 1e-6);
/// // Request 0 also saw 3 cached tokens that are still zero (keys and values): about 28% of its
/// // weight falls on its own value 1.0.
/// assert!(out[[0, 0, 0]] > 0.0 && out[[0, 0, 0]] < 1.0);
/// # Ok::<(), attention_backend::AttentionError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Backend {
    inner: Inner,
}

/// A step's slot mapping, ready for [`Backend::kv_cache_update`] on the backend that made it (on
/// CUDA it holds the uploaded `i64` copy as well).
#[derive(Debug)]
pub struct StepSlotMapping {
    host: SlotMapping,
    device: Device,
    #[cfg(feature = "cuda")]
    on_device: Option<crate::cuda::DeviceSlotMapping>,
}

impl StepSlotMapping {
    /// The host slot mapping.
    pub fn host(&self) -> &SlotMapping {
        &self.host
    }

    /// The device it was prepared for.
    pub fn device(&self) -> Device {
        self.device
    }
}

/// One step's attention metadata, prepared once by [`Backend::prepare_step`] and shared by every
/// layer of the step: the host [`AttentionMetadata`] and, on CUDA, its device copy
/// (`cuda::DeviceMetadata`, slot mapping included).
#[derive(Debug)]
pub struct StepMetadata {
    meta: AttentionMetadata,
    device: Device,
    #[cfg(feature = "cuda")]
    on_device: Option<crate::cuda::DeviceMetadata>,
}

impl StepMetadata {
    /// The host metadata.
    pub fn host(&self) -> &AttentionMetadata {
        &self.meta
    }

    /// The device it was prepared for.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The device copy, `None` on the CPU.
    #[cfg(feature = "cuda")]
    pub fn cuda(&self) -> Option<&crate::cuda::DeviceMetadata> {
        self.on_device.as_ref()
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::StepSlotMapping {}
    impl Sealed for super::StepMetadata {}
}

/// Where [`Backend::kv_cache_update`] finds the slot mapping: a [`StepSlotMapping`] of its own, or
/// the one inside a [`StepMetadata`] (no second upload). Sealed.
pub trait SlotSource: sealed::Sealed {
    /// The host slot mapping.
    fn host_slots(&self) -> &SlotMapping;
    /// The device it was prepared for.
    fn slots_device(&self) -> Device;
    /// The device copy, `None` on the CPU.
    #[cfg(feature = "cuda")]
    fn cuda_slots(&self) -> Option<&crate::cuda::DeviceSlotMapping>;
}

impl SlotSource for StepSlotMapping {
    fn host_slots(&self) -> &SlotMapping {
        &self.host
    }
    fn slots_device(&self) -> Device {
        self.device
    }
    #[cfg(feature = "cuda")]
    fn cuda_slots(&self) -> Option<&crate::cuda::DeviceSlotMapping> {
        self.on_device.as_ref()
    }
}

impl SlotSource for StepMetadata {
    fn host_slots(&self) -> &SlotMapping {
        &self.meta.slot_mapping
    }
    fn slots_device(&self) -> Device {
        self.device
    }
    #[cfg(feature = "cuda")]
    fn cuda_slots(&self) -> Option<&crate::cuda::DeviceSlotMapping> {
        self.on_device.as_ref().map(|m| m.slot_mapping())
    }
}

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
    /// The CPU backend.
    pub fn cpu() -> Self {
        Backend { inner: Inner::Cpu }
    }

    /// CUDA device `ordinal` (among those `CUDA_VISIBLE_DEVICES` leaves visible).
    ///
    /// # Errors
    /// [`AttentionError::CudaNotCompiled`] without the `cuda` feature;
    /// [`AttentionError::NoCudaDevice`] without a driver or that device;
    /// [`AttentionError::Cuda`] when the driver fails.
    pub fn cuda(ordinal: usize) -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            let dev = crate::cuda::CudaDevice::new(ordinal)?;
            let workspace = Default::default();
            Ok(Backend { inner: Inner::Cuda { dev, ordinal, workspace } })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = ordinal;
            Err(AttentionError::CudaNotCompiled)
        }
    }

    /// The backend a request names. `Auto` never fails: it falls back to the CPU (with a
    /// `tracing` warning when a visible device could not be opened).
    ///
    /// # Errors
    /// Those of [`Backend::cuda`] for [`DeviceRequest::Cuda`].
    pub fn select(request: DeviceRequest) -> Result<Self> {
        match request {
            DeviceRequest::Cpu => Ok(Backend::cpu()),
            DeviceRequest::Cuda { ordinal } => Backend::cuda(ordinal),
            DeviceRequest::Auto => {
                #[cfg(feature = "cuda")]
                if crate::cuda::CudaDevice::count() > 0 {
                    match Backend::cuda(0) {
                        Ok(b) => return Ok(b),
                        Err(e) => {
                            tracing::warn!(error = %e, "a CUDA device is visible but could not be opened; using the CPU")
                        }
                    }
                }
                Ok(Backend::cpu())
            }
        }
    }

    /// The backend `PAGED_ATTN_DEVICE` asks for (see [`Backend`]).
    ///
    /// # Errors
    /// An unparsable `PAGED_ATTN_DEVICE`, or the errors of [`Backend::select`].
    pub fn from_env() -> Result<Self> {
        let backend = Backend::select(DeviceRequest::from_env()?)?;
        tracing::info!(backend = %backend.name(), "attention backend selected");
        Ok(backend)
    }

    /// The kind of device this backend runs on.
    pub fn device(&self) -> Device {
        match &self.inner {
            Inner::Cpu => Device::Cpu,
            #[cfg(feature = "cuda")]
            Inner::Cuda { .. } => Device::Cuda,
        }
    }

    /// The CUDA ordinal (after `CUDA_VISIBLE_DEVICES`), `None` on the CPU.
    pub fn cuda_ordinal(&self) -> Option<usize> {
        match &self.inner {
            Inner::Cpu => None,
            #[cfg(feature = "cuda")]
            Inner::Cuda { ordinal, .. } => Some(*ordinal),
        }
    }

    /// The CUDA device, for work outside this API on the same stream; `None` on the CPU.
    #[cfg(feature = "cuda")]
    pub fn cuda_device(&self) -> Option<&crate::cuda::CudaDevice> {
        match &self.inner {
            Inner::Cpu => None,
            Inner::Cuda { dev, .. } => Some(dev),
        }
    }

    /// A human-readable name: `cpu (N threads)` or `cuda:N (<device name>)`.
    pub fn name(&self) -> String {
        match &self.inner {
            Inner::Cpu => format!("cpu ({} threads)", crate::cpu::num_threads()),
            #[cfg(feature = "cuda")]
            Inner::Cuda { dev, ordinal, .. } => format!("cuda:{ordinal} ({})", dev.name()),
        }
    }

    /// Waits for all queued work (a no-op on the CPU, whose calls return when done).
    ///
    /// # Errors
    /// [`AttentionError::Cuda`] carrying an earlier asynchronous failure.
    pub fn synchronize(&self) -> Result<()> {
        match &self.inner {
            Inner::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Inner::Cuda { dev, .. } => dev.synchronize(),
        }
    }

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
    pub fn kv_cache<T: Element>(&self, layout: CacheLayout) -> Result<KvCache<T>> {
        match &self.inner {
            Inner::Cpu => Ok(KvCache::Cpu(CpuKvCache::zeros(layout)?)),
            #[cfg(feature = "cuda")]
            Inner::Cuda { dev, .. } => Ok(KvCache::Cuda(crate::cuda::CudaKvCache::zeros(dev, layout)?)),
        }
    }

    /// A KV cache on this backend's device holding a host cache's contents.
    ///
    /// # Errors
    /// [`AttentionError::Cuda`] when the upload fails.
    pub fn kv_cache_from_host<T: Element>(&self, cache: CpuKvCache<T>) -> Result<KvCache<T>> {
        match &self.inner {
            Inner::Cpu => Ok(KvCache::Cpu(cache)),
            #[cfg(feature = "cuda")]
            Inner::Cuda { dev, .. } => {
                let layout = *cache.layout();
                let (k, v) = cache.into_arrays();
                let (k, v) = (k.as_standard_layout(), v.as_standard_layout());
                let (k, v) = (k.as_slice().unwrap_or(&[]), v.as_slice().unwrap_or(&[]));
                Ok(KvCache::Cuda(crate::cuda::CudaKvCache::from_host(dev, layout, k, v)?))
            }
        }
    }

    /// A host copy of a KV cache (synchronises on CUDA).
    ///
    /// # Errors
    /// [`AttentionError::Cuda`] when the download fails; [`AttentionError::InvalidArgument`] for a
    /// cache of the other device.
    pub fn kv_cache_to_host<T: Element>(&self, cache: &KvCache<T>) -> Result<CpuKvCache<T>> {
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
                CpuKvCache::from_arrays(
                    ndarray::Array4::from_shape_vec(shape, k).map_err(err)?,
                    ndarray::Array4::from_shape_vec(shape, v).map_err(err)?,
                )
            }
            #[cfg(feature = "cuda")]
            (Inner::Cpu, c) => Err(wrong_device("kv_cache_to_host", "cache", c.device(), Device::Cpu)),
        }
    }

    /// Prepares a slot mapping for [`Backend::kv_cache_update`] (uploads it on CUDA).
    ///
    /// # Errors
    /// [`AttentionError::Cuda`] when the upload fails.
    pub fn slot_mapping(&self, slots: SlotMapping) -> Result<StepSlotMapping> {
        match &self.inner {
            Inner::Cpu => Ok(StepSlotMapping {
                host: slots,
                device: Device::Cpu,
                #[cfg(feature = "cuda")]
                on_device: None,
            }),
            #[cfg(feature = "cuda")]
            Inner::Cuda { dev, .. } => {
                let on_device = Some(crate::cuda::DeviceSlotMapping::upload(dev, &slots)?);
                Ok(StepSlotMapping { host: slots, device: Device::Cuda, on_device })
            }
        }
    }

    /// Prepares one step's metadata for all its layers: checks it ([`AttentionMetadata::check`])
    /// and, on CUDA, uploads it once.
    ///
    /// # Errors
    /// [`AttentionError::InvalidMetadata`] for inconsistent metadata; [`AttentionError::Cuda`] when
    /// the upload fails.
    pub fn prepare_step(&self, meta: AttentionMetadata) -> Result<StepMetadata> {
        match &self.inner {
            Inner::Cpu => {
                meta.check()?;
                Ok(StepMetadata {
                    meta,
                    device: Device::Cpu,
                    #[cfg(feature = "cuda")]
                    on_device: None,
                })
            }
            #[cfg(feature = "cuda")]
            Inner::Cuda { dev, .. } => {
                let on_device = Some(crate::cuda::DeviceMetadata::upload(dev, &meta)?);
                Ok(StepMetadata { meta, device: Device::Cuda, on_device })
            }
        }
    }

    fn expect_device(&self, op: &'static str, name: &'static str, found: Device) -> Result<()> {
        if found != self.device() {
            return Err(wrong_device(op, name, found, self.device()));
        }
        Ok(())
    }

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
