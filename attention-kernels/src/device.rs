//! Finding a CUDA device without panicking on machines that have none.
//!
//! cudarc loads `libcuda` lazily and panics when it is missing, so every path that may run on a
//! CPU-only machine asks [`driver_available`] first.

use std::sync::Arc;

use cudarc::driver::CudaContext;

use crate::KernelError;

/// True when the CUDA driver library can be loaded on this machine.
pub fn driver_available() -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen the driver library by its usual names and
    // drops the handle; it touches no CUDA state and has no preconditions.
    unsafe { cudarc::driver::sys::is_culib_present() }
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
