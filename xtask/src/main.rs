//! `cargo xtask <command>`: project automation, in Rust so it needs nothing but cargo.
//!
//! Every command prints the commands it runs. See `cargo xtask help`.

mod bundle;
mod candle;
mod clang_format;
mod cuda;
mod package;
mod sass;
mod shell;
mod test;

use std::process::ExitCode;

const HELP: &str = "\
cargo xtask <command>

Commands:
  setup-cuda     install the pinned CUDA compiler (nvcc 13.0 from PyPI) into the user cache; idempotent
  test           fmt checks (cargo fmt; clang-format on the CUDA sources), clippy -D warnings, every
                 workspace test (kernels compiled when nvcc is available or can be set up), the candle
                 example checked; GPU tests are built and, with no GPU here, reported as NOT RUN; `sass`
                 too when the kernels are compiled
  sass           check the SASS of the warp-specialised prefill that the CUDA tests link (built first if
                 needed): the softmax overlaps the PV product, the wgmma descriptors are uniform
                 (cuobjdump from PyPI, installed if missing)
  clang-format [--check]
                 format the CUDA sources (attention-kernels/csrc) by attention-kernels/.clang-format, or
                 with --check only report differences (clang-format 19.1.7 from PyPI, installed if missing;
                 CLANG_FORMAT overrides)
  fuzz [CASES]   the property tests with many more cases (default 20000), release build
  package        cargo package + publish --dry-run for the three library crates, the packaged kernels
                 built with `cuda`, the outside consumer (examples/consumer) run on them, docs with -D warnings
  gpu-bundle     build the GPU test and bench binaries and the candle example (release, stripped) into
                 gpu-bundle/ with run.sh
  gpu-test       run the GPU test suite here (needs cargo, nvcc and a GPU; fails without a GPU)
  candle         build the candle example (examples/candle-decoder, release, linked against stubs) and
                 print how to run it
  bench          build the bundle and print the command that runs the benchmark on a GPU machine
  help           this text
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup-cuda") => cuda::setup().map(|root| println!("CUDA root: {}", root.display())),
        Some("test") => test::run(),
        Some("package") => package::run(package::nvcc()),
        Some("sass") => cuda::find()
            .ok_or_else(|| "no nvcc: run `cargo xtask setup-cuda` first".to_string())
            .and_then(|root| sass::check(&root)),
        Some("clang-format") => match args.get(1).map(String::as_str) {
            None => clang_format::run(false),
            Some("--check") => clang_format::run(true),
            Some(other) => Err(format!("clang-format: unknown argument `{other}` (only --check)")),
        },
        Some("fuzz") => test::fuzz(args.get(1).map(String::as_str)),
        Some("gpu-bundle") => bundle::build().map(|_| ()),
        Some("gpu-test") => bundle::gpu_test(),
        Some("bench") => bundle::bench(),
        Some("candle") => candle::build(),
        Some("help") | Some("--help") | Some("-h") | None => {
            print!("{HELP}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command `{other}`\n\n{HELP}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}
