//! The one error type of the attention API.

use attention_kernels::DType;
use thiserror::Error;

/// Everything the attention API refuses or fails with.
///
/// Each variant names the operation (`op`) and the argument at fault, so a message read in a log
/// says where to look without a backtrace. Validation errors are returned before any work starts:
/// no cache row has been written and no kernel launched when one of them comes back.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum AttentionError {
    /// A tensor's shape does not match what the other arguments imply.
    #[error("{op}: `{tensor}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Operation (`kv_cache_update`, `forward`, ...).
        op: &'static str,
        /// Argument name.
        tensor: &'static str,
        /// Expected shape.
        expected: Vec<usize>,
        /// Actual shape.
        actual: Vec<usize>,
    },
    /// A tensor's element type differs from the cache's or the query's.
    #[error("{op}: `{tensor}` is {actual}, expected {expected}")]
    DTypeMismatch {
        /// Operation.
        op: &'static str,
        /// Argument name.
        tensor: &'static str,
        /// Expected element type.
        expected: DType,
        /// Actual element type.
        actual: DType,
    },
    /// A slot in the slot mapping lies past the end of the cache.
    #[error("{op}: slot_mapping[{index}] = {slot} is past the cache ({num_slots} slots = num_blocks * block_size)")]
    SlotOutOfRange {
        /// Operation.
        op: &'static str,
        /// Position in the slot mapping.
        index: usize,
        /// The offending slot.
        slot: i64,
        /// Slots in the cache.
        num_slots: usize,
    },
    /// The head size is not one the backend supports.
    #[error("{op}: head size {head_size} is not supported by the {backend} backend (supported: {supported})")]
    UnsupportedHeadSize {
        /// Operation.
        op: &'static str,
        /// Backend name.
        backend: &'static str,
        /// Requested head size.
        head_size: usize,
        /// Human-readable list of supported sizes.
        supported: &'static str,
    },
    /// A feature or parameter combination this backend cannot run (yet). Never a wrong answer.
    #[error("{op}: {what} is not supported by the {backend} backend")]
    Unsupported {
        /// Operation.
        op: &'static str,
        /// Backend name.
        backend: &'static str,
        /// What was asked for.
        what: String,
    },
    /// Attention metadata that is inconsistent with itself or with the tensors
    /// (query_start_loc not monotone, seq_lens shorter than query lengths, block tables that don't
    /// cover a sequence, ...).
    #[error("{op}: invalid metadata: {what}")]
    InvalidMetadata {
        /// Operation.
        op: &'static str,
        /// What is wrong.
        what: String,
    },
    /// A layout or configuration value out of range (zero blocks, heads not divisible, ...).
    #[error("{op}: invalid argument: {what}")]
    InvalidArgument {
        /// Operation.
        op: &'static str,
        /// What is wrong.
        what: String,
    },
    /// The CUDA backend was asked for, but this build has no `cuda` feature.
    #[error("the CUDA backend was requested but attention-backend was built without the `cuda` feature")]
    CudaNotCompiled,
    /// No usable CUDA device: no driver library, no device, or `CUDA_VISIBLE_DEVICES` hides them all.
    #[error("no CUDA device available: {reason}")]
    NoCudaDevice {
        /// What was found missing.
        reason: String,
    },
    /// The CUDA driver or a kernel launch failed. `code` keeps the status the driver (`CUresult`)
    /// or the runtime (`cudaError_t`) returned, so an engine can tell running out of memory (and
    /// preempt) from a broken launch; see [`AttentionError::is_out_of_memory`].
    #[error("CUDA failure in {op}: {message} ({api} status {code})")]
    Cuda {
        /// Operation.
        op: &'static str,
        /// Which CUDA API returned `code`.
        api: CudaApi,
        /// The status value (`CUresult` for the driver, `cudaError_t` for the runtime).
        code: i32,
        /// Driver or runtime message.
        message: String,
    },
}

/// The CUDA API a status code of [`AttentionError::Cuda`] comes from (their numbering differs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CudaApi {
    /// The driver API (`CUresult`): allocations, copies, contexts, graphs.
    Driver,
    /// The runtime API (`cudaError_t`): kernel launches of the attention kernels.
    Runtime,
}

impl std::fmt::Display for CudaApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CudaApi::Driver => "driver",
            CudaApi::Runtime => "runtime",
        })
    }
}

/// `CUDA_ERROR_OUT_OF_MEMORY` (driver) and `cudaErrorMemoryAllocation` (runtime) share the value 2.
const CUDA_OUT_OF_MEMORY: i32 = 2;

impl AttentionError {
    /// Whether this is the device running out of memory: the one CUDA failure an engine recovers
    /// from (free cache blocks, preempt requests, retry) rather than aborting.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, AttentionError::Cuda { code: CUDA_OUT_OF_MEMORY, .. })
    }

    /// The CUDA status code and its API, for a CUDA failure.
    pub fn cuda_status(&self) -> Option<(CudaApi, i32)> {
        match self {
            AttentionError::Cuda { api, code, .. } => Some((*api, *code)),
            _ => None,
        }
    }
}

/// Result alias of the attention API.
pub type Result<T, E = AttentionError> = std::result::Result<T, E>;
