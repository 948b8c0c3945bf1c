//! Shared helpers for the cross-crate tests and the GPU benchmark: random inputs drawn the way a
//! serving batch looks (distinct slots with padding, shuffled block tables) and seeds printed so
//! any failure can be replayed.

pub mod inputs;
pub mod timing;
