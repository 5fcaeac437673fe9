//! `replog inspect PATH [--json]`.

use std::path::Path;
use std::process::ExitCode;

pub fn run(path: &Path, json: bool) -> ExitCode {
    match replog::inspect::inspect(path) {
        Ok(report) => {
            if json {
                match serde_json::to_string(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => eprintln!("replog: {e}"),
                }
            } else {
                replog::inspect::print_text(&report);
            }
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("replog: {e}");
            ExitCode::from(1)
        }
    }
}
