//! The decode kernel's variants (pipelines, the folded split-KV combine) and its batch-invariant
//! mode (`split_keys`), launched directly through the kernels crate with explicit split counts:
//! every variant against the CPU backend on ACCEPTANCE.md's decode batches, the folded combine's
//! counters across back-to-back launches on one workspace (what a CUDA-graph replay does), the
//! group merge of long requests split 16 ways or more, and a probe request computed alone and
//! inside batches of 8, 64 and 256, bit for bit.
//!
//! The process-wide variant is never changed here (other tests run in the same process): every
//! launch names its variant.

use attention_backend::cuda::cudarc::driver::CudaSlice;
use attention_backend::cuda::{self, decode_split_count, CudaDevice, CudaKvCache, DeviceMetadata, DeviceTensor};
use attention_backend::ndarray::{Array2, Array3, ArrayView3};
use attention_backend::{
    bf16, cpu, f16, AttentionMetadata, AttentionParams, BlockTable, CacheLayout, CpuKvCache, DType, Element,
    SlotMapping,
};
use attention_kernels::attention::{
    self as kernels, decode_tile_keys, decode_workspace_len, AttentionBuffers, AttentionDims, AttentionFeatures,
    AttentionKernel, AttentionStrides, DecodePipeline, DecodeVariant,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::common;

const ATOL: f64 = 2e-2;
const RTOL: f64 = 1e-2;
const LSE_ATOL: f64 = 5e-3;

fn values<T: Element>(rng: &mut StdRng, n: usize, amp: f32) -> Vec<T> {
    (0..n).map(|_| T::from_f32(rng.random_range(-amp..amp))).collect()
}

/// A decode batch on the GPU (blocks drawn in shuffled order from a pool) with, optionally, the
/// same batch in a compact CPU cache for the reference.
struct Batch<T: Element> {
    params: AttentionParams,
    layout: CacheLayout,
    cache: CudaKvCache<T>,
    meta: DeviceMetadata,
    query: DeviceTensor<T>,
    host_query: Vec<T>,
    lens: Vec<usize>,
    cpu: Option<(CpuKvCache<T>, AttentionMetadata)>,
}

/// Per-request contents: `Some((keys, values))` (`[len, kv_heads, d]` each) or `None` (left
/// zero in the cache: filler requests of the invariance test, whose values do not matter).
type Contents<T> = Vec<Option<(Vec<T>, Vec<T>)>>;

fn build<T: Element>(
    params: AttentionParams,
    block_size: usize,
    lens: &[usize],
    contents: Contents<T>,
    host_query: Vec<T>,
    with_cpu: bool,
    rng: &mut StdRng,
) -> Batch<T> {
    let dev = common::device();
    let (h, kvh, d) = (params.num_heads, params.num_kv_heads, params.head_size);
    let blocks_of = |n: usize| n.div_ceil(block_size).max(1);
    let need: usize = lens.iter().map(|&n| blocks_of(n)).sum();
    let num_blocks = need + need / 3 + 16;
    let mut pool: Vec<i32> = (0..num_blocks as i32).collect();
    pool.shuffle(rng);
    let width = lens.iter().map(|&n| blocks_of(n)).max().unwrap_or(1) + 1;
    let (mut table, mut cpu_table) = (vec![7i32; lens.len() * width], vec![0i32; lens.len() * width]);
    let (mut at, mut cpu_at) = (0usize, 0i32);
    let (mut slots, mut cpu_slots, mut qsl) = (Vec::new(), Vec::new(), vec![0i32]);
    let (mut fill_slots, mut fill_k, mut fill_v) = (Vec::new(), Vec::new(), Vec::new());
    for (r, &n) in lens.iter().enumerate() {
        let nb = blocks_of(n);
        table[r * width..r * width + nb].copy_from_slice(&pool[at..at + nb]);
        for j in 0..nb {
            cpu_table[r * width + j] = cpu_at + j as i32;
        }
        at += nb;
        cpu_at += nb as i32;
        let slot = |t: &[i32], j: usize| {
            i64::from(t[r * width + j / block_size]) * block_size as i64 + (j % block_size) as i64
        };
        slots.push(slot(&table, n - 1));
        cpu_slots.push(slot(&cpu_table, n - 1));
        qsl.push(r as i32 + 1);
        if let Some((k, v)) = &contents[r] {
            fill_slots.extend((0..n).map(|j| slot(&table, j)));
            fill_k.extend_from_slice(k);
            fill_v.extend_from_slice(v);
        }
    }
    let layout = CacheLayout::new(num_blocks, block_size, kvh, d).unwrap();
    let mut cache = CudaKvCache::<T>::zeros(dev, layout).unwrap();
    if !fill_slots.is_empty() {
        let n = fill_slots.len();
        let kt = DeviceTensor::from_host(dev, &fill_k, &[n, kvh, d]).unwrap();
        let vt = DeviceTensor::from_host(dev, &fill_v, &[n, kvh, d]).unwrap();
        let sm = cuda::DeviceSlotMapping::upload(dev, &SlotMapping::new(fill_slots)).unwrap();
        cuda::kv_cache_update(dev, &kt, &vt, &mut cache, &sm).unwrap();
    }
    let seq_lens: Vec<i32> = lens.iter().map(|&n| n as i32).collect();
    let meta = AttentionMetadata::new(
        qsl.clone(),
        seq_lens.clone(),
        BlockTable::new(table, lens.len(), width).unwrap(),
        SlotMapping::new(slots),
        1,
    )
    .unwrap();
    let cpu = with_cpu.then(|| {
        let cpu_layout = CacheLayout::new(cpu_at as usize, block_size, kvh, d).unwrap();
        let mut cc = CpuKvCache::<T>::zeros(cpu_layout).unwrap();
        {
            let (mut kc, mut vc) = cc.key_value_mut();
            for (r, &n) in lens.iter().enumerate() {
                let Some((k, v)) = &contents[r] else { continue };
                for j in 0..n {
                    let b = cpu_table[r * width + j / block_size] as usize;
                    for x in 0..kvh {
                        for e in 0..d {
                            kc[[b, j % block_size, x, e]] = k[(j * kvh + x) * d + e];
                            vc[[b, j % block_size, x, e]] = v[(j * kvh + x) * d + e];
                        }
                    }
                }
            }
        }
        let cm = AttentionMetadata::new(
            qsl,
            seq_lens,
            BlockTable::new(cpu_table, lens.len(), width).unwrap(),
            SlotMapping::new(cpu_slots),
            1,
        )
        .unwrap();
        (cc, cm)
    });
    let nt = lens.len();
    assert_eq!(host_query.len(), nt * h * d);
    let query = DeviceTensor::from_host(dev, &host_query, &[nt, h, d]).unwrap();
    let meta = DeviceMetadata::upload(dev, &meta).unwrap();
    Batch { params, layout, cache, meta, query, host_query, lens: lens.to_vec(), cpu }
}

/// A batch with random contents for every request and its CPU copy.
fn random_batch<T: Element>(params: AttentionParams, block_size: usize, lens: &[usize], seed: u64) -> Batch<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    let row = params.num_kv_heads * params.head_size;
    let contents =
        lens.iter().map(|&n| Some((values(&mut rng, n * row, 2.0), values(&mut rng, n * row, 2.0)))).collect();
    let q = values(&mut rng, lens.len() * params.num_heads * params.head_size, 2.0);
    build(params, block_size, lens, contents, q, true, &mut rng)
}

/// One decode launch over the whole batch; returns out and lse (poisoned with NaN before).
fn launch<T: Element>(
    b: &Batch<T>,
    variant: DecodeVariant,
    num_splits: usize,
    split_keys: usize,
    ws: &mut CudaSlice<f32>,
) -> (Vec<T>, Vec<f32>) {
    let dev = common::device();
    let p = &b.params;
    let (h, d) = (p.num_heads, p.head_size);
    let nt = b.lens.len();
    let mut out = DeviceTensor::from_host(dev, &vec![T::from_f32(f32::NAN); nt * h * d], &[nt, h, d]).unwrap();
    let mut lse = DeviceTensor::<f32>::from_host(dev, &vec![f32::NAN; nt * h], &[nt, h]).unwrap();
    let dims = AttentionDims {
        num_tokens: nt,
        num_heads: h,
        num_kv_heads: p.num_kv_heads,
        head_size: d,
        num_blocks: b.layout.num_blocks,
        block_size: b.layout.block_size,
        num_reqs: nt,
        max_blocks_per_req: b.meta.host().block_table.max_blocks_per_req(),
        req_begin: 0,
        req_end: nt,
    };
    let features = AttentionFeatures {
        scale: p.scale,
        causal: p.causal,
        window_left: p.window_left,
        window_right: p.window_right,
        softcap: p.softcap,
        alibi_slopes: p.alibi_slopes.as_deref(),
        sinks: p.sinks.as_deref(),
    };
    let bufs = AttentionBuffers {
        query: b.query.buffer().as_view(),
        key_cache: b.cache.key_buffer().as_view(),
        value_cache: b.cache.value_buffer().as_view(),
        kv_scales: None,
        query_start_loc: b.meta.query_start_loc().as_view(),
        seq_lens: b.meta.seq_lens().as_view(),
        block_table: b.meta.block_table().as_view(),
        out: out.buffer_mut().as_view_mut(),
        lse: Some(lse.buffer_mut().as_view_mut()),
        workspace: Some(ws.as_view_mut()),
        strides: AttentionStrides::contiguous(&dims),
    };
    kernels::paged_attention_with_variant(
        dev.stream(),
        AttentionKernel::Decode { num_splits, split_keys },
        variant,
        &dims,
        &features,
        bufs,
    )
    .unwrap();
    (out.to_host(dev).unwrap(), lse.to_host(dev).unwrap())
}

fn workspace(dev: &CudaDevice, floats: usize) -> CudaSlice<f32> {
    dev.stream().alloc_zeros::<f32>(floats.max(1)).unwrap()
}

fn num_sms(dev: &CudaDevice) -> usize {
    dev.context()
        .attribute(
            attention_backend::cuda::cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .unwrap() as usize
}

/// Decode blocks per split of a launch over `reqs` requests: (request, kv head, row chunk of 16
/// query heads).
fn blocks_per_split(p: &AttentionParams, reqs: usize) -> usize {
    reqs * p.num_kv_heads * (p.num_heads / p.num_kv_heads).div_ceil(16)
}

/// Whether every arrival counter at the front of a decode workspace is zero (each folded launch
/// must leave them so).
fn counters_clear(dev: &CudaDevice, ws: &CudaSlice<f32>) -> bool {
    let head = dev.stream().clone_dtoh(&ws.slice(..attention_kernels::attention::DECODE_COUNTER_SLOTS)).unwrap();
    head.iter().all(|&x| f32::to_bits(x) == 0)
}

/// The split count the planner's cost model picks for this batch (default mode).
fn planned_splits<T: Element>(b: &Batch<T>) -> usize {
    let dev = common::device();
    let p = &b.params;
    let blocks = blocks_per_split(p, b.lens.len());
    let sms = num_sms(dev);
    let max_len = b.lens.iter().copied().max().unwrap_or(1);
    decode_split_count(blocks, sms, 2, 2, max_len, decode_tile_keys(p.head_size))
}

fn close(x: f64, r: f64, atol: f64) -> bool {
    if r == f64::NEG_INFINITY {
        return x == f64::NEG_INFINITY;
    }
    x.is_finite() && (x - r).abs() <= atol + RTOL * r.abs()
}

/// Checks a GPU result against the CPU backend.
fn check_cpu<T: Element>(b: &Batch<T>, got: &(Vec<T>, Vec<f32>), what: &str) {
    let (cc, cm) = b.cpu.as_ref().unwrap();
    let p = &b.params;
    let (nt, h, d) = (b.lens.len(), p.num_heads, p.head_size);
    let qv = ArrayView3::from_shape((nt, h, d), &b.host_query[..]).unwrap();
    let mut out = Array3::<T>::from_elem((nt, h, d), T::from_f32(f32::NAN));
    let mut lse = Array2::<f32>::from_elem((nt, h), f32::NAN);
    cpu::paged_attention(
        cm,
        p,
        cpu::AttentionIo { query: qv, cache: cc, out: out.view_mut(), lse: Some(lse.view_mut()) },
    )
    .unwrap();
    let (out, lse) = (out.into_raw_vec_and_offset().0, lse.into_raw_vec_and_offset().0);
    for (i, (x, r)) in got.0.iter().zip(&out).enumerate() {
        let (x, r) = (x.to_f32() as f64, r.to_f32() as f64);
        assert!(close(x, r, ATOL), "{what}: out[{i}] gpu {x} vs cpu {r} (lens {:?})", b.lens);
    }
    for (i, (x, r)) in got.1.iter().zip(&lse).enumerate() {
        assert!(close(*x as f64, *r as f64, LSE_ATOL), "{what}: lse[{i}] gpu {x} vs cpu {r} (lens {:?})", b.lens);
    }
}

/// Output and LSE as raw bits.
type Bits = (Vec<u32>, Vec<u32>);

fn bits<T: Element>(r: &(Vec<T>, Vec<f32>)) -> Bits {
    (r.0.iter().map(|x| x.to_f32().to_bits()).collect(), r.1.iter().map(|x| x.to_bits()).collect())
}

const DECODE_BATCHES: [&[usize]; 2] = [&[1328, 18, 463], &[1, 54, 293, 70]];
const HEADS: [(usize, usize); 3] = [(4, 4), (8, 2), (16, 2)];

/// Every variant on ACCEPTANCE.md's decode batches (head sizes 128, where the variants are
/// compiled, and 64 / 256, where they fall back to the default), with one split, the planner's
/// count and a forced 5-way split (every split non-empty or not, the combine or its fold runs).
fn variant_grid<T: Element>(variants: &[DecodeVariant], seed0: u64) {
    let dev = common::device();
    let mut seed = seed0;
    let mut n = 0;
    for &v in variants {
        for (i, heads) in HEADS.into_iter().enumerate() {
            for d in [128, 64, 256] {
                if d != 128 && i != 1 {
                    continue;
                }
                for (bi, lens) in DECODE_BATCHES.into_iter().enumerate() {
                    seed += 1;
                    let bs = [16, 32][(bi + i) % 2];
                    let mut params = AttentionParams::new(heads.0, heads.1, d);
                    params = match seed % 3 {
                        0 => params,
                        1 => params.with_softcap(Some(10.0)),
                        _ => params.with_sliding_window(256),
                    };
                    let b = random_batch::<T>(params, bs, lens, seed);
                    for splits in [1, planned_splits(&b), 5] {
                        let mut ws = workspace(dev, decode_workspace_len(splits, lens.len(), heads.0, d));
                        let got = launch(&b, v, splits, 0, &mut ws);
                        check_cpu(&b, &got, &format!("variant {v} splits {splits} heads {heads:?} d {d} bs {bs}"));
                        n += 1;
                    }
                }
            }
        }
    }
    eprintln!("decode variants {:?}: {n} launches passed", T::DTYPE);
}

#[test]
fn decode_variants_against_cpu_bf16() {
    variant_grid::<bf16>(&DecodeVariant::ALL, 20_000);
}

#[test]
fn decode_variants_against_cpu_f16() {
    // f16 has W4S3 and W4S2 (and auto, which picks between them); the other pipelines fall back.
    let v = [
        DecodeVariant::default(),
        DecodeVariant { fold_combine: false, ..DecodeVariant::default() },
        DecodeVariant { pipeline: DecodePipeline::W4S2, fold_combine: true },
        DecodeVariant { pipeline: DecodePipeline::W2S4, fold_combine: false },
    ];
    variant_grid::<f16>(&v, 21_000);
}

/// The auto pipeline on a grid of several waves (256 requests x 8 kv heads): it picks W4S2 where
/// that keeps more blocks resident than W4S3 and the grid is four waves of it (H100 / H200 at head
/// 128: 2048 blocks against 1584), W4S3 on a smaller grid and
/// in batch-invariant mode, and every choice gives the same bits as the explicit pipelines (the
/// two differ only in pipeline depth), which match the CPU backend.
fn auto_pipeline_on_large_grids<T: Element>(seed: u64) {
    let dev = common::device();
    let params = AttentionParams::new(32, 8, 128);
    let mut rng = StdRng::seed_from_u64(seed);
    let lens: Vec<usize> = (0..256).map(|_| rng.random_range(1..300usize)).collect();
    let b = random_batch::<T>(params, 16, &lens, seed);
    let sms = num_sms(dev);
    let resident = |pipeline| {
        let v = DecodeVariant { pipeline, fold_combine: true };
        let probe = AttentionKernel::Decode { num_splits: 1, split_keys: 0 };
        kernels::blocks_per_sm_for_cache(dev.context(), probe, v, 128, T::DTYPE, T::DTYPE).unwrap()
    };
    let (r2, r3) = (resident(DecodePipeline::W4S2), resident(DecodePipeline::W4S3));
    let pick = |blocks, split_keys| {
        kernels::decode_auto_pipeline(dev.context(), 128, T::DTYPE, T::DTYPE, blocks, split_keys).unwrap()
    };
    let blocks = lens.len() * 8;
    let wide = r2 > r3 && blocks >= 4 * r2 * sms;
    eprintln!("auto {:?}: {sms} SMs, resident w4s2 {r2} / w4s3 {r3}, {blocks} blocks", T::DTYPE);
    assert_eq!(pick(blocks, 0), if wide { DecodePipeline::W4S2 } else { DecodePipeline::W4S3 });
    assert_eq!(pick((4 * r2 * sms).saturating_sub(1), 0), DecodePipeline::W4S3);
    if r2 > r3 {
        assert_eq!(pick(4 * r2 * sms, 0), DecodePipeline::W4S2);
    }
    assert_eq!(pick(blocks, 64), DecodePipeline::W4S3);
    // Other head sizes and FP8 caches have no choice.
    assert_eq!(
        kernels::decode_auto_pipeline(dev.context(), 64, T::DTYPE, T::DTYPE, 1 << 20, 0).unwrap(),
        DecodePipeline::W4S3
    );
    assert_eq!(
        kernels::decode_auto_pipeline(dev.context(), 128, T::DTYPE, DType::Fp8E4M3, 1 << 20, 0).unwrap(),
        DecodePipeline::W4S3
    );
    // Refused with a typed error, never answered: an unsupported head size, a compute type the
    // kernels lack, a cache type that is neither the compute type nor FP8, a split_keys past i32,
    // a block count past i64.
    let refused = |head: usize, dtype: DType, cache: DType, split_keys: usize| {
        matches!(
            kernels::decode_auto_pipeline(dev.context(), head, dtype, cache, 1, split_keys),
            Err(attention_kernels::KernelError::InvalidArgument { .. })
        )
    };
    assert!(refused(100, T::DTYPE, T::DTYPE, 0));
    assert!(refused(128, DType::F32, DType::F32, 0));
    assert!(refused(128, DType::BF16, DType::F16, 0));
    assert!(refused(128, T::DTYPE, T::DTYPE, 1 << 40));
    assert!(matches!(
        kernels::decode_auto_pipeline(dev.context(), 128, T::DTYPE, T::DTYPE, usize::MAX, 0),
        Err(attention_kernels::KernelError::InvalidArgument { .. })
    ));
    let mut ws = workspace(dev, 1);
    let auto = launch(&b, DecodeVariant::default(), 1, 0, &mut ws);
    check_cpu(&b, &auto, "auto on a large grid");
    for pipeline in [DecodePipeline::W4S2, DecodePipeline::W4S3] {
        let got = launch(&b, DecodeVariant { pipeline, fold_combine: true }, 1, 0, &mut ws);
        assert!(bits(&got) == bits(&auto), "{pipeline:?} and auto differ on the same batch");
    }
}

#[test]
fn auto_pipeline_bf16() {
    auto_pipeline_on_large_grids::<bf16>(21_500);
}

#[test]
fn auto_pipeline_f16() {
    auto_pipeline_on_large_grids::<f16>(21_600);
}

/// The folded combine's counters: two launches in a row on one workspace (what replaying a
/// captured graph does) give the same bits, a launch of another shape in between leaves them
/// clean, and the fold gives exactly the separate combine's bits (one merge arithmetic).
fn fold_replays<T: Element>(pipeline: DecodePipeline, seed: u64) {
    let dev = common::device();
    let fold = DecodeVariant { pipeline, fold_combine: true };
    let plain = DecodeVariant { pipeline, fold_combine: false };
    let a = random_batch::<T>(AttentionParams::new(8, 2, 128), 16, &[1328, 18, 463, 2000], seed);
    let other = random_batch::<T>(AttentionParams::new(16, 2, 128), 32, &[700, 90, 3000, 5, 1200], seed + 1);
    let mut ws = workspace(dev, decode_workspace_len(9, 8, 16, 128));
    let first = launch(&a, fold, 7, 0, &mut ws);
    check_cpu(&a, &first, &format!("{fold} first launch"));
    let second = launch(&a, fold, 7, 0, &mut ws);
    assert!(bits(&first) == bits(&second), "{fold}: a second launch on the same workspace differs");
    let o = launch(&other, fold, 9, 0, &mut ws);
    check_cpu(&other, &o, &format!("{fold} other shape"));
    let third = launch(&a, fold, 7, 0, &mut ws);
    assert!(bits(&first) == bits(&third), "{fold}: counters not clean after a launch of another shape");
    let separate = launch(&a, plain, 7, 0, &mut ws);
    assert!(bits(&first) == bits(&separate), "{fold}: folded and separate combine differ");
    // Every counter back at zero.
    assert!(counters_clear(dev, &ws), "{fold}: counters left non-zero");
}

#[test]
fn folded_combine_replays_bf16() {
    for p in [DecodePipeline::W4S3, DecodePipeline::W2S4, DecodePipeline::W4S4] {
        fold_replays::<bf16>(p, 22_000);
    }
}

#[test]
fn folded_combine_replays_f16() {
    fold_replays::<f16>(DecodePipeline::W4S3, 22_100);
}

/// The group merge: a folded launch of at least 16 splits whose whole grid is resident at once
/// (the default for a few long requests, where the group's blocks merge side by side). Checked
/// against the CPU backend, bit for bit against the separate combine kernel (one merge
/// arithmetic), replayed on one workspace with every counter back at zero; the other tests that
/// compare with the CPU split fewer ways or on grids too large to be resident. `run.sh` runs the
/// decode tests once more with `PAGED_ATTN_DECODE_GROUP_MERGE=0`, where the same launches take
/// the last block's merge and must give the same results.
fn group_merge_case<T: Element>(params: AttentionParams, lens: &[usize], splits: &[usize], seed: u64) {
    let dev = common::device();
    let b = random_batch::<T>(params.clone(), 16, lens, seed);
    let w4s3 = DecodeVariant { pipeline: DecodePipeline::W4S3, fold_combine: true };
    let plain = DecodeVariant { fold_combine: false, ..w4s3 };
    let (h, kvh, d) = (params.num_heads, params.num_kv_heads, params.head_size);
    let probe = AttentionKernel::Decode { num_splits: 1, split_keys: 0 };
    let per_sm = kernels::blocks_per_sm_for_cache(dev.context(), probe, w4s3, d, T::DTYPE, T::DTYPE).unwrap();
    let resident = per_sm * num_sms(dev);
    for &s in splits {
        let what = format!("group merge {:?} heads {h}/{kvh} d {d} lens {lens:?} splits {s}", T::DTYPE);
        let grid = blocks_per_split(&params, lens.len()) * s;
        assert!(
            s >= 16 && grid <= resident,
            "{what}: {grid} blocks on a device holding {resident} at once do not take the group merge"
        );
        let mut ws = workspace(dev, decode_workspace_len(s, lens.len(), h, d));
        let first = launch(&b, w4s3, s, 0, &mut ws);
        check_cpu(&b, &first, &what);
        let again = launch(&b, w4s3, s, 0, &mut ws);
        assert!(bits(&first) == bits(&again), "{what}: a second launch on the same workspace differs");
        let auto = launch(&b, DecodeVariant::default(), s, 0, &mut ws);
        assert!(bits(&first) == bits(&auto), "{what}: the default variant differs from W4S3");
        let separate = launch(&b, plain, s, 0, &mut ws);
        assert!(bits(&first) == bits(&separate), "{what}: the group merge and the combine kernel differ");
        assert!(counters_clear(dev, &ws), "{what}: counters left non-zero");
    }
}

#[test]
fn group_merge_against_cpu_bf16() {
    // One long request, GQA 4: 8 blocks per split, so 16, 32 and 33 splits (264 blocks: two per SM
    // on 132 SMs) are resident. Splits are whole 64-key tiles, so the last split is short, and at
    // 33 splits of 640 keys the 33rd is empty.
    group_merge_case::<bf16>(AttentionParams::new(32, 8, 128), &[20_000], &[16, 32, 33], 25_000);
    // Two requests of different lengths (the shorter one's splits are a few tiles each, some
    // empty), GQA 8 with sinks.
    let sinks = AttentionParams::new(16, 2, 128).with_sinks(Some((0..16).map(|i| i as f32 * 0.37 - 2.0).collect()));
    group_merge_case::<bf16>(sinks, &[9_000, 700], &[16, 48], 25_100);
    // Head 64, GQA 32: two row chunks of 16 query heads per kv head; a soft-cap.
    let d64 = AttentionParams::new(64, 2, 64).with_softcap(Some(30.0));
    group_merge_case::<bf16>(d64, &[7_000], &[24], 25_200);
}

#[test]
fn group_merge_against_cpu_f16() {
    group_merge_case::<f16>(AttentionParams::new(32, 8, 128), &[12_345], &[17], 25_300);
}

/// The per-block timeline (`decode_trace`): absent from a normal build (the suite's), and in a
/// build with `PAGED_ATTN_DECODE_TRACE` set, one record per block of the last launch whose marks
/// come in order, on real SMs, with exactly one merging block per group of a folded launch.
#[test]
fn decode_trace_records_the_last_launch() {
    let dev = common::device();
    let fold = DecodeVariant { pipeline: DecodePipeline::W4S3, fold_combine: true };
    let a = random_batch::<bf16>(AttentionParams::new(8, 2, 128), 16, &[1328, 18, 463, 2000], 22_200);
    let mut ws = workspace(dev, decode_workspace_len(7, 8, 16, 128));
    let out = launch(&a, fold, 7, 0, &mut ws);
    check_cpu(&a, &out, "decode_trace launch");
    let groups = 4 * 2; // requests x kv heads (one row chunk: a group of 4 query heads)
    let Some(records) = kernels::decode_trace(dev.context(), groups * 7).unwrap() else {
        // A normal build carries no trace code, and says so for any block count.
        assert!(kernels::decode_trace(dev.context(), 1 << 30).unwrap().is_none());
        eprintln!("decode_trace: this build records no timeline (PAGED_ATTN_DECODE_TRACE unset)");
        return;
    };
    let sms = num_sms(dev) as u32;
    for (b, r) in records.iter().enumerate() {
        assert!(r.sm < sms, "block {b}: SM {} of {sms}", r.sm);
        assert!(r.start_ns > 0 && r.start_ns <= r.issued_ns, "block {b}: {r:?}");
        assert!(r.issued_ns <= r.loop_end_ns && r.loop_end_ns <= r.written_ns, "block {b}: {r:?}");
        assert!(r.written_ns <= r.arrived_ns, "block {b}: {r:?}");
        assert!(r.merged_ns == 0 || r.arrived_ns <= r.merged_ns, "block {b}: {r:?}");
    }
    let merging = records.iter().filter(|r| r.merged_ns > 0).count();
    assert_eq!(merging, groups, "one merging block per (request, kv head)");
    assert!(matches!(
        kernels::decode_trace(dev.context(), 1 << 30),
        Err(attention_kernels::KernelError::InvalidArgument { .. })
    ));
}

/// The merges have a fast form (statistics once per row: the combine kernel up to 64 splits, the
/// fold while the row statistics fit in shared memory) and a general one (per element); all give
/// the same bits. 7 splits: both fast; 70: the combine's general form against the fold's fast
/// one; 1700: both general (the fold's statistics no longer fit). Each checked against the CPU.
#[test]
fn merge_forms_agree_bf16() {
    let dev = common::device();
    let a = random_batch::<bf16>(AttentionParams::new(8, 2, 128), 16, &[1328, 18, 463, 2000], 22_200);
    for splits in [7, 70, 1700] {
        let mut ws = workspace(dev, decode_workspace_len(splits, 4, 8, 128));
        let fold = launch(&a, DecodeVariant::default(), splits, 0, &mut ws);
        let separate =
            launch(&a, DecodeVariant { fold_combine: false, ..DecodeVariant::default() }, splits, 0, &mut ws);
        check_cpu(&a, &fold, &format!("fold, {splits} splits"));
        assert!(bits(&fold) == bits(&separate), "{splits} splits: folded and separate combine differ");
    }
}

/// Splits of a fixed key count for the invariance test (a multiple of the tile).
const SPLIT_KEYS: usize = 1024;

/// A probe request computed alone and inside batches of 8, 64 and 256 (other requests of mixed
/// lengths, the probe at a random place, its blocks elsewhere each time). With `split_keys` its
/// output and LSE are the same bits in every batch; returns whether the default mode (the
/// planner's split count, even division) differed somewhere, which the caller asserts so that
/// the test can fail.
fn invariance<T: Element>(variant: DecodeVariant, params: AttentionParams, probe_len: usize, seed: u64) -> bool {
    let dev = common::device();
    let (h, kvh, d) = (params.num_heads, params.num_kv_heads, params.head_size);
    let mut prng = StdRng::seed_from_u64(seed);
    let probe_k: Vec<T> = values(&mut prng, probe_len * kvh * d, 2.0);
    let probe_v: Vec<T> = values(&mut prng, probe_len * kvh * d, 2.0);
    let probe_q: Vec<T> = values(&mut prng, h * d, 2.0);
    let mut reference: Option<(Bits, Bits)> = None;
    let mut default_differs = false;
    for (bi, size) in [1usize, 8, 64, 256].into_iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(seed ^ ((bi as u64 + 1) * 0x9e37));
        let at = rng.random_range(0..size);
        let lens: Vec<usize> =
            (0..size).map(|r| if r == at { probe_len } else { rng.random_range(1..4000usize) }).collect();
        let contents =
            (0..size).map(|r| (r == at).then(|| (probe_k.clone(), probe_v.clone()))).collect::<Contents<T>>();
        let mut q: Vec<T> = values(&mut rng, size * h * d, 2.0);
        q[at * h * d..(at + 1) * h * d].copy_from_slice(&probe_q);
        let b = build(params.clone(), 16, &lens, contents, q, false, &mut rng);
        let row = |r: &(Vec<T>, Vec<f32>)| {
            let o = r.0[at * h * d..(at + 1) * h * d].to_vec();
            let l = r.1[at * h..(at + 1) * h].to_vec();
            bits(&(o, l))
        };
        // Batch-invariant mode: the grid's split count is the batch's need.
        let inv_splits = lens.iter().map(|&n| n.div_ceil(SPLIT_KEYS)).max().unwrap_or(1);
        let mut ws = workspace(dev, decode_workspace_len(inv_splits.max(2), size, h, d));
        let inv = row(&launch(&b, variant, inv_splits, SPLIT_KEYS, &mut ws));
        let def_splits = planned_splits(&b);
        let mut ws = workspace(dev, decode_workspace_len(def_splits.max(2), size, h, d));
        let def = row(&launch(&b, variant, def_splits, 0, &mut ws));
        match &reference {
            None => {
                // The alone run against the CPU backend once (the probe's values are random).
                if bi == 0 {
                    let mut rng = StdRng::seed_from_u64(seed);
                    let c = build(
                        params.clone(),
                        16,
                        &[probe_len],
                        vec![Some((probe_k.clone(), probe_v.clone()))],
                        probe_q.clone(),
                        true,
                        &mut rng,
                    );
                    let mut ws = workspace(dev, decode_workspace_len(inv_splits.max(2), 1, h, d));
                    check_cpu(&c, &launch(&c, variant, inv_splits, SPLIT_KEYS, &mut ws), "invariant mode alone");
                }
                reference = Some((inv, def));
            }
            Some((inv0, def0)) => {
                assert!(
                    inv == *inv0,
                    "{variant} {:?}: batch-invariant output of the probe ({probe_len} keys) differs in a batch of {size} \
                     ({} of {} elements, {} of {} lse)",
                    T::DTYPE,
                    inv.0.iter().zip(&inv0.0).filter(|(a, b)| a != b).count(),
                    inv.0.len(),
                    inv.1.iter().zip(&inv0.1).filter(|(a, b)| a != b).count(),
                    inv.1.len()
                );
                default_differs |= def != *def0;
            }
        }
    }
    default_differs
}

#[test]
fn batch_invariant_decode() {
    let long = AttentionParams::new(16, 2, 128);
    let variants = [
        DecodeVariant::default(),
        DecodeVariant { fold_combine: false, ..DecodeVariant::default() },
        DecodeVariant { pipeline: DecodePipeline::W2S4, fold_combine: true },
    ];
    for (i, v) in variants.into_iter().enumerate() {
        let differs = invariance::<bf16>(v, long.clone(), 12_000, 23_000 + i as u64);
        assert!(differs, "{v}: the default mode gave the same bits in every batch, so this test cannot fail");
    }
    assert!(invariance::<f16>(DecodeVariant::default(), long.clone(), 12_000, 23_100));
    // Short and windowed / soft-capped probes stay invariant too (the default mode may or may
    // not differ on them: not asserted).
    invariance::<bf16>(DecodeVariant::default(), long.clone(), 300, 23_200);
    invariance::<f16>(DecodeVariant::default(), long.clone().with_sliding_window(3000), 9000, 23_300);
    invariance::<bf16>(DecodeVariant::default(), long.with_softcap(Some(30.0)), 5000, 23_400);
}

// ---- compute-sanitizer subset: every pipeline once, the folded combine, split_keys ----------

#[test]
fn sanitizer_subset_decode_variants() {
    let dev = common::device();
    let b = random_batch::<bf16>(AttentionParams::new(8, 2, 128), 16, &[300, 9, 700], 24_000);
    for v in DecodeVariant::ALL {
        let mut ws = workspace(dev, decode_workspace_len(3, 3, 8, 128));
        let first = launch(&b, v, 3, 0, &mut ws);
        check_cpu(&b, &first, &format!("sanitizer {v}"));
        let again = launch(&b, v, 3, 0, &mut ws);
        assert!(bits(&first) == bits(&again), "sanitizer {v}: replay differs");
    }
    // split_keys with empty splits (the grid needs 11 for 700 keys at 64 per split; give 12).
    let fold = DecodeVariant::default();
    let mut ws = workspace(dev, decode_workspace_len(12, 3, 8, 128));
    let got = launch(&b, fold, 12, 64, &mut ws);
    check_cpu(&b, &got, "sanitizer split_keys");
    // The group merge: 16 splits, the whole grid (96 blocks) resident at once, five splits of the
    // 700-key request and more of the others empty.
    let mut ws = workspace(dev, decode_workspace_len(16, 3, 8, 128));
    let first = launch(&b, fold, 16, 0, &mut ws);
    check_cpu(&b, &first, "sanitizer group merge");
    let again = launch(&b, fold, 16, 0, &mut ws);
    assert!(bits(&first) == bits(&again), "sanitizer group merge: replay differs");
    let h = random_batch::<f16>(
        AttentionParams::new(4, 4, 64).with_sinks(Some(vec![0.5, -1.0, 2.0, 0.0])),
        32,
        &[130, 1],
        24_100,
    );
    let mut ws = workspace(dev, decode_workspace_len(4, 2, 4, 64));
    let got = launch(&h, fold, 4, 0, &mut ws);
    check_cpu(&h, &got, "sanitizer f16 sinks fold");
    assert_eq!(DType::BF16.size_in_bytes(), 2);
}
