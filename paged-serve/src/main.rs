//! `paged-serve`: see `paged-serve --help` and the library docs.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use paged_serve::{clap_error_line, run, Cli};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("paged-serve: error: {}", clap_error_line(&e));
            return ExitCode::from(2);
        }
    };
    match run(&cli) {
        Ok(summary) if cli.json => {
            println!("{}", summary.to_json());
            ExitCode::SUCCESS
        }
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("paged-serve: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
