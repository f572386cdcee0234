//! isola-net: command line -> validated configuration -> run. Bad input: one line on
//! stderr, exit status 2. Failure while serving: exit status 1.

use std::process::ExitCode;

use clap::Parser;
use isola_device_common::logging;
use isola_net::{run, Cli, Config};

/// A clap error on one line: its first paragraph, whitespace collapsed.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let message = text.split("\n\n").next().unwrap_or(&text);
    let message = message.strip_prefix("error: ").unwrap_or(message);
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("isola-net: {}", one_line(&e));
            return ExitCode::from(2);
        }
    };
    logging::init("isola-net");
    let config = match Config::from_cli(cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("isola-net: {}", logging::chain(&e));
            return ExitCode::from(2);
        }
    };
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{}", logging::chain(&e));
            ExitCode::FAILURE
        }
    }
}
