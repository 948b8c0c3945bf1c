//! `cargo xtask package`: the published crates, checked the way a user would meet them.
//!
//! 1. `cargo package` for attention-kernels, attention-backend and model-runner together (cargo
//!    verifies each tarball by building it alone, against the other two packaged beside it);
//! 2. the packaged attention-kernels built again with `cuda` from its unpacked tarball, proving the
//!    `.cu` sources ship and build.rs needs nothing outside the crate;
//! 3. `cargo publish --dry-run` for the three;
//! 4. the outside consumer (`examples/consumer`, not a workspace member, own lockfile) built and
//!    run against the packaged crates through `[patch.crates-io]`;
//! 5. `cargo doc --no-deps` with warnings denied and no CUDA feature, as docs.rs would build it.

use std::path::PathBuf;

use crate::shell;

const CRATES: &[&str] = &["attention-kernels", "attention-backend", "model-runner"];

/// The workspace's target folder as cargo resolves it (`CARGO_TARGET_DIR`, `.cargo/config`, ...).
pub(crate) fn target_dir() -> Result<PathBuf, String> {
    let mut cmd = shell::cargo();
    cmd.args(["metadata", "--format-version", "1", "--no-deps"]);
    let json = shell::output(cmd)?;
    let key = "\"target_directory\":\"";
    let start = json.find(key).ok_or("cargo metadata printed no target_directory")? + key.len();
    let end = json[start..].find('"').ok_or("malformed cargo metadata")? + start;
    Ok(PathBuf::from(&json[start..end]))
}

fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Runs the checks; `nvcc` is the CUDA compiler to build the packaged kernels with, if any.
pub fn run(nvcc: Option<PathBuf>) -> Result<(), String> {
    let package_dir = target_dir()?.join("package");
    let selected: Vec<&str> = CRATES.iter().flat_map(|c| ["-p", c]).collect();

    let mut package = shell::cargo();
    package.args(["package", "--allow-dirty"]).args(&selected);
    shell::run(package)?;

    let mut list = shell::cargo();
    list.args(["package", "--list", "--allow-dirty", "-p", "attention-kernels"]);
    let files = shell::output(list)?;
    print!("{files}");
    let cu: Vec<&str> = files.lines().filter(|f| f.ends_with(".cu") || f.ends_with(".cuh")).collect();
    if !cu.iter().any(|f| f.ends_with("cache_write.cu")) {
        return Err("the attention-kernels package does not ship csrc/cache_write.cu".into());
    }
    println!("attention-kernels ships {} CUDA sources", cu.len());

    let kernels = package_dir.join(format!("attention-kernels-{}", version()));
    match &nvcc {
        Some(nvcc) => {
            let mut build = shell::cargo();
            build
                .env("NVCC", nvcc)
                // Built alone, as a user's binary would build it: the binary names cudarc's CUDA
                // version (the library leaves it open).
                .args(["build", "--features", "cuda,cudarc/cuda-13000", "--manifest-path"])
                .arg(kernels.join("Cargo.toml"))
                .arg("--target-dir")
                .arg(package_dir.join("cuda-check"));
            shell::run(build)?;
        }
        None => shell::banner(&["packaged attention-kernels NOT built with `cuda`: no nvcc"]),
    }

    let mut publish = shell::cargo();
    publish.args(["publish", "--dry-run", "--no-verify", "--allow-dirty"]).args(&selected);
    shell::run(publish)?;

    let consumer = shell::workspace_root().join("examples/consumer");
    let mut run = shell::cargo();
    run.current_dir(&consumer).args(["run", "--quiet"]);
    for name in CRATES {
        let path = package_dir.join(format!("{name}-{}", version()));
        run.arg("--config").arg(format!("patch.crates-io.{name}.path={:?}", path.display().to_string()));
    }
    run.arg("--target-dir").arg(package_dir.join("consumer"));
    run.env("PAGED_ATTN_DEVICE", "cpu");
    shell::run(run)?;

    let mut doc = shell::cargo();
    doc.env("RUSTDOCFLAGS", "-D warnings").args(["doc", "--no-deps"]).args(&selected);
    doc.env_remove("NVCC");
    shell::run(doc)?;

    // As docs.rs builds it: the CUDA API documented, no toolkit (build.rs skips nvcc under DOCS_RS).
    let mut docs_rs = shell::cargo();
    docs_rs
        .env("RUSTDOCFLAGS", "-D warnings")
        .env("DOCS_RS", "1")
        .args(["doc", "--no-deps", "-p", "attention-kernels", "-p", "attention-backend"])
        .args(["--features", "attention-kernels/cuda,attention-backend/cuda,cudarc/cuda-13000"])
        .arg("--target-dir")
        .arg(package_dir.join("docs-rs"));
    docs_rs.env_remove("NVCC");
    shell::run(docs_rs)
}

/// The CUDA compiler xtask would use, without installing one.
pub fn nvcc() -> Option<PathBuf> {
    crate::cuda::find().map(|root| root.join("bin/nvcc"))
}
