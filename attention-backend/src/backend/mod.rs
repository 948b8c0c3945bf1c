//! One attention API for both devices, chosen at run time: [`Backend`] and the per-step
//! [`StepMetadata`]. See [`Backend`] for device selection and an example.
//!
//! The module is split by job: this file selects the device and holds [`Backend`] itself;
//! `alloc` allocates tensors and caches and copies them between host and device; `step` holds the
//! per-step metadata ([`StepMetadata`], [`StepSlotMapping`], [`SlotSource`]); `dispatch` validates
//! each layer's call and sends it to the CPU or CUDA implementation.

use std::str::FromStr;

use crate::error::{AttentionError, Result};
use crate::tensor::{wrong_device, Device};

mod alloc;
mod dispatch;
mod step;

pub use dispatch::{AttentionTensors, ForwardTensors};
pub use step::{SlotSource, StepMetadata, StepSlotMapping};

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
/// Tensors ([`Tensor`](crate::Tensor)) and caches ([`KvCache`](crate::KvCache)) carry their shape, element type and device; a
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
/// backend.forward(&step, &params, attention_backend::ForwardTensors { query: &query, key: &key, value: &value, cache: &mut cache, out: &mut out, lse: Some(&mut lse) })?;
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

    fn expect_device(&self, op: &'static str, name: &'static str, found: Device) -> Result<()> {
        if found != self.device() {
            return Err(wrong_device(op, name, found, self.device()));
        }
        Ok(())
    }
}
