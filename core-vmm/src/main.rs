//! `isola-core`: command line -> validated config -> VM -> exit status.
//!
//! Exit status: 0 when the guest powers off, resets or is shut down; the value the guest
//! wrote to the debug-exit port (0xf4); 2 for bad input (arguments, kernel, initrd, command
//! line); 3 when the guest crashes (registers follow on stderr); 1 for any other failure.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use core_vmm::config::Cli;
use core_vmm::error_chain;
use core_vmm::vcpu::VmExit;
use core_vmm::vm::Vm;

const EXIT_BAD_INPUT: u8 = 2;
const EXIT_GUEST_CRASH: u8 = 3;
const EXIT_FAILURE: u8 = 1;

/// Every line: `isola-core[PID]: LEVEL core/THREAD: message` (the thread: `main`, `vcpu0`, a
/// device's backend thread, `control`), as the device processes write theirs.
fn init_logging(level: Option<&str>) {
    let pid = std::process::id();
    let mut builder = match level {
        Some(level) => {
            let mut builder = env_logger::Builder::new();
            builder.parse_filters(level);
            builder
        }
        None => env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")),
    };
    builder
        .format(move |buf, record| {
            let thread = std::thread::current();
            writeln!(
                buf,
                "isola-core[{pid}]: {} core/{}: {}",
                record.level(),
                thread.name().unwrap_or("?"),
                record.args()
            )
        })
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_level.as_deref());
    let config = match cli.validate() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("isola-core: error: {}", error_chain(&e));
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let outcome = Vm::new(&config).and_then(Vm::run);
    match outcome {
        Ok(VmExit::Poweroff) => {
            log::info!("guest powered off");
            ExitCode::SUCCESS
        }
        Ok(VmExit::Reset) => {
            eprintln!("isola-core: guest requested a reset; the VM ends");
            ExitCode::SUCCESS
        }
        Ok(VmExit::Shutdown) => {
            eprintln!("isola-core: shut down on request");
            ExitCode::SUCCESS
        }
        Ok(VmExit::DebugExit(status)) => {
            if status != 0 {
                eprintln!("isola-core: guest exited with status {status} (debug-exit port)");
            }
            ExitCode::from(status)
        }
        Ok(VmExit::Failed(reason)) => {
            eprintln!("isola-core: error: {reason}");
            ExitCode::from(EXIT_FAILURE)
        }
        Ok(VmExit::Crash { vcpu, reason, dump }) => {
            eprintln!("isola-core: guest crashed: {reason} on vcpu{vcpu}\n{dump}");
            ExitCode::from(EXIT_GUEST_CRASH)
        }
        Err(e) => {
            eprintln!("isola-core: error: {}", error_chain(&e));
            ExitCode::from(if e.is_bad_input() {
                EXIT_BAD_INPUT
            } else {
                EXIT_FAILURE
            })
        }
    }
}
