//! Timing GPU work with CUDA events: warm-up, many iterations, median and spread.

#[cfg(feature = "cuda")]
use attention_backend::cuda::{cudarc, CudaDevice};

/// Milliseconds per iteration, summarised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    /// Median.
    pub median_ms: f64,
    /// 10th percentile.
    pub p10_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// Iterations timed.
    pub iters: usize,
}

impl Stats {
    /// Summarises samples (milliseconds); `None` when there are none.
    pub fn from_samples(mut samples: Vec<f64>) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Some(Stats { median_ms: at(0.5), p10_ms: at(0.1), p90_ms: at(0.9), iters: samples.len() })
    }
}

/// Times `f` on the device's stream: `warmup` untimed calls, then `iters` calls each between two
/// events. Per-call events measure device time between them, so host launch cost is excluded as
/// long as the host keeps the queue ahead of the device.
#[cfg(feature = "cuda")]
pub fn time_on_stream<E: std::fmt::Debug>(
    dev: &CudaDevice,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<(), E>,
) -> Result<Stats, String> {
    use cudarc::driver::sys::CUevent_flags;
    let stream = dev.stream();
    for _ in 0..warmup {
        f().map_err(|e| format!("{e:?}"))?;
    }
    let mut events = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| format!("{e:?}"))?;
        f().map_err(|e| format!("{e:?}"))?;
        let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| format!("{e:?}"))?;
        events.push((start, end));
    }
    stream.synchronize().map_err(|e| format!("{e:?}"))?;
    let samples = events
        .iter()
        .map(|(s, e)| s.elapsed_ms(e).map(f64::from).map_err(|e| format!("{e:?}")))
        .collect::<Result<Vec<_>, _>>()?;
    Stats::from_samples(samples).ok_or_else(|| "no iterations".into())
}
