//! The command line: flags, the defaults that depend on the device, and the checks that turn a bad
//! combination into a one-line error before anything is allocated.

use std::path::PathBuf;

use attention_backend::{DType, Device, DeviceRequest};
use clap::Parser;

use crate::model::{AttentionVariant, ModelShape};
use crate::scheduler::SchedulerConfig;
use crate::verify::Sample;
use crate::workload::{PrefixSharing, Shape, WorkloadSpec, MAX_SEQ_LEN};
use crate::ServeError;

/// Head sizes the CUDA kernels are compiled for.
pub const CUDA_HEAD_SIZES: [usize; 7] = [64, 80, 96, 112, 128, 192, 256];

/// Simulates an LLM serving run with a synthetic model; every step's KV-cache write and attention
/// go through the real paged-attention path.
///
/// Requests arrive (Poisson, or from a trace), a vLLM-v1-style scheduler batches them under a token
/// budget with chunked prefill, decodes first, blocks from the block pool, preemption by
/// recomputation and prefix caching; the model runner builds each step's metadata and every layer
/// runs the attention backend on its own paged KV cache. Time is counted in steps, so the same
/// flags give the same run. Defaults marked "cpu / cuda" depend on the device.
#[derive(Parser, Debug, Clone, PartialEq)]
#[command(name = "paged-serve", version, about, after_help = AFTER_HELP, args_override_self = true)]
pub struct Cli {
    /// Device: auto (CUDA when built with --features cuda and a GPU is visible, else the CPU),
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "PAGED_ATTN_DEVICE", default_value = "auto", help_heading = "Device and model")]
    pub device: String,
    /// Storage type of Q/K/V and the KV cache: f32, f16 or bf16 [default: f32 on cpu, bf16 on cuda]
    #[arg(long, value_parser = parse_dtype, help_heading = "Device and model")]
    pub dtype: Option<DType>,
    /// A published model's attention shape: llama3-8b, llama3-70b, qwen2.5-7b, qwen2.5-72b,
    /// mistral-7b (window 4096), gemma2-9b, gemma2-27b (window 4096 on even layers, soft-cap 50,
    /// their own scale). Sets layers, heads, KV heads, head size, window and soft-cap; the explicit
    /// flags below override each of them
    #[arg(long, value_name = "NAME", value_parser = parse_model, help_heading = "Device and model")]
    pub model: Option<&'static str>,
    /// Attention layers, each with its own KV cache [default: 4 / 8]
    #[arg(long, value_name = "N", help_heading = "Device and model")]
    pub layers: Option<usize>,
    /// Query heads [default: 8 / 32]
    #[arg(long, value_name = "N", help_heading = "Device and model")]
    pub heads: Option<usize>,
    /// Key/value heads; must divide --heads (GQA) [default: 2 / 8]
    #[arg(long, value_name = "N", help_heading = "Device and model")]
    pub kv_heads: Option<usize>,
    /// Elements per head (cuda: 64, 80, 96, 112, 128, 192 or 256) [default: 64 / 128]
    #[arg(long, value_name = "N", help_heading = "Device and model")]
    pub head_size: Option<usize>,
    /// Sliding window: each query sees itself and the N-1 keys before it, on every layer (with
    /// --model gemma2-*: on its windowed layers); 0 turns a preset's window off [default: none]
    #[arg(long, value_name = "N", help_heading = "Device and model")]
    pub sliding_window: Option<usize>,
    /// Logit soft-cap `cap * tanh(s / cap)`; 0 turns a preset's cap off [default: none]
    #[arg(long, value_name = "CAP", help_heading = "Device and model")]
    pub softcap: Option<f32>,
    /// cuda: run decode-only steps eagerly instead of replaying them from CUDA graphs captured per
    /// padded batch size (to compare)
    #[arg(long, help_heading = "Device and model")]
    pub no_graphs: bool,
    /// cuda: batch-invariant attention, so a request's tokens do not depend on what else is in its
    /// batch (fixed-size decode splits; also PAGED_ATTN_BATCH_INVARIANT=1). The CPU backend is
    /// batch-invariant always
    #[arg(long, help_heading = "Device and model")]
    pub batch_invariant: bool,
    /// Tokens per KV-cache block (cuda: a multiple of 16)
    #[arg(long, value_name = "N", default_value_t = 16, help_heading = "Device and model")]
    pub block_size: usize,
    /// KV-cache size in blocks (per layer) [default: 1024 / 32768]
    #[arg(long, value_name = "N", help_heading = "Device and model", conflicts_with = "kv_cache_memory")]
    pub num_blocks: Option<usize>,
    /// KV-cache size as memory for all layers' K and V together (e.g. 8GiB, 512MiB, 1e9); the
    /// blocks that fit follow from the cache's element size (an FP8 cache holds twice the blocks)
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, help_heading = "Device and model")]
    pub kv_cache_memory: Option<u64>,
    /// Storage type of the KV cache: auto (= --dtype), fp8_e4m3 (alias fp8) or fp8_e5m2. An FP8
    /// cache stores fp8(x / scale) and is read as stored * scale (vLLM's kv_cache_dtype)
    #[arg(long, value_name = "TYPE", default_value = "auto", value_parser = parse_kv_dtype, help_heading = "Device and model")]
    pub kv_cache_dtype: KvCacheDType,
    /// FP8 caches: the K and V scale of every layer (vLLM's default 1.0; the synthetic model's
    /// values lie in [-1, 1], so 1/448 would use E4M3's whole range)
    #[arg(long, value_name = "SCALE", help_heading = "Device and model")]
    pub kv_scale: Option<f32>,

    /// Requests in the workload [default: 200 / 1024]
    #[arg(long, value_name = "N", help_heading = "Workload")]
    pub requests: Option<usize>,
    /// Mean arrivals per step (Poisson); `inf` puts every request at step 0 [default: 1 / 8]
    #[arg(long, value_name = "R", allow_negative_numbers = true, help_heading = "Workload")]
    pub arrival_rate: Option<f64>,
    /// Mean prompt length; lengths are uniform in [len/2, 3*len/2] [default: 256 / 1024]
    #[arg(long, value_name = "N", help_heading = "Workload")]
    pub prompt_len: Option<usize>,
    /// Mean output length, same spread [default: 96 / 256]
    #[arg(long, value_name = "N", help_heading = "Workload")]
    pub output_len: Option<usize>,
    /// Read arrivals and lengths from a file instead: CSV lines `arrival,prompt_len,output_len`
    /// or JSON lines {"arrival": 0, "prompt_len": 100, "output_len": 20}; arrival in steps.
    /// Cannot be combined with --requests, --arrival-rate, --prompt-len or --output-len
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "Workload",
        conflicts_with_all = ["requests", "arrival_rate", "prompt_len", "output_len"]
    )]
    pub trace: Option<PathBuf>,
    /// Fraction of prompts that start with one shared prefix (exercises the prefix cache)
    #[arg(
        long,
        default_value_t = 0.25,
        value_name = "FRACTION",
        allow_negative_numbers = true,
        help_heading = "Workload"
    )]
    pub shared_prefix: f64,
    /// Tokens of the shared prefix [default: 64 / 512]
    #[arg(long, value_name = "TOKENS", help_heading = "Workload")]
    pub shared_prefix_len: Option<usize>,
    /// Seed of arrivals, prompts and the synthetic model
    #[arg(long, value_name = "N", default_value_t = 0, help_heading = "Workload")]
    pub seed: u64,

    /// Token budget per step (prompts longer than that are prefilled in chunks) [default: 512 / 8192]
    #[arg(long, value_name = "N", help_heading = "Scheduler")]
    pub max_num_batched_tokens: Option<usize>,
    /// Requests running at once [default: 64 / 256]
    #[arg(long, value_name = "N", help_heading = "Scheduler")]
    pub max_num_seqs: Option<usize>,
    /// Do not reuse cached prefix blocks
    #[arg(long, help_heading = "Scheduler")]
    pub no_prefix_caching: bool,

    /// Check steps against an independent f64 dense attention; exit non-zero on a mismatch
    #[arg(long, help_heading = "Checking and output")]
    pub verify: bool,
    /// With --verify (a usage error without it): check every K-th step; 1 checks every step
    /// [default: 8]
    #[arg(long, value_name = "K", help_heading = "Checking and output")]
    pub verify_every: Option<u64>,
    /// With --verify: layers checked per step, spread from the first to the last [default: 2]
    #[arg(long, value_name = "N", help_heading = "Checking and output")]
    pub verify_layers: Option<usize>,
    /// With --verify: requests checked per layer-step (spread over the batch; each checks at most
    /// 64 of its query rows), so a big GPU batch is checked in seconds [default: 16]
    #[arg(long, value_name = "N", help_heading = "Checking and output")]
    pub verify_requests: Option<usize>,
    /// Print the summary as one JSON object on stdout
    #[arg(long, help_heading = "Checking and output")]
    pub json: bool,
    /// No progress bar (it is also hidden when stderr is not a terminal)
    #[arg(long, help_heading = "Checking and output")]
    pub no_progress: bool,
}

const AFTER_HELP: &str = "\
Examples:
  cargo run --release -p paged-serve                         # the default run on the CPU
  cargo run --release -p paged-serve -- --verify --verify-every 1 --requests 16
  cargo run --release -p paged-serve --features cuda -- --device cuda --verify
  paged-serve --num-blocks 40 --max-num-batched-tokens 64     # tiny cache: preemptions, chunked prefill
  paged-serve --num-blocks 12 --requests 800 --prompt-len 40 --output-len 40 --layers 2 --verify \\
    --verify-every 1                                         # a soak: constant preemption, all verified

The summary reports tokens, steps, attention time per step (p50/p99), throughput, the K/V bytes
attention read and their rate, peak cache use, preemptions and prefix-cache hits, and ends with the
checks: steps, preemptions, verified layer-steps, mismatches and the blocks returned to the pool.

Sizes are checked before anything is allocated: a sequence (3/2 of --prompt-len plus 3/2 of
--output-len) and --max-num-batched-tokens must fit i32, and the memory the run needs (KV caches on
the CPU, workload, step buffers, the --verify reference) must fit this machine's memory.

Exit status: 0 on success (also when the reader of stdout closes the pipe early, as with
`| head`); 1 when the run fails (backend error, verification mismatch, a block not returned to the
pool, stdout cannot be written); 2 for a usage error (bad, conflicting or impossible flags).";

fn parse_model(s: &str) -> Result<&'static str, String> {
    crate::model::preset(s)
        .map(|p| p.name)
        .ok_or_else(|| format!("unknown model `{s}` (expected one of {})", crate::model::preset_names()))
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match s.parse::<DType>() {
        // The FP8 types are KV-cache storage only (`--kv-cache-dtype`), never the compute type.
        Ok(d) if !d.is_fp8() => Ok(d),
        _ => Err(format!("unknown dtype `{s}` (expected f32, f16 or bf16)")),
    }
}

/// The KV cache's storage as the summary names it: `bf16`, or `fp8_e4m3 (scale 0.0022)`.
pub fn describe_kv_cache(cfg: &RunConfig) -> String {
    if cfg.kv_cache_dtype.is_fp8() {
        format!("{} (scale {})", cfg.kv_cache_dtype, cfg.kv_scale)
    } else {
        cfg.kv_cache_dtype.to_string()
    }
}

/// `--kv-cache-dtype`: the compute type, or an FP8 storage type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvCacheDType {
    /// The same as `--dtype`.
    Auto,
    /// A given type (an FP8 one, or the compute type named explicitly).
    Is(DType),
}

fn parse_kv_dtype(s: &str) -> Result<KvCacheDType, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(KvCacheDType::Auto);
    }
    s.parse::<DType>()
        .map(KvCacheDType::Is)
        .map_err(|_| format!("unknown KV-cache dtype `{s}` (expected auto, fp8_e4m3, fp8 or fp8_e5m2)"))
}

/// A byte count: a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB, TiB; `1e9` too).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("`{s}`: unknown unit `{other}` (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("`{s}` is not a number of bytes"))?;
    let bytes = v * mult;
    if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(format!("`{s}` is not a usable number of bytes"));
    }
    Ok(bytes as u64)
}

/// Everything a run needs, with the device's defaults filled in and checked.
#[derive(Clone, Debug, PartialEq)]
pub struct RunConfig {
    /// The device asked for.
    pub device: DeviceRequest,
    /// Compute type (Q, K, V, outputs).
    pub dtype: DType,
    /// KV-cache storage type: `dtype`, or an FP8 type.
    pub kv_cache_dtype: DType,
    /// FP8 caches: the K and V scale of every layer (1.0 otherwise, unused).
    pub kv_scale: f32,
    /// Model sizes.
    pub shape: ModelShape,
    /// The `--model` preset, if any.
    pub model: Option<&'static str>,
    /// Window, soft-cap and scale of the layers.
    pub attention: AttentionVariant,
    /// cuda: replay decode-only steps from CUDA graphs.
    pub graphs: bool,
    /// cuda: plan batch-invariant attention (or-ed with `PAGED_ATTN_BATCH_INVARIANT`).
    pub batch_invariant: bool,
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks per layer's cache.
    pub num_blocks: usize,
    /// Scheduler limits.
    pub scheduler: SchedulerConfig,
    /// Arrivals and lengths.
    pub workload: WorkloadSpec,
    /// Shared prompt prefixes.
    pub sharing: PrefixSharing,
    /// Seed.
    pub seed: u64,
    /// `Some((every, layers))` with `--verify`.
    pub verify: Option<(u64, Vec<usize>)>,
    /// How much of a checked layer-step is recomputed.
    pub verify_sample: Sample,
    /// Show a progress bar.
    pub progress: bool,
}

/// Per-device defaults: the CPU's finish in well under a minute on two cores; the GPU's keep an
/// H100 busy with long prompts and a big batch.
struct Defaults {
    dtype: DType,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_size: usize,
    num_blocks: usize,
    requests: usize,
    arrival_rate: f64,
    prompt_len: usize,
    output_len: usize,
    shared_prefix_len: usize,
    max_num_batched_tokens: usize,
    max_num_seqs: usize,
}

const CPU_DEFAULTS: Defaults = Defaults {
    dtype: DType::F32,
    layers: 4,
    heads: 8,
    kv_heads: 2,
    head_size: 64,
    num_blocks: 1024,
    requests: 200,
    arrival_rate: 1.0,
    prompt_len: 256,
    output_len: 96,
    shared_prefix_len: 64,
    max_num_batched_tokens: 512,
    max_num_seqs: 64,
};

const CUDA_DEFAULTS: Defaults = Defaults {
    dtype: DType::BF16,
    layers: 8,
    heads: 32,
    kv_heads: 8,
    head_size: 128,
    num_blocks: 32768,
    requests: 1024,
    arrival_rate: 8.0,
    prompt_len: 1024,
    output_len: 256,
    shared_prefix_len: 512,
    max_num_batched_tokens: 8192,
    max_num_seqs: 256,
};

fn usage(msg: impl Into<String>) -> ServeError {
    ServeError::Usage(msg.into())
}

/// Parses `--device` (or `PAGED_ATTN_DEVICE`).
///
/// # Errors
/// [`ServeError::Usage`] for anything but auto, cpu, cuda, cuda:N.
pub fn device_request(cli: &Cli) -> Result<DeviceRequest, ServeError> {
    cli.device
        .parse::<DeviceRequest>()
        .map_err(|_| usage(format!("--device `{}`: expected auto, cpu, cuda or cuda:N", cli.device)))
}

impl Cli {
    /// Fills in the defaults of `device` (the device the backend actually selected) and checks
    /// every flag that can be checked before the workload exists.
    ///
    /// # Errors
    /// [`ServeError::Usage`] naming the first bad flag.
    pub fn resolve(&self, request: DeviceRequest, device: Device) -> Result<RunConfig, ServeError> {
        let d = if device == Device::Cpu { &CPU_DEFAULTS } else { &CUDA_DEFAULTS };
        let dtype = self.dtype.unwrap_or(d.dtype);
        let preset = self.model.and_then(crate::model::preset);
        let base = preset.map_or(
            ModelShape { num_layers: d.layers, num_heads: d.heads, num_kv_heads: d.kv_heads, head_size: d.head_size },
            |p| p.shape,
        );
        let shape = ModelShape {
            num_layers: self.layers.unwrap_or(base.num_layers),
            num_heads: self.heads.unwrap_or(base.num_heads),
            num_kv_heads: self.kv_heads.unwrap_or(base.num_kv_heads),
            head_size: self.head_size.unwrap_or(base.head_size),
        };
        let mut attention = preset.map(|p| p.variant).unwrap_or_default();
        if let Some(n) = self.sliding_window {
            attention.sliding_window = (n > 0).then_some(n);
        }
        if let Some(cap) = self.softcap {
            if !cap.is_finite() || cap < 0.0 {
                return Err(usage(format!("--softcap {cap} must be a positive number (0 turns it off)")));
            }
            attention.softcap = (cap > 0.0).then_some(cap);
        }
        let kv_cache_dtype = match self.kv_cache_dtype {
            KvCacheDType::Auto => dtype,
            KvCacheDType::Is(k) if k.is_fp8() || k == dtype => k,
            KvCacheDType::Is(k) => {
                return Err(usage(format!(
                    "--kv-cache-dtype {k} with --dtype {dtype}: the cache is either the compute type (auto) or FP8"
                )))
            }
        };
        let kv_scale = match (self.kv_scale, kv_cache_dtype.is_fp8()) {
            (None, _) => 1.0,
            (Some(s), true) if s.is_finite() && s > 0.0 => s,
            (Some(s), true) => return Err(usage(format!("--kv-scale {s} must be a positive finite number"))),
            (Some(_), false) => return Err(usage("--kv-scale applies only to an FP8 --kv-cache-dtype")),
        };
        let num_blocks = match self.kv_cache_memory {
            None => self.num_blocks.unwrap_or(d.num_blocks),
            Some(bytes) => {
                let spec = model_runner::KvCacheSpec {
                    num_layers: shape.num_layers.max(1),
                    block_size: self.block_size.max(1),
                    num_kv_heads: shape.num_kv_heads.max(1),
                    head_size: shape.head_size.max(1),
                    dtype: kv_cache_dtype,
                };
                spec.blocks_for_memory(bytes).map_err(|e| usage(format!("--kv-cache-memory: {e}")))?
            }
        };
        let positive = [
            ("--layers", shape.num_layers),
            ("--heads", shape.num_heads),
            ("--kv-heads", shape.num_kv_heads),
            ("--head-size", shape.head_size),
            ("--block-size", self.block_size),
            ("--num-blocks", num_blocks),
            ("--requests", self.requests.unwrap_or(d.requests)),
            ("--prompt-len", self.prompt_len.unwrap_or(d.prompt_len)),
            ("--output-len", self.output_len.unwrap_or(d.output_len)),
            ("--max-num-batched-tokens", self.max_num_batched_tokens.unwrap_or(d.max_num_batched_tokens)),
            ("--max-num-seqs", self.max_num_seqs.unwrap_or(d.max_num_seqs)),
            ("--verify-every", usize::from(self.verify_every() != 0)),
            ("--verify-layers", self.verify_layers()),
            ("--verify-requests", self.verify_requests()),
        ];
        if let Some((flag, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(usage(format!("{flag} must be positive")));
        }
        self.check_combinations()?;
        self.check_limits(d)?;
        if !shape.num_heads.is_multiple_of(shape.num_kv_heads) {
            return Err(usage(format!(
                "--heads {} is not a multiple of --kv-heads {} (each kv head serves a whole group of query heads)",
                shape.num_heads, shape.num_kv_heads
            )));
        }
        if device == Device::Cuda {
            if dtype == DType::F32 {
                return Err(usage("--dtype f32 runs only on the CPU; use --dtype bf16 or f16 on cuda"));
            }
            if !CUDA_HEAD_SIZES.contains(&shape.head_size) {
                return Err(usage(format!(
                    "--head-size {} is not supported by the cuda backend (supported: 64, 80, 96, 112, 128, 192, 256)",
                    shape.head_size
                )));
            }
            if !self.block_size.is_multiple_of(16) {
                return Err(usage(format!(
                    "--block-size {} is not supported by the cuda backend (use a multiple of 16)",
                    self.block_size
                )));
            }
        }
        let rate = self.arrival_rate.unwrap_or(d.arrival_rate);
        if rate.is_nan() || rate < 0.0 {
            return Err(usage(format!("--arrival-rate {rate} must be a non-negative number of requests per step")));
        }
        if !(0.0..=1.0).contains(&self.shared_prefix) {
            return Err(usage(format!("--shared-prefix {} must be a fraction in [0, 1]", self.shared_prefix)));
        }
        let workload = match &self.trace {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| usage(format!("--trace {}: cannot read it: {e}", path.display())))?;
                let entries = crate::workload::parse_trace(&text)
                    .map_err(|e| usage(format!("--trace {}: {e}", path.display())))?;
                WorkloadSpec::Trace(entries)
            }
            None => WorkloadSpec::Poisson {
                num_requests: self.requests.unwrap_or(d.requests),
                rate,
                prompt_len: self.prompt_len.unwrap_or(d.prompt_len),
                output_len: self.output_len.unwrap_or(d.output_len),
            },
        };
        let verify = self.verify.then(|| {
            // `n` layers spread evenly from the first to the last.
            let (l, n) = (shape.num_layers, self.verify_layers().min(shape.num_layers));
            let mut layers: Vec<usize> = (0..n).map(|i| if n == 1 { 0 } else { i * (l - 1) / (n - 1) }).collect();
            layers.dedup();
            (self.verify_every(), layers)
        });
        Ok(RunConfig {
            device: request,
            dtype,
            kv_cache_dtype,
            kv_scale,
            shape,
            model: self.model,
            attention,
            graphs: !self.no_graphs,
            batch_invariant: self.batch_invariant,
            block_size: self.block_size,
            num_blocks,
            scheduler: SchedulerConfig {
                max_num_batched_tokens: self.max_num_batched_tokens.unwrap_or(d.max_num_batched_tokens),
                max_num_seqs: self.max_num_seqs.unwrap_or(d.max_num_seqs),
                enable_prefix_caching: !self.no_prefix_caching,
            },
            workload,
            sharing: PrefixSharing {
                fraction: self.shared_prefix,
                len: self.shared_prefix_len.unwrap_or(d.shared_prefix_len),
            },
            seed: self.seed,
            verify,
            verify_sample: Sample { max_requests: self.verify_requests(), ..Sample::default() },
            progress: !self.no_progress,
        })
    }
}

impl Cli {
    /// `--verify-every`, defaulted.
    fn verify_every(&self) -> u64 {
        self.verify_every.unwrap_or(8)
    }

    /// `--verify-layers`, defaulted.
    fn verify_layers(&self) -> usize {
        self.verify_layers.unwrap_or(2)
    }

    /// `--verify-requests`, defaulted.
    fn verify_requests(&self) -> usize {
        self.verify_requests.unwrap_or(Sample::default().max_requests)
    }

    /// Flags that only mean something together with another one.
    fn check_combinations(&self) -> Result<(), ServeError> {
        if !self.verify {
            let given = [
                ("--verify-every", self.verify_every.is_some()),
                ("--verify-layers", self.verify_layers.is_some()),
                ("--verify-requests", self.verify_requests.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
                return Err(usage(format!("{flag} needs --verify (without it nothing is checked)")));
            }
        }
        Ok(())
    }

    /// The limits of the types sizes end up in, checked on the flags themselves (before any
    /// product of them is formed): a sequence's tokens and the step budget are `i32` in the
    /// attention metadata, block ids are `i32` in the block table, and slots are `i64`.
    fn check_limits(&self, d: &Defaults) -> Result<(), ServeError> {
        let max_seq = MAX_SEQ_LEN;
        if self.trace.is_none() {
            // Poisson lengths reach 3/2 of the mean.
            let hi = |len: usize| len.checked_add(len / 2).filter(|&n| n <= max_seq);
            let prompt = self.prompt_len.unwrap_or(d.prompt_len);
            let output = self.output_len.unwrap_or(d.output_len);
            let Some(p) = hi(prompt) else {
                return Err(usage(format!(
                    "--prompt-len {prompt} is too large: prompts reach 3/2 of it, and a sequence holds at most \
                     {max_seq} tokens (i32 sequence lengths)"
                )));
            };
            if hi(output).and_then(|o| o.checked_add(p)).is_none_or(|n| n > max_seq) {
                return Err(usage(format!(
                    "--output-len {output} is too large: with --prompt-len {prompt}, sequences reach 3/2 of both, and \
                     a sequence holds at most {max_seq} tokens (i32 sequence lengths)"
                )));
            }
        }
        let shared = self.shared_prefix_len.unwrap_or(d.shared_prefix_len);
        if shared > max_seq {
            return Err(usage(format!("--shared-prefix-len {shared} is past the {max_seq}-token limit of a sequence")));
        }
        let budget = self.max_num_batched_tokens.unwrap_or(d.max_num_batched_tokens);
        if budget > i32::MAX as usize {
            return Err(usage(format!(
                "--max-num-batched-tokens {budget} is past the limit of {} (token counts are i32 on the device)",
                i32::MAX
            )));
        }
        let num_blocks = self.num_blocks.unwrap_or(d.num_blocks);
        if num_blocks > i32::MAX as usize {
            return Err(usage(format!(
                "--num-blocks {num_blocks} is past the limit of {} (block ids are i32 in the block table)",
                i32::MAX
            )));
        }
        if num_blocks.checked_mul(self.block_size).is_none_or(|n| i64::try_from(n).is_err()) {
            return Err(usage(format!(
                "--num-blocks {num_blocks} x --block-size {} slots overflow the i64 slot mapping",
                self.block_size
            )));
        }
        Ok(())
    }
}

/// Checks that the workload can run at all: the longest request must fit the cache alone
/// (otherwise preemption could never make room for it). Works on the shapes, before any prompt
/// is built.
///
/// # Errors
/// [`ServeError::Usage`] naming the request and the cache size it needs.
pub fn check_fits(cfg: &RunConfig, shapes: &[Shape]) -> Result<(), ServeError> {
    let Some((id, big)) = shapes.iter().enumerate().max_by_key(|(_, r)| r.max_len()) else {
        return Err(usage("the workload has no request"));
    };
    let need = big.max_len().div_ceil(cfg.block_size);
    if need > cfg.num_blocks {
        return Err(usage(format!(
            "--num-blocks {} is too small: request {} needs {} tokens (prompt {} + output {}) = {} blocks of {}; \
             raise --num-blocks to at least {} or shorten the requests",
            cfg.num_blocks,
            id,
            big.max_len(),
            big.prompt_len,
            big.output_len,
            need,
            cfg.block_size,
            need
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(args: &[&str], device: Device) -> Result<RunConfig, String> {
        let cli = Cli::try_parse_from(std::iter::once("paged-serve").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.resolve(DeviceRequest::Auto, device).map_err(|e| e.to_string())
    }

    #[test]
    fn device_dependent_defaults() {
        let cpu = resolve(&[], Device::Cpu).unwrap();
        assert_eq!((cpu.dtype, cpu.shape.num_layers, cpu.num_blocks), (DType::F32, 4, 1024));
        let gpu = resolve(&[], Device::Cuda).unwrap();
        assert_eq!((gpu.dtype, gpu.shape.head_size), (DType::BF16, 128));
        let custom =
            resolve(&["--dtype", "bf16", "--layers", "3", "--verify", "--verify-layers", "5"], Device::Cpu).unwrap();
        assert_eq!((custom.dtype, custom.shape.num_layers), (DType::BF16, 3));
        assert_eq!(custom.verify, Some((8, vec![0, 1, 2])));
        let two = resolve(&["--layers", "6", "--verify"], Device::Cpu).unwrap();
        assert_eq!(two.verify, Some((8, vec![0, 5])));
    }

    #[test]
    fn bad_flags_get_one_line_errors() {
        let cases: &[(&[&str], Device, &str)] = &[
            (&["--heads", "6", "--kv-heads", "4"], Device::Cpu, "--heads 6 is not a multiple of --kv-heads 4"),
            (&["--dtype", "fp8"], Device::Cpu, "unknown dtype `fp8`"),
            (&["--head-size", "72"], Device::Cuda, "--head-size 72 is not supported by the cuda backend"),
            (&["--dtype", "f32"], Device::Cuda, "f32 runs only on the CPU"),
            (&["--block-size", "8"], Device::Cuda, "multiple of 16"),
            (&["--layers", "0"], Device::Cpu, "--layers must be positive"),
            (&["--shared-prefix", "1.5"], Device::Cpu, "fraction"),
            (&["--arrival-rate", "-1"], Device::Cpu, "--arrival-rate"),
            (&["--trace", "/nonexistent/trace.csv"], Device::Cpu, "cannot read it"),
            (&["--kv-cache-dtype", "int4"], Device::Cpu, "unknown KV-cache dtype `int4`"),
            (&["--dtype", "bf16", "--kv-cache-dtype", "f16"], Device::Cpu, "either the compute type (auto) or FP8"),
            (&["--kv-scale", "0.5"], Device::Cpu, "only to an FP8 --kv-cache-dtype"),
            (&["--kv-cache-dtype", "fp8", "--kv-scale", "0"], Device::Cpu, "--kv-scale 0 must be a positive"),
            (&["--kv-cache-dtype", "fp8", "--kv-scale", "inf"], Device::Cpu, "must be a positive finite"),
            (&["--kv-cache-memory", "12 parsecs"], Device::Cpu, "unknown unit"),
            (&["--kv-cache-memory", "1KiB"], Device::Cpu, "hold no KV-cache block"),
            (&["--kv-cache-memory", "1GiB", "--num-blocks", "8"], Device::Cpu, "cannot be used with"),
        ];
        for (args, dev, want) in cases {
            let err = resolve(args, *dev).unwrap_err();
            assert!(err.contains(want), "{args:?}: `{err}` lacks `{want}`");
        }
        // The CPU runs head sizes and block sizes the CUDA kernels do not.
        assert!(resolve(&["--head-size", "72", "--block-size", "8"], Device::Cpu).is_ok());
    }

    #[test]
    fn kv_cache_dtype_and_memory() {
        let auto = resolve(&["--dtype", "bf16"], Device::Cpu).unwrap();
        assert_eq!((auto.kv_cache_dtype, auto.kv_scale), (DType::BF16, 1.0));
        let fp8 = resolve(&["--dtype", "f16", "--kv-cache-dtype", "fp8", "--kv-scale", "0.25"], Device::Cpu).unwrap();
        assert_eq!((fp8.kv_cache_dtype, fp8.kv_scale), (DType::Fp8E4M3, 0.25));
        assert_eq!(describe_kv_cache(&fp8), "fp8_e4m3 (scale 0.25)");
        let e5 = resolve(&["--kv-cache-dtype", "fp8_e5m2"], Device::Cuda).unwrap();
        assert_eq!((e5.dtype, e5.kv_cache_dtype), (DType::BF16, DType::Fp8E5M2));
        // 4 layers x 2 x 16 tokens x 2 kv heads x 64 x elem bytes per block: f32 4, FP8 1.
        let mem = |kv: &str| {
            resolve(&["--kv-cache-memory", "64MiB", "--kv-cache-dtype", kv], Device::Cpu).unwrap().num_blocks
        };
        assert_eq!(mem("auto"), (64 << 20) / (4 * 2 * 16 * 2 * 64 * 4));
        assert_eq!(mem("fp8_e5m2"), 4 * mem("auto"));
        assert_eq!(parse_bytes("1e9"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("2 GiB"), Ok(2 << 30));
        assert!(parse_bytes("-3MB").is_err());
    }

    #[test]
    fn a_cache_too_small_for_one_request() {
        let cfg = resolve(&["--num-blocks", "4", "--block-size", "16"], Device::Cpu).unwrap();
        let req = Shape { arrival_step: 0, prompt_len: 60, output_len: 10 };
        let err = check_fits(&cfg, &[req]).unwrap_err().to_string();
        assert!(err.contains("--num-blocks 4 is too small") && err.contains("at least 5"), "{err}");
    }
}
