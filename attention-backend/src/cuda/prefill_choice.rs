//! Which Hopper prefill kernel a step's prefill part runs on, from the step's lengths.
//!
//! The kernels crate's [`PrefillPath::Auto`] sends head size 128 over a 16-bit cache to the
//! warp-specialised Hopper kernel without seeing the batch. That kernel runs one block of 128 query
//! rows per SM, and each block fills a load pipeline before its first product: on a prefill part
//! with little work (few row blocks, few key tiles each) that start is not amortised and the
//! blocks do not fill the chip evenly, where the lockstep Hopper kernel's smaller, more numerous
//! blocks do. Measured on the H200 (bench_prefill_paths, bf16, 32 / 8 heads, causal; lockstep vs
//! warp-specialised TFLOP/s, the work in tile units of [`prefill_tile_work`]):
//!
//! | prompts | tile units | lockstep | warp-specialised |
//! | --- | --- | --- | --- |
//! | 1 x 1024 | 1152 | 147.6 | 134.3 |
//! | 2 x 1024 | 2304 | 154.6 | 139.0 |
//! | 1 x 2048 | 4352 | 208.6 | 210.8 |
//! | 4 x 1024 | 4608 | 158.6 | 160.2 |
//! | 2 x 2048 | 8704 | 213.4 | 222.4 |
//! | 32 x 512 | 10240 | 106.1 | 108.4 |
//! | 1 x 4096 | 17408 | 259.6 | 288.6 |
//!
//! So below [`WS_MIN_TILE_WORK_PER_SM`] units per SM the planners run the prefill part on the
//! lockstep kernel; a chunked prefill over a long cached prefix has many key tiles per row block
//! and stays on the warp-specialised one whatever its query length.

use attention_kernels::attention::{self as kernels, PrefillKernel, PrefillPath};
use attention_kernels::DType;
use cudarc::driver::CudaContext;
use std::ops::Range;

use crate::metadata::AttentionMetadata;

/// Rows and keys of the warp-specialised prefill kernel's tiles.
const WS_TILE: usize = 128;

/// Tile units per SM (see [`prefill_tile_work`]) from which the warp-specialised Hopper prefill
/// runs a prefill part. On the H200's 132 SMs the lockstep kernel was 10% faster at 2304 units
/// (17 per SM) and below; from 4352 units (33 per SM) the two were within 2% or the
/// warp-specialised one was faster; no shape between was measured.
pub const WS_MIN_TILE_WORK_PER_SM: usize = 32;

/// The work of a prefill part in units of 128 query rows x 128 keys of one query head, counting
/// every key tile a causal row block reaches (`(query_len, seq_len)` per request).
pub fn prefill_tile_work(lens: impl Iterator<Item = (usize, usize)>, num_heads: usize) -> usize {
    let per_head: usize = lens
        .map(|(q, kv)| {
            let ctx = kv.saturating_sub(q);
            (0..q.div_ceil(WS_TILE))
                .map(|b| (ctx + q.min((b + 1) * WS_TILE)).div_ceil(WS_TILE))
                .fold(0usize, usize::saturating_add)
        })
        .fold(0, usize::saturating_add);
    per_head.saturating_mul(num_heads)
}

/// [`prefill_tile_work`] of requests `reqs` of `meta`.
pub(crate) fn metadata_tile_work(meta: &AttentionMetadata, reqs: Range<usize>, num_heads: usize) -> usize {
    prefill_tile_work(reqs.map(|r| (meta.query_len(r), meta.seq_lens[r].max(0) as usize)), num_heads)
}

/// Whether a prefill part of `work` tile units is too small for the warp-specialised kernel on
/// `num_sms` SMs.
pub fn prefill_is_small(work: usize, num_sms: usize) -> bool {
    work < WS_MIN_TILE_WORK_PER_SM.saturating_mul(num_sms)
}

/// Runs `launch` (the prefill launch of a `compute` x `cache` layer at `head_size`) on the lockstep
/// Hopper kernel when the plan found the prefill part `small` and [`PrefillPath::Auto`] is in force
/// and would pick the warp-specialised kernel; as it is otherwise (an explicit path, from the
/// environment or `with_prefill_path`, is never overridden).
pub(crate) fn on_planned_prefill<R>(
    small: bool,
    ctx: &CudaContext,
    head_size: usize,
    compute: DType,
    cache: DType,
    launch: impl FnOnce() -> R,
) -> R {
    let lockstep = small
        && kernels::prefill_path() == Ok(PrefillPath::Auto)
        && kernels::prefill_kernel_for_cache(ctx, head_size, compute, cache) == Ok(PrefillKernel::Sm90Ws);
    if lockstep {
        kernels::with_prefill_path(PrefillPath::Sm90, launch)
    } else {
        launch()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_work_counts_causal_tiles() {
        // 1024 fresh tokens: row blocks 0..8 reach 1..=8 key tiles.
        assert_eq!(prefill_tile_work([(1024, 1024)].into_iter(), 1), 36);
        assert_eq!(prefill_tile_work([(1024, 1024); 2].into_iter(), 32), 2304);
        assert_eq!(prefill_tile_work([(2048, 2048)].into_iter(), 32), 4352);
        // A chunk of 512 over a 7680-token prefix: four row blocks of 61..=64 tiles.
        assert_eq!(prefill_tile_work([(512, 8192)].into_iter(), 1), 61 + 62 + 63 + 64);
        // A ragged last block and a one-token request.
        assert_eq!(prefill_tile_work([(130, 300), (1, 5)].into_iter(), 1), 3 + 3 + 1);
        assert_eq!(prefill_tile_work(std::iter::empty(), 32), 0);
    }

    #[test]
    fn small_parts_go_to_the_lockstep_kernel_on_132_sms() {
        let work = |lens: &[(usize, usize)]| prefill_tile_work(lens.iter().copied(), 32);
        assert!(prefill_is_small(work(&[(1024, 1024); 2]), 132));
        assert!(!prefill_is_small(work(&[(1024, 1024); 4]), 132));
        assert!(!prefill_is_small(work(&[(512, 8192); 4]), 132));
        assert!(!prefill_is_small(work(&[(512, 512); 32]), 132));
        assert!(!prefill_is_small(usize::MAX, usize::MAX));
    }
}
