//! FP8 KV caches on the CPU backend, the reference for the kernels: the quantising write bit for
//! bit against `C::from_f32(x.to_f32() / scale)` (special values, per-layer and per-head scales,
//! padding slots untouched), attention over e4m3 / e5m2 caches against a float64 recomputation
//! over the dequantised cache (ACCEPTANCE.md's paged-attention grid, a subset), the cost of
//! quantisation against a bf16 cache on the same inputs, the scale errors, and NaN bytes in
//! positions no row sees.

mod common;

use attention_backend::ndarray::{Array2, Array3, Array4, Axis};
use attention_backend::{
    bf16, cpu, f16, AttentionError, AttentionParams, Backend, CacheElement, CacheLayout, CpuKvCache, Element,
    ForwardTensors, Fp8E4M3, Fp8E5M2, KvCache, KvScaleValues, KvStorage, SlotMapping,
};
use common::{build, reference, Built, Gen, Spec};

// ---------------------------------------------------------------------------------------------
// The write
// ---------------------------------------------------------------------------------------------

/// A byte no write produces from the test data below, so "untouched" is visible.
fn sentinel<C: CacheElement>() -> C {
    C::from_f32(-0.8125)
}

/// Values that exercise every branch of the conversion: NaN, infinities, out of range (both
/// formats saturate), subnormals of both formats, signed zeros, ties, ordinary values.
fn special_values() -> Vec<f32> {
    let mut v = vec![
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        1e30,
        -1e30,
        448.0,
        449.0,
        464.0,
        480.0,
        57344.0,
        61440.0,
        -70000.0,
        2f32.powi(-9),  // e4m3's smallest subnormal
        2f32.powi(-10), // half of it: a tie to even (0)
        3.0 * 2f32.powi(-10),
        2f32.powi(-16), // e5m2's smallest subnormal
        2f32.powi(-17),
        2f32.powi(-7) * 0.9,
        1.0625,
        1.125 + 0.0625,
        f32::MIN_POSITIVE,
        1e-40, // an f32 subnormal
    ];
    let mut g = Gen::new(7);
    v.extend((0..40).map(|_| g.randn() * 20.0));
    v
}

/// Writes `key` / `value` (`[t, h, d]`) into a sentinel-filled cache at `slots` and checks every
/// element: written rows equal `C::from_f32(x.to_f32() / scale_of_head)` bit for bit, every other
/// row still holds the sentinel.
fn check_write<T: Element, C: KvStorage<T> + Eq + std::fmt::Debug>(
    layout: CacheLayout,
    key: &Array3<T>,
    value: &Array3<T>,
    slots: &[i64],
    scales: Option<KvScaleValues>,
) {
    let mut cache = CpuKvCache::<C>::zeros(layout).unwrap();
    cache.set_scales(scales.clone()).unwrap();
    {
        let (mut k, mut v) = cache.key_value_mut();
        k.fill(sentinel());
        v.fill(sentinel());
    }
    cpu::kv_cache_update(key.view(), value.view(), &mut cache, &SlotMapping::new(slots.to_vec())).unwrap();
    let bs = layout.block_size;
    let mut written = vec![None; layout.num_slots()];
    for (t, &s) in slots.iter().enumerate() {
        if s >= 0 {
            written[s as usize] = Some(t);
        }
    }
    for (slot, w) in written.iter().enumerate() {
        let (b, o) = (slot / bs, slot % bs);
        for h in 0..layout.num_kv_heads {
            let (ks, vs) = scales.as_ref().map_or((1.0, 1.0), |s| s.of_head(h));
            for d in 0..layout.head_size {
                let (got_k, got_v) = (cache.key()[[b, o, h, d]], cache.value()[[b, o, h, d]]);
                let (want_k, want_v) = match w {
                    Some(t) => {
                        (C::from_f32(key[[*t, h, d]].to_f32() / ks), C::from_f32(value[[*t, h, d]].to_f32() / vs))
                    }
                    None => (sentinel(), sentinel()),
                };
                assert_eq!((got_k, got_v), (want_k, want_v), "slot {slot} head {h} elem {d} (written by {w:?})");
            }
        }
    }
}

/// `[n, h, d]` of the special values (cycled, shifted per array so key and value differ).
fn special_rows<T: Element>(n: usize, h: usize, d: usize, shift: usize) -> Array3<T> {
    let v = special_values();
    Array3::from_shape_fn((n, h, d), |(t, hh, dd)| T::from_f32(v[(t * h * d + hh * d + dd + shift) % v.len()]))
}

fn special_case<T: Element, C: KvStorage<T> + Eq + std::fmt::Debug>() {
    let layout = CacheLayout::new(6, 8, 3, 16).unwrap();
    let n = 12;
    let (key, value) = (special_rows::<T>(n, 3, 16, 0), special_rows::<T>(n, 3, 16, 5));
    // Distinct slots, some padding, some blocks never touched.
    let slots: Vec<i64> = vec![0, 9, -1, 47, 8, 17, -1, 30, 31, 2, -5, 40];
    check_write::<T, C>(layout, &key, &value, &slots, None);
    check_write::<T, C>(layout, &key, &value, &slots, Some(KvScaleValues::per_tensor(0.37, 3.5)));
    check_write::<T, C>(layout, &key, &value, &slots, Some(KvScaleValues::per_tensor(1e-3, 1e3)));
    let per_head = KvScaleValues::per_head(vec![0.5, 0.013, 7.0], vec![2.0, 0.25, 1e-4]);
    check_write::<T, C>(layout, &key, &value, &slots, Some(per_head));
}

#[test]
fn write_special_values_bit_exact_e4m3() {
    special_case::<f32, Fp8E4M3>();
    special_case::<f16, Fp8E4M3>();
    special_case::<bf16, Fp8E4M3>();
}

#[test]
fn write_special_values_bit_exact_e5m2() {
    special_case::<f32, Fp8E5M2>();
    special_case::<f16, Fp8E5M2>();
    special_case::<bf16, Fp8E5M2>();
}

/// The written bytes of the special values are the ones the formats define (not only what
/// `from_f32` says): NaN is 0x7f/0xff, infinities and out-of-range values saturate.
#[test]
fn write_special_values_expected_bytes() {
    let layout = CacheLayout::new(1, 1, 1, 16).unwrap();
    let xs = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30, 0.0, 2f32.powi(-9), 2f32.powi(-10)];
    let mut key = Array3::<f32>::zeros((1, 1, 16));
    for (i, x) in xs.iter().enumerate() {
        key[[0, 0, i]] = *x;
    }
    let mut cache = CpuKvCache::<Fp8E4M3>::zeros(layout).unwrap();
    cpu::kv_cache_update(key.view(), key.view(), &mut cache, &SlotMapping::new(vec![0])).unwrap();
    let bits: Vec<u8> = cache.key().iter().take(xs.len()).map(|b| b.to_bits()).collect();
    // NaN, +inf -> +448, -inf -> -448, saturation both ways, +0, the smallest subnormal, tie -> 0.
    assert_eq!(bits, vec![0x7f, 0x7e, 0xfe, 0x7e, 0xfe, 0x00, 0x01, 0x00]);
    let mut cache = CpuKvCache::<Fp8E5M2>::zeros(layout).unwrap();
    cpu::kv_cache_update(key.view(), key.view(), &mut cache, &SlotMapping::new(vec![0])).unwrap();
    let bits: Vec<u8> = cache.key().iter().take(3).map(|b| b.to_bits()).collect();
    assert_eq!(bits[1..], [0x7b, 0xfb], "e5m2 saturates to +-57344");
    assert!(cache.key()[[0, 0, 0, 0]].to_f32().is_nan());
}

/// ACCEPTANCE.md's KV-write grid, a subset that stays fast on the CPU: num_tokens 1 and 42,
/// kv heads 1 and 8, head sizes 64, 80, 120, 256, block sizes 8, 16, 32, 1024 blocks, random
/// distinct slots with padding, both FP8 formats, f16 and bf16 inputs, per-layer and per-head
/// scales. Random normal data times 50 plus a sprinkling of special values.
#[test]
fn write_grid_bit_exact() {
    let mut case = 0u64;
    for &n in &[1usize, 42] {
        for &h in &[1usize, 8] {
            for &d in &[64usize, 80, 120, 256] {
                for &bs in &[8usize, 16, 32] {
                    case += 1;
                    // Head size 256 with 8 heads: fewer blocks, so the grid stays quick.
                    let blocks = if h * d * bs > 16384 { 64 } else { 1024 };
                    let layout = CacheLayout::new(blocks, bs, h, d).unwrap();
                    let mut g = Gen::new(case);
                    let specials = special_values();
                    let mut draw = |i: usize| {
                        if i.is_multiple_of(97) {
                            specials[i % specials.len()]
                        } else {
                            g.randn() * 50.0
                        }
                    };
                    let k32 = Array3::from_shape_fn((n, h, d), |(a, b, c)| draw(a * 7919 + b * 131 + c));
                    let v32 = Array3::from_shape_fn((n, h, d), |(a, b, c)| draw(a * 6007 + b * 17 + c + 3));
                    let mut pool: Vec<i64> = (0..layout.num_slots() as i64).collect();
                    let mut slots = Vec::new();
                    for t in 0..n {
                        let j = (g.uniform() * pool.len() as f32) as usize % pool.len();
                        slots.push(if t % 5 == 3 { -1 } else { pool.swap_remove(j) });
                    }
                    let per_head = KvScaleValues::per_head(
                        (0..h).map(|i| 0.05 + 0.1 * i as f32).collect(),
                        (0..h).map(|i| 0.3 / (1 + i) as f32).collect(),
                    );
                    let scales = if case.is_multiple_of(2) { per_head } else { KvScaleValues::per_tensor(0.11, 0.9) };
                    let (kh, vh) = (k32.mapv(f16::from_f32), v32.mapv(f16::from_f32));
                    let (kb, vb) = (k32.mapv(bf16::from_f32), v32.mapv(bf16::from_f32));
                    check_write::<f16, Fp8E4M3>(layout, &kh, &vh, &slots, Some(scales.clone()));
                    check_write::<bf16, Fp8E5M2>(layout, &kb, &vb, &slots, Some(scales.clone()));
                    if case.is_multiple_of(3) {
                        check_write::<bf16, Fp8E4M3>(layout, &kb, &vb, &slots, Some(scales));
                        check_write::<f16, Fp8E5M2>(layout, &kh, &vh, &slots, None);
                    }
                }
            }
        }
    }
}

/// An unquantised cache still receives its values bit for bit through the generic write (NaN
/// payloads included: no round trip through f32).
#[test]
fn unquantised_write_copies_bits() {
    let layout = CacheLayout::new(2, 4, 1, 16).unwrap();
    let key = Array3::from_shape_fn((2, 1, 16), |(t, _, d)| f16::from_bits(0x7c01 + (t * 16 + d) as u16));
    let mut cache = CpuKvCache::<f16>::zeros(layout).unwrap();
    cpu::kv_cache_update(key.view(), key.view(), &mut cache, &SlotMapping::new(vec![5, 0])).unwrap();
    for d in 0..16 {
        assert_eq!(cache.key()[[1, 1, 0, d]].to_bits(), key[[0, 0, d]].to_bits());
        assert_eq!(cache.value()[[0, 0, 0, d]].to_bits(), key[[1, 0, d]].to_bits());
    }
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

/// The test's scales for `nkv` heads: per head when `per_head`, else per layer. Chosen so the
/// data (|x| < 3.5) uses much of e4m3's range without saturating.
fn test_scales(nkv: usize, per_head: bool) -> KvScaleValues {
    if per_head {
        KvScaleValues::per_head(
            (0..nkv).map(|h| 0.01 + 0.005 * h as f32).collect(),
            (0..nkv).map(|h| 0.02 - 0.002 * h as f32).collect(),
        )
    } else {
        KvScaleValues::per_tensor(0.0125, 0.02)
    }
}

/// `built` (a bf16 batch) with its cache quantised to `C`: every element, the never-written NaN
/// rows included (they become NaN bytes), and the dense reference K/V replaced by the dequantised
/// values `fp8(x / s) * s` the FP8 cache holds after `forward`.
fn quantise<C: KvStorage<bf16>>(built: &Built<bf16>, scales: &KvScaleValues) -> (CpuKvCache<C>, Built<bf16>) {
    let (kc, vc) = (built.cache.key(), built.cache.value());
    let shape = kc.raw_dim();
    let head = |idx: [usize; 4]| scales.of_head(idx[2]);
    let k = Array4::from_shape_fn(shape, |(a, b, c, d)| C::from_f32(kc[[a, b, c, d]].to_f32() / head([a, b, c, d]).0));
    let v = Array4::from_shape_fn(shape, |(a, b, c, d)| C::from_f32(vc[[a, b, c, d]].to_f32() / head([a, b, c, d]).1));
    let mut cache = CpuKvCache::from_arrays(k, v).unwrap();
    cache.set_scales(Some(scales.clone())).unwrap();
    let nkv = built.cache.layout().num_kv_heads;
    let hs = built.cache.layout().head_size;
    let deq = |dense: &Vec<Vec<f64>>, pick: fn((f32, f32)) -> f32| -> Vec<Vec<f64>> {
        dense
            .iter()
            .map(|r| {
                r.iter()
                    .enumerate()
                    .map(|(i, &x)| {
                        let s = pick(scales.of_head((i / hs) % nkv));
                        (C::from_f32(x as f32 / s).to_f32() * s) as f64
                    })
                    .collect()
            })
            .collect()
    };
    let mut b = built.clone_without_cache();
    b.k_dense = deq(&built.k_dense, |s| s.0);
    b.v_dense = deq(&built.v_dense, |s| s.1);
    (cache, b)
}

/// Helper trait: a [`Built`] minus its cache (the FP8 test keeps its own).
trait CloneWithoutCache {
    fn clone_without_cache(&self) -> Built<bf16>;
}

impl CloneWithoutCache for Built<bf16> {
    fn clone_without_cache(&self) -> Built<bf16> {
        Built {
            meta: self.meta.clone(),
            cache: CpuKvCache::zeros(CacheLayout::new(1, 1, 1, 1).unwrap()).unwrap(),
            query: self.query.clone(),
            key: self.key.clone(),
            value: self.value.clone(),
            k_dense: self.k_dense.clone(),
            v_dense: self.v_dense.clone(),
        }
    }
}

/// Runs `cpu::forward` of `b`'s step over `cache` and returns `(out, lse)`.
fn forward<C: KvStorage<bf16>>(
    b: &Built<bf16>,
    p: &AttentionParams,
    cache: &mut CpuKvCache<C>,
) -> (Array3<bf16>, Array2<f32>) {
    let n = b.meta.num_tokens();
    let mut out = Array3::<bf16>::from_elem((n, p.num_heads, p.head_size), bf16::NAN);
    let mut lse = Array2::<f32>::from_elem((n, p.num_heads), f32::NAN);
    cpu::forward(
        &b.meta,
        p,
        cpu::ForwardIo {
            query: b.query.view(),
            key: b.key.view(),
            value: b.value.view(),
            cache,
            out: out.view_mut(),
            lse: Some(lse.view_mut()),
        },
    )
    .expect("forward");
    (out, lse)
}

/// One FP8 case: forward over the quantised cache, then every real row against the float64
/// reference over the dequantised cache (2e-2 abs + 1e-2 rel, lse 1e-3 rel), padding rows
/// untouched, no NaN. Returns the max abs error.
fn fp8_case<C: KvStorage<bf16>>(spec: &Spec, per_head: bool) -> Result<f64, String> {
    let built = build::<bf16>(spec);
    let p = &spec.params;
    let scales = test_scales(p.num_kv_heads, per_head);
    let (mut cache, b) = quantise::<C>(&built, &scales);
    let (out, lse) = forward(&b, p, &mut cache);
    let (ref_out, ref_lse) = reference(spec, &b);
    let num_actual = b.meta.num_actual_tokens;
    let mut max_abs = 0f64;
    for t in 0..b.meta.num_tokens() {
        for h in 0..p.num_heads {
            let l = lse[[t, h]] as f64;
            if t >= num_actual {
                if !l.is_nan() || out.index_axis(Axis(0), t).iter().any(|x| !x.is_nan()) {
                    return Err(format!("padding row {t} was written"));
                }
                continue;
            }
            let rl = ref_lse[t * p.num_heads + h];
            if l.is_nan()
                || rl.is_infinite() != l.is_infinite()
                || (rl.is_finite() && (l - rl).abs() > 1e-3 * rl.abs().max(1.0))
            {
                return Err(format!("lse[{t}][{h}] = {l}, reference {rl}"));
            }
            for d in 0..p.head_size {
                let x = out[[t, h, d]].to_f32() as f64;
                let r = ref_out[(t * p.num_heads + h) * p.head_size + d];
                let e = (x - r).abs();
                if !x.is_finite() || e > 2e-2 + 1e-2 * r.abs() {
                    return Err(format!("out[{t}][{h}][{d}] = {x}, reference {r}"));
                }
                max_abs = max_abs.max(e);
            }
        }
    }
    Ok(max_abs)
}

/// The batches of ACCEPTANCE.md's paged-attention grid, without the long one (CPU time).
fn batches() -> Vec<Vec<(usize, usize)>> {
    vec![
        vec![(1, 1328), (1, 18), (1, 463)],
        vec![(1, 1), (1, 54), (1, 293), (1, 70)],
        vec![(1, 1328), (5, 18), (129, 463)],
        vec![(1, 523), (1, 37), (1, 2011)],
    ]
}

/// ACCEPTANCE.md's paged-attention grid with FP8 caches, a subset: every batch, every
/// (heads, kv heads) pair, head sizes 64 / 128 / 256 and block sizes 16 / 32 in rotation, soft-cap
/// none / 10 / 50 and window none / 256 in rotation, per-layer and per-head scales in rotation,
/// both formats. Prints the largest error.
#[test]
fn attention_grid_e4m3_e5m2() {
    let heads = [(4usize, 4usize), (8, 2), (16, 2)];
    let mut case = 0usize;
    let mut worst = [0f64; 2];
    for batch in batches() {
        for &(nh, nkv) in &heads {
            case += 1;
            let hs = [64, 128, 256][case % 3];
            let bs = [16, 32][case % 2];
            let mut p = AttentionParams::new(nh, nkv, hs);
            p.softcap = [None, Some(10.0), Some(50.0)][(case / 2) % 3];
            p.window_left = if case % 4 == 1 { Some(256) } else { None };
            let spec = Spec::new(batch.clone(), bs, 2048 + case * 977, p).seed(case as u64);
            let per_head = case.is_multiple_of(2);
            let e4 = fp8_case::<Fp8E4M3>(&spec, per_head).map_err(|e| format!("e4m3 case {case}: {e}")).unwrap();
            let e5 = fp8_case::<Fp8E5M2>(&spec, !per_head).map_err(|e| format!("e5m2 case {case}: {e}")).unwrap();
            worst = [worst[0].max(e4), worst[1].max(e5)];
        }
    }
    println!(
        "fp8 attention vs float64 over the dequantised cache: max abs e4m3 {:.2e}, e5m2 {:.2e}",
        worst[0], worst[1]
    );
}

/// ALiBi, sinks and a two-sided window over an FP8 cache (the features the grid leaves out).
#[test]
fn attention_features_fp8() {
    let mut p = AttentionParams::new(8, 2, 64);
    p.alibi_slopes = Some((0..8).map(|h| 0.5f32.powi(h + 1)).collect());
    p.sinks = Some((0..8).map(|h| h as f32 * 0.3 - 1.0).collect());
    let spec = Spec::new(vec![(1, 300), (17, 40), (64, 64)], 16, 512, p.clone()).seed(11);
    fp8_case::<Fp8E4M3>(&spec, true).unwrap();
    let mut p = AttentionParams::new(4, 1, 80);
    p.causal = false;
    p.window_left = Some(20);
    p.window_right = Some(5);
    let spec = Spec::new(vec![(30, 100), (1, 77)], 16, 256, p).seed(12);
    fp8_case::<Fp8E5M2>(&spec, false).unwrap();
}

/// The cost of quantisation: the same inputs through a bf16 cache and through e4m3 / e5m2 caches
/// (per-layer scales from the data's range), outputs compared with each other. Printed; the test
/// bounds them loosely (e4m3 keeps 3 mantissa bits, e5m2 2) so a broken dequantisation fails.
#[test]
fn quantisation_error_against_bf16() {
    let heads = [(8usize, 2usize), (16, 2)];
    let mut stats = [(0f64, 0f64, 0usize); 2];
    for (i, batch) in batches().into_iter().enumerate() {
        let (nh, nkv) = heads[i % 2];
        let p = AttentionParams::new(nh, nkv, 128);
        let spec = Spec::new(batch, 16, 2048, p.clone()).seed(100 + i as u64);
        let built = build::<bf16>(&spec);
        let mut bf_cache = built.cache.clone();
        let (want, _) = forward(&built, &p, &mut bf_cache);
        // |x| < 3.5: a per-layer scale mapping 3.5 to the format's top (vLLM's calibration rule).
        for (f, max) in [(0usize, Fp8E4M3::MAX), (1, Fp8E5M2::MAX)] {
            let s = 3.5 / max;
            let scales = KvScaleValues::per_tensor(s, s);
            let got = if f == 0 {
                let (mut c, b) = quantise::<Fp8E4M3>(&built, &scales);
                forward(&b, &p, &mut c).0
            } else {
                let (mut c, b) = quantise::<Fp8E5M2>(&built, &scales);
                forward(&b, &p, &mut c).0
            };
            let n = built.meta.num_actual_tokens;
            for t in 0..n {
                for (x, y) in got.index_axis(Axis(0), t).iter().zip(want.index_axis(Axis(0), t)) {
                    let e = (x.to_f32() - y.to_f32()).abs() as f64;
                    stats[f].0 = stats[f].0.max(e);
                    stats[f].1 += e;
                    stats[f].2 += 1;
                }
            }
        }
    }
    for (name, (max, sum, n)) in ["e4m3", "e5m2"].iter().zip(stats) {
        println!("quantisation error vs bf16 cache, {name}: max abs {max:.3e}, mean abs {:.3e}", sum / n as f64);
    }
    // Measured: e4m3 max 0.11, mean 3.0e-3; e5m2 max 0.16, mean 6.0e-3 (outputs are O(0.1..1)).
    assert!(stats[0].0 < 0.25 && stats[0].1 / (stats[0].2 as f64) < 0.01, "e4m3 {:?}", stats[0]);
    assert!(stats[1].0 < 0.5 && stats[1].1 / (stats[1].2 as f64) < 0.02, "e5m2 {:?}", stats[1]);
    assert!(stats[0].1 > 0.0, "quantisation changed nothing: the FP8 path was not taken");
}

/// NaN bytes in positions no row sees (the tail of each last block, blocks of no request, stale
/// rows) change nothing: the output is bit-identical to the run where those bytes are zero.
#[test]
fn unseen_nan_bytes_do_not_leak() {
    let mut p = AttentionParams::new(8, 2, 64);
    p.window_left = Some(40);
    let spec = Spec::new(vec![(1, 100), (9, 37), (33, 33)], 16, 256, p.clone()).seed(5);
    let built = build::<bf16>(&spec);
    let scales = test_scales(2, true);
    let (mut nan_cache, b) = quantise::<Fp8E4M3>(&built, &scales);
    // Zero every NaN byte: those are exactly the never-written rows.
    let mut zero_cache = nan_cache.clone();
    {
        let (mut k, mut v) = zero_cache.key_value_mut();
        let nan_bytes = k.iter().filter(|x| x.to_f32().is_nan()).count();
        assert!(nan_bytes > 0, "the test needs NaN bytes in the cache");
        k.mapv_inplace(|x| if x.to_f32().is_nan() { Fp8E4M3::from_bits(0) } else { x });
        v.mapv_inplace(|x| if x.to_f32().is_nan() { Fp8E4M3::from_bits(0) } else { x });
    }
    let (o1, l1) = forward(&b, &p, &mut nan_cache);
    let (o2, l2) = forward(&b, &p, &mut zero_cache);
    let n = b.meta.num_actual_tokens;
    for t in 0..n {
        for h in 0..p.num_heads {
            assert_eq!(l1[[t, h]].to_bits(), l2[[t, h]].to_bits(), "lse row {t} head {h}");
            for d in 0..p.head_size {
                assert!(o1[[t, h, d]].is_finite(), "out[{t}][{h}][{d}] is not finite");
                assert_eq!(o1[[t, h, d]].to_bits(), o2[[t, h, d]].to_bits(), "out[{t}][{h}][{d}]");
            }
        }
    }
}

/// The plan/run API with borrowed scales gives the same bits as `forward` with the cache's own.
#[test]
fn plan_run_with_borrowed_scales_matches_forward() {
    let p = AttentionParams::new(4, 2, 64);
    let spec = Spec::new(vec![(1, 50), (7, 20)], 16, 64, p.clone()).seed(9);
    let built = build::<bf16>(&spec);
    let scales = test_scales(2, false);
    let (mut cache, b) = quantise::<Fp8E5M2>(&built, &scales);
    let (mut plain, _) = quantise::<Fp8E5M2>(&built, &scales);
    let (want, want_lse) = forward(&b, &p, &mut cache);
    plain.set_scales(None).unwrap();
    let (mut key_cache, mut value_cache) = plain.clone().into_arrays();
    let n = b.meta.num_tokens();
    let mut out = Array3::<bf16>::from_elem((n, 4, 64), bf16::NAN);
    let mut lse = Array2::<f32>::from_elem((n, 4), f32::NAN);
    cpu::plan(&b.meta, plain.layout())
        .unwrap()
        .run(
            &p,
            cpu::LayerViews {
                query: b.query.view(),
                new_kv: Some((b.key.view(), b.value.view())),
                key_cache: key_cache.view_mut(),
                value_cache: value_cache.view_mut(),
                kv_scales: Some(&scales),
                out: out.view_mut(),
                lse: Some(lse.view_mut()),
            },
        )
        .unwrap();
    assert_eq!(key_cache, cache.key());
    assert_eq!(value_cache, cache.value());
    let rows = b.meta.num_actual_tokens;
    for t in 0..rows {
        for h in 0..4 {
            assert_eq!(lse[[t, h]].to_bits(), want_lse[[t, h]].to_bits());
            for d in 0..64 {
                assert_eq!(out[[t, h, d]].to_bits(), want[[t, h, d]].to_bits());
            }
        }
    }
}

/// The run-time `Backend` on the CPU with an FP8 `KvCache`: scales travel with the cache through
/// `kv_cache_from_host` / `kv_cache_to_host`, and `forward` matches `cpu::forward`.
#[test]
fn backend_api_fp8_cache() {
    let p = AttentionParams::new(4, 2, 64);
    let spec = Spec::new(vec![(1, 40), (5, 12)], 16, 64, p.clone()).seed(21);
    let built = build::<bf16>(&spec);
    let scales = test_scales(2, true);
    let (mut cpu_cache, b) = quantise::<Fp8E4M3>(&built, &scales);
    let backend = Backend::cpu();
    let mut cache: KvCache<Fp8E4M3> = backend.kv_cache_from_host(cpu_cache.clone()).unwrap();
    assert_eq!(cache.scales(), Some(&scales));
    let (want, _) = forward(&b, &p, &mut cpu_cache);
    let step = backend.prepare_step(b.meta.clone()).unwrap();
    let n = b.meta.num_tokens();
    let (query, key, value) = (
        backend.tensor(b.query.clone()).unwrap(),
        backend.tensor(b.key.clone()).unwrap(),
        backend.tensor(b.value.clone()).unwrap(),
    );
    let mut out = backend.tensor(Array3::<bf16>::from_elem((n, 4, 64), bf16::NAN)).unwrap();
    backend
        .forward(
            &step,
            &p,
            ForwardTensors { query: &query, key: &key, value: &value, cache: &mut cache, out: &mut out, lse: None },
        )
        .unwrap();
    let out = backend.to_host(&out).unwrap();
    for t in 0..b.meta.num_actual_tokens {
        for h in 0..4 {
            for d in 0..64 {
                assert_eq!(out[[t, h, d]].to_bits(), want[[t, h, d]].to_bits());
            }
        }
    }
    let back = backend.kv_cache_to_host(&cache).unwrap();
    assert_eq!(back.scales(), Some(&scales));
    assert_eq!(back.key(), cpu_cache.key());
}

// ---------------------------------------------------------------------------------------------
// Scale errors
// ---------------------------------------------------------------------------------------------

fn is_scale_error(e: &AttentionError, needle: &str) -> bool {
    matches!(e, AttentionError::InvalidKvScales { what, .. } if what.contains(needle))
}

#[test]
fn scale_values_and_counts_are_checked() {
    let layout = CacheLayout::new(4, 16, 4, 64).unwrap();
    let bad: [(KvScaleValues, &str); 9] = [
        (KvScaleValues::per_head(vec![1.0, 1.0], vec![1.0, 1.0]), "num_kv_heads = 4"),
        (KvScaleValues::per_head(vec![1.0; 4], vec![1.0]), "4 key and 1 value"),
        (KvScaleValues::per_head(vec![], vec![]), "0 key"),
        (KvScaleValues::per_tensor(f32::NAN, 1.0), "key scale [0] = NaN"),
        (KvScaleValues::per_tensor(1.0, f32::INFINITY), "value scale [0] = inf"),
        (KvScaleValues::per_tensor(0.0, 1.0), "key scale [0] = 0"),
        (KvScaleValues::per_tensor(1.0, -0.5), "value scale [0] = -0.5"),
        (KvScaleValues::per_head(vec![1.0, 1.0, -0.0, 1.0], vec![1.0; 4]), "key scale [2]"),
        (KvScaleValues::per_head(vec![1.0; 4], vec![1.0, 1.0, 1.0, f32::NEG_INFINITY]), "value scale [3]"),
    ];
    for (s, needle) in bad {
        let e = CpuKvCache::<Fp8E4M3>::with_scales(layout, s.clone()).unwrap_err();
        assert!(is_scale_error(&e, needle), "{s:?}: {e}");
        let mut c = CpuKvCache::<Fp8E5M2>::with_scales(layout, KvScaleValues::per_tensor(2.0, 3.0)).unwrap();
        let e = c.set_scales(Some(s.clone())).unwrap_err();
        assert!(is_scale_error(&e, needle), "{s:?}: {e}");
        assert_eq!(c.scales(), Some(&KvScaleValues::per_tensor(2.0, 3.0)), "a refused set keeps the old scales");
    }
    // Both good forms pass.
    CpuKvCache::<Fp8E4M3>::with_scales(layout, KvScaleValues::per_tensor(1e-6, 1e6)).unwrap();
    CpuKvCache::<Fp8E4M3>::with_scales(layout, KvScaleValues::per_head(vec![0.5; 4], vec![2.0; 4])).unwrap();
}

#[test]
fn scales_with_an_unquantised_cache_are_refused() {
    let layout = CacheLayout::new(4, 16, 2, 64).unwrap();
    let s = KvScaleValues::per_tensor(1.0, 1.0);
    let e = CpuKvCache::<bf16>::with_scales(layout, s.clone()).unwrap_err();
    assert!(is_scale_error(&e, "only FP8 caches are scaled"), "{e}");
    let mut c = CpuKvCache::<f32>::zeros(layout).unwrap();
    assert!(is_scale_error(&c.set_scales(Some(s.clone())).unwrap_err(), "f32 cache"));
    c.set_scales(None).unwrap();

    // Through the plan/run API, borrowed: refused before anything is written.
    let p = AttentionParams::new(2, 2, 64);
    let spec = Spec::new(vec![(3, 3)], 16, 4, p.clone()).seed(1);
    let b = build::<bf16>(&spec);
    let (mut kc, mut vc) = b.cache.clone().into_arrays();
    let before = kc.clone();
    let n = b.meta.num_tokens();
    let mut out = Array3::<bf16>::zeros((n, 2, 64));
    let e = cpu::plan(&b.meta, b.cache.layout())
        .unwrap()
        .run(
            &p,
            cpu::LayerViews {
                query: b.query.view(),
                new_kv: Some((b.key.view(), b.value.view())),
                key_cache: kc.view_mut(),
                value_cache: vc.view_mut(),
                kv_scales: Some(&s),
                out: out.view_mut(),
                lse: None,
            },
        )
        .unwrap_err();
    assert!(is_scale_error(&e, "bf16 cache"), "{e}");
    assert_eq!(kc.mapv(|x| x.to_bits()), before.mapv(|x| x.to_bits()), "the cache was written");
}

/// Bad borrowed scales on an FP8 cache: the run is refused and the cache untouched.
#[test]
fn bad_borrowed_scales_leave_the_cache_untouched() {
    let p = AttentionParams::new(4, 2, 64);
    let spec = Spec::new(vec![(2, 10)], 16, 8, p.clone()).seed(3);
    let built = build::<bf16>(&spec);
    let (cache, b) = quantise::<Fp8E4M3>(&built, &test_scales(2, false));
    for (s, needle) in [
        (KvScaleValues::per_head(vec![1.0; 3], vec![1.0; 3]), "num_kv_heads = 2"),
        (KvScaleValues::per_tensor(f32::NAN, 1.0), "NaN"),
    ] {
        let (mut kc, mut vc) = cache.clone().into_arrays();
        let n = b.meta.num_tokens();
        let mut out = Array3::<bf16>::zeros((n, 4, 64));
        let e = cpu::plan(&b.meta, cache.layout())
            .unwrap()
            .run(
                &p,
                cpu::LayerViews {
                    query: b.query.view(),
                    new_kv: Some((b.key.view(), b.value.view())),
                    key_cache: kc.view_mut(),
                    value_cache: vc.view_mut(),
                    kv_scales: Some(&s),
                    out: out.view_mut(),
                    lse: None,
                },
            )
            .unwrap_err();
        assert!(is_scale_error(&e, needle), "{e}");
        assert_eq!(kc, cache.key(), "the cache was written");
        assert!(out.iter().all(|x| x.to_bits() == 0), "out was written");
    }
}
