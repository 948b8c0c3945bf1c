//! The scales of an FP8 KV cache, held on the host.
//!
//! An FP8 cache stores `C::from_f32(x.to_f32() / scale)` (round to nearest even, saturating to
//! the format's finite range, NaN to the format's NaN) and is read back as
//! `stored.to_f32() * scale`: vLLM's `k_scale` / `v_scale` semantics. There is one key scale and
//! one value scale per layer, or one of each per KV head. Unquantised caches (f32, f16, bf16) store
//! values as they are and take no scales.

use attention_kernels::CacheElement;

use crate::error::{AttentionError, Result};

/// One layer's FP8 dequantisation scales, on the host: `key` and `value` each hold 1 entry (per
/// layer) or `num_kv_heads` entries (per KV head), the same count for both (the kernels take one
/// layout for the pair). Every entry must be finite and positive ([`KvScaleValues::check`]): an
/// owned cache checks its scales when it takes them (`with_scales` / `set_scales`, and its layout
/// never changes, so they stay valid), a plan's `run` checks the borrowed ones on every call.
#[derive(Clone, Debug, PartialEq)]
pub struct KvScaleValues {
    key: Vec<f32>,
    value: Vec<f32>,
}

impl KvScaleValues {
    /// One key scale and one value scale for the whole layer.
    pub fn per_tensor(key: f32, value: f32) -> Self {
        KvScaleValues { key: vec![key], value: vec![value] }
    }

    /// One key scale and one value scale per KV head (`num_kv_heads` each).
    pub fn per_head(key: Vec<f32>, value: Vec<f32>) -> Self {
        KvScaleValues { key, value }
    }

    /// The key scale(s).
    pub fn key(&self) -> &[f32] {
        &self.key
    }

    /// The value scale(s).
    pub fn value(&self) -> &[f32] {
        &self.value
    }

    /// Whether there is one scale per KV head (more than one entry).
    pub fn is_per_head(&self) -> bool {
        self.key.len() > 1
    }

    /// The key and value scale of KV head `head` (a per-layer scale serves every head). Call on
    /// scales that passed [`KvScaleValues::check`].
    pub fn of_head(&self, head: usize) -> (f32, f32) {
        let pick = |s: &[f32]| if s.len() == 1 { s[0] } else { s.get(head).copied().unwrap_or(1.0) };
        (pick(&self.key), pick(&self.value))
    }

    /// Both vectors with `num_kv_heads` entries each (a per-layer scale repeated), the form the
    /// CUDA cache keeps on the device. Call on scales that passed [`KvScaleValues::check`].
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn expanded(&self, num_kv_heads: usize) -> (Vec<f32>, Vec<f32>) {
        (0..num_kv_heads).map(|h| self.of_head(h)).unzip()
    }

    /// Checks the counts (1 or `num_kv_heads`, the same for key and value) and the values (finite,
    /// `> 0`: a zero scale would divide by zero on write, a negative one flip signs, a NaN poison
    /// every row).
    ///
    /// # Errors
    /// [`AttentionError::InvalidKvScales`] saying which entry is wrong.
    pub fn check(&self, op: &'static str, num_kv_heads: usize) -> Result<()> {
        let bad = |what: String| Err(AttentionError::InvalidKvScales { op, what });
        let (k, v) = (self.key.len(), self.value.len());
        if k != v || (k != 1 && k != num_kv_heads) {
            return bad(format!(
                "{k} key and {v} value scales; both must be 1 (per layer) or num_kv_heads = {num_kv_heads} (per head)"
            ));
        }
        for (name, s) in [("key", &self.key), ("value", &self.value)] {
            if let Some((i, x)) = s.iter().enumerate().find(|(_, x)| !(x.is_finite() && **x > 0.0)) {
                return bad(format!("{name} scale [{i}] = {x} must be finite and positive"));
            }
        }
        Ok(())
    }
}

/// The scale check for a cache of element type `C`: `None` is always fine (an FP8 cache then uses
/// 1.0); scales for an unquantised cache are refused, since it would silently ignore them.
///
/// # Errors
/// [`AttentionError::InvalidKvScales`].
pub(crate) fn check_for<C: CacheElement>(
    op: &'static str,
    scales: Option<&KvScaleValues>,
    num_kv_heads: usize,
) -> Result<()> {
    match scales {
        None => Ok(()),
        Some(_) if !C::DTYPE.is_fp8() => Err(unquantised::<C>(op)),
        Some(s) => s.check(op, num_kv_heads),
    }
}

/// The error for scales given with an unquantised cache.
pub(crate) fn unquantised<C: CacheElement>(op: &'static str) -> AttentionError {
    AttentionError::InvalidKvScales {
        op,
        what: format!("scales given for a {} cache; only FP8 caches are scaled", C::DTYPE),
    }
}
