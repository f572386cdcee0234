//! The user side of one console port: an append-only log file, and at most one interactive
//! endpoint, a Unix socket a user attaches to (one client at a time) or a pty.
//!
//! Every fd here is non-blocking: queue workers never sleep on the user side, they stop
//! taking guest buffers and ask the I/O thread ([`crate::io`]) to wake them when the user
//! side can move again. That is the whole flow-control design: guest output waits in the
//! guest's own transmit queue while the reader is slow, user input waits in the kernel's
//! socket or pty buffer while the guest has posted no receive buffers. Nothing is buffered in
//! this process beyond one 64 KiB copy per queue, so a slow side costs no memory here.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::termios::{self, SetArg};

use crate::record::{Record, RecordError};

/// Longest port name (PORT_NAME carries it in one control buffer).
pub const MAX_NAME: usize = 127;

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error(
        "port spec '{0}': expected comma-separated name=NAME, socket=PATH, pty[=LINK], log=FILE"
    )]
    BadSpec(String),
    #[error("port spec '{0}': socket and pty are exclusive (one interactive endpoint per port)")]
    TwoEndpoints(String),
    #[error("port spec '{0}': a port needs socket=, pty or log=")]
    NoEndpoint(String),
    #[error(
        "port name '{0}': 1 to {MAX_NAME} printable ASCII characters without spaces or commas"
    )]
    BadName(String),
    #[error("cannot open the log {}", .0.display())]
    Log(PathBuf, #[source] std::io::Error),
    #[error("log {}", .0.display())]
    Record(PathBuf, #[source] RecordError),
    #[error("cannot listen on {}", .0.display())]
    Listen(PathBuf, #[source] isola_device_common::cli::ListenError),
    #[error("cannot create a pty")]
    Pty(#[source] nix::Error),
    #[error("cannot link {} to the pty", .0.display())]
    PtyLink(PathBuf, #[source] std::io::Error),
    #[error("cannot create an eventfd")]
    EventFd(#[source] nix::Error),
}

/// One `--port` option.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSpec {
    pub name: Option<String>,
    pub socket: Option<PathBuf>,
    /// `pty` (Some(None)) or `pty=LINK` (a symlink to the pty's slave).
    pub pty: Option<Option<PathBuf>>,
    pub log: Option<PathBuf>,
}

impl std::str::FromStr for PortSpec {
    type Err = PortError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PortError::BadSpec(s.to_owned());
        let mut spec = PortSpec::default();
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("name", n)) => {
                    let ok = !n.is_empty()
                        && n.len() <= MAX_NAME
                        && n.bytes().all(|b| b.is_ascii_graphic() && b != b',');
                    if !ok {
                        return Err(PortError::BadName(n.to_owned()));
                    }
                    spec.name = Some(n.to_owned());
                }
                Some(("socket", p)) if !p.is_empty() => spec.socket = Some(p.into()),
                Some(("pty", p)) if !p.is_empty() => spec.pty = Some(Some(p.into())),
                Some(("log", p)) if !p.is_empty() => spec.log = Some(p.into()),
                None if part == "pty" => spec.pty = Some(None),
                _ => return Err(bad()),
            }
        }
        if spec.socket.is_some() && spec.pty.is_some() {
            return Err(PortError::TwoEndpoints(s.to_owned()));
        }
        if spec.socket.is_none() && spec.pty.is_none() && spec.log.is_none() {
            return Err(PortError::NoEndpoint(s.to_owned()));
        }
        Ok(spec)
    }
}

/// Result of moving bytes to or from the interactive endpoint.
#[derive(Debug, PartialEq, Eq)]
pub enum Moved {
    /// This many bytes (never 0 for a write of something).
    Bytes(usize),
    /// The endpoint cannot take or give more now; the I/O thread will wake the queue.
    WouldBlock,
    /// No user attached: output is discarded, input waits for one.
    Detached,
    /// The user just left (EOF, EPIPE, reset): the client is dropped.
    Closed,
}

pub enum Endpoint {
    Socket {
        path: PathBuf,
        listener: UnixListener,
        client: Option<UnixStream>,
    },
    Pty {
        master: File,
        /// Kept open so the pty survives users coming and going (a master whose slave is
        /// closed reads EIO); also where the window size is read.
        slave: OwnedFd,
        path: PathBuf,
        link: Option<PathBuf>,
        size: (u16, u16),
    },
}

/// What the I/O thread must watch for this port, set by the queue workers.
#[derive(Debug, Default)]
pub struct Wants {
    pub read: AtomicBool,
    pub write: AtomicBool,
}

/// One port: its log, its endpoint, and the eventfds that wake its queues.
pub struct Port {
    pub id: u32,
    pub name: Option<String>,
    log: Option<Mutex<LogFile>>,
    endpoint: Option<Mutex<Endpoint>>,
    pub wants: Wants,
    /// Completion eventfd of the port's receive queue: user input may be waiting.
    pub rx_event: EventFd,
    /// Completion eventfd of the port's transmit queue: the user side can take more.
    pub tx_event: EventFd,
    /// The I/O thread's wake-up eventfd.
    io_wake: Arc<EventFd>,
    /// The current client has shut down its sending side but left input to read.
    pub rdhup_noted: AtomicBool,
}

/// The log file and the record of the transmit buffer being appended to it.
pub struct LogFile {
    pub file: File,
    pub path: PathBuf,
    pub record: Record,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data behind the lock; a panic while holding it leaves nothing half-updated that
    // matters more than stopping would.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn set_nonblocking(fd: &impl AsFd) -> nix::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

fn eventfd() -> Result<EventFd, PortError> {
    EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map_err(PortError::EventFd)
}

fn open_pty(link: Option<&Path>) -> Result<Endpoint, PortError> {
    let pty = nix::pty::openpty(None, None).map_err(PortError::Pty)?;
    // Raw on the slave side: no echo of guest output back into the guest, no line editing,
    // no CR/LF translation; a user's terminal program sets its own modes on top.
    let mut attrs = termios::tcgetattr(&pty.slave).map_err(PortError::Pty)?;
    termios::cfmakeraw(&mut attrs);
    termios::tcsetattr(&pty.slave, SetArg::TCSANOW, &attrs).map_err(PortError::Pty)?;
    set_nonblocking(&pty.master).map_err(PortError::Pty)?;
    let path = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd()))
        .map_err(|e| PortError::PtyLink("/proc/self/fd".into(), e))?;
    if let Some(link) = link {
        let _ = std::fs::remove_file(link);
        std::os::unix::fs::symlink(&path, link).map_err(|e| PortError::PtyLink(link.into(), e))?;
    }
    let size = winsize(&pty.master);
    Ok(Endpoint::Pty {
        master: File::from(pty.master),
        slave: pty.slave,
        path,
        link: link.map(Path::to_owned),
        size,
    })
}

/// (cols, rows) of a pty, (0, 0) if unknown.
pub fn winsize(fd: &impl AsRawFd) -> (u16, u16) {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` to the pointer, which points at `ws`,
    // a live local of that type; on a non-tty fd it fails and writes nothing.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    if rc == 0 {
        (ws.ws_col, ws.ws_row)
    } else {
        (0, 0)
    }
}

impl Port {
    /// Opens the log, binds the socket or creates the pty.
    pub fn open(id: u32, spec: &PortSpec, io_wake: Arc<EventFd>) -> Result<Port, PortError> {
        let log = match &spec.log {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(path)
                    .map_err(|e| PortError::Log(path.clone(), e))?;
                let record = Record::open(&Record::path_for(path))
                    .map_err(|e| PortError::Record(path.clone(), e))?;
                Some(Mutex::new(LogFile {
                    file,
                    path: path.clone(),
                    record,
                }))
            }
            None => None,
        };
        let endpoint = match (&spec.socket, &spec.pty) {
            (Some(path), _) => {
                let listener = isola_device_common::cli::bind(path)
                    .map_err(|e| PortError::Listen(path.clone(), e))?;
                set_nonblocking(&listener).map_err(PortError::Pty)?;
                Some(Endpoint::Socket {
                    path: path.clone(),
                    listener,
                    client: None,
                })
            }
            (None, Some(link)) => Some(open_pty(link.as_deref())?),
            (None, None) => None,
        };
        Ok(Port {
            id,
            name: spec.name.clone(),
            log,
            endpoint: endpoint.map(Mutex::new),
            wants: Wants::default(),
            rx_event: eventfd()?,
            tx_event: eventfd()?,
            io_wake,
            rdhup_noted: AtomicBool::new(false),
        })
    }

    pub fn log(&self) -> Option<MutexGuard<'_, LogFile>> {
        self.log.as_ref().map(lock)
    }

    pub fn endpoint(&self) -> Option<MutexGuard<'_, Endpoint>> {
        self.endpoint.as_ref().map(lock)
    }

    pub fn has_endpoint(&self) -> bool {
        self.endpoint.is_some()
    }

    /// Whether a user is on the other side (PORT_OPEN from the device): always for a log or
    /// a pty, for a socket while a client is attached.
    pub fn host_connected(&self) -> bool {
        match self.endpoint() {
            Some(ep) => match &*ep {
                Endpoint::Socket { client, .. } => client.is_some(),
                Endpoint::Pty { .. } => true,
            },
            None => true,
        }
    }

    /// The pty's window size (cols, rows), if this port has a pty that knows one.
    pub fn size(&self) -> Option<(u16, u16)> {
        match self.endpoint().as_deref() {
            Some(Endpoint::Pty { size, .. }) if *size != (0, 0) => Some(*size),
            _ => None,
        }
    }

    /// Reads the pty's window size again; `Some` if it changed.
    pub fn poll_size(&self) -> Option<(u16, u16)> {
        let mut ep = self.endpoint()?;
        let Endpoint::Pty { master, size, .. } = &mut *ep else {
            return None;
        };
        let now = winsize(master);
        (now != *size).then(|| {
            *size = now;
            now
        })
    }

    /// Where a user attaches, for the start-up line.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(name) = &self.name {
            parts.push(format!("name {name}"));
        }
        if let Some(ep) = self.endpoint() {
            match &*ep {
                Endpoint::Socket { path, .. } => parts.push(format!("socket {}", path.display())),
                Endpoint::Pty { path, link, .. } => {
                    parts.push(format!("pty {}", path.display()));
                    if let Some(link) = link {
                        parts.push(format!("linked at {}", link.display()));
                    }
                }
            }
        }
        if let Some(log) = self.log() {
            parts.push(format!("log {}", log.path.display()));
        }
        parts.join(", ")
    }

    pub fn poke(event: &EventFd) {
        // Only fails if the counter would overflow, and then the reader is woken anyway.
        let _ = event.write(1);
    }

    /// Writes guest output straight from guest memory (one `writev`, no copy here).
    ///
    /// # Safety
    ///
    /// Every iovec must describe readable memory that stays mapped for the duration of the
    /// call (slices of a guest memory mapping the caller holds).
    pub unsafe fn write_iov(&self, iov: &[libc::iovec]) -> Moved {
        let Some(mut ep) = self.endpoint() else {
            return Moved::Detached;
        };
        let fd = match &*ep {
            Endpoint::Socket { client: None, .. } => return Moved::Detached,
            Endpoint::Socket {
                client: Some(c), ..
            } => c.as_raw_fd(),
            Endpoint::Pty { master, .. } => master.as_raw_fd(),
        };
        // SAFETY: `fd` is open (owned by the endpoint, locked in `ep` for the call); the
        // iovecs are readable and mapped per this function's contract, and writev only reads
        // them; their count is bounded by the caller (at most IOV_MAX is checked by the
        // kernel, which fails with EINVAL rather than reading more).
        let n = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) };
        if n > 0 {
            return Moved::Bytes(n as usize);
        }
        let err = std::io::Error::last_os_error();
        match err.kind() {
            ErrorKind::WouldBlock | ErrorKind::Interrupted if n < 0 => Moved::WouldBlock,
            _ => {
                log::info!("port {}: user side closed ({err})", self.id);
                drop_client(&mut ep);
                Moved::Closed
            }
        }
    }

    /// Reads user input for the guest into `buf`.
    pub fn read(&self, buf: &mut [u8]) -> Moved {
        let Some(mut ep) = self.endpoint() else {
            return Moved::Detached;
        };
        let result = match &mut *ep {
            Endpoint::Socket { client: None, .. } => return Moved::Detached,
            Endpoint::Socket {
                client: Some(c), ..
            } => c.read(buf),
            Endpoint::Pty { master, .. } => master.read(buf),
        };
        match result {
            Ok(n) if n > 0 => Moved::Bytes(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Moved::WouldBlock,
            Err(e) if e.kind() == ErrorKind::Interrupted => Moved::WouldBlock,
            other => {
                log::info!("port {}: user side closed ({other:?})", self.id);
                drop_client(&mut ep);
                Moved::Closed
            }
        }
    }

    /// A queue cannot move on until the endpoint is readable (`read`) or writable: the I/O
    /// thread watches for it and pokes the queue's eventfd.
    pub fn want(&self, read: bool) {
        let flag = if read {
            &self.wants.read
        } else {
            &self.wants.write
        };
        flag.store(true, Ordering::Release);
        Port::poke(&self.io_wake);
    }
}

/// Drops a socket client (a pty stays).
pub fn drop_client(ep: &mut Endpoint) -> bool {
    match ep {
        Endpoint::Socket { client, .. } => client.take().is_some(),
        Endpoint::Pty { .. } => false,
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        if let Some(ep) = self.endpoint.as_ref() {
            match &*lock(ep) {
                Endpoint::Socket { path, .. } => {
                    let _ = std::fs::remove_file(path);
                }
                Endpoint::Pty {
                    link: Some(link), ..
                } => {
                    let _ = std::fs::remove_file(link);
                }
                Endpoint::Pty { .. } => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn specs_parse_and_refuse_nonsense() {
        let s: PortSpec = "name=org.isola.x,socket=/run/c.sock,log=/var/c.log"
            .parse()
            .unwrap();
        assert_eq!(s.name.as_deref(), Some("org.isola.x"));
        assert_eq!(s.socket.as_deref(), Some(Path::new("/run/c.sock")));
        assert_eq!(s.log.as_deref(), Some(Path::new("/var/c.log")));
        assert_eq!("pty".parse::<PortSpec>().unwrap().pty, Some(None));
        assert_eq!(
            "pty=/tmp/l".parse::<PortSpec>().unwrap().pty,
            Some(Some("/tmp/l".into()))
        );
        assert!(matches!(
            "socket=/a,pty".parse::<PortSpec>(),
            Err(PortError::TwoEndpoints(_))
        ));
        assert!(matches!(
            "name=x".parse::<PortSpec>(),
            Err(PortError::NoEndpoint(_))
        ));
        assert!(matches!(
            "name=a b,log=/x".parse::<PortSpec>(),
            Err(PortError::BadName(_))
        ));
        assert!(matches!(
            "colour=red".parse::<PortSpec>(),
            Err(PortError::BadSpec(_))
        ));
        assert!(matches!(
            "socket=".parse::<PortSpec>(),
            Err(PortError::BadSpec(_))
        ));
    }

    #[test]
    fn a_pty_is_raw_and_reports_its_size() {
        let Endpoint::Pty {
            mut master, path, ..
        } = open_pty(None).unwrap()
        else {
            unreachable!()
        };
        let mut user = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        master.write_all(b"a\nb").unwrap();
        let mut buf = [0u8; 8];
        let n = user.read(&mut buf).unwrap();
        // Raw: no "\r\n" translation, and nothing echoed back to the master.
        assert_eq!(&buf[..n], b"a\nb");
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            master.read(&mut buf).map_err(|e| e.kind()),
            Err(ErrorKind::WouldBlock)
        );
        let ws = libc::winsize {
            ws_row: 40,
            ws_col: 100,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `struct winsize` from the pointer, a live local.
        let rc = unsafe { libc::ioctl(user.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(rc, 0);
        assert_eq!(winsize(&master), (100, 40));
    }
}
