//! FP8 KV caches (E4M3, E5M2) on every prefill kernel: the sm80 mma.sync kernel, the lockstep
//! Hopper wgmma kernel and the warp-specialised one (whose producer widens the staged FP8 tiles),
//! each forced on this thread with `with_prefill_path` (and checked to be the one the launcher
//! picks, so a device without the Hopper paths fails instead of testing sm80 twice).
//!
//! The cache bytes are built here: stored = fp8(x / scale) with x uniform in [-1, 1], so the
//! dequantised cache (to_f32(stored) * scale, what the kernels must read) is close to x whatever
//! the scale, and the float64 reference recomputes attention over exactly those dequantised values.
//! Scales are 0.05 and 3.0 (per tensor, K and V different) or one per KV head spread over that
//! range: a missing, doubled or swapped scale moves scores by a factor of 20 or 60 and the output
//! by 3x or more, far outside the tolerance.
//!
//! The unseen-positions rule: every cache row no query row can see (spare blocks, the tails of
//! last blocks, stale block-table entries, keys in the causal future or outside a window) holds
//! FP8 NaN / Inf bytes in one run and zero in another; outputs and LSE must be finite and
//! bit-identical. A few keys some rows see are poisoned too: exactly those rows must come back
//! non-finite.

use std::sync::Arc;

use attention_backend::{bf16, f16, DType, Element};
use attention_kernels::attention::{
    self, prefill_kernel_for_cache, with_prefill_path, AttentionBuffers, AttentionFeatures, AttentionKernel,
    PrefillKernel, PrefillPath,
};
use attention_kernels::cudarc::driver::CudaStream;
use attention_kernels::launch::KvScales;
use attention_kernels::{CacheElement, Fp8E4M3, Fp8E5M2, KvStorage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common;
use crate::raw::{DeviceMeta, Step};

/// The prefill tolerance of attention.rs (against the float64 recomputation).
const ATOL: f64 = 2e-2;
const RTOL: f64 = 1e-2;

/// An FP8 cache element type with its non-finite byte patterns.
trait Fp8: KvStorage<f16> + KvStorage<bf16> {
    /// Every NaN / Inf encoding the format has (E4M3: NaN only; E5M2: +-Inf and a NaN).
    const NON_FINITE: &'static [u8];
    /// The smallest positive normal value (2^-6 for E4M3, 2^-14 for E5M2).
    const MIN_NORMAL: f32;
    fn bits(b: u8) -> Self;
}

impl Fp8 for Fp8E4M3 {
    const NON_FINITE: &'static [u8] = &[0x7f, 0xff];
    const MIN_NORMAL: f32 = 1.0 / 64.0;
    fn bits(b: u8) -> Self {
        Fp8E4M3::from_bits(b)
    }
}

impl Fp8 for Fp8E5M2 {
    const NON_FINITE: &'static [u8] = &[0x7c, 0xfc, 0x7f, 0xff];
    const MIN_NORMAL: f32 = 1.0 / 16384.0;
    fn bits(b: u8) -> Self {
        Fp8E5M2::from_bits(b)
    }
}

/// One test case.
#[derive(Clone, Debug)]
struct Spec {
    heads: (usize, usize),
    head_size: usize,
    block_size: usize,
    batch: Vec<(usize, usize)>,
    causal: bool,
    window_left: Option<usize>,
    window_right: Option<usize>,
    softcap: Option<f32>,
    alibi: bool,
    sinks: bool,
    /// One scale per KV head (else one per tensor).
    per_head: bool,
    /// Swap the per-tensor K / V scales (K 3.0, V 0.05 instead of K 0.05, V 3.0).
    swap: bool,
    seed: u64,
}

impl Spec {
    fn new(heads: (usize, usize), head_size: usize, block_size: usize, batch: &[(usize, usize)], seed: u64) -> Self {
        Spec {
            heads,
            head_size,
            block_size,
            batch: batch.to_vec(),
            causal: true,
            window_left: None,
            window_right: None,
            softcap: None,
            alibi: false,
            sinks: false,
            per_head: false,
            swap: false,
            seed,
        }
    }

    fn visible(&self, pos: usize, key: usize, seq_len: usize) -> bool {
        let (p, k) = (pos as i64, key as i64);
        k < seq_len as i64
            && !(self.causal && k > p)
            && self.window_right.is_none_or(|w| k <= p + w as i64)
            && self.window_left.is_none_or(|w| k >= p - w as i64)
    }

    /// (K scales, V scales): per tensor 0.05 / 3.0 (or swapped), per head spread over [0.05, 3].
    fn scales(&self) -> (Vec<f32>, Vec<f32>) {
        let kvh = self.heads.1;
        if self.per_head {
            let spread = |i: usize, flip: bool| {
                let t = if kvh > 1 { i as f32 / (kvh - 1) as f32 } else { 0.5 };
                let t = if flip { 1.0 - t } else { t };
                0.05 * (3.0f32 / 0.05).powf(t)
            };
            ((0..kvh).map(|i| spread(i, false)).collect(), (0..kvh).map(|i| spread(i, true)).collect())
        } else if self.swap {
            (vec![3.0], vec![0.05])
        } else {
            (vec![0.05], vec![3.0])
        }
    }
}

/// The prefill kernel `path` selects for `head_size` with an FP8 cache, checked to be the expected
/// one for both compute types and both FP8 formats.
fn on_path<R>(path: PrefillPath, head_size: usize, f: impl FnOnce() -> R) -> R {
    with_prefill_path(path, || {
        let ctx = common::device().context();
        let want = match path {
            PrefillPath::Sm90 => PrefillKernel::Sm90,
            PrefillPath::Sm90Ws => PrefillKernel::Sm90Ws,
            _ => PrefillKernel::Sm80,
        };
        for dt in [DType::F16, DType::BF16] {
            for cache in [DType::Fp8E4M3, DType::Fp8E5M2] {
                let k = prefill_kernel_for_cache(ctx, head_size, dt, cache)
                    .unwrap_or_else(|e| panic!("{path:?} prefill unavailable: {e}"));
                assert_eq!(k, want, "head size {head_size} {dt} {cache} cache does not run the {want:?} prefill");
            }
        }
        f()
    })
}

/// The GPU result of one launch: output rows and LSE.
struct Gpu<T> {
    out: Vec<T>,
    lse: Vec<f32>,
}

/// Runs the prefill kernel over every request of `step` on the given cache contents.
#[allow(clippy::too_many_arguments)]
fn launch<T: Element, C: Fp8 + KvStorage<T>>(
    stream: &Arc<CudaStream>,
    step: &Step,
    spec: &Spec,
    query: &[T],
    keys: &[C],
    values: &[C],
    scales: &(Vec<f32>, Vec<f32>),
    alibi: &[f32],
    sinks: &[f32],
) -> Gpu<T> {
    let (h, d) = (step.num_heads, step.head_size);
    let nt = step.num_tokens;
    let meta = DeviceMeta::upload(stream, step);
    let q = stream.clone_htod(query).unwrap();
    let kc = stream.clone_htod(keys).unwrap();
    let vc = stream.clone_htod(values).unwrap();
    let ks = stream.clone_htod(&scales.0).unwrap();
    let vs = stream.clone_htod(&scales.1).unwrap();
    let mut out = stream.clone_htod(&vec![T::from_f32(f32::NAN); nt * h * d]).unwrap();
    let mut lse = stream.clone_htod(&vec![f32::NAN; nt * h]).unwrap();
    let features = AttentionFeatures {
        scale: 1.0 / (d as f32).sqrt(),
        causal: spec.causal,
        window_left: spec.window_left,
        window_right: spec.window_right,
        softcap: spec.softcap,
        alibi_slopes: spec.alibi.then_some(alibi),
        sinks: spec.sinks.then_some(sinks),
    };
    let bufs = AttentionBuffers::<T, C> {
        query: q.as_view(),
        key_cache: kc.as_view(),
        value_cache: vc.as_view(),
        kv_scales: Some(KvScales { key: ks.as_view(), value: vs.as_view() }),
        query_start_loc: meta.query_start_loc.as_view(),
        seq_lens: meta.seq_lens.as_view(),
        block_table: meta.block_table.as_view(),
        out: out.as_view_mut(),
        lse: Some(lse.as_view_mut()),
        workspace: None,
        strides: step.contiguous_strides(),
    };
    let max_query_len = step.batch.iter().map(|&(q, _)| q).max().unwrap_or(0);
    attention::paged_attention(
        stream,
        AttentionKernel::Prefill { max_query_len, max_sms: 0 },
        &step.dims(0, step.batch.len()),
        &features,
        bufs,
    )
    .unwrap_or_else(|e| panic!("FP8 prefill launch failed: {e}"));
    Gpu { out: stream.clone_dtoh(&out).unwrap(), lse: stream.clone_dtoh(&lse).unwrap() }
}

/// Shared inputs of a case: the step, the query and a cache of `fp8(x / scale)` values.
struct Inputs<T, C> {
    step: Step,
    query: Vec<T>,
    keys: Vec<C>,
    values: Vec<C>,
    scales: (Vec<f32>, Vec<f32>),
    alibi: Vec<f32>,
    sinks: Vec<f32>,
}

fn inputs<T: Element, C: Fp8>(spec: &Spec, rng: &mut StdRng) -> Inputs<T, C> {
    let step = Step::new(spec.heads, spec.head_size, spec.block_size, &spec.batch, 3, rng);
    let scales = spec.scales();
    let (kvh, d) = (step.num_kv_heads, step.head_size);
    let n = step.num_blocks * step.block_size * kvh * d;
    let quant = |rng: &mut StdRng, sc: &[f32], i: usize| {
        let head = (i / d) % kvh;
        let s = if sc.len() > 1 { sc[head] } else { sc[0] };
        C::from_f32(rng.random_range(-1.0f32..1.0) / s)
    };
    let keys: Vec<C> = (0..n).map(|i| quant(rng, &scales.0, i)).collect();
    let values: Vec<C> = (0..n).map(|i| quant(rng, &scales.1, i)).collect();
    let query = test_suite::inputs::values::<T>(rng, step.num_tokens * step.num_heads * d);
    let h = step.num_heads;
    let alibi = (0..h).map(|i| 2f32.powf(-8.0 * (i + 1) as f32 / h as f32)).collect();
    let sinks = (0..h).map(|_| rng.random_range(-2.0..4.0f32)).collect();
    Inputs { step, query, keys, values, scales, alibi, sinks }
}

/// Float64 attention of token `t`, head `hh` over the dequantised cache: (output row, LSE).
fn reference<T: Element, C: CacheElement>(spec: &Spec, inp: &Inputs<T, C>, t: usize, hh: usize) -> (Vec<f64>, f64) {
    let step = &inp.step;
    let (h, kvh, d) = (step.num_heads, step.num_kv_heads, step.head_size);
    let kv_head = hh / (h / kvh);
    let pick = |sc: &[f32]| f64::from(if sc.len() > 1 { sc[kv_head] } else { sc[0] });
    let (ks, vs) = (pick(&inp.scales.0), pick(&inp.scales.1));
    let (r, i) = step.row_of(t);
    let (q_len, kv) = step.batch[r];
    let pos = kv - q_len + i;
    let scale = 1.0 / (d as f64).sqrt();
    let qrow = &inp.query[(t * h + hh) * d..(t * h + hh + 1) * d];
    let mut scores = Vec::new();
    for key in 0..kv {
        if !spec.visible(pos, key, kv) {
            continue;
        }
        let base = (step.slot(r, key) * kvh + kv_head) * d;
        let mut dot = 0.0f64;
        for (qe, ke) in qrow.iter().zip(&inp.keys[base..base + d]) {
            dot += f64::from(qe.to_f32()) * f64::from(ke.to_f32()) * ks;
        }
        let mut s = dot * scale;
        if let Some(cap) = spec.softcap {
            let cap = f64::from(cap);
            s = cap * (s / cap).tanh();
        }
        if spec.alibi {
            s -= f64::from(inp.alibi[hh]) * (pos as f64 - key as f64).abs();
        }
        scores.push((key, s));
    }
    let sink = spec.sinks.then(|| f64::from(inp.sinks[hh]));
    let m = scores.iter().map(|&(_, s)| s).chain(sink).fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return (vec![0.0; d], f64::NEG_INFINITY);
    }
    let mut denom = sink.map_or(0.0, |s| (s - m).exp());
    let mut out = vec![0.0f64; d];
    for &(key, s) in &scores {
        let w = (s - m).exp();
        denom += w;
        let base = (step.slot(r, key) * kvh + kv_head) * d;
        for (o, ve) in out.iter_mut().zip(&inp.values[base..base + d]) {
            *o += w * f64::from(ve.to_f32()) * vs;
        }
    }
    for o in &mut out {
        *o /= denom;
    }
    (out, m + denom.ln())
}

fn close(x: f64, r: f64) -> bool {
    if r == f64::NEG_INFINITY {
        return x == f64::NEG_INFINITY;
    }
    x.is_finite() && (x - r).abs() <= ATOL + RTOL * r.abs()
}

/// One case against the float64 recomputation over the dequantised cache.
fn check<T: Element, C: Fp8 + KvStorage<T>>(spec: &Spec) {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let inp = inputs::<T, C>(spec, &mut rng);
    check_inputs(spec, &inp);
}

/// The launch of `inp` against the float64 recomputation over its dequantised cache.
fn check_inputs<T: Element, C: Fp8 + KvStorage<T>>(spec: &Spec, inp: &Inputs<T, C>) {
    let stream = common::stream();
    let got = launch::<T, C>(
        &stream,
        &inp.step,
        spec,
        &inp.query,
        &inp.keys,
        &inp.values,
        &inp.scales,
        &inp.alibi,
        &inp.sinks,
    );
    let (h, d) = (inp.step.num_heads, inp.step.head_size);
    let what = format!("{} cache, {} compute: {spec:?}", C::DTYPE, T::DTYPE);
    for t in 0..inp.step.num_tokens {
        for hh in 0..h {
            let (want, lse) = reference(spec, inp, t, hh);
            let got_lse = f64::from(got.lse[t * h + hh]);
            assert!(close(got_lse, lse), "token {t} head {hh}: lse {got_lse}, want {lse} ({what})");
            for (e, &w) in want.iter().enumerate() {
                let x = f64::from(got.out[(t * h + hh) * d + e].to_f32());
                assert!(close(x, w), "token {t} head {hh} elem {e}: got {x}, want {w} ({what})");
            }
        }
    }
}

/// The four format x compute-type combinations of one spec.
fn check_all(spec: &Spec) {
    check::<f16, Fp8E4M3>(spec);
    check::<bf16, Fp8E4M3>(spec);
    check::<f16, Fp8E5M2>(spec);
    check::<bf16, Fp8E5M2>(spec);
}

/// Which FP8 codes fill the cache in [`every_code`].
#[derive(Clone, Copy, Debug)]
enum Codes {
    /// The subnormal codes of both signs (exponent field zero, mantissa not).
    Subnormal,
    /// Every finite code.
    Finite,
}

/// The prefill kernels widen every staged FP8 tile to the compute type before the tensor-core
/// step, and that widening must be exact for every finite code. Here every K and V byte is drawn
/// from one class of codes, with scales that map the class's largest magnitude to 8 (K: scores
/// spread widely, so a wrong key moves the softmax) and 4 (V), so a code widened wrong -- a
/// subnormal flushed to zero, a wrong exponent at either end of the range -- moves outputs far
/// past the tolerance. Subnormal codes are rare in the other tests' caches (a few in a thousand)
/// and their weight there is below the tolerance.
fn every_code<T: Element, C: Fp8 + KvStorage<T>>(spec: &Spec, codes: Codes) {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut inp = inputs::<T, C>(spec, &mut rng);
    let class: Vec<C> = (0..=255u8)
        .map(C::bits)
        .filter(|c| {
            let x = c.to_f32();
            match codes {
                Codes::Subnormal => x != 0.0 && x.abs() < C::MIN_NORMAL,
                Codes::Finite => x.is_finite(),
            }
        })
        .collect();
    let max = class.iter().map(|c| c.to_f32().abs()).fold(0.0f32, f32::max);
    assert!(class.len() > 4 && max > 0.0, "{codes:?}: {} codes", class.len());
    for x in inp.keys.iter_mut().chain(inp.values.iter_mut()) {
        *x = class[rng.random_range(0..class.len())];
    }
    inp.scales = (vec![8.0 / max], vec![4.0 / max]);
    check_inputs(spec, &inp);
}

fn every_code_all(path: PrefillPath, head_sizes: &[usize], seed0: u64) {
    let mut seed = seed0;
    for &d in head_sizes {
        on_path(path, d, || {
            for codes in [Codes::Subnormal, Codes::Finite] {
                seed += 1;
                let s = Spec::new((8, 2), d, 16, &[(37, 37), (129, 300), (64, 200)], seed);
                every_code::<f16, Fp8E4M3>(&s, codes);
                every_code::<bf16, Fp8E4M3>(&s, codes);
                every_code::<f16, Fp8E5M2>(&s, codes);
                every_code::<bf16, Fp8E5M2>(&s, codes);
            }
        });
    }
}

/// Causal prefill of several requests of different lengths, including chunked prefills over a
/// prefix-cached context: head sizes x blocks 16 / 64 x both formats and compute types, per-tensor
/// and per-head scales alternating.
fn grid(path: PrefillPath, head_sizes: &[usize], seed0: u64) {
    let batch: &[(usize, usize)] = &[(37, 37), (200, 200), (64, 400), (129, 300), (64, 1000), (5, 77)];
    let mut seed = seed0;
    for &d in head_sizes {
        on_path(path, d, || {
            for (i, bs) in [16, 64].into_iter().enumerate() {
                // GQA 32/8 (the bench shape's heads) on block 16, 8/2 on the longer batch otherwise.
                let (heads, batch) = if i == 0 { ((32, 8), &batch[..3]) } else { ((8, 2), batch) };
                seed += 1;
                let mut s = Spec::new(heads, d, bs, batch, seed);
                s.per_head = i == 1;
                s.swap = d == 128;
                check_all(&s);
            }
        });
    }
}

/// Sliding window, soft-cap, ALiBi, sinks (with LSE, as every case), MQA and GQA 32/8,
/// non-causal windows, per-tensor and per-head scales.
fn features(path: PrefillPath, head_sizes: &[usize], seed0: u64) {
    let batch: &[(usize, usize)] = &[(70, 150), (1, 9), (130, 130), (33, 500)];
    let mut seed = seed0;
    for &d in head_sizes {
        on_path(path, d, || {
            for (v, heads) in [(8, 1), (32, 8), (8, 2), (16, 1)].into_iter().enumerate() {
                seed += 1;
                let bs = [16, 64][v % 2];
                let mut s = Spec::new(heads, d, bs, batch, seed);
                s.per_head = v % 2 == 1;
                s.swap = v == 2;
                match v {
                    0 => {
                        s.window_left = Some(40);
                        s.softcap = Some(30.0);
                        s.alibi = true;
                        s.sinks = true;
                    }
                    1 => {
                        s.window_left = Some(100);
                        s.window_right = Some(0);
                        s.sinks = true;
                        s.softcap = Some(10.0);
                    }
                    2 => {
                        s.causal = false;
                        s.window_left = Some(37);
                        s.window_right = Some(5);
                        s.alibi = true;
                    }
                    _ => {
                        s.causal = false;
                        s.softcap = Some(20.0);
                        s.sinks = true;
                    }
                }
                check_all(&s);
            }
        });
    }
}

/// Poisons with FP8 NaN / Inf bytes every cache row no query row sees, and a few keys some rows see
/// (the last key of each request, an early key left of later rows' windows), then compares against
/// the run with those rows zeroed: rows that see no poisoned key are finite and bit-identical
/// (output and LSE); rows that see one are non-finite.
fn unseen<T: Element, C: Fp8 + KvStorage<T>>(spec: &Spec) {
    let stream = common::stream();
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let inp = inputs::<T, C>(spec, &mut rng);
    let step = &inp.step;
    let (h, kvh, d) = (step.num_heads, step.num_kv_heads, step.head_size);
    let row = kvh * d;
    let n_slots = step.num_blocks * step.block_size;
    let mut seen = vec![false; n_slots];
    for (r, &(q, kv)) in step.batch.iter().enumerate() {
        for key in 0..kv {
            seen[step.slot(r, key)] = (0..q).any(|i| spec.visible(kv - q + i, key, kv));
        }
    }
    let mut poisoned: Vec<bool> = seen.iter().map(|&s| !s).collect();
    for (r, &(_, kv)) in step.batch.iter().enumerate() {
        poisoned[step.slot(r, kv - 1)] = true;
        // An early key is left of later rows' windows only with a window; without one every row
        // of a fully cached request would see it and no clean row would be left to compare.
        if kv > 8 && spec.window_left.is_some() {
            poisoned[step.slot(r, rng.random_range(0..4))] = true;
        }
    }
    let (mut kp, mut vp, mut kz, mut vz) = (inp.keys.clone(), inp.values.clone(), inp.keys.clone(), inp.values.clone());
    let zero = C::from_f32(0.0);
    for s in (0..n_slots).filter(|&s| poisoned[s]) {
        for e in s * row..(s + 1) * row {
            kp[e] = C::bits(C::NON_FINITE[rng.random_range(0..C::NON_FINITE.len())]);
            vp[e] = C::bits(C::NON_FINITE[rng.random_range(0..C::NON_FINITE.len())]);
            kz[e] = zero;
            vz[e] = zero;
        }
    }
    let a = launch::<T, C>(&stream, step, spec, &inp.query, &kp, &vp, &inp.scales, &inp.alibi, &inp.sinks);
    let b = launch::<T, C>(&stream, step, spec, &inp.query, &kz, &vz, &inp.scales, &inp.alibi, &inp.sinks);
    let what = format!("{} cache, {} compute: {spec:?}", C::DTYPE, T::DTYPE);
    let (mut clean_rows, mut bad_rows) = (0, 0);
    for t in 0..step.num_tokens {
        let (r, i) = step.row_of(t);
        let (q, kv) = step.batch[r];
        let pos = kv - q + i;
        let sees_poison = (0..kv).any(|key| spec.visible(pos, key, kv) && poisoned[step.slot(r, key)]);
        for hh in 0..h {
            let at = (t * h + hh) * d;
            let (oa, ob) = (&a.out[at..at + d], &b.out[at..at + d]);
            if sees_poison {
                bad_rows += 1;
                assert!(
                    oa.iter().all(|x| !x.to_f32().is_finite()),
                    "token {t} head {hh} sees a poisoned key but has finite outputs ({what})"
                );
            } else {
                clean_rows += 1;
                let (la, lb) = (a.lse[t * h + hh], b.lse[t * h + hh]);
                assert!(la.to_bits() == lb.to_bits(), "token {t} head {hh}: lse {la} vs {lb} ({what})");
                for e in 0..d {
                    let (x, y) = (oa[e].to_f32(), ob[e].to_f32());
                    assert!(
                        x.is_finite() && x.to_bits() == y.to_bits(),
                        "token {t} head {hh} elem {e}: {x} with poisoned unseen rows, {y} with them zeroed ({what})"
                    );
                }
            }
        }
    }
    assert!(clean_rows > 0 && bad_rows > 0, "both row classes must occur ({clean_rows} clean / {bad_rows} bad)");
}

fn unseen_all(path: PrefillPath, head_sizes: &[usize], seed0: u64) {
    let batch: &[(usize, usize)] = &[(70, 150), (130, 130), (33, 500), (200, 260)];
    let mut seed = seed0;
    for &d in head_sizes {
        on_path(path, d, || {
            for bs in [16, 64] {
                for v in 0..2 {
                    seed += 1;
                    let mut s = Spec::new((8, 2), d, bs, batch, seed);
                    s.per_head = v == 1;
                    if v == 1 {
                        s.window_left = Some(48);
                        s.softcap = Some(25.0);
                    }
                    unseen::<f16, Fp8E4M3>(&s);
                    unseen::<bf16, Fp8E4M3>(&s);
                    unseen::<f16, Fp8E5M2>(&s);
                    unseen::<bf16, Fp8E5M2>(&s);
                }
            }
        });
    }
}

const SM80_HEADS: [usize; 3] = [64, 128, 256];
const SM90_HEADS: [usize; 2] = [64, 128];

#[test]
fn fp8_prefill_sm80_grid() {
    grid(PrefillPath::Sm80, &SM80_HEADS, 31_000);
}

#[test]
fn fp8_prefill_sm90_grid() {
    grid(PrefillPath::Sm90, &SM90_HEADS, 32_000);
}

#[test]
fn fp8_prefill_sm80_odd_head_sizes() {
    // The remaining sm80 head sizes (FP8 rows of 80 / 112 bytes: 5 and 7 vectors), one case each.
    for (i, d) in [80, 96, 112, 192].into_iter().enumerate() {
        on_path(PrefillPath::Sm80, d, || {
            let mut s = Spec::new((8, 2), d, [16, 64][i % 2], &[(37, 37), (129, 300)], 33_000 + i as u64);
            s.per_head = i % 2 == 0;
            check_all(&s);
        });
    }
}

#[test]
fn fp8_prefill_sm80_features() {
    features(PrefillPath::Sm80, &SM80_HEADS, 34_000);
}

#[test]
fn fp8_prefill_sm90_features() {
    features(PrefillPath::Sm90, &SM90_HEADS, 35_000);
}

#[test]
fn fp8_prefill_sm90ws_grid() {
    grid(PrefillPath::Sm90Ws, &SM90_HEADS, 32_500);
}

#[test]
fn fp8_prefill_sm90ws_features() {
    features(PrefillPath::Sm90Ws, &SM90_HEADS, 35_500);
}

#[test]
fn fp8_prefill_sm90ws_unseen_positions() {
    unseen_all(PrefillPath::Sm90Ws, &SM90_HEADS, 37_500);
}

/// The warp-specialised kernel's FP8 producer (staging, widening, sanitising, barrier phases over
/// several stage reuses) under compute-sanitizer: one GQA case per head size, both formats.
#[test]
fn sanitizer_subset_fp8_sm90ws_prefill() {
    for (i, d) in SM90_HEADS.into_iter().enumerate() {
        on_path(PrefillPath::Sm90Ws, d, || {
            let mut s = Spec::new((8, 2), d, 16, &[(129, 700), (64, 64)], 38_000 + i as u64);
            s.per_head = i == 1;
            check_all(&s);
        });
    }
}

#[test]
fn fp8_prefill_sm80_unseen_positions() {
    unseen_all(PrefillPath::Sm80, &SM80_HEADS, 36_000);
}

#[test]
fn fp8_prefill_sm90_unseen_positions() {
    unseen_all(PrefillPath::Sm90, &SM90_HEADS, 37_000);
}

#[test]
fn fp8_prefill_sm80_every_code() {
    every_code_all(PrefillPath::Sm80, &[64, 128], 39_000);
}

#[test]
fn fp8_prefill_sm90_every_code() {
    every_code_all(PrefillPath::Sm90, &SM90_HEADS, 39_100);
}

#[test]
fn fp8_prefill_sm90ws_every_code() {
    every_code_all(PrefillPath::Sm90Ws, &SM90_HEADS, 39_200);
}
