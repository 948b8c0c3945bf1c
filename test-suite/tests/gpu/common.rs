//! Shared set-up for the GPU tests.

use std::sync::{Arc, OnceLock};

use attention_backend::cuda::CudaDevice;
use attention_kernels::cudarc::driver::CudaStream;

/// The device every GPU test runs on. Panics (failing the test) when none is visible.
pub fn device() -> &'static CudaDevice {
    static DEVICE: OnceLock<CudaDevice> = OnceLock::new();
    DEVICE.get_or_init(|| match CudaDevice::new(0) {
        Ok(dev) => dev,
        Err(e) => panic!("GPU test needs a CUDA device and found none: {e}"),
    })
}

/// The stream of [`device`], for tests that drive the kernels' launchers directly.
pub fn stream() -> Arc<CudaStream> {
    device().stream().clone()
}
