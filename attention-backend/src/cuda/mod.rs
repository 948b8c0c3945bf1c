//! The CUDA backend: device buffers from cudarc, kernels from `attention-kernels`, everything
//! enqueued on one stream without host synchronisation.

pub(crate) mod attention;
mod cache_write;
mod device;
mod metadata;
mod plan;
mod tensor;

pub use attention::{forward, paged_attention, AttentionIo, AttentionWorkspace, ForwardIo};
pub use cache_write::kv_cache_update;
pub use device::CudaDevice;
pub use metadata::{
    decode_saturation_bytes, decode_slots_per_sm, decode_split_count, decode_variant_slots, device_saturation_bytes,
    DeviceMetadata, SplitPlan, DECODE_LOAD_LATENCY_S, DECODE_SATURATION_BYTES, DECODE_TAIL_WAVES, SPLIT_MERGE_KEYS,
};
pub use plan::{
    LaunchPlan, LayerBuffers, LayerStrides, PlanOptions, PlannerConfig, StepPlan, StepPlanner, BATCH_INVARIANT_ENV,
};
pub use tensor::{CudaKvCache, DeviceSlotMapping, DeviceTensor};

pub use crate::partition::{MixedPartition, MIXED_PARTITION_ENV};

pub use attention_kernels::cudarc;
/// The layer caches [`LayerBuffers`] takes: two buffers, or one interleaving K and V per block.
pub use attention_kernels::launch::KvCacheMut;
/// Device views of an FP8 cache's scales, as [`LayerBuffers::kv_scales`] takes them.
pub use attention_kernels::launch::KvScales;

use crate::error::{AttentionError, CudaApi};

pub(crate) fn driver_error(op: &'static str, e: cudarc::driver::DriverError) -> AttentionError {
    let message = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{e:?}"));
    AttentionError::Cuda { op, api: CudaApi::Driver, code: e.0 as i32, message }
}

/// A launcher's error in the backend's terms: size and argument refusals stay what they are
/// (`InvalidArgument`, since the backend's own checks should have caught them first), CUDA statuses
/// keep their code.
pub(crate) fn kernel_error(op: &'static str, e: attention_kernels::KernelError) -> AttentionError {
    use attention_kernels::KernelError;
    match e {
        KernelError::NoDevice { reason } => AttentionError::NoCudaDevice { reason },
        KernelError::Cuda { code, ref message, .. } => {
            AttentionError::Cuda { op, api: CudaApi::Runtime, code, message: message.clone() }
        }
        other => AttentionError::InvalidArgument { op, what: other.to_string() },
    }
}
