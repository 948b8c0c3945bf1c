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

use std::path::{Path, PathBuf};

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
    let target = target_dir()?;
    // Packaged and verified in a folder of its own, emptied first: cargo builds the crates it
    // verifies against from its temporary registry, and treats a registry crate it built before
    // (same name, version and registry path) as current whatever its sources now hold.
    let verify_dir = target.join("package-verify");
    if verify_dir.exists() {
        std::fs::remove_dir_all(&verify_dir).map_err(|e| format!("cannot empty {}: {e}", verify_dir.display()))?;
    }
    for stale in purge_local_extractions(&cargo_home()?.join("registry/src"), version())? {
        println!("removed {} (an earlier run's unpacked copy)", stale.display());
    }
    let package_dir = verify_dir.join("package");
    let builds = target.join("package-builds");
    let selected: Vec<&str> = CRATES.iter().flat_map(|c| ["-p", c]).collect();

    let mut package = shell::cargo();
    package.args(["package", "--allow-dirty"]).args(&selected).arg("--target-dir").arg(&verify_dir);
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
                .arg(builds.join("cuda-check"));
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
    run.arg("--target-dir").arg(builds.join("consumer"));
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
        .arg(builds.join("docs-rs"));
    docs_rs.env_remove("NVCC");
    shell::run(docs_rs)
}

/// Cargo's home folder: `CARGO_HOME`, else `.cargo` in the user's home.
fn cargo_home() -> Result<PathBuf, String> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cargo"))
        .ok_or_else(|| "neither CARGO_HOME nor HOME is set".into())
}

/// Removes the unpacked copies of our crates at `version` from cargo's host-less registries
/// (folders named `-<hash>` under `registry/src`), returning what it removed.
///
/// Why: to verify several crates together, `cargo package` publishes them to a temporary registry
/// inside the target folder and builds each against the others from there. Cargo unpacks those
/// crates under `registry/src/-<hash of the registry's path>/` and, if a folder of that name and
/// version is already there, uses it without looking at the new tarball. A checkout at the same
/// path as an earlier run (a CI runner keeping its cargo home) therefore verified the crates against
/// the earlier run's sources: a new function one crate gained and another used failed to resolve.
/// Cargo unpacks again whatever is missing, so removing these folders only costs the unpacking.
fn purge_local_extractions(registry_src: &Path, version: &str) -> Result<Vec<PathBuf>, String> {
    let registries = match std::fs::read_dir(registry_src) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", registry_src.display())),
    };
    let mut removed = Vec::new();
    for registry in registries {
        let registry = registry.map_err(|e| format!("cannot read {}: {e}", registry_src.display()))?;
        if !registry.file_name().to_string_lossy().starts_with('-') {
            continue;
        }
        for name in CRATES {
            let unpacked = registry.path().join(format!("{name}-{version}"));
            if unpacked.is_dir() {
                std::fs::remove_dir_all(&unpacked).map_err(|e| format!("cannot remove {}: {e}", unpacked.display()))?;
                removed.push(unpacked);
            }
        }
    }
    removed.sort();
    Ok(removed)
}

/// The CUDA compiler xtask would use, without installing one.
pub fn nvcc() -> Option<PathBuf> {
    crate::cuda::find().map(|root| root.join("bin/nvcc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_removes_our_crates_from_local_registries_only() {
        let root = std::env::temp_dir().join(format!("xtask-purge-{}", std::process::id()));
        let src = root.join("registry/src");
        let keep = [
            src.join("index.crates.io-1949cf8c6b5b557f/attention-kernels-0.1.0"),
            src.join("-0505de1609ef940e/attention-kernels-0.2.0"),
            src.join("-0505de1609ef940e/half-2.7.1"),
        ];
        let gone =
            [src.join("-0505de1609ef940e/attention-kernels-0.1.0"), src.join("-22c3805da5a543b4/model-runner-0.1.0")];
        for dir in keep.iter().chain(&gone) {
            std::fs::create_dir_all(dir.join("src")).unwrap();
            std::fs::write(dir.join(".cargo-ok"), "{\"v\":1}").unwrap();
        }

        let removed = purge_local_extractions(&src, "0.1.0").unwrap();
        let kept: Vec<bool> = keep.iter().map(|d| d.is_dir()).collect();
        let left: Vec<bool> = gone.iter().map(|d| d.exists()).collect();
        std::fs::remove_dir_all(&root).unwrap();

        assert_eq!(removed, gone.to_vec());
        assert_eq!(kept, [true; 3]);
        assert_eq!(left, [false; 2]);
        assert_eq!(purge_local_extractions(&root.join("absent"), "0.1.0").unwrap(), Vec::<PathBuf>::new());
    }
}
