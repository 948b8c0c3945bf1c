//! An opt-in cache of the compiled kernel libraries, shared by every build of this crate on one
//! machine: the debug, test and release profiles, other target folders, `cargo package`'s builds.
//!
//! Why: nvcc spends about six minutes of two cores on these sources, and a workspace check builds
//! them once per profile, feature set and target folder (four or five times in `cargo xtask
//! test`). A library's bytes depend only on its inputs, so one compile can serve every build whose
//! inputs match. Off unless [`ENV`] names a folder (`cargo xtask` names one in its cache folder); a
//! build that names none compiles exactly as before.
//!
//! The key is a 128-bit hash of everything that decides a library's bytes: its name, the compiler
//! and every argument cc gives it (flags, defines, include folders, the host compiler named by
//! `-ccbin`), what the compiler and the host compiler print for `--version`, the environment
//! variables nvcc reads its own extra flags from, the target, and the path and contents of the
//! source and of every file it may include (build.rs passes all of `csrc/`). A changed header,
//! flag or toolkit is a different key, so a stale library is never linked; the cost of a key is a
//! miss, which compiles as without the cache. Entries are whole `lib<name>.a` archives written
//! under a temporary name and renamed into place, so a concurrent build sees a complete file or
//! none. Each library keeps its [`KEEP_PER_LIBRARY`] most recently used entries.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::SystemTime;

/// The folder the cache lives in; unset or empty: no cache.
pub const ENV: &str = "PAGED_ATTN_KERNEL_CACHE";

/// Environment variables nvcc adds flags from (they change its output without changing cc's
/// arguments).
const NVCC_FLAG_VARS: &[&str] = &["NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS", "NVCC_CCBIN"];

/// Entries kept per library: the current sources in a few configurations (profiles share the
/// kernels' flags, the trace builds do not) plus a few older versions for switching branches.
const KEEP_PER_LIBRARY: usize = 8;

/// Bump when the key's recipe changes, so that old entries stop matching.
const RECIPE: &str = "attention-kernels kernel cache v1";

pub struct KernelCache {
    dir: PathBuf,
    /// `--version` outputs by program: every unit's key asks for the same two compilers.
    versions: Mutex<Vec<(PathBuf, Vec<u8>)>>,
}

/// The files a key covers (the sources and every header they may include), read once for all the
/// units of a build.
pub struct Inputs {
    files: Vec<(PathBuf, Vec<u8>)>,
}

impl Inputs {
    pub fn read(paths: &[PathBuf]) -> Result<Self, String> {
        let files = paths
            .iter()
            .map(|path| {
                let bytes = fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                Ok((path.clone(), bytes))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { files })
    }

    fn get(&self, path: &Path) -> Option<&[u8]> {
        self.files.iter().find(|(p, _)| p == path).map(|(_, bytes)| bytes.as_slice())
    }
}

impl KernelCache {
    /// The cache [`ENV`] names, if any.
    pub fn from_env() -> Option<Self> {
        std::env::var_os(ENV).filter(|v| !v.is_empty()).map(|dir| Self::at(PathBuf::from(dir)))
    }

    /// A cache in `dir` (created at the first store).
    pub fn at(dir: PathBuf) -> Self {
        Self { dir, versions: Mutex::new(Vec::new()) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key of library `lib_name` built by `build` from `source` and `inputs` (every file the
    /// sources may include, `source` among them).
    pub fn key(&self, build: &cc::Build, lib_name: &str, source: &Path, inputs: &Inputs) -> Result<String, String> {
        let tool = build.try_get_compiler().map_err(|e| format!("cc cannot name the compiler: {e}"))?;
        let mut h = Hash128::new();
        h.field(RECIPE.as_bytes());
        h.field(lib_name.as_bytes());
        h.field(std::env::var("TARGET").unwrap_or_default().as_bytes());
        h.field(tool.path().as_os_str().as_encoded_bytes());
        for arg in tool.args() {
            h.field(arg.as_encoded_bytes());
        }
        h.field(&self.version_of(tool.path())?);
        let ccbin = tool.args().iter().filter_map(|a| a.to_str()?.strip_prefix("-ccbin=")).next_back();
        if let Some(host) = ccbin {
            h.field(&self.version_of(Path::new(host))?);
        }
        for var in NVCC_FLAG_VARS {
            h.field(std::env::var_os(var).unwrap_or_default().as_encoded_bytes());
        }
        let own = inputs.get(source).ok_or_else(|| format!("{} is not among the kernel sources", source.display()))?;
        for (path, bytes) in
            std::iter::once((source, own)).chain(inputs.files.iter().map(|(p, b)| (p.as_path(), &b[..])))
        {
            h.field(path.as_os_str().as_encoded_bytes());
            h.field(bytes);
        }
        Ok(h.hex())
    }

    /// What `program --version` prints (stdout and stderr), run once per program per build.
    fn version_of(&self, program: &Path) -> Result<Vec<u8>, String> {
        let known = |v: &Vec<(PathBuf, Vec<u8>)>| v.iter().find(|(p, _)| p == program).map(|(_, out)| out.clone());
        if let Some(out) = known(&self.versions.lock().unwrap_or_else(|e| e.into_inner())) {
            return Ok(out);
        }
        // Run outside the lock: two units may both run it once, with the same answer.
        let out = version_of(program)?;
        self.versions.lock().unwrap_or_else(|e| e.into_inner()).push((program.to_path_buf(), out.clone()));
        Ok(out)
    }

    fn entry(&self, lib_name: &str, key: &str) -> PathBuf {
        self.dir.join(format!("{lib_name}-{key}.a"))
    }

    /// Copies the entry for `key`, if there is one, to `dest`; marks it used.
    pub fn fetch(&self, lib_name: &str, key: &str, dest: &Path) -> Result<bool, String> {
        let entry = self.entry(lib_name, key);
        if !entry.is_file() {
            return Ok(false);
        }
        copy_atomically(&entry, dest)?;
        // Recency for the pruning below; a failure only makes the entry look older.
        if let Ok(f) = fs::OpenOptions::new().append(true).open(&entry) {
            let _ = f.set_modified(SystemTime::now());
        }
        Ok(true)
    }

    /// Stores `library` as the entry for `key`, then drops the library's least recently used
    /// entries beyond [`KEEP_PER_LIBRARY`].
    pub fn store(&self, lib_name: &str, key: &str, library: &Path) -> Result<(), String> {
        fs::create_dir_all(&self.dir).map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        copy_atomically(library, &self.entry(lib_name, key))?;
        self.prune(lib_name)
    }

    fn prune(&self, lib_name: &str) -> Result<(), String> {
        let prefix = format!("{lib_name}-");
        let listing = fs::read_dir(&self.dir).map_err(|e| format!("cannot list {}: {e}", self.dir.display()))?;
        let mut entries: Vec<(SystemTime, PathBuf)> = listing
            .flatten()
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                // The key is 32 hex digits: another library whose name starts with this one's
                // (none today) would not match.
                name.strip_prefix(&prefix)
                    .and_then(|rest| rest.strip_suffix(".a"))
                    .is_some_and(|k| k.len() == 32 && k.bytes().all(|b| b.is_ascii_hexdigit()))
            })
            .map(|e| (e.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH), e.path()))
            .collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.0));
        for (_, stale) in entries.into_iter().skip(KEEP_PER_LIBRARY) {
            let _ = fs::remove_file(stale);
        }
        Ok(())
    }
}

/// What `program --version` prints (stdout and stderr), as part of a key.
fn version_of(program: &Path) -> Result<Vec<u8>, String> {
    let out = Command::new(program)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {} --version: {e}", program.display()))?;
    if !out.status.success() {
        return Err(format!("{} --version failed ({})", program.display(), out.status));
    }
    let mut v = out.stdout;
    v.extend_from_slice(&out.stderr);
    Ok(v)
}

/// Copies `from` to `to` through a temporary file beside `to`, renamed into place.
fn copy_atomically(from: &Path, to: &Path) -> Result<(), String> {
    let name = to.file_name().unwrap_or(OsStr::new("entry")).to_string_lossy();
    let tmp = to.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    fs::copy(from, &tmp).map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), tmp.display()))?;
    fs::rename(&tmp, to).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("cannot move {} to {}: {e}", tmp.display(), to.display())
    })
}

/// Two independent 64-bit FNV-1a hashes (different offset bases) of a sequence of length-prefixed
/// fields: written out here because a build script's dependencies are every user's, and a cache key
/// needs no cryptographic strength (the inputs are the user's own files).
struct Hash128 {
    a: u64,
    b: u64,
}

impl Hash128 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new() -> Self {
        Self { a: 0xcbf2_9ce4_8422_2325, b: 0x6c62_272e_07bb_0142 }
    }

    fn bytes(&mut self, data: &[u8]) {
        for &byte in data {
            self.a = (self.a ^ u64::from(byte)).wrapping_mul(Self::PRIME);
            self.b = (self.b ^ u64::from(byte.rotate_left(3))).wrapping_mul(Self::PRIME);
        }
    }

    fn field(&mut self, data: &[u8]) {
        self.bytes(&(data.len() as u64).to_le_bytes());
        self.bytes(data);
    }

    fn hex(&self) -> String {
        format!("{:016x}{:016x}", self.a, self.b)
    }
}
