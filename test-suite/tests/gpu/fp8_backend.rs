//! FP8 KV caches through the CUDA backend (attention-backend's API, not the raw launchers): the
//! KV-write grid of ACCEPTANCE.md bit-exact against the CPU backend, the paged-attention grid
//! through the plan/run API (`LayerBuffers::kv_scales`) against the CPU backend within the
//! acceptance tolerance (caches compared bit for bit after the step's write), and the run-time
//! `Backend` with an FP8 `KvCache` whose scales are changed in place after creation.

use attention_backend::cuda::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use attention_backend::cuda::{
    self, CudaKvCache, DeviceSlotMapping, DeviceTensor, KvCacheMut, KvScales, LayerBuffers, LayerStrides,
    PlannerConfig, StepPlanner,
};
use attention_backend::ndarray::{Array2, Array3, Array4};
use attention_backend::{
    bf16, cpu, f16, AttentionMetadata, AttentionParams, Backend, BlockTable, CacheLayout, CpuKvCache, Element,
    ForwardTensors, Fp8E4M3, Fp8E5M2, KvScaleValues, KvStorage, SlotMapping,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::common;

/// What both FP8 types need on the device and in comparisons.
trait Fp8: KvStorage<bf16> + KvStorage<f16> + DeviceRepr + ValidAsZeroBits + Eq + std::fmt::Debug {}
impl Fp8 for Fp8E4M3 {}
impl Fp8 for Fp8E5M2 {}

fn scales_for(nkv: usize, per_head: bool, rng: &mut StdRng) -> KvScaleValues {
    if per_head {
        KvScaleValues::per_head(
            (0..nkv).map(|_| rng.random_range(0.005f32..0.05)).collect(),
            (0..nkv).map(|_| rng.random_range(0.005f32..0.05)).collect(),
        )
    } else {
        KvScaleValues::per_tensor(rng.random_range(0.005f32..0.05), rng.random_range(0.005f32..0.05))
    }
}

/// A value for the write grid: mostly normal data, sometimes NaN, +-Inf, out of range or tiny.
fn draw(rng: &mut StdRng) -> f32 {
    match rng.random_range(0..40) {
        0 => f32::NAN,
        1 => f32::INFINITY,
        2 => f32::NEG_INFINITY,
        3 => rng.random_range(-1e6f32..1e6),
        4 => rng.random_range(-1e-5f32..1e-5),
        _ => rng.random_range(-4.0f32..4.0),
    }
}

/// One KV-write case through `cuda::kv_cache_update` on a `CudaKvCache<C>` with scales, the
/// cache pre-filled with a sentinel byte: the downloaded bytes equal the CPU backend's.
fn write_case<T: Element + DeviceRepr + ValidAsZeroBits, C: Fp8 + KvStorage<T>>(
    n: usize,
    layout: CacheLayout,
    per_head: bool,
    seed: u64,
) {
    let dev = common::device();
    let mut rng = StdRng::seed_from_u64(seed);
    let (h, d) = (layout.num_kv_heads, layout.head_size);
    let key: Vec<T> = (0..n * h * d).map(|_| T::from_f32(draw(&mut rng))).collect();
    let value: Vec<T> = (0..n * h * d).map(|_| T::from_f32(draw(&mut rng))).collect();
    let mut slots: Vec<i64> =
        rand::seq::index::sample(&mut rng, layout.num_slots(), n).into_iter().map(|s| s as i64).collect();
    for s in slots.iter_mut().step_by(7) {
        *s = -1; // padding: the row must stay untouched
    }
    let scales = scales_for(h, per_head, &mut rng);
    let elems = layout.num_elements().unwrap();
    let fill = vec![C::from_f32(-0.8125); elems];

    let mut cpu_cache = CpuKvCache::<C>::from_arrays(
        Array4::from_shape_vec(layout.shape(), fill.clone()).unwrap(),
        Array4::from_shape_vec(layout.shape(), fill.clone()).unwrap(),
    )
    .unwrap();
    cpu_cache.set_scales(Some(scales.clone())).unwrap();
    let k3 = Array3::from_shape_vec((n, h, d), key.clone()).unwrap();
    let v3 = Array3::from_shape_vec((n, h, d), value.clone()).unwrap();
    let slot_mapping = SlotMapping::new(slots);
    cpu::kv_cache_update(k3.view(), v3.view(), &mut cpu_cache, &slot_mapping).unwrap();

    let mut gpu_cache = CudaKvCache::<C>::from_host(dev, layout, &fill, &fill).unwrap();
    gpu_cache.set_scales(Some(scales)).unwrap();
    let k = DeviceTensor::from_host(dev, &key, &[n, h, d]).unwrap();
    let v = DeviceTensor::from_host(dev, &value, &[n, h, d]).unwrap();
    let s = DeviceSlotMapping::upload(dev, &slot_mapping).unwrap();
    cuda::kv_cache_update(dev, &k, &v, &mut gpu_cache, &s).unwrap();
    let (gk, gv) = gpu_cache.to_host(dev).unwrap();
    let label = format!("{} -> {}, n {n}, {layout:?}, per_head {per_head}", T::DTYPE, C::DTYPE);
    let first_diff = |g: &[C], c: &[C]| g.iter().zip(c).position(|(a, b)| a != b);
    assert_eq!(first_diff(&gk, cpu_cache.key().as_slice().unwrap()), None, "{label}: key cache differs");
    assert_eq!(first_diff(&gv, cpu_cache.value().as_slice().unwrap()), None, "{label}: value cache differs");
}

/// ACCEPTANCE.md's KV-write grid with FP8 caches: num_tokens 1, 42, 4096; kv heads 1, 8; head
/// sizes 64, 80, 120, 256; block sizes 8, 16, 32; 1024 and 10000 blocks (10000 where the cache
/// stays under 2^26 elements, for the host-side reference); f16 and bf16 inputs in rotation; both
/// FP8 formats; per-layer and per-head scales in rotation.
#[test]
fn fp8_kv_write_grid_bit_exact() {
    let mut case = 0u64;
    for &n in &[1usize, 42, 4096] {
        for &h in &[1usize, 8] {
            for &d in &[64usize, 80, 120, 256] {
                for &bs in &[8usize, 16, 32] {
                    for &blocks in &[1024usize, 10000] {
                        if blocks * bs * h * d > 1 << 26 || blocks * bs < n {
                            continue;
                        }
                        case += 1;
                        let layout = CacheLayout::new(blocks, bs, h, d).unwrap();
                        let per_head = case.is_multiple_of(2);
                        if case.is_multiple_of(2) {
                            write_case::<bf16, Fp8E4M3>(n, layout, per_head, case);
                            write_case::<f16, Fp8E5M2>(n, layout, !per_head, case + 1000);
                        } else {
                            write_case::<f16, Fp8E4M3>(n, layout, per_head, case);
                            write_case::<bf16, Fp8E5M2>(n, layout, !per_head, case + 1000);
                        }
                    }
                }
            }
        }
    }
    println!("fp8 KV-write grid: {case} layouts, each in both formats");
}

/// One paged-attention step through `StepPlanner::plan` / `StepPlan::run` with an FP8 cache and
/// borrowed device scales, against `cpu::forward` on the same cache: caches bit-exact after the
/// write, outputs within 2e-2 abs + 1e-2 rel, lse within 1e-3 rel, padding rows untouched.
fn attention_case<C: Fp8>(
    reqs: &[(usize, usize)],
    block_size: usize,
    num_blocks: usize,
    params: &AttentionParams,
    per_head: bool,
    seed: u64,
) -> f32 {
    let dev = common::device();
    let stream = dev.stream().clone();
    let mut rng = StdRng::seed_from_u64(seed);
    let (nh, nkv, hs, bs) = (params.num_heads, params.num_kv_heads, params.head_size, block_size);
    let layout = CacheLayout::new(num_blocks, bs, nkv, hs).unwrap();
    let scales = scales_for(nkv, per_head, &mut rng);
    let q = |x: f32, s: f32| C::from_f32(x / s);

    // Random, shuffled blocks; never-written rows hold NaN bytes; the context is pre-quantised.
    let mut ids: Vec<i32> = (0..num_blocks as i32).collect();
    ids.shuffle(&mut rng);
    let mut kc = Array4::from_elem(layout.shape(), C::from_f32(f32::NAN));
    let mut vc = kc.clone();
    let (mut rows, mut qsl, mut slots) = (Vec::new(), vec![0i32], Vec::new());
    for &(q_len, seq_len) in reqs {
        let row: Vec<i32> = (0..seq_len.div_ceil(bs)).map(|_| ids.pop().unwrap()).collect();
        for pos in 0..seq_len - q_len {
            let (b, o) = (row[pos / bs] as usize, pos % bs);
            for h in 0..nkv {
                let (ks, vs) = scales.of_head(h);
                for e in 0..hs {
                    kc[[b, o, h, e]] = q(bf16::from_f32(rng.random_range(-3.0f32..3.0)).to_f32(), ks);
                    vc[[b, o, h, e]] = q(bf16::from_f32(rng.random_range(-3.0f32..3.0)).to_f32(), vs);
                }
            }
        }
        for pos in seq_len - q_len..seq_len {
            slots.push(i64::from(row[pos / bs]) * bs as i64 + (pos % bs) as i64);
        }
        qsl.push(slots.len() as i32);
        rows.push(row);
    }
    let pad = 2;
    slots.extend([-1; 2]);
    let n = slots.len();
    let seq_lens = reqs.iter().map(|r| r.1 as i32).collect();
    let meta = AttentionMetadata::new(qsl, seq_lens, BlockTable::from_rows(&rows), SlotMapping::new(slots), 1).unwrap();
    let rnd = |len: usize, rng: &mut StdRng| -> Vec<bf16> {
        (0..len).map(|_| bf16::from_f32(rng.random_range(-3.0f32..3.0))).collect()
    };
    let (query, key, value) = (rnd(n * nh * hs, &mut rng), rnd(n * nkv * hs, &mut rng), rnd(n * nkv * hs, &mut rng));

    // CPU backend.
    let mut cpu_cache = CpuKvCache::from_arrays(kc.clone(), vc.clone()).unwrap();
    cpu_cache.set_scales(Some(scales.clone())).unwrap();
    let mut cpu_out = Array3::from_elem((n, nh, hs), bf16::NAN);
    let mut cpu_lse = Array2::from_elem((n, nh), f32::NAN);
    cpu::forward(
        &meta,
        params,
        cpu::ForwardIo {
            query: Array3::from_shape_vec((n, nh, hs), query.clone()).unwrap().view(),
            key: Array3::from_shape_vec((n, nkv, hs), key.clone()).unwrap().view(),
            value: Array3::from_shape_vec((n, nkv, hs), value.clone()).unwrap().view(),
            cache: &mut cpu_cache,
            out: cpu_out.view_mut(),
            lse: Some(cpu_lse.view_mut()),
        },
    )
    .unwrap();

    // CUDA backend, plan/run on borrowed buffers.
    let up = |h: &[bf16]| stream.clone_htod(h).unwrap();
    let (dq, dk, dv) = (up(&query), up(&key), up(&value));
    let mut dkc: CudaSlice<C> = stream.clone_htod(kc.as_slice().unwrap()).unwrap();
    let mut dvc: CudaSlice<C> = stream.clone_htod(vc.as_slice().unwrap()).unwrap();
    let (sk, sv) = (stream.clone_htod(scales.key()).unwrap(), stream.clone_htod(scales.value()).unwrap());
    let mut dout = stream.clone_htod(&vec![bf16::NAN; n * nh * hs]).unwrap();
    let mut dlse = stream.clone_htod(&vec![f32::NAN; n * nh]).unwrap();
    let config = PlannerConfig {
        num_heads: nh,
        num_kv_heads: nkv,
        head_size: hs,
        layout,
        max_num_reqs: reqs.len(),
        max_num_tokens: n,
        max_blocks_per_req: rows.iter().map(Vec::len).max().unwrap_or(1),
    };
    let mut planner = StepPlanner::new(dev, config).unwrap();
    let mut plan = planner.plan(&meta).unwrap();
    plan.run(
        params,
        LayerBuffers::<bf16, C> {
            query: dq.as_view(),
            new_kv: Some((dk.as_view(), dv.as_view())),
            cache: KvCacheMut::Separate { key: dkc.as_view_mut(), value: dvc.as_view_mut() },
            kv_scales: Some(KvScales { key: sk.as_view(), value: sv.as_view() }),
            out: dout.as_view_mut(),
            lse: Some(dlse.as_view_mut()),
            strides: LayerStrides::contiguous(&config),
        },
    )
    .unwrap();
    let (gkc, gvc) = (stream.clone_dtoh(&dkc).unwrap(), stream.clone_dtoh(&dvc).unwrap());
    let (gout, glse) = (stream.clone_dtoh(&dout).unwrap(), stream.clone_dtoh(&dlse).unwrap());
    let label = format!("{} reqs {reqs:?} bs {bs} {params:?} per_head {per_head}", C::DTYPE);
    assert!(gkc.as_slice() == cpu_cache.key().as_slice().unwrap(), "{label}: key cache differs from the CPU's");
    assert!(gvc.as_slice() == cpu_cache.value().as_slice().unwrap(), "{label}: value cache differs from the CPU's");
    let real = n - pad;
    let mut worst = 0f32;
    for t in 0..n {
        for h in 0..nh {
            let (g, c) = (glse[t * nh + h], cpu_lse[[t, h]]);
            if t >= real {
                assert!(g.is_nan(), "{label}: padding lse row {t} written");
            } else if c.is_finite() {
                assert!((g - c).abs() <= 1e-3 * c.abs().max(1.0), "{label}: lse[{t}][{h}] gpu {g} cpu {c}");
            } else {
                assert_eq!(g, c, "{label}: lse[{t}][{h}]");
            }
            for e in 0..hs {
                let g = gout[(t * nh + h) * hs + e].to_f32();
                if t >= real {
                    assert!(g.is_nan(), "{label}: padding row {t} written");
                    continue;
                }
                let c = cpu_out[[t, h, e]].to_f32();
                assert!(g.is_finite(), "{label}: out[{t}][{h}][{e}] = {g}");
                worst = worst.max((g - c).abs());
                assert!((g - c).abs() <= 2e-2 + 1e-2 * c.abs(), "{label}: out[{t}][{h}][{e}] gpu {g} cpu {c}");
            }
        }
    }
    worst
}

/// ACCEPTANCE.md's paged-attention grid with FP8 caches: (heads, kv heads) (4,4), (8,2), (16,2);
/// head sizes 128, 256 (64 in rotation); block sizes 16, 32; soft-cap none / 10 / 50; window none /
/// 256; the decode, varlen and long batches; block tables from 2048..32768 blocks; both formats;
/// per-layer and per-head scales in rotation.
#[test]
fn fp8_paged_attention_grid_plan_run() {
    let batches: [&[(usize, usize)]; 5] = [
        &[(1, 1328), (1, 18), (1, 463)],
        &[(1, 1), (1, 54), (1, 293), (1, 70)],
        &[(1, 1328), (5, 18), (129, 463)],
        &[(1, 523), (1, 37), (1, 2011)],
        &[(2048, 2048), (1, 8192), (300, 4000)],
    ];
    let mut case = 0u64;
    let mut worst = [0f32; 2];
    for (bi, batch) in batches.iter().enumerate() {
        for &(nh, nkv) in &[(4usize, 4usize), (8, 2), (16, 2)] {
            for &hs in &[128usize, 256, 64] {
                for &bs in &[16usize, 32] {
                    case += 1;
                    // The long batch once per head pair and head size (its CPU reference is slow).
                    if bi == 4 && bs == 32 {
                        continue;
                    }
                    let mut p = AttentionParams::new(nh, nkv, hs);
                    p.softcap = [None, Some(10.0), Some(50.0)][(case % 3) as usize];
                    p.window_left = if case % 4 == 1 { Some(256) } else { None };
                    let blocks = [2048usize, 8192, 32768][(case % 3) as usize];
                    let per_head = case.is_multiple_of(2);
                    worst[0] = worst[0].max(attention_case::<Fp8E4M3>(batch, bs, blocks, &p, per_head, case));
                    worst[1] = worst[1].max(attention_case::<Fp8E5M2>(batch, bs, blocks, &p, !per_head, case + 7));
                }
            }
        }
    }
    println!("fp8 paged attention vs CPU: max abs e4m3 {:.2e}, e5m2 {:.2e}", worst[0], worst[1]);
}

/// The run-time `Backend` with an FP8 `KvCache`: its scales are changed in place after creation
/// (the device buffer keeps its address), and `forward` follows the new values, matching the CPU.
#[test]
fn fp8_backend_forward_after_set_scales() {
    let backend = Backend::cuda(0).expect("GPU test needs a CUDA device");
    let cpu_backend = Backend::cpu();
    let (nh, nkv, hs, bs) = (8, 2, 128, 16);
    let layout = CacheLayout::new(64, bs, nkv, hs).unwrap();
    let meta = AttentionMetadata::new(
        vec![0, 1, 6],
        vec![20, 5],
        BlockTable::from_rows(&[vec![3, 9], vec![7]]),
        SlotMapping::new(vec![9 * 16 + 3, 7 * 16, 7 * 16 + 1, 7 * 16 + 2, 7 * 16 + 3, 7 * 16 + 4]),
        1,
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let mut rnd =
        |shape: (usize, usize, usize)| Array3::from_shape_fn(shape, |_| bf16::from_f32(rng.random_range(-2.0f32..2.0)));
    let (q, k, v) = (rnd((6, nh, hs)), rnd((6, nkv, hs)), rnd((6, nkv, hs)));
    let mut outs = Vec::new();
    for b in [&backend, &cpu_backend] {
        let mut cache = b.kv_cache::<Fp8E4M3>(layout).unwrap();
        cache.set_scales(Some(KvScaleValues::per_tensor(1.0, 1.0))).unwrap();
        cache.set_scales(Some(KvScaleValues::per_head(vec![0.01, 0.02], vec![0.03, 0.015]))).unwrap();
        let step = b.prepare_step(meta.clone()).unwrap();
        let (q, k, v) = (b.tensor(q.clone()).unwrap(), b.tensor(k.clone()).unwrap(), b.tensor(v.clone()).unwrap());
        let mut out = b.zeros::<bf16>(&[6, nh, hs]).unwrap();
        let p = AttentionParams::new(nh, nkv, hs);
        b.forward(
            &step,
            &p,
            ForwardTensors { query: &q, key: &k, value: &v, cache: &mut cache, out: &mut out, lse: None },
        )
        .unwrap();
        let host = b.kv_cache_to_host(&cache).unwrap();
        outs.push((b.to_host(&out).unwrap(), host));
    }
    let ((g, gc), (c, cc)) = (&outs[0], &outs[1]);
    assert!(gc.key() == cc.key() && gc.value() == cc.value(), "the caches differ");
    assert_eq!(gc.scales(), cc.scales());
    for (x, y) in g.iter().zip(c.iter()) {
        assert!((x.to_f32() - y.to_f32()).abs() <= 2e-2 + 1e-2 * y.to_f32().abs(), "gpu {x} cpu {y}");
    }
}
