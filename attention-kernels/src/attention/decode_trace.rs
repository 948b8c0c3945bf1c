//! The decode kernel's per-block timeline, a diagnostic: in a build with `PAGED_ATTN_DECODE_TRACE`
//! set (at build time; off in every normal build, whose kernels carry no trace code), thread 0 of
//! each decode block records the global timer at a few points of its life and the SM it ran on.
//! A launch lasts as long as its slowest block, and neither a profiler's averages nor a bench's
//! totals say what that block was doing: the record shows the start chain, the stream, the
//! spread between SMs and the folded merge at the end (docs/PERFORMANCE.md, twentieth session).

use cudarc::driver::CudaContext;

use crate::launch::{bind_ctx, status_to_result};
use crate::{ffi, KernelError};

/// Words per block record on the C side (`TraceMark::kTraceWords`).
const WORDS: usize = 8;

/// One decode block's record of the last decode launch: global-timer readings in nanoseconds
/// (comparable across blocks of one launch; 0 for a point the block did not reach, as a block
/// with no key to read never reaches its first tile) and the SM it ran on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeBlockTrace {
    /// Block entry.
    pub start_ns: u64,
    /// The prologue done (metadata, query rows, the first tiles' row offsets) and the first
    /// tiles' copies issued.
    pub issued_ns: u64,
    /// The first key tile landed in shared memory.
    pub first_tile_ns: u64,
    /// Every key tile computed.
    pub loop_end_ns: u64,
    /// The output rows, or the split's partial, written.
    pub written_ns: u64,
    /// The folded merge of the block's group done: only in the group's last block to finish.
    pub merged_ns: u64,
    /// The block's arrival at its group's counter counted: blocks of a split, folded launch only.
    pub arrived_ns: u64,
    /// The SM the block ran on.
    pub sm: u32,
}

/// The per-block records of the last decode launch on `ctx`'s device, `blocks` of them in grid
/// order (block `x + z * grid_x`: every (request, kv head, row chunk) block of split 0, then of
/// split 1, ...), after synchronising the device (for `blocks > 0`); `None` when the kernels were built without the
/// trace. Records past the last launch's grid hold older launches' values; a build records at
/// most 16384 blocks.
///
/// # Errors
/// [`KernelError::Cuda`] when the synchronisation or the copy fails (an earlier launch's fault
/// surfaces here), [`KernelError::InvalidArgument`] for more blocks than a build records.
pub fn decode_trace(ctx: &CudaContext, blocks: usize) -> Result<Option<Vec<DecodeBlockTrace>>, KernelError> {
    const WHAT: &str = "decode_trace";
    bind_ctx(WHAT, ctx)?;
    let mut built: i32 = 0;
    // SAFETY: a null destination with a count of 0 copies nothing; `built` is a live local the
    // function writes one i32 to. The context is bound to this thread (above).
    let status = unsafe { ffi::pa_decode_trace_read(std::ptr::null_mut(), 0, &mut built) };
    status_to_result(WHAT, status)?;
    let built_blocks = usize::try_from(built).unwrap_or(0);
    if built_blocks == 0 {
        return Ok(None);
    }
    if blocks > built_blocks {
        return Err(KernelError::InvalidArgument {
            kernel: WHAT,
            what: format!("{blocks} blocks asked for; this build records {built_blocks}"),
        });
    }
    let mut words = vec![0u64; blocks * WORDS];
    // `blocks <= built_blocks`, which the C side sets to 16384: it fits an i32.
    let count = blocks as i32;
    // SAFETY: `words` holds `blocks * WORDS` u64, exactly what the function copies for `count`
    // blocks; `built` is a live local. The context is bound to this thread.
    let status = unsafe { ffi::pa_decode_trace_read(words.as_mut_ptr(), count, &mut built) };
    status_to_result(WHAT, status)?;
    Ok(Some(
        words
            .chunks_exact(WORDS)
            .map(|w| DecodeBlockTrace {
                start_ns: w[0],
                issued_ns: w[1],
                first_tile_ns: w[2],
                loop_end_ns: w[3],
                written_ns: w[4],
                merged_ns: w[5],
                arrived_ns: w[6],
                sm: u32::try_from(w[7]).unwrap_or(u32::MAX),
            })
            .collect(),
    ))
}
