//! The serve loop: one frontend connection at a time.
//!
//! When a frontend disconnects, or is refused for a malformed message, its device state
//! (rings, workers, memory table, acknowledged features) is dropped and the process waits
//! for the next connection. This is what lets a restarted core reconnect. The device object
//! itself (e.g. the open disk image) lives across connections.

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// How a connection ended.
#[derive(Debug)]
pub enum Ending {
    /// The frontend closed the connection (or a queue worker failed and closed it).
    Disconnected,
    /// The frontend sent something malformed or not allowed; the connection was closed.
    Refused(VhostError),
    /// The connection could not be set up at all.
    SetupFailed(std::io::Error),
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
    let ending = loop {
        match requests.handle_request() {
            Ok(()) => {}
            Err(VhostError::Disconnected) => break Ending::Disconnected,
            Err(VhostError::SocketBroken(e)) if is_hangup(&e) => break Ending::Disconnected,
            Err(e) => break Ending::Refused(e),
        }
    };
    match &ending {
        Ending::Refused(e) => log::warn!("refusing the connection: {e}"),
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
