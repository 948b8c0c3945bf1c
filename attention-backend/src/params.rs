//! What to compute: the attention variant, independent of the batch.

use crate::error::{AttentionError, Result};

/// The attention variant (FlashAttention / vLLM semantics), the same for every request of a step.
///
/// For request `r` with `q_len` new tokens and `seq_len` keys, query row `i` sits at absolute
/// position `p = seq_len - q_len + i` and key `j` gets the score
///
/// ```text
/// s = scale * <q_i, k_j>
/// s = cap * tanh(s / cap)              if softcap = Some(cap)
/// s = s - slope_h * |p - j|            if alibi_slopes = Some(slopes)  (slope of query head h)
/// ```
///
/// and is visible iff `j <= p` when `causal` (bottom-right aligned), `j >= p - window_left` when
/// `window_left = Some(w)`, and `j <= p + window_right` when `window_right = Some(w)` (the window
/// bounds are FlashAttention's `window_size = (left, right)`; vLLM's `sliding_window = n` is
/// `window_left = Some(n - 1)`). The output row is `sum_j softmax(s)_j * v_j` over visible keys, where
/// the softmax denominator also includes `exp(sink_h)` when `sinks = Some(..)`; a row that sees
/// no key and no sink is zero. GQA: query head `h` reads kv head `h / (num_heads / num_kv_heads)`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct AttentionParams {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_size: usize,
    /// Softmax scale, usually `1 / sqrt(head_size)`.
    pub scale: f32,
    /// Bottom-right causal mask.
    pub causal: bool,
    /// Keys visible to the left of the query's position (`None` = unlimited).
    pub window_left: Option<usize>,
    /// Keys visible to the right of the query's position (`None` = unlimited; irrelevant when causal).
    pub window_right: Option<usize>,
    /// Logit soft-cap (`None` = off). Must be positive.
    pub softcap: Option<f32>,
    /// ALiBi slope per query head, `[num_heads]`.
    pub alibi_slopes: Option<Vec<f32>>,
    /// Attention-sink logit per query head, `[num_heads]` (gpt-oss style).
    pub sinks: Option<Vec<f32>>,
    /// Set by `with_sliding_window(0)`, which has no meaning (a window of `n` keys sees the query
    /// and the `n - 1` keys before it): [`AttentionParams::check`] refuses it, so the mistake is
    /// reported by the first call instead of running as a window of one key.
    zero_sliding_window: bool,
}

impl AttentionParams {
    /// Causal attention with the default scale `1 / sqrt(head_size)` and no extra features.
    pub fn new(num_heads: usize, num_kv_heads: usize, head_size: usize) -> Self {
        AttentionParams {
            num_heads,
            num_kv_heads,
            head_size,
            scale: 1.0 / (head_size as f32).sqrt(),
            causal: true,
            window_left: None,
            window_right: None,
            softcap: None,
            alibi_slopes: None,
            sinks: None,
            zero_sliding_window: false,
        }
    }

    /// Sets the softmax scale.
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = scale;
        self
    }

    /// Turns the causal mask on or off.
    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    /// Sets the window (FlashAttention's `window_size`; `None` = unlimited on that side).
    pub fn with_window(mut self, left: Option<usize>, right: Option<usize>) -> Self {
        self.window_left = left;
        self.window_right = right;
        self.zero_sliding_window = false;
        self
    }

    /// vLLM's `sliding_window = n`: each query sees itself and the `n - 1` keys before it.
    ///
    /// `n` must be at least 1: a window of 0 keys has no meaning, and [`AttentionParams::check`]
    /// (run by every call that takes the parameters) refuses it with
    /// [`AttentionError::InvalidArgument`] rather than running it as some other window.
    pub fn with_sliding_window(self, n: usize) -> Self {
        let mut p = self.with_window(Some(n.saturating_sub(1)), Some(0));
        p.zero_sliding_window = n == 0;
        p
    }

    /// Sets the logit soft-cap.
    pub fn with_softcap(mut self, cap: Option<f32>) -> Self {
        self.softcap = cap;
        self
    }

    /// Sets per-head ALiBi slopes.
    pub fn with_alibi_slopes(mut self, slopes: Option<Vec<f32>>) -> Self {
        self.alibi_slopes = slopes;
        self
    }

    /// Sets per-head sink logits.
    pub fn with_sinks(mut self, sinks: Option<Vec<f32>>) -> Self {
        self.sinks = sinks;
        self
    }

    /// Query heads per kv head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads.max(1)
    }

    /// Checks the parameters on their own.
    ///
    /// # Errors
    /// [`AttentionError::InvalidArgument`] for zero heads, heads not divisible, a non-finite or
    /// non-positive scale or cap, a sliding window of 0 keys, or per-head vectors of the wrong
    /// length.
    pub fn check(&self, op: &'static str) -> Result<()> {
        let bad = |what: String| Err(AttentionError::InvalidArgument { op, what });
        if self.zero_sliding_window {
            return bad("sliding window 0: a window of n keys sees the query and the n - 1 keys before it, so n must be at least 1".into());
        }
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.head_size == 0 {
            return bad(format!(
                "num_heads ({}), num_kv_heads ({}) and head_size ({}) must be positive",
                self.num_heads, self.num_kv_heads, self.head_size
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_heads ({}) is not a multiple of num_kv_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.scale.is_finite() || self.scale <= 0.0 {
            return bad(format!("scale must be finite and positive, got {}", self.scale));
        }
        if let Some(cap) = self.softcap {
            if !cap.is_finite() || cap <= 0.0 {
                return bad(format!("softcap must be finite and positive, got {cap}"));
            }
        }
        for (name, v) in [("alibi_slopes", &self.alibi_slopes), ("sinks", &self.sinks)] {
            if let Some(v) = v {
                if v.len() != self.num_heads {
                    return Err(AttentionError::ShapeMismatch {
                        op,
                        tensor: name,
                        expected: vec![self.num_heads],
                        actual: vec![v.len()],
                    });
                }
                if v.iter().any(|x| !x.is_finite()) {
                    return bad(format!("{name} must be finite"));
                }
            }
        }
        Ok(())
    }
}
