//! The CPU KV-cache write, checked element by element against an independent recomputation.

use attention_backend::validate::{self, TensorSpec};
use attention_backend::{bf16, cpu, f16, AttentionError, CacheLayout, CpuKvCache, DType, Element, SlotMapping};
use ndarray::{Array3, Array4};
use test_suite::inputs;

/// Writes a random batch into a cache pre-filled with random values and checks every element:
/// named rows hold the new K/V, every other element is unchanged.
fn check_write<T: Element>(num_tokens: usize, layout: CacheLayout) {
    let mut rng = inputs::rng("cpu cache write");
    let n = layout.num_elements().unwrap();
    let key_before = Array4::from_shape_vec(layout.shape(), inputs::values::<T>(&mut rng, n)).unwrap();
    let value_before = Array4::from_shape_vec(layout.shape(), inputs::values::<T>(&mut rng, n)).unwrap();
    let mut cache = CpuKvCache::from_arrays(key_before.clone(), value_before.clone()).unwrap();
    let shape = (num_tokens, layout.num_kv_heads, layout.head_size);
    let key = Array3::from_shape_vec(shape, inputs::values::<T>(&mut rng, shape.0 * shape.1 * shape.2)).unwrap();
    let value = Array3::from_shape_vec(shape, inputs::values::<T>(&mut rng, shape.0 * shape.1 * shape.2)).unwrap();
    let slots = inputs::slots(&mut rng, num_tokens, layout.num_slots(), 0.1);

    cpu::kv_cache_update(key.view(), value.view(), &mut cache, &SlotMapping::new(slots.clone())).unwrap();

    // The recomputation: a flat row copy per token, written independently of the library's indexing.
    let row = layout.row_elems();
    let mut key_expected: Vec<T> = key_before.iter().copied().collect();
    let mut value_expected: Vec<T> = value_before.iter().copied().collect();
    let key_flat: Vec<T> = key.iter().copied().collect();
    let value_flat: Vec<T> = value.iter().copied().collect();
    for (t, &slot) in slots.iter().enumerate() {
        if slot >= 0 {
            let s = slot as usize;
            key_expected[s * row..(s + 1) * row].copy_from_slice(&key_flat[t * row..(t + 1) * row]);
            value_expected[s * row..(s + 1) * row].copy_from_slice(&value_flat[t * row..(t + 1) * row]);
        }
    }
    assert!(cache.key().iter().eq(key_expected.iter()), "key cache differs from the recomputation");
    assert!(cache.value().iter().eq(value_expected.iter()), "value cache differs from the recomputation");
}

#[test]
fn cpu_write_matches_recomputation_on_the_grid() {
    // The acceptance grid's shapes with a small cache (the CPU path is the reference, not the
    // subject of the large-cache cases, which run on the GPU).
    for &num_tokens in &[1, 42, 300] {
        for &heads in &[1, 8] {
            for &head_size in &[64, 80, 120, 256] {
                for &block_size in &[8, 16, 32] {
                    let layout = CacheLayout::new(64, block_size, heads, head_size).unwrap();
                    check_write::<f16>(num_tokens, layout);
                    check_write::<bf16>(num_tokens, layout);
                    check_write::<f32>(num_tokens, layout);
                }
            }
        }
    }
}

#[test]
fn padding_only_batch_leaves_cache_untouched() {
    let layout = CacheLayout::new(4, 16, 2, 64).unwrap();
    let mut cache = CpuKvCache::<f32>::zeros(layout).unwrap();
    let key = Array3::<f32>::from_elem((3, 2, 64), 7.0);
    cpu::kv_cache_update(key.view(), key.view(), &mut cache, &SlotMapping::new(vec![-1, -1, -5])).unwrap();
    assert!(cache.key().iter().all(|&x| x == 0.0) && cache.value().iter().all(|&x| x == 0.0));
}

fn layout() -> CacheLayout {
    CacheLayout::new(4, 16, 2, 64).unwrap()
}

fn write(key_shape: (usize, usize, usize), slots: Vec<i64>) -> Result<(), AttentionError> {
    let mut cache = CpuKvCache::<f32>::zeros(layout()).unwrap();
    let key = Array3::<f32>::from_elem(key_shape, 1.0);
    let result = cpu::kv_cache_update(key.view(), key.view(), &mut cache, &SlotMapping::new(slots));
    // A refused call writes nothing.
    if result.is_err() {
        assert!(cache.key().iter().all(|&x| x == 0.0), "a rejected write modified the cache");
    }
    result
}

#[test]
fn error_slot_past_the_cache() {
    let err = write((3, 2, 64), vec![0, 64, 1]).unwrap_err();
    assert_eq!(err, AttentionError::SlotOutOfRange { op: "kv_cache_update", index: 1, slot: 64, num_slots: 64 });
}

#[test]
fn error_head_size_mismatch() {
    let err = write((3, 2, 128), vec![0, 1, 2]).unwrap_err();
    assert!(
        matches!(&err, AttentionError::ShapeMismatch { tensor: "key", expected, .. } if expected == &vec![3, 2, 64]),
        "{err:?}"
    );
}

#[test]
fn error_kv_heads_mismatch() {
    let err = write((3, 4, 64), vec![0, 1, 2]).unwrap_err();
    assert!(matches!(err, AttentionError::ShapeMismatch { tensor: "key", .. }), "{err:?}");
}

#[test]
fn error_slot_mapping_length_mismatch() {
    let err = write((3, 2, 64), vec![0, 1]).unwrap_err();
    assert!(
        matches!(&err, AttentionError::ShapeMismatch { tensor: "key", expected, actual, .. }
            if expected == &vec![2, 2, 64] && actual == &vec![3, 2, 64]),
        "{err:?}"
    );
}

#[test]
fn error_value_shape_differs_from_key() {
    let mut cache = CpuKvCache::<f32>::zeros(layout()).unwrap();
    let key = Array3::<f32>::zeros((2, 2, 64));
    let value = Array3::<f32>::zeros((2, 2, 32));
    let err = cpu::kv_cache_update(key.view(), value.view(), &mut cache, &SlotMapping::new(vec![0, 1])).unwrap_err();
    assert!(matches!(err, AttentionError::ShapeMismatch { tensor: "value", .. }), "{err:?}");
}

#[test]
fn error_dtype_mismatch_in_shared_validation() {
    // The generic entry points make a dtype mismatch a compile error; run-time dtypes (the unified
    // API, FFI users) go through this shared check, which both backends call.
    let shape = [2, 2, 64];
    let err = validate::kv_cache_update(
        "kv_cache_update",
        &layout(),
        DType::BF16,
        TensorSpec { name: "key", shape: &shape, dtype: DType::F16 },
        TensorSpec { name: "value", shape: &shape, dtype: DType::BF16 },
        &SlotMapping::new(vec![0, 1]),
    )
    .unwrap_err();
    assert_eq!(
        err,
        AttentionError::DTypeMismatch {
            op: "kv_cache_update",
            tensor: "key",
            expected: DType::BF16,
            actual: DType::F16
        }
    );
}

#[test]
fn error_invalid_layout() {
    let err = CacheLayout::new(0, 16, 2, 64).unwrap_err();
    assert!(matches!(err, AttentionError::InvalidArgument { .. }), "{err:?}");
}

#[test]
fn slot_mapping_holds_i64_slots_past_i32() {
    // A cache of more than 2^31 slots is real (e.g. 2^27 blocks of 16); the slot must survive.
    let big = i64::from(i32::MAX) + 12345;
    let mapping = SlotMapping::new(vec![3, big, -1]);
    assert_eq!(mapping.max_slot(), Some(big));
    assert_eq!(mapping.as_slice()[1], big);
    assert_eq!(mapping.num_written(), 2);
}
