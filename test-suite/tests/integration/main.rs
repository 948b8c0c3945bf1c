//! Cross-crate tests that need no GPU: the CPU KV-cache write against a direct recomputation, the
//! shared validation's errors, and the slot-mapping dtype contract.

mod cache_write;
