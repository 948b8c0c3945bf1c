//! Paged attention on the GPU against an independent float64 recomputation (written here) and the
//! CPU backend, over ACCEPTANCE.md's grid, feature cases, and proptest-drawn mixed batches.
//!
//! Every case draws fresh random inputs; the GPU cache lives in a large pool of blocks handed out
//! in shuffled order, with stale junk past each block-table row; the CPU backend gets the same
//! logical keys and values in a compact cache of its own (the pool would not fit in host memory).
//! Outputs and LSE are poisoned with NaN before the run: real rows must come back finite and within
//! tolerance, padding rows must still hold the poison.

use attention_backend::cuda::{self, AttentionWorkspace, CudaKvCache, DeviceMetadata, DeviceTensor};
use attention_backend::ndarray::{Array2, Array3, ArrayView3};
use attention_backend::{
    bf16, cpu, f16, AttentionError, AttentionMetadata, AttentionParams, BlockTable, CacheLayout, CpuKvCache, Element,
    SlotMapping,
};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

use crate::common;

/// Tolerance against the references (ACCEPTANCE.md): |x - ref| <= ATOL + RTOL * |ref|.
const ATOL: f64 = 2e-2;
const RTOL: f64 = 1e-2;
/// LSE is f32 on both sides from the same rounded inputs.
const LSE_ATOL: f64 = 5e-3;
/// Query rows per request checked against the float64 recomputation (all rows when fewer), at
/// most this many, and fewer for long requests (see `f64_rows`).
const F64_ROWS_PER_REQ: usize = 48;

/// Rows of a request to recompute in float64: a budget of about 32 Mi multiply-adds per request,
/// at least 4 rows (always including the first and the last).
fn f64_rows(kv_len: usize, heads: usize, d: usize) -> usize {
    ((32usize << 20) / (kv_len * heads * d * 2).max(1)).clamp(4, F64_ROWS_PER_REQ)
}

#[derive(Clone, Debug)]
pub(crate) struct Case {
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_size: usize,
    pub(crate) block_size: usize,
    /// Blocks of the GPU pool (capped so one cache stays under 64 Mi elements).
    pub(crate) num_blocks: usize,
    /// (q_len, kv_len) per request, decodes first.
    pub(crate) batch: Vec<(usize, usize)>,
    /// Padding tokens after the real ones (slot -1).
    pub(crate) padding: usize,
    pub(crate) params: AttentionParams,
    pub(crate) lse: bool,
    /// Scale of the query values (large values make the soft-cap bite).
    pub(crate) q_amp: f32,
    /// Leading requests with q_len <= this are decodes.
    pub(crate) decode_threshold: usize,
    /// Go through `forward` (cache write of the new tokens) instead of `paged_attention`.
    pub(crate) use_forward: bool,
    pub(crate) seed: u64,
}

impl Case {
    pub(crate) fn new(
        heads: (usize, usize),
        head_size: usize,
        block_size: usize,
        batch: &[(usize, usize)],
        seed: u64,
    ) -> Self {
        let seed = seed ^ run_seed();
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        let cap = (64usize << 20) / (block_size * heads.1 * head_size);
        let num_blocks = rng.random_range(2048..=32768usize).min(cap).max(2048);
        Case {
            num_heads: heads.0,
            num_kv_heads: heads.1,
            head_size,
            block_size,
            num_blocks,
            batch: batch.to_vec(),
            padding: 0,
            params: AttentionParams::new(heads.0, heads.1, head_size),
            lse: true,
            q_amp: 1.0,
            decode_threshold: 1,
            use_forward: false,
            seed,
        }
    }
    pub(crate) fn softcap(mut self, cap: Option<f32>) -> Self {
        self.params = self.params.with_softcap(cap);
        if cap.is_some() {
            self.q_amp = 4.0;
        }
        self
    }
    pub(crate) fn sliding(mut self, window: Option<usize>) -> Self {
        if let Some(w) = window {
            self.params = self.params.with_sliding_window(w);
        }
        self
    }
}

/// The run's seed: `PAGED_ATTN_SEED` when set, else fresh; printed so a failure can be replayed.
fn run_seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        let s = std::env::var("PAGED_ATTN_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
        eprintln!("attention tests: PAGED_ATTN_SEED={s}");
        s
    })
}

fn uniform<T: Element>(rng: &mut StdRng, n: usize, amp: f32) -> Vec<T> {
    (0..n).map(|_| T::from_f32(rng.random_range(-amp..amp))).collect()
}

struct Prepared<T: Element> {
    query: Vec<T>,
    /// Per request, `[kv_len, num_kv_heads, head_size]`.
    keys: Vec<Vec<T>>,
    values: Vec<Vec<T>>,
    meta: AttentionMetadata,
    cpu_meta: AttentionMetadata,
    cpu_cache: CpuKvCache<T>,
    /// GPU-layout slots of every key of every request, in request order.
    all_slots: Vec<i64>,
    num_tokens: usize,
}

fn prepare<T: Element>(case: &Case, rng: &mut StdRng) -> Prepared<T> {
    let (h, kvh, d, bs) = (case.num_heads, case.num_kv_heads, case.head_size, case.block_size);
    let row = kvh * d;
    let blocks_of = |kv: usize| kv.div_ceil(bs);
    let total_blocks: usize = case.batch.iter().map(|&(_, kv)| blocks_of(kv)).sum();
    assert!(total_blocks <= case.num_blocks, "pool too small for {case:?}");
    let mut pool: Vec<i32> = (0..case.num_blocks as i32).collect();
    pool.shuffle(rng);
    let width = case.batch.iter().map(|&(_, kv)| blocks_of(kv)).max().unwrap_or(0) + rng.random_range(0..3usize);
    let mut table = Vec::with_capacity(case.batch.len() * width);
    let mut cpu_table = Vec::with_capacity(case.batch.len() * width);
    let (mut next, mut cpu_next) = (0usize, 0i32);
    for &(_, kv) in &case.batch {
        let n = blocks_of(kv);
        table.extend_from_slice(&pool[next..next + n]);
        next += n;
        for _ in n..width {
            // Stale entries past the used blocks: never read.
            table.push(*[-1, i32::MAX, 7].choose(rng).unwrap());
        }
        for j in 0..width {
            cpu_table.push(if j < n { cpu_next + j as i32 } else { 0 });
        }
        cpu_next += n as i32;
    }
    let mut qsl = vec![0i32];
    let mut seq_lens = Vec::new();
    let (mut slots, mut cpu_slots, mut all_slots) = (Vec::new(), Vec::new(), Vec::new());
    for (r, &(q, kv)) in case.batch.iter().enumerate() {
        qsl.push(qsl[r] + q as i32);
        seq_lens.push(kv as i32);
        for j in 0..kv {
            let s = table[r * width + j / bs] as i64 * bs as i64 + (j % bs) as i64;
            all_slots.push(s);
            if j >= kv - q {
                slots.push(s);
                cpu_slots.push(cpu_table[r * width + j / bs] as i64 * bs as i64 + (j % bs) as i64);
            }
        }
    }
    slots.extend(std::iter::repeat_n(-1, case.padding));
    cpu_slots.extend(std::iter::repeat_n(-1, case.padding));
    let num_tokens = slots.len();
    let meta = AttentionMetadata::new(
        qsl.clone(),
        seq_lens.clone(),
        BlockTable::new(table, case.batch.len(), width).unwrap(),
        SlotMapping::new(slots),
        case.decode_threshold,
    )
    .unwrap();
    let cpu_meta = AttentionMetadata::new(
        qsl,
        seq_lens,
        BlockTable::new(cpu_table, case.batch.len(), width).unwrap(),
        SlotMapping::new(cpu_slots),
        case.decode_threshold,
    )
    .unwrap();

    let query = uniform::<T>(rng, num_tokens * h * d, 2.0 * case.q_amp);
    let keys: Vec<Vec<T>> = case.batch.iter().map(|&(_, kv)| uniform::<T>(rng, kv * row, 2.0)).collect();
    let values: Vec<Vec<T>> = case.batch.iter().map(|&(_, kv)| uniform::<T>(rng, kv * row, 2.0)).collect();

    let cpu_layout = CacheLayout::new((cpu_next as usize).max(1), bs, kvh, d).unwrap();
    let mut cpu_cache = CpuKvCache::<T>::zeros(cpu_layout).unwrap();
    {
        let (mut kc, mut vc) = cpu_cache.key_value_mut();
        let mut blk = 0usize;
        for (r, &(_, kv)) in case.batch.iter().enumerate() {
            for j in 0..kv {
                let b = blk + j / bs;
                for x in 0..kvh {
                    for e in 0..d {
                        kc[[b, j % bs, x, e]] = keys[r][(j * kvh + x) * d + e];
                        vc[[b, j % bs, x, e]] = values[r][(j * kvh + x) * d + e];
                    }
                }
            }
            blk += blocks_of(kv);
        }
    }
    Prepared { query, keys, values, meta, cpu_meta, cpu_cache, all_slots, num_tokens }
}

/// Which row [`reference_row`] computes: query row `i` of a request with `q_len` new tokens and
/// `kv_len` keys, for query head `head`.
#[derive(Clone, Copy)]
struct RowAt {
    q_len: usize,
    kv_len: usize,
    i: usize,
    head: usize,
}

/// Independent float64 attention of one query row of one head.
fn reference_row<T: Element>(case: &Case, q: &[T], keys: &[T], values: &[T], at: RowAt) -> (Vec<f64>, f64) {
    let RowAt { q_len, kv_len, i, head } = at;
    let p = &case.params;
    let (kvh, d) = (case.num_kv_heads, case.head_size);
    let kv_head = head / (case.num_heads / kvh);
    let pos = (kv_len - q_len + i) as i64;
    let mut scores: Vec<(usize, f64)> = Vec::new();
    for j in 0..kv_len {
        let jj = j as i64;
        if p.causal && jj > pos {
            continue;
        }
        if let Some(w) = p.window_right {
            if jj > pos + w as i64 {
                continue;
            }
        }
        if let Some(w) = p.window_left {
            if jj < pos - w as i64 {
                continue;
            }
        }
        let k = &keys[(j * kvh + kv_head) * d..(j * kvh + kv_head + 1) * d];
        let mut s: f64 = q.iter().zip(k).map(|(a, b)| a.to_f32() as f64 * b.to_f32() as f64).sum();
        s *= p.scale as f64;
        if let Some(cap) = p.softcap {
            s = cap as f64 * (s / cap as f64).tanh();
        }
        if let Some(sl) = &p.alibi_slopes {
            s -= sl[head] as f64 * (pos - jj).abs() as f64;
        }
        scores.push((j, s));
    }
    let sink = p.sinks.as_ref().map(|s| s[head] as f64);
    let m = scores.iter().map(|x| x.1).chain(sink).fold(f64::NEG_INFINITY, f64::max);
    let mut out = vec![0.0f64; d];
    if m == f64::NEG_INFINITY {
        return (out, f64::NEG_INFINITY);
    }
    let mut denom = sink.map_or(0.0, |s| (s - m).exp());
    for &(j, s) in &scores {
        let w = (s - m).exp();
        denom += w;
        let v = &values[(j * kvh + kv_head) * d..(j * kvh + kv_head + 1) * d];
        for e in 0..d {
            out[e] += w * v[e].to_f32() as f64;
        }
    }
    for o in &mut out {
        *o /= denom;
    }
    (out, m + denom.ln())
}

fn close(x: f64, r: f64, atol: f64) -> bool {
    if r == f64::NEG_INFINITY {
        return x == f64::NEG_INFINITY;
    }
    x.is_finite() && (x - r).abs() <= atol + RTOL * r.abs()
}

/// Runs one case on the GPU and checks it against the CPU backend and the f64 recomputation.
pub(crate) fn run_case<T: Element>(case: &Case) {
    let dev = common::device();
    let mut rng = StdRng::seed_from_u64(case.seed);
    let prep = prepare::<T>(case, &mut rng);
    let (h, kvh, d) = (case.num_heads, case.num_kv_heads, case.head_size);
    let nt = prep.num_tokens;
    let layout = CacheLayout::new(case.num_blocks, case.block_size, kvh, d).unwrap();

    // GPU cache: every key of every request written through the cache-write kernel (or all but the
    // new tokens, which `forward` writes).
    let mut cache = CudaKvCache::<T>::zeros(dev, layout).unwrap();
    {
        let (mut ks, mut vs, mut ss) = (Vec::new(), Vec::new(), Vec::new());
        let mut at = 0;
        for (r, &(q, kv)) in case.batch.iter().enumerate() {
            let upto = if case.use_forward { kv - q } else { kv };
            ks.extend_from_slice(&prep.keys[r][..upto * kvh * d]);
            vs.extend_from_slice(&prep.values[r][..upto * kvh * d]);
            ss.extend_from_slice(&prep.all_slots[at..at + upto]);
            at += kv;
        }
        if !ss.is_empty() {
            let n = ss.len();
            let kt = DeviceTensor::from_host(dev, &ks, &[n, kvh, d]).unwrap();
            let vt = DeviceTensor::from_host(dev, &vs, &[n, kvh, d]).unwrap();
            let sm = cuda::DeviceSlotMapping::upload(dev, &SlotMapping::new(ss)).unwrap();
            cuda::kv_cache_update(dev, &kt, &vt, &mut cache, &sm).unwrap();
        }
    }
    let meta = DeviceMetadata::upload(dev, &prep.meta).unwrap();
    let query = DeviceTensor::from_host(dev, &prep.query, &[nt, h, d]).unwrap();
    let nan = T::from_f32(f32::NAN);
    let mut out = DeviceTensor::from_host(dev, &vec![nan; nt * h * d], &[nt, h, d]).unwrap();
    let mut lse = DeviceTensor::<f32>::from_host(dev, &vec![f32::NAN; nt * h], &[nt, h]).unwrap();
    let mut ws = AttentionWorkspace::new();
    let lse_arg = if case.lse { Some(&mut lse) } else { None };
    if case.use_forward {
        // The new tokens' K/V, packed like the query.
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for (r, &(q, kv)) in case.batch.iter().enumerate() {
            ks.extend_from_slice(&prep.keys[r][(kv - q) * kvh * d..]);
            vs.extend_from_slice(&prep.values[r][(kv - q) * kvh * d..]);
        }
        ks.extend(uniform::<T>(&mut rng, case.padding * kvh * d, 2.0));
        vs.extend(uniform::<T>(&mut rng, case.padding * kvh * d, 2.0));
        let kt = DeviceTensor::from_host(dev, &ks, &[nt, kvh, d]).unwrap();
        let vt = DeviceTensor::from_host(dev, &vs, &[nt, kvh, d]).unwrap();
        cuda::forward(
            dev,
            &meta,
            &case.params,
            cuda::ForwardIo { query: &query, key: &kt, value: &vt, cache: &mut cache, out: &mut out, lse: lse_arg },
            &mut ws,
        )
        .unwrap();
    } else {
        cuda::paged_attention(
            dev,
            &meta,
            &case.params,
            cuda::AttentionIo { query: &query, cache: &cache, out: &mut out, lse: lse_arg },
            &mut ws,
        )
        .unwrap();
    }
    let got = out.to_host(dev).unwrap();
    let got_lse = lse.to_host(dev).unwrap();

    // CPU backend.
    let qv = ArrayView3::from_shape((nt, h, d), &prep.query[..]).unwrap();
    let mut cpu_out = Array3::<T>::from_elem((nt, h, d), nan);
    let mut cpu_lse = Array2::<f32>::from_elem((nt, h), f32::NAN);
    cpu::paged_attention(
        &prep.cpu_meta,
        &case.params,
        cpu::AttentionIo {
            query: qv,
            cache: &prep.cpu_cache,
            out: cpu_out.view_mut(),
            lse: if case.lse { Some(cpu_lse.view_mut()) } else { None },
        },
    )
    .unwrap();
    let cpu_out = cpu_out.into_raw_vec_and_offset().0;
    let cpu_lse = cpu_lse.into_raw_vec_and_offset().0;

    let ctx = |what: &str, t: usize, hh: usize, e: usize, x: f64, r: f64| {
        format!(
            "{what} mismatch at token {t} head {hh} elem {e}: gpu {x} vs ref {r}; case heads {h}/{kvh} d {d} bs {} \
             dtype {:?} batch {:?} softcap {:?} window ({:?},{:?}) alibi {} sinks {} causal {} seed {}",
            case.block_size,
            T::DTYPE,
            case.batch,
            case.params.softcap,
            case.params.window_left,
            case.params.window_right,
            case.params.alibi_slopes.is_some(),
            case.params.sinks.is_some(),
            case.params.causal,
            case.seed
        )
    };

    let real = prep.meta.num_actual_tokens;
    // Every real row written, finite, and close to the CPU backend; padding rows untouched.
    for t in 0..nt {
        for hh in 0..h {
            if case.lse {
                let x = got_lse[t * h + hh] as f64;
                if t < real {
                    let r = cpu_lse[t * h + hh] as f64;
                    assert!(close(x, r, LSE_ATOL), "{}", ctx("lse vs cpu", t, hh, 0, x, r));
                } else {
                    assert!(got_lse[t * h + hh].is_nan(), "padding lse row {t} was written");
                }
            }
            for e in 0..d {
                let i = (t * h + hh) * d + e;
                let x = got[i].to_f32() as f64;
                if t < real {
                    let r = cpu_out[i].to_f32() as f64;
                    assert!(close(x, r, ATOL), "{}", ctx("out vs cpu", t, hh, e, x, r));
                } else {
                    assert!(got[i].to_f32().is_nan(), "padding row {t} was written");
                }
            }
        }
    }
    // Sampled rows (all of short requests) against the float64 recomputation.
    for (r, &(q_len, kv_len)) in case.batch.iter().enumerate() {
        let start = prep.meta.query_start_loc[r] as usize;
        let mut rows: Vec<usize> = (0..q_len).collect();
        let budget = f64_rows(kv_len, h, d);
        if q_len > budget {
            rows.shuffle(&mut rng);
            rows.truncate(budget - 2);
            rows.extend([0, q_len - 1]);
        }
        for i in rows {
            let t = start + i;
            for hh in 0..h {
                let qrow = &prep.query[(t * h + hh) * d..(t * h + hh + 1) * d];
                let (ro, rl) =
                    reference_row(case, qrow, &prep.keys[r], &prep.values[r], RowAt { q_len, kv_len, i, head: hh });
                for (e, &rv) in ro.iter().enumerate() {
                    let x = got[(t * h + hh) * d + e].to_f32() as f64;
                    assert!(close(x, rv, ATOL), "{}", ctx("out vs f64", t, hh, e, x, rv));
                }
                if case.lse {
                    let x = got_lse[t * h + hh] as f64;
                    assert!(close(x, rl, LSE_ATOL), "{}", ctx("lse vs f64", t, hh, 0, x, rl));
                }
            }
        }
    }
}

pub(crate) fn run_dyn(case: &Case, bf: bool) {
    if bf {
        run_case::<bf16>(case)
    } else {
        run_case::<f16>(case)
    }
}

pub(crate) const HEADS: [(usize, usize); 3] = [(4, 4), (8, 2), (16, 2)];
pub(crate) const SOFTCAPS: [Option<f32>; 3] = [None, Some(10.0), Some(50.0)];
pub(crate) const WINDOWS: [Option<usize>; 2] = [None, Some(256)];
const DECODE_BATCHES: [&[(usize, usize)]; 2] = [&[(1, 1328), (1, 18), (1, 463)], &[(1, 1), (1, 54), (1, 293), (1, 70)]];
pub(crate) const VARLEN_BATCHES: [&[(usize, usize)]; 2] =
    [&[(1, 1328), (5, 18), (129, 463)], &[(1, 523), (1, 37), (1, 2011)]];
pub(crate) const LONG_BATCH: &[(usize, usize)] = &[(2048, 2048), (1, 8192), (300, 4000)];

/// The main product for one head configuration: head size {128, 256} x block {16, 32} x dtype x
/// soft-cap x window x the given batches.
fn main_grid(heads: (usize, usize), batches: &[&[(usize, usize)]], seed0: u64) {
    let mut seed = seed0;
    let mut n = 0;
    for d in [128, 256] {
        for bs in [16, 32] {
            for bf in [false, true] {
                for cap in SOFTCAPS {
                    for win in WINDOWS {
                        for batch in batches {
                            seed += 1;
                            run_dyn(&Case::new(heads, d, bs, batch, seed).softcap(cap).sliding(win), bf);
                            n += 1;
                        }
                    }
                }
            }
        }
    }
    eprintln!("heads {heads:?}: {n} cases passed");
}

macro_rules! grid_tests {
    ($($name:ident: $heads:expr, $batches:expr, $seed:expr;)*) => {
        $(
            #[test]
            fn $name() {
                main_grid($heads, $batches, $seed);
            }
        )*
    };
}

grid_tests! {
    grid_decode_heads_4_4: (4, 4), &DECODE_BATCHES, 1000;
    grid_decode_heads_8_2: (8, 2), &DECODE_BATCHES, 1100;
    grid_decode_heads_16_2: (16, 2), &DECODE_BATCHES, 1200;
    grid_varlen_heads_4_4: (4, 4), &VARLEN_BATCHES, 2000;
    grid_varlen_heads_8_2: (8, 2), &VARLEN_BATCHES, 2100;
    grid_varlen_heads_16_2: (16, 2), &VARLEN_BATCHES, 2200;
    grid_varlen_long_heads_4_4: (4, 4), &[LONG_BATCH], 3000;
    grid_varlen_long_heads_8_2: (8, 2), &[LONG_BATCH], 3100;
    grid_varlen_long_heads_16_2: (16, 2), &[LONG_BATCH], 3200;
}

/// The other head sizes and block size 64 for one (head size, block size): every head
/// configuration, dtype and batch (the long batch with the largest head configuration), soft-cap
/// and window cycled.
fn other_sizes(d: usize, bs: usize, seed0: u64) {
    let batches: Vec<&[(usize, usize)]> =
        DECODE_BATCHES.iter().chain(VARLEN_BATCHES.iter()).copied().chain([LONG_BATCH]).collect();
    let mut seed = seed0;
    let mut n = 0usize;
    for (hi, heads) in HEADS.into_iter().enumerate() {
        for bf in [false, true] {
            for (bi, batch) in batches.iter().enumerate() {
                if bi == batches.len() - 1 && hi != 2 {
                    continue;
                }
                seed += 1;
                let cap = SOFTCAPS[(n / 2) % 3];
                let win = WINDOWS[n % 2];
                run_dyn(&Case::new(heads, d, bs, batch, seed).softcap(cap).sliding(win), bf);
                n += 1;
            }
        }
    }
    eprintln!("head size {d} block size {bs}: {n} cases passed");
}

macro_rules! other_size_tests {
    ($($name:ident: $d:expr, $bs:expr;)*) => {
        $(
            #[test]
            fn $name() {
                other_sizes($d, $bs, 4000 + 100 * $d as u64 + $bs as u64);
            }
        )*
    };
}

other_size_tests! {
    grid_head_64_block_16: 64, 16;
    grid_head_80_block_16: 80, 16;
    grid_head_96_block_16: 96, 16;
    grid_head_112_block_16: 112, 16;
    grid_head_192_block_16: 192, 16;
    grid_head_64_block_64: 64, 64;
    grid_head_128_block_64: 128, 64;
    grid_head_256_block_64: 256, 64;
    grid_head_80_block_32: 80, 32;
}

pub(crate) fn alibi(h: usize) -> Vec<f32> {
    (0..h).map(|i| 2f32.powf(-8.0 * (i + 1) as f32 / h as f32)).collect()
}

pub(crate) fn sinks(h: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..h).map(|_| rng.random_range(-2.0..4.0f32)).collect()
}

/// Features beyond the grid: ALiBi, sinks, both with soft-cap and window, non-causal attention with
/// left/right windows, padding rows, MQA, a GQA group of 8, forward() with the cache write.
#[test]
fn features() {
    let mut rng = StdRng::seed_from_u64(77);
    let mixed: &[(usize, usize)] = &[(1, 700), (1, 33), (1, 2100), (17, 17), (64, 1000), (200, 260)];
    let mut seed = 5000;
    for d in [64, 128, 256] {
        for bf in [false, true] {
            for heads in [(8, 2), (32, 1), (16, 16), (64, 8), (64, 1)] {
                let (h, _) = heads;
                let variants: Vec<Box<dyn Fn(Case) -> Case>> = vec![
                    Box::new(move |c: Case| {
                        let p = c.params.clone().with_alibi_slopes(Some(alibi(h)));
                        Case { params: p, ..c }
                    }),
                    Box::new({
                        let s = sinks(h, &mut rng);
                        move |c: Case| {
                            let p = c.params.clone().with_sinks(Some(s.clone()));
                            Case { params: p, ..c }
                        }
                    }),
                    Box::new({
                        let s = sinks(h, &mut rng);
                        move |c: Case| {
                            let p = c
                                .params
                                .clone()
                                .with_alibi_slopes(Some(alibi(h)))
                                .with_sinks(Some(s.clone()))
                                .with_softcap(Some(30.0))
                                .with_window(Some(100), Some(0));
                            Case { params: p, q_amp: 3.0, ..c }
                        }
                    }),
                    Box::new(|c: Case| {
                        let p = c.params.clone().with_causal(false).with_window(Some(37), Some(5));
                        Case { params: p, ..c }
                    }),
                    Box::new(|c: Case| {
                        let p = c.params.clone().with_causal(false).with_scale(0.05);
                        Case { params: p, padding: 5, ..c }
                    }),
                    Box::new(|c: Case| Case { padding: 3, lse: false, use_forward: true, decode_threshold: 4, ..c }),
                ];
                for v in &variants {
                    seed += 1;
                    let bs = [16, 32, 64][(seed % 3) as usize];
                    run_dyn(&v(Case::new(heads, d, bs, mixed, seed)), bf);
                }
            }
        }
    }
}

/// f32 storage is CPU-only; an unsupported head size is a typed error on the GPU.
#[test]
fn unsupported_is_typed() {
    let dev = common::device();
    let meta = AttentionMetadata::new(
        vec![0, 1],
        vec![5],
        BlockTable::from_rows(&[[3]]),
        SlotMapping::new(vec![4 + 3 * 16]),
        1,
    )
    .unwrap();
    let dm = DeviceMetadata::upload(dev, &meta).unwrap();
    let mut ws = AttentionWorkspace::new();
    {
        let layout = CacheLayout::new(8, 16, 2, 64).unwrap();
        let cache = CudaKvCache::<f32>::zeros(dev, layout).unwrap();
        let q = DeviceTensor::<f32>::zeros(dev, &[1, 4, 64]).unwrap();
        let mut out = DeviceTensor::<f32>::zeros(dev, &[1, 4, 64]).unwrap();
        let p = AttentionParams::new(4, 2, 64);
        let e = cuda::paged_attention(
            dev,
            &dm,
            &p,
            cuda::AttentionIo { query: &q, cache: &cache, out: &mut out, lse: None },
            &mut ws,
        )
        .unwrap_err();
        assert!(matches!(e, AttentionError::Unsupported { .. }), "{e:?}");
    }
    {
        let layout = CacheLayout::new(8, 16, 2, 120).unwrap();
        let cache = CudaKvCache::<bf16>::zeros(dev, layout).unwrap();
        let q = DeviceTensor::<bf16>::zeros(dev, &[1, 4, 120]).unwrap();
        let mut out = DeviceTensor::<bf16>::zeros(dev, &[1, 4, 120]).unwrap();
        let p = AttentionParams::new(4, 2, 120);
        let e = cuda::paged_attention(
            dev,
            &dm,
            &p,
            cuda::AttentionIo { query: &q, cache: &cache, out: &mut out, lse: None },
            &mut ws,
        )
        .unwrap_err();
        assert!(matches!(e, AttentionError::UnsupportedHeadSize { head_size: 120, .. }), "{e:?}");
    }
    {
        // ALiBi with more heads than the kernel parameters carry.
        let layout = CacheLayout::new(8, 16, 1, 64).unwrap();
        let cache = CudaKvCache::<f16>::zeros(dev, layout).unwrap();
        let q = DeviceTensor::<f16>::zeros(dev, &[1, 512, 64]).unwrap();
        let mut out = DeviceTensor::<f16>::zeros(dev, &[1, 512, 64]).unwrap();
        let p = AttentionParams::new(512, 1, 64).with_alibi_slopes(Some(vec![0.1; 512]));
        let e = cuda::paged_attention(
            dev,
            &dm,
            &p,
            cuda::AttentionIo { query: &q, cache: &cache, out: &mut out, lse: None },
            &mut ws,
        )
        .unwrap_err();
        assert!(matches!(e, AttentionError::Unsupported { .. }), "{e:?}");
    }
}

// ---- the compute-sanitizer subset --------------------------------------------------------------
// Every kernel (decode with one split, decode with splits + combine, prefill), both dtypes, every
// head size and block size, every feature, GQA ratios, padding, and the longest case once.

#[test]
fn sanitizer_subset_head_sizes_and_dtypes() {
    let mut seed = 9000;
    for (i, d) in [64, 80, 96, 112, 128, 192, 256].into_iter().enumerate() {
        for bf in [false, true] {
            seed += 1;
            let bs = [16, 32, 64][i % 3];
            let heads = HEADS[i % 3];
            // one decode long enough to split, one short decode (single split), a chunked prefill
            let batch: &[(usize, usize)] = &[(1, 300), (1, 9), (70, 150)];
            let mut c = Case::new(heads, d, bs, batch, seed).softcap(SOFTCAPS[i % 3]).sliding(WINDOWS[i % 2]);
            c.num_blocks = 2048;
            c.padding = 2;
            run_dyn(&c, bf);
        }
    }
}

#[test]
fn sanitizer_subset_features() {
    let mut rng = StdRng::seed_from_u64(99);
    let batch: &[(usize, usize)] = &[(1, 200), (1, 64), (33, 97)];
    let mut seed = 9100;
    for bf in [false, true] {
        for heads in [(8, 2), (16, 1), (4, 4)] {
            let h = heads.0;
            seed += 1;
            let mut c = Case::new(heads, 128, 32, batch, seed);
            c.num_blocks = 2048;
            c.params = c
                .params
                .clone()
                .with_alibi_slopes(Some(alibi(h)))
                .with_sinks(Some(sinks(h, &mut rng)))
                .with_softcap(Some(20.0))
                .with_window(Some(50), Some(0));
            c.padding = 1;
            run_dyn(&c, bf);
            seed += 1;
            let mut c = Case::new(heads, 64, 16, batch, seed);
            c.num_blocks = 2048;
            c.params = c.params.clone().with_causal(false).with_window(Some(20), Some(7));
            c.use_forward = true;
            c.lse = false;
            run_dyn(&c, bf);
        }
    }
}

#[test]
fn sanitizer_subset_longest_case() {
    let mut c = Case::new((16, 2), 256, 32, LONG_BATCH, 9200);
    c.num_blocks = 2048;
    run_dyn(&c, true);
}

// ---- proptest: mixed batches ------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Mixed {
    decodes: Vec<usize>,
    prefills: Vec<(usize, usize)>,
    heads: (usize, usize),
    head_size: usize,
    block_size: usize,
    bf: bool,
    feature: u8,
    seed: u64,
}

fn mixed_strategy() -> impl Strategy<Value = Mixed> {
    (
        prop::collection::vec(1usize..3000, 0..12),
        prop::collection::vec((1usize..300, 0usize..1500), 0..4),
        prop::sample::select(vec![(4usize, 4usize), (8, 2), (16, 2), (32, 8), (12, 4), (6, 1)]),
        prop::sample::select(vec![64usize, 80, 96, 112, 128, 192, 256]),
        prop::sample::select(vec![16usize, 32, 48, 64]),
        any::<bool>(),
        0u8..6,
        any::<u64>(),
    )
        .prop_filter("non-empty batch", |t| !t.0.is_empty() || !t.1.is_empty())
        .prop_map(|(decodes, prefills, heads, head_size, block_size, bf, feature, seed)| Mixed {
            decodes,
            prefills,
            heads,
            head_size,
            block_size,
            bf,
            feature,
            seed,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn proptest_mixed_batches(m in mixed_strategy()) {
        let mut batch: Vec<(usize, usize)> = m.decodes.iter().map(|&kv| (1, kv)).collect();
        batch.extend(m.prefills.iter().map(|&(q, ctx)| (q, q + ctx)));
        let mut c = Case::new(m.heads, m.head_size, m.block_size, &batch, m.seed);
        let mut rng = StdRng::seed_from_u64(m.seed);
        let h = m.heads.0;
        c.params = match m.feature {
            0 => c.params,
            1 => c.params.with_softcap(Some(15.0)),
            2 => c.params.with_sliding_window(rng.random_range(1..600)),
            3 => c.params.with_alibi_slopes(Some(alibi(h))).with_sinks(Some(sinks(h, &mut rng))),
            4 => c.params.with_causal(false).with_window(Some(rng.random_range(0..400)), Some(rng.random_range(0..50))),
            _ => c.params.with_sinks(Some(sinks(h, &mut rng))).with_sliding_window(64),
        };
        c.padding = rng.random_range(0..4);
        c.use_forward = m.seed % 2 == 0;
        run_dyn(&c, m.bf);
    }
}
