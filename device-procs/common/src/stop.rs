//! A stop on request (SIGTERM: `isolactl restart` or `upgrade`, or the supervisor stopping)
//! that never cuts a request in half where handing it over would repeat it.
//!
//! The supervisor's SIGTERM reaches the sandbox's reaper, which passes it on to the device
//! (`sandbox/reaper.rs`). Here it ends the process at once, unless a worker is inside a
//! [`Busy`] section: then the process ends as that section closes. A device marks as busy
//! what would be repeated if the next instance got it again from the in-flight region:
//! isola-net's transmit, from taking a frame off the ring to completing it (a frame written
//! to the tap and handed over uncompleted would go out twice). Everything else is handed
//! over as before.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static STOPPING: AtomicBool = AtomicBool::new(false);
static BUSY: AtomicUsize = AtomicUsize::new(0);

/// The exit status of a device stopped on request: 128 + SIGTERM, as a shell reports it.
pub const STOPPED_STATUS: i32 = 128 + libc::SIGTERM;

extern "C" fn on_sigterm(_: libc::c_int) {
    STOPPING.store(true, Ordering::SeqCst);
    if BUSY.load(Ordering::SeqCst) == 0 {
        end();
    }
}

fn end() -> ! {
    // SAFETY: _exit is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(STOPPED_STATUS) }
}

/// Installs the SIGTERM handler (before the seccomp filter: rt_sigaction).
pub fn install() -> std::io::Result<()> {
    handle(libc::SIGTERM, on_sigterm)
}

/// Makes `handler` the handler of `signal` (restarting interrupted system calls). The
/// handler must be async-signal-safe.
pub(crate) fn handle(
    signal: libc::c_int,
    handler: extern "C" fn(libc::c_int),
) -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid and fully set up below; the handler is a plain
    // function that, as the caller guarantees, only does async-signal-safe work.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A section a stop waits for (see the module docs). `None`: the process is stopping; the
/// caller must not start the work (this call then ends the process).
pub struct Busy(());

impl Busy {
    pub fn enter() -> Option<Busy> {
        BUSY.fetch_add(1, Ordering::SeqCst);
        if STOPPING.load(Ordering::SeqCst) {
            // The handler may have seen this section open and left the ending to it.
            if BUSY.fetch_sub(1, Ordering::SeqCst) == 1 {
                end();
            }
            return None;
        }
        Some(Busy(()))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if BUSY.fetch_sub(1, Ordering::SeqCst) == 1 && STOPPING.load(Ordering::SeqCst) {
            end();
        }
    }
}
