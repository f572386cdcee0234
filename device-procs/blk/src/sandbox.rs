//! isola-blk's additions to the shared sandbox (`isola_device_common::sandbox`): positional
//! I/O on the image that was opened before the sandbox, and io_uring for `--engine io-uring` and `auto`.
//! No network (a new, empty network namespace), no paths, no new processes.

use isola_device_common::sandbox::Policy;

use crate::engine::EngineKind;

/// Syscalls beyond the shared base, and who makes them.
const SYSCALLS: &[i64] = &[
    // The sync engine and the tail of a short io_uring transfer (disk.rs).
    libc::SYS_preadv,
    libc::SYS_pwritev,
    // FLUSH (Disk::flush).
    libc::SYS_fdatasync,
    // DISCARD and WRITE_ZEROES: punch a hole or zero a range (Disk::fallocate).
    libc::SYS_fallocate,
];

/// With `--engine io-uring` or `auto` only: one ring per queue, created when the queue starts
/// (UringEngine::new), its completion eventfd registered, then submit and wait. (io_uring's
/// own operations are not seen by seccomp: docs/threat-model.md.)
const SYSCALLS_IO_URING: &[i64] = &[
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_register,
    libc::SYS_io_uring_enter,
];

/// The policy `run` enters before serving, for `engine`.
pub fn policy(engine: EngineKind) -> Policy {
    Policy {
        name: "isola-blk",
        syscalls: match engine {
            EngineKind::Sync => SYSCALLS,
            // `auto` reads through io_uring (and falls back to sync if it cannot).
            EngineKind::Auto | EngineKind::IoUring => SYSCALLS_IO_URING,
        },
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

#[cfg(test)]
mod tests {
    use super::*;
    use isola_device_common::testing::seccomp::{self, exited, fails_with, killed_by_sigsys, raw};

    /// Runs `body` in a forked child under isola-blk's filters for `engine`.
    fn in_filtered_child(engine: EngineKind, body: fn() -> i32) -> libc::c_int {
        seccomp::in_filtered_child(&policy(engine), body)
    }

    #[test]
    fn what_isola_blk_must_never_do_kills_it() {
        let forbidden: [fn() -> i32; 3] = [
            || raw(libc::SYS_socket, [libc::AF_UNIX as usize, 1, 0, 0, 0, 0]) as i32,
            || raw(libc::SYS_ioctl, [0, libc::TIOCSTI as usize, 0, 0, 0, 0]) as i32,
            || {
                raw(
                    libc::SYS_prctl,
                    [libc::PR_SET_DUMPABLE as usize, 1, 0, 0, 0, 0],
                ) as i32
            },
        ];
        for engine in [EngineKind::Sync, EngineKind::IoUring] {
            seccomp::assert_each_killed(&policy(engine), &seccomp::NO_DEVICE_MAY, "any device");
            seccomp::assert_each_killed(&policy(engine), &forbidden, &format!("{engine:?}"));
        }
    }

    #[test]
    fn the_sync_engine_may_not_use_io_uring() {
        let setup = || {
            fails_with(
                raw(libc::SYS_io_uring_setup, [1, 0, 0, 0, 0, 0]),
                libc::EFAULT,
            )
        };
        assert!(killed_by_sigsys(in_filtered_child(EngineKind::Sync, setup)));
        let status = in_filtered_child(EngineKind::IoUring, setup);
        assert_eq!(exited(status), Some(0), "status {status:#x}");
    }

    #[test]
    fn what_isola_blk_does_is_allowed() {
        // Invalid fds and null buffers: each fails with an errno if the filter lets it
        // through.
        let allowed: [fn() -> i32; 5] = [
            || {
                fails_with(
                    raw(libc::SYS_preadv, [usize::MAX, 0, 0, 0, 0, 0]),
                    libc::EBADF,
                )
            },
            || {
                fails_with(
                    raw(libc::SYS_fallocate, [usize::MAX, 0, 0, 1, 0, 0]),
                    libc::EBADF,
                )
            },
            || {
                fails_with(
                    raw(libc::SYS_io_uring_enter, [usize::MAX, 0, 0, 0, 0, 0]),
                    libc::EBADF,
                )
            },
            || {
                let name = c"blk-q0".as_ptr() as usize;
                raw(
                    libc::SYS_prctl,
                    [libc::PR_SET_NAME as usize, name, 0, 0, 0, 0],
                ) as i32
            },
            // clone3 fails with ENOSYS (glibc then uses clone, whose flags a filter can see).
            || fails_with(raw(libc::SYS_clone3, [0; 6]), libc::ENOSYS),
        ];
        seccomp::assert_each_allowed(&policy(EngineKind::IoUring), &allowed, "allowed");
    }
}
