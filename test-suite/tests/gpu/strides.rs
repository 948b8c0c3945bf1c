//! Borrowed, strided buffers: the kernels read and write an engine's own layouts in place.
//!
//! The query is a strided view into a fused QKV projection `[num_tokens, (H + 2 KVH) * D]`, the
//! output a view with padded token rows (or head-major), the caches one interleaved
//! `[num_blocks, 2, block_size, KVH, D]` buffer read through two views, and the cache write takes
//! K and V straight from the fused buffer. Every result must be bit-identical to the packed run;
//! bytes outside the views must be untouched. Misaligned or short views are typed errors.

use attention_backend::{bf16, f16, Element};
use attention_kernels::attention::{self, AttentionBuffers, AttentionKernel, AttentionStrides};
use attention_kernels::launch::{self, KvCacheMut, KvWriteDims};
use attention_kernels::{DType, KernelError};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::common;
use crate::raw::{self, DeviceMeta, Mask, Step, Views};

/// Sentinel for bytes outside every view: a value no kernel output takes here.
const SENTINEL: f32 = -12345.0;

fn check_strided<T: Element>(step: &Step, mask: &Mask, num_splits: usize, head_major_out: bool, seed: u64) {
    let stream = common::stream();
    let mut rng = StdRng::seed_from_u64(seed);
    let (h, kvh, d) = (step.num_heads, step.num_kv_heads, step.head_size);
    let nt = step.num_tokens;
    let row = step.row_elems();
    let block = step.block_elems();
    let what = format!("{:?} {step:?} {mask:?} splits {num_splits} head-major out {head_major_out}", T::DTYPE);

    // The step's new K/V rows (one per token) and the older keys already in the cache.
    let qkv_row = (h + 2 * kvh) * d;
    let qkv = test_suite::inputs::values::<T>(&mut rng, nt * qkv_row);
    let n_slots = step.num_blocks * step.block_size;
    let old_k = test_suite::inputs::values::<T>(&mut rng, n_slots * row);
    let old_v = test_suite::inputs::values::<T>(&mut rng, n_slots * row);
    let mut slots = Vec::with_capacity(nt);
    for (r, &(q, kv)) in step.batch.iter().enumerate() {
        slots.extend((kv - q..kv).map(|key| step.slot(r, key) as i64));
    }
    let meta = DeviceMeta::upload(&stream, step);
    let slots_dev = stream.clone_htod(&slots).unwrap();
    let qkv_dev = stream.clone_htod(&qkv).unwrap();

    // ---- packed reference: separate q/k/v buffers, separate packed caches ----
    let unpack = |off: usize, width: usize| -> Vec<T> {
        (0..nt).flat_map(|t| qkv[t * qkv_row + off..t * qkv_row + off + width].iter().copied()).collect()
    };
    let (q_host, k_host, v_host) = (unpack(0, h * d), unpack(h * d, row), unpack((h + kvh) * d, row));
    let q_dev = stream.clone_htod(&q_host).unwrap();
    let k_dev = stream.clone_htod(&k_host).unwrap();
    let v_dev = stream.clone_htod(&v_host).unwrap();
    let mut kc = stream.clone_htod(&old_k).unwrap();
    let mut vc = stream.clone_htod(&old_v).unwrap();
    launch::kv_cache_write(
        &stream,
        k_dev.as_view(),
        v_dev.as_view(),
        KvCacheMut::Separate { key: kc.as_view_mut(), value: vc.as_view_mut() },
        slots_dev.as_view(),
        KvWriteDims::contiguous(nt, row, step.num_blocks, step.block_size),
        None,
    )
    .unwrap();
    let nan = T::from_f32(f32::NAN);
    let mut out = stream.clone_htod(&vec![nan; nt * h * d]).unwrap();
    let mut lse = stream.clone_htod(&vec![f32::NAN; nt * h]).unwrap();
    {
        let mut views = Views {
            query: q_dev.as_view(),
            key_cache: kc.as_view(),
            value_cache: vc.as_view(),
            out: out.as_view_mut(),
            lse: Some(lse.as_view_mut()),
            strides: step.contiguous_strides(),
        };
        raw::run(&stream, step, &meta, mask, num_splits, &mut views);
    }
    let ref_out = stream.clone_dtoh(&out).unwrap();
    let ref_lse = stream.clone_dtoh(&lse).unwrap();
    let ref_kc = stream.clone_dtoh(&kc).unwrap();
    let ref_vc = stream.clone_dtoh(&vc).unwrap();
    assert!(ref_out.iter().all(|x| x.to_f32().is_finite()), "{what}: packed run not finite");

    // ---- strided: fused QKV, interleaved cache written from the fused buffer, padded out ----
    let mut inter_host = vec![T::from_f32(0.0); step.num_blocks * 2 * block];
    for b in 0..step.num_blocks {
        inter_host[2 * b * block..(2 * b + 1) * block].copy_from_slice(&old_k[b * block..(b + 1) * block]);
        inter_host[(2 * b + 1) * block..(2 * b + 2) * block].copy_from_slice(&old_v[b * block..(b + 1) * block]);
    }
    let mut inter = stream.clone_htod(&inter_host).unwrap();
    launch::kv_cache_write(
        &stream,
        qkv_dev.slice(h * d..),
        qkv_dev.slice((h + kvh) * d..),
        KvCacheMut::Interleaved { cache: inter.as_view_mut(), value_offset: block },
        slots_dev.as_view(),
        KvWriteDims {
            key_stride: qkv_row,
            value_stride: qkv_row,
            cache_block_stride: 2 * block,
            ..KvWriteDims::contiguous(nt, row, step.num_blocks, step.block_size)
        },
        None,
    )
    .unwrap();
    // Out: 16 elements of lead-in, then either token rows padded by 24 elements or head-major.
    let lead = 16;
    let (out_token, out_head, out_len) = if head_major_out {
        (d, nt * d, lead + h * nt * d + 8)
    } else {
        let ts = h * d + 24;
        (ts, d, lead + nt * ts)
    };
    let sentinel = T::from_f32(SENTINEL);
    let mut out2 = stream.clone_htod(&vec![sentinel; out_len]).unwrap();
    let mut lse2 = stream.clone_htod(&vec![f32::NAN; nt * h]).unwrap();
    {
        let mut views = Views {
            query: qkv_dev.as_view(),
            key_cache: inter.slice(..),
            value_cache: inter.slice(block..),
            out: out2.slice_mut(lead..),
            lse: Some(lse2.as_view_mut()),
            strides: AttentionStrides {
                query_token: qkv_row,
                query_head: d,
                out_token,
                out_head,
                cache_block: 2 * block,
            },
        };
        raw::run(&stream, step, &meta, mask, num_splits, &mut views);
    }
    let got_out = stream.clone_dtoh(&out2).unwrap();
    let got_lse = stream.clone_dtoh(&lse2).unwrap();
    let got_inter = stream.clone_dtoh(&inter).unwrap();

    let bits = |x: T| x.to_f32().to_bits();
    for b in 0..step.num_blocks {
        for e in 0..block {
            assert!(
                bits(got_inter[2 * b * block + e]) == bits(ref_kc[b * block + e])
                    && bits(got_inter[(2 * b + 1) * block + e]) == bits(ref_vc[b * block + e]),
                "{what}: interleaved cache written from the fused QKV buffer differs at block {b} element {e}"
            );
        }
    }
    let mut written = vec![false; out_len];
    for t in 0..nt {
        for hh in 0..h {
            let at = lead + t * out_token + hh * out_head;
            for e in 0..d {
                written[at + e] = true;
                let (x, r) = (got_out[at + e], ref_out[(t * h + hh) * d + e]);
                assert!(
                    bits(x) == bits(r),
                    "{what}: out token {t} head {hh} elem {e}: {} vs packed {}",
                    x.to_f32(),
                    r.to_f32()
                );
            }
            let (x, r) = (got_lse[t * h + hh], ref_lse[t * h + hh]);
            assert!(x.to_bits() == r.to_bits(), "{what}: lse token {t} head {hh}: {x} vs {r}");
        }
    }
    for (i, &w) in written.iter().enumerate() {
        if !w {
            assert!(
                bits(got_out[i]) == bits(sentinel),
                "{what}: element {i} of the out buffer outside the view changed"
            );
        }
    }
}

#[test]
fn strided_views_match_packed() {
    let mut rng = StdRng::seed_from_u64(42);
    let batches: [&[(usize, usize)]; 3] =
        [&[(1, 300), (1, 17), (1, 1000)], &[(1, 90), (40, 40), (100, 433)], &[(2, 2), (64, 64), (1, 5)]];
    let mut seed = 7000;
    for (di, d) in [64usize, 128, 256].into_iter().enumerate() {
        for (bi, batch) in batches.iter().enumerate() {
            seed += 1;
            let heads = [(8, 2), (4, 4), (16, 1)][(di + bi) % 3];
            let bs = [16, 32][(di + bi) % 2];
            let step = Step::new(heads, d, bs, batch, 2, &mut rng);
            let mask = match bi {
                0 => Mask::causal(d),
                1 => Mask::causal(d).window(Some(50), Some(0)).softcap(25.0),
                _ => Mask::causal(d).non_causal().window(Some(9), Some(4)),
            };
            let splits = 1 + (seed as usize % 3);
            check_strided::<f16>(&step, &mask, splits, false, seed);
            check_strided::<bf16>(&step, &mask, splits, true, seed + 100);
        }
    }
}

/// Misaligned bases or strides, overlapping outputs, short views and bad interleaving offsets are
/// typed errors, refused before any launch.
#[test]
fn strided_views_refused() {
    let stream = common::stream();
    let mut rng = StdRng::seed_from_u64(3);
    let step = Step::new((4, 2), 64, 16, &[(1, 20), (5, 30)], 1, &mut rng);
    let meta = DeviceMeta::upload(&stream, &step);
    let (h, d, nt) = (step.num_heads, step.head_size, step.num_tokens);
    let q = stream.alloc_zeros::<f16>(nt * h * d + 64).unwrap();
    let kc = stream.alloc_zeros::<f16>(step.num_blocks * step.block_elems() * 2).unwrap();
    let mut out = stream.alloc_zeros::<f16>(nt * h * d + 64).unwrap();
    let packed = step.contiguous_strides();
    let attempt = |q_off: usize,
                   out_off: usize,
                   strides: AttentionStrides,
                   out: &mut attention_kernels::cudarc::driver::CudaSlice<f16>| {
        let bufs = AttentionBuffers {
            query: q.slice(q_off..),
            key_cache: kc.as_view(),
            value_cache: kc.as_view(),
            kv_scales: None,
            query_start_loc: meta.query_start_loc.as_view(),
            seq_lens: meta.seq_lens.as_view(),
            block_table: meta.block_table.as_view(),
            out: out.slice_mut(out_off..),
            lse: None,
            workspace: None,
            strides,
        };
        let max_query_len = 5;
        attention::paged_attention(
            &stream,
            AttentionKernel::Prefill { max_query_len, max_sms: 0 },
            &step.dims(0, 2),
            &Mask::causal(d).features(),
            bufs,
        )
    };
    let is_invalid = |r: Result<(), KernelError>| matches!(r, Err(KernelError::InvalidArgument { .. }));
    assert!(attempt(0, 0, packed, &mut out).is_ok(), "the packed launch must pass");
    assert!(is_invalid(attempt(1, 0, packed, &mut out)), "query base 2 bytes off");
    assert!(is_invalid(attempt(0, 4, packed, &mut out)), "out base 8 bytes off");
    assert!(
        is_invalid(attempt(0, 0, AttentionStrides { query_token: h * d + 4, ..packed }, &mut out)),
        "odd query stride"
    );
    assert!(is_invalid(attempt(0, 0, AttentionStrides { cache_block: 8, ..packed }, &mut out)), "block stride < block");
    assert!(is_invalid(attempt(0, 0, AttentionStrides { out_head: 8, ..packed }, &mut out)), "overlapping out heads");
    assert!(is_invalid(attempt(0, 0, AttentionStrides { out_token: d, ..packed }, &mut out)), "overlapping out tokens");
    assert!(
        matches!(
            attempt(0, 0, AttentionStrides { query_token: h * d + 64, ..packed }, &mut out),
            Err(KernelError::BufferTooSmall { buffer: "query", .. })
        ),
        "a query stride that runs past the view"
    );
    assert!(
        matches!(
            attempt(0, 0, AttentionStrides { cache_block: 3 * step.block_elems(), ..packed }, &mut out),
            Err(KernelError::BufferTooSmall { buffer: "key_cache", .. })
        ),
        "a block stride that runs past the cache"
    );

    // Cache write: interleaved offsets that overlap K and V.
    let kv = stream.alloc_zeros::<f16>(nt * step.row_elems()).unwrap();
    let slots = stream.clone_htod(&vec![-1i64; nt]).unwrap();
    let mut cache = stream.alloc_zeros::<f16>(step.num_blocks * step.block_elems() * 2).unwrap();
    let dims = KvWriteDims {
        cache_block_stride: 2 * step.block_elems(),
        ..KvWriteDims::contiguous(nt, step.row_elems(), step.num_blocks, step.block_size)
    };
    for (off, ok) in [(step.block_elems(), true), (step.block_elems() - 8, false), (step.block_elems() + 8, false)] {
        let r = launch::kv_cache_write(
            &stream,
            kv.as_view(),
            kv.as_view(),
            KvCacheMut::Interleaved { cache: cache.as_view_mut(), value_offset: off },
            slots.as_view(),
            dims,
            None,
        );
        assert_eq!(r.is_ok(), ok, "value offset {off}: {r:?}");
    }
    stream.synchronize().unwrap();
}

/// The kernel facts the planner reads: occupancy from the runtime, rows per block, tile keys.
#[test]
fn kernel_facts() {
    let dev = common::device();
    for &d in &attention::SUPPORTED_HEAD_SIZES {
        assert!(attention::prefill_rows_per_block(d) >= 16, "prefill rows per block, head {d}");
        assert_eq!(attention::decode_heads_per_block(d), 16, "decode heads per block, head {d}");
        assert!(attention::decode_tile_keys(d) > 0, "decode tile keys, head {d}");
        for dtype in [DType::F16, DType::BF16] {
            for kernel in [
                AttentionKernel::Decode { num_splits: 1, split_keys: 0 },
                AttentionKernel::Prefill { max_query_len: 1, max_sms: 0 },
            ] {
                let n = attention::blocks_per_sm(dev.context(), kernel, d, dtype).unwrap();
                assert!((1..=32).contains(&n), "{kernel:?} head {d} {dtype}: {n} blocks per SM");
                eprintln!("{kernel:?} head {d} {dtype}: {n} blocks/SM");
            }
        }
    }
    assert_eq!(attention::prefill_rows_per_block(120), 0);
    // The warp-specialised prefill's items as compiled against the rows the host plans with.
    for d in [64, 128] {
        assert_eq!(attention::prefill_ws_rows_per_block(d), attention_kernels::ws_item_rows(d), "head {d}");
    }
    assert_eq!(attention::prefill_ws_rows_per_block(96), 0);
    assert!(attention::blocks_per_sm(
        dev.context(),
        AttentionKernel::Decode { num_splits: 1, split_keys: 0 },
        120,
        DType::F16
    )
    .is_err());
    assert!(attention::blocks_per_sm(
        dev.context(),
        AttentionKernel::Decode { num_splits: 1, split_keys: 0 },
        128,
        DType::F32
    )
    .is_err());
}
