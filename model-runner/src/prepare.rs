//! `prepare_inputs`: one scheduler step to positions, slot mapping and attention metadata.
//!
//! The work is in three passes, each O(requests) or O(tokens):
//!
//! 1. **Validate** every entry of the step against the batch (known, not repeated, at least one
//!    token, blocks covering computed + scheduled tokens, the step within its token budget, no
//!    KV-cache slot written by two tokens). Nothing has changed when this pass fails, so a bad step
//!    is refused without side effects.
//! 2. **Reorder** the persistent batch in place: scheduled decodes to the front, then scheduled
//!    prefills, then requests that are not in this step. Rows only swap when a request changes
//!    class, so a steady decode batch is not touched.
//! 3. **Fill** the arrays by walking each request's tokens block by block: a run of tokens that
//!    falls in one block has consecutive slots, so the slot mapping is written without a division
//!    per token.

use attention_backend::{AttentionMetadata, DecodeMeta, PrefillMeta, SlotMapping};

use crate::error::{try_reserve, Result, RunnerError};
use crate::runner::ModelRunner;
use crate::{BlockId, RequestId};

/// The slots one request writes in one of its blocks this step: offsets `lo..hi` of `block`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct BlockWrite {
    block: i32,
    lo: usize,
    hi: usize,
    req_id: RequestId,
}

/// One request's share of a scheduler step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScheduledRequest {
    /// The request.
    pub req_id: RequestId,
    /// Tokens whose K/V are already in the cache (prompt tokens computed by earlier chunks or found
    /// in the prefix cache, plus generated tokens). The new tokens' positions start here.
    pub num_computed_tokens: usize,
    /// Tokens to compute this step (a prompt chunk, or 1 for a plain decode).
    pub num_scheduled_tokens: usize,
}

impl ScheduledRequest {
    /// `req_id` computes `num_scheduled_tokens` tokens after `num_computed_tokens` cached ones.
    pub fn new(req_id: impl Into<RequestId>, num_computed_tokens: usize, num_scheduled_tokens: usize) -> Self {
        ScheduledRequest { req_id: req_id.into(), num_computed_tokens, num_scheduled_tokens }
    }
}

/// The inputs of one step: attention metadata, positions, and the request order they use.
///
/// Rows of every per-request array (`query_start_loc`, `seq_lens`, `block_table`) follow
/// [`StepInputs::req_ids`]: decodes first, then prefills. Tokens are packed in the same order.
///
/// # Padding
/// When the step is padded for a CUDA graph, `positions` and `metadata.slot_mapping` are longer than
/// `metadata.num_actual_tokens`: padding tokens have position 0 and slot -1 (the cache write skips
/// them). The per-request arrays are *not* padded: `query_start_loc` keeps `num_reqs + 1` entries
/// ending at `num_actual_tokens`, as [`AttentionMetadata::check`] requires. A device buffer sized
/// for more requests than the step has is filled with
/// [`StepInputs::padded_query_start_loc`], which repeats the last entry (so the padded requests
/// are empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepInputs {
    /// What attention reads.
    pub metadata: AttentionMetadata,
    /// `[num_tokens]` i64 positions (`num_computed_tokens + i` for the request's `i`-th new token;
    /// 0 for padding).
    pub positions: Vec<i64>,
    /// The request of each row, decodes first.
    pub req_ids: Vec<RequestId>,
}

impl StepInputs {
    /// Requests in the step.
    pub fn num_reqs(&self) -> usize {
        self.req_ids.len()
    }

    /// Tokens of real requests.
    pub fn num_actual_tokens(&self) -> usize {
        self.metadata.num_actual_tokens
    }

    /// Tokens the model runs, padding included.
    pub fn num_padded_tokens(&self) -> usize {
        self.positions.len()
    }

    /// The slot mapping.
    pub fn slot_mapping(&self) -> &SlotMapping {
        &self.metadata.slot_mapping
    }

    /// The decode part of the batch.
    pub fn decode(&self) -> DecodeMeta<'_> {
        self.metadata.decode()
    }

    /// The prefill part of the batch.
    pub fn prefill(&self) -> PrefillMeta<'_> {
        self.metadata.prefill()
    }

    /// The row of each request's last scheduled token, where its next-token logits are read
    /// (vLLM's `logits_indices` when no speculative tokens are scheduled).
    pub fn last_token_indices(&self) -> Vec<usize> {
        self.metadata
            .query_start_loc
            .iter()
            .skip(1)
            .map(|&end| usize::try_from(end).unwrap_or(0).saturating_sub(1))
            .collect()
    }

    /// `query_start_loc` extended to `num_reqs + 1` entries for a buffer sized for `num_reqs`
    /// requests, repeating the last value: padded requests get empty queries. Returns the unpadded
    /// array when `num_reqs` is not larger than the step's.
    ///
    /// # Errors
    /// [`RunnerError::AllocationFailed`] for a `num_reqs` no buffer can hold (`usize::MAX`, say).
    pub fn padded_query_start_loc(&self, num_reqs: usize) -> Result<Vec<i32>> {
        const WHAT: &str = "padded query_start_loc";
        let qsl = &self.metadata.query_start_loc;
        let last = qsl.last().copied().unwrap_or(0);
        let len = num_reqs.checked_add(1).ok_or(RunnerError::AllocationFailed {
            what: WHAT,
            len: usize::MAX,
            elem_bytes: size_of::<i32>(),
        })?;
        let mut out = qsl.clone();
        try_reserve(&mut out, len.saturating_sub(qsl.len()), WHAT)?;
        out.resize(qsl.len().max(len), last);
        Ok(out)
    }
}

impl ModelRunner {
    /// Builds the inputs of one step.
    ///
    /// `step` lists the scheduled requests in any order; requests of the batch it leaves out keep
    /// their state and are not part of this step. The batch is reordered in place (decodes first,
    /// then prefills), and the returned [`StepInputs::req_ids`] says which request each row is.
    ///
    /// # Errors
    /// [`RunnerError::EmptyStep`], [`RunnerError::UnknownRequest`],
    /// [`RunnerError::DuplicateInStep`], [`RunnerError::NoScheduledTokens`],
    /// [`RunnerError::SequenceTooLong`], [`RunnerError::InsufficientBlocks`],
    /// [`RunnerError::TooManyTokens`], [`RunnerError::SlotWrittenTwice`] (two requests writing
    /// into one block, or one request listing a block twice among those it writes),
    /// [`RunnerError::AllocationFailed`]. The batch is unchanged when an error is returned.
    ///
    /// Every size in the returned arrays fits its type: sequence lengths and positions are at
    /// most `i32::MAX` ([`RunnerError::SequenceTooLong`] otherwise) and `query_start_loc` at most
    /// the step budget, itself at most `i32::MAX`; nothing here overflows or panics.
    pub fn prepare_inputs(&mut self, step: &[ScheduledRequest]) -> Result<StepInputs> {
        let span = tracing::debug_span!(
            "prepare_inputs",
            num_reqs = step.len(),
            num_tokens = tracing::field::Empty,
            num_padded_tokens = tracing::field::Empty,
            num_decodes = tracing::field::Empty,
        );
        let _guard = span.enter();

        let num_tokens = self.validate(step)?;
        let num_decodes = self.reorder(step.len());
        let out = self.fill(step.len(), num_decodes, num_tokens)?;

        span.record("num_tokens", out.metadata.num_actual_tokens);
        span.record("num_padded_tokens", out.positions.len());
        span.record("num_decodes", out.metadata.num_decodes);
        Ok(out)
    }

    /// Pass 1: checks the step and records each entry's counts against its row. Returns the
    /// step's token count.
    fn validate(&mut self, step: &[ScheduledRequest]) -> Result<usize> {
        if step.is_empty() {
            return Err(RunnerError::EmptyStep);
        }
        self.step += 1;
        let bs = self.config.block_size;
        // Longest sequence the i32 seq_lens and a full block table row can express.
        let max_tokens = self.config.max_blocks_per_req.saturating_mul(bs).min(i32::MAX as usize);
        let mut total: usize = 0;
        for e in step {
            let req_id = e.req_id;
            let row = self.batch.row_of(req_id).ok_or(RunnerError::UnknownRequest { req_id })?;
            let stamp = self.scheduled_in.get_mut(row).ok_or(RunnerError::UnknownRequest { req_id })?;
            if *stamp == self.step {
                return Err(RunnerError::DuplicateInStep { req_id });
            }
            *stamp = self.step;
            let (computed, scheduled) = (e.num_computed_tokens, e.num_scheduled_tokens);
            if scheduled == 0 {
                return Err(RunnerError::NoScheduledTokens { req_id });
            }
            let seq_len =
                computed.checked_add(scheduled).filter(|&n| n <= max_tokens).ok_or(RunnerError::SequenceTooLong {
                    req_id,
                    num_tokens: computed.saturating_add(scheduled),
                    max_tokens,
                })?;
            let have = self.batch.block_table().row_len(row);
            let needed = seq_len.div_ceil(bs);
            if needed > have {
                return Err(RunnerError::InsufficientBlocks {
                    req_id,
                    num_computed: computed,
                    num_scheduled: scheduled,
                    num_tokens: seq_len,
                    blocks_needed: needed,
                    num_blocks: have,
                    block_size: bs,
                });
            }
            total = total.saturating_add(scheduled);
            if let Some(t) = self.tokens.get_mut(row) {
                *t = (computed, scheduled);
            }
        }
        if total > self.config.max_num_batched_tokens {
            return Err(RunnerError::TooManyTokens { num_tokens: total, budget: self.config.max_num_batched_tokens });
        }
        self.check_distinct_writes(step)?;
        Ok(total)
    }

    /// Refuses a step in which two tokens would write the same KV-cache slot: the cache write
    /// would keep one of them and attention would read it for both (another request's keys, or a
    /// request's own overwritten history). Works on slot ranges per block, so it costs
    /// O(blocks written * log) rather than a set of every slot.
    ///
    /// Called after the per-entry checks, so every entry's blocks cover its tokens.
    fn check_distinct_writes(&mut self, step: &[ScheduledRequest]) -> Result<()> {
        let bs = self.config.block_size;
        let mut writes = std::mem::take(&mut self.writes);
        writes.clear();
        for e in step {
            let Some(blocks) = self.batch.blocks(e.req_id) else { continue };
            let (start, end) = (e.num_computed_tokens, e.num_computed_tokens + e.num_scheduled_tokens);
            for (bi, &block) in blocks.iter().enumerate().take((end - 1) / bs + 1).skip(start / bs) {
                // Offsets inside the block: the step's positions clipped to this block's span.
                let lo = start.max(bi * bs) - bi * bs;
                let hi = end.min((bi + 1) * bs) - bi * bs;
                writes.push(BlockWrite { block, lo, hi, req_id: e.req_id });
            }
        }
        writes.sort_unstable();
        // Within one block, sorted by start offset: a range starting before the furthest end seen
        // so far overlaps the range that reached it.
        let mut result = Ok(());
        let mut reach: Option<(i32, usize, RequestId)> = None;
        for w in &writes {
            match reach {
                Some((block, hi, other)) if block == w.block && w.lo < hi => {
                    result = Err(RunnerError::SlotWrittenTwice {
                        req_id: w.req_id,
                        other,
                        block_id: w.block as BlockId,
                        offset: w.lo,
                    });
                    break;
                }
                Some((block, hi, _)) if block == w.block && w.hi <= hi => {}
                _ => reach = Some((w.block, w.hi, w.req_id)),
            }
        }
        self.writes = writes;
        result
    }

    /// Pass 2: scheduled decodes to rows `0..d`, scheduled prefills to `d..num_reqs`, the rest
    /// after. Returns `d`.
    fn reorder(&mut self, num_reqs: usize) -> usize {
        let threshold = self.config.decode_threshold;
        let step = self.step;
        let n = self.batch.len();
        let is_scheduled = |r: &ModelRunner, row: usize| r.scheduled_in.get(row) == Some(&step);
        let is_decode = |r: &ModelRunner, row: usize| r.tokens.get(row).is_some_and(|&(_, q)| q <= threshold);

        let mut front = 0;
        for row in 0..n {
            if is_scheduled(self, row) && is_decode(self, row) {
                self.swap_rows(front, row);
                front += 1;
            }
        }
        let num_decodes = front;
        for row in num_decodes..n {
            if front == num_reqs {
                break;
            }
            if is_scheduled(self, row) {
                self.swap_rows(front, row);
                front += 1;
            }
        }
        num_decodes
    }

    /// Pass 3: the arrays, for rows `0..num_reqs` (already validated and ordered).
    fn fill(&self, num_reqs: usize, num_decodes: usize, num_tokens: usize) -> Result<StepInputs> {
        let bs = self.config.block_size;
        let num_padded = self.config.padded_num_tokens(num_tokens);
        // The padded size can be a large CUDA-graph size: allocate fallibly.
        let (mut positions, mut slots): (Vec<i64>, Vec<i64>) = (Vec::new(), Vec::new());
        try_reserve(&mut positions, num_padded, "positions")?;
        try_reserve(&mut slots, num_padded, "slot mapping")?;
        let mut query_start_loc: Vec<i32> = Vec::with_capacity(num_reqs + 1);
        let mut seq_lens: Vec<i32> = Vec::with_capacity(num_reqs);
        let mut max_query_len = 0;
        let mut max_seq_len = 0;
        query_start_loc.push(0);

        let table = self.batch.block_table();
        for row in 0..num_reqs {
            let (computed, scheduled) = self.tokens.get(row).copied().unwrap_or((0, 0));
            let end = computed + scheduled;
            positions.extend(computed as i64..end as i64);
            // Runs of consecutive positions inside one block have consecutive slots.
            let blocks = table.row(row).unwrap_or_default();
            let (first, last) = (computed / bs, (end - 1) / bs);
            for (bi, &block) in blocks.iter().enumerate().take(last + 1).skip(first) {
                let lo = (bi * bs).max(computed);
                let hi = ((bi + 1) * bs).min(end);
                let base = block as i64 * bs as i64 - (bi * bs) as i64;
                slots.extend((lo as i64..hi as i64).map(|pos| base + pos));
            }
            // Validation bounded both by i32::MAX.
            query_start_loc.push(positions.len() as i32);
            seq_lens.push(end as i32);
            max_query_len = max_query_len.max(scheduled);
            max_seq_len = max_seq_len.max(end);
        }

        let num_decode_tokens = query_start_loc.get(num_decodes).copied().unwrap_or(0) as usize;
        positions.resize(num_padded, 0);
        slots.resize(num_padded, -1);
        let metadata = AttentionMetadata {
            num_actual_tokens: num_tokens,
            query_start_loc,
            seq_lens,
            block_table: table.to_block_table(num_reqs)?,
            slot_mapping: SlotMapping::new(slots),
            max_query_len,
            max_seq_len,
            num_decodes,
            num_decode_tokens,
            num_prefills: num_reqs - num_decodes,
            num_prefill_tokens: num_tokens - num_decode_tokens,
        };
        // Cheap (O(requests)) and turns a runner bug into an error instead of a bad GPU write.
        metadata.check()?;
        Ok(StepInputs { metadata, positions, req_ids: self.batch.req_ids()[..num_reqs].to_vec() })
    }
}
