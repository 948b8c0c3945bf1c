//! Unseen positions never reach an output (ACCEPTANCE.md "Unseen positions").
//!
//! A cache holds stale and uninitialised data. Each case fills cache positions with NaN and +Inf
//! (in K and V; a whole row or a single element of it) in every class a row cannot see: the unused
//! tail of each request's last block, spare blocks nobody owns and other requests' blocks, keys in
//! the causal future of the step's own tokens, keys outside the sliding window (left and right).
//! The same step then runs on a copy of the cache with those positions zeroed. Every (token, head)
//! row whose visible keys are all clean must be finite and bit-identical (output and LSE) between
//! the two runs; a row that sees a poisoned V must come back non-finite (a visible NaN still
//! propagates).
//!
//! Trial 0 poisons only positions no row of the step sees (every row must match); trial 1 also
//! poisons a few keys some rows see (the last key of a prefill, a key inside its new tokens, an
//! early key that later rows' windows leave out), so both classes of rows are checked.

use attention_backend::{bf16, f16, Element};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common;
use crate::raw::{self, DeviceMeta, Mask, Step, Views};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Poison {
    Clean,
    /// Every element of the row (K: the other value).
    NanRow,
    InfRow,
    /// One element of the row.
    NanElem(usize),
    InfElem(usize),
}

struct Outcome {
    clean_rows: usize,
    poisoned_rows: usize,
}

/// Runs one case for one trial; returns how many rows of each class it checked.
fn run_trial<T: Element>(
    step: &Step,
    mask: &Mask,
    num_splits: usize,
    trial: usize,
    rng: &mut StdRng,
    what: &str,
) -> Outcome {
    let stream = common::stream();
    let (h, d) = (step.num_heads, step.head_size);
    let row = step.row_elems();
    let n_slots = step.num_blocks * step.block_size;
    let nt = step.num_tokens;

    // Which slots some row of the step sees.
    let mut owner: Vec<Option<(usize, usize)>> = vec![None; n_slots];
    let mut seen = vec![false; n_slots];
    for (r, &(q, kv)) in step.batch.iter().enumerate() {
        for key in 0..kv {
            let s = step.slot(r, key);
            owner[s] = Some((r, key));
            seen[s] = (0..q).any(|i| mask.visible(kv - q + i, key, kv));
        }
    }
    let mut poison = vec![Poison::Clean; n_slots];
    let pick = |rng: &mut StdRng| match rng.random_range(0..4) {
        0 => Poison::NanRow,
        1 => Poison::InfRow,
        2 => Poison::NanElem(rng.random_range(0..row)),
        _ => Poison::InfElem(rng.random_range(0..row)),
    };
    for s in 0..n_slots {
        if !seen[s] {
            poison[s] = pick(rng);
        }
    }
    if trial == 1 {
        for (r, &(q, kv)) in step.batch.iter().enumerate() {
            // The last key (the causal future of every row but the last), a key among the new
            // tokens, and an early key (outside later rows' windows).
            let mut keys = vec![kv - 1, kv - q + rng.random_range(0..q)];
            if kv > 2 {
                keys.push(rng.random_range(0..kv.min(8)));
            }
            for key in keys {
                poison[step.slot(r, key)] = pick(rng);
            }
        }
    }

    let keys = test_suite::inputs::values::<T>(rng, n_slots * row);
    let values = test_suite::inputs::values::<T>(rng, n_slots * row);
    let query = test_suite::inputs::values::<T>(rng, nt * h * d);
    let (nan, inf, zero) = (T::from_f32(f32::NAN), T::from_f32(f32::INFINITY), T::from_f32(0.0));
    let (mut kp, mut vp, mut kz, mut vz) = (keys.clone(), values.clone(), keys, values);
    for (s, &p) in poison.iter().enumerate() {
        let base = s * row;
        let (v_bad, k_bad, range) = match p {
            Poison::Clean => continue,
            Poison::NanRow => (nan, inf, 0..row),
            Poison::InfRow => (inf, nan, 0..row),
            Poison::NanElem(e) => (nan, inf, e..e + 1),
            Poison::InfElem(e) => (inf, nan, e..e + 1),
        };
        // The reference run zeroes exactly the poisoned elements, so kv heads a poisoned element
        // does not belong to see identical inputs in both runs.
        for e in range {
            vp[base + e] = v_bad;
            kp[base + e] = k_bad;
            vz[base + e] = zero;
            kz[base + e] = zero;
        }
    }

    let meta = DeviceMeta::upload(&stream, step);
    let q_dev = stream.clone_htod(&query).unwrap();
    let run = |k: &[T], v: &[T]| -> (Vec<T>, Vec<f32>) {
        let k_dev = stream.clone_htod(k).unwrap();
        let v_dev = stream.clone_htod(v).unwrap();
        let mut out = stream.clone_htod(&vec![nan; nt * h * d]).unwrap();
        let mut lse = stream.clone_htod(&vec![f32::NAN; nt * h]).unwrap();
        {
            let mut views = Views {
                query: q_dev.as_view(),
                key_cache: k_dev.as_view(),
                value_cache: v_dev.as_view(),
                out: out.as_view_mut(),
                lse: Some(lse.as_view_mut()),
                strides: step.contiguous_strides(),
            };
            raw::run(&stream, step, &meta, mask, num_splits, &mut views);
        }
        (stream.clone_dtoh(&out).unwrap(), stream.clone_dtoh(&lse).unwrap())
    };
    let (out_p, lse_p) = run(&kp, &vp);
    let (out_z, lse_z) = run(&kz, &vz);

    let mut outcome = Outcome { clean_rows: 0, poisoned_rows: 0 };
    for t in 0..nt {
        let (r, i) = step.row_of(t);
        let (q, kv) = step.batch[r];
        let pos = kv - q + i;
        for hh in 0..h {
            // A poisoned element reaches only the query heads of its own kv head; a whole poisoned
            // row reaches every head.
            let kv_head = hh / (h / step.num_kv_heads);
            let hits = |p: Poison| match p {
                Poison::Clean => false,
                Poison::NanRow | Poison::InfRow => true,
                Poison::NanElem(e) | Poison::InfElem(e) => e / d == kv_head,
            };
            let sees_poison = (0..kv).any(|key| mask.visible(pos, key, kv) && hits(poison[step.slot(r, key)]));
            let o = (t * h + hh) * d;
            let (rp, rz) = (&out_p[o..o + d], &out_z[o..o + d]);
            let ctx = || {
                format!(
                    "{what} trial {trial} dtype {:?}: token {t} (request {r} row {i}, position {pos} of {kv}) head {hh}",
                    T::DTYPE
                )
            };
            if sees_poison {
                outcome.poisoned_rows += 1;
                assert!(
                    rp.iter().any(|x| !x.to_f32().is_finite()),
                    "{}: the row sees a NaN/Inf in V but came back finite",
                    ctx()
                );
            } else {
                outcome.clean_rows += 1;
                assert!(rz.iter().all(|x| x.to_f32().is_finite()), "{}: the zeroed run is not finite", ctx());
                for e in 0..d {
                    assert!(
                        rp[e].to_f32().to_bits() == rz[e].to_f32().to_bits(),
                        "{}: element {e} is {} with poison in unseen positions, {} with them zeroed",
                        ctx(),
                        rp[e].to_f32(),
                        rz[e].to_f32()
                    );
                }
                let (lp, lz) = (lse_p[t * h + hh], lse_z[t * h + hh]);
                assert!(lp.to_bits() == lz.to_bits(), "{}: lse {lp} vs {lz}", ctx());
            }
        }
    }
    outcome
}

struct Case {
    what: &'static str,
    heads: (usize, usize),
    head_sizes: &'static [usize],
    block_size: usize,
    batch: &'static [(usize, usize)],
    mask: fn(usize) -> Mask,
    num_splits: usize,
}

fn run_case(c: &Case, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ run_seed());
    for &d in c.head_sizes {
        for bf in [false, true] {
            let step = Step::new(c.heads, d, c.block_size, c.batch, 3, &mut rng);
            let mask = (c.mask)(d);
            let what = format!("{} (head {d}, block {}, splits {}, {mask:?})", c.what, c.block_size, c.num_splits);
            let mut clean = 0;
            for trial in 0..2 {
                let o = if bf {
                    run_trial::<bf16>(&step, &mask, c.num_splits, trial, &mut rng, &what)
                } else {
                    run_trial::<f16>(&step, &mask, c.num_splits, trial, &mut rng, &what)
                };
                if trial == 0 {
                    assert_eq!(o.poisoned_rows, 0, "{what}: trial 0 poisons only unseen positions");
                }
                clean += o.clean_rows;
            }
            assert!(clean > 0, "{what}: no clean row was checked");
        }
    }
}

/// The run's seed: `PAGED_ATTN_SEED` when set, else fresh; printed so a failure can be replayed.
fn run_seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        let s = std::env::var("PAGED_ATTN_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
        eprintln!("unseen-position tests: PAGED_ATTN_SEED={s}");
        s
    })
}

const DECODES: &[(usize, usize)] = &[(1, 1), (1, 37), (1, 300), (1, 1000), (1, 130)];
const PREFILL_2: &[(usize, usize)] = &[(2, 2)];
const PREFILLS: &[(usize, usize)] = &[(150, 150), (7, 7), (64, 64)];
const CHUNKED: &[(usize, usize)] = &[(100, 450), (33, 97), (1, 1), (17, 300)];
const MIXED: &[(usize, usize)] = &[(1, 200), (1, 45), (40, 40), (129, 600)];

#[test]
fn unseen_decode() {
    for (i, splits) in [1, 4].into_iter().enumerate() {
        let c = Case {
            what: "decode",
            heads: (8, 2),
            head_sizes: &[64, 128, 256],
            block_size: 16,
            batch: DECODES,
            mask: Mask::causal,
            num_splits: splits,
        };
        run_case(&c, 100 + i as u64);
    }
}

#[test]
fn unseen_decode_window_and_softcap() {
    let c = Case {
        what: "decode, window 50, soft-cap",
        heads: (4, 4),
        head_sizes: &[128],
        block_size: 32,
        batch: DECODES,
        mask: |d| Mask::causal(d).window(Some(50), Some(0)).softcap(20.0),
        num_splits: 3,
    };
    run_case(&c, 200);
}

#[test]
fn unseen_prefill() {
    // The reproduction: one 2-token prompt, NaN in token 1's V, row 0 must stay clean.
    let c = Case {
        what: "prefill 2 tokens",
        heads: (4, 2),
        head_sizes: &[64, 128],
        block_size: 16,
        batch: PREFILL_2,
        mask: Mask::causal,
        num_splits: 1,
    };
    run_case(&c, 300);
    for (i, bs) in [16, 48].into_iter().enumerate() {
        let c = Case {
            what: "prefill",
            heads: (8, 2),
            head_sizes: &[64, 96, 128, 256],
            block_size: bs,
            batch: PREFILLS,
            mask: Mask::causal,
            num_splits: 1,
        };
        run_case(&c, 310 + i as u64);
    }
}

#[test]
fn unseen_chunked_prefill_and_mixed() {
    for (i, batch) in [CHUNKED, MIXED].into_iter().enumerate() {
        let c = Case {
            what: "chunked prefill / mixed batch",
            heads: (16, 2),
            head_sizes: &[64, 128, 256],
            block_size: 32,
            batch,
            mask: Mask::causal,
            num_splits: 2,
        };
        run_case(&c, 400 + i as u64);
    }
}

#[test]
fn unseen_sliding_window() {
    let masks: [fn(usize) -> Mask; 3] = [
        |d| Mask::causal(d).window(Some(40), Some(0)),
        |d| Mask::causal(d).non_causal().window(Some(20), Some(7)),
        |d| Mask::causal(d).non_causal().window(Some(70), Some(33)),
    ];
    for (i, mask) in masks.into_iter().enumerate() {
        for (j, batch) in [PREFILLS, CHUNKED, MIXED].into_iter().enumerate() {
            let c = Case {
                what: "sliding window",
                heads: (8, 2),
                head_sizes: &[64, 128, 192],
                block_size: 16,
                batch,
                mask,
                num_splits: 2,
            };
            run_case(&c, 500 + 10 * i as u64 + j as u64);
        }
    }
}

#[test]
fn unseen_softcap() {
    for (i, batch) in [PREFILLS, MIXED].into_iter().enumerate() {
        let c = Case {
            what: "soft-cap",
            heads: (4, 1),
            head_sizes: &[80, 128, 256],
            block_size: 32,
            batch,
            mask: |d| Mask::causal(d).softcap(30.0),
            num_splits: 1,
        };
        run_case(&c, 600 + i as u64);
        let c = Case {
            what: "soft-cap with window",
            heads: (4, 1),
            head_sizes: &[112],
            block_size: 16,
            batch,
            mask: |d| Mask::causal(d).softcap(30.0).window(Some(33), Some(0)),
            num_splits: 2,
        };
        run_case(&c, 610 + i as u64);
    }
}
