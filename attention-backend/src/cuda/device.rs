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
    /// Opens device `ordinal` (after `CUDA_VISIBLE_DEVICES`) and creates a stream on it.
    ///
    /// # Errors
    /// [`crate::AttentionError::NoCudaDevice`] on a machine without a driver or device;
    /// [`crate::AttentionError::Cuda`] when the driver fails.
    pub fn new(ordinal: usize) -> Result<Self> {
        let ctx = device::open(ordinal).map_err(|e| kernel_error("CudaDevice::new", e))?;
        let stream = ctx.new_stream().map_err(|e| super::driver_error("CudaDevice::new", e))?;
        Ok(CudaDevice { ctx, stream })
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
