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

use attention_backend::Element;
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
