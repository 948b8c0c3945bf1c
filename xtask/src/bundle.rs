//! `cargo xtask gpu-bundle`, `gpu-test` and `bench`: GPU binaries for a machine without cargo.
//!
//! The bundle is one ignored folder, `gpu-bundle/`, holding the GPU test binary, the benchmark
//! binaries (release, stripped), the peers script and `run.sh`, which runs them all and fails when
//! no GPU is visible.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::shell;

/// Largest bundle we accept: the device transfer limit leaves room for the working tree.
const MAX_BUNDLE_BYTES: u64 = 40 * 1024 * 1024;

/// The folder the bundle is written to.
pub fn bundle_dir() -> PathBuf {
    shell::workspace_root().join("gpu-bundle")
}

/// True when `nvidia-smi -L` lists a GPU.
pub fn gpu_present() -> bool {
    Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("GPU"))
        .unwrap_or(false)
}

/// `(target name, executable)` of every artifact with an executable in cargo's JSON messages.
fn executables(json: &str) -> Vec<(String, PathBuf)> {
    json.lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\""))
        .filter_map(|l| {
            let exe = field(l, "\"executable\":\"")?;
            let target = &l[l.find("\"target\":{")?..];
            Some((field(target, "\"name\":\"")?, PathBuf::from(exe)))
        })
        .collect()
}

fn field(s: &str, key: &str) -> Option<String> {
    let start = s.find(key)? + key.len();
    let end = s[start..].find('"')? + start;
    Some(s[start..end].to_string())
}

/// Builds the GPU test binary (`release` or the test profile) and returns its path.
pub fn build_gpu_tests(release: bool) -> Result<PathBuf, String> {
    let mut cmd = shell::cargo();
    cmd.args(["test", "-p", "test-suite", "--features", "cuda", "--test", "gpu", "--no-run"]);
    cmd.args(["--message-format", "json-render-diagnostics"]);
    if release {
        cmd.arg("--release");
    }
    let json = shell::output(cmd)?;
    executables(&json)
        .into_iter()
        .find(|(name, _)| name == "gpu")
        .map(|(_, exe)| exe)
        .ok_or_else(|| "cargo built no `gpu` test executable".to_string())
}

fn build_bins() -> Result<Vec<(String, PathBuf)>, String> {
    let mut cmd = shell::cargo();
    cmd.args(["build", "--release", "-p", "test-suite", "-p", "paged-serve"]);
    cmd.args(["--features", "test-suite/cuda,paged-serve/cuda", "--bins"]);
    cmd.args(["--message-format", "json-render-diagnostics"]);
    Ok(executables(&shell::output(cmd)?))
}

fn copy_stripped(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to).map_err(|e| format!("copy {} -> {}: {e}", from.display(), to.display()))?;
    let mut strip = Command::new("strip");
    strip.arg(to);
    shell::run(strip)
}

/// Builds the bundle and returns its folder.
pub fn build() -> Result<PathBuf, String> {
    let dir = bundle_dir();
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;

    copy_stripped(&build_gpu_tests(true)?, &dir.join("gpu-tests"))?;
    for (name, exe) in build_bins()? {
        copy_stripped(&exe, &dir.join(&name))?;
    }
    let root = shell::workspace_root();
    for script in ["bench/peers.py", "bench/report.py"] {
        let src = root.join(script);
        if src.exists() {
            let name = src.file_name().map(PathBuf::from).unwrap_or_default();
            std::fs::copy(&src, dir.join(name)).map_err(|e| format!("copy {script}: {e}"))?;
        }
    }
    let run_sh = dir.join("run.sh");
    std::fs::write(&run_sh, RUN_SH).map_err(|e| format!("write run.sh: {e}"))?;
    set_executable(&run_sh)?;

    let mut total = 0;
    println!("\ngpu-bundle/:");
    let mut entries: Vec<_> = std::fs::read_dir(&dir).map_err(|e| e.to_string())?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
        total += len;
        println!("  {:>10}  {}", len, e.file_name().to_string_lossy());
    }
    println!("  {total:>10}  total");
    if total > MAX_BUNDLE_BYTES {
        return Err(format!("the bundle is {total} bytes, over the {MAX_BUNDLE_BYTES}-byte limit"));
    }
    Ok(dir)
}

#[cfg(unix)]
fn set_executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())
}

#[cfg(not(unix))]
fn set_executable(_: &Path) -> Result<(), String> {
    Ok(())
}

/// Runs the GPU test suite with cargo on this machine; fails without a GPU.
pub fn gpu_test() -> Result<(), String> {
    if !gpu_present() {
        return Err("no NVIDIA GPU visible (nvidia-smi -L lists none): the GPU tests cannot run here".into());
    }
    let exe = build_gpu_tests(true)?;
    shell::run(Command::new(exe))
}

/// Builds the bundle and says how to run the benchmark.
pub fn bench() -> Result<(), String> {
    let dir = build()?;
    println!("\nbundle ready in {}.", dir.display());
    println!("On a machine with an NVIDIA GPU (python3 with torch for the peers), run:\n");
    println!("    gpu-bundle/run.sh bench\n");
    println!("It prints one table (ours, the peers, ratios) and writes bench-results.json and bench-ratios.png");
    println!("into $OUT if set, else the bundle folder.");
    Ok(())
}

/// The script that runs on the GPU machine.
const RUN_SH: &str = r#"#!/usr/bin/env bash
# Runs the GPU suite of paged-attention-rs from this folder, with no cargo needed.
#   ./run.sh            tests, compute-sanitizer (memcheck + racecheck) on the subset, serve, soak, bench
#   ./run.sh test       the GPU tests only
#   ./run.sh sanitize   memcheck and racecheck on the tests named *sanitizer_subset*
#   ./run.sh serve      the main job on the GPU with --verify (attention checked against float64)
#   ./run.sh soak       >= 10,000 steps under constant preemption, every step verified, every block
#                       back in the pool at the end (about a minute on an H200)
#   ./run.sh bench      our benchmark binaries and the torch peers, one table
# Every mode fails when no NVIDIA GPU is visible.
set -uo pipefail
cd "$(dirname "$0")"
mode="${1:-all}"
out="${OUT:-$PWD}"
status=0

if ! nvidia-smi -L 2>/dev/null | grep -q GPU; then
    echo "run.sh: no NVIDIA GPU visible (nvidia-smi -L lists none): failing" >&2
    exit 1
fi
nvidia-smi -L

step() { echo; echo "=== $*"; "$@"; local rc=$?; if [ $rc -ne 0 ]; then echo "=== FAILED ($rc): $*"; status=1; fi; }

run_tests() { step ./gpu-tests; }
run_sanitize() {
    step compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 ./gpu-tests sanitizer_subset --test-threads=1
    step compute-sanitizer --tool racecheck --error-exitcode 9 --print-limit 20 ./gpu-tests sanitizer_subset --test-threads=1
}
# A workload sized to finish in a few minutes: the synthetic model's Q/K/V are made on the host.
run_serve() {
    step timeout 420 ./paged-serve --device cuda --verify --no-progress --requests 256 --prompt-len 768 --output-len 128
}
# The soak: a 12-block cache (192 tokens) for requests of up to 120 tokens arriving one a step, so
# requests are preempted and recomputed all the time; small layers and heads because the synthetic
# model's Q/K/V are made on the host. Every step is verified; paged-serve itself fails on a
# mismatch or a block not returned to the pool; this also insists on the step count and on
# preemptions having happened.
soak_check() {
    local json
    json=$(timeout 300 ./paged-serve --device cuda --json --no-progress --layers 2 --heads 4 --kv-heads 1 \
        --head-size 64 --block-size 16 --num-blocks 12 --requests 800 --prompt-len 40 --output-len 40 \
        --arrival-rate 1 --max-num-seqs 16 --max-num-batched-tokens 128 \
        --verify --verify-every 1 --verify-layers 2) || return 1
    echo "$json"
    local steps preemptions
    steps=$(echo "$json" | grep -o '"steps": [0-9]*' | grep -o '[0-9]*$')
    preemptions=$(echo "$json" | grep -o '"preemptions": [0-9]*' | grep -o '[0-9]*$')
    echo "soak: ${steps:-?} steps, ${preemptions:-?} preemptions"
    [ "${steps:-0}" -ge 10000 ] || { echo "soak: fewer than 10000 steps" >&2; return 1; }
    [ "${preemptions:-0}" -gt 0 ] || { echo "soak: no preemption" >&2; return 1; }
}
run_soak() { step soak_check; }
run_bench() {
    local jsons=()
    for b in bench bench_*; do
        [ -x "$b" ] || continue
        step "./$b" --json "$out/ours-$b.json" --check-dir "$PWD/checks"
        jsons+=("$out/ours-$b.json")
    done
    if [ -f peers.py ]; then
        step python3 peers.py --json "$out/peers.json" "${jsons[@]}"
    fi
    if [ -f report.py ]; then
        step python3 report.py --out "$out" "${jsons[@]}" "$out/peers.json"
    fi
}

case "$mode" in
    all) run_tests; run_sanitize; run_serve; run_soak; run_bench ;;
    test) run_tests ;;
    serve) run_serve ;;
    soak) run_soak ;;
    sanitize) run_sanitize ;;
    bench) run_bench ;;
    *) echo "usage: $0 [all|test|sanitize|serve|soak|bench]" >&2; exit 2 ;;
esac
echo
if [ $status -eq 0 ]; then echo "run.sh: all steps passed"; else echo "run.sh: SOME STEPS FAILED"; fi
exit $status
"#;
