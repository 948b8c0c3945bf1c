//! `cargo xtask test` and `cargo xtask fuzz`.

use std::path::PathBuf;

use crate::{bundle, cuda, shell};

/// Features that turn on the CUDA code paths in every crate but test-suite (whose GPU test target is
/// built and run separately).
pub(crate) const CUDA_FEATURES: &str =
    "attention-kernels/cuda,attention-backend/cuda,model-runner/cuda,paged-serve/cuda";

/// [`CUDA_FEATURES`] and test-suite's, for whole-workspace commands.
const CUDA_FEATURES_ALL: &str =
    "attention-kernels/cuda,attention-backend/cuda,model-runner/cuda,paged-serve/cuda,test-suite/cuda";

/// The CUDA root to compile the kernels with: an existing nvcc, or the pinned one installed now.
/// `None` (after a loud banner) when neither works; the CPU-only tests still run then.
fn cuda_for_tests() -> Option<PathBuf> {
    if let Some(root) = cuda::find() {
        println!("nvcc: {}", root.join("bin/nvcc").display());
        return Some(root);
    }
    match cuda::setup() {
        Ok(root) => Some(root),
        Err(e) => {
            shell::banner(&[
                "CUDA KERNELS NOT COMPILED",
                "no nvcc was found and `cargo xtask setup-cuda` failed:",
                &e,
                "only the CPU code paths are built and tested in this run",
            ]);
            None
        }
    }
}

/// fmt check, clippy, every test; GPU tests built and run only where a GPU is present.
pub fn run() -> Result<(), String> {
    let mut fmt = shell::cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    shell::run(fmt)?;
    crate::clang_format::check_in_tests()?;
    bench_scripts()?;

    let cuda_root = cuda_for_tests();
    let (features, features_all, suite_features): (Vec<&str>, Vec<&str>, Vec<&str>) = if cuda_root.is_some() {
        (vec!["--features", CUDA_FEATURES], vec!["--features", CUDA_FEATURES_ALL], vec!["--features", "cuda"])
    } else {
        (vec![], vec![], vec![])
    };
    let with_nvcc = |mut cmd: std::process::Command| {
        if let Some(root) = &cuda_root {
            cmd.env("NVCC", root.join("bin/nvcc"));
        }
        cmd
    };

    let mut clippy = with_nvcc(shell::cargo());
    clippy.args(["clippy", "--workspace", "--all-targets"]).args(&features_all).args(["--", "-D", "warnings"]);
    shell::run(clippy)?;

    // Everything but the GPU test binary; test-suite's non-GPU tests live in its `integration` target.
    let mut tests = with_nvcc(shell::cargo());
    tests.args(["test", "--workspace", "--exclude", "test-suite"]).args(&features);
    shell::run(tests)?;
    let mut suite = with_nvcc(shell::cargo());
    suite.args(["test", "-p", "test-suite", "--lib", "--test", "integration"]).args(&suite_features);
    shell::run(suite)?;

    crate::package::run(cuda_root.as_ref().map(|r| r.join("bin/nvcc")))?;

    // Code generation the tests cannot see (same results, different speed): see xtask's sass.rs.
    if let Some(root) = &cuda_root {
        crate::sass::check_in_tests(root)?;
    }

    // The candle example: an engine's view of the crates beside candle-core with `cuda`. Checked
    // (fmt, clippy: everything type-checked, the kernels compiled), not linked (see xtask's candle.rs).
    match &cuda_root {
        Some(root) => {
            let started = std::time::Instant::now();
            crate::candle::check(root)?;
            println!("candle example checked in {:.0} s", started.elapsed().as_secs_f64());
        }
        None => shell::banner(&["examples/candle-decoder NOT CHECKED: no CUDA compiler (candle needs nvcc)"]),
    }

    if cuda_root.is_none() {
        shell::banner(&["GPU tests NOT BUILT and NOT RUN: no CUDA compiler (see above)"]);
        return Ok(());
    }
    let gpu_tests = bundle::build_gpu_tests(false)?;
    let mut list = std::process::Command::new(&gpu_tests);
    list.args(["--list", "--format", "terse"]);
    let listed = shell::output(list)?;
    let count = listed.lines().filter(|l| l.ends_with(": test")).count();
    if bundle::gpu_present() {
        println!("a GPU is present: running the {count} GPU tests");
        return bundle::gpu_test();
    }
    shell::banner(&[
        &format!("GPU tests: {count} built (kernels compiled), NOT RUN: no GPU on this machine"),
        "they are not counted as passed; run them with `cargo xtask gpu-test` on a GPU machine,",
        "or `cargo xtask gpu-bundle` and gpu-bundle/run.sh on one without cargo",
    ]);
    Ok(())
}

/// The bench scripts' own tests (plain python3, no torch or GPU needed): the FlashInfer page-table
/// conversion and the report. Without a python3 they are reported NOT RUN, not passed.
fn bench_scripts() -> Result<(), String> {
    let script = shell::workspace_root().join("bench/test_peers.py");
    let has_python = std::process::Command::new("python3").arg("--version").output().is_ok_and(|o| o.status.success());
    if !has_python {
        shell::banner(&["bench/test_peers.py NOT RUN: no python3 on this machine"]);
        return Ok(());
    }
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(&script);
    shell::run(cmd)
}

/// The property tests with many more cases, in release.
pub fn fuzz(cases: Option<&str>) -> Result<(), String> {
    let cases = cases.unwrap_or("20000");
    cases.parse::<u64>().map_err(|_| format!("CASES must be a number, got `{cases}`"))?;
    let mut runner = shell::cargo();
    runner.env("PROPTEST_CASES", cases);
    runner.args(["test", "--release", "-p", "model-runner", "--test", "prepare_props", "--test", "block_pool_props"]);
    shell::run(runner)?;
    // The step contract: random valid steps accepted, every injected violation refused with its
    // error (a step check costs about what a schedule does: the full count).
    let mut contract = shell::cargo();
    contract.env("PROPTEST_CASES", cases);
    contract.args(["test", "--release", "-p", "attention-backend", "--test", "contract_props"]);
    shell::run(contract)?;
    // Attention batches cost far more per case than schedules: a tenth of the cases.
    let attention_cases = (cases.parse::<u64>().unwrap_or(0) / 10).max(1).to_string();
    let mut attention = shell::cargo();
    attention.env("PROPTEST_CASES", attention_cases);
    attention.args(["test", "--release", "-p", "attention-backend", "--test", "attention_reference", "random_batches"]);
    shell::run(attention)
}
