//! Host cost of the once-per-step contract check (`AttentionMetadata::check_against_with`), the
//! bulk of a plan's host time: `cargo run --release -p attention-backend --example step_check_bench`.
//!
//! The plan_overhead step (256 requests on 1024-token contexts, block 16, a 65,536-block cache
//! handed out in shuffled order): 248 decodes and 8 chunked prefills of 1000 tokens (8,248
//! tokens), then 256 decodes. Prints the median and 10th percentile of `reps` checks (default
//! 2000) with one kept scratch.

use std::time::Instant;

use attention_backend::{AttentionMetadata, BlockTable, CacheLayout, SlotMapping, StepCheckScratch};
use rand::seq::SliceRandom;

const REQS: usize = 256;
const BS: usize = 16;
const CONTEXT: usize = 1024;
const NUM_BLOCKS: usize = REQS * 256;

fn step(pool: &mut Vec<i32>, prefills: usize) -> attention_backend::Result<AttentionMetadata> {
    let mut qsl = vec![0i32];
    let (mut seq_lens, mut rows, mut slots) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..REQS {
        let q = if r < REQS - prefills { 1 } else { 1000 };
        let len = CONTEXT + q;
        let row: Vec<i32> = pool.split_off(pool.len() - len.div_ceil(BS));
        slots.extend((len - q..len).map(|pos| i64::from(row[pos / BS]) * BS as i64 + (pos % BS) as i64));
        qsl.push(slots.len() as i32);
        seq_lens.push(len as i32);
        rows.push(row);
    }
    AttentionMetadata::new(qsl, seq_lens, BlockTable::from_rows(&rows), SlotMapping::new(slots), 1)
}

fn main() -> attention_backend::Result<()> {
    let reps: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000).max(1);
    let layout = CacheLayout::new(NUM_BLOCKS, BS, 8, 128)?;
    let mut pool: Vec<i32> = (0..NUM_BLOCKS as i32).collect();
    pool.shuffle(&mut rand::rng());
    let mut scratch = StepCheckScratch::new();
    for prefills in [8, 0] {
        let meta = step(&mut pool.clone(), prefills)?;
        let mut us: Vec<f64> = (0..reps)
            .map(|_| {
                let t = Instant::now();
                let checked = meta.check_against_with("bench", &layout, &mut scratch);
                (checked, t.elapsed().as_secs_f64() * 1e6)
            })
            .map(|(checked, t)| checked.map(|()| t))
            .collect::<attention_backend::Result<_>>()?;
        us.sort_by(f64::total_cmp);
        println!(
            "{:>3} requests, {:>5} tokens ({prefills} prefills): check {:.1} us median, {:.1} us p10",
            meta.num_reqs(),
            meta.num_tokens(),
            us[us.len() / 2],
            us[us.len() / 10]
        );
    }
    Ok(())
}
