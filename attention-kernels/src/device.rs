//! Finding a CUDA device without panicking on machines that have none.
//!
//! cudarc loads `libcuda` lazily and panics when it is missing, so every path that may run on a
//! CPU-only machine asks [`driver_available`] first.

use std::sync::Arc;

use cudarc::driver::CudaContext;

use crate::KernelError;

/// The file names the CUDA driver library goes by (Linux, then Windows).
const DRIVER_LIBRARIES: [&str; 3] = ["libcuda.so.1", "libcuda.so", "nvcuda.dll"];

/// True when the CUDA driver library can be loaded on this machine.
///
/// Probed here rather than through cudarc, whose own probe exists only when cudarc loads CUDA at
/// run time: a binary that links CUDA (candle's choice) must see the same answer (there the
/// library is already loaded, so the probe finds it).
pub fn driver_available() -> bool {
    DRIVER_LIBRARIES.iter().any(|name| {
        // SAFETY: loading the driver library runs only its own initialisers, which take no
        // arguments and touch no state of this process; the handle is dropped at once (the
        // library stays loaded while cudarc or the binary's link holds it).
        unsafe { libloading::Library::new(*name) }.is_ok()
    })
}

/// Number of visible CUDA devices (honours `CUDA_VISIBLE_DEVICES`), 0 without a driver.
pub fn device_count() -> usize {
    if !driver_available() {
        return 0;
    }
    CudaContext::device_count().map(|n| n.max(0) as usize).unwrap_or(0)
}

/// Opens (retains the primary context of) device `ordinal`.
///
/// # Errors
/// [`KernelError::NoDevice`] when no driver is installed or the ordinal is not visible;
/// [`KernelError::Cuda`] when the driver fails.
pub fn open(ordinal: usize) -> Result<Arc<CudaContext>, KernelError> {
    if !driver_available() {
        return Err(KernelError::NoDevice { reason: "the CUDA driver library (libcuda.so) is not installed".into() });
    }
    let count = device_count();
    if ordinal >= count {
        return Err(KernelError::NoDevice {
            reason: format!(
                "device {ordinal} requested, {count} visible (CUDA_VISIBLE_DEVICES={})",
                std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "<unset>".into())
            ),
        });
    }
    CudaContext::new(ordinal).map_err(|e| KernelError::Cuda {
        kernel: "open_device",
        code: e.0 as i32,
        message: format!("{e:?}"),
    })
}
