//! GPU test suite: every CUDA kernel against the CPU backend and an independent float64
//! recomputation. Built only with the `cuda` feature; every test **fails** (never skips) when no
//! GPU is visible, so a run without a device can never be mistaken for a pass.
//!
//! Tests whose name contains `sanitizer_subset` form the reduced set that runs under
//! compute-sanitizer (memcheck, racecheck): every kernel, dtype, head size, block size and feature
//! at least once, plus the longest case.

mod attention;
mod cache_write;
mod common;
mod decode_variants;
mod fp8;
mod fp8_backend;
mod fp8_prefill;
mod plan;
mod prefill_sm90;
mod raw;
mod strides;
mod synthetic;
mod unseen;
