//! The warp-specialised prefill's per-round timeline, a diagnostic: in a build with
//! `PAGED_ATTN_PREFILL_TRACE` set (at build time; off in every normal build, whose kernels carry no
//! trace code), the producer and each consumer warpgroup of the first blocks of a launch record
//! the global timer at a few points of every work item they walk. An item costs several
//! microseconds beyond its key tiles (a fifth of causal 8 x 2048), and neither the bench nor a
//! profiler's per-range samples say which role waits for which at an item boundary: the record
//! does (docs/PERFORMANCE.md, twenty-first session). Only the 16-bit cache path is marked.

use cudarc::driver::CudaContext;

use crate::launch::{bind_ctx, status_to_result};
use crate::{ffi, KernelError};

/// Words per record on the C side (`PrefillTraceWord::kPtWords`).
const WORDS: usize = 40;
/// Where the consumers' marks start, and how many each has (`kPtCons`, `kPtConsWords`).
const CONS: usize = 7;
const CONS_WORDS: usize = 11;

/// One consumer warpgroup's marks for one item (global timer, ns; 0 for a point it did not reach:
/// a warpgroup whose rows see no key of the item has no products).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefillConsumerMarks {
    /// The item decoded (the top of the warpgroup's item loop).
    pub start_ns: u64,
    /// The item's Q landed in shared memory.
    pub q_ns: u64,
    /// The first S product issued (the turn taken and handed over).
    pub s0_issued_ns: u64,
    /// The first S product done.
    pub s0_done_ns: u64,
    /// The first tile's softmax done and P packed.
    pub softmax0_ns: u64,
    /// The steady-state loop over the item's other tiles done.
    pub loop_end_ns: u64,
    /// The item's last PV product done.
    pub last_pv_ns: u64,
    /// The item's rows written and its Q buffer released.
    pub end_ns: u64,
    /// Epilogue: the rows' sums, statistics and output scale final (after the last PV product).
    pub final_ns: u64,
    /// Epilogue: the rows staged in shared memory, the warpgroup's barrier passed.
    pub staged_ns: u64,
    /// Epilogue: the rows' global stores issued (before the Q buffer's release, `end_ns`).
    pub stored_ns: u64,
}

impl PrefillConsumerMarks {
    /// Every mark in the order the warpgroup passes them: start, Q, first S issued and done,
    /// first softmax, loop end, last PV, then the epilogue's final statistics, staging, stores and
    /// end.
    pub fn in_order(&self) -> [u64; 11] {
        [
            self.start_ns,
            self.q_ns,
            self.s0_issued_ns,
            self.s0_done_ns,
            self.softmax0_ns,
            self.loop_end_ns,
            self.last_pv_ns,
            self.final_ns,
            self.staged_ns,
            self.stored_ns,
            self.end_ns,
        ]
    }
}

/// One round of one block of the last warp-specialised prefill launch: the item it walked, the
/// producer's marks and each consumer warpgroup's (global timer, ns; comparable across blocks of
/// one launch; 0 for a point not reached).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefillRoundTrace {
    /// The block (its index in the persistent grid).
    pub block: u32,
    /// The round of the block's walk (0 first).
    pub round: u32,
    /// The work item (row block, request, query head, in the kernel's heaviest-first numbering).
    pub item: u64,
    /// Its key tiles (0: an item past its request's rows or without a visible key).
    pub tiles: u32,
    /// The SM the block ran on.
    pub sm: u32,
    /// Producer: the item decoded.
    pub producer_start_ns: u64,
    /// Producer: Q's copies issued (after waiting for its buffer).
    pub producer_q_ns: u64,
    /// Producer: the first K tile's copies issued.
    pub producer_k0_ns: u64,
    /// Producer: the last V tile's copies issued (and sanitised where a mask bound crosses it).
    pub producer_end_ns: u64,
    /// Consumer warpgroups 0, 1 and 2 (query rows 0-63, 64-127 and 128-191 of the item); the
    /// third is all zero where the kernel has two consumers (head 128, or head 64 in a
    /// two-consumer build).
    pub consumers: [PrefillConsumerMarks; 3],
}

/// The records of the last warp-specialised prefill launch on `ctx`'s device, for its first
/// `blocks` blocks (the launch's persistent grid: one block per SM unless capped, never more than
/// its work items), block by block and round by round, each block's list ending at its last round
/// (the producer marks the round after it), after synchronising the device; `None` when the
/// kernels were built without the trace. A build records the first 64 rounds of the first 160
/// blocks: a launch whose blocks walk more rounds keeps only their first ones.
///
/// # Errors
/// [`KernelError::Cuda`] when the synchronisation or the copy fails (an earlier launch's fault
/// surfaces here), [`KernelError::InvalidArgument`] for more blocks than a build records.
pub fn prefill_trace(ctx: &CudaContext, blocks: usize) -> Result<Option<Vec<PrefillRoundTrace>>, KernelError> {
    const WHAT: &str = "prefill_trace";
    bind_ctx(WHAT, ctx)?;
    let (mut built, mut rounds): (i32, i32) = (0, 0);
    // SAFETY: a null destination with a count of 0 copies nothing; `built` and `rounds` are live
    // locals the function writes one i32 each to. The context is bound to this thread (above).
    let status = unsafe { ffi::pa_prefill_trace_read(std::ptr::null_mut(), 0, &mut built, &mut rounds) };
    status_to_result(WHAT, status)?;
    let records = usize::try_from(built).unwrap_or(0);
    let per_block = usize::try_from(rounds).unwrap_or(0);
    if records == 0 || per_block == 0 {
        return Ok(None);
    }
    if blocks > records / per_block {
        return Err(KernelError::InvalidArgument {
            kernel: WHAT,
            what: format!("{blocks} blocks asked for; this build records {}", records / per_block),
        });
    }
    let mut words = vec![0u64; blocks * per_block * WORDS];
    // `blocks * per_block <= records`, an i32 from the C side.
    let count = (blocks * per_block) as i32;
    // SAFETY: `words` holds `count * WORDS` u64, exactly what the function copies for `count`
    // records; `built` and `rounds` are live locals. The context is bound to this thread.
    let status = unsafe { ffi::pa_prefill_trace_read(words.as_mut_ptr(), count, &mut built, &mut rounds) };
    status_to_result(WHAT, status)?;
    let mut out = Vec::new();
    for (block, rec_block) in words.chunks_exact(WORDS * per_block).enumerate() {
        for (round, w) in rec_block.chunks_exact(WORDS).enumerate() {
            // The producer writes an item id of -1 at the round after the block's last (and a
            // record no launch reached has no start).
            if w[0] == u64::MAX || w[3] == 0 {
                break;
            }
            let cons = |c: usize| {
                let m = &w[CONS + CONS_WORDS * c..CONS + CONS_WORDS * (c + 1)];
                PrefillConsumerMarks {
                    start_ns: m[0],
                    q_ns: m[1],
                    s0_issued_ns: m[2],
                    s0_done_ns: m[3],
                    softmax0_ns: m[4],
                    loop_end_ns: m[5],
                    last_pv_ns: m[6],
                    end_ns: m[7],
                    final_ns: m[8],
                    staged_ns: m[9],
                    stored_ns: m[10],
                }
            };
            out.push(PrefillRoundTrace {
                block: u32::try_from(block).unwrap_or(u32::MAX),
                round: u32::try_from(round).unwrap_or(u32::MAX),
                item: w[0],
                tiles: u32::try_from(w[1]).unwrap_or(u32::MAX),
                sm: u32::try_from(w[2]).unwrap_or(u32::MAX),
                producer_start_ns: w[3],
                producer_q_ns: w[4],
                producer_k0_ns: w[5],
                producer_end_ns: w[6],
                consumers: [cons(0), cons(1), cons(2)],
            });
        }
    }
    Ok(Some(out))
}
