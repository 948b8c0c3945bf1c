//! The prefill kernels side by side in one run: the sm80 `mma.sync` kernel, the lockstep Hopper
//! `wgmma` kernel (sm90) and the warp-specialised Hopper kernel (sm90ws), each on a shuffled block
//! table (blocks drawn at random from a larger pool, as a serving run leaves them) and on a
//! contiguous one (request blocks in order), on the prefill shapes of the Hopper issue and two
//! short-prompt shapes. Prints
//! TFLOP/s of the causal work per kernel and table, the paging cost (shuffled time over contiguous
//! time), and the largest difference between each kernel's output and the sm80 kernel's as a
//! sanity check.
//!
//! `bench_prefill_paths [--iters N] [--only SUBSTRING] [--kernel sm80|sm90|sm90ws] [--trace DIR]`
//!
//! `--trace DIR` (in a build with `PAGED_ATTN_PREFILL_TRACE=1` set at build time) writes the
//! warp-specialised kernel's per-round timeline of each shape's last shuffled-table launch to
//! `DIR/<shape>.txt`: one line per round of each block with its item, key tiles and SM, then the
//! producer's and each consumer warpgroup's marks in microseconds from the launch's first producer
//! start (-1: not reached).

use attention_backend::cuda::cudarc::driver::sys::CUdevice_attribute;
use attention_backend::cuda::{self, AttentionWorkspace, CudaDevice, CudaKvCache, DeviceMetadata, DeviceTensor};
use attention_backend::{bf16, AttentionMetadata, AttentionParams, BlockTable, CacheLayout, DType, SlotMapping};
use attention_kernels::attention::{prefill_kernel, with_prefill_path, PrefillKernel, PrefillPath};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use test_suite::inputs;
use test_suite::timing::time_on_stream;

const WARMUP: usize = 10;
const BLOCK: usize = 16;
const HEADS: (usize, usize) = (32, 8);

struct Shape {
    name: &'static str,
    seqs: Vec<(usize, usize)>,
    head_size: usize,
}

impl Shape {
    /// Multiply-adds of QK^T and PV over the visible keys, 2 FLOPs each (bottom-right causal).
    fn flops(&self) -> f64 {
        let visible: usize = self.seqs.iter().map(|&(q, kv)| q * (kv - q) + q * (q + 1) / 2).sum();
        4.0 * visible as f64 * (HEADS.0 * self.head_size) as f64
    }
}

struct Setup {
    cache: CudaKvCache<bf16>,
    meta: DeviceMetadata,
    query: DeviceTensor<bf16>,
    out: DeviceTensor<bf16>,
    params: AttentionParams,
}

/// A cache holding every request's keys: blocks in request order (`shuffled = false`) or drawn at
/// random from a pool a quarter larger than needed.
fn setup(dev: &CudaDevice, shape: &Shape, shuffled: bool, rng: &mut StdRng) -> Setup {
    let (h, kvh, d) = (HEADS.0, HEADS.1, shape.head_size);
    let need: usize = shape.seqs.iter().map(|&(_, kv)| kv.div_ceil(BLOCK)).sum();
    let num_blocks = need + need / 4 + 64;
    let mut pool: Vec<i32> = (0..num_blocks as i32).collect();
    if shuffled {
        pool.shuffle(rng);
    }
    let width = shape.seqs.iter().map(|&(_, kv)| kv.div_ceil(BLOCK)).max().unwrap_or(1);
    let mut table = vec![0i32; shape.seqs.len() * width];
    let (mut at, mut all_slots, mut slots, mut qsl) = (0, Vec::new(), Vec::new(), vec![0i32]);
    for (r, &(q, kv)) in shape.seqs.iter().enumerate() {
        let n = kv.div_ceil(BLOCK);
        table[r * width..r * width + n].copy_from_slice(&pool[at..at + n]);
        at += n;
        for j in 0..kv {
            let s = i64::from(table[r * width + j / BLOCK]) * BLOCK as i64 + (j % BLOCK) as i64;
            all_slots.push(s);
            if j >= kv - q {
                slots.push(s);
            }
        }
        qsl.push(qsl[r] + q as i32);
    }
    let layout = CacheLayout::new(num_blocks, BLOCK, kvh, d).unwrap();
    let mut cache = CudaKvCache::<bf16>::zeros(dev, layout).unwrap();
    let chunk = 16384;
    let kt = DeviceTensor::from_host(dev, &inputs::values::<bf16>(rng, chunk * kvh * d), &[chunk, kvh, d]).unwrap();
    let vt = DeviceTensor::from_host(dev, &inputs::values::<bf16>(rng, chunk * kvh * d), &[chunk, kvh, d]).unwrap();
    for part in all_slots.chunks(chunk) {
        let mut s = part.to_vec();
        s.resize(chunk, -1);
        let sm = cuda::DeviceSlotMapping::upload(dev, &SlotMapping::new(s)).unwrap();
        cuda::kv_cache_update(dev, &kt, &vt, &mut cache, &sm).unwrap();
    }
    let seq_lens: Vec<i32> = shape.seqs.iter().map(|&(_, kv)| kv as i32).collect();
    let nt = slots.len();
    let table = BlockTable::new(table, shape.seqs.len(), width).unwrap();
    let meta = AttentionMetadata::new(qsl, seq_lens, table, SlotMapping::new(slots), 1).unwrap();
    let meta = DeviceMetadata::upload(dev, &meta).unwrap();
    let host_query: Vec<bf16> = (0..nt * h * d).map(|_| bf16::from_f32(rng.random_range(-2.0..2.0f32))).collect();
    let query = DeviceTensor::from_host(dev, &host_query, &[nt, h, d]).unwrap();
    let out = DeviceTensor::<bf16>::zeros(dev, &[nt, h, d]).unwrap();
    dev.synchronize().unwrap();
    Setup { cache, meta, query, out, params: AttentionParams::new(h, kvh, d) }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let iters = arg("--iters").and_then(|v| v.parse().ok()).unwrap_or(50);
    let only = arg("--only");
    let kernel = arg("--kernel").map(|k| k.to_ascii_lowercase());
    let trace_dir = arg("--trace");
    if let Some(dir) = &trace_dir {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("bench_prefill_paths: --trace {dir}: {e}");
            std::process::exit(2);
        }
    }
    let dev = CudaDevice::new(0).unwrap_or_else(|e| {
        eprintln!("bench_prefill_paths: {e}");
        std::process::exit(1);
    });
    println!("device: {}", dev.name());
    let shapes = [
        Shape { name: "prefill causal 8 x 2048", seqs: vec![(2048, 2048); 8], head_size: 128 },
        Shape { name: "prefill causal 2 x 8192", seqs: vec![(8192, 8192); 2], head_size: 128 },
        Shape { name: "prefill causal 8 x 2048 d64", seqs: vec![(2048, 2048); 8], head_size: 64 },
        Shape { name: "chunked q512 on 7.5k prefix x 4", seqs: vec![(512, 8192); 4], head_size: 128 },
        // Short prompts: the prefill part of the mixed bench shape, and a batch of short prompts,
        // where a block has few key tiles to amortise its start over.
        Shape { name: "prefill causal 2 x 1024", seqs: vec![(1024, 1024); 2], head_size: 128 },
        Shape { name: "prefill causal 32 x 512", seqs: vec![(512, 512); 32], head_size: 128 },
        // Few row blocks for the chip (the warp-specialised kernel runs one 128-row block per
        // SM): where the Auto path's choice between the two Hopper kernels turns.
        Shape { name: "prefill causal 1 x 1024", seqs: vec![(1024, 1024); 1], head_size: 128 },
        Shape { name: "prefill causal 4 x 1024", seqs: vec![(1024, 1024); 4], head_size: 128 },
        Shape { name: "prefill causal 1 x 2048", seqs: vec![(2048, 2048); 1], head_size: 128 },
        Shape { name: "prefill causal 2 x 2048", seqs: vec![(2048, 2048); 2], head_size: 128 },
        Shape { name: "prefill causal 1 x 4096", seqs: vec![(4096, 4096); 1], head_size: 128 },
        Shape { name: "prefill causal 1 x 8192", seqs: vec![(8192, 8192); 1], head_size: 128 },
        // Head 64 (its kernel configuration differs: see paged_prefill_sm90ws.cu) over the same
        // spread of item counts and lengths.
        Shape { name: "prefill causal 2 x 8192 d64", seqs: vec![(8192, 8192); 2], head_size: 64 },
        Shape { name: "chunked q512 on 7.5k prefix x 4 d64", seqs: vec![(512, 8192); 4], head_size: 64 },
        Shape { name: "prefill causal 32 x 512 d64", seqs: vec![(512, 512); 32], head_size: 64 },
        Shape { name: "prefill causal 1 x 2048 d64", seqs: vec![(2048, 2048); 1], head_size: 64 },
    ];
    println!(
        "\n{:<36} {:>6} {:>10} {:>10} {:>9} {:>9} {:>12}",
        "shape (bf16, 32/8 heads)", "kernel", "shuf ms", "contig ms", "TFLOP/s", "contig TF", "paging cost"
    );
    for shape in shapes.iter().filter(|s| only.as_deref().is_none_or(|o| s.name.contains(o))) {
        let seed = inputs::rng(shape.name).random::<u64>();
        let mut outs: Vec<(PrefillKernel, Vec<bf16>)> = Vec::new();
        for (path, want) in [
            (PrefillPath::Sm80, PrefillKernel::Sm80),
            (PrefillPath::Sm90, PrefillKernel::Sm90),
            (PrefillPath::Sm90Ws, PrefillKernel::Sm90Ws),
        ] {
            if kernel.as_deref().is_some_and(|k| format!("{want:?}").to_ascii_lowercase() != k) {
                continue;
            }
            let ok = with_prefill_path(path, || prefill_kernel(dev.context(), shape.head_size, DType::BF16));
            match ok {
                Ok(k) if k == want => {}
                Ok(k) => {
                    println!("{:<36} {:>6} runs {k:?} for this shape: skipped", shape.name, format!("{want:?}"));
                    continue;
                }
                Err(e) => {
                    println!("{:<36} {:>6} unavailable: {e}", shape.name, format!("{want:?}"));
                    continue;
                }
            }
            let mut ms = [0.0f64; 2];
            for (i, shuffled) in [true, false].into_iter().enumerate() {
                // The same inputs (and shuffled table) for both kernels, so their outputs compare.
                let mut rng = StdRng::seed_from_u64(seed);
                let mut s = setup(&dev, shape, shuffled, &mut rng);
                let mut ws = AttentionWorkspace::new();
                let stats = with_prefill_path(path, || {
                    time_on_stream(&dev, WARMUP, iters, || {
                        cuda::paged_attention(
                            &dev,
                            &s.meta,
                            &s.params,
                            cuda::AttentionIo { query: &s.query, cache: &s.cache, out: &mut s.out, lse: None },
                            &mut ws,
                        )
                    })
                })
                .unwrap();
                ms[i] = stats.median_ms;
                if shuffled {
                    outs.push((want, s.out.to_host(&dev).unwrap()));
                    if let (Some(dir), PrefillKernel::Sm90Ws) = (&trace_dir, want) {
                        let path = format!("{dir}/{}.txt", shape.name.replace([' ', '.'], "_"));
                        if let Err(e) = write_trace(&dev, &path) {
                            eprintln!("bench_prefill_paths: --trace: {e}");
                            std::process::exit(1);
                        }
                    }
                }
            }
            let tf = |m: f64| shape.flops() / (m * 1e-3) / 1e12;
            println!(
                "{:<36} {:>6} {:>10.3} {:>10.3} {:>9.1} {:>9.1} {:>11.1}%",
                shape.name,
                format!("{want:?}"),
                ms[0],
                ms[1],
                tf(ms[0]),
                tf(ms[1]),
                (ms[0] / ms[1] - 1.0) * 100.0
            );
        }
        if let Some(((_, a), rest)) = outs.split_first() {
            for (k, b) in rest {
                let max_diff = a.iter().zip(b).map(|(x, y)| (x.to_f32() - y.to_f32()).abs()).fold(0.0f32, f32::max);
                let non_finite = b.iter().filter(|x| !x.to_f32().is_finite()).count();
                println!("{:<36} {k:?} vs sm80: max |diff| {max_diff:.2e}, {non_finite} non-finite {k:?} outputs", "");
            }
        }
    }
}

/// Writes the per-round timeline of the last warp-specialised launch (its persistent grid: one
/// block per SM, every shape here having more work items than SMs) to `path`.
fn write_trace(dev: &CudaDevice, path: &str) -> Result<(), String> {
    use attention_kernels::attention::{prefill_trace, PrefillConsumerMarks};
    use std::io::Write;
    let sms = dev.context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).unwrap_or(1);
    let blocks = usize::try_from(sms).unwrap_or(1).clamp(1, 160);
    let records = prefill_trace(dev.context(), blocks)
        .map_err(|e| e.to_string())?
        .ok_or("the kernels were built without the trace: rebuild with PAGED_ATTN_PREFILL_TRACE=1")?;
    let t0 = records.iter().map(|r| r.producer_start_ns).filter(|&t| t > 0).min().unwrap_or(0);
    let us = |t: u64| if t == 0 { -1.0 } else { t.saturating_sub(t0) as f64 / 1e3 };
    let cons = |c: &PrefillConsumerMarks| c.in_order().map(|t| format!("{:.3}", us(t))).join(" ");
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| format!("{path}: {e}"))?);
    writeln!(
        f,
        "# block round item tiles sm | producer: start q k0 end | consumer 0, 1, 2: start q s0_issued \
         s0_done softmax0 loop_end last_pv final staged stored end (us from the first producer start; \
         -1: not reached, and a kernel with two consumers leaves the third's all -1)"
    )
    .map_err(|e| e.to_string())?;
    for r in &records {
        writeln!(
            f,
            "{} {} {} {} {} | {:.3} {:.3} {:.3} {:.3} | {} | {} | {}",
            r.block,
            r.round,
            r.item,
            r.tiles,
            r.sm,
            us(r.producer_start_ns),
            us(r.producer_q_ns),
            us(r.producer_k0_ns),
            us(r.producer_end_ns),
            cons(&r.consumers[0]),
            cons(&r.consumers[1]),
            cons(&r.consumers[2])
        )
        .map_err(|e| e.to_string())?;
    }
    f.flush().map_err(|e| format!("{path}: {e}"))
}
