//! Compiles the CUDA sources under `csrc/` into static libraries (one per file) when the `cuda`
//! feature is on.
//!
//! Without the feature nothing is compiled and no CUDA toolkit is needed, so the crate still builds
//! for documentation and for CPU-only users. With it, nvcc is looked up (see [`find_cuda_root`]) and
//! a missing compiler stops the build with one message saying how to get one.

use std::env;
use std::path::{Path, PathBuf};

#[path = "build/kernel_cache.rs"]
mod kernel_cache;

use kernel_cache::{Inputs, KernelCache};

/// The CUDA translation units compiled for sm_80 and sm_90a, in this order.
const CU_SOURCES: &[&str] = &[
    "csrc/cache_write.cu",
    "csrc/paged_decode.cu",
    "csrc/paged_prefill.cu",
    "csrc/synthetic_model.cu",
    "csrc/side_stream.cu",
];

/// Translation units that only hold Hopper code, compiled for sm_90a only (the launchers never run
/// them elsewhere). Like the others, each is compiled alone: see `main`.
const CU_SOURCES_SM90: &[&str] = &["csrc/paged_prefill_sm90.cu", "csrc/paged_prefill_sm90ws.cu"];

/// Headers the sources include; a change to any of them triggers a rebuild.
const CU_HEADERS: &[&str] = &[
    "csrc/common/vec.cuh",
    "csrc/common/check.cuh",
    "csrc/common/fp8.cuh",
    "csrc/attention/common.cuh",
    "csrc/attention/softmax_state.cuh",
    "csrc/attention/wgmma_sm90.cuh",
    "csrc/attention/fp8_tile.cuh",
    "csrc/attention/scores.cuh",
];

/// Set (to anything but empty or `0`) at build time: the decode kernel records a per-block
/// timeline, read with `attention::decode_trace`. Off in every normal build.
const DECODE_TRACE_ENV: &str = "PAGED_ATTN_DECODE_TRACE";

/// Set (to anything but empty or `0`) at build time: the warp-specialised prefill records a
/// per-round timeline of its roles, read with `attention::prefill_trace`. Off in every normal
/// build.
const PREFILL_TRACE_ENV: &str = "PAGED_ATTN_PREFILL_TRACE";

/// Set to `2` at build time: the warp-specialised prefill runs head 64 with two consumer
/// warpgroups (128-row items) instead of three, the configuration before the twenty-sixth session
/// (docs/PERFORMANCE.md), kept for comparison. Any other value keeps three.
const WS_HEAD64_CONSUMERS_ENV: &str = "PAGED_ATTN_WS_HEAD64_CONSUMERS";

/// Version of the pinned toolkit that `cargo xtask setup-cuda` installs.
const PINNED_CUDA_DIR: &str = "cuda-13.0";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for path in CU_SOURCES.iter().chain(CU_SOURCES_SM90).chain(CU_HEADERS) {
        println!("cargo:rerun-if-changed={path}");
    }
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "CUDA_ROOT",
        "PAGED_ATTN_CACHE_DIR",
        "XDG_CACHE_HOME",
        kernel_cache::ENV,
        DECODE_TRACE_ENV,
        PREFILL_TRACE_ENV,
        WS_HEAD64_CONSUMERS_ENV,
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    // The host side plans with the kernel's item rows (`ws_item_rows`), so it hears of the option
    // whether or not this build compiles the kernels.
    let ws_two_consumers = env::var(WS_HEAD64_CONSUMERS_ENV).is_ok_and(|v| v == "2");
    println!("cargo::rustc-check-cfg=cfg(pa_ws_head64_two_consumers)");
    if ws_two_consumers {
        println!("cargo:rustc-cfg=pa_ws_head64_two_consumers");
    }

    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    // docs.rs and `cargo doc` without a toolkit: document the API without compiling kernels.
    if env::var_os("DOCS_RS").is_some() {
        return;
    }

    let Some(cuda_root) = find_cuda_root() else {
        eprintln!();
        eprintln!("error: attention-kernels was built with the `cuda` feature but no nvcc was found.");
        eprintln!("       Install the pinned CUDA compiler with `cargo xtask setup-cuda` (from PyPI, no root");
        eprintln!("       needed), or point NVCC or CUDA_HOME at an existing CUDA 12.4+ toolkit.");
        eprintln!();
        panic!("nvcc not found: run `cargo xtask setup-cuda` or set NVCC / CUDA_HOME");
    };
    let nvcc = cuda_root.join("bin").join("nvcc");

    // cc reads the CUDA compiler from `NVCC`; set before any thread starts.
    env::set_var("NVCC", &nvcc);
    // The decode kernel's per-block timeline (a diagnostic; see `attention::decode_trace`).
    let decode_trace = env::var(DECODE_TRACE_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
    if decode_trace {
        println!(
            "cargo:warning=attention-kernels: {DECODE_TRACE_ENV} set: the decode kernel records per-block timestamps"
        );
    }
    // The warp-specialised prefill's per-round timeline (see `attention::prefill_trace`).
    let prefill_trace = env::var(PREFILL_TRACE_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
    if prefill_trace {
        println!(
            "cargo:warning=attention-kernels: {PREFILL_TRACE_ENV} set: the warp-specialised prefill records per-round timestamps"
        );
    }
    if ws_two_consumers {
        println!(
            "cargo:warning=attention-kernels: {WS_HEAD64_CONSUMERS_ENV}=2: the warp-specialised prefill runs head 64 with two consumers (the earlier configuration)"
        );
    }
    let base = || {
        let mut build = cc::Build::new();
        build
            .cuda(true)
            .cudart("static")
            // Device code is always optimised: `-G` would make debug-profile tests of the kernels
            // orders of magnitude slower and compile far longer. `-lineinfo` keeps sanitizer
            // reports pointing at source lines.
            .debug(false)
            .opt_level(3)
            .include("csrc")
            .flag("-std=c++17")
            .flag("-lineinfo")
            .flag("--expt-relaxed-constexpr")
            .flag("-Xfatbin=-compress-all")
            .flag("-gencode=arch=compute_90a,code=sm_90a")
            .warnings(false);
        build
    };
    // Every translation unit is compiled alone, into its own library: cc compiles a CUDA library of
    // several files with relocatable device code (`--device-c`), under which ptxas cannot see the
    // whole kernel (the decode kernel took 184-190 registers instead of 168, too many for three
    // blocks per SM; the KV writes kept 40-60 registers live across the division slow paths, which
    // are real calls there, instead of 28-48; Hopper code serialises every wgmma). No kernel
    // calls device code of another file, so nothing needs device linking.
    // nvcc compiles the two architectures of one file in parallel when told it may; the thread
    // count changes no output, so it stays out of the cache key.
    let jobs = env::var("NUM_JOBS").ok().and_then(|j| j.parse::<usize>().ok()).unwrap_or(1).max(1);
    let mut units = Vec::new();
    for src in CU_SOURCES {
        let stem = Path::new(src).file_stem().and_then(|s| s.to_str()).unwrap_or("kernels");
        let mut build = base();
        build.flag("-gencode=arch=compute_80,code=[sm_80,compute_80]");
        if decode_trace && stem == "paged_decode" {
            build.define("PA_DECODE_TRACE", "1");
        }
        units.push(Unit { src, lib_name: format!("attention_kernels_{stem}"), build, threads: Some(jobs.min(4)) });
    }
    for src in CU_SOURCES_SM90 {
        let stem = Path::new(src).file_stem().and_then(|s| s.to_str()).unwrap_or("sm90");
        let mut build = base();
        if stem == "paged_prefill_sm90ws" {
            if prefill_trace {
                build.define("PA_PREFILL_TRACE", "1");
            }
            if ws_two_consumers {
                build.define("PA_WS_HEAD64_CONSUMERS", "2");
            }
        }
        units.push(Unit { src, lib_name: format!("attention_kernels_{stem}"), build, threads: None });
    }
    let cache = KernelCache::from_env();
    // The cache key covers every file under `csrc/`, not only the headers this script lists, so a
    // header added without a `rerun-if-changed` line still changes the key.
    let cache = cache.map(|c| (c, Inputs::read(&files_under(Path::new("csrc")))));
    let built = build_all(&units, jobs, cache.as_ref());
    // Linked in source order, whatever order the builds finished in.
    for (unit, (library, _)) in units.iter().zip(&built) {
        cc::emit_link_directives(&unit.build, library);
    }
    let compiled = built.iter().filter(|(_, ran)| *ran).count();
    let total = CU_SOURCES.len() + CU_SOURCES_SM90.len();
    match &cache {
        Some((c, _)) => println!(
            "cargo:warning=attention-kernels: compiled {compiled} of {total} CUDA sources with {}, {} from the kernel cache in {}",
            nvcc.display(),
            total - compiled,
            c.dir().display()
        ),
        None => println!("cargo:warning=attention-kernels: compiled {total} CUDA sources with {}", nvcc.display()),
    }

    for lib_dir in ["lib", "lib64", "targets/x86_64-linux/lib"] {
        let dir = cuda_root.join(lib_dir);
        if dir.is_dir() {
            println!("cargo:rustc-link-search=native={}", dir.display());
        }
    }
    println!("cargo:rustc-link-lib=dylib=stdc++");
}

/// One translation unit: its source, its library's name, its cc build and nvcc's `--threads`.
struct Unit {
    src: &'static str,
    lib_name: String,
    build: cc::Build,
    threads: Option<usize>,
}

/// The kernel cache and the files its keys cover (or why they could not be read).
type Cache = (KernelCache, Result<Inputs, String>);

/// Builds every unit, `jobs` at a time (cargo's NUM_JOBS), the longest compiles first; returns
/// each unit's library and whether nvcc ran for it, in the order of `units`. Why in parallel: the
/// units are independent and nvcc is single-threaded per architecture, so on a machine with more
/// cores than architectures the serial build left them idle for minutes.
fn build_all(units: &[Unit], jobs: usize, cache: Option<&Cache>) -> Vec<(PathBuf, bool)> {
    // Longest first, from the sources' sizes (the decode and the sm80 prefill dominate).
    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(std::fs::metadata(units[i].src).map(|m| m.len()).unwrap_or(0)));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut built: Vec<(usize, (PathBuf, bool))> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..jobs.min(units.len()))
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    while let Some(&i) = order.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
                        done.push((i, library(&units[i], cache)));
                    }
                    done
                })
            })
            .collect();
        // A worker that panicked (a failed compile: cc panics with nvcc's message) fails the build
        // with that message.
        workers.into_iter().flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    built.sort_by_key(|(i, _)| *i);
    built.into_iter().map(|(_, done)| done).collect()
}

/// Builds one unit's static library (or takes it from the kernel cache); returns its path and
/// whether nvcc ran. `--threads` changes no output and so is not part of the key. A cache that
/// cannot be read or written only costs the compile: the build goes on and says why in a warning.
fn library(unit: &Unit, cache: Option<&Cache>) -> (PathBuf, bool) {
    let Unit { src, lib_name, threads, .. } = unit;
    let mut build = unit.build.clone();
    build.file(src);
    let key = cache.map(|(c, inputs)| {
        let key = inputs.as_ref().map_err(Clone::clone).and_then(|i| c.key(&build, lib_name, Path::new(src), i));
        (c, key)
    });
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR for build scripts"));
    let library = out_dir.join(format!("lib{lib_name}.a"));
    if let Some((cache, Ok(key))) = &key {
        match cache.fetch(lib_name, key, &library) {
            Ok(true) => return (library, false),
            Ok(false) => {}
            Err(e) => println!("cargo:warning=attention-kernels: kernel cache not read ({e}); compiling {src}"),
        }
    }
    if let Some(n) = threads {
        build.flag(format!("--threads={n}"));
    }
    let objects = build.compile_intermediates();
    let built = build.create_archive(lib_name, &objects);
    match &key {
        Some((cache, Ok(key))) => {
            if let Err(e) = cache.store(lib_name, key, &built) {
                println!("cargo:warning=attention-kernels: kernel cache not written ({e})");
            }
        }
        Some((_, Err(e))) => println!("cargo:warning=attention-kernels: no kernel cache key for {src} ({e})"),
        None => {}
    }
    (built, true)
}

/// Every file under `dir`, recursively, in a fixed order (unreadable folders are skipped: the
/// compile that follows reports any source it cannot read).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Finds a CUDA root (a folder with `bin/nvcc`), in this order:
/// `NVCC` (the compiler itself), `CUDA_HOME` / `CUDA_PATH` / `CUDA_ROOT`, the toolkit that
/// `cargo xtask setup-cuda` installed in the user's cache, `nvcc` on `PATH`, `/usr/local/cuda`.
fn find_cuda_root() -> Option<PathBuf> {
    let root_of_nvcc = |nvcc: &Path| nvcc.parent()?.parent().map(Path::to_path_buf);
    if let Some(nvcc) = env::var_os("NVCC").map(PathBuf::from) {
        if nvcc.is_file() {
            return root_of_nvcc(&nvcc);
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(root) = env::var_os(var).map(PathBuf::from) {
            if root.join("bin/nvcc").is_file() {
                return Some(root);
            }
        }
    }
    if let Some(root) = xtask_cuda_root() {
        return Some(root);
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let nvcc = dir.join("nvcc");
            if nvcc.is_file() {
                return root_of_nvcc(&nvcc);
            }
        }
    }
    let default = PathBuf::from("/usr/local/cuda");
    default.join("bin/nvcc").is_file().then_some(default)
}

/// The toolkit root inside the virtual environment made by `cargo xtask setup-cuda`
/// (`<cache>/paged-attn/cuda-13.0/lib/python3.*/site-packages/nvidia/cu13`).
fn xtask_cuda_root() -> Option<PathBuf> {
    let cache = env::var_os("PAGED_ATTN_CACHE_DIR").map(PathBuf::from).or_else(|| {
        env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("paged-attn"))
    })?;
    let lib = cache.join(PINNED_CUDA_DIR).join("lib");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&lib).ok()?.flatten().map(|e| e.path()).collect();
    entries.sort();
    entries
        .into_iter()
        .map(|python| python.join("site-packages/nvidia/cu13"))
        .find(|root| root.join("bin/nvcc").is_file())
}
