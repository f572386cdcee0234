//! isola-input's additions to the shared sandbox (`isola_device_common::sandbox`).
//!
//! `Config::from_cli` binds all three sockets before the sandbox: the keyboard's and the
//! tablet's vhost-user sockets and the control socket (replacing a stale socket file a
//! killed predecessor left, as a supervisor's restart finds it: `cli::bind`). Once it serves,
//! the process only accepts on those listeners: frontends on the two device sockets, control
//! clients (`isolactl`, isola-display) on the third, each client on a thread of its own
//! (clone with CLONE_THREAD, which the base allows; no new process). No path, no socket, no
//! network (a new, empty network namespace).
//!
//! Beyond the base, one call with checked arguments:
//! - `setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO | SO_SNDTIMEO, ...)`: a control client's frame
//!   must arrive, and an answer be taken, within `control::READ_TIMEOUT`
//!   (`UnixStream::set_read_timeout` / `set_write_timeout` in `control::serve_client`). No
//!   other level or option.

use isola_device_common::sandbox::{
    Policy, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule,
};

/// Syscalls beyond the shared base, any arguments: none.
const SYSCALLS: &[i64] = &[];

/// The socket options the control thread sets (module documentation).
pub const SOCKET_OPTIONS: [u64; 2] = [libc::SO_RCVTIMEO as u64, libc::SO_SNDTIMEO as u64];

fn condition(arg: u8, value: u64) -> Option<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value).ok()
}

/// The policy `run` enters before serving.
pub fn policy() -> Policy {
    let setsockopt_rules = SOCKET_OPTIONS
        .iter()
        .filter_map(|&option| {
            let level = condition(1, libc::SOL_SOCKET as u64)?;
            SeccompRule::new(vec![level, condition(2, option)?]).ok()
        })
        .collect();
    Policy {
        name: "isola-input",
        syscalls: SYSCALLS,
        rules: vec![(libc::SYS_setsockopt, setsockopt_rules)],
        host_network: false,
        // Three listeners, two frontend connections with their memory regions (up to 64
        // each), in-flight regions and per-queue eventfds, at most 16 control clients.
        max_fds: 1024,
        // Heap (bounded event queues), one 2 MiB stack per thread (at most 16 control
        // clients, two servers and their queue workers); guest RAM does not count.
        max_data: 1 << 30,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isola_device_common::testing::seccomp::{self, fails_with, raw, BAD_FD};
    const SOL_SOCKET: usize = libc::SOL_SOCKET as usize;

    #[test]
    fn what_isola_input_must_never_do_kills_it() {
        let forbidden: [fn() -> i32; 5] = [
            || raw(libc::SYS_socket, [libc::AF_UNIX as usize, 1, 0, 0, 0, 0]) as i32,
            // Binding or connecting anew: every socket was bound before the sandbox.
            || raw(libc::SYS_bind, [BAD_FD, 0, 0, 0, 0, 0]) as i32,
            || raw(libc::SYS_connect, [BAD_FD, 0, 0, 0, 0, 0]) as i32,
            // Socket options other than the two timeouts.
            || {
                let option = libc::SO_PASSCRED as usize;
                raw(libc::SYS_setsockopt, [BAD_FD, SOL_SOCKET, option, 0, 0, 0]) as i32
            },
            || {
                raw(
                    libc::SYS_ioctl,
                    [BAD_FD, libc::TIOCSTI as usize, 0, 0, 0, 0],
                ) as i32
            },
        ];
        seccomp::assert_each_killed(&policy(), &seccomp::NO_DEVICE_MAY, "any device");
        seccomp::assert_each_killed(&policy(), &forbidden, "forbidden");
    }

    #[test]
    fn what_isola_input_does_is_allowed() {
        // On an fd nothing has open each fails with EBADF if the filter lets it through.
        let allowed: [fn() -> i32; 4] = [
            || {
                let option = libc::SO_RCVTIMEO as usize;
                let ret = raw(libc::SYS_setsockopt, [BAD_FD, SOL_SOCKET, option, 0, 0, 0]);
                fails_with(ret, libc::EBADF)
            },
            || {
                let option = libc::SO_SNDTIMEO as usize;
                let ret = raw(libc::SYS_setsockopt, [BAD_FD, SOL_SOCKET, option, 0, 0, 0]);
                fails_with(ret, libc::EBADF)
            },
            || fails_with(raw(libc::SYS_accept4, [BAD_FD, 0, 0, 0, 0, 0]), libc::EBADF),
            // A control client's thread (CLONE_THREAD) is allowed; clone3 falls back to it.
            || fails_with(raw(libc::SYS_clone3, [0; 6]), libc::ENOSYS),
        ];
        seccomp::assert_each_allowed(&policy(), &allowed, "allowed");
    }
}
