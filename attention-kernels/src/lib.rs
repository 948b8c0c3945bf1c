//! CUDA kernels for paged attention, compiled from `csrc/` by `build.rs` with nvcc, and the thin
//! safe launchers that call them on cudarc buffers and streams.
//!
//! This crate is the workspace's FFI boundary: it is the only crate that holds `unsafe` code.
//! Everything above it (`attention-backend`, `model-runner`) is safe Rust.
//!
//! # Features
//! - `cuda` (off by default): compile the kernels with nvcc for sm_80 and sm_90a and expose
//!   `launch`. Needs nvcc at build time (`cargo xtask setup-cuda` installs a pinned one) and a GPU
//!   with its driver at run time. Without it the crate holds only the element types, so CPU users
//!   and documentation builds need no CUDA toolkit.
//!
//! # Example
//! ```
//! use attention_kernels::{DType, Element};
//! assert_eq!(<half::bf16 as Element>::DTYPE, DType::BF16);
//! assert_eq!(DType::BF16.size_in_bytes(), 2);
//! ```

#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod dtype;
pub mod env_setting;
mod error;
pub mod fp8;
mod ws_order;

pub use dtype::{CacheElement, DType, DeviceElement, Element, KvStorage};
pub use error::KernelError;
pub use fp8::{Fp8E4M3, Fp8E5M2};
pub use ws_order::{ws_item_rows, WsOrder, WS_ORDER_ENV};

#[cfg(feature = "cuda")]
#[cfg_attr(docsrs, doc(cfg(feature = "cuda")))]
pub mod attention;
#[cfg(feature = "cuda")]
#[cfg_attr(docsrs, doc(cfg(feature = "cuda")))]
pub mod device;
#[cfg(feature = "cuda")]
#[cfg_attr(docsrs, doc(cfg(feature = "cuda")))]
pub mod ffi;
#[cfg(feature = "cuda")]
#[cfg_attr(docsrs, doc(cfg(feature = "cuda")))]
pub mod graph;
#[cfg(feature = "cuda")]
#[cfg_attr(docsrs, doc(cfg(feature = "cuda")))]
pub mod launch;
#[cfg(feature = "cuda")]
#[cfg_attr(docsrs, doc(cfg(feature = "cuda")))]
pub mod staging;
#[cfg(feature = "cuda")]
#[cfg_attr(docsrs, doc(cfg(feature = "cuda")))]
pub mod synthetic;

/// cudarc, re-exported so that users name one version of it.
#[cfg(feature = "cuda")]
#[cfg_attr(docsrs, doc(cfg(feature = "cuda")))]
pub use cudarc;
