//! The requests of a run: when they arrive, their prompts and how many tokens they generate.
//!
//! Time is counted in scheduler **steps**, not seconds, so a run is reproducible: the same flags
//! give the same arrivals, prompts, schedule and (on one device) the same generated tokens,
//! however fast the machine is. Requests come either from a seeded Poisson process
//! ([`WorkloadSpec::Poisson`]) or from a trace file ([`parse_trace`]).

use std::fmt;

use model_runner::TokenId;

/// Token ids the synthetic model uses (`0..VOCAB_SIZE`), a Llama-sized vocabulary.
pub const VOCAB_SIZE: u32 = 32_000;

/// A small, fast, seedable generator (SplitMix64). Hand-written instead of `rand` so that the
/// stream a seed gives can never change under a dependency upgrade: runs stay comparable.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `lo..=hi` (`lo` when `hi <= lo`).
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        if hi <= lo {
            return lo;
        }
        let span = (hi - lo) as u64 + 1;
        lo + (self.next() % span) as usize
    }
}

/// SplitMix64's finaliser: a bijective, well-mixing hash of one `u64`.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One request of the workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestSpec {
    /// Its id (also its index in the workload).
    pub id: u64,
    /// The first step at which the scheduler may see it.
    pub arrival_step: u64,
    /// Prompt token ids (at least one).
    pub prompt: Vec<TokenId>,
    /// Tokens to generate (at least one).
    pub output_len: usize,
}

impl RequestSpec {
    /// Prompt plus output: the longest the sequence gets.
    pub fn max_len(&self) -> usize {
        self.prompt.len() + self.output_len
    }
}

/// One line of a trace: when a request arrives and how long it is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TraceEntry {
    /// Arrival, in steps (fractions are rounded down).
    pub arrival: f64,
    /// Prompt tokens.
    pub prompt_len: usize,
    /// Tokens to generate.
    pub output_len: usize,
}

/// How to build the workload.
#[derive(Clone, Debug, PartialEq)]
pub enum WorkloadSpec {
    /// `num_requests` requests with Poisson arrivals at `rate` requests per step (`rate` infinite
    /// or 0: all at step 0), lengths uniform in `[len/2, 3*len/2]` around the given means.
    Poisson {
        /// Requests.
        num_requests: usize,
        /// Mean arrivals per step.
        rate: f64,
        /// Mean prompt length.
        prompt_len: usize,
        /// Mean output length.
        output_len: usize,
    },
    /// Arrivals and lengths from a trace.
    Trace(Vec<TraceEntry>),
}

/// Prompts that share a common prefix, so the prefix cache has something to find.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrefixSharing {
    /// Fraction of prompts (`0..=1`) that start with the shared prefix.
    pub fraction: f64,
    /// Tokens of the shared prefix (a prompt shorter than that keeps its last token its own).
    pub len: usize,
}

/// Builds the requests, reproducibly from `seed`.
pub fn build(spec: &WorkloadSpec, sharing: PrefixSharing, seed: u64) -> Vec<RequestSpec> {
    let mut rng = SplitMix64::new(seed);
    let shared: Vec<TokenId> = (0..sharing.len).map(|_| (rng.next() % u64::from(VOCAB_SIZE)) as TokenId).collect();
    let shape: Vec<(u64, usize, usize)> = match spec {
        WorkloadSpec::Poisson { num_requests, rate, prompt_len, output_len } => {
            let mut t = 0.0f64;
            (0..*num_requests)
                .map(|_| {
                    if rate.is_finite() && *rate > 0.0 {
                        // Exponential inter-arrival times make a Poisson process.
                        t += -(1.0 - rng.next_f64()).ln() / rate;
                    }
                    let p = rng.range((prompt_len / 2).max(1), (prompt_len * 3 / 2).max(1));
                    let o = rng.range((output_len / 2).max(1), (output_len * 3 / 2).max(1));
                    (t as u64, p, o)
                })
                .collect()
        }
        WorkloadSpec::Trace(entries) => {
            entries.iter().map(|e| (e.arrival as u64, e.prompt_len, e.output_len)).collect()
        }
    };
    shape
        .into_iter()
        .enumerate()
        .map(|(i, (arrival_step, prompt_len, output_len))| {
            let shares = sharing.len > 0 && rng.next_f64() < sharing.fraction;
            // A shared prompt keeps at least its last token its own, so prompts differ.
            let common = if shares { sharing.len.min(prompt_len.saturating_sub(1)) } else { 0 };
            let mut prompt = shared[..common].to_vec();
            prompt.extend((common..prompt_len).map(|_| (rng.next() % u64::from(VOCAB_SIZE)) as TokenId));
            RequestSpec { id: i as u64, arrival_step, prompt, output_len }
        })
        .collect()
}

/// A trace file that could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub what: String,
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.what)
    }
}

/// Parses a trace: one request per line, either CSV `arrival,prompt_len,output_len` (an optional
/// header line naming the columns is skipped) or JSON lines
/// `{"arrival": 3.5, "prompt_len": 100, "output_len": 20}`. Blank lines and lines starting with
/// `#` are ignored. `arrival` is in steps; arrivals need not be sorted.
///
/// # Errors
/// The first bad line: a wrong field count, a negative or non-numeric value, a zero length, or an
/// empty trace.
pub fn parse_trace(text: &str) -> Result<Vec<TraceEntry>, TraceError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let lineno = i + 1;
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |what: String| TraceError { line: lineno, what };
        let (arrival, prompt_len, output_len) = if line.starts_with('{') {
            parse_json_line(line).map_err(err)?
        } else {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            if fields.len() != 3 {
                return Err(err(format!(
                    "expected 3 comma-separated fields (arrival,prompt_len,output_len), got {}",
                    fields.len()
                )));
            }
            if out.is_empty()
                && fields[0].parse::<f64>().is_err()
                && fields.iter().all(|f| f.chars().all(|c| c.is_alphanumeric() || c == '_'))
            {
                continue; // a header line
            }
            (fields[0].to_string(), fields[1].to_string(), fields[2].to_string())
        };
        let arrival: f64 = arrival
            .parse()
            .ok()
            .filter(|a: &f64| a.is_finite() && *a >= 0.0)
            .ok_or_else(|| err(format!("arrival `{arrival}` is not a non-negative number")))?;
        let len = |name: &str, v: &str| {
            v.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| err(format!("{name} `{v}` is not a positive integer")))
        };
        out.push(TraceEntry {
            arrival,
            prompt_len: len("prompt_len", &prompt_len)?,
            output_len: len("output_len", &output_len)?,
        });
    }
    if out.is_empty() {
        return Err(TraceError { line: 0, what: "the trace holds no request".into() });
    }
    Ok(out)
}

/// The three fields of a flat JSON object of numbers. Hand-written: the objects are flat and
/// numeric, which does not justify a JSON dependency.
fn parse_json_line(line: &str) -> Result<(String, String, String), String> {
    let body = line
        .strip_prefix('{')
        .and_then(|l| l.strip_suffix('}'))
        .ok_or_else(|| "a JSON line must be one object `{...}`".to_string())?;
    let (mut arrival, mut prompt, mut output) = (None, None, None);
    for pair in body.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = pair.split_once(':').ok_or_else(|| format!("`{}` is not a \"key\": value pair", pair.trim()))?;
        let key = k.trim().trim_matches('"');
        let value = v.trim().trim_matches('"').to_string();
        match key {
            "arrival" | "arrival_step" | "arrival_time" => arrival = Some(value),
            "prompt_len" | "input_len" => prompt = Some(value),
            "output_len" => output = Some(value),
            _ => {} // extra fields are allowed
        }
    }
    match (arrival, prompt, output) {
        (Some(a), Some(p), Some(o)) => Ok((a, p, o)),
        _ => Err("a JSON line needs \"arrival\", \"prompt_len\" and \"output_len\"".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poisson(n: usize, rate: f64) -> WorkloadSpec {
        WorkloadSpec::Poisson { num_requests: n, rate, prompt_len: 40, output_len: 10 }
    }

    #[test]
    fn reproducible_from_the_seed() {
        let none = PrefixSharing { fraction: 0.0, len: 0 };
        let a = build(&poisson(20, 0.5), none, 7);
        assert_eq!(a, build(&poisson(20, 0.5), none, 7));
        assert_ne!(a, build(&poisson(20, 0.5), none, 8));
        for (i, r) in a.iter().enumerate() {
            assert_eq!(r.id, i as u64);
            assert!((20..=60).contains(&r.prompt.len()), "{}", r.prompt.len());
            assert!((5..=15).contains(&r.output_len));
            assert!(r.prompt.iter().all(|&t| t < VOCAB_SIZE));
        }
        assert!(a.windows(2).all(|w| w[0].arrival_step <= w[1].arrival_step));
        assert!(a.last().unwrap().arrival_step > 10, "20 arrivals at 0.5/step span ~40 steps");
        assert!(build(&poisson(5, f64::INFINITY), none, 1).iter().all(|r| r.arrival_step == 0));
    }

    #[test]
    fn shared_prefixes() {
        let all = PrefixSharing { fraction: 1.0, len: 16 };
        let reqs = build(&poisson(10, 1.0), all, 3);
        for r in &reqs {
            assert_eq!(r.prompt[..16], reqs[0].prompt[..16]);
        }
        let none = build(&poisson(10, 1.0), PrefixSharing { fraction: 0.0, len: 16 }, 3);
        assert!(none.iter().skip(1).any(|r| r.prompt[..16] != none[0].prompt[..16]));
    }

    #[test]
    fn traces_in_csv_and_json_lines() {
        let csv = "arrival,prompt_len,output_len\n# comment\n0,10,5\n\n2.7, 20, 1\n";
        let t = parse_trace(csv).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[1], TraceEntry { arrival: 2.7, prompt_len: 20, output_len: 1 });
        let json = "{\"arrival\": 1, \"prompt_len\": 8, \"output_len\": 3, \"note\": 1}\n{\"output_len\":2,\"prompt_len\":4,\"arrival\":0}";
        let t = parse_trace(json).unwrap();
        assert_eq!(t[0], TraceEntry { arrival: 1.0, prompt_len: 8, output_len: 3 });
        assert_eq!(t[1].prompt_len, 4);
        let reqs = build(&WorkloadSpec::Trace(t), PrefixSharing { fraction: 0.0, len: 0 }, 0);
        assert_eq!((reqs[0].arrival_step, reqs[0].prompt.len(), reqs[0].output_len), (1, 8, 3));
    }

    #[test]
    fn bad_traces_name_the_line() {
        assert_eq!(parse_trace("0,10,5\n1,0,5").unwrap_err().line, 2);
        assert!(parse_trace("0,10").unwrap_err().what.contains("3 comma-separated"));
        assert!(parse_trace("-1,10,5").unwrap_err().what.contains("arrival"));
        assert!(parse_trace("{\"arrival\": 1}").unwrap_err().what.contains("prompt_len"));
        assert!(parse_trace("# nothing\n").unwrap_err().what.contains("no request"));
    }
}
