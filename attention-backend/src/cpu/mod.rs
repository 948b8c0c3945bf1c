//! The CPU backend: straightforward ndarray code, `f32` accumulation. It is the numerical oracle
//! the CUDA kernels are tested against, and the default where no GPU is present.
//!
//! - [`kv_cache_update`]: vLLM's `reshape_and_cache_flash`;
//! - [`paged_attention`]: attention over the paged cache for a varlen batch;
//! - [`forward`]: the two in sequence, one attention layer's step (vLLM's
//!   `FlashAttentionImpl.forward`).
//!
//! Attention runs on the current rayon pool ([`num_threads`] threads; `PAGED_ATTN_CPU_THREADS` sizes
//! the global pool when nothing built it first).

mod attention;
mod cache_write;

pub use attention::{forward, num_threads, paged_attention, THREADS_ENV};
pub use cache_write::kv_cache_update;
