//! A two-layer toy engine step built only from the public API of `model-runner` and
//! `attention-backend`: block pool -> prepare_inputs -> forward, on the CPU, or on CUDA with the
//! `cuda` feature and a GPU (`PAGED_ATTN_DEVICE` chooses).
//!
//! It checks its own output: one decode token's attention is recomputed by hand from the K/V
//! it wrote, and the run fails if they disagree.

use attention_backend::ndarray::{Array3, ArrayD};
use attention_backend::{bf16, AttentionParams, Backend, CacheLayout};
use model_runner::{BlockPool, ModelRunner, RequestId, RunnerConfig, ScheduledRequest};

const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD: usize = 64;
const BLOCK: usize = 16;
const BLOCKS: usize = 32;

fn value(layer: usize, token: usize, head: usize, d: usize, salt: usize) -> f32 {
    let x = (layer * 7919 + token * 104_729 + head * 31 + d * 17 + salt * 13) % 1000;
    x as f32 / 500.0 - 1.0
}

fn projection(layer: usize, tokens: &[usize], heads: usize, salt: usize) -> Array3<bf16> {
    Array3::from_shape_fn((tokens.len(), heads, HEAD), |(t, h, d)| bf16::from_f32(value(layer, tokens[t], h, d, salt)))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let backend = Backend::from_env()?;
    println!("backend: {}", backend.name());
    let layout = CacheLayout::new(BLOCKS, BLOCK, KV_HEADS, HEAD)?;
    let params = AttentionParams::new(HEADS, KV_HEADS, HEAD);
    let mut caches = (0..LAYERS).map(|_| backend.kv_cache::<bf16>(layout)).collect::<Result<Vec<_>, _>>()?;

    let mut pool = BlockPool::new(BLOCKS, BLOCK)?;
    let mut runner = ModelRunner::new(RunnerConfig::new(BLOCK, BLOCKS))?;
    let (a, b) = (RequestId(1), RequestId(2));
    runner.add_request(a, 20, &pool.allocate(2)?)?; // 20-token prompt
    runner.add_request(b, 5, &pool.allocate(1)?)?; // 5-token prompt

    // Step 1: both prompts prefill. Step 2: both decode one token.
    let steps = [
        vec![ScheduledRequest::new(a, 0, 20), ScheduledRequest::new(b, 0, 5)],
        vec![ScheduledRequest::new(a, 20, 1), ScheduledRequest::new(b, 5, 1)],
    ];
    let mut last_out = None;
    for (s, step) in steps.iter().enumerate() {
        let inputs = runner.prepare_inputs(step)?;
        // Token identity for the toy projections: (request, position) packed into one number.
        let ids: Vec<usize> = (0..inputs.num_actual_tokens())
            .map(|t| {
                let r = inputs.metadata.query_start_loc.iter().rposition(|&q| q as usize <= t).unwrap_or(0);
                inputs.req_ids[r].0 as usize * 10_000 + inputs.positions[t] as usize
            })
            .collect();
        let meta = backend.prepare_step(inputs.metadata.clone())?;
        for (layer, cache) in caches.iter_mut().enumerate() {
            let q = backend.tensor(projection(layer, &ids, HEADS, 0))?;
            let k = backend.tensor(projection(layer, &ids, KV_HEADS, 1))?;
            let v = backend.tensor(projection(layer, &ids, KV_HEADS, 2))?;
            let mut out = backend.zeros::<bf16>(&[ids.len(), HEADS, HEAD])?;
            backend.forward(
                &meta,
                &params,
                attention_backend::ForwardTensors { query: &q, key: &k, value: &v, cache, out: &mut out, lse: None },
            )?;
            if layer == LAYERS - 1 {
                last_out = Some((backend.to_host(&out)?, inputs.req_ids.clone()));
            }
        }
        println!("step {}: {} tokens, {} decodes, {} prefills", s + 1, ids.len(), inputs.metadata.num_decodes, inputs.metadata.num_prefills);
    }

    // Check request a's decode token (position 20, attending to positions 0..=20), head 3, by hand.
    let (out, order): (ArrayD<bf16>, Vec<RequestId>) = last_out.ok_or("no output")?;
    let row = order.iter().position(|&r| r == a).ok_or("request a not in the last step")?;
    let (layer, head, kv_head) = (LAYERS - 1, 3, 3 / (HEADS / KV_HEADS));
    let round = |x: f32| bf16::from_f32(x).to_f32();
    let q: Vec<f32> = (0..HEAD).map(|d| round(value(layer, 10_020, head, d, 0))).collect();
    let scores: Vec<f64> = (0..=20)
        .map(|p| {
            let dot: f32 = (0..HEAD).map(|d| q[d] * round(value(layer, 10_000 + p, kv_head, d, 1))).sum();
            f64::from(dot * params.scale)
        })
        .collect();
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut worst = 0.0f64;
    for d in 0..HEAD {
        let expected: f64 = (0..=20)
            .map(|p| weights[p] / total * f64::from(round(value(layer, 10_000 + p, kv_head, d, 2))))
            .sum();
        worst = worst.max((f64::from(out[[row, head, d]].to_f32()) - expected).abs());
    }
    println!("decode output vs hand recomputation: max abs error {worst:.2e}");
    if worst > 2e-2 {
        return Err(format!("attention output differs from the recomputation by {worst}").into());
    }
    pool.free(&runner.remove_request(a)?)?;
    pool.free(&runner.remove_request(b)?)?;
    println!("ok: {} free blocks of {BLOCKS}", pool.num_free_blocks());
    Ok(())
}
