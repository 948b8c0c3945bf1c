//! Times every decode variant (pipelines x separate/folded combine) and the batch-invariant mode
//! on the decode shapes of the HBM3e issue, beside a device-to-device copy of the same bytes, in
//! one run: bf16, 32 q / 8 kv heads (and MHA 32/32), head 128, block 16, shuffled block tables.
//!
//! `bench_decode_variants [--iters N] [--only SUBSTRING] [--batches N,N,...] [--shapes BxL,...]
//! [--splits N,N,...] [--trace DIR]`
//!
//! `--batches` replaces the shapes by `bN x 4096` (32 / 8 heads) for each N: the decode's byte rate
//! against its grid size (N x 8 blocks), to see what a partial last wave of blocks costs.
//! `--shapes` replaces them by `B` requests of `L` keys each (32 / 8 heads), e.g. `1x65536`: the
//! time against the bytes at a fixed grid, which separates a launch's fixed cost from its rate.
//! `--splits` times the default pipeline and the folded W4S3 and W4S2 at each listed split count
//! instead of the planner's, in place of the variant table: what the planner's choice leaves.
//! `--trace DIR` (with `--splits`, in a build with `PAGED_ATTN_DECODE_TRACE=1` set at build time)
//! writes the per-block timeline of each row's last launch to `DIR/<shape>_<variant>_<splits>.txt`:
//! one line per block (grid order) with its start, issue, first tile, loop end, write, arrival and
//! merge times in microseconds from the launch's first block start (-1: not reached) and its SM.
//!
//! For each variant the split count comes from the planner's wave model with that variant's
//! occupancy (blocks per SM from the runtime), as the planner would choose it if that variant were
//! the default. The batch-invariant rows use `split_keys` = 1024 with the default and the best
//! folded pipeline, as a ratio to the default mode of the same variant.

use attention_backend::cuda::cudarc::driver::sys::CUdevice_attribute;
use attention_backend::cuda::{self, decode_split_count, CudaDevice, CudaKvCache, DeviceMetadata, DeviceTensor};
use attention_backend::{bf16, AttentionMetadata, BlockTable, CacheLayout, DType, SlotMapping};
use attention_kernels::attention::{
    self as kernels, decode_tile_keys, decode_workspace_len, AttentionBuffers, AttentionDims, AttentionFeatures,
    AttentionKernel, AttentionStrides, DecodePipeline, DecodeVariant,
};
use rand::seq::SliceRandom;
use test_suite::inputs;
use test_suite::timing::{time_on_stream, Stats};

const WARMUP: usize = 5;
const SPLIT_KEYS: usize = 1024;

struct Shape {
    name: String,
    batch: usize,
    ctx: usize,
    heads: usize,
    kv_heads: usize,
}

fn shape(name: &str, batch: usize, ctx: usize, heads: usize, kv_heads: usize) -> Shape {
    Shape { name: name.to_string(), batch, ctx, heads, kv_heads }
}

fn issue_shapes() -> Vec<Shape> {
    vec![
        shape("b64 x 4096", 64, 4096, 32, 8),
        shape("b16 x 16384", 16, 16384, 32, 8),
        shape("b1 x 32768", 1, 32768, 32, 8),
        shape("b256 x 1024", 256, 1024, 32, 8),
        shape("MHA b32 x 4096", 32, 4096, 32, 32),
    ]
}

const D: usize = 128;
const BS: usize = 16;

struct Setup {
    cache: CudaKvCache<bf16>,
    meta: DeviceMetadata,
    query: DeviceTensor<bf16>,
    out: DeviceTensor<bf16>,
    num_blocks: usize,
    width: usize,
}

/// The cache as serving leaves it: blocks drawn at random from a pool a quarter larger than
/// needed, every used slot holding a random row (one chunk of random rows reused, as
/// bench_attention fills its caches).
fn setup(dev: &CudaDevice, s: &Shape) -> Setup {
    let mut rng = inputs::rng(&s.name);
    let per = s.ctx.div_ceil(BS);
    let need = per * s.batch;
    let num_blocks = need + need / 4 + 64;
    let mut pool: Vec<i32> = (0..num_blocks as i32).collect();
    pool.shuffle(&mut rng);
    let table = pool[..need].to_vec();
    let slot_table = table.clone();
    let slots: Vec<i64> = (0..s.batch)
        .map(|r| i64::from(table[r * per + (s.ctx - 1) / BS]) * BS as i64 + ((s.ctx - 1) % BS) as i64)
        .collect();
    let meta = AttentionMetadata::new(
        (0..=s.batch as i32).collect(),
        vec![s.ctx as i32; s.batch],
        BlockTable::new(slot_table, s.batch, per).unwrap(),
        SlotMapping::new(slots),
        1,
    )
    .unwrap();
    let layout = CacheLayout::new(num_blocks, BS, s.kv_heads, D).unwrap();
    let mut cache = CudaKvCache::<bf16>::zeros(dev, layout).unwrap();
    let chunk = 16384;
    let row = s.kv_heads * D;
    let kt =
        DeviceTensor::from_host(dev, &inputs::values::<bf16>(&mut rng, chunk * row), &[chunk, s.kv_heads, D]).unwrap();
    let vt =
        DeviceTensor::from_host(dev, &inputs::values::<bf16>(&mut rng, chunk * row), &[chunk, s.kv_heads, D]).unwrap();
    let mut all: Vec<i64> = (0..s.batch)
        .flat_map(|r| {
            let t = &table;
            (0..s.ctx).map(move |j| i64::from(t[r * per + j / BS]) * BS as i64 + (j % BS) as i64)
        })
        .collect();
    all.shuffle(&mut rng);
    for part in all.chunks(chunk) {
        let mut p = part.to_vec();
        p.resize(chunk, -1);
        let sm = cuda::DeviceSlotMapping::upload(dev, &SlotMapping::new(p)).unwrap();
        cuda::kv_cache_update(dev, &kt, &vt, &mut cache, &sm).unwrap();
    }
    let q = inputs::values::<bf16>(&mut rng, s.batch * s.heads * D);
    let query = DeviceTensor::from_host(dev, &q, &[s.batch, s.heads, D]).unwrap();
    let out = DeviceTensor::<bf16>::zeros(dev, &[s.batch, s.heads, D]).unwrap();
    let meta = DeviceMetadata::upload(dev, &meta).unwrap();
    dev.synchronize().unwrap();
    Setup { cache, meta, query, out, num_blocks, width: per }
}

/// One timed configuration of the decode kernel.
#[derive(Clone, Copy)]
struct Launch {
    variant: DecodeVariant,
    splits: usize,
    split_keys: usize,
}

fn time_variant(
    dev: &CudaDevice,
    s: &Shape,
    st: &mut Setup,
    launch: Launch,
    ws: &mut attention_backend::cuda::cudarc::driver::CudaSlice<f32>,
    iters: usize,
) -> Stats {
    let Launch { variant: v, splits, split_keys } = launch;
    let dims = AttentionDims {
        num_tokens: s.batch,
        num_heads: s.heads,
        num_kv_heads: s.kv_heads,
        head_size: D,
        num_blocks: st.num_blocks,
        block_size: BS,
        num_reqs: s.batch,
        max_blocks_per_req: st.width,
        req_begin: 0,
        req_end: s.batch,
    };
    let features = AttentionFeatures {
        scale: 1.0 / (D as f32).sqrt(),
        causal: true,
        window_left: None,
        window_right: None,
        softcap: None,
        alibi_slopes: None,
        sinks: None,
    };
    time_on_stream(dev, WARMUP, iters, || {
        let bufs = AttentionBuffers {
            query: st.query.buffer().as_view(),
            key_cache: st.cache.key_buffer().as_view(),
            value_cache: st.cache.value_buffer().as_view(),
            kv_scales: None,
            query_start_loc: st.meta.query_start_loc().as_view(),
            seq_lens: st.meta.seq_lens().as_view(),
            block_table: st.meta.block_table().as_view(),
            out: st.out.buffer_mut().as_view_mut(),
            lse: None,
            workspace: Some(ws.as_view_mut()),
            strides: AttentionStrides::contiguous(&dims),
        };
        kernels::paged_attention_with_variant(
            dev.stream(),
            AttentionKernel::Decode { num_splits: splits, split_keys },
            v,
            &dims,
            &features,
            bufs,
        )
    })
    .unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let iters = arg("--iters").and_then(|v| v.parse().ok()).unwrap_or(30);
    let only = arg("--only");
    let dev = CudaDevice::new(0).unwrap_or_else(|e| {
        eprintln!("bench_decode_variants: {e}");
        std::process::exit(1);
    });
    let sms = dev.context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).unwrap_or(1).max(1)
        as usize;
    let saturation = cuda::device_saturation_bytes(dev.context());
    println!("device: {} ({sms} SMs), bf16, head {D}, block {BS}", dev.name());
    println!(
        "{:<16} {:<12} {:>6} {:>4} {:>9} {:>8} {:>9} {:>7}",
        "shape", "variant", "splits", "/SM", "ms", "GB/s", "copy GB/s", "/copy"
    );
    let shapes = match (arg("--batches"), arg("--shapes")) {
        (_, Some(list)) => parse_list(
            &list,
            |t| {
                let (b, l) = t.split_once('x')?;
                Some((b.parse().ok()?, l.parse().ok()?))
            },
            |&(b, l): &(usize, usize)| (1..=4096).contains(&b) && (1..=1 << 20).contains(&l),
            "--shapes takes BxL,... with B in 1..=4096 and L in 1..=1048576",
        )
        .into_iter()
        .map(|(b, l)| shape(&format!("b{b} x {l}"), b, l, 32, 8))
        .collect(),
        (Some(list), None) => parse_list(
            &list,
            |t| t.parse().ok(),
            |n: &usize| (1..=4096).contains(n),
            "--batches takes a comma-separated list of 1..=4096",
        )
        .into_iter()
        .map(|n| shape(&format!("b{n} x 4096"), n, 4096, 32, 8))
        .collect(),
        (None, None) => issue_shapes(),
    };
    let trace_dir = arg("--trace");
    let split_list: Option<Vec<usize>> = arg("--splits").map(|list| {
        parse_list(
            &list,
            |t| t.parse().ok(),
            |n: &usize| (1..=256).contains(n),
            "--splits takes a comma-separated list of 1..=256",
        )
    });
    if trace_dir.is_some() && split_list.is_none() {
        eprintln!("bench_decode_variants: --trace needs --splits");
        std::process::exit(2);
    }
    for s in shapes.iter().filter(|s| only.as_deref().is_none_or(|o| s.name.contains(o))) {
        let mut st = setup(&dev, s);
        // K and V read once, Q read, O written.
        let bytes = ((2 * s.batch * s.ctx * s.kv_heads + 2 * s.batch * s.heads) * D * 2) as f64;
        let copy = {
            let n = (bytes as usize).div_ceil(2);
            let src = dev.stream().alloc_zeros::<u16>(n).unwrap();
            let mut dst = dev.stream().alloc_zeros::<u16>(n).unwrap();
            time_on_stream(&dev, WARMUP, iters, || dev.stream().memcpy_dtod(&src, &mut dst)).unwrap()
        };
        let copy_gbps = 2.0 * bytes / (copy.median_ms * 1e-3) / 1e9;
        let blocks = s.batch * s.kv_heads * (s.heads / s.kv_heads).div_ceil(16);
        let max_split = split_list.as_ref().and_then(|v| v.iter().copied().max()).unwrap_or(64).max(64);
        let max_ws = decode_workspace_len(max_split, s.batch, s.heads, D).max(decode_workspace_len(
            s.ctx.div_ceil(SPLIT_KEYS).max(2),
            s.batch,
            s.heads,
            D,
        ));
        let mut ws = dev.stream().alloc_zeros::<f32>(max_ws).unwrap();
        let mut row = |label: String, v: DecodeVariant, splits: usize, split_keys: usize, per_sm: usize| -> f64 {
            let t = time_variant(&dev, s, &mut st, Launch { variant: v, splits, split_keys }, &mut ws, iters);
            let gbps = bytes / (t.median_ms * 1e-3) / 1e9;
            println!(
                "{:<16} {:<12} {:>6} {:>4} {:>9.4} {:>8.0} {:>9.0} {:>7.3}",
                s.name,
                label,
                splits,
                per_sm,
                t.median_ms,
                gbps,
                copy_gbps,
                gbps / copy_gbps
            );
            t.median_ms
        };
        if let Some(list) = &split_list {
            let fold = |pipeline| DecodeVariant { pipeline, fold_combine: true };
            for v in [DecodeVariant::default(), fold(DecodePipeline::W4S3), fold(DecodePipeline::W4S2)] {
                for &n in list {
                    row(v.to_string(), v, n, 0, 0);
                    if let Some(dir) = &trace_dir {
                        let path = format!("{dir}/{}_{v}_{n}.txt", s.name.replace(' ', ""));
                        if let Err(e) = write_trace(&dev, blocks * n, &path) {
                            eprintln!("bench_decode_variants: --trace: {e}");
                            std::process::exit(1);
                        }
                    }
                }
            }
            continue;
        }
        let mut best = (f64::INFINITY, DecodeVariant::default());
        let mut times = Vec::new();
        for v in DecodeVariant::ALL {
            let per_sm = kernels::blocks_per_sm_with_variant(
                dev.context(),
                AttentionKernel::Decode { num_splits: 1, split_keys: 0 },
                v,
                D,
                DType::BF16,
            )
            .unwrap_or(2)
            .max(1);
            let slots = cuda::decode_variant_slots(per_sm, v, D, DType::BF16, DType::BF16, saturation);
            let splits = decode_split_count(blocks, sms, per_sm, slots, s.ctx, decode_tile_keys(D));
            let ms = row(v.to_string(), v, splits, 0, per_sm);
            times.push((v, ms, per_sm));
            if ms < best.0 {
                best = (ms, v);
            }
        }
        // Batch-invariant mode (fixed 1024-key splits) beside the default mode of the same variant.
        let inv_splits = s.ctx.div_ceil(SPLIT_KEYS);
        for v in [DecodeVariant::default(), DecodeVariant { fold_combine: true, ..best.1 }] {
            let (_, base, per_sm) = times.iter().copied().find(|t| t.0 == v).unwrap_or((v, f64::NAN, 0));
            let ms = row(format!("{v} inv"), v, inv_splits, SPLIT_KEYS, per_sm);
            println!("{:<16} {:<12} batch-invariant / default mode time: {:.3}", s.name, format!("{v}"), ms / base);
        }
        println!("{:<16} best: {} ({:.4} ms)", s.name, best.1, best.0);
    }
}

/// A comma-separated option value, each item parsed by `item` and accepted by `ok`; any other
/// value (an empty list included) ends the run with `usage` and exit status 2.
fn parse_list<T>(list: &str, item: impl Fn(&str) -> Option<T>, ok: impl Fn(&T) -> bool, usage: &str) -> Vec<T> {
    match list.split(',').map(|t| item(t.trim()).filter(&ok)).collect::<Option<Vec<T>>>() {
        Some(v) if !v.is_empty() => v,
        _ => {
            eprintln!("bench_decode_variants: {usage}");
            std::process::exit(2);
        }
    }
}

/// Writes the per-block timeline of the last decode launch (`blocks` blocks) to `path`: times in
/// microseconds from the earliest block start, -1 for a mark the block did not reach.
fn write_trace(dev: &CudaDevice, blocks: usize, path: &str) -> Result<(), String> {
    use std::io::Write;
    let records = kernels::decode_trace(dev.context(), blocks)
        .map_err(|e| e.to_string())?
        .ok_or("the kernels were built without the trace: rebuild with PAGED_ATTN_DECODE_TRACE=1")?;
    let t0 = records.iter().map(|r| r.start_ns).min().unwrap_or(0);
    let us = |t: u64| if t == 0 { -1.0 } else { t.saturating_sub(t0) as f64 / 1e3 };
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| format!("{path}: {e}"))?);
    writeln!(f, "# block start issued first_tile loop_end written arrived merged sm (us from the first start)")
        .map_err(|e| e.to_string())?;
    for (b, r) in records.iter().enumerate() {
        writeln!(
            f,
            "{b} {:.3} {:.3} {:.3} {:.3} {:.3} {:.3} {:.3} {}",
            us(r.start_ns),
            us(r.issued_ns),
            us(r.first_tile_ns),
            us(r.loop_end_ns),
            us(r.written_ns),
            us(r.arrived_ns),
            us(r.merged_ns),
            r.sm
        )
        .map_err(|e| e.to_string())?;
    }
    f.flush().map_err(|e| format!("{path}: {e}"))
}
