//! `zae-limiter`: operate zae-limiter tables, namespaces, entities and limits from the
//! command line (feature `cli`). Every command is built on the crate's public API.
//!
//! Exit codes: 0 success, 1 error, 2 bad arguments, 3 AWS/DynamoDB error, 4 table or
//! namespace not found.

mod args;
mod commands;
mod connect;
mod failure;
mod manifest;
mod output;

use std::process::ExitCode;

use clap::Parser;

use crate::args::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            failure.report();
            ExitCode::from(failure.code)
        }
    }
}

/// Logs go to stderr, warnings and errors only unless `RUST_LOG` asks for more, so stdout
/// stays the command's output.
fn tracing_init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
