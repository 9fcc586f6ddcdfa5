//! One module per command group; `run` dispatches.

mod aggregator;
mod audit;
mod config;
mod entity;
mod loadtest;
mod local;
mod manifest;
mod namespace;
mod table;
mod usage;

use std::io::{BufRead, IsTerminal, Write};

use crate::args::{Cli, Command};
use crate::failure::{Failure, Outcome};
use crate::output::Out;

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Outcome {
    let out = Out {
        format: cli.global.output,
    };
    let global = &cli.global;
    match cli.command {
        Command::Local(command) => local::run(command, out).await,
        Command::Deploy(options) => table::deploy(global, &options, out).await,
        Command::Status => table::status(global, out).await,
        Command::Delete { yes } => table::delete(global, yes, out).await,
        Command::CfnTemplate(options) => table::cfn_template(global, &options, out),
        Command::List => table::list(global, out).await,
        Command::Version => {
            table::version(out);
            Ok(())
        }
        Command::Check => table::check(global, out).await,
        Command::Namespace(command) => namespace::run(global, command, out).await,
        Command::System(command) => config::system(global, command, out).await,
        Command::Resource(command) => config::resource(global, command, out).await,
        Command::Entity(command) => entity::run(global, command, out).await,
        Command::Limits(command) => manifest::run(global, command, out).await,
        Command::Audit(command) => audit::run(global, command, out).await,
        Command::Loadtest(args) => loadtest::run(global, args, out).await,
        Command::Aggregator(command) => aggregator::run(global, command, out).await,
        Command::Usage(command) => usage::run(global, command, out).await,
    }
}

/// Asks the person at the terminal to type `expected` before something destructive;
/// `--yes` skips the question. Without a terminal and without `--yes`, refuses.
fn confirm(what: &str, expected: &str, yes: bool) -> Outcome {
    if yes {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(Failure::bad_arguments(format!(
            "refusing to {what} without confirmation: stdin is not a terminal"
        ))
        .hint("add --yes to confirm"));
    }
    eprint!("This will {what}. Type {expected:?} to confirm: ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    stdin
        .lock()
        .read_line(&mut answer)
        .map_err(|e| Failure::new(crate::failure::ERROR, format!("reading the answer: {e}")))?;
    if answer.trim() == expected {
        Ok(())
    } else {
        Err(Failure::new(
            crate::failure::ERROR,
            "not confirmed; nothing was deleted",
        ))
    }
}
