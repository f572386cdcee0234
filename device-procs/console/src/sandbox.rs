//! isola-console's additions to the shared sandbox (`isola_device_common::sandbox`).
//!
//! Everything with a path is opened by `Config::from_cli`, before the sandbox: each port's
//! log file (append-only) and its delivery record (`LOG.isola-record`), the user-side
//! listening socket of a `socket=` port, and the pty (with its `pty=LINK` symlink) of a `pty`
//! port. None is opened per connection: a user attaching is an `accept` on the listener that
//! already exists, and a pty stays open for the process's life. So the device needs no path
//! at all once it serves: no open, no unlink (a dropped `Port` would remove its socket file or
//! pty link, so `run` keeps every port alive once sandboxed; a stale socket file left by a
//! killed or failed process is replaced at the next start, before the sandbox), no socket,
//! no network (a new, empty network namespace).
//!
//! Beyond the base, while it serves:
//! - `pwrite64`: the delivery record is rewritten in place at offset 0 before and after each
//!   transmit buffer is appended to a log (`Record::store`).
//! - `ioctl`, three request numbers only:
//!   - `TIOCGWINSZ`: the I/O thread polls each pty's window size to send a resize to the
//!     driver (`port::winsize`, from `io.rs`);
//!   - `FIONREAD`: how many bytes a user socket still holds when it hangs up, so the last
//!     bytes reach the guest (`io.rs`, `stream_ready`);
//!   - `FIONBIO`: a newly accepted user connection is made non-blocking
//!     (`UnixStream::set_nonblocking`, `io.rs`, `accept`).
//!
//!   In particular `TIOCSTI` (push characters into a terminal's input) and every other tty
//!   ioctl are forbidden.

use isola_device_common::sandbox::{
    Policy, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule,
};

/// Syscalls beyond the shared base, any arguments.
const SYSCALLS: &[i64] = &[
    // The delivery record, rewritten in place (record.rs, Record::store).
    libc::SYS_pwrite64,
];

/// The ioctls the device makes while serving (module documentation).
pub const IOCTLS: [u64; 3] = [libc::TIOCGWINSZ, libc::FIONREAD, libc::FIONBIO];

/// The policy `run` enters before serving.
pub fn policy() -> Policy {
    let ioctl_rules = IOCTLS
        .iter()
        .filter_map(|&request| {
            let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
                .ok()?;
            SeccompRule::new(vec![cond]).ok()
        })
        .collect();
    Policy {
        name: "isola-console",
        syscalls: SYSCALLS,
        rules: vec![(libc::SYS_ioctl, ioctl_rules)],
        host_network: false,
        // Per port (at most 31): a log, its record, a listener and a user, or a pty's master
        // and slave, and a receive eventfd; per queue (at most 64): kick, call, error and
        // stop eventfds and an epoll fd; up to 64 memory regions, the in-flight region, the
        // listener and the connection.
        max_fds: 1024,
        // Heap (port buffers), one 2 MiB stack per thread; guest RAM is a shared mapping and
        // does not count.
        max_data: 1 << 30,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isola_device_common::testing::seccomp::{self, fails_with, raw, BAD_FD};

    #[test]
    fn what_isola_console_must_never_do_kills_it() {
        let forbidden: [fn() -> i32; 5] = [
            // A log is never reopened, a socket file never removed, while serving.
            || {
                let path = c"/tmp/x.log".as_ptr() as usize;
                raw(
                    libc::SYS_unlinkat,
                    [libc::AT_FDCWD as usize, path, 0, 0, 0, 0],
                ) as i32
            },
            || raw(libc::SYS_socket, [libc::AF_UNIX as usize, 1, 0, 0, 0, 0]) as i32,
            // Typing into a terminal, and setting a pty's size or modes: not the device's.
            || {
                raw(
                    libc::SYS_ioctl,
                    [BAD_FD, libc::TIOCSTI as usize, 0, 0, 0, 0],
                ) as i32
            },
            || {
                raw(
                    libc::SYS_ioctl,
                    [BAD_FD, libc::TIOCSWINSZ as usize, 0, 0, 0, 0],
                ) as i32
            },
            || raw(libc::SYS_ioctl, [BAD_FD, libc::TCSETS as usize, 0, 0, 0, 0]) as i32,
        ];
        seccomp::assert_each_killed(&policy(), &seccomp::NO_DEVICE_MAY, "any device");
        seccomp::assert_each_killed(&policy(), &forbidden, "forbidden");
    }

    #[test]
    fn what_isola_console_does_is_allowed() {
        // On an fd nothing has open each fails with EBADF if the filter lets it through.
        let allowed: [fn() -> i32; 5] = [
            || {
                fails_with(
                    raw(
                        libc::SYS_ioctl,
                        [BAD_FD, libc::TIOCGWINSZ as usize, 0, 0, 0, 0],
                    ),
                    libc::EBADF,
                )
            },
            || {
                fails_with(
                    raw(
                        libc::SYS_ioctl,
                        [BAD_FD, libc::FIONREAD as usize, 0, 0, 0, 0],
                    ),
                    libc::EBADF,
                )
            },
            || {
                fails_with(
                    raw(
                        libc::SYS_ioctl,
                        [BAD_FD, libc::FIONBIO as usize, 0, 0, 0, 0],
                    ),
                    libc::EBADF,
                )
            },
            || {
                fails_with(
                    raw(libc::SYS_pwrite64, [BAD_FD, 0, 0, 0, 0, 0]),
                    libc::EBADF,
                )
            },
            || fails_with(raw(libc::SYS_accept4, [BAD_FD, 0, 0, 0, 0, 0]), libc::EBADF),
        ];
        seccomp::assert_each_allowed(&policy(), &allowed, "allowed");
    }
}
