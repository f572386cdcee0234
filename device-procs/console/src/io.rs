//! The I/O thread (`console-io`): accepts users on the ports' sockets, watches the
//! endpoints the queue workers are waiting on, and notices pty size changes.
//!
//! Queue workers never block on the user side. When one cannot move (endpoint full or
//! empty) it sets its port's `wants` flag and pokes this thread, which adds that direction to
//! its `poll(2)` set and, once the endpoint is ready, clears the flag and writes the queue's
//! eventfd. Only wanted directions are polled, so a user typing while the guest posts no
//! receive buffers does not make this thread spin: the input waits in the kernel.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::eventfd::EventFd;

use crate::control::Control;
use crate::port::{drop_client, Endpoint, Port};

/// How often pty window sizes are read (a pty tells its master nothing when they change).
const SIZE_POLL: Duration = Duration::from_millis(200);

enum Watch {
    Wake,
    Listener(usize),
    Stream(usize),
}

/// Runs the I/O thread until the process ends.
pub fn spawn(
    ports: Vec<Arc<Port>>,
    control: Option<Arc<Control>>,
    wake: Arc<EventFd>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    isola_device_common::thread::spawn_named("console-io", move || {
        let mut io = Io {
            ports,
            control,
            wake,
        };
        io.run()
    })
}

struct Io {
    ports: Vec<Arc<Port>>,
    control: Option<Arc<Control>>,
    wake: Arc<EventFd>,
}

fn pollfd(fd: i32, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

impl Io {
    fn run(&mut self) {
        let has_pty = self
            .ports
            .iter()
            .any(|p| matches!(p.endpoint().as_deref(), Some(Endpoint::Pty { .. })));
        let timeout = if has_pty {
            SIZE_POLL.as_millis() as i32
        } else {
            -1
        };
        loop {
            let (mut fds, watch) = self.poll_set();
            // SAFETY: `fds` is a live, initialised array of `fds.len()` pollfd structures that
            // poll may write `revents` into; the fds in it may have been closed meanwhile by a
            // worker dropping a client, which poll reports as POLLNVAL, touching no memory.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    log::error!("poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            // Ports whose user was replaced in this round: their stream's events (a listener
            // comes before its stream) were the old connection's, e.g. its hang-up, and must
            // not end the new one.
            let mut replaced = Vec::new();
            for (pfd, what) in fds.iter().zip(&watch) {
                if pfd.revents == 0 {
                    continue;
                }
                match *what {
                    Watch::Wake => {
                        // Nonblocking: EAGAIN only means another read already cleared it.
                        let _ = self.wake.read();
                    }
                    Watch::Listener(i) => {
                        if self.accept(i) {
                            replaced.push(i);
                        }
                    }
                    Watch::Stream(i) if replaced.contains(&i) => {}
                    Watch::Stream(i) => self.stream_ready(i, pfd.revents),
                }
            }
            if has_pty {
                self.check_sizes();
            }
        }
    }

    fn poll_set(&self) -> (Vec<libc::pollfd>, Vec<Watch>) {
        let mut fds = vec![pollfd(self.wake.as_raw_fd(), libc::POLLIN)];
        let mut watch = vec![Watch::Wake];
        for (i, port) in self.ports.iter().enumerate() {
            let Some(ep) = port.endpoint() else { continue };
            let mut events = 0;
            if port.wants.read.load(Ordering::Acquire) {
                events |= libc::POLLIN;
            }
            if port.wants.write.load(Ordering::Acquire) {
                events |= libc::POLLOUT;
            }
            let stream = match &*ep {
                Endpoint::Socket {
                    listener, client, ..
                } => {
                    fds.push(pollfd(listener.as_raw_fd(), libc::POLLIN));
                    watch.push(Watch::Listener(i));
                    if !port.rdhup_noted.load(Ordering::Acquire) {
                        events |= libc::POLLRDHUP;
                    }
                    // A client that hung up with input left is not watched until a queue
                    // wants it: poll would report the hang-up (which it cannot mask) forever.
                    client
                        .as_ref()
                        .filter(|_| events != 0)
                        .map(|c| c.as_raw_fd())
                }
                Endpoint::Pty { master, .. } => Some(master.as_raw_fd()),
            };
            if let Some(fd) = stream {
                fds.push(pollfd(fd, events));
                watch.push(Watch::Stream(i));
            }
        }
        (fds, watch)
    }

    /// Whether the attached user (if any) has shut down its side.
    fn client_hung_up(port: &Port) -> bool {
        let Some(ep) = port.endpoint() else {
            return false;
        };
        let Endpoint::Socket {
            client: Some(c), ..
        } = &*ep
        else {
            return false;
        };
        let mut fds = [pollfd(c.as_raw_fd(), libc::POLLRDHUP)];
        // SAFETY: polls one valid pollfd for an open socket we hold locked; no waiting.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
        n == 1 && fds[0].revents & (libc::POLLRDHUP | libc::POLLHUP) != 0
    }

    /// Takes the users waiting on port `i`'s listener; `true` if one became the port's user.
    fn accept(&mut self, i: usize) -> bool {
        let port = Arc::clone(&self.ports[i]);
        // A user that left in the same poll round as the next one arrives is let go first
        // (unless it left input for the guest), so the newcomer is not turned away.
        if Self::client_hung_up(&port) {
            self.peer_closed(&port);
        }
        let Some(mut ep) = port.endpoint() else {
            return false;
        };
        let Endpoint::Socket {
            listener, client, ..
        } = &mut *ep
        else {
            return false;
        };
        loop {
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("port {}: cannot accept a user: {e}", port.id);
                    return false;
                }
            };
            if client.is_some() {
                log::warn!(
                    "port {}: a user is already attached; closing the new connection",
                    port.id
                );
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("port {}: cannot use the new connection: {e}", port.id);
                continue;
            }
            log::info!("port {}: user attached", port.id);
            *client = Some(stream);
            port.rdhup_noted.store(false, Ordering::Release);
            drop(ep);
            if let Some(c) = &self.control {
                c.host_connected(port.id, true);
            }
            Port::poke(&port.rx_event);
            Port::poke(&port.tx_event);
            return true;
        }
    }

    fn stream_ready(&mut self, i: usize, revents: i16) {
        let port = Arc::clone(&self.ports[i]);
        let trouble = revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0;
        if (revents & libc::POLLIN != 0 || trouble) && port.wants.read.swap(false, Ordering::AcqRel)
        {
            Port::poke(&port.rx_event);
        }
        if (revents & libc::POLLOUT != 0 || trouble)
            && port.wants.write.swap(false, Ordering::AcqRel)
        {
            Port::poke(&port.tx_event);
        }
        if revents & (libc::POLLRDHUP | libc::POLLHUP) != 0 {
            self.peer_closed(&port);
        }
    }

    /// The client shut down its side: drop it now unless it left input for the guest, which
    /// the receive queue reads up to the end (where it drops the client itself).
    fn peer_closed(&mut self, port: &Arc<Port>) {
        let Some(mut ep) = port.endpoint() else {
            return;
        };
        let Endpoint::Socket {
            client: Some(c), ..
        } = &*ep
        else {
            return;
        };
        let mut unread: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int to the pointer, which points at `unread`, a live
        // local c_int; `c` is an open socket owned by the endpoint we hold locked.
        let rc = unsafe { libc::ioctl(c.as_raw_fd(), libc::FIONREAD, &mut unread) };
        if rc == 0 && unread > 0 {
            port.rdhup_noted.store(true, Ordering::Release);
            Port::poke(&port.rx_event);
            return;
        }
        log::info!("port {}: user detached", port.id);
        drop_client(&mut ep);
        drop(ep);
        if let Some(c) = &self.control {
            c.host_connected(port.id, false);
        }
        Port::poke(&port.tx_event);
    }

    fn check_sizes(&mut self) {
        for port in &self.ports {
            if let Some((cols, rows)) = port.poll_size() {
                log::info!("port {}: terminal is now {cols}x{rows}", port.id);
                if let Some(c) = &self.control {
                    c.resize(port.id, cols, rows);
                }
            }
        }
    }
}
