//! Per-step metadata: prepared once per step, shared by every layer.

use std::sync::OnceLock;

use super::{Backend, Inner};
use crate::error::Result;
use crate::layout::CacheLayout;
use crate::metadata::AttentionMetadata;
use crate::slot_mapping::SlotMapping;
use crate::tensor::Device;

/// A step's slot mapping, ready for [`Backend::kv_cache_update`] on the backend that made it (on
/// CUDA it holds the uploaded `i64` copy as well).
#[derive(Debug)]
pub struct StepSlotMapping {
    pub(super) host: SlotMapping,
    pub(super) device: Device,
    #[cfg(feature = "cuda")]
    pub(super) on_device: Option<crate::cuda::DeviceSlotMapping>,
}

impl StepSlotMapping {
    /// The host slot mapping.
    pub fn host(&self) -> &SlotMapping {
        &self.host
    }

    /// The device it was prepared for.
    pub fn device(&self) -> Device {
        self.device
    }
}

/// One step's attention metadata, prepared once by [`Backend::prepare_step`] and shared by every
/// layer of the step: the host [`AttentionMetadata`] and, on CUDA, its device copy
/// (`cuda::DeviceMetadata`, slot mapping included).
///
/// The step contract ([`AttentionMetadata::check_against`]) depends on the cache layout, which
/// the step learns from its first layer: the first call checks it and remembers the layout, and
/// later calls with caches of that layout do not check it again (the metadata cannot change
/// after [`Backend::prepare_step`]). A cache of another layout is checked on every call.
#[derive(Debug)]
pub struct StepMetadata {
    pub(super) meta: AttentionMetadata,
    pub(super) device: Device,
    #[cfg(feature = "cuda")]
    pub(super) on_device: Option<crate::cuda::DeviceMetadata>,
    /// The layout the step contract has been checked against, once it has.
    pub(super) checked: OnceLock<CacheLayout>,
}

impl StepMetadata {
    /// The host metadata.
    pub fn host(&self) -> &AttentionMetadata {
        &self.meta
    }

    /// The device it was prepared for.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The device copy, `None` on the CPU.
    #[cfg(feature = "cuda")]
    pub fn cuda(&self) -> Option<&crate::cuda::DeviceMetadata> {
        self.on_device.as_ref()
    }

    /// The step contract against caches of `layout`, checked once per layout the step meets
    /// first (see [`StepMetadata`]).
    pub(super) fn check_contract(&self, op: &'static str, layout: &CacheLayout) -> Result<()> {
        if self.checked.get() == Some(layout) {
            return Ok(());
        }
        self.meta.check_against(op, layout)?;
        // Another thread may have set it first, for this or another layout: either is correct.
        let _ = self.checked.set(*layout);
        Ok(())
    }
}

mod sealed {
    use crate::error::Result;
    use crate::layout::CacheLayout;

    /// Seals [`super::SlotSource`], and holds what only this crate may call on it.
    pub trait Sealed {
        /// Checks the slots for a write into a cache of `layout`: a plain slot mapping must
        /// stay inside the cache; a step's slot mapping must obey the whole step contract.
        fn check_slots(&self, op: &'static str, layout: &CacheLayout) -> Result<()>;
    }
    impl Sealed for super::StepSlotMapping {
        fn check_slots(&self, op: &'static str, layout: &CacheLayout) -> Result<()> {
            self.host.check_within(op, layout.num_slots())
        }
    }
    impl Sealed for super::StepMetadata {
        fn check_slots(&self, op: &'static str, layout: &CacheLayout) -> Result<()> {
            self.check_contract(op, layout)
        }
    }
}

/// Where [`Backend::kv_cache_update`] finds the slot mapping: a [`StepSlotMapping`] of its own, or
/// the one inside a [`StepMetadata`] (no second upload). Sealed.
///
/// A [`StepSlotMapping`] is only checked to stay inside the cache; a [`StepMetadata`]'s slots are
/// held to the whole step contract (once per step and cache layout), since they claim to be the
/// step's.
pub trait SlotSource: sealed::Sealed {
    /// The host slot mapping.
    fn host_slots(&self) -> &SlotMapping;
    /// The device it was prepared for.
    fn slots_device(&self) -> Device;
    /// The device copy, `None` on the CPU.
    #[cfg(feature = "cuda")]
    fn cuda_slots(&self) -> Option<&crate::cuda::DeviceSlotMapping>;
}

impl SlotSource for StepSlotMapping {
    fn host_slots(&self) -> &SlotMapping {
        &self.host
    }
    fn slots_device(&self) -> Device {
        self.device
    }
    #[cfg(feature = "cuda")]
    fn cuda_slots(&self) -> Option<&crate::cuda::DeviceSlotMapping> {
        self.on_device.as_ref()
    }
}

impl SlotSource for StepMetadata {
    fn host_slots(&self) -> &SlotMapping {
        &self.meta.slot_mapping
    }
    fn slots_device(&self) -> Device {
        self.device
    }
    #[cfg(feature = "cuda")]
    fn cuda_slots(&self) -> Option<&crate::cuda::DeviceSlotMapping> {
        self.on_device.as_ref().map(|m| m.slot_mapping())
    }
}

impl Backend {
    /// Prepares a slot mapping for [`Backend::kv_cache_update`] (uploads it on CUDA).
    ///
    /// # Errors
    /// [`AttentionError::Cuda`](crate::AttentionError::Cuda) when the upload fails.
    pub fn slot_mapping(&self, slots: SlotMapping) -> Result<StepSlotMapping> {
        match &self.inner {
            Inner::Cpu => Ok(StepSlotMapping {
                host: slots,
                device: Device::Cpu,
                #[cfg(feature = "cuda")]
                on_device: None,
            }),
            #[cfg(feature = "cuda")]
            Inner::Cuda { dev, .. } => {
                let on_device = Some(crate::cuda::DeviceSlotMapping::upload(dev, &slots)?);
                Ok(StepSlotMapping { host: slots, device: Device::Cuda, on_device })
            }
        }
    }

    /// Prepares one step's metadata for all its layers: checks it ([`AttentionMetadata::check`])
    /// and, on CUDA, uploads it once.
    ///
    /// # Errors
    /// [`AttentionError::InvalidMetadata`](crate::AttentionError::InvalidMetadata) for inconsistent metadata; [`AttentionError::Cuda`](crate::AttentionError::Cuda) when
    /// the upload fails.
    pub fn prepare_step(&self, meta: AttentionMetadata) -> Result<StepMetadata> {
        match &self.inner {
            Inner::Cpu => {
                meta.check()?;
                Ok(StepMetadata {
                    meta,
                    device: Device::Cpu,
                    #[cfg(feature = "cuda")]
                    on_device: None,
                    checked: OnceLock::new(),
                })
            }
            #[cfg(feature = "cuda")]
            Inner::Cuda { dev, .. } => {
                let on_device = Some(crate::cuda::DeviceMetadata::upload(dev, &meta)?);
                Ok(StepMetadata { meta, device: Device::Cuda, on_device, checked: OnceLock::new() })
            }
        }
    }
}
