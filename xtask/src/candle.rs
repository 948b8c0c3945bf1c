//! The candle example (`examples/candle-decoder`): checked in CI, linked for the GPU bundle.
//!
//! candle-core's `cuda` feature makes cudarc link the CUDA libraries (driver, nvrtc, curand,
//! cuBLAS, cuBLASLt) dynamically, so building it needs two things this project's machines lack:
//! - `nvcc` on `PATH` and a compute capability (candle's kernels are compiled to PTX at build time
//!   and cudarc reads the CUDA version from `nvcc --version`): the pinned toolkit and
//!   `CUDA_COMPUTE_CAP=90` (the H200) are set here;
//! - for linking, the five shared libraries cudarc names, and the CUDA runtime (candle's MoE
//!   kernels link `libcudart`). The five are large (cuBLAS alone is hundreds of MB on PyPI) and
//!   only the GPU machine needs them, so the link uses *stubs*, as NVIDIA's own toolkit does
//!   (`lib64/stubs`): a tiny library per soname defining every function cudarc declares for it,
//!   generated from cudarc's own bindings. The runtime is the pinned toolkit's real
//!   `libcudart.so.13`, under the name the linker looks for. The binary records the sonames; on
//!   the GPU machine the dynamic loader finds the real libraries (the driver's `libcuda.so.1`, the
//!   CUDA 13 libraries of torch's `nvidia` wheels, see `run.sh candle`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::shell;

/// Each library candle links: the `-l` name cudarc asks for, the soname of the CUDA 13 release
/// it must resolve to at run time, and cudarc's binding module for it.
const LIBRARIES: [(&str, &str, &str); 5] = [
    ("cuda", "libcuda.so.1", "driver"),
    ("nvrtc", "libnvrtc.so.13", "nvrtc"),
    ("curand", "libcurand.so.10", "curand"),
    ("cublas", "libcublas.so.13", "cublas"),
    ("cublasLt", "libcublasLt.so.13", "cublaslt"),
];

/// The symbol prefixes of those libraries (cudarc's binding files hold a few helpers too).
const PREFIXES: [&str; 4] = ["cu", "nvrtc", "curand", "cublas"];

/// The environment variable the example's build script turns into a link search path.
const STUBS_ENV: &str = "CANDLE_DECODER_LINK_STUBS";

/// The compute capability candle's kernels are built for when the caller names none (H200).
const DEFAULT_COMPUTE_CAP: &str = "90";

pub fn example_dir() -> PathBuf {
    shell::workspace_root().join("examples/candle-decoder")
}

/// The example's own target folder, in the user cache beside the pinned nvcc rather than in the
/// checkout: candle's CUDA kernels take about 7 CPU-minutes of nvcc to build, and a cache that
/// outlives a clean checkout (as CI's does on the same machine) pays that once, not every run.
fn target_dir() -> Result<PathBuf, String> {
    Ok(crate::cuda::cache_dir()?.join("candle-example-target"))
}

/// cargo in the example's folder, with nvcc on `PATH`, the compute capability and its own target
/// folder (its lockfile and cudarc's features differ from the workspace's).
fn cargo(cuda_root: &Path) -> Result<Command, String> {
    let mut cmd = shell::cargo();
    cmd.current_dir(example_dir());
    let bin = cuda_root.join("bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let joined = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)))
        .map_err(|e| format!("cannot put nvcc on PATH: {e}"))?;
    cmd.env("PATH", joined).env("NVCC", cuda_root.join("bin/nvcc"));
    if std::env::var_os("CUDA_COMPUTE_CAP").is_none() {
        cmd.env("CUDA_COMPUTE_CAP", DEFAULT_COMPUTE_CAP);
    }
    cmd.env("CARGO_TARGET_DIR", target_dir()?);
    Ok(cmd)
}

/// CI's check: formatting, and clippy with warnings denied (it type-checks everything, the
/// kernels and candle's PTX compiled). Linking needs the stubs and is left to the bundle.
pub fn check(cuda_root: &Path) -> Result<(), String> {
    let mut fmt = shell::cargo();
    fmt.current_dir(example_dir()).args(["fmt", "--", "--check"]);
    shell::run(fmt)?;
    let mut clippy = cargo(cuda_root)?;
    clippy.args(["clippy", "--all-targets", "--", "-D", "warnings"]);
    shell::run(clippy)
}

/// Builds the example in release against generated link stubs and returns its executable.
pub fn build_release(cuda_root: &Path) -> Result<PathBuf, String> {
    let stubs = target_dir()?.join("link-stubs");
    write_stubs(&cudarc_dir(cuda_root)?, &stubs)?;
    link_runtime(cuda_root, &stubs)?;
    let mut build = cargo(cuda_root)?;
    build.env(STUBS_ENV, &stubs).args(["build", "--release", "--message-format", "json-render-diagnostics"]);
    let json = shell::output(build)?;
    crate::bundle::executables(&json)
        .into_iter()
        .find(|(name, _)| name == "candle-decoder")
        .map(|(_, exe)| exe)
        .ok_or_else(|| "cargo built no `candle-decoder` executable".to_string())
}

/// `cargo xtask candle`: builds the release binary and adds it, stripped and xz-compressed (47 MB
/// of mostly candle's CUDA binaries become about 9 MB), to `gpu-bundle/` with `run.sh`, beside
/// whatever `cargo xtask gpu-bundle` put there.
pub fn build() -> Result<(), String> {
    let root = crate::cuda::find().map_or_else(crate::cuda::setup, Ok)?;
    let exe = build_release(&root)?;
    let dir = crate::bundle::bundle_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let stripped = target_dir()?.join("candle-decoder.stripped");
    crate::bundle::copy_stripped(&exe, &stripped)?;
    let packed = dir.join("candle-decoder.xz");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let mut xz = Command::new(python);
    xz.args([
        "-c",
        "import lzma, shutil, sys; shutil.copyfileobj(open(sys.argv[1], 'rb'), lzma.open(sys.argv[2], 'wb'))",
    ])
    .arg(&stripped)
    .arg(&packed);
    shell::run(xz)?;
    let run_sh = dir.join("run.sh");
    std::fs::write(&run_sh, crate::bundle::RUN_SH).map_err(|e| format!("write run.sh: {e}"))?;
    crate::bundle::set_executable(&run_sh)?;
    let total = crate::bundle::dir_size(&dir)?;
    let limit = crate::bundle::MAX_TOTAL_BYTES;
    if total > limit {
        return Err(format!(
            "gpu-bundle/ is {total} bytes with the candle example, over the {limit}-byte limit: build the candle \
             example alone (`rm -r gpu-bundle && cargo xtask candle`) and run it in a call of its own"
        ));
    }
    let size = std::fs::metadata(&packed).map(|m| m.len()).unwrap_or(0);
    println!("\nadded {} ({size} bytes); gpu-bundle/ holds {total} bytes", packed.display());
    println!("On a machine with an NVIDIA GPU and torch's CUDA 13 libraries (python3 -c 'import nvidia'), run:\n");
    println!("    gpu-bundle/run.sh candle\n");
    Ok(())
}

/// The source folder of the cudarc the example resolves to (from `cargo metadata`).
fn cudarc_dir(cuda_root: &Path) -> Result<PathBuf, String> {
    let mut meta = cargo(cuda_root)?;
    meta.args(["metadata", "--format-version", "1"]);
    let json = shell::output(meta)?;
    let key = "\"manifest_path\":\"";
    json.match_indices(key)
        .filter_map(|(at, _)| {
            let start = at + key.len();
            let end = json[start..].find('"')? + start;
            Some(PathBuf::from(&json[start..end]))
        })
        .find(|p| p.parent().and_then(|d| d.file_name()).is_some_and(|n| n.to_string_lossy().starts_with("cudarc-")))
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .ok_or_else(|| "cargo metadata lists no cudarc package for the candle example".into())
}

/// Every function cudarc's bindings in `sys_file` declare (`pub unsafe fn NAME(`) with one of
/// the library prefixes, sorted and without repeats (some are declared per CUDA version).
pub fn declared_functions(sys_file: &str) -> Vec<String> {
    let names: BTreeSet<String> = sys_file
        .lines()
        .filter_map(|l| l.strip_prefix("pub unsafe fn "))
        .filter_map(|rest| rest.split('(').next())
        .filter(|name| PREFIXES.iter().any(|p| name.starts_with(p)))
        .filter(|name| name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(str::to_string)
        .collect();
    names.into_iter().collect()
}

/// The C source of a stub: one empty definition per function. Never called: the binary that
/// links against it loads the real library, found by soname, at run time.
pub fn stub_source(functions: &[String]) -> String {
    let mut src = String::from("/* Link-time stub generated by `cargo xtask`; never loaded. */\n");
    for f in functions {
        src.push_str(&format!("void {f}(void) {{}}\n"));
    }
    src
}

/// Writes and compiles one stub library per entry of [`LIBRARIES`] into `dir`.
fn write_stubs(cudarc: &Path, dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    for (lib, soname, module) in LIBRARIES {
        let bindings = cudarc.join("src").join(module).join("sys/mod.rs");
        let text = std::fs::read_to_string(&bindings).map_err(|e| format!("read {}: {e}", bindings.display()))?;
        let functions = declared_functions(&text);
        if functions.is_empty() {
            return Err(format!("no functions found in {}", bindings.display()));
        }
        let source = dir.join(format!("{lib}.c"));
        std::fs::write(&source, stub_source(&functions)).map_err(|e| format!("write {}: {e}", source.display()))?;
        let mut cc = Command::new(&compiler);
        cc.args(["-shared", "-fPIC", "-o"])
            .arg(dir.join(format!("lib{lib}.so")))
            .arg(format!("-Wl,-soname,{soname}"))
            .arg(&source);
        shell::run(cc)?;
        println!("stub lib{lib}.so ({soname}): {} functions", functions.len());
    }
    Ok(())
}

/// Puts the toolkit's CUDA runtime (`lib/libcudart.so.<major>`) in `dir` as `libcudart.so`.
fn link_runtime(cuda_root: &Path, dir: &Path) -> Result<(), String> {
    let lib = cuda_root.join("lib");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&lib)
        .map_err(|e| format!("read {}: {e}", lib.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libcudart.so.")))
        .collect();
    found.sort();
    let runtime = found.pop().ok_or_else(|| format!("no libcudart.so.* in {}", lib.display()))?;
    let to = dir.join("libcudart.so");
    if to.exists() || to.symlink_metadata().is_ok() {
        std::fs::remove_file(&to).map_err(|e| format!("remove {}: {e}", to.display()))?;
    }
    std::fs::copy(&runtime, &to).map_err(|e| format!("copy {} -> {}: {e}", runtime.display(), to.display()))?;
    println!("CUDA runtime for the link: {}", runtime.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_functions_keeps_library_functions_once() {
        let text = [
            "pub unsafe fn cuInit(flags: u32) -> CUresult {",
            "pub unsafe fn is_culib_present() -> bool {",
            "pub unsafe fn cublasCreate_v2(h: *mut H) -> S {",
            "pub unsafe fn cuInit(flags: u32) -> CUresult {",
            "pub fn cuNotUnsafe() {",
            "    pub unsafe fn cuIndented() {",
        ]
        .join("\n");
        let text = text.as_str();
        assert_eq!(declared_functions(text), ["cuInit", "cublasCreate_v2"]);
    }

    #[test]
    fn stub_source_defines_each_function() {
        let src = stub_source(&["cuInit".into(), "nvrtcVersion".into()]);
        assert!(src.contains("void cuInit(void) {}\n"));
        assert!(src.contains("void nvrtcVersion(void) {}\n"));
        assert_eq!(src.matches("void ").count(), 2);
    }

    #[test]
    fn every_library_has_a_soname_and_a_prefix() {
        for (lib, soname, _) in LIBRARIES {
            assert!(soname.starts_with(&format!("lib{lib}.so.")), "{lib}: {soname}");
            assert!(PREFIXES.iter().any(|p| lib.starts_with(p)), "{lib}");
        }
    }
}
