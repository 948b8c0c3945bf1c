//! Shared helpers of the attention tests: random batches over a shuffled paged cache, and an
//! independent float64 recomputation of attention on dense per-request K/V.
//!
//! The reference does not share code with the crate's CPU backend: it keeps its own dense copy of
//! every request's keys and values (what was generated, rounded to the storage type), applies the
//! mask rules written out from the `AttentionParams` documentation, and uses a plain two-pass
//! softmax in `f64`.

#![allow(dead_code)]

use attention_backend::ndarray::{Array2, Array3, Array4, Axis};
use attention_backend::{cpu, AttentionMetadata, AttentionParams, BlockTable, CpuKvCache, Element, SlotMapping};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Cap on the elements of one test cache (key or value), so the grids stay cheap on 2 cores.
pub const MAX_CACHE_ELEMS: usize = 2 << 20;

/// One test batch.
#[derive(Clone, Debug)]
pub struct Spec {
    /// `(q_len, seq_len)` per request, in batch order.
    pub reqs: Vec<(usize, usize)>,
    /// Block size of the cache.
    pub block_size: usize,
    /// Blocks in the cache (block ids are drawn at random from all of them).
    pub num_blocks: usize,
    /// Padding tokens after the real ones (slot -1).
    pub pad: usize,
    /// The attention variant (heads and head size included).
    pub params: AttentionParams,
    /// Factor on the queries (large logits).
    pub q_scale: f32,
    /// RNG seed.
    pub seed: u64,
}

impl Spec {
    /// A spec with a cache of about `wanted_blocks` blocks, shrunk to [`MAX_CACHE_ELEMS`] but never
    /// below what the batch needs (plus slack, so ids are still drawn from a larger pool).
    pub fn new(reqs: Vec<(usize, usize)>, block_size: usize, wanted_blocks: usize, params: AttentionParams) -> Self {
        let needed: usize = reqs.iter().map(|&(_, s)| s.div_ceil(block_size)).sum();
        let per_block = block_size * params.num_kv_heads * params.head_size;
        let num_blocks = wanted_blocks.min(MAX_CACHE_ELEMS / per_block).max(needed * 2 + 8);
        Spec { reqs, block_size, num_blocks, pad: 3, params, q_scale: 1.0, seed: 0 }
    }

    /// Sets the seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

/// Cheap data generator (splitmix64): the tests draw tens of millions of values, and ChaCha plus
/// Box-Muller dominated their run time.
pub struct Gen(u64);

impl Gen {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Gen(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Approximately standard normal (Irwin-Hall of 4 uniforms: mean 0, variance 1, |x| < 3.5).
    pub fn randn(&mut self) -> f32 {
        let s: f32 = (0..4).map(|_| self.uniform()).sum();
        (s - 2.0) * 3f32.sqrt()
    }
}

/// Everything one test run needs: the crate's inputs and the reference's dense copies.
pub struct Built<T: Element> {
    pub meta: AttentionMetadata,
    pub cache: CpuKvCache<T>,
    pub query: Array3<T>,
    pub key: Array3<T>,
    pub value: Array3<T>,
    /// Per request, dense `[seq_len][kv_head][d]` keys and values as `f64` (of the stored values).
    pub k_dense: Vec<Vec<f64>>,
    pub v_dense: Vec<Vec<f64>>,
}

fn nan<T: Element>() -> T {
    T::from_f32(f32::NAN)
}

/// Builds the batch: random block tables (distinct ids from the whole cache, in random order,
/// stale garbage after each row's last used block), the context tokens' K/V written straight into
/// the cache, every unused cache row NaN (so reading a wrong block shows), the new tokens' K/V
/// returned for `forward` to write.
pub fn build<T: Element>(spec: &Spec) -> Built<T> {
    let p = &spec.params;
    let (nkv, hs, bs) = (p.num_kv_heads, p.head_size, spec.block_size);
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut gen = Gen::new(spec.seed);
    let needed: Vec<usize> = spec.reqs.iter().map(|&(_, s)| s.div_ceil(bs)).collect();
    let total: usize = needed.iter().sum();
    let width = needed.iter().copied().max().unwrap_or(0) + 2;
    let ids = rand::seq::index::sample(&mut rng, spec.num_blocks, total).into_vec();
    let mut rows = Vec::new();
    let mut next = 0;
    for &n in &needed {
        let mut row: Vec<i32> = ids[next..next + n].iter().map(|&b| b as i32).collect();
        next += n;
        while row.len() < width {
            row.push(if rng.random_bool(0.5) { -1 } else { rng.random_range(0..i32::MAX) });
        }
        rows.push(row);
    }
    let block_table = BlockTable::from_rows(&rows);

    let shape = [spec.num_blocks, bs, nkv, hs];
    let mut kc = Array4::<T>::from_elem(shape, nan());
    let mut vc = Array4::<T>::from_elem(shape, nan());
    let num_actual: usize = spec.reqs.iter().map(|r| r.0).sum();
    let num_tokens = num_actual + spec.pad;
    let mut query = Array3::<T>::from_elem((num_tokens, p.num_heads, hs), nan());
    let mut key = Array3::<T>::from_elem((num_tokens, nkv, hs), nan());
    let mut value = Array3::<T>::from_elem((num_tokens, nkv, hs), nan());
    let mut slots = vec![-1i64; num_tokens];
    let mut qsl = vec![0i32];
    let mut k_dense = Vec::new();
    let mut v_dense = Vec::new();
    let mut t = 0;
    for (r, &(q_len, seq_len)) in spec.reqs.iter().enumerate() {
        let mut kd = vec![0f64; seq_len * nkv * hs];
        let mut vd = vec![0f64; seq_len * nkv * hs];
        let context = seq_len - q_len;
        for pos in 0..seq_len {
            let block = rows[r][pos / bs] as usize;
            let off = pos % bs;
            for h in 0..nkv {
                for d in 0..hs {
                    let k = T::from_f32(gen.randn());
                    let v = T::from_f32(gen.randn());
                    let i = (pos * nkv + h) * hs + d;
                    kd[i] = k.to_f32() as f64;
                    vd[i] = v.to_f32() as f64;
                    if pos < context {
                        kc[[block, off, h, d]] = k;
                        vc[[block, off, h, d]] = v;
                    } else {
                        key[[t + pos - context, h, d]] = k;
                        value[[t + pos - context, h, d]] = v;
                    }
                }
            }
            if pos >= context {
                slots[t + pos - context] = (block * bs + off) as i64;
            }
        }
        for i in 0..q_len {
            for h in 0..p.num_heads {
                for d in 0..hs {
                    query[[t + i, h, d]] = T::from_f32(gen.randn() * spec.q_scale);
                }
            }
        }
        t += q_len;
        qsl.push(t as i32);
        k_dense.push(kd);
        v_dense.push(vd);
    }
    // Padding rows of key/value stay NaN: a padding slot must never be written.
    let seq_lens = spec.reqs.iter().map(|r| r.1 as i32).collect();
    let meta = AttentionMetadata::new(qsl, seq_lens, block_table, SlotMapping::new(slots), 1).expect("valid metadata");
    let cache = CpuKvCache::from_arrays(kc, vc).expect("cache");
    Built { meta, cache, query, key, value, k_dense, v_dense }
}

/// Dot product in f64 (four partial sums, for speed; the order does not matter at f64 precision).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..4 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// The float64 recomputation: `(out [num_actual][num_heads][d], lse [num_actual][num_heads])`.
pub fn reference<T: Element>(spec: &Spec, b: &Built<T>) -> (Vec<f64>, Vec<f64>) {
    let p = &spec.params;
    let (nh, nkv, hs) = (p.num_heads, p.num_kv_heads, p.head_size);
    let group = nh / nkv;
    let num_actual = b.meta.num_actual_tokens;
    let mut out = vec![0f64; num_actual * nh * hs];
    let mut lse = vec![f64::NEG_INFINITY; num_actual * nh];
    let mut t0 = 0;
    let mut q = vec![0f64; hs];
    for (r, &(q_len, seq_len)) in spec.reqs.iter().enumerate() {
        let (kd, vd) = (&b.k_dense[r], &b.v_dense[r]);
        for i in 0..q_len {
            let pos = (seq_len - q_len + i) as i64;
            for h in 0..nh {
                let kvh = h / group;
                for (d, qd) in q.iter_mut().enumerate() {
                    *qd = b.query[[t0 + i, h, d]].to_f32() as f64;
                }
                let mut scores: Vec<(usize, f64)> = Vec::new();
                for j in 0..seq_len {
                    let jj = j as i64;
                    let visible = (!p.causal || jj <= pos)
                        && p.window_left.is_none_or(|w| jj >= pos - w as i64)
                        && p.window_right.is_none_or(|w| jj <= pos + w as i64);
                    if !visible {
                        continue;
                    }
                    let k = &kd[(j * nkv + kvh) * hs..(j * nkv + kvh + 1) * hs];
                    let mut s = p.scale as f64 * dot(&q, k);
                    if let Some(cap) = p.softcap {
                        let cap = cap as f64;
                        s = cap * (s / cap).tanh();
                    }
                    if let Some(slopes) = &p.alibi_slopes {
                        s -= slopes[h] as f64 * (pos - jj).abs() as f64;
                    }
                    scores.push((j, s));
                }
                let sink = p.sinks.as_ref().map(|s| s[h] as f64);
                let m = scores.iter().map(|x| x.1).chain(sink).fold(f64::NEG_INFINITY, f64::max);
                let row = (t0 + i) * nh + h;
                if m == f64::NEG_INFINITY {
                    continue; // sees nothing: output 0, lse -inf
                }
                let denom: f64 =
                    scores.iter().map(|x| (x.1 - m).exp()).sum::<f64>() + sink.map_or(0.0, |s| (s - m).exp());
                let o = &mut out[row * hs..(row + 1) * hs];
                for &(j, s) in &scores {
                    let w = (s - m).exp() / denom;
                    let v = &vd[(j * nkv + kvh) * hs..(j * nkv + kvh + 1) * hs];
                    for (od, vv) in o.iter_mut().zip(v) {
                        *od += w * vv;
                    }
                }
                lse[row] = m + denom.ln();
            }
        }
        t0 += q_len;
    }
    (out, lse)
}

/// Largest errors of one run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Report {
    pub max_abs: f64,
    pub max_lse: f64,
}

/// Runs `cpu::forward` on NaN-poisoned outputs and checks, against the float64 reference: every
/// real row fully written and within tolerance, every padding row untouched, no NaN in any real
/// row, the cache holding the dense K/V when read back through the block table.
///
/// Tolerance: `f32` storage 1e-4 absolute; `f16` / `bf16` storage 2e-2 absolute + 1e-2 relative
/// (the reference uses the same rounded inputs). LSE: 1e-4 relative (f32) / 1e-3 (half).
pub fn run_case<T: Element>(spec: &Spec) -> Result<Report, String> {
    let mut b = build::<T>(spec);
    let p = &spec.params;
    let num_tokens = b.meta.num_tokens();
    let mut out = Array3::<T>::from_elem((num_tokens, p.num_heads, p.head_size), nan());
    let mut lse = Array2::<f32>::from_elem((num_tokens, p.num_heads), f32::NAN);
    cpu::forward(
        &b.meta,
        p,
        cpu::ForwardIo {
            query: b.query.view(),
            key: b.key.view(),
            value: b.value.view(),
            cache: &mut b.cache,
            out: out.view_mut(),
            lse: Some(lse.view_mut()),
        },
    )
    .map_err(|e| format!("forward failed: {e}"))?;
    check_cache(spec, &b)?;
    let (ref_out, ref_lse) = reference(spec, &b);
    let (atol, rtol, lse_tol) =
        if T::DTYPE == attention_backend::DType::F32 { (1e-4, 0.0, 1e-4) } else { (2e-2, 1e-2, 1e-3) };
    let num_actual = b.meta.num_actual_tokens;
    let mut rep = Report::default();
    for t in 0..num_tokens {
        for h in 0..p.num_heads {
            let l = lse[[t, h]] as f64;
            if t >= num_actual {
                if !l.is_nan() || out.index_axis(Axis(0), t).iter().any(|x| !x.to_f32().is_nan()) {
                    return Err(format!("padding row {t} was written"));
                }
                continue;
            }
            let rl = ref_lse[t * p.num_heads + h];
            if l.is_nan() || (rl.is_infinite() != l.is_infinite()) {
                return Err(format!("lse[{t}][{h}] = {l}, reference {rl}"));
            }
            if rl.is_finite() {
                let e = (l - rl).abs() / rl.abs().max(1.0);
                rep.max_lse = rep.max_lse.max(e);
                if e > lse_tol {
                    return Err(format!("lse[{t}][{h}] = {l}, reference {rl}"));
                }
            }
            for d in 0..p.head_size {
                let x = out[[t, h, d]].to_f32() as f64;
                let r = ref_out[(t * p.num_heads + h) * p.head_size + d];
                if !x.is_finite() {
                    return Err(format!("out[{t}][{h}][{d}] = {x} (not written or NaN)"));
                }
                let e = (x - r).abs();
                rep.max_abs = rep.max_abs.max(e);
                if e > atol + rtol * r.abs() {
                    return Err(format!("out[{t}][{h}][{d}] = {x}, reference {r} (err {e})"));
                }
            }
        }
    }
    Ok(rep)
}

/// After `forward`, reading the cache through the block table gives back every request's dense
/// K/V (context and new tokens alike).
fn check_cache<T: Element>(spec: &Spec, b: &Built<T>) -> Result<(), String> {
    let p = &spec.params;
    let (nkv, hs, bs) = (p.num_kv_heads, p.head_size, spec.block_size);
    let (kc, vc) = (b.cache.key(), b.cache.value());
    for (r, &(_, seq_len)) in spec.reqs.iter().enumerate() {
        let row = b.meta.block_table.row(r);
        for pos in 0..seq_len {
            let (block, off) = (row[pos / bs] as usize, pos % bs);
            for h in 0..nkv {
                for d in 0..hs {
                    let i = (pos * nkv + h) * hs + d;
                    let (k, v) = (kc[[block, off, h, d]].to_f32() as f64, vc[[block, off, h, d]].to_f32() as f64);
                    if k.to_bits() != b.k_dense[r][i].to_bits() || v.to_bits() != b.v_dense[r][i].to_bits() {
                        return Err(format!("cache row of request {r} position {pos} differs from what was written"));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Runs a spec in the storage type named by `dtype`.
pub fn run_dtype(dtype: attention_backend::DType, spec: &Spec) -> Result<Report, String> {
    use attention_backend::{bf16, f16, DType};
    match dtype {
        DType::F32 => run_case::<f32>(spec),
        DType::F16 => run_case::<f16>(spec),
        DType::BF16 => run_case::<bf16>(spec),
        other => Err(format!("no test for {other}")),
    }
}
