//! The persistent block table: one `i32` row of physical block ids per batch row.
//!
//! It is allocated once at `[max_num_reqs, max_blocks_per_req]` and updated in place as requests
//! come, grow, move and go, so a step copies out its leading rows instead of rebuilding the table
//! from per-request lists (vLLM's `BlockTable` does the same to feed a pinned host buffer). The
//! width never changes, which keeps the row stride the CUDA kernels (and a captured CUDA graph)
//! see fixed.
//!
//! Only the batch mutates it, so its rows cannot drift out of sync with the batch's requests.

use attention_backend::BlockTable;

use crate::error::{try_filled, Result, RunnerError};

/// `[max_num_reqs, max_blocks_per_req]` block ids, row `i` belonging to the batch's row `i`.
///
/// Entries past a row's used blocks are stale (they are never read: a row's used length is
/// tracked separately).
#[derive(Clone, Debug)]
pub struct PersistentBlockTable {
    data: Vec<i32>,
    /// Used blocks per row.
    lens: Vec<usize>,
    width: usize,
}

impl PersistentBlockTable {
    /// A zeroed table.
    ///
    /// # Errors
    /// [`RunnerError::AllocationFailed`] when the table's size overflows or cannot be allocated.
    pub(crate) fn new(max_num_reqs: usize, max_blocks_per_req: usize) -> Result<Self> {
        const WHAT: &str = "block table";
        let len = max_num_reqs.checked_mul(max_blocks_per_req).ok_or(RunnerError::AllocationFailed {
            what: WHAT,
            len: usize::MAX,
            elem_bytes: size_of::<i32>(),
        })?;
        Ok(PersistentBlockTable {
            data: try_filled(len, 0, WHAT)?,
            lens: try_filled(max_num_reqs, 0, "block table row lengths")?,
            width: max_blocks_per_req,
        })
    }

    /// Columns: the most blocks one request can hold (the row stride).
    pub fn max_blocks_per_req(&self) -> usize {
        self.width
    }

    /// Rows (the batch's capacity).
    pub fn max_num_reqs(&self) -> usize {
        self.lens.len()
    }

    /// The used block ids of row `row`, `None` past the table.
    pub fn row(&self, row: usize) -> Option<&[i32]> {
        let len = *self.lens.get(row)?;
        self.data.get(row * self.width..row * self.width + len)
    }

    /// Used blocks of row `row` (0 past the table).
    pub fn row_len(&self, row: usize) -> usize {
        self.lens.get(row).copied().unwrap_or(0)
    }

    /// The full-width rows `0..num_rows` as one row-major slice, stale entries included.
    pub fn leading_rows(&self, num_rows: usize) -> &[i32] {
        &self.data[..(num_rows * self.width).min(self.data.len())]
    }

    /// Copies rows `0..num_rows` into the backend's [`BlockTable`] at full width.
    pub(crate) fn to_block_table(&self, num_rows: usize) -> Result<BlockTable> {
        Ok(BlockTable::new(self.leading_rows(num_rows).to_vec(), num_rows.min(self.lens.len()), self.width)?)
    }

    /// Row `row` becomes `blocks`. The caller checked the row index and that `blocks` fits.
    pub(crate) fn set_row(&mut self, row: usize, blocks: &[i32]) {
        let start = row * self.width;
        self.data[start..start + blocks.len()].copy_from_slice(blocks);
        self.lens[row] = blocks.len();
    }

    /// Appends `blocks` to row `row`. The caller checked that they fit.
    pub(crate) fn append_row(&mut self, row: usize, blocks: &[i32]) {
        let start = row * self.width + self.lens[row];
        self.data[start..start + blocks.len()].copy_from_slice(blocks);
        self.lens[row] += blocks.len();
    }

    /// Row `dst` becomes a copy of row `src` (compaction after a removal); `src` is cleared.
    pub(crate) fn move_row(&mut self, src: usize, dst: usize) {
        if src == dst {
            return;
        }
        let len = self.lens[src];
        self.data.copy_within(src * self.width..src * self.width + len, dst * self.width);
        self.lens[dst] = len;
        self.lens[src] = 0;
    }

    /// Clears row `row`.
    pub(crate) fn clear_row(&mut self, row: usize) {
        self.lens[row] = 0;
    }

    /// Exchanges rows `a` and `b`, copying only their used prefixes.
    pub(crate) fn swap_rows(&mut self, a: usize, b: usize) {
        if a == b {
            return;
        }
        let (lo, hi) = (a.min(b), a.max(b));
        let n = self.lens[a].max(self.lens[b]);
        let (head, tail) = self.data.split_at_mut(hi * self.width);
        head[lo * self.width..lo * self.width + n].swap_with_slice(&mut tail[..n]);
        self.lens.swap(a, b);
    }
}
