//! What a run reports: a human summary and the same numbers as JSON.
//!
//! The JSON is written by hand: it is one flat object of numbers and a few strings, which does not
//! justify a serialisation dependency.

use std::fmt::{self, Write as _};
use std::time::Duration;

use crate::ServeError;

/// The result of a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// The backend, e.g. `cpu (2 threads)` or `cuda:0 (NVIDIA H100 80GB HBM3)`.
    pub device: String,
    /// Compute type of Q/K/V and the outputs.
    pub dtype: String,
    /// Storage type of the KV cache (the compute type, or an FP8 type with its scale).
    pub kv_cache_dtype: String,
    /// Attention layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_size: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the cache (per layer).
    pub num_blocks: usize,
    /// Requests in the workload.
    pub requests: usize,
    /// Requests that finished.
    pub requests_finished: usize,
    /// Sum of prompt lengths.
    pub prompt_tokens: usize,
    /// Tokens generated (sum of output lengths when all finished).
    pub generated_tokens: usize,
    /// A digest of every request's generated tokens (equal digests: the same text generated).
    pub tokens_digest: u64,
    /// Tokens computed at prompt positions, recomputation after preemption included.
    pub prompt_tokens_computed: usize,
    /// Tokens computed at output positions (decodes and recomputation).
    pub output_tokens_computed: usize,
    /// Admissions that hit the prefix cache.
    pub prefix_hit_requests: usize,
    /// Tokens taken from the prefix cache instead of computed.
    pub prefix_hit_tokens: usize,
    /// Preemptions.
    pub preemptions: usize,
    /// Steps run (idle steps skipped).
    pub steps: usize,
    /// Most blocks referenced at once.
    pub peak_blocks_used: usize,
    /// Wall time of the serving loop.
    pub wall: Duration,
    /// The `--model` preset, if any.
    pub model: Option<String>,
    /// The attention variant, e.g. `causal` or `window 4096 on even layers, soft-cap 50`.
    pub attention: String,
    /// Attention time of each step (KV-cache write + attention, all layers).
    pub step_attention: Vec<Duration>,
    /// Per step: scheduling and input preparation (scheduler, model runner, token ids, and the
    /// scheduler's update with the sampled tokens). Host time.
    pub step_schedule: Vec<Duration>,
    /// Per step: planning and uploading the step's metadata and inputs. Host time.
    pub step_plan: Vec<Duration>,
    /// Per step: generating Q/K/V of all layers (the synthetic model). Device time on cuda.
    pub step_model: Vec<Duration>,
    /// Per step: choosing the next tokens (and, on cuda, downloading them). Device time on cuda.
    pub step_sampling: Vec<Duration>,
    /// Steps replayed from a CUDA graph (0 on the CPU or with `--no-graphs`).
    pub graph_steps: usize,
    /// CUDA graphs captured (one per padded batch size seen).
    pub graphs_captured: usize,
    /// Whether CUDA graphs were enabled (`None` on the CPU).
    pub graphs: Option<bool>,
    /// K/V bytes the steps' attention had to read (every layer, both caches).
    pub kv_read_bytes: u64,
    /// Layer-steps checked against the `f64` reference (0 without `--verify`).
    pub verified_layer_steps: usize,
    /// Largest absolute error the checks saw.
    pub verify_max_abs_err: f64,
    /// Checked values outside the tolerance. A mismatch stops the run with an error naming it, so
    /// a summary of a finished run reports 0; the field is there for the record and the JSON.
    pub mismatches: usize,
    /// Free blocks in the pool once the run ended: every block must have come back
    /// (`num_blocks`), or the scheduler leaked some. [`Summary::check`] says so.
    pub blocks_returned: usize,
}

/// The `p`-th percentile (nearest rank) of `values`, zero when empty.
pub fn percentile(values: &[Duration], p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The phases of a step the summary breaks time down into, with their per-step samples.
pub const PHASES: [&str; 5] = ["schedule", "plan", "model", "attention", "sampling"];

impl Summary {
    /// The per-step samples of each of [`PHASES`], in that order.
    pub fn phases(&self) -> [(&'static str, &[Duration]); 5] {
        [
            (PHASES[0], &self.step_schedule),
            (PHASES[1], &self.step_plan),
            (PHASES[2], &self.step_model),
            (PHASES[3], &self.step_attention),
            (PHASES[4], &self.step_sampling),
        ]
    }

    /// The share of the wall time spent in `samples`, in percent.
    pub fn share_of_wall(&self, samples: &[Duration]) -> f64 {
        let wall = self.wall.as_secs_f64();
        if wall > 0.0 {
            100.0 * samples.iter().sum::<Duration>().as_secs_f64() / wall
        } else {
            0.0
        }
    }

    /// Tokens computed (prompt and output positions).
    pub fn tokens_computed(&self) -> usize {
        self.prompt_tokens_computed + self.output_tokens_computed
    }

    /// Total attention time.
    pub fn attention_time(&self) -> Duration {
        self.step_attention.iter().sum()
    }

    /// Computed tokens per wall second.
    pub fn tokens_per_s(&self) -> f64 {
        per_s(self.tokens_computed() as f64, self.wall)
    }

    /// Generated tokens per wall second.
    pub fn generated_per_s(&self) -> f64 {
        per_s(self.generated_tokens as f64, self.wall)
    }

    /// K/V bytes read per second of attention, in GB/s (10^9).
    pub fn kv_read_gbps(&self) -> f64 {
        per_s(self.kv_read_bytes as f64, self.attention_time()) / 1e9
    }

    /// The end-of-run checks: no mismatch, and every block returned to the pool.
    ///
    /// # Errors
    /// [`ServeError::Leaked`] or [`ServeError::Internal`] (mismatches).
    pub fn check(&self) -> Result<(), ServeError> {
        if self.mismatches > 0 {
            return Err(ServeError::Internal(format!("{} verification mismatches", self.mismatches)));
        }
        if self.blocks_returned != self.num_blocks {
            return Err(ServeError::Leaked { returned: self.blocks_returned, total: self.num_blocks });
        }
        Ok(())
    }

    /// The summary as one JSON object.
    pub fn to_json(&self) -> String {
        let mut s = String::from("{");
        let mut field = |name: &str, value: String| {
            if s.len() > 1 {
                s.push_str(", ");
            }
            let _ = write!(s, "\"{name}\": {value}");
        };
        field("device", json_str(&self.device));
        field("dtype", json_str(&self.dtype));
        field("kv_cache_dtype", json_str(&self.kv_cache_dtype));
        field("model", self.model.as_deref().map_or_else(|| "null".into(), json_str));
        field("attention", json_str(&self.attention));
        field("graphs", self.graphs.map_or_else(|| "null".into(), |g| g.to_string()));
        field("tokens_digest", json_str(&format!("{:016x}", self.tokens_digest)));
        for (name, v) in [
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_size", self.head_size),
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
            ("requests", self.requests),
            ("requests_finished", self.requests_finished),
            ("prompt_tokens", self.prompt_tokens),
            ("generated_tokens", self.generated_tokens),
            ("prompt_tokens_computed", self.prompt_tokens_computed),
            ("output_tokens_computed", self.output_tokens_computed),
            ("tokens_computed", self.tokens_computed()),
            ("prefix_hit_requests", self.prefix_hit_requests),
            ("prefix_hit_tokens", self.prefix_hit_tokens),
            ("preemptions", self.preemptions),
            ("steps", self.steps),
            ("peak_blocks_used", self.peak_blocks_used),
            ("verified_layer_steps", self.verified_layer_steps),
            ("mismatches", self.mismatches),
            ("blocks_returned", self.blocks_returned),
            ("graph_steps", self.graph_steps),
            ("graphs_captured", self.graphs_captured),
        ] {
            field(name, v.to_string());
        }
        field("kv_read_bytes", self.kv_read_bytes.to_string());
        for (name, v) in [
            ("wall_s", self.wall.as_secs_f64()),
            ("attention_s", self.attention_time().as_secs_f64()),
            ("attention_ms_per_step_p50", ms(percentile(&self.step_attention, 50.0))),
            ("attention_ms_per_step_p99", ms(percentile(&self.step_attention, 99.0))),
            ("tokens_per_s", self.tokens_per_s()),
            ("generated_tokens_per_s", self.generated_per_s()),
            ("kv_read_gb_per_s", self.kv_read_gbps()),
            ("verify_max_abs_err", self.verify_max_abs_err),
        ] {
            field(name, json_f64(v));
        }
        for (phase, samples) in self.phases() {
            field(&format!("{phase}_s"), json_f64(samples.iter().sum::<Duration>().as_secs_f64()));
            field(&format!("{phase}_ms_per_step_p50"), json_f64(ms(percentile(samples, 50.0))));
            field(&format!("{phase}_ms_per_step_p99"), json_f64(ms(percentile(samples, 99.0))));
            field(&format!("{phase}_share_of_wall_pct"), json_f64(self.share_of_wall(samples)));
        }
        s.push('}');
        s
    }
}

fn per_s(amount: f64, t: Duration) -> f64 {
    let secs = t.as_secs_f64();
    if secs > 0.0 {
        amount / secs
    } else {
        0.0
    }
}

fn json_f64(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

fn json_str(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |a: usize, b: usize| if b == 0 { 0.0 } else { 100.0 * a as f64 / b as f64 };
        writeln!(
            f,
            "paged-serve on {}, {}: {} layers x {} heads ({} kv) x {}, cache {} blocks of {} tokens{}",
            self.device,
            self.dtype,
            self.num_layers,
            self.num_heads,
            self.num_kv_heads,
            self.head_size,
            self.num_blocks,
            self.block_size,
            if self.kv_cache_dtype.is_empty() || self.kv_cache_dtype == self.dtype {
                String::new()
            } else {
                format!(" ({})", self.kv_cache_dtype)
            }
        )?;
        writeln!(
            f,
            "  model        {} ({}){}",
            self.model.as_deref().unwrap_or("custom shape"),
            self.attention,
            match self.graphs {
                Some(true) => format!(
                    "; CUDA graphs: {} of {} steps replayed, {} captured",
                    self.graph_steps, self.steps, self.graphs_captured
                ),
                Some(false) => "; CUDA graphs off".into(),
                None => String::new(),
            }
        )?;
        writeln!(f, "  requests     {} finished of {}", self.requests_finished, self.requests)?;
        writeln!(
            f,
            "  tokens       prompt {} (computed {} incl. recomputation after preemption, {} from the prefix cache), \
             generated {}, computed in all {}",
            self.prompt_tokens,
            self.prompt_tokens_computed,
            self.prefix_hit_tokens,
            self.generated_tokens,
            self.tokens_computed()
        )?;
        writeln!(
            f,
            "  steps        {}; attention per step (cache write + attention, all layers) p50 {:.2} ms, p99 {:.2} ms",
            self.steps,
            ms(percentile(&self.step_attention, 50.0)),
            ms(percentile(&self.step_attention, 99.0))
        )?;
        let device = if self.graphs.is_some() { "device" } else { "host" };
        writeln!(f, "  time/step    phase       p50 ms    p99 ms   share of wall")?;
        for (phase, samples) in self.phases() {
            let clock = match phase {
                "schedule" | "plan" => "host",
                _ => device,
            };
            writeln!(
                f,
                "               {phase:<10} {:>8.3}  {:>8.3}   {:>5.1} %  ({clock})",
                ms(percentile(samples, 50.0)),
                ms(percentile(samples, 99.0)),
                self.share_of_wall(samples)
            )?;
        }
        writeln!(
            f,
            "  throughput   {:.0} tokens/s computed, {:.0} generated tokens/s, wall {:.2} s",
            self.tokens_per_s(),
            self.generated_per_s(),
            self.wall.as_secs_f64()
        )?;
        writeln!(
            f,
            "  KV read      {:.3} GB in {:.2} s of attention: {:.2} GB/s",
            self.kv_read_bytes as f64 / 1e9,
            self.attention_time().as_secs_f64(),
            self.kv_read_gbps()
        )?;
        writeln!(
            f,
            "  cache        peak {} of {} blocks ({:.1} %), {} preemptions, prefix-cache hits {} requests / {} tokens",
            self.peak_blocks_used,
            self.num_blocks,
            pct(self.peak_blocks_used, self.num_blocks),
            self.preemptions,
            self.prefix_hit_requests,
            self.prefix_hit_tokens
        )?;
        if self.verified_layer_steps > 0 {
            writeln!(
                f,
                "  verify       {} layer-steps match the f64 reference, max abs error {:.2e}",
                self.verified_layer_steps, self.verify_max_abs_err
            )?;
        } else {
            writeln!(f, "  verify       off (--verify checks steps against an f64 reference)")?;
        }
        write!(
            f,
            "  checks       {} steps, {} preemptions, {} verified layer-steps, {} mismatches, blocks returned to the \
             pool: {} of {}",
            self.steps,
            self.preemptions,
            self.verified_layer_steps,
            self.mismatches,
            self.blocks_returned,
            self.num_blocks
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&v, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&v[..1], 99.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn json_is_one_flat_object() {
        let s = Summary {
            device: "cuda:0 (\"X\")".into(),
            requests: 3,
            steps: 7,
            wall: Duration::from_secs(2),
            prompt_tokens_computed: 10,
            output_tokens_computed: 4,
            step_attention: vec![Duration::from_millis(4); 3],
            kv_read_bytes: 12_000_000,
            ..Summary::default()
        };
        let j = s.to_json();
        assert!(j.starts_with('{') && j.ends_with('}'));
        assert!(j.contains(r#""device": "cuda:0 (\"X\")""#), "{j}");
        assert!(j.contains("\"requests\": 3") && j.contains("\"steps\": 7") && j.contains("\"tokens_computed\": 14"));
        assert!(j.contains("\"tokens_per_s\": 7,") && j.contains("\"kv_read_gb_per_s\": 1"), "{j}");
        assert!(!j.contains('\n'));
        assert!(s.to_string().contains("requests     0 finished of 3"));
        assert!(j.contains("\"mismatches\": 0") && j.contains("\"blocks_returned\": 0"), "{j}");
    }

    #[test]
    fn end_of_run_checks() {
        let ok = Summary { num_blocks: 8, blocks_returned: 8, steps: 3, preemptions: 2, ..Summary::default() };
        ok.check().unwrap();
        assert!(ok.to_string().ends_with(
            "checks       3 steps, 2 preemptions, 0 verified layer-steps, 0 mismatches, blocks returned to the pool: 8 of 8"
        ));
        let leak = Summary { blocks_returned: 7, ..ok.clone() };
        assert_eq!(leak.check().unwrap_err().to_string(), "blocks returned to the pool: 7 of 8 (1 leaked)");
        let bad = Summary { mismatches: 1, ..ok };
        assert!(bad.check().is_err());
    }
}
