//! CPU forward for one 1k-token prefill: `cargo run --release -p attention-backend --example cpu_prefill_bench`.
//!
//! Arguments (all optional): `tokens` (default 1024), `reps` (default 3). `PAGED_ATTN_CPU_THREADS`
//! (or `RAYON_NUM_THREADS`) sizes the pool. Prints, per (heads, kv heads, dtype), the best wall
//! time of `cpu::forward` (cache write + causal attention) over `reps` runs.

use std::time::Instant;

use attention_backend::ndarray::{Array2, Array3};
use attention_backend::{
    bf16, cpu, AttentionMetadata, AttentionParams, BlockTable, CacheLayout, CpuKvCache, Element, SlotMapping,
};

fn bench<T: Element>(
    tokens: usize,
    num_heads: usize,
    num_kv_heads: usize,
    reps: usize,
) -> attention_backend::Result<f64> {
    let (head_size, block_size) = (128, 16);
    let blocks = tokens.div_ceil(block_size);
    // Blocks in reverse order, so the gather really goes through the table.
    let table: Vec<i32> = (0..blocks as i32).rev().collect();
    let slots: Vec<i64> =
        (0..tokens).map(|p| table[p / block_size] as i64 * block_size as i64 + (p % block_size) as i64).collect();
    let meta = AttentionMetadata::new(
        vec![0, tokens as i32],
        vec![tokens as i32],
        BlockTable::from_rows(&[table]),
        SlotMapping::new(slots),
        1,
    )?;
    let mut cache = CpuKvCache::<T>::zeros(CacheLayout::new(blocks, block_size, num_kv_heads, head_size)?)?;
    let fill = |shape: (usize, usize, usize), salt: usize| {
        Array3::from_shape_fn(shape, |(t, h, d)| {
            T::from_f32((((t * 31 + h * 17 + d * 7 + salt) % 97) as f32 - 48.0) / 48.0)
        })
    };
    let query = fill((tokens, num_heads, head_size), 1);
    let key = fill((tokens, num_kv_heads, head_size), 2);
    let value = fill((tokens, num_kv_heads, head_size), 3);
    let mut out = Array3::<T>::default((tokens, num_heads, head_size));
    let mut lse = Array2::<f32>::zeros((tokens, num_heads));
    let params = AttentionParams::new(num_heads, num_kv_heads, head_size);
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        cpu::forward(
            &meta,
            &params,
            cpu::ForwardIo {
                query: query.view(),
                key: key.view(),
                value: value.view(),
                cache: &mut cache,
                out: out.view_mut(),
                lse: Some(lse.view_mut()),
            },
        )?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> attention_backend::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let tokens = args.first().copied().unwrap_or(1024);
    let reps = args.get(1).copied().unwrap_or(3).max(1);
    println!(
        "cpu paged attention forward, one causal prefill of {tokens} tokens, head size 128, block size 16, {} threads",
        cpu::num_threads()
    );
    for (nh, nkv) in [(32, 32), (32, 8)] {
        for dtype in ["f32", "bf16"] {
            let secs = match dtype {
                "f32" => bench::<f32>(tokens, nh, nkv, reps)?,
                _ => bench::<bf16>(tokens, nh, nkv, reps)?,
            };
            // causal: tokens * (tokens + 1) / 2 (query, key) pairs per head, 2 matmuls of 2 flops/MAC
            let flops = 4.0 * (tokens * (tokens + 1) / 2) as f64 * 128.0 * nh as f64;
            println!(
                "heads {nh:>2} / kv heads {nkv:>2}  {dtype:>4}: {secs:.3} s  ({:.1} useful GFLOP/s)",
                flops / secs / 1e9
            );
        }
    }
    Ok(())
}
