//! Random test inputs.

use attention_backend::Element;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};

/// A seeded generator: `PAGED_ATTN_SEED` if set, else a fresh seed, printed either way so a failing
/// run can be replayed with the same inputs.
pub fn rng(label: &str) -> StdRng {
    let seed = std::env::var("PAGED_ATTN_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    println!("{label}: PAGED_ATTN_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

/// `n` values uniform in `[-1, 1)`, rounded to `T`.
pub fn values<T: Element>(rng: &mut StdRng, n: usize) -> Vec<T> {
    (0..n).map(|_| T::from_f32(rng.random_range(-1.0f32..1.0))).collect()
}

/// `num_tokens` distinct slots drawn from `0..num_slots`, about `pad_fraction` of them replaced by
/// -1 (padding), in random order.
pub fn slots(rng: &mut StdRng, num_tokens: usize, num_slots: usize, pad_fraction: f64) -> Vec<i64> {
    sample(rng, num_slots, num_tokens)
        .into_iter()
        .map(|s| if rng.random_bool(pad_fraction) { -1 } else { s as i64 })
        .collect()
}
