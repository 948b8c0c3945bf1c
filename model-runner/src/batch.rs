//! The persistent batch: the requests the runner knows, in the row order the metadata uses.
//!
//! Requests live across many steps, so their state is kept in dense arrays indexed by *row*
//! (vLLM v1's `InputBatch`) instead of being rebuilt every step: adding appends a row, removing
//! moves the last row into the hole (the arrays stay compact with one row copy), and the step's
//! decode-first reorder swaps rows in place. After a step or two the order is stable and the
//! reorder costs nothing.
//!
//! Row indices therefore change on removal and on reorder; requests are addressed by
//! [`RequestId`] everywhere in the public API.

use std::collections::HashMap;

use crate::block_table::PersistentBlockTable;
use crate::error::{try_reserve, Result, RunnerError};
use crate::{BlockId, RequestId};

/// Requests in the batch and their block table rows, kept in sync.
///
/// A [`ModelRunner`](crate::ModelRunner) owns it and lends it out read-only
/// ([`ModelRunner::batch`](crate::ModelRunner::batch)); changes go through the runner's methods of
/// the same names, which keep the runner's per-row step scratch in sync with the rows.
#[derive(Clone, Debug)]
pub struct PersistentBatch {
    block_size: usize,
    num_cache_blocks: usize,
    req_ids: Vec<RequestId>,
    prompt_lens: Vec<usize>,
    rows: HashMap<RequestId, usize>,
    block_table: PersistentBlockTable,
}

impl PersistentBatch {
    /// An empty batch of at most `max_num_reqs` requests, each holding at most
    /// `max_blocks_per_req` blocks of `block_size` tokens out of a cache of `num_cache_blocks`.
    /// The runner checks these sizes (see `RunnerConfig`) before building one.
    ///
    /// # Errors
    /// [`RunnerError::AllocationFailed`] when the arrays cannot be allocated. The block table, the
    /// largest, is allocated first.
    pub(crate) fn new(
        max_num_reqs: usize,
        max_blocks_per_req: usize,
        block_size: usize,
        num_cache_blocks: usize,
    ) -> Result<Self> {
        let block_table = PersistentBlockTable::new(max_num_reqs, max_blocks_per_req)?;
        let (mut req_ids, mut prompt_lens) = (Vec::new(), Vec::new());
        try_reserve(&mut req_ids, max_num_reqs, "request ids")?;
        try_reserve(&mut prompt_lens, max_num_reqs, "prompt lengths")?;
        let mut rows = HashMap::new();
        rows.try_reserve(max_num_reqs).map_err(|_| RunnerError::AllocationFailed {
            what: "request rows",
            len: max_num_reqs,
            elem_bytes: size_of::<(RequestId, usize)>(),
        })?;
        Ok(PersistentBatch { block_size, num_cache_blocks, req_ids, prompt_lens, rows, block_table })
    }

    /// Requests in the batch.
    pub fn len(&self) -> usize {
        self.req_ids.len()
    }

    /// True when the batch holds no request.
    pub fn is_empty(&self) -> bool {
        self.req_ids.is_empty()
    }

    /// The most requests the batch can hold.
    pub fn max_num_reqs(&self) -> usize {
        self.block_table.max_num_reqs()
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Request ids in row order.
    pub fn req_ids(&self) -> &[RequestId] {
        &self.req_ids
    }

    /// Whether `req_id` is in the batch.
    pub fn contains(&self, req_id: RequestId) -> bool {
        self.rows.contains_key(&req_id)
    }

    /// The current row of `req_id`.
    pub fn row_of(&self, req_id: RequestId) -> Option<usize> {
        self.rows.get(&req_id).copied()
    }

    /// The prompt length `req_id` was added with.
    pub fn prompt_len(&self, req_id: RequestId) -> Option<usize> {
        self.prompt_lens.get(self.row_of(req_id)?).copied()
    }

    /// The block ids of `req_id`, in order.
    pub fn blocks(&self, req_id: RequestId) -> Option<&[i32]> {
        self.block_table.row(self.row_of(req_id)?)
    }

    /// The block table, row `i` belonging to `req_ids()[i]`.
    pub fn block_table(&self) -> &PersistentBlockTable {
        &self.block_table
    }

    fn row_or_err(&self, req_id: RequestId) -> Result<usize> {
        self.row_of(req_id).ok_or(RunnerError::UnknownRequest { req_id })
    }

    /// Checks `blocks` are inside the cache and, appended to `existing` blocks, fit in a row;
    /// returns them as the table's `i32`s.
    fn checked_blocks(&self, req_id: RequestId, existing: usize, blocks: &[BlockId]) -> Result<Vec<i32>> {
        let total = existing.saturating_add(blocks.len());
        if total > self.block_table.max_blocks_per_req() {
            return Err(RunnerError::TooManyBlocks {
                req_id,
                num_blocks: total,
                max_blocks_per_req: self.block_table.max_blocks_per_req(),
            });
        }
        blocks
            .iter()
            .map(|&b| {
                if (b as usize) < self.num_cache_blocks {
                    // The runner checked num_cache_blocks <= i32::MAX.
                    Ok(b as i32)
                } else {
                    Err(RunnerError::BlockOutOfRange { req_id, block_id: b, num_blocks: self.num_cache_blocks })
                }
            })
            .collect()
    }

    /// Adds a request with `prompt_len` prompt tokens and its first blocks.
    ///
    /// The blocks need not cover the prompt yet (a chunked prefill may get its blocks chunk by
    /// chunk); each step checks that they cover what it computes.
    ///
    /// # Errors
    /// [`RunnerError::DuplicateRequest`], [`RunnerError::BatchFull`],
    /// [`RunnerError::TooManyBlocks`], [`RunnerError::BlockOutOfRange`]; the batch is unchanged.
    pub fn add_request(&mut self, req_id: RequestId, prompt_len: usize, blocks: &[BlockId]) -> Result<()> {
        if self.contains(req_id) {
            return Err(RunnerError::DuplicateRequest { req_id });
        }
        if self.len() >= self.max_num_reqs() {
            return Err(RunnerError::BatchFull { req_id, max_num_reqs: self.max_num_reqs() });
        }
        let blocks = self.checked_blocks(req_id, 0, blocks)?;
        let row = self.len();
        self.block_table.set_row(row, &blocks);
        self.req_ids.push(req_id);
        self.prompt_lens.push(prompt_len);
        self.rows.insert(req_id, row);
        Ok(())
    }

    /// Appends newly allocated blocks to `req_id`'s block list (its sequence grew).
    ///
    /// # Errors
    /// [`RunnerError::UnknownRequest`], [`RunnerError::TooManyBlocks`],
    /// [`RunnerError::BlockOutOfRange`]; the batch is unchanged.
    pub fn append_blocks(&mut self, req_id: RequestId, blocks: &[BlockId]) -> Result<()> {
        let row = self.row_or_err(req_id)?;
        let blocks = self.checked_blocks(req_id, self.block_table.row_len(row), blocks)?;
        self.block_table.append_row(row, &blocks);
        Ok(())
    }

    /// Replaces `req_id`'s block list (for a scheduler that re-plans a request, e.g. after a
    /// preemption or a late prefix-cache hit).
    ///
    /// # Errors
    /// As [`PersistentBatch::append_blocks`].
    pub fn set_blocks(&mut self, req_id: RequestId, blocks: &[BlockId]) -> Result<()> {
        let row = self.row_or_err(req_id)?;
        let blocks = self.checked_blocks(req_id, 0, blocks)?;
        self.block_table.set_row(row, &blocks);
        Ok(())
    }

    /// Removes a finished (or preempted) request and returns its blocks, for the caller to free in
    /// its block pool. The last row moves into the hole, so the arrays stay compact.
    ///
    /// # Errors
    /// [`RunnerError::UnknownRequest`].
    pub fn remove_request(&mut self, req_id: RequestId) -> Result<Vec<BlockId>> {
        let row = self.row_or_err(req_id)?;
        let blocks: Vec<BlockId> =
            self.block_table.row(row).unwrap_or_default().iter().map(|&b| b as BlockId).collect();
        let last = self.len() - 1;
        self.block_table.move_row(last, row);
        self.block_table.clear_row(last);
        self.req_ids.swap_remove(row);
        self.prompt_lens.swap_remove(row);
        self.rows.remove(&req_id);
        if let Some(&moved) = self.req_ids.get(row) {
            self.rows.insert(moved, row);
        }
        Ok(blocks)
    }

    /// Exchanges rows `a` and `b` (both `< len()`), keeping every array and the block table in
    /// sync.
    pub(crate) fn swap_rows(&mut self, a: usize, b: usize) {
        if a == b {
            return;
        }
        self.req_ids.swap(a, b);
        self.prompt_lens.swap(a, b);
        self.block_table.swap_rows(a, b);
        self.rows.insert(self.req_ids[a], a);
        self.rows.insert(self.req_ids[b], b);
    }
}
