//! The CUDA KV-cache write against an independent recomputation and the CPU backend, on the
//! acceptance grid: exact equality, padding slots and unnamed rows untouched.

use attention_backend::cuda::{self, CudaKvCache, DeviceSlotMapping, DeviceTensor};
use attention_backend::{bf16, cpu, f16, AttentionError, CacheLayout, CpuKvCache, Element, SlotMapping};
use ndarray::{Array3, Array4};
use test_suite::inputs;

use crate::common::device;

/// One grid point: writes batches of each size in `batches` (slots distinct across all of them,
/// 10% padding) into a zeroed cache, then checks every row of both caches: a named row equals its
/// token's K/V bit for bit, every other row is still zero. The inputs are random and non-zero, so a
/// write to a wrong row or a missing write shows.
fn check_grid_point<T: Element>(layout: CacheLayout, batches: &[usize], compare_cpu: bool) {
    let dev = device();
    let mut rng = inputs::rng(&format!("gpu cache write {:?} {layout:?} {batches:?}", T::DTYPE));
    let row = layout.row_elems();
    let total: usize = batches.iter().sum();
    let all_slots = inputs::slots(&mut rng, total, layout.num_slots(), 0.1);
    let mut cache = CudaKvCache::<T>::zeros(dev, layout).unwrap();
    let mut owner: Vec<Option<(usize, usize)>> = vec![None; layout.num_slots()]; // slot -> (batch, token)
    let mut host_batches = Vec::new();
    let mut start = 0;
    for (b, &n) in batches.iter().enumerate() {
        let slots = SlotMapping::new(all_slots[start..start + n].to_vec());
        start += n;
        let key = inputs::values::<T>(&mut rng, n * row);
        let value = inputs::values::<T>(&mut rng, n * row);
        let shape = [n, layout.num_kv_heads, layout.head_size];
        let k = DeviceTensor::from_host(dev, &key, &shape).unwrap();
        let v = DeviceTensor::from_host(dev, &value, &shape).unwrap();
        let s = DeviceSlotMapping::upload(dev, &slots).unwrap();
        cuda::kv_cache_update(dev, &k, &v, &mut cache, &s).unwrap();
        for (t, &slot) in slots.as_slice().iter().enumerate() {
            if slot >= 0 {
                owner[slot as usize] = Some((b, t));
            }
        }
        host_batches.push((key, value, slots));
    }
    let (key_cache, value_cache) = cache.to_host(dev).unwrap();
    let zero = T::from_f32(0.0);
    for (slot, who) in owner.iter().enumerate() {
        let got_k = &key_cache[slot * row..(slot + 1) * row];
        let got_v = &value_cache[slot * row..(slot + 1) * row];
        match who {
            Some((b, t)) => {
                let (key, value, _) = &host_batches[*b];
                assert!(got_k == &key[t * row..(t + 1) * row], "key row of slot {slot} (batch {b} token {t}) differs");
                assert!(got_v == &value[t * row..(t + 1) * row], "value row of slot {slot} differs");
            }
            None => {
                assert!(got_k.iter().chain(got_v).all(|&x| x == zero), "slot {slot} was named by no token but changed");
            }
        }
    }

    if compare_cpu {
        // The same writes on the CPU backend give the same caches, element for element.
        let mut cpu_cache = CpuKvCache::<T>::zeros(layout).unwrap();
        for (key, value, slots) in &host_batches {
            let shape = (slots.len(), layout.num_kv_heads, layout.head_size);
            let k = Array3::from_shape_vec(shape, key.clone()).unwrap();
            let v = Array3::from_shape_vec(shape, value.clone()).unwrap();
            cpu::kv_cache_update(k.view(), v.view(), &mut cpu_cache, slots).unwrap();
        }
        let (ck, cv) = cpu_cache.into_arrays();
        assert!(ck == Array4::from_shape_vec(layout.shape(), key_cache).unwrap(), "GPU key cache != CPU key cache");
        assert!(
            cv == Array4::from_shape_vec(layout.shape(), value_cache).unwrap(),
            "GPU value cache != CPU value cache"
        );
    }
}

/// The acceptance grid for one dtype and cache size: kv heads {1, 8} x head sizes {64, 80, 120,
/// 256} x block sizes {8, 16, 32}, batches of 1, 42 and 4096 tokens into one cache.
fn grid<T: Element>(num_blocks: usize) {
    for &heads in &[1, 8] {
        for &head_size in &[64, 80, 120, 256] {
            for &block_size in &[8, 16, 32] {
                let layout = CacheLayout::new(num_blocks, block_size, heads, head_size).unwrap();
                check_grid_point::<T>(layout, &[1, 42, 4096], num_blocks <= 1024);
            }
        }
    }
}

#[test]
fn cache_write_grid_f16_1024_blocks() {
    grid::<f16>(1024);
}
#[test]
fn cache_write_grid_bf16_1024_blocks() {
    grid::<bf16>(1024);
}
#[test]
fn cache_write_grid_f32_1024_blocks() {
    grid::<f32>(1024);
}
#[test]
fn cache_write_grid_f16_10000_blocks() {
    grid::<f16>(10000);
}
#[test]
fn cache_write_grid_bf16_10000_blocks() {
    grid::<bf16>(10000);
}
#[test]
fn cache_write_grid_f32_10000_blocks() {
    grid::<f32>(10000);
}

#[test]
fn cache_write_narrow_rows_use_narrower_vectors() {
    // Rows of 72, 12 and 6 bytes take the 8-, 4- and 2-byte paths of the kernel.
    for head_size in [36, 6, 3] {
        check_grid_point::<f16>(CacheLayout::new(64, 16, 1, head_size).unwrap(), &[1, 42, 300], true);
    }
    check_grid_point::<f32>(CacheLayout::new(64, 16, 1, 3).unwrap(), &[42], true);
}

#[test]
fn cache_write_sanitizer_subset() {
    for &(heads, head_size) in &[(1, 64), (8, 80), (8, 120), (1, 256), (1, 36), (1, 3)] {
        check_grid_point::<f16>(CacheLayout::new(128, 16, heads, head_size).unwrap(), &[1, 42], false);
        check_grid_point::<bf16>(CacheLayout::new(128, 8, heads, head_size).unwrap(), &[42], false);
        check_grid_point::<f32>(CacheLayout::new(128, 32, heads, head_size).unwrap(), &[42], false);
    }
}

#[test]
fn cache_write_sanitizer_subset_rejects_bad_input_before_launch() {
    let dev = device();
    let layout = CacheLayout::new(4, 16, 2, 64).unwrap();
    let mut cache = CudaKvCache::<bf16>::zeros(dev, layout).unwrap();
    let key = DeviceTensor::<bf16>::from_host(dev, &vec![bf16::ONE; 3 * 2 * 64], &[3, 2, 64]).unwrap();
    let wrong = DeviceTensor::<bf16>::from_host(dev, &vec![bf16::ONE; 3 * 2 * 128], &[3, 2, 128]).unwrap();

    let past = DeviceSlotMapping::upload(dev, &SlotMapping::new(vec![0, 64, 1])).unwrap();
    let err = cuda::kv_cache_update(dev, &key, &key, &mut cache, &past).unwrap_err();
    assert_eq!(err, AttentionError::SlotOutOfRange { op: "kv_cache_update", index: 1, slot: 64, num_slots: 64 });

    let ok_slots = DeviceSlotMapping::upload(dev, &SlotMapping::new(vec![0, 1, 2])).unwrap();
    let err = cuda::kv_cache_update(dev, &wrong, &wrong, &mut cache, &ok_slots).unwrap_err();
    assert!(matches!(err, AttentionError::ShapeMismatch { tensor: "key", .. }), "{err:?}");

    let short = DeviceSlotMapping::upload(dev, &SlotMapping::new(vec![0, 1])).unwrap();
    let err = cuda::kv_cache_update(dev, &key, &key, &mut cache, &short).unwrap_err();
    assert!(matches!(err, AttentionError::ShapeMismatch { .. }), "{err:?}");

    let (k, v) = cache.to_host(dev).unwrap();
    assert!(k.iter().chain(&v).all(|&x| x == bf16::ZERO), "a rejected write modified the cache");
}

#[test]
fn slot_mapping_is_i64_on_the_device() {
    // The seed's crash: an int32 slot mapping where the cache write reads int64. Here the device
    // buffer is typed i64, 8 bytes a slot, and a slot past i32::MAX survives the round trip.
    let dev = device();
    let big = i64::from(i32::MAX) + 7;
    let slots = DeviceSlotMapping::upload(dev, &SlotMapping::new(vec![5, -1, big])).unwrap();
    let buf: &attention_backend::cuda::cudarc::driver::CudaSlice<i64> = slots.buffer();
    assert_eq!(buf.num_bytes(), 3 * std::mem::size_of::<i64>());
    assert_eq!(dev.stream().clone_dtoh(buf).unwrap(), vec![5, -1, big]);
}
