//! The reaper: the device process's original process, left outside the new pid namespace
//! when the device itself forks into it as pid 1.
//!
//! It is what a supervisor starts and waits on, so it passes the device's ending on: the same
//! exit code, or the same fatal signal raised on itself. A seccomp kill cannot be caught or
//! seen by the dying process, and `waitpid` only says "SIGSYS"; so the reaper traces the
//! device (`PTRACE_SEIZE`, no syscall tracing, so no cost per syscall) with
//! `PTRACE_O_TRACEEXIT`, and at the exit stop of the thread the kernel killed it reads that
//! thread's registers: the kernel rolls them back to the syscall entry, so `orig_rax` is the
//! number. It logs one line, `killed by seccomp: syscall=N (name) thread=TID`, before passing
//! SIGSYS on. The reaper itself runs with no capabilities, in the empty root, under its own
//! small allowlist.
//!
//! A fault (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) must end the device at once, and that
//! the kernel will not do by itself here: the device is pid 1 of its namespace, and a traced
//! pid 1 keeps `SIGNAL_UNKILLABLE` even for a forced signal, so the fault's signal, once
//! re-injected, is dropped and the faulting instruction runs again, forever. So at the
//! signal-delivery stop of such a signal the reaper logs `killed by SIGSEGV (fault in thread
//! TID)`, SIGKILLs the device (which an ancestor namespace may always do) and, once it is
//! gone, ends itself by the same signal, which the supervisor reports and acts on.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use super::filter::syscall_name;

/// One ptrace request; -1 with errno on failure.
fn ptrace(request: libc::c_uint, pid: libc::pid_t, addr: usize, data: usize) -> libc::c_long {
    // SAFETY: every request made here either takes integer arguments (SEIZE, CONT) or writes
    // into the buffer `data` points to, which the callers size for the request (GETEVENTMSG:
    // a c_ulong, GETREGS: a user_regs_struct).
    unsafe { libc::ptrace(request, pid, addr, data) }
}

/// Attaches to `child` before it continues. Options: follow its threads, stop each at exit,
/// and kill the device if the reaper dies (so a supervisor's kill reaches it too).
pub(super) fn seize(child: libc::pid_t) -> std::io::Result<()> {
    let options = libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_EXITKILL;
    if ptrace(libc::PTRACE_SEIZE, child, 0, options as usize) != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The syscall a thread stopped at its exit was killed for, if seccomp killed it.
fn seccomp_victim(tid: libc::pid_t) -> Option<u64> {
    let mut exit_status: libc::c_ulong = 0;
    let msg = &mut exit_status as *mut libc::c_ulong as usize;
    if ptrace(libc::PTRACE_GETEVENTMSG, tid, 0, msg) != 0 {
        return None;
    }
    let status = exit_status as libc::c_int;
    if !(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS) {
        return None;
    }
    // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    let at = &mut regs as *mut libc::user_regs_struct as usize;
    if ptrace(libc::PTRACE_GETREGS, tid, 0, at) != 0 {
        return None;
    }
    Some(regs.orig_rax)
}

/// The device, for the SIGTERM handler.
static DEVICE: AtomicI32 = AtomicI32::new(0);
/// A SIGTERM was passed on to the device.
static TERM_PASSED: AtomicBool = AtomicBool::new(false);

extern "C" fn pass_on_sigterm(_: libc::c_int) {
    TERM_PASSED.store(true, Ordering::SeqCst);
    // SAFETY: kill is async-signal-safe and takes integers; the device is this process's
    // child, not yet reaped while this handler is installed (the reaper exits when it is).
    unsafe { libc::kill(DEVICE.load(Ordering::SeqCst), libc::SIGTERM) };
}

/// A SIGTERM to the reaper (the supervisor stopping the device on request) goes on to the
/// device, which ends at a request boundary (`crate::stop`) rather than being killed with
/// the reaper (`PTRACE_O_EXITKILL`). A device that does not end is killed with the reaper
/// when the supervisor's stop timeout sends SIGKILL.
pub(super) fn pass_sigterm_on(child: libc::pid_t) -> std::io::Result<()> {
    DEVICE.store(child, Ordering::SeqCst);
    // The handler only touches atomics and calls kill: async-signal-safe.
    crate::stop::handle(libc::SIGTERM, pass_on_sigterm)
}

/// Waits for the device, resuming its threads at each stop, and ends this process as the
/// device ended.
///
/// Every thread of a process killed by seccomp stops at its exit with SIGSYS, each in the
/// syscall it was blocked in, in no set order. When the device is gone, the one named is the
/// first whose syscall the allowlist does not have at all (a thread outside any syscall,
/// `orig_rax` -1, does not count); else one allowed only with some arguments (refused for
/// its arguments); else the first.
pub(super) fn wait_and_pass_on(child: libc::pid_t, allowlist: &(Vec<i64>, Vec<i64>)) -> ! {
    let (unconditional, conditional) = allowlist;
    let mut victims: Vec<(i64, libc::pid_t)> = Vec::new();
    // The fault signal the device was killed for, once one was seen.
    let mut fault: Option<libc::c_int> = None;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waits for our own children; `status` is a valid out-pointer.
        let tid = unsafe { libc::waitpid(-1, &mut status, libc::__WALL) };
        if tid < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            log::error!(
                "lost the device process: {}",
                std::io::Error::last_os_error()
            );
            exit(1);
        }
        if tid == child && (libc::WIFEXITED(status) || libc::WIFSIGNALED(status)) {
            // A thread that was not in a syscall when the process died (running, or
            // between calls) shows orig_rax -1: never the one the filter caught.
            let culprit = victims
                .iter()
                .find(|(nr, _)| {
                    *nr >= 0 && !unconditional.contains(nr) && !conditional.contains(nr)
                })
                .or_else(|| victims.iter().find(|(nr, _)| conditional.contains(nr)))
                .or(victims.first());
            if let Some(&(nr, tid)) = culprit {
                log::error!(
                    "killed by seccomp: syscall={nr} ({}) thread={tid}",
                    syscall_name(nr)
                );
            }
            match fault {
                Some(signal) => die_by(signal),
                None => pass_on(status),
            }
        }
        if !libc::WIFSTOPPED(status) {
            // One of the device's threads ended.
            continue;
        }
        let event = (status >> 16) & 0xff;
        let mut inject = 0;
        if event == libc::PTRACE_EVENT_EXIT {
            if let Some(nr) = seccomp_victim(tid) {
                victims.push((nr as i64, tid));
            }
        } else if event == 0 {
            let signal = libc::WSTOPSIG(status);
            if FAULTS.contains(&signal) {
                if fault.is_none() {
                    fault = Some(signal);
                    log::error!("killed by {} (fault in thread {tid})", signal_name(signal));
                    // SAFETY: kill takes integers; `child` is this process's own child, not
                    // yet reaped (its exit has not been seen), so the pid names it.
                    unsafe { libc::kill(child, libc::SIGKILL) };
                }
                // Left stopped: SIGKILL ends a stopped thread too.
                continue;
            }
            // A signal on its way to the device: deliver it.
            inject = signal;
        }
        // Clone, new-thread and group stops: just resume. A failure means the thread is
        // already gone.
        ptrace(libc::PTRACE_CONT, tid, 0, inject as usize);
    }
}

/// Signals of a fault in the device's own code: the device is ended at the first one.
const FAULTS: [libc::c_int; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGABRT,
];

/// The name of a fault signal, for the log line.
pub(super) fn signal_name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGABRT => "SIGABRT",
        libc::SIGSYS => "SIGSYS",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// Ends the reaper with the device's exit code, or by the device's fatal signal.
fn pass_on(status: libc::c_int) -> ! {
    if libc::WIFEXITED(status) {
        let code = libc::WEXITSTATUS(status);
        // A device that ended for the SIGTERM passed on ends the reaper as the SIGTERM would
        // have, so the supervisor reports the same ending as before.
        if code == crate::stop::STOPPED_STATUS && TERM_PASSED.load(Ordering::SeqCst) {
            die_by(libc::SIGTERM);
        }
        exit(code);
    }
    let signal = libc::WTERMSIG(status);
    if signal != libc::SIGSYS {
        log::warn!("the device process was killed by signal {signal}");
    }
    die_by(signal)
}

/// Ends the reaper by `signal` (raised on itself with its default action), or, for a signal
/// whose default is not fatal, with status 128 + signal.
fn die_by(signal: libc::c_int) -> ! {
    // SAFETY: resetting a signal's disposition and sending it to ourselves changes no memory
    // of this process; no core file is written (the reaper is not dumpable).
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::kill(libc::getpid(), signal);
    }
    // A signal whose default is not fatal: the shell's convention.
    exit(128 + signal);
}

fn exit(code: libc::c_int) -> ! {
    // SAFETY: _exit ends the process at once; the reaper has nothing to flush (log lines are
    // written unbuffered).
    unsafe { libc::_exit(code) }
}
