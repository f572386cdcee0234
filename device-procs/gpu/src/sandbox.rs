//! isola-gpu's additions to the shared sandbox (`isola_device_common::sandbox`): the
//! positional write of `--state-file` through the descriptor opened before the sandbox
//! ([`crate::state::StateFile`]: two slots rewritten in place, so no open, no rename and no
//! path is needed). Everything else it does (the vhost-user connection, guest memory, the
//! display connection that arrives as a descriptor with `VHOST_USER_GPU_SET_SOCKET` and is
//! spoken to with sendmsg/recvmsg, its handshake thread, pixel conversion in memory) is in
//! the base. No network (a new, empty network namespace), no paths, no new processes.

use isola_device_common::sandbox::Policy;

/// Syscalls beyond the shared base, and who makes them.
const SYSCALLS: &[i64] = &[
    // StateFile::save: write_all_at on the state file's descriptor.
    libc::SYS_pwrite64,
];

/// The policy `run` enters before serving, for a resource budget of `budget` bytes.
pub fn policy(budget: u64) -> Policy {
    Policy {
        name: "isola-gpu",
        syscalls: SYSCALLS,
        // getsockopt(SO_DOMAIN/SO_TYPE) for VHOST_USER_GPU_SET_SOCKET's fd is in the
        // common allowlist (every device gets that request checked by the vhost crate).
        rules: Vec::new(),
        host_network: false,
        // Two queues (kick, call, error eventfds, a stop eventfd and an epoll fd each), up to
        // 64 memory regions, the in-flight region, the connection, the display connection and
        // the state file.
        max_fds: 256,
        // Resources live in private memory: up to --max-memory of them, plus a frame-sized
        // update buffer per flush kept in the heap (main's mmap threshold; a frame is at
        // most 4095 x 4095 x 4 bytes, 64 MiB), thread stacks and the heap: 1 GiB more.
        max_data: budget.saturating_add(1 << 30),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isola_device_common::testing::seccomp::{self, fails_with, raw};

    #[test]
    fn what_isola_gpu_must_never_do_kills_it() {
        let forbidden: [fn() -> i32; 7] = [
            // getsockopt beyond SO_DOMAIN/SO_TYPE (here SO_PEERCRED).
            || {
                let opt = [libc::SOL_SOCKET as usize, libc::SO_PEERCRED as usize];
                raw(libc::SYS_getsockopt, [usize::MAX, opt[0], opt[1], 0, 0, 0]) as i32
            },
            || raw(libc::SYS_socket, [libc::AF_UNIX as usize, 1, 0, 0, 0, 0]) as i32,
            // The state file is rewritten in place: no rename, no new file, no unlink.
            || {
                let (a, b) = (c"a".as_ptr() as usize, c"b".as_ptr() as usize);
                let cwd = libc::AT_FDCWD as usize;
                raw(libc::SYS_renameat2, [cwd, a, cwd, b, 0, 0]) as i32
            },
            || {
                let a = c"a".as_ptr() as usize;
                raw(libc::SYS_unlinkat, [libc::AT_FDCWD as usize, a, 0, 0, 0, 0]) as i32
            },
            || {
                let a = c"a".as_ptr() as usize;
                raw(libc::SYS_connect, [3, a, 2, 0, 0, 0]) as i32
            },
            || raw(libc::SYS_ioctl, [0, libc::TIOCSTI as usize, 0, 0, 0, 0]) as i32,
            // Reading files: nothing is read after the sandbox (the state is loaded before).
            || raw(libc::SYS_pread64, [usize::MAX, 0, 0, 0, 0, 0]) as i32,
        ];
        seccomp::assert_each_killed(&policy(256 << 20), &seccomp::NO_DEVICE_MAY, "any device");
        seccomp::assert_each_killed(&policy(256 << 20), &forbidden, "forbidden");
    }

    #[test]
    fn what_isola_gpu_does_is_allowed() {
        let allowed: [fn() -> i32; 5] = [
            || {
                let opt = [libc::SOL_SOCKET as usize, libc::SO_TYPE as usize];
                fails_with(
                    raw(libc::SYS_getsockopt, [usize::MAX, opt[0], opt[1], 0, 0, 0]),
                    libc::EBADF,
                )
            },
            || {
                fails_with(
                    raw(libc::SYS_pwrite64, [usize::MAX, 0, 0, 0, 0, 0]),
                    libc::EBADF,
                )
            },
            || {
                fails_with(
                    raw(libc::SYS_sendmsg, [usize::MAX, 0, 0, 0, 0, 0]),
                    libc::EBADF,
                )
            },
            || {
                let name = c"gpu-display".as_ptr() as usize;
                raw(
                    libc::SYS_prctl,
                    [libc::PR_SET_NAME as usize, name, 0, 0, 0, 0],
                ) as i32
            },
            || fails_with(raw(libc::SYS_clone3, [0; 6]), libc::ENOSYS),
        ];
        seccomp::assert_each_allowed(&policy(256 << 20), &allowed, "allowed");
    }
}
