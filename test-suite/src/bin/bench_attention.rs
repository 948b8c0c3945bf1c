//! Paged attention benchmark: split-KV decode (bandwidth) and tensor-core causal prefill
//! (TFLOP/s), each beside a device-to-device copy timed in the same run. Block tables are shuffled
//! draws from a larger pool; caches and queries hold random values.
//!
//! `bench_attention [--iters N]`

use attention_backend::cuda::{self, AttentionWorkspace, CudaDevice, CudaKvCache, DeviceMetadata, DeviceTensor};
use attention_backend::{bf16, AttentionMetadata, AttentionParams, BlockTable, CacheLayout, SlotMapping};
use rand::seq::SliceRandom;
use rand::Rng;
use test_suite::inputs;
use test_suite::timing::{time_on_stream, Stats};

const WARMUP: usize = 10;

struct Setup {
    cache: CudaKvCache<bf16>,
    meta: DeviceMetadata,
    query: DeviceTensor<bf16>,
    out: DeviceTensor<bf16>,
    params: AttentionParams,
}

/// `batch` = (q_len, kv_len) per request; the cache holds random keys and values for every token.
fn setup(dev: &CudaDevice, label: &str, batch: &[(usize, usize)], heads: (usize, usize), d: usize, bs: usize) -> Setup {
    let mut rng = inputs::rng(label);
    let (h, kvh) = heads;
    let need: usize = batch.iter().map(|&(_, kv)| kv.div_ceil(bs)).sum();
    let num_blocks = need + need / 4 + 64;
    let mut pool: Vec<i32> = (0..num_blocks as i32).collect();
    pool.shuffle(&mut rng);
    let width = batch.iter().map(|&(_, kv)| kv.div_ceil(bs)).max().unwrap();
    let mut table = vec![0i32; batch.len() * width];
    let mut at = 0;
    let mut all_slots = Vec::new();
    let mut slots = Vec::new();
    let mut qsl = vec![0i32];
    for (r, &(q, kv)) in batch.iter().enumerate() {
        let n = kv.div_ceil(bs);
        table[r * width..r * width + n].copy_from_slice(&pool[at..at + n]);
        at += n;
        for j in 0..kv {
            let s = table[r * width + j / bs] as i64 * bs as i64 + (j % bs) as i64;
            all_slots.push(s);
            if j >= kv - q {
                slots.push(s);
            }
        }
        qsl.push(qsl[r] + q as i32);
    }
    let layout = CacheLayout::new(num_blocks, bs, kvh, d).unwrap();
    let mut cache = CudaKvCache::<bf16>::zeros(dev, layout).unwrap();
    // Fill every used slot with random rows, a chunk of tokens at a time.
    let chunk = 16384;
    let k_rows = inputs::values::<bf16>(&mut rng, chunk * kvh * d);
    let v_rows = inputs::values::<bf16>(&mut rng, chunk * kvh * d);
    let kt = DeviceTensor::from_host(dev, &k_rows, &[chunk, kvh, d]).unwrap();
    let vt = DeviceTensor::from_host(dev, &v_rows, &[chunk, kvh, d]).unwrap();
    all_slots.shuffle(&mut rng);
    for part in all_slots.chunks(chunk) {
        let mut s = part.to_vec();
        s.resize(chunk, -1);
        let sm = cuda::DeviceSlotMapping::upload(dev, &SlotMapping::new(s)).unwrap();
        cuda::kv_cache_update(dev, &kt, &vt, &mut cache, &sm).unwrap();
    }
    let seq_lens: Vec<i32> = batch.iter().map(|&(_, kv)| kv as i32).collect();
    let nt = slots.len();
    let meta = AttentionMetadata::new(
        qsl,
        seq_lens,
        BlockTable::new(table, batch.len(), width).unwrap(),
        SlotMapping::new(slots),
        1,
    )
    .unwrap();
    let meta = DeviceMetadata::upload(dev, &meta).unwrap();
    let qv: Vec<bf16> = (0..nt * h * d).map(|_| bf16::from_f32(rng.random_range(-2.0..2.0f32))).collect();
    let query = DeviceTensor::from_host(dev, &qv, &[nt, h, d]).unwrap();
    let out = DeviceTensor::<bf16>::zeros(dev, &[nt, h, d]).unwrap();
    dev.synchronize().unwrap();
    Setup { cache, meta, query, out, params: AttentionParams::new(h, kvh, d) }
}

fn time_attention(dev: &CudaDevice, s: &mut Setup, iters: usize) -> Stats {
    let mut ws = AttentionWorkspace::new();
    time_on_stream(dev, WARMUP, iters, || {
        cuda::paged_attention(dev, &s.query, &s.cache, &s.meta, &s.params, &mut s.out, None, &mut ws)
    })
    .unwrap()
}

/// A device-to-device copy of `bytes` bytes (read `bytes`, write `bytes`).
fn time_copy(dev: &CudaDevice, bytes: usize, iters: usize) -> Stats {
    let n = bytes / 2;
    let src = dev.stream().alloc_zeros::<u16>(n).unwrap();
    let mut dst = dev.stream().alloc_zeros::<u16>(n).unwrap();
    time_on_stream(dev, WARMUP, iters, || dev.stream().memcpy_dtod(&src, &mut dst)).unwrap()
}

fn main() {
    let mut iters = 50;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--iters") {
        iters = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(iters);
    }
    let dev = CudaDevice::new(0).expect("bench_attention needs a CUDA device");
    println!("device: {}", dev.name());

    // Decode: batch 64 x ctx 4096, 32 q / 8 kv heads, head 128, bf16, block 16.
    let (b, ctx, h, kvh, d, bs) = (64, 4096, 32, 8, 128, 16);
    let batch = vec![(1usize, ctx); b];
    let mut s = setup(&dev, "bench-decode", &batch, (h, kvh), d, bs);
    let plan = s.meta.split_plan(h, kvh, d);
    let kv_bytes = (b * ctx * kvh * d * 2 * 2) as f64;
    let att = time_attention(&dev, &mut s, iters);
    drop(s);
    let copy = time_copy(&dev, kv_bytes as usize, iters);
    let att_bw = kv_bytes / (att.median_ms * 1e-3) / 1e9;
    let copy_bw = 2.0 * kv_bytes / (copy.median_ms * 1e-3) / 1e9;
    println!(
        "decode  b{b} ctx{ctx} {h}/{kvh} d{d} bs{bs} bf16 splits {}: {:.3} ms (p10 {:.3}, p90 {:.3}) = {:.0} GB/s K/V read; \
         copy of the same bytes {:.3} ms = {:.0} GB/s read+write; ratio {:.2}",
        plan.num_splits,
        att.median_ms,
        att.p10_ms,
        att.p90_ms,
        att_bw,
        copy.median_ms,
        copy_bw,
        att_bw / copy_bw
    );

    // Causal prefill: 8 x 2048, 32 q / 8 kv heads, head 128, bf16, block 16.
    let (b, seq) = (8, 2048);
    let batch = vec![(seq, seq); b];
    let mut s = setup(&dev, "bench-prefill", &batch, (h, kvh), d, bs);
    let att = time_attention(&dev, &mut s, iters);
    drop(s);
    let flops = (b * 2 * 2 * seq * seq / 2 * h * d) as f64;
    let tflops = flops / (att.median_ms * 1e-3) / 1e12;
    // Bytes the prefill must move at least (q, k, v read, out written), beside a copy of them.
    let bytes = (b * seq * (2 * h + 2 * kvh) * d * 2) as f64;
    let copy = time_copy(&dev, bytes as usize, iters);
    println!(
        "prefill causal {b}x{seq} {h}/{kvh} d{d} bs{bs} bf16: {:.3} ms (p10 {:.3}, p90 {:.3}) = {:.1} TFLOP/s; \
         minimum bytes {:.0} MB would take {:.3} ms at the measured copy rate ({:.0} GB/s read+write)",
        att.median_ms,
        att.p10_ms,
        att.p90_ms,
        tflops,
        bytes / 1e6,
        bytes / (2.0 * bytes / (copy.median_ms * 1e-3)) * 1e3,
        2.0 * bytes / (copy.median_ms * 1e-3) / 1e9
    );

    // A mixed step: 48 decodes of 2k-6k context and 4 chunked prefills of 512 new tokens.
    let mut rng = inputs::rng("bench-mixed");
    let mut batch: Vec<(usize, usize)> = (0..48).map(|_| (1, rng.random_range(2048..6144))).collect();
    batch.extend((0..4).map(|_| (512usize, rng.random_range(512..4096usize))));
    let mut s = setup(&dev, "bench-mixed", &batch, (h, kvh), d, bs);
    let att = time_attention(&dev, &mut s, iters);
    println!("mixed   48 decodes + 4 chunked prefills (512 new): {:.3} ms (p10 {:.3})", att.median_ms, att.p10_ms);
}
