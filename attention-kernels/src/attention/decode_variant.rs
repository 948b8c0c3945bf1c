//! The decode kernel's variants (pipeline depth and warps, folded or separate split combine) and
//! the process-wide choice among them ([`DECODE_VARIANT_ENV`], [`set_decode_variant`]).

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use super::{invalid, DECODE};
use crate::KernelError;

/// The name of the environment variable that picks the process-wide [`DecodeVariant`] (read once,
/// at the first decode launch or [`decode_variant`] call, unless [`set_decode_variant`] ran first).
/// Values: the names of [`DecodeVariant::ALL`], e.g. `auto-fold` (the default), `w4s3-fold`, `w2s4`
/// (a second launch merges the splits). An unknown name makes decode launches fail with
/// [`KernelError::InvalidArgument`] rather than time a variant nobody asked for.
pub const DECODE_VARIANT_ENV: &str = "PAGED_ATTN_DECODE_VARIANT";

/// The software pipeline of the decode kernel: warps per block (each owns 16 keys of a tile, so 4
/// warps = 64-key tiles, 2 warps = 32-key tiles) and cp.async stages. [`DecodePipeline::W4S2`] is
/// compiled for f16 and bf16 at head size 128, the other pipelines but [`DecodePipeline::W4S3`]
/// for bf16 at head size 128 only, the benchmarked shape; other element types and head sizes run
/// `W4S3` (2 stages above head size 128) whatever is selected. An FP8 cache has a pipeline of its
/// own whatever is selected (up to head size 128: 2 warps, each with two 16-key groups per 64-key
/// tile, 2 stages; above: 4 warps, 3 stages); the fold choice applies to it as to the others.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DecodePipeline {
    /// Chosen per launch from the grid (the default): `W4S2` where it keeps more blocks resident
    /// per SM than `W4S3` and the launch fills at least four full waves of them, else `W4S3`;
    /// `W4S3` in batch-invariant mode. Both have 64-key tiles; on two H100s `W4S2` read 2.6-4%
    /// faster on a grid of 5.2 of its waves, -4% to +2% on 2.6 waves and 5-7% slower on 1.3
    /// (docs/PERFORMANCE.md, nineteenth session).
    /// [`decode_auto_pipeline`](super::decode_auto_pipeline) tells which one a grid gets.
    #[default]
    Auto,
    /// 4 warps, 64-key tiles, 3 stages: 2 blocks per SM at head size 128.
    W4S3,
    /// 4 warps, 64-key tiles, 4 stages: 1 block per SM, 3 tiles in flight.
    W4S4,
    /// 4 warps, 64-key tiles, 2 stages: 3 blocks per SM, 1 tile in flight each.
    W4S2,
    /// 2 warps, 32-key tiles, 6 stages: 2 blocks per SM, 5 tiles in flight each.
    W2S6,
    /// 2 warps, 32-key tiles, 4 stages: 3 blocks per SM, 3 tiles in flight each.
    W2S4,
}

impl DecodePipeline {
    /// Every pipeline, the default first.
    pub const ALL: [DecodePipeline; 6] = [
        DecodePipeline::Auto,
        DecodePipeline::W4S3,
        DecodePipeline::W4S4,
        DecodePipeline::W4S2,
        DecodePipeline::W2S6,
        DecodePipeline::W2S4,
    ];

    /// The pipeline of a [`DecodeVariant`] code's low byte (the kernels' numbering).
    pub(crate) fn from_code(code: u32) -> Option<DecodePipeline> {
        DecodePipeline::ALL.into_iter().find(|p| p.code() == code)
    }

    pub(crate) fn code(self) -> u32 {
        match self {
            DecodePipeline::Auto => 5,
            DecodePipeline::W4S3 => 0,
            DecodePipeline::W4S4 => 1,
            DecodePipeline::W4S2 => 2,
            DecodePipeline::W2S6 => 3,
            DecodePipeline::W2S4 => 4,
        }
    }

    fn name(self) -> &'static str {
        match self {
            DecodePipeline::Auto => "auto",
            DecodePipeline::W4S3 => "w4s3",
            DecodePipeline::W4S4 => "w4s4",
            DecodePipeline::W4S2 => "w4s2",
            DecodePipeline::W2S6 => "w2s6",
            DecodePipeline::W2S4 => "w2s4",
        }
    }
}

/// How the decode kernel runs: its pipeline and whether the split-KV combine is folded into the
/// last split of each (request, kv head) group to finish (an arrival counter per group in the
/// workspace; that block merges every split's partial in split order, so the result is the same
/// bits as the separate combine kernel and independent of arrival order) instead of a second
/// launch. Where the whole folded grid is resident at once and has 16 splits or more, the launch
/// is cooperative and the group's blocks wait for its last split and merge equal shares side by
/// side (the same bits; see [`DECODE_GROUP_MERGE_ENV`]). Every variant computes the same
/// attention; they differ in speed, and (through the tile size) in the order of the in-split
/// reduction, so outputs of two variants may differ in the last bits while each is deterministic
/// run to run.
///
/// The default is [`DecodePipeline::Auto`] with the folded combine: on the H200 the `W4S3`
/// pipeline with the fold was never slower than with the second launch on the benchmarked
/// shapes, and up to 8 us faster where a request is split many ways (b1 x 32768: 0.0515 ms
/// against 0.0597); `Auto` runs `W4S3` there and `W4S2` only on grids that have one split.
/// `W4S2` and `W4S3` differ only in pipeline depth (same tiles, same arithmetic in the same
/// order), so they give the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecodeVariant {
    /// Warps and stages.
    pub pipeline: DecodePipeline,
    /// Merge the splits in the decode kernel itself (no combine launch).
    pub fold_combine: bool,
}

impl Default for DecodeVariant {
    fn default() -> Self {
        DecodeVariant { pipeline: DecodePipeline::Auto, fold_combine: true }
    }
}

impl DecodeVariant {
    /// Every variant, the default first.
    pub const ALL: [DecodeVariant; 12] = {
        let p = DecodePipeline::ALL;
        let mut all = [DecodeVariant { pipeline: DecodePipeline::Auto, fold_combine: false }; 12];
        let mut i = 0;
        while i < p.len() {
            all[2 * i] = DecodeVariant { pipeline: p[i], fold_combine: true };
            all[2 * i + 1] = DecodeVariant { pipeline: p[i], fold_combine: false };
            i += 1;
        }
        all
    };

    /// The value of `PaAttnArgs::decode_variant`.
    pub(super) fn code(self) -> u32 {
        self.pipeline.code() | if self.fold_combine { 1 << 8 } else { 0 }
    }

    pub(super) fn from_code(code: u32) -> Option<Self> {
        DecodeVariant::ALL.into_iter().find(|v| v.code() == code)
    }
}

impl fmt::Display for DecodeVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.pipeline.name())?;
        if self.fold_combine {
            f.write_str("-fold")?;
        }
        Ok(())
    }
}

/// A name that is not one of [`DecodeVariant::ALL`]'s.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown decode variant {0:?} (expected one of auto, w4s3, w4s4, w4s2, w2s6, w2s4, each optionally with -fold)"
)]
pub struct UnknownDecodeVariant(pub String);

impl FromStr for DecodeVariant {
    type Err = UnknownDecodeVariant;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        DecodeVariant::ALL.into_iter().find(|v| v.to_string() == t).ok_or_else(|| UnknownDecodeVariant(s.to_string()))
    }
}

/// Not yet chosen: the first read consults [`DECODE_VARIANT_ENV`].
const VARIANT_UNSET: u32 = u32::MAX;
static DECODE_VARIANT: AtomicU32 = AtomicU32::new(VARIANT_UNSET);

/// The process-wide decode variant every decode launch uses: the one [`set_decode_variant`] set,
/// else [`DECODE_VARIANT_ENV`]'s, else the default. A benchmarking knob: keep one variant for the
/// life of a process when results must be bit-reproducible (batch-invariant mode included).
///
/// # Errors
/// [`KernelError::InvalidArgument`] when [`DECODE_VARIANT_ENV`] names no variant (and
/// [`set_decode_variant`] has not chosen one).
pub fn decode_variant() -> Result<DecodeVariant, KernelError> {
    let code = DECODE_VARIANT.load(Ordering::Relaxed);
    if let Some(v) = DecodeVariant::from_code(code) {
        return Ok(v);
    }
    // An error is not remembered: every decode launch reports it until the variable is fixed or
    // set_decode_variant chooses.
    let v = variant_from_env(std::env::var(DECODE_VARIANT_ENV))?;
    // A concurrent set_decode_variant wins over the environment.
    let _ = DECODE_VARIANT.compare_exchange(VARIANT_UNSET, v.code(), Ordering::Relaxed, Ordering::Relaxed);
    Ok(DecodeVariant::from_code(DECODE_VARIANT.load(Ordering::Relaxed)).unwrap_or(v))
}

/// The variant [`DECODE_VARIANT_ENV`] asks for, from one reading of it (unset: the default).
fn variant_from_env(var: Result<String, std::env::VarError>) -> Result<DecodeVariant, KernelError> {
    match var {
        Err(std::env::VarError::NotPresent) => Ok(DecodeVariant::default()),
        Err(std::env::VarError::NotUnicode(s)) => {
            Err(invalid(DECODE, format!("{DECODE_VARIANT_ENV}={s:?}: not a decode variant name")))
        }
        Ok(s) => s.parse::<DecodeVariant>().map_err(|e| invalid(DECODE, format!("{DECODE_VARIANT_ENV}: {e}"))),
    }
}

/// Sets the process-wide decode variant (see [`decode_variant`]); later launches use it.
pub fn set_decode_variant(v: DecodeVariant) {
    DECODE_VARIANT.store(v.code(), Ordering::Relaxed);
}

/// The environment variable that turns the folded combine's group merge off (read once per
/// process). Where every block of a folded launch of 16 splits or more can be resident at once,
/// the launcher makes it cooperative and each (request, kv head) group's blocks wait for the group's last split, then
/// merge equal shares of its output side by side (the default); with `0`, the group's last block
/// merges alone, as on grids larger than the device holds and on a launch beside other work
/// ([`Overlap::launch`](super::Overlap::launch)), where the group's blocks could wait for SMs the
/// other kernel holds. The two give the same bits; the setting exists so that tests reach the
/// last-block merge on small grids. Values: unset or `1`
/// (on), `0` (off); anything else makes decode launches fail with [`KernelError::InvalidArgument`].
pub const DECODE_GROUP_MERGE_ENV: &str = "PAGED_ATTN_DECODE_GROUP_MERGE";

/// `PaAttnArgs::decode_variant`'s bit that turns the group merge off (kGroupMergeOffBit).
pub(super) const GROUP_MERGE_OFF_BIT: u32 = 1 << 9;

/// Whether folded decode launches may merge by groups ([`DECODE_GROUP_MERGE_ENV`], read once).
///
/// # Errors
/// [`KernelError::InvalidArgument`] when the variable holds something other than `0` or `1`.
pub(super) fn group_merge() -> Result<bool, KernelError> {
    static ENV: OnceLock<Result<bool, KernelError>> = OnceLock::new();
    ENV.get_or_init(|| group_merge_from(std::env::var(DECODE_GROUP_MERGE_ENV))).clone()
}

/// [`group_merge`] for one reading of the environment variable.
fn group_merge_from(var: Result<String, std::env::VarError>) -> Result<bool, KernelError> {
    let parse = |s: &str| match s.trim() {
        "1" => Some(true),
        "0" => Some(false),
        _ => None,
    };
    crate::env_setting::read(var, true, parse)
        .map_err(|v| invalid(DECODE, format!("{DECODE_GROUP_MERGE_ENV}={v}: expected 0 (off) or 1 (on)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_names_round_trip() {
        for v in DecodeVariant::ALL {
            assert_eq!(v.to_string().parse::<DecodeVariant>(), Ok(v));
            assert_eq!(DecodeVariant::from_code(v.code()), Some(v));
        }
        assert_eq!(DecodeVariant::ALL[0], DecodeVariant::default());
        // The default folds the combine; the bare pipeline name is the second launch.
        assert_eq!(DecodeVariant::default().to_string(), "auto-fold");
        // The kernels' numbering (enum DecodeVariant in paged_decode.cu).
        let codes: Vec<u32> = DecodePipeline::ALL.iter().map(|p| p.code()).collect();
        assert_eq!(codes, [5, 0, 1, 2, 3, 4]);
        for p in DecodePipeline::ALL {
            assert_eq!(DecodePipeline::from_code(p.code()), Some(p));
        }
        assert_eq!(DecodePipeline::from_code(6), None);
        assert_eq!("w4s3".parse::<DecodeVariant>().map(|v| v.fold_combine), Ok(false));
        assert_eq!("W2S4-Fold".parse::<DecodeVariant>().map(|v| v.fold_combine), Ok(true));
        assert!("w9s9".parse::<DecodeVariant>().is_err());
    }

    #[test]
    fn group_merge_from_the_environment() {
        use std::env::VarError;
        assert_eq!(group_merge_from(Err(VarError::NotPresent)), Ok(true));
        assert_eq!(group_merge_from(Ok(" 0 ".into())), Ok(false));
        assert_eq!(group_merge_from(Ok("1".into())), Ok(true));
        match group_merge_from(Ok("off".into())) {
            Err(KernelError::InvalidArgument { kernel, what }) => {
                assert_eq!(kernel, DECODE);
                assert_eq!(what, "PAGED_ATTN_DECODE_GROUP_MERGE=off: expected 0 (off) or 1 (on)");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn decode_variant_from_the_environment() {
        use std::env::VarError;
        assert_eq!(variant_from_env(Err(VarError::NotPresent)), Ok(DecodeVariant::default()));
        let w2s4 = variant_from_env(Ok(" W2S4 ".into())).unwrap();
        assert_eq!((w2s4.to_string().as_str(), w2s4.fold_combine), ("w2s4", false));
        match variant_from_env(Ok("w9s9".into())) {
            Err(KernelError::InvalidArgument { kernel, what }) => {
                assert_eq!(kernel, DECODE);
                assert!(what.starts_with("PAGED_ATTN_DECODE_VARIANT: unknown decode variant \"w9s9\""), "{what}");
            }
            other => panic!("{other:?}"),
        }
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            let raw = std::ffi::OsString::from_vec(vec![0xff, b'x']);
            assert!(matches!(
                variant_from_env(Err(VarError::NotUnicode(raw))),
                Err(KernelError::InvalidArgument { .. })
            ));
        }
    }
}
