//! The sandbox every device process enters after it has opened what it needs (listening
//! socket, disk image, tap fd, log) and before it reads a byte a guest or frontend controls.
//!
//! [`enter`], in order:
//!
//! 1. Started as root: switches to an unprivileged uid/gid (`--uid`/`--gid`, default 65534,
//!    nobody/nogroup) with no supplementary groups.
//! 2. New user, mount, pid, IPC and UTS namespaces, and a new network namespace unless the
//!    device's [`Policy`] keeps the host's (only `isola-net`). The user namespace maps just
//!    the process's own uid and gid, so it grants nothing on the host.
//! 3. Limits: no core dumps, at most `Policy::max_fds` descriptors, at most
//!    `Policy::max_data` bytes of private writable memory (`RLIMIT_DATA`; guest RAM is a
//!    shared mapping of the frontend's memfd and does not count, which is why `RLIMIT_AS` is
//!    not used: a VM's RAM would have to fit under it).
//! 4. A new pid namespace only applies to children, so the process forks once: the child is
//!    pid 1 of the new namespace and becomes the device; the parent, the *reaper*
//!    ([`reaper`]), stays outside, waits, reports a seccomp kill with its syscall number and
//!    passes the device's ending on, so a supervisor that waits on the pid it started sees
//!    the device's exit code or signal.
//! 5. Both processes end up in an empty, read-only root: a small tmpfs becomes the root with
//!    `pivot_root`, and the host's tree is detached.
//! 6. All capabilities go (effective, permitted, inheritable, ambient and the bounding set);
//!    the process is made non-dumpable (nobody of the same uid can ptrace it) and sets
//!    no_new_privs.
//! 7. The seccomp allowlist: [`filter::BASE`] plus the device's additions, default action
//!    kill the process (`--seccomp=log` logs and allows instead, for finding a missing entry;
//!    `--seccomp=off` installs nothing). Installed on the main thread before any other thread
//!    exists, so every thread inherits it. Listening sockets stay usable: a restarted core
//!    reconnects through `accept` on the listener opened before the sandbox.
//!
//! `--sandbox=off` skips all of this, for benchmarks and debugging only, and says so loudly.
//! A panic inside the sandbox prints its message and ends the process with status 101: the
//! default hook could try to open files for a backtrace (`RUST_BACKTRACE`), which the filter
//! forbids.

mod fault;
mod filter;
mod reaper;

#[cfg(feature = "debug-forbidden")]
pub use fault::Fault;
use std::ffi::CString;
use std::io::Write;

pub use filter::{device_programs, reaper_program, syscall_name, Policy, SeccompMode, BASE};
pub use seccompiler::{BpfProgram, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// The uid and gid a device process switches to when started as root (nobody, nogroup).
pub const NOBODY: u32 = 65534;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("--uid/--gid 0: a device process must not run as root")]
    RootIds,
    #[error("--uid/--gid need the process to be started as root")]
    NotRoot,
    #[error("the sandbox must be entered before any thread is started")]
    Threads,
    #[error("cannot {0}")]
    Sys(&'static str, #[source] std::io::Error),
    #[error("cannot build a seccomp filter")]
    Filter(#[source] seccompiler::BackendError),
    #[error("cannot install a seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// Whether the sandbox is used at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// A syscall the device must never make, attempted after the sandbox is complete (test hook).
#[cfg(feature = "debug-forbidden")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Forbidden {
    /// execve("/bin/true")
    Execve,
    /// openat("/etc/passwd")
    Open,
    /// socket(AF_INET, SOCK_STREAM)
    Socket,
    /// fork (clone without CLONE_THREAD)
    Fork,
}

/// The sandbox's command-line options, shared by every device process.
#[derive(Debug, Clone, clap::Args)]
pub struct SandboxArgs {
    /// Namespaces, empty root, no capabilities, limits and seccomp. `off` is for benchmarks
    /// and debugging only.
    #[arg(long, value_enum, value_name = "on|off", default_value_t = Switch::On)]
    pub sandbox: Switch,
    /// What the seccomp filter does with a syscall not on the device's list: kill the
    /// process, or log it (audit type=1326 in the kernel log) and let it through.
    #[arg(long, value_enum, value_name = "kill|log|off", default_value_t = SeccompMode::Kill)]
    pub seccomp: SeccompMode,
    /// When started as root, the uid to run as (default 65534).
    #[arg(long, value_name = "UID")]
    pub uid: Option<u32>,
    /// When started as root, the gid to run as (default 65534).
    #[arg(long, value_name = "GID")]
    pub gid: Option<u32>,
    /// Test hook: once sandboxed, make this forbidden syscall from a new thread.
    #[cfg(feature = "debug-forbidden")]
    #[arg(long, value_enum, value_name = "SYSCALL")]
    pub debug_forbidden_syscall: Option<Forbidden>,
    /// Test hook: once sandboxed, take this fault on a new thread.
    #[cfg(feature = "debug-forbidden")]
    #[arg(long, value_enum, value_name = "FAULT")]
    pub debug_fault: Option<Fault>,
}

impl Default for SandboxArgs {
    fn default() -> Self {
        SandboxArgs {
            sandbox: Switch::On,
            seccomp: SeccompMode::Kill,
            uid: None,
            gid: None,
            #[cfg(feature = "debug-forbidden")]
            debug_forbidden_syscall: None,
            #[cfg(feature = "debug-forbidden")]
            debug_fault: None,
        }
    }
}

fn sys(what: &'static str) -> SandboxError {
    SandboxError::Sys(what, std::io::Error::last_os_error())
}

fn check(ret: libc::c_long, what: &'static str) -> Result<(), SandboxError> {
    if ret < 0 {
        Err(sys(what))
    } else {
        Ok(())
    }
}

/// The ids to run as: `None` to keep the current ones (not root, no `--uid`/`--gid`).
fn target_ids(args: &SandboxArgs) -> Result<Option<(u32, u32)>, SandboxError> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        return match (args.uid, args.gid) {
            (None, None) => Ok(None),
            _ => Err(SandboxError::NotRoot),
        };
    }
    let ids = (args.uid.unwrap_or(NOBODY), args.gid.unwrap_or(NOBODY));
    if ids.0 == 0 || ids.1 == 0 {
        return Err(SandboxError::RootIds);
    }
    Ok(Some(ids))
}

/// Checks arguments that can be wrong (call it while validating the command line, so that a
/// bad `--uid` is bad input rather than a failure at start).
pub fn validate(args: &SandboxArgs) -> Result<(), SandboxError> {
    if args.sandbox == Switch::On {
        target_ids(args)?;
    }
    Ok(())
}

/// Makes every thread allocate from glibc's main arena (`M_ARENA_MAX` 1). Call it before the
/// sandbox, while the process has one thread. Why: with its default of one arena per thread,
/// glibc reads `/sys/devices/system/cpu/online` when the ninth thread first allocates (to
/// size its arena limit) and `/proc/sys/vm/overcommit_memory` when it first trims a thread
/// arena; inside the sandbox either open is a seccomp kill (it was: isola-input with 16
/// control clients). The main arena grows with brk and opens nothing.
pub fn single_arena() {
    // SAFETY: mallopt only changes allocator tuning; the process is still single-threaded.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// Enters the sandbox described in the module documentation, or (with `--sandbox off`) only
/// says loudly that it does not. Returns in the device process; the reaper never returns.
pub fn enter(args: &SandboxArgs, policy: &Policy) -> Result<(), SandboxError> {
    if args.sandbox == Switch::Off {
        log::warn!(
            "SANDBOX OFF: no namespaces, no empty root, capabilities kept, no seccomp filter. \
             For benchmarks and debugging only."
        );
        return Ok(());
    }
    if thread_count() > 1 {
        return Err(SandboxError::Threads);
    }
    let ids = target_ids(args)?;
    if let Some((uid, gid)) = ids {
        // A uid change clears the parent-death signal a supervisor set (PR_SET_PDEATHSIG
        // before exec): set it again, so that the device still dies with its supervisor.
        let deathsig = parent_death_signal();
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() };
        switch_ids(uid, gid)?;
        restore_parent_death_signal(deathsig, parent)?;
    }
    unshare(policy)?;
    set_limits(policy)?;
    install_panic_hook(policy.name);
    // Both processes leave the host tree: pivot_root moves every process of the namespace
    // whose root or working directory is the old root.
    chdir(c"/")?;
    let (ready_read, ready_write) = pipe()?;
    // SAFETY: the process is single-threaded (checked above), so the child may run any code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(sys("fork"));
    }
    if pid > 0 {
        close(ready_read);
        let allowlist = filter::allowlist_split(policy);
        become_reaper(pid, ready_write, args.seccomp, &allowlist);
    }
    close(ready_write);
    device_side(args, policy, ready_read)
}

/// The device: pid 1 of its pid namespace, traced by the reaper.
fn device_side(
    args: &SandboxArgs,
    policy: &Policy,
    ready: libc::c_int,
) -> Result<(), SandboxError> {
    // SAFETY: PR_SET_PDEATHSIG takes integer arguments only.
    let ret =
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } as libc::c_long;
    check(ret, "set the parent-death signal")?;
    // Wait until the reaper traces this process (or is gone: then end too).
    let mut byte = [0u8; 1];
    // SAFETY: reads at most one byte into `byte`.
    let n = unsafe { libc::read(ready, byte.as_mut_ptr().cast(), 1) };
    close(ready);
    if n != 1 {
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(1) };
    }
    if let Ok(name) = CString::new(policy.name) {
        // SAFETY: `name` is a valid buffer of the given length; the UTS namespace is our own.
        unsafe { libc::sethostname(name.as_ptr(), name.as_bytes().len()) };
    }
    empty_root()?;
    drop_privileges()?;
    fault::catch_abort();
    // The reaper passes a supervisor's SIGTERM on; pid 1 of a namespace ignores it unless it
    // has a handler.
    if crate::stop::install().is_err() {
        return Err(sys("install the SIGTERM handler"));
    }
    // SAFETY: getuid and getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let programs = device_programs(policy, args.seccomp)?;
    install(&programs)?;
    if programs.is_empty() {
        log::warn!("seccomp is off: the device may make any system call (debugging only)");
    }
    log::info!(
        "sandboxed: uid {uid} gid {gid}, new namespaces{}, empty root, no capabilities, seccomp {:?}",
        if policy.host_network {
            " (host network)"
        } else {
            ""
        },
        args.seccomp,
    );
    #[cfg(feature = "debug-forbidden")]
    if let Some(call) = args.debug_forbidden_syscall {
        debug_forbidden(call);
    }
    #[cfg(feature = "debug-forbidden")]
    if let Some(fault) = args.debug_fault {
        fault::debug_fault(fault);
    }
    Ok(())
}

/// Installs [`device_programs`] on the calling thread (threads it starts later inherit them).
/// Installing a filter calls prctl and seccomp, which the allowlist does not allow: it goes
/// last.
pub fn install(programs: &[seccompiler::BpfProgram]) -> Result<(), SandboxError> {
    for program in programs.iter().rev() {
        seccompiler::apply_filter(program).map_err(SandboxError::Install)?;
    }
    Ok(())
}

/// The reaper: trace the device, let it go on, shed everything, wait.
fn become_reaper(
    child: libc::pid_t,
    ready: libc::c_int,
    mode: SeccompMode,
    allowlist: &(Vec<i64>, Vec<i64>),
) -> ! {
    if let Err(e) = reaper::seize(child) {
        reaper_failed(child, "trace the device process", &e);
    }
    // SAFETY: writes one byte from a valid buffer.
    if unsafe { libc::write(ready, [1u8].as_ptr().cast(), 1) } != 1 {
        reaper_failed(
            child,
            "start the device process",
            &std::io::Error::last_os_error(),
        );
    }
    // The reaper holds nothing the device opened: the listener, image and the rest stay
    // only with the device, so they close when it dies. (Rust objects that own these fds
    // live on in this process but are never used again: it only waits and exits.)
    // SAFETY: close_range on our own fd table; nothing in this process uses fds >= 3 again.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if let Err(e) = drop_privileges() {
        reaper_failed(child, "drop privileges", &e);
    }
    if let Err(e) = reaper::pass_sigterm_on(child) {
        reaper_failed(child, "install its SIGTERM handler", &e);
    }
    match reaper_program(mode, std::process::id(), child) {
        Ok(Some(program)) => {
            if let Err(e) = seccompiler::apply_filter(&program) {
                reaper_failed(child, "install its seccomp filter", &e);
            }
        }
        Ok(None) => {}
        Err(e) => reaper_failed(child, "build its seccomp filter", &e),
    }
    reaper::wait_and_pass_on(child, allowlist)
}

fn reaper_failed(child: libc::pid_t, what: &str, e: &dyn std::error::Error) -> ! {
    log::error!("reaper: cannot {what}: {e}");
    // SAFETY: kill and _exit take integers; the child is ours.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        libc::_exit(1)
    }
}

/// The signal the process gets when its parent dies (0: none).
fn parent_death_signal() -> libc::c_int {
    let mut sig: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int through the pointer, which points at `sig`.
    unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut sig as *mut libc::c_int) };
    sig
}

/// Sets the parent-death signal `sig` again (after a credential change cleared it); if the
/// parent died meanwhile (no longer `parent`), the process ends as the signal would have
/// ended it.
fn restore_parent_death_signal(sig: libc::c_int, parent: libc::pid_t) -> Result<(), SandboxError> {
    if sig == 0 {
        return Ok(());
    }
    // SAFETY: PR_SET_PDEATHSIG takes integer arguments only.
    let ret = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) };
    check(ret as libc::c_long, "set the parent-death signal")?;
    // SAFETY: getppid has no preconditions.
    let parent_now = unsafe { libc::getppid() };
    if parent_now != parent {
        // SAFETY: raise sends a signal to this process only.
        unsafe { libc::raise(sig) };
    }
    Ok(())
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(1)
}

fn switch_ids(uid: u32, gid: u32) -> Result<(), SandboxError> {
    // SAFETY: setgroups with size 0 reads no memory; setresgid/setresuid take integers.
    unsafe {
        check(
            libc::setgroups(0, std::ptr::null()) as libc::c_long,
            "drop supplementary groups",
        )?;
        check(libc::setresgid(gid, gid, gid) as libc::c_long, "switch gid")?;
        check(libc::setresuid(uid, uid, uid) as libc::c_long, "switch uid")?;
    }
    set_dumpable(true)
}

/// A uid change makes the process non-dumpable, which would leave its own /proc files owned
/// by host root; it must be dumpable to write its namespace maps and to be traced by the
/// reaper. The device makes itself non-dumpable again once traced.
fn set_dumpable(on: bool) -> Result<(), SandboxError> {
    // SAFETY: PR_SET_DUMPABLE takes integer arguments only.
    let ret = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, libc::c_ulong::from(on), 0, 0, 0) };
    check(ret as libc::c_long, "set dumpable")
}

fn unshare(policy: &Policy) -> Result<(), SandboxError> {
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS;
    if !policy.host_network {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare takes integer flags; the process is single-threaded (as CLONE_NEWUSER
    // requires).
    let ret = unsafe { libc::unshare(flags) } as libc::c_long;
    check(
        ret,
        "create namespaces (are unprivileged user namespaces disabled?)",
    )?;
    set_dumpable(true)?;
    write_proc("/proc/self/setgroups", "deny")?;
    write_proc("/proc/self/uid_map", &format!("{uid} {uid} 1"))?;
    write_proc("/proc/self/gid_map", &format!("{gid} {gid} 1"))
}

fn write_proc(path: &str, text: &str) -> Result<(), SandboxError> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| SandboxError::Sys("write the user namespace's id maps", e))
}

fn set_limits(policy: &Policy) -> Result<(), SandboxError> {
    let limits = [
        (libc::RLIMIT_CORE, 0, "limit core dumps"),
        (libc::RLIMIT_NOFILE, policy.max_fds, "limit open files"),
        (libc::RLIMIT_DATA, policy.max_data, "limit private memory"),
    ];
    for (resource, value, what) in limits {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into `limit`.
        let ret = unsafe { libc::getrlimit(resource, &mut limit) };
        check(ret as libc::c_long, what)?;
        // Never above what the process was given (only root could raise a hard limit).
        let value = value.min(limit.rlim_max);
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: `limit` is a valid rlimit for the duration of the call.
        let ret = unsafe { libc::setrlimit(resource, &limit) } as libc::c_long;
        check(ret, what)?;
    }
    Ok(())
}

fn chdir(path: &std::ffi::CStr) -> Result<(), SandboxError> {
    // SAFETY: `path` is a NUL-terminated string.
    let ret = unsafe { libc::chdir(path.as_ptr()) } as libc::c_long;
    check(ret, "change directory")
}

fn pipe() -> Result<(libc::c_int, libc::c_int), SandboxError> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } as libc::c_long;
    check(ret, "create a pipe")?;
    Ok((fds[0], fds[1]))
}

fn close(fd: libc::c_int) {
    // SAFETY: closes a descriptor this module created and owns.
    unsafe { libc::close(fd) };
}

/// Makes an empty read-only tmpfs the root of the mount namespace and detaches the host's
/// tree. Everything the device needs is already open.
fn empty_root() -> Result<(), SandboxError> {
    let none: *const libc::c_char = std::ptr::null();
    // SAFETY: mount, umount2, chdir and the pivot_root syscall take
    // NUL-terminated strings (literals here) or null pointers; they change only this
    // process's private mount namespace.
    unsafe {
        // Nothing done here may propagate back to the host's mounts.
        check(
            libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) as libc::c_long,
            "make the mounts private",
        )?;
        check(
            libc::mount(
                c"isola-root".as_ptr(),
                c"/tmp".as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"size=4k,nr_inodes=2,mode=0555".as_ptr().cast(),
            ) as libc::c_long,
            "mount the empty root",
        )?;
        chdir(c"/tmp")?;
        // pivot_root(".", "."): the old root ends up stacked on the new one; detach it.
        check(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()),
            "pivot_root",
        )?;
        check(
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH) as libc::c_long,
            "detach the host's root",
        )?;
        chdir(c"/")?;
        check(
            libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                std::ptr::null(),
            ) as libc::c_long,
            "make the root read-only",
        )?;
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Drops every capability (bounding set, ambient, effective, permitted, inheritable), makes
/// the process non-dumpable and sets no_new_privs.
fn drop_privileges() -> Result<(), SandboxError> {
    // SAFETY: the prctl calls take integer arguments only.
    unsafe {
        let mut cap = 0;
        // Up to the kernel's last capability, where PR_CAPBSET_DROP starts failing (EINVAL).
        while cap < 64 && libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) == 0 {
            cap += 1;
        }
        check(
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ) as libc::c_long,
            "clear ambient capabilities",
        )?;
    }
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads one header and, for version 3, two data structs, which `header`
    // and `data` provide with the kernel's layout.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    check(ret, "drop capabilities")?;
    set_dumpable(false)?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    let ret = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } as libc::c_long;
    check(ret, "set no_new_privs")
}

/// Prints the panic message and ends the process with 101, touching no file.
fn install_panic_hook(name: &'static str) {
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let line = format!(
            "{name}: thread '{}' panicked: {info}\n",
            thread.name().unwrap_or("?")
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
        // SAFETY: _exit ends the process at once; a panicking device is restarted anyway.
        unsafe { libc::_exit(101) };
    }));
}

#[cfg(feature = "debug-forbidden")]
fn debug_forbidden(call: Forbidden) {
    log::warn!("test hook: making forbidden syscall {call:?}");
    let spawned = crate::thread::spawn_named("forbidden", move || {
        // SAFETY: each is a raw syscall with valid constant arguments; if the filter lets it
        // through (--seccomp=log) its result is only logged. The fork child exits at once.
        let ret = unsafe {
            match call {
                Forbidden::Execve => libc::syscall(
                    libc::SYS_execve,
                    c"/bin/true".as_ptr(),
                    [std::ptr::null::<libc::c_char>()].as_ptr(),
                    [std::ptr::null::<libc::c_char>()].as_ptr(),
                ),
                Forbidden::Open => libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    c"/etc/passwd".as_ptr(),
                    libc::O_RDONLY,
                ),
                Forbidden::Socket => {
                    libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0)
                }
                Forbidden::Fork => {
                    let pid = libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0);
                    if pid == 0 {
                        libc::_exit(0);
                    }
                    pid
                }
            }
        };
        let err = std::io::Error::last_os_error();
        log::warn!("test hook: forbidden syscall {call:?} returned {ret} ({err})");
    });
    if let Err(e) = spawned {
        log::error!("test hook: cannot start its thread: {e}");
    }
}
