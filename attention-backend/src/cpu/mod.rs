//! The CPU backend: straightforward ndarray code, `f32` accumulation. It is the numerical oracle
//! the CUDA kernels are tested against, and the default where no GPU is present.
//!
//! - [`kv_cache_update`]: vLLM's `reshape_and_cache_flash`;
//! - [`paged_attention`]: attention over the paged cache for a varlen batch;
//! - [`forward`]: the two in sequence, one attention layer's step (vLLM's
//!   `FlashAttentionImpl.forward`);
//! - [`plan`] / [`StepPlan::run`]: the same work split the way an engine runs it, the step checked
//!   once and each layer run on the engine's own ndarray views (any strides, so slices of a fused
//!   QKV projection need no copy). `forward` is `plan` + one `run`, so both share one
//!   implementation and give bit-identical results.
//!
//! Attention runs on the current rayon pool ([`num_threads`] threads; `PAGED_ATTN_CPU_THREADS` sizes
//! the global pool when nothing built it first).

mod attention;
mod cache_write;
pub(crate) mod plan;

pub use attention::{forward, num_threads, paged_attention, AttentionIo, ForwardIo, THREADS_ENV};
pub use cache_write::kv_cache_update;
pub use plan::{plan, LayerViews, StepPlan, StepPlanner};
