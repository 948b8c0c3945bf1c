//! The block pool: who owns which physical KV-cache block, and which full blocks can be shared.
//!
//! The runner itself only reads block ids; the pool is what a scheduler (or a serving loop) uses to
//! hand them out, so a real workload can run without a second allocator. It follows vLLM v1's
//! `BlockPool` in spirit:
//!
//! - **Reference counts.** A block is free when its count is 0. Two requests that share a cached
//!   prompt prefix hold the same physical blocks, each holding one reference.
//! - **An LRU free list.** Freed blocks go to the tail; allocation takes from the head. A freed
//!   block keeps its cached contents until it is taken for a new allocation, so a prefix that was
//!   used recently survives longest. The list is intrusive (two `u32` arrays indexed by block id),
//!   so reviving a cached free block from the middle of the list is O(1) and nothing allocates on
//!   the hot path.
//! - **Prefix caching.** A *full* block is identified by a hash chained over its parent block's hash
//!   and its own token ids, so a block matches only when the whole prefix before it matches. The
//!   pool keeps each cached block's tokens and parent and compares them on every hit: a 64-bit hash
//!   collision can cost a cache miss, never a wrong KV reuse.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::error::{try_filled, try_reserve, Result, RunnerError};
use crate::BlockId;

/// A token id, as the prefix cache hashes them.
pub type TokenId = u32;

/// What the pool remembers about a cached full block.
#[derive(Clone, Debug)]
struct CachedBlock {
    /// Chained hash of the prefix up to and including this block.
    hash: u64,
    /// The block before it in the prefix (`None` for a prompt's first block).
    parent: Option<BlockId>,
    /// Its `block_size` token ids, compared on every hit.
    tokens: Box<[TokenId]>,
}

/// Allocator of physical KV-cache blocks with reference counts and a prefix cache.
///
/// ```
/// use model_runner::BlockPool;
///
/// let mut pool = BlockPool::new(8, 4)?; // 8 blocks of 4 tokens
/// let prompt: Vec<u32> = (0..10).collect();
/// let a = pool.allocate(3)?; // 10 tokens need 3 blocks
/// pool.cache_full_blocks(&prompt, &a)?; // blocks 0 and 1 are full: cache them
///
/// // A second request with the same first 8 tokens shares those two blocks.
/// let shared = pool.acquire_cached_prefix(&prompt[..9]);
/// assert_eq!(shared, a[..2]);
/// assert_eq!(pool.ref_count(a[0]), Some(2));
/// # Ok::<(), model_runner::RunnerError>(())
/// ```
#[derive(Clone, Debug)]
pub struct BlockPool {
    block_size: usize,
    ref_cnt: Vec<u32>,
    /// Free list links; index `num_blocks` is the sentinel (`next[S]` = head, `prev[S]` = tail).
    /// A block is on the list exactly when its reference count is 0.
    prev: Vec<u32>,
    next: Vec<u32>,
    num_free: usize,
    /// Cached full blocks by chained hash.
    cached: HashMap<u64, BlockId>,
    /// Per block: its cache entry, if it holds a cached full block.
    meta: Vec<Option<CachedBlock>>,
}

/// Seed of the hash chain (the "parent hash" of a prompt's first block).
const ROOT_HASH: u64 = 0x9e37_79b9_7f4a_7c15;

fn chain_hash(parent: u64, tokens: &[TokenId]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockPool {
    /// A pool of `num_blocks` blocks of `block_size` tokens, all free.
    ///
    /// # Errors
    /// [`RunnerError::InvalidConfig`] for a zero size, or more blocks than an `i32` block table
    /// can name; [`RunnerError::AllocationFailed`] when the host cannot hold the pool's arrays.
    pub fn new(num_blocks: usize, block_size: usize) -> Result<Self> {
        if num_blocks == 0 || block_size == 0 {
            return Err(RunnerError::InvalidConfig {
                what: format!("block pool needs positive num_blocks and block_size (got {num_blocks}, {block_size})"),
            });
        }
        // Block ids go into i32 block tables, and the sentinel needs one more u32.
        if num_blocks > i32::MAX as usize {
            return Err(RunnerError::InvalidConfig { what: format!("{num_blocks} blocks: block ids must fit in i32") });
        }
        let n = num_blocks as u32;
        // Free list 0, 1, ..., n-1 in order, closed through the sentinel n. Every array is
        // allocated fallibly: a pool of 2^31 blocks needs ~100 GB of host memory, and a machine
        // without it gets an error, not an abort.
        let meta = try_filled(num_blocks, None, "block pool prefix-cache entries")?;
        let (mut next, mut prev) = (Vec::new(), Vec::new());
        try_reserve(&mut next, num_blocks + 1, "block pool free list")?;
        try_reserve(&mut prev, num_blocks + 1, "block pool free list")?;
        next.extend((0..=n).map(|i| if i == n { 0 } else { i + 1 }));
        prev.extend((0..=n).map(|i| if i == 0 { n } else { i - 1 }));
        Ok(BlockPool {
            block_size,
            ref_cnt: try_filled(num_blocks, 0, "block pool reference counts")?,
            prev,
            next,
            num_free: num_blocks,
            cached: HashMap::new(),
            meta,
        })
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.ref_cnt.len()
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks that [`BlockPool::allocate`] can hand out now (free blocks, cached ones included:
    /// a cached block with no reference is evicted when taken).
    pub fn num_free_blocks(&self) -> usize {
        self.num_free
    }

    /// Blocks holding a cached full block (referenced or not).
    pub fn num_cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// The reference count of `block`, `None` when it is past the pool.
    pub fn ref_count(&self, block: BlockId) -> Option<u32> {
        self.ref_cnt.get(block as usize).copied()
    }

    /// Whether `block` currently holds a cached full block.
    pub fn is_cached(&self, block: BlockId) -> bool {
        self.meta.get(block as usize).is_some_and(Option::is_some)
    }

    fn sentinel(&self) -> u32 {
        self.ref_cnt.len() as u32
    }

    fn unlink(&mut self, b: u32) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        self.next[p as usize] = n;
        self.prev[n as usize] = p;
        self.num_free -= 1;
    }

    fn push_back(&mut self, b: u32) {
        let s = self.sentinel();
        let tail = self.prev[s as usize];
        self.next[tail as usize] = b;
        self.prev[b as usize] = tail;
        self.next[b as usize] = s;
        self.prev[s as usize] = b;
        self.num_free += 1;
    }

    /// Takes `n` blocks, least recently freed first, each with reference count 1. Cached blocks
    /// taken this way are evicted from the prefix cache.
    ///
    /// # Errors
    /// [`RunnerError::OutOfBlocks`] when fewer than `n` blocks are free; nothing is taken then.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<BlockId>> {
        if n > self.num_free {
            return Err(RunnerError::OutOfBlocks { requested: n, free: self.num_free });
        }
        let s = self.sentinel();
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let b = self.next[s as usize];
            self.unlink(b);
            if let Some(m) = self.meta[b as usize].take() {
                // A duplicate of the same content may be the one the map points at; keep that.
                if self.cached.get(&m.hash) == Some(&b) {
                    self.cached.remove(&m.hash);
                }
            }
            self.ref_cnt[b as usize] = 1;
            out.push(b);
        }
        Ok(out)
    }

    /// Drops one reference to each block of `blocks`; a block whose count reaches 0 becomes free
    /// (and stays in the prefix cache until it is reallocated).
    ///
    /// Blocks are released last to first, as vLLM does: a request's tail blocks are the least
    /// likely to be shared, so they are put nearer the head of the LRU list and evicted first.
    ///
    /// # Errors
    /// [`RunnerError::BlockNotInPool`] or [`RunnerError::BlockNotAllocated`] (a double free,
    /// counting repeats within `blocks`); nothing is released then.
    pub fn free(&mut self, blocks: &[BlockId]) -> Result<()> {
        let num_blocks = self.num_blocks();
        let mut sorted = blocks.to_vec();
        sorted.sort_unstable();
        for run in sorted.chunk_by(|a, b| a == b) {
            let (b, times) = (run[0], run.len());
            let held = self.ref_cnt.get(b as usize).ok_or(RunnerError::BlockNotInPool { block_id: b, num_blocks })?;
            if (*held as usize) < times {
                return Err(RunnerError::BlockNotAllocated { block_id: b });
            }
        }
        for &b in blocks.iter().rev() {
            let rc = &mut self.ref_cnt[b as usize];
            *rc -= 1;
            if *rc == 0 {
                self.push_back(b);
            }
        }
        Ok(())
    }

    /// The longest cached prefix of `tokens` in whole blocks, without taking references.
    ///
    /// Only full blocks are matched. Pass a prompt without its last token (as
    /// [`BlockPool::acquire_cached_prefix`] documents) when at least one token must be computed.
    pub fn lookup_cached_prefix(&self, tokens: &[TokenId]) -> Vec<BlockId> {
        let mut out = Vec::new();
        let mut parent_hash = ROOT_HASH;
        let mut parent = None;
        for chunk in tokens.chunks_exact(self.block_size) {
            let h = chain_hash(parent_hash, chunk);
            let Some(&b) = self.cached.get(&h) else { break };
            let hit = self.meta[b as usize].as_ref().is_some_and(|m| m.parent == parent && *m.tokens == *chunk);
            if !hit {
                break;
            }
            out.push(b);
            parent_hash = h;
            parent = Some(b);
        }
        out
    }

    /// Takes a reference to each block of the longest cached prefix of `tokens` (whole blocks) and
    /// returns them; `blocks.len() * block_size` tokens of the request are then already computed.
    ///
    /// The model has to run at least one token of a prompt to produce its logits, so a scheduler
    /// passes the prompt without its last token, as vLLM does.
    pub fn acquire_cached_prefix(&mut self, tokens: &[TokenId]) -> Vec<BlockId> {
        let blocks = self.lookup_cached_prefix(tokens);
        for &b in &blocks {
            if self.ref_cnt[b as usize] == 0 {
                self.unlink(b);
            }
            self.ref_cnt[b as usize] += 1;
        }
        blocks
    }

    /// Registers the full blocks of a request in the prefix cache: block `i` of `blocks` holds
    /// tokens `i * block_size .. (i + 1) * block_size` of `tokens`. Call it once those tokens'
    /// K/V are written (after the step that computed them). Blocks already cached are kept;
    /// a block whose content is already cached in another block stays uncached (the other one
    /// serves future hits). Trailing partial blocks are ignored.
    ///
    /// Returns how many blocks were newly cached.
    ///
    /// # Errors
    /// [`RunnerError::BlockNotInPool`] or [`RunnerError::BlockNotAllocated`] for a block the
    /// caller does not hold; nothing is cached then.
    pub fn cache_full_blocks(&mut self, tokens: &[TokenId], blocks: &[BlockId]) -> Result<usize> {
        let num_blocks = self.num_blocks();
        let num_full = (tokens.len() / self.block_size).min(blocks.len());
        for &b in &blocks[..num_full] {
            match self.ref_cnt.get(b as usize) {
                None => return Err(RunnerError::BlockNotInPool { block_id: b, num_blocks }),
                Some(0) => return Err(RunnerError::BlockNotAllocated { block_id: b }),
                Some(_) => {}
            }
        }
        let mut parent_hash = ROOT_HASH;
        let mut parent = None;
        let mut newly = 0;
        for (chunk, &b) in tokens.chunks_exact(self.block_size).zip(blocks) {
            // The chain continues through the block the cache serves for this content (`b`
            // itself, or an identical block cached earlier), since that is what a lookup walks.
            let (h, canonical) = match &self.meta[b as usize] {
                Some(m) => (m.hash, b),
                None => {
                    let h = chain_hash(parent_hash, chunk);
                    match self.cached.entry(h) {
                        Entry::Vacant(e) => {
                            e.insert(b);
                            self.meta[b as usize] = Some(CachedBlock { hash: h, parent, tokens: chunk.into() });
                            newly += 1;
                            (h, b)
                        }
                        Entry::Occupied(e) => (h, *e.get()),
                    }
                }
            };
            parent_hash = h;
            parent = Some(canonical);
        }
        Ok(newly)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 4;

    /// The free list holds exactly the blocks with reference count 0, each once.
    fn assert_consistent(pool: &BlockPool) {
        let s = pool.sentinel();
        let mut seen = vec![false; pool.num_blocks()];
        let mut b = pool.next[s as usize];
        let mut n = 0;
        while b != s {
            assert!(!seen[b as usize], "block {b} twice on the free list");
            seen[b as usize] = true;
            assert_eq!(pool.ref_cnt[b as usize], 0, "block {b} on the free list with references");
            assert_eq!(pool.next[pool.prev[b as usize] as usize], b);
            b = pool.next[b as usize];
            n += 1;
        }
        assert_eq!(n, pool.num_free);
        assert_eq!(n, pool.ref_cnt.iter().filter(|&&c| c == 0).count());
        for (&h, &b) in &pool.cached {
            assert_eq!(pool.meta[b as usize].as_ref().map(|m| m.hash), Some(h));
        }
    }

    fn tokens(range: std::ops::Range<u32>) -> Vec<TokenId> {
        range.collect()
    }

    #[test]
    fn exhaustion_and_reuse() {
        let mut pool = BlockPool::new(3, BS).unwrap();
        let all = pool.allocate(3).unwrap();
        assert_eq!(all, [0, 1, 2]);
        assert_eq!(pool.allocate(1), Err(RunnerError::OutOfBlocks { requested: 1, free: 0 }));
        pool.free(&[1]).unwrap();
        assert_eq!(pool.allocate(1).unwrap(), [1], "the freed block is reused");
        assert_eq!(pool.allocate(0).unwrap(), Vec::<BlockId>::new());
        assert_consistent(&pool);
    }

    #[test]
    fn lru_order_and_reverse_free() {
        let mut pool = BlockPool::new(6, BS).unwrap();
        let a = pool.allocate(3).unwrap(); // 0 1 2
        let b = pool.allocate(3).unwrap(); // 3 4 5
        pool.free(&b).unwrap(); // released 5, 4, 3
        pool.free(&a).unwrap(); // released 2, 1, 0
        assert_consistent(&pool);
        // Least recently freed first; within one request, its tail first.
        assert_eq!(pool.allocate(6).unwrap(), [5, 4, 3, 2, 1, 0]);
    }

    #[test]
    fn refcounted_prefix_sharing() {
        let mut pool = BlockPool::new(6, BS).unwrap();
        let prompt = tokens(0..10); // 2 full blocks + 2 tokens
        let a = pool.allocate(3).unwrap();
        assert_eq!(pool.cache_full_blocks(&prompt, &a).unwrap(), 2);
        assert_eq!(pool.cache_full_blocks(&prompt, &a).unwrap(), 0, "caching again is a no-op");
        assert!(pool.is_cached(a[0]) && pool.is_cached(a[1]) && !pool.is_cached(a[2]));

        // B shares both full blocks; the partial third block is never shared.
        let b = pool.acquire_cached_prefix(&prompt);
        assert_eq!(b, a[..2]);
        assert_eq!(pool.ref_count(a[0]), Some(2));
        assert_eq!(pool.ref_count(a[2]), Some(1));

        // A finishes: the shared blocks stay allocated to B.
        pool.free(&a).unwrap();
        assert_eq!(pool.ref_count(a[0]), Some(1));
        assert_eq!(pool.num_free_blocks(), 4);
        // B finishes: all free, but the prefix stays cached...
        pool.free(&b).unwrap();
        assert_eq!(pool.num_free_blocks(), 6);
        assert_eq!(pool.num_cached_blocks(), 2);
        assert_consistent(&pool);

        // ...so C gets a hit, reviving the blocks from the free list.
        let c = pool.acquire_cached_prefix(&prompt[..9]);
        assert_eq!(c, a[..2]);
        assert_eq!(pool.num_free_blocks(), 4);
        assert_consistent(&pool);
        // Referenced cached blocks are never evicted: the other 4 are handed out instead.
        let rest = pool.allocate(4).unwrap();
        assert!(rest.iter().all(|b| !c.contains(b)));
        assert_eq!(pool.allocate(1), Err(RunnerError::OutOfBlocks { requested: 1, free: 0 }));
        assert_eq!(pool.num_cached_blocks(), 2);
        assert_consistent(&pool);
    }

    #[test]
    fn partial_match_and_eviction() {
        let mut pool = BlockPool::new(4, BS).unwrap();
        let prompt = tokens(0..8);
        let a = pool.allocate(2).unwrap();
        pool.cache_full_blocks(&prompt, &a).unwrap();
        // Same first block, different second: only the first is shared.
        let mut other = prompt.clone();
        other[5] = 99;
        assert_eq!(pool.lookup_cached_prefix(&other), a[..1]);
        // A different first block: nothing, even though the second block's tokens match.
        let mut other = prompt.clone();
        other[0] = 99;
        assert!(pool.lookup_cached_prefix(&other).is_empty());
        // Fewer than a block of tokens: nothing.
        assert!(pool.lookup_cached_prefix(&prompt[..3]).is_empty());

        // Freed then taken by new allocations: evicted.
        pool.free(&a).unwrap();
        let fresh = pool.allocate(4).unwrap();
        assert_eq!(pool.num_cached_blocks(), 0);
        assert!(pool.lookup_cached_prefix(&prompt).is_empty());
        assert!(fresh.iter().all(|&b| !pool.is_cached(b)));
        assert_consistent(&pool);
    }

    #[test]
    fn duplicate_content_chains_through_the_cached_copy() {
        let mut pool = BlockPool::new(8, BS).unwrap();
        let prompt = tokens(0..12);
        // Two requests computed the same prompt without a hit (e.g. in the same step).
        let a = pool.allocate(3).unwrap();
        let b = pool.allocate(3).unwrap();
        assert_eq!(pool.cache_full_blocks(&prompt[..4], &a).unwrap(), 1);
        assert_eq!(pool.cache_full_blocks(&prompt, &b).unwrap(), 2, "b's first block duplicates a's");
        assert!(!pool.is_cached(b[0]));
        // The cached chain goes a[0] -> b[1] -> b[2].
        assert_eq!(pool.lookup_cached_prefix(&prompt), [a[0], b[1], b[2]]);
        assert_consistent(&pool);
    }

    #[test]
    fn evicted_parent_breaks_the_chain() {
        let mut pool = BlockPool::new(3, BS).unwrap();
        let prompt = tokens(0..8);
        let a = pool.allocate(2).unwrap();
        pool.cache_full_blocks(&prompt, &a).unwrap();
        pool.free(&a).unwrap(); // frees a[1] then a[0]: list is [2, a1, a0]
        let x = pool.allocate(2).unwrap(); // evicts a[1]
        assert_eq!(x, [2, a[1]]);
        assert_eq!(pool.lookup_cached_prefix(&prompt), a[..1]);
        let y = pool.allocate(1).unwrap(); // evicts a[0]
        assert_eq!(y, [a[0]]);
        assert!(pool.lookup_cached_prefix(&prompt).is_empty());
        assert_consistent(&pool);
    }
}
