//! Plan once per step, run once per layer: the engine-facing API on borrowed, strided buffers,
//! eager and replayed from CUDA graphs, against the CPU backend.

use std::sync::Arc;

use attention_backend::cuda::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use attention_backend::cuda::cudarc::driver::{CudaSlice, CudaStream};
use attention_backend::cuda::{CudaDevice, KvCacheMut, LayerBuffers, LayerStrides, PlannerConfig, StepPlanner};
use attention_backend::ndarray::{Array2, Array3, ArrayView3, Axis};
use attention_backend::{cpu, AttentionMetadata, AttentionParams, BlockTable, CacheLayout, CpuKvCache, SlotMapping};
use half::bf16;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::common;

const H: usize = 8;
const KVH: usize = 2;
const D: usize = 128;
const BS: usize = 16;
const LAYERS: usize = 3;
const NUM_BLOCKS: usize = 8192;
const MAX_BLOCKS: usize = 32;

/// A request of the simulated engine: its physical blocks and how many tokens it has.
#[derive(Clone, Debug)]
struct Req {
    blocks: Vec<i32>,
    len: usize,
}

struct Pool(Vec<i32>);

impl Pool {
    fn new(rng: &mut StdRng) -> Self {
        let mut ids: Vec<i32> = (0..NUM_BLOCKS as i32).collect();
        ids.shuffle(rng);
        Pool(ids)
    }
    fn grow(&mut self, req: &mut Req, new_len: usize) {
        while req.blocks.len() * BS < new_len {
            req.blocks.push(self.0.pop().expect("block pool exhausted"));
        }
        req.len = new_len;
    }
    fn free(&mut self, req: Req) {
        self.0.extend(req.blocks);
    }
}

/// The metadata of one step where request `r` schedules `q_lens[r]` new tokens (already counted in
/// its `len`), decodes first.
fn step_meta(reqs: &[Req], q_lens: &[usize]) -> AttentionMetadata {
    let mut qsl = vec![0i32];
    let mut slots = Vec::new();
    for (r, &q) in reqs.iter().zip(q_lens) {
        for pos in r.len - q..r.len {
            slots.push(i64::from(r.blocks[pos / BS]) * BS as i64 + (pos % BS) as i64);
        }
        qsl.push(slots.len() as i32);
    }
    let rows: Vec<Vec<i32>> = reqs.iter().map(|r| r.blocks.clone()).collect();
    let seq_lens = reqs.iter().map(|r| r.len as i32).collect();
    AttentionMetadata::new(qsl, seq_lens, BlockTable::from_rows(&rows), SlotMapping::new(slots), 1).unwrap()
}

/// One layer's device state and its CPU mirror.
struct Layer {
    fused: CudaSlice<bf16>,
    key_cache: CudaSlice<bf16>,
    value_cache: CudaSlice<bf16>,
    out: CudaSlice<bf16>,
    cpu_cache: CpuKvCache<bf16>,
}

fn config(max_tokens: usize, max_reqs: usize) -> PlannerConfig {
    PlannerConfig {
        num_heads: H,
        num_kv_heads: KVH,
        head_size: D,
        layout: CacheLayout::new(NUM_BLOCKS, BS, KVH, D).unwrap(),
        max_num_reqs: max_reqs,
        max_num_tokens: max_tokens,
        max_blocks_per_req: MAX_BLOCKS,
    }
}

const FUSED: usize = (H + 2 * KVH) * D;

/// Fills every layer's fused QKV buffer with fresh values for `rows` rows and returns the host copy.
fn fill_qkv(stream: &Arc<CudaStream>, layers: &mut [Layer], rows: usize, rng: &mut StdRng) -> Vec<Vec<bf16>> {
    layers
        .iter_mut()
        .map(|l| {
            let host: Vec<bf16> = (0..rows * FUSED).map(|_| bf16::from_f32(rng.random_range(-2.0f32..2.0))).collect();
            stream.memcpy_htod(&host, &mut l.fused.slice_mut(..host.len())).unwrap();
            host
        })
        .collect()
}

/// The CPU backend's output for one layer (and its cache updated), from the fused host rows.
fn cpu_layer(layer: &mut Layer, fused: &[bf16], meta: &AttentionMetadata, params: &AttentionParams) -> Array3<bf16> {
    let n = meta.num_tokens();
    let all = ArrayView3::from_shape((n, H + 2 * KVH, D), &fused[..n * FUSED]).unwrap();
    let (q, kv) = all.split_at(Axis(1), H);
    let (k, v) = kv.split_at(Axis(1), KVH);
    let mut out = Array3::from_elem((n, H, D), bf16::from_f32(7.0));
    let mut lse = Array2::<f32>::zeros((n, H));
    cpu::forward(
        meta,
        params,
        cpu::ForwardIo {
            query: q,
            key: k,
            value: v,
            cache: &mut layer.cpu_cache,
            out: out.view_mut(),
            lse: Some(lse.view_mut()),
        },
    )
    .unwrap();
    out
}

/// Compares real rows within the acceptance tolerance and checks padding rows kept their poison.
fn compare(label: &str, gpu: &[bf16], cpu: &Array3<bf16>, meta: &AttentionMetadata, rows: usize) {
    let real = meta.num_actual_tokens;
    let mut worst = 0f32;
    for t in 0..rows {
        for i in 0..H * D {
            let g = gpu[t * H * D + i].to_f32();
            if t >= real {
                assert_eq!(g.to_bits(), f32::NAN.to_bits(), "{label}: padding row {t} was written");
                continue;
            }
            let c = cpu[[t, i / D, i % D]].to_f32();
            assert!(g.is_finite(), "{label}: row {t} element {i} is {g}");
            let err = (g - c).abs();
            worst = worst.max(err);
            assert!(err <= 2e-2 + 1e-2 * c.abs(), "{label}: row {t} element {i}: gpu {g} cpu {c}");
        }
    }
    println!("{label}: {real} rows, max abs error vs CPU {worst:.2e}");
}

fn poison(stream: &Arc<CudaStream>, layers: &mut [Layer], rows: usize) {
    let nan = vec![bf16::from_f32(f32::NAN); rows * H * D];
    for l in layers.iter_mut() {
        stream.memcpy_htod(&nan, &mut l.out.slice_mut(..nan.len())).unwrap();
    }
}

fn layer_buffers<'a>(l: &'a mut Layer, strides: LayerStrides, rows: usize) -> LayerBuffers<'a, bf16> {
    let fused = l.fused.slice(..rows.max(1) * FUSED);
    LayerBuffers {
        query: fused.slice(..),
        new_kv: Some((fused.slice(H * D..), fused.slice((H + KVH) * D..))),
        cache: KvCacheMut::Separate { key: l.key_cache.as_view_mut(), value: l.value_cache.as_view_mut() },
        kv_scales: None,
        out: l.out.slice_mut(..rows.max(1) * H * D),
        lse: None,
        strides,
    }
}

/// Prefills `reqs` eagerly through plan/run (a mixed step: one decode-sized request first) on
/// every layer, checking each layer against the CPU backend.
fn prefill(
    dev: &CudaDevice,
    planner: &mut StepPlanner,
    layers: &mut [Layer],
    reqs: &[Req],
    params: &AttentionParams,
    rng: &mut StdRng,
) {
    let q_lens: Vec<usize> = reqs.iter().map(|r| r.len).collect();
    let meta = step_meta(reqs, &q_lens);
    let rows = meta.num_tokens();
    let strides = LayerStrides::fused_qkv(planner.config());
    let host = fill_qkv(dev.stream(), layers, rows, rng);
    poison(dev.stream(), layers, rows);
    let mut plan = planner.plan(&meta).unwrap();
    for l in layers.iter_mut() {
        plan.run(params, layer_buffers(l, strides, rows)).unwrap();
    }
    for (i, l) in layers.iter_mut().enumerate() {
        let gpu = dev.stream().clone_dtoh(&l.out.slice(..rows * H * D)).unwrap();
        let cpu = cpu_layer(l, &host[i], &meta, params);
        compare(&format!("prefill layer {i}"), &gpu, &cpu, &meta, rows);
    }
}

/// Captures a whole `LAYERS`-layer decode step for `padded` requests as one CUDA graph, then
/// replays it over steps whose metadata changed (longer sequences, new blocks, finished requests
/// replaced by new ones), each replay checked against the CPU backend.
fn graph_replay(padded: usize, seed: u64) {
    let dev = common::device().capture_stream().unwrap();
    let stream = dev.stream().clone();
    let mut rng = StdRng::seed_from_u64(seed);
    let max_tokens = padded * MAX_BLOCKS * BS / 2;
    let cfg = config(max_tokens, padded);
    let mut planner = StepPlanner::new(&dev, cfg).unwrap();
    let mut layers: Vec<Layer> = (0..LAYERS)
        .map(|_| Layer {
            fused: stream.alloc_zeros(max_tokens * FUSED).unwrap(),
            key_cache: stream.alloc_zeros(cfg.layout.num_elements().unwrap()).unwrap(),
            value_cache: stream.alloc_zeros(cfg.layout.num_elements().unwrap()).unwrap(),
            out: stream.alloc_zeros(max_tokens * H * D).unwrap(),
            cpu_cache: CpuKvCache::zeros(cfg.layout).unwrap(),
        })
        .collect();
    let params = AttentionParams::new(H, KVH, D);
    let mut pool = Pool::new(&mut rng);
    // Fewer real requests than the padded size, so padding requests are exercised.
    let real = padded - padded / 8;
    let mut reqs: Vec<Req> = Vec::new();
    for _ in 0..real {
        let mut r = Req { blocks: Vec::new(), len: 0 };
        pool.grow(&mut r, rng.random_range(1..MAX_BLOCKS * BS / 2));
        reqs.push(r);
    }
    prefill(&dev, &mut planner, &mut layers, &reqs, &params, &mut rng);

    let strides = LayerStrides::fused_qkv(planner.config());
    let mut graph = None;
    let mut captured_plan = None;
    for step in 0..4 {
        // Every request decodes one more token; from the second step on, a few finish and new
        // ones (prefilled eagerly first) take their place.
        if step >= 2 {
            for _ in 0..real.div_ceil(4) {
                let i = rng.random_range(0..reqs.len());
                let old = reqs.swap_remove(i);
                pool.free(old);
            }
            let mut fresh = Vec::new();
            while reqs.len() + fresh.len() < real {
                let mut r = Req { blocks: Vec::new(), len: 0 };
                pool.grow(&mut r, rng.random_range(1..MAX_BLOCKS * BS / 2));
                fresh.push(r);
            }
            prefill(&dev, &mut planner, &mut layers, &fresh, &params, &mut rng);
            reqs.extend(fresh);
        }
        for r in reqs.iter_mut() {
            let next = r.len + 1;
            pool.grow(r, next);
        }
        let meta = step_meta(&reqs, &vec![1; reqs.len()]);
        let host = fill_qkv(&stream, &mut layers, padded, &mut rng);
        poison(&stream, &mut layers, padded);
        let mut plan = planner.plan_graph(&meta, padded).unwrap();
        let launch = plan.launch();
        match &graph {
            None => {
                stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
                for l in layers.iter_mut() {
                    plan.run(&params, layer_buffers(l, strides, padded)).unwrap();
                }
                let g = stream.end_capture(CUgraphInstantiate_flags(0)).unwrap().expect("an empty capture");
                captured_plan = Some(launch);
                graph = Some(g);
            }
            Some(_) => assert_eq!(Some(launch), captured_plan, "graph plans of one padded size must be equal"),
        }
        graph.as_ref().unwrap().launch().unwrap();
        for (i, l) in layers.iter_mut().enumerate() {
            let gpu = stream.clone_dtoh(&l.out.slice(..padded * H * D)).unwrap();
            let cpu = cpu_layer(l, &host[i], &meta, &params);
            compare(&format!("padded {padded} step {step} layer {i} (graph replay)"), &gpu, &cpu, &meta, padded);
        }
    }
}

#[test]
fn graph_replay_padded_1() {
    graph_replay(1, 11);
}

#[test]
fn graph_replay_padded_8() {
    graph_replay(8, 12);
}

#[test]
fn graph_replay_padded_64() {
    graph_replay(64, 13);
}

#[test]
fn graph_replay_padded_256() {
    graph_replay(256, 14);
}

#[test]
fn plan_refuses_steps_over_capacity_and_mixed_graph_steps() {
    let dev = common::device();
    let mut planner = StepPlanner::new(dev, config(64, 4)).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let mut pool = Pool::new(&mut rng);
    let mut reqs = Vec::new();
    for len in [3, 40] {
        let mut r = Req { blocks: Vec::new(), len: 0 };
        pool.grow(&mut r, len);
        reqs.push(r);
    }
    // A prefill in graph mode is refused, and so is a padded size below the batch.
    let meta = step_meta(&reqs, &[1, 20]);
    assert!(planner.plan_graph(&meta, 4).is_err());
    assert!(planner.launch_plan().is_none());
    let decode = step_meta(&reqs, &[1, 1]);
    assert!(planner.plan_graph(&decode, 1).is_err());
    assert!(planner.plan_graph(&decode, 5).is_err(), "over max_num_reqs");
    assert!(planner.plan_graph(&decode, 2).is_ok());
    // More tokens than the planner holds.
    let mut big = Req { blocks: Vec::new(), len: 0 };
    pool.grow(&mut big, 100);
    let meta = step_meta(std::slice::from_ref(&big), &[100]);
    assert!(planner.plan(&meta).is_err());
    assert!(planner.launch_plan().is_none(), "a refused plan forgets the previous one");
}

/// Issue 13 items 1-3 on the GPU: each violation of the step contract is refused by the planner and
/// by the CUDA `Backend` with its typed error, before anything is written: the cache is unchanged.
#[test]
fn step_contract_violations_are_refused_on_the_gpu() {
    use attention_backend::{AttentionError, Backend, DeviceRequest};
    let dev = common::device();
    let mut rng = StdRng::seed_from_u64(21);
    let mut pool = Pool::new(&mut rng);
    let mut reqs = Vec::new();
    for len in [37, 5, 70] {
        let mut r = Req { blocks: Vec::new(), len: 0 };
        pool.grow(&mut r, len);
        reqs.push(r);
    }
    let q_lens = [1, 5, 20];
    let good = step_meta(&reqs, &q_lens);
    let padded = |m: &AttentionMetadata, pad: i64| {
        let mut slots = m.slot_mapping.as_slice().to_vec();
        slots.extend([-1, pad]);
        AttentionMetadata::new(
            m.query_start_loc.clone(),
            m.seq_lens.clone(),
            m.block_table.clone(),
            SlotMapping::new(slots),
            1,
        )
        .unwrap()
    };
    let with_slot = |i: usize, v: i64| {
        let mut m = good.clone();
        let mut slots = m.slot_mapping.as_slice().to_vec();
        slots[i] = v;
        m.slot_mapping = SlotMapping::new(slots);
        m
    };
    // Request 2 also lists request 1's last (written) block: two requests write one block.
    let mut shared = reqs.clone();
    let stolen = *shared[1].blocks.last().unwrap();
    let last = shared[2].blocks.len() - 1;
    shared[2].blocks[last] = stolen;
    let mut outside = good.clone();
    let mut table = outside.block_table.as_slice().to_vec();
    table[0] = NUM_BLOCKS as i32 + 3;
    outside.block_table = BlockTable::new(table, 3, outside.block_table.max_blocks_per_req()).unwrap();
    let cases: Vec<(&str, AttentionMetadata)> = vec![
        ("negative slot on a real token", with_slot(3, -1)),
        ("wrong slot", with_slot(3, good.slot_mapping.as_slice()[4])),
        ("padding row with a slot", padded(&good, 5)),
        ("two requests write one block", step_meta(&shared, &q_lens)),
        ("block outside the cache", outside),
    ];
    let mut planner = StepPlanner::new(dev, config(64, 4)).unwrap();
    assert!(planner.plan(&padded(&good, -1)).is_ok(), "the valid step (padded) is accepted");
    let backend = Backend::select(DeviceRequest::Cuda { ordinal: 0 }).unwrap();
    let layout = CacheLayout::new(NUM_BLOCKS, BS, KVH, D).unwrap();
    for (what, meta) in cases {
        let err = planner.plan(&meta).expect_err(what);
        let kind_ok = matches!(
            err,
            AttentionError::MissingSlot { .. }
                | AttentionError::SlotMismatch { .. }
                | AttentionError::PaddingSlot { .. }
                | AttentionError::BlockWriteConflict { .. }
                | AttentionError::BlockOutOfRange { .. }
        );
        assert!(kind_ok, "{what}: unexpected error {err}");
        // The unified CUDA backend: the same refusal, and not a byte of the cache written.
        let n = meta.num_tokens();
        let fill = |v: f32| backend.tensor(Array3::from_elem((n, H, D), bf16::from_f32(v))).unwrap();
        let fill_kv = |v: f32| backend.tensor(Array3::from_elem((n, KVH, D), bf16::from_f32(v))).unwrap();
        let (q, k, v) = (fill(0.5), fill_kv(1.5), fill_kv(2.5));
        let mut out = fill(0.0);
        let mut cache = backend.kv_cache::<bf16>(layout).unwrap();
        let before = backend.kv_cache_to_host(&cache).unwrap();
        let step = match backend.prepare_step(meta.clone()) {
            Ok(step) => step,
            Err(e) => {
                assert_eq!(std::mem::discriminant(&e), std::mem::discriminant(&err), "{what}");
                continue;
            }
        };
        let params = AttentionParams::new(H, KVH, D);
        let e = backend
            .forward(
                &step,
                &params,
                attention_backend::ForwardTensors {
                    query: &q,
                    key: &k,
                    value: &v,
                    cache: &mut cache,
                    out: &mut out,
                    lse: None,
                },
            )
            .expect_err(what);
        assert_eq!(std::mem::discriminant(&e), std::mem::discriminant(&err), "{what}: {e}");
        let after = backend.kv_cache_to_host(&cache).unwrap();
        assert!(before.key() == after.key() && before.value() == after.value(), "{what}: the cache was written");
    }
}

/// One probe's output and LSE rows, as bits.
type Rows = (Vec<u32>, Vec<u32>);

/// The batch-invariance test's cache: long enough sequences that decodes split into several
/// 1024-key pieces.
const INV_BLOCKS: usize = 65536;
const INV_MAX_BLOCKS: usize = 1024;

/// Runs `reqs` (decodes first, then prefills) with `q_lens` through a planner of `options` over a
/// cache already filled (no new K/V written), and returns the output and LSE bits of the requests
/// `probes` names (by index in `reqs`).
struct Probe<'a, T: attention_backend::cuda::cudarc::driver::DeviceRepr> {
    dev: &'a CudaDevice,
    caches: &'a (CudaSlice<T>, CudaSlice<T>),
    params: &'a AttentionParams,
    /// The last plan's `prefill_sms`.
    planned_sms: std::cell::Cell<usize>,
}

impl<T: attention_backend::Element + attention_backend::cuda::cudarc::driver::DeviceRepr> Probe<'_, T> {
    fn rows(
        &self,
        options: attention_backend::cuda::PlanOptions,
        queries: &[T],
        reqs: &[Req],
        q_lens: &[usize],
        probes: &[usize],
        graph_pad: Option<usize>,
    ) -> Vec<Rows> {
        let meta = step_meta(reqs, q_lens);
        let rows = graph_pad.unwrap_or(meta.num_tokens());
        let cfg = PlannerConfig {
            layout: CacheLayout::new(INV_BLOCKS, BS, KVH, D).unwrap(),
            max_blocks_per_req: INV_MAX_BLOCKS,
            ..config(rows.max(64), rows.max(reqs.len()).max(8))
        };
        let mut planner = StepPlanner::with_options(self.dev, cfg, options).unwrap();
        let stream = self.dev.stream();
        let mut q = queries[..meta.num_tokens() * H * D].to_vec();
        q.resize(rows * H * D, T::from_f32(0.0));
        let q = stream.clone_htod(&q).unwrap();
        let mut out = stream.alloc_zeros::<T>(rows * H * D).unwrap();
        let mut lse = stream.alloc_zeros::<f32>(rows * H).unwrap();
        let (mut kc, mut vc) = (self.caches.0.clone(), self.caches.1.clone());
        {
            let mut plan = match graph_pad {
                Some(p) => planner.plan_graph(&meta, p).unwrap(),
                None => planner.plan(&meta).unwrap(),
            };
            self.planned_sms.set(plan.launch().prefill_sms);
            let strides = LayerStrides::contiguous(plan.planner().config());
            plan.run(
                self.params,
                LayerBuffers {
                    query: q.as_view(),
                    new_kv: None,
                    cache: KvCacheMut::Separate { key: kc.as_view_mut(), value: vc.as_view_mut() },
                    kv_scales: None,
                    out: out.as_view_mut(),
                    lse: Some(lse.as_view_mut()),
                    strides,
                },
            )
            .unwrap();
        }
        let out = stream.clone_dtoh(&out).unwrap();
        let lse = stream.clone_dtoh(&lse).unwrap();
        probes
            .iter()
            .map(|&p| {
                let (a, b) = (meta.query_start_loc[p] as usize, meta.query_start_loc[p + 1] as usize);
                let o = out[a * H * D..b * H * D].iter().map(|x| x.to_f32().to_bits()).collect();
                (o, lse[a * H..b * H].iter().map(|x| x.to_bits()).collect())
            })
            .collect()
    }
}

/// Issue 18: in batch-invariant mode a request's output and LSE do not depend on what else is in
/// its batch (alone, and in batches of 8, 64 and 256 of mixed lengths, eager and graph-padded),
/// for a long and a short decode and a prefill on a cached prefix, with and without window and
/// soft-cap; the default mode does change the long decode's bits (so the test can fail).
fn batch_invariance<T: attention_backend::Element + attention_backend::cuda::cudarc::driver::DeviceRepr>(seed: u64) {
    use attention_backend::cuda::PlanOptions;
    let dev = common::device();
    let stream = dev.stream();
    let mut rng = StdRng::seed_from_u64(seed);
    let n = CacheLayout::new(INV_BLOCKS, BS, KVH, D).unwrap().num_elements().unwrap();
    let mut fill = || -> CudaSlice<T> {
        let host: Vec<T> = (0..n).map(|_| T::from_f32(rng.random_range(-2.0f32..2.0))).collect();
        stream.clone_htod(&host).unwrap()
    };
    let caches = (fill(), fill());
    let mut ids: Vec<i32> = (0..INV_BLOCKS as i32).collect();
    ids.shuffle(&mut rng);
    let mut pool = Pool(ids);
    let mut make = |len: usize| {
        let mut r = Req { blocks: Vec::new(), len: 0 };
        pool.grow(&mut r, len);
        r
    };
    // Probes: a long decode (12 1024-key splits), a short decode, a 64-token prefill on 300 cached.
    let (long, short, pre) = (make(12_000), make(37), make(364));
    let fillers: Vec<Req> = (0..260).map(|i| make(1 + (i * 997) % 3000 + (i % 5) * 500)).collect();
    let host_q: Vec<T> = (0..330 * H * D).map(|_| T::from_f32(rng.random_range(-2.0f32..2.0))).collect();
    let on = PlanOptions { batch_invariant: true, ..PlanOptions::default() };
    let off = PlanOptions::default();
    for params in [
        AttentionParams::new(H, KVH, D),
        AttentionParams::new(H, KVH, D).with_sliding_window(5000).with_softcap(Some(30.0)),
    ] {
        let probe = Probe { dev, caches: &caches, params: &params, planned_sms: Default::default() };
        let mut default_differs = false;
        let mut alone: Option<(Vec<Rows>, Vec<Rows>)> = None;
        for batch in [1usize, 8, 64, 256] {
            // `batch - 1` fillers around the two decode probes, then the prefill probe; the probes'
            // query rows hold the same values in every batch.
            let others = batch - 1;
            let at = others / 2;
            let mut reqs: Vec<Req> = fillers[..others].to_vec();
            reqs.insert(at, long.clone());
            reqs.insert(at + 1, short.clone());
            reqs.push(pre.clone());
            let mut q_lens = vec![1; reqs.len()];
            *q_lens.last_mut().unwrap() = 64;
            let probes = [at, at + 1, reqs.len() - 1];
            let rows = reqs.len() - 1 + 64;
            let mut q = host_q[..rows * H * D].to_vec();
            let mut put = |row: usize, src: usize| {
                q[row * H * D..(row + 1) * H * D].copy_from_slice(&host_q[src * H * D..(src + 1) * H * D]);
            };
            put(at, 300);
            put(at + 1, 301);
            for i in 0..64 {
                put(rows - 64 + i, 302 + (i % 28));
            }
            let got = probe.rows(on, &q, &reqs, &q_lens, &probes, None);
            let got_default = probe.rows(off, &q, &reqs, &q_lens, &probes, None);
            let Some((a, a_default)) = &alone else {
                alone = Some((got, got_default));
                continue;
            };
            for (i, (x, y)) in a.iter().zip(&got).enumerate() {
                assert!(x == y, "batch-invariant mode: probe {i} differs in a batch of {batch}");
            }
            default_differs |= a_default[0] != got_default[0];
            // The decodes alone, padded for a graph of `batch + 3`: the decode probes match too.
            let dec = &reqs[..reqs.len() - 1];
            let padded = probe.rows(on, &q, dec, &vec![1; dec.len()], &[at, at + 1], Some(batch + 3));
            assert!(padded[0] == a[0] && padded[1] == a[1], "graph-padded decode differs in a batch of {batch}");
        }
        assert!(default_differs, "the default mode was expected to change the long decode's bits with the batch");
    }
}

#[test]
fn batch_invariant_mode_bf16() {
    batch_invariance::<bf16>(31);
}

#[test]
fn batch_invariant_mode_f16() {
    batch_invariance::<half::f16>(32);
}

/// Issue 15: the decode part of a mixed step on the side stream, beside the prefill part, gives
/// the same bits as running them back to back (the same kernels on the same inputs; only the
/// streams differ), eager and captured into a graph alike (the graph replay tests run mixed eager
/// prefills through the same path).
#[test]
fn mixed_step_overlap_matches_back_to_back() {
    use attention_backend::cuda::{MixedPartition, PlanOptions};
    let dev = common::device();
    let stream = dev.stream();
    let mut rng = StdRng::seed_from_u64(41);
    let n = CacheLayout::new(INV_BLOCKS, BS, KVH, D).unwrap().num_elements().unwrap();
    let mut fill = || -> CudaSlice<bf16> {
        let host: Vec<bf16> = (0..n).map(|_| bf16::from_f32(rng.random_range(-2.0f32..2.0))).collect();
        stream.clone_htod(&host).unwrap()
    };
    let caches = (fill(), fill());
    let mut ids: Vec<i32> = (0..INV_BLOCKS as i32).collect();
    ids.shuffle(&mut rng);
    let mut pool = Pool(ids);
    let mut reqs: Vec<Req> = Vec::new();
    for i in 0..66 {
        let mut r = Req { blocks: Vec::new(), len: 0 };
        pool.grow(&mut r, if i < 64 { 500 + i * 61 } else { 1024 });
        reqs.push(r);
    }
    let mut q_lens = vec![1; 64];
    q_lens.extend([1024, 1024]);
    let rows = 64 + 2048;
    let q: Vec<bf16> = (0..rows * H * D).map(|_| bf16::from_f32(rng.random_range(-2.0f32..2.0))).collect();
    let params = AttentionParams::new(H, KVH, D);
    let probe = Probe { dev, caches: &caches, params: &params, planned_sms: Default::default() };
    let all: Vec<usize> = (0..reqs.len()).collect();
    let side = probe.rows(PlanOptions::default(), &q, &reqs, &q_lens, &all, None);
    let serial =
        probe.rows(PlanOptions { overlap_mixed: false, ..PlanOptions::default() }, &q, &reqs, &q_lens, &all, None);
    assert!(side == serial, "overlapped and back-to-back mixed steps differ");
    assert!(side.iter().all(|(o, _)| o.iter().all(|&b| f32::from_bits(b).is_finite())));
    assert_eq!(probe.planned_sms.get(), 0, "a back-to-back step has nothing to partition");

    // The mixed step's SMs partitioned (the prefill part first on a capped persistent grid, the
    // decode part beside it): the same bits whatever the cap, including one far below the item
    // count (every prefill block walks many items while the decode runs) and one past the
    // device's SM count; `off` keeps the decode-first order.
    let ws = matches!(
        attention_kernels::attention::prefill_kernel(dev.context(), D, attention_backend::DType::BF16),
        Ok(attention_kernels::attention::PrefillKernel::Sm90Ws)
    );
    for setting in [MixedPartition::Off, MixedPartition::Sms(7), MixedPartition::Sms(40), MixedPartition::Sms(100_000)]
    {
        let options = PlanOptions { mixed_partition: setting, ..PlanOptions::default() };
        let got = probe.rows(options, &q, &reqs, &q_lens, &all, None);
        assert!(got == serial, "{setting:?}: the partitioned mixed step differs from back to back");
        let want_partition = ws && setting != MixedPartition::Off;
        assert_eq!(probe.planned_sms.get() > 0, want_partition, "{setting:?}: planned {}", probe.planned_sms.get());
    }
}
