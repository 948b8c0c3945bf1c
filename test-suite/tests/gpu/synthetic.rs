//! The synthetic model's kernels against `paged-serve`'s CPU model, bit for bit, and the main job
//! on the device (graphs on and off, every step verified).

use attention_backend::cuda::cudarc::driver::CudaSlice;
use attention_backend::ndarray::{Array3, Axis};
use attention_backend::Element;
use attention_kernels::synthetic::{self, QkvDims, SampleDims};
use half::{bf16, f16};
use paged_serve::model::{ModelShape, Proj, SyntheticModel};
use paged_serve::workload::VOCAB_SIZE;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common;

/// Every layer's Q/K/V from the kernel, with token rows and layers spaced apart (gaps poisoned),
/// equals the CPU model's projections bit for bit, and the gaps are untouched.
fn qkv_matches_cpu<T: Element>(shape: ModelShape, num_tokens: usize, seed: u64) {
    let stream = common::stream();
    let mut rng = StdRng::seed_from_u64(seed);
    let tokens: Vec<u32> = (0..num_tokens).map(|_| rng.random_range(0..VOCAB_SIZE)).collect();
    // Small positions and ones past 2^31 (the position's high bits feed the hash too).
    let positions: Vec<i64> =
        (0..num_tokens).map(|i| if i % 5 == 4 { rng.random_range(0..1i64 << 40) } else { i as i64 }).collect();
    let row = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_size;
    let row_stride = row + 8;
    let layer_stride = num_tokens * row_stride + 24;
    let len = shape.num_layers * layer_stride;
    let poison = T::from_f32(1234.0);
    let mut fused: CudaSlice<T> = stream.clone_htod(&vec![poison; len]).unwrap();
    let inputs: Vec<i64> = positions.iter().copied().chain(tokens.iter().map(|&t| i64::from(t))).collect();
    let inputs = stream.clone_htod(&inputs).unwrap();
    let dims = QkvDims {
        num_layers: shape.num_layers,
        num_tokens,
        num_heads: shape.num_heads,
        num_kv_heads: shape.num_kv_heads,
        head_size: shape.head_size,
        row_stride,
        layer_stride,
    };
    synthetic::synthetic_qkv(&stream, fused.as_view_mut(), inputs.as_view(), dims, seed).unwrap();
    let got = stream.clone_dtoh(&fused).unwrap();

    let model = SyntheticModel::new(shape, seed);
    let (qh, kvh) = (shape.num_heads * shape.head_size, shape.num_kv_heads * shape.head_size);
    let mut checked = 0usize;
    for layer in 0..shape.num_layers {
        let parts = [
            (0, model.project::<T>(Proj::Q, layer, &tokens, &positions)),
            (qh, model.project::<T>(Proj::K, layer, &tokens, &positions)),
            (qh + kvh, model.project::<T>(Proj::V, layer, &tokens, &positions)),
        ];
        for t in 0..num_tokens {
            let base = layer * layer_stride + t * row_stride;
            for (offset, want) in &parts {
                for (i, w) in want.index_axis(Axis(0), t).iter().enumerate() {
                    let g = got[base + offset + i];
                    assert_eq!(
                        g.to_f32().to_bits(),
                        w.to_f32().to_bits(),
                        "{:?} layer {layer} token {t} element {}: device {} cpu {}",
                        T::DTYPE,
                        offset + i,
                        g.to_f32(),
                        w.to_f32()
                    );
                    checked += 1;
                }
            }
            for i in row..row_stride {
                assert_eq!(got[base + i], poison, "the gap after row {t} of layer {layer} was written");
            }
        }
    }
    assert_eq!(checked, shape.num_layers * num_tokens * row);
    assert_eq!(got[len - 1], poison, "the gap after the last layer was written");
}

#[test]
fn synthetic_qkv_is_bit_identical_to_the_cpu_model_bf16() {
    qkv_matches_cpu::<bf16>(ModelShape { num_layers: 3, num_heads: 8, num_kv_heads: 2, head_size: 128 }, 37, 7);
}

#[test]
fn synthetic_qkv_is_bit_identical_to_the_cpu_model_f16() {
    qkv_matches_cpu::<f16>(ModelShape { num_layers: 2, num_heads: 4, num_kv_heads: 4, head_size: 64 }, 50, 8);
}

#[test]
fn synthetic_qkv_is_bit_identical_to_the_cpu_model_f32() {
    qkv_matches_cpu::<f32>(ModelShape { num_layers: 2, num_heads: 6, num_kv_heads: 1, head_size: 256 }, 9, 9);
}

/// The kernel's next tokens equal the CPU model's `next_token` of the same rows, bit for bit; rows
/// outside the output give token 0.
fn sample_matches_cpu<T: Element>(seed: u64) {
    let stream = common::stream();
    let (rows, h, d) = (40usize, 8usize, 128usize);
    let mut rng = StdRng::seed_from_u64(seed);
    let out: Vec<T> = (0..rows * h * d).map(|_| T::from_f32(rng.random_range(-3.0f32..3.0))).collect();
    let mut last_rows: Vec<i64> = (0..24).map(|_| rng.random_range(0..rows as i64)).collect();
    last_rows.extend([-1, rows as i64, i64::MAX]);
    let dev_out = stream.clone_htod(&out).unwrap();
    let dev_rows = stream.clone_htod(&last_rows).unwrap();
    let mut next = stream.alloc_zeros::<u32>(last_rows.len()).unwrap();
    let dims = SampleDims {
        num_reqs: last_rows.len(),
        num_tokens: rows,
        num_heads: h,
        head_size: d,
        token_stride: h * d,
        head_stride: d,
        vocab: VOCAB_SIZE,
    };
    synthetic::synthetic_sample(&stream, dev_out.as_view(), dev_rows.as_view(), next.as_view_mut(), dims, seed)
        .unwrap();
    let got = stream.clone_dtoh(&next).unwrap();
    let model = SyntheticModel::new(ModelShape { num_layers: 1, num_heads: h, num_kv_heads: 1, head_size: d }, seed);
    let host = Array3::from_shape_vec((rows, h, d), out).unwrap();
    for (r, (&row, &g)) in last_rows.iter().zip(&got).enumerate() {
        let want =
            if (0..rows as i64).contains(&row) { model.next_token(host.index_axis(Axis(0), row as usize)) } else { 0 };
        assert_eq!(g, want, "{:?} request {r} row {row}", T::DTYPE);
    }
    let distinct: std::collections::HashSet<u32> = got.iter().copied().collect();
    assert!(distinct.len() > 10, "tokens should depend on the rows: {got:?}");
}

#[test]
fn synthetic_sample_is_bit_identical_to_the_cpu_model_bf16() {
    sample_matches_cpu::<bf16>(21);
}

#[test]
fn synthetic_sample_is_bit_identical_to_the_cpu_model_f16() {
    sample_matches_cpu::<f16>(22);
}

/// The main job on the device, every step verified (attention against the f64 reference, the
/// device's Q/K/V and next tokens against the CPU model), with and without CUDA graphs; with graphs
/// the decode steps are replayed and the device phases are timed inside the graphs.
fn serve(graphs: bool, extra: &[&str]) -> paged_serve::Summary {
    let _ = common::device();
    let mut args = vec![
        "paged-serve",
        "--device",
        "cuda",
        "--layers",
        "3",
        "--requests",
        "24",
        "--prompt-len",
        "40",
        "--output-len",
        "12",
        "--arrival-rate",
        "4",
        "--num-blocks",
        "512",
        "--max-num-seqs",
        "12",
        "--verify",
        "--verify-every",
        "1",
        "--verify-layers",
        "2",
        "--no-progress",
    ];
    if !graphs {
        args.push("--no-graphs");
    }
    args.extend_from_slice(extra);
    let cli = <paged_serve::Cli as clap::Parser>::try_parse_from(args).unwrap();
    let s = paged_serve::run(&cli).unwrap();
    s.check().unwrap();
    assert_eq!(s.requests_finished, 24);
    assert!(s.verified_layer_steps >= 2 * s.steps, "{s}");
    assert_eq!(s.step_attention.len(), s.steps);
    assert!(s.step_attention.iter().all(|d| !d.is_zero()), "every step's attention is timed on the device");
    // A decode step's Q/K/V kernel takes microseconds, near the events' resolution: the sum.
    assert!(!s.step_model.iter().sum::<std::time::Duration>().is_zero(), "the model phase is timed on the device");
    s
}

#[test]
fn serve_on_the_device_with_graphs_verifies_every_step() {
    let s = serve(true, &[]);
    assert!(s.graph_steps > 0 && s.graphs_captured > 0, "{s}");
    assert!(s.graphs_captured <= 12 / 8 + 3, "{s}");
}

#[test]
fn serve_on_the_device_without_graphs_verifies_every_step() {
    let s = serve(false, &[]);
    assert_eq!(s.graph_steps, 0);
}

#[test]
fn serve_on_the_device_with_windows_and_softcap_verifies_every_step() {
    // Gemma-2-like layers: a 16-token window on even layers, soft-cap 50 on all.
    let s = serve(true, &["--model", "gemma2-9b", "--layers", "3", "--sliding-window", "16"]);
    assert!(s.attention.contains("window 16 on even layers") && s.attention.contains("soft-cap 50"), "{s}");
}

/// Issue 18: with `--batch-invariant`, a request's generated tokens do not depend on the arrival
/// rate (so on what else shares its batches): the runs' token digests are equal. The synthetic
/// model picks each next token from a hash of the attention output's bits, so any change in a
/// request's bits would change its text. Long enough contexts that decodes are split.
#[test]
fn batch_invariant_serve_generates_the_same_tokens_at_any_arrival_rate() {
    let run = |rate: &str, graphs: bool| {
        let mut args = vec![
            "paged-serve",
            "--device",
            "cuda",
            "--batch-invariant",
            "--layers",
            "2",
            "--requests",
            "24",
            "--prompt-len",
            "1500",
            "--output-len",
            "16",
            "--arrival-rate",
            rate,
            "--num-blocks",
            "4096",
            "--max-num-seqs",
            "24",
            "--no-progress",
        ];
        if !graphs {
            args.push("--no-graphs");
        }
        let cli = <paged_serve::Cli as clap::Parser>::try_parse_from(args).unwrap();
        let s = paged_serve::run(&cli).unwrap();
        s.check().unwrap();
        assert_eq!(s.requests_finished, 24);
        s.tokens_digest
    };
    let alone = run("0.05", true);
    assert_eq!(run("1000", true), alone, "a burst changed the generated tokens");
    assert_eq!(run("1000", false), alone, "eager steps changed the generated tokens");
}
