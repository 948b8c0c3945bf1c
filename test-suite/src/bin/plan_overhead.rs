//! Host cost of the engine-facing API, and what CUDA graphs save: `plan` once per step at 256
//! requests / about 8k tokens, `run` once per layer for 32 layers, and a 32-layer decode step of 256
//! requests launched eagerly beside the same step replayed from a captured graph.
//!
//! `plan_overhead [--json FILE]`

use std::io::Write;
use std::time::Instant;

use attention_backend::cuda::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use attention_backend::cuda::cudarc::driver::CudaSlice;
use attention_backend::cuda::{CudaDevice, KvCacheMut, LayerBuffers, LayerStrides, PlannerConfig, StepPlanner};
use attention_backend::{bf16, AttentionMetadata, AttentionParams, BlockTable, CacheLayout, SlotMapping};
use rand::seq::SliceRandom;
use test_suite::inputs;
use test_suite::timing::{time_on_stream, Stats};

const LAYERS: usize = 32;
const REQS: usize = 256;
const H: usize = 32;
const KVH: usize = 8;
const D: usize = 128;
const BS: usize = 16;
const CONTEXT: usize = 1024;
const MAX_BLOCKS: usize = 256;

/// 248 decodes on `CONTEXT` keys and 8 chunked prefills of 1000 tokens (about 8k tokens), or 256
/// decodes when `decode_only`.
fn step(blocks: &mut Vec<i32>, decode_only: bool) -> AttentionMetadata {
    let prefills = if decode_only { 0 } else { 8 };
    let mut qsl = vec![0i32];
    let (mut seq_lens, mut rows, mut slots) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..REQS {
        let q = if r < REQS - prefills { 1 } else { 1000 };
        let len = CONTEXT + q;
        let row: Vec<i32> = (0..len.div_ceil(BS)).map(|_| blocks.pop().expect("pool")).collect();
        for pos in len - q..len {
            slots.push(i64::from(row[pos / BS]) * BS as i64 + (pos % BS) as i64);
        }
        qsl.push(slots.len() as i32);
        seq_lens.push(len as i32);
        rows.push(row);
    }
    AttentionMetadata::new(qsl, seq_lens, BlockTable::from_rows(&rows), SlotMapping::new(slots), 1).expect("metadata")
}

fn median_us(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Layer {
    fused: CudaSlice<bf16>,
    key_cache: CudaSlice<bf16>,
    value_cache: CudaSlice<bf16>,
    out: CudaSlice<bf16>,
}

const FUSED_ROW: usize = (H + 2 * KVH) * D;

/// One layer's borrowed buffers: query, key and value read in place from the fused projection.
fn buffers(l: &mut Layer, rows: usize, strides: LayerStrides) -> LayerBuffers<'_, bf16> {
    let f = l.fused.slice(..rows * FUSED_ROW);
    LayerBuffers {
        query: f.slice(..),
        new_kv: Some((f.slice(H * D..), f.slice((H + KVH) * D..))),
        cache: KvCacheMut::Separate { key: l.key_cache.as_view_mut(), value: l.value_cache.as_view_mut() },
        kv_scales: None,
        out: l.out.slice_mut(..rows * H * D),
        lse: None,
        strides,
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("plan_overhead: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let json = std::env::args().skip_while(|a| a != "--json").nth(1);
    let err = |e: attention_backend::AttentionError| e.to_string();
    let dev = CudaDevice::new(0).map_err(err)?.capture_stream().map_err(err)?;
    let stream = dev.stream().clone();
    let num_blocks = REQS * MAX_BLOCKS;
    let layout = CacheLayout::new(num_blocks, BS, KVH, D).map_err(err)?;
    let max_tokens = 8 * 1024 + REQS;
    let config = PlannerConfig {
        num_heads: H,
        num_kv_heads: KVH,
        head_size: D,
        layout,
        max_num_reqs: REQS,
        max_num_tokens: max_tokens,
        max_blocks_per_req: MAX_BLOCKS,
    };
    let mut planner = StepPlanner::new(&dev, config).map_err(err)?;
    let mut rng = inputs::rng("plan_overhead");
    let mut pool: Vec<i32> = (0..num_blocks as i32).collect();
    pool.shuffle(&mut rng);
    let mixed = step(&mut pool.clone(), false);
    let decode = step(&mut pool, true);
    println!("device: {}; {} requests, {} tokens (mixed step), {LAYERS} layers", dev.name(), REQS, mixed.num_tokens());

    let cache_elems = layout.num_elements().ok_or("cache size overflows")?;
    // One layer's caches are shared by all 32 layers: the bench measures host time and launch
    // overhead, not capacity (32 caches of this size would not fit).
    let mut layer = Layer {
        fused: stream.alloc_zeros(max_tokens * FUSED_ROW).map_err(|e| format!("{e:?}"))?,
        key_cache: stream.alloc_zeros(cache_elems).map_err(|e| format!("{e:?}"))?,
        value_cache: stream.alloc_zeros(cache_elems).map_err(|e| format!("{e:?}"))?,
        out: stream.alloc_zeros(max_tokens * H * D).map_err(|e| format!("{e:?}"))?,
    };
    let strides = LayerStrides::fused_qkv(&config);
    let params = AttentionParams::new(H, KVH, D);

    // Host time of plan (per step) and run (per layer), the device kept busy meanwhile.
    let (mut plan_us, mut run_us) = (Vec::new(), Vec::new());
    for _ in 0..30 {
        let t = Instant::now();
        let mut plan = planner.plan(&mixed).map_err(err)?;
        plan_us.push(t.elapsed().as_secs_f64() * 1e6);
        let rows = plan.launch().num_tokens;
        for _ in 0..LAYERS {
            let b = buffers(&mut layer, rows, strides);
            let t = Instant::now();
            plan.run(&params, b).map_err(err)?;
            run_us.push(t.elapsed().as_secs_f64() * 1e6);
        }
        stream.synchronize().map_err(|e| format!("{e:?}"))?;
    }
    let (plan_med, run_med) = (median_us(plan_us), median_us(run_us));
    // The part of plan that is the step-contract check alone (host only, no CUDA).
    let mut scratch = attention_backend::StepCheckScratch::new();
    let check_us: Vec<f64> = (0..30)
        .map(|_| {
            let t = Instant::now();
            mixed.check_against_with("plan_overhead", &layout, &mut scratch).map(|_| t.elapsed().as_secs_f64() * 1e6)
        })
        .collect::<Result<_, _>>()
        .map_err(err)?;
    let check_med = median_us(check_us);
    println!(
        "plan per step (host): {plan_med:.1} us   (target <= 100 us), of which the contract check {check_med:.1} us"
    );
    // The same plan back to back, no kernels between (warm host caches, no wake-up from a wait).
    let mut hot_us = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        planner.plan(&mixed).map_err(err)?;
        hot_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    stream.synchronize().map_err(|e| format!("{e:?}"))?;
    println!("plan back to back (host): {:.1} us", median_us(hot_us));
    // Where the rest goes: a decode-only step (256 tokens, the same table) and the raw uploads.
    let mut graph_us = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        planner.plan_graph(&decode, REQS).map_err(err)?;
        graph_us.push(t.elapsed().as_secs_f64() * 1e6);
        stream.synchronize().map_err(|e| format!("{e:?}"))?;
    }
    let host_table = vec![0i32; REQS * MAX_BLOCKS];
    let mut dev_table = stream.alloc_zeros::<i32>(REQS * MAX_BLOCKS).map_err(|e| format!("{e:?}"))?;
    let mut copy_us = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        stream.memcpy_htod(&host_table, &mut dev_table).map_err(|e| format!("{e:?}"))?;
        copy_us.push(t.elapsed().as_secs_f64() * 1e6);
        stream.synchronize().map_err(|e| format!("{e:?}"))?;
    }
    println!(
        "plan_graph of a 256-decode step (host): {:.1} us; one pageable {} KiB block-table upload: {:.1} us",
        median_us(graph_us),
        REQS * MAX_BLOCKS * 4 / 1024,
        median_us(copy_us)
    );
    println!("run per layer (host): {run_med:.2} us   (target <= 5 us)");

    // A 32-layer decode step: eager vs graph replay, device time between events.
    let eager: Stats = {
        let mut plan = planner.plan_graph(&decode, REQS).map_err(err)?;
        time_on_stream(&dev, 5, 30, || {
            for _ in 0..LAYERS {
                plan.run(&params, buffers(&mut layer, REQS, strides))?;
            }
            Ok::<(), attention_backend::AttentionError>(())
        })?
    };
    let graph = {
        let mut plan = planner.plan_graph(&decode, REQS).map_err(err)?;
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(|e| format!("{e:?}"))?;
        for _ in 0..LAYERS {
            plan.run(&params, buffers(&mut layer, REQS, strides)).map_err(err)?;
        }
        stream.end_capture(CUgraphInstantiate_flags(0)).map_err(|e| format!("{e:?}"))?.ok_or("empty capture")?
    };
    let replay = time_on_stream(&dev, 5, 30, || graph.launch())?;
    let ratio = eager.median_ms / replay.median_ms;
    println!(
        "32-layer decode step, 256 x {CONTEXT}: eager {:.3} ms, graph replay {:.3} ms, eager / graph = {ratio:.2}",
        eager.median_ms, replay.median_ms
    );
    batch_invariant_cost(&dev)?;
    if let Some(path) = json {
        let mut f = std::fs::File::create(&path).map_err(|e| format!("{path}: {e}"))?;
        writeln!(
            f,
            "{{\"plan_host_us\": {plan_med:.2}, \"check_host_us\": {check_med:.2}, \"run_host_us\": {run_med:.3}, \"eager_step_ms\": {:.4}, \"graph_step_ms\": {:.4}, \"eager_over_graph\": {ratio:.3}}}",
            eager.median_ms, replay.median_ms
        )
        .map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(())
}

/// Issue 18's cost figure: one layer of the decode and mixed shapes planned in batch-invariant mode
/// over the same layer planned for speed, device time (median of 50).
fn batch_invariant_cost(dev: &CudaDevice) -> Result<(), String> {
    use attention_backend::cuda::PlanOptions;
    let err = |e: attention_backend::AttentionError| e.to_string();
    let stream = dev.stream().clone();
    // (name, decodes and their context, prefills of 1024 tokens)
    let shapes: [(&str, usize, usize, usize); 3] = [
        ("decode b64 x 4096", 64, 4096, 0),
        ("decode b16 x 16384", 16, 16384, 0),
        ("mixed 64 x 2048 + 2 x 1024", 64, 2048, 2),
    ];
    let num_blocks = 64 * 4096 / BS + 64;
    let layout = CacheLayout::new(num_blocks, BS, KVH, D).map_err(err)?;
    let elems = layout.num_elements().ok_or("cache size overflows")?;
    let mut kc = stream.alloc_zeros::<bf16>(elems).map_err(|e| format!("{e:?}"))?;
    let mut vc = stream.alloc_zeros::<bf16>(elems).map_err(|e| format!("{e:?}"))?;
    let rows_max = 64 + 2 * 1024;
    let q = stream.alloc_zeros::<bf16>(rows_max * H * D).map_err(|e| format!("{e:?}"))?;
    let mut out = stream.alloc_zeros::<bf16>(rows_max * H * D).map_err(|e| format!("{e:?}"))?;
    let params = AttentionParams::new(H, KVH, D);
    let mut rng = inputs::rng("batch_invariant_cost");
    println!("batch-invariant mode / default mode, one layer (device time):");
    for (name, decodes, ctx, prefills) in shapes {
        let mut pool: Vec<i32> = (0..num_blocks as i32).collect();
        pool.shuffle(&mut rng);
        let mut qsl = vec![0i32];
        let (mut seq_lens, mut rows, mut slots) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..decodes + prefills {
            let (q_len, len) = if r < decodes { (1, ctx) } else { (1024, 1024) };
            let row: Vec<i32> = (0..len.div_ceil(BS)).map(|_| pool.pop().unwrap_or(0)).collect();
            for pos in len - q_len..len {
                slots.push(i64::from(row[pos / BS]) * BS as i64 + (pos % BS) as i64);
            }
            qsl.push(slots.len() as i32);
            seq_lens.push(len as i32);
            rows.push(row);
        }
        let meta = AttentionMetadata::new(qsl, seq_lens, BlockTable::from_rows(&rows), SlotMapping::new(slots), 1)
            .map_err(err)?;
        let config = PlannerConfig {
            num_heads: H,
            num_kv_heads: KVH,
            head_size: D,
            layout,
            max_num_reqs: 80,
            max_num_tokens: rows_max,
            max_blocks_per_req: 16384 / BS,
        };
        let mut ms = [0.0f64; 2];
        for (i, invariant) in [false, true].into_iter().enumerate() {
            let options = PlanOptions { batch_invariant: invariant, ..PlanOptions::default() };
            let mut planner = StepPlanner::with_options(dev, config, options).map_err(err)?;
            let mut plan = planner.plan(&meta).map_err(err)?;
            let n = meta.num_tokens();
            let strides = LayerStrides::contiguous(&config);
            let stats = time_on_stream(dev, 5, 50, || {
                plan.run(
                    &params,
                    LayerBuffers {
                        query: q.slice(..n * H * D),
                        new_kv: None,
                        cache: KvCacheMut::Separate { key: kc.as_view_mut(), value: vc.as_view_mut() },
                        kv_scales: None,
                        out: out.slice_mut(..n * H * D),
                        lse: None,
                        strides,
                    },
                )
            })?;
            ms[i] = stats.median_ms;
        }
        println!("  {name:<28} default {:.4} ms, batch-invariant {:.4} ms: {:.3}", ms[0], ms[1], ms[1] / ms[0]);
    }
    Ok(())
}
