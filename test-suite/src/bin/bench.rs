//! KV-cache write benchmark: achieved bandwidth beside a device-to-device copy of the same bytes,
//! timed in the same run. `bench --json FILE` also writes the rows as JSON for the report.

use attention_backend::cuda::{self, CudaDevice, CudaKvCache, DeviceSlotMapping, DeviceTensor};
use attention_backend::{bf16, f16, CacheLayout, Element, SlotMapping};
use rand::seq::SliceRandom;
use test_suite::inputs;
use test_suite::timing::{time_on_stream, Stats};

const WARMUP: usize = 20;
const ITERS: usize = 200;

struct Row {
    name: String,
    dtype: &'static str,
    tokens: usize,
    bytes: u64,
    ours: Stats,
    copy: Stats,
}

impl Row {
    fn gbps(&self, s: &Stats) -> f64 {
        self.bytes as f64 / (s.median_ms * 1e-3) / 1e9
    }
    fn json(&self) -> String {
        format!(
            concat!(
                "{{\"kernel\":\"kv_write\",\"name\":\"{}\",\"dtype\":\"{}\",\"num_tokens\":{},\"num_kv_heads\":8,",
                "\"head_size\":128,\"block_size\":16,\"bytes\":{},\"flops\":0,\"ours_ms\":{:.6},\"ours_p10_ms\":{:.6},",
                "\"ours_p90_ms\":{:.6},\"copy_ms\":{:.6},\"ours_gbps\":{:.1},\"copy_gbps\":{:.1},\"ratio_to_copy\":{:.4}}}"
            ),
            self.name,
            self.dtype,
            self.tokens,
            self.bytes,
            self.ours.median_ms,
            self.ours.p10_ms,
            self.ours.p90_ms,
            self.copy.median_ms,
            self.gbps(&self.ours),
            self.gbps(&self.copy),
            self.gbps(&self.ours) / self.gbps(&self.copy)
        )
    }
}

/// Slots the way the model runner makes them: tokens fill blocks in order, the blocks themselves
/// are a random, non-contiguous choice from the pool.
fn runner_like_slots(num_tokens: usize, layout: &CacheLayout) -> Vec<i64> {
    let mut rng = inputs::rng("bench slots");
    let mut blocks: Vec<usize> = (0..layout.num_blocks).collect();
    blocks.shuffle(&mut rng);
    (0..num_tokens)
        .map(|t| (blocks[t / layout.block_size] * layout.block_size + t % layout.block_size) as i64)
        .collect()
}

fn bench_kv_write<T: Element>(dev: &CudaDevice, name: &str, num_tokens: usize) -> Result<Row, String> {
    let e = |x: attention_backend::AttentionError| x.to_string();
    let layout = CacheLayout::new(16384, 16, 8, 128).map_err(e)?;
    let row = layout.row_elems();
    let mut rng = inputs::rng("bench inputs");
    let shape = [num_tokens, layout.num_kv_heads, layout.head_size];
    let key = DeviceTensor::from_host(dev, &inputs::values::<T>(&mut rng, num_tokens * row), &shape).map_err(e)?;
    let value = DeviceTensor::from_host(dev, &inputs::values::<T>(&mut rng, num_tokens * row), &shape).map_err(e)?;
    let slots = DeviceSlotMapping::upload(dev, &SlotMapping::new(runner_like_slots(num_tokens, &layout))).map_err(e)?;
    let mut cache = CudaKvCache::<T>::zeros(dev, layout).map_err(e)?;
    let ours = time_on_stream(dev, WARMUP, ITERS, || cuda::kv_cache_update(dev, &key, &value, &mut cache, &slots))?;

    // The ceiling: copy the same K and V bytes device to device.
    let mut dst_k = DeviceTensor::<T>::zeros(dev, &shape).map_err(e)?;
    let mut dst_v = DeviceTensor::<T>::zeros(dev, &shape).map_err(e)?;
    let copy = time_on_stream(dev, WARMUP, ITERS, || {
        dev.stream().memcpy_dtod(key.buffer(), dst_k.buffer_mut())?;
        dev.stream().memcpy_dtod(value.buffer(), dst_v.buffer_mut())
    })?;
    let kv_bytes = (2 * num_tokens * row * std::mem::size_of::<T>()) as u64;
    Ok(Row {
        name: name.into(),
        dtype: T::DTYPE.as_str(),
        tokens: num_tokens,
        // K and V read once and written once; the slot mapping read once.
        bytes: 2 * kv_bytes + 8 * num_tokens as u64,
        ours,
        copy,
    })
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let json_path = args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)).cloned();
    let dev = CudaDevice::new(0).map_err(|e| e.to_string())?;
    println!("device: {}", dev.name());
    let rows = vec![
        bench_kv_write::<bf16>(&dev, "kv_write prefill 16k tok", 16384)?,
        bench_kv_write::<f16>(&dev, "kv_write prefill 16k tok", 16384)?,
        bench_kv_write::<bf16>(&dev, "kv_write decode 256 tok", 256)?,
    ];
    println!(
        "\n{:<28} {:>5} {:>12} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "shape", "dtype", "bytes", "ours us", "copy us", "ours GB/s", "copy GB/s", "ratio"
    );
    for r in &rows {
        println!(
            "{:<28} {:>5} {:>12} {:>10.2} {:>10.2} {:>10.0} {:>10.0} {:>8.3}",
            r.name,
            r.dtype,
            r.bytes,
            r.ours.median_ms * 1e3,
            r.copy.median_ms * 1e3,
            r.gbps(&r.ours),
            r.gbps(&r.copy),
            r.gbps(&r.ours) / r.gbps(&r.copy)
        );
        println!("{:<28} {:>5} {:>12} p10-p90 {:.2}-{:.2} us", "", "", "", r.ours.p10_ms * 1e3, r.ours.p90_ms * 1e3);
    }
    if let Some(path) = json_path {
        let body = rows.iter().map(Row::json).collect::<Vec<_>>().join(",\n  ");
        std::fs::write(&path, format!("[\n  {body}\n]\n")).map_err(|e| format!("write {path}: {e}"))?;
        println!("wrote {path}");
    }
    Ok(())
}
