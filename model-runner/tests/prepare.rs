//! Hand-checked examples of `prepare_inputs`: a mixed batch, reordering, compaction, padding.

use attention_backend::CacheLayout;
use model_runner::{ModelRunner, RequestId, RunnerConfig, ScheduledRequest};

fn sched(id: u64, computed: usize, scheduled: usize) -> ScheduledRequest {
    ScheduledRequest::new(id, computed, scheduled)
}

#[test]
fn mixed_batch_by_hand() {
    // Block size 4 keeps the numbers small.
    let mut r = ModelRunner::new(RunnerConfig::new(4, 16).with_max_num_reqs(8).with_max_blocks_per_req(4)).unwrap();
    r.add_request(RequestId(10), 6, &[3, 9]).unwrap(); // prefill of 6
    r.add_request(RequestId(11), 2, &[5]).unwrap(); // decode at position 2
    r.add_request(RequestId(12), 9, &[0, 1, 2]).unwrap(); // second chunk: 4 computed, 5 now
    r.add_request(RequestId(13), 3, &[7]).unwrap(); // not scheduled
    let inputs = r.prepare_inputs(&[sched(10, 0, 6), sched(11, 2, 1), sched(12, 4, 5)]).unwrap();

    assert_eq!(inputs.req_ids, [RequestId(11), RequestId(10), RequestId(12)], "decode first");
    let m = &inputs.metadata;
    assert_eq!(m.query_start_loc, [0, 1, 7, 12]);
    assert_eq!(m.seq_lens, [3, 6, 9]);
    assert_eq!(inputs.positions, [2, 0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8]);
    assert_eq!(
        m.slot_mapping.as_slice(),
        [
            5 * 4 + 2, // req 11, pos 2 in block 5
            12,
            13,
            14,
            15,
            36,
            37, // req 10, blocks 3 then 9
            4,
            5,
            6,
            7,
            8, // req 12, pos 4..8 in blocks 1 and 2
        ]
    );
    assert_eq!(m.block_table.max_blocks_per_req(), 4, "full width: a fixed stride for CUDA graphs");
    assert_eq!(&m.block_table.row(0)[..1], [5]);
    assert_eq!(&m.block_table.row(1)[..2], [3, 9]);
    assert_eq!(&m.block_table.row(2)[..3], [0, 1, 2]);
    assert_eq!((m.num_decodes, m.num_decode_tokens, m.num_prefills, m.num_prefill_tokens), (1, 1, 2, 11));
    assert_eq!((m.max_query_len, m.max_seq_len, m.num_actual_tokens), (6, 9, 12));
    assert_eq!(inputs.decode().seq_lens, [3]);
    assert_eq!(inputs.prefill().query_start_loc, [1, 7, 12], "the prefill view is not rebased");
    assert_eq!(inputs.last_token_indices(), [0, 6, 11]);
    m.check().unwrap();
    m.check_against("test", &CacheLayout::new(16, 4, 1, 64).unwrap()).unwrap();

    // The batch was reordered in place: the unscheduled request is last.
    assert_eq!(r.batch().req_ids()[3], RequestId(13));
    assert_eq!(r.batch().row_of(RequestId(11)), Some(0));
    assert_eq!(r.batch().blocks(RequestId(12)), Some(&[0, 1, 2][..]));
}

#[test]
fn steady_decode_batch_is_not_reordered() {
    let mut r = ModelRunner::new(RunnerConfig::new(16, 64)).unwrap();
    for id in 0..5u64 {
        r.add_request(RequestId(id), 8, &[id as u32]).unwrap();
    }
    let step: Vec<_> = (0..5u64).rev().map(|id| sched(id, 8, 1)).collect();
    let order = r.prepare_inputs(&step).unwrap().req_ids;
    assert_eq!(order, (0..5).map(RequestId).collect::<Vec<_>>(), "rows keep their order, whatever the step's order");
}

#[test]
fn removal_keeps_rows_compact_and_in_sync() {
    let mut r = ModelRunner::new(RunnerConfig::new(16, 64).with_max_num_reqs(4)).unwrap();
    r.add_request(RequestId(1), 16, &[1]).unwrap();
    r.add_request(RequestId(2), 32, &[2, 3]).unwrap();
    r.add_request(RequestId(3), 48, &[4, 5, 6]).unwrap();
    assert_eq!(r.remove_request(RequestId(1)).unwrap(), [1]);
    assert_eq!(r.batch().req_ids(), [RequestId(3), RequestId(2)], "the last row fills the hole");
    assert_eq!(r.batch().blocks(RequestId(3)), Some(&[4, 5, 6][..]));
    assert_eq!(r.batch().block_table().row(0), Some(&[4, 5, 6][..]));
    assert_eq!(r.batch().block_table().row_len(2), 0);
    let inputs = r.prepare_inputs(&[sched(2, 0, 32), sched(3, 0, 48)]).unwrap();
    assert_eq!(inputs.metadata.seq_lens.len(), 2);
    assert_eq!(inputs.slot_mapping().as_slice()[..2], [64, 65]);
}

#[test]
fn cuda_graph_padding() {
    let cfg = RunnerConfig::new(16, 64).with_cuda_graph_sizes(vec![16, 8, 1, 4]);
    assert_eq!(cfg.cuda_graph_sizes, [1, 4, 8, 16]);
    let mut r = ModelRunner::new(cfg).unwrap();
    r.add_request(RequestId(1), 3, &[2]).unwrap();
    r.add_request(RequestId(2), 3, &[3]).unwrap();
    let inputs = r.prepare_inputs(&[sched(1, 0, 3), sched(2, 0, 3)]).unwrap();
    let m = &inputs.metadata;
    assert_eq!(m.num_actual_tokens, 6);
    assert_eq!(inputs.num_padded_tokens(), 8);
    assert_eq!(m.slot_mapping.as_slice(), [32, 33, 34, 48, 49, 50, -1, -1]);
    assert_eq!(inputs.positions, [0, 1, 2, 0, 1, 2, 0, 0]);
    assert_eq!(m.query_start_loc, [0, 3, 6], "per-request arrays are not padded");
    assert_eq!(inputs.padded_query_start_loc(4).unwrap(), [0, 3, 6, 6, 6]);
    assert_eq!(inputs.padded_query_start_loc(1).unwrap(), [0, 3, 6]);
    m.check().unwrap();

    // Larger than every captured size: not padded.
    r.add_request(RequestId(3), 20, &[4, 5]).unwrap();
    let inputs = r.prepare_inputs(&[sched(3, 0, 20)]).unwrap();
    assert_eq!(inputs.num_padded_tokens(), 20);
}

#[test]
fn decode_threshold_for_speculative_steps() {
    let mut r = ModelRunner::new(RunnerConfig::new(16, 64).with_decode_threshold(3)).unwrap();
    r.add_request(RequestId(1), 20, &[0, 1]).unwrap();
    r.add_request(RequestId(2), 20, &[2, 3]).unwrap();
    let inputs = r.prepare_inputs(&[sched(1, 0, 20), sched(2, 20, 3)]).unwrap();
    assert_eq!(inputs.req_ids, [RequestId(2), RequestId(1)]);
    assert_eq!((inputs.metadata.num_decodes, inputs.metadata.num_decode_tokens), (1, 3));
    assert_eq!(inputs.decode().max_query_len, 3);
}
