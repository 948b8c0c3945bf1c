//! Running commands, loudly.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

/// The cargo that runs xtask, so nested builds use the same toolchain.
///
/// Its builds share one kernel cache (attention-kernels' `PAGED_ATTN_KERNEL_CACHE`, in xtask's
/// cache folder), so the kernels compile once across the profiles, feature sets and target folders
/// of `cargo xtask test` instead of once per build; a value already set (empty: no cache) wins.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    if std::env::var_os(KERNEL_CACHE_ENV).is_none() {
        if let Ok(dir) = crate::cuda::cache_dir() {
            cmd.env(KERNEL_CACHE_ENV, dir.join("kernels"));
        }
    }
    cmd
}

/// attention-kernels' build-time cache of compiled kernel libraries (see its README).
const KERNEL_CACHE_ENV: &str = "PAGED_ATTN_KERNEL_CACHE";

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Prints and runs `cmd`, failing on a non-zero exit.
pub fn run(mut cmd: Command) -> Result<(), String> {
    let line = describe(&cmd);
    println!("\n$ {line}");
    let status = cmd.status().map_err(|e| format!("could not start `{line}`: {e}"))?;
    if !status.success() {
        return Err(format!("`{line}` failed ({status})"));
    }
    Ok(())
}

/// Prints and runs `cmd`, returning its standard output.
pub fn output(mut cmd: Command) -> Result<String, String> {
    let line = describe(&cmd);
    println!("\n$ {line}");
    let out =
        cmd.stderr(std::process::Stdio::inherit()).output().map_err(|e| format!("could not start `{line}`: {e}"))?;
    if !out.status.success() {
        return Err(format!("`{line}` failed ({})", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Prints a banner that cannot be missed in a CI log.
pub fn banner(lines: &[&str]) {
    let width = lines.iter().map(|l| l.len()).max().unwrap_or(0) + 4;
    println!("\n{}", "#".repeat(width));
    for l in lines {
        println!("# {l:<w$} #", w = width - 4);
    }
    println!("{}\n", "#".repeat(width));
}
