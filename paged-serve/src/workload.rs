//! The requests of a run: when they arrive, their prompts and how many tokens they generate.
//!
//! Time is counted in scheduler **steps**, not seconds, so a run is reproducible: the same flags
//! give the same arrivals, prompts, schedule and (on one device) the same generated tokens,
//! however fast the machine is. Requests come either from a seeded Poisson process
//! ([`WorkloadSpec::Poisson`]) or from a trace file ([`parse_trace`]).

use std::fmt;

use model_runner::TokenId;
use serde::Deserialize;

/// Token ids the synthetic model uses (`0..VOCAB_SIZE`), a Llama-sized vocabulary.
pub const VOCAB_SIZE: u32 = 32_000;

/// The most tokens one sequence (prompt + output) may reach: sequence lengths are `i32` in the
/// attention metadata.
pub const MAX_SEQ_LEN: usize = i32::MAX as usize;

/// The latest arrival step a request may have (2^53, where `f64` steps stop being exact). Far
/// beyond any real run, and it keeps the scheduler's step counter far from `u64::MAX`.
pub const MAX_ARRIVAL_STEP: u64 = 1 << 53;

/// SplitMix64's increment.
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

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
        self.0 = self.0.wrapping_add(GAMMA);
        mix64(self.0)
    }

    /// Skips `n` draws in O(1) (the state is a counter), as if `next` had been called `n` times.
    pub fn skip(&mut self, n: usize) {
        self.0 = self.0.wrapping_add(GAMMA.wrapping_mul(n as u64));
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
        self.prompt.len().saturating_add(self.output_len)
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

/// When and how long one request is: the part of a workload that is cheap to compute (three
/// numbers a request), so the run can be checked against the cache before any prompt exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Arrival step.
    pub arrival_step: u64,
    /// Prompt tokens.
    pub prompt_len: usize,
    /// Tokens to generate.
    pub output_len: usize,
}

impl Shape {
    /// Prompt plus output.
    pub fn max_len(&self) -> usize {
        self.prompt_len.saturating_add(self.output_len)
    }
}

/// A workload that cannot be built.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum WorkloadError {
    /// A Poisson arrival past [`MAX_ARRIVAL_STEP`] (an arrival rate so low that the run would
    /// idle for longer than any counter should count).
    #[error(
        "--arrival-rate {rate:e}: request {request} would arrive at step {step:.3e}, past the limit of {MAX_ARRIVAL_STEP} \
         steps; raise --arrival-rate"
    )]
    ArrivalTooLate {
        /// The rate.
        rate: f64,
        /// The request.
        request: usize,
        /// Its arrival, in steps.
        step: f64,
    },
}

/// A workload's shapes, computed before any prompt exists; [`Plan::build`] makes the prompts.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Arrival and lengths of each request, by id.
    pub shapes: Vec<Shape>,
    sharing: PrefixSharing,
    seed: u64,
    /// The stream after the shapes were drawn; the prompts continue it.
    rng: SplitMix64,
}

/// The arrival and lengths of every request, reproducibly from `seed`. Allocates 24 bytes a
/// request, so a caller can check the run against the cache and the host before the prompts
/// exist.
///
/// # Errors
/// [`WorkloadError::ArrivalTooLate`].
pub fn plan(spec: &WorkloadSpec, sharing: PrefixSharing, seed: u64) -> Result<Plan, WorkloadError> {
    let mut rng = SplitMix64::new(seed);
    // The shared prefix is drawn first (`Plan::build` draws it again from the seed).
    rng.skip(sharing.len);
    let shapes = match spec {
        WorkloadSpec::Poisson { num_requests, rate, prompt_len, output_len } => {
            let mut t = 0.0f64;
            // Lengths are uniform in [len/2, 3*len/2] (saturating: the caller bounds 3*len/2).
            let spread = |len: usize| ((len / 2).max(1), len.saturating_add(len / 2).max(1));
            let (p_lo, p_hi) = spread(*prompt_len);
            let (o_lo, o_hi) = spread(*output_len);
            (0..*num_requests)
                .map(|request| {
                    if rate.is_finite() && *rate > 0.0 {
                        // Exponential inter-arrival times make a Poisson process.
                        t += -(1.0 - rng.next_f64()).ln() / rate;
                    }
                    // t is never NaN (a sum of non-negative finite or infinite terms) but may be
                    // infinite.
                    if t.is_nan() || t > MAX_ARRIVAL_STEP as f64 {
                        return Err(WorkloadError::ArrivalTooLate { rate: *rate, request, step: t });
                    }
                    let p = rng.range(p_lo, p_hi);
                    let o = rng.range(o_lo, o_hi);
                    Ok(Shape { arrival_step: t as u64, prompt_len: p, output_len: o })
                })
                .collect::<Result<Vec<_>, _>>()?
        }
        // `parse_trace` bounded arrivals and lengths.
        WorkloadSpec::Trace(entries) => entries
            .iter()
            .map(|e| Shape { arrival_step: e.arrival as u64, prompt_len: e.prompt_len, output_len: e.output_len })
            .collect(),
    };
    Ok(Plan { shapes, sharing, seed, rng })
}

impl Plan {
    /// The longest request (prompt + output), 0 for an empty plan.
    pub fn max_len(&self) -> usize {
        self.shapes.iter().map(Shape::max_len).max().unwrap_or(0)
    }

    /// The requests: prompts of the planned lengths, some starting with the shared prefix.
    pub fn build(&self) -> Vec<RequestSpec> {
        let shared: Vec<TokenId> = {
            let mut rng = SplitMix64::new(self.seed);
            (0..self.sharing.len).map(|_| (rng.next() % u64::from(VOCAB_SIZE)) as TokenId).collect()
        };
        let mut rng = self.rng.clone();
        let sharing = self.sharing;
        self.shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let shares = sharing.len > 0 && rng.next_f64() < sharing.fraction;
                // A shared prompt keeps at least its last token its own, so prompts differ.
                let common = if shares { sharing.len.min(s.prompt_len.saturating_sub(1)) } else { 0 };
                let mut prompt = shared[..common].to_vec();
                prompt.extend((common..s.prompt_len).map(|_| (rng.next() % u64::from(VOCAB_SIZE)) as TokenId));
                RequestSpec { id: i as u64, arrival_step: s.arrival_step, prompt, output_len: s.output_len }
            })
            .collect()
    }
}

/// Builds the requests, reproducibly from `seed`: [`plan`], then [`Plan::build`].
///
/// # Errors
/// As [`plan`].
pub fn build(spec: &WorkloadSpec, sharing: PrefixSharing, seed: u64) -> Result<Vec<RequestSpec>, WorkloadError> {
    Ok(plan(spec, sharing, seed)?.build())
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

/// One JSON line of a trace. Unknown fields are ignored; the aliases are the names other
/// benchmark tools use.
#[derive(Deserialize)]
struct JsonLine {
    #[serde(alias = "arrival_step", alias = "arrival_time")]
    arrival: f64,
    #[serde(alias = "input_len")]
    prompt_len: u64,
    output_len: u64,
}

/// Parses a trace: one request per line, either CSV `arrival,prompt_len,output_len` (an optional
/// header line naming the columns is skipped) or JSON lines
/// `{"arrival": 3.5, "prompt_len": 100, "output_len": 20}` (any valid JSON object: extra fields
/// of any type are ignored; `arrival_step`/`arrival_time` and `input_len` are accepted as
/// aliases). Blank lines and lines starting with `#` are ignored. `arrival` is in steps (at most
/// [`MAX_ARRIVAL_STEP`]); arrivals need not be sorted. A request's prompt plus output may not
/// exceed [`MAX_SEQ_LEN`] tokens.
///
/// # Errors
/// The first bad line: invalid JSON, a missing field, a wrong field count, a negative or
/// non-numeric value, a zero or too long length, or an empty trace.
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
            let j: JsonLine = serde_json::from_str(line).map_err(|e| err(format!("invalid JSON line: {e}")))?;
            (j.arrival, j.prompt_len, j.output_len)
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
            let arrival = fields[0]
                .parse::<f64>()
                .map_err(|_| err(format!("arrival `{}` is not a non-negative number", fields[0])))?;
            let len = |name: &str, v: &str| {
                v.parse::<u64>().map_err(|_| err(format!("{name} `{v}` is not a positive integer")))
            };
            (arrival, len("prompt_len", fields[1])?, len("output_len", fields[2])?)
        };
        if !(arrival.is_finite() && arrival >= 0.0) {
            return Err(err(format!("arrival `{arrival}` is not a non-negative number")));
        }
        if arrival > MAX_ARRIVAL_STEP as f64 {
            return Err(err(format!("arrival {arrival:e} is past the limit of {MAX_ARRIVAL_STEP} steps")));
        }
        for (name, v) in [("prompt_len", prompt_len), ("output_len", output_len)] {
            if v == 0 {
                return Err(err(format!("{name} `0` is not a positive integer")));
            }
        }
        let total = u128::from(prompt_len) + u128::from(output_len);
        if total > MAX_SEQ_LEN as u128 {
            return Err(err(format!(
                "prompt_len {prompt_len} + output_len {output_len} = {total} tokens; a sequence holds at most \
                 {MAX_SEQ_LEN} tokens (i32 sequence lengths)"
            )));
        }
        // Both are below MAX_SEQ_LEN, so they fit a usize.
        out.push(TraceEntry { arrival, prompt_len: prompt_len as usize, output_len: output_len as usize });
    }
    if out.is_empty() {
        return Err(TraceError { line: 0, what: "the trace holds no request".into() });
    }
    Ok(out)
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
        let a = build(&poisson(20, 0.5), none, 7).unwrap();
        assert_eq!(a, build(&poisson(20, 0.5), none, 7).unwrap());
        assert_ne!(a, build(&poisson(20, 0.5), none, 8).unwrap());
        for (i, r) in a.iter().enumerate() {
            assert_eq!(r.id, i as u64);
            assert!((20..=60).contains(&r.prompt.len()), "{}", r.prompt.len());
            assert!((5..=15).contains(&r.output_len));
            assert!(r.prompt.iter().all(|&t| t < VOCAB_SIZE));
        }
        assert!(a.windows(2).all(|w| w[0].arrival_step <= w[1].arrival_step));
        assert!(a.last().unwrap().arrival_step > 10, "20 arrivals at 0.5/step span ~40 steps");
        assert!(build(&poisson(5, f64::INFINITY), none, 1).unwrap().iter().all(|r| r.arrival_step == 0));
    }

    #[test]
    fn shared_prefixes() {
        let all = PrefixSharing { fraction: 1.0, len: 16 };
        let reqs = build(&poisson(10, 1.0), all, 3).unwrap();
        for r in &reqs {
            assert_eq!(r.prompt[..16], reqs[0].prompt[..16]);
        }
        let none = build(&poisson(10, 1.0), PrefixSharing { fraction: 0.0, len: 16 }, 3).unwrap();
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
        let reqs = build(&WorkloadSpec::Trace(t), PrefixSharing { fraction: 0.0, len: 0 }, 0).unwrap();
        assert_eq!((reqs[0].arrival_step, reqs[0].prompt.len(), reqs[0].output_len), (1, 8, 3));
    }

    #[test]
    fn json_lines_with_commas_inside_strings_and_arrays() {
        let text = concat!(
            "{\"id\": \"a,b\", \"arrival\": 2, \"prompt_len\": 5, \"output_len\": 1, \"tags\": [1, 2, 3]}\n",
            "{\"meta\": {\"x\": [\"p,q\", {\"y\": 1}]}, \"input_len\": 7, \"output_len\": 2, \"arrival_time\": 0.5}\n",
        );
        let t = parse_trace(text).unwrap();
        assert_eq!(t[0], TraceEntry { arrival: 2.0, prompt_len: 5, output_len: 1 });
        assert_eq!(t[1], TraceEntry { arrival: 0.5, prompt_len: 7, output_len: 2 });
        // Bad JSON names its line and what serde found.
        let e = parse_trace("0,1,1\n{\"arrival\": 1, \"prompt_len\": \"x\", \"output_len\": 1}").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.what.starts_with("invalid JSON line: invalid type"), "{e}");
        let e = parse_trace("{\"arrival\": 1, \"prompt_len\": 2, \"output_len\": 1,}").unwrap_err();
        assert!(e.what.contains("invalid JSON line"), "{e}");
        let e = parse_trace("{\"arrival\": 1, \"output_len\": 1}").unwrap_err();
        assert!(e.what.contains("missing field `prompt_len`"), "{e}");
        // Lengths past an i32 sequence, and arrivals past the step limit.
        let e = parse_trace("{\"arrival\": 0, \"prompt_len\": 1000000000000, \"output_len\": 1}").unwrap_err();
        assert!(e.what.contains("a sequence holds at most 2147483647"), "{e}");
        assert!(parse_trace("9007199254740994,1,1").unwrap_err().what.contains("past the limit"));
        assert_eq!(parse_trace("9007199254740992,1,1").unwrap()[0].arrival, 9007199254740992.0);
    }

    #[test]
    fn the_plan_continues_the_same_stream() {
        // skip(n) is n draws.
        let (mut a, mut b) = (SplitMix64::new(5), SplitMix64::new(5));
        a.skip(1000);
        (0..1000).for_each(|_| {
            b.next();
        });
        assert_eq!(a.next(), b.next());
        let sharing = PrefixSharing { fraction: 0.5, len: 12 };
        let plan = plan(&poisson(30, 0.7), sharing, 9).unwrap();
        let reqs = plan.build();
        assert_eq!(reqs, build(&poisson(30, 0.7), sharing, 9).unwrap());
        for (r, s) in reqs.iter().zip(&plan.shapes) {
            assert_eq!((r.arrival_step, r.prompt.len(), r.output_len), (s.arrival_step, s.prompt_len, s.output_len));
        }
        assert_eq!(plan.max_len(), reqs.iter().map(RequestSpec::max_len).max().unwrap());
    }

    #[test]
    fn arrivals_past_the_step_limit_are_refused() {
        let none = PrefixSharing { fraction: 0.0, len: 0 };
        let err = build(&poisson(3, 1e-300), none, 0).unwrap_err();
        assert!(matches!(err, WorkloadError::ArrivalTooLate { request: 0, .. }), "{err}");
        assert!(err.to_string().starts_with("--arrival-rate 1e-300: request 0 would arrive at step"), "{err}");
        // Rate 0 means "all at step 0", as documented.
        assert!(build(&poisson(3, 0.0), none, 0).unwrap().iter().all(|r| r.arrival_step == 0));
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
