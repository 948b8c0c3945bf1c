//! FP8 KV caches on the GPU, launched directly through the kernels crate:
//! - the quantising KV write, byte for byte against the host rule `C::from_f32(x / scale)` (f32
//!   division), for f16 / bf16 / f32 inputs, both formats, per-layer / per-head / no scales, with
//!   NaN, infinities, out-of-range values, values in the formats' subnormal range and exact ties;
//!   packed, fused-QKV-into-interleaved and unaligned (scalar) layouts; padding slots untouched;
//! - the decode kernel over FP8 caches against a float64 recomputation over the dequantised cache
//!   (`stored * scale`), every feature, split counts, folded and separate combine, LSE;
//! - unseen cache rows holding NaN / Inf bytes never reach an output;
//! - typed errors for scales of a wrong length or given for an unquantised cache.

use std::sync::Arc;

use attention_backend::{bf16, f16, Element};
use attention_kernels::attention::{
    self, decode_workspace_len, AttentionBuffers, AttentionDims, AttentionFeatures, AttentionKernel, AttentionStrides,
    DecodeVariant,
};
use attention_kernels::cudarc::driver::{CudaSlice, CudaStream};
use attention_kernels::launch::{self, KvCacheMut, KvScales, KvWriteDims};
use attention_kernels::{CacheElement, DType, Fp8E4M3, Fp8E5M2, KernelError, KvStorage};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::common;

/// The two FP8 cache types, by their bits.
trait Fp8: CacheElement {
    fn bits(self) -> u8;
    fn of_bits(b: u8) -> Self;
    /// Non-finite codes of the format (NaN for both; infinities for E5M2).
    const POISON: &'static [u8];
}

impl Fp8 for Fp8E4M3 {
    fn bits(self) -> u8 {
        self.to_bits()
    }
    fn of_bits(b: u8) -> Self {
        Fp8E4M3::from_bits(b)
    }
    const POISON: &'static [u8] = &[0x7f, 0xff];
}

impl Fp8 for Fp8E5M2 {
    fn bits(self) -> u8 {
        self.to_bits()
    }
    fn of_bits(b: u8) -> Self {
        Fp8E5M2::from_bits(b)
    }
    const POISON: &'static [u8] = &[0x7c, 0xfc, 0x7f, 0xff, 0x7d];
}

fn tf<T: Element>(x: T) -> f32 {
    <T as Element>::to_f32(x)
}

fn te<T: Element>(x: f32) -> T {
    <T as Element>::from_f32(x)
}

/// The stored byte of `x` under `scale` (`None` = 1.0: converted unscaled), the host rule.
fn quantise<C: Fp8>(x: f32, scale: Option<f32>) -> u8 {
    let y = match scale {
        Some(s) => x / s,
        None => x,
    };
    <C as CacheElement>::from_f32(y).bits()
}

// ---- the write ----------------------------------------------------------------------------------

/// Input values for the write: random magnitudes over many binades, and with probability 1/4 one
/// of the hard cases for `scale` (NaN, infinities, out of range, subnormal range, exact ties of
/// both formats when `scale` is a power of two, the saturation boundaries). Without `specials`
/// only the random magnitudes, so nearly every thread's elements all take the kernel's fast
/// quotient (one NaN, zero or infinity among them sends all of them to the exact division: with
/// specials most threads of 16 or more elements test that path instead).
fn write_values(rng: &mut StdRng, n: usize, scale: f32, specials: bool) -> Vec<f32> {
    let with_specials = specials;
    let specials = [
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e6,
        -1e6,
        0.0,
        -0.0,
        1.0625 * scale,               // e4m3 tie 1 | 1.125 -> 1
        1.1875 * scale,               // e4m3 tie 1.125 | 1.25 -> 1.25
        -1.125 * scale,               // e5m2 tie 1 | 1.25 -> 1; exact in e4m3
        1.375 * scale,                // e5m2 tie 1.25 | 1.5 -> 1.5
        3.0 * 2f32.powi(-10) * scale, // e4m3 subnormal tie
        5.0 * 2f32.powi(-17) * scale, // e5m2 subnormal tie
        2f32.powi(-20) * scale,       // below both formats' smallest subnormal
        2f32.powi(-8) * scale,        // e4m3 subnormal
        448.0 * scale,
        464.0 * scale, // e4m3 tie 448 | 480 (past the range): saturates
        -500.0 * scale,
        57344.0 * scale,
        61440.0 * scale, // e5m2 tie past the range: saturates
        -70000.0 * scale,
    ];
    (0..n)
        .map(|_| {
            if with_specials && rng.random_range(0..4) == 0 {
                specials[rng.random_range(0..specials.len())]
            } else {
                let mag = 2f32.powi(rng.random_range(-18..18));
                rng.random_range(-1.0f32..1.0) * mag * scale
            }
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum WriteLayout {
    /// Packed key / value, two caches.
    Separate,
    /// Key and value slices of a fused `[tokens, (H + 2 KVH) * D]` buffer into one interleaved
    /// `[blocks, 2, block_size, row]` cache.
    FusedInterleaved,
}

/// Scales of a write case: `None`, one per layer, or one per KV head.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Scales {
    Unit,
    Layer,
    PerHead,
}

fn write_case<T: Element, C: Fp8 + KvStorage<T>>(
    kv_heads: usize,
    head_size: usize,
    layout: WriteLayout,
    scales: Scales,
    specials: bool,
    seed: u64,
) {
    let stream = common::stream();
    let mut rng = StdRng::seed_from_u64(seed);
    let (nt, bs, num_blocks, q_heads) = (45usize, 16usize, 5usize, 2usize);
    let row = kv_heads * head_size;
    let block = bs * row;
    let what = format!(
        "{:?} -> {:?} kvh {kv_heads} d {head_size} {layout:?} {scales:?} specials {specials}",
        T::DTYPE,
        C::DTYPE
    );
    // Power-of-two scales make the tie cases exact ties; the others exercise the division.
    let pool = [0.5f32, 2.0, 0.037, 3.7, 1.0, 0.25, 0.0123, 16.0];
    let (ks, vs): (Vec<f32>, Vec<f32>) = match scales {
        Scales::Unit => (vec![], vec![]),
        Scales::Layer => (vec![pool[(seed % 8) as usize]], vec![pool[((seed + 3) % 8) as usize]]),
        Scales::PerHead => {
            ((0..kv_heads).map(|i| pool[i % 8]).collect(), (0..kv_heads).map(|i| pool[(i + 5) % 8]).collect())
        }
    };
    let scale_of = |s: &[f32], e: usize| -> Option<f32> {
        match s.len() {
            0 => None,
            1 => Some(s[0]),
            n => Some(s[e / (row / n)]),
        }
    };
    // Input rows (as T), one scale per element for the generator.
    let gen_row = |rng: &mut StdRng, s: &[f32]| -> Vec<T> {
        (0..row).map(|e| te::<T>(write_values(rng, 1, scale_of(s, e).unwrap_or(1.0), specials)[0])).collect()
    };
    let keys: Vec<Vec<T>> = (0..nt).map(|_| gen_row(&mut rng, &ks)).collect();
    let values: Vec<Vec<T>> = (0..nt).map(|_| gen_row(&mut rng, &vs)).collect();
    // Slots: distinct, shuffled, some tokens padding (-1).
    let mut all: Vec<i64> = (0..(num_blocks * bs) as i64).collect();
    all.shuffle(&mut rng);
    let slots: Vec<i64> = (0..nt).map(|t| if t % 7 == 3 { -1 } else { all[t] }).collect();
    let slots_dev = stream.clone_htod(&slots).unwrap();
    let scale_dev =
        (scales != Scales::Unit).then(|| (stream.clone_htod(&ks).unwrap(), stream.clone_htod(&vs).unwrap()));
    let kv_scales = || scale_dev.as_ref().map(|(k, v)| KvScales { key: k.as_view(), value: v.as_view() });
    // Caches start as random bytes: untouched rows must keep them.
    let init_len = match layout {
        WriteLayout::Separate => num_blocks * block,
        WriteLayout::FusedInterleaved => num_blocks * 2 * block,
    };
    let init_k: Vec<u8> = (0..init_len).map(|_| rng.random()).collect();
    let init_v: Vec<u8> = (0..init_len).map(|_| rng.random()).collect();
    let to_c = |b: &[u8]| b.iter().map(|&x| C::of_bits(x)).collect::<Vec<C>>();
    let mut want_k = init_k.clone();
    let mut want_v = match layout {
        WriteLayout::Separate => init_v.clone(),
        WriteLayout::FusedInterleaved => vec![],
    };
    for t in 0..nt {
        if slots[t] < 0 {
            continue;
        }
        let s = slots[t] as usize;
        for e in 0..row {
            let kq = quantise::<C>(tf(keys[t][e]), scale_of(&ks, e));
            let vq = quantise::<C>(tf(values[t][e]), scale_of(&vs, e));
            match layout {
                WriteLayout::Separate => {
                    let at = (s / bs) * block + (s % bs) * row + e;
                    want_k[at] = kq;
                    want_v[at] = vq;
                }
                WriteLayout::FusedInterleaved => {
                    let at = (s / bs) * 2 * block + (s % bs) * row + e;
                    want_k[at] = kq;
                    want_k[at + block] = vq;
                }
            }
        }
    }
    match layout {
        WriteLayout::Separate => {
            let k_dev = stream.clone_htod(&keys.concat()).unwrap();
            let v_dev = stream.clone_htod(&values.concat()).unwrap();
            let mut kc = stream.clone_htod(&to_c(&init_k)).unwrap();
            let mut vc = stream.clone_htod(&to_c(&init_v)).unwrap();
            launch::kv_cache_write(
                &stream,
                k_dev.as_view(),
                v_dev.as_view(),
                KvCacheMut::Separate { key: kc.as_view_mut(), value: vc.as_view_mut() },
                slots_dev.as_view(),
                KvWriteDims::contiguous(nt, row, num_blocks, bs),
                kv_scales(),
            )
            .unwrap_or_else(|e| panic!("{what}: {e}"));
            let (gk, gv) = (stream.clone_dtoh(&kc).unwrap(), stream.clone_dtoh(&vc).unwrap());
            compare_bytes(&gk, &want_k, &what, "key cache");
            compare_bytes(&gv, &want_v, &what, "value cache");
        }
        WriteLayout::FusedInterleaved => {
            let qkv_row = (q_heads + 2 * kv_heads) * head_size;
            let mut fused = vec![te::<T>(0.0); nt * qkv_row];
            for t in 0..nt {
                for e in 0..row {
                    fused[t * qkv_row + q_heads * head_size + e] = keys[t][e];
                    fused[t * qkv_row + q_heads * head_size + row + e] = values[t][e];
                }
            }
            let fused_dev = stream.clone_htod(&fused).unwrap();
            let mut cache = stream.clone_htod(&to_c(&init_k)).unwrap();
            launch::kv_cache_write(
                &stream,
                fused_dev.slice(q_heads * head_size..),
                fused_dev.slice(q_heads * head_size + row..),
                KvCacheMut::Interleaved { cache: cache.as_view_mut(), value_offset: block },
                slots_dev.as_view(),
                KvWriteDims {
                    key_stride: qkv_row,
                    value_stride: qkv_row,
                    cache_block_stride: 2 * block,
                    ..KvWriteDims::contiguous(nt, row, num_blocks, bs)
                },
                kv_scales(),
            )
            .unwrap_or_else(|e| panic!("{what}: {e}"));
            compare_bytes(&stream.clone_dtoh(&cache).unwrap(), &want_k, &what, "interleaved cache");
        }
    }
}

fn compare_bytes<C: Fp8>(got: &[C], want: &[u8], what: &str, which: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {which} length");
    let bad: Vec<usize> = (0..want.len()).filter(|&i| got[i].bits() != want[i]).collect();
    if let Some(&i) = bad.first() {
        panic!(
            "{what}: {which}: {} bytes differ; first at {i}: gpu {:#04x} want {:#04x}",
            bad.len(),
            got[i].bits(),
            want[i]
        );
    }
}

fn write_grid<T: Element>(seed: u64)
where
    Fp8E4M3: KvStorage<T>,
    Fp8E5M2: KvStorage<T>,
{
    let mut seed = seed;
    // (kv heads, head size): 16-element vectors (64, 128), 8-element vectors (a row of 3 x 8: not
    // a multiple of 16), and a row of 3 x 6 (the scalar path, per-head scales over 6-element
    // heads). Each with the hard cases mixed in, and without them (the fast quotient nearly
    // throughout).
    for (kvh, d) in [(4, 64), (2, 128), (3, 8), (3, 6)] {
        for layout in [WriteLayout::Separate, WriteLayout::FusedInterleaved] {
            for scales in [Scales::Unit, Scales::Layer, Scales::PerHead] {
                for specials in [true, false] {
                    seed += 1;
                    write_case::<T, Fp8E4M3>(kvh, d, layout, scales, specials, seed);
                    write_case::<T, Fp8E5M2>(kvh, d, layout, scales, specials, seed + 1000);
                }
            }
        }
    }
}

#[test]
fn fp8_write_bit_exact_f16() {
    write_grid::<f16>(160_000);
}

#[test]
fn fp8_write_bit_exact_bf16() {
    write_grid::<bf16>(161_000);
}

#[test]
fn fp8_write_bit_exact_f32() {
    write_grid::<f32>(162_000);
}

// ---- the decode ---------------------------------------------------------------------------------

/// One FP8 decode case.
#[derive(Clone, Debug)]
struct DecodeCase {
    heads: (usize, usize),
    head_size: usize,
    block_size: usize,
    /// Keys per request; 0 = a CUDA-graph padding request (no query token, seq_len 0).
    lens: Vec<usize>,
    window_left: Option<usize>,
    softcap: Option<f32>,
    alibi: bool,
    sinks: bool,
    /// `None`: no scale buffers (1.0); `Some(false)`: one per layer; `Some(true)`: per KV head.
    per_head: Option<bool>,
    num_splits: usize,
    split_keys: usize,
    fold: bool,
    /// Largest |q| (bf16 queries are rescaled per row inside the kernel: try large ones).
    q_amp: f32,
}

/// The paging, cache contents and query of one case, on the host.
struct DecodeData<T, C> {
    num_blocks: usize,
    width: usize,
    block_table: Vec<i32>,
    qsl: Vec<i32>,
    seq_lens: Vec<i32>,
    num_tokens: usize,
    /// Request of each query token.
    token_req: Vec<usize>,
    query: Vec<T>,
    key_cache: Vec<C>,
    value_cache: Vec<C>,
    k_scale: Vec<f32>,
    v_scale: Vec<f32>,
    alibi: Vec<f32>,
    sinks: Vec<f32>,
}

impl DecodeCase {
    fn scale(&self) -> f32 {
        1.0 / (self.head_size as f32).sqrt()
    }

    /// First visible key of a request with `n` keys (one query row at position n - 1).
    fn first_visible(&self, n: usize) -> usize {
        self.window_left.map_or(0, |w| (n - 1).saturating_sub(w))
    }

    fn build<T: Element, C: Fp8 + KvStorage<T>>(&self, seed: u64) -> DecodeData<T, C> {
        let mut rng = StdRng::seed_from_u64(seed);
        let (h, kvh) = self.heads;
        let (d, bs) = (self.head_size, self.block_size);
        let blocks_of = |n: usize| n.div_ceil(bs);
        let used: usize = self.lens.iter().map(|&n| blocks_of(n)).sum();
        let num_blocks = used + 6;
        let mut pool: Vec<i32> = (0..num_blocks as i32).collect();
        pool.shuffle(&mut rng);
        let width = self.lens.iter().map(|&n| blocks_of(n)).max().unwrap_or(0) + 1;
        let mut block_table = Vec::new();
        let mut next = 0;
        for &n in &self.lens {
            let nb = blocks_of(n);
            block_table.extend_from_slice(&pool[next..next + nb]);
            next += nb;
            // Stale entries past the request's blocks: never read.
            for _ in nb..width {
                block_table.push(pool[rng.random_range(0..num_blocks)]);
            }
        }
        let mut qsl = vec![0i32];
        let mut token_req = Vec::new();
        for (r, &n) in self.lens.iter().enumerate() {
            let q = usize::from(n > 0);
            if q == 1 {
                token_req.push(r);
            }
            qsl.push(qsl.last().unwrap() + q as i32);
        }
        let num_tokens = token_req.len();
        let nscales = match self.per_head {
            Some(true) => kvh,
            _ => 1,
        };
        let k_scale: Vec<f32> = (0..nscales).map(|_| rng.random_range(0.02f32..0.6)).collect();
        let v_scale: Vec<f32> = (0..nscales).map(|_| rng.random_range(0.02f32..0.6)).collect();
        let sc = |s: &[f32], head: usize| -> Option<f32> { self.per_head.map(|ph| if ph { s[head] } else { s[0] }) };
        // Every cache row holds fp8(x / scale) of some x in [-2, 2] (unused rows too: finite
        // bytes; the unseen-rows test overwrites them).
        let row = kvh * d;
        let mut key_cache = Vec::with_capacity(num_blocks * bs * row);
        let mut value_cache = Vec::with_capacity(num_blocks * bs * row);
        for i in 0..num_blocks * bs * row {
            let head = (i % row) / d;
            key_cache.push(C::of_bits(quantise::<C>(rng.random_range(-2.0f32..2.0), sc(&k_scale, head))));
            value_cache.push(C::of_bits(quantise::<C>(rng.random_range(-2.0f32..2.0), sc(&v_scale, head))));
        }
        let query = (0..num_tokens * h * d).map(|_| te::<T>(rng.random_range(-1.0f32..1.0) * self.q_amp)).collect();
        let alibi = (0..h).map(|i| 0.05 * (i + 1) as f32 / h as f32).collect();
        let sinks = (0..h).map(|_| rng.random_range(-1.0f32..3.0)).collect();
        DecodeData {
            num_blocks,
            width,
            block_table,
            seq_lens: self.lens.iter().map(|&n| n as i32).collect(),
            qsl,
            num_tokens,
            token_req,
            query,
            key_cache,
            value_cache,
            k_scale,
            v_scale,
            alibi,
            sinks,
        }
    }

    /// Runs the decode kernel over `data` (out and lse poisoned with NaN first).
    fn run<T: Element, C: Fp8 + KvStorage<T>>(
        &self,
        stream: &Arc<CudaStream>,
        data: &DecodeData<T, C>,
        variant: DecodeVariant,
    ) -> Result<(Vec<T>, Vec<f32>), KernelError> {
        let (h, kvh) = self.heads;
        let d = self.head_size;
        let nreq = self.lens.len();
        let q = stream.clone_htod(&data.query).unwrap();
        let kc = stream.clone_htod(&data.key_cache).unwrap();
        let vc = stream.clone_htod(&data.value_cache).unwrap();
        let qsl = stream.clone_htod(&data.qsl).unwrap();
        let sl = stream.clone_htod(&data.seq_lens).unwrap();
        let bt = stream.clone_htod(&data.block_table).unwrap();
        let ks = stream.clone_htod(&data.k_scale).unwrap();
        let vs = stream.clone_htod(&data.v_scale).unwrap();
        let nt = data.num_tokens;
        let mut out = stream.clone_htod(&vec![te::<T>(f32::NAN); nt.max(1) * h * d]).unwrap();
        let mut lse = stream.clone_htod(&vec![f32::NAN; nt.max(1) * h]).unwrap();
        let ws_len = decode_workspace_len(self.num_splits, nreq, h, d);
        let mut ws: CudaSlice<f32> = stream.alloc_zeros(ws_len.max(1)).unwrap();
        let dims = AttentionDims {
            num_tokens: nt,
            num_heads: h,
            num_kv_heads: kvh,
            head_size: d,
            num_blocks: data.num_blocks,
            block_size: self.block_size,
            num_reqs: nreq,
            max_blocks_per_req: data.width,
            req_begin: 0,
            req_end: nreq,
        };
        let features = AttentionFeatures {
            scale: self.scale(),
            causal: true,
            window_left: self.window_left,
            window_right: None,
            softcap: self.softcap,
            alibi_slopes: self.alibi.then_some(&data.alibi[..]),
            sinks: self.sinks.then_some(&data.sinks[..]),
        };
        let bufs = AttentionBuffers::<T, C> {
            query: q.as_view(),
            key_cache: kc.as_view(),
            value_cache: vc.as_view(),
            kv_scales: self.per_head.map(|_| KvScales { key: ks.as_view(), value: vs.as_view() }),
            query_start_loc: qsl.as_view(),
            seq_lens: sl.as_view(),
            block_table: bt.as_view(),
            out: out.as_view_mut(),
            lse: Some(lse.as_view_mut()),
            workspace: Some(ws.as_view_mut()),
            strides: AttentionStrides::contiguous(&dims),
        };
        attention::paged_attention_with_variant(
            stream,
            AttentionKernel::Decode { num_splits: self.num_splits, split_keys: self.split_keys },
            variant,
            &dims,
            &features,
            bufs,
        )?;
        let out = stream.clone_dtoh(&out).unwrap();
        let lse = stream.clone_dtoh(&lse).unwrap();
        Ok((out[..nt * h * d].to_vec(), lse[..nt * h].to_vec()))
    }

    fn variant(&self) -> DecodeVariant {
        DecodeVariant { fold_combine: self.fold, ..DecodeVariant::default() }
    }

    /// Float64 reference over the dequantised cache: `[tokens, heads, d]` and `[tokens, heads]`.
    fn reference<T: Element, C: Fp8 + KvStorage<T>>(&self, data: &DecodeData<T, C>) -> (Vec<f64>, Vec<f64>) {
        let (h, kvh) = self.heads;
        let (d, bs) = (self.head_size, self.block_size);
        let group = h / kvh;
        let row = kvh * d;
        let scale_at = |s: &[f32], head: usize| -> f64 {
            match self.per_head {
                None => 1.0,
                Some(false) => s[0] as f64,
                Some(true) => s[head] as f64,
            }
        };
        let mut out = vec![0f64; data.num_tokens * h * d];
        let mut lse = vec![0f64; data.num_tokens * h];
        for (t, &r) in data.token_req.iter().enumerate() {
            let n = self.lens[r];
            let pos = n - 1;
            let lo = self.first_visible(n);
            for qh in 0..h {
                let kh = qh / group;
                let (ks, vs) = (scale_at(&data.k_scale, kh), scale_at(&data.v_scale, kh));
                let q = &data.query[(t * h + qh) * d..(t * h + qh + 1) * d];
                let at = |j: usize, e: usize| {
                    let b = data.block_table[r * data.width + j / bs] as usize;
                    (b * bs + j % bs) * row + kh * d + e
                };
                let scores: Vec<f64> = (lo..n)
                    .map(|j| {
                        let dot: f64 =
                            (0..d).map(|e| tf(q[e]) as f64 * data.key_cache[at(j, e)].to_f32() as f64 * ks).sum();
                        let mut s = dot * self.scale() as f64;
                        if let Some(cap) = self.softcap {
                            s = cap as f64 * (s / cap as f64).tanh();
                        }
                        if self.alibi {
                            s -= data.alibi[qh] as f64 * (pos - j) as f64;
                        }
                        s
                    })
                    .collect();
                let sink = self.sinks.then(|| data.sinks[qh] as f64);
                let m = scores.iter().copied().chain(sink).fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let denom = w.iter().sum::<f64>() + sink.map_or(0.0, |s| (s - m).exp());
                lse[t * h + qh] = m + denom.ln();
                for e in 0..d {
                    let o: f64 =
                        (lo..n).zip(&w).map(|(j, wj)| wj * data.value_cache[at(j, e)].to_f32() as f64 * vs).sum();
                    out[(t * h + qh) * d + e] = o / denom;
                }
            }
        }
        (out, lse)
    }
}

const ATOL: f64 = 2e-2;
const RTOL: f64 = 1e-2;
const LSE_ATOL: f64 = 5e-3;

fn check_decode<T: Element, C: Fp8 + KvStorage<T>>(case: &DecodeCase, seed: u64) {
    let stream = common::stream();
    let data = case.build::<T, C>(seed);
    let what = format!("{:?} over {:?}: {case:?}", T::DTYPE, C::DTYPE);
    let (out, lse) = case.run(&stream, &data, case.variant()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let (want, want_lse) = case.reference(&data);
    // Outputs: relative to the largest reference magnitude of the row as well (V values reach
    // 2 / scale * scale = 2, so the absolute tolerance of the 16-bit decode tests applies).
    for (i, (x, r)) in out.iter().zip(&want).enumerate() {
        let x = tf(*x) as f64;
        assert!(x.is_finite() && (x - r).abs() <= ATOL + RTOL * r.abs(), "{what}: out[{i}] gpu {x} vs f64 {r}");
    }
    for (i, (x, r)) in lse.iter().zip(&want_lse).enumerate() {
        let x = *x as f64;
        assert!(x.is_finite() && (x - r).abs() <= LSE_ATOL + 1e-4 * r.abs(), "{what}: lse[{i}] gpu {x} vs f64 {r}");
    }
}

/// The decode grid: both formats and compute types, GQA 32/8 and MHA, head 128 and 64, block 16
/// and 32, one split and many, folded and separate combine, batch-invariant splits, every
/// feature, per-layer / per-head / no scales, a padding request, large bf16 queries.
fn decode_grid<T: Element>(seed0: u64)
where
    Fp8E4M3: KvStorage<T>,
    Fp8E5M2: KvStorage<T>,
{
    let lens_a = vec![1328, 18, 0, 463, 1];
    let lens_b = vec![1, 54, 293, 70, 1100];
    let mut seed = seed0;
    let mut n = 0;
    for (hi, heads) in [(32, 8), (8, 8), (16, 2)].into_iter().enumerate() {
        for d in [128, 64] {
            for (bi, bs) in [16usize, 32].into_iter().enumerate() {
                for splits in [1usize, 7] {
                    seed += 1;
                    let k = (hi + bi + usize::from(d == 64) + splits) % 4;
                    let case = DecodeCase {
                        heads,
                        head_size: d,
                        block_size: bs,
                        lens: if seed.is_multiple_of(2) { lens_a.clone() } else { lens_b.clone() },
                        window_left: (k == 1 || k == 3).then_some(200),
                        softcap: (k == 2 || k == 3).then_some(12.0),
                        alibi: k == 3 || k == 1,
                        sinks: k >= 2,
                        per_head: [Some(true), Some(false), None][(seed % 3) as usize],
                        num_splits: splits,
                        split_keys: 0,
                        fold: seed % 4 < 2,
                        q_amp: if seed.is_multiple_of(5) { 300.0 } else { 2.0 },
                    };
                    check_decode::<T, Fp8E4M3>(&case, seed);
                    check_decode::<T, Fp8E5M2>(&case, seed + 500);
                    n += 2;
                }
            }
        }
    }
    // Batch-invariant splits (fixed keys per split, extra splits empty), both combines.
    for fold in [false, true] {
        seed += 1;
        let case = DecodeCase {
            heads: (32, 8),
            head_size: 128,
            block_size: 16,
            lens: vec![700, 1, 129, 0, 64],
            window_left: None,
            softcap: None,
            alibi: false,
            sinks: true,
            per_head: Some(true),
            num_splits: 12,
            split_keys: 64,
            fold,
            q_amp: 2.0,
        };
        check_decode::<T, Fp8E4M3>(&case, seed);
        check_decode::<T, Fp8E5M2>(&case, seed + 500);
        n += 2;
    }
    // Head sizes with an odd number of 16-dim steps (80, 112) and the large ones (192, 256).
    for d in [80, 112, 192, 256] {
        seed += 1;
        let case = DecodeCase {
            heads: (8, 2),
            head_size: d,
            block_size: 16,
            lens: vec![333, 5, 1000],
            window_left: Some(300),
            softcap: None,
            alibi: false,
            sinks: false,
            per_head: Some(true),
            num_splits: 3,
            split_keys: 0,
            fold: d % 64 == 0,
            q_amp: 4.0,
        };
        check_decode::<T, Fp8E4M3>(&case, seed);
        check_decode::<T, Fp8E5M2>(&case, seed + 500);
        n += 2;
    }
    eprintln!("fp8 decode {:?}: {n} cases passed", T::DTYPE);
}

#[test]
fn fp8_decode_against_f64_bf16() {
    decode_grid::<bf16>(170_000);
}

#[test]
fn fp8_decode_against_f64_f16() {
    decode_grid::<f16>(171_000);
}

/// A non-default pipeline variant with an FP8 cache runs the default FP8 pipeline (the same bits).
#[test]
fn fp8_decode_other_variants_fall_back() {
    let stream = common::stream();
    let case = DecodeCase {
        heads: (32, 8),
        head_size: 128,
        block_size: 16,
        lens: vec![900, 17, 250],
        window_left: None,
        softcap: None,
        alibi: false,
        sinks: false,
        per_head: Some(false),
        num_splits: 4,
        split_keys: 0,
        fold: true,
        q_amp: 2.0,
    };
    let data = case.build::<bf16, Fp8E4M3>(172_000);
    let base = case.run(&stream, &data, case.variant()).unwrap();
    for v in DecodeVariant::ALL {
        let got = case.run(&stream, &data, DecodeVariant { fold_combine: true, ..v }).unwrap();
        let bits = |r: &(Vec<bf16>, Vec<f32>)| -> Vec<u32> {
            r.0.iter().map(|x| tf(*x).to_bits()).chain(r.1.iter().map(|x| x.to_bits())).collect()
        };
        assert_eq!(bits(&got), bits(&base), "variant {v} with an FP8 cache");
    }
}

// ---- unseen rows ----------------------------------------------------------------------------------

/// Cache rows no query may read (outside the window, past seq_len in a last block, other blocks)
/// hold NaN / Inf bytes: outputs are finite and bit-identical to the run with those rows zero.
fn unseen_case<T: Element, C: Fp8 + KvStorage<T>>(case: &DecodeCase, seed: u64) {
    let stream = common::stream();
    let mut data = case.build::<T, C>(seed);
    let (_, kvh) = case.heads;
    let (d, bs) = (case.head_size, case.block_size);
    let row = kvh * d;
    let mut seen = vec![false; data.num_blocks * bs];
    for (r, &n) in case.lens.iter().enumerate() {
        if n == 0 {
            continue;
        }
        for j in case.first_visible(n)..n {
            let b = data.block_table[r * data.width + j / bs] as usize;
            seen[b * bs + j % bs] = true;
        }
    }
    let fill = |data: &mut DecodeData<T, C>, poison: bool| {
        for (slot, &s) in seen.iter().enumerate() {
            if s {
                continue;
            }
            for e in 0..row {
                let i = slot * row + e;
                let (kb, vb) = if poison {
                    (C::POISON[i % C::POISON.len()], C::POISON[(i + 1) % C::POISON.len()])
                } else {
                    (0, 0)
                };
                data.key_cache[i] = C::of_bits(kb);
                data.value_cache[i] = C::of_bits(vb);
            }
        }
    };
    let what = format!("unseen rows, {:?} over {:?}: {case:?}", T::DTYPE, C::DTYPE);
    fill(&mut data, false);
    let clean = case.run(&stream, &data, case.variant()).unwrap();
    fill(&mut data, true);
    let poisoned = case.run(&stream, &data, case.variant()).unwrap();
    for (i, (a, b)) in poisoned.0.iter().zip(&clean.0).enumerate() {
        let (a, b) = (tf(*a), tf(*b));
        assert!(a.is_finite(), "{what}: out[{i}] = {a}");
        assert_eq!(a.to_bits(), b.to_bits(), "{what}: out[{i}] {a} vs {b} with zero rows");
    }
    for (i, (a, b)) in poisoned.1.iter().zip(&clean.1).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}: lse[{i}] {a} vs {b}");
    }
}

#[test]
fn fp8_decode_unseen_rows_never_leak() {
    let mut seed = 173_000;
    for (window, splits, fold, bs) in [(Some(100), 1, false, 16), (Some(37), 5, true, 32), (None, 3, false, 16)] {
        for d in [128, 64] {
            seed += 1;
            let case = DecodeCase {
                heads: (32, 8),
                head_size: d,
                block_size: bs,
                // Lengths that end inside a block, so the last block has unseen rows.
                lens: vec![301, 7, 0, 1000, 50],
                window_left: window,
                softcap: Some(20.0),
                alibi: false,
                sinks: false,
                per_head: Some(true),
                num_splits: splits,
                split_keys: 0,
                fold,
                q_amp: 2.0,
            };
            unseen_case::<bf16, Fp8E4M3>(&case, seed);
            unseen_case::<bf16, Fp8E5M2>(&case, seed);
            unseen_case::<f16, Fp8E4M3>(&case, seed);
            unseen_case::<f16, Fp8E5M2>(&case, seed);
        }
    }
}

// ---- errors and facts -----------------------------------------------------------------------------

fn is_invalid<T: std::fmt::Debug>(r: Result<T, KernelError>, what: &str) {
    assert!(matches!(r, Err(KernelError::InvalidArgument { .. })), "{what}: {r:?}");
}

#[test]
fn fp8_bad_scales_are_typed_errors() {
    let stream = common::stream();
    let (nt, kvh, d, bs, nb) = (4usize, 4usize, 64usize, 16usize, 2usize);
    let row = kvh * d;
    let k = stream.clone_htod(&vec![bf16::from_f32(1.0); nt * row]).unwrap();
    let slots = stream.clone_htod(&[0i64, 1, 2, 3]).unwrap();
    let s1 = stream.clone_htod(&[1.0f32]).unwrap();
    let s3 = stream.clone_htod(&[1.0f32; 3]).unwrap();
    let s4 = stream.clone_htod(&[1.0f32; 4]).unwrap();
    let dims = KvWriteDims::contiguous(nt, row, nb, bs);
    let mut kc = stream.alloc_zeros::<Fp8E4M3>(nb * bs * row).unwrap();
    let mut vc = stream.alloc_zeros::<Fp8E4M3>(nb * bs * row).unwrap();
    // 3 scales: not a divisor of the row (256); key and value of different lengths.
    for (key, value, what) in [(&s3, &s3, "3 scales"), (&s1, &s4, "1 key scale, 4 value scales")] {
        let r = launch::kv_cache_write(
            &stream,
            k.as_view(),
            k.as_view(),
            KvCacheMut::Separate { key: kc.as_view_mut(), value: vc.as_view_mut() },
            slots.as_view(),
            dims,
            Some(KvScales { key: key.as_view(), value: value.as_view() }),
        );
        is_invalid(r, what);
    }
    // Scales for a bf16 cache.
    let mut bc = stream.alloc_zeros::<bf16>(nb * bs * row).unwrap();
    let mut bv = stream.alloc_zeros::<bf16>(nb * bs * row).unwrap();
    let r = launch::kv_cache_write(
        &stream,
        k.as_view(),
        k.as_view(),
        KvCacheMut::Separate { key: bc.as_view_mut(), value: bv.as_view_mut() },
        slots.as_view(),
        dims,
        Some(KvScales { key: s1.as_view(), value: s1.as_view() }),
    );
    is_invalid(r, "write: scales for a bf16 cache");
    // The same scales with 4 heads of 64 are fine (and with none).
    launch::kv_cache_write(
        &stream,
        k.as_view(),
        k.as_view(),
        KvCacheMut::Separate { key: kc.as_view_mut(), value: vc.as_view_mut() },
        slots.as_view(),
        dims,
        Some(KvScales { key: s4.as_view(), value: s4.as_view() }),
    )
    .unwrap();

    // Decode: scales of a wrong length, scales for a bf16 cache.
    let case = DecodeCase {
        heads: (8, 4),
        head_size: 64,
        block_size: 16,
        lens: vec![40, 3],
        window_left: None,
        softcap: None,
        alibi: false,
        sinks: false,
        per_head: Some(true),
        num_splits: 1,
        split_keys: 0,
        fold: false,
        q_amp: 1.0,
    };
    let data = case.build::<bf16, Fp8E4M3>(174_000);
    let mut bad = DecodeData { k_scale: vec![1.0; 3], v_scale: vec![1.0; 3], ..data };
    is_invalid(case.run(&stream, &bad, case.variant()), "decode: 3 scales for 4 kv heads");
    bad.k_scale = vec![1.0; 4];
    bad.v_scale = vec![1.0; 4];
    case.run(&stream, &bad, case.variant()).unwrap();
    let q = stream.clone_htod(&bad.query).unwrap();
    let cache = stream.alloc_zeros::<bf16>(bad.num_blocks * 16 * 4 * 64).unwrap();
    let meta = (
        stream.clone_htod(&bad.qsl).unwrap(),
        stream.clone_htod(&bad.seq_lens).unwrap(),
        stream.clone_htod(&bad.block_table).unwrap(),
    );
    let mut out = stream.alloc_zeros::<bf16>(2 * 8 * 64).unwrap();
    let dims = AttentionDims {
        num_tokens: 2,
        num_heads: 8,
        num_kv_heads: 4,
        head_size: 64,
        num_blocks: bad.num_blocks,
        block_size: 16,
        num_reqs: 2,
        max_blocks_per_req: bad.width,
        req_begin: 0,
        req_end: 2,
    };
    let bufs = AttentionBuffers::<bf16, bf16> {
        query: q.as_view(),
        key_cache: cache.as_view(),
        value_cache: cache.as_view(),
        kv_scales: Some(KvScales { key: s1.as_view(), value: s1.as_view() }),
        query_start_loc: meta.0.as_view(),
        seq_lens: meta.1.as_view(),
        block_table: meta.2.as_view(),
        out: out.as_view_mut(),
        lse: None,
        workspace: None,
        strides: AttentionStrides::contiguous(&dims),
    };
    let features = AttentionFeatures {
        scale: 0.125,
        causal: true,
        window_left: None,
        window_right: None,
        softcap: None,
        alibi_slopes: None,
        sinks: None,
    };
    is_invalid(
        attention::paged_attention(
            &stream,
            AttentionKernel::Decode { num_splits: 1, split_keys: 0 },
            &dims,
            &features,
            bufs,
        ),
        "decode: scales for a bf16 cache",
    );
    stream.synchronize().unwrap();
}

/// The occupancy the planner's wave model needs exists for every FP8 decode instantiation, and a
/// cache type that cannot serve the compute type is refused.
#[test]
fn fp8_decode_occupancy_known() {
    let dev = common::device();
    let decode = AttentionKernel::Decode { num_splits: 1, split_keys: 0 };
    for d in attention::SUPPORTED_HEAD_SIZES {
        for dtype in [DType::F16, DType::BF16] {
            for cache in [DType::Fp8E4M3, DType::Fp8E5M2] {
                let n = attention::blocks_per_sm_for_cache(
                    dev.context(),
                    decode,
                    DecodeVariant::default(),
                    d,
                    dtype,
                    cache,
                )
                .unwrap();
                assert!(n >= 1, "head {d} {dtype:?} over {cache:?}: {n} blocks per SM");
            }
        }
    }
    let r = attention::blocks_per_sm_for_cache(
        dev.context(),
        decode,
        DecodeVariant::default(),
        128,
        DType::BF16,
        DType::F16,
    );
    is_invalid(r, "an f16 cache for bf16 attention");
}

/// The write's quotient `x / scale` must be the IEEE-rounded one (the kernel computes it with a
/// reciprocal and a correction step, not a division per element): inputs are placed within a few
/// f32 ulps of `midpoint * scale` for midpoints between adjacent FP8 codes, so the exact quotient
/// lies within an ulp of a rounding boundary of the format and a quotient one ulp off stores the
/// other code. Random non-power-of-two scales per KV head over six decades, f32 inputs.
fn division_case<C: Fp8 + KvStorage<f32>>(seed: u64) {
    let stream = common::stream();
    let mut rng = StdRng::seed_from_u64(seed);
    let (kvh, d, nt, bs) = (16usize, 64usize, 1024usize, 16usize);
    let row = kvh * d;
    let scales: Vec<f32> = (0..kvh).map(|_| 10f32.powf(rng.random_range(-3.0f32..3.0))).collect();
    // Finite codes' values, ascending, and the midpoints between neighbours.
    let mut vals: Vec<f32> =
        (0..=255u8).map(|b| <C as CacheElement>::to_f32(C::of_bits(b))).filter(|v| v.is_finite()).collect();
    vals.sort_by(f32::total_cmp);
    vals.dedup();
    let mids: Vec<f32> = vals.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    let keys: Vec<f32> = (0..nt * row)
        .map(|i| {
            let s = scales[(i % row) / d];
            let m = mids[rng.random_range(0..mids.len())];
            let x = m * s;
            // A few ulps either side (f32 steps), and the midpoint product itself.
            let k = rng.random_range(-3i32..=3);
            f32::from_bits((x.to_bits() as i64 + i64::from(k)).max(0) as u32)
        })
        .collect();
    let num_blocks = nt / bs;
    let slots: Vec<i64> = (0..nt as i64).collect();
    let k_dev = stream.clone_htod(&keys).unwrap();
    let sc = stream.clone_htod(&scales).unwrap();
    let sc_v = stream.clone_htod(&scales).unwrap();
    let slots_dev = stream.clone_htod(&slots).unwrap();
    let mut kc = stream.alloc_zeros::<C>(num_blocks * bs * row).unwrap();
    let mut vc = stream.alloc_zeros::<C>(num_blocks * bs * row).unwrap();
    launch::kv_cache_write(
        &stream,
        k_dev.as_view(),
        k_dev.as_view(),
        KvCacheMut::Separate { key: kc.as_view_mut(), value: vc.as_view_mut() },
        slots_dev.as_view(),
        KvWriteDims::contiguous(nt, row, num_blocks, bs),
        Some(KvScales { key: sc.as_view(), value: sc_v.as_view() }),
    )
    .unwrap();
    let want: Vec<u8> = keys.iter().enumerate().map(|(i, &x)| quantise::<C>(x, Some(scales[(i % row) / d]))).collect();
    let what = format!("{:?} division near midpoints", C::DTYPE);
    compare_bytes(&stream.clone_dtoh(&kc).unwrap(), &want, &what, "key cache");
    compare_bytes(&stream.clone_dtoh(&vc).unwrap(), &want, &what, "value cache");
}

#[test]
fn fp8_write_division_is_ieee_near_every_rounding_boundary() {
    for seed in 0..4 {
        division_case::<Fp8E4M3>(170_000 + seed);
        division_case::<Fp8E5M2>(171_000 + seed);
    }
}
