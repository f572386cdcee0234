//! The serve loop: one frontend connection at a time.
//!
//! When a frontend disconnects, or is refused for a malformed message, its device state
//! (rings, workers, memory table, acknowledged features) is dropped and the process waits
//! for the next connection. This is what lets a restarted core reconnect. The device object
//! itself (e.g. the open disk image) lives across connections.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::EventFd;
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};

use crate::device::VirtioDevice;
use crate::handler::DeviceHandler;
use crate::logging::RateLimiter;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot accept connections")]
    Accept(#[source] std::io::Error),
    #[error("cannot wait for connections")]
    Poll(#[source] nix::Error),
}

/// Default for how long a new connection may take to send SET_OWNER.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

static HANDSHAKE_TIMEOUT_MS: AtomicU64 = AtomicU64::new(HANDSHAKE_TIMEOUT.as_millis() as u64);

/// Sets how long a new connection may take to send SET_OWNER before it is dropped
/// (`--handshake-timeout-ms`; [`HANDSHAKE_TIMEOUT`] by default).
pub fn set_handshake_timeout(timeout: Duration) {
    let ms = u64::try_from(timeout.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    HANDSHAKE_TIMEOUT_MS.store(ms, Ordering::Relaxed);
}

fn handshake_timeout() -> Duration {
    Duration::from_millis(HANDSHAKE_TIMEOUT_MS.load(Ordering::Relaxed))
}

/// How long the rest of a message may take once its first byte is readable: a frontend that
/// sends half a header and stops must not hold the device.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(2);

/// How a connection ended.
#[derive(Debug)]
pub enum Ending {
    /// The frontend closed the connection (or a queue worker failed and closed it).
    Disconnected,
    /// The frontend sent something malformed or not allowed; the connection was closed.
    Refused(VhostError),
    /// The connection could not be set up at all.
    SetupFailed(std::io::Error),
    /// The frontend did not send SET_OWNER within the handshake deadline.
    HandshakeTimeout(Duration),
}

/// Serves frontends on `listener`, one at a time, for ever.
pub fn serve<D: VirtioDevice>(listener: &UnixListener, device: &Arc<D>) -> Result<(), ServeError> {
    serve_until(listener, device, None)
}

/// As [`serve`], returning once `stop` becomes readable between connections.
pub fn serve_until<D: VirtioDevice>(
    listener: &UnixListener,
    device: &Arc<D>,
    stop: Option<&EventFd>,
) -> Result<(), ServeError> {
    let mut accept_log = RateLimiter::new(1);
    loop {
        if let Some(stop) = stop {
            let mut fds = [
                PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(ServeError::Poll(e)),
            }
            if fds[1].any().unwrap_or(false) {
                return Ok(());
            }
        }
        match listener.accept() {
            Ok((stream, _)) => {
                serve_connection(stream, device);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_transient(&e) => {
                if accept_log.allow().is_some() {
                    log::warn!("cannot accept a connection now: {e}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(ServeError::Accept(e)),
        }
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ECONNABORTED
                | libc::EPROTO
        )
    )
}

/// Serves one frontend until it disconnects or is refused, then resets the device state.
pub fn serve_connection<D: VirtioDevice>(stream: UnixStream, device: &Arc<D>) -> Ending {
    // Every read of the connection is bounded; the loop below waits (with poll) for a
    // message to begin, so an idle owned frontend is not affected.
    if let Err(e) = stream.set_read_timeout(Some(MESSAGE_TIMEOUT)) {
        log::warn!("cannot set up a connection: {e}");
        return Ending::SetupFailed(e);
    }
    let handler = match stream
        .try_clone()
        .and_then(|clone| DeviceHandler::new(Arc::clone(device), clone))
    {
        Ok(h) => Arc::new(Mutex::new(h)),
        Err(e) => {
            log::warn!("cannot set up a connection: {e}");
            return Ending::SetupFailed(e);
        }
    };
    log::info!("frontend connected");
    let mut requests = BackendReqHandler::from_stream(stream, Arc::clone(&handler));
    let timeout = handshake_timeout();
    let deadline = Instant::now() + timeout;
    let ending = loop {
        // Until it has an owner the connection has a deadline: a silent frontend must not
        // hold the device. (Once owned, a frontend may rightly be idle for as long as its
        // guest does not touch the device.)
        let owned = handler.lock().unwrap_or_else(|p| p.into_inner()).owned();
        if !readable_before(requests.as_raw_fd(), (!owned).then_some(deadline)) {
            break Ending::HandshakeTimeout(timeout);
        }
        match requests.handle_request() {
            Ok(()) => {}
            Err(VhostError::Disconnected) => break Ending::Disconnected,
            Err(VhostError::SocketBroken(e)) if is_hangup(&e) => break Ending::Disconnected,
            Err(e) => break Ending::Refused(e),
        }
    };
    match &ending {
        Ending::Refused(e) => log::warn!("refusing the connection: {e}"),
        Ending::HandshakeTimeout(t) => log::warn!(
            "refusing the connection: no SET_OWNER within {} ms of connecting",
            t.as_millis()
        ),
        _ => {
            log::info!("frontend disconnected; device state reset, waiting for the next connection")
        }
    }
    drop(requests);
    // The handler is only shared with `requests`, dropped above; a poisoned lock would
    // mean a panic in a handler method, and shutting the workers down is still right.
    handler.lock().unwrap_or_else(|p| p.into_inner()).shutdown();
    ending
}

fn is_hangup(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ECONNRESET | libc::EPIPE))
}

/// Whether `fd` has something to read (or has hung up) before `deadline` (`None`: waits as
/// long as it takes).
fn readable_before(fd: std::os::fd::RawFd, deadline: Option<Instant>) -> bool {
    // SAFETY: `fd` is the connection's socket, owned by the request handler that outlives
    // this call; the borrow ends with it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                PollTimeout::from(u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX))
            }
        };
        let mut fds = [PollFd::new(borrowed, PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => return true,
            Err(nix::Error::EINTR) => continue,
            // Let the request handler meet (and report) whatever is wrong with the socket.
            Err(_) => return true,
        }
    }
}
