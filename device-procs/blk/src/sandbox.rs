//! isola-blk's additions to the shared sandbox (`isola_device_common::sandbox`): positional
//! I/O on the image that was opened before the sandbox, and io_uring for `--engine io-uring`.
//! No network (a new, empty network namespace), no paths, no new processes.

use isola_device_common::sandbox::Policy;

/// Syscalls beyond the shared base, and who makes them.
const SYSCALLS: &[i64] = &[
    // The sync engine and the tail of a short io_uring transfer (disk.rs).
    libc::SYS_preadv,
    libc::SYS_pwritev,
    // FLUSH (Disk::flush).
    libc::SYS_fdatasync,
    // DISCARD and WRITE_ZEROES: punch a hole or zero a range (Disk::fallocate).
    libc::SYS_fallocate,
    // The io_uring engine: one ring per queue, created when the queue starts
    // (UringEngine::new), its completion eventfd registered, then submit and wait.
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_register,
    libc::SYS_io_uring_enter,
];

/// The policy `run` enters before serving.
pub fn policy() -> Policy {
    Policy {
        name: "isola-blk",
        syscalls: SYSCALLS,
        rules: Vec::new(),
        host_network: false,
        // Per queue (at most 64): kick, call and error eventfds, a stop eventfd, the epoll
        // fd, an io_uring fd and its eventfd; plus up to 64 memory regions, the in-flight
        // region, the connection and the image.
        max_fds: 1024,
        // Heap, one 2 MiB stack per queue thread, bounce buffers (--direct) and the 1 MiB
        // zero buffer of WRITE_ZEROES; guest RAM is a shared mapping and does not count.
        max_data: 1 << 30,
    }
}
