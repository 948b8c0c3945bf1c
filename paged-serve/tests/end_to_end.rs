//! End to end on the CPU: small workloads through scheduler, runner, backend and the f64 verifier,
//! with the summary's counts checked against the workload; and the binary's flags and errors.

use std::process::Command;

use clap::Parser;
use paged_serve::{run, Cli, Summary};

fn cli(args: &[&str]) -> Cli {
    let base = ["paged-serve", "--device", "cpu", "--no-progress"];
    Cli::try_parse_from(base.iter().chain(args)).unwrap()
}

/// The workload the flags describe (to compare the summary with).
fn workload(c: &Cli) -> Vec<paged_serve::workload::RequestSpec> {
    let cfg = c.resolve(attention_backend::DeviceRequest::Cpu, attention_backend::Device::Cpu).unwrap();
    paged_serve::workload::build(&cfg.workload, cfg.sharing, cfg.seed).unwrap()
}

/// Counts every run must satisfy.
fn check_counts(s: &Summary, c: &Cli) {
    let reqs = workload(c);
    let prompts: usize = reqs.iter().map(|r| r.prompt.len()).sum();
    let outputs: usize = reqs.iter().map(|r| r.output_len).sum();
    assert_eq!(s.requests, reqs.len());
    assert_eq!(s.requests_finished, reqs.len(), "every request finished");
    assert_eq!(s.prompt_tokens, prompts);
    assert_eq!(s.generated_tokens, outputs, "generated tokens = sum of output lengths");
    // Every prompt token was computed at least once or found in the prefix cache; preempted
    // requests recompute theirs.
    assert!(s.prompt_tokens_computed + s.prefix_hit_tokens >= prompts);
    // Each request computes its generated tokens but the last (that one is never fed back).
    assert!(s.output_tokens_computed + s.prefix_hit_tokens >= outputs - reqs.len());
    assert!(s.peak_blocks_used <= s.num_blocks);
    assert_eq!(s.step_attention.len(), s.steps);
    assert!(s.kv_read_bytes > 0);
}

const SMALL: &[&str] = &[
    "--layers",
    "2",
    "--heads",
    "4",
    "--kv-heads",
    "2",
    "--head-size",
    "32",
    "--block-size",
    "8",
    "--requests",
    "12",
    "--prompt-len",
    "40",
    "--output-len",
    "10",
    "--arrival-rate",
    "inf",
    "--seed",
    "3",
];

#[test]
fn tiny_cache_preempts_chunks_and_verifies() {
    // 16 blocks of 8 = 128 slots for 12 requests of up to 75 tokens: constant preemption. A budget
    // of 24 tokens chunks every prompt.
    let args: Vec<&str> = SMALL
        .iter()
        .copied()
        .chain(["--num-blocks", "16", "--max-num-batched-tokens", "24", "--verify", "--verify-every", "1"])
        .collect();
    let c = cli(&args);
    let s = run(&c).unwrap();
    check_counts(&s, &c);
    assert!(s.preemptions > 0, "a 16-block cache must preempt");
    let prompts: usize = workload(&c).iter().map(|r| r.prompt.len()).sum();
    assert!(s.prompt_tokens_computed + s.prefix_hit_tokens > prompts, "recomputation after preemption is counted");
    assert_eq!(s.verified_layer_steps, 2 * s.steps, "both layers of every step checked");
    assert!(s.verify_max_abs_err < 1e-4);
    // 12 requests of ~40-token prompts cannot prefill in fewer steps than the budget allows.
    assert!(s.steps >= (prompts / 24));
}

#[test]
fn roomy_cache_counts_are_exact() {
    let args: Vec<&str> =
        SMALL.iter().copied().chain(["--num-blocks", "400", "--no-prefix-caching", "--shared-prefix", "0"]).collect();
    let c = cli(&args);
    let s = run(&c).unwrap();
    check_counts(&s, &c);
    assert_eq!(s.preemptions, 0);
    assert_eq!(s.prefix_hit_tokens, 0);
    assert_eq!(s.prompt_tokens_computed, s.prompt_tokens, "no preemption: each prompt token once");
    assert_eq!(s.output_tokens_computed, s.generated_tokens - s.requests);
}

#[test]
fn bf16_with_shared_prefixes_hits_the_prefix_cache() {
    let args: Vec<&str> = SMALL
        .iter()
        .copied()
        .chain([
            "--dtype",
            "bf16",
            "--num-blocks",
            "200",
            "--arrival-rate",
            "0.5",
            "--shared-prefix",
            "1",
            "--shared-prefix-len",
            "24",
            "--verify",
            "--verify-every",
            "2",
        ])
        .collect();
    let c = cli(&args);
    let s = run(&c).unwrap();
    check_counts(&s, &c);
    assert!(s.prefix_hit_requests > 0 && s.prefix_hit_tokens >= 24, "{s:?}");
    assert!(s.verified_layer_steps > 0);
    assert_eq!(s.dtype, "bf16");
}

#[test]
fn runs_are_reproducible() {
    let args: Vec<&str> =
        SMALL.iter().copied().chain(["--num-blocks", "20", "--max-num-batched-tokens", "32"]).collect();
    let (a, b) = (run(&cli(&args)).unwrap(), run(&cli(&args)).unwrap());
    assert_eq!(
        (
            a.steps,
            a.preemptions,
            a.prompt_tokens_computed,
            a.output_tokens_computed,
            a.prefix_hit_tokens,
            a.kv_read_bytes
        ),
        (
            b.steps,
            b.preemptions,
            b.prompt_tokens_computed,
            b.output_tokens_computed,
            b.prefix_hit_tokens,
            b.kv_read_bytes
        )
    );
}

#[test]
fn trace_file_workload() {
    let dir = std::env::temp_dir().join(format!("paged-serve-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("trace.jsonl");
    std::fs::write(&path, "{\"arrival\": 0, \"prompt_len\": 30, \"output_len\": 4}\n{\"arrival\": 2.5, \"prompt_len\": 9, \"output_len\": 7}\n")
        .unwrap();
    let args =
        ["--layers", "1", "--head-size", "16", "--verify", "--verify-every", "1", "--trace", path.to_str().unwrap()];
    let s = run(&cli(&args)).unwrap();
    assert_eq!((s.requests_finished, s.prompt_tokens, s.generated_tokens), (2, 39, 11));
    let _ = std::fs::remove_dir_all(&dir);
}

fn bin(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_paged-serve"))
        .args(args)
        .env_remove("PAGED_ATTN_DEVICE")
        .env("PAGED_ATTN_CPU_THREADS", "2")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn bad_flags_exit_2_with_one_line() {
    let cases: &[(&[&str], &str)] = &[
        (&["--dtype", "fp8"], "unknown dtype `fp8`"),
        (&["--heads", "10", "--kv-heads", "4"], "--heads 10 is not a multiple of --kv-heads 4"),
        (&["--num-blocks", "2"], "--num-blocks 2 is too small"),
        (&["--device", "tpu"], "--device `tpu`"),
        (&["--requests", "abc"], "invalid value 'abc'"),
        (&["--jsn"], "--json"),
        (&["--device", "cpu", "--requests", "0"], "--requests must be positive"),
    ];
    for (args, want) in cases {
        let (code, stdout, stderr) = bin(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: not one line: {stderr}");
        assert!(stderr.starts_with("paged-serve: error: ") && stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn cuda_without_the_feature_is_a_clean_error() {
    if cfg!(feature = "cuda") {
        return; // with the feature this depends on the machine
    }
    let (code, _, stderr) = bin(&["--device", "cuda"]);
    assert_eq!(code, 1);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("built without CUDA") && stderr.contains("--features cuda"), "{stderr}");
}

#[test]
fn help_json_and_summary() {
    let (code, help, _) = bin(&["--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--device",
        "--dtype",
        "--num-blocks",
        "--max-num-batched-tokens",
        "--trace",
        "--verify",
        "--json",
        "Examples:",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    let small = ["--layers", "1", "--head-size", "16", "--requests", "6", "--prompt-len", "20", "--output-len", "4"];
    let (code, json, stderr) = bin(&[&small[..], &["--json", "--verify"]].concat());
    assert_eq!(code, 0, "{stderr}");
    let json = json.trim();
    assert!(json.starts_with('{') && json.ends_with('}') && json.lines().count() == 1, "{json}");
    assert!(json.contains("\"requests_finished\": 6") && json.contains("\"kv_read_gb_per_s\""), "{json}");
    let (code, text, _) = bin(&small);
    assert_eq!(code, 0);
    assert!(text.contains("requests     6 finished of 6") && text.contains("p99"), "{text}");
}

/// The soak workload of the GPU bundle (`run.sh soak`), shrunk for the CPU: a cache so small that
/// requests are preempted and recomputed all the time, every step verified, and at the end every
/// block back in the pool.
const SOAK: &[&str] = &[
    "--layers",
    "1",
    "--heads",
    "2",
    "--kv-heads",
    "1",
    "--head-size",
    "16",
    "--block-size",
    "4",
    "--num-blocks",
    "8",
    "--requests",
    "60",
    "--prompt-len",
    "8",
    "--output-len",
    "8",
    "--arrival-rate",
    "2",
    "--max-num-seqs",
    "8",
    "--max-num-batched-tokens",
    "16",
    "--verify",
    "--verify-every",
    "1",
    "--verify-layers",
    "1",
];

#[test]
fn soak_preempts_verifies_every_step_and_returns_every_block() {
    let c = cli(SOAK);
    let s = run(&c).unwrap();
    check_counts(&s, &c);
    assert!(s.steps >= 200, "{} steps", s.steps);
    assert!(s.preemptions >= 10, "{} preemptions: the cache must be too small", s.preemptions);
    assert_eq!(s.verified_layer_steps, s.steps, "every step verified");
    assert_eq!(s.mismatches, 0);
    assert_eq!(s.blocks_returned, s.num_blocks, "every block back in the pool");
    s.check().unwrap();

    // The binary prints the counts and exits 0.
    let (code, text, stderr) = bin(&[&["--device", "cpu", "--no-progress"], SOAK].concat());
    assert_eq!(code, 0, "{stderr}");
    let want = format!(
        "checks       {} steps, {} preemptions, {} verified layer-steps, 0 mismatches, blocks returned to the pool: 8 of 8",
        s.steps, s.preemptions, s.verified_layer_steps
    );
    assert!(text.contains(&want), "{text}");
}

#[test]
fn huge_sizes_are_refused_up_front_with_exit_2() {
    let cases: &[(&[&str], &str)] = &[
        (&["--requests", "10000000000"], "--requests 10000000000"),
        (&["--num-blocks", "1000000000"], "--num-blocks 1000000000"),
        (&["--num-blocks", "10000000000"], "--num-blocks 10000000000 is past the limit of 2147483647"),
        (&["--head-size", "1000000"], "--head-size 1000000"),
        (&["--layers", "100000000000"], "--layers 100000000000"),
        (&["--block-size", "100000000000"], "--block-size 100000000000"),
        (&["--prompt-len", "10000000000"], "--prompt-len 10000000000 is too large"),
        (&["--prompt-len", "18446744073709551615"], "--prompt-len 18446744073709551615 is too large"),
        (&["--output-len", "18446744073709551615"], "--output-len 18446744073709551615 is too large"),
        (&["--shared-prefix-len", "18446744073709551615"], "--shared-prefix-len"),
        // Fits the types; the cache check runs on the request shapes, before any prompt exists.
        (&["--prompt-len", "10000000"], "--num-blocks 1024 is too small"),
        (&["--max-num-batched-tokens", "100000000000"], "--max-num-batched-tokens 100000000000 is past the limit"),
        (&["--arrival-rate", "1e-300"], "--arrival-rate 1e-300"),
    ];
    for (args, want) in cases {
        let start = std::time::Instant::now();
        let (code, stdout, stderr) = bin(&[&["--device", "cpu", "--no-progress"], *args].concat());
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: not one line: {stderr}");
        assert!(stderr.starts_with("paged-serve: error: ") && stderr.contains(want), "{args:?}: {stderr}");
        assert!(start.elapsed().as_secs() < 10, "{args:?}: refused only after {:?}", start.elapsed());
    }
    // --prompt-len 10000000 with a cache that holds it: the memory check (or the cache check on
    // a machine with terabytes) refuses it, still at once.
    let (code, _, stderr) =
        bin(&["--device", "cpu", "--no-progress", "--prompt-len", "10000000", "--num-blocks", "1000000"]);
    assert_eq!(code, 2, "{stderr}");
}

#[test]
fn a_trace_line_too_long_or_invalid_is_refused_with_its_line() {
    let dir = std::env::temp_dir().join(format!("paged-serve-bad-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("0,10,5\n1,1000000000000,1\n", "line 2: prompt_len 1000000000000 + output_len 1"),
        (
            "{\"arrival\": 0, \"prompt_len\": 3, \"output_len\": 2}\n{\"arrival\": 1, \"prompt_len\": 3,\n",
            "line 2: invalid JSON",
        ),
        ("{\"arrival\": 0, \"prompt_len\": -3, \"output_len\": 2}\n", "line 1: invalid JSON"),
        ("0,10,5\n1e300,10,5\n", "line 2: arrival 1e300 is past the limit"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = dir.join(format!("t{i}"));
        std::fs::write(&path, text).unwrap();
        let (code, _, stderr) = bin(&["--device", "cpu", "--trace", path.to_str().unwrap()]);
        assert_eq!(code, 2, "{text}: {stderr}");
        assert!(stderr.contains(want) && stderr.trim_end().lines().count() == 1, "{text}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ignored_or_conflicting_flags_are_usage_errors() {
    let trace = std::env::temp_dir().join(format!("paged-serve-conflict-{}.csv", std::process::id()));
    std::fs::write(&trace, "0,10,5\n").unwrap();
    let t = trace.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--trace", t, "--requests", "3"], "'--trace <FILE>' cannot be used with '--requests <N>'"),
        (&["--trace", t, "--prompt-len", "3"], "'--trace <FILE>' cannot be used with '--prompt-len <N>'"),
        (&["--trace", t, "--arrival-rate", "3"], "'--trace <FILE>' cannot be used with '--arrival-rate <R>'"),
        (&["--trace", t, "--output-len", "3"], "'--trace <FILE>' cannot be used with '--output-len <N>'"),
        (&["--verify-every", "1"], "--verify-every needs --verify"),
        (&["--verify-layers", "1"], "--verify-layers needs --verify"),
        (&["--verify-requests", "1"], "--verify-requests needs --verify"),
        (&["--max-num-batched-tokens", "0"], "--max-num-batched-tokens must be positive"),
        (&["--max-num-batched-tokens", "-5"], "unexpected argument '-5'"),
        (&["--max-num-batched-tokens", "3000000000"], "--max-num-batched-tokens 3000000000 is past the limit"),
    ];
    for (args, want) in cases {
        let (code, stdout, stderr) = bin(&[&["--device", "cpu", "--no-progress"], *args].concat());
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: not one line: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    let _ = std::fs::remove_file(&trace);
}

/// Output errors end the run quietly: a reader that closed the pipe is exit 0 with nothing on
/// stderr; a full disk is one error line and exit 1. Never a panic.
#[cfg(unix)]
#[test]
fn output_errors_never_panic() {
    use std::io::Read;
    use std::process::Stdio;
    let small = ["--device", "cpu", "--no-progress", "--layers", "1", "--head-size", "16", "--requests", "4"];

    // A pipe whose reader is gone before anything is written.
    let mut child = Command::new(env!("CARGO_BIN_EXE_paged-serve"))
        .args(small)
        .env_remove("PAGED_ATTN_DEVICE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "broken pipe: {stderr}");
    assert!(stderr.is_empty(), "broken pipe is quiet: {stderr}");

    // The same for --help.
    let mut child = Command::new(env!("CARGO_BIN_EXE_paged-serve"))
        .arg("--help")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    assert_eq!(child.wait().unwrap().code(), Some(0));

    // A full disk.
    if let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") {
        for extra in [&[][..], &["--json"][..], &["--help"][..]] {
            let out = Command::new(env!("CARGO_BIN_EXE_paged-serve"))
                .args(small)
                .args(extra)
                .env_remove("PAGED_ATTN_DEVICE")
                .stdout(full.try_clone().unwrap())
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{extra:?}: {stderr}");
            assert_eq!(stderr.trim_end().lines().count(), 1, "{extra:?}: {stderr}");
            assert!(stderr.contains("cannot write to standard output") && !stderr.contains("panicked"), "{stderr}");
        }
    }
}

/// A sliding window and a soft-cap reach the backend and the f64 reference alike: the verifier
/// would reject the windowed, capped output if it computed plain causal attention (prompts are far
/// longer than the window), and the run says what it ran.
#[test]
fn window_and_softcap_are_verified_and_reported() {
    let args: Vec<&str> = SMALL
        .iter()
        .copied()
        .chain(["--sliding-window", "8", "--softcap", "0.5", "--verify", "--verify-every", "1"])
        .collect();
    let c = cli(&args);
    let s = run(&c).unwrap();
    check_counts(&s, &c);
    assert_eq!(s.verified_layer_steps, 2 * s.steps);
    assert_eq!(s.attention, "window 8, soft-cap 0.5");
    let text = s.to_string();
    assert!(text.contains("custom shape (window 8, soft-cap 0.5)"), "{text}");
    for phase in ["schedule", "plan", "model", "attention", "sampling"] {
        assert!(text.contains(&format!("               {phase}")), "{text}");
        assert!(s.to_json().contains(&format!("\"{phase}_share_of_wall_pct\": ")), "{phase}");
    }
    assert_eq!(s.step_model.len(), s.steps);
    assert_eq!(s.step_schedule.len(), s.steps);
    // The phases are disjoint parts of the wall time.
    let shares: f64 = s.phases().iter().map(|(_, v)| s.share_of_wall(v)).sum();
    assert!(shares > 0.0 && shares <= 100.5, "{shares}");
}

/// A preset sets the shape and variant; explicit flags override it.
#[test]
fn model_presets_with_overrides() {
    let c = cli(&["--model", "gemma2-9b", "--layers", "3", "--heads", "4", "--kv-heads", "2", "--head-size", "16"]);
    let cfg = c.resolve(attention_backend::DeviceRequest::Cpu, attention_backend::Device::Cpu).unwrap();
    assert_eq!((cfg.shape.num_layers, cfg.shape.num_heads, cfg.shape.num_kv_heads, cfg.shape.head_size), (3, 4, 2, 16));
    assert_eq!(cfg.attention.sliding_window, Some(4096));
    assert_eq!(cfg.attention.softcap, Some(50.0));
    let p0 = cfg.attention.layer_params(&cfg.shape, 0);
    let p1 = cfg.attention.layer_params(&cfg.shape, 1);
    assert_eq!((p0.window_left, p1.window_left), (Some(4095), None), "gemma 2 windows even layers only");
    assert!((p0.scale - 1.0 / 224f32.sqrt()).abs() < 1e-7);
    let plain = cli(&["--model", "llama3-8b"]);
    let cfg = plain.resolve(attention_backend::DeviceRequest::Cpu, attention_backend::Device::Cpu).unwrap();
    assert_eq!(
        (cfg.shape.num_layers, cfg.shape.num_heads, cfg.shape.num_kv_heads, cfg.shape.head_size),
        (32, 32, 8, 128)
    );
    assert_eq!(cfg.attention, paged_serve::model::AttentionVariant::default());
    let off = cli(&["--model", "mistral-7b", "--sliding-window", "0"]);
    let cfg = off.resolve(attention_backend::DeviceRequest::Cpu, attention_backend::Device::Cpu).unwrap();
    assert_eq!(cfg.attention.sliding_window, None);
    let (code, _, stderr) = bin(&["--model", "gpt5"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("unknown model `gpt5`") && stderr.contains("llama3-8b"), "{stderr}");
    let (code, _, stderr) = bin(&["--softcap", "-1"]);
    assert_eq!(code, 2, "{stderr}");
    let (_, help, _) = bin(&["--help"]);
    assert!(help.contains("--model") && help.contains("override"), "{help}");
}
