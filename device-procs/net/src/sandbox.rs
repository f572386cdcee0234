//! isola-net's additions to the shared sandbox (`isola_device_common::sandbox`).
//!
//! The one exception among the device processes: isola-net keeps the host's network
//! namespace ([`Policy::host_network`]). Its tap queues were opened (or handed over) before
//! the sandbox and belong to a tap in whichever namespace the launcher made it; the device
//! itself never needs a socket, an address or a route: it moves frames between the guest's
//! rings and the tap fds with read and writev. So `socket` (and connect, bind, sendto on a new
//! socket) stays forbidden like everywhere else: keeping the namespace gives it nothing it
//! could open. Everything else is the common sandbox: user, mount, pid, IPC and UTS
//! namespaces, an empty root, no capabilities (TUNSETIFF on a new tap would need
//! CAP_NET_ADMIN; the device has none), no new processes.
//!
//! While it serves, the device calls two tap ioctls, only those two numbers are allowed:
//! `TUNSETOFFLOAD` when the driver acknowledges its features (`Tap::set_offload`, from
//! `NetDevice::acked_features`) and `TUNSETQUEUE` when the driver enables or disables a
//! queue pair (`Tap::set_queue_attached`). Neither needs a capability.

use isola_device_common::sandbox::{
    Policy, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule,
};

/// Syscalls beyond the shared base, any arguments: none (frames go through read and writev,
/// which the base allows).
const SYSCALLS: &[i64] = &[];

/// The tap ioctls the device may make while serving.
pub const TAP_IOCTLS: [u64; 2] = [libc::TUNSETOFFLOAD, libc::TUNSETQUEUE];

/// The policy `run` enters before serving.
pub fn policy() -> Policy {
    let ioctl_rules = TAP_IOCTLS
        .iter()
        .filter_map(|&request| {
            let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
                .ok()?;
            SeccompRule::new(vec![cond]).ok()
        })
        .collect();
    Policy {
        name: "isola-net",
        syscalls: SYSCALLS,
        rules: vec![(libc::SYS_ioctl, ioctl_rules)],
        host_network: true,
        // Per queue pair (at most 16): a tap fd, kick, call and error eventfds, a stop
        // eventfd and an epoll fd per queue; plus up to 64 memory regions, the in-flight
        // region, the listener and the connection.
        max_fds: 1024,
        // Heap, one 2 MiB stack per queue thread and a 64 KiB frame buffer each; guest RAM is
        // a shared mapping and does not count.
        max_data: 1 << 30,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isola_device_common::testing::seccomp::{self, fails_with, raw};

    #[test]
    fn what_isola_net_must_never_do_kills_it() {
        let forbidden: [fn() -> i32; 4] = [
            // The host's network namespace is kept, but no socket can be made in it.
            || raw(libc::SYS_socket, [libc::AF_INET as usize, 2, 0, 0, 0, 0]) as i32,
            || raw(libc::SYS_socket, [libc::AF_NETLINK as usize, 3, 0, 0, 0, 0]) as i32,
            // A tap ioctl other than the two: TUNSETIFF (create or attach a tap).
            || raw(libc::SYS_ioctl, [0, libc::TUNSETIFF as usize, 0, 0, 0, 0]) as i32,
            || raw(libc::SYS_ioctl, [0, libc::TIOCSTI as usize, 0, 0, 0, 0]) as i32,
        ];
        seccomp::assert_each_killed(&policy(), &seccomp::NO_DEVICE_MAY, "any device");
        seccomp::assert_each_killed(&policy(), &forbidden, "forbidden");
    }

    #[test]
    fn the_tap_ioctls_are_allowed() {
        // On an invalid fd each fails with EBADF if the filter lets it through.
        let allowed: [fn() -> i32; 3] = [
            || {
                fails_with(
                    raw(
                        libc::SYS_ioctl,
                        [usize::MAX >> 33, libc::TUNSETOFFLOAD as usize, 0, 0, 0, 0],
                    ),
                    libc::EBADF,
                )
            },
            || {
                fails_with(
                    raw(
                        libc::SYS_ioctl,
                        [usize::MAX >> 33, libc::TUNSETQUEUE as usize, 0, 0, 0, 0],
                    ),
                    libc::EBADF,
                )
            },
            || {
                fails_with(
                    raw(libc::SYS_writev, [usize::MAX >> 33, 0, 0, 0, 0, 0]),
                    libc::EBADF,
                )
            },
        ];
        seccomp::assert_each_allowed(&policy(), &allowed, "allowed");
    }
}
