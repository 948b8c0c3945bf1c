//! Micro-benchmark of `prepare_inputs`: 256 requests, 8192 tokens (224 decodes with 1-4k tokens of
//! context, 32 prefill chunks of 249 tokens), block size 16, full-width block table (4096-token
//! requests). Prints the median, 10th and 90th percentile over many steps, in microseconds.
//!
//! ```text
//! cargo run --release -p model-runner --example prepare_inputs_bench
//! ```

use std::hint::black_box;
use std::time::Instant;

use model_runner::{ModelRunner, RequestId, RunnerConfig, ScheduledRequest};

const BLOCK_SIZE: usize = 16;
const MAX_MODEL_LEN: usize = 4096;
const NUM_REQS: usize = 256;
const NUM_DECODES: usize = 224;
const PREFILL_CHUNK: usize = (8192 - NUM_DECODES) / (NUM_REQS - NUM_DECODES); // 249
const ITERS: usize = 2000;

fn main() -> Result<(), model_runner::RunnerError> {
    let max_blocks = MAX_MODEL_LEN / BLOCK_SIZE;
    let num_blocks = NUM_REQS * max_blocks;
    let cfg = RunnerConfig::new(BLOCK_SIZE, num_blocks)
        .with_max_num_reqs(NUM_REQS)
        .with_max_model_len(MAX_MODEL_LEN)
        .with_max_num_batched_tokens(8192);
    let mut runner = ModelRunner::new(cfg)?;

    // Scatter block ids (a multiplicative permutation) so slots are not trivially sequential.
    let block_of = |i: usize| ((i * 7919) % num_blocks) as u32;
    let mut step = Vec::with_capacity(NUM_REQS);
    for r in 0..NUM_REQS {
        // Interleave decodes and prefills in the step so the first call really reorders.
        let is_prefill = r % 8 == 7;
        let (computed, scheduled) =
            if is_prefill { ((r % 5) * 300, PREFILL_CHUNK) } else { (1000 + (r * 37) % 3000, 1) };
        let needed = (computed + scheduled).div_ceil(BLOCK_SIZE);
        let blocks: Vec<u32> = (0..needed).map(|j| block_of(r * max_blocks + j)).collect();
        runner.add_request(RequestId(r as u64), computed + scheduled, &blocks)?;
        step.push(ScheduledRequest::new(r as u64, computed, scheduled));
    }

    let t = Instant::now();
    let first = runner.prepare_inputs(&step)?;
    let first_us = t.elapsed().as_secs_f64() * 1e6;
    assert_eq!(first.num_actual_tokens(), NUM_DECODES + (NUM_REQS - NUM_DECODES) * PREFILL_CHUNK);
    assert_eq!(first.metadata.num_decodes, NUM_DECODES);

    let mut times = Vec::with_capacity(ITERS);
    for _ in 0..ITERS {
        let t = Instant::now();
        let inputs = runner.prepare_inputs(black_box(&step))?;
        black_box(&inputs);
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    let pct = |p: usize| times[(times.len() - 1) * p / 100];
    println!(
        "prepare_inputs: {NUM_REQS} requests, {} tokens ({NUM_DECODES} decodes + {} prefills of {PREFILL_CHUNK}), \
         block table {NUM_REQS}x{max_blocks}",
        first.num_actual_tokens(),
        NUM_REQS - NUM_DECODES
    );
    println!(
        "median {:.1} us  (p10 {:.1} us, p90 {:.1} us, {ITERS} iterations; first call with reorder {first_us:.1} us)",
        pct(50),
        pct(10),
        pct(90)
    );
    Ok(())
}
