//! A device and the stream all work is enqueued on.

use std::sync::Arc;

use attention_kernels::device;
use cudarc::driver::{CudaContext, CudaStream};

use super::kernel_error;
use crate::error::Result;

/// One CUDA device with a stream of its own.
///
/// All backend work for this device is issued on [`CudaDevice::stream`], in order, so a caller
/// that owns the stream owns the ordering; nothing synchronises except explicit downloads.
#[derive(Clone, Debug)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl CudaDevice {
    /// Opens device `ordinal` (after `CUDA_VISIBLE_DEVICES`) and works on its default stream.
    ///
    /// The default stream keeps cudarc in single-stream mode, where it records no events around
    /// each buffer use; that bookkeeping costs microseconds per launch, as much as a whole decode
    /// step's KV write. Engines with their own streams use [`CudaDevice::from_stream`].
    ///
    /// # Errors
    /// [`crate::AttentionError::NoCudaDevice`] on a machine without a driver or device;
    /// [`crate::AttentionError::Cuda`] when the driver fails.
    pub fn new(ordinal: usize) -> Result<Self> {
        let ctx = device::open(ordinal).map_err(|e| kernel_error("CudaDevice::new", e))?;
        let stream = ctx.default_stream();
        Ok(CudaDevice { ctx, stream })
    }

    /// Works on a stream the caller already has (its context comes with it).
    pub fn from_stream(stream: Arc<CudaStream>) -> Self {
        CudaDevice { ctx: stream.context().clone(), stream }
    }

    /// A handle on a new stream of the same device that CUDA graphs can capture: capture needs a
    /// stream other than the legacy default one, and cudarc's cross-stream event tracking is
    /// switched off for the context (inside a capture its waits would fail), so the caller orders
    /// its own streams, as engines that capture graphs do. See
    /// `attention_kernels::graph::capture_stream`.
    ///
    /// # Errors
    /// [`crate::AttentionError::Cuda`] when the stream cannot be created.
    pub fn capture_stream(&self) -> Result<Self> {
        let stream =
            attention_kernels::graph::capture_stream(&self.ctx).map_err(|e| kernel_error("capture_stream", e))?;
        Ok(CudaDevice::from_stream(stream))
    }

    /// Visible CUDA devices (0 without a driver).
    pub fn count() -> usize {
        device::device_count()
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream all backend work is enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown CUDA device".into())
    }

    /// Blocks until all work on the stream is done.
    ///
    /// # Errors
    /// [`crate::AttentionError::Cuda`] carrying the first asynchronous error of the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| super::driver_error("synchronize", e))
    }
}
