//! Streams that CUDA graphs can capture.
//!
//! Capture needs a stream other than the legacy default stream, and it refuses to wait on events
//! recorded outside the capture. cudarc, once a context has a second stream, records and waits on
//! an event around every buffer use so that its streams stay ordered; inside a capture those waits
//! fail. Engines that capture (vLLM, candle's CUDA backend) order their streams themselves instead.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};

use crate::KernelError;

/// A new stream on `ctx` for work that will be captured into CUDA graphs, with cudarc's per-buffer
/// event tracking switched off for the whole context.
///
/// After this call cudarc no longer orders work between streams of `ctx`: the caller must (with
/// events or by using one stream, as engines that capture graphs do). Buffers allocated before the
/// call keep working; their pending events are no longer waited for.
///
/// # Errors
/// [`KernelError::Cuda`] with the driver's status when the stream cannot be created.
pub fn capture_stream(ctx: &Arc<CudaContext>) -> Result<Arc<CudaStream>, KernelError> {
    // SAFETY: turning tracking off only removes cudarc's automatic cross-stream waits; it cannot
    // make any memory access invalid by itself. The function's contract hands the ordering of
    // streams to the caller, which is documented above.
    unsafe { ctx.disable_event_tracking() };
    ctx.new_stream().map_err(|e| KernelError::Cuda {
        kernel: "capture_stream",
        code: e.0 as i32,
        message: format!("{e:?}"),
    })
}
