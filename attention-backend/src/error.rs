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
    /// A real token (inside some request's query range) with a negative slot: its K/V would never
    /// be written and attention would read whatever the cache row held before. Negative slots mark
    /// padding rows only (the step contract, ARCHITECTURE.md).
    #[error("{op}: slot_mapping[{index}] = {slot} is negative, but token {index} is request {req}'s position {pos} (negative slots are for padding rows only)")]
    MissingSlot {
        /// Operation.
        op: &'static str,
        /// Token (row of the slot mapping).
        index: usize,
        /// Request the token belongs to.
        req: usize,
        /// The token's absolute position in its request.
        pos: usize,
        /// The offending slot.
        slot: i64,
    },
    /// A real token's slot differs from where its request's block table puts its position, so
    /// attention would read a stale row back.
    #[error("{op}: slot_mapping[{index}] = {slot}, but request {req}'s block table puts its position {pos} at slot {expected}")]
    SlotMismatch {
        /// Operation.
        op: &'static str,
        /// Token (row of the slot mapping).
        index: usize,
        /// Request the token belongs to.
        req: usize,
        /// The token's absolute position in its request.
        pos: usize,
        /// The offending slot.
        slot: i64,
        /// `block_table[req][pos / block_size] * block_size + pos % block_size`.
        expected: i64,
    },
    /// A padding row (at or past `query_start_loc[num_reqs]`) with a non-negative slot: it would
    /// overwrite a cache row that some request owns.
    #[error("{op}: slot_mapping[{index}] = {slot} is a padding row (the step has {num_actual_tokens} real tokens) and must be negative")]
    PaddingSlot {
        /// Operation.
        op: &'static str,
        /// Row of the slot mapping.
        index: usize,
        /// The offending slot.
        slot: i64,
        /// Real tokens of the step (`query_start_loc[num_reqs]`).
        num_actual_tokens: usize,
    },
    /// A block that the step writes into is also used by another (request, block index) pair of
    /// the step: the two would write the same slots, or one would read rows the other overwrites.
    /// Blocks shared between requests (prefix caching) must be read-only in the steps that share
    /// them.
    #[error("{op}: block {block} is written by request {req} (block_table[{req}][{index}]) and also used by request {other_req} (block_table[{other_req}][{other_index}]); a block written in a step must belong to one request at one index")]
    BlockWriteConflict {
        /// Operation.
        op: &'static str,
        /// The physical block.
        block: i32,
        /// The request found second.
        req: usize,
        /// Its block-table column.
        index: usize,
        /// The request that used the block first.
        other_req: usize,
        /// Its block-table column.
        other_index: usize,
    },
    /// A block-table entry that a request uses (one of the first `ceil(seq_len / block_size)`) is
    /// not a block of the cache.
    #[error("{op}: block_table[{req}][{index}] = {block} is outside the cache's {num_blocks} blocks")]
    BlockOutOfRange {
        /// Operation.
        op: &'static str,
        /// Request (block-table row).
        req: usize,
        /// Block-table column.
        index: usize,
        /// The offending block id.
        block: i32,
        /// Blocks in the cache.
        num_blocks: usize,
    },
    /// A request's block-table row has fewer columns than its sequence needs blocks.
    #[error("{op}: request {req} has {seq_len} tokens = {needed} blocks of {block_size}, but the block table has {columns} columns")]
    BlockTableTooShort {
        /// Operation.
        op: &'static str,
        /// Request.
        req: usize,
        /// Its `seq_lens` entry.
        seq_len: usize,
        /// Tokens per block of the cache.
        block_size: usize,
        /// `ceil(seq_len / block_size)`.
        needed: usize,
        /// Columns of the block table.
        columns: usize,
    },
    /// A host allocation failed (or could not be expressed: more than `isize::MAX` bytes). Nothing
    /// was allocated.
    #[error("{op}: could not allocate {bytes} bytes for `{tensor}`")]
    AllocationFailed {
        /// Operation.
        op: &'static str,
        /// What was being allocated.
        tensor: &'static str,
        /// Bytes asked for (exact, even past `usize`).
        bytes: u128,
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
    /// FP8 cache scales that cannot be used: a count other than 1 or `num_kv_heads` (or key and
    /// value counts that differ), a value that is not finite and positive, or scales given for a
    /// cache that is not quantised (an f16/bf16/f32 cache stores values as they are).
    #[error("{op}: invalid KV-cache scales: {what}")]
    InvalidKvScales {
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
