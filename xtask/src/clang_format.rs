//! `cargo xtask clang-format [--check]`: the CUDA sources of `attention-kernels/csrc` in the style
//! `attention-kernels/.clang-format` sets, as `cargo fmt` keeps the Rust.
//!
//! clang-format's output changes between releases, so a check is only meaningful with one pinned
//! version everywhere: the PyPI wheel below, installed into a virtual environment in the user cache
//! beside the pinned CUDA compiler, unless `CLANG_FORMAT` names a binary (used as it is).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{cuda, shell};

/// The pinned release: the `clang-format` wheel on PyPI, which packages LLVM's binary alone.
const WHEEL: &str = "clang-format==19.1.7";
const VENV_DIR: &str = "clang-format-19.1.7";
/// The folder whose `.cu` and `.cuh` files are formatted.
const SOURCES: &str = "attention-kernels/csrc";

/// Formats the CUDA sources in place, or with `check` only reports (and fails on) any difference.
pub fn run(check: bool) -> Result<(), String> {
    format_with(&clang_format()?, check)
}

/// The check within `cargo xtask test`: a clang-format that can be neither found nor installed
/// (offline, no python3) gets a loud banner instead of a failure, as the SASS check does; a source
/// that is not formatted fails.
pub fn check_in_tests() -> Result<(), String> {
    match clang_format() {
        Ok(bin) => format_with(&bin, true),
        Err(e) => {
            shell::banner(&["CUDA FORMAT CHECK NOT RUN (see xtask/src/clang_format.rs): no clang-format", &e]);
            Ok(())
        }
    }
}

fn format_with(bin: &Path, check: bool) -> Result<(), String> {
    let root = shell::workspace_root();
    let files = sources(&root.join(SOURCES))?;
    let mut cmd = Command::new(bin);
    cmd.current_dir(&root).arg("--style=file");
    if check {
        cmd.args(["--dry-run", "--Werror"]);
    } else {
        cmd.arg("-i");
    }
    for f in &files {
        cmd.arg(f.strip_prefix(&root).unwrap_or(f));
    }
    shell::run(cmd).map_err(|e| if check { format!("{e}: run `cargo xtask clang-format`") } else { e })
}

/// Every `.cu` and `.cuh` file under `dir`, sorted (so the command line is the same everywhere).
fn sources(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| format!("cannot list {}: {e}", d.display()))?;
        for entry in entries {
            let path = entry.map_err(|e| format!("cannot list {}: {e}", d.display()))?.path();
            if path.is_dir() {
                stack.push(path);
            } else if matches!(path.extension().and_then(|x| x.to_str()), Some("cu" | "cuh")) {
                out.push(path);
            }
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(format!("no .cu or .cuh file under {}", dir.display()));
    }
    Ok(out)
}

/// `CLANG_FORMAT` if set, else the pinned wheel's binary (installed now if missing).
fn clang_format() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("CLANG_FORMAT") {
        return Ok(PathBuf::from(bin));
    }
    let venv = cuda::cache_dir()?.join(VENV_DIR);
    let bin = venv.join("bin/clang-format");
    if bin.is_file() {
        return Ok(bin);
    }
    println!("installing {WHEEL} into {}", venv.display());
    cuda::pip_install(&venv, &[WHEEL])?;
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("{WHEEL} installed but {} is missing", bin.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_lists_cuda_files_sorted_and_refuses_an_empty_folder() {
        let dir = std::env::temp_dir().join(format!("xtask-clang-format-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        assert!(sources(&dir).unwrap_err().contains("no .cu or .cuh file"));
        for f in ["b.cu", "a.cuh", "sub/c.cu", "notes.md", "sub/d.h"] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        let got: Vec<_> = sources(&dir).unwrap().iter().map(|p| p.strip_prefix(&dir).unwrap().to_path_buf()).collect();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(got, [PathBuf::from("a.cuh"), PathBuf::from("b.cu"), PathBuf::from("sub/c.cu")]);
    }
}
