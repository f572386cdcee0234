//! A harness for unit tests of a device's seccomp [`Policy`]: run a function that makes raw
//! syscalls in a forked child under the policy's filters (in kill mode) and look at how the
//! child ended. Each device keeps its own cases (what it must never do, what it may do);
//! only the machinery lives here. Test code: failures panic.

use crate::sandbox::{device_programs, install, Policy, SeccompMode};

/// Runs `body` in a forked child under `policy`'s filters; returns its wait status.
/// The child makes raw syscalls only: the filters are built before the fork. The child
/// exits with `body`'s result, or 100 if the filters could not be installed.
pub fn in_filtered_child(policy: &Policy, body: fn() -> i32) -> libc::c_int {
    let programs = device_programs(policy, SeccompMode::Kill).unwrap();
    // SAFETY: the child only installs the prebuilt filters, makes raw syscalls and
    // _exits; it takes no lock another thread of the test binary could hold.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let code = if install(&programs).is_ok() {
            body()
        } else {
            100
        };
        // SAFETY: _exit never returns.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    status
}

/// Runs each of `cases` under `policy` (see [`in_filtered_child`]): the filter must kill
/// every one with SIGSYS. `what` names the set in a failure.
pub fn assert_each_killed(policy: &Policy, cases: &[fn() -> i32], what: &str) {
    for (i, &body) in cases.iter().enumerate() {
        let status = in_filtered_child(policy, body);
        assert!(
            killed_by_sigsys(status),
            "{what} case {i}: status {status:#x}"
        );
    }
}

/// Runs each of `cases` under `policy`: every one must get through the filter and exit 0.
pub fn assert_each_allowed(policy: &Policy, cases: &[fn() -> i32], what: &str) {
    for (i, &body) in cases.iter().enumerate() {
        let status = in_filtered_child(policy, body);
        assert_eq!(
            exited(status),
            Some(0),
            "{what} case {i}: status {status:#x}"
        );
    }
}

/// Whether a wait status says the filter killed the child (SIGSYS).
pub fn killed_by_sigsys(status: libc::c_int) -> bool {
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
}

/// The exit code in a wait status, if the child exited.
pub fn exited(status: libc::c_int) -> Option<i32> {
    libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status))
}

/// 0 if the syscall returned -1 with `errno`, else 1 (the child's exit code).
pub fn fails_with(ret: libc::c_long, errno: i32) -> i32 {
    let got = std::io::Error::last_os_error().raw_os_error();
    i32::from(!(ret == -1 && got == Some(errno)))
}

/// A raw syscall with six integer arguments.
pub fn raw(nr: libc::c_long, a: [usize; 6]) -> libc::c_long {
    // SAFETY: the tests pass only integers, null pointers and pointers to 'static C
    // strings or arrays; the kernel rejects or only reads what they point to.
    unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) }
}

/// Runs a program (`execve` of /bin/true).
pub fn execve_true() -> i32 {
    let (path, argv) = (c"/bin/true".as_ptr() as usize, NO_ARGS.as_ptr() as usize);
    raw(libc::SYS_execve, [path, argv, argv, 0, 0, 0]) as i32
}

/// Opens a host path (`openat` of /etc/passwd).
pub fn open_host_path() -> i32 {
    let path = c"/etc/passwd".as_ptr() as usize;
    raw(
        libc::SYS_openat,
        [libc::AT_FDCWD as usize, path, 0, 0, 0, 0],
    ) as i32
}

/// Starts a new process (`clone` without CLONE_THREAD).
pub fn new_process() -> i32 {
    raw(libc::SYS_clone, [libc::SIGCHLD as usize, 0, 0, 0, 0, 0]) as i32
}

/// Asks to be traced (`ptrace(PTRACE_TRACEME)`).
pub fn ptrace_traceme() -> i32 {
    raw(
        libc::SYS_ptrace,
        [libc::PTRACE_TRACEME as usize, 0, 0, 0, 0, 0],
    ) as i32
}

/// What no device's policy allows: each device's test passes these to
/// [`assert_each_killed`] besides its own cases.
pub const NO_DEVICE_MAY: [fn() -> i32; 4] =
    [execve_true, open_host_path, new_process, ptrace_traceme];

/// An empty, null-terminated argv/envp array for `execve`.
pub static NO_ARGS: [usize; 1] = [0];
/// An fd number nothing has open.
pub const BAD_FD: usize = 0x7fff_ffff;
