//! Which prefill kernel a launch runs: the process-wide [`PrefillPath`] (from [`PREFILL_PATH_ENV`],
//! or a per-thread override), the warp-specialised kernel's grid setting ([`WS_GRID_ENV`]), and the
//! choice for a head size, element type and cache on the current device.

use std::cell::Cell;
use std::sync::OnceLock;

use cudarc::driver::CudaContext;

use super::{invalid, to_i32, type_codes, PREFILL};
use crate::launch::bind_ctx;
use crate::{ffi, DType, KernelError};

/// Which prefill kernel a launch may use: the process default comes from the
/// [`PREFILL_PATH_ENV`] environment variable (read once), and [`with_prefill_path`] overrides it
/// for the calls one thread makes (benchmarks comparing both kernels in one run, tests forcing
/// one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillPath {
    /// The kernel measured fastest for the head size and cache: on compute capability 9.0 the
    /// warp-specialised Hopper kernel at head sizes 64 and 128 over a 16-bit cache (on the H200
    /// 33% to 53% faster than the lockstep one on causal 8 x 2048, 2 x 8192 and chunked q512 on a
    /// 7.5k prefix at head 128, 16% at head 64, 7% to 34% on short prompts, and faster beside a
    /// decode part too: mixed 64 decodes + 2 x 1024 0.218 ms against 0.231), the lockstep Hopper
    /// kernel for FP8 caches (faster than the warp-specialised kernel's FP8 path, whose producer
    /// widens every tile alone), the sm80 kernel elsewhere. The default.
    Auto,
    /// The lockstep Hopper kernel (`csrc/paged_prefill_sm90.cu`) for the head sizes it is compiled
    /// for (64 and 128), the sm80 kernel for the others; a launch on a device that is not compute
    /// capability 9.0 is an error instead of a silent fallback, so a benchmark or test meant for
    /// the Hopper kernel cannot measure the other one.
    Sm90,
    /// Like `Sm90` (the same device check), but the warp-specialised Hopper kernel
    /// (`csrc/paged_prefill_sm90ws.cu`: a producer warpgroup gathering K/V pages, two ping-ponged
    /// wgmma consumer warpgroups) for head sizes 64 and 128, with 16-bit or FP8 caches (the
    /// producer widens FP8 tiles); other head sizes run the sm80 kernel. `Auto` chooses it for
    /// 16-bit caches.
    Sm90Ws,
    /// Always the FlashAttention-2 class `mma.sync` kernel.
    Sm80,
}

/// The environment variable holding the process-wide [`PrefillPath`]: `auto`, `sm90`, `sm90ws` or
/// `sm80`.
pub const PREFILL_PATH_ENV: &str = "PAGED_ATTN_PREFILL";

impl PrefillPath {
    /// Parses `auto`, `sm90`, `sm90ws` or `sm80` (ASCII case ignored, surrounding blanks trimmed).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Some(PrefillPath::Auto),
            "sm90" => Some(PrefillPath::Sm90),
            "sm90ws" => Some(PrefillPath::Sm90Ws),
            "sm80" => Some(PrefillPath::Sm80),
            _ => None,
        }
    }
}

/// The prefill kernel a launch runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PrefillKernel {
    /// `csrc/paged_prefill_sm90.cu`: wgmma, sm_90a.
    Sm90,
    /// `csrc/paged_prefill_sm90ws.cu`: wgmma, sm_90a, warp-specialised.
    Sm90Ws,
    /// `csrc/paged_prefill.cu`: mma.sync, every GPU from sm_80.
    Sm80,
}

thread_local! {
    static PREFILL_OVERRIDE: Cell<Option<PrefillPath>> = const { Cell::new(None) };
}

/// Runs `f` with every prefill launch this thread makes using `path`, whatever
/// [`PREFILL_PATH_ENV`] says; the previous setting comes back afterwards (also when `f` panics).
/// Launches are issued on the calling thread, so this reaches the launches of `attention-backend`
/// made inside `f` too.
pub fn with_prefill_path<R>(path: PrefillPath, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<PrefillPath>);
    impl Drop for Restore {
        fn drop(&mut self) {
            PREFILL_OVERRIDE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(PREFILL_OVERRIDE.with(|c| c.replace(Some(path))));
    f()
}

/// The [`PrefillPath`] in force on this thread: the [`with_prefill_path`] override, else the
/// environment's (read once per process).
///
/// # Errors
/// [`KernelError::InvalidArgument`] when [`PREFILL_PATH_ENV`] holds something other than `auto`,
/// `sm90`, `sm90ws` or `sm80` (and no override is active).
pub fn prefill_path() -> Result<PrefillPath, KernelError> {
    if let Some(p) = PREFILL_OVERRIDE.with(Cell::get) {
        return Ok(p);
    }
    static ENV: OnceLock<Result<PrefillPath, String>> = OnceLock::new();
    ENV.get_or_init(|| crate::env_setting::read(std::env::var(PREFILL_PATH_ENV), PrefillPath::Auto, PrefillPath::parse))
        .clone()
        .map_err(|v| invalid(PREFILL, format!("{PREFILL_PATH_ENV}={v}: expected auto, sm90, sm90ws or sm80")))
}

/// The environment variable capping the warp-specialised prefill's persistent grid (read once per
/// process): unset or empty, the launch's own setting (`AttentionKernel::Prefill::max_sms`: one
/// block per SM unless the caller capped it); `N > 0`, at most N blocks whatever the launch asked,
/// so every block walks many work items (a test of the item loop); `0`, one block per work item
/// (the launch before the grid was persistent, for benchmarks). Anything else makes prefill
/// launches fail with [`KernelError::InvalidArgument`] rather than run a grid nobody asked for.
pub const WS_GRID_ENV: &str = "PAGED_ATTN_WS_GRID";

/// Parses a [`WS_GRID_ENV`] value into `PaAttnArgs::prefill_grid`: blank is 0 (one block per
/// SM), `0` is -1 (one block per item), `N > 0` is N (at most `i32::MAX`); `None` for anything
/// that is not a non-negative decimal count.
pub fn parse_ws_grid(s: &str) -> Option<i32> {
    let s = s.trim();
    if s.is_empty() {
        return Some(0);
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // All digits: only an overflow is left to fail, and a cap past i32::MAX blocks is no cap.
    let n = s.parse::<u64>().unwrap_or(u64::MAX);
    Some(if n == 0 { -1 } else { i32::try_from(n).unwrap_or(i32::MAX) })
}

/// The warp-specialised prefill's grid setting from [`WS_GRID_ENV`] (read once per process).
///
/// # Errors
/// [`KernelError::InvalidArgument`] when the variable holds something other than a block count.
pub(super) fn ws_grid() -> Result<i32, KernelError> {
    static ENV: OnceLock<Result<i32, KernelError>> = OnceLock::new();
    ENV.get_or_init(|| ws_grid_from(std::env::var(WS_GRID_ENV))).clone()
}

/// [`ws_grid`] for one reading of the environment variable.
fn ws_grid_from(var: Result<String, std::env::VarError>) -> Result<i32, KernelError> {
    crate::env_setting::read(var, 0, parse_ws_grid).map_err(|v| {
        invalid(
            PREFILL,
            format!("{WS_GRID_ENV}={v}: expected a block count (0 = one block per work item, unset = one per SM)"),
        )
    })
}

/// The head sizes at which [`PrefillPath::Auto`] runs the warp-specialised Hopper kernel (every
/// head size it is compiled for).
const AUTO_WS_HEAD_SIZES: [i32; 2] = [64, 128];

/// Chooses the prefill kernel for `head_size` / `dtype` (0 = f16, 1 = bf16) and a cache of storage
/// `kv_dtype` (0 = the compute type, 1 / 2 = FP8) under `path`; the device is the one whose context
/// is current on this thread.
pub(super) fn resolve_prefill(
    path: PrefillPath,
    head_size: i32,
    dtype: i32,
    kv_dtype: i32,
) -> Result<PrefillKernel, KernelError> {
    if path == PrefillPath::Sm80 {
        return Ok(PrefillKernel::Sm80);
    }
    // SAFETY: pure queries of the current device's compute capability (cached per device by the
    // C side) and of three integers; no memory of the caller is touched.
    let (supported, device) =
        unsafe { (ffi::pa_paged_prefill_sm90_supported(head_size, dtype), ffi::pa_paged_prefill_sm90_device()) };
    if matches!(path, PrefillPath::Sm90 | PrefillPath::Sm90Ws) && device == 0 {
        let name = if path == PrefillPath::Sm90 { "sm90" } else { "sm90ws" };
        return Err(invalid(
            PREFILL,
            format!(
                "{PREFILL_PATH_ENV}={name} asks for the Hopper prefill, but the device is not compute capability 9.0"
            ),
        ));
    }
    // Auto takes the warp-specialised kernel where it was measured faster (see PrefillPath::Auto).
    let ws_wanted = path == PrefillPath::Sm90Ws
        || (path == PrefillPath::Auto && AUTO_WS_HEAD_SIZES.contains(&head_size) && kv_dtype == 0);
    if ws_wanted {
        // SAFETY: as above, a pure query of integers and the cached device capability.
        let ws = unsafe { ffi::pa_paged_prefill_sm90ws_supported(head_size, dtype, kv_dtype) };
        if ws == 1 {
            return Ok(PrefillKernel::Sm90Ws);
        }
    }
    Ok(if supported == 1 { PrefillKernel::Sm90 } else { PrefillKernel::Sm80 })
}

/// The prefill kernel a launch of `head_size` / `dtype` over a cache of the compute type on
/// `ctx`'s device runs under the [`PrefillPath`] in force on this thread (tests and benchmarks
/// check it before timing or comparing); [`prefill_kernel_for_cache`] for other caches.
///
/// # Errors
/// [`KernelError::InvalidArgument`] for a bad [`PREFILL_PATH_ENV`], an element type other than
/// f16 / bf16, or [`PrefillPath::Sm90`] / [`PrefillPath::Sm90Ws`] on a device that is not compute
/// capability 9.0;
/// [`KernelError::Cuda`] when the context cannot be bound.
pub fn prefill_kernel(ctx: &CudaContext, head_size: usize, dtype: DType) -> Result<PrefillKernel, KernelError> {
    prefill_kernel_for_cache(ctx, head_size, dtype, dtype)
}

/// As [`prefill_kernel`], for a cache stored as `cache_dtype` (`dtype` itself or an FP8 format).
///
/// # Errors
/// As [`prefill_kernel`]; [`KernelError::InvalidArgument`] also for a cache type that is neither
/// `dtype` nor FP8.
pub fn prefill_kernel_for_cache(
    ctx: &CudaContext,
    head_size: usize,
    dtype: DType,
    cache_dtype: DType,
) -> Result<PrefillKernel, KernelError> {
    let (d, kv) = type_codes(PREFILL, dtype, cache_dtype)?;
    let path = prefill_path()?;
    bind_ctx(PREFILL, ctx)?;
    resolve_prefill(path, to_i32(PREFILL, "head_size", head_size)?, d, kv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_paths_parse() {
        assert_eq!(PrefillPath::parse(" SM90WS "), Some(PrefillPath::Sm90Ws));
        assert_eq!(PrefillPath::parse("sm90"), Some(PrefillPath::Sm90));
        assert_eq!(PrefillPath::parse("sm80"), Some(PrefillPath::Sm80));
        assert_eq!(PrefillPath::parse(""), Some(PrefillPath::Auto));
        assert_eq!(PrefillPath::parse("sm90-ws"), None);
    }

    #[test]
    fn ws_grid_values() {
        assert_eq!(parse_ws_grid(""), Some(0));
        assert_eq!(parse_ws_grid("  "), Some(0));
        assert_eq!(parse_ws_grid("0"), Some(-1));
        assert_eq!(parse_ws_grid(" 3 "), Some(3));
        assert_eq!(parse_ws_grid("132"), Some(132));
        assert_eq!(parse_ws_grid("99999999999999999999999"), Some(i32::MAX));
        for bad in ["-1", "+3", "3x", "x", "1.5", "0x10", "3 4"] {
            assert_eq!(parse_ws_grid(bad), None, "{bad:?}");
        }
        assert_eq!(ws_grid_from(Err(std::env::VarError::NotPresent)), Ok(0));
        assert_eq!(ws_grid_from(Ok("0".into())), Ok(-1));
        match ws_grid_from(Ok("three".into())) {
            Err(KernelError::InvalidArgument { kernel, what }) => {
                assert_eq!(kernel, PREFILL);
                assert!(what.starts_with("PAGED_ATTN_WS_GRID=three: expected a block count"), "{what}");
            }
            other => panic!("{other:?}"),
        }
    }
}
