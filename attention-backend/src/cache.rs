//! KV caches that own their storage, so users pass one value instead of loose arrays.

use attention_kernels::Element;
use ndarray::{Array4, ArrayView4, ArrayViewMut4};

use crate::error::{AttentionError, Result};
use crate::layout::CacheLayout;

/// One layer's key and value caches in host memory, each `[num_blocks, block_size, num_kv_heads,
/// head_size]` ("NHD"), of element type `T`.
#[derive(Clone, Debug)]
pub struct CpuKvCache<T: Element> {
    layout: CacheLayout,
    key: Array4<T>,
    value: Array4<T>,
}

impl<T: Element> CpuKvCache<T> {
    /// A zero-filled cache.
    ///
    /// # Errors
    /// [`AttentionError::InvalidArgument`] for an invalid layout.
    pub fn zeros(layout: CacheLayout) -> Result<Self> {
        layout.check()?;
        Ok(CpuKvCache { layout, key: Array4::default(layout.shape()), value: Array4::default(layout.shape()) })
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
        Ok(CpuKvCache { layout, key, value })
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
