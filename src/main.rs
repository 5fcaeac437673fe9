//! The `replog` binary.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("REPLOG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser::mnt=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.json_logs() {
        // One JSON object a line: time, level, target, fields (for log shippers).
        builder.json().with_current_span(false).init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    cli::run(cli)
}
