//! isola-display: command line -> validated configuration -> run. Bad input: one line on
//! stderr, exit status 2.

use std::process::ExitCode;

use isola_display::{run, Config};

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
    isola_device_common::cli::main("isola-display", Config::from_cli, run)
}
