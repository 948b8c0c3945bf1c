//! Every argument error of the attention calls: a typed error, returned before anything is
//! written (cache, out and lse are checked unchanged).

use attention_backend::ndarray::{Array2, Array3, Array4};
use attention_backend::validate::{self, TensorSpec};
use attention_backend::{
    cpu, AttentionError, AttentionMetadata, AttentionParams, BlockTable, CacheLayout, CpuKvCache, DType, SlotMapping,
};

const NH: usize = 4;
const NKV: usize = 2;
const HS: usize = 16;
const BS: usize = 4;
const NUM_BLOCKS: usize = 8;

/// Two requests: a decode (seq 5) and a prefill (3 new of 6), one padding token.
fn meta() -> AttentionMetadata {
    let table = BlockTable::from_rows(&[vec![3, 1], vec![0, 6]]);
    // request 0 writes position 4 -> block 1 offset 0; request 1 positions 3..6 -> block 0 off 3,
    // block 6 off 0 and 1.
    let slots = SlotMapping::new(vec![4, 3, 24, 25, -1]);
    AttentionMetadata::new(vec![0, 1, 4], vec![5, 6], table, slots, 1).unwrap()
}

struct Setup {
    params: AttentionParams,
    cache: CpuKvCache<f32>,
    meta: AttentionMetadata,
    query: Array3<f32>,
    key: Array3<f32>,
    value: Array3<f32>,
    out: Array3<f32>,
    lse: Array2<f32>,
}

/// A cache whose every key is 1 and every value 2, so a valid call outputs 2 everywhere.
fn cache(num_blocks: usize) -> CpuKvCache<f32> {
    let shape = CacheLayout::new(num_blocks, BS, NKV, HS).unwrap().shape();
    CpuKvCache::from_arrays(Array4::from_elem(shape, 1.0), Array4::from_elem(shape, 2.0)).unwrap()
}

fn setup() -> Setup {
    let meta = meta();
    let n = meta.num_tokens();
    Setup {
        params: AttentionParams::new(NH, NKV, HS),
        cache: cache(NUM_BLOCKS),
        query: Array3::from_elem((n, NH, HS), 0.5),
        key: Array3::from_elem((n, NKV, HS), 1.0),
        value: Array3::from_elem((n, NKV, HS), 2.0),
        out: Array3::from_elem((n, NH, HS), f32::NAN),
        lse: Array2::from_elem((n, NH), f32::NAN),
        meta,
    }
}

/// Runs `forward` and checks that on error nothing was written.
fn forward(s: &mut Setup) -> Result<(), AttentionError> {
    let before = s.cache.clone();
    let r = cpu::forward(
        &s.meta,
        &s.params,
        cpu::ForwardIo {
            query: s.query.view(),
            key: s.key.view(),
            value: s.value.view(),
            cache: &mut s.cache,
            out: s.out.view_mut(),
            lse: Some(s.lse.view_mut()),
        },
    );
    if r.is_err() {
        assert_eq!(s.cache.key(), before.key(), "cache written before an error");
        assert_eq!(s.cache.value(), before.value(), "cache written before an error");
        assert!(s.out.iter().all(|x| x.is_nan()), "out written before an error");
        assert!(s.lse.iter().all(|x| x.is_nan()), "lse written before an error");
    }
    r
}

#[test]
fn valid_setup_runs_and_leaves_padding_alone() {
    let mut s = setup();
    forward(&mut s).unwrap();
    let real = s.meta.num_actual_tokens;
    assert!(s.out.outer_iter().take(real).all(|r| r.iter().all(|x| (x - 2.0).abs() < 1e-6)));
    assert!(s.out.outer_iter().skip(real).all(|r| r.iter().all(|x| x.is_nan())));
    assert!(s.lse.outer_iter().skip(real).all(|r| r.iter().all(|x| x.is_nan())));
}

#[test]
fn params_kv_heads_differ_from_cache() {
    let mut s = setup();
    s.params = AttentionParams::new(NH, 1, HS);
    s.query = Array3::zeros((5, NH, HS));
    assert!(matches!(forward(&mut s), Err(AttentionError::InvalidArgument { .. })));
}

#[test]
fn heads_not_divisible() {
    let mut s = setup();
    s.params = AttentionParams::new(3, NKV, HS);
    s.query = Array3::zeros((5, 3, HS));
    s.out = Array3::from_elem((5, 3, HS), f32::NAN);
    assert!(matches!(forward(&mut s), Err(AttentionError::InvalidArgument { .. })));
}

#[test]
fn query_heads_mismatch() {
    let mut s = setup();
    s.query = Array3::zeros((5, NH * 2, HS));
    assert!(matches!(forward(&mut s), Err(AttentionError::ShapeMismatch { tensor: "query", .. })));
}

#[test]
fn head_size_mismatch() {
    let mut s = setup();
    s.params = AttentionParams::new(NH, NKV, HS * 2);
    assert!(matches!(forward(&mut s), Err(AttentionError::InvalidArgument { .. })));
    let mut s = setup();
    s.out = Array3::from_elem((5, NH, HS + 1), f32::NAN);
    assert!(matches!(forward(&mut s), Err(AttentionError::ShapeMismatch { tensor: "out", .. })));
}

#[test]
fn key_value_shape_mismatch() {
    let mut s = setup();
    s.key = Array3::zeros((5, NKV + 1, HS));
    assert!(matches!(forward(&mut s), Err(AttentionError::ShapeMismatch { tensor: "key", .. })));
    let mut s = setup();
    s.value = Array3::zeros((4, NKV, HS));
    assert!(matches!(forward(&mut s), Err(AttentionError::ShapeMismatch { tensor: "value", .. })));
}

#[test]
fn lse_shape_mismatch() {
    let mut s = setup();
    s.lse = Array2::from_elem((5, NH + 1), f32::NAN);
    assert!(matches!(forward(&mut s), Err(AttentionError::ShapeMismatch { tensor: "lse", .. })));
}

#[test]
fn slot_out_of_range_cache_too_small() {
    let mut s = setup();
    s.meta.slot_mapping = SlotMapping::new(vec![4, 3, 24, (NUM_BLOCKS * BS) as i64, -1]);
    assert!(matches!(forward(&mut s), Err(AttentionError::SlotOutOfRange { index: 3, .. })));
    // The same metadata against a smaller cache.
    let mut s = setup();
    s.cache = cache(6);
    assert!(matches!(forward(&mut s), Err(AttentionError::SlotOutOfRange { .. })));
}

#[test]
fn slot_mapping_shorter_than_tokens() {
    let mut s = setup();
    s.meta.slot_mapping = SlotMapping::new(vec![4, 3, 24]);
    let n = 3;
    s.query = Array3::zeros((n, NH, HS));
    s.key = Array3::zeros((n, NKV, HS));
    s.value = Array3::zeros((n, NKV, HS));
    s.out = Array3::from_elem((n, NH, HS), f32::NAN);
    s.lse = Array2::from_elem((n, NH), f32::NAN);
    assert!(matches!(forward(&mut s), Err(AttentionError::InvalidMetadata { .. })));
    // and tensors sized for the real batch do not match the slot mapping's length
    let mut s = setup();
    s.meta.slot_mapping = SlotMapping::new(vec![4, 3, 24, 25, -1, -1]);
    assert!(matches!(forward(&mut s), Err(AttentionError::ShapeMismatch { .. })));
}

#[test]
fn bad_query_start_loc() {
    for qsl in [vec![1, 1, 4], vec![0, 3, 1], vec![0, 1, 5], vec![0, 1]] {
        let mut s = setup();
        s.meta.query_start_loc = qsl.clone();
        assert!(matches!(forward(&mut s), Err(AttentionError::InvalidMetadata { .. })), "{qsl:?}");
    }
    // seq_len shorter than the query
    let mut s = setup();
    s.meta.seq_lens = vec![5, 2];
    assert!(matches!(forward(&mut s), Err(AttentionError::InvalidMetadata { .. })));
    // the constructor refuses it as well
    let r = AttentionMetadata::new(
        vec![0, 2, 1],
        vec![5, 6],
        BlockTable::from_rows(&[[0], [1]]),
        SlotMapping::default(),
        1,
    );
    assert!(matches!(r, Err(AttentionError::InvalidMetadata { .. })));
}

#[test]
fn block_table_not_covering_a_sequence() {
    let mut s = setup();
    // request 1 has 6 tokens = 2 blocks of 4, the table only 1 column
    s.meta.block_table = BlockTable::from_rows(&[vec![3], vec![0]]);
    let e = forward(&mut s).unwrap_err();
    assert!(matches!(e, AttentionError::BlockTableTooShort { req: 0, seq_len: 5, needed: 2, columns: 1, .. }), "{e:?}");
    // a block id outside the cache
    let mut s = setup();
    s.meta.block_table = BlockTable::from_rows(&[vec![3, 1], vec![0, NUM_BLOCKS as i32]]);
    let e = forward(&mut s).unwrap_err();
    assert!(matches!(e, AttentionError::BlockOutOfRange { req: 1, index: 1, block: 8, num_blocks: 8, .. }), "{e:?}");
    let mut s = setup();
    s.meta.block_table = BlockTable::from_rows(&[vec![3, -1], vec![0, 6]]);
    let e = forward(&mut s).unwrap_err();
    assert!(matches!(e, AttentionError::BlockOutOfRange { req: 0, index: 1, block: -1, .. }), "{e:?}");
    // fewer rows than requests
    let mut s = setup();
    s.meta.block_table = BlockTable::from_rows(&[vec![3, 1]]);
    assert!(matches!(forward(&mut s), Err(AttentionError::InvalidMetadata { .. })));
}

#[test]
fn bad_params() {
    let cases = [
        AttentionParams::new(NH, NKV, HS).with_softcap(Some(0.0)),
        AttentionParams::new(NH, NKV, HS).with_scale(f32::NAN),
        AttentionParams::new(NH, NKV, HS).with_sinks(Some(vec![0.0; NH - 1])),
        AttentionParams::new(NH, NKV, HS).with_alibi_slopes(Some(vec![f32::INFINITY; NH])),
    ];
    for p in cases {
        let mut s = setup();
        s.params = p.clone();
        let e = forward(&mut s).unwrap_err();
        assert!(
            matches!(e, AttentionError::InvalidArgument { .. } | AttentionError::ShapeMismatch { tensor: "sinks", .. }),
            "{p:?}: {e}"
        );
    }
}

#[test]
fn dtype_mismatch() {
    // The typed CPU API cannot even express it (query, key, value, out and cache share `T`); the
    // shared check that the CUDA backend and the run-time API call catches it.
    let s = setup();
    let layout = *s.cache.layout();
    let shape = [5, NH, HS];
    let spec = |name, dtype| TensorSpec { name, shape: &shape, dtype };
    let r = validate::paged_attention(
        "forward",
        &s.params,
        &layout,
        DType::F32,
        validate::AttentionSpecs { query: spec("query", DType::BF16), out: spec("out", DType::F32), lse: None },
        &s.meta,
    );
    assert!(matches!(
        r,
        Err(AttentionError::DTypeMismatch { tensor: "query", expected: DType::F32, actual: DType::BF16, .. })
    ));
    let r = validate::paged_attention(
        "forward",
        &s.params,
        &layout,
        DType::F16,
        validate::AttentionSpecs { query: spec("query", DType::F16), out: spec("out", DType::F32), lse: None },
        &s.meta,
    );
    assert!(matches!(r, Err(AttentionError::DTypeMismatch { tensor: "out", .. })));
}

#[test]
fn paged_attention_alone_validates_too() {
    let mut s = setup();
    s.params = AttentionParams::new(NH, NKV, HS + 1);
    let r = cpu::paged_attention(
        &s.meta,
        &s.params,
        cpu::AttentionIo { query: s.query.view(), cache: &s.cache, out: s.out.view_mut(), lse: None },
    );
    assert!(matches!(r, Err(AttentionError::InvalidArgument { .. })));
    assert!(s.out.iter().all(|x| x.is_nan()));
}

#[test]
fn slot_that_disagrees_with_the_block_table() {
    // Request 1's first new token (position 3) belongs at block 0 offset 3 = slot 3; writing it to
    // slot 7 would leave attention reading a stale row.
    let mut s = setup();
    let m = meta();
    s.meta = AttentionMetadata::new(
        m.query_start_loc.clone(),
        m.seq_lens.clone(),
        m.block_table.clone(),
        SlotMapping::new(vec![4, 7, 24, 25, -1]),
        1,
    )
    .unwrap();
    let err = forward(&mut s).unwrap_err();
    assert!(
        matches!(err, AttentionError::SlotMismatch { index: 1, req: 1, pos: 3, slot: 7, expected: 3, .. }),
        "{err:?}"
    );
}
