//! isola-display's additions to the shared sandbox (`isola_device_common::sandbox`). It is
//! not a vhost-user backend, but it parses what a GPU backend (and, over VNC, anyone who
//! reaches the port) sends, so it runs as sandboxed as one. Every listener (GPU socket,
//! control socket, VNC on TCP and on a Unix socket) is bound before the sandbox; a TCP
//! listener keeps its original network namespace, so VNC on TCP keeps working in the new,
//! empty one. Screenshots (PNG) and VNC encodings (zlib) need only memory.
//!
//! The one thing it cannot do from an empty root is reach isola-input by path (`--input`,
//! again after each isola-input restart): [`crate::connector`] does that from outside and
//! hands over the connected socket, so the display itself makes no socket and no connect.

use isola_device_common::sandbox::{
    Policy, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule,
};

/// Syscalls beyond the shared base, any arguments, and who makes them.
const SYSCALLS: &[i64] = &[
    // TcpListener::local_addr for the "VNC on ADDR" log line (lib.rs::run).
    libc::SYS_getsockname,
];

fn eq(arg: u8, value: libc::c_int) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value as u64)
        .expect("a valid condition")
}

/// `setsockopt(fd, level, option, ...)` for that level and option only.
fn option(level: libc::c_int, option: libc::c_int) -> SeccompRule {
    SeccompRule::new(vec![eq(1, level), eq(2, option)]).expect("a valid rule")
}

/// The policy `run` enters before serving.
pub fn policy() -> Policy {
    Policy {
        name: "isola-display",
        syscalls: SYSCALLS,
        rules: vec![(
            libc::SYS_setsockopt,
            vec![
                // The VNC handshake's read timeout (vnc::serve_client, set_read_timeout).
                option(libc::SOL_SOCKET, libc::SO_RCVTIMEO),
                // VNC over TCP: no Nagle delay on updates (vnc::serve_tcp, set_nodelay).
                option(libc::IPPROTO_TCP, libc::TCP_NODELAY),
            ],
        )],
        host_network: false,
        // A thread or two and a socket per GPU session, control connection and VNC client;
        // the listeners and the input link.
        max_fds: 1024,
        // The framebuffer (at most MAX_PIXELS, 4096 x 2400 x 4 bytes = 38 MiB), an UPDATE's
        // payload, a copy and zlib state per VNC client (at most 32), a PNG per screenshot,
        // 2 MiB stacks for about 100 threads: 4 GiB leaves room for all at once.
        max_data: 4 << 30,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::connector_policy;
    use isola_device_common::testing::seccomp::{
        assert_each_allowed, assert_each_killed, execve_true, fails_with, in_filtered_child,
        new_process, open_host_path, raw, NO_DEVICE_MAY,
    };

    fn inet_socket() -> i32 {
        raw(libc::SYS_socket, [libc::AF_INET as usize, 1, 0, 0, 0, 0]) as i32
    }

    #[test]
    fn what_isola_display_must_never_do_kills_it() {
        let forbidden: [fn() -> i32; 6] = [
            inet_socket,
            // No socket of any kind, no connect, no bind: isola-input is reached through the
            // connector.
            || raw(libc::SYS_socket, [libc::AF_UNIX as usize, 1, 0, 0, 0, 0]) as i32,
            || {
                let a = c"a".as_ptr() as usize;
                raw(libc::SYS_connect, [3, a, 2, 0, 0, 0]) as i32
            },
            || raw(libc::SYS_bind, [3, 0, 0, 0, 0, 0]) as i32,
            // setsockopt beyond the two it uses (here SO_BINDTODEVICE).
            || {
                let opt = [libc::SOL_SOCKET as usize, libc::SO_BINDTODEVICE as usize];
                raw(libc::SYS_setsockopt, [usize::MAX, opt[0], opt[1], 0, 0, 0]) as i32
            },
            || raw(libc::SYS_ioctl, [0, libc::TIOCSTI as usize, 0, 0, 0, 0]) as i32,
        ];
        assert_each_killed(&policy(), &NO_DEVICE_MAY, "any device");
        assert_each_killed(&policy(), &forbidden, "forbidden");
    }

    #[test]
    fn what_isola_display_does_is_allowed() {
        let allowed: [fn() -> i32; 4] = [
            || {
                let opt = [libc::IPPROTO_TCP as usize, libc::TCP_NODELAY as usize];
                fails_with(
                    raw(libc::SYS_setsockopt, [usize::MAX, opt[0], opt[1], 0, 0, 0]),
                    libc::EBADF,
                )
            },
            || {
                let opt = [libc::SOL_SOCKET as usize, libc::SO_RCVTIMEO as usize];
                fails_with(
                    raw(libc::SYS_setsockopt, [usize::MAX, opt[0], opt[1], 0, 0, 0]),
                    libc::EBADF,
                )
            },
            || {
                fails_with(
                    raw(libc::SYS_getsockname, [usize::MAX, 0, 0, 0, 0, 0]),
                    libc::EBADF,
                )
            },
            || {
                fails_with(
                    raw(libc::SYS_accept4, [usize::MAX, 0, 0, 0, 0, 0]),
                    libc::EBADF,
                )
            },
        ];
        assert_each_allowed(&policy(), &allowed, "allowed");
    }

    #[test]
    fn the_input_connector_may_make_unix_sockets_only_and_nothing_else() {
        let connector = connector_policy().unwrap();
        assert_each_killed(
            &connector,
            &[execve_true, open_host_path, new_process, inet_socket],
            "connector",
        );
        let unix_socket: fn() -> i32 = || {
            let fd = raw(libc::SYS_socket, [libc::AF_UNIX as usize, 1, 0, 0, 0, 0]);
            i32::from(fd < 0)
        };
        let status = in_filtered_child(&connector, unix_socket);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status:#x}"
        );
    }
}
