//! A second stream beside the caller's, for the decode and prefill parts of a mixed batch to run
//! at once: [`SideStream`] forks from the caller's stream, [`Overlap`] launches on it and joins
//! back.

use std::ffi::c_void;
use std::ptr;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};

use super::{decode_variant, invalid, launch, AttentionBuffers, AttentionDims, AttentionFeatures, AttentionKernel};
use crate::launch::{bind_ctx, status_to_result};
use crate::{ffi, Element, KernelError, KvStorage};

/// A second stream of a context, to run the decode and the prefill part of a mixed batch side by
/// side: decode is bound by memory bandwidth, prefill by the tensor cores, and back to back each
/// leaves the other's resource idle. Create one per stream that launches mixed batches and keep
/// it: creation allocates a stream and two events.
#[derive(Debug)]
pub struct SideStream {
    /// The C side's handle (stream and events); the launcher passes it to the fork.
    pub(super) raw: *mut c_void,
    ctx: Arc<CudaContext>,
}

// SAFETY: the handle owns a stream and two events of `ctx`; CUDA streams and events may be used
// from any thread once the context is bound there (every method binds it first).
unsafe impl Send for SideStream {}
// SAFETY: as above; the methods only enqueue work, which the runtime serialises.
unsafe impl Sync for SideStream {}

impl SideStream {
    /// A side stream on `ctx`.
    ///
    /// # Errors
    /// [`KernelError::Cuda`] when the context cannot be bound or the stream or events cannot be
    /// created.
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self, KernelError> {
        bind_ctx("SideStream::new", ctx)?;
        let mut raw = ptr::null_mut();
        // SAFETY: `raw` is a live local the function writes one pointer to; the context is bound.
        let status = unsafe { ffi::pa_side_stream_create(&mut raw) };
        status_to_result("SideStream::new", status)?;
        Ok(SideStream { raw, ctx: ctx.clone() })
    }

    /// Starts an overlap on `stream`: work then launched through [`Overlap::launch`] runs on the
    /// side stream after everything queued on `stream` so far, beside what is launched on `stream`
    /// itself, until [`Overlap::join`] (or dropping the [`Overlap`]) makes `stream` wait for it.
    ///
    /// `None` when cudarc manages cross-stream synchronisation on this context (event tracking
    /// with several streams): its per-buffer events would be recorded on `stream` before the side
    /// work joins it, so the caller launches sequentially instead.
    ///
    /// # Errors
    /// [`KernelError::InvalidArgument`] for a stream of another context; [`KernelError::Cuda`] when
    /// the fork fails.
    pub fn fork<'a>(&'a self, stream: &'a CudaStream) -> Result<Option<Overlap<'a>>, KernelError> {
        if !Arc::ptr_eq(stream.context(), &self.ctx) {
            return Err(invalid("SideStream::fork", "the stream belongs to another context".into()));
        }
        if self.ctx.is_managing_stream_synchronization() {
            return Ok(None);
        }
        bind_ctx("SideStream::fork", &self.ctx)?;
        // SAFETY: `raw` is this object's live handle; the stream is alive (borrowed) and on the
        // handle's context, which is bound.
        let status = unsafe { ffi::pa_side_stream_fork(self.raw, stream.cu_stream() as *mut c_void) };
        status_to_result("SideStream::fork", status)?;
        Ok(Some(Overlap { side: self, stream, joined: false }))
    }
}

impl Drop for SideStream {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `raw` came from `pa_side_stream_create` and is destroyed once, here, with
            // its context bound.
            unsafe { ffi::pa_side_stream_destroy(self.raw) };
        }
    }
}

/// An overlap in progress (see [`SideStream::fork`]); joins `stream` to the side stream when
/// dropped, so an early return cannot leave the side work unordered.
#[derive(Debug)]
pub struct Overlap<'a> {
    side: &'a SideStream,
    stream: &'a CudaStream,
    joined: bool,
}

impl Overlap<'_> {
    /// [`paged_attention`](super::paged_attention) on the side stream. The buffers are borrowed
    /// views on `stream`'s context, checked as there.
    ///
    /// # Errors
    /// As [`paged_attention`](super::paged_attention).
    pub fn launch<T: Element, C: KvStorage<T>>(
        &self,
        kernel: AttentionKernel,
        dims: &AttentionDims,
        features: &AttentionFeatures<'_>,
        bufs: AttentionBuffers<'_, T, C>,
    ) -> Result<(), KernelError> {
        launch(self.stream, Some(self.side), kernel, decode_variant()?, dims, features, bufs)
    }

    /// Makes `stream` wait for the side work.
    ///
    /// # Errors
    /// [`KernelError::Cuda`] when the join fails.
    pub fn join(mut self) -> Result<(), KernelError> {
        self.joined = true;
        self.join_now()
    }

    fn join_now(&self) -> Result<(), KernelError> {
        bind_ctx("Overlap::join", &self.side.ctx)?;
        // SAFETY: as in `fork`: live handle and stream of the bound context.
        let status = unsafe { ffi::pa_side_stream_join(self.side.raw, self.stream.cu_stream() as *mut c_void) };
        status_to_result("Overlap::join", status)
    }
}

impl Drop for Overlap<'_> {
    fn drop(&mut self) {
        if !self.joined {
            // Best effort on an early return; `join` reports the error on the normal path.
            let _ = self.join_now();
        }
    }
}
