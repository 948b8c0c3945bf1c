//! KV caches that own their storage, so users pass one value instead of loose arrays.

use attention_kernels::CacheElement;
use ndarray::{Array4, ArrayView4, ArrayViewMut4};

use crate::error::{AttentionError, Result};
use crate::layout::CacheLayout;
use crate::scales::{self, KvScaleValues};

/// One layer's key and value caches in host memory, each `[num_blocks, block_size, num_kv_heads,
/// head_size]` ("NHD"), of storage type `T`: a compute type (`f32`, `f16`, `bf16`, stored as is)
/// or an FP8 type ([`crate::Fp8E4M3`], [`crate::Fp8E5M2`]), which is quantised on write and
/// dequantised on read with the cache's [`KvScaleValues`].
///
/// The cache owns its scales: they belong to the stored bytes (a byte means nothing without the
/// scale it was written with), so the owned-cache API cannot pair a cache with the wrong ones.
/// An FP8 cache without scales uses 1.0.
///
/// An FP8 cache works with either compute type:
/// ```
/// use attention_backend::ndarray::Array3;
/// use attention_backend::{bf16, cpu, CacheLayout, CpuKvCache, Fp8E4M3, KvScaleValues, SlotMapping};
/// let layout = CacheLayout::new(1, 16, 1, 64)?;
/// let mut cache = CpuKvCache::<Fp8E4M3>::with_scales(layout, KvScaleValues::per_tensor(0.5, 0.25))?;
/// let k = Array3::<bf16>::from_elem((1, 1, 64), bf16::from_f32(3.0));
/// cpu::kv_cache_update(k.view(), k.view(), &mut cache, &SlotMapping::new(vec![0]))?;
/// assert_eq!(cache.key()[[0, 0, 0, 0]].to_f32(), 6.0); // 3.0 / 0.5
/// assert_eq!(cache.value()[[0, 0, 0, 0]].to_f32(), 12.0); // 3.0 / 0.25
/// # Ok::<(), attention_backend::AttentionError>(())
/// ```
/// but a cache of one compute type with queries of another does not compile:
/// ```compile_fail
/// use attention_backend::ndarray::Array3;
/// use attention_backend::{bf16, cpu, f16, CacheLayout, CpuKvCache, SlotMapping};
/// let layout = CacheLayout::new(1, 16, 1, 64)?;
/// let mut cache = CpuKvCache::<f16>::zeros(layout)?;
/// let k = Array3::<bf16>::from_elem((1, 1, 64), bf16::from_f32(3.0));
/// cpu::kv_cache_update(k.view(), k.view(), &mut cache, &SlotMapping::new(vec![0]))?;
/// # Ok::<(), attention_backend::AttentionError>(())
/// ```
#[derive(Clone, Debug)]
pub struct CpuKvCache<T: CacheElement> {
    layout: CacheLayout,
    key: Array4<T>,
    value: Array4<T>,
    scales: Option<KvScaleValues>,
}

impl<T: CacheElement> CpuKvCache<T> {
    /// A zero-filled cache.
    ///
    /// A layout can be valid (its element count fits `i64`) and still far larger than the host's
    /// memory; the two arrays are allocated fallibly, so that is an error, not a process abort.
    ///
    /// # Errors
    /// [`AttentionError::InvalidArgument`] for an invalid layout; [`AttentionError::AllocationFailed`]
    /// (with the bytes of one array) when the memory cannot be had.
    pub fn zeros(layout: CacheLayout) -> Result<Self> {
        const OP: &str = "CpuKvCache::zeros";
        layout.check()?;
        let n = layout.num_elements().unwrap_or(usize::MAX);
        let key = Array4::from_shape_vec(layout.shape(), zeroed_vec::<T>(OP, "key_cache", n)?);
        let value = Array4::from_shape_vec(layout.shape(), zeroed_vec::<T>(OP, "value_cache", n)?);
        match (key, value) {
            (Ok(key), Ok(value)) => Ok(CpuKvCache { layout, key, value, scales: None }),
            // Unreachable: the vectors have exactly the shape's element count.
            _ => Err(AttentionError::InvalidArgument { op: OP, what: format!("{layout:?} is not an array shape") }),
        }
    }

    /// A cache around existing arrays (their shape gives the layout).
    ///
    /// # Errors
    /// [`AttentionError::ShapeMismatch`] when the two arrays differ in shape.
    pub fn from_arrays(key: Array4<T>, value: Array4<T>) -> Result<Self> {
        if key.shape() != value.shape() {
            return Err(AttentionError::ShapeMismatch {
                op: "CpuKvCache::from_arrays",
                tensor: "value",
                expected: key.shape().to_vec(),
                actual: value.shape().to_vec(),
            });
        }
        let s = key.shape();
        let layout = CacheLayout::new(s[0], s[1], s[2], s[3])?;
        let key = key.as_standard_layout().into_owned();
        let value = value.as_standard_layout().into_owned();
        Ok(CpuKvCache { layout, key, value, scales: None })
    }

    /// A zero-filled FP8 cache with its scales.
    ///
    /// # Errors
    /// As [`CpuKvCache::zeros`]; [`AttentionError::InvalidKvScales`] as [`CpuKvCache::set_scales`].
    pub fn with_scales(layout: CacheLayout, scales: KvScaleValues) -> Result<Self> {
        scales::check_for::<T>("CpuKvCache::with_scales", Some(&scales), layout.num_kv_heads)?;
        let mut cache = CpuKvCache::zeros(layout)?;
        cache.scales = Some(scales);
        Ok(cache)
    }

    /// Replaces the scales (`None`: 1.0). Rows already written keep the bytes they were quantised
    /// to; they are read with the new scales from here on, as in vLLM.
    ///
    /// # Errors
    /// [`AttentionError::InvalidKvScales`] for scales given to an unquantised cache, a count other
    /// than 1 or `num_kv_heads`, or a value that is not finite and positive; the cache keeps its
    /// old scales then.
    pub fn set_scales(&mut self, scales: Option<KvScaleValues>) -> Result<()> {
        scales::check_for::<T>("CpuKvCache::set_scales", scales.as_ref(), self.layout.num_kv_heads)?;
        self.scales = scales;
        Ok(())
    }

    /// The scales (`None` for an unquantised cache, or an FP8 one read with 1.0).
    pub fn scales(&self) -> Option<&KvScaleValues> {
        self.scales.as_ref()
    }

    /// Both caches mutably and the scales, for the write path.
    pub(crate) fn parts_mut(&mut self) -> (ArrayViewMut4<'_, T>, ArrayViewMut4<'_, T>, Option<&KvScaleValues>) {
        (self.key.view_mut(), self.value.view_mut(), self.scales.as_ref())
    }

    /// The cache's dimensions.
    pub fn layout(&self) -> &CacheLayout {
        &self.layout
    }

    /// The key cache.
    pub fn key(&self) -> ArrayView4<'_, T> {
        self.key.view()
    }

    /// The value cache.
    pub fn value(&self) -> ArrayView4<'_, T> {
        self.value.view()
    }

    /// Both caches, mutably (for tests and for filling a cache by hand).
    pub fn key_value_mut(&mut self) -> (ArrayViewMut4<'_, T>, ArrayViewMut4<'_, T>) {
        (self.key.view_mut(), self.value.view_mut())
    }

    /// Takes the arrays back.
    pub fn into_arrays(self) -> (Array4<T>, Array4<T>) {
        (self.key, self.value)
    }
}

/// `len` default (zero) elements, allocated fallibly: sizes come from users, and an allocation
/// failure must come back as [`AttentionError::AllocationFailed`] rather than abort the process.
/// Also refuses more than `isize::MAX` bytes (what a `Vec` or an ndarray can hold) up front.
///
/// # Errors
/// [`AttentionError::AllocationFailed`] naming `tensor` and the bytes asked for.
pub(crate) fn zeroed_vec<T: CacheElement>(op: &'static str, tensor: &'static str, len: usize) -> Result<Vec<T>> {
    let bytes = len as u128 * std::mem::size_of::<T>() as u128;
    let failed = || AttentionError::AllocationFailed { op, tensor, bytes };
    if bytes > isize::MAX as u128 {
        return Err(failed());
    }
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| failed())?;
    v.resize(len, T::default());
    Ok(v)
}
