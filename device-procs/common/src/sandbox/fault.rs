//! Faults in the device process: the SIGABRT disposition the reaper relies on, and (feature
//! `debug-forbidden`) a test hook that makes a real fault once the sandbox is complete.

/// Gives SIGABRT a handler that does nothing. Why: the device is pid 1 of its pid namespace,
/// and the kernel drops, when it is sent, a signal that pid 1 leaves at its default action
/// (abort's `raise(SIGABRT)` included). With a handler the signal is queued, so the reaper
/// sees it at its signal-delivery stop and ends the device as one that aborted (see
/// `reaper`); the handler itself never runs while the reaper traces the device.
pub(super) fn catch_abort() {
    // Touches nothing: async-signal-safe.
    extern "C" fn ignore(_: libc::c_int) {}
    // It fails only for an invalid signal number, which SIGABRT is not.
    let _ = crate::stop::handle(libc::SIGABRT, ignore);
}

/// A fault the device takes after the sandbox is complete (test hook).
#[cfg(feature = "debug-forbidden")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// Read a page mapped with no access (SIGSEGV).
    Segv,
    /// Read a page of a shared memfd mapping after the file was truncated to 0 (SIGBUS), as
    /// an unsealed guest-RAM fd truncated by its frontend would.
    Bus,
    /// Execute `ud2` (SIGILL).
    Ill,
    /// Divide by zero (SIGFPE).
    Fpe,
    /// `abort()` (SIGABRT).
    Abrt,
}

/// Makes `fault` happen on a new thread of the device.
#[cfg(feature = "debug-forbidden")]
pub(super) fn debug_fault(fault: Fault) {
    log::warn!("test hook: taking fault {fault:?}");
    let spawned = crate::thread::spawn_named("fault", move || {
        // SAFETY: each arm faults on purpose, in a way whose only effect is the signal: a
        // volatile read of a page this thread mapped itself (PROT_NONE, or backed by a file it
        // truncated), an undefined instruction, a division by zero in registers, abort. If the
        // fault does not end the process (it must), the thread logs and ends.
        unsafe {
            match fault {
                Fault::Segv => {
                    let page = libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_NONE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                    if page != libc::MAP_FAILED {
                        std::ptr::read_volatile(page.cast::<u8>());
                    }
                }
                Fault::Bus => {
                    let fd = libc::memfd_create(c"fault".as_ptr(), 0);
                    if fd >= 0 && libc::ftruncate(fd, 4096) == 0 {
                        let page = libc::mmap(
                            std::ptr::null_mut(),
                            4096,
                            libc::PROT_READ,
                            libc::MAP_SHARED,
                            fd,
                            0,
                        );
                        if page != libc::MAP_FAILED && libc::ftruncate(fd, 0) == 0 {
                            std::ptr::read_volatile(page.cast::<u8>());
                        }
                    }
                }
                Fault::Ill => std::arch::asm!("ud2"),
                Fault::Fpe => std::arch::asm!(
                    "xor edx, edx",
                    "mov eax, 1",
                    "xor ecx, ecx",
                    "div ecx",
                    out("eax") _,
                    out("ecx") _,
                    out("edx") _,
                ),
                Fault::Abrt => libc::abort(),
            }
        }
        log::error!("test hook: fault {fault:?} did not end the process");
    });
    if let Err(e) = spawned {
        log::error!("test hook: cannot start its thread: {e}");
    }
}
