//! How many KV-cache blocks a memory budget holds (vLLM's `num_gpu_blocks` arithmetic), from the
//! cache's real element size: an FP8 cache holds twice the blocks of a bf16 one in the same bytes.

use attention_backend::DType;

use crate::error::{Result, RunnerError};

/// The dimensions that fix the bytes of one KV-cache block across all layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheSpec {
    /// Attention layers (each has its own K and V cache).
    pub num_layers: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Key/value heads per layer.
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_size: usize,
    /// The cache's storage type (f16, bf16, f32, or an FP8 type).
    pub dtype: DType,
}

impl KvCacheSpec {
    /// Bytes one block takes in every layer's K and V caches together.
    ///
    /// # Errors
    /// [`RunnerError::InvalidConfig`] when a dimension is zero or the product overflows `u64`.
    pub fn bytes_per_block(&self) -> Result<u64> {
        let dims = [self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_size, self.dtype.size_in_bytes()];
        if dims.contains(&0) {
            return Err(RunnerError::InvalidConfig { what: format!("KV cache with a zero dimension: {self:?}") });
        }
        dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64)).ok_or_else(|| RunnerError::InvalidConfig {
            what: format!("bytes of one KV-cache block overflow: {self:?}"),
        })
    }

    /// The blocks that fit in `budget_bytes`, capped at `i32::MAX` (block ids are `i32` in the
    /// block table).
    ///
    /// # Errors
    /// As [`KvCacheSpec::bytes_per_block`], and [`RunnerError::InvalidConfig`] when not even one
    /// block fits (a cache of zero blocks serves nothing).
    pub fn blocks_for_memory(&self, budget_bytes: u64) -> Result<usize> {
        let per_block = self.bytes_per_block()?;
        let blocks = budget_bytes / per_block;
        if blocks == 0 {
            return Err(RunnerError::InvalidConfig {
                what: format!("{budget_bytes} bytes hold no KV-cache block of {per_block} bytes ({self:?})"),
            });
        }
        Ok(blocks.min(i32::MAX as u64) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dtype: DType) -> KvCacheSpec {
        KvCacheSpec { num_layers: 32, block_size: 16, num_kv_heads: 8, head_size: 128, dtype }
    }

    #[test]
    fn fp8_holds_twice_the_blocks_of_bf16() {
        assert_eq!(spec(DType::BF16).bytes_per_block().unwrap(), 32 * 2 * 16 * 8 * 128 * 2);
        assert_eq!(spec(DType::Fp8E4M3).bytes_per_block().unwrap(), 32 * 2 * 16 * 8 * 128);
        let gib = 1u64 << 30;
        let bf16 = spec(DType::BF16).blocks_for_memory(40 * gib).unwrap();
        assert_eq!(bf16, 20480, "Llama-3-8B shapes: 40 GiB of bf16 cache = 327,680 tokens");
        assert_eq!(spec(DType::Fp8E5M2).blocks_for_memory(40 * gib).unwrap(), 2 * bf16);
    }

    #[test]
    fn too_small_zero_or_overflowing_is_an_error() {
        assert!(spec(DType::BF16).blocks_for_memory(1000).is_err());
        assert!(KvCacheSpec { num_layers: 0, ..spec(DType::BF16) }.bytes_per_block().is_err());
        let huge = KvCacheSpec { num_layers: usize::MAX, head_size: usize::MAX, ..spec(DType::F32) };
        assert!(huge.bytes_per_block().is_err());
        assert_eq!(
            KvCacheSpec { block_size: 1, num_layers: 1, num_kv_heads: 1, head_size: 1, dtype: DType::Fp8E4M3 }
                .blocks_for_memory(u64::MAX)
                .unwrap(),
            i32::MAX as usize
        );
    }
}
