//! Property tests: random sequences of adds, removals, block growth, chunked prefills and decodes,
//! each step's `prepare_inputs` checked against a direct recomputation written here from the
//! definitions (per token: its request, its position, `block[pos / bs] * bs + pos % bs`).
//!
//! The number of cases comes from `PROPTEST_CASES` (proptest's default config reads it), so
//! `PROPTEST_CASES=100000 cargo test -p model-runner --release --test prepare_props` runs a long
//! fuzz. Failures are saved to `tests/proptest-regressions/prepare_props.txt` and replayed first.

use std::collections::{BTreeMap, HashSet};

use attention_backend::CacheLayout;
use model_runner::{ModelRunner, RequestId, RunnerConfig, RunnerError, ScheduledRequest, StepInputs};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

fn config() -> ProptestConfig {
    ProptestConfig {
        // proptest looks for lib.rs/main.rs above the test file to place `proptest-regressions/`;
        // an integration test has none, so name the file next to the tests.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/proptest-regressions/prepare_props.txt"
        )))),
        ..ProptestConfig::default()
    }
}

/// The runner's sizes for one case.
#[derive(Clone, Debug)]
struct Sizes {
    block_size: usize,
    num_blocks: usize,
    max_num_reqs: usize,
    max_blocks_per_req: usize,
    budget: usize,
    decode_threshold: usize,
    graph_sizes: Vec<usize>,
}

fn sizes() -> impl Strategy<Value = Sizes> {
    (
        prop_oneof![Just(1usize), Just(2), Just(4), Just(16)],
        4usize..160,
        1usize..16,
        1usize..12,
        1usize..96,
        1usize..4,
        proptest::collection::vec(1usize..128, 0..4),
    )
        .prop_map(
            |(block_size, num_blocks, max_num_reqs, max_blocks_per_req, budget, decode_threshold, graph_sizes)| Sizes {
                block_size,
                num_blocks,
                max_num_reqs,
                max_blocks_per_req,
                budget,
                decode_threshold,
                graph_sizes,
            },
        )
}

/// One operation; indices are taken modulo the live requests at the time it runs.
#[derive(Clone, Debug)]
enum Op {
    /// A new request; `cached` leading blocks count as a prefix-cache hit (already computed).
    Add { prompt_len: usize, cached: usize },
    /// A request finishes.
    Remove { pick: usize },
    /// A request gets blocks ahead of need (vLLM allocates lookahead slots).
    Grow { pick: usize, n: usize },
    /// One scheduler step: per live request, whether it is scheduled and a chunk-size seed; the
    /// step lists them starting at `rotate`.
    Step { picks: Vec<(bool, usize)>, rotate: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1usize..60, 0usize..3).prop_map(|(prompt_len, cached)| Op::Add { prompt_len, cached }),
        1 => any::<usize>().prop_map(|pick| Op::Remove { pick }),
        1 => (any::<usize>(), 1usize..3).prop_map(|(pick, n)| Op::Grow { pick, n }),
        5 => (proptest::collection::vec((prop::bool::weighted(0.8), any::<usize>()), 12), any::<usize>())
            .prop_map(|(picks, rotate)| Op::Step { picks, rotate }),
    ]
}

/// The test's own view of a request.
#[derive(Clone, Debug)]
struct Req {
    prompt_len: usize,
    computed: usize,
    blocks: Vec<u32>,
}

/// The test's own state: requests by id and a free list of blocks (its own allocator, not the
/// crate's block pool, so the two are independent).
struct Model {
    sizes: Sizes,
    reqs: BTreeMap<u64, Req>,
    free: Vec<u32>,
    next_id: u64,
}

impl Model {
    fn take_blocks(&mut self, n: usize) -> Option<Vec<u32>> {
        (self.free.len() >= n).then(|| self.free.split_off(self.free.len() - n))
    }

    fn nth_id(&self, pick: usize) -> Option<u64> {
        let n = self.reqs.len();
        (n > 0).then(|| *self.reqs.keys().nth(pick % n).unwrap())
    }

    fn max_tokens(&self) -> usize {
        self.sizes.max_blocks_per_req * self.sizes.block_size
    }
}

/// Checks one step's inputs against a direct recomputation from `step` and the model.
fn check_step(model: &Model, runner: &ModelRunner, step: &[ScheduledRequest], inputs: &StepInputs) {
    let s = &model.sizes;
    let bs = s.block_size;
    let m = &inputs.metadata;
    let num_reqs = step.len();

    // The order is a permutation of the step, decodes first, and the batch's leading rows.
    let by_id: BTreeMap<RequestId, &ScheduledRequest> = step.iter().map(|e| (e.req_id, e)).collect();
    assert_eq!(inputs.req_ids.len(), num_reqs);
    assert_eq!(inputs.req_ids.iter().collect::<HashSet<_>>().len(), num_reqs);
    assert!(inputs.req_ids.iter().all(|id| by_id.contains_key(id)));
    assert_eq!(&runner.batch().req_ids()[..num_reqs], &inputs.req_ids[..]);

    // Direct recomputation, token by token.
    let mut want_pos = Vec::new();
    let mut want_slot = Vec::new();
    let mut want_qsl = vec![0i32];
    let mut want_seq = Vec::new();
    for id in &inputs.req_ids {
        let e = by_id[id];
        let req = &model.reqs[&id.0];
        for pos in e.num_computed_tokens..e.num_computed_tokens + e.num_scheduled_tokens {
            want_pos.push(pos as i64);
            want_slot.push(i64::from(req.blocks[pos / bs]) * bs as i64 + (pos % bs) as i64);
        }
        want_qsl.push(want_pos.len() as i32);
        want_seq.push((e.num_computed_tokens + e.num_scheduled_tokens) as i32);
    }
    let num_tokens = want_pos.len();
    let padded = s.graph_sizes.iter().copied().filter(|&g| g >= num_tokens).min().unwrap_or(num_tokens);
    want_pos.resize(padded, 0);
    want_slot.resize(padded, -1);
    assert_eq!(inputs.positions, want_pos);
    assert_eq!(m.slot_mapping.as_slice(), &want_slot[..]);
    assert_eq!(m.query_start_loc, want_qsl);
    assert_eq!(m.seq_lens, want_seq);
    assert_eq!(m.num_actual_tokens, num_tokens);

    // query_start_loc is monotone and ends at num_tokens.
    assert!(m.query_start_loc.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(*m.query_start_loc.last().unwrap() as usize, num_tokens);

    // Block table rows hold each request's blocks.
    assert_eq!(m.block_table.num_reqs(), num_reqs);
    for (r, id) in inputs.req_ids.iter().enumerate() {
        let blocks = &model.reqs[&id.0].blocks;
        let row = m.block_table.row(r);
        assert_eq!(row[..blocks.len()].iter().map(|&b| b as u32).collect::<Vec<_>>(), *blocks);
    }

    // Every real slot lies in one of its request's blocks, and no two share a slot.
    let mut seen = HashSet::new();
    for (r, id) in inputs.req_ids.iter().enumerate() {
        let blocks = &model.reqs[&id.0].blocks;
        let (a, b) = (m.query_start_loc[r] as usize, m.query_start_loc[r + 1] as usize);
        for &slot in &m.slot_mapping.as_slice()[a..b] {
            assert!(slot >= 0);
            assert!(blocks.contains(&((slot as usize / bs) as u32)), "slot {slot} outside request {id}'s blocks");
            assert!(seen.insert(slot), "slot {slot} written twice");
        }
    }
    assert!(m.slot_mapping.as_slice()[num_tokens..].iter().all(|&x| x == -1));

    // Decodes precede prefills and the counts add up.
    let q = |r: usize| (m.query_start_loc[r + 1] - m.query_start_loc[r]) as usize;
    assert!((0..m.num_decodes).all(|r| q(r) <= s.decode_threshold));
    assert!((m.num_decodes..num_reqs).all(|r| q(r) > s.decode_threshold));
    assert_eq!(m.num_decodes + m.num_prefills, num_reqs);
    assert_eq!(m.num_decode_tokens, (0..m.num_decodes).map(q).sum::<usize>());
    assert_eq!(m.num_decode_tokens + m.num_prefill_tokens, num_tokens);
    assert_eq!(m.max_query_len, (0..num_reqs).map(q).max().unwrap());
    assert_eq!(m.max_seq_len, want_seq.iter().copied().max().unwrap() as usize);
    let (d, p) = (inputs.decode(), inputs.prefill());
    assert_eq!(d.seq_lens.len() + p.seq_lens.len(), num_reqs);
    assert_eq!(d.query_start_loc.len(), m.num_decodes + 1);
    assert_eq!(p.query_start_loc.first().copied(), Some(m.num_decode_tokens as i32));

    // The backend's own checks.
    m.check().unwrap();
    let layout = CacheLayout::new(s.num_blocks, bs, 1, 64).unwrap();
    m.check_against("prepare_props", &layout).unwrap();
}

/// Runs one sequence of operations against the runner and the model.
fn run(sizes: Sizes, free: Vec<u32>, ops: Vec<Op>) {
    let cfg = RunnerConfig::new(sizes.block_size, sizes.num_blocks)
        .with_max_num_reqs(sizes.max_num_reqs)
        .with_max_blocks_per_req(sizes.max_blocks_per_req)
        .with_max_num_batched_tokens(sizes.budget)
        .with_decode_threshold(sizes.decode_threshold)
        .with_cuda_graph_sizes(sizes.graph_sizes.clone());
    let mut runner = ModelRunner::new(cfg).unwrap();
    let mut model = Model { sizes, reqs: BTreeMap::new(), free, next_id: 0 };
    let bs = model.sizes.block_size;

    for op in ops {
        match op {
            Op::Add { prompt_len, cached } => {
                let id = model.next_id;
                model.next_id += 1;
                // A prefix hit covers whole blocks and leaves at least one prompt token to compute.
                let cached = cached.min((prompt_len - 1) / bs).min(model.sizes.max_blocks_per_req);
                let Some(blocks) = model.take_blocks(cached) else { continue };
                let res = runner.add_request(RequestId(id), prompt_len, &blocks);
                if model.reqs.len() == model.sizes.max_num_reqs {
                    assert_eq!(
                        res,
                        Err(RunnerError::BatchFull { req_id: RequestId(id), max_num_reqs: model.reqs.len() })
                    );
                    model.free.extend(blocks);
                } else {
                    res.unwrap();
                    model.reqs.insert(id, Req { prompt_len, computed: cached * bs, blocks });
                }
            }
            Op::Remove { pick } => {
                let Some(id) = model.nth_id(pick) else { continue };
                let req = model.reqs.remove(&id).unwrap();
                assert_eq!(runner.remove_request(RequestId(id)).unwrap(), req.blocks);
                model.free.extend(req.blocks);
            }
            Op::Grow { pick, n } => {
                let Some(id) = model.nth_id(pick) else { continue };
                if model.reqs[&id].blocks.len() + n > model.sizes.max_blocks_per_req {
                    continue;
                }
                let Some(blocks) = model.take_blocks(n) else { continue };
                runner.append_blocks(RequestId(id), &blocks).unwrap();
                model.reqs.get_mut(&id).unwrap().blocks.extend(blocks);
            }
            Op::Step { picks, rotate } => {
                let ids: Vec<u64> = model.reqs.keys().copied().collect();
                let n = ids.len();
                let mut step = Vec::new();
                let mut budget = model.sizes.budget;
                for k in 0..n {
                    let id = ids[(k + rotate % n.max(1)) % n];
                    let (include, seed) = picks[k % picks.len()];
                    let req = &model.reqs[&id];
                    if !include || budget == 0 {
                        continue;
                    }
                    // A prefill chunk of the remaining prompt, or a decode of 1..=threshold tokens.
                    let want = if req.computed < req.prompt_len {
                        1 + seed % (req.prompt_len - req.computed)
                    } else {
                        1 + seed % model.sizes.decode_threshold
                    };
                    let scheduled = want.min(budget).min(model.max_tokens().saturating_sub(req.computed));
                    if scheduled == 0 {
                        continue; // the request is at its longest; it waits for a Remove
                    }
                    let needed = (req.computed + scheduled).div_ceil(bs);
                    let missing = needed.saturating_sub(req.blocks.len());
                    let Some(blocks) = model.take_blocks(missing) else { continue };
                    runner.append_blocks(RequestId(id), &blocks).unwrap();
                    let req = model.reqs.get_mut(&id).unwrap();
                    req.blocks.extend(blocks);
                    budget -= scheduled;
                    step.push(ScheduledRequest::new(id, req.computed, scheduled));
                }
                if step.is_empty() {
                    assert_eq!(runner.prepare_inputs(&step), Err(RunnerError::EmptyStep));
                    continue;
                }
                let inputs = runner.prepare_inputs(&step).unwrap();
                check_step(&model, &runner, &step, &inputs);
                for e in &step {
                    model.reqs.get_mut(&e.req_id.0).unwrap().computed += e.num_scheduled_tokens;
                }
            }
        }
        // The persistent batch mirrors the model after every operation.
        assert_eq!(runner.batch().len(), model.reqs.len());
        for (&id, req) in &model.reqs {
            let blocks: Vec<u32> = runner.batch().blocks(RequestId(id)).unwrap().iter().map(|&b| b as u32).collect();
            assert_eq!(blocks, req.blocks);
            assert_eq!(runner.batch().prompt_len(RequestId(id)), Some(req.prompt_len));
        }
    }
}

/// Sizes, a scrambled initial free list (so block ids are not in request order), and the ops.
fn case() -> impl Strategy<Value = (Sizes, Vec<u32>, Vec<Op>)> {
    sizes().prop_flat_map(|s| {
        let free = Just((0..s.num_blocks as u32).collect::<Vec<_>>()).prop_shuffle();
        (Just(s), free, proptest::collection::vec(op(), 1..80))
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn prepare_inputs_matches_direct_recomputation((sizes, free, ops) in case()) {
        run(sizes, free, ops);
    }

    /// A step with a bad entry anywhere is refused and leaves the batch as it was.
    #[test]
    fn bad_step_changes_nothing(n in 1usize..6, bad_at in 0usize..6, kind in 0usize..4) {
        let mut runner = ModelRunner::new(
            RunnerConfig::new(4, 64).with_max_blocks_per_req(4).with_max_num_batched_tokens(100),
        ).unwrap();
        for id in 0..n as u64 {
            runner.add_request(RequestId(id), 5, &[2 * id as u32, 2 * id as u32 + 1]).unwrap();
        }
        let mut step: Vec<_> = (0..n as u64).rev().map(|id| ScheduledRequest::new(id, 0, 1 + id as usize)).collect();
        let at = bad_at % n;
        let want = match kind {
            0 => { step[at].req_id = RequestId(99); RunnerError::UnknownRequest { req_id: RequestId(99) } }
            1 => { step[at].num_scheduled_tokens = 0; RunnerError::NoScheduledTokens { req_id: step[at].req_id } }
            2 => {
                step[at].num_computed_tokens = 5;
                step[at].num_scheduled_tokens = 4;
                RunnerError::InsufficientBlocks {
                    req_id: step[at].req_id, num_computed: 5, num_scheduled: 4, num_tokens: 9,
                    blocks_needed: 3, num_blocks: 2, block_size: 4,
                }
            }
            _ => { let dup = step[at]; step.push(dup); RunnerError::DuplicateInStep { req_id: dup.req_id } }
        };
        let before = runner.batch().req_ids().to_vec();
        prop_assert_eq!(runner.prepare_inputs(&step), Err(want));
        prop_assert_eq!(runner.batch().req_ids(), &before[..]);
    }
}
