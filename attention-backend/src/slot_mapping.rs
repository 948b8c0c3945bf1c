//! The slot mapping: where each new token's K/V row goes in the paged cache.

use crate::error::{AttentionError, Result};

/// Per-token cache slots, **`i64`**, one per token of the step (padding included).
///
/// `slot = block_id * block_size + offset_in_block`; a negative slot marks a padding token whose
/// K/V is not written. The type holds `i64` and nothing else, so the bug that crashed the seed
/// implementation at run time ("expected scalar type Long but found Int": an `int32` slot mapping
/// handed to the cache write) cannot be written here; it does not compile:
///
/// ```compile_fail
/// use attention_backend::SlotMapping;
/// let slots: Vec<i32> = vec![0, 1, 2];
/// let mapping = SlotMapping::new(slots); // error: expected `Vec<i64>`, found `Vec<i32>`
/// ```
///
/// The largest slot is computed once at construction, so checking the mapping against a cache
/// ([`SlotMapping::check_within`]) costs nothing on the hot path and needs no device read-back even
/// after the mapping was uploaded.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SlotMapping {
    slots: Vec<i64>,
    /// Index and value of the largest non-negative slot.
    max: Option<(usize, i64)>,
}

impl SlotMapping {
    /// Wraps per-token slots (negative = padding).
    pub fn new(slots: Vec<i64>) -> Self {
        let max =
            slots.iter().copied().enumerate().filter(|&(_, s)| s >= 0).max_by_key(|&(i, s)| (s, std::cmp::Reverse(i)));
        SlotMapping { slots, max }
    }

    /// The slots.
    pub fn as_slice(&self) -> &[i64] {
        &self.slots
    }

    /// Number of tokens (padding included).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when the step has no tokens.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The largest non-negative slot, if any token is not padding.
    pub fn max_slot(&self) -> Option<i64> {
        self.max.map(|(_, s)| s)
    }

    /// Tokens that are written (non-negative slots).
    pub fn num_written(&self) -> usize {
        self.slots.iter().filter(|&&s| s >= 0).count()
    }

    /// Checks that every slot addresses a row of a cache with `num_slots` slots.
    ///
    /// # Errors
    /// [`AttentionError::SlotOutOfRange`] naming the first largest offending slot.
    pub fn check_within(&self, op: &'static str, num_slots: usize) -> Result<()> {
        match self.max {
            Some((index, slot)) if slot as u64 >= num_slots as u64 => {
                Err(AttentionError::SlotOutOfRange { op, index, slot, num_slots })
            }
            _ => Ok(()),
        }
    }

    /// Takes the slots back.
    pub fn into_vec(self) -> Vec<i64> {
        self.slots
    }
}

impl From<Vec<i64>> for SlotMapping {
    fn from(slots: Vec<i64>) -> Self {
        SlotMapping::new(slots)
    }
}

impl From<&[i64]> for SlotMapping {
    fn from(slots: &[i64]) -> Self {
        SlotMapping::new(slots.to_vec())
    }
}
