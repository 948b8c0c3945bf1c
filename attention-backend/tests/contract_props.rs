//! Fuzzing the step contract (ARCHITECTURE.md, "Invariants"): random valid steps (requests, block
//! tables drawn from a shuffled pool with read-only prefix sharing and stale entries, padding rows)
//! are always accepted, and one injected violation of each kind is always refused with its own
//! error, by `check_against` and by `cpu::forward` (which then leaves the cache untouched). A third
//! property mutates steps at random and compares the check with an independent reading of the
//! contract written here. `cargo xtask fuzz` runs these with many more cases.

use std::collections::{HashMap, HashSet};

use attention_backend::ndarray::{Array2, Array3, Array4};
use attention_backend::{
    cpu, AttentionError, AttentionMetadata, AttentionParams, BlockTable, CacheLayout, CpuKvCache, SlotMapping,
};
use proptest::prelude::*;

/// splitmix64: the step is derived from one seed, so a failing case shrinks to a few numbers.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A step in pieces, so violations can be injected before the metadata is built.
#[derive(Clone, Debug)]
struct Step {
    block_size: usize,
    num_blocks: usize,
    /// `(q_len, seq_len)` per request.
    reqs: Vec<(usize, usize)>,
    /// Block-table rows, all of one width (used entries, then stale ones).
    rows: Vec<Vec<i32>>,
    slots: Vec<i64>,
    decode_threshold: usize,
}

impl Step {
    fn layout(&self) -> CacheLayout {
        CacheLayout::new(self.num_blocks, self.block_size, 1, 2).unwrap()
    }
    fn needed(&self, r: usize) -> usize {
        self.reqs[r].1.div_ceil(self.block_size)
    }
    fn first_written(&self, r: usize) -> usize {
        (self.reqs[r].1 - self.reqs[r].0) / self.block_size
    }
    fn num_actual(&self) -> usize {
        self.reqs.iter().map(|r| r.0).sum()
    }
    fn token0(&self, r: usize) -> usize {
        self.reqs[..r].iter().map(|x| x.0).sum()
    }
    /// Rewrites request `r`'s slots to follow its block table.
    fn follow_table(&mut self, r: usize) {
        let (q, s) = self.reqs[r];
        let t0 = self.token0(r);
        for i in 0..q {
            let pos = s - q + i;
            self.slots[t0 + i] = i64::from(self.rows[r][pos / self.block_size]) * self.block_size as i64
                + (pos % self.block_size) as i64;
        }
    }
    fn meta(&self) -> AttentionMetadata {
        let mut qsl = vec![0i32];
        for &(q, _) in &self.reqs {
            qsl.push(qsl.last().unwrap() + q as i32);
        }
        let seq_lens = self.reqs.iter().map(|r| r.1 as i32).collect();
        let width = self.rows.first().map_or(0, Vec::len);
        let table = BlockTable::new(self.rows.concat(), self.rows.len(), width).unwrap();
        AttentionMetadata::new(qsl, seq_lens, table, SlotMapping::new(self.slots.clone()), self.decode_threshold)
            .expect("self-consistent")
    }
}

/// A valid step from a few drawn numbers.
fn valid_step(
    block_size: usize,
    reqs: Vec<(usize, usize)>,
    extra_blocks: usize,
    stale_cols: usize,
    pad: usize,
    share: bool,
    seed: u64,
) -> Step {
    let mut g = Gen(seed);
    let needed: Vec<usize> = reqs.iter().map(|&(_, s)| s.div_ceil(block_size)).collect();
    let num_blocks = needed.iter().sum::<usize>() + extra_blocks;
    let mut pool: Vec<i32> = (0..num_blocks as i32).collect();
    for i in (1..pool.len()).rev() {
        pool.swap(i, g.below(i + 1));
    }
    let width = needed.iter().copied().max().unwrap_or(0) + stale_cols;
    let mut rows = Vec::new();
    let mut next = 0;
    for &n in &needed {
        let mut row = pool[next..next + n].to_vec();
        next += n;
        while row.len() < width {
            // Stale entries are anything: they must be ignored.
            row.push(match g.below(3) {
                0 => -1,
                1 => g.next() as i32,
                _ => pool[g.below(pool.len())],
            });
        }
        rows.push(row);
    }
    let mut step =
        Step { block_size, num_blocks, reqs, rows, slots: Vec::new(), decode_threshold: 1 + (seed as usize % 3) };
    if share {
        // Prefix caching: requests share request 0's full, read-only prefix blocks.
        for r in 1..step.reqs.len() {
            let common = step.first_written(r).min(step.first_written(0));
            for j in 0..common {
                step.rows[r][j] = step.rows[0][j];
            }
        }
    }
    step.slots = vec![0; step.num_actual()];
    for r in 0..step.reqs.len() {
        step.follow_table(r);
    }
    for _ in 0..pad {
        step.slots.push(match g.below(3) {
            0 => -1,
            1 => i64::MIN,
            _ => -(1 + (g.next() >> 2) as i64),
        });
    }
    step
}

fn arb_step() -> impl Strategy<Value = Step> {
    let req = (1usize..9, 0usize..41).prop_map(|(q, ctx)| (q, q + ctx));
    (
        prop_oneof![Just(1usize), Just(2), Just(4), Just(16)],
        proptest::collection::vec(req, 1..6),
        0usize..6,
        0usize..3,
        0usize..4,
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(bs, reqs, extra, stale, pad, share, seed)| valid_step(bs, reqs, extra, stale, pad, share, seed))
}

/// Runs `cpu::forward` on tiny tensors; on error the cache must be untouched.
fn forward(step: &Step, meta: &AttentionMetadata) -> Result<(), AttentionError> {
    let layout = step.layout();
    let shape = layout.shape();
    let k = Array4::from_shape_fn(shape, |(b, o, _, d)| (b * 64 + o * 2 + d) as f32);
    let mut cache = CpuKvCache::from_arrays(k.clone(), -k).unwrap();
    let before = cache.clone();
    let n = meta.num_tokens();
    let q = Array3::from_elem((n, 1, 2), 0.25f32);
    let kv = Array3::from_elem((n, 1, 2), 1.5f32);
    let mut out = Array3::from_elem((n, 1, 2), f32::NAN);
    let mut lse = Array2::from_elem((n, 1), f32::NAN);
    let p = AttentionParams::new(1, 1, 2);
    let r = cpu::forward(
        meta,
        &p,
        cpu::ForwardIo {
            query: q.view(),
            key: kv.view(),
            value: kv.view(),
            cache: &mut cache,
            out: out.view_mut(),
            lse: Some(lse.view_mut()),
        },
    );
    if r.is_err() {
        assert_eq!(cache.key(), before.key(), "cache written before {r:?}");
        assert_eq!(cache.value(), before.value(), "cache written before {r:?}");
        assert!(out.iter().chain(lse.iter()).all(|x| x.is_nan()), "out or lse written before {r:?}");
    }
    r
}

/// The contract read independently from ARCHITECTURE.md: `true` when `step` obeys it.
fn contract_holds(step: &Step) -> bool {
    let bs = step.block_size;
    let width = step.rows.first().map_or(0, Vec::len);
    let mut users: HashMap<i32, Vec<bool>> = HashMap::new();
    for r in 0..step.reqs.len() {
        if step.needed(r) > width {
            return false;
        }
        for j in 0..step.needed(r) {
            let b = step.rows[r][j];
            if b < 0 || b as usize >= step.num_blocks {
                return false;
            }
            users.entry(b).or_default().push(j >= step.first_written(r));
        }
    }
    // A written block has exactly one user.
    if users.values().any(|u| u.len() > 1 && u.iter().any(|&w| w)) {
        return false;
    }
    let num_slots = (step.num_blocks * bs) as i64;
    if step.slots.iter().any(|&s| s >= num_slots) {
        return false;
    }
    let mut t = 0;
    for (r, &(q, s)) in step.reqs.iter().enumerate() {
        for i in 0..q {
            let pos = s - q + i;
            let expected = i64::from(step.rows[r][pos / bs]) * bs as i64 + (pos % bs) as i64;
            if step.slots[t] != expected {
                return false;
            }
            t += 1;
        }
    }
    step.slots[t..].iter().all(|&s| s < 0)
}

#[derive(Clone, Copy, Debug)]
enum Violation {
    NegativeSlot,
    WrongSlot,
    PaddingSlot,
    SharedWrittenBlock,
    BlockOutsideCache,
    TableTooShort,
}

const VIOLATIONS: [Violation; 6] = [
    Violation::NegativeSlot,
    Violation::WrongSlot,
    Violation::PaddingSlot,
    Violation::SharedWrittenBlock,
    Violation::BlockOutsideCache,
    Violation::TableTooShort,
];

/// Whether an error is the one an injected violation must cause.
type Expected = Box<dyn Fn(&AttentionError) -> bool>;

/// Injects `v` into `step` (choices from `sel`) and says whether `err` is the error it must cause.
/// `None` when `v` cannot be injected into this step (e.g. a one-slot cache has no wrong slot).
fn inject(step: &mut Step, v: Violation, sel: u64) -> Option<Expected> {
    let mut g = Gen(sel);
    let num_actual = step.num_actual();
    let num_slots = step.num_blocks * step.block_size;
    // (request, column) of every used entry, and of the written ones.
    let used: Vec<(usize, usize)> =
        (0..step.reqs.len()).flat_map(|r| (0..step.needed(r)).map(move |j| (r, j))).collect();
    let written: Vec<(usize, usize)> = used.iter().copied().filter(|&(r, j)| j >= step.first_written(r)).collect();
    match v {
        Violation::NegativeSlot => {
            let t = g.below(num_actual);
            step.slots[t] = if g.below(2) == 0 { -1 } else { -(1 + (g.next() >> 1) as i64) };
            Some(Box::new(move |e| matches!(e, AttentionError::MissingSlot { index, .. } if *index == t)))
        }
        Violation::WrongSlot => {
            if num_slots < 2 {
                return None;
            }
            let t = g.below(num_actual);
            let old = step.slots[t] as usize;
            let new = (old + 1 + g.below(num_slots - 1)) % num_slots;
            step.slots[t] = new as i64;
            Some(Box::new(
                move |e| matches!(e, AttentionError::SlotMismatch { index, slot, .. } if *index == t && *slot == new as i64),
            ))
        }
        Violation::PaddingSlot => {
            if step.slots.len() == num_actual {
                step.slots.push(-1);
            }
            let t = num_actual + g.below(step.slots.len() - num_actual);
            let slot = g.below(num_slots) as i64;
            step.slots[t] = slot;
            Some(Box::new(
                move |e| matches!(e, AttentionError::PaddingSlot { index, slot: s, .. } if *index == t && *s == slot),
            ))
        }
        Violation::SharedWrittenBlock => {
            let (r2, j2) = written[g.below(written.len())];
            let others: Vec<_> = used.iter().copied().filter(|&p| p != (r2, j2)).collect();
            if others.is_empty() {
                return None;
            }
            let (r1, j1) = others[g.below(others.len())];
            let block = step.rows[r1][j1];
            step.rows[r2][j2] = block;
            step.follow_table(r2);
            Some(Box::new(move |e| match *e {
                AttentionError::BlockWriteConflict { block: b, req, index, other_req, other_index, .. } => {
                    b == block && ((req, index) == (r2, j2) || (other_req, other_index) == (r2, j2))
                }
                _ => false,
            }))
        }
        Violation::BlockOutsideCache => {
            let (r, j) = used[g.below(used.len())];
            let block = match g.below(3) {
                0 => -1 - g.below(1000) as i32,
                1 => (step.num_blocks + g.below(1000)) as i32,
                _ => i32::MAX,
            };
            step.rows[r][j] = block;
            Some(Box::new(
                move |e| matches!(*e, AttentionError::BlockOutOfRange { req, index, block: b, .. } if (req, index, b) == (r, j, block)),
            ))
        }
        Violation::TableTooShort => {
            let max = (0..step.reqs.len()).map(|r| step.needed(r)).max().unwrap_or(0);
            let w = g.below(max);
            for row in &mut step.rows {
                row.truncate(w);
            }
            let first = (0..step.reqs.len()).find(|&r| step.needed(r) > w).unwrap();
            Some(Box::new(
                move |e| matches!(*e, AttentionError::BlockTableTooShort { req, columns, .. } if req == first && columns == w),
            ))
        }
    }
}

proptest! {
    // 256 cases unless PROPTEST_CASES says otherwise (`cargo xtask fuzz` raises it).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    /// Valid steps are accepted, by the check and by `forward`, and their real slots are distinct.
    #[test]
    fn valid_steps_are_accepted(step in arb_step()) {
        let meta = step.meta();
        prop_assert!(contract_holds(&step));
        let r = meta.check_against("fuzz", &step.layout());
        prop_assert!(r.is_ok(), "{:?}", r);
        let r = forward(&step, &meta);
        prop_assert!(r.is_ok(), "{:?}", r);
        let real = &step.slots[..step.num_actual()];
        prop_assert_eq!(real.iter().collect::<HashSet<_>>().len(), real.len());
    }

    /// Each kind of violation, injected into a valid step, is refused with its own error.
    #[test]
    fn every_injected_violation_is_refused(step in arb_step(), kind in 0usize..6, sel in any::<u64>()) {
        let mut bad = step.clone();
        let v = VIOLATIONS[kind];
        let Some(is_expected) = inject(&mut bad, v, sel) else { return Ok(()) };
        prop_assert!(!contract_holds(&bad), "{:?} left a valid step", v);
        let meta = bad.meta();
        let e = meta.check_against("fuzz", &bad.layout()).unwrap_err();
        prop_assert!(is_expected(&e), "{:?}: got {:?}", v, e);
        let e = forward(&bad, &meta).unwrap_err();
        prop_assert!(is_expected(&e), "{:?} through forward: got {:?}", v, e);
    }

    /// Random edits (slots, table entries, padding): the check accepts exactly the steps that the
    /// contract, read independently, allows.
    #[test]
    fn the_check_is_the_contract(step in arb_step(), edits in proptest::collection::vec((any::<bool>(), any::<u64>()), 1..4)) {
        let mut s = step;
        for (slot_edit, sel) in edits {
            let mut g = Gen(sel);
            let num_slots = (s.num_blocks * s.block_size) as i64;
            if slot_edit {
                let t = g.below(s.slots.len());
                s.slots[t] = g.below(num_slots as usize + 2) as i64 - 1;
            } else {
                let r = g.below(s.rows.len());
                let width = s.rows[r].len();
                if width > 0 {
                    let j = g.below(width);
                    s.rows[r][j] = g.below(s.num_blocks + 1) as i32;
                    if g.below(2) == 0 {
                        s.follow_table(r);
                    }
                }
            }
        }
        let ok = s.meta().check_against("fuzz", &s.layout()).is_ok();
        prop_assert_eq!(ok, contract_holds(&s), "{:?}", s);
    }
}
