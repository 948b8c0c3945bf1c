//! The element types a KV cache and the attention kernels store.

use std::fmt;

use crate::fp8::{Fp8E4M3, Fp8E5M2};

/// Storage type of a tensor: what the kernels are compiled for.
///
/// Attention accumulates in `f32` whatever the storage type; `F32` storage exists for the CPU
/// reference and for the KV-cache write. The two FP8 types are KV-cache storage only
/// ([`CacheElement`]), never a compute type ([`Element`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16 (`half::f16`).
    F16,
    /// bfloat16 (`half::bf16`).
    BF16,
    /// OCP FP8 E4M3 ([`Fp8E4M3`]), a KV-cache storage type.
    Fp8E4M3,
    /// OCP FP8 E5M2 ([`Fp8E5M2`]), a KV-cache storage type.
    Fp8E5M2,
}

impl DType {
    /// Bytes per element.
    pub const fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Fp8E4M3 | DType::Fp8E5M2 => 1,
        }
    }

    /// Whether this is one of the FP8 storage types (scaled on write, dequantised on read).
    pub const fn is_fp8(self) -> bool {
        matches!(self, DType::Fp8E4M3 | DType::Fp8E5M2)
    }

    /// Lower-case name as used on command lines (`f32`, `f16`, `bf16`, `fp8_e4m3`, `fp8_e5m2`).
    pub const fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Fp8E4M3 => "fp8_e4m3",
            DType::Fp8E5M2 => "fp8_e5m2",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "fp8_e4m3" | "fp8" | "e4m3" | "float8_e4m3fn" => Ok(DType::Fp8E4M3),
            "fp8_e5m2" | "e5m2" | "float8_e5m2" => Ok(DType::Fp8E5M2),
            other => Err(format!("unknown dtype `{other}` (expected f32, f16, bf16, fp8_e4m3 or fp8_e5m2)")),
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    pub trait SealedCache {}
    impl<T: Sealed> SealedCache for T {}
    impl SealedCache for crate::fp8::Fp8E4M3 {}
    impl SealedCache for crate::fp8::Fp8E5M2 {}
}

/// A scalar type the kernels and the CPU reference store: `f32`, `half::f16` or `half::bf16`.
///
/// Sealed: the CUDA launchers rely on the size and layout of exactly these three types.
pub trait Element:
    sealed::Sealed + Copy + Default + Send + Sync + PartialEq + fmt::Debug + 'static + DeviceElement
{
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Widens to `f32` (exact for all three types).
    fn to_f32(self) -> f32;
    /// Rounds from `f32` to nearest-even.
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

/// A type a KV cache can store: the three [`Element`] types and the two FP8 formats.
///
/// Sealed: the kernels are compiled for exactly these. Which cache types go with which compute
/// type is [`KvStorage`].
pub trait CacheElement:
    sealed::SealedCache + Copy + Default + Send + Sync + PartialEq + fmt::Debug + 'static + DeviceElement
{
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// The stored value, exactly (for FP8 the raw value before the cache's scale is applied).
    fn to_f32(self) -> f32;
    /// Rounds from `f32` to nearest-even; the FP8 types saturate to their finite range (see
    /// [`crate::fp8`]).
    fn from_f32(x: f32) -> Self;
}

impl<T: Element> CacheElement for T {
    const DTYPE: DType = <T as Element>::DTYPE;
    fn to_f32(self) -> f32 {
        Element::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        Element::from_f32(x)
    }
}

impl CacheElement for Fp8E4M3 {
    const DTYPE: DType = DType::Fp8E4M3;
    fn to_f32(self) -> f32 {
        Fp8E4M3::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        Fp8E4M3::from_f32(x)
    }
}

impl CacheElement for Fp8E5M2 {
    const DTYPE: DType = DType::Fp8E5M2;
    fn to_f32(self) -> f32 {
        Fp8E5M2::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        Fp8E5M2::from_f32(x)
    }
}

/// The cache storage types that go with compute type `T`: `T` itself (unscaled, as before) and the
/// two FP8 formats (written as `fp8(x / scale)`, read as `stored * scale`, vLLM's semantics).
///
/// A cache of another type (an `f16` cache with `bf16` queries) does not satisfy the bound, so the
/// mix-up is a compile error rather than a run-time check.
pub trait KvStorage<T: Element>: CacheElement {
    /// Whether values are scaled on write and read (the FP8 types).
    const QUANTISED: bool;
}

impl<T: Element> KvStorage<T> for T {
    const QUANTISED: bool = false;
}

impl<T: Element> KvStorage<T> for Fp8E4M3 {
    const QUANTISED: bool = true;
}

impl<T: Element> KvStorage<T> for Fp8E5M2 {
    const QUANTISED: bool = true;
}

/// With the `cuda` feature, what cudarc needs to put an [`Element`] in device memory.
#[cfg(feature = "cuda")]
pub trait DeviceElement: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits {}
#[cfg(feature = "cuda")]
impl<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits> DeviceElement for T {}

/// Without the `cuda` feature, no extra bound.
#[cfg(not(feature = "cuda"))]
pub trait DeviceElement {}
#[cfg(not(feature = "cuda"))]
impl<T> DeviceElement for T {}
