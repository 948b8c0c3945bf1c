//! Paged attention on the CPU: the numerical reference of the crate.
//!
//! The batch is cut into work items of (request, kv head, a run of query rows). For each item the
//! keys and values the rows can see are gathered through the block table into contiguous `f32`
//! matrices, the scores of all the rows and of every query head of the GQA group are one matrix
//! product `S = Q K^T`, each row of `S` is masked and turned into probabilities in `f32` (scale,
//! soft-cap, ALiBi, window, causal mask, sink), and the output is `O = P V`, where only keys a row
//! sees are ever multiplied (see [`compute_item`]). Items run on the current rayon pool (no thread
//! is spawned per call); each returns its rows, in item order, which the calling thread writes
//! into `out`, so no two threads ever share a mutable buffer.
//!
//! Each item is computed by one thread with a fixed order of operations that depends only on its
//! request's shape (query length, sequence length) and the parameters, never on the rest of the
//! batch or on which thread took it: results are bit-identical run to run and batch-invariant.
//!
//! The matrix products use ndarray's `f32` GEMM (the `matrixmultiply` crate ndarray already
//! depends on), single-threaded inside each item.

use std::sync::Once;

use attention_kernels::{CacheElement, Element, KvStorage};
use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView3, ArrayView4, ArrayViewMut2, ArrayViewMut3, Axis, Slice};
use rayon::prelude::*;

use crate::cache::CpuKvCache;
use crate::error::Result;
use crate::metadata::AttentionMetadata;
use crate::params::AttentionParams;
use crate::scales::KvScaleValues;
use crate::validate::{self, AttentionSpecs};

use super::plan::LayerViews;

/// Environment variable sizing rayon's global pool when this crate is the first to use it (default:
/// rayon's own choice, `RAYON_NUM_THREADS` or the machine's available parallelism; a value that is
/// not a positive integer is ignored with a warning). An engine that runs the CPU backend inside
/// its own pool (`ThreadPool::install`) gets that pool instead.
pub const THREADS_ENV: &str = "PAGED_ATTN_CPU_THREADS";

/// Upper bound on the elements of one item's score matrix (rows x group x keys), 4 MiB of `f32`.
const MAX_SCORES_PER_ITEM: usize = 1 << 20;
/// Upper bound on the query rows of one item, so a long prefill spreads over the threads.
const MAX_ROWS_PER_ITEM: usize = 64;

/// Threads the CPU backend runs on: the size of the rayon pool its calls run in from here (the
/// pool of the enclosing `ThreadPool::install`, or rayon's global pool).
pub fn num_threads() -> usize {
    init_global_pool();
    rayon::current_num_threads()
}

/// Honours [`THREADS_ENV`] once per process: builds rayon's global pool with that many threads
/// unless something (the engine, another crate) built it first, in which case that pool is kept.
fn init_global_pool() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let n = match threads_from(std::env::var(THREADS_ENV)) {
            Ok(Some(n)) => n,
            Ok(None) => return,
            // No error path here (the pool is sized lazily, inside infallible calls): the value is
            // named in a warning rather than dropped without a word.
            Err(v) => {
                tracing::warn!("{THREADS_ENV}={v} ignored: not a positive thread count; rayon's default pool is used");
                return;
            }
        };
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
            tracing::debug!(error = %e, "{THREADS_ENV} ignored: rayon's global pool already exists");
        }
    });
}

/// [`THREADS_ENV`] from one reading of it: `None` when unset, the count when a positive integer
/// (blanks around it allowed), else the value as text.
fn threads_from(var: std::result::Result<String, std::env::VarError>) -> std::result::Result<Option<usize>, String> {
    attention_kernels::env_setting::read(var, None, |v| v.trim().parse::<usize>().ok().filter(|&n| n > 0).map(Some))
}

/// One layer's tensors for [`paged_attention`]: the queries, the cache holding every key and value
/// of the step, and the outputs.
#[derive(Debug)]
pub struct AttentionIo<'a, T: Element, C: KvStorage<T> = T> {
    /// `[num_tokens, num_heads, head_size]`, `num_tokens = meta.num_tokens()` (the slot mapping's
    /// length, padding included).
    pub query: ArrayView3<'a, T>,
    /// Already holds every key and value of every request (`seq_lens[r]` of them, found through
    /// `meta.block_table`). Of the compute type `T` or an FP8 type, read as `stored * scale` with
    /// the cache's own scales.
    pub cache: &'a CpuKvCache<C>,
    /// `[num_tokens, num_heads, head_size]`; rows `>= meta.num_actual_tokens` (padding) are left
    /// untouched.
    pub out: ArrayViewMut3<'a, T>,
    /// Optional `[num_tokens, num_heads]`, the natural log of the softmax denominator used (the
    /// sink included), `-inf` for a row that sees no key and no sink (its output row is 0).
    /// Padding rows are left untouched.
    pub lse: Option<ArrayViewMut2<'a, f32>>,
}

/// One layer's tensors for [`forward`]: [`AttentionIo`] plus the step's new keys and values, and
/// the cache mutably (they are written into it first).
#[derive(Debug)]
pub struct ForwardIo<'a, T: Element, C: KvStorage<T> = T> {
    /// `[num_tokens, num_heads, head_size]`.
    pub query: ArrayView3<'a, T>,
    /// The new tokens' keys, `[num_tokens, num_kv_heads, head_size]`.
    pub key: ArrayView3<'a, T>,
    /// The new tokens' values, `[num_tokens, num_kv_heads, head_size]`.
    pub value: ArrayView3<'a, T>,
    /// The layer's cache; the new keys and values are written at `meta.slot_mapping` (quantised
    /// with the cache's scales when it is FP8, see [`super::kv_cache_update`]).
    pub cache: &'a mut CpuKvCache<C>,
    /// `[num_tokens, num_heads, head_size]`; padding rows are left untouched.
    pub out: ArrayViewMut3<'a, T>,
    /// Optional `[num_tokens, num_heads]` log-sum-exp (see [`AttentionIo::lse`]).
    pub lse: Option<ArrayViewMut2<'a, f32>>,
}

/// Attention over the paged cache for every real token of the batch (vLLM's
/// `flash_attn_varlen_func` with a block table), with the semantics documented on
/// [`AttentionParams`]; the tensors are described on [`AttentionIo`].
///
/// Scores and softmax are computed in `f32` whatever `T` is; the output is rounded to `T` once.
/// This checks the whole step (the step contract included) on every call: an engine that runs
/// many layers over one step plans it once with [`super::plan`] instead.
///
/// # Errors
/// The errors of [`validate::paged_attention`], returned before anything is written.
pub fn paged_attention<T: Element, C: KvStorage<T>>(
    meta: &AttentionMetadata,
    params: &AttentionParams,
    io: AttentionIo<'_, T, C>,
) -> Result<()> {
    const OP: &str = "paged_attention";
    let AttentionIo { query, cache, out, lse } = io;
    let layout = *cache.layout();
    let specs = AttentionSpecs::of::<T>(query.shape(), out.shape(), lse.as_ref().map(|l| l.shape()));
    validate::paged_attention_typed::<T>(OP, params, &layout, specs, meta)?;
    let _span = tracing::debug_span!(
        "paged_attention",
        backend = "cpu",
        reqs = meta.num_reqs(),
        tokens = meta.num_actual_tokens,
        decodes = meta.num_decodes,
        prefills = meta.num_prefills
    )
    .entered();
    attend(
        meta,
        params,
        query,
        CacheViews { key: cache.key(), value: cache.value(), scales: cache.scales() },
        out,
        lse,
    );
    Ok(())
}

/// One attention layer's step on the CPU (vLLM's `FlashAttentionImpl.forward`): writes the new
/// tokens' `key` / `value` into the cache at `meta.slot_mapping` (negative slots skipped), then
/// runs [`paged_attention`] over the cache. The tensors are described on [`ForwardIo`].
///
/// Everything is validated before the cache is touched: an error leaves `cache`, `out` and `lse`
/// as they were. The same as planning the step ([`super::plan`]) and running this one layer.
///
/// # Errors
/// The errors of [`validate::kv_cache_update`] and [`validate::paged_attention`].
pub fn forward<T: Element, C: KvStorage<T>>(
    meta: &AttentionMetadata,
    params: &AttentionParams,
    io: ForwardIo<'_, T, C>,
) -> Result<()> {
    let ForwardIo { query, key, value, cache, out, lse } = io;
    let layout = *cache.layout();
    let (key_cache, value_cache, kv_scales) = cache.parts_mut();
    super::plan::plan_as("forward", meta, &layout, None)?.run_as(
        "forward",
        params,
        LayerViews { query, new_kv: Some((key, value)), key_cache, value_cache, kv_scales, out, lse },
    )
}

/// The key and value caches, `[num_blocks, block_size, num_kv_heads, head_size]` each, and the
/// scales of an FP8 cache (already checked against its layout).
pub(super) struct CacheViews<'a, C> {
    pub(super) key: ArrayView4<'a, C>,
    pub(super) value: ArrayView4<'a, C>,
    pub(super) scales: Option<&'a KvScaleValues>,
}

/// A run of query rows of one request against one kv head (all query heads of its group).
#[derive(Clone, Copy, Debug)]
struct Item {
    req: usize,
    kv_head: usize,
    /// Query rows `row_start..row_end` of the request (0-based within the request).
    row_start: usize,
    row_end: usize,
}

/// An item's result: `out` is `[rows * group, head_size]` (row-major, row `i * group + g`), `lse`
/// `[rows * group]`.
struct ItemOut {
    item: Item,
    out: Array2<f32>,
    lse: Vec<f32>,
}

/// Keys visible to query row `pos` of a sequence of `seq_len` keys: `Some((lo, hi))` inclusive, or
/// `None` when it sees none.
fn visible_range(params: &AttentionParams, pos: usize, seq_len: usize) -> Option<(usize, usize)> {
    let mut hi = seq_len - 1;
    if params.causal {
        hi = hi.min(pos);
    }
    if let Some(w) = params.window_right {
        hi = hi.min(pos.saturating_add(w));
    }
    let lo = params.window_left.map_or(0, |w| pos.saturating_sub(w));
    (lo <= hi).then_some((lo, hi))
}

fn work_items(meta: &AttentionMetadata, params: &AttentionParams) -> Vec<Item> {
    let group = params.group_size();
    let mut items = Vec::new();
    for req in 0..meta.num_reqs() {
        let q_len = meta.query_len(req);
        let seq_len = meta.seq_lens[req] as usize;
        let rows = (MAX_SCORES_PER_ITEM / (group * seq_len).max(1)).clamp(1, MAX_ROWS_PER_ITEM);
        for kv_head in 0..params.num_kv_heads {
            let mut row_start = 0;
            while row_start < q_len {
                let row_end = (row_start + rows).min(q_len);
                items.push(Item { req, kv_head, row_start, row_end });
                row_start = row_end;
            }
        }
    }
    items
}

/// The attention itself over cache views, for callers that have validated exactly these arguments
/// (shapes agree with the parameters and the metadata, the metadata obeys the step contract for a
/// cache of this shape). Any strides ndarray allows.
pub(super) fn attend<T: Element, C: CacheElement>(
    meta: &AttentionMetadata,
    params: &AttentionParams,
    query: ArrayView3<'_, T>,
    cache: CacheViews<'_, C>,
    mut out: ArrayViewMut3<'_, T>,
    mut lse: Option<ArrayViewMut2<'_, f32>>,
) {
    let items = work_items(meta, params);
    init_global_pool();
    // Indexed parallel collect keeps item order; a panic in an item (a bug: inputs were validated)
    // is re-raised here by rayon.
    let results: Vec<ItemOut> = items.par_iter().map(|&item| compute_item(item, query, &cache, meta, params)).collect();

    let group = params.group_size();
    for r in results {
        let Item { req, kv_head, row_start, row_end } = r.item;
        let token0 = meta.query_start_loc[req] as usize;
        for i in row_start..row_end {
            let token = token0 + i;
            for g in 0..group {
                let head = kv_head * group + g;
                let k = (i - row_start) * group + g;
                let src = r.out.row(k);
                let mut dst = out.index_axis_mut(Axis(0), token).index_axis_move(Axis(0), head);
                dst.zip_mut_with(&src, |d, &x| *d = T::from_f32(x));
                if let Some(l) = lse.as_mut() {
                    l[[token, head]] = r.lse[k];
                }
            }
        }
    }
}

fn compute_item<T: Element, C: CacheElement>(
    item: Item,
    query: ArrayView3<'_, T>,
    cache: &CacheViews<'_, C>,
    meta: &AttentionMetadata,
    params: &AttentionParams,
) -> ItemOut {
    let Item { req, kv_head, row_start, row_end } = item;
    let group = params.group_size();
    let hs = params.head_size;
    let q_len = meta.query_len(req);
    let seq_len = meta.seq_lens[req] as usize;
    let context = seq_len - q_len;
    let token0 = meta.query_start_loc[req] as usize;
    let m = (row_end - row_start) * group;

    // Per (row, head): the visible keys, and the union of them over the item.
    let ranges: Vec<Option<(usize, usize)>> =
        (row_start..row_end).map(|i| visible_range(params, context + i, seq_len)).collect();
    let mut out = Array2::<f32>::zeros((m, hs));
    let mut lse = vec![f32::NEG_INFINITY; m];
    let klo = ranges.iter().flatten().map(|r| r.0).min();
    let khi = ranges.iter().flatten().map(|r| r.1).max();

    let sink = |g: usize| params.sinks.as_ref().map(|s| s[kv_head * group + g]);
    let (Some(klo), Some(khi)) = (klo, khi) else {
        // No row sees a key: the output is 0, the lse is the sink's logit (or -inf).
        for (k, l) in lse.iter_mut().enumerate() {
            *l = sink(k % group).unwrap_or(f32::NEG_INFINITY);
        }
        return ItemOut { item, out, lse };
    };
    let nk = khi - klo + 1;

    // Gather this kv head's keys and values klo..=khi through the block table, dequantised
    // (`stored * scale`, in f32) when the cache is FP8. A NaN byte in a row some query of the
    // item cannot see becomes NaN here and is kept out of that query's output below.
    let (ks, vs) = match (C::DTYPE.is_fp8(), cache.scales) {
        (true, Some(s)) => s.of_head(kv_head),
        _ => (1.0, 1.0),
    };
    let scaled = C::DTYPE.is_fp8() && cache.scales.is_some();
    let bs = cache.key.shape()[1];
    let blocks = meta.block_table.row(req);
    let (key_cache, value_cache) = (&cache.key, &cache.value);
    let mut keys = Array2::<f32>::zeros((nk, hs));
    let mut values = Array2::<f32>::zeros((nk, hs));
    for (n, j) in (klo..=khi).enumerate() {
        let (block, offset) = (blocks[j / bs] as usize, j % bs);
        let k_src =
            key_cache.index_axis(Axis(0), block).index_axis_move(Axis(0), offset).index_axis_move(Axis(0), kv_head);
        let v_src =
            value_cache.index_axis(Axis(0), block).index_axis_move(Axis(0), offset).index_axis_move(Axis(0), kv_head);
        if scaled {
            keys.row_mut(n).zip_mut_with(&k_src, |d, s| *d = s.to_f32() * ks);
            values.row_mut(n).zip_mut_with(&v_src, |d, s| *d = s.to_f32() * vs);
        } else {
            keys.row_mut(n).zip_mut_with(&k_src, |d, s| *d = s.to_f32());
            values.row_mut(n).zip_mut_with(&v_src, |d, s| *d = s.to_f32());
        }
    }

    // The item's queries, row (i, g) -> i * group + g.
    let mut q = Array2::<f32>::zeros((m, hs));
    for i in row_start..row_end {
        for g in 0..group {
            let src = query.index_axis(Axis(0), token0 + i).index_axis_move(Axis(0), kv_head * group + g);
            q.row_mut((i - row_start) * group + g).zip_mut_with(&src, |d, s| *d = s.to_f32());
        }
    }

    // S = Q K^T, then each row becomes its normalised probabilities in place.
    let mut scores = Array2::<f32>::zeros((m, nk));
    general_mat_mul(1.0, &q, &keys.t(), 0.0, &mut scores);
    for (k, mut row) in scores.axis_iter_mut(Axis(0)).enumerate() {
        let (i, g) = (row_start + k / group, k % group);
        let head = kv_head * group + g;
        let pos = context + i;
        let Some((lo, hi)) = ranges[i - row_start] else {
            row.fill(0.0);
            lse[k] = sink(g).unwrap_or(f32::NEG_INFINITY);
            continue;
        };
        let (lo, hi) = (lo - klo, hi - klo);
        row.slice_axis_mut(Axis(0), Slice::from(..lo)).fill(0.0);
        row.slice_axis_mut(Axis(0), Slice::from(hi + 1..)).fill(0.0);
        let mut seen = row.slice_axis_mut(Axis(0), Slice::from(lo..hi + 1));
        let slope = params.alibi_slopes.as_ref().map(|s| s[head]);
        let mut max = sink(g).unwrap_or(f32::NEG_INFINITY);
        for (n, s) in (lo..).zip(seen.iter_mut()) {
            let mut x = params.scale * *s;
            if let Some(cap) = params.softcap {
                x = cap * (x / cap).tanh();
            }
            if let Some(slope) = slope {
                x -= slope * (pos as f32 - (klo + n) as f32).abs();
            }
            *s = x;
            max = max.max(x);
        }
        let mut denom = sink(g).map_or(0.0, |s| (s - max).exp());
        for s in &mut seen {
            *s = (*s - max).exp();
            denom += *s;
        }
        let inv = 1.0 / denom;
        seen.mapv_inplace(|s| s * inv);
        lse[k] = max + denom.ln();
    }

    // O = P V without ever multiplying a masked probability by its value: a key a row cannot see
    // (the causal future of the step's own tokens, outside the window) may hold NaN or Inf (stale
    // or uninitialised cache rows), and 0 * NaN is NaN. The keys that *every* row of the item sees
    // (the intersection of the rows' ranges) go through one GEMM; each row then adds its other
    // visible keys one by one, so a row's output depends on its visible keys only, and bit for bit
    // the same way whatever the invisible ones hold.
    let common = ranges.iter().try_fold((0, usize::MAX), |(lo, hi), r| r.map(|(a, b)| (lo.max(a), hi.min(b))));
    let (clo, chi) = match common {
        Some((a, b)) if a <= b => (a - klo, b - klo + 1),
        _ => (0, 0),
    };
    if clo < chi {
        let (p, v) =
            (scores.slice_axis(Axis(1), Slice::from(clo..chi)), values.slice_axis(Axis(0), Slice::from(clo..chi)));
        general_mat_mul(1.0, &p, &v, 0.0, &mut out);
    }
    for (k, mut o) in out.axis_iter_mut(Axis(0)).enumerate() {
        let Some((lo, hi)) = ranges[k / group] else { continue };
        let p = scores.row(k);
        for n in (lo - klo..hi - klo + 1).filter(|n| !(clo..chi).contains(n)) {
            o.scaled_add(p[n], &values.row(n));
        }
    }
    ItemOut { item, out, lse }
}

#[cfg(test)]
mod tests {
    use super::threads_from;
    use std::env::VarError;

    #[test]
    fn thread_count_setting() {
        assert_eq!(threads_from(Err(VarError::NotPresent)), Ok(None));
        assert_eq!(threads_from(Ok(" 6 ".into())), Ok(Some(6)));
        assert_eq!(threads_from(Ok("0".into())), Err("0".into()));
        assert_eq!(threads_from(Ok("six".into())), Err("six".into()));
        assert_eq!(threads_from(Ok(String::new())), Err(String::new()));
    }
}
