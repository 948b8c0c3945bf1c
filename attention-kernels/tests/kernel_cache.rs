//! The build script's kernel cache (`build/kernel_cache.rs`): what its key covers, and that it
//! hands back what was stored and keeps only the most recently used entries of each library.

#[allow(dead_code)] // the build script uses parts these tests do not
#[path = "../build/kernel_cache.rs"]
mod kernel_cache;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use kernel_cache::{Inputs, KernelCache};

/// A fresh folder under the system's temporary folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "attention-kernels-cache-test-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A C++ build as cc would run it here (the key asks the compiler for its version, so the
/// compiler must exist: the host's C++ compiler, which every Rust toolchain on Linux links with).
fn build() -> cc::Build {
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let mut b = cc::Build::new();
    b.cpp(true).target(&triple).host(&triple).opt_level(3).debug(false).include("csrc").flag("-std=c++17");
    b
}

/// The key of `lib` built from `paths[0]`, reading every file in `paths` now.
fn key(cache: &KernelCache, b: &cc::Build, lib: &str, paths: &[&Path]) -> String {
    let inputs = Inputs::read(&paths.iter().map(|p| p.to_path_buf()).collect::<Vec<_>>()).unwrap();
    cache.key(b, lib, paths[0], &inputs).unwrap()
}

#[cfg(target_os = "linux")]
#[test]
fn the_key_follows_every_input() {
    let dir = Scratch::new("key");
    let src = dir.0.join("k.cu");
    let header = dir.0.join("k.cuh");
    fs::write(&src, "__global__ void k() {}\n").unwrap();
    fs::write(&header, "#pragma once\n").unwrap();
    let cache = KernelCache::at(dir.0.join("cache"));
    let inputs = [src.as_path(), header.as_path()];

    let first = key(&cache, &build(), "lib_a", &inputs);
    assert_eq!(first.len(), 32);
    assert!(first.bytes().all(|c| c.is_ascii_hexdigit()), "{first}");
    assert_eq!(key(&cache, &build(), "lib_a", &inputs), first, "same inputs, same key");

    fs::write(&header, "#pragma once\n#define X 1\n").unwrap();
    let edited = key(&cache, &build(), "lib_a", &inputs);
    assert_ne!(edited, first, "a header's contents are part of the key");
    fs::write(&header, "#pragma once\n").unwrap();
    assert_eq!(key(&cache, &build(), "lib_a", &inputs), first);

    let mut traced = build();
    traced.define("PA_DECODE_TRACE", "1");
    assert_ne!(key(&cache, &traced, "lib_a", &inputs), first, "a define is part of the key");
    let mut flagged = build();
    flagged.flag("-lineinfo");
    assert_ne!(key(&cache, &flagged, "lib_a", &inputs), first, "a flag is part of the key");
    assert_ne!(key(&cache, &build(), "lib_b", &inputs), first, "the library's name is part of the key");
    assert_ne!(key(&cache, &build(), "lib_a", &inputs[..1]), first, "the list of inputs is part of the key");

    let other = dir.0.join("other.cu");
    fs::write(&other, "__global__ void k() {}\n").unwrap();
    let all = Inputs::read(&[src.clone(), header.clone(), other.clone()]).unwrap();
    assert_ne!(
        cache.key(&build(), "lib_a", &src, &all).unwrap(),
        cache.key(&build(), "lib_a", &other, &all).unwrap(),
        "the unit's own source is part of the key"
    );

    let missing = dir.0.join("gone.cuh");
    let Err(err) = Inputs::read(&[src.clone(), missing]) else { panic!("a missing input was read") };
    assert!(err.contains("gone.cuh"), "{err}");
    let inputs = Inputs::read(std::slice::from_ref(&header)).unwrap();
    let err = cache.key(&build(), "lib_a", &src, &inputs).unwrap_err();
    assert!(err.contains("k.cu"), "{err}");
}

#[test]
fn stored_libraries_come_back_and_the_least_recently_used_go() {
    let dir = Scratch::new("store");
    let cache = KernelCache::at(dir.0.join("cache"));
    let keys: Vec<String> = (0..10).map(|i| format!("{i:032x}")).collect();
    let lib = dir.0.join("libattention_kernels_x.a");
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);

    assert!(!cache.fetch("attention_kernels_x", &keys[0], &dir.0.join("out.a")).unwrap(), "empty cache");
    for (i, k) in keys.iter().enumerate() {
        fs::write(&lib, format!("archive {i}")).unwrap();
        cache.store("attention_kernels_x", k, &lib).unwrap();
        // Each entry older than the next, whatever the file system's time resolution.
        let entry = cache.dir().join(format!("attention_kernels_x-{k}.a"));
        let f = fs::OpenOptions::new().append(true).open(&entry).unwrap();
        f.set_modified(old + Duration::from_secs(i as u64)).unwrap();
    }
    // Files that are not this library's entries are left alone by its pruning.
    let other = cache.dir().join(format!("attention_kernels_xy-{}.a", keys[0]));
    let stray = cache.dir().join("attention_kernels_x-notakey.a");
    fs::write(&other, "other").unwrap();
    fs::write(&stray, "stray").unwrap();
    fs::write(&lib, "archive 10").unwrap();
    cache.store("attention_kernels_x", &format!("{:032x}", 10), &lib).unwrap();

    let out = dir.0.join("out.a");
    for (i, k) in keys.iter().enumerate() {
        let hit = cache.fetch("attention_kernels_x", k, &out).unwrap();
        // Eight kept: the newest (10) and 3..=9.
        assert_eq!(hit, i >= 3, "entry {i}");
        if hit {
            assert_eq!(fs::read_to_string(&out).unwrap(), format!("archive {i}"));
        }
    }
    assert!(other.is_file() && stray.is_file());

    // A fetch marks its entry as used: it now outlives entries stored before it.
    let used = cache.dir().join(format!("attention_kernels_x-{}.a", keys[3]));
    let stamp = fs::metadata(&used).unwrap().modified().unwrap();
    assert!(stamp > old + Duration::from_secs(100), "fetch refreshes the entry's time");
}
