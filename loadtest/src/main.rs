//! The `ferry-loadtest` binary: parses the command line, runs the scenario, prints the summary,
//! writes the requested outputs, and exits non-zero when the run broke a guarantee.

use std::process::ExitCode;

use clap::Parser;
use ferry_loadtest::{report, run, Args};

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let report = match run(&args).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ferry-loadtest: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.text());
    if let Err(e) = report::write_outputs(&args, &report) {
        eprintln!("ferry-loadtest: writing outputs: {e}");
        return ExitCode::from(2);
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        eprintln!("\n!!!!!!!!!! RUN FAILED !!!!!!!!!!");
        for f in &report.failures {
            eprintln!("!!! {f}");
        }
        if let Some(r) = &report.resume {
            for e in &r.examples {
                eprintln!("!!! {e}");
            }
        }
        ExitCode::FAILURE
    }
}
