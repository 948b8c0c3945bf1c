//! Correctness while the run goes: an independent dense attention in `f64` to compare the
//! backend's output with.
//!
//! For each request of a checked step it rebuilds the request's whole K/V history from its token
//! ids (the synthetic model's K/V are pure functions of layer, token and position, see
//! [`crate::model`]), rounded to the compute dtype and then stored as the cache stores them
//! ([`KvStore`]: as is, or quantised to FP8 with the layer's scale and read back). It reads
//! neither the paged cache nor the block table nor the slot mapping, so a wrong slot, a block
//! shared by mistake, a stale prefix-cache block, a cache write that missed, or a wrong mask shows
//! up as a mismatch. The queries are the ones the backend got.
//!
//! The reference is the plain definition (bottom-right causal mask, GQA, softmax with the usual
//! max subtraction), in `f64`.

use std::fmt;

use attention_backend::{AttentionMetadata, AttentionParams, DType, Element, Fp8E4M3, Fp8E5M2};
use model_runner::{RequestId, TokenId};
use ndarray::ArrayView3;

use crate::model::{Proj, SyntheticModel};

/// What the KV cache holds for a K/V element the model made: the reference attends over exactly
/// that, so quantisation is part of the definition being checked, not an error the tolerance hides.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KvStore {
    /// The compute-type value itself.
    AsIs,
    /// `fp8_e4m3(x / scale)`, read as `stored * scale`.
    Fp8E4M3(f32),
    /// `fp8_e5m2(x / scale)`, read as `stored * scale`.
    Fp8E5M2(f32),
}

impl KvStore {
    /// The rule for a cache of `dtype` written with `scale` (ignored for an unquantised cache).
    pub fn new(dtype: DType, scale: f32) -> Self {
        match dtype {
            DType::Fp8E4M3 => KvStore::Fp8E4M3(scale),
            DType::Fp8E5M2 => KvStore::Fp8E5M2(scale),
            _ => KvStore::AsIs,
        }
    }

    /// The value attention reads for the model's `x` in compute type `T`.
    pub fn read_back<T: Element>(self, x: f32) -> f64 {
        let t = T::from_f32(x).to_f32();
        match self {
            KvStore::AsIs => f64::from(t),
            KvStore::Fp8E4M3(s) => f64::from(Fp8E4M3::from_f32(t / s).to_f32()) * f64::from(s),
            KvStore::Fp8E5M2(s) => f64::from(Fp8E5M2::from_f32(t / s).to_f32()) * f64::from(s),
        }
    }
}

/// How far the backend's output may be from the `f64` reference: `|got - want| <= abs + rel * |want|`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// Absolute part.
    pub abs: f64,
    /// Relative part.
    pub rel: f64,
}

impl Tolerance {
    /// The tolerance for outputs stored in `dtype`: `1e-4` absolute for `f32`; for `f16` / `bf16`,
    /// whose rounding of the output alone is up to `2^-8` relative, `2e-2 + 1e-2 * |want|`.
    pub fn for_dtype(dtype: DType) -> Self {
        match dtype {
            DType::F32 => Tolerance { abs: 1e-4, rel: 0.0 },
            _ => Tolerance { abs: 2e-2, rel: 1e-2 },
        }
    }

    fn allows(&self, got: f64, want: f64) -> bool {
        (got - want).abs() <= self.abs + self.rel * want.abs()
    }
}

/// A value of the backend's output outside the tolerance.
#[derive(Clone, Debug, PartialEq)]
pub struct Mismatch {
    /// Step number.
    pub step: u64,
    /// Layer.
    pub layer: usize,
    /// Request.
    pub req: RequestId,
    /// Position (in the request's sequence) of the query token.
    pub position: usize,
    /// Query head.
    pub head: usize,
    /// Element within the head.
    pub dim: usize,
    /// Backend value.
    pub got: f64,
    /// Reference value.
    pub want: f64,
    /// Largest absolute error over the request's rows.
    pub max_abs_err: f64,
    /// The tolerance.
    pub tol: Tolerance,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "verification failed at step {}, layer {}, request {} (position {}, head {}, dim {}): got {:.6}, \
             reference {:.6}; max abs error {:.3e} > tolerance {:.0e} abs + {:.0e} rel",
            self.step,
            self.layer,
            self.req,
            self.position,
            self.head,
            self.dim,
            self.got,
            self.want,
            self.max_abs_err,
            self.tol.abs,
            self.tol.rel
        )
    }
}

/// One checked layer of one step: what the backend was given and what it returned.
#[derive(Debug)]
pub struct LayerCheck<'a, T: Element> {
    /// Step number (for the error message).
    pub step: u64,
    /// Layer.
    pub layer: usize,
    /// The step's metadata (rows in `req_ids` order).
    pub meta: &'a AttentionMetadata,
    /// The request of each row of the metadata.
    pub req_ids: &'a [RequestId],
    /// `[num_tokens, num_heads, head_size]` queries the backend got.
    pub query: ArrayView3<'a, T>,
    /// `[num_tokens, num_heads, head_size]` outputs it returned.
    pub out: ArrayView3<'a, T>,
    /// How the layer's cache stores K and V.
    pub kv: KvStore,
}

/// How much of a checked layer-step to recompute: the f64 reference costs
/// `q_len * seq_len * heads * head_size` per request, which for a full GPU batch of long prompts
/// would take minutes, so large steps are sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Requests checked per layer-step, spread over the batch (decodes and prefills alike).
    pub max_requests: usize,
    /// Query rows checked per request, spread from its first to its last new token.
    pub max_rows: usize,
}

impl Default for Sample {
    fn default() -> Self {
        Sample { max_requests: 16, max_rows: 64 }
    }
}

/// `k` indices spread evenly over `0..n`, first and last included (all of them when `n <= k`).
fn spread(n: usize, k: usize) -> Vec<usize> {
    if n <= k || k == 0 {
        return (0..n).collect();
    }
    let mut v: Vec<usize> = (0..k).map(|i| if k == 1 { n - 1 } else { i * (n - 1) / (k - 1) }).collect();
    v.dedup();
    v
}

/// Recomputes the sampled rows of `check.out` and compares, requests in parallel. `tokens_of`
/// gives a request's tokens (at least `seq_len` of them). Returns the largest absolute error seen.
///
/// # Errors
/// The first (in batch order) checked request with a value outside `tol`, with that request's
/// largest error.
pub fn check_layer<'t, T: Element>(
    model: &SyntheticModel,
    params: &AttentionParams,
    tol: Tolerance,
    sample: Sample,
    check: &LayerCheck<'_, T>,
    tokens_of: impl Fn(RequestId) -> &'t [TokenId],
) -> Result<f64, Box<Mismatch>> {
    let num_reqs = check.meta.num_reqs().min(check.req_ids.len());
    let work: Vec<(usize, &[TokenId])> =
        spread(num_reqs, sample.max_requests).into_iter().map(|r| (r, tokens_of(check.req_ids[r]))).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(work.len()).max(1);
    let results: Vec<Result<f64, Box<Mismatch>>> = if threads == 1 {
        work.iter().map(|&(r, tokens)| check_request(model, params, tol, sample.max_rows, check, r, tokens)).collect()
    } else {
        let per = work.len().div_ceil(threads);
        std::thread::scope(|s| {
            let handles: Vec<_> = work
                .chunks(per)
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|&(r, tokens)| check_request(model, params, tol, sample.max_rows, check, r, tokens))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            // A checker thread only does arithmetic on checked indices; if one panicked anyway, the
            // check counts as failed rather than passed.
            handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|_| vec![Ok(f64::INFINITY)])).collect()
        })
    };
    let mut max_err = 0.0f64;
    for r in results {
        max_err = max_err.max(r?);
    }
    Ok(max_err)
}

/// Checks the sampled rows of batch row `r` against the f64 reference.
fn check_request<T: Element>(
    model: &SyntheticModel,
    params: &AttentionParams,
    tol: Tolerance,
    max_rows: usize,
    check: &LayerCheck<'_, T>,
    r: usize,
    tokens: &[TokenId],
) -> Result<f64, Box<Mismatch>> {
    let (hs, nkv, group) = (params.head_size, params.num_kv_heads, params.group_size());
    let meta = check.meta;
    let req = check.req_ids[r];
    let q_start = meta.query_start_loc[r] as usize;
    let q_len = meta.query_len(r);
    let seq_len = (meta.seq_lens[r] as usize).min(tokens.len());
    // K/V history of the request as the cache holds it: [kv_head][pos * hs + d].
    let history = |proj: Proj| -> Vec<Vec<f64>> {
        let mut buf = vec![0.0f32; hs];
        (0..nkv)
            .map(|h| {
                let mut v = Vec::with_capacity(seq_len * hs);
                for (pos, &tok) in tokens.iter().enumerate().take(seq_len) {
                    model.fill(proj, check.layer, h, tok, pos as i64, &mut buf);
                    v.extend(buf.iter().map(|&x| check.kv.read_back::<T>(x)));
                }
                v
            })
            .collect()
    };
    let (keys, values) = (history(Proj::K), history(Proj::V));
    let mut first_bad: Option<Mismatch> = None;
    let mut req_max = 0.0f64;
    let mut scores = vec![0.0f64; seq_len];
    for i in spread(q_len, max_rows) {
        let row = q_start + i;
        // Bottom-right causal: the query at `position` sees keys 0..=position.
        let position = (seq_len + i).saturating_sub(q_len);
        let visible = position + 1;
        // A sliding window hides keys more than `window_left` before the query.
        let first = params.window_left.map_or(0, |w| position.saturating_sub(w));
        let cap = params.softcap.map(f64::from);
        for h in 0..params.num_heads {
            let (k, v) = (&keys[h / group], &values[h / group]);
            let q: Vec<f64> = (0..hs).map(|d| f64::from(check.query[[row, h, d]].to_f32())).collect();
            let mut m = f64::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate().take(visible).skip(first) {
                let kj = &k[j * hs..(j + 1) * hs];
                *s = f64::from(params.scale) * q.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>();
                if let Some(cap) = cap {
                    *s = cap * (*s / cap).tanh();
                }
                m = m.max(*s);
            }
            let mut denom = 0.0;
            for s in scores.iter_mut().take(visible).skip(first) {
                *s = (*s - m).exp();
                denom += *s;
            }
            let mut want = vec![0.0f64; hs];
            for (j, &p) in scores.iter().enumerate().take(visible).skip(first) {
                for (w, &x) in want.iter_mut().zip(&v[j * hs..(j + 1) * hs]) {
                    *w += p * x;
                }
            }
            for (d, w) in want.iter_mut().enumerate() {
                *w /= denom;
                let got = f64::from(check.out[[row, h, d]].to_f32());
                let err = (got - *w).abs();
                req_max = req_max.max(if err.is_nan() { f64::INFINITY } else { err });
                if first_bad.is_none() && !(tol.allows(got, *w) && got.is_finite()) {
                    first_bad = Some(Mismatch {
                        step: check.step,
                        layer: check.layer,
                        req,
                        position,
                        head: h,
                        dim: d,
                        got,
                        want: *w,
                        max_abs_err: 0.0,
                        tol,
                    });
                }
            }
        }
    }
    match first_bad {
        Some(mut bad) => {
            bad.max_abs_err = req_max;
            Err(Box::new(bad))
        }
        None => Ok(req_max),
    }
}

#[cfg(test)]
mod tests {
    use attention_backend::{BlockTable, SlotMapping};
    use ndarray::Array3;

    use super::*;
    use crate::model::ModelShape;

    /// One request of 3 tokens, all new, written densely into blocks 0.. of a cache.
    fn setup() -> (SyntheticModel, AttentionParams, AttentionMetadata, Vec<TokenId>) {
        let shape = ModelShape { num_layers: 1, num_heads: 2, num_kv_heads: 1, head_size: 4 };
        let model = SyntheticModel::new(shape, 9);
        let params = AttentionParams::new(2, 1, 4);
        let meta = AttentionMetadata {
            num_actual_tokens: 3,
            query_start_loc: vec![0, 3],
            seq_lens: vec![3],
            block_table: BlockTable::from_rows(&[vec![0]]),
            slot_mapping: SlotMapping::new(vec![0, 1, 2]),
            max_query_len: 3,
            max_seq_len: 3,
            num_decodes: 0,
            num_decode_tokens: 0,
            num_prefills: 1,
            num_prefill_tokens: 3,
        };
        (model, params, meta, vec![5, 6, 7])
    }

    /// The expected output, written out by hand for this tiny case.
    fn by_hand(model: &SyntheticModel, q: &Array3<f32>, tokens: &[TokenId]) -> Array3<f32> {
        let kv = |p: Proj, pos: usize| {
            let mut b = [0.0f32; 4];
            model.fill(p, 0, 0, tokens[pos], pos as i64, &mut b);
            b
        };
        let mut out = Array3::zeros((3, 2, 4));
        for i in 0..3 {
            for h in 0..2 {
                let s: Vec<f32> =
                    (0..=i).map(|j| (0..4).map(|d| kv(Proj::K, j)[d] * q[[i, h, d]]).sum::<f32>() * 0.5).collect();
                let e: Vec<f32> = s.iter().map(|x| x.exp()).collect();
                let z: f32 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    for d in 0..4 {
                        out[[i, h, d]] += w / z * kv(Proj::V, j)[d];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn accepts_the_right_answer_and_names_a_wrong_one() {
        let (model, params, meta, tokens) = setup();
        let positions = [0i64, 1, 2];
        let q = model.project::<f32>(Proj::Q, 0, &tokens, &positions);
        let mut out = by_hand(&model, &q, &tokens);
        let ids = [RequestId(4)];
        let tol = Tolerance::for_dtype(DType::F32);
        let check = LayerCheck {
            step: 3,
            layer: 0,
            meta: &meta,
            req_ids: &ids,
            query: q.view(),
            out: out.view(),
            kv: KvStore::AsIs,
        };
        let err = check_layer(&model, &params, tol, Sample::default(), &check, |_| &tokens[..]).unwrap();
        assert!(err < 1e-6, "{err}");

        out[[2, 1, 3]] += 1e-3;
        let check = LayerCheck {
            step: 3,
            layer: 0,
            meta: &meta,
            req_ids: &ids,
            query: q.view(),
            out: out.view(),
            kv: KvStore::AsIs,
        };
        let bad = check_layer(&model, &params, tol, Sample::default(), &check, |_| &tokens[..]).unwrap_err();
        assert_eq!((bad.step, bad.req, bad.position, bad.head, bad.dim), (3, RequestId(4), 2, 1, 3));
        assert!((bad.max_abs_err - 1e-3).abs() < 1e-5);
        let msg = bad.to_string();
        assert!(msg.contains("step 3") && msg.contains("layer 0") && msg.contains("request #4"), "{msg}");
    }

    #[test]
    fn sampling_spreads_and_keeps_the_ends() {
        assert_eq!(spread(3, 16), [0, 1, 2]);
        assert_eq!(spread(100, 3), [0, 49, 99]);
        assert_eq!(spread(10, 1), [9]);
        assert_eq!(spread(0, 4), Vec::<usize>::new());
    }

    #[test]
    fn half_precision_tolerance_is_looser() {
        let t = Tolerance::for_dtype(DType::BF16);
        assert!(t.allows(1.0 + 0.029, 1.0));
        assert!(!t.allows(1.0 + 0.031, 1.0));
        assert!(!Tolerance::for_dtype(DType::F32).allows(2e-4, 0.0));
    }
}
