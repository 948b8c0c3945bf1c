//! The Hopper prefills forced on this thread through `with_prefill_path`: the lockstep kernel
//! (`csrc/paged_prefill_sm90.cu`, tests `sm90_*`) and the warp-specialised one
//! (`csrc/paged_prefill_sm90ws.cu`, tests `sm90ws_*`), each against the CPU backend and the
//! float64 recomputation of `attention.rs`, on ACCEPTANCE.md's varlen grids for the shapes they are
//! compiled for (head sizes 64 and 128): both dtypes, blocks 16/32/64 (and 8/24/48), soft-cap, sliding window,
//! causal and not, GQA 8/2 and 16/2, ALiBi and sinks, the long batch, and non-finite V at keys a
//! row cannot see. Inputs, shuffled block tables and NaN-poisoned outputs come from
//! `attention.rs`'s harness. Every test first checks that the launcher really picks the kernel it
//! means to test, so on a device that is not compute capability 9.0 these tests fail instead of
//! silently testing the sm80 kernel.

use attention_backend::cuda::{self, AttentionWorkspace, CudaKvCache, DeviceMetadata, DeviceTensor};
use attention_backend::ndarray::{Array3, ArrayView3};
use attention_backend::{
    bf16, cpu, f16, AttentionMetadata, AttentionParams, BlockTable, CacheLayout, CpuKvCache, DType, Element,
    SlotMapping,
};
use attention_kernels::attention::{prefill_kernel, prefill_trace, with_prefill_path, PrefillKernel, PrefillPath};
use attention_kernels::KernelError;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::attention::{alibi, run_dyn, sinks, Case, LONG_BATCH, SOFTCAPS, VARLEN_BATCHES, WINDOWS};
use crate::common;

/// Head sizes the Hopper kernel is compiled for.
const SM90_HEAD_SIZES: [usize; 2] = [64, 128];

/// The two Hopper kernels: the path forcing each, and the kernel that path must resolve to for a
/// 16-bit cache at head sizes 64 and 128.
const SM90: (PrefillPath, PrefillKernel) = (PrefillPath::Sm90, PrefillKernel::Sm90);
const SM90WS: (PrefillPath, PrefillKernel) = (PrefillPath::Sm90Ws, PrefillKernel::Sm90Ws);

/// Runs `f` with `path.0` forced on this thread, after checking that the launcher takes kernel
/// `path.1` for `head_size` in both dtypes.
fn on_path<R>(path: (PrefillPath, PrefillKernel), head_size: usize, f: impl FnOnce() -> R) -> R {
    with_prefill_path(path.0, || {
        let ctx = common::device().context();
        for dt in [DType::F16, DType::BF16] {
            let k =
                prefill_kernel(ctx, head_size, dt).unwrap_or_else(|e| panic!("{:?} prefill unavailable: {e}", path.0));
            assert_eq!(k, path.1, "head size {head_size} {dt} does not run the {:?} prefill", path.1);
        }
        f()
    })
}

/// The varlen grid for one head configuration: head 64/128 x block 16/32/64 x dtype x both varlen
/// batches, soft-cap and window cycled, every third case non-causal.
fn sm90_grid(path: (PrefillPath, PrefillKernel), heads: (usize, usize), seed0: u64) {
    let mut seed = seed0;
    let mut n = 0usize;
    for d in SM90_HEAD_SIZES {
        on_path(path, d, || {
            for bs in [16, 32, 64] {
                for bf in [false, true] {
                    for batch in VARLEN_BATCHES {
                        seed += 1;
                        let mut c =
                            Case::new(heads, d, bs, batch, seed).softcap(SOFTCAPS[n % 3]).sliding(WINDOWS[(n / 3) % 2]);
                        if n % 3 == 2 {
                            c.params = c.params.clone().with_causal(false);
                        }
                        run_dyn(&c, bf);
                        n += 1;
                    }
                }
            }
        });
    }
    eprintln!("{:?} prefill heads {heads:?}: {n} cases passed", path.1);
}

#[test]
fn sm90_grid_varlen_heads_8_2() {
    sm90_grid(SM90, (8, 2), 12_100);
}

#[test]
fn sm90_grid_varlen_heads_16_2() {
    sm90_grid(SM90, (16, 2), 12_200);
}

#[test]
fn sm90ws_grid_varlen_heads_8_2() {
    sm90_grid(SM90WS, (8, 2), 12_100);
}

#[test]
fn sm90ws_grid_varlen_heads_16_2() {
    sm90_grid(SM90WS, (16, 2), 12_200);
}

/// Block sizes off the grid, for the warp-specialised producer's two gathers: a thread copies 16
/// (head 128) or 8 (head 64) consecutive key rows from one page when that count divides the block
/// size, else each row's offset goes through shared memory. Block 8 and 24 take the second form at
/// head 128 (the launcher's configuration with the offset ring) and the first at head 64; 48 (not a
/// power of two, not a divisor of the 128-key tile) takes the first at both (at head 128 the
/// ring-less configuration, whose third V stage takes the ring's room).
fn odd_block_sizes(path: (PrefillPath, PrefillKernel), seed0: u64) {
    let mut seed = seed0;
    let mut n = 0usize;
    for d in SM90_HEAD_SIZES {
        on_path(path, d, || {
            for bs in [8, 24, 48] {
                for batch in VARLEN_BATCHES {
                    seed += 1;
                    let c = Case::new((8, 2), d, bs, batch, seed).sliding(WINDOWS[n % 2]).softcap(SOFTCAPS[n % 3]);
                    run_dyn(&c, n.is_multiple_of(2));
                    n += 1;
                }
            }
        });
    }
    eprintln!("{:?} prefill, blocks 8/24/48: {n} cases passed", path.1);
}

#[test]
fn sm90_odd_block_sizes() {
    odd_block_sizes(SM90, 12_700);
}

#[test]
fn sm90ws_odd_block_sizes() {
    odd_block_sizes(SM90WS, 12_700);
}

/// The long batch [(2048, 2048), (1, 8192), (300, 4000)] for both head sizes and dtypes, with and
/// without a window, GQA 16/2.
fn long_batch(path: (PrefillPath, PrefillKernel)) {
    let mut seed = 13_000;
    for d in SM90_HEAD_SIZES {
        on_path(path, d, || {
            for bf in [false, true] {
                for (i, win) in WINDOWS.into_iter().enumerate() {
                    seed += 1;
                    let bs = [16, 64][i];
                    run_dyn(&Case::new((16, 2), d, bs, LONG_BATCH, seed).sliding(win).softcap(SOFTCAPS[i]), bf);
                }
            }
        });
    }
}

#[test]
fn sm90_grid_long_batch() {
    long_batch(SM90);
}

#[test]
fn sm90ws_grid_long_batch() {
    long_batch(SM90WS);
}

/// ALiBi, sinks, MQA, non-causal windows, padding rows and forward() with the cache write.
fn features(path: (PrefillPath, PrefillKernel)) {
    let mut rng = StdRng::seed_from_u64(1414);
    let mixed: &[(usize, usize)] = &[(1, 700), (17, 17), (64, 1000), (200, 260), (129, 129)];
    let mut seed = 14_000;
    for d in SM90_HEAD_SIZES {
        on_path(path, d, || {
            for bf in [false, true] {
                for heads in [(8, 2), (32, 1), (16, 16)] {
                    let h = heads.0;
                    for v in 0..4 {
                        seed += 1;
                        let bs = [16, 32, 64][(seed % 3) as usize];
                        let mut c = Case::new(heads, d, bs, mixed, seed);
                        c.params = match v {
                            0 => {
                                c.params.clone().with_alibi_slopes(Some(alibi(h))).with_sinks(Some(sinks(h, &mut rng)))
                            }
                            1 => c.params.clone().with_causal(false).with_window(Some(37), Some(5)),
                            2 => c.params.clone().with_softcap(Some(30.0)).with_window(Some(100), Some(0)),
                            _ => c.params.clone(),
                        };
                        c.padding = v;
                        c.use_forward = v == 3;
                        c.lse = v != 3;
                        run_dyn(&c, bf);
                    }
                }
            }
        });
    }
}

#[test]
fn sm90_features() {
    features(SM90);
}

#[test]
fn sm90ws_features() {
    features(SM90WS);
}

/// A small varlen batch with padding rows on a large cache pool: the set compute-sanitizer runs.
fn sanitizer_subset(path: (PrefillPath, PrefillKernel)) {
    let batch: &[(usize, usize)] = &[(70, 150), (1, 9), (33, 97), (130, 130)];
    let mut seed = 15_000;
    for (i, d) in SM90_HEAD_SIZES.into_iter().enumerate() {
        on_path(path, d, || {
            for bf in [false, true] {
                seed += 1;
                let bs = [16, 64][usize::from(bf)];
                let mut c = Case::new([(8, 2), (16, 2)][i], d, bs, batch, seed)
                    .softcap(SOFTCAPS[1 + usize::from(bf)])
                    .sliding(WINDOWS[i]);
                c.num_blocks = 2048;
                c.padding = 2;
                run_dyn(&c, bf);
            }
        });
    }
}

#[test]
fn sanitizer_subset_sm90_prefill() {
    sanitizer_subset(SM90);
}

#[test]
fn sanitizer_subset_sm90ws_prefill() {
    sanitizer_subset(SM90WS);
}

// ---- non-finite V at keys a row cannot see ------------------------------------------------------

/// One request of `q_len` new tokens on `kv_len` keys, V holding NaN at `nan_key` and +Inf at
/// `inf_key` (every head, every element), under `params`. Rows that cannot see either key must come
/// back finite and equal to the CPU backend (which never touches a key outside a row's range); rows
/// that can see one must come back non-finite in every element.
fn unseen_case<T: Element>(params: AttentionParams, block_size: usize, q_len: usize, kv_len: usize, bad: [usize; 2]) {
    let dev = common::device();
    let (h, kvh, d) = (params.num_heads, params.num_kv_heads, params.head_size);
    let mut rng = StdRng::seed_from_u64(16_000 + (d * block_size + kv_len) as u64);
    let blocks = kv_len.div_ceil(block_size);
    let num_blocks = blocks * 4;
    let mut pool: Vec<i32> = (0..num_blocks as i32).collect();
    pool.shuffle(&mut rng);
    let table: Vec<i32> = pool[..blocks].to_vec();
    let row = kvh * d;
    let keys: Vec<T> = (0..kv_len * row).map(|_| T::from_f32(rng.random_range(-2.0..2.0f32))).collect();
    let mut values: Vec<T> = (0..kv_len * row).map(|_| T::from_f32(rng.random_range(-2.0..2.0f32))).collect();
    for (key, x) in bad.iter().zip([f32::NAN, f32::INFINITY]) {
        for e in 0..row {
            values[key * row + e] = T::from_f32(x);
        }
    }
    let query: Vec<T> = (0..q_len * h * d).map(|_| T::from_f32(rng.random_range(-2.0..2.0f32))).collect();
    let slots: Vec<i64> =
        (0..kv_len).map(|j| i64::from(table[j / block_size]) * block_size as i64 + (j % block_size) as i64).collect();
    let new_slots = slots[kv_len - q_len..].to_vec();
    let meta = AttentionMetadata::new(
        vec![0, q_len as i32],
        vec![kv_len as i32],
        BlockTable::new(table, 1, blocks).unwrap(),
        SlotMapping::new(new_slots),
        1,
    )
    .unwrap();

    let layout = CacheLayout::new(num_blocks, block_size, kvh, d).unwrap();
    let mut cache = CudaKvCache::<T>::zeros(dev, layout).unwrap();
    let kt = DeviceTensor::from_host(dev, &keys, &[kv_len, kvh, d]).unwrap();
    let vt = DeviceTensor::from_host(dev, &values, &[kv_len, kvh, d]).unwrap();
    let sm = cuda::DeviceSlotMapping::upload(dev, &SlotMapping::new(slots)).unwrap();
    cuda::kv_cache_update(dev, &kt, &vt, &mut cache, &sm).unwrap();
    let dm = DeviceMetadata::upload(dev, &meta).unwrap();
    let q = DeviceTensor::from_host(dev, &query, &[q_len, h, d]).unwrap();
    let nan = T::from_f32(f32::NAN);
    let mut out = DeviceTensor::from_host(dev, &vec![nan; q_len * h * d], &[q_len, h, d]).unwrap();
    let mut ws = AttentionWorkspace::new();
    cuda::paged_attention(
        dev,
        &dm,
        &params,
        cuda::AttentionIo { query: &q, cache: &cache, out: &mut out, lse: None },
        &mut ws,
    )
    .unwrap();
    let got = out.to_host(dev).unwrap();

    // CPU reference on a compact cache (block i of the request = block i).
    let cpu_layout = CacheLayout::new(blocks, block_size, kvh, d).unwrap();
    let mut cpu_cache = CpuKvCache::<T>::zeros(cpu_layout).unwrap();
    {
        let (mut kc, mut vc) = cpu_cache.key_value_mut();
        for j in 0..kv_len {
            for x in 0..kvh {
                for e in 0..d {
                    kc[[j / block_size, j % block_size, x, e]] = keys[(j * kvh + x) * d + e];
                    vc[[j / block_size, j % block_size, x, e]] = values[(j * kvh + x) * d + e];
                }
            }
        }
    }
    let cpu_meta = AttentionMetadata::new(
        vec![0, q_len as i32],
        vec![kv_len as i32],
        BlockTable::new((0..blocks as i32).collect(), 1, blocks).unwrap(),
        // The step contract: the new tokens' slots follow the (identity) block table.
        SlotMapping::new((kv_len - q_len..kv_len).map(|j| j as i64).collect()),
        1,
    )
    .unwrap();
    let qv = ArrayView3::from_shape((q_len, h, d), &query[..]).unwrap();
    let mut cpu_out = Array3::<T>::from_elem((q_len, h, d), nan);
    cpu::paged_attention(
        &cpu_meta,
        &params,
        cpu::AttentionIo { query: qv, cache: &cpu_cache, out: cpu_out.view_mut(), lse: None },
    )
    .unwrap();
    let cpu_out = cpu_out.into_raw_vec_and_offset().0;

    let ctx = kv_len - q_len;
    let sees = |i: usize, key: usize| {
        let pos = ctx + i;
        !(params.causal && key > pos)
            && params.window_right.is_none_or(|w| key <= pos + w)
            && params.window_left.is_none_or(|w| key + w >= pos)
    };
    let (mut hidden_rows, mut seen_rows) = (0, 0);
    for i in 0..q_len {
        let visible = bad.iter().any(|&k| sees(i, k));
        if visible {
            seen_rows += 1;
        } else {
            hidden_rows += 1;
        }
        for hh in 0..h {
            for e in 0..d {
                let at = (i * h + hh) * d + e;
                let x = got[at].to_f32();
                if visible {
                    assert!(!x.is_finite(), "row {i} head {hh} elem {e} sees a non-finite V but got {x} (d {d})");
                } else {
                    let r = cpu_out[at].to_f32();
                    assert!(
                        x.is_finite() && (x - r).abs() <= 2e-2 + 1e-2 * r.abs(),
                        "row {i} head {hh} elem {e} cannot see the non-finite V: got {x}, cpu {r} (d {d} bs {block_size})"
                    );
                }
            }
        }
    }
    assert!(hidden_rows > 0 && seen_rows > 0, "the case must have rows on both sides ({hidden_rows} / {seen_rows})");
}

/// Causal diagonal tiles, a sliding window over a prefix and a non-causal right window, each with a
/// NaN and an Inf V row, for both head sizes and block sizes 16 / 64.
fn unseen_all(path: (PrefillPath, PrefillKernel)) {
    for d in SM90_HEAD_SIZES {
        on_path(path, d, || {
            for bs in [16, 64] {
                // Causal: the NaN / Inf keys sit in the middle of a 128-row block, on a diagonal tile.
                let p = AttentionParams::new(8, 2, d);
                unseen_case::<bf16>(p.clone(), bs, 300, 300, [150, 200]);
                unseen_case::<f16>(p.clone(), bs, 300, 300, [150, 200]);
                // Chunked prefill on a prefix: keys left of a sliding window are hidden from later rows.
                let w = p.clone().with_sliding_window(64);
                unseen_case::<bf16>(w, bs, 200, 600, [420, 430]);
                // Non-causal with a right window: keys far right are hidden from early rows.
                let nc = p.with_causal(false).with_window(Some(500), Some(16));
                unseen_case::<f16>(nc, bs, 256, 256, [200, 250]);
            }
        });
    }
}

#[test]
fn sm90_unseen_non_finite_v_never_reaches_a_row() {
    unseen_all(SM90);
}

#[test]
fn sm90ws_unseen_non_finite_v_never_reaches_a_row() {
    unseen_all(SM90WS);
}

/// The per-round timeline (`prefill_trace`): absent from a normal build (the suite's), and in a
/// build with `PAGED_ATTN_PREFILL_TRACE` set, block 0's rounds of the last warp-specialised launch
/// in order, on a real SM, each role's marks in order; the third consumer's marks at head 64 only,
/// and cleared at head 128 after a head-64 launch.
#[test]
fn sm90ws_prefill_trace_records_the_last_launch() {
    let ctx = common::device().context();
    on_path(SM90WS, 128, || run_dyn(&Case::new((16, 2), 128, 16, LONG_BATCH, 13_500), true));
    let Some(records) = prefill_trace(ctx, 1).unwrap() else {
        // A normal build carries no trace code, and says so for any block count.
        assert!(prefill_trace(ctx, 1 << 20).unwrap().is_none());
        eprintln!("prefill_trace: this build records no timeline (PAGED_ATTN_PREFILL_TRACE unset)");
        return;
    };
    let sms = ctx
        .attribute(
            attention_backend::cuda::cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .unwrap() as u32;
    assert!(!records.is_empty(), "block 0 walked no round");
    for (i, r) in records.iter().enumerate() {
        assert_eq!((r.block, r.round as usize), (0, i), "{r:?}");
        assert!(r.sm < sms && r.producer_start_ns > 0, "{r:?}");
        if r.tiles > 0 {
            let p = [r.producer_start_ns, r.producer_q_ns, r.producer_k0_ns, r.producer_end_ns];
            assert!(p.windows(2).all(|w| w[0] <= w[1]), "producer: {r:?}");
        }
        check_consumers(r);
        // Head 128 has two consumers: the third's words stay clear.
        assert_eq!(r.consumers[2], Default::default(), "{r:?}");
    }
    // Head 64's items have a consumer per 64 rows as built: the third's marks when there are three.
    on_path(SM90WS, 64, || run_dyn(&Case::new((16, 2), 64, 16, LONG_BATCH, 13_600), true));
    let records = prefill_trace(ctx, 1).unwrap().expect("a trace build");
    assert!(!records.is_empty(), "block 0 walked no round");
    records.iter().for_each(check_consumers);
    let third = records.iter().any(|r| r.consumers[2].s0_issued_ns > 0);
    assert_eq!(third, attention_kernels::ws_item_rows(64) == 192, "{} rounds", records.len());
    // A head-128 launch after it leaves none of the head-64 launch's third-consumer marks.
    on_path(SM90WS, 128, || run_dyn(&Case::new((16, 2), 128, 16, LONG_BATCH, 13_700), true));
    let records = prefill_trace(ctx, 1).unwrap().expect("a trace build");
    assert!(records.iter().all(|r| r.consumers[2] == Default::default()));
    assert!(matches!(prefill_trace(ctx, 1 << 20), Err(KernelError::InvalidArgument { .. })));
}

/// Each consumer's marks of one round in order, unless its rows saw no key of the item.
fn check_consumers(r: &attention_kernels::attention::PrefillRoundTrace) {
    for c in &r.consumers {
        // No first S product: these rows see no key of the item (or the item has no rows).
        if c.s0_issued_ns == 0 {
            continue;
        }
        let m = c.in_order();
        assert!(m.windows(2).all(|w| w[0] > 0 && w[0] <= w[1]), "consumer: {r:?}");
    }
}
