//! The shape of a paged KV cache.

use crate::error::{AttentionError, Result};

/// Dimensions of one layer's paged KV cache in vLLM's "NHD" layout:
/// key and value caches are each `[num_blocks, block_size, num_kv_heads, head_size]`.
///
/// A *slot* is one token position of the cache, `block_id * block_size + offset`; the cache has
/// `num_blocks * block_size` of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheLayout {
    /// Physical blocks in the cache.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_size: usize,
}

impl CacheLayout {
    /// A layout, checked: every dimension must be positive and the slot count must fit in `i64`.
    ///
    /// # Errors
    /// [`AttentionError::InvalidArgument`] for a zero dimension or an overflowing size.
    pub fn new(num_blocks: usize, block_size: usize, num_kv_heads: usize, head_size: usize) -> Result<Self> {
        let layout = CacheLayout { num_blocks, block_size, num_kv_heads, head_size };
        layout.check()?;
        Ok(layout)
    }

    /// Re-checks a layout built as a struct literal.
    ///
    /// # Errors
    /// As [`CacheLayout::new`].
    pub fn check(&self) -> Result<()> {
        let dims = [
            ("num_blocks", self.num_blocks),
            ("block_size", self.block_size),
            ("num_kv_heads", self.num_kv_heads),
            ("head_size", self.head_size),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return Err(AttentionError::InvalidArgument {
                op: "cache_layout",
                what: format!("{name} must be positive"),
            });
        }
        self.num_elements().filter(|&n| i64::try_from(n).is_ok()).ok_or_else(|| AttentionError::InvalidArgument {
            op: "cache_layout",
            what: format!("{self:?} overflows"),
        })?;
        Ok(())
    }

    /// Token slots in the cache: `num_blocks * block_size`.
    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Elements of one slot (one token's row): `num_kv_heads * head_size`.
    pub fn row_elems(&self) -> usize {
        self.num_kv_heads * self.head_size
    }

    /// Elements of one of the two caches, `None` on overflow.
    pub fn num_elements(&self) -> Option<usize> {
        self.num_blocks.checked_mul(self.block_size)?.checked_mul(self.num_kv_heads)?.checked_mul(self.head_size)
    }

    /// Shape of the key (or value) cache.
    pub fn shape(&self) -> [usize; 4] {
        [self.num_blocks, self.block_size, self.num_kv_heads, self.head_size]
    }
}
