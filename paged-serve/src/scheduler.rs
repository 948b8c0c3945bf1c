//! A continuous-batching scheduler in the style of vLLM v1: a token budget per step, chunked
//! prefill, decodes first, KV blocks from [`BlockPool`] as sequences grow, preemption by
//! recomputation, and prefix caching.
//!
//! Every step ([`Scheduler::schedule`]):
//!
//! 1. Requests whose arrival step has come join the **waiting** queue (FIFO).
//! 2. **Running decodes**, in admission order: one token each. They go first so that a burst of
//!    long prompts never stalls generation (the inter-token latency users see).
//! 3. **Running prefills** (prompts still being chunked, or recomputations after a preemption): as
//!    many tokens as the budget leaves.
//! 4. **Waiting requests**, oldest first, while the budget, `max_num_seqs` and free blocks allow and
//!    nothing was preempted this step (as vLLM: a step that had to preempt is short of memory, so
//!    it admits nobody). A request that does not fit stops admission, so a long prompt is never
//!    overtaken forever by short ones behind it. With prefix caching, the longest cached prefix of
//!    its tokens (whole blocks, never the last token) is taken from the pool instead of computed.
//!
//! A running request that needs a block when none is free **preempts** the running request
//! admitted last that is not yet scheduled this step (possibly itself): its blocks go back to the
//! pool, its computed-token count is reset to 0 and it goes to the *front* of the waiting queue,
//! keeping the tokens it generated; when admitted again it recomputes prompt and output as one
//! prefill (vLLM's recompute preemption). Since the run checks that the largest request fits the
//! cache alone, some request always makes progress and every request finishes.
//!
//! After the model ran, [`Scheduler::update`] advances each request, appends the sampled token of
//! each request whose known tokens are all computed, registers newly full blocks in the prefix
//! cache, and frees the blocks of finished requests.
//!
//! The scheduler does not touch the model runner; [`StepPlan`] says what changed (requests to drop
//! from the persistent batch, to add, blocks appended) so the caller can mirror it, and so the
//! scheduler can be tested on its own.

use std::collections::VecDeque;

use model_runner::{BlockId, BlockPool, RequestId, RunnerError, ScheduledRequest, TokenId};

use crate::workload::RequestSpec;

/// The scheduler's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Tokens one step may compute (vLLM's `max_num_batched_tokens`).
    pub max_num_batched_tokens: usize,
    /// Requests running at once (vLLM's `max_num_seqs`).
    pub max_num_seqs: usize,
    /// Reuse cached full blocks of earlier requests' prefixes.
    pub enable_prefix_caching: bool,
}

/// Where a request is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Not arrived yet.
    Pending,
    /// Arrived (or preempted), waiting for admission.
    Waiting,
    /// Admitted: holds blocks and a row of the persistent batch.
    Running,
    /// Generated all its tokens; its blocks are free.
    Finished,
}

/// A request's state.
#[derive(Clone, Debug)]
pub struct Request {
    /// Arrival step.
    pub arrival_step: u64,
    /// Prompt tokens.
    pub prompt_len: usize,
    /// Tokens to generate.
    pub output_len: usize,
    /// Prompt followed by the tokens generated so far.
    pub tokens: Vec<TokenId>,
    /// Tokens whose K/V are in the cache (a prefix of `tokens`).
    pub num_computed: usize,
    /// Blocks held, in order (covering at least `num_computed` tokens).
    pub blocks: Vec<BlockId>,
    /// State.
    pub status: Status,
    /// Times it was preempted.
    pub num_preemptions: usize,
    /// Step of its first admission.
    pub first_scheduled_step: Option<u64>,
    /// Step at which it finished.
    pub finished_step: Option<u64>,
}

impl Request {
    /// Generated tokens so far.
    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens known but not yet computed: 1 for a decode, more for a prefill.
    pub fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }
}

/// What one step schedules, and the changes to mirror in the model runner, in this order:
/// `removed`, then `added`, then `appended`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// The step number (1-based).
    pub step: u64,
    /// Requests preempted this step: drop them from the persistent batch.
    pub removed: Vec<RequestId>,
    /// Requests admitted this step: (id, prompt length, blocks).
    pub added: Vec<(RequestId, usize, Vec<BlockId>)>,
    /// Blocks appended to running requests.
    pub appended: Vec<(RequestId, Vec<BlockId>)>,
    /// The step's work: running decodes, then running prefills, then admitted requests.
    pub scheduled: Vec<ScheduledRequest>,
}

impl StepPlan {
    /// Tokens scheduled.
    pub fn num_tokens(&self) -> usize {
        self.scheduled.iter().map(|s| s.num_scheduled_tokens).sum()
    }
}

/// Counters of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Preemptions (a request preempted twice counts twice).
    pub preemptions: usize,
    /// Admissions that found a cached prefix.
    pub prefix_hit_requests: usize,
    /// Tokens found in the prefix cache instead of computed.
    pub prefix_hit_tokens: usize,
    /// Most blocks in use (referenced) after any step's scheduling.
    pub peak_blocks_used: usize,
    /// Tokens computed at prompt positions (recomputation after preemption included).
    pub prompt_tokens_computed: usize,
    /// Tokens computed at output positions (decodes, and recomputation after preemption).
    pub output_tokens_computed: usize,
}

/// A scheduler error: always a bug (the pool refusing a free the scheduler thinks is valid), or a
/// workload that cannot run (checked up front by the caller).
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// The block pool refused an operation.
    #[error("block pool: {0}")]
    Pool(#[from] RunnerError),
    /// The step counter would pass `u64::MAX` (a request arriving at the last representable
    /// step).
    #[error("the step counter overflowed (a request arrives at step u64::MAX?)")]
    StepOverflow,
    /// Nothing runs and the oldest waiting request cannot be admitted.
    #[error(
        "request {req} ({tokens} tokens) cannot be admitted into an empty cache of {num_blocks} blocks of {block_size}"
    )]
    Stalled {
        /// The request.
        req: RequestId,
        /// Its tokens.
        tokens: usize,
        /// Blocks in the cache.
        num_blocks: usize,
        /// Tokens per block.
        block_size: usize,
    },
}

/// The scheduler; see the [module docs](self).
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    pool: BlockPool,
    requests: Vec<Request>,
    /// Not yet arrived, by arrival step (then id).
    pending: VecDeque<usize>,
    waiting: VecDeque<usize>,
    /// Admission order (priority: earlier is more important).
    running: Vec<usize>,
    /// Per request: the last step that scheduled it.
    scheduled_in: Vec<u64>,
    step: u64,
    num_finished: usize,
    stats: SchedulerStats,
}

impl Scheduler {
    /// A scheduler for `specs` (request `i` gets id `i`, whatever `specs[i].id` says) over `pool`.
    pub fn new(config: SchedulerConfig, pool: BlockPool, specs: &[RequestSpec]) -> Self {
        let requests: Vec<Request> = specs
            .iter()
            .map(|s| Request {
                arrival_step: s.arrival_step,
                prompt_len: s.prompt.len(),
                output_len: s.output_len,
                tokens: s.prompt.clone(),
                num_computed: 0,
                blocks: Vec::new(),
                status: Status::Pending,
                num_preemptions: 0,
                first_scheduled_step: None,
                finished_step: None,
            })
            .collect();
        let mut pending: Vec<usize> = (0..requests.len()).collect();
        pending.sort_by_key(|&i| (requests[i].arrival_step, i));
        Scheduler {
            config,
            pool,
            scheduled_in: vec![0; requests.len()],
            requests,
            pending: pending.into(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            step: 0,
            num_finished: 0,
            stats: SchedulerStats::default(),
        }
    }

    /// The limits.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The block pool.
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// All requests, by id.
    pub fn requests(&self) -> &[Request] {
        &self.requests
    }

    /// One request.
    pub fn request(&self, id: RequestId) -> Option<&Request> {
        self.requests.get(id.0 as usize)
    }

    /// Counters so far.
    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    /// The last step scheduled (0 before the first).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Requests finished.
    pub fn num_finished(&self) -> usize {
        self.num_finished
    }

    /// Requests running.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Requests arrived and waiting.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Blocks referenced now.
    pub fn blocks_used(&self) -> usize {
        self.pool.num_blocks() - self.pool.num_free_blocks()
    }

    /// Whether every request finished.
    pub fn is_done(&self) -> bool {
        self.num_finished == self.requests.len()
    }

    fn block_size(&self) -> usize {
        self.pool.block_size()
    }

    /// Plans the next step. A plan with nothing scheduled means nothing has arrived yet; the
    /// step counter then jumps to the next arrival, so idle time costs no iterations.
    ///
    /// # Errors
    /// [`ScheduleError::Stalled`] when nothing runs and the oldest waiting request cannot be
    /// admitted (a cache smaller than one request); [`ScheduleError::Pool`] on a pool bug.
    pub fn schedule(&mut self) -> Result<StepPlan, ScheduleError> {
        // Arrivals are at most MAX_ARRIVAL_STEP (2^53) and a run has far fewer than 2^63 steps,
        // so this cannot fail on a workload the CLI accepts; a library caller with a request
        // arriving at u64::MAX gets an error instead of an overflow.
        self.step = self.step.checked_add(1).ok_or(ScheduleError::StepOverflow)?;
        if self.running.is_empty() && self.waiting.is_empty() {
            // Idle: jump to the next arrival.
            if let Some(&next) = self.pending.front() {
                self.step = self.step.max(self.requests[next].arrival_step);
            }
        }
        let step = self.step;
        while let Some(&i) = self.pending.front() {
            if self.requests[i].arrival_step > step {
                break;
            }
            self.pending.pop_front();
            self.requests[i].status = Status::Waiting;
            self.waiting.push_back(i);
        }

        let mut plan = StepPlan { step, ..StepPlan::default() };
        let mut budget = self.config.max_num_batched_tokens;

        // Running decodes first, then running prefills, each in admission order.
        let order: Vec<usize> = {
            let (decodes, prefills): (Vec<usize>, Vec<usize>) =
                self.running.iter().partition(|&&i| self.requests[i].num_uncomputed() == 1);
            decodes.into_iter().chain(prefills).collect()
        };
        for i in order {
            if budget == 0 {
                break;
            }
            if self.requests[i].status != Status::Running {
                continue; // preempted earlier in this step
            }
            let num_new = self.requests[i].num_uncomputed().min(budget);
            if let Some(new_blocks) = self.grow_or_preempt(i, num_new, &mut plan)? {
                if !new_blocks.is_empty() {
                    plan.appended.push((RequestId(i as u64), new_blocks));
                }
                self.mark_scheduled(i, num_new, &mut plan);
                budget -= num_new;
            }
        }

        if plan.removed.is_empty() {
            self.admit_waiting(&mut budget, &mut plan)?;
        }
        if plan.scheduled.is_empty() && self.running.is_empty() {
            if let Some(&i) = self.waiting.front() {
                let r = &self.requests[i];
                return Err(ScheduleError::Stalled {
                    req: RequestId(i as u64),
                    tokens: r.tokens.len(),
                    num_blocks: self.pool.num_blocks(),
                    block_size: self.block_size(),
                });
            }
        }
        self.stats.peak_blocks_used = self.stats.peak_blocks_used.max(self.blocks_used());
        Ok(plan)
    }

    /// Gives running request `i` the blocks for `num_new` more tokens, preempting lower-priority
    /// requests while the pool is short. Returns the new blocks, or `None` when `i` itself was
    /// preempted.
    fn grow_or_preempt(
        &mut self,
        i: usize,
        num_new: usize,
        plan: &mut StepPlan,
    ) -> Result<Option<Vec<BlockId>>, ScheduleError> {
        let bs = self.block_size();
        loop {
            let r = &self.requests[i];
            let need = (r.num_computed + num_new).div_ceil(bs).saturating_sub(r.blocks.len());
            if need <= self.pool.num_free_blocks() {
                let blocks = self.pool.allocate(need)?;
                self.requests[i].blocks.extend_from_slice(&blocks);
                return Ok(Some(blocks));
            }
            // The lowest-priority running request not yet scheduled this step (`i` is a candidate).
            let victim = self.running.iter().rev().copied().find(|&v| self.scheduled_in[v] != self.step).unwrap_or(i);
            self.preempt(victim, plan)?;
            if victim == i {
                return Ok(None);
            }
        }
    }

    /// Frees a running request's blocks and sends it to the front of the waiting queue.
    fn preempt(&mut self, i: usize, plan: &mut StepPlan) -> Result<(), ScheduleError> {
        self.running.retain(|&r| r != i);
        let r = &mut self.requests[i];
        self.pool.free(&r.blocks)?;
        r.blocks.clear();
        r.num_computed = 0;
        r.status = Status::Waiting;
        r.num_preemptions += 1;
        self.stats.preemptions += 1;
        self.waiting.push_front(i);
        plan.removed.push(RequestId(i as u64));
        Ok(())
    }

    /// Admits waiting requests, oldest first, while they fit.
    fn admit_waiting(&mut self, budget: &mut usize, plan: &mut StepPlan) -> Result<(), ScheduleError> {
        let bs = self.block_size();
        while *budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(&i) = self.waiting.front() else { break };
            let r = &self.requests[i];
            // Never the last token: the model must run at least one token to sample the next.
            let cached = if self.config.enable_prefix_caching {
                self.pool.acquire_cached_prefix(&r.tokens[..r.tokens.len() - 1])
            } else {
                Vec::new()
            };
            let computed = cached.len() * bs;
            let num_new = (r.tokens.len() - computed).min(*budget);
            let need = (computed + num_new).div_ceil(bs) - cached.len();
            if need > self.pool.num_free_blocks() {
                self.pool.free(&cached)?;
                break;
            }
            let mut blocks = cached;
            blocks.extend(self.pool.allocate(need)?);
            if computed > 0 {
                self.stats.prefix_hit_requests += 1;
                self.stats.prefix_hit_tokens += computed;
            }
            self.waiting.pop_front();
            self.running.push(i);
            let r = &mut self.requests[i];
            r.num_computed = computed;
            r.blocks = blocks.clone();
            r.status = Status::Running;
            r.first_scheduled_step.get_or_insert(self.step);
            plan.added.push((RequestId(i as u64), r.prompt_len, blocks));
            self.mark_scheduled(i, num_new, plan);
            *budget -= num_new;
        }
        Ok(())
    }

    fn mark_scheduled(&mut self, i: usize, num_new: usize, plan: &mut StepPlan) {
        self.scheduled_in[i] = self.step;
        plan.scheduled.push(ScheduledRequest::new(i as u64, self.requests[i].num_computed, num_new));
    }

    /// Applies a step's results: each scheduled request advances by its tokens; one whose known
    /// tokens are now all computed gets its next token from `sample` and finishes when it has all
    /// its output. Returns the requests that finished (their blocks are already free).
    ///
    /// # Errors
    /// [`ScheduleError::Pool`] on a pool bug.
    pub fn update(
        &mut self,
        plan: &StepPlan,
        mut sample: impl FnMut(RequestId) -> TokenId,
    ) -> Result<Vec<RequestId>, ScheduleError> {
        let bs = self.block_size();
        let mut finished = Vec::new();
        for s in &plan.scheduled {
            let i = s.req_id.0 as usize;
            let r = &mut self.requests[i];
            let (start, end) = (s.num_computed_tokens, s.num_computed_tokens + s.num_scheduled_tokens);
            let in_prompt = r.prompt_len.clamp(start, end) - start;
            self.stats.prompt_tokens_computed += in_prompt;
            self.stats.output_tokens_computed += s.num_scheduled_tokens - in_prompt;
            r.num_computed = end;
            if self.config.enable_prefix_caching && end / bs > start / bs {
                self.pool.cache_full_blocks(&r.tokens[..end], &r.blocks)?;
            }
            if end < r.tokens.len() {
                continue; // a prefill chunk: no token sampled yet
            }
            let r = &mut self.requests[i];
            r.tokens.push(sample(s.req_id));
            if r.num_generated() >= r.output_len {
                r.status = Status::Finished;
                r.finished_step = Some(plan.step);
                self.pool.free(&r.blocks)?;
                r.blocks.clear();
                self.running.retain(|&x| x != i);
                self.num_finished += 1;
                finished.push(s.req_id);
            }
        }
        Ok(finished)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{build, PrefixSharing, WorkloadSpec};

    fn spec(id: u64, arrival_step: u64, prompt_len: usize, output_len: usize) -> RequestSpec {
        RequestSpec {
            id,
            arrival_step,
            prompt: (0..prompt_len as u32).map(|t| t + 1000 * id as u32).collect(),
            output_len,
        }
    }

    fn sched(budget: usize, seqs: usize, blocks: usize, specs: &[RequestSpec]) -> Scheduler {
        let cfg = SchedulerConfig { max_num_batched_tokens: budget, max_num_seqs: seqs, enable_prefix_caching: true };
        Scheduler::new(cfg, BlockPool::new(blocks, 4).unwrap(), specs)
    }

    /// Runs to completion, checking per-step invariants; returns the plans.
    fn run(s: &mut Scheduler, max_steps: usize) -> Vec<StepPlan> {
        let mut plans = Vec::new();
        while !s.is_done() {
            assert!(plans.len() < max_steps, "no completion after {max_steps} steps");
            let plan = s.schedule().unwrap();
            assert!(plan.num_tokens() <= s.config().max_num_batched_tokens, "budget exceeded");
            assert!(s.num_running() <= s.config().max_num_seqs);
            for e in &plan.scheduled {
                let r = s.request(e.req_id).unwrap();
                let needed = (e.num_computed_tokens + e.num_scheduled_tokens).div_ceil(4);
                assert!(r.blocks.len() >= needed, "blocks do not cover the step");
            }
            s.update(&plan, |id| id.0 as u32).unwrap();
            plans.push(plan);
        }
        plans
    }

    #[test]
    fn budget_respected_with_chunked_prefill() {
        let specs: Vec<_> = (0..6).map(|i| spec(i, 0, 37, 5)).collect();
        let mut s = sched(16, 4, 1000, &specs);
        let plans = run(&mut s, 200);
        // The 37-token prompts were chunked: some step scheduled a partial prompt.
        assert!(plans
            .iter()
            .flat_map(|p| &p.scheduled)
            .any(|e| e.num_scheduled_tokens > 1 && e.num_scheduled_tokens < 37));
        assert!(plans.iter().all(|p| p.num_tokens() <= 16));
        assert!(plans.iter().any(|p| p.num_tokens() == 16), "the budget is used fully when there is work");
        let st = s.stats();
        assert_eq!(st.prompt_tokens_computed, 6 * 37);
        assert_eq!(st.output_tokens_computed, 6 * 4, "each request computes output_len - 1 generated tokens");
        assert!(s.requests().iter().all(|r| r.num_generated() == 5 && r.status == Status::Finished));
        assert_eq!(s.pool().num_free_blocks(), 1000, "every block freed");
    }

    #[test]
    fn decodes_first_and_never_squeezed_out() {
        // Four short requests reach decode, then a stream of long prompts arrives.
        let mut specs: Vec<_> = (0..4).map(|i| spec(i, 0, 3, 30)).collect();
        specs.extend((4..10).map(|i| spec(i, 3, 64, 2)));
        let mut s = sched(8, 16, 1000, &specs);
        let plans = run(&mut s, 500);
        for p in &plans {
            let is_decode: Vec<bool> = p
                .scheduled
                .iter()
                .map(|e| {
                    let r = s.request(e.req_id).unwrap();
                    e.num_scheduled_tokens == 1 && e.num_computed_tokens >= r.prompt_len
                })
                .collect();
            // All decodes before the first prefill.
            let first_prefill = is_decode.iter().position(|d| !d).unwrap_or(is_decode.len());
            assert!(is_decode[first_prefill..].iter().all(|d| !d), "step {}: a decode after a prefill", p.step);
        }
        // While the long prompts are prefilled, the four decoders still get a token every step.
        for p in plans.iter().filter(|p| (5..20).contains(&p.step)) {
            let decoders = p.scheduled.iter().filter(|e| e.req_id.0 < 4).count();
            assert_eq!(decoders, 4, "step {}: a running decode was left out", p.step);
        }
    }

    #[test]
    fn preemption_under_memory_pressure_and_no_starvation() {
        // 12 blocks of 4 tokens = 48 slots; each request reaches 10 + 20 = 30 tokens (8 blocks).
        let specs: Vec<_> = (0..8).map(|i| spec(i, i, 10, 20)).collect();
        let mut s = sched(32, 8, 12, &specs);
        let plans = run(&mut s, 2000);
        assert!(s.stats().preemptions > 0, "this cache is too small for two full requests");
        assert!(plans.iter().any(|p| !p.removed.is_empty()));
        assert!(s.stats().peak_blocks_used <= 12);
        // Recomputation after preemption is counted.
        assert!(s.stats().prompt_tokens_computed > 8 * 10);
        // Admission is FIFO: first admissions happen in arrival order, so nobody starves.
        let mut firsts: Vec<(u64, usize)> =
            s.requests().iter().enumerate().map(|(i, r)| (r.first_scheduled_step.unwrap(), i)).collect();
        firsts.sort();
        assert!(firsts.windows(2).all(|w| w[0].1 < w[1].1), "{firsts:?}");
        assert!(s.requests().iter().all(|r| r.num_generated() == 20));
        assert_eq!(s.pool().num_free_blocks(), 12);
    }

    #[test]
    fn a_long_prompt_is_not_overtaken_forever() {
        // A 200-token prompt arrives behind a steady stream of short requests.
        let mut specs = vec![spec(0, 0, 8, 4), spec(1, 1, 200, 2)];
        specs.extend((2..40).map(|i| spec(i, i / 2, 8, 4)));
        let mut s = sched(16, 4, 80, &specs);
        run(&mut s, 2000);
        let long = &s.requests()[1];
        let later_admitted_first =
            s.requests()[2..].iter().filter(|r| r.first_scheduled_step < long.first_scheduled_step).count();
        assert!(later_admitted_first <= 2, "{later_admitted_first} later requests were admitted before the long one");
    }

    #[test]
    fn prefix_cache_hits_for_shared_prompts() {
        let wl = WorkloadSpec::Poisson { num_requests: 10, rate: 0.2, prompt_len: 40, output_len: 3 };
        let specs = build(&wl, PrefixSharing { fraction: 1.0, len: 24 }, 5).unwrap();
        let mut s = sched(64, 4, 200, &specs);
        run(&mut s, 1000);
        let st = s.stats();
        assert!(st.prefix_hit_requests >= 5, "{st:?}");
        assert_eq!(st.prefix_hit_tokens % 4, 0);
        let prompts: usize = specs.iter().map(|r| r.prompt.len()).sum();
        assert_eq!(st.prompt_tokens_computed + st.prefix_hit_tokens, prompts, "no preemption: every prompt token once");
    }

    #[test]
    fn far_arrivals_never_overflow_the_step_counter() {
        // The idle jump lands on the arrival step; the next step would be u64::MAX + 1.
        let mut s = sched(64, 4, 100, &[spec(0, u64::MAX, 4, 2)]);
        let plan = s.schedule().unwrap();
        assert_eq!((plan.step, plan.scheduled.len()), (u64::MAX, 1));
        s.update(&plan, |_| 7).unwrap();
        assert!(matches!(s.schedule(), Err(ScheduleError::StepOverflow)));
        // An arrival at the CLI's limit runs to completion.
        let far = crate::workload::MAX_ARRIVAL_STEP;
        let mut s = sched(64, 4, 100, &[spec(0, 0, 4, 2), spec(1, far, 4, 2)]);
        let plans = run(&mut s, 100);
        assert_eq!(plans.last().map(|p| p.step), Some(far + 1));
    }

    #[test]
    fn stalls_are_reported_not_looped() {
        let mut s = sched(64, 4, 2, &[spec(0, 0, 20, 2)]);
        assert!(matches!(s.schedule(), Err(ScheduleError::Stalled { .. })));
    }
}
