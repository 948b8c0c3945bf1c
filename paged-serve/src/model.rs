//! The synthetic model: deterministic queries, keys and values from token ids and positions, and a
//! next token drawn from the attention output.
//!
//! A real model projects hidden states into Q, K and V; here each head's vector is a pseudo-random
//! function of `(seed, projection, layer, head, token id, position)`, uniform in `[-1, 1)`. That
//! keeps the run reproducible and free of weights, while the attention itself is the real path:
//! the KV-cache write, the block tables, prefix sharing and the kernels all see realistic inputs.
//!
//! Because K and V are pure functions of `(layer, token, position)`, the K/V that a prefix-cache
//! hit reuses from another request are exactly what this request would have computed, and the
//! verifier can rebuild any request's K/V history from its token ids alone ([`SyntheticModel::fill`]).
//!
//! The next token is a hash of a few values of the last layer's attention output at the request's
//! last row, so generation depends on attention results: a wrong attention output changes the
//! tokens and everything after them.

use attention_backend::{AttentionParams, Element};
use model_runner::TokenId;
use ndarray::{Array3, ArrayView2};

use crate::workload::{mix64, VOCAB_SIZE};

/// Which projection a vector belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proj {
    /// Query.
    Q = 1,
    /// Key.
    K = 2,
    /// Value.
    V = 3,
}

/// The sizes of the synthetic model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelShape {
    /// Attention layers (one KV cache each).
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_size: usize,
}

/// Which layers a sliding window applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowLayers {
    /// Every layer (Mistral 7B v0.1).
    All,
    /// Layers 0, 2, 4, ...; the others attend globally (Gemma 2's local/global alternation).
    Even,
}

/// The attention variant of the model's layers beyond the plain causal softmax: what real models
/// add, and what makes the kernels take their windowed and soft-capped paths.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionVariant {
    /// vLLM's `sliding_window = n`: a query sees itself and the `n - 1` keys before it.
    pub sliding_window: Option<usize>,
    /// The layers the window applies to.
    pub window_layers: WindowLayers,
    /// Logit soft-cap (`cap * tanh(s / cap)`).
    pub softcap: Option<f32>,
    /// Softmax scale; `None` is `1 / sqrt(head_size)`.
    pub scale: Option<f32>,
}

impl Default for AttentionVariant {
    fn default() -> Self {
        AttentionVariant { sliding_window: None, window_layers: WindowLayers::All, softcap: None, scale: None }
    }
}

impl AttentionVariant {
    /// The window of `layer`, if it has one.
    pub fn window_of(&self, layer: usize) -> Option<usize> {
        match self.window_layers {
            WindowLayers::All => self.sliding_window,
            WindowLayers::Even => self.sliding_window.filter(|_| layer.is_multiple_of(2)),
        }
    }

    /// The attention parameters of `layer`.
    pub fn layer_params(&self, shape: &ModelShape, layer: usize) -> AttentionParams {
        let mut p =
            AttentionParams::new(shape.num_heads, shape.num_kv_heads, shape.head_size).with_softcap(self.softcap);
        if let Some(scale) = self.scale {
            p = p.with_scale(scale);
        }
        match self.window_of(layer) {
            Some(n) => p.with_sliding_window(n),
            None => p,
        }
    }

    /// A short description for the summary, e.g. `window 4096 on even layers, soft-cap 50`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = self.sliding_window {
            parts.push(match self.window_layers {
                WindowLayers::All => format!("window {n}"),
                WindowLayers::Even => format!("window {n} on even layers"),
            });
        }
        if let Some(c) = self.softcap {
            parts.push(format!("soft-cap {c}"));
        }
        if let Some(s) = self.scale {
            parts.push(format!("scale {s:.5}"));
        }
        if parts.is_empty() {
            "causal".into()
        } else {
            parts.join(", ")
        }
    }
}

/// A published model's attention shape, for `--model`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelPreset {
    /// The `--model` name.
    pub name: &'static str,
    /// Layers, heads, KV heads, head size.
    pub shape: ModelShape,
    /// Window, soft-cap and scale.
    pub variant: AttentionVariant,
}

const fn shape(num_layers: usize, num_heads: usize, num_kv_heads: usize, head_size: usize) -> ModelShape {
    ModelShape { num_layers, num_heads, num_kv_heads, head_size }
}

const PLAIN: AttentionVariant =
    AttentionVariant { sliding_window: None, window_layers: WindowLayers::All, softcap: None, scale: None };

/// Gemma 2: even layers see a 4096-token window, odd ones everything; logits soft-capped at 50;
/// the scale is `query_pre_attn_scalar^(-1/2)` (`scale`), not the head size's.
const fn gemma2(scale: f32) -> AttentionVariant {
    AttentionVariant {
        sliding_window: Some(4096),
        window_layers: WindowLayers::Even,
        softcap: Some(50.0),
        scale: Some(scale),
    }
}

/// The presets, from the models' published configurations (`config.json`: `num_hidden_layers`,
/// `num_attention_heads`, `num_key_value_heads`, `head_dim`, `sliding_window`,
/// `attn_logit_softcapping`, `query_pre_attn_scalar`).
pub const PRESETS: &[ModelPreset] = &[
    ModelPreset { name: "llama3-8b", shape: shape(32, 32, 8, 128), variant: PLAIN },
    ModelPreset { name: "llama3-70b", shape: shape(80, 64, 8, 128), variant: PLAIN },
    ModelPreset { name: "qwen2.5-7b", shape: shape(28, 28, 4, 128), variant: PLAIN },
    ModelPreset { name: "qwen2.5-72b", shape: shape(80, 64, 8, 128), variant: PLAIN },
    ModelPreset {
        name: "mistral-7b",
        shape: shape(32, 32, 8, 128),
        variant: AttentionVariant { sliding_window: Some(4096), ..PLAIN },
    },
    ModelPreset { name: "gemma2-9b", shape: shape(42, 16, 8, 256), variant: gemma2(GEMMA2_9B_SCALE) },
    ModelPreset { name: "gemma2-27b", shape: shape(46, 32, 16, 128), variant: gemma2(1.0 / 12.0) },
];

/// `224^(-1/2)`: Gemma 2 9B's `query_pre_attn_scalar` is 224 (27B's is 144, a scale of 1/12).
const GEMMA2_9B_SCALE: f32 = 0.066_815_31;

/// The preset called `name`.
pub fn preset(name: &str) -> Option<ModelPreset> {
    PRESETS.iter().find(|p| p.name == name).copied()
}

/// The `--model` names, comma-separated.
pub fn preset_names() -> String {
    PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
}

/// Below this many elements a projection is filled on the calling thread (spawning costs more).
const PARALLEL_MIN_ELEMS: usize = 1 << 16;

/// The synthetic model; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct SyntheticModel {
    shape: ModelShape,
    seed: u64,
    threads: usize,
}

impl SyntheticModel {
    /// A model of `shape` whose vectors are drawn from `seed`.
    pub fn new(shape: ModelShape, seed: u64) -> Self {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        SyntheticModel { shape, seed, threads }
    }

    /// The sizes.
    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    /// Writes the `head_size` values of one head's projection of `token` at `position` into `out`,
    /// as `f32` before rounding to the storage type.
    pub fn fill(&self, proj: Proj, layer: usize, head: usize, token: TokenId, position: i64, out: &mut [f32]) {
        let key = self.seed
            ^ ((proj as u64) << 60)
            ^ ((layer as u64 & 0xfff) << 48)
            ^ ((head as u64 & 0xffff) << 32)
            ^ u64::from(token);
        let mut state = mix64(mix64(key) ^ (position as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // Four 16-bit values per 64 random bits: cheap enough to regenerate per step and layer.
        for chunk in out.chunks_mut(4) {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let bits = mix64(state);
            for (i, x) in chunk.iter_mut().enumerate() {
                *x = f32::from((bits >> (16 * i)) as u16 as i16) * (1.0 / 32768.0);
            }
        }
    }

    /// One layer's projection of a step's tokens: `[num_tokens, heads, head_size]` where `heads` is
    /// `num_heads` for [`Proj::Q`] and `num_kv_heads` otherwise. Rows are filled on several threads
    /// for large steps.
    pub fn project<T: Element>(&self, proj: Proj, layer: usize, tokens: &[TokenId], positions: &[i64]) -> Array3<T> {
        let heads = if proj == Proj::Q { self.shape.num_heads } else { self.shape.num_kv_heads };
        let hs = self.shape.head_size;
        let row = heads * hs;
        let n = tokens.len().min(positions.len());
        let mut data = vec![T::default(); n * row];
        let fill_rows = |first: usize, rows: &mut [T]| {
            let mut buf = vec![0.0f32; hs];
            for (r, out) in rows.chunks_mut(row).enumerate() {
                let t = first + r;
                for (h, dst) in out.chunks_mut(hs).enumerate() {
                    self.fill(proj, layer, h, tokens[t], positions[t], &mut buf);
                    for (d, &x) in dst.iter_mut().zip(&buf) {
                        *d = T::from_f32(x);
                    }
                }
            }
        };
        let threads = if n * row >= PARALLEL_MIN_ELEMS { self.threads.min(n) } else { 1 };
        if threads <= 1 {
            fill_rows(0, &mut data);
        } else {
            let rows_per = n.div_ceil(threads);
            std::thread::scope(|s| {
                for (c, chunk) in data.chunks_mut(rows_per * row).enumerate() {
                    let fill_rows = &fill_rows;
                    s.spawn(move || fill_rows(c * rows_per, chunk));
                }
            });
        }
        // The length is n * heads * hs by construction.
        Array3::from_shape_vec((n, heads, hs), data).unwrap_or_else(|_| Array3::default((n, heads, hs)))
    }

    /// The next token from one row of the last layer's attention output (`[num_heads, head_size]`):
    /// a hash of the bits of its first values in the first heads.
    pub fn next_token<T: Element>(&self, out_row: ArrayView2<'_, T>) -> TokenId {
        let mut h = self.seed ^ 0x5eed;
        for head in out_row.outer_iter().take(2) {
            for &x in head.iter().take(4) {
                h = mix64(h ^ u64::from(x.to_f32().to_bits()));
            }
        }
        (h % u64::from(VOCAB_SIZE)) as TokenId
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> SyntheticModel {
        SyntheticModel::new(ModelShape { num_layers: 2, num_heads: 4, num_kv_heads: 2, head_size: 8 }, 1)
    }

    #[test]
    fn projections_are_deterministic_and_distinct() {
        let m = model();
        let (mut a, mut b) = ([0.0f32; 8], [0.0f32; 8]);
        m.fill(Proj::K, 0, 1, 42, 7, &mut a);
        m.fill(Proj::K, 0, 1, 42, 7, &mut b);
        assert_eq!(a, b);
        for (p, l, h, t, pos) in [
            (Proj::V, 0, 1, 42, 7),
            (Proj::K, 1, 1, 42, 7),
            (Proj::K, 0, 0, 42, 7),
            (Proj::K, 0, 1, 43, 7),
            (Proj::K, 0, 1, 42, 8),
        ] {
            m.fill(p, l, h, t, pos, &mut b);
            assert_ne!(a, b, "{p:?} layer {l} head {h} token {t} pos {pos}");
        }
        assert!(a.iter().all(|x| (-1.0..1.0).contains(x)));
    }

    #[test]
    fn project_matches_fill_serial_and_parallel() {
        let m = model();
        for n in [3usize, 5000] {
            let tokens: Vec<u32> = (0..n as u32).map(|t| t * 7).collect();
            let positions: Vec<i64> = (0..n as i64).collect();
            let q = m.project::<f32>(Proj::Q, 1, &tokens, &positions);
            assert_eq!(q.shape(), [n, 4, 8]);
            let mut buf = [0.0f32; 8];
            for t in [0, n / 2, n - 1] {
                m.fill(Proj::Q, 1, 3, tokens[t], positions[t], &mut buf);
                assert_eq!((0..8).map(|d| q[[t, 3, d]]).collect::<Vec<_>>(), buf);
            }
        }
    }

    #[test]
    fn next_token_depends_on_the_output() {
        let m = model();
        let mut out = ndarray::Array2::<f32>::zeros((4, 8));
        let a = m.next_token(out.view());
        out[[1, 2]] = 0.5;
        assert_ne!(a, m.next_token(out.view()));
        assert!(a < VOCAB_SIZE);
    }
}
