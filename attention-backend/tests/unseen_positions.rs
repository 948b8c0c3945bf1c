//! ACCEPTANCE.md, "Unseen positions", on the CPU backend: a cache holds stale and uninitialised
//! data, and nothing a row cannot see may reach it.
//!
//! For a target row, every position it cannot see is filled with NaN, then with +Inf (keys and
//! values), one class at a time and all classes together:
//! - `Before`: its request's keys left of its window;
//! - `After`: its request's keys right of what it sees (the causal future among the step's own new
//!   tokens, or past a two-sided window);
//! - `Tail`: the unused slots of every request's last block;
//! - `Other`: every other request's keys (cached and new), the blocks no request uses, and the
//!   stale block-table entries past each row's used blocks.
//!
//! The same step is run with those positions zeroed instead. Every row whose visible keys are all
//! clean (the target row always is) must be finite and bit-identical, output and lse, to that run.

use attention_backend::ndarray::{Array2, Array3, Array4};
use attention_backend::{bf16, cpu, AttentionMetadata, AttentionParams, BlockTable, CpuKvCache, Element, SlotMapping};

const NKV: usize = 2;
const NH: usize = 4;
const HS: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Before,
    After,
    Tail,
    Other,
}

const CLASSES: [Class; 4] = [Class::Before, Class::After, Class::Tail, Class::Other];

/// Keys row `pos` of a `seq_len`-key request sees, written out from the `AttentionParams` docs
/// (not shared with the crate): `j <= pos` when causal, `pos - left <= j <= pos + right`.
fn visible(p: &AttentionParams, pos: usize, seq_len: usize) -> Option<(usize, usize)> {
    let mut hi = seq_len - 1;
    if p.causal {
        hi = hi.min(pos);
    }
    if let Some(r) = p.window_right {
        hi = hi.min(pos + r);
    }
    let lo = p.window_left.map_or(0, |l| pos.saturating_sub(l));
    (lo <= hi).then_some((lo, hi))
}

/// splitmix64, deterministic test data.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn value(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    }
}

struct Case {
    name: &'static str,
    /// `(q_len, seq_len)`, decodes first.
    reqs: Vec<(usize, usize)>,
    block_size: usize,
    params: AttentionParams,
    /// Every `stride`-th row is a target (1 = every row).
    stride: usize,
}

/// The clean step: block tables over a shuffled pool with spare blocks and one stale column, finite
/// data everywhere (every cache slot, every new token).
struct Base {
    meta: AttentionMetadata,
    /// Per request, its block-table row (used blocks then the stale column).
    rows: Vec<Vec<i32>>,
    num_blocks: usize,
    spare: Vec<usize>,
    kc: Array4<f32>,
    vc: Array4<f32>,
    query: Array3<f32>,
    key: Array3<f32>,
    value: Array3<f32>,
}

fn base(case: &Case, seed: u64) -> Base {
    let bs = case.block_size;
    let mut g = Gen(seed);
    let needed: Vec<usize> = case.reqs.iter().map(|&(_, s)| s.div_ceil(bs)).collect();
    let num_blocks = needed.iter().sum::<usize>() + 3;
    let mut pool: Vec<usize> = (0..num_blocks).collect();
    for i in (1..pool.len()).rev() {
        pool.swap(i, g.next() as usize % (i + 1));
    }
    let spare = pool[num_blocks - 3..].to_vec();
    let mut next = 0;
    let mut rows = Vec::new();
    for &n in &needed {
        let mut row: Vec<i32> = pool[next..next + n].iter().map(|&b| b as i32).collect();
        next += n;
        // A stale entry past the used ones, naming a spare block.
        row.push(spare[rows.len() % 3] as i32);
        rows.push(row);
    }
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let padded: Vec<Vec<i32>> = rows
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.resize(width, spare[0] as i32);
            r
        })
        .collect();

    let shape = [num_blocks, bs, NKV, HS];
    let kc = Array4::from_shape_fn(shape, |_| g.value());
    let vc = Array4::from_shape_fn(shape, |_| g.value());
    let num_actual: usize = case.reqs.iter().map(|r| r.0).sum();
    let num_tokens = num_actual + 2;
    let query = Array3::from_shape_fn((num_tokens, NH, HS), |_| g.value());
    let key = Array3::from_shape_fn((num_tokens, NKV, HS), |_| g.value());
    let value = Array3::from_shape_fn((num_tokens, NKV, HS), |_| g.value());
    let mut slots = vec![-1i64; num_tokens];
    let mut qsl = vec![0i32];
    let mut t = 0;
    for (r, &(q, s)) in case.reqs.iter().enumerate() {
        for i in 0..q {
            let pos = s - q + i;
            slots[t + i] = (rows[r][pos / bs] as usize * bs + pos % bs) as i64;
        }
        t += q;
        qsl.push(t as i32);
    }
    let seq_lens = case.reqs.iter().map(|r| r.1 as i32).collect();
    let meta = AttentionMetadata::new(qsl, seq_lens, BlockTable::from_rows(&padded), SlotMapping::new(slots), 1)
        .expect("valid step");
    Base { meta, rows, num_blocks, spare, kc, vc, query, key, value }
}

/// Where a (request, position)'s key and value live: a cache slot (cached) or a row of the step's
/// `key` / `value` (new this step).
enum Loc {
    Cache(usize, usize),
    Token(usize),
}

fn loc(case: &Case, b: &Base, req: usize, pos: usize) -> Loc {
    let (q, s) = case.reqs[req];
    let context = s - q;
    if pos >= context {
        Loc::Token(b.meta.query_start_loc[req] as usize + pos - context)
    } else {
        let bs = case.block_size;
        Loc::Cache(b.rows[req][pos / bs] as usize, pos % bs)
    }
}

/// Runs the step with every location of `classes` (for target `(req, row)`) set to `fill`.
fn run<T: Element>(
    case: &Case,
    b: &Base,
    target: (usize, usize),
    classes: &[Class],
    fill: f32,
) -> (Array3<T>, Array2<f32>, usize) {
    let bs = case.block_size;
    let (mut kc, mut vc) = (b.kc.clone(), b.vc.clone());
    let (mut key, mut value) = (b.key.clone(), b.value.clone());
    let mut poisoned = 0;
    let mut set = |l: Loc| {
        poisoned += 1;
        match l {
            Loc::Cache(blk, off) => {
                kc.slice_each_axis_mut(|ax| match ax.axis.index() {
                    0 => (blk..blk + 1).into(),
                    1 => (off..off + 1).into(),
                    _ => (..).into(),
                })
                .fill(fill);
                vc.slice_each_axis_mut(|ax| match ax.axis.index() {
                    0 => (blk..blk + 1).into(),
                    1 => (off..off + 1).into(),
                    _ => (..).into(),
                })
                .fill(fill);
            }
            Loc::Token(t) => {
                key.index_axis_mut(attention_backend::ndarray::Axis(0), t).fill(fill);
                value.index_axis_mut(attention_backend::ndarray::Axis(0), t).fill(fill);
            }
        }
    };
    let (treq, trow) = target;
    let (tq, ts) = case.reqs[treq];
    let (lo, hi) = visible(&case.params, ts - tq + trow, ts).expect("target rows see a key");
    for &c in classes {
        match c {
            Class::Before => (0..lo).for_each(|p| set(loc(case, b, treq, p))),
            Class::After => (hi + 1..ts).for_each(|p| set(loc(case, b, treq, p))),
            Class::Tail => {
                for (r, &(_, s)) in case.reqs.iter().enumerate() {
                    let last = s.div_ceil(bs) - 1;
                    for off in s - last * bs..bs {
                        set(Loc::Cache(b.rows[r][last] as usize, off));
                    }
                }
            }
            Class::Other => {
                for (r, &(_, s)) in case.reqs.iter().enumerate().filter(|(r, _)| *r != treq) {
                    (0..s).for_each(|p| set(loc(case, b, r, p)));
                }
                for &blk in &b.spare {
                    (0..bs).for_each(|off| set(Loc::Cache(blk, off)));
                }
            }
        }
    }
    let conv4 = |a: &Array4<f32>| a.mapv(T::from_f32);
    let conv3 = |a: &Array3<f32>| a.mapv(T::from_f32);
    let mut cache = CpuKvCache::from_arrays(conv4(&kc), conv4(&vc)).unwrap();
    assert_eq!(cache.layout().num_blocks, b.num_blocks);
    let n = b.meta.num_tokens();
    let mut out = Array3::<T>::from_elem((n, NH, HS), T::from_f32(0.0));
    let mut lse = Array2::<f32>::zeros((n, NH));
    cpu::forward(
        &b.meta,
        &case.params,
        cpu::ForwardIo {
            query: conv3(&b.query).view(),
            key: conv3(&key).view(),
            value: conv3(&value).view(),
            cache: &mut cache,
            out: out.view_mut(),
            lse: Some(lse.view_mut()),
        },
    )
    .unwrap();
    (out, lse, poisoned)
}

/// Whether row `row` of request `req` sees only clean keys when `classes` are poisoned for `target`.
fn clean(case: &Case, target: (usize, usize), classes: &[Class], req: usize, row: usize) -> bool {
    let (q, s) = case.reqs[req];
    let Some((lo, hi)) = visible(&case.params, s - q + row, s) else { return true };
    if req != target.0 {
        return !classes.contains(&Class::Other);
    }
    let (tq, ts) = case.reqs[target.0];
    let (tlo, thi) = visible(&case.params, ts - tq + target.1, ts).unwrap();
    let dirty_before = classes.contains(&Class::Before) && lo < tlo;
    let dirty_after = classes.contains(&Class::After) && hi > thi;
    !(dirty_before || dirty_after)
}

fn check_case<T: Element>(case: &Case, seed: u64) {
    let b = base(case, seed);
    let mut checked_rows = 0usize;
    let mut poisoned_total = 0usize;
    for treq in 0..case.reqs.len() {
        let (q, _) = case.reqs[treq];
        for trow in (0..q).filter(|i| i % case.stride == 0 || *i == q - 1) {
            let target = (treq, trow);
            let sets: Vec<Vec<Class>> =
                CLASSES.iter().map(|&c| vec![c]).chain(std::iter::once(CLASSES.to_vec())).collect();
            for classes in &sets {
                let (zero_out, zero_lse, n) = run::<T>(case, &b, target, classes, 0.0);
                if n == 0 {
                    continue; // this class is empty for this target
                }
                poisoned_total += n;
                for fill in [f32::NAN, f32::INFINITY] {
                    let (out, lse, _) = run::<T>(case, &b, target, classes, fill);
                    let mut t = 0;
                    for (r, &(rq, _)) in case.reqs.iter().enumerate() {
                        for i in 0..rq {
                            if clean(case, target, classes, r, i) {
                                checked_rows += 1;
                                for h in 0..NH {
                                    for d in 0..HS {
                                        let (x, z) = (out[[t + i, h, d]].to_f32(), zero_out[[t + i, h, d]].to_f32());
                                        assert!(
                                            x.is_finite() && x.to_bits() == z.to_bits(),
                                            "{} {:?}: target {target:?}, classes {classes:?}, fill {fill}: \
                                             request {r} row {i} head {h} [{d}] = {x}, zeroed run {z}",
                                            case.name,
                                            T::DTYPE
                                        );
                                    }
                                    let (x, z) = (lse[[t + i, h]], zero_lse[[t + i, h]]);
                                    assert!(
                                        x.is_finite() && x.to_bits() == z.to_bits(),
                                        "{} lse: target {target:?}, classes {classes:?}, fill {fill}: request {r} \
                                         row {i} head {h} = {x}, zeroed run {z}",
                                        case.name
                                    );
                                }
                            } else {
                                assert!(target != (r, i), "{}: the target row counted as dirty", case.name);
                            }
                        }
                        t += rq;
                    }
                }
            }
        }
    }
    assert!(checked_rows > 0 && poisoned_total > 0, "{}: nothing was tested", case.name);
}

fn cases() -> Vec<Case> {
    let p = || AttentionParams::new(NH, NKV, HS);
    vec![
        Case {
            name: "decode",
            reqs: vec![(1, 37), (1, 5), (1, 64), (1, 1), (1, 17)],
            block_size: 16,
            params: p(),
            stride: 1,
        },
        Case { name: "prefill", reqs: vec![(20, 20), (7, 7), (3, 3)], block_size: 8, params: p(), stride: 1 },
        Case {
            name: "chunked prefill",
            reqs: vec![(1, 30), (9, 40), (13, 30), (4, 5)],
            block_size: 8,
            params: p(),
            stride: 1,
        },
        Case {
            name: "sliding window",
            reqs: vec![(1, 50), (1, 4), (9, 40), (13, 30), (20, 20)],
            block_size: 8,
            params: p().with_sliding_window(6),
            stride: 1,
        },
        Case {
            name: "two-sided window, not causal",
            reqs: vec![(12, 30), (5, 9), (1, 20)],
            block_size: 4,
            params: p().with_causal(false).with_window(Some(4), Some(3)),
            stride: 1,
        },
        Case {
            name: "soft-cap",
            reqs: vec![(1, 33), (10, 25), (6, 6)],
            block_size: 8,
            params: p().with_softcap(Some(5.0)).with_sliding_window(10),
            stride: 1,
        },
        Case {
            name: "soft-cap, sinks and ALiBi",
            reqs: vec![(1, 19), (8, 21)],
            block_size: 16,
            params: p()
                .with_softcap(Some(20.0))
                .with_sinks(Some(vec![0.5, -1.0, 2.0, 0.0]))
                .with_alibi_slopes(Some(vec![0.5, 0.25, 0.125, 0.0625])),
            stride: 1,
        },
        Case {
            name: "long chunked prefill (several row chunks per request)",
            reqs: vec![(1, 90), (150, 200)],
            block_size: 16,
            params: p(),
            stride: 13,
        },
        Case {
            name: "long prefill, window",
            reqs: vec![(140, 140)],
            block_size: 16,
            params: p().with_sliding_window(40),
            stride: 11,
        },
    ]
}

#[test]
fn unseen_positions_never_reach_a_row_f32() {
    for (k, case) in cases().iter().enumerate() {
        check_case::<f32>(case, k as u64);
    }
}

#[test]
fn unseen_positions_never_reach_a_row_bf16() {
    for (k, case) in cases().iter().enumerate() {
        check_case::<bf16>(case, 100 + k as u64);
    }
}

/// The reproduction: one 2-token prompt, NaN in token 1's value; row 0 must not see it.
#[test]
fn nan_in_the_causal_future_of_a_prompt() {
    let p = AttentionParams::new(1, 1, 4);
    let meta =
        AttentionMetadata::new(vec![0, 2], vec![2], BlockTable::from_rows(&[vec![0]]), SlotMapping::new(vec![0, 1]), 1)
            .unwrap();
    let mut cache = CpuKvCache::<f32>::zeros(attention_backend::CacheLayout::new(1, 4, 1, 4).unwrap()).unwrap();
    let query = Array3::from_elem((2, 1, 4), 0.5f32);
    let key = Array3::from_elem((2, 1, 4), 1.0f32);
    let mut value = Array3::from_elem((2, 1, 4), 3.0f32);
    value[[1, 0, 2]] = f32::NAN;
    let mut out = Array3::zeros((2, 1, 4));
    cpu::forward(
        &meta,
        &p,
        cpu::ForwardIo {
            query: query.view(),
            key: key.view(),
            value: value.view(),
            cache: &mut cache,
            out: out.view_mut(),
            lse: None,
        },
    )
    .unwrap();
    assert!(out.index_axis(attention_backend::ndarray::Axis(0), 0).iter().all(|&x| x == 3.0));
    assert!(out[[1, 0, 2]].is_nan());
}
