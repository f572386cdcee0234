//! isola-display: command line -> validated configuration -> run. Bad input: one line on
//! stderr, exit status 2.

use std::process::ExitCode;

use clap::Parser;
use isola_device_common::logging;
use isola_display::{run, Cli, Config};

/// A clap error on one line: its first paragraph, whitespace collapsed.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let message = text.split("\n\n").next().unwrap_or(&text);
    let message = message.strip_prefix("error: ").unwrap_or(message);
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn main() -> ExitCode {
    // Two files glibc's malloc reads on its own, which the sandbox (empty root, no open)
    // forbids, with threads (a control connection, two per VNC client) coming and going:
    // - trimming the top of a thread's arena heap (shrink_heap) reads
    //   /proc/sys/vm/overcommit_memory the first time. A trim threshold above the largest
    //   arena heap (64 MiB) means it never trims one (a wholly free heap is still unmapped;
    //   big buffers are mmapped and unmapped anyway);
    // - the first thread that needs a ninth arena makes it count the CPUs
    //   (/sys/devices/system/cpu/online) for its arena limit. Setting that limit now, to what
    //   it would compute (8 per CPU), means it never asks.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
        libc::mallopt(libc::M_ARENA_MAX, (8 * cpus).min(4096) as libc::c_int);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("isola-display: {}", one_line(&e));
            return ExitCode::from(2);
        }
    };
    logging::init("isola-display");
    let config = match Config::from_cli(cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("isola-display: {}", logging::chain(&e));
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
