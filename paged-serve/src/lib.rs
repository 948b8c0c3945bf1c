//! `paged-serve`: the main job of the workspace, a simulated LLM serving run whose every step's
//! attention goes through the real paged-attention path.
//!
//! ```text
//! workload (Poisson or trace)            -> workload.rs
//!   -> scheduler (budget, chunked prefill,  -> scheduler.rs  (BlockPool from model-runner)
//!      decodes first, preemption, prefix cache)
//!   -> ModelRunner::prepare_inputs           (model-runner: positions, i64 slots, metadata)
//!   -> per layer: synthetic Q/K/V            -> model.rs
//!      -> Backend::forward (cache write + paged attention, one KvCache per layer)
//!   -> next token from the attention output  -> model.rs
//!   -> optional f64 dense re-check           -> verify.rs
//!   -> summary (text or JSON)                -> summary.rs
//! ```
//!
//! The binary is a thin shell over [`run`]; tests drive [`run`] and the modules directly.
//!
//! # Example
//! ```
//! use clap::Parser;
//! let cli = paged_serve::cli::Cli::try_parse_from([
//!     "paged-serve", "--device", "cpu", "--requests", "4", "--prompt-len", "24", "--output-len", "4",
//!     "--layers", "2", "--verify", "--verify-every", "1", "--no-progress",
//! ])?;
//! let summary = paged_serve::run(&cli)?;
//! assert_eq!(summary.requests_finished, 4);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod cli;
mod engine;
#[cfg(feature = "cuda")]
mod engine_cuda;
pub mod limits;
pub mod model;
pub mod scheduler;
pub mod summary;
pub mod verify;
pub mod workload;

use attention_backend::{bf16, f16, AttentionError, Backend, DType, Fp8E4M3, Fp8E5M2};
use model_runner::RunnerError;

pub use cli::{Cli, RunConfig};
pub use summary::Summary;

/// Why a run did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A bad flag or flag combination (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The attention backend refused or failed.
    #[error("{}", attention_message(.0))]
    Attention(#[from] AttentionError),
    /// The model runner refused a step (a bug in the scheduler's bookkeeping).
    #[error("model runner: {0}")]
    Runner(#[from] RunnerError),
    /// The scheduler could not go on.
    #[error("scheduler: {0}")]
    Schedule(#[from] scheduler::ScheduleError),
    /// The backend's output disagrees with the f64 reference.
    #[error("{0}")]
    Verify(Box<verify::Mismatch>),
    /// Blocks were not returned to the pool by the end of the run (a scheduler leak).
    #[error("blocks returned to the pool: {returned} of {total} ({} leaked)", .total.saturating_sub(*.returned))]
    Leaked {
        /// Free blocks at the end.
        returned: usize,
        /// Blocks in the pool.
        total: usize,
    },
    /// Writing the output failed (a full disk; a closed pipe is not an error, see the binary).
    #[error("cannot write to standard output: {0}")]
    Output(#[source] std::io::Error),
    /// An internal inconsistency.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServeError {
    /// The process exit code: 2 for usage errors, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ServeError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// Backend errors with a hint at what to do about them.
fn attention_message(e: &AttentionError) -> String {
    match e {
        AttentionError::CudaNotCompiled => {
            "--device cuda: this binary was built without CUDA; rebuild with `--features cuda` \
             (cargo run --release -p paged-serve --features cuda -- --device cuda) or use --device cpu"
                .into()
        }
        AttentionError::NoCudaDevice { reason } => {
            format!("--device cuda: no CUDA device available ({reason}); use --device cpu or --device auto")
        }
        AttentionError::Unsupported { backend, .. } | AttentionError::UnsupportedHeadSize { backend, .. } => {
            format!("the {backend} backend cannot run this yet: {e}; try --device cpu")
        }
        other => format!("attention backend: {other}"),
    }
}

/// Selects the device, resolves the flags against it and runs the workload.
///
/// # Errors
/// See [`ServeError`].
pub fn run(cli: &Cli) -> Result<Summary, ServeError> {
    let request = cli::device_request(cli)?;
    let backend = Backend::select(request)?;
    let cfg = cli.resolve(request, backend.device())?;
    run_config(&cfg, backend)
}

/// Runs a resolved configuration on `backend`.
///
/// # Errors
/// See [`ServeError`].
pub fn run_config(cfg: &RunConfig, backend: Backend) -> Result<Summary, ServeError> {
    // Everything that can refuse the run does so before the big allocations: the memory the
    // flags imply, then the shapes of the requests (24 bytes each) against the cache, and only
    // then the prompts, the caches and the rest.
    limits::check(cfg, backend.device() == attention_backend::Device::Cpu, limits::host_memory())?;
    let plan = workload::plan(&cfg.workload, cfg.sharing, cfg.seed).map_err(|e| ServeError::Usage(e.to_string()))?;
    cli::check_fits(cfg, &plan.shapes)?;
    let requests = plan.build();
    #[cfg(feature = "cuda")]
    if backend.device() == attention_backend::Device::Cuda {
        return match (cfg.dtype, cfg.kv_cache_dtype) {
            (DType::F16, DType::F16) => engine_cuda::serve::<f16, f16>(cfg, backend, &requests),
            (DType::F16, DType::Fp8E4M3) => engine_cuda::serve::<f16, Fp8E4M3>(cfg, backend, &requests),
            (DType::F16, DType::Fp8E5M2) => engine_cuda::serve::<f16, Fp8E5M2>(cfg, backend, &requests),
            (DType::BF16, DType::BF16) => engine_cuda::serve::<bf16, bf16>(cfg, backend, &requests),
            (DType::BF16, DType::Fp8E4M3) => engine_cuda::serve::<bf16, Fp8E4M3>(cfg, backend, &requests),
            (DType::BF16, DType::Fp8E5M2) => engine_cuda::serve::<bf16, Fp8E5M2>(cfg, backend, &requests),
            (d, k) => Err(ServeError::Usage(format!(
                "--dtype {d} with --kv-cache-dtype {k} is not supported on cuda (use bf16 or f16, with an FP8 cache or not)"
            ))),
        };
    }
    match (cfg.dtype, cfg.kv_cache_dtype) {
        (DType::F32, DType::F32) => engine::serve::<f32, f32>(cfg, backend, &requests),
        (DType::F32, DType::Fp8E4M3) => engine::serve::<f32, Fp8E4M3>(cfg, backend, &requests),
        (DType::F32, DType::Fp8E5M2) => engine::serve::<f32, Fp8E5M2>(cfg, backend, &requests),
        (DType::F16, DType::F16) => engine::serve::<f16, f16>(cfg, backend, &requests),
        (DType::F16, DType::Fp8E4M3) => engine::serve::<f16, Fp8E4M3>(cfg, backend, &requests),
        (DType::F16, DType::Fp8E5M2) => engine::serve::<f16, Fp8E5M2>(cfg, backend, &requests),
        (DType::BF16, DType::BF16) => engine::serve::<bf16, bf16>(cfg, backend, &requests),
        (DType::BF16, DType::Fp8E4M3) => engine::serve::<bf16, Fp8E4M3>(cfg, backend, &requests),
        (DType::BF16, DType::Fp8E5M2) => engine::serve::<bf16, Fp8E5M2>(cfg, backend, &requests),
        (d, k) => Err(ServeError::Usage(format!("--dtype {d} with --kv-cache-dtype {k} is not supported"))),
    }
}

/// A clap error as one line: its first line, the tip it suggests if any, and a pointer to `--help`.
pub fn clap_error_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("invalid arguments");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let tip = lines.find_map(|l| l.strip_prefix("tip: "));
    match tip {
        Some(tip) => format!("{first} ({tip}); see --help"),
        None => format!("{first}; see --help"),
    }
}
