//! isola-usb: command line -> validated configuration -> run. Bad input: one line on
//! stderr, exit status 2. Failure while serving: exit status 1.

use std::process::ExitCode;

use isola_usb::{run, Config};

fn main() -> ExitCode {
    isola_device_common::cli::main("isola-usb", Config::from_cli, run)
}
