//! seccomp for the core's own threads: one allowlist per thread type.
//!
//! - **vCPU threads** install theirs before the first `KVM_RUN`: they handle exits (port and
//!   MMIO emulation, serial output), reprogram interrupt routes and ioeventfds when the guest
//!   moves a BAR or an MSI-X vector, and queue work for a device's backend thread. They never
//!   talk to a device process: no socket calls at all.
//! - **Backend threads** (one per device, `<name>-backend`) and the **deadline thread** talk
//!   vhost-user to device processes, reconnect to restarted ones (Unix sockets only), pass
//!   display connections to GPU backends, and shut down a socket whose exchange missed its
//!   deadline. A vfio-user backend thread also registers a reconnected server's doorbell
//!   ioeventfds (`KVM_IOEVENTFD`, its only KVM ioctl).
//! - **The control thread** (the main thread) installs its own after the vCPU threads exist
//!   (so they do not inherit it): it polls, serves the control socket, injects MSIs, kicks
//!   vCPU threads and tears the VM down.
//!
//! `ioctl` is allowed only with the request numbers each thread type issues. Anything else kills
//! the whole process (`--seccomp=kill`, the default), or is logged and allowed
//! (`--seccomp=log`, for finding a missing entry); `--seccomp=off` installs nothing. Every
//! thread also gets `no_new_privs`.

use std::collections::BTreeMap;

use kvm_bindings::{
    kvm_ioeventfd, kvm_irq_routing, kvm_irqfd, kvm_msi, kvm_regs, kvm_sregs, KVMIO,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr};

ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);
/// `UnixStream::set_nonblocking` uses this ioctl.
const FIONBIO: u64 = libc::FIONBIO;

/// What a filter does with a syscall that is not on its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    Kill,
    Log,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    Vcpu,
    Backend,
    Control,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
}

/// Syscalls every thread of the core makes: memory management for the allocator, futexes,
/// signal return (the vCPU kick), writing logs, closing fds and exiting.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// vCPU threads: duplicating a queue's eventfds for the backend thread (`fcntl(F_DUPFD_CLOEXEC)`)
/// is all they add.
const VCPU: &[i64] = &[libc::SYS_fcntl];

/// Backend and deadline threads: vhost-user messages carry fds (`sendmsg`/`recvmsg`), the
/// GPU's display socket is sent with `sendmsg` and its reply read with `recvfrom`, reconnects
/// open Unix sockets (`socket`, restricted below, and `connect`), the deadline thread
/// `shutdown`s a socket whose exchange is late, and the vhost crate checks the socket type
/// (`getsockopt`).
const BACKEND: &[i64] = &[
    libc::SYS_connect,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_fcntl,
];

/// The control thread (and `control-start`): the control socket (accept, reads are `recvfrom`,
/// client timeouts are `setsockopt`), kicks (`pthread_kill` -> `tgkill`), joining vCPU threads
/// and removing the socket file at exit. It talks to no device process: no `socket`,
/// `connect`, `sendmsg` or `recvmsg`.
const CONTROL: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_fcntl,
    libc::SYS_tgkill,
    libc::SYS_unlink,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
];

fn ioctls(kind: ThreadKind) -> Vec<u64> {
    match kind {
        ThreadKind::Vcpu => vec![
            KVM_RUN(),
            KVM_GET_REGS(),
            KVM_GET_SREGS(),
            KVM_SET_GSI_ROUTING(),
            KVM_IRQFD(),
            KVM_IOEVENTFD(),
        ],
        // KVM_IOEVENTFD: a reconnected vfio-user server's doorbells replace the old ones.
        ThreadKind::Backend => vec![FIONBIO, KVM_IOEVENTFD()],
        ThreadKind::Control => vec![KVM_SIGNAL_MSI(), FIONBIO],
    }
}

/// The BPF program for `kind`, or `None` when `mode` is off.
pub fn filter(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SandboxError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    let own = match kind {
        ThreadKind::Vcpu => VCPU,
        ThreadKind::Backend => BACKEND,
        ThreadKind::Control => CONTROL,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON
        .iter()
        .chain(own)
        .map(|&nr| (nr, Vec::new()))
        .collect();
    let ioctl_rules = ioctls(kind)
        .into_iter()
        .map(|request| {
            let cond =
                SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)?;
            SeccompRule::new(vec![cond])
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(SandboxError::Build)?;
    rules.insert(libc::SYS_ioctl, ioctl_rules);
    if kind == ThreadKind::Backend {
        // Reconnecting opens Unix sockets, and only those.
        let unix = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AF_UNIX as u64,
        )
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(SandboxError::Build)?;
        rules.insert(libc::SYS_socket, vec![unix]);
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(SandboxError::Build)?;
    let program: BpfProgram = filter.try_into().map_err(SandboxError::Build)?;
    Ok(Some(program))
}

/// Sets no_new_privs and installs `program` (if any) on the calling thread.
pub fn install(program: Option<&BpfProgram>) -> Result<(), SandboxError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only and changes no memory.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SandboxError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    if let Some(program) = program {
        seccompiler::apply_filter(program).map_err(SandboxError::Install)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_abi() {
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_SIGNAL_MSI(), 0x4020_aea5);
        assert_eq!(KVM_IRQFD(), 0x4020_ae76);
    }

    /// Runs `body` in a forked child with `kind`'s filter installed; returns how it ended.
    fn in_filtered_child(kind: ThreadKind, body: fn()) -> libc::c_int {
        let program = filter(kind, SeccompMode::Kill).unwrap().unwrap();
        // SAFETY: the child only installs a filter, makes raw syscalls and _exits; it touches no
        // lock another thread of the test binary could hold (the filter is built before fork).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: as above; `program` is a valid BPF program built by seccompiler.
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
            }
            if seccompiler::apply_filter(&program).is_err() {
                // SAFETY: _exit never returns and is async-signal-safe.
                unsafe { libc::_exit(100) };
            }
            body();
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out-pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        status
    }

    fn killed_by_sigsys(status: libc::c_int) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    #[test]
    fn vcpu_filter_kills_exec_socket_and_open() {
        // SAFETY: a raw syscall with constant, valid arguments.
        let exec = || unsafe {
            libc::syscall(
                libc::SYS_execve,
                c"/bin/true".as_ptr(),
                std::ptr::null::<u8>(),
                std::ptr::null::<u8>(),
            );
        };
        // SAFETY: a raw syscall with constant, valid arguments.
        let socket = || unsafe {
            libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0);
        };
        // SAFETY: a raw syscall with constant, valid arguments.
        let open = || unsafe {
            libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/etc/passwd".as_ptr(),
                libc::O_RDONLY,
            );
        };
        for body in [exec as fn(), socket, open] {
            assert!(killed_by_sigsys(in_filtered_child(ThreadKind::Vcpu, body)));
        }
    }

    #[test]
    fn vcpu_filter_kills_every_socket_exchange() {
        // A vCPU thread never talks to a device process: vhost-user runs on backend threads.
        // SAFETY: a raw syscall on fd -1 with null buffers; it fails with EBADF if the filter
        // lets it through, touching no memory.
        let sendmsg = || unsafe {
            libc::syscall(libc::SYS_sendmsg, -1, std::ptr::null::<u8>(), 0);
        };
        // SAFETY: as above.
        let recvmsg = || unsafe {
            libc::syscall(libc::SYS_recvmsg, -1, std::ptr::null::<u8>(), 0);
        };
        // SAFETY: as above.
        let sendto = || unsafe {
            libc::syscall(libc::SYS_sendto, -1, std::ptr::null::<u8>(), 0, 0, 0, 0);
        };
        // SAFETY: as above.
        let recvfrom = || unsafe {
            libc::syscall(libc::SYS_recvfrom, -1, std::ptr::null::<u8>(), 0, 0, 0, 0);
        };
        // SAFETY: as above.
        let connect = || unsafe {
            libc::syscall(libc::SYS_connect, -1, std::ptr::null::<u8>(), 0);
        };
        for (name, body) in [
            ("sendmsg", sendmsg as fn()),
            ("recvmsg", recvmsg),
            ("sendto", sendto),
            ("recvfrom", recvfrom),
            ("connect", connect),
        ] {
            let status = in_filtered_child(ThreadKind::Vcpu, body);
            assert!(
                killed_by_sigsys(status),
                "{name} allowed: status {status:#x}"
            );
        }
        // The backend threads keep them.
        let status = in_filtered_child(ThreadKind::Backend, sendmsg);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
    }

    #[test]
    fn control_filter_kills_unlisted_ioctls_but_allows_its_own() {
        // SAFETY: an ioctl on fd -1 fails with EBADF if the filter lets it through.
        let kvm_run = || unsafe {
            libc::syscall(libc::SYS_ioctl, -1, KVM_RUN());
        };
        assert!(killed_by_sigsys(in_filtered_child(
            ThreadKind::Control,
            kvm_run
        )));
        // SAFETY: as above.
        let signal_msi = || unsafe {
            libc::syscall(libc::SYS_ioctl, -1, KVM_SIGNAL_MSI(), 0);
        };
        let status = in_filtered_child(ThreadKind::Control, signal_msi);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status:#x}"
        );
    }

    #[test]
    fn control_filter_kills_device_socket_calls() {
        // SAFETY: a raw syscall on fd -1 with null buffers; it fails with EBADF if the filter
        // lets it through, touching no memory.
        let connect = || unsafe {
            libc::syscall(libc::SYS_connect, -1, std::ptr::null::<u8>(), 0);
        };
        // SAFETY: as above.
        let sendmsg = || unsafe {
            libc::syscall(libc::SYS_sendmsg, -1, std::ptr::null::<u8>(), 0);
        };
        // SAFETY: a raw syscall with constant, valid arguments.
        let unix_socket = || unsafe {
            libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0);
        };
        for body in [connect as fn(), sendmsg, unix_socket] {
            assert!(killed_by_sigsys(in_filtered_child(
                ThreadKind::Control,
                body
            )));
        }
        // Backend threads may open Unix sockets (and only those).
        let status = in_filtered_child(ThreadKind::Backend, unix_socket);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
    }

    #[test]
    fn off_builds_nothing() {
        assert!(filter(ThreadKind::Vcpu, SeccompMode::Off)
            .unwrap()
            .is_none());
    }
}
