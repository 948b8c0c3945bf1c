//! `paged-serve`: see `paged-serve --help` and the library docs.
//!
//! Exit status: 0 on success, 1 when the run fails (a backend error, a verification mismatch, a
//! leaked block, the summary could not be written), 2 for a usage error. A closed stdout (the
//! reader of a pipe stopped reading, as in `paged-serve | head -4`) is not an error: the program
//! stops writing and exits 0, quietly, so a pipeline under `set -o pipefail` does not fail because
//! its reader had seen enough.

use std::io::{self, Write};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use paged_serve::{clap_error_line, run, Cli, ServeError};

/// Writes one error line to stderr; a failing stderr is ignored (there is nowhere left to report).
fn report(msg: &str) {
    let _ = writeln!(io::stderr().lock(), "paged-serve: error: {msg}");
}

/// Writes `text` and a newline to stdout and flushes. `Ok(false)` when the reader closed the
/// pipe.
fn print(text: &str) -> Result<bool, ServeError> {
    let mut out = io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(ServeError::Output(e)),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            // `--help | head` closes the pipe early; that is fine.
            let text = e.render().to_string();
            return match print(text.trim_end()) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    report(&e.to_string());
                    ExitCode::from(e.exit_code())
                }
            };
        }
        Err(e) => {
            report(&clap_error_line(&e));
            return ExitCode::from(2);
        }
    };
    let result = run(&cli).and_then(|summary| {
        let text = if cli.json { summary.to_json() } else { summary.to_string() };
        print(&text)?;
        // The end-of-run checks fail the run after the summary is out, so the counts that show
        // the failure are printed.
        summary.check()
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e.to_string());
            ExitCode::from(e.exit_code())
        }
    }
}
