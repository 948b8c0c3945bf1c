//! The model runner: configuration, persistent batch and the per-step scratch in one place.

use crate::batch::PersistentBatch;
use crate::config::RunnerConfig;
use crate::error::{try_filled, Result};
use crate::{BlockId, RequestId};

/// Turns scheduler steps into attention inputs over a persistent batch.
///
/// Requests are added, grown and removed between steps; [`ModelRunner::prepare_inputs`] turns
/// one step into an [`AttentionMetadata`](attention_backend::AttentionMetadata) plus positions.
/// See the [crate documentation](crate) for an example.
#[derive(Clone, Debug)]
pub struct ModelRunner {
    pub(crate) config: RunnerConfig,
    pub(crate) batch: PersistentBatch,
    /// Per row: the step that last scheduled it (duplicate detection and "is scheduled" without
    /// clearing anything between steps).
    pub(crate) scheduled_in: Vec<u64>,
    /// Per row: (computed, scheduled) tokens of the current step; valid where `scheduled_in` is
    /// the current step.
    pub(crate) tokens: Vec<(usize, usize)>,
    pub(crate) step: u64,
    /// Scratch of `prepare_inputs`: the slot ranges each scheduled request writes, to refuse a
    /// step that writes one slot twice. Kept to reuse its allocation.
    pub(crate) writes: Vec<crate::prepare::BlockWrite>,
}

impl ModelRunner {
    /// A runner with an empty batch.
    ///
    /// # Errors
    /// [`RunnerError::InvalidConfig`](crate::RunnerError::InvalidConfig) (see
    /// [`RunnerConfig::check`]);
    /// [`RunnerError::AllocationFailed`](crate::RunnerError::AllocationFailed) when sizes that
    /// pass the check still need more host memory than the allocator gives (a
    /// `max_num_reqs x max_blocks_per_req` block table of terabytes, say): the process does not
    /// abort.
    pub fn new(config: RunnerConfig) -> Result<Self> {
        config.check()?;
        let batch =
            PersistentBatch::new(config.max_num_reqs, config.max_blocks_per_req, config.block_size, config.num_blocks)?;
        Ok(ModelRunner {
            scheduled_in: try_filled(config.max_num_reqs, 0, "step stamps")?,
            tokens: try_filled(config.max_num_reqs, (0, 0), "token counts")?,
            step: 0,
            writes: Vec::new(),
            config,
            batch,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RunnerConfig {
        &self.config
    }

    /// The persistent batch (read-only: change it through the runner so the scratch stays in
    /// sync).
    pub fn batch(&self) -> &PersistentBatch {
        &self.batch
    }

    /// Adds a request; see [`PersistentBatch::add_request`].
    ///
    /// # Errors
    /// As [`PersistentBatch::add_request`].
    pub fn add_request(&mut self, req_id: RequestId, prompt_len: usize, blocks: &[BlockId]) -> Result<()> {
        self.batch.add_request(req_id, prompt_len, blocks)
    }

    /// Grows a request's block list; see [`PersistentBatch::append_blocks`].
    ///
    /// # Errors
    /// As [`PersistentBatch::append_blocks`].
    pub fn append_blocks(&mut self, req_id: RequestId, blocks: &[BlockId]) -> Result<()> {
        self.batch.append_blocks(req_id, blocks)
    }

    /// Replaces a request's block list; see [`PersistentBatch::set_blocks`].
    ///
    /// # Errors
    /// As [`PersistentBatch::set_blocks`].
    pub fn set_blocks(&mut self, req_id: RequestId, blocks: &[BlockId]) -> Result<()> {
        self.batch.set_blocks(req_id, blocks)
    }

    /// Removes a request and returns its blocks; see [`PersistentBatch::remove_request`].
    ///
    /// # Errors
    /// As [`PersistentBatch::remove_request`].
    pub fn remove_request(&mut self, req_id: RequestId) -> Result<Vec<BlockId>> {
        let row = self.batch.row_of(req_id);
        let blocks = self.batch.remove_request(req_id)?;
        // The last row moved into `row`: move its scratch along (it is stale between steps, but
        // keeping it exact costs nothing and keeps the per-row arrays one story).
        if let Some(row) = row {
            let last = self.batch.len();
            self.scheduled_in.swap(row, last);
            self.tokens.swap(row, last);
        }
        Ok(blocks)
    }

    /// Exchanges two batch rows together with their step scratch.
    pub(crate) fn swap_rows(&mut self, a: usize, b: usize) {
        if a != b {
            self.batch.swap_rows(a, b);
            self.scheduled_in.swap(a, b);
            self.tokens.swap(a, b);
        }
    }
}
