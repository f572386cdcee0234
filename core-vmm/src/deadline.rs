//! Deadlines for blocking exchanges with device processes.
//!
//! The `vhost` crate's frontend blocks in `recvmsg` until the backend answers, and retries on
//! `EAGAIN`, so a socket receive timeout does not bound it. A [`Watchdog`] does: before each
//! exchange the caller arms it with a duplicate of the session's socket; if the exchange is
//! still running when the deadline passes, the watchdog thread shuts the socket down in both
//! directions. The blocked `recvmsg`/`sendmsg` then returns (end of stream, or `EPIPE`) and
//! the caller sees the exchange fail, as if the backend had died, which is how a backend that
//! misses a deadline is treated.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Default deadline of one vhost-user exchange (`--backend-timeout-ms`).
pub const DEFAULT_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DeadlineError {
    #[error("cannot start the deadline thread")]
    Spawn(#[source] std::io::Error),
}

struct Armed {
    id: u64,
    at: Instant,
    socket: UnixStream,
    fired: bool,
}

#[derive(Default)]
struct State {
    next_id: u64,
    armed: Vec<Armed>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One thread that enforces every armed deadline of the process; cheap to clone.
#[derive(Clone)]
pub struct Watchdog {
    shared: Arc<Shared>,
}

/// An armed deadline; [`Watchdog::disarm`] it when the exchange is over.
#[must_use = "disarm the deadline when the exchange ends"]
pub struct Ticket(u64);

/// What a thread body installs before it runs (its seccomp filter), as a boxed closure so the
/// caller decides; an error ends the thread before it enforces anything.
pub type ThreadSetup = Box<dyn FnOnce() -> Result<(), String> + Send>;

impl Watchdog {
    /// Starts the watchdog thread (named `deadline`), which runs `setup` first.
    pub fn start(setup: ThreadSetup) -> Result<Watchdog, DeadlineError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("deadline".into())
            .spawn(move || {
                if let Err(e) = setup() {
                    log::error!("deadline thread: {e}; exchanges have no deadline");
                    return;
                }
                enforce(&thread_shared);
            })
            .map_err(DeadlineError::Spawn)?;
        Ok(Watchdog { shared })
    }

    /// Arms a deadline `timeout` from now on `socket` (a duplicate of the session's socket).
    pub fn arm(&self, socket: UnixStream, timeout: Duration) -> Ticket {
        let mut state = self.shared.lock();
        state.next_id = state.next_id.wrapping_add(1);
        let id = state.next_id;
        state.armed.push(Armed {
            id,
            at: Instant::now() + timeout,
            socket,
            fired: false,
        });
        drop(state);
        self.shared.wake.notify_all();
        Ticket(id)
    }

    /// Ends the exchange; true when its deadline had passed (the socket is shut down).
    pub fn disarm(&self, armed: Ticket) -> bool {
        let mut state = self.shared.lock();
        match state.armed.iter().position(|a| a.id == armed.0) {
            Some(at) => state.armed.swap_remove(at).fired,
            None => false,
        }
    }
}

/// Stops the watchdog thread when the last handle of the VM goes away.
pub struct WatchdogGuard(pub Watchdog);

impl Drop for WatchdogGuard {
    fn drop(&mut self) {
        self.0.shared.lock().stop = true;
        self.0.shared.wake.notify_all();
    }
}

fn enforce(shared: &Shared) {
    let mut state = shared.lock();
    loop {
        if state.stop {
            return;
        }
        let now = Instant::now();
        for armed in state.armed.iter_mut().filter(|a| !a.fired && a.at <= now) {
            armed.fired = true;
            log::debug!("an exchange missed its deadline; shutting its socket down");
            let _ = armed.socket.shutdown(std::net::Shutdown::Both);
        }
        let next = state.armed.iter().filter(|a| !a.fired).map(|a| a.at).min();
        state = match next {
            Some(at) => {
                let wait = at.saturating_duration_since(Instant::now());
                shared
                    .wake
                    .wait_timeout(state, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => shared.wake.wait(state).unwrap_or_else(|p| p.into_inner()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_blocked_read_ends_when_its_deadline_passes() {
        let dog = Watchdog::start(Box::new(|| Ok(()))).unwrap();
        let _guard = WatchdogGuard(dog.clone());
        let (mut ours, _peer) = UnixStream::pair().unwrap();
        let armed = dog.arm(ours.try_clone().unwrap(), Duration::from_millis(100));
        let t0 = Instant::now();
        let mut buf = [0u8; 1];
        // The peer never writes: only the watchdog ends this read.
        assert_eq!(ours.read(&mut buf).unwrap(), 0);
        assert!(t0.elapsed() >= Duration::from_millis(90));
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert!(dog.disarm(armed), "the deadline fired");
    }

    #[test]
    fn an_exchange_that_ends_in_time_is_left_alone() {
        let dog = Watchdog::start(Box::new(|| Ok(()))).unwrap();
        let _guard = WatchdogGuard(dog.clone());
        let (ours, _peer) = UnixStream::pair().unwrap();
        let armed = dog.arm(ours.try_clone().unwrap(), Duration::from_millis(50));
        assert!(!dog.disarm(armed));
        std::thread::sleep(Duration::from_millis(100));
        // Still usable: a write goes through.
        let mut w = &ours;
        assert_eq!(std::io::Write::write(&mut w, b"x").unwrap(), 1);
    }
}
