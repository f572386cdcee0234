//! isola-usb's additions to the shared sandbox (`isola_device_common::sandbox`).
//!
//! `Config::from_cli` opens the disk image and the state file and binds every socket before
//! the sandbox: the vfio-user socket, the control socket, and the private listener the
//! `vfio_user` crate's server accepts its one connection (the gate's, already queued) on.
//! Once it serves, the process only accepts on its listeners, moves data between guest
//! memory (mapped from the fds DMA_MAP brings) and the image with positional I/O, and
//! signals the MSI-X eventfd. No path, no new socket, no network (a new, empty network
//! namespace), no new process.
//!
//! Beyond the base:
//! - `pread64`, `pwrite64`: mass-storage reads and writes (`storage.rs`, `read_exact_at` /
//!   `write_all_at` on the image) and the restart marker (`state.rs`, `write_all_at`).
//! - `fdatasync`: SYNCHRONIZE CACHE.
//! - `setsockopt(SOL_SOCKET, SO_SNDTIMEO)`: a frontend or control client must take its
//!   answer within a deadline (`gate::serve_frontend`, `control::serve_client`). The base
//!   allows SO_RCVTIMEO.

use isola_device_common::sandbox::{
    Policy, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule,
};

const SYSCALLS: &[i64] = &[libc::SYS_pread64, libc::SYS_pwrite64, libc::SYS_fdatasync];

fn condition(arg: u8, value: u64) -> Option<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value).ok()
}

/// The policy `run` enters before serving.
pub fn policy() -> Policy {
    let send_timeout = condition(1, libc::SOL_SOCKET as u64)
        .zip(condition(2, libc::SO_SNDTIMEO as u64))
        .and_then(|(level, option)| SeccompRule::new(vec![level, option]).ok());
    Policy {
        name: "isola-usb",
        syscalls: SYSCALLS,
        rules: vec![(libc::SYS_setsockopt, send_timeout.into_iter().collect())],
        host_network: false,
        // Three listeners, the private pair, one frontend with its DMA fds (16) and an
        // eventfd, the image, the state file, at most 16 control clients.
        max_fds: 256,
        // Heap (bounded report queues, one TD of at most 4 MiB at a time), thread stacks;
        // guest memory does not count.
        max_data: 1 << 30,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isola_device_common::testing::seccomp::{self, fails_with, raw, BAD_FD};

    #[test]
    fn what_isola_usb_must_never_do_kills_it() {
        let forbidden: [fn() -> i32; 4] = [
            || raw(libc::SYS_socket, [libc::AF_UNIX as usize, 1, 0, 0, 0, 0]) as i32,
            || raw(libc::SYS_connect, [BAD_FD, 0, 0, 0, 0, 0]) as i32,
            || raw(libc::SYS_bind, [BAD_FD, 0, 0, 0, 0, 0]) as i32,
            || {
                let option = libc::SO_PASSCRED as usize;
                raw(
                    libc::SYS_setsockopt,
                    [BAD_FD, libc::SOL_SOCKET as usize, option, 0, 0, 0],
                ) as i32
            },
        ];
        seccomp::assert_each_killed(&policy(), &seccomp::NO_DEVICE_MAY, "any device");
        seccomp::assert_each_killed(&policy(), &forbidden, "forbidden");
    }

    #[test]
    fn what_isola_usb_does_is_allowed() {
        let allowed: [fn() -> i32; 4] = [
            || fails_with(raw(libc::SYS_pread64, [BAD_FD, 0, 0, 0, 0, 0]), libc::EBADF),
            || {
                fails_with(
                    raw(libc::SYS_pwrite64, [BAD_FD, 0, 0, 0, 0, 0]),
                    libc::EBADF,
                )
            },
            || {
                fails_with(
                    raw(libc::SYS_fdatasync, [BAD_FD, 0, 0, 0, 0, 0]),
                    libc::EBADF,
                )
            },
            || {
                let option = libc::SO_SNDTIMEO as usize;
                let ret = raw(
                    libc::SYS_setsockopt,
                    [BAD_FD, libc::SOL_SOCKET as usize, option, 0, 0, 0],
                );
                fails_with(ret, libc::EBADF)
            },
        ];
        seccomp::assert_each_allowed(&policy(), &allowed, "allowed");
    }
}
