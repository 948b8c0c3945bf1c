//! The CPU backend on rayon: results are bit-identical whatever pool (and so whichever thread)
//! runs the work, run after run, and a request's rows do not depend on the rest of the batch.

mod common;

use attention_backend::ndarray::{Array2, Array3, Axis};
use attention_backend::{cpu, AttentionMetadata, AttentionParams, BlockTable, SlotMapping};
use common::{build, Built, Spec};

fn bits<'a>(it: impl IntoIterator<Item = &'a f32>) -> Vec<u32> {
    it.into_iter().map(|x| x.to_bits()).collect()
}

/// A mixed batch (decodes, a long chunked prefill spanning several row chunks, a short prompt),
/// run through `forward`, so the cache holds every request's keys afterwards.
fn batch(p: &AttentionParams) -> (Built<f32>, Array3<f32>, Array2<f32>) {
    let spec = Spec::new(vec![(1, 70), (1, 3), (150, 260), (9, 9)], 16, 256, p.clone()).seed(5);
    let mut b = build::<f32>(&spec);
    let n = b.meta.num_tokens();
    let mut out = Array3::from_elem((n, p.num_heads, p.head_size), f32::NAN);
    let mut lse = Array2::from_elem((n, p.num_heads), f32::NAN);
    cpu::forward(
        &b.meta,
        p,
        cpu::ForwardIo {
            query: b.query.view(),
            key: b.key.view(),
            value: b.value.view(),
            cache: &mut b.cache,
            out: out.view_mut(),
            lse: Some(lse.view_mut()),
        },
    )
    .unwrap();
    (b, out, lse)
}

fn params() -> AttentionParams {
    AttentionParams::new(8, 2, 64).with_softcap(Some(30.0)).with_sliding_window(100)
}

#[test]
fn bit_identical_on_any_pool_and_run_after_run() {
    let p = params();
    let (b, out, lse) = batch(&p);
    let attend = || {
        let n = b.meta.num_tokens();
        let mut o = Array3::from_elem((n, p.num_heads, p.head_size), f32::NAN);
        let mut l = Array2::from_elem((n, p.num_heads), f32::NAN);
        cpu::paged_attention(
            &b.meta,
            &p,
            cpu::AttentionIo { query: b.query.view(), cache: &b.cache, out: o.view_mut(), lse: Some(l.view_mut()) },
        )
        .unwrap();
        (o, l)
    };
    for threads in [1, 2, 3, 5] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let (o, l) = pool.install(|| {
            assert_eq!(cpu::num_threads(), threads, "num_threads() is the pool the work runs in");
            attend()
        });
        assert_eq!(bits(&o), bits(&out), "{threads} threads");
        assert_eq!(bits(&l), bits(&lse), "{threads} threads");
    }
    for _ in 0..3 {
        let (o, l) = attend();
        assert_eq!(bits(&o), bits(&out));
        assert_eq!(bits(&l), bits(&lse));
    }
    assert_eq!(cpu::num_threads(), rayon::current_num_threads());
}

/// Each request alone (its own metadata over the same cache) gives exactly its rows of the batch.
#[test]
fn batch_invariant() {
    let p = params();
    let (b, out, lse) = batch(&p);
    let m = &b.meta;
    for r in 0..m.num_reqs() {
        let (a, e) = (m.query_start_loc[r] as usize, m.query_start_loc[r + 1] as usize);
        let q = e - a;
        let alone = AttentionMetadata::new(
            vec![0, q as i32],
            vec![m.seq_lens[r]],
            BlockTable::from_rows(&[m.block_table.row(r)]),
            SlotMapping::new(m.slot_mapping.as_slice()[a..e].to_vec()),
            1,
        )
        .unwrap();
        let query = b.query.slice_axis(Axis(0), (a..e).into()).to_owned();
        let mut o = Array3::from_elem((q, p.num_heads, p.head_size), f32::NAN);
        let mut l = Array2::from_elem((q, p.num_heads), f32::NAN);
        cpu::paged_attention(
            &alone,
            &p,
            cpu::AttentionIo { query: query.view(), cache: &b.cache, out: o.view_mut(), lse: Some(l.view_mut()) },
        )
        .unwrap();
        assert_eq!(bits(&o), bits(out.slice_axis(Axis(0), (a..e).into())), "request {r}");
        assert_eq!(bits(&l), bits(lse.slice_axis(Axis(0), (a..e).into())), "request {r}");
    }
}
