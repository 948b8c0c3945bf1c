//! FP8 KV caches against bf16 on the same shapes, in one run: the KV-cache write beside a device
//! copy of the same bytes, split-KV decode (b64 x 4096, b16 x 16384) and causal prefill (8 x
//! 2048: the default path, the warp-specialised and the lockstep Hopper kernels, the sm80
//! kernel), bf16 compute, 32 q / 8 kv heads, head 128, block 16, shuffled block tables, per-layer
//! scales. The targets: FP8 decode <= 0.55x the bf16 time, FP8 write
//! >= 0.90 of the copy of its bytes, FP8 prefill within 10% of bf16.
//!
//! `bench_fp8 [--iters N] [--only SUBSTRING] [--json FILE]`
//!
//! `bench_fp8 --sweep [--iters N] [--only SUBSTRING] [--variant NAME]` instead times every decode
//! variant (or the one named) over a bf16 and an E4M3 cache at a range of split counts (b64 x 4096, b16 x 16384, b256 x 1024, b1 x
//! 32768), beside the split count the planner's wave model picks from that variant's occupancy:
//! the data behind the FP8 pipeline and the wave model's constants.
//!
//! It uses the kernels crate's launchers directly (borrowed cudarc views), as an engine would.

use std::io::Write;
use std::sync::Arc;

use attention_backend::cuda::cudarc::driver::{CudaSlice, CudaStream};
use attention_backend::cuda::{CudaDevice, DeviceMetadata};
use attention_backend::{bf16, AttentionMetadata, BlockTable, SlotMapping};
use attention_kernels::attention::{
    self as kernels, AttentionBuffers, AttentionDims, AttentionFeatures, AttentionKernel, AttentionStrides,
    DecodeVariant, PrefillPath,
};
use attention_kernels::launch::{self, KvCacheMut, KvScales, KvWriteDims};
use attention_kernels::{DType, Fp8E4M3, Fp8E5M2, KvStorage};
use rand::seq::SliceRandom;
use test_suite::inputs;
use test_suite::timing::{time_on_stream, Stats};

const WARMUP: usize = 5;
const D: usize = 128;
const BS: usize = 16;
const HEADS: usize = 32;
const KV_HEADS: usize = 8;
/// Random K/V rows are in [-1, 1); a scale of 1/64 puts them in the upper part of E4M3's range.
const SCALE: f32 = 1.0 / 64.0;

/// One shape: `(q_len, kv_len)` per request.
struct Shape {
    name: &'static str,
    seqs: Vec<(usize, usize)>,
}

/// A cache pair of element type `C`, the step's metadata and the query/out buffers.
struct Step {
    seqs: Vec<(usize, usize)>,
    meta: DeviceMetadata,
    host: AttentionMetadata,
    num_blocks: usize,
    width: usize,
    query: CudaSlice<bf16>,
    out: CudaSlice<bf16>,
    /// Every real token's slot (for filling the caches).
    all_slots: Vec<i64>,
}

fn step(dev: &CudaDevice, s: &Shape) -> Step {
    let mut rng = inputs::rng(s.name);
    let width = s.seqs.iter().map(|&(_, kv)| kv.div_ceil(BS)).max().unwrap_or(1);
    let need: usize = s.seqs.iter().map(|&(_, kv)| kv.div_ceil(BS)).sum();
    let num_blocks = need + need / 4 + 64;
    let mut pool: Vec<i32> = (0..num_blocks as i32).collect();
    pool.shuffle(&mut rng);
    let mut table = vec![0i32; s.seqs.len() * width];
    let mut next = 0;
    let mut all_slots = Vec::new();
    let mut qsl = vec![0i32];
    let mut slots = Vec::new();
    for (r, &(q, kv)) in s.seqs.iter().enumerate() {
        for b in 0..kv.div_ceil(BS) {
            table[r * width + b] = pool[next];
            next += 1;
        }
        let slot = |j: usize| i64::from(table[r * width + j / BS]) * BS as i64 + (j % BS) as i64;
        all_slots.extend((0..kv).map(slot));
        slots.extend((kv - q..kv).map(slot));
        qsl.push(qsl[r] + q as i32);
    }
    all_slots.shuffle(&mut rng);
    let host = AttentionMetadata::new(
        qsl,
        s.seqs.iter().map(|&(_, kv)| kv as i32).collect(),
        BlockTable::new(table, s.seqs.len(), width).unwrap(),
        SlotMapping::new(slots),
        1,
    )
    .unwrap();
    let meta = DeviceMetadata::upload(dev, &host).unwrap();
    let tokens: usize = s.seqs.iter().map(|&(q, _)| q).sum();
    let stream = dev.stream();
    let query = stream.clone_htod(&inputs::values::<bf16>(&mut rng, tokens * HEADS * D)).unwrap();
    let out = stream.alloc_zeros::<bf16>(tokens * HEADS * D).unwrap();
    Step { seqs: s.seqs.clone(), meta, host, num_blocks, width, query, out, all_slots }
}

/// The scales as a launcher takes them: `None` for bf16, per-layer device scalars for FP8.
fn scales<'a, C: KvStorage<bf16>>(k: &'a CudaSlice<f32>, v: &'a CudaSlice<f32>) -> Option<KvScales<'a>> {
    C::QUANTISED.then(|| KvScales { key: k.as_view(), value: v.as_view() })
}

/// A `C` cache pair holding random rows at every slot of the step (written by our own write
/// kernel, in chunks of one random chunk of rows).
fn fill<C: KvStorage<bf16>>(
    stream: &Arc<CudaStream>,
    st: &Step,
    ks: &CudaSlice<f32>,
    vs: &CudaSlice<f32>,
) -> (CudaSlice<C>, CudaSlice<C>) {
    let mut rng = inputs::rng("fill");
    let row = KV_HEADS * D;
    let n = st.num_blocks * BS * row;
    let mut kc = stream.alloc_zeros::<C>(n).unwrap();
    let mut vc = stream.alloc_zeros::<C>(n).unwrap();
    let chunk = 16384;
    let k = stream.clone_htod(&inputs::values::<bf16>(&mut rng, chunk * row)).unwrap();
    let v = stream.clone_htod(&inputs::values::<bf16>(&mut rng, chunk * row)).unwrap();
    for part in st.all_slots.chunks(chunk) {
        let mut p = part.to_vec();
        p.resize(chunk, -1);
        let slots = stream.clone_htod(&p).unwrap();
        launch::kv_cache_write(
            stream,
            k.as_view(),
            v.as_view(),
            KvCacheMut::Separate { key: kc.as_view_mut(), value: vc.as_view_mut() },
            slots.as_view(),
            KvWriteDims::contiguous(chunk, row, st.num_blocks, BS),
            scales::<C>(ks, vs),
        )
        .unwrap();
    }
    stream.synchronize().unwrap();
    (kc, vc)
}

/// Times one attention launch (decode or prefill, whichever the shape is) over a `C` cache.
fn time_attention<C: KvStorage<bf16>>(
    dev: &CudaDevice,
    st: &mut Step,
    iters: usize,
    (path, variant): (PrefillPath, DecodeVariant),
) -> Stats {
    let stream = dev.stream().clone();
    let ks = stream.clone_htod(&[SCALE]).unwrap();
    let vs = stream.clone_htod(&[SCALE]).unwrap();
    let (kc, vc) = fill::<C>(&stream, st, &ks, &vs);
    time_filled::<C>(dev, st, iters, (path, variant), (&kc, &vc, &ks, &vs), None)
}

/// Times attention over filled caches; `splits` overrides the planner's split count (decode).
fn time_filled<C: KvStorage<bf16>>(
    dev: &CudaDevice,
    st: &mut Step,
    iters: usize,
    (path, variant): (PrefillPath, DecodeVariant),
    (kc, vc, ks, vs): (&CudaSlice<C>, &CudaSlice<C>, &CudaSlice<f32>, &CudaSlice<f32>),
    splits: Option<usize>,
) -> Stats {
    let stream = dev.stream().clone();
    let mut plan = st.meta.split_plan_for_cache(HEADS, KV_HEADS, D, C::DTYPE);
    if let Some(s) = splits {
        plan.num_splits = s;
        plan.workspace_len = kernels::decode_workspace_len(s, plan.decode_reqs, HEADS, D);
    }
    let num_reqs = st.host.num_reqs();
    let mut ws = stream.alloc_zeros::<f32>(plan.workspace_len.max(1)).unwrap();
    let dims = AttentionDims {
        num_tokens: st.host.num_tokens(),
        num_heads: HEADS,
        num_kv_heads: KV_HEADS,
        head_size: D,
        num_blocks: st.num_blocks,
        block_size: BS,
        num_reqs,
        max_blocks_per_req: st.width,
        req_begin: 0,
        req_end: num_reqs,
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
    let kernel = if plan.decode_reqs == num_reqs {
        AttentionKernel::Decode { num_splits: plan.num_splits, split_keys: 0 }
    } else {
        AttentionKernel::Prefill { max_query_len: plan.prefill_max_query_len, max_sms: 0 }
    };
    kernels::with_prefill_path(path, || {
        time_on_stream(dev, WARMUP, iters, || {
            let bufs = AttentionBuffers::<bf16, C> {
                query: st.query.as_view(),
                key_cache: kc.as_view(),
                value_cache: vc.as_view(),
                kv_scales: scales::<C>(ks, vs),
                query_start_loc: st.meta.query_start_loc().as_view(),
                seq_lens: st.meta.seq_lens().as_view(),
                block_table: st.meta.block_table().as_view(),
                out: st.out.as_view_mut(),
                lse: None,
                workspace: Some(ws.as_view_mut()),
                strides: AttentionStrides::contiguous(&dims),
            };
            kernels::paged_attention_with_variant(&stream, kernel, variant, &dims, &features, bufs)
        })
    })
    .unwrap_or_else(|e| panic!("{:?} attention over a {} cache: {e:?}", kernel, C::DTYPE))
}

/// Times the KV write of `tokens` bf16 rows into a `C` cache (random slots of a cache four times
/// larger).
fn time_write<C: KvStorage<bf16>>(dev: &CudaDevice, tokens: usize, iters: usize) -> Stats {
    let stream = dev.stream().clone();
    let mut rng = inputs::rng("write");
    let row = KV_HEADS * D;
    let num_blocks = 4 * tokens / BS;
    let k = stream.clone_htod(&inputs::values::<bf16>(&mut rng, tokens * row)).unwrap();
    let v = stream.clone_htod(&inputs::values::<bf16>(&mut rng, tokens * row)).unwrap();
    let slots = stream.clone_htod(&inputs::slots(&mut rng, tokens, num_blocks * BS, 0.0)).unwrap();
    let mut kc = stream.alloc_zeros::<C>(num_blocks * BS * row).unwrap();
    let mut vc = stream.alloc_zeros::<C>(num_blocks * BS * row).unwrap();
    let ks = stream.clone_htod(&[SCALE]).unwrap();
    let vs = stream.clone_htod(&[SCALE]).unwrap();
    time_on_stream(dev, WARMUP, iters, || {
        launch::kv_cache_write(
            &stream,
            k.as_view(),
            v.as_view(),
            KvCacheMut::Separate { key: kc.as_view_mut(), value: vc.as_view_mut() },
            slots.as_view(),
            KvWriteDims::contiguous(tokens, row, num_blocks, BS),
            scales::<C>(&ks, &vs),
        )
    })
    .unwrap_or_else(|e| panic!("KV write into a {} cache: {e:?}", C::DTYPE))
}

/// A device-to-device copy moving `bytes` in total (half read, half written).
fn time_copy(dev: &CudaDevice, bytes: usize, iters: usize) -> Stats {
    let n = (bytes / 2).div_ceil(2);
    let src = dev.stream().alloc_zeros::<u16>(n).unwrap();
    let mut dst = dev.stream().alloc_zeros::<u16>(n).unwrap();
    time_on_stream(dev, WARMUP, iters, || dev.stream().memcpy_dtod(&src, &mut dst)).unwrap()
}

/// The JSON rows written with `--json`, and the iteration count of every timing.
struct Out {
    json: Vec<String>,
    iters: usize,
}

impl Out {
    fn row(&mut self, what: &str, dtype: DType, t: &Stats, bytes: f64, base_ms: Option<f64>, copy_ms: Option<f64>) {
        let gbps = bytes / (t.median_ms * 1e-3) / 1e9;
        let ratio = base_ms.map_or(String::from("-"), |b| format!("{:.3}", t.median_ms / b));
        let per_copy = copy_ms.map_or(String::from("-"), |c| format!("{:.3}", c / t.median_ms));
        let line = format!(
            "{:<34} {:>9} {:>9.4} {:>8.0} {:>12} {:>8}",
            what,
            dtype.as_str(),
            t.median_ms,
            gbps,
            ratio,
            per_copy
        );
        println!("{line}");
        let _ = std::io::stdout().flush();
        self.json.push(format!(
            "{{\"case\": \"{what}\", \"kv_dtype\": \"{dtype}\", \"ms\": {:.5}, \"bytes\": {bytes}, \"gbps\": {gbps:.1}, \
             \"vs_bf16\": {}, \"vs_copy\": {}}}",
            t.median_ms,
            base_ms.map_or("null".into(), |b| format!("{:.4}", t.median_ms / b)),
            copy_ms.map_or("null".into(), |c| format!("{:.4}", c / t.median_ms)),
        ));
    }
}

/// Bytes an attention launch must move with a cache of `kv_elem` bytes per element: K and V of
/// every sequence once, Q read and O written in bf16.
fn attention_bytes(seqs: &[(usize, usize)], kv_elem: usize) -> f64 {
    let kv: usize = seqs.iter().map(|&(_, kv)| kv).sum();
    let q: usize = seqs.iter().map(|&(q, _)| q).sum();
    ((2 * kv * KV_HEADS * kv_elem + 2 * q * HEADS * 2) * D) as f64
}

/// Times `C` attention over `st` and a copy of its bytes, and prints the row.
fn attention_row<C: KvStorage<bf16>>(
    dev: &CudaDevice,
    out: &mut Out,
    st: &mut Step,
    (base, path, label): (Option<f64>, PrefillPath, &str),
    variant: DecodeVariant,
) -> f64 {
    let t = time_attention::<C>(dev, st, out.iters, (path, variant));
    let bytes = attention_bytes(&st.seqs, C::DTYPE.size_in_bytes());
    let copy = time_copy(dev, bytes as usize, out.iters);
    out.row(label, C::DTYPE, &t, bytes, base, Some(copy.median_ms));
    t.median_ms
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let iters = arg("--iters").and_then(|v| v.parse().ok()).unwrap_or(50);
    let only = arg("--only");
    let wanted = |name: &str| only.as_deref().is_none_or(|o| name.contains(o));
    let dev = CudaDevice::new(0).unwrap_or_else(|e| {
        eprintln!("bench_fp8: {e}");
        std::process::exit(1);
    });
    println!("device: {}; bf16 compute, {HEADS} q / {KV_HEADS} kv heads, head {D}, block {BS}", dev.name());
    println!("{:<34} {:>9} {:>9} {:>8} {:>12} {:>8}", "case", "kv cache", "ms", "GB/s", "time/bf16", "copy/ours");
    let mut out = Out { json: Vec::new(), iters };

    // The KV write: 16384 tokens of 8 kv heads x 128; bytes = bf16 rows read + cache rows written.
    let tokens = 16384;
    if wanted("kv write") {
        let what = "kv write 16384 tokens";
        let bytes = |elem: usize| (2 * tokens * KV_HEADS * D * (2 + elem)) as f64;
        let b = time_write::<bf16>(&dev, tokens, iters);
        let c = time_copy(&dev, bytes(2) as usize, iters);
        out.row(what, DType::BF16, &b, bytes(2), None, Some(c.median_ms));
        for (dtype, t) in [
            (DType::Fp8E4M3, time_write::<Fp8E4M3>(&dev, tokens, iters)),
            (DType::Fp8E5M2, time_write::<Fp8E5M2>(&dev, tokens, iters)),
        ] {
            let c = time_copy(&dev, bytes(1) as usize, iters);
            out.row(what, dtype, &t, bytes(1), Some(b.median_ms), Some(c.median_ms));
        }
    }

    if args.iter().any(|a| a == "--sweep") {
        sweep(&dev, iters, &only, arg("--variant").as_deref());
        return;
    }

    let shapes = [
        Shape { name: "decode b64 x 4096", seqs: vec![(1, 4096); 64] },
        Shape { name: "decode b16 x 16384", seqs: vec![(1, 16384); 16] },
        Shape { name: "prefill causal 8 x 2048", seqs: vec![(2048, 2048); 8] },
    ];
    for s in shapes.iter().filter(|s| wanted(s.name)) {
        let mut st = step(&dev, s);
        let paths: &[(PrefillPath, &str)] = if s.name.starts_with("prefill") {
            // Auto runs 16-bit caches on the warp-specialised Hopper kernel at head 128 and FP8
            // caches on the lockstep one: the first rows compare the defaults, the others the
            // two caches on one kernel each.
            &[
                (PrefillPath::Auto, ""),
                (PrefillPath::Sm90Ws, " (sm90ws path)"),
                (PrefillPath::Sm90, " (sm90 path)"),
                (PrefillPath::Sm80, " (sm80 path)"),
            ]
        } else {
            &[(PrefillPath::Auto, "")]
        };
        for &(path, suffix) in paths {
            let label = format!("{}{suffix}", s.name);
            let v = kernels::decode_variant().unwrap_or_else(|e| {
                eprintln!("bench_fp8: {e}");
                std::process::exit(1)
            });
            let base = attention_row::<bf16>(&dev, &mut out, &mut st, (None, path, &label), v);
            attention_row::<Fp8E4M3>(&dev, &mut out, &mut st, (Some(base), path, &label), v);
            attention_row::<Fp8E5M2>(&dev, &mut out, &mut st, (Some(base), path, &label), v);
        }
    }
    if let Some(path) = arg("--json") {
        let body = out.json.join(",\n  ");
        if let Err(e) = std::fs::write(&path, format!("[\n  {body}\n]\n")) {
            eprintln!("bench_fp8: cannot write {path}: {e}");
            std::process::exit(1);
        }
        println!("wrote {path}");
    }
}

/// `--sweep`: every decode variant over bf16 and E4M3 caches at several split counts, beside the
/// split count the planner's wave model picks from that variant's occupancy.
fn sweep(dev: &CudaDevice, iters: usize, only: &Option<String>, variant: Option<&str>) {
    let shapes = [
        Shape { name: "decode b64 x 4096", seqs: vec![(1, 4096); 64] },
        Shape { name: "decode b16 x 16384", seqs: vec![(1, 16384); 16] },
        Shape { name: "decode b256 x 1024", seqs: vec![(1, 1024); 256] },
        Shape { name: "decode b1 x 32768", seqs: vec![(1, 32768); 1] },
    ];
    for s in shapes.iter().filter(|s| only.as_deref().is_none_or(|o| s.name.contains(o))) {
        let mut st = step(dev, s);
        sweep_cache::<bf16>(dev, s, &mut st, iters, variant);
        sweep_cache::<Fp8E4M3>(dev, s, &mut st, iters, variant);
    }
}

fn sweep_cache<C: KvStorage<bf16>>(dev: &CudaDevice, s: &Shape, st: &mut Step, iters: usize, variant: Option<&str>) {
    const SPLITS: [usize; 10] = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16];
    let ctx = s.seqs[0].1;
    let stream = dev.stream().clone();
    let ks = stream.clone_htod(&[SCALE]).unwrap();
    let vs = stream.clone_htod(&[SCALE]).unwrap();
    let (kc, vc) = fill::<C>(&stream, st, &ks, &vs);
    let probe = AttentionKernel::Decode { num_splits: 1, split_keys: 0 };
    let saturation = attention_backend::cuda::device_saturation_bytes(dev.context());
    for v in DecodeVariant::ALL.into_iter().filter(|v| variant.is_none_or(|n| v.to_string() == n)) {
        let per_sm = kernels::blocks_per_sm_for_cache(dev.context(), probe, v, D, DType::BF16, C::DTYPE).unwrap_or(0);
        let blocks = s.seqs.len() * KV_HEADS;
        let slots = attention_backend::cuda::decode_variant_slots(per_sm, v, D, DType::BF16, C::DTYPE, saturation);
        let planned = attention_backend::cuda::decode_split_count(blocks, st.meta.num_sms(), per_sm, slots, ctx, 64);
        let mut cands: Vec<usize> = if ctx >= 32768 {
            vec![8, 16, 24, 32, 48, 64]
        } else {
            SPLITS.iter().copied().filter(|&x| x * 256 <= ctx).collect()
        };
        // The counts that make the grid a whole number of one-block-per-SM waves (or come
        // closest from below and above): b1 x 32768 at 16 splits leaves 4 of 132 SMs idle, 33
        // fills two blocks on every SM.
        let sms = st.meta.num_sms().max(1);
        for waves in 1..=4 {
            let exact = waves * sms / blocks;
            for sp in [exact, exact + 1] {
                if (1..=ctx / 256).contains(&sp) && !cands.contains(&sp) {
                    cands.push(sp);
                }
            }
        }
        if !cands.contains(&planned) {
            cands.push(planned);
        }
        cands.sort_unstable();
        let mut line = format!(
            "{:<20} {:>9} {:<10} per_sm {per_sm} slots {slots} (of {saturation} B in flight per SM) planned {planned:>2}:",
            s.name,
            C::DTYPE.as_str(),
            v
        );
        let mut best = (f64::INFINITY, 0);
        for &sp in &cands {
            let t = time_filled::<C>(dev, st, iters, (PrefillPath::Auto, v), (&kc, &vc, &ks, &vs), Some(sp));
            if t.median_ms < best.0 {
                best = (t.median_ms, sp);
            }
            line += &format!(" s{sp}={:.4}", t.median_ms);
        }
        line += &format!(" | best s{} {:.4}", best.1, best.0);
        println!("{line}");
        let _ = std::io::stdout().flush();
    }
}
