//! `cargo xtask sass`: checks two properties of the warp-specialised prefill's machine code that
//! ptxas decides and no test can see, since the results are the same bits either way and only the
//! speed differs:
//!
//! - **The softmax overlaps the PV product.** Each consumer warpgroup issues P(n-1) V(n-1), then
//!   runs the softmax of tile n, then waits for the product. ptxas (CUDA 13.0) hoisted that wait
//!   above the exponentials unless a shared store of the row sums pins it (see the steady-state
//!   loop in `paged_prefill_sm90ws.cu`). Checked: some `WARPGROUP.DEPBAR.LE gsb0, 0x0` has at
//!   least a tile's worth of `MUFU.EX2` (64 per thread) straight before it, in the same basic block.
//! - **The wgmma descriptors are uniform.** Between the consumer's turn (`BAR.SYNC`) and its
//!   hand-over (`BAR.ARV`), around a tile's wgmmas, there is no `R2UR` (a descriptor computed per
//!   thread and moved into a uniform register: 48 per tile when the consumer index was not known
//!   to be warp-uniform).
//!
//! The library checked is the one the workspace's tests link: cargo names the build-script output
//! folder of that build (already built within `cargo xtask test`), and cuobjdump disassembles the
//! kernel's static library there. cuobjdump comes from the toolkit or from NVIDIA's wheel on PyPI
//! (pinned below; its 13.2 release is the first there and reads CUDA 13.0 code). Why not a separate compile of the source, as the first
//! form did: that repeated build.rs's flags by hand (checking code the library might not ship)
//! and cost an nvcc run of about a minute on two cores.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{cuda, shell};

/// cuobjdump's wheel and that of nvdisasm, which it runs (not in the compiler's pinned set, whose
/// stamp stays as it is).
const CUOBJDUMP_WHEELS: &[&str] = &["nvidia-cuda-cuobjdump==13.2.51", "nvidia-cuda-nvdisasm==13.2.51"];
/// Folder of its virtual environment inside the cache.
const CUOBJDUMP_VENV: &str = "cuobjdump-13.2.51";
/// The static library under test, in attention-kernels' build-script output folder.
const LIBRARY: &str = "libattention_kernels_paged_prefill_sm90ws.a";
/// Exponentials a consumer thread computes per key tile (BN / 2 with BN = 128).
const EXP_PER_TILE: usize = 64;
/// A turn holds at least a head-64 tile's wgmmas (4 for S, 8 for PV).
const MIN_WGMMA_PER_TURN: usize = 12;

/// Builds the workspace's CUDA tests with `cuda_root`'s nvcc (if they are not built yet) and checks
/// the SASS of the warp-specialised prefill they link.
pub fn check(cuda_root: &Path) -> Result<(), String> {
    check_with(cuda_root, &cuobjdump(cuda_root)?)
}

/// [`check`] within `cargo xtask test`: a cuobjdump that cannot be found or installed (offline,
/// say) leaves the check reported NOT RUN, as the GPU tests are without a GPU; a failed check
/// fails the run.
pub fn check_in_tests(cuda_root: &Path) -> Result<(), String> {
    match cuobjdump(cuda_root) {
        Ok(tool) => check_with(cuda_root, &tool),
        Err(e) => {
            shell::banner(&["SASS CHECK NOT RUN (see xtask/src/sass.rs): no cuobjdump", &e]);
            Ok(())
        }
    }
}

fn check_with(cuda_root: &Path, cuobjdump: &Path) -> Result<(), String> {
    let library = shipped_library(cuda_root)?;
    let mut dump = Command::new(cuobjdump);
    dump.arg("-sass").arg(&library);
    if let Some(bin) = cuobjdump.parent() {
        dump.env("NVDISASM_PATH", bin);
    }
    let sass = shell::output(dump)?;
    println!("SASS of {}:", library.display());
    let report = check_sass(&sass)?;
    for line in &report {
        println!("{line}");
    }
    Ok(())
}

/// The warp-specialised prefill's library as the workspace's tests link it: the build step of
/// `cargo xtask test` (fresh there, so nothing is rebuilt; standalone, it builds those tests), whose
/// build-script output folder for attention-kernels cargo names in its JSON messages. (A build of
/// attention-kernels alone unifies other features and gets a folder of its own, whose kernels a
/// run without the kernel cache would compile again.)
fn shipped_library(cuda_root: &Path) -> Result<PathBuf, String> {
    let mut build = shell::cargo();
    build.env("NVCC", cuda_root.join("bin/nvcc"));
    build.args(["test", "--workspace", "--exclude", "test-suite", "--features", crate::test::CUDA_FEATURES]);
    build.args(["--no-run", "--message-format", "json-render-diagnostics"]);
    let json = shell::output(build)?;
    let out_dir = crate::bundle::build_script_out_dir(&json, "attention-kernels")
        .ok_or("cargo named no build-script output folder for attention-kernels")?;
    let library = out_dir.join(LIBRARY);
    if library.is_file() {
        Ok(library)
    } else {
        Err(format!("attention-kernels' build left no {LIBRARY} in {}", out_dir.display()))
    }
}

/// A cuobjdump that reads sm_90a cubins: the toolkit's own, else the pinned wheel (installed now
/// if missing).
fn cuobjdump(cuda_root: &Path) -> Result<PathBuf, String> {
    let own = cuda_root.join("bin/cuobjdump");
    if own.is_file() && cuda_root.join("bin/nvdisasm").is_file() {
        return Ok(own);
    }
    let venv = cuda::cache_dir()?.join(CUOBJDUMP_VENV);
    let find = || cuda::cu13_with(&venv, &["bin/cuobjdump", "bin/nvdisasm"]).map(|r| r.join("bin/cuobjdump"));
    if let Some(found) = find() {
        return Ok(found);
    }
    println!("installing {} into {}", CUOBJDUMP_WHEELS.join(" "), venv.display());
    cuda::pip_install(&venv, CUOBJDUMP_WHEELS)?;
    find().ok_or_else(|| "the wheels installed but no cuobjdump and nvdisasm were found in them".to_string())
}

/// One function's instructions (opcode and operands, without address or encoding).
struct Function {
    name: String,
    code: Vec<String>,
}

fn functions(sass: &str) -> Vec<Function> {
    let mut out: Vec<Function> = Vec::new();
    for line in sass.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("Function : ") {
            out.push(Function { name: name.trim().to_string(), code: Vec::new() });
            continue;
        }
        // `/*0470*/   STL [R1+0x4], R2 ;   /* 0x... */`
        let Some(rest) = t.strip_prefix("/*") else { continue };
        let Some((addr, ins)) = rest.split_once("*/") else { continue };
        if addr.is_empty() || !addr.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        let ins = ins.split(';').next().unwrap_or("").trim();
        if let (Some(f), false) = (out.last_mut(), ins.is_empty()) {
            f.code.push(ins.to_string());
        }
    }
    out
}

fn opcode(ins: &str) -> &str {
    let mut words = ins.split_whitespace();
    let first = words.next().unwrap_or("");
    // A predicated instruction: `@!P1 BRA 0x...`.
    if first.starts_with('@') {
        words.next().unwrap_or("")
    } else {
        first
    }
}

/// The largest run of exponentials straight before a full wgmma wait, in one basic block.
fn exps_before_full_wait(code: &[String]) -> usize {
    let mut best = 0;
    for (i, ins) in code.iter().enumerate() {
        if !ins.starts_with("WARPGROUP.DEPBAR.LE gsb0, 0x0") {
            continue;
        }
        let mut exps = 0;
        for prev in code[..i].iter().rev() {
            let op = opcode(prev);
            if op.starts_with("HGMMA") || op.starts_with("WARPGROUP") || op.starts_with("BRA") || op.starts_with("BAR.")
            {
                break;
            }
            if op == "MUFU.EX2" {
                exps += 1;
            }
        }
        best = best.max(exps);
    }
    best
}

/// The most R2UR moves in one consumer turn (a `BAR.SYNC` .. `BAR.ARV` span holding a tile's
/// wgmmas), and how many such turns there are.
fn r2ur_per_turn(code: &[String]) -> (usize, usize) {
    let (mut worst, mut turns) = (0, 0);
    for (i, ins) in code.iter().enumerate() {
        if !opcode(ins).starts_with("BAR.SYNC") {
            continue;
        }
        let (mut moves, mut wgmmas) = (0, 0);
        for next in &code[i + 1..] {
            let op = opcode(next);
            if op.starts_with("BAR.ARV") || op.starts_with("BAR.SYNC") {
                break;
            }
            if op.starts_with("R2UR") {
                moves += 1;
            }
            if op.starts_with("HGMMA") {
                wgmmas += 1;
            }
        }
        if wgmmas >= MIN_WGMMA_PER_TURN {
            turns += 1;
            worst = worst.max(moves);
        }
    }
    (worst, turns)
}

/// Checks every instantiation of the warp-specialised kernel in `sass`; a line per instantiation.
fn check_sass(sass: &str) -> Result<Vec<String>, String> {
    let kernels: Vec<Function> =
        functions(sass).into_iter().filter(|f| f.name.contains("prefill_sm90ws_kernel")).collect();
    if kernels.is_empty() {
        return Err("no prefill_sm90ws_kernel instantiation in the SASS".into());
    }
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for k in &kernels {
        let exps = exps_before_full_wait(&k.code);
        let (moves, turns) = r2ur_per_turn(&k.code);
        let line = format!(
            "{}: {exps} exponentials before the PV wait (>= {EXP_PER_TILE}), {moves} R2UR in a turn (0), {turns} turns with a tile's wgmmas",
            k.name
        );
        if exps < EXP_PER_TILE || moves > 0 || turns == 0 {
            failures.push(line.clone());
        }
        report.push(line);
    }
    if failures.is_empty() {
        Ok(report)
    } else {
        Err(format!(
            "the warp-specialised prefill's SASS lost a property (see xtask/src/sass.rs):\n{}",
            failures.join("\n")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sass(body: &str) -> String {
        let mut s = String::from("\tcode for sm_90a\n\t\tFunction : _Z21prefill_sm90ws_kernelILi128EEv\n");
        for (i, ins) in body.lines().map(str::trim).filter(|l| !l.is_empty()).enumerate() {
            s.push_str(&format!("        /*{:04x}*/                   {ins} ;   /* 0x000 */\n", i * 16));
        }
        s
    }

    fn turn(r2ur: usize) -> String {
        let mut s = String::from("BAR.SYNC.DEFER_BLOCKING R13, 0x100\n");
        for _ in 0..r2ur {
            s.push_str("R2UR UR4, R2\n");
        }
        for _ in 0..16 {
            s.push_str("HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24\n");
        }
        s.push_str("BAR.ARV R15, 0x100\nWARPGROUP.DEPBAR.LE gsb0, 0x1\n");
        s
    }

    fn exps(n: usize) -> String {
        "MUFU.EX2 R88, R88\nFADD R3, R88, R89\n".repeat(n)
    }

    #[test]
    fn pinned_wait_and_uniform_descriptors_pass() {
        let body = turn(0)
            + "SHFL.BFLY PT, R3, R18, 0x1, 0x1f\n"
            + &exps(66)
            + "STS [R2], R16\nWARPGROUP.DEPBAR.LE gsb0, 0x0\n";
        let report = check_sass(&sass(&body)).unwrap();
        assert!(report[0].contains("66 exponentials"), "{report:?}");
    }

    #[test]
    fn hoisted_wait_fails() {
        // The old code: the wait straight after the first row maximum, the exponentials after it.
        let body = turn(0) + "SHFL.BFLY PT, R3, R18, 0x1, 0x1f\nWARPGROUP.DEPBAR.LE gsb0, 0x0\n" + &exps(66);
        let err = check_sass(&sass(&body)).unwrap_err();
        assert!(err.contains("0 exponentials"), "{err}");
    }

    #[test]
    fn exponentials_of_another_block_do_not_count() {
        // The soft-cap path's exponentials end in a branch to the shared path, which waits first.
        let body = turn(0) + &exps(64) + "BRA 0x2000\nWARPGROUP.DEPBAR.LE gsb0, 0x0\n" + &exps(66);
        assert!(check_sass(&sass(&body)).is_err());
    }

    #[test]
    fn per_thread_descriptors_fail() {
        let body = turn(48) + &exps(66) + "STS [R2], R16\nWARPGROUP.DEPBAR.LE gsb0, 0x0\n";
        let err = check_sass(&sass(&body)).unwrap_err();
        assert!(err.contains("48 R2UR"), "{err}");
    }

    #[test]
    fn no_kernel_is_an_error() {
        assert!(check_sass("\t\tFunction : _Z5otherv\n").is_err());
    }

    #[test]
    fn predicated_opcodes_are_read() {
        assert_eq!(opcode("@!P1 BRA 0x5500"), "BRA");
        assert_eq!(opcode("MUFU.EX2 R1, R2"), "MUFU.EX2");
    }
}
