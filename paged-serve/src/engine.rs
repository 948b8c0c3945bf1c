//! The serving loop: scheduler -> model runner -> per layer Q/K/V, KV-cache write and attention
//! through the backend -> next tokens -> scheduler.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use attention_backend::{AttentionParams, Backend, CacheLayout, Element, KvCache, KvScaleValues, KvStorage};
use indicatif::{ProgressBar, ProgressStyle};
use model_runner::{BlockPool, ModelRunner, RequestId, RunnerConfig, TokenId};
use ndarray::{ArrayViewD, Ix3};

use crate::cli::RunConfig;
use crate::model::{Proj, SyntheticModel};
use crate::scheduler::{Scheduler, StepPlan};
use crate::summary::Summary;
use crate::verify::{self, KvStore, LayerCheck, Tolerance};
use crate::workload::RequestSpec;
use crate::ServeError;

/// Consecutive steps that schedule nothing before the loop gives up (a scheduler bug; the
/// scheduler reports a real stall itself).
const MAX_EMPTY_STEPS: usize = 1000;

/// Runs the whole workload on `backend` with compute type `T` and KV-cache storage `C`.
///
/// # Errors
/// Backend, runner or scheduler failures, and [`ServeError::Verify`] on a verification mismatch.
pub(crate) fn serve<T: Element, C: KvStorage<T>>(
    cfg: &RunConfig,
    backend: Backend,
    requests: &[RequestSpec],
) -> Result<Summary, ServeError> {
    let mut engine = Engine::<T, C>::new(cfg, backend, requests)?;
    engine.run()?;
    Ok(engine.summary)
}

struct Engine<'a, T: Element, C: KvStorage<T>> {
    cfg: &'a RunConfig,
    backend: Backend,
    model: SyntheticModel,
    /// Per layer (windows alternate between layers in some models).
    params: Vec<AttentionParams>,
    caches: Vec<KvCache<C>>,
    runner: ModelRunner,
    /// Phantom use of the compute type (the caches name only their storage type).
    _compute: std::marker::PhantomData<T>,
    sched: Scheduler,
    summary: Summary,
}

impl<'a, T: Element, C: KvStorage<T>> Engine<'a, T, C> {
    /// Allocates one KV cache per layer, the runner and the scheduler.
    fn new(cfg: &'a RunConfig, backend: Backend, requests: &[RequestSpec]) -> Result<Self, ServeError> {
        let shape = cfg.shape;
        let layout = CacheLayout::new(cfg.num_blocks, cfg.block_size, shape.num_kv_heads, shape.head_size)?;
        let mut caches = (0..shape.num_layers).map(|_| backend.kv_cache::<C>(layout)).collect::<Result<Vec<_>, _>>()?;
        if C::QUANTISED {
            for cache in &mut caches {
                cache.set_scales(Some(KvScaleValues::per_tensor(cfg.kv_scale, cfg.kv_scale)))?;
            }
        }
        let max_model_len = requests.iter().map(RequestSpec::max_len).max().unwrap_or(1);
        let runner = ModelRunner::new(
            RunnerConfig::for_layout(&layout)
                // More rows than requests would never be used.
                .with_max_num_reqs(cfg.scheduler.max_num_seqs.min(requests.len()).max(1))
                .with_max_num_batched_tokens(cfg.scheduler.max_num_batched_tokens)
                .with_max_model_len(max_model_len),
        )?;
        let pool = BlockPool::new(cfg.num_blocks, cfg.block_size)?;
        Ok(Engine {
            cfg,
            model: SyntheticModel::new(shape, cfg.seed),
            params: (0..shape.num_layers).map(|l| cfg.attention.layer_params(&shape, l)).collect(),
            backend,
            caches,
            runner,
            _compute: std::marker::PhantomData,
            sched: Scheduler::new(cfg.scheduler, pool, requests),
            summary: Summary::default(),
        })
    }

    fn run(&mut self) -> Result<(), ServeError> {
        let bar = progress_bar(self.cfg, &self.sched);
        let start = Instant::now();
        let mut empty_steps = 0;
        while !self.sched.is_done() {
            if self.run_step()? {
                empty_steps = 0;
            } else {
                empty_steps += 1;
                if empty_steps > MAX_EMPTY_STEPS {
                    return Err(ServeError::Internal(format!("no work scheduled for {MAX_EMPTY_STEPS} steps")));
                }
            }
            update_bar(&bar, start, &self.sched, self.summary.steps);
        }
        bar.finish_and_clear();
        finish_summary(&mut self.summary, self.cfg, &self.sched, self.backend.name(), start.elapsed());
        if !self.runner.batch().is_empty() {
            return Err(ServeError::Internal(format!(
                "{} requests left in the model runner's batch after the run",
                self.runner.batch().len()
            )));
        }
        Ok(())
    }

    /// Schedules and runs one step; false when nothing was scheduled.
    fn run_step(&mut self) -> Result<bool, ServeError> {
        let t0 = Instant::now();
        let plan = self.sched.schedule()?;
        apply_to_runner(&mut self.runner, &plan)?;
        if plan.scheduled.is_empty() {
            return Ok(false);
        }
        let mut schedule = t0.elapsed();
        let sampled = self.step(&plan, &mut schedule)?;
        let t1 = Instant::now();
        let finished = self.sched.update(&plan, |id| sampled.get(&id).copied().unwrap_or(0))?;
        for id in finished {
            self.runner.remove_request(id)?;
        }
        self.summary.step_schedule.push(schedule + t1.elapsed());
        Ok(true)
    }

    /// Runs one step through every layer; returns the next token of each request's last row.
    /// Adds its input preparation to `schedule` and records the other phases.
    fn step(&mut self, plan: &StepPlan, schedule: &mut Duration) -> Result<HashMap<RequestId, TokenId>, ServeError> {
        let t0 = Instant::now();
        let inputs = self.runner.prepare_inputs(&plan.scheduled)?;
        let req_ids = inputs.req_ids.clone();
        let positions = inputs.positions.clone();
        let t1 = Instant::now();
        let step_meta = self.backend.prepare_step(inputs.metadata)?;
        let meta = step_meta.host();
        self.summary.step_plan.push(t1.elapsed());
        let t2 = Instant::now();
        let num_tokens = meta.num_tokens();

        // Token ids in the runner's row order (decodes first).
        let mut tokens: Vec<TokenId> = Vec::with_capacity(num_tokens);
        for (r, &id) in req_ids.iter().enumerate() {
            let req = self.sched.request(id).ok_or_else(|| ServeError::Internal(format!("unknown request {id}")))?;
            let (a, b) = (meta.query_start_loc[r] as usize, meta.query_start_loc[r + 1] as usize);
            tokens.extend(positions[a..b].iter().map(|&p| req.tokens[p as usize]));
        }
        *schedule += (t1 - t0) + t2.elapsed();

        let shape = self.cfg.shape;
        let step_no = self.summary.steps as u64 + 1;
        let verify_layers: &[usize] = match &self.cfg.verify {
            Some((every, layers)) if (step_no - 1).is_multiple_of(*every) => layers,
            _ => &[],
        };
        let mut out = self.backend.zeros::<T>(&[num_tokens, shape.num_heads, shape.head_size])?;
        let (mut attention, mut model, mut sampling) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let mut sampled = HashMap::with_capacity(req_ids.len());
        for layer in 0..shape.num_layers {
            let tm = Instant::now();
            let q = self.model.project::<T>(Proj::Q, layer, &tokens, &positions);
            let k = self.model.project::<T>(Proj::K, layer, &tokens, &positions);
            let v = self.model.project::<T>(Proj::V, layer, &tokens, &positions);
            model += tm.elapsed();
            let verified_q = verify_layers.contains(&layer).then(|| q.clone());
            let (q, k, v) = (self.backend.tensor(q)?, self.backend.tensor(k)?, self.backend.tensor(v)?);
            // Time the cache write and the attention only, not the uploads.
            self.backend.synchronize()?;
            let t0 = Instant::now();
            let params = &self.params[layer];
            self.backend.forward(
                &step_meta,
                params,
                attention_backend::ForwardTensors {
                    query: &q,
                    key: &k,
                    value: &v,
                    cache: &mut self.caches[layer],
                    out: &mut out,
                    lse: None,
                },
            )?;
            self.backend.synchronize()?;
            attention += t0.elapsed();

            if let Some(q) = verified_q {
                let host = self.backend.to_host(&out)?;
                let check = LayerCheck {
                    step: step_no,
                    layer,
                    meta,
                    req_ids: &req_ids,
                    query: q.view(),
                    out: as_3d(host.view())?,
                    kv: KvStore::new(self.cfg.kv_cache_dtype, self.cfg.kv_scale),
                };
                let sched = &self.sched;
                let err = verify::check_layer(
                    &self.model,
                    &self.params[layer],
                    Tolerance::for_dtype(T::DTYPE),
                    self.cfg.verify_sample,
                    &check,
                    |id| sched.request(id).map_or(&[][..], |r| &r.tokens[..]),
                )
                .map_err(ServeError::Verify)?;
                self.summary.verified_layer_steps += 1;
                self.summary.verify_max_abs_err = self.summary.verify_max_abs_err.max(err);
            }
            if layer + 1 == shape.num_layers {
                let ts = Instant::now();
                let host = self.backend.to_host(&out)?;
                let out3 = as_3d(host.view())?;
                for (r, &id) in req_ids.iter().enumerate() {
                    let last = meta.query_start_loc[r + 1] as usize - 1;
                    sampled.insert(id, self.model.next_token(out3.index_axis(ndarray::Axis(0), last)));
                }
                sampling += ts.elapsed();
            }
        }

        self.summary.steps += 1;
        self.summary.step_attention.push(attention);
        self.summary.step_model.push(model);
        self.summary.step_sampling.push(sampling);
        self.summary.kv_read_bytes = self.summary.kv_read_bytes.saturating_add(kv_read_bytes(self.cfg, &meta.seq_lens));
        Ok(sampled)
    }
}

/// The progress bar of a run (hidden without `progress`).
pub(crate) fn progress_bar(cfg: &RunConfig, sched: &Scheduler) -> ProgressBar {
    let n = sched.requests().len() as u64;
    if !cfg.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(n);
    let style = ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} requests | {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar
}

pub(crate) fn update_bar(bar: &ProgressBar, start: Instant, sched: &Scheduler, steps: usize) {
    if bar.is_hidden() {
        return;
    }
    let st = sched.stats();
    let tokens = st.prompt_tokens_computed + st.output_tokens_computed;
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    let pool = sched.pool();
    bar.set_position(sched.num_finished() as u64);
    bar.set_message(format!(
        "{:.0} tok/s | cache {}/{} blocks ({:.0}%) | running {} waiting {} | step {}",
        tokens as f64 / secs,
        sched.blocks_used(),
        pool.num_blocks(),
        100.0 * sched.blocks_used() as f64 / pool.num_blocks() as f64,
        sched.num_running(),
        sched.num_waiting(),
        steps
    ));
}

/// A digest of every request's generated tokens, in request order: two runs of one workload
/// generated the same text exactly when their digests match (the batch-invariance check of
/// `--batch-invariant`).
fn tokens_digest(reqs: &[crate::scheduler::Request]) -> u64 {
    reqs.iter().fold(0x9e37_79b9_7f4a_7c15, |h, r| {
        r.tokens[r.prompt_len.min(r.tokens.len())..]
            .iter()
            .fold(crate::workload::mix64(h ^ r.tokens.len() as u64), |h, &t| crate::workload::mix64(h ^ u64::from(t)))
    })
}

/// Fills the summary's configuration, scheduler statistics and wall time at the end of a run.
pub(crate) fn finish_summary(s: &mut Summary, cfg: &RunConfig, sched: &Scheduler, device: String, wall: Duration) {
    let st = *sched.stats();
    let reqs = sched.requests();
    s.device = device;
    s.dtype = cfg.dtype.to_string();
    s.kv_cache_dtype = crate::cli::describe_kv_cache(cfg);
    s.model = cfg.model.map(str::to_string);
    s.attention = cfg.attention.describe();
    s.num_layers = cfg.shape.num_layers;
    s.num_heads = cfg.shape.num_heads;
    s.num_kv_heads = cfg.shape.num_kv_heads;
    s.head_size = cfg.shape.head_size;
    s.block_size = cfg.block_size;
    s.num_blocks = cfg.num_blocks;
    s.requests = reqs.len();
    s.requests_finished = sched.num_finished();
    s.prompt_tokens = reqs.iter().map(|r| r.prompt_len).sum();
    s.generated_tokens = reqs.iter().map(|r| r.num_generated()).sum();
    s.tokens_digest = tokens_digest(reqs);
    s.prompt_tokens_computed = st.prompt_tokens_computed;
    s.output_tokens_computed = st.output_tokens_computed;
    s.prefix_hit_requests = st.prefix_hit_requests;
    s.prefix_hit_tokens = st.prefix_hit_tokens;
    s.preemptions = st.preemptions;
    s.peak_blocks_used = st.peak_blocks_used;
    s.blocks_returned = sched.pool().num_free_blocks();
    s.wall = wall;
}

/// Mirrors the scheduler's decisions in the persistent batch.
pub(crate) fn apply_to_runner(runner: &mut ModelRunner, plan: &StepPlan) -> Result<(), ServeError> {
    for &id in &plan.removed {
        runner.remove_request(id)?;
    }
    for (id, prompt_len, blocks) in &plan.added {
        runner.add_request(*id, *prompt_len, blocks)?;
    }
    for (id, blocks) in &plan.appended {
        runner.append_blocks(*id, blocks)?;
    }
    Ok(())
}

/// K/V bytes one step's attention reads (every layer, both caches), saturating: a statistic must
/// not be able to panic a run.
pub(crate) fn kv_read_bytes(cfg: &RunConfig, seq_lens: &[i32]) -> u64 {
    let shape = cfg.shape;
    let kv_row_bytes = (2 * shape.num_kv_heads * shape.head_size * cfg.kv_cache_dtype.size_in_bytes()) as u64;
    let keys: u64 = seq_lens.iter().map(|&s| u64::from(s.unsigned_abs())).fold(0, u64::saturating_add);
    keys.saturating_mul(kv_row_bytes).saturating_mul(shape.num_layers as u64)
}

fn as_3d<T>(a: ArrayViewD<'_, T>) -> Result<ndarray::ArrayView3<'_, T>, ServeError> {
    a.into_dimensionality::<Ix3>().map_err(|_| ServeError::Internal("attention output is not 3-D".into()))
}

#[cfg(test)]
mod tests {
    use attention_backend::DeviceRequest;
    use clap::Parser;

    use super::*;
    use crate::cli::Cli;
    use crate::workload;

    /// A corrupted cache block must fail verification loudly, naming step, layer and request:
    /// the check really reads what the backend produced, not a copy of the reference.
    #[test]
    fn a_corrupted_cache_fails_verification() {
        let args = [
            "paged-serve",
            "--layers",
            "2",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--head-size",
            "16",
            "--requests",
            "2",
            "--prompt-len",
            "20",
            "--output-len",
            "8",
            "--arrival-rate",
            "inf",
            "--shared-prefix",
            "0",
            "--verify",
            "--verify-every",
            "1",
        ];
        let cfg =
            Cli::try_parse_from(args).unwrap().resolve(DeviceRequest::Cpu, attention_backend::Device::Cpu).unwrap();
        let requests = workload::build(&cfg.workload, cfg.sharing, cfg.seed).unwrap();
        let mut engine = Engine::<f32, f32>::new(&cfg, Backend::cpu(), &requests).unwrap();
        assert!(engine.run_step().unwrap(), "the first step prefills");
        // Overwrite the values of layer 1's first used block (request 0's first tokens).
        let block = engine.sched.request(RequestId(0)).unwrap().blocks[0] as usize;
        let (_, mut value) = engine.caches[1].as_cpu_mut().unwrap().key_value_mut();
        value.index_axis_mut(ndarray::Axis(0), block).fill(3.0);
        let err = engine.run_step().unwrap_err().to_string();
        assert!(err.starts_with("verification failed at step 2, layer 1, request #0"), "{err}");
        assert!(err.contains("max abs error"), "{err}");
    }
}
