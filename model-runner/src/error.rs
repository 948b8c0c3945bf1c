//! The one error type of the model runner.

use attention_backend::AttentionError;
use thiserror::Error;

use crate::{BlockId, RequestId};

/// A vector of `len` copies of `value`, or [`RunnerError::AllocationFailed`] when the allocator
/// cannot provide it (`vec![value; len]` would abort the process instead).
pub(crate) fn try_filled<T: Clone>(len: usize, value: T, what: &'static str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    try_reserve(&mut v, len, what)?;
    v.resize(len, value);
    Ok(v)
}

/// Reserves room for `additional` more elements in `v`, or [`RunnerError::AllocationFailed`].
pub(crate) fn try_reserve<T>(v: &mut Vec<T>, additional: usize, what: &'static str) -> Result<()> {
    v.try_reserve_exact(additional).map_err(|_| RunnerError::AllocationFailed {
        what,
        len: v.len().saturating_add(additional),
        elem_bytes: std::mem::size_of::<T>(),
    })
}

/// Result alias of the model runner.
pub type Result<T, E = RunnerError> = std::result::Result<T, E>;

/// Everything the runner, its persistent batch and the block pool refuse.
///
/// Each variant names the request and the counts at fault, so a scheduler bug read in a log says
/// where to look. An error is returned before any state changes: a refused `add_request`,
/// `append_blocks` or `prepare_inputs` leaves the batch exactly as it was, and a refused pool
/// call leaves the pool untouched.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum RunnerError {
    /// The configuration is unusable (a zero size, a block table wider than `i32` can index, ...).
    #[error("invalid runner configuration: {what}")]
    InvalidConfig {
        /// What is wrong.
        what: String,
    },
    /// A step or a call names a request that is not in the batch.
    #[error("request {req_id} is not in the batch")]
    UnknownRequest {
        /// The request.
        req_id: RequestId,
    },
    /// `add_request` with an id already in the batch.
    #[error("request {req_id} is already in the batch")]
    DuplicateRequest {
        /// The request.
        req_id: RequestId,
    },
    /// A step schedules the same request twice.
    #[error("request {req_id} is scheduled twice in one step")]
    DuplicateInStep {
        /// The request.
        req_id: RequestId,
    },
    /// A step entry schedules zero tokens (attention cannot run an empty query; leave the request
    /// out of the step instead).
    #[error("request {req_id} is scheduled with 0 tokens")]
    NoScheduledTokens {
        /// The request.
        req_id: RequestId,
    },
    /// The request's blocks hold fewer tokens than it has computed plus scheduled: its last tokens
    /// would have no slot.
    #[error(
        "request {req_id} needs {num_tokens} tokens ({num_computed} computed + {num_scheduled} scheduled) \
         = {blocks_needed} blocks of {block_size}, but has {num_blocks} blocks"
    )]
    InsufficientBlocks {
        /// The request.
        req_id: RequestId,
        /// Tokens already in the cache.
        num_computed: usize,
        /// Tokens scheduled this step.
        num_scheduled: usize,
        /// `num_computed + num_scheduled`.
        num_tokens: usize,
        /// Blocks those tokens need.
        blocks_needed: usize,
        /// Blocks the request has.
        num_blocks: usize,
        /// Tokens per block.
        block_size: usize,
    },
    /// A request's block list names a block the KV cache does not have.
    #[error("request {req_id}: block {block_id} is past the cache's {num_blocks} blocks")]
    BlockOutOfRange {
        /// The request.
        req_id: RequestId,
        /// The offending block id.
        block_id: BlockId,
        /// Blocks in the cache.
        num_blocks: usize,
    },
    /// A request's block list would not fit in its block table row.
    #[error("request {req_id} would have {num_blocks} blocks, the block table has {max_blocks_per_req} columns")]
    TooManyBlocks {
        /// The request.
        req_id: RequestId,
        /// Blocks the request would have.
        num_blocks: usize,
        /// Columns of the block table.
        max_blocks_per_req: usize,
    },
    /// A request's sequence is longer than the runner supports (`i32` seq_lens, or the block
    /// table's width times the block size).
    #[error("request {req_id} would have {num_tokens} tokens, the runner supports at most {max_tokens}")]
    SequenceTooLong {
        /// The request.
        req_id: RequestId,
        /// Its computed + scheduled tokens.
        num_tokens: usize,
        /// The limit.
        max_tokens: usize,
    },
    /// A step schedules more tokens than the runner's per-step budget
    /// (`max_num_batched_tokens`, which sizes the device buffers).
    #[error("step schedules {num_tokens} tokens, the budget is {budget}")]
    TooManyTokens {
        /// Tokens scheduled.
        num_tokens: usize,
        /// The budget.
        budget: usize,
    },
    /// A step schedules no request.
    #[error("step schedules no request")]
    EmptyStep,
    /// `add_request` on a batch that already holds `max_num_reqs` requests.
    #[error("cannot add request {req_id}: the batch is full ({max_num_reqs} requests)")]
    BatchFull {
        /// The request that did not fit.
        req_id: RequestId,
        /// The batch's capacity.
        max_num_reqs: usize,
    },
    /// The block pool has fewer free blocks than asked for.
    #[error("out of KV-cache blocks: {requested} requested, {free} free")]
    OutOfBlocks {
        /// Blocks asked for.
        requested: usize,
        /// Blocks free (evictable cached blocks included).
        free: usize,
    },
    /// A block id handed to the pool is past its end.
    #[error("block {block_id} is not in the pool ({num_blocks} blocks)")]
    BlockNotInPool {
        /// The block.
        block_id: BlockId,
        /// Blocks in the pool.
        num_blocks: usize,
    },
    /// A block handed back to the pool is not allocated (a double free).
    #[error("block {block_id} is freed but not allocated")]
    BlockNotAllocated {
        /// The block.
        block_id: BlockId,
    },
    /// Two tokens of one step would write the same KV-cache slot: two requests share a block they
    /// both write into, or one request lists a block twice among the blocks it writes. Attention
    /// would then read the other token's key and value; the step is refused instead.
    #[error(
        "slot {offset} of block {block_id} would be written twice in one step (by request {req_id} and request {other})"
    )]
    SlotWrittenTwice {
        /// The request whose write was found second.
        req_id: RequestId,
        /// The request that writes the slot first (the same request when it lists the block twice).
        other: RequestId,
        /// The block.
        block_id: BlockId,
        /// The first doubly written offset inside the block.
        offset: usize,
    },
    /// A buffer could not be allocated (its size overflows, or the allocator refused it). Returned
    /// instead of aborting, so a server given huge but valid sizes can report them.
    #[error("cannot allocate the {what} ({len} elements of {elem_bytes} bytes)")]
    AllocationFailed {
        /// Which buffer.
        what: &'static str,
        /// Elements asked for.
        len: usize,
        /// Bytes per element.
        elem_bytes: usize,
    },
    /// The metadata the runner built failed the backend's own check. This is a runner bug, not
    /// bad input; it is returned rather than panicking so a server can log it and drop the step.
    #[error(transparent)]
    Metadata(#[from] AttentionError),
}
