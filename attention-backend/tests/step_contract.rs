//! The step contract (ARCHITECTURE.md, "Invariants"), one violation at a time, through
//! `cpu::forward` and through the run-time `Backend` API: each is refused with its typed error and
//! leaves the cache, the output and the lse exactly as they were. Also the crash-to-error items:
//! metadata arithmetic on hostile `query_start_loc` and allocations that cannot be had.

use attention_backend::ndarray::{Array2, Array3, Array4};
use attention_backend::{
    cpu, AttentionError, AttentionMetadata, AttentionParams, Backend, BlockTable, CacheLayout, CpuKvCache, SlotMapping,
    StepCheckScratch,
};

const NH: usize = 4;
const NKV: usize = 2;
const HS: usize = 8;
const BS: usize = 4;
const NUM_BLOCKS: usize = 10;

/// A step over two requests (decodes first):
/// - request 0 decodes position 5 (blocks [3, 1]: position 5 is block 1 offset 1 = slot 5);
/// - request 1 prefills positions 4..7 after a 4-token cached prefix (blocks [0, 6]: slots 24..27
///   minus one, i.e. 24, 25, 26);
/// - one padding row.
fn parts() -> (Vec<i32>, Vec<i32>, Vec<Vec<i32>>, Vec<i64>) {
    (vec![0, 1, 4], vec![6, 7], vec![vec![3, 1], vec![0, 6]], vec![5, 24, 25, 26, -1])
}

/// Builds the metadata without `AttentionMetadata::new`'s self-check, so cache-dependent
/// violations reach the checks that `forward` runs.
fn meta_from(qsl: Vec<i32>, seq_lens: Vec<i32>, rows: &[Vec<i32>], slots: Vec<i64>) -> AttentionMetadata {
    AttentionMetadata::new(qsl, seq_lens, BlockTable::from_rows(rows), SlotMapping::new(slots), 1)
        .expect("self-consistent metadata")
}

fn valid_meta() -> AttentionMetadata {
    let (q, s, rows, slots) = parts();
    meta_from(q, s, &rows, slots)
}

/// A cache of distinct finite values (so any stray write shows).
fn cache() -> CpuKvCache<f32> {
    let shape = CacheLayout::new(NUM_BLOCKS, BS, NKV, HS).unwrap().shape();
    let k = Array4::from_shape_fn(shape, |(b, o, h, d)| (b * 1000 + o * 100 + h * 10 + d) as f32 * 1e-3);
    let v = Array4::from_shape_fn(shape, |(b, o, h, d)| -((b * 1000 + o * 100 + h * 10 + d) as f32) * 1e-3);
    CpuKvCache::from_arrays(k, v).unwrap()
}

/// Runs `meta` through `cpu::forward` and through `Backend::forward` (and `Backend::paged_attention`)
/// on fresh copies of the same inputs; both must agree on the outcome, and an error must leave
/// every buffer untouched.
fn run_both(meta: &AttentionMetadata) -> Result<(), AttentionError> {
    let p = AttentionParams::new(NH, NKV, HS);
    let n = meta.num_tokens();
    let query = Array3::from_shape_fn((n, NH, HS), |(t, h, d)| ((t + h + d) % 5) as f32 * 0.1);
    let key = Array3::from_elem((n, NKV, HS), 7.0f32);
    let value = Array3::from_elem((n, NKV, HS), 9.0f32);

    // cpu::forward
    let before = cache();
    let mut c = cache();
    let mut out = Array3::from_elem((n, NH, HS), f32::NAN);
    let mut lse = Array2::from_elem((n, NH), f32::NAN);
    let direct = cpu::forward(
        meta,
        &p,
        cpu::ForwardIo {
            query: query.view(),
            key: key.view(),
            value: value.view(),
            cache: &mut c,
            out: out.view_mut(),
            lse: Some(lse.view_mut()),
        },
    );
    if direct.is_err() {
        assert_eq!(c.key(), before.key(), "key cache written before {direct:?}");
        assert_eq!(c.value(), before.value(), "value cache written before {direct:?}");
        assert!(out.iter().all(|x| x.is_nan()), "out written before {direct:?}");
        assert!(lse.iter().all(|x| x.is_nan()), "lse written before {direct:?}");
    }

    // The Backend API: prepare_step may refuse first (self-consistency); otherwise forward.
    let backend = Backend::cpu();
    let mut bc = backend.kv_cache_from_host(cache()).unwrap();
    let via_backend = backend.prepare_step(meta.clone()).and_then(|step| {
        let (q, k, v) = (
            backend.tensor(query.clone()).unwrap(),
            backend.tensor(key.clone()).unwrap(),
            backend.tensor(value.clone()).unwrap(),
        );
        let mut o = backend.tensor(Array3::from_elem((n, NH, HS), f32::NAN)).unwrap();
        let mut l = backend.tensor(Array2::from_elem((n, NH), f32::NAN)).unwrap();
        let attn = backend.paged_attention(
            &step,
            &p,
            attention_backend::AttentionTensors { query: &q, cache: &bc, out: &mut o, lse: Some(&mut l) },
        );
        let fwd = backend.forward(
            &step,
            &p,
            attention_backend::ForwardTensors {
                query: &q,
                key: &k,
                value: &v,
                cache: &mut bc,
                out: &mut o,
                lse: Some(&mut l),
            },
        );
        if fwd.is_err() {
            let same =
                attn.as_ref().err().map(std::mem::discriminant) == fwd.as_ref().err().map(std::mem::discriminant);
            assert!(same, "paged_attention ({attn:?}) and forward ({fwd:?}) disagree");
            let o = backend.to_host(&o).unwrap();
            let l = backend.to_host(&l).unwrap();
            assert!(o.iter().all(|x| x.is_nan()), "Backend: out written before {fwd:?}");
            assert!(l.iter().all(|x| x.is_nan()), "Backend: lse written before {fwd:?}");
        }
        fwd
    });
    if via_backend.is_err() {
        let host = backend.kv_cache_to_host(&bc).unwrap();
        assert_eq!(host.key(), before.key(), "Backend: key cache written before {via_backend:?}");
        assert_eq!(host.value(), before.value(), "Backend: value cache written before {via_backend:?}");
    }
    assert_eq!(direct, via_backend, "cpu::forward and Backend::forward disagree");
    direct
}

#[test]
fn the_valid_step_runs() {
    run_both(&valid_meta()).unwrap();
}

/// Item 1: a real token with a negative slot (its K/V would never be written).
#[test]
fn real_token_with_negative_slot_is_refused() {
    let (q, s, rows, mut slots) = parts();
    slots[2] = -1;
    let e = run_both(&meta_from(q, s, &rows, slots)).unwrap_err();
    assert_eq!(e, AttentionError::MissingSlot { op: "forward", index: 2, req: 1, pos: 5, slot: -1 });
    // The decode's only token, with the most negative slot.
    let (q, s, rows, mut slots) = parts();
    slots[0] = i64::MIN;
    let e = run_both(&meta_from(q, s, &rows, slots)).unwrap_err();
    assert!(matches!(e, AttentionError::MissingSlot { index: 0, req: 0, pos: 5, slot: i64::MIN, .. }), "{e:?}");
}

/// A real token written to a slot its block table does not give it.
#[test]
fn real_token_with_wrong_slot_is_refused() {
    let (q, s, rows, mut slots) = parts();
    slots[3] = 27;
    let e = run_both(&meta_from(q, s, &rows, slots)).unwrap_err();
    assert_eq!(e, AttentionError::SlotMismatch { op: "forward", index: 3, req: 1, pos: 6, slot: 27, expected: 26 });
}

/// Item 2: a padding row with a slot inside the cache (it would overwrite another request's row).
#[test]
fn padding_row_with_a_slot_is_refused() {
    for slot in [0, 5, 12, (NUM_BLOCKS * BS - 1) as i64] {
        let (q, s, rows, mut slots) = parts();
        slots[4] = slot;
        let e = run_both(&meta_from(q, s, &rows, slots)).unwrap_err();
        assert_eq!(e, AttentionError::PaddingSlot { op: "forward", index: 4, slot, num_actual_tokens: 4 });
    }
    // Past the cache it is (first) out of range.
    let (q, s, rows, mut slots) = parts();
    slots[4] = (NUM_BLOCKS * BS) as i64;
    let e = run_both(&meta_from(q, s, &rows, slots)).unwrap_err();
    assert!(matches!(e, AttentionError::SlotOutOfRange { index: 4, .. }), "{e:?}");
}

/// Item 3: two requests writing into one block. Request 0's decode writes block 1 offset 1; here
/// request 1's second block is block 1 as well, so it writes offsets 0..3 of it: slot 5 twice.
#[test]
fn two_requests_writing_one_block_are_refused() {
    let (q, s, _, _) = parts();
    let rows = vec![vec![3, 1], vec![0, 1]];
    let slots = vec![5, 4, 5, 6, -1];
    let e = run_both(&meta_from(q, s, &rows, slots)).unwrap_err();
    assert_eq!(
        e,
        AttentionError::BlockWriteConflict { op: "forward", block: 1, req: 1, index: 1, other_req: 0, other_index: 1 }
    );
}

/// Item 3: one request listing a block twice. Request 1's prompt tokens 4..6 go to block 0, which
/// also holds its cached positions 0..3: attention would read the new rows as the old ones.
#[test]
fn one_request_listing_a_block_twice_is_refused() {
    let (q, s, _, _) = parts();
    let rows = vec![vec![3, 1], vec![0, 0]];
    let slots = vec![5, 0, 1, 2, -1];
    let e = run_both(&meta_from(q, s, &rows, slots)).unwrap_err();
    assert_eq!(
        e,
        AttentionError::BlockWriteConflict { op: "forward", block: 0, req: 1, index: 1, other_req: 1, other_index: 0 }
    );
}

/// A written block that another request only reads is refused too (it would read rows being
/// overwritten); a block that several requests only read (a shared prefix) is fine.
#[test]
fn shared_blocks_must_be_read_only() {
    let (q, s, _, _) = parts();
    // Request 1 reads block 1 as its prefix while request 0 writes into it.
    let rows = vec![vec![3, 1], vec![1, 6]];
    let slots = vec![5, 24, 25, 26, -1];
    let e = run_both(&meta_from(q.clone(), s.clone(), &rows, slots)).unwrap_err();
    assert_eq!(
        e,
        AttentionError::BlockWriteConflict { op: "forward", block: 1, req: 1, index: 0, other_req: 0, other_index: 1 }
    );
    // Both read block 3 (a shared prefix block), each writes its own block.
    let rows = vec![vec![3, 1], vec![3, 6]];
    run_both(&meta_from(q, s, &rows, vec![5, 24, 25, 26, -1])).unwrap();
}

/// Every block a request uses must be a block of the cache; stale entries past the used ones are
/// ignored.
#[test]
fn used_block_outside_the_cache_is_refused() {
    let (q, s, _, slots) = parts();
    let rows = vec![vec![3, 1], vec![NUM_BLOCKS as i32, 6]];
    let e = run_both(&meta_from(q.clone(), s.clone(), &rows, slots.clone())).unwrap_err();
    assert_eq!(
        e,
        AttentionError::BlockOutOfRange { op: "forward", req: 1, index: 0, block: NUM_BLOCKS as i32, num_blocks: 10 }
    );
    let rows = vec![vec![3, 1, -7], vec![0, 6, i32::MAX]];
    run_both(&meta_from(q, s, &rows, slots)).unwrap();
}

#[test]
fn block_table_too_short_is_refused() {
    let (q, s, _, slots) = parts();
    let e = run_both(&meta_from(q, s, &[vec![3], vec![0]], slots)).unwrap_err();
    assert_eq!(
        e,
        AttentionError::BlockTableTooShort { op: "forward", req: 0, seq_len: 6, block_size: 4, needed: 2, columns: 1 }
    );
}

/// The scratch is reused across checks and caches of different sizes without stale state: a block
/// used in one check is free in the next.
#[test]
fn a_reused_scratch_keeps_no_state_between_checks() {
    let mut scratch = StepCheckScratch::new();
    let layout = CacheLayout::new(NUM_BLOCKS, BS, NKV, HS).unwrap();
    for _ in 0..3 {
        valid_meta().check_against_with("t", &layout, &mut scratch).unwrap();
    }
    let small = CacheLayout::new(7, BS, NKV, HS).unwrap();
    let meta = meta_from(vec![0, 1], vec![1], &[vec![6]], vec![24]);
    meta.check_against_with("t", &small, &mut scratch).unwrap();
    let (q, s, _, _) = parts();
    let bad = meta_from(q, s, &[vec![3, 1], vec![0, 1]], vec![5, 4, 5, 6, -1]);
    assert!(matches!(
        bad.check_against_with("t", &layout, &mut scratch),
        Err(AttentionError::BlockWriteConflict { .. })
    ));
    valid_meta().check_against_with("t", &layout, &mut scratch).unwrap();
}

/// Item 5: `query_start_loc` differences that overflow i32 are a typed error, not a debug-build
/// panic (the test profile keeps overflow checks on).
#[test]
fn overflowing_query_start_loc_is_an_error() {
    let hostile: [&[i32]; 5] =
        [&[0, -1, i32::MAX], &[0, i32::MIN, i32::MAX], &[0, i32::MAX, i32::MIN], &[0, 1, i32::MIN], &[0, i32::MAX]];
    for qsl in hostile {
        let n = qsl.len() - 1;
        let r = AttentionMetadata::new(
            qsl.to_vec(),
            vec![i32::MAX; n],
            BlockTable::from_rows(&vec![vec![0]; n]),
            SlotMapping::new(vec![0; 3]),
            1,
        );
        assert!(matches!(r, Err(AttentionError::InvalidMetadata { .. })), "{qsl:?}: {r:?}");
        let r = AttentionMetadata::new(
            qsl.to_vec(),
            vec![1; n],
            BlockTable::from_rows(&vec![vec![0]; n]),
            SlotMapping::default(),
            usize::MAX,
        );
        assert!(matches!(r, Err(AttentionError::InvalidMetadata { .. })), "{qsl:?}: {r:?}");
    }
    // Public fields set to anything: check() compares, it does not add.
    let mut m = valid_meta();
    m.num_decodes = 1;
    m.num_prefills = usize::MAX;
    assert!(matches!(m.check(), Err(AttentionError::InvalidMetadata { .. })));
    let mut m = valid_meta();
    m.num_decode_tokens = usize::MAX;
    m.num_prefill_tokens = 2;
    assert!(matches!(m.check(), Err(AttentionError::InvalidMetadata { .. })));
    let mut m = valid_meta();
    m.seq_lens = vec![i32::MIN, -1];
    assert!(matches!(m.check(), Err(AttentionError::InvalidMetadata { .. })));
    assert_eq!(m.query_len(1), 3);
    m.query_start_loc = vec![0, i32::MIN, i32::MAX];
    assert_eq!((m.query_len(0), m.query_len(1)), (0, u32::MAX as usize));
    assert!(matches!(
        m.check_against("t", &CacheLayout::new(4, 4, 1, 1).unwrap()),
        Err(AttentionError::InvalidMetadata { .. })
    ));
}

/// Item 6: a shape whose element count overflows is a typed error, not a panic inside ndarray.
#[test]
fn zeros_with_an_overflowing_shape_is_an_error() {
    let b = Backend::cpu();
    for shape in [vec![usize::MAX, 2], vec![1 << 32, 1 << 32], vec![0, usize::MAX, 2], vec![3, usize::MAX]] {
        let r = b.zeros::<f32>(&shape);
        assert!(matches!(r, Err(AttentionError::InvalidArgument { op: "zeros", .. })), "{shape:?}: {r:?}");
    }
    // Fits usize, not isize bytes: refused before asking the allocator.
    let r = b.zeros::<f32>(&[1 << 62, 1]);
    assert_eq!(r.unwrap_err(), AttentionError::AllocationFailed { op: "zeros", tensor: "tensor", bytes: 1 << 64 });
    // A normal shape still works, and an empty one.
    assert_eq!(b.zeros::<f32>(&[2, 3]).unwrap().shape(), &[2, 3]);
    assert_eq!(b.zeros::<f32>(&[0, usize::MAX]).map(|t| t.shape().to_vec()).ok(), None);
    assert_eq!(b.zeros::<f32>(&[0, 5]).unwrap().shape(), &[0, 5]);
}

/// Item 6: huge but valid sizes (far past any machine's address space) come back as an
/// allocation error that says how many bytes were asked for, instead of aborting the process.
#[test]
fn huge_allocations_are_typed_errors() {
    let b = Backend::cpu();
    // 2^59 f32 = 2^61 bytes: a valid isize, no machine has it.
    let r = b.zeros::<f32>(&[1 << 30, 1 << 29]);
    assert_eq!(r.unwrap_err(), AttentionError::AllocationFailed { op: "zeros", tensor: "tensor", bytes: 1 << 61 });

    // A valid layout (2^60 elements fit i64) of 2^61 bytes per f16 array.
    let layout = CacheLayout::new(1 << 44, 16, 16, 256).unwrap();
    let r = b.kv_cache::<attention_backend::f16>(layout);
    let expected = AttentionError::AllocationFailed { op: "CpuKvCache::zeros", tensor: "key_cache", bytes: 1 << 61 };
    assert_eq!(r.map(|_| ()).unwrap_err(), expected);
    assert_eq!(CpuKvCache::<attention_backend::f16>::zeros(layout).map(|_| ()).unwrap_err(), expected);
    // 2^62 elements fit i64, but as f32 they are 2^64 bytes, past isize::MAX: refused up front.
    let layout = CacheLayout::new(1 << 50, 16, 16, 16).unwrap();
    let r = CpuKvCache::<f32>::zeros(layout).map(|_| ());
    assert_eq!(
        r.unwrap_err(),
        AttentionError::AllocationFailed { op: "CpuKvCache::zeros", tensor: "key_cache", bytes: 1 << 64 }
    );
    // The error message names the bytes.
    assert!(expected.to_string().contains(&(1u128 << 61).to_string()));
}
