//! Raw declarations of the `extern "C"` launchers in `csrc/`. Nothing here is called directly
//! outside this crate: the safe wrappers in [`crate::launch`] check buffer sizes first.
//!
//! Every launcher returns a `cudaError_t` (0 = success) and never synchronises.

use std::ffi::{c_char, c_void};

/// `cudaError_t`.
pub type CudaStatus = i32;

extern "C" {
    /// KV-cache write (`csrc/cache_write.cu`).
    ///
    /// - `key`, `value`: `[num_tokens, row_elems]` with token rows `key_stride` / `value_stride`
    ///   elements apart (`row_elems = num_kv_heads * head_size`).
    /// - `key_cache`, `value_cache`: `[num_slots, row_elems]`, contiguous (`num_slots = num_blocks *
    ///   block_size`; the NHD layout's rows).
    /// - `slot_mapping`: `[num_tokens]` i64; negative entries and entries `>= num_slots` are skipped.
    /// - `elem_bytes`: 2 or 4.
    pub fn pa_kv_cache_write(
        key: *const c_void,
        value: *const c_void,
        key_cache: *mut c_void,
        value_cache: *mut c_void,
        slot_mapping: *const i64,
        num_tokens: i64,
        row_elems: i64,
        key_stride: i64,
        value_stride: i64,
        num_slots: i64,
        elem_bytes: i32,
        stream: *mut c_void,
    ) -> CudaStatus;

    /// The runtime's message for a status; a static string.
    pub fn pa_error_string(status: CudaStatus) -> *const c_char;
}
