//! Paged attention for LLM serving: the KV-cache update and the attention forward over a paged
//! cache, with one API on two backends.
//!
//! - [`cpu`]: ndarray, `f32` accumulation; the numerical reference and the default where no GPU is
//!   present.
//! - `cuda` (feature `cuda`): cudarc buffers and the kernels of `attention-kernels`.
//!
//! Inputs are checked once, by [`validate`], before any work on either backend; a bad argument
//! returns an [`AttentionError`] and leaves every buffer untouched.
//!
//! # Example: write a step's keys and values into a paged cache on the CPU
//! ```
//! use attention_backend::{cpu, CacheLayout, CpuKvCache, SlotMapping};
//! use ndarray::Array3;
//!
//! let layout = CacheLayout::new(4, 16, 2, 64)?; // 4 blocks of 16 tokens, 2 kv heads, head 64
//! let mut cache = CpuKvCache::<f32>::zeros(layout)?;
//! let key = Array3::<f32>::from_elem((3, 2, 64), 1.0);
//! let value = Array3::<f32>::from_elem((3, 2, 64), 2.0);
//! // token 0 -> block 2 offset 0, token 1 -> block 0 offset 5, token 2 is padding.
//! let slots = SlotMapping::new(vec![32, 5, -1]);
//! cpu::kv_cache_update(key.view(), value.view(), &mut cache, &slots)?;
//! assert_eq!(cache.key()[[2, 0, 1, 63]], 1.0);
//! assert_eq!(cache.value()[[0, 5, 0, 0]], 2.0);
//! # Ok::<(), attention_backend::AttentionError>(())
//! ```

#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
mod cache;
pub mod cpu;
#[cfg(feature = "cuda")]
#[cfg_attr(docsrs, doc(cfg(feature = "cuda")))]
pub mod cuda;
mod error;
mod layout;
mod metadata;
mod params;
// The mixed-step partition's cost model is plain arithmetic, tested without a GPU; only the CUDA
// backend uses it.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod partition;
mod scales;
mod slot_mapping;
mod tensor;
pub mod validate;

pub use attention_kernels::{CacheElement, DType, Element, Fp8E4M3, Fp8E5M2, KvStorage};
pub use backend::{
    AttentionTensors, Backend, DeviceRequest, ForwardTensors, SlotSource, StepMetadata, StepSlotMapping, DEVICE_ENV,
};
pub use cache::CpuKvCache;
pub use error::{AttentionError, CudaApi, Result};
pub use layout::CacheLayout;
pub use metadata::{AttentionMetadata, BlockTable, DecodeMeta, PrefillMeta, StepCheckScratch};
pub use params::AttentionParams;
pub use scales::KvScaleValues;
pub use slot_mapping::SlotMapping;
pub use tensor::{Device, KvCache, Tensor};

/// `half`'s `f16` and `bf16`, re-exported so users need not name the crate.
pub use half::{bf16, f16};
/// ndarray, re-exported for the CPU backend's array types.
pub use ndarray;
