//! The CPU paged attention against an independent float64 recomputation, on the grids of
//! ACCEPTANCE.md (paged attention section), on proptest-drawn batches, and on edge cases.

mod common;

use attention_backend::{AttentionParams, DType};
use common::{run_dtype, Spec};
use proptest::prelude::*;

const HEAD_PAIRS: [(usize, usize); 3] = [(4, 4), (8, 2), (16, 2)];
const HEAD_SIZES: [usize; 7] = [64, 80, 96, 112, 128, 192, 256];
const BLOCK_SIZES: [usize; 3] = [16, 32, 64];
const SOFTCAPS: [Option<f32>; 3] = [None, Some(10.0), Some(50.0)];
const WINDOWS: [Option<usize>; 2] = [None, Some(256)];
const DTYPES: [DType; 3] = [DType::F16, DType::BF16, DType::F32];

fn decode_lists() -> Vec<Vec<(usize, usize)>> {
    [vec![1328, 18, 463], vec![1, 54, 293, 70]].into_iter().map(|l| l.into_iter().map(|s| (1, s)).collect()).collect()
}

fn varlen_lists() -> Vec<Vec<(usize, usize)>> {
    vec![vec![(1, 1328), (5, 18), (129, 463)], vec![(1, 523), (1, 37), (1, 2011)]]
}

/// vLLM's `sliding_window = n` (each query sees itself and the `n - 1` keys before it).
fn params((nh, nkv): (usize, usize), hs: usize, softcap: Option<f32>, window: Option<usize>) -> AttentionParams {
    let p = AttentionParams::new(nh, nkv, hs).with_softcap(softcap);
    match window {
        Some(w) => p.with_sliding_window(w),
        None => p,
    }
}

/// Runs the cases on the available cores and fails with every failing case listed.
fn run_all(cases: Vec<(DType, Spec)>) {
    let n = cases.len();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let failures: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut bad = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((dtype, spec)) = cases.get(i) else { break };
                        if let Err(e) = run_dtype(*dtype, spec) {
                            bad.push(format!("{dtype} {spec:?}: {e}"));
                        }
                    }
                    bad
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert!(failures.is_empty(), "{} of {n} cases failed:\n{}", failures.len(), failures.join("\n"));
}

/// Decode batches: every head pair x head size x block size x batch list; (soft-cap, window,
/// dtype) rotate through all 18 combinations along the grid, and the full product of those three
/// is run for head sizes 128 and 256 with (8, 2) heads and block size 16.
#[test]
fn grid_decode() {
    let mut cases = Vec::new();
    let mut k = 0usize;
    for pair in HEAD_PAIRS {
        for hs in HEAD_SIZES {
            for bs in BLOCK_SIZES {
                for list in decode_lists() {
                    let (cap, win, dt) = (SOFTCAPS[k % 3], WINDOWS[(k / 3) % 2], DTYPES[(k / 6) % 3]);
                    cases.push((dt, Spec::new(list, bs, 2048 + 977 * k, params(pair, hs, cap, win)).seed(k as u64)));
                    k += 1;
                }
            }
        }
    }
    for hs in [128, 256] {
        for cap in SOFTCAPS {
            for win in WINDOWS {
                for dt in DTYPES {
                    for list in decode_lists() {
                        cases.push((dt, Spec::new(list, 16, 4096, params((8, 2), hs, cap, win)).seed(k as u64)));
                        k += 1;
                    }
                }
            }
        }
    }
    run_all(cases);
}

/// Varlen batches (decodes, a chunked prefill and a prefix-cached prompt mixed): head pairs x head
/// sizes 128 / 256 x block sizes 16 / 32 x soft-cap x window, dtype rotating; the other head sizes
/// and block size 64 once each with (soft-cap, window, dtype) rotating.
#[test]
fn grid_varlen() {
    let mut cases = Vec::new();
    let mut k = 1000usize;
    for pair in HEAD_PAIRS {
        for hs in [128, 256] {
            for bs in [16, 32] {
                for cap in SOFTCAPS {
                    for win in WINDOWS {
                        for list in varlen_lists() {
                            let dt = DTYPES[k % 3];
                            cases.push((
                                dt,
                                Spec::new(list, bs, 2048 + 31 * k, params(pair, hs, cap, win)).seed(k as u64),
                            ));
                            k += 1;
                        }
                    }
                }
            }
        }
    }
    for (i, hs) in HEAD_SIZES.into_iter().enumerate() {
        for bs in BLOCK_SIZES {
            let pair = HEAD_PAIRS[(i + bs) % 3];
            let (cap, win, dt) = (SOFTCAPS[k % 3], WINDOWS[k % 2], DTYPES[(k / 2) % 3]);
            cases.push((dt, Spec::new(varlen_lists()[0].clone(), bs, 8192, params(pair, hs, cap, win)).seed(k as u64)));
            k += 1;
        }
    }
    run_all(cases);
}

/// The long case [(2048, 2048), (1, 8192), (300, 4000)]. It is ~3M (query, key) pairs per head, so
/// on 2 cores it runs on a subset: (4, 4) heads with head size 128 in bf16 (no window, no cap) and
/// (8, 2) heads with head size 128, block size 32, soft-cap 50 and window 256 in f16; the full
/// grids above cover every other combination on the shorter batches.
#[test]
fn grid_long() {
    let long = vec![(2048, 2048), (1, 8192), (300, 4000)];
    run_all(vec![
        (DType::BF16, Spec::new(long.clone(), 16, 4096, params((4, 4), 128, None, None)).seed(7)),
        (DType::F16, Spec::new(long, 32, 4096, params((8, 2), 128, Some(50.0), Some(256))).seed(8)),
    ]);
}

fn spec1(reqs: Vec<(usize, usize)>, p: AttentionParams) -> Spec {
    Spec::new(reqs, 16, 256, p)
}

fn run_f32(spec: &Spec) {
    if let Err(e) = run_dtype(DType::F32, spec) {
        panic!("{spec:?}: {e}");
    }
}

#[test]
fn single_token_single_key() {
    run_f32(&spec1(vec![(1, 1)], AttentionParams::new(2, 1, 64)));
    run_f32(&spec1(vec![(1, 1)], AttentionParams::new(2, 1, 64).with_causal(false)));
}

#[test]
fn window_that_leaves_only_the_row_itself() {
    // window (0, 0): every row sees exactly its own key; the output is that key's value.
    let p = AttentionParams::new(4, 2, 32).with_window(Some(0), Some(0)).with_causal(false);
    run_f32(&spec1(vec![(1, 9), (17, 17), (3, 40)], p.clone()));
    run_f32(&spec1(vec![(5, 5)], p.with_causal(true)));
}

#[test]
fn non_causal_and_two_sided_window() {
    let reqs = vec![(1, 30), (7, 7), (20, 50)];
    run_f32(&spec1(reqs.clone(), AttentionParams::new(4, 2, 64).with_causal(false)));
    run_f32(&spec1(reqs.clone(), AttentionParams::new(4, 2, 64).with_causal(false).with_window(Some(5), Some(3))));
    run_f32(&spec1(reqs, AttentionParams::new(4, 2, 64).with_window(Some(5), None)));
}

#[test]
fn softcap_with_large_logits() {
    for dt in DTYPES {
        let mut spec = spec1(vec![(1, 100), (33, 64)], AttentionParams::new(4, 1, 64).with_softcap(Some(10.0)));
        spec.q_scale = 1000.0;
        run_dtype(dt, &spec).unwrap();
        // And without a cap: scores in the thousands, still no overflow or NaN.
        spec.params.softcap = None;
        spec.q_scale = 100.0;
        run_dtype(dt, &spec).unwrap();
    }
}

#[test]
fn sinks_and_alibi() {
    let sinks = vec![-2.0, 0.0, 3.0, 25.0];
    let slopes = vec![0.5, 0.25, 0.125, 0.0625];
    let reqs = vec![(1, 20), (1, 1), (12, 40)];
    let p = AttentionParams::new(4, 2, 64);
    run_f32(&spec1(reqs.clone(), p.clone().with_sinks(Some(sinks.clone()))));
    run_f32(&spec1(reqs.clone(), p.clone().with_alibi_slopes(Some(slopes.clone()))));
    run_f32(&spec1(
        reqs,
        p.with_causal(false)
            .with_window(Some(8), Some(2))
            .with_softcap(Some(20.0))
            .with_alibi_slopes(Some(slopes))
            .with_sinks(Some(sinks)),
    ));
}

#[test]
fn empty_prefill_part_and_empty_decode_part() {
    let p = AttentionParams::new(8, 2, 64);
    let decodes_only = spec1(vec![(1, 5), (1, 70), (1, 33)], p.clone());
    let b = common::build::<f32>(&decodes_only);
    assert_eq!((b.meta.num_decodes, b.meta.num_prefills), (3, 0));
    run_f32(&decodes_only);
    let prefills_only = spec1(vec![(4, 5), (70, 70), (2, 33)], p);
    let b = common::build::<f32>(&prefills_only);
    assert_eq!((b.meta.num_decodes, b.meta.num_prefills), (0, 3));
    run_f32(&prefills_only);
}

#[test]
fn padding_only_batch() {
    // No request at all, only padding rows: nothing is written, nothing fails.
    let mut spec = spec1(vec![], AttentionParams::new(2, 2, 16));
    spec.pad = 4;
    run_f32(&spec);
}

#[test]
fn odd_head_and_block_sizes() {
    for (hs, bs) in [(8, 1), (24, 3), (40, 5), (200, 48)] {
        let mut spec = Spec::new(vec![(1, 17), (9, 30), (6, 6)], bs, 512, AttentionParams::new(6, 3, hs));
        spec.seed = hs as u64;
        run_f32(&spec);
    }
}

fn arb_spec() -> impl Strategy<Value = (DType, Spec)> {
    let req = (1usize..40, 0usize..90).prop_map(|(q, ctx)| (q, q + ctx));
    (
        proptest::collection::vec(req, 0..5),
        1usize..4,
        prop_oneof![Just(1usize), Just(2), Just(3), Just(4), Just(8)],
        prop_oneof![Just(8usize), Just(24), Just(64), Just(80), Just(128)],
        prop_oneof![Just(1usize), Just(7), Just(16), Just(32), Just(64)],
        (any::<bool>(), proptest::option::of(0usize..40), proptest::option::of(0usize..40)),
        (proptest::option::of(1.0f32..60.0), any::<bool>(), any::<bool>(), 0usize..4, 0u8..3),
        any::<u64>(),
    )
        .prop_map(|(mut reqs, nkv, group, hs, bs, (causal, wl, wr), (cap, alibi, sinks, pad, dt), seed)| {
            // decodes first, as the batch reorder guarantees.
            reqs.sort_by_key(|r| r.0 != 1);
            let nh = nkv * group;
            let mut p = AttentionParams::new(nh, nkv, hs).with_causal(causal).with_window(wl, wr).with_softcap(cap);
            if alibi {
                p = p.with_alibi_slopes(Some((0..nh).map(|h| 0.5f32.powi(h as i32 + 1)).collect()));
            }
            if sinks {
                p = p.with_sinks(Some((0..nh).map(|h| h as f32 - 1.5).collect()));
            }
            let mut spec = Spec::new(reqs, bs, 3000, p).seed(seed);
            spec.pad = pad;
            (DTYPES[dt as usize], spec)
        })
}

proptest! {
    // 96 cases unless PROPTEST_CASES says otherwise (`cargo xtask fuzz` raises it).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(96),
        ..ProptestConfig::default()
    })]

    /// Random varlen batches (decodes, prefills, prefix-cached prompts), head counts, GQA ratios,
    /// head and block sizes, masks, caps, ALiBi, sinks, padding and dtypes, over shuffled blocks.
    #[test]
    fn random_batches_match_f64((dtype, spec) in arb_spec()) {
        if let Err(e) = run_dtype(dtype, &spec) {
            prop_assert!(false, "{}", e);
        }
    }
}
