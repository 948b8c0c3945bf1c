//! Property test of the block pool: random requests with overlapping prompts start (taking
//! prefix-cache hits, then allocating the rest), cache their full blocks and finish. Checked after
//! every operation: reference counts equal the holders the test counts itself, free blocks are
//! exactly the unheld ones, a fresh allocation never hands out a held block, and every
//! prefix-cache hit returns blocks whose contents (as the test recorded them when they were
//! written) equal the prompt's tokens.

use std::collections::HashMap;

use model_runner::{BlockPool, RunnerError};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/proptest-regressions/block_pool_props.txt"
        )))),
        ..ProptestConfig::default()
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// A request with the first `len` tokens of prompt family `family`; `cache` says whether its
    /// full blocks are registered once computed.
    Start { family: u32, len: usize, cache: bool },
    /// A request finishes.
    Finish { pick: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u32..4, 1usize..40, prop::bool::weighted(0.8)).prop_map(|(family, len, cache)| Op::Start { family, len, cache }),
        2 => any::<usize>().prop_map(|pick| Op::Finish { pick }),
    ]
}

/// Families share a prefix whose length grows with the family, so hits are partial and frequent.
fn prompt(family: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| if i < 6 * family { i } else { 1000 * (family + 1) + i }).collect()
}

fn run(num_blocks: usize, block_size: usize, ops: Vec<Op>) {
    let mut pool = BlockPool::new(num_blocks, block_size).unwrap();
    let mut holders: Vec<Vec<u32>> = Vec::new();
    // What the test knows each block holds: the tokens written when it was last allocated.
    let mut content: HashMap<u32, Vec<u32>> = HashMap::new();

    for op in ops {
        match op {
            Op::Start { family, len, cache } => {
                let tokens = prompt(family, len);
                let hit = pool.acquire_cached_prefix(&tokens[..len - 1]);
                for (i, b) in hit.iter().enumerate() {
                    assert_eq!(
                        content.get(b).map(Vec::as_slice),
                        Some(&tokens[i * block_size..(i + 1) * block_size]),
                        "hit block {b} holds other tokens"
                    );
                }
                let need = len.div_ceil(block_size) - hit.len();
                let free_before = pool.num_free_blocks();
                let fresh = match pool.allocate(need) {
                    Ok(fresh) => fresh,
                    Err(e) => {
                        assert_eq!(e, RunnerError::OutOfBlocks { requested: need, free: free_before });
                        pool.free(&hit).unwrap();
                        continue;
                    }
                };
                for b in &fresh {
                    assert!(holders.iter().all(|h| !h.contains(b)), "allocated held block {b}");
                }
                let mut blocks = hit;
                for (i, &b) in fresh.iter().enumerate() {
                    let start = (blocks.len() + i) * block_size;
                    content.insert(b, tokens[start..(start + block_size).min(len)].to_vec());
                }
                blocks.extend(fresh);
                if cache {
                    pool.cache_full_blocks(&tokens, &blocks).unwrap();
                }
                holders.push(blocks);
            }
            Op::Finish { pick } => {
                if holders.is_empty() {
                    continue;
                }
                let blocks = holders.swap_remove(pick % holders.len());
                pool.free(&blocks).unwrap();
            }
        }
        let mut held = vec![0u32; num_blocks];
        for b in holders.iter().flatten() {
            held[*b as usize] += 1;
        }
        for (b, &n) in held.iter().enumerate() {
            assert_eq!(pool.ref_count(b as u32), Some(n), "block {b}");
        }
        assert_eq!(pool.num_free_blocks(), held.iter().filter(|&&n| n == 0).count());
    }
    // Everything comes back.
    for blocks in holders {
        pool.free(&blocks).unwrap();
    }
    assert_eq!(pool.num_free_blocks(), num_blocks);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn pool_matches_model(
        num_blocks in 1usize..48,
        block_size in prop_oneof![Just(1usize), Just(2), Just(4), Just(8)],
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        run(num_blocks, block_size, ops);
    }
}
