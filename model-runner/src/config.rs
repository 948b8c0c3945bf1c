//! The runner's sizes, fixed at start-up because they size (device) buffers.

use attention_backend::CacheLayout;

use crate::error::{Result, RunnerError};

/// Sizes and policies of a [`ModelRunner`](crate::ModelRunner).
///
/// Build one with [`RunnerConfig::new`] (or [`RunnerConfig::for_layout`]) and adjust it with the
/// `with_*` setters; [`ModelRunner::new`](crate::ModelRunner::new) checks it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunnerConfig {
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// Physical blocks in the KV cache; block ids must be below it.
    pub num_blocks: usize,
    /// Most requests in the batch (rows of the block table). Default 256.
    pub max_num_reqs: usize,
    /// Most blocks one request holds (columns of the block table). Default: 8192 tokens' worth.
    pub max_blocks_per_req: usize,
    /// Most tokens one step may schedule (vLLM's `max_num_batched_tokens`). Default 8192.
    pub max_num_batched_tokens: usize,
    /// A request scheduling at most this many tokens is a decode. Default 1; raise it for
    /// speculative decoding, where a decode verifies a few draft tokens.
    pub decode_threshold: usize,
    /// Token counts CUDA graphs were captured for, ascending. A step is padded up to the smallest
    /// one that holds it; a step larger than all of them is not padded. Default: none.
    pub cuda_graph_sizes: Vec<usize>,
}

/// Default longest sequence, used to size `max_blocks_per_req`.
const DEFAULT_MAX_MODEL_LEN: usize = 8192;

impl RunnerConfig {
    /// A configuration for a cache of `num_blocks` blocks of `block_size` tokens, with the
    /// defaults documented on each field.
    pub fn new(block_size: usize, num_blocks: usize) -> Self {
        RunnerConfig {
            block_size,
            num_blocks,
            max_num_reqs: 256,
            max_blocks_per_req: DEFAULT_MAX_MODEL_LEN.div_ceil(block_size.max(1)),
            max_num_batched_tokens: 8192,
            decode_threshold: 1,
            cuda_graph_sizes: Vec::new(),
        }
    }

    /// A configuration for the cache `layout` describes.
    pub fn for_layout(layout: &CacheLayout) -> Self {
        RunnerConfig::new(layout.block_size, layout.num_blocks)
    }

    /// Sets [`RunnerConfig::max_num_reqs`].
    pub fn with_max_num_reqs(mut self, max_num_reqs: usize) -> Self {
        self.max_num_reqs = max_num_reqs;
        self
    }

    /// Sets [`RunnerConfig::max_blocks_per_req`].
    pub fn with_max_blocks_per_req(mut self, max_blocks_per_req: usize) -> Self {
        self.max_blocks_per_req = max_blocks_per_req;
        self
    }

    /// Sets [`RunnerConfig::max_blocks_per_req`] from the longest sequence a request may reach.
    pub fn with_max_model_len(mut self, max_model_len: usize) -> Self {
        self.max_blocks_per_req = max_model_len.div_ceil(self.block_size.max(1));
        self
    }

    /// Sets [`RunnerConfig::max_num_batched_tokens`].
    pub fn with_max_num_batched_tokens(mut self, max_num_batched_tokens: usize) -> Self {
        self.max_num_batched_tokens = max_num_batched_tokens;
        self
    }

    /// Sets [`RunnerConfig::decode_threshold`].
    pub fn with_decode_threshold(mut self, decode_threshold: usize) -> Self {
        self.decode_threshold = decode_threshold;
        self
    }

    /// Sets [`RunnerConfig::cuda_graph_sizes`] (sorted and deduplicated here).
    pub fn with_cuda_graph_sizes(mut self, mut sizes: Vec<usize>) -> Self {
        sizes.sort_unstable();
        sizes.dedup();
        self.cuda_graph_sizes = sizes;
        self
    }

    /// The token count a step of `num_tokens` tokens is padded to.
    pub fn padded_num_tokens(&self, num_tokens: usize) -> usize {
        self.cuda_graph_sizes.iter().copied().find(|&s| s >= num_tokens).unwrap_or(num_tokens)
    }

    /// Checks that every size is usable and that the arrays the runner builds cannot overflow
    /// their dtypes (`i32` block ids and `query_start_loc`, `i64` slots).
    ///
    /// # Errors
    /// [`RunnerError::InvalidConfig`] naming the first bad field.
    pub fn check(&self) -> Result<()> {
        let bad = |what: String| Err(RunnerError::InvalidConfig { what });
        let positive = [
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
            ("max_num_reqs", self.max_num_reqs),
            ("max_blocks_per_req", self.max_blocks_per_req),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be positive"));
        }
        if self.num_blocks > i32::MAX as usize {
            return bad(format!("num_blocks {} does not fit the i32 block table", self.num_blocks));
        }
        if self.num_blocks.checked_mul(self.block_size).is_none_or(|n| i64::try_from(n).is_err()) {
            return bad(format!("{} blocks of {} slots overflow an i64 slot", self.num_blocks, self.block_size));
        }
        if self.max_num_batched_tokens > i32::MAX as usize {
            return bad(format!("max_num_batched_tokens {} does not fit i32", self.max_num_batched_tokens));
        }
        if self.max_num_reqs.checked_mul(self.max_blocks_per_req).is_none() {
            return bad(format!("block table {} x {} overflows", self.max_num_reqs, self.max_blocks_per_req));
        }
        // A padded step has as many tokens as its graph size, and token counts are i32 on the
        // device.
        if let Some(&g) = self.cuda_graph_sizes.iter().find(|&&g| g == 0 || g > i32::MAX as usize) {
            return bad(format!("cuda graph size {g} must be in 1..={}", i32::MAX));
        }
        if self.cuda_graph_sizes.windows(2).any(|w| w[0] >= w[1]) {
            return bad(format!("cuda_graph_sizes {:?} must be strictly ascending", self.cuda_graph_sizes));
        }
        Ok(())
    }
}
