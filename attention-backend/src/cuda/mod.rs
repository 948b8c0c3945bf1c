//! The CUDA backend: device buffers from cudarc, kernels from `attention-kernels`, everything
//! enqueued on one stream without host synchronisation.

mod attention;
mod cache_write;
mod device;
mod metadata;
mod tensor;

pub use attention::{forward, paged_attention, AttentionWorkspace};
pub use cache_write::kv_cache_update;
pub use device::CudaDevice;
pub use metadata::{DeviceMetadata, SplitPlan};
pub use tensor::{CudaKvCache, DeviceSlotMapping, DeviceTensor};

pub use attention_kernels::cudarc;

use crate::error::AttentionError;

pub(crate) fn driver_error(op: &'static str, e: cudarc::driver::DriverError) -> AttentionError {
    AttentionError::Cuda { op, message: format!("{e:?}") }
}

pub(crate) fn kernel_error(op: &'static str, e: attention_kernels::KernelError) -> AttentionError {
    match e {
        attention_kernels::KernelError::NoDevice { reason } => AttentionError::NoCudaDevice { reason },
        other => AttentionError::Cuda { op, message: other.to_string() },
    }
}
