//! The CPU backend: straightforward ndarray code, `f32` accumulation. It is the numerical oracle
//! the CUDA kernels are tested against, and the default where no GPU is present.

mod cache_write;

pub use cache_write::kv_cache_update;
