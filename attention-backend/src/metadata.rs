//! Attention metadata for one scheduler step: what the model runner builds and both backends read.
//!
//! Tokens are packed request after request, decodes first (vLLM's reorder), then prefills. A
//! request is a *decode* when it schedules a single token (more generally, at most the runner's
//! decode threshold); everything else, chunked prefills and prefix-cached prompts included, is a
//! *prefill*. The arrays follow vLLM / FlashAttention's varlen contract exactly:
//!
//! | field | dtype | shape |
//! | --- | --- | --- |
//! | `query_start_loc` | i32 | `[num_reqs + 1]`, cumulative query lengths (`cu_seqlens_q`) |
//! | `seq_lens` | i32 | `[num_reqs]`, computed + new tokens per request (`seqused_k`) |
//! | `block_table` | i32 | `[num_reqs, max_blocks_per_req]` physical block ids |
//! | `slot_mapping` | **i64** | `[num_tokens]`, padding = -1 |
//!
//! What a step must satisfy on top of these shapes (every real token's slot follows its block
//! table, padding slots are negative, a block written in the step belongs to one request at one
//! index, every used block is inside the cache) is the *step contract*, written out once in
//! ARCHITECTURE.md ("Invariants") and enforced by [`AttentionMetadata::check_against`].

use std::cell::RefCell;

use crate::error::{AttentionError, Result};
use crate::layout::CacheLayout;
use crate::slot_mapping::SlotMapping;

/// Block ids per request, row-major `[num_reqs, max_blocks_per_req]`, `i32` as the kernels read them.
///
/// Entries past a request's last used block are ignored (vLLM leaves stale ids there).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct BlockTable {
    data: Vec<i32>,
    num_reqs: usize,
    max_blocks_per_req: usize,
}

impl BlockTable {
    /// A table from row-major data.
    ///
    /// # Errors
    /// [`AttentionError::ShapeMismatch`] when `data.len() != num_reqs * max_blocks_per_req`.
    pub fn new(data: Vec<i32>, num_reqs: usize, max_blocks_per_req: usize) -> Result<Self> {
        if Some(data.len()) != num_reqs.checked_mul(max_blocks_per_req) {
            return Err(AttentionError::ShapeMismatch {
                op: "block_table",
                tensor: "block_table",
                expected: vec![num_reqs, max_blocks_per_req],
                actual: vec![data.len()],
            });
        }
        Ok(BlockTable { data, num_reqs, max_blocks_per_req })
    }

    /// A table from one block list per request, padded with zeros to the longest row.
    pub fn from_rows<R: AsRef<[i32]>>(rows: &[R]) -> Self {
        let width = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
        let mut data = vec![0; rows.len() * width];
        for (i, r) in rows.iter().enumerate() {
            data[i * width..i * width + r.as_ref().len()].copy_from_slice(r.as_ref());
        }
        BlockTable { data, num_reqs: rows.len(), max_blocks_per_req: width }
    }

    /// Rows.
    pub fn num_reqs(&self) -> usize {
        self.num_reqs
    }

    /// Columns (the row stride).
    pub fn max_blocks_per_req(&self) -> usize {
        self.max_blocks_per_req
    }

    /// Row `req` (empty past the last row).
    pub fn row(&self, req: usize) -> &[i32] {
        let w = self.max_blocks_per_req;
        self.data.get(req * w..(req + 1) * w).unwrap_or(&[])
    }

    /// The row-major data.
    pub fn as_slice(&self) -> &[i32] {
        &self.data
    }

    /// The table restricted to rows `start..end` (copies; clamped to the rows present).
    pub fn rows(&self, start: usize, end: usize) -> BlockTable {
        let w = self.max_blocks_per_req;
        let end = end.min(self.num_reqs);
        let start = start.min(end);
        BlockTable { data: self.data[start * w..end * w].to_vec(), num_reqs: end - start, max_blocks_per_req: w }
    }
}

/// Everything attention needs to know about one step's batch.
///
/// Built by `model-runner`'s `prepare_inputs`; it can also be built by hand with
/// [`AttentionMetadata::new`], which derives the counts and checks consistency.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AttentionMetadata {
    /// Tokens of real requests (`query_start_loc[num_reqs]`); rows past it are padding.
    pub num_actual_tokens: usize,
    /// `[num_reqs + 1]` cumulative query lengths, starting at 0.
    pub query_start_loc: Vec<i32>,
    /// `[num_reqs]` total tokens (cached + new) per request.
    pub seq_lens: Vec<i32>,
    /// `[num_reqs, max_blocks_per_req]` physical block ids.
    pub block_table: BlockTable,
    /// `[num_tokens]` i64 slots (num_tokens >= num_actual_tokens; padding slots are -1).
    pub slot_mapping: SlotMapping,
    /// Longest query of the batch.
    pub max_query_len: usize,
    /// Longest sequence of the batch.
    pub max_seq_len: usize,
    /// Leading requests that are decodes.
    pub num_decodes: usize,
    /// Tokens of those decodes.
    pub num_decode_tokens: usize,
    /// Requests after the decodes.
    pub num_prefills: usize,
    /// Tokens of those prefills.
    pub num_prefill_tokens: usize,
}

/// The decode part of a batch: its first `num_decodes` requests (the seed's `DecodeMeta`).
#[derive(Clone, Copy, Debug)]
pub struct DecodeMeta<'a> {
    /// `[num_decodes + 1]`, a prefix of the batch's `query_start_loc`.
    pub query_start_loc: &'a [i32],
    /// `[num_decodes]`.
    pub seq_lens: &'a [i32],
    /// Row-major `[num_decodes, max_blocks_per_req]`.
    pub block_table: &'a [i32],
    /// Row stride of `block_table`.
    pub max_blocks_per_req: usize,
    /// Longest decode query (1 unless the decode threshold is raised).
    pub max_query_len: usize,
    /// Longest decode sequence.
    pub max_seq_len: usize,
}

/// The prefill part of a batch: requests `num_decodes..num_reqs` (the seed's `PrefillMeta`).
///
/// `query_start_loc` here is the batch's, *not* rebased: entry 0 is the first prefill token's row
/// in the packed query (`num_decode_tokens`).
#[derive(Clone, Copy, Debug)]
pub struct PrefillMeta<'a> {
    /// `[num_prefills + 1]`, a suffix of the batch's `query_start_loc`.
    pub query_start_loc: &'a [i32],
    /// `[num_prefills]`.
    pub seq_lens: &'a [i32],
    /// Row-major `[num_prefills, max_blocks_per_req]`.
    pub block_table: &'a [i32],
    /// Row stride of `block_table`.
    pub max_blocks_per_req: usize,
    /// Longest prefill query.
    pub max_query_len: usize,
    /// Longest prefill sequence.
    pub max_seq_len: usize,
}

const OP: &str = "attention_metadata";

fn invalid(what: String) -> AttentionError {
    AttentionError::InvalidMetadata { op: OP, what }
}

impl AttentionMetadata {
    /// Builds metadata from the varlen arrays, deriving the maxima and the decode/prefill split
    /// (leading requests with query length `<= decode_threshold` are decodes).
    ///
    /// # Errors
    /// [`AttentionError::InvalidMetadata`] when the arrays are inconsistent (see
    /// [`AttentionMetadata::check`]).
    pub fn new(
        query_start_loc: Vec<i32>,
        seq_lens: Vec<i32>,
        block_table: BlockTable,
        slot_mapping: SlotMapping,
        decode_threshold: usize,
    ) -> Result<Self> {
        if query_start_loc.is_empty() {
            return Err(invalid("query_start_loc is empty (it has num_reqs + 1 entries)".into()));
        }
        // Differences in i64: `[0, -1, i32::MAX]` must reach `check` and its typed error, not
        // overflow here. Negative differences count as 0; `check` refuses them.
        let q_lens: Vec<usize> = query_start_loc.windows(2).map(|w| span(w[0], w[1])).collect();
        let num_decodes = q_lens.iter().take_while(|&&q| q <= decode_threshold).count();
        let num_decode_tokens = q_lens[..num_decodes].iter().fold(0usize, |a, &q| a.saturating_add(q));
        let num_actual_tokens = usize::try_from(*query_start_loc.last().unwrap_or(&0)).unwrap_or(0);
        let meta = AttentionMetadata {
            num_actual_tokens,
            max_query_len: q_lens.iter().copied().max().unwrap_or(0),
            max_seq_len: seq_lens.iter().copied().max().unwrap_or(0).max(0) as usize,
            num_decodes,
            num_decode_tokens,
            num_prefills: q_lens.len() - num_decodes,
            num_prefill_tokens: num_actual_tokens.saturating_sub(num_decode_tokens),
            query_start_loc,
            seq_lens,
            block_table,
            slot_mapping,
        };
        meta.check()?;
        Ok(meta)
    }

    /// Requests in the batch.
    pub fn num_reqs(&self) -> usize {
        self.seq_lens.len()
    }

    /// Tokens in the batch, padding included (the length of the slot mapping).
    pub fn num_tokens(&self) -> usize {
        self.slot_mapping.len()
    }

    /// Query length of request `req`.
    ///
    /// 0 for a request index past the arrays.
    pub fn query_len(&self, req: usize) -> usize {
        match (self.query_start_loc.get(req), self.query_start_loc.get(req + 1)) {
            (Some(&a), Some(&b)) => span(a, b),
            _ => 0,
        }
    }

    /// `(num_decodes, num_reqs)` clamped to what every array holds, so the views never index past
    /// them even when the public fields were set inconsistently.
    fn split(&self) -> (usize, usize) {
        let reqs =
            self.seq_lens.len().min(self.query_start_loc.len().saturating_sub(1)).min(self.block_table.num_reqs());
        (self.num_decodes.min(reqs), reqs)
    }

    /// The decode part.
    ///
    /// Meaningful after [`AttentionMetadata::check`] passed; on inconsistent metadata the split is
    /// clamped to the arrays rather than panicking.
    pub fn decode(&self) -> DecodeMeta<'_> {
        let (n, _) = self.split();
        let w = self.block_table.max_blocks_per_req();
        DecodeMeta {
            query_start_loc: self.query_start_loc.get(..n + 1).unwrap_or(&[]),
            seq_lens: &self.seq_lens[..n],
            block_table: &self.block_table.as_slice()[..n * w],
            max_blocks_per_req: w,
            max_query_len: (0..n).map(|r| self.query_len(r)).max().unwrap_or(0),
            max_seq_len: self.seq_lens[..n].iter().copied().max().unwrap_or(0) as usize,
        }
    }

    /// The prefill part.
    ///
    /// Meaningful after [`AttentionMetadata::check`] passed (clamped like [`AttentionMetadata::decode`]).
    pub fn prefill(&self) -> PrefillMeta<'_> {
        let (d, reqs) = self.split();
        let w = self.block_table.max_blocks_per_req();
        PrefillMeta {
            query_start_loc: self.query_start_loc.get(d..reqs + 1).unwrap_or(&[]),
            seq_lens: &self.seq_lens[d..reqs],
            block_table: &self.block_table.as_slice()[d * w..reqs * w],
            max_blocks_per_req: w,
            max_query_len: (d..reqs).map(|r| self.query_len(r)).max().unwrap_or(0),
            max_seq_len: self.seq_lens[d..reqs].iter().copied().max().unwrap_or(0) as usize,
        }
    }

    /// Checks the metadata against itself: array lengths, `query_start_loc` starting at 0 and
    /// non-decreasing, `0 < q_len <= seq_len` for every request, the slot mapping covering the real
    /// tokens, the decode/prefill counts and the maxima agreeing with the arrays. The cache-dependent
    /// half of the step contract is [`AttentionMetadata::check_against`], which runs this first.
    ///
    /// # Errors
    /// [`AttentionError::InvalidMetadata`] naming the first inconsistency.
    pub fn check(&self) -> Result<()> {
        let num_reqs = self.seq_lens.len();
        if self.query_start_loc.len() != num_reqs + 1 {
            return Err(invalid(format!(
                "query_start_loc has {} entries, expected num_reqs + 1 = {}",
                self.query_start_loc.len(),
                num_reqs + 1
            )));
        }
        if self.query_start_loc[0] != 0 {
            return Err(invalid(format!("query_start_loc[0] = {}, expected 0", self.query_start_loc[0])));
        }
        if self.block_table.num_reqs() != num_reqs {
            return Err(invalid(format!(
                "block_table has {} rows for {num_reqs} requests",
                self.block_table.num_reqs()
            )));
        }
        for r in 0..num_reqs {
            let (a, b) = (self.query_start_loc[r], self.query_start_loc[r + 1]);
            if b < a {
                return Err(invalid(format!("query_start_loc decreases at request {r} ({a} -> {b})")));
            }
            // a >= query_start_loc[0] = 0 and b >= a: the difference cannot overflow, but i64 makes
            // that local.
            let (q, s) = (i64::from(b) - i64::from(a), i64::from(self.seq_lens[r]));
            if q == 0 {
                return Err(invalid(format!("request {r} schedules no token")));
            }
            if s < q {
                return Err(invalid(format!("request {r}: seq_len {s} is shorter than its query length {q}")));
            }
        }
        // Non-negative: query_start_loc starts at 0 and never decreases (checked above).
        let total = usize::try_from(*self.query_start_loc.last().unwrap_or(&0)).unwrap_or(0);
        if total != self.num_actual_tokens {
            return Err(invalid(format!(
                "num_actual_tokens {} != query_start_loc[-1] = {total}",
                self.num_actual_tokens
            )));
        }
        if self.slot_mapping.len() < total {
            return Err(invalid(format!("slot_mapping has {} entries for {total} tokens", self.slot_mapping.len())));
        }
        // The public count fields may hold anything: compare with checked sums, never `+`.
        if self.num_decodes > num_reqs
            || self.num_decodes.checked_add(self.num_prefills) != Some(num_reqs)
            || self.num_decode_tokens.checked_add(self.num_prefill_tokens) != Some(total)
            || usize::try_from(self.query_start_loc[self.num_decodes]).ok() != Some(self.num_decode_tokens)
        {
            return Err(invalid(format!(
                "decode/prefill split ({} decodes / {} tokens, {} prefills / {} tokens) does not add up to {num_reqs} requests / {total} tokens",
                self.num_decodes, self.num_decode_tokens, self.num_prefills, self.num_prefill_tokens
            )));
        }
        let max_q = (0..num_reqs).map(|r| self.query_len(r)).max().unwrap_or(0);
        let max_s = self.seq_lens.iter().copied().max().unwrap_or(0) as usize;
        if max_q != self.max_query_len || max_s != self.max_seq_len {
            return Err(invalid(format!(
                "max_query_len / max_seq_len are {} / {}, the arrays say {max_q} / {max_s}",
                self.max_query_len, self.max_seq_len
            )));
        }
        Ok(())
    }

    /// The once-per-step check: the metadata against itself ([`AttentionMetadata::check`]) and
    /// against a cache, enforcing the *step contract* (ARCHITECTURE.md, "Invariants"):
    ///
    /// - every request's block-table row has a column for each of its `ceil(seq_len / block_size)`
    ///   blocks, and each of those block ids is a block of the cache;
    /// - every real token (row `< query_start_loc[num_reqs]`) has a slot `>= 0`, equal to
    ///   `block_table[req][pos / block_size] * block_size + pos % block_size` for its position `pos`;
    /// - every padding row has a negative slot;
    /// - a block that the step writes into is used by no other (request, block index) pair of the
    ///   step. Given the rule above, two tokens can only write the same slot through two pairs
    ///   naming one block, so this is what rules out a slot written twice; it also refuses a block
    ///   that one request writes while another (or the same one, at another index) reads it, which
    ///   a per-slot check would let through.
    ///
    /// One pass over the tokens and the used block-table entries, O(num_tokens + sum of blocks per
    /// request), with a per-thread scratch of one entry per cache block that is stamped, never
    /// cleared (see [`AttentionMetadata::check_against_with`] to own the scratch instead).
    ///
    /// # Errors
    /// The errors of [`AttentionMetadata::check`]; [`AttentionError::SlotOutOfRange`],
    /// [`AttentionError::BlockTableTooShort`], [`AttentionError::BlockOutOfRange`],
    /// [`AttentionError::BlockWriteConflict`], [`AttentionError::MissingSlot`],
    /// [`AttentionError::SlotMismatch`], [`AttentionError::PaddingSlot`]; and
    /// [`AttentionError::AllocationFailed`] if the scratch cannot grow.
    pub fn check_against(&self, op: &'static str, layout: &CacheLayout) -> Result<()> {
        thread_local! {
            static SCRATCH: RefCell<StepCheckScratch> = RefCell::new(StepCheckScratch::default());
        }
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => self.check_against_with(op, layout, &mut scratch),
            // Unreachable (the check does not re-enter itself); a fresh scratch keeps it correct.
            Err(_) => self.check_against_with(op, layout, &mut StepCheckScratch::default()),
        })
    }

    /// [`AttentionMetadata::check_against`] with a caller-owned scratch (an engine that checks
    /// every step from one place can keep it next to its other per-step buffers).
    ///
    /// # Errors
    /// As [`AttentionMetadata::check_against`].
    pub fn check_against_with(
        &self,
        op: &'static str,
        layout: &CacheLayout,
        scratch: &mut StepCheckScratch,
    ) -> Result<()> {
        self.check()?;
        self.slot_mapping.check_within(op, layout.num_slots())?;
        let bs = layout.block_size;
        let w = self.block_table.max_blocks_per_req();
        let slots = self.slot_mapping.as_slice();
        let (stamp, uses) = scratch.begin(op, layout.num_blocks)?;
        for (r, &seq_len) in self.seq_lens.iter().enumerate() {
            // `check` passed: 0 < q_len <= seq_len, and query_start_loc is non-negative.
            let seq_len = usize::try_from(seq_len).unwrap_or(0);
            let q_len = self.query_len(r);
            let start = usize::try_from(self.query_start_loc[r]).unwrap_or(0);
            let needed = seq_len.div_ceil(bs);
            if needed > w {
                return Err(AttentionError::BlockTableTooShort {
                    op,
                    req: r,
                    seq_len,
                    block_size: bs,
                    needed,
                    columns: w,
                });
            }
            let row = &self.block_table.row(r)[..needed];
            let context = seq_len - q_len;
            let first_written = context / bs;
            for (j, &block) in row.iter().enumerate() {
                let Some(b) = usize::try_from(block).ok().filter(|&b| b < layout.num_blocks) else {
                    return Err(AttentionError::BlockOutOfRange {
                        op,
                        req: r,
                        index: j,
                        block,
                        num_blocks: layout.num_blocks,
                    });
                };
                let written = j >= first_written;
                let u = &mut uses[b];
                if *u & !1 != stamp {
                    *u = stamp | u32::from(written);
                } else if written || *u & 1 == 1 {
                    let (other_req, other_index) = self.first_use(block, bs).unwrap_or((r, j));
                    return Err(AttentionError::BlockWriteConflict {
                        op,
                        block,
                        req: r,
                        index: j,
                        other_req,
                        other_index,
                    });
                }
            }
            // The tokens' positions are context, context + 1, ...: walk (block column, offset in
            // the block) along them instead of dividing each position by the block size.
            let (mut col, mut off) = (first_written, context % bs);
            for (i, &slot) in slots[start..start + q_len].iter().enumerate() {
                let expected = i64::from(row[col]) * bs as i64 + off as i64;
                if slot != expected {
                    let (index, pos) = (start + i, context + i);
                    return Err(if slot < 0 {
                        AttentionError::MissingSlot { op, index, req: r, pos, slot }
                    } else {
                        AttentionError::SlotMismatch { op, index, req: r, pos, slot, expected }
                    });
                }
                off += 1;
                if off == bs {
                    off = 0;
                    col += 1;
                }
            }
        }
        let num_actual_tokens = self.num_actual_tokens;
        if let Some((k, &slot)) = slots[num_actual_tokens..].iter().enumerate().find(|(_, &s)| s >= 0) {
            return Err(AttentionError::PaddingSlot { op, index: num_actual_tokens + k, slot, num_actual_tokens });
        }
        Ok(())
    }

    /// The first (request, block-table column) among the requests' used columns that names
    /// `block`, in the order the step check visits them: the other party of a
    /// [`AttentionError::BlockWriteConflict`] (the check's scratch keeps only a stamp per block).
    fn first_use(&self, block: i32, bs: usize) -> Option<(usize, usize)> {
        self.seq_lens.iter().enumerate().find_map(|(r, &seq_len)| {
            let needed = usize::try_from(seq_len).unwrap_or(0).div_ceil(bs);
            let row = self.block_table.row(r);
            row[..needed.min(row.len())].iter().position(|&b| b == block).map(|j| (r, j))
        })
    }
}

/// `b - a` of two `query_start_loc` entries in i64, 0 when negative.
fn span(a: i32, b: i32) -> usize {
    usize::try_from(i64::from(b) - i64::from(a)).unwrap_or(0)
}

/// Reusable scratch of [`AttentionMetadata::check_against_with`]: one 32-bit stamp per cache
/// block, `generation << 1 | written` of the block's first use in the check of that generation.
/// Each check increments the generation, so no check clears the stamps (they are cleared once
/// every 2^31 checks, when the generation wraps). Four bytes per block keep a large cache's
/// stamps in the host's caches (the check's cost is its random accesses to them); who used a
/// block first is only needed for an error's message and is found again then.
#[derive(Debug, Default)]
pub struct StepCheckScratch {
    generation: u32,
    stamps: Vec<u32>,
}

impl StepCheckScratch {
    /// An empty scratch; it grows to the largest cache it is used with.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a new check over `num_blocks` blocks: the check's stamp (its generation shifted
    /// past the written bit) and the entries.
    fn begin(&mut self, op: &'static str, num_blocks: usize) -> Result<(u32, &mut [u32])> {
        if self.stamps.len() < num_blocks {
            let extra = num_blocks - self.stamps.len();
            self.stamps.try_reserve_exact(extra).map_err(|_| AttentionError::AllocationFailed {
                op,
                tensor: "step check scratch",
                bytes: num_blocks as u128 * std::mem::size_of::<u32>() as u128,
            })?;
            self.stamps.resize(num_blocks, 0);
        }
        self.generation = (self.generation + 1) & (u32::MAX >> 1);
        if self.generation == 0 {
            self.stamps.fill(0);
            self.generation = 1;
        }
        Ok((self.generation << 1, &mut self.stamps[..num_blocks]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block used in the last check before the generation wraps is free in the first check
    /// after it: the wrap clears the stamps instead of letting an old stamp match a new one.
    #[test]
    fn scratch_generation_wraps_cleanly() {
        let layout = CacheLayout::new(4, 2, 1, 16).unwrap();
        // One request of 3 tokens (one decode step on 2 context tokens) writing block 1.
        let meta = AttentionMetadata::new(
            vec![0, 1],
            vec![3],
            BlockTable::from_rows(&[vec![0, 1]]),
            SlotMapping::new(vec![2]),
            1,
        )
        .unwrap();
        let mut scratch = StepCheckScratch::new();
        meta.check_against_with("t", &layout, &mut scratch).unwrap();
        // The last generation before the wrap, and stamps left by generation 1 (written) 2^31
        // checks ago: the first generation after the wrap must not take them for its own.
        scratch.generation = u32::MAX >> 1;
        scratch.stamps.fill(1 << 1 | 1);
        meta.check_against_with("t", &layout, &mut scratch).unwrap();
        assert_eq!(scratch.generation, 1);
        assert_eq!(scratch.stamps, [2, 3, 0, 0]);
        meta.check_against_with("t", &layout, &mut scratch).unwrap();
        assert_eq!(scratch.stamps, [4, 5, 0, 0]);
    }
}
