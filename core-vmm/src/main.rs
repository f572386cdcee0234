//! `isola-core`: command line -> validated config -> VM -> exit status.
//!
//! Exit status: 0 when the guest powers off, resets or is shut down; the value the guest
//! wrote to the debug-exit port (0xf4); 2 for bad input (arguments, kernel, initrd, command
//! line); 3 when the guest crashes (registers follow on stderr); 1 for any other failure.

use std::io::Write;

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

/// The `--exit-report-fd` file, checked to be an open descriptor and made close-on-exec.
fn exit_report(fd: Option<i32>) -> Result<Option<std::fs::File>, String> {
    let Some(fd) = fd else { return Ok(None) };
    // SAFETY: F_GETFD takes no pointer; an fd that is not open only yields EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!(
            "--exit-report-fd {fd}: not an open file descriptor"
        ));
    }
    // SAFETY: F_SETFD with an integer flag, on the fd just checked to be open.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: fd is open (checked above), was inherited for this purpose (the option's
    // contract), and nothing else in this process owns it: it is taken once, here.
    Ok(Some(unsafe {
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
    }))
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_level.as_deref());
    let mut report = match exit_report(cli.exit_report_fd) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("isola-core: error: {e}");
            std::process::exit(EXIT_BAD_INPUT.into());
        }
    };
    let config = match cli.validate() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("isola-core: error: {}", error_chain(&e));
            std::process::exit(EXIT_BAD_INPUT.into());
        }
    };
    let (outcome, held) = match Vm::new(&config) {
        Ok(vm) => {
            let (outcome, held) = vm.run();
            (outcome, Some(held))
        }
        Err(e) => (Err(e), None),
    };
    if let Some(file) = report.as_mut() {
        // One line for the manager; a manager that is gone does not change the exit.
        let _ = writeln!(file, "{}", exit_line(&outcome));
    }
    let status = exit_status(outcome);
    // Exits with the VM and guest RAM open: the kernel tears them down in the cheaper order
    // (see `vm::Held`). `exit` flushes stdout; it runs no destructor.
    let _held = held;
    std::process::exit(status.into());
}

/// Says how the VM ended, on stderr, and returns the exit status for it.
fn exit_status(outcome: Result<VmExit, core_vmm::vm::VmError>) -> u8 {
    match outcome {
        Ok(VmExit::Poweroff) => {
            log::info!("guest powered off");
            0
        }
        Ok(VmExit::Reset) => {
            eprintln!("isola-core: guest requested a reset; the VM ends");
            0
        }
        Ok(VmExit::Shutdown { graceful, detail }) => {
            let how = if graceful { "gracefully" } else { "hard" };
            eprintln!("isola-core: shut down {how} on request: {detail}");
            0
        }
        Ok(VmExit::DebugExit(status)) => {
            if status != 0 {
                eprintln!("isola-core: guest exited with status {status} (debug-exit port)");
            }
            status
        }
        Ok(VmExit::Failed(reason)) => {
            eprintln!("isola-core: error: {reason}");
            EXIT_FAILURE
        }
        Ok(VmExit::Crash { vcpu, reason, dump }) => {
            eprintln!("isola-core: guest crashed: {reason} on vcpu{vcpu}\n{dump}");
            EXIT_GUEST_CRASH
        }
        Err(e) => {
            eprintln!("isola-core: error: {}", error_chain(&e));
            if e.is_bad_input() {
                EXIT_BAD_INPUT
            } else {
                EXIT_FAILURE
            }
        }
    }
}

/// The `--exit-report-fd` line: a reason word, then details.
fn exit_line(outcome: &Result<VmExit, core_vmm::vm::VmError>) -> String {
    match outcome {
        Ok(exit) => exit.summary(),
        Err(e) => format!("error {}", error_chain(e).lines().next().unwrap_or("")),
    }
}
