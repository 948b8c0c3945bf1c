//! Paged attention benchmark over the shapes that matter in serving: split-KV decode (bandwidth),
//! tensor-core causal prefill (TFLOP/s), a chunked prefill on a long prefix and a mixed batch,
//! each beside a device-to-device copy of its minimum bytes timed in the same run. Block tables
//! are shuffled draws from a larger pool; caches and queries hold random values.
//!
//! `bench_attention [--iters N] [--json FILE] [--check-dir DIR] [--only SUBSTRING] [--mixed-sweep]`
//!
//! `--mixed-sweep` adds mixed steps of other proportions (decode-heavy, prefill-heavy, a chunk on
//! a long prefix), for measuring the mixed-step partition's choices against fixed ones
//! (`PAGED_ATTN_MIXED_PARTITION=off` / `N`); each mixed row says how many SMs its prefill part got.
//!
//! With `--check-dir`, each case also writes request 0's dense inputs and our output rows
//! (`<case>.bin`, f32) so the peers script can check every peer against *our* answer before timing
//! it.

use std::collections::HashMap;
use std::io::Write;

use attention_backend::cuda::{self, AttentionWorkspace, CudaDevice, CudaKvCache, DeviceMetadata, DeviceTensor};
use attention_backend::{bf16, f16, AttentionMetadata, AttentionParams, BlockTable, CacheLayout, Element, SlotMapping};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use test_suite::inputs;
use test_suite::timing::{time_on_stream, Stats};

const WARMUP: usize = 10;
/// Rows of request 0 written for the peers' check (its last rows, where the causal mask matters).
const CHECK_ROWS: usize = 64;

/// One benchmark shape.
struct Case {
    kernel: &'static str,
    name: String,
    /// `(q_len, kv_len)` per request, decodes first.
    seqs: Vec<(usize, usize)>,
    heads: usize,
    kv_heads: usize,
    head_size: usize,
    block_size: usize,
}

impl Case {
    fn new(kernel: &'static str, name: &str, seqs: Vec<(usize, usize)>, heads: (usize, usize), d: usize) -> Self {
        Case { kernel, name: name.into(), seqs, heads: heads.0, kv_heads: heads.1, head_size: d, block_size: 16 }
    }

    /// Multiply-adds of QK^T and PV over the visible keys, 2 FLOPs each (bottom-right causal).
    fn flops(&self) -> f64 {
        let visible: usize = self.seqs.iter().map(|&(q, kv)| q * (kv - q) + q * (q + 1) / 2).sum();
        4.0 * visible as f64 * (self.heads * self.head_size) as f64
    }

    /// The fewest bytes the call must move: K and V of every sequence read once, Q read, O written.
    fn bytes(&self, elem: usize) -> f64 {
        let kv: usize = self.seqs.iter().map(|&(_, kv)| kv).sum();
        let q: usize = self.seqs.iter().map(|&(q, _)| q).sum();
        ((2 * kv * self.kv_heads + 2 * q * self.heads) * self.head_size * elem) as f64
    }
}

struct Setup<T: Element> {
    cache: CudaKvCache<T>,
    meta: DeviceMetadata,
    query: DeviceTensor<T>,
    out: DeviceTensor<T>,
    params: AttentionParams,
    /// Request 0's keys and values in position order, `[kv_len, kv_heads, head_size]` each.
    req0_kv: (Vec<T>, Vec<T>),
    host_query: Vec<T>,
}

/// Builds the paged cache the way a serving run leaves it: every request's blocks drawn at random
/// from a pool a quarter larger than needed, filled with random rows.
fn setup<T: Element>(dev: &CudaDevice, case: &Case, rng: &mut StdRng) -> Setup<T> {
    let (h, kvh, d, bs) = (case.heads, case.kv_heads, case.head_size, case.block_size);
    let need: usize = case.seqs.iter().map(|&(_, kv)| kv.div_ceil(bs)).sum();
    let num_blocks = need + need / 4 + 64;
    let mut pool: Vec<i32> = (0..num_blocks as i32).collect();
    pool.shuffle(rng);
    let width = case.seqs.iter().map(|&(_, kv)| kv.div_ceil(bs)).max().unwrap_or(1);
    let mut table = vec![0i32; case.seqs.len() * width];
    let (mut at, mut all_slots, mut slots, mut qsl) = (0, Vec::new(), Vec::new(), vec![0i32]);
    let mut req0_slots = Vec::new();
    for (r, &(q, kv)) in case.seqs.iter().enumerate() {
        let n = kv.div_ceil(bs);
        table[r * width..r * width + n].copy_from_slice(&pool[at..at + n]);
        at += n;
        for j in 0..kv {
            let s = i64::from(table[r * width + j / bs]) * bs as i64 + (j % bs) as i64;
            all_slots.push(s);
            if r == 0 {
                req0_slots.push(s);
            }
            if j >= kv - q {
                slots.push(s);
            }
        }
        qsl.push(qsl[r] + q as i32);
    }
    let layout = CacheLayout::new(num_blocks, bs, kvh, d).unwrap();
    let mut cache = CudaKvCache::<T>::zeros(dev, layout).unwrap();
    // Fill every used slot with random rows, a chunk of tokens at a time (rows reused per chunk).
    let chunk = 16384;
    let row = kvh * d;
    let k_rows = inputs::values::<T>(rng, chunk * row);
    let v_rows = inputs::values::<T>(rng, chunk * row);
    let kt = DeviceTensor::from_host(dev, &k_rows, &[chunk, kvh, d]).unwrap();
    let vt = DeviceTensor::from_host(dev, &v_rows, &[chunk, kvh, d]).unwrap();
    all_slots.shuffle(rng);
    let row_of: HashMap<i64, usize> = all_slots.iter().enumerate().map(|(i, &s)| (s, i % chunk)).collect();
    for part in all_slots.chunks(chunk) {
        let mut s = part.to_vec();
        s.resize(chunk, -1);
        let sm = cuda::DeviceSlotMapping::upload(dev, &SlotMapping::new(s)).unwrap();
        cuda::kv_cache_update(dev, &kt, &vt, &mut cache, &sm).unwrap();
    }
    let gather = |rows: &[T]| req0_slots.iter().flat_map(|s| rows[row_of[s] * row..][..row].iter().copied()).collect();
    let req0_kv = (gather(&k_rows), gather(&v_rows));
    let seq_lens: Vec<i32> = case.seqs.iter().map(|&(_, kv)| kv as i32).collect();
    let nt = slots.len();
    let table = BlockTable::new(table, case.seqs.len(), width).unwrap();
    let meta = AttentionMetadata::new(qsl, seq_lens, table, SlotMapping::new(slots), 1).unwrap();
    let meta = DeviceMetadata::upload(dev, &meta).unwrap();
    let host_query: Vec<T> = (0..nt * h * d).map(|_| T::from_f32(rng.random_range(-2.0..2.0f32))).collect();
    let query = DeviceTensor::from_host(dev, &host_query, &[nt, h, d]).unwrap();
    let out = DeviceTensor::<T>::zeros(dev, &[nt, h, d]).unwrap();
    dev.synchronize().unwrap();
    Setup { cache, meta, query, out, params: AttentionParams::new(h, kvh, d), req0_kv, host_query }
}

/// A device-to-device copy of `bytes` bytes (read `bytes`, write `bytes`).
fn time_copy(dev: &CudaDevice, bytes: usize, iters: usize) -> Stats {
    let n = bytes.div_ceil(2);
    let src = dev.stream().alloc_zeros::<u16>(n).unwrap();
    let mut dst = dev.stream().alloc_zeros::<u16>(n).unwrap();
    time_on_stream(dev, WARMUP, iters, || dev.stream().memcpy_dtod(&src, &mut dst)).unwrap()
}

/// Writes request 0's last `CHECK_ROWS` query rows, its K and V, and our output rows, as f32.
fn write_check<T: Element>(path: &str, case: &Case, s: &Setup<T>, dev: &CudaDevice) -> std::io::Result<usize> {
    let (q0, _) = case.seqs[0];
    let rows = q0.min(CHECK_ROWS);
    let hd = case.heads * case.head_size;
    let first = q0 - rows;
    let out = s.out.to_host(dev).map_err(std::io::Error::other)?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut put = |xs: &[T]| -> std::io::Result<()> {
        for x in xs {
            f.write_all(&x.to_f32().to_le_bytes())?;
        }
        Ok(())
    };
    put(&s.host_query[first * hd..q0 * hd])?;
    put(&s.req0_kv.0)?;
    put(&s.req0_kv.1)?;
    put(&out[first * hd..q0 * hd])?;
    Ok(rows)
}

struct Row {
    json: String,
    line: String,
}

fn run_case<T: Element>(dev: &CudaDevice, case: &Case, iters: usize, check_dir: Option<&str>) -> Row {
    let mut rng = inputs::rng(&case.name);
    let mut s = setup::<T>(dev, case, &mut rng);
    let plan = s.meta.split_plan(case.heads, case.kv_heads, case.head_size);
    let mut ws = AttentionWorkspace::new();
    let att = time_on_stream(dev, WARMUP, iters, || {
        cuda::paged_attention(
            dev,
            &s.meta,
            &s.params,
            cuda::AttentionIo { query: &s.query, cache: &s.cache, out: &mut s.out, lse: None },
            &mut ws,
        )
    })
    .unwrap();
    let id = format!("{}-{}", case.name.replace([' ', '/'], "_"), T::DTYPE);
    let check = check_dir.map(|dir| {
        let path = format!("{dir}/{id}.bin");
        let rows = write_check(&path, case, &s, dev).unwrap();
        (path, rows)
    });
    drop(s);
    let elem = T::DTYPE.size_in_bytes();
    let bytes = case.bytes(elem);
    let copy = time_copy(dev, bytes as usize, iters);
    let gbps = bytes / (att.median_ms * 1e-3) / 1e9;
    let copy_gbps = 2.0 * bytes / (copy.median_ms * 1e-3) / 1e9;
    let tflops = case.flops() / (att.median_ms * 1e-3) / 1e12;
    let seqs: Vec<String> = case.seqs.iter().map(|(q, kv)| format!("[{q},{kv}]")).collect();
    let (check_file, check_rows) = check.unwrap_or_default();
    let json = format!(
        concat!(
            "{{\"kernel\":\"{}\",\"name\":\"{}\",\"dtype\":\"{}\",\"num_heads\":{},\"num_kv_heads\":{},",
            "\"head_size\":{},\"block_size\":{},\"causal\":true,\"seqs\":[{}],\"bytes\":{},\"flops\":{},",
            "\"ours_ms\":{:.6},\"ours_p10_ms\":{:.6},\"ours_p90_ms\":{:.6},\"copy_ms\":{:.6},",
            "\"ratio_to_copy\":{:.4},\"num_splits\":{},\"prefill_sms\":{},\"check_file\":\"{}\",\"check_rows\":{}}}"
        ),
        case.kernel,
        case.name,
        T::DTYPE,
        case.heads,
        case.kv_heads,
        case.head_size,
        case.block_size,
        seqs.join(","),
        bytes as u64,
        case.flops() as u64,
        att.median_ms,
        att.p10_ms,
        att.p90_ms,
        copy.median_ms,
        gbps / copy_gbps,
        plan.num_splits,
        plan.prefill_sms,
        check_file,
        check_rows
    );
    let mut line = format!(
        "{:<34} {:>5} {:>9.3} {:>7.3}-{:<7.3} {:>8.0} {:>9.0} {:>6.2} {:>7.1} {:>6}",
        case.name,
        T::DTYPE.as_str(),
        att.median_ms,
        att.p10_ms,
        att.p90_ms,
        gbps,
        copy_gbps,
        gbps / copy_gbps,
        tflops,
        plan.num_splits
    );
    if plan.prefill_sms > 0 {
        line.push_str(&format!("  (prefill part on {} SMs)", plan.prefill_sms));
    }
    Row { json, line }
}

/// The shapes of the benchmark issue: head 128, 32 q / 8 kv heads, block 16 unless named.
fn cases() -> Vec<Case> {
    let gqa = (32, 8);
    let decode = |name: &str, b: usize, ctx: usize, heads| Case::new("decode", name, vec![(1, ctx); b], heads, 128);
    let mut mixed = vec![(1usize, 2048usize); 64];
    mixed.extend([(1024, 1024), (1024, 1024)]);
    vec![
        decode("decode b64 x 4096", 64, 4096, gqa),
        decode("decode b16 x 16384", 16, 16384, gqa),
        decode("decode b1 x 32768", 1, 32768, gqa),
        decode("decode b256 x 1024", 256, 1024, gqa),
        decode("decode MHA b32 x 4096", 32, 4096, (32, 32)),
        Case::new("prefill", "prefill causal 8 x 2048", vec![(2048, 2048); 8], gqa, 128),
        Case::new("prefill", "prefill causal 2 x 8192", vec![(8192, 8192); 2], gqa, 128),
        Case::new("prefill", "prefill causal 8 x 2048 d64", vec![(2048, 2048); 8], gqa, 64),
        Case::new("prefill", "chunked q512 on 7.5k prefix x 4", vec![(512, 8192); 4], gqa, 128),
        Case::new("mixed", "mixed 64 decodes + 2 x 1024", mixed, gqa, 128),
        // The mixed batch's two parts alone, for the sum its one step is held against.
        decode("mixed part: 64 decodes x 2048", 64, 2048, gqa),
        Case::new("prefill", "mixed part: prefill 2 x 1024", vec![(1024, 1024); 2], gqa, 128),
    ]
}

/// Mixed steps of other proportions than the headline one (`--mixed-sweep`), each followed by its
/// decode part and its prefill part alone (for the sum the step is held against, and for refitting
/// the partition's model): decodes of 2048 keys unless named, then the prefills.
fn mixed_sweep() -> Vec<Case> {
    /// Name, decodes, their context, the prefills' `(q_len, kv_len)`.
    type Step = (&'static str, usize, usize, &'static [(usize, usize)]);
    let gqa = (32, 8);
    let steps: [Step; 6] = [
        ("mixed 64 decodes + 1 x 512", 64, 2048, &[(512, 512)]),
        ("mixed 64 decodes + q512 on 4k", 64, 2048, &[(512, 4096)]),
        ("mixed 8 decodes + 1 x 1024", 8, 2048, &[(1024, 1024)]),
        ("mixed 128 decodes x 4096 + 1 x 2048", 128, 4096, &[(2048, 2048)]),
        ("mixed 256 decodes x 1024 + 4 x 256", 256, 1024, &[(256, 256); 4]),
        ("mixed 16 decodes x 1024 + 4 x 2048", 16, 1024, &[(2048, 2048); 4]),
    ];
    let mut cases = Vec::new();
    for (name, decodes, ctx, prefills) in steps {
        let mut seqs = vec![(1usize, ctx); decodes];
        seqs.extend_from_slice(prefills);
        cases.push(Case::new("mixed", name, seqs, gqa, 128));
        let part = name.trim_start_matches("mixed ");
        let decode_part = format!("mixed sweep part: {decodes} decodes x {ctx} ({part})");
        cases.push(Case::new("decode", &decode_part, vec![(1, ctx); decodes], gqa, 128));
        cases.push(Case::new("prefill", &format!("mixed sweep part: prefill ({part})"), prefills.to_vec(), gqa, 128));
    }
    cases
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let iters = arg("--iters").and_then(|v| v.parse().ok()).unwrap_or(50);
    let only = arg("--only");
    let check_dir = arg("--check-dir");
    if let Some(dir) = &check_dir {
        std::fs::create_dir_all(dir).expect("cannot create --check-dir");
    }
    let dev = CudaDevice::new(0).unwrap_or_else(|e| {
        eprintln!("bench_attention: {e}");
        std::process::exit(1);
    });
    println!("device: {}", dev.name());
    println!(
        "\n{:<34} {:>5} {:>9} {:>15} {:>8} {:>9} {:>6} {:>7} {:>6}",
        "shape", "dtype", "ms", "p10-p90", "GB/s", "copy GB/s", "/copy", "TFLOP/s", "splits"
    );
    let mut rows = Vec::new();
    let mut all = cases();
    if args.iter().any(|a| a == "--mixed-sweep") {
        all.extend(mixed_sweep());
    }
    for case in all.iter().filter(|c| only.as_deref().is_none_or(|o| c.name.contains(o))) {
        let row = run_case::<bf16>(&dev, case, iters, check_dir.as_deref());
        println!("{}", row.line);
        rows.push(row);
        // The two headline shapes in f16 as well.
        if case.name == "decode b64 x 4096" || case.name == "prefill causal 8 x 2048" {
            let row = run_case::<f16>(&dev, case, iters, check_dir.as_deref());
            println!("{}", row.line);
            rows.push(row);
        }
    }
    if let Some(path) = arg("--json") {
        let body = rows.iter().map(|r| r.json.as_str()).collect::<Vec<_>>().join(",\n  ");
        std::fs::write(&path, format!("[\n  {body}\n]\n")).expect("cannot write --json");
        println!("wrote {path}");
    }
}
