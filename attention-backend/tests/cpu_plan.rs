//! The CPU backend's plan/run split: one contract check per step, each layer run on the engine's
//! own ndarray views (strided slices of a fused QKV projection included), bit-identical to
//! `cpu::forward`; plus the run-time API's step checks on `kv_cache_update` and the refused
//! sliding window of 0.

mod common;

use attention_backend::ndarray::{concatenate, Array2, Array3, Array4, ArrayView3, Axis, Slice};
use attention_backend::{
    cpu, AttentionError, AttentionMetadata, AttentionParams, Backend, BlockTable, CacheLayout, CpuKvCache, SlotMapping,
};
use common::{build, Built, Spec};

const NH: usize = 8;
const NKV: usize = 2;
const HS: usize = 64;

fn bits<'a>(it: impl IntoIterator<Item = &'a f32>) -> Vec<u32> {
    it.into_iter().map(|x| x.to_bits()).collect()
}

fn params() -> AttentionParams {
    AttentionParams::new(NH, NKV, HS).with_softcap(Some(20.0)).with_sliding_window(50)
}

/// A mixed batch (two decodes, a chunked prefill, a prompt) with two padding rows.
fn batch() -> Built<f32> {
    let mut spec = Spec::new(vec![(1, 40), (1, 3), (70, 130), (9, 9)], 16, 64, params()).seed(11);
    spec.pad = 2;
    build::<f32>(&spec)
}

/// Heads `lo..hi` of every token of a fused projection: a strided view, no copy.
fn heads(fused: &Array3<f32>, lo: usize, hi: usize) -> ArrayView3<'_, f32> {
    fused.slice_axis(Axis(1), Slice::from(lo..hi))
}

/// `cpu::forward` on packed arrays: the expected result.
fn forward_packed(b: &Built<f32>, p: &AttentionParams) -> (CpuKvCache<f32>, Array3<f32>, Array2<f32>) {
    let n = b.meta.num_tokens();
    let mut cache = b.cache.clone();
    let mut out = Array3::from_elem((n, NH, HS), f32::NAN);
    let mut lse = Array2::from_elem((n, NH), f32::NAN);
    let io = cpu::ForwardIo {
        query: b.query.view(),
        key: b.key.view(),
        value: b.value.view(),
        cache: &mut cache,
        out: out.view_mut(),
        lse: Some(lse.view_mut()),
    };
    cpu::forward(&b.meta, p, io).unwrap();
    (cache, out, lse)
}

#[test]
fn planned_layers_on_fused_qkv_views_match_forward_bit_for_bit() {
    let b = batch();
    let p = params();
    let n = b.meta.num_tokens();
    let (want_cache, want_out, want_lse) = forward_packed(&b, &p);

    // One fused projection [n, NH + 2 NKV, HS]: query heads, then keys, then values.
    let fused = concatenate(Axis(1), &[b.query.view(), b.key.view(), b.value.view()]).unwrap();
    // The outputs are strided views too: every other row of a taller buffer, every other column of
    // a wider lse.
    let mut out_buf = Array3::from_elem((2 * n, NH, HS), f32::NAN);
    let mut lse_buf = Array2::from_elem((n, 2 * NH), f32::NAN);

    let plan = cpu::plan(&b.meta, b.cache.layout()).unwrap();
    // Two layers over one plan: each gets its own cache, both equal to the packed result.
    for _layer in 0..2 {
        let mut cache = b.cache.clone();
        let (key_cache, value_cache) = cache.key_value_mut();
        let layer = cpu::LayerViews {
            query: heads(&fused, 0, NH),
            new_kv: Some((heads(&fused, NH, NH + NKV), heads(&fused, NH + NKV, NH + 2 * NKV))),
            key_cache,
            value_cache,
            kv_scales: None,
            out: out_buf.slice_axis_mut(Axis(0), Slice::new(0, None, 2)),
            lse: Some(lse_buf.slice_axis_mut(Axis(1), Slice::new(0, None, 2))),
        };
        plan.run(&p, layer).unwrap();
        assert_eq!(bits(cache.key()), bits(want_cache.key()));
        assert_eq!(bits(cache.value()), bits(want_cache.value()));
        assert_eq!(bits(out_buf.slice_axis(Axis(0), Slice::new(0, None, 2))), bits(&want_out));
        assert_eq!(bits(lse_buf.slice_axis(Axis(1), Slice::new(0, None, 2))), bits(&want_lse));
        // Rows between the output's rows and the lse's other columns were never touched.
        assert!(out_buf.slice_axis(Axis(0), Slice::new(1, None, 2)).iter().all(|x| x.is_nan()));
        assert!(lse_buf.slice_axis(Axis(1), Slice::new(1, None, 2)).iter().all(|x| x.is_nan()));
    }

    // Attention only (the caches already hold the keys): same result again.
    let mut cache = want_cache.clone();
    let (key_cache, value_cache) = cache.key_value_mut();
    let mut out = Array3::from_elem((n, NH, HS), f32::NAN);
    let layer = cpu::LayerViews {
        query: heads(&fused, 0, NH),
        new_kv: None,
        key_cache,
        value_cache,
        kv_scales: None,
        out: out.view_mut(),
        lse: None,
    };
    plan.run(&p, layer).unwrap();
    assert_eq!(bits(&out), bits(&want_out));

    // A planner owning its scratch plans the same step the same way.
    let mut planner = cpu::StepPlanner::new();
    let plan = planner.plan(&b.meta, b.cache.layout()).unwrap();
    assert_eq!(plan.layout(), b.cache.layout());
    assert_eq!(plan.meta().num_tokens(), n);
}

#[test]
fn run_checks_shapes_and_params_before_writing() {
    let b = batch();
    let p = params();
    let n = b.meta.num_tokens();
    let plan = cpu::plan(&b.meta, b.cache.layout()).unwrap();
    let mut cache = b.cache.clone();
    let mut out = Array3::from_elem((n, NH, HS), f32::NAN);
    let short_key = b.key.slice_axis(Axis(0), Slice::from(..n - 1));

    // Each case breaks one thing; nothing may be written.
    let run = |cache: &mut CpuKvCache<f32>, out: &mut Array3<f32>, case: usize| {
        let (key_cache, value_cache) = cache.key_value_mut();
        let mut p = p.clone();
        let mut new_kv = Some((b.key.view(), b.value.view()));
        match case {
            0 => new_kv = Some((short_key, b.value.view())),
            1 => p = AttentionParams::new(NH, NKV, HS + 1),
            2 => p = p.with_sliding_window(0),
            _ => {}
        }
        let layer = cpu::LayerViews {
            query: b.query.view(),
            new_kv,
            key_cache,
            value_cache,
            kv_scales: None,
            out: out.view_mut(),
            lse: None,
        };
        plan.run(&p, layer)
    };
    let e = run(&mut cache, &mut out, 0).unwrap_err();
    assert!(matches!(e, AttentionError::ShapeMismatch { tensor: "key", .. }), "{e:?}");
    let e = run(&mut cache, &mut out, 1).unwrap_err();
    assert!(matches!(e, AttentionError::InvalidArgument { .. }), "{e:?}");
    let e = run(&mut cache, &mut out, 2).unwrap_err();
    assert!(
        matches!(e, AttentionError::InvalidArgument { ref what, .. } if what.contains("sliding window 0")),
        "{e:?}"
    );
    assert_eq!(bits(cache.key()), bits(b.cache.key()), "cache written before an error");
    assert!(out.iter().all(|x| x.is_nan()), "out written before an error");

    // Caches of another layout than the plan's.
    let mut small = CpuKvCache::<f32>::zeros(CacheLayout::new(8, 16, NKV, HS).unwrap()).unwrap();
    let (key_cache, value_cache) = small.key_value_mut();
    let layer = cpu::LayerViews {
        query: b.query.view(),
        new_kv: None,
        key_cache,
        value_cache,
        kv_scales: None,
        out: out.view_mut(),
        lse: None,
    };
    let e = plan.run(&p, layer).unwrap_err();
    assert!(matches!(e, AttentionError::ShapeMismatch { tensor: "key_cache", .. }), "{e:?}");

    // The plan itself refuses a step that breaks the contract (a slot off its block).
    let mut bad = b.meta.clone();
    let mut slots = bad.slot_mapping.as_slice().to_vec();
    slots[0] ^= 1;
    bad.slot_mapping = SlotMapping::new(slots);
    let e = cpu::plan(&bad, b.cache.layout()).unwrap_err();
    assert!(matches!(e, AttentionError::SlotMismatch { index: 0, .. }), "{e:?}");
}

#[test]
fn sliding_window_zero_is_refused() {
    let b = batch();
    let n = b.meta.num_tokens();
    let zero = params().with_sliding_window(0);
    assert!(matches!(zero.check("test"), Err(AttentionError::InvalidArgument { .. })));
    let mut cache = b.cache.clone();
    let mut out = Array3::from_elem((n, NH, HS), f32::NAN);
    let io = cpu::ForwardIo {
        query: b.query.view(),
        key: b.key.view(),
        value: b.value.view(),
        cache: &mut cache,
        out: out.view_mut(),
        lse: None,
    };
    let e = cpu::forward(&b.meta, &zero, io).unwrap_err();
    assert!(matches!(e, AttentionError::InvalidArgument { op: "forward", .. }), "{e:?}");
    // Window 1 (the query alone) is meaningful, and a later window replaces the refused one.
    assert!(params().with_sliding_window(1).check("test").is_ok());
    assert!(zero.clone().with_sliding_window(4).check("test").is_ok());
    assert!(zero.with_window(None, None).check("test").is_ok());
}

#[test]
fn kv_cache_update_from_a_step_applies_the_step_contract() {
    let backend = Backend::cpu();
    let layout = CacheLayout::new(4, 4, 1, 2).unwrap();
    let mut cache = backend.kv_cache::<f32>(layout).unwrap();
    // One request of 2 tokens in block 1, whose slots point into block 0: inside the cache, but
    // not where the block table says.
    let meta =
        AttentionMetadata::new(vec![0, 2], vec![2], BlockTable::from_rows(&[vec![1]]), SlotMapping::new(vec![0, 1]), 0)
            .unwrap();
    let kv = backend.tensor(Array3::from_elem((2, 1, 2), 1.0f32)).unwrap();
    let step = backend.prepare_step(meta.clone()).unwrap();
    let e = backend.kv_cache_update(&kv, &kv, &mut cache, &step).unwrap_err();
    assert!(matches!(e, AttentionError::SlotMismatch { index: 0, expected: 4, .. }), "{e:?}");
    let host = backend.kv_cache_to_host(&cache).unwrap();
    assert!(host.key().iter().all(|&x| x == 0.0), "cache written before the error");

    // The same slots as a plain slot mapping only need to be inside the cache.
    let slots = backend.slot_mapping(meta.slot_mapping.clone()).unwrap();
    backend.kv_cache_update(&kv, &kv, &mut cache, &slots).unwrap();

    // A step that obeys the contract writes, and keeps doing so once checked.
    let good =
        AttentionMetadata::new(vec![0, 2], vec![2], BlockTable::from_rows(&[vec![1]]), SlotMapping::new(vec![4, 5]), 0)
            .unwrap();
    let step = backend.prepare_step(good).unwrap();
    for _ in 0..2 {
        backend.kv_cache_update(&kv, &kv, &mut cache, &step).unwrap();
    }
    let host = backend.kv_cache_to_host(&cache).unwrap();
    let want = Array4::from_shape_fn((4, 4, 1, 2), |(b, o, _, _)| if b < 2 && o < 2 { 1.0f32 } else { 0.0 });
    assert_eq!(host.key(), want.view());
}
