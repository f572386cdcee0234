//! The seccomp allowlists: what every device process may call ([`BASE`]), what a device adds
//! ([`Policy`]), and the tiny list of the reaper (the parent outside the device's pid
//! namespace, which only waits and reports).
//!
//! Each filter's default action kills the whole process (`--seccomp=kill`) or logs the call
//! and lets it through (`--seccomp=log`, to find a missing entry: the kernel writes an audit
//! line `type=1326 ... syscall=N` to the kernel log for each call).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::SandboxError;

/// What a filter does with a syscall that is not on its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    Kill,
    Log,
    Off,
}

/// A device's additions to the sandbox and the base allowlist.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Process name, for the host name of its UTS namespace and for log lines ("isola-blk").
    pub name: &'static str,
    /// Syscalls the device makes beyond [`BASE`], any arguments.
    pub syscalls: &'static [i64],
    /// Syscalls the device makes only with certain arguments.
    pub rules: Vec<(i64, Vec<SeccompRule>)>,
    /// Keep the host's network namespace (only a network device needs it).
    pub host_network: bool,
    /// RLIMIT_NOFILE: the most descriptors the device may hold.
    pub max_fds: u64,
    /// RLIMIT_DATA: the device's private writable memory (heap, thread stacks, bounce
    /// buffers). Guest RAM is a shared mapping and does not count.
    pub max_data: u64,
}

/// Syscalls every device process makes once it serves, whatever the device. The unusual ones
/// name their caller.
pub const BASE: &[i64] = &[
    // Logging (env_logger, eprintln), vhost-user messages, eventfd kicks and calls.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    // The serve loop: one connection at a time on the listener opened before the sandbox.
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    // A failing queue worker shuts the connection down (worker.rs).
    libc::SYS_shutdown,
    // Queue workers wait on kick and stop eventfds; the server polls the listener.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_eventfd2,
    // UnixStream::try_clone (F_DUPFD_CLOEXEC), memfd seals (F_ADD_SEALS), flags.
    libc::SYS_fcntl,
    // In-flight region (GET_INFLIGHT_FD): memfd_create, ftruncate; seals via fcntl.
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    // Mapping guest memory (the memfd the frontend sends) and the in-flight region; the
    // allocator.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    // Threads: futexes, std's thread start (sigaltstack, the SIGSEGV/SIGBUS handler query,
    // sched_getaffinity), glibc's thread start (set_robust_list, rseq) and exit.
    libc::SYS_futex,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    // Clocks and sleeps (rate limiters; the server's back-off after a failed accept).
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    // std's HashMap seeds.
    libc::SYS_getrandom,
];

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(SandboxError::Filter)
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, SandboxError> {
    SeccompRule::new(conds).map_err(SandboxError::Filter)
}

/// Rules with argument checks that every device process needs.
fn base_rules() -> Result<Vec<(i64, Vec<SeccompRule>)>, SandboxError> {
    let empty_path = libc::AT_EMPTY_PATH as u64;
    let thread = libc::CLONE_THREAD as u64;
    Ok(vec![
        // Threads only: clone must carry CLONE_THREAD, so no new process can be made.
        // (clone3 passes its flags in memory, which a filter cannot read: the second filter
        // makes it fail with ENOSYS and glibc falls back to clone.)
        (
            libc::SYS_clone,
            vec![rule(vec![cond(
                0,
                SeccompCmpOp::MaskedEq(thread),
                thread,
            )?])?],
        ),
        // Thread names (std::thread::Builder::name -> PR_SET_NAME), nothing else of prctl.
        (
            libc::SYS_prctl,
            vec![rule(vec![cond(
                0,
                SeccompCmpOp::Eq,
                libc::PR_SET_NAME as u64,
            )?])?],
        ),
        // fstat of an open descriptor only (File::metadata on a memory region's memfd, the
        // eventfd check): AT_EMPTY_PATH. With the empty root there is no path to stat anyway.
        (
            libc::SYS_statx,
            vec![rule(vec![cond(
                2,
                SeccompCmpOp::MaskedEq(empty_path),
                empty_path,
            )?])?],
        ),
        (
            libc::SYS_newfstatat,
            vec![rule(vec![cond(
                3,
                SeccompCmpOp::MaskedEq(empty_path),
                empty_path,
            )?])?],
        ),
        (libc::SYS_fstat, Vec::new()),
        // The vhost crate checks the fd of GPU_SET_SOCKET (a request any frontend may send,
        // before Isola's handler can refuse it) with getsockopt(SOL_SOCKET, SO_DOMAIN) and
        // (SO_TYPE) in `validate_unix_stream_socket_fd`. Reading those two integers of a
        // socket the process was handed reveals nothing; every other option stays forbidden.
        (
            libc::SYS_getsockopt,
            [libc::SO_DOMAIN, libc::SO_TYPE]
                .into_iter()
                .map(|opt| {
                    rule(vec![
                        cond(1, SeccompCmpOp::Eq, libc::SOL_SOCKET as u64)?,
                        cond(2, SeccompCmpOp::Eq, opt as u64)?,
                    ])
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        // The serve loop bounds each vhost-user message once it has begun to arrive
        // (server::serve_connection, UnixStream::set_read_timeout): SO_RCVTIMEO only.
        (
            libc::SYS_setsockopt,
            vec![rule(vec![
                cond(1, SeccompCmpOp::Eq, libc::SOL_SOCKET as u64)?,
                cond(2, SeccompCmpOp::Eq, libc::SO_RCVTIMEO as u64)?,
            ])?],
        ),
        // The panic hook ends the process from whichever thread panicked; a thread may signal
        // only its own process (pid 1 in its pid namespace).
        (
            libc::SYS_tgkill,
            vec![rule(vec![cond(
                0,
                SeccompCmpOp::Eq,
                std::process::id() as u64,
            )?])?],
        ),
    ])
}

fn action(mode: SeccompMode) -> Option<SeccompAction> {
    match mode {
        SeccompMode::Kill => Some(SeccompAction::KillProcess),
        SeccompMode::Log => Some(SeccompAction::Log),
        SeccompMode::Off => None,
    }
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SandboxError> {
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .map_err(SandboxError::Filter)?;
    filter.try_into().map_err(SandboxError::Filter)
}

/// Adds `more` to `rules`; a syscall listed with no conditions anywhere stays unconditional.
fn merge(rules: &mut BTreeMap<i64, Vec<SeccompRule>>, more: Vec<(i64, Vec<SeccompRule>)>) {
    for (nr, list) in more {
        match rules.get_mut(&nr) {
            Some(existing) if existing.is_empty() => {}
            Some(existing) if list.is_empty() => existing.clear(),
            Some(existing) => existing.extend(list),
            None => {
                rules.insert(nr, list);
            }
        }
    }
}

/// The device's allowlist split in two: syscalls allowed whatever their arguments, and
/// syscalls allowed only with some arguments. The reaper uses it to tell which of the threads
/// a seccomp kill ended is the one the filter caught (each dies in whatever syscall it was in).
/// clone3 counts as allowed: it is answered with ENOSYS, never killed, and a thread starting
/// another one may be in it when a sibling is killed.
pub fn allowlist_split(policy: &Policy) -> (Vec<i64>, Vec<i64>) {
    let mut conditional: Vec<i64> = base_rules()
        .map(|rules| rules.into_iter().map(|(nr, _)| nr).collect())
        .unwrap_or_default();
    conditional.extend(policy.rules.iter().map(|(nr, _)| *nr));
    let unconditional = BASE
        .iter()
        .chain(policy.syscalls)
        .chain(&[libc::SYS_clone3])
        .copied()
        .filter(|nr| !conditional.contains(nr))
        .collect();
    (unconditional, conditional)
}

/// The device's programs: the allowlist, then the clone3 -> ENOSYS filter (install them in
/// reverse: installing one needs prctl and seccomp, which the allowlist forbids). Empty when
/// `mode` is off.
pub fn device_programs(
    policy: &Policy,
    mode: SeccompMode,
) -> Result<Vec<BpfProgram>, SandboxError> {
    let Some(mismatch) = action(mode) else {
        return Ok(Vec::new());
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BASE
        .iter()
        .chain(policy.syscalls)
        .map(|&nr| (nr, Vec::new()))
        .collect();
    merge(&mut rules, base_rules()?);
    merge(&mut rules, policy.rules.clone());
    // clone3 must pass the allowlist so that the second filter's ENOSYS decides.
    rules.insert(libc::SYS_clone3, Vec::new());
    let allow = compile(rules, mismatch, SeccompAction::Allow)?;
    let no_clone3 = compile(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    Ok(vec![allow, no_clone3])
}

/// The reaper's program: wait for the device, read a dead thread's registers, report, end a
/// faulting device (SIGKILL to `device`, nothing else), and pass the device's ending on (exit,
/// or re-raise its signal on itself, `own_pid`).
pub fn reaper_program(
    mode: SeccompMode,
    own_pid: u32,
    device: libc::pid_t,
) -> Result<Option<BpfProgram>, SandboxError> {
    let Some(mismatch) = action(mode) else {
        return Ok(None);
    };
    let own = u64::from(own_pid);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = [
        libc::SYS_wait4,
        libc::SYS_waitid,
        libc::SYS_ptrace,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_futex,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_clock_gettime,
        libc::SYS_restart_syscall,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_getrandom,
    ]
    .into_iter()
    .map(|nr| (nr, Vec::new()))
    .collect();
    // Passing the device's fatal signal on: kill(own pid, sig); ending a device that took a
    // fault (reaper::wait_and_pass_on): kill(device, SIGKILL); passing a supervisor's stop
    // on (reaper::pass_sigterm_on): kill(device, SIGTERM).
    rules.insert(
        libc::SYS_kill,
        vec![
            rule(vec![cond(0, SeccompCmpOp::Eq, own)?])?,
            rule(vec![
                cond(0, SeccompCmpOp::Eq, device as u32 as u64)?,
                cond(1, SeccompCmpOp::Eq, libc::SIGKILL as u64)?,
            ])?,
            rule(vec![
                cond(0, SeccompCmpOp::Eq, device as u32 as u64)?,
                cond(1, SeccompCmpOp::Eq, libc::SIGTERM as u64)?,
            ])?,
        ],
    );
    compile(rules, mismatch, SeccompAction::Allow).map(Some)
}

/// A name for the syscalls a compromised or buggy device is most likely to try, for the
/// reaper's report; the number is always printed too.
pub fn syscall_name(nr: i64) -> &'static str {
    match nr {
        libc::SYS_open => "open",
        libc::SYS_openat => "openat",
        libc::SYS_openat2 => "openat2",
        libc::SYS_execve => "execve",
        libc::SYS_execveat => "execveat",
        libc::SYS_socket => "socket",
        libc::SYS_connect => "connect",
        libc::SYS_bind => "bind",
        libc::SYS_listen => "listen",
        libc::SYS_fork => "fork",
        libc::SYS_vfork => "vfork",
        libc::SYS_clone => "clone",
        libc::SYS_ptrace => "ptrace",
        libc::SYS_kill => "kill",
        libc::SYS_mount => "mount",
        libc::SYS_unshare => "unshare",
        libc::SYS_setns => "setns",
        libc::SYS_ioctl => "ioctl",
        libc::SYS_stat => "stat",
        libc::SYS_readlink => "readlink",
        libc::SYS_unlink => "unlink",
        libc::SYS_mkdir => "mkdir",
        libc::SYS_bpf => "bpf",
        libc::SYS_io_uring_setup => "io_uring_setup",
        libc::SYS_pread64 => "pread64",
        libc::SYS_pwrite64 => "pwrite64",
        libc::SYS_lseek => "lseek",
        libc::SYS_dup => "dup",
        libc::SYS_dup2 => "dup2",
        libc::SYS_dup3 => "dup3",
        _ => "?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(nr: libc::c_long, a: [usize; 3]) -> libc::c_long {
        // SAFETY: the tests pass only integers, null pointers and pointers to 'static C
        // strings; the kernel rejects or only reads what they point to.
        unsafe { libc::syscall(nr, a[0], a[1], a[2]) }
    }

    /// Forks; the child installs the reaper's filter and runs `body`, exiting with what it
    /// returns. The wait status.
    fn reaper_child(body: fn() -> i32) -> libc::c_int {
        // SAFETY: the child builds the filter for its own pid, which allocates: glibc's
        // malloc takes its locks around fork and resets them in the child, so that is safe
        // even though other test threads may be allocating. It then makes raw syscalls and
        // _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let program = reaper_program(SeccompMode::Kill, std::process::id(), NO_SUCH_PID);
            let code = match program {
                Ok(Some(p)) if seccompiler::apply_filter(&p).is_ok() => body(),
                _ => 100,
            };
            // SAFETY: _exit never returns.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out-pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        status
    }

    /// The device pid the reaper filter of these tests names (none has it: kill gets ESRCH).
    const NO_SUCH_PID: libc::pid_t = 0x3fff_fff0;

    #[test]
    fn the_reaper_may_wait_and_signal_itself_and_nothing_else() {
        // wait4 with no child: ECHILD; kill(own pid, 0): allowed; kill(device, SIGKILL) and
        // kill(device, SIGTERM) (a stop passed on): allowed (ESRCH here).
        let allowed = reaper_child(|| {
            let waited = raw(libc::SYS_wait4, [usize::MAX, 0, 0]);
            let own = std::process::id() as usize;
            let device = [NO_SUCH_PID as usize, libc::SIGKILL as usize, 0];
            let stop = [NO_SUCH_PID as usize, libc::SIGTERM as usize, 0];
            i32::from(
                !(waited == -1
                    && raw(libc::SYS_kill, [own, 0, 0]) == 0
                    && raw(libc::SYS_kill, device) == -1
                    && raw(libc::SYS_kill, stop) == -1),
            )
        });
        assert!(
            libc::WIFEXITED(allowed) && libc::WEXITSTATUS(allowed) == 0,
            "status {allowed:#x}"
        );
        for body in [
            (|| raw(libc::SYS_kill, [1, 0, 0]) as i32) as fn() -> i32,
            // The device may only be killed or stopped, not signalled otherwise.
            || {
                raw(
                    libc::SYS_kill,
                    [NO_SUCH_PID as usize, libc::SIGUSR1 as usize, 0],
                ) as i32
            },
            || {
                raw(
                    libc::SYS_openat,
                    [libc::AT_FDCWD as usize, c"/".as_ptr() as usize, 0],
                ) as i32
            },
            || raw(libc::SYS_socket, [libc::AF_UNIX as usize, 1, 0]) as i32,
        ] {
            let status = reaper_child(body);
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                "status {status:#x}"
            );
        }
    }

    #[test]
    fn device_rules_merge_without_losing_an_unconditional_entry() {
        let thread = rule(vec![cond(0, SeccompCmpOp::Eq, 1).unwrap()]).unwrap();
        let mut rules = BTreeMap::from([(1, Vec::new()), (2, vec![thread.clone()])]);
        merge(
            &mut rules,
            vec![
                (1, vec![thread.clone()]),
                (2, Vec::new()),
                (3, vec![thread]),
            ],
        );
        assert!(rules[&1].is_empty() && rules[&2].is_empty());
        assert_eq!(rules[&3].len(), 1);
    }

    #[test]
    fn clone3_never_names_the_thread_seccomp_killed() {
        let policy = Policy {
            name: "t",
            syscalls: &[],
            rules: Vec::new(),
            host_network: false,
            max_fds: 64,
            max_data: 1 << 20,
        };
        let (unconditional, conditional) = allowlist_split(&policy);
        assert!(unconditional.contains(&libc::SYS_clone3));
        assert!(!conditional.contains(&libc::SYS_clone3));
    }

    #[test]
    fn off_builds_nothing() {
        let policy = Policy {
            name: "t",
            syscalls: &[],
            rules: Vec::new(),
            host_network: false,
            max_fds: 64,
            max_data: 1 << 20,
        };
        assert!(device_programs(&policy, SeccompMode::Off)
            .unwrap()
            .is_empty());
        assert_eq!(device_programs(&policy, SeccompMode::Log).unwrap().len(), 2);
        assert!(reaper_program(SeccompMode::Off, 1, 2).unwrap().is_none());
    }
}
