//! Which Hopper prefill kernel a step's prefill part runs on, from the step's lengths.
//!
//! The kernels crate's [`PrefillPath::Auto`] sends head size 128 over a 16-bit cache to the
//! warp-specialised Hopper kernel without seeing the batch. That kernel needs a whole SM per block
//! (one persistent block per SM, 196 KB of shared memory), where the lockstep Hopper kernel's
//! smaller blocks share SMs. Measured on the H200 (bench_prefill_paths, bf16, 32 / 8 heads, causal;
//! lockstep vs warp-specialised TFLOP/s, the work in tile units of [`prefill_tile_work`]), first
//! when the warp-specialised kernel ran a block per row block and gathered through a ring of row
//! offsets in shared memory, then with its persistent grid and page-grouped gather:
//!
//! | prompts | tile units | lockstep | warp-specialised, then | warp-specialised, now |
//! | --- | --- | --- | --- | --- |
//! | 1 x 1024 | 1152 | 147.6 | 134.3 | 147.6 |
//! | 2 x 1024 | 2304 | 154.6 | 139.0 | 169.5 |
//! | 1 x 2048 | 4352 | 208.6 | 210.8 | 246.2 |
//! | 4 x 1024 | 4608 | 158.6 | 160.2 | 170.3 |
//! | 2 x 2048 | 8704 | 213.4 | 222.4 | 257.7 |
//! | 32 x 512 | 10240 | 106.1 | 108.4 | 124.7 |
//! | 1 x 4096 | 17408 | 259.6 | 288.6 | 345.9 |
//!
//! Alone, the warp-specialised kernel now ties or wins from the smallest shape. Beside a decode
//! part (a mixed step: the decode runs on a side stream and fills the SMs first) the lockstep
//! kernel still wins on the small ones: mixed 64 decodes + 2 x 1024 took 0.263 ms with the prefill
//! part on the lockstep kernel and 0.267 ms on the warp-specialised one, whose blocks wait for
//! whole SMs. So below [`WS_MIN_TILE_WORK_PER_SM`] units per SM the planners still run the prefill
//! part on the lockstep kernel; a chunked prefill over a long cached prefix has many key tiles per
//! row block and stays on the warp-specialised one whatever its query length.

use attention_kernels::attention::{self as kernels, PrefillKernel, PrefillPath};
use attention_kernels::DType;
use cudarc::driver::CudaContext;
use std::ops::Range;

use crate::metadata::AttentionMetadata;

/// Rows and keys of the warp-specialised prefill kernel's tiles.
const WS_TILE: usize = 128;

/// Tile units per SM (see [`prefill_tile_work`]) from which the warp-specialised Hopper prefill
/// runs a prefill part. Chosen when the lockstep kernel was 10% faster at 2304 units (17 per SM)
/// and below on the H200's 132 SMs; since the warp-specialised kernel became persistent it is as
/// fast alone at 1152 units and faster above, but slower beside a decode part (see the module
/// docs), which is where small prefill parts mostly run.
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
