//! The memory a run needs, computed from its flags before anything is allocated.
//!
//! A run's big allocations are the per-layer KV caches (on the host for the CPU backend), the
//! workload's token vectors, each step's Q/K/V and output buffers, the `f64` reference history the
//! verifier rebuilds, and the runner's block table and block pool. Each is a product of flags, so
//! it is computed here with saturating `u128` arithmetic (nothing can overflow) and compared with
//! the machine's memory: a run that cannot fit is refused with the flags that size the largest
//! part, instead of aborting in the allocator minutes later.

use std::fmt;

use crate::cli::RunConfig;
use crate::workload::WorkloadSpec;
use crate::ServeError;

/// Bytes a request costs besides its tokens (the request structs of the workload and the
/// scheduler, queue entries, per-request scratch), rounded up.
const PER_REQUEST_BYTES: u128 = 512;
/// Bytes a block costs in the block pool (reference count, free-list links, prefix-cache entry).
const PER_POOL_BLOCK_BYTES: u128 = 64;

/// One part of the estimate: what it is, its bytes, and the flags that size it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// What it is.
    pub what: &'static str,
    /// Bytes it needs.
    pub bytes: u128,
    /// The flags that size it, as `--flag value x --flag value`.
    pub flags: String,
}

/// The host memory a run needs, part by part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryNeed {
    /// The parts, largest first.
    pub parts: Vec<Part>,
}

impl MemoryNeed {
    /// The sum of the parts.
    pub fn total(&self) -> u128 {
        self.parts.iter().fold(0u128, |a, p| a.saturating_add(p.bytes))
    }
}

/// A byte count for people: `1.05 TB`, `512 B`.
#[derive(Clone, Copy, Debug)]
pub struct Bytes(pub u128);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
        let mut v = self.0 as f64;
        let mut unit = 0;
        while v >= 1000.0 && unit + 1 < UNITS.len() {
            v /= 1000.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{v:.2} {}", UNITS[unit])
        }
    }
}

fn product(factors: &[usize]) -> u128 {
    factors.iter().fold(1u128, |a, &f| a.saturating_mul(f as u128))
}

/// The host memory `cfg` needs; `cache_on_host` when the backend keeps its KV caches in host
/// memory (the CPU backend). The CUDA backend's caches are device memory, which its allocator
/// checks (a failure there is a typed error).
pub fn estimate(cfg: &RunConfig, cache_on_host: bool) -> MemoryNeed {
    let s = cfg.shape;
    let dtype = cfg.dtype.size_in_bytes();
    let kv_dtype = cfg.kv_cache_dtype.size_in_bytes();
    let mut parts = Vec::new();
    if cache_on_host {
        parts.push(Part {
            what: "the KV caches",
            bytes: product(&[s.num_layers, 2, cfg.num_blocks, cfg.block_size, s.num_kv_heads, s.head_size, kv_dtype]),
            flags: format!(
                "--layers {} x --num-blocks {} x --block-size {} x --kv-heads {} x --head-size {} x {kv_dtype} bytes \
                 ({}) x 2 (keys and values)",
                s.num_layers, cfg.num_blocks, cfg.block_size, s.num_kv_heads, s.head_size, cfg.kv_cache_dtype
            ),
        });
    }
    // The longest sequence and all tokens of the workload (upper bounds for Poisson lengths).
    let (requests, max_len, tokens, flags) = match &cfg.workload {
        WorkloadSpec::Poisson { num_requests, prompt_len, output_len, .. } => {
            let hi = |len: usize| len.saturating_add(len / 2).max(1);
            let max_len = hi(*prompt_len).saturating_add(hi(*output_len));
            (
                *num_requests,
                max_len,
                product(&[*num_requests, max_len]),
                format!(
                    "--requests {num_requests} x up to {max_len} tokens (--prompt-len {prompt_len}, --output-len \
                     {output_len})"
                ),
            )
        }
        WorkloadSpec::Trace(entries) => {
            let lens = entries.iter().map(|e| e.prompt_len.saturating_add(e.output_len));
            let tokens = lens.clone().fold(0u128, |a, l| a.saturating_add(l as u128));
            (entries.len(), lens.max().unwrap_or(0), tokens, format!("--trace with {} requests", entries.len()))
        }
    };
    // Tokens are u32, kept by the workload and by the scheduler; the shared prefix once more.
    let workload = tokens
        .saturating_mul(8)
        .saturating_add((requests as u128).saturating_mul(PER_REQUEST_BYTES))
        .saturating_add(product(&[cfg.sharing.len, 4]));
    parts.push(Part { what: "the workload", bytes: workload, flags });
    parts.push(Part {
        what: "the per-step buffers",
        // Q, K, V and the output, in the storage type and as f32 while they are made, plus the
        // output's host copy.
        bytes: product(&[
            cfg.scheduler.max_num_batched_tokens,
            2 * s.num_heads.saturating_add(s.num_kv_heads),
            s.head_size,
            dtype + 4,
        ]),
        flags: format!(
            "--max-num-batched-tokens {} x (--heads {} + --kv-heads {}) x --head-size {}",
            cfg.scheduler.max_num_batched_tokens, s.num_heads, s.num_kv_heads, s.head_size
        ),
    });
    if cfg.verify.is_some() {
        parts.push(Part {
            what: "the f64 reference",
            // Each checked request (in parallel) rebuilds its K and V history in f64.
            bytes: product(&[cfg.verify_sample.max_requests, max_len, s.num_kv_heads, s.head_size, 16]),
            flags: format!(
                "--verify-requests {} x {max_len}-token histories x --kv-heads {} x --head-size {}",
                cfg.verify_sample.max_requests, s.num_kv_heads, s.head_size
            ),
        });
    }
    let blocks_per_req = max_len.div_ceil(cfg.block_size.max(1));
    parts.push(Part {
        what: "the block table and pool",
        // The runner's table has a row per running request (at most one per request).
        bytes: product(&[cfg.scheduler.max_num_seqs.min(requests), blocks_per_req, 4])
            .saturating_add((cfg.num_blocks as u128).saturating_mul(PER_POOL_BLOCK_BYTES)),
        flags: format!(
            "--max-num-seqs {} x {blocks_per_req} blocks a request, --num-blocks {}",
            cfg.scheduler.max_num_seqs, cfg.num_blocks
        ),
    });
    parts.sort_by_key(|p| std::cmp::Reverse(p.bytes));
    MemoryNeed { parts }
}

/// This machine's memory in bytes (`MemTotal` of `/proc/meminfo`); `None` where it cannot be
/// read, and then only the address space bounds a run.
pub fn host_memory() -> Option<u128> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Refuses a run whose [`estimate`] exceeds `limit` bytes (the machine's memory, or the address
/// space when that is unknown), naming the largest part and its flags.
///
/// # Errors
/// [`ServeError::Usage`] (exit 2), one line.
pub fn check(cfg: &RunConfig, cache_on_host: bool, limit: Option<u128>) -> Result<(), ServeError> {
    let need = estimate(cfg, cache_on_host);
    let (limit, what) = match limit {
        Some(l) => (l, "this machine's memory"),
        None => (isize::MAX as u128, "the address space"),
    };
    let total = need.total();
    if total <= limit {
        return Ok(());
    }
    let Some(big) = need.parts.first() else { return Ok(()) };
    Err(ServeError::Usage(format!(
        "the run needs about {} of memory, more than the {} of {what}; the largest part, {}, is {} ({}): lower those flags",
        Bytes(total),
        Bytes(limit),
        big.what,
        Bytes(big.bytes),
        big.flags
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_for_people() {
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes(1_050_000_000_000).to_string(), "1.05 TB");
        assert_eq!(Bytes(u128::MAX).to_string().split(' ').nth(1), Some("EB"));
    }
}
