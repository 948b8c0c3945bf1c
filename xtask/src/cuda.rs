//! The pinned CUDA compiler: where it lives and how to install it.
//!
//! NVIDIA publishes nvcc on PyPI. The five wheels below are pinned together (unpinned, pip mixes
//! newer headers with an older nvcc) and installed into a virtual environment in the user's cache,
//! outside any clean checkout, so every machine and CI get the same compiler.
//! `attention-kernels/build.rs` looks in the same place.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::shell;

/// The wheels, pinned together (CUDA 13.0).
const PINNED_WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-cccl==13.0.85",
];

/// Folder of the virtual environment inside the cache (build.rs uses the same name).
const VENV_DIR: &str = "cuda-13.0";

/// `$PAGED_ATTN_CACHE_DIR`, else `$XDG_CACHE_HOME/paged-attn`, else `~/.cache/paged-attn`.
pub fn cache_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("PAGED_ATTN_CACHE_DIR") {
        return Ok(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .ok_or("neither PAGED_ATTN_CACHE_DIR, XDG_CACHE_HOME nor HOME is set")?;
    Ok(base.join("paged-attn"))
}

fn venv() -> Result<PathBuf, String> {
    Ok(cache_dir()?.join(VENV_DIR))
}

fn stamp() -> String {
    PINNED_WHEELS.join("\n") + "\n"
}

/// The CUDA root of the installed pinned toolkit, if installed completely.
fn installed_root() -> Option<PathBuf> {
    let venv = venv().ok()?;
    if std::fs::read_to_string(venv.join("pinned.txt")).ok()? != stamp() {
        return None;
    }
    cu13_with(&venv, &["bin/nvcc"])
}

/// `nvidia/cu13` in the site-packages of the virtual environment `venv`, if it holds every one of
/// `files` (NVIDIA's CUDA 13 wheels all install there).
pub fn cu13_with(venv: &Path, files: &[&str]) -> Option<PathBuf> {
    let mut pythons: Vec<PathBuf> = std::fs::read_dir(venv.join("lib")).ok()?.flatten().map(|e| e.path()).collect();
    pythons.sort();
    pythons.into_iter().map(|p| p.join("site-packages/nvidia/cu13")).find(|r| files.iter().all(|f| r.join(f).is_file()))
}

/// Installs `wheels` into the virtual environment `venv`, creating it first if needed.
pub fn pip_install(venv: &Path, wheels: &[&str]) -> Result<(), String> {
    if !venv.join("bin/pip").is_file() {
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let mut make_venv = Command::new(&python);
        make_venv.args(["-m", "venv"]).arg(venv);
        shell::run(make_venv)?;
    }
    let mut pip = Command::new(venv.join("bin/pip"));
    pip.args(["install", "--quiet", "--disable-pip-version-check"]).args(wheels);
    shell::run(pip)
}

/// A CUDA root that already has nvcc: `NVCC`, `CUDA_HOME`/`CUDA_PATH`/`CUDA_ROOT`, the pinned
/// install, `nvcc` on `PATH`, `/usr/local/cuda` (the order build.rs uses).
pub fn find() -> Option<PathBuf> {
    if let Some(nvcc) = std::env::var_os("NVCC").map(PathBuf::from).filter(|p| p.is_file()) {
        return nvcc.parent()?.parent().map(PathBuf::from);
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(root) = std::env::var_os(var).map(PathBuf::from).filter(|r| r.join("bin/nvcc").is_file()) {
            return Some(root);
        }
    }
    if let Some(root) = installed_root() {
        return Some(root);
    }
    let path = std::env::var_os("PATH")?;
    if let Some(dir) = std::env::split_paths(&path).find(|d| d.join("nvcc").is_file()) {
        return dir.parent().map(PathBuf::from);
    }
    Some(PathBuf::from("/usr/local/cuda")).filter(|r| r.join("bin/nvcc").is_file())
}

/// Installs the pinned toolkit if it is not there yet and returns its CUDA root.
pub fn setup() -> Result<PathBuf, String> {
    if let Some(root) = installed_root() {
        println!("pinned CUDA compiler already installed: {}", root.join("bin/nvcc").display());
        return Ok(root);
    }
    let venv = venv()?;
    std::fs::create_dir_all(cache_dir()?).map_err(|e| format!("cannot create the cache folder: {e}"))?;
    println!("installing the pinned CUDA compiler into {}", venv.display());
    pip_install(&venv, PINNED_WHEELS)?;
    std::fs::write(venv.join("pinned.txt"), stamp()).map_err(|e| format!("cannot write the stamp: {e}"))?;
    let root = installed_root().ok_or("the wheels installed but no nvcc was found in them")?;
    println!("installed: {}", root.join("bin/nvcc").display());
    Ok(root)
}
