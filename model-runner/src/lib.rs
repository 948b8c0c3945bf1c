//! Scheduler output to attention inputs: the input preparation of vLLM v1's model runner, in Rust.
//!
//! A serving loop schedules, every step, a few tokens of each running request: a chunk of a
//! prompt (a *prefill*, possibly after a prefix-cache hit) or one generated token (a *decode*).
//! Attention then needs, for the packed tokens of that step, where each token's K/V goes in the
//! paged cache and which cached blocks each request reads. This crate builds exactly that:
//!
//! - [`ModelRunner`] keeps a **persistent batch** ([`PersistentBatch`]) of requests across steps,
//!   with a **block table** ([`PersistentBlockTable`]) whose rows move with the requests, so a
//!   step costs work proportional to its tokens, not to a rebuild of every request's state.
//! - [`ModelRunner::prepare_inputs`] turns a step ([`ScheduledRequest`]s: tokens already computed,
//!   tokens scheduled now) into [`StepInputs`]: an [`AttentionMetadata`] (i32 `query_start_loc`,
//!   `seq_lens` and block table, the **i64** [`SlotMapping`], the decode/prefill split) and i64
//!   positions. Decodes come first, then prefills, as the backend's kernels expect.
//! - [`BlockPool`] hands out physical blocks with reference counts, an LRU free list and prefix
//!   caching over full blocks, so a scheduler on top of this crate can run a real workload.
//!
//! Everything is checked: a step naming an unknown request, blocks that do not cover a request's
//! tokens, a block id past the cache, an empty or over-budget step is a typed [`RunnerError`],
//! returned before any state changes. The metadata returned has passed
//! [`AttentionMetadata::check`], and its slots lie in the cache the runner was configured for.
//!
//! # Example: a prompt's first chunk, then a decode
//! ```
//! use model_runner::{BlockPool, ModelRunner, RequestId, RunnerConfig, ScheduledRequest};
//!
//! // A cache of 64 blocks of 16 tokens.
//! let mut pool = BlockPool::new(64, 16)?;
//! let mut runner = ModelRunner::new(RunnerConfig::new(16, 64))?;
//!
//! // A 20-token prompt: 2 blocks.
//! let req = RequestId(7);
//! let blocks = pool.allocate(2)?;
//! runner.add_request(req, 20, &blocks)?;
//!
//! // Step 1: prefill the whole prompt.
//! let inputs = runner.prepare_inputs(&[ScheduledRequest::new(req, 0, 20)])?;
//! let slots = inputs.slot_mapping().as_slice();
//! assert_eq!(slots.len(), 20);
//! // Token 17 is at offset 1 of the request's second block.
//! assert_eq!(slots[17], i64::from(blocks[1]) * 16 + 1);
//! assert_eq!(inputs.metadata.query_start_loc, [0, 20]);
//! assert_eq!(inputs.metadata.num_prefills, 1);
//!
//! // Step 2: decode token 20 (position 20, still in block 1).
//! let inputs = runner.prepare_inputs(&[ScheduledRequest::new(req, 20, 1)])?;
//! assert_eq!(inputs.positions, [20]);
//! assert_eq!(inputs.slot_mapping().as_slice(), [i64::from(blocks[1]) * 16 + 4]);
//! assert_eq!(inputs.metadata.num_decodes, 1);
//! assert_eq!(inputs.metadata.seq_lens, [21]);
//!
//! // The request finishes: its blocks go back to the pool.
//! pool.free(&runner.remove_request(req)?)?;
//! assert_eq!(pool.num_free_blocks(), 64);
//! # Ok::<(), model_runner::RunnerError>(())
//! ```
//!
//! The slot mapping is `i64` by type (the seed implementation crashed at run time on an `int32`
//! one); reading it as `i32` does not compile:
//! ```compile_fail
//! # use model_runner::{ModelRunner, RequestId, RunnerConfig, ScheduledRequest};
//! # let mut runner = ModelRunner::new(RunnerConfig::new(16, 4)).unwrap();
//! # runner.add_request(RequestId(0), 1, &[0]).unwrap();
//! let inputs = runner.prepare_inputs(&[ScheduledRequest::new(0, 0, 1)]).unwrap();
//! let slots: &[i32] = inputs.slot_mapping().as_slice(); // error: expected `&[i32]`, found `&[i64]`
//! ```
//!
//! # CUDA-graph padding
//! With [`RunnerConfig::cuda_graph_sizes`] set, a step's token count is rounded up to the next
//! captured size: `positions` and the slot mapping grow to it (position 0, slot -1, which the
//! cache write skips), while `query_start_loc` and the other per-request arrays keep their real
//! length; `metadata.num_actual_tokens` says where the real tokens end. See [`StepInputs`].
#![deny(missing_docs)]

mod batch;
mod block_pool;
mod block_table;
mod cache_size;
mod config;
mod error;
mod prepare;
mod runner;

use std::fmt;

pub use attention_backend::{AttentionMetadata, BlockTable, DecodeMeta, PrefillMeta, SlotMapping};
pub use batch::PersistentBatch;
pub use block_pool::{BlockPool, TokenId};
pub use block_table::PersistentBlockTable;
pub use cache_size::KvCacheSpec;
pub use config::RunnerConfig;
pub use error::{Result, RunnerError};
pub use prepare::{ScheduledRequest, StepInputs};
pub use runner::ModelRunner;

/// A physical KV-cache block id (`0..num_blocks`; block tables store it as `i32`).
pub type BlockId = u32;

/// A request's id, chosen by the caller (the scheduler). A newtype so it cannot be confused with a
/// batch row index, which changes as the batch is compacted and reordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

impl From<u64> for RequestId {
    fn from(id: u64) -> Self {
        RequestId(id)
    }
}
