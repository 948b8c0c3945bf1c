//! A small Llama-style decoder on candle whose attention runs on paged-attention-rs, checked
//! against the same model on candle's dense attention.
//!
//! Four requests of different prompt lengths arrive over the first steps; a scheduler with a token
//! budget per step runs decodes first, then prompt chunks (so the long prompt is a chunked
//! prefill), until every request has decoded for at least 50 steps. Each step runs twice on the
//! same weights and tokens: once with the KV write and paged attention of `attention-backend` on a
//! paged cache of candle tensors (blocks handed out in shuffled order), once with causal attention
//! written with candle ops over each request's dense K/V history. The next token of each request is
//! the reference's greedy choice, fed to both. It prints the largest logit difference per step and
//! overall and fails when it passes the bound.

mod dense;
mod model;
mod paged;

use std::process::ExitCode;

use attention_backend::cuda::{CudaDevice, PlannerConfig, StepPlanner};
use attention_backend::{AttentionMetadata, AttentionParams, BlockTable, CacheLayout, SlotMapping};
use candle_core::{DType, Device, Error, Result, Tensor, D};

use dense::{DenseCache, Piece};
use model::{Config, Model, Rng};

const CONFIG: Config = Config {
    vocab: 1024,
    layers: 3,
    num_heads: 8,
    num_kv_heads: 2,
    head_size: 128,
    intermediate: 2048,
    max_position: 512,
    rope_theta: 10_000.0,
    rms_eps: 1e-5,
};
const BLOCK_SIZE: usize = 16;
const NUM_BLOCKS: usize = 256;
const MAX_BLOCKS_PER_REQ: usize = CONFIG.max_position / BLOCK_SIZE;
/// Tokens per step: the 300-token prompt needs three steps (chunked prefill).
const TOKEN_BUDGET: usize = 128;
/// `(arrival step, prompt length)` of each request.
const REQUESTS: [(usize, usize); 4] = [(0, 37), (0, 300), (1, 64), (2, 5)];
const STEPS: usize = 60;
const MIN_DECODE_STEPS: usize = 50;
/// Logits are of order one (unit-RMS hidden state, weights of variance 1 / fan-in); bf16 rounds
/// them to about 0.01, and the two attentions round differently (the kernels feed bf16
/// probabilities to the tensor cores, the reference stays in f32), which the three layers carry
/// on. A wrong position, block or slot moves logits by order one.
const MAX_ABS_BOUND: f32 = 0.25;
const MEAN_ABS_BOUND: f32 = 0.02;

struct Request {
    arrival: usize,
    prompt_len: usize,
    /// Prompt, then every generated token.
    tokens: Vec<u32>,
    /// Tokens whose keys and values are in the caches.
    computed: usize,
    blocks: Vec<i32>,
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("candle-decoder: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool> {
    let dev = Device::new_cuda(0)?;
    // Our planner enqueues on candle's own stream, so candle's ops and our kernels are ordered.
    let ours = CudaDevice::from_stream(dev.as_cuda_device()?.cuda_stream());
    println!("device: {}", ours.name());
    let cfg = CONFIG;
    let model = Model::random(cfg, 0x5eed, &dev)?;
    let params = AttentionParams::new(cfg.num_heads, cfg.num_kv_heads, cfg.head_size);
    let layout = CacheLayout::new(NUM_BLOCKS, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_size).map_err(Error::wrap)?;
    let mut planner = StepPlanner::new(
        &ours,
        PlannerConfig {
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_size: cfg.head_size,
            layout,
            max_num_reqs: REQUESTS.len(),
            max_num_tokens: TOKEN_BUDGET,
            max_blocks_per_req: MAX_BLOCKS_PER_REQ,
        },
    )
    .map_err(Error::wrap)?;
    // One candle tensor per layer, `[2, num_blocks, block_size, kv_heads, head_size]` (keys, then
    // values, as vLLM's FlashAttention backend lays them out).
    let caches: Vec<Tensor> = (0..cfg.layers)
        .map(|_| Tensor::zeros((2, NUM_BLOCKS, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_size), DType::BF16, &dev))
        .collect::<Result<_>>()?;
    let mut dense = DenseCache::new(cfg.layers, REQUESTS.len());

    let mut rng = Rng::new(7);
    let mut free: Vec<i32> = (0..NUM_BLOCKS as i32).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, rng.below(i + 1));
    }
    let mut reqs: Vec<Request> = REQUESTS
        .iter()
        .map(|&(arrival, prompt_len)| Request {
            arrival,
            prompt_len,
            tokens: (0..prompt_len).map(|_| rng.below(cfg.vocab) as u32).collect(),
            computed: 0,
            blocks: Vec::new(),
        })
        .collect();

    let (mut worst, mut sum_abs, mut count) = (0f32, 0f64, 0usize);
    let (mut decode_steps, mut chunked_steps) = (0usize, 0usize);
    let mut ok = true;
    for step in 0..STEPS {
        // Decodes first (the metadata's order), then prompt chunks within the budget.
        let mut pieces = Vec::new();
        let mut budget = TOKEN_BUDGET;
        let mut row = 0;
        let decoding = |r: &Request| r.computed >= r.prompt_len;
        let order: Vec<usize> = (0..reqs.len())
            .filter(|&i| reqs[i].arrival <= step && decoding(&reqs[i]))
            .chain((0..reqs.len()).filter(|&i| reqs[i].arrival <= step && !decoding(&reqs[i])))
            .collect();
        for i in order {
            let r = &reqs[i];
            let q_len = if decoding(r) { 1 } else { (r.prompt_len - r.computed).min(budget) };
            if q_len == 0 || q_len > budget {
                continue;
            }
            budget -= q_len;
            pieces.push(Piece { req: i, row, q_len, seq_len: r.computed + q_len });
            row += q_len;
        }
        let (mut tokens, mut positions, mut slots) = (Vec::new(), Vec::new(), Vec::new());
        let mut qsl = vec![0i32];
        let mut table = Vec::new();
        for p in &pieces {
            let r = &mut reqs[p.req];
            while r.blocks.len() * BLOCK_SIZE < p.seq_len {
                r.blocks.push(free.pop().ok_or_else(|| Error::Msg("block pool exhausted".into()))?);
            }
            for pos in r.computed..p.seq_len {
                tokens.push(r.tokens[pos]);
                positions.push(pos as u32);
                slots.push(i64::from(r.blocks[pos / BLOCK_SIZE]) * BLOCK_SIZE as i64 + (pos % BLOCK_SIZE) as i64);
            }
            qsl.push(tokens.len() as i32);
            table.push(r.blocks.clone());
        }
        let seq_lens = pieces.iter().map(|p| p.seq_len as i32).collect();
        let meta = AttentionMetadata::new(qsl, seq_lens, BlockTable::from_rows(&table), SlotMapping::new(slots), 1)
            .map_err(Error::wrap)?;

        // Plan once per step, run per layer on candle's buffers.
        let mut plan = planner.plan(&meta).map_err(Error::wrap)?;
        let launch = plan.launch();
        let paged_logits =
            model.forward(&tokens, &positions, |l, qkv| paged::attention(&mut plan, &params, qkv, &caches[l]))?;
        let dense_logits = model.forward(&tokens, &positions, |l, qkv| dense.attention(&cfg, l, qkv, &pieces))?;

        let diff = (&paged_logits - &dense_logits)?.abs()?;
        let step_max = diff.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let step_sum = diff.sum_all()?.to_scalar::<f32>()?;
        if !step_max.is_finite() {
            ok = false;
        }
        worst = worst.max(step_max);
        sum_abs += f64::from(step_sum);
        count += tokens.len() * cfg.vocab;

        let prefill = pieces.iter().any(|p| !(decoding(&reqs[p.req]) && p.q_len == 1));
        let chunked = pieces.iter().any(|p| p.q_len > 1 && p.seq_len > p.q_len);
        if chunked {
            chunked_steps += 1;
        }
        if !prefill {
            decode_steps += 1;
        }
        if prefill || step % 10 == 0 || step + 1 == STEPS {
            let kinds: Vec<String> =
                pieces.iter().map(|p| format!("r{}:{}+{}", p.req, p.seq_len - p.q_len, p.q_len)).collect();
            println!(
                "step {step:>2}: {:>3} tokens [{}] decode kernel {} req(s) x {} split(s): max |paged - dense| = {step_max:.4}",
                tokens.len(),
                kinds.join(" "),
                launch.decode_reqs,
                launch.num_splits,
            );
        }

        // Greedy next tokens from the reference, fed to both models.
        let next = dense_logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        for p in &pieces {
            let r = &mut reqs[p.req];
            r.computed = p.seq_len;
            if r.computed >= r.prompt_len {
                r.tokens.push(next[p.row + p.q_len - 1]);
            }
        }
    }
    let mean = (sum_abs / count.max(1) as f64) as f32;
    println!(
        "{STEPS} steps ({decode_steps} decode-only, {chunked_steps} with a chunked prefill), {} requests of {:?} prompt tokens, {} layers",
        REQUESTS.len(),
        REQUESTS.map(|r| r.1),
        cfg.layers
    );
    for (i, r) in reqs.iter().enumerate() {
        println!(
            "request {i}: {} tokens ({} generated) in {} blocks",
            r.tokens.len(),
            r.tokens.len() - r.prompt_len,
            r.blocks.len()
        );
    }
    println!(
        "logits: max |paged - dense| = {worst:.4} (bound {MAX_ABS_BOUND}), mean = {mean:.5} (bound {MEAN_ABS_BOUND})"
    );
    if decode_steps < MIN_DECODE_STEPS || chunked_steps == 0 {
        println!("FAIL: the schedule ran {decode_steps} decode-only steps and {chunked_steps} chunked prefills");
        ok = false;
    }
    if !(worst <= MAX_ABS_BOUND && mean <= MEAN_ABS_BOUND) {
        println!("FAIL: paged attention on candle's buffers differs from candle's dense attention");
        ok = false;
    }
    if ok {
        println!("PASS: paged attention on candle's buffers matches candle's dense attention");
    }
    Ok(ok)
}
