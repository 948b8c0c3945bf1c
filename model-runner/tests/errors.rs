//! One test per `RunnerError` variant: the error names the request and the counts, and a refused
//! call leaves the batch as it was.

use attention_backend::AttentionError;
use model_runner::{BlockPool, ModelRunner, RequestId, RunnerConfig, RunnerError, ScheduledRequest};

const BS: usize = 16;

fn runner() -> ModelRunner {
    ModelRunner::new(
        RunnerConfig::new(BS, 32).with_max_num_reqs(4).with_max_blocks_per_req(4).with_max_num_batched_tokens(64),
    )
    .unwrap()
}

fn sched(id: u64, computed: usize, scheduled: usize) -> ScheduledRequest {
    ScheduledRequest::new(id, computed, scheduled)
}

/// Row order, block lists and prompt lengths: everything a refused call must leave alone.
fn snapshot(r: &ModelRunner) -> Vec<(RequestId, Vec<i32>, Option<usize>)> {
    r.batch()
        .req_ids()
        .iter()
        .map(|&id| (id, r.batch().blocks(id).unwrap().to_vec(), r.batch().prompt_len(id)))
        .collect()
}

#[test]
fn invalid_config() {
    let err = ModelRunner::new(RunnerConfig::new(0, 32)).unwrap_err();
    assert!(matches!(err, RunnerError::InvalidConfig { ref what } if what.contains("block_size")), "{err}");
    let err = ModelRunner::new(RunnerConfig::new(16, (i32::MAX as usize) + 1)).unwrap_err();
    assert!(matches!(err, RunnerError::InvalidConfig { .. }), "{err}");
    let err = ModelRunner::new(RunnerConfig::new(16, 32).with_max_num_batched_tokens(0)).unwrap_err();
    assert!(matches!(err, RunnerError::InvalidConfig { ref what } if what.contains("max_num_batched_tokens")));
    let mut cfg = RunnerConfig::new(16, 32);
    cfg.cuda_graph_sizes = vec![8, 4];
    assert!(matches!(ModelRunner::new(cfg), Err(RunnerError::InvalidConfig { .. })));
    assert!(matches!(BlockPool::new(0, 16), Err(RunnerError::InvalidConfig { .. })));
    assert!(matches!(BlockPool::new(4, 0), Err(RunnerError::InvalidConfig { .. })));
}

#[test]
fn unknown_request() {
    let mut r = runner();
    r.add_request(RequestId(1), 4, &[0]).unwrap();
    let before = snapshot(&r);
    assert_eq!(
        r.prepare_inputs(&[sched(1, 0, 4), sched(9, 0, 1)]),
        Err(RunnerError::UnknownRequest { req_id: RequestId(9) })
    );
    assert_eq!(r.append_blocks(RequestId(9), &[1]), Err(RunnerError::UnknownRequest { req_id: RequestId(9) }));
    assert_eq!(r.set_blocks(RequestId(9), &[1]), Err(RunnerError::UnknownRequest { req_id: RequestId(9) }));
    assert_eq!(r.remove_request(RequestId(9)), Err(RunnerError::UnknownRequest { req_id: RequestId(9) }));
    assert_eq!(snapshot(&r), before);
    // The runner still works after the refusals.
    assert_eq!(r.prepare_inputs(&[sched(1, 0, 4)]).unwrap().num_actual_tokens(), 4);
}

#[test]
fn duplicate_request() {
    let mut r = runner();
    r.add_request(RequestId(1), 4, &[0]).unwrap();
    assert_eq!(r.add_request(RequestId(1), 8, &[1]), Err(RunnerError::DuplicateRequest { req_id: RequestId(1) }));
    assert_eq!(r.batch().prompt_len(RequestId(1)), Some(4));
    assert_eq!(r.batch().blocks(RequestId(1)), Some(&[0][..]));
}

#[test]
fn duplicate_in_step() {
    let mut r = runner();
    r.add_request(RequestId(1), 4, &[0]).unwrap();
    r.add_request(RequestId(2), 4, &[1]).unwrap();
    let err = r.prepare_inputs(&[sched(2, 0, 4), sched(1, 0, 4), sched(2, 0, 4)]).unwrap_err();
    assert_eq!(err, RunnerError::DuplicateInStep { req_id: RequestId(2) });
    assert!(err.to_string().contains("#2"), "{err}");
    // A later step with both is fine: stale marks from the refused step do not count.
    assert_eq!(r.prepare_inputs(&[sched(2, 0, 4), sched(1, 0, 4)]).unwrap().num_reqs(), 2);
}

#[test]
fn no_scheduled_tokens() {
    let mut r = runner();
    r.add_request(RequestId(1), 4, &[0]).unwrap();
    assert_eq!(r.prepare_inputs(&[sched(1, 2, 0)]), Err(RunnerError::NoScheduledTokens { req_id: RequestId(1) }));
}

#[test]
fn insufficient_blocks() {
    let mut r = runner();
    r.add_request(RequestId(3), 40, &[5, 6]).unwrap();
    // 16 computed + 17 scheduled = 33 tokens = 3 blocks, the request has 2.
    let err = r.prepare_inputs(&[sched(3, 16, 17)]).unwrap_err();
    assert_eq!(
        err,
        RunnerError::InsufficientBlocks {
            req_id: RequestId(3),
            num_computed: 16,
            num_scheduled: 17,
            num_tokens: 33,
            blocks_needed: 3,
            num_blocks: 2,
            block_size: BS,
        }
    );
    let msg = err.to_string();
    assert!(msg.contains("#3") && msg.contains("33") && msg.contains("3 blocks"), "{msg}");
    // Exactly covering is fine; so is growing the list and retrying.
    r.prepare_inputs(&[sched(3, 16, 16)]).unwrap();
    r.append_blocks(RequestId(3), &[7]).unwrap();
    r.prepare_inputs(&[sched(3, 16, 17)]).unwrap();
}

#[test]
fn block_out_of_range() {
    let mut r = runner();
    let err = r.add_request(RequestId(1), 4, &[0, 32]).unwrap_err();
    assert_eq!(err, RunnerError::BlockOutOfRange { req_id: RequestId(1), block_id: 32, num_blocks: 32 });
    assert!(r.batch().is_empty());
    r.add_request(RequestId(1), 4, &[0]).unwrap();
    assert_eq!(
        r.append_blocks(RequestId(1), &[1, u32::MAX]),
        Err(RunnerError::BlockOutOfRange { req_id: RequestId(1), block_id: u32::MAX, num_blocks: 32 })
    );
    assert_eq!(r.batch().blocks(RequestId(1)), Some(&[0][..]));
}

#[test]
fn too_many_blocks() {
    let mut r = runner();
    assert_eq!(
        r.add_request(RequestId(1), 4, &[0, 1, 2, 3, 4]),
        Err(RunnerError::TooManyBlocks { req_id: RequestId(1), num_blocks: 5, max_blocks_per_req: 4 })
    );
    r.add_request(RequestId(1), 4, &[0, 1, 2]).unwrap();
    assert_eq!(
        r.append_blocks(RequestId(1), &[3, 4]),
        Err(RunnerError::TooManyBlocks { req_id: RequestId(1), num_blocks: 5, max_blocks_per_req: 4 })
    );
    assert_eq!(r.batch().blocks(RequestId(1)), Some(&[0, 1, 2][..]));
}

#[test]
fn sequence_too_long() {
    let mut r = runner();
    r.add_request(RequestId(1), 4, &[0, 1, 2, 3]).unwrap();
    // 4 blocks of 16 = 64 tokens at most per request.
    assert_eq!(
        r.prepare_inputs(&[sched(1, 60, 5)]),
        Err(RunnerError::SequenceTooLong { req_id: RequestId(1), num_tokens: 65, max_tokens: 64 })
    );
    assert!(matches!(
        r.prepare_inputs(&[sched(1, usize::MAX, 1)]),
        Err(RunnerError::SequenceTooLong { req_id: RequestId(1), num_tokens: usize::MAX, .. })
    ));
}

#[test]
fn too_many_tokens() {
    let mut r = runner();
    r.add_request(RequestId(1), 40, &[0, 1, 2]).unwrap();
    r.add_request(RequestId(2), 40, &[3, 4, 5]).unwrap();
    let before = snapshot(&r);
    assert_eq!(
        r.prepare_inputs(&[sched(1, 0, 40), sched(2, 0, 40)]),
        Err(RunnerError::TooManyTokens { num_tokens: 80, budget: 64 })
    );
    assert_eq!(snapshot(&r), before);
}

#[test]
fn empty_step() {
    let mut r = runner();
    assert_eq!(r.prepare_inputs(&[]), Err(RunnerError::EmptyStep));
    r.add_request(RequestId(1), 4, &[0]).unwrap();
    assert_eq!(r.prepare_inputs(&[]), Err(RunnerError::EmptyStep));
}

#[test]
fn batch_full() {
    let mut r = runner();
    for id in 0..4 {
        r.add_request(RequestId(id), 1, &[id as u32]).unwrap();
    }
    assert_eq!(
        r.add_request(RequestId(4), 1, &[4]),
        Err(RunnerError::BatchFull { req_id: RequestId(4), max_num_reqs: 4 })
    );
    r.remove_request(RequestId(0)).unwrap();
    r.add_request(RequestId(4), 1, &[4]).unwrap();
    assert_eq!(r.batch().len(), 4);
}

#[test]
fn out_of_blocks() {
    let mut pool = BlockPool::new(4, BS).unwrap();
    let held = pool.allocate(3).unwrap();
    assert_eq!(pool.allocate(2), Err(RunnerError::OutOfBlocks { requested: 2, free: 1 }));
    assert_eq!(pool.num_free_blocks(), 1, "a refused allocation takes nothing");
    pool.free(&held).unwrap();
    assert_eq!(pool.allocate(4).unwrap().len(), 4);
}

#[test]
fn block_not_in_pool() {
    let mut pool = BlockPool::new(4, BS).unwrap();
    let held = pool.allocate(2).unwrap();
    assert_eq!(pool.free(&[held[0], 4]), Err(RunnerError::BlockNotInPool { block_id: 4, num_blocks: 4 }));
    assert_eq!(pool.ref_count(held[0]), Some(1), "a refused free releases nothing");
    let tokens: Vec<u32> = (0..BS as u32).collect();
    assert_eq!(pool.cache_full_blocks(&tokens, &[9]), Err(RunnerError::BlockNotInPool { block_id: 9, num_blocks: 4 }));
}

#[test]
fn block_not_allocated() {
    let mut pool = BlockPool::new(4, BS).unwrap();
    let held = pool.allocate(1).unwrap();
    // Freeing twice within one call is a double free too.
    assert_eq!(pool.free(&[held[0], held[0]]), Err(RunnerError::BlockNotAllocated { block_id: held[0] }));
    pool.free(&held).unwrap();
    assert_eq!(pool.free(&held), Err(RunnerError::BlockNotAllocated { block_id: held[0] }));
    let tokens: Vec<u32> = (0..BS as u32).collect();
    assert_eq!(pool.cache_full_blocks(&tokens, &held), Err(RunnerError::BlockNotAllocated { block_id: held[0] }));
}

#[test]
fn metadata_error_converts() {
    let inner = AttentionError::InvalidMetadata { op: "x", what: "y".into() };
    let err = RunnerError::from(inner.clone());
    assert_eq!(err, RunnerError::Metadata(inner.clone()));
    assert_eq!(err.to_string(), inner.to_string());
}

#[test]
fn slot_written_twice_by_two_requests_sharing_a_block() {
    let mut r = runner();
    // Both requests list block 5 as the one their first tokens go to.
    r.add_request(RequestId(1), 4, &[5]).unwrap();
    r.add_request(RequestId(2), 4, &[5]).unwrap();
    let before = snapshot(&r);
    assert_eq!(
        r.prepare_inputs(&[sched(1, 0, 4), sched(2, 0, 4)]),
        Err(RunnerError::SlotWrittenTwice { req_id: RequestId(2), other: RequestId(1), block_id: 5, offset: 0 })
    );
    // Overlapping ranges in the middle of the block: offsets 2..6 and 4..5.
    assert_eq!(
        r.prepare_inputs(&[sched(1, 2, 4), sched(2, 4, 1)]),
        Err(RunnerError::SlotWrittenTwice { req_id: RequestId(2), other: RequestId(1), block_id: 5, offset: 4 })
    );
    assert_eq!(snapshot(&r), before, "a refused step leaves the batch alone");
    // Each one alone is a valid step, and so are both when their ranges are disjoint.
    assert_eq!(r.prepare_inputs(&[sched(1, 0, 4)]).unwrap().num_actual_tokens(), 4);
    let ok = r.prepare_inputs(&[sched(1, 0, 4), sched(2, 4, 2)]).unwrap();
    assert_eq!(ok.slot_mapping().as_slice(), [80, 81, 82, 83, 84, 85]);
}

#[test]
fn slot_written_twice_by_one_request_listing_a_block_twice() {
    let mut r = runner();
    r.add_request(RequestId(1), 20, &[3, 3]).unwrap();
    let before = snapshot(&r);
    // 20 tokens: offsets 0..16 of block 3 (table entry 0), then 0..4 of block 3 again (entry 1).
    assert_eq!(
        r.prepare_inputs(&[sched(1, 0, 20)]),
        Err(RunnerError::SlotWrittenTwice { req_id: RequestId(1), other: RequestId(1), block_id: 3, offset: 0 })
    );
    assert_eq!(snapshot(&r), before);
    // A block listed twice but written only once this step (the first entry is history) is not
    // a double write within the step.
    assert!(r.prepare_inputs(&[sched(1, 16, 4)]).is_ok());
    // Shared *read-only* blocks (a prefix-cache hit) are fine: both requests write only their own.
    r.add_request(RequestId(2), 20, &[7, 8]).unwrap();
    r.add_request(RequestId(3), 20, &[7, 9]).unwrap();
    let ok = r.prepare_inputs(&[sched(2, 16, 4), sched(3, 16, 4)]).unwrap();
    assert_eq!(ok.slot_mapping().as_slice(), [128, 129, 130, 131, 144, 145, 146, 147]);
}

#[test]
fn huge_but_valid_sizes_are_an_error_not_an_abort() {
    // 2^31 x 2^31 i32 entries: the product fits a usize but not the address space.
    let cfg = RunnerConfig::new(BS, 32).with_max_num_reqs(1 << 31).with_max_blocks_per_req(1 << 31);
    cfg.check().unwrap();
    let err = ModelRunner::new(cfg).unwrap_err();
    assert!(matches!(err, RunnerError::AllocationFailed { what: "block table", elem_bytes: 4, .. }), "{err}");
    assert!(err.to_string().contains("cannot allocate the block table"), "{err}");
    // A step-size field whose product with another overflows usize is refused by the check.
    let cfg = RunnerConfig::new(BS, 32).with_max_num_reqs(usize::MAX).with_max_blocks_per_req(2);
    assert!(matches!(ModelRunner::new(cfg), Err(RunnerError::InvalidConfig { .. })));
}

#[test]
fn i32_limits_are_typed_errors() {
    // Blocks of 2^16 tokens and 2^15 + 1 columns: a row can name more than i32::MAX tokens, so
    // the i32 seq_lens are the binding limit.
    let bs = 1usize << 16;
    let mut r = ModelRunner::new(
        RunnerConfig::new(bs, 1 << 16)
            .with_max_num_reqs(3)
            .with_max_blocks_per_req((1 << 15) + 1)
            .with_max_num_batched_tokens(i32::MAX as usize),
    )
    .unwrap();
    let row = |first: u32| (first..first + (1 << 15) + 1).collect::<Vec<u32>>();
    r.add_request(RequestId(1), 1, &row(0)).unwrap();
    let max = i32::MAX as usize;
    assert_eq!(
        r.prepare_inputs(&[sched(1, max - 2, 5)]),
        Err(RunnerError::SequenceTooLong { req_id: RequestId(1), num_tokens: max + 3, max_tokens: max })
    );
    // Three halves of i32::MAX: the query_start_loc sum would overflow i32; it is over budget.
    let half = max / 2 + 1;
    let blocks = half.div_ceil(bs) as u32;
    r.set_blocks(RequestId(1), &(0..blocks).collect::<Vec<_>>()).unwrap();
    r.add_request(RequestId(2), half, &(blocks..2 * blocks).collect::<Vec<_>>()).unwrap();
    r.add_request(RequestId(3), half, &(2 * blocks..3 * blocks).collect::<Vec<_>>()).unwrap();
    assert_eq!(
        r.prepare_inputs(&[sched(1, 0, half), sched(2, 0, half), sched(3, 0, half)]),
        Err(RunnerError::TooManyTokens { num_tokens: 3 * half, budget: max })
    );
    // CUDA-graph sizes are token counts on the device: i32 as well.
    let cfg = RunnerConfig::new(BS, 32).with_cuda_graph_sizes(vec![8, i32::MAX as usize + 1]);
    assert!(matches!(ModelRunner::new(cfg), Err(RunnerError::InvalidConfig { ref what }) if what.contains("graph")));
    // A padded query_start_loc for usize::MAX requests is an error, not an overflow.
    let mut r = runner();
    r.add_request(RequestId(1), 4, &[0]).unwrap();
    let inputs = r.prepare_inputs(&[sched(1, 0, 4)]).unwrap();
    assert!(matches!(inputs.padded_query_start_loc(usize::MAX), Err(RunnerError::AllocationFailed { .. })));
    assert!(matches!(inputs.padded_query_start_loc(usize::MAX - 1), Err(RunnerError::AllocationFailed { .. })));
}
