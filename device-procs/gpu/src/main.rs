//! isola-gpu: command line -> validated configuration -> run. Bad input: one line on
//! stderr, exit status 2. Failure while serving: exit status 1.

use std::process::ExitCode;

use isola_gpu::{run, Config};

fn main() -> ExitCode {
    // Every flush allocates a frame-sized update buffer; keep such blocks in the heap for
    // reuse instead of mapping (and faulting in) fresh pages each time.
    // The trim threshold, above the largest arena heap (64 MiB), also keeps glibc from
    // shrinking a thread's arena heap, which reads /proc/sys/vm/overcommit_memory the first
    // time: an open the sandbox forbids. Likewise the arena limit, set to what glibc would
    // compute (8 per CPU), keeps it from counting CPUs in /sys when a ninth arena is needed.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
        libc::mallopt(libc::M_ARENA_MAX, (8 * cpus).min(4096) as libc::c_int);
    }
    isola_device_common::cli::main("isola-gpu", Config::from_cli, run)
}
