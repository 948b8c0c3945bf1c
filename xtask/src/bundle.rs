//! `cargo xtask gpu-bundle`, `gpu-test` and `bench`: GPU binaries for a machine without cargo.
//!
//! The bundle is one ignored folder, `gpu-bundle/`, holding the GPU test binary and the benchmark
//! binaries (release, stripped, packed into one `bins.tar.xz`), the peers scripts and `run.sh`,
//! which unpacks and runs them all and fails when no GPU is visible. `cargo xtask candle` adds the candle example to it (compressed, about 9 MB;
//! left out of the default bundle to keep room for FlashInfer, see [`crate::candle`]). When a
//! prebuilt FlashInfer is at hand (see [`flashinfer_dir`]) its two files go into `gpu-bundle/flashinfer/` and `run.sh bench` unpacks them into a temporary folder so the
//! peers script can time FlashInfer on a machine that cannot install it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::shell;

/// Largest bundle of our own files (binaries, scripts) we accept.
const MAX_BUNDLE_BYTES: u64 = 52 * 1024 * 1024;

/// Largest bundle with the FlashInfer files: a GPU machine call carries at most 64 MiB, the working
/// tree included, so the bundle stays well under it. FlashInfer is left out (with a note) rather
/// than pushing the bundle past this.
pub(crate) const MAX_TOTAL_BYTES: u64 = 60 * 1024 * 1024;

// Checked when compiling: our part fits in the total, and the total leaves the working tree room
// (about 1 MiB of sources) under the 64 MiB a device call carries.
const _: () = assert!(MAX_BUNDLE_BYTES < MAX_TOTAL_BYTES && MAX_TOTAL_BYTES + 3 * 1024 * 1024 < 64 * 1024 * 1024);

/// Names a folder holding the prebuilt FlashInfer files, overriding the default.
const FLASHINFER_DIR_ENV: &str = "PAGED_ATTN_FLASHINFER_DIR";

/// The scripts `run.sh bench` runs, copied from `bench/`.
const SCRIPTS: [&str; 3] = ["bench/peers.py", "bench/flashinfer_peer.py", "bench/report.py"];

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
pub(crate) fn executables(json: &str) -> Vec<(String, PathBuf)> {
    json.lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\""))
        .filter_map(|l| {
            let exe = field(l, "\"executable\":\"")?;
            let target = &l[l.find("\"target\":{")?..];
            Some((field(target, "\"name\":\"")?, PathBuf::from(exe)))
        })
        .collect()
}

/// The output folder (`OUT_DIR`) of `package`'s build script in cargo's JSON messages.
pub(crate) fn build_script_out_dir(json: &str, package: &str) -> Option<PathBuf> {
    json.lines()
        .filter(|l| l.contains("\"reason\":\"build-script-executed\""))
        .filter(|l| field(l, "\"package_id\":\"").is_some_and(|id| package_name(&id) == Some(package)))
        .filter_map(|l| field(l, "\"out_dir\":\"").map(PathBuf::from))
        .next_back()
}

/// The package name in a cargo package id: `path+file:///dir/name#version`,
/// `path+file:///dir#name@version` (cargo 1.77 on) or `name version (source)` (before).
fn package_name(id: &str) -> Option<&str> {
    match id.split_once('#') {
        Some((_, fragment)) if fragment.contains('@') => fragment.split('@').next(),
        Some((url, _)) => url.rsplit('/').next(),
        None => id.split(' ').next(),
    }
}

fn field(s: &str, key: &str) -> Option<String> {
    let start = s.find(key)? + key.len();
    let end = s[start..].find('"')? + start;
    Some(s[start..end].to_string())
}

/// Builds the GPU test binary (`release` or the test profile) and returns its path. Installs the
/// pinned CUDA compiler first when no nvcc is found (a fresh machine), as `cargo xtask test` does.
pub fn build_gpu_tests(release: bool) -> Result<PathBuf, String> {
    if crate::cuda::find().is_none() {
        crate::cuda::setup()?;
    }
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

pub(crate) fn copy_stripped(from: &Path, to: &Path) -> Result<(), String> {
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
    let mut names = vec!["gpu-tests".to_string()];
    for (name, exe) in build_bins()? {
        copy_stripped(&exe, &dir.join(&name))?;
        names.push(name);
    }
    pack_binaries(&dir, &names)?;
    let root = shell::workspace_root();
    for script in SCRIPTS {
        let src = root.join(script);
        if src.exists() {
            let name = src.file_name().map(PathBuf::from).unwrap_or_default();
            std::fs::copy(&src, dir.join(name)).map_err(|e| format!("copy {script}: {e}"))?;
        }
    }
    let run_sh = dir.join("run.sh");
    std::fs::write(&run_sh, RUN_SH).map_err(|e| format!("write run.sh: {e}"))?;
    set_executable(&run_sh)?;

    let own = dir_size(&dir)?;
    if own > MAX_BUNDLE_BYTES {
        list(&dir)?;
        return Err(format!("the bundle is {own} bytes, over the {MAX_BUNDLE_BYTES}-byte limit"));
    }
    add_flashinfer(&dir, own, &flashinfer_dir())?;
    list(&dir)?;
    Ok(dir)
}

/// Replaces the binaries in `dir` by one `bins.tar.xz` that `run.sh` unpacks first. Every binary
/// embeds the same kernels (about 10 MB of fatbin each), so with a dictionary larger than one
/// binary xz stores them once: about an eighth of the bytes a device call has to carry.
fn pack_binaries(dir: &Path, names: &[String]) -> Result<(), String> {
    let archive = std::fs::File::create(dir.join(BINS_ARCHIVE)).map_err(|e| format!("create {BINS_ARCHIVE}: {e}"))?;
    let mut tar = Command::new("tar");
    tar.current_dir(dir).arg("-cf").arg("-").args(names).stdout(std::process::Stdio::piped());
    let mut tar = tar.spawn().map_err(|e| format!("cannot run tar: {e}"))?;
    let tar_out = tar.stdout.take().ok_or("tar has no stdout")?;
    let mut xz = Command::new("xz");
    xz.args(["-T2", "--lzma2=preset=6,dict=192MiB"]).stdin(tar_out).stdout(archive);
    let xz_ok = xz.status().map_err(|e| format!("cannot run xz: {e}"))?.success();
    let tar_ok = tar.wait().map_err(|e| format!("tar: {e}"))?.success();
    if !(xz_ok && tar_ok) {
        return Err(format!("packing the binaries into {BINS_ARCHIVE} failed"));
    }
    for name in names {
        std::fs::remove_file(dir.join(name)).map_err(|e| format!("remove {name}: {e}"))?;
    }
    Ok(())
}

/// The archive of the bundle's binaries.
const BINS_ARCHIVE: &str = "bins.tar.xz";

/// Prints every file of the bundle with its size, and the total.
fn list(dir: &Path) -> Result<(), String> {
    println!("\ngpu-bundle/:");
    let mut files = Vec::new();
    walk(dir, &mut files)?;
    files.sort();
    let mut total = 0;
    for (path, len) in files {
        total += len;
        let name = path.strip_prefix(dir).unwrap_or(&path);
        println!("  {:>10}  {}", len, name.display());
    }
    println!("  {total:>10}  total");
    Ok(())
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64)>) -> Result<(), String> {
    for e in std::fs::read_dir(dir).map_err(|e| format!("read {}: {e}", dir.display()))?.flatten() {
        let meta = e.metadata().map_err(|err| format!("stat {}: {err}", e.path().display()))?;
        if meta.is_dir() {
            walk(&e.path(), out)?;
        } else {
            out.push((e.path(), meta.len()));
        }
    }
    Ok(())
}

/// Bytes of every file under `dir`.
pub(crate) fn dir_size(dir: &Path) -> Result<u64, String> {
    let mut files = Vec::new();
    walk(dir, &mut files)?;
    Ok(files.iter().map(|(_, len)| len).sum())
}

/// Where the prebuilt FlashInfer files are looked for: `$PAGED_ATTN_FLASHINFER_DIR` when set,
/// else `../shared/peers/flashinfer` beside the workspace root (where a prebuilt copy is shared
/// between checkouts of one machine).
pub fn flashinfer_dir() -> PathBuf {
    match std::env::var_os(FLASHINFER_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => shell::workspace_root().join("../shared/peers/flashinfer"),
    }
}

/// The FlashInfer package (`flashinfer-*.tar.xz`, the prebuilt flashinfer-python tree) and its
/// one missing import-time dependency (`apache_tvm_ffi-*.whl`) in `dir`, or why they cannot be
/// used. Several candidates: the last by name (the newest version when only the version differs).
pub fn flashinfer_files(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("no folder {} ({e})", dir.display()))?;
    let mut names: Vec<String> = entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let pick = |prefix: &str, suffix: &str| {
        names.iter().rev().find(|n| n.starts_with(prefix) && n.ends_with(suffix)).map(|n| dir.join(n))
    };
    let tarball =
        pick("flashinfer-", ".tar.xz").ok_or_else(|| format!("no flashinfer-*.tar.xz in {}", dir.display()))?;
    let wheel =
        pick("apache_tvm_ffi-", ".whl").ok_or_else(|| format!("no apache_tvm_ffi-*.whl in {}", dir.display()))?;
    Ok((tarball, wheel))
}

/// Copies the prebuilt FlashInfer into `bundle/flashinfer/` when it is at hand and fits beside our
/// `own_bytes`; otherwise says why it is left out (the bench then runs without that peer, or with
/// a FlashInfer installed on the GPU machine).
fn add_flashinfer(bundle: &Path, own_bytes: u64, from: &Path) -> Result<(), String> {
    let (tarball, wheel) = match flashinfer_files(from) {
        Ok(files) => files,
        Err(why) => {
            println!("\nnote: FlashInfer not bundled: {why}.");
            println!("      Set {FLASHINFER_DIR_ENV} to a folder with flashinfer-*.tar.xz and apache_tvm_ffi-*.whl to add it.");
            return Ok(());
        }
    };
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).map_err(|e| format!("stat {}: {e}", p.display()));
    let extra = size(&tarball)? + size(&wheel)?;
    if own_bytes + extra > MAX_TOTAL_BYTES {
        println!(
            "\nnote: FlashInfer NOT bundled: {own_bytes} + {extra} bytes would pass the {MAX_TOTAL_BYTES}-byte limit."
        );
        return Ok(());
    }
    let to = bundle.join("flashinfer");
    std::fs::create_dir_all(&to).map_err(|e| format!("create {}: {e}", to.display()))?;
    for file in [&tarball, &wheel] {
        let name = file.file_name().map(PathBuf::from).unwrap_or_default();
        std::fs::copy(file, to.join(name)).map_err(|e| format!("copy {}: {e}", file.display()))?;
    }
    println!("\nFlashInfer bundled from {}", from.display());
    Ok(())
}

#[cfg(unix)]
pub(crate) fn set_executable(path: &Path) -> Result<(), String> {
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
    if dir.join("flashinfer").is_dir() {
        println!("FlashInfer is in the bundle: run.sh unpacks it into a temporary folder (no network needed).");
    } else {
        println!(
            "FlashInfer is not in the bundle: its column shows a FlashInfer installed there, or says it is missing."
        );
    }
    println!("into $OUT if set, else the bundle folder.");
    Ok(())
}

/// The script that runs on the GPU machine.
pub(crate) const RUN_SH: &str = r#"#!/usr/bin/env bash
# Runs the GPU suite of paged-attention-rs from this folder, with no cargo needed.
#   ./run.sh            tests, compute-sanitizer (memcheck + racecheck) on the subset, serve, soak,
#                       candle (when bundled), bench
#   ./run.sh test       the GPU tests only
#   ./run.sh sanitize   memcheck and racecheck on the tests named *sanitizer_subset*
#   ./run.sh serve      the main job on the GPU: issue 17's workload timed with and without CUDA
#                       graphs (the ratio printed), then with --verify (attention checked against
#                       float64), then a 32-layer llama3-8b-shaped run of 1000 requests, verified,
#                       then the first workload on an FP8 KV cache, timed and verified
#   ./run.sh soak       >= 10,000 steps under constant preemption, every step verified, every block
#                       back in the pool at the end (about a minute on an H200)
#   ./run.sh bench      our benchmark binaries and the peers (torch; FlashInfer when bundled or
#                       installed), one table
#   ./run.sh candle     a small Llama-style decoder on candle whose attention runs on our kernels on
#                       candle's own buffers, logits checked against candle's dense attention (added
#                       by `cargo xtask candle`; needs the CUDA 13 libraries of torch's nvidia wheels)
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
# The binaries travel packed (they share their kernels, which xz stores once).
if [ -f bins.tar.xz ]; then
    tar -xJf bins.tar.xz || { echo "run.sh: cannot unpack bins.tar.xz" >&2; exit 1; }
fi

step() { echo; echo "=== $*"; "$@"; local rc=$?; if [ $rc -ne 0 ]; then echo "=== FAILED ($rc): $*"; status=1; fi; }

# The warp-specialised prefill's tests run three times: once as launched by default (one block per
# SM, most blocks of a small test hold one work item), then with its persistent grid capped at 3
# blocks, so that every block walks many items and the pipelines carry over between them, in each
# of its two item orders (PAGED_ATTN_WS_ORDER). The
# mixed-step tests run once more with every mixed step partitioned (the prefill part first on 5
# SMs, the decode part beside it), which the default plan does only where it predicts a gain. The
# decode tests run once more with the group merge off, so that the folded combine's last-block
# merge runs on the small grids that otherwise take the group merge.
run_tests() {
    step ./gpu-tests
    step env PAGED_ATTN_WS_GRID=3 PAGED_ATTN_WS_ORDER=strided ./gpu-tests sm90ws
    step env PAGED_ATTN_WS_GRID=3 PAGED_ATTN_WS_ORDER=zigzag ./gpu-tests sm90ws
    step env PAGED_ATTN_MIXED_PARTITION=5 ./gpu-tests mixed
    step env PAGED_ATTN_DECODE_GROUP_MERGE=0 ./gpu-tests decode
}
run_sanitize() {
    step compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 ./gpu-tests sanitizer_subset --test-threads=1
    step compute-sanitizer --tool racecheck --error-exitcode 9 --print-limit 20 ./gpu-tests sanitizer_subset --test-threads=1
    step env PAGED_ATTN_WS_GRID=3 compute-sanitizer --tool racecheck --error-exitcode 9 --print-limit 20 \
        ./gpu-tests sanitizer_subset_sm90ws --test-threads=1
}
# The main job with everything on the device (the synthetic model's Q/K/V and next tokens are
# made by kernels; decode steps replay CUDA graphs). Issue 17's workload is timed with graphs and
# with --no-graphs (their ratio printed) without the f64 reference, whose host time would be
# timed with them, then run again with --verify; last, a 32-layer llama3-8b-shaped run of 1000
# requests with short prompts and outputs (256 and 64 tokens on average) with --verify. Every
# summary says where the time goes per step (schedule, plan, model, attention, sampling).
SERVE_WORKLOAD="--requests 256 --prompt-len 768 --output-len 128"
serve_one() {
    local label=$1; shift
    echo "--- serve $label: ./paged-serve --device cuda --no-progress $*"
    timeout 300 ./paged-serve --device cuda --no-progress "$@" | tee "$out/serve-$label.txt"
    return "${PIPESTATUS[0]}"
}
# Generated tokens per second and the attention share of a text summary.
serve_rate() { grep -o '[0-9]* generated tokens/s' "$out/serve-$1.txt" | grep -o '^[0-9]*'; }
serve_attention_share() { awk '$1 == "attention" && $NF == "(device)" { print $(NF-2) }' "$out/serve-$1.txt"; }
serve_compare() {
    local g n
    g=$(serve_rate graphs); n=$(serve_rate no-graphs)
    [ -n "$g" ] && [ -n "$n" ] || { echo "serve: no throughput to compare" >&2; return 1; }
    awk -v g="$g" -v n="$n" -v ga="$(serve_attention_share graphs)" -v na="$(serve_attention_share no-graphs)" 'BEGIN {
        printf "serve: graphs %d generated tokens/s (attention %s %% of wall), no graphs %d (attention %s %%): ratio %.2fx; %.1fx the 1647 of issue 17\n", g, ga, n, na, g / n, g / 1647 }'
}
run_serve() {
    # shellcheck disable=SC2086
    step serve_one graphs $SERVE_WORKLOAD
    # shellcheck disable=SC2086
    step serve_one no-graphs $SERVE_WORKLOAD --no-graphs
    step serve_compare
    # shellcheck disable=SC2086
    step serve_one verify $SERVE_WORKLOAD --verify
    step serve_one llama3-8b --model llama3-8b --requests 1000 --prompt-len 256 --output-len 64 --num-blocks 16384 --verify
    # The FP8 KV cache: the same workload timed, then verified (the reference reads K/V as the
    # cache stores them), with the scale that maps the model's [-1, 1] onto E4M3's range.
    # shellcheck disable=SC2086
    step serve_one fp8 $SERVE_WORKLOAD --kv-cache-dtype fp8_e4m3 --kv-scale 0.0022
    # shellcheck disable=SC2086
    step serve_one fp8-verify $SERVE_WORKLOAD --kv-cache-dtype fp8_e4m3 --kv-scale 0.0022 --verify
}
# The bundled FlashInfer (flashinfer/ here, present when the bundle was built beside a prebuilt
# copy) goes into a temporary folder put on PYTHONPATH, installed offline; without it peers.py uses
# a FlashInfer installed the usual way, or reports it missing. Never fails the bench.
fi_tmp=""
cleanup_flashinfer() { if [ -n "$fi_tmp" ]; then rm -rf "$fi_tmp"; fi; }
trap cleanup_flashinfer EXIT
setup_flashinfer() {
    local wheel tarball
    wheel=$(ls flashinfer/apache_tvm_ffi-*.whl 2>/dev/null | tail -n 1)
    tarball=$(ls flashinfer/flashinfer-*.tar.xz 2>/dev/null | tail -n 1)
    if [ -z "$wheel" ] || [ -z "$tarball" ]; then
        echo "FlashInfer: not in the bundle (peers.py uses an installed one if any)"
        return 0
    fi
    fi_tmp=$(mktemp -d "${TMPDIR:-/tmp}/paged-attn-flashinfer.XXXXXX") || return 0
    echo "FlashInfer: unpacking $tarball and $wheel into $fi_tmp"
    if PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$fi_tmp/site" "$wheel" &&
        python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='tar')" "$tarball" "$fi_tmp/site"; then
        export PYTHONPATH="$fi_tmp/site${PYTHONPATH:+:$PYTHONPATH}"
        export FLASHINFER_WORKSPACE_BASE="$fi_tmp/ws"
    else
        echo "FlashInfer: could not unpack the bundled copy; peers.py runs without it unless one is installed"
    fi
}
# The soak: a 12-block cache (192 tokens) for requests of up to 120 tokens arriving one a step, so
# requests are preempted and recomputed all the time; small layers and heads keep the f64
# reference of every step cheap. Every step is verified; paged-serve itself fails on a
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
# candle links libcuda (the driver's), libnvrtc, libcurand, libcublas and libcublasLt; the bundle's
# binary was linked against stubs, so the real CUDA 13 libraries come from torch's nvidia wheels
# (nvidia/cu13/lib, or nvidia/<library>/lib in older layouts), put on LD_LIBRARY_PATH.
candle_libs() {
    python3 - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
dirs = []
for base in nvidia.__path__:
    dirs += sorted(d for d in glob.glob(os.path.join(base, "*", "lib")) if os.path.isdir(d))
print(os.pathsep.join(dirs))
PY
}
run_candle() {
    if [ ! -f candle-decoder.xz ]; then
        echo "=== FAILED: candle-decoder.xz is not in the bundle (build it with \`cargo xtask candle\`)"; status=1; return
    fi
    local dir libs path missing
    dir=$(mktemp -d "${TMPDIR:-/tmp}/paged-attn-candle.XXXXXX") || { status=1; return; }
    python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
        candle-decoder.xz "$dir/candle-decoder" && chmod +x "$dir/candle-decoder" || {
        echo "=== FAILED: cannot unpack candle-decoder.xz"; status=1; rm -rf "$dir"; return
    }
    libs=$(candle_libs)
    path="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "candle: LD_LIBRARY_PATH=$path"
    missing=$(LD_LIBRARY_PATH="$path" ldd "$dir/candle-decoder" | grep "not found")
    if [ -n "$missing" ]; then
        echo "=== FAILED: candle-decoder: shared libraries not found:"; echo "$missing"; status=1
    else
        step env LD_LIBRARY_PATH="$path" timeout 300 "$dir/candle-decoder"
    fi
    rm -rf "$dir"
}
run_bench() {
    local jsons=()
    # The benchmarks the peers are compared with; the others print their own tables below.
    for b in bench bench_attention; do
        [ -x "$b" ] || continue
        step "./$b" --json "$out/ours-$b.json" --check-dir "$PWD/checks"
        jsons+=("$out/ours-$b.json")
    done
    if [ -f peers.py ]; then
        setup_flashinfer
        step python3 peers.py --json "$out/peers.json" "${jsons[@]}"
    fi
    if [ -f report.py ]; then
        step python3 report.py --out "$out" "${jsons[@]}" "$out/peers.json"
    fi
    if [ -x plan_overhead ]; then
        step ./plan_overhead --json "$out/plan-overhead.json"
    fi
    if [ -x bench_fp8 ]; then
        step ./bench_fp8 --json "$out/fp8.json"
    fi
    for b in bench_prefill_paths bench_decode_variants; do
        if [ -x "$b" ]; then step "./$b"; fi
    done
}

case "$mode" in
    all) run_tests; run_sanitize; run_serve; run_soak; if [ -f candle-decoder.xz ]; then run_candle; fi; run_bench ;;
    test) run_tests ;;
    serve) run_serve ;;
    soak) run_soak ;;
    sanitize) run_sanitize ;;
    bench) run_bench ;;
    candle) run_candle ;;
    *) echo "usage: $0 [all|test|sanitize|serve|soak|bench|candle]" >&2; exit 2 ;;
esac
echo
if [ $status -eq 0 ]; then echo "run.sh: all steps passed"; else echo "run.sh: SOME STEPS FAILED"; fi
exit $status
"#;

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("xtask-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn flashinfer_files_finds_the_pair_and_says_what_is_missing() {
        let tmp = TempDir::new("fi-files");
        let dir = &tmp.0;
        assert!(flashinfer_files(&dir.join("absent")).unwrap_err().contains("no folder"));
        std::fs::write(dir.join("README.md"), "x").unwrap();
        std::fs::write(dir.join("flashinfer-0.7.2.post1-sm90a-bf16.tar.xz"), "x").unwrap();
        assert!(flashinfer_files(dir).unwrap_err().contains("apache_tvm_ffi"));
        std::fs::write(dir.join("apache_tvm_ffi-0.1.15-cp312-cp312-manylinux.whl"), "x").unwrap();
        std::fs::write(dir.join("flashinfer-0.7.3-sm90a-bf16.tar.xz"), "x").unwrap();
        let (tarball, wheel) = flashinfer_files(dir).unwrap();
        assert_eq!(tarball, dir.join("flashinfer-0.7.3-sm90a-bf16.tar.xz"));
        assert_eq!(wheel, dir.join("apache_tvm_ffi-0.1.15-cp312-cp312-manylinux.whl"));
    }

    #[test]
    fn add_flashinfer_copies_the_pair_when_it_fits() {
        let tmp = TempDir::new("add-fi");
        let (from, bundle) = (tmp.0.join("peers"), tmp.0.join("bundle"));
        std::fs::create_dir_all(&from).unwrap();
        std::fs::create_dir_all(&bundle).unwrap();
        // absent files: a note, no folder, no error
        add_flashinfer(&bundle, 0, &from).unwrap();
        assert!(!bundle.join("flashinfer").exists());
        std::fs::write(from.join("flashinfer-0.7.2-sm90a.tar.xz"), [1u8; 100]).unwrap();
        std::fs::write(from.join("apache_tvm_ffi-0.1.15.whl"), [2u8; 50]).unwrap();
        // over the total with our own bytes: left out
        add_flashinfer(&bundle, MAX_TOTAL_BYTES - 149, &from).unwrap();
        assert!(!bundle.join("flashinfer").exists());
        add_flashinfer(&bundle, MAX_TOTAL_BYTES - 150, &from).unwrap();
        assert_eq!(std::fs::read(bundle.join("flashinfer/flashinfer-0.7.2-sm90a.tar.xz")).unwrap(), [1u8; 100]);
        assert_eq!(std::fs::read(bundle.join("flashinfer/apache_tvm_ffi-0.1.15.whl")).unwrap(), [2u8; 50]);
        assert_eq!(dir_size(&bundle).unwrap(), 150);
    }

    #[test]
    fn dir_size_counts_nested_files() {
        let tmp = TempDir::new("dir-size");
        std::fs::write(tmp.0.join("a"), [0u8; 10]).unwrap();
        std::fs::create_dir_all(tmp.0.join("flashinfer")).unwrap();
        std::fs::write(tmp.0.join("flashinfer/b"), [0u8; 32]).unwrap();
        assert_eq!(dir_size(&tmp.0).unwrap(), 42);
    }

    #[test]
    fn run_sh_installs_the_bundled_flashinfer_offline_and_parses() {
        for needle in [
            "--no-index --no-deps",
            "--target",
            "filter='tar'",
            "PYTHONPATH=",
            "FLASHINFER_WORKSPACE_BASE=",
            "candle) run_candle",
            "LD_LIBRARY_PATH=\"$path\"",
            "lzma.open",
        ] {
            assert!(RUN_SH.contains(needle), "run.sh lacks {needle}");
        }
        let tmp = TempDir::new("run-sh");
        let path = tmp.0.join("run.sh");
        std::fs::write(&path, RUN_SH).unwrap();
        // bash -n: syntax only, nothing runs (skipped where no bash is installed)
        if let Ok(out) = Command::new("bash").arg("-n").arg(&path).output() {
            assert!(out.status.success(), "run.sh: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}
