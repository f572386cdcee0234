//! The one generic vhost-user frontend of the core.
//!
//! Every device type goes through this same code; what differs per type is a row of
//! [`crate::virtio::DeviceKind`]. The frontend only wires things: it hands the backend the
//! guest-RAM memfd, the ring addresses, an ioeventfd to read kicks from and an irqfd to raise
//! interrupts with. After that, requests and completions flow between the guest and the device
//! process without passing through the core.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{recv, MsgFlags};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight,
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::deadline::Watchdog;
use crate::memory::GuestRam;

/// Protocol features the frontend uses when the backend offers them.
pub fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// Protocol version in a vhost-user header's flags.
const VERSION_1: u32 = 0x1;

/// Poll interval while waiting for a backend's socket to appear.
const CONNECT_RETRY: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("no vhost-user backend answered on {} within {waited:?}", .path.display())]
    ConnectTimeout { path: PathBuf, waited: Duration },
    #[error("{} is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("vhost-user backend at {} did not answer {step} within {timeout:?}", .path.display())]
    Unresponsive {
        path: PathBuf,
        step: &'static str,
        timeout: Duration,
    },
    #[error("vhost-user backend at {} failed during {step}", .path.display())]
    Protocol {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("backend at {} has {have} queues, the device needs {need}", .path.display())]
    TooFewQueues { path: PathBuf, have: u64, need: u16 },
    #[error("backend at {} does not offer VIRTIO_F_VERSION_1", .0.display())]
    NotModern(PathBuf),
    #[error("restarted backend at {} differs: {what}", .path.display())]
    Changed { path: PathBuf, what: String },
    #[error("queue {0} address {1:#x} is not in guest RAM")]
    BadRingAddress(u16, u64),
    #[error("no display process listening on {} after {waited:?}", .path.display())]
    DisplayTimeout { path: PathBuf, waited: Duration },
    #[error("backend at {} failed VHOST_USER_GPU_SET_SOCKET: {what}", .path.display())]
    GpuSocket { path: PathBuf, what: String },
}

/// One queue as the guest configured it, ready to hand to the backend.
pub struct QueueSetup<'a> {
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Next available-ring index the backend starts from.
    pub base: u16,
    pub kick: &'a EventFd,
    pub call: &'a EventFd,
}

/// Where and what to reconnect to; taken from a connection with [`VhostUserConnection::target`].
pub struct ReconnectTarget {
    path: PathBuf,
    display: Option<PathBuf>,
    deadlines: Deadlines,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    num_queues: u16,
    queue_size: u16,
}

impl ReconnectTarget {
    /// One attempt to open a new session with a restarted backend on the same socket. The
    /// backend must offer exactly the features and protocol features the old one did: the
    /// guest negotiated against those. The caller checks the new session (its configuration
    /// space) and then adopts it with [`VhostUserConnection::replace_with`], or drops it.
    pub fn connect(&self) -> Result<VhostUserConnection, VhostUserError> {
        // One connect that never blocks (a listen backlog nobody accepts is `WouldBlock`);
        // the handshake is bounded by the exchange deadline.
        let stream =
            connect_nonblocking(&self.path).map_err(|_| VhostUserError::ConnectTimeout {
                path: self.path.clone(),
                waited: Duration::ZERO,
            })?;
        let session = handshake(&self.path, stream, self.num_queues, &self.deadlines)?;
        if session.features != self.features || session.protocol != self.protocol {
            return Err(VhostUserError::Changed {
                path: self.path.clone(),
                what: format!(
                    "features {:#x} / protocol {:#x}, was {:#x} / {:#x}",
                    session.features,
                    session.protocol.bits(),
                    self.features,
                    self.protocol.bits()
                ),
            });
        }
        let mut new = VhostUserConnection {
            path: self.path.clone(),
            display: None,
            display_link: None,
            deadlines: self.deadlines.clone(),
            socket: session.socket,
            frontend: session.frontend,
            features: self.features,
            protocol: self.protocol,
            num_queues: self.num_queues,
            queue_size: self.queue_size,
            inflight: None,
        };
        if let Some(display) = &self.display {
            // A fresh connection for the new backend. If the display process is not there,
            // the GPU carries on without one rather than stalling the guest's device; the
            // control loop keeps trying to attach it (the path stays configured).
            if let Err(e) = new.attach_display(display, Duration::ZERO) {
                match e {
                    VhostUserError::DisplayTimeout { .. } => log::warn!(
                        "vhost-user {}: {}; the restarted GPU has no display for now",
                        self.path.display(),
                        crate::error_chain(&e)
                    ),
                    other => return Err(other),
                }
            }
        }
        Ok(new)
    }
}

/// A connected backend.
pub struct VhostUserConnection {
    path: PathBuf,
    /// The display socket passed to this (GPU) backend, passed again on every reconnect and
    /// whenever the display process comes back.
    display: Option<PathBuf>,
    /// The core's duplicate of the display connection the backend holds: never read or
    /// written, only watched for a hang-up (the display process went away). `None` while the
    /// backend has no live display connection.
    display_link: Option<UnixStream>,
    deadlines: Deadlines,
    /// A duplicate of the session's socket, for the watchdog to shut down.
    socket: UnixStream,
    frontend: Frontend,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    num_queues: u16,
    queue_size: u16,
    /// The in-flight region the backend gave us; kept so a reconnect can hand it back.
    inflight: Option<(VhostUserInflight, File)>,
}

/// The deadline of every exchange with a backend, and the watchdog that enforces it.
#[derive(Clone)]
pub struct Deadlines {
    pub watchdog: Watchdog,
    pub timeout: Duration,
}

impl Deadlines {
    /// Runs `f` (one exchange on `socket`) with the deadline armed: when it passes, the
    /// socket is shut down, `f` fails, and the result is [`VhostUserError::Unresponsive`].
    fn run<T>(
        &self,
        path: &Path,
        socket: &UnixStream,
        step: &'static str,
        f: impl FnOnce() -> Result<T, vhost::Error>,
    ) -> Result<T, VhostUserError> {
        let dup = socket.try_clone().map_err(|e| VhostUserError::Protocol {
            path: path.to_owned(),
            step,
            source: vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::SocketError(e)),
        })?;
        let ticket = self.watchdog.arm(dup, self.timeout);
        let result = f();
        let fired = self.watchdog.disarm(ticket);
        match result {
            Ok(value) if !fired => Ok(value),
            _ if fired => Err(VhostUserError::Unresponsive {
                path: path.to_owned(),
                step,
                timeout: self.timeout,
            }),
            Ok(value) => Ok(value),
            Err(source) => Err(VhostUserError::Protocol {
                path: path.to_owned(),
                step,
                source,
            }),
        }
    }
}

/// A fresh session on the socket, negotiated but not yet configured.
struct Session {
    frontend: Frontend,
    socket: UnixStream,
    features: u64,
    protocol: VhostUserProtocolFeatures,
}

/// [`negotiate`] on a connected stream, each message under the exchange deadline.
///
/// The socket may be one a supervisor keeps listening while no backend runs (the connection
/// then waits in the listen backlog), or the backend may be stopped: the deadline makes the
/// handshake fail instead of blocking the calling thread for as long as the backend stays away.
fn handshake(
    path: &Path,
    stream: UnixStream,
    num_queues: u16,
    deadlines: &Deadlines,
) -> Result<Session, VhostUserError> {
    let socket = stream.try_clone().map_err(|e| VhostUserError::Protocol {
        path: path.to_owned(),
        step: "handshake",
        source: vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::SocketError(e)),
    })?;
    let frontend = Frontend::from_stream(stream, u64::from(num_queues));
    negotiate(path, frontend, socket, num_queues, deadlines)
}

/// SET_OWNER and feature/protocol negotiation on a freshly connected frontend.
fn negotiate(
    path: &Path,
    mut frontend: Frontend,
    socket: UnixStream,
    num_queues: u16,
    deadlines: &Deadlines,
) -> Result<Session, VhostUserError> {
    let run = |step, f: &mut dyn FnMut() -> Result<u64, vhost::Error>| {
        deadlines.run(path, &socket, step, f)
    };
    run("SET_OWNER", &mut || frontend.set_owner().map(|()| 0))?;
    let features = run("GET_FEATURES", &mut || frontend.get_features())?;
    if features & (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1) == 0 {
        return Err(VhostUserError::NotModern(path.to_owned()));
    }
    let mut protocol = VhostUserProtocolFeatures::empty();
    if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
        let offered = run("GET_PROTOCOL_FEATURES", &mut || {
            frontend.get_protocol_features().map(|p| p.bits())
        })?;
        protocol =
            VhostUserProtocolFeatures::from_bits_truncate(offered) & wanted_protocol_features();
        run("SET_PROTOCOL_FEATURES", &mut || {
            frontend.set_protocol_features(protocol).map(|()| 0)
        })?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Without NEED_REPLY a backend error would pass silently.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
    }
    if protocol.contains(VhostUserProtocolFeatures::MQ) {
        let have = run("GET_QUEUE_NUM", &mut || frontend.get_queue_num())?;
        if have < u64::from(num_queues) {
            return Err(VhostUserError::TooFewQueues {
                path: path.to_owned(),
                have,
                need: num_queues,
            });
        }
    }
    Ok(Session {
        frontend,
        socket,
        features,
        protocol,
    })
}

/// One attempt to connect to the display process listening on `path` (see
/// [`connect_nonblocking`]).
pub fn connect_display(path: &Path) -> std::io::Result<UnixStream> {
    connect_nonblocking(path)
}

/// One attempt to connect to a Unix socket. The connect itself never blocks (a full listen
/// backlog nobody accepts is `WouldBlock`, a missing listener an error), so a thread can retry
/// it on every tick; the connection is made blocking again before it is used (a backend
/// shares its file status flags, and exchanges are bounded by the watchdog instead).
pub fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

impl VhostUserConnection {
    /// Connects to `path`, waiting up to `timeout` for the backend to appear (saying once that
    /// it waits), and negotiates the protocol, each message under the exchange deadline.
    /// `num_queues` is what the device will expose. A path that exists and is not a socket is
    /// refused at once.
    pub fn connect(
        path: &Path,
        num_queues: u16,
        queue_size: u16,
        timeout: Duration,
        deadlines: &Deadlines,
    ) -> Result<Self, VhostUserError> {
        let deadline = Instant::now() + timeout;
        let mut said = false;
        let session = loop {
            if let Ok(meta) = std::fs::metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if !meta.file_type().is_socket() {
                    return Err(VhostUserError::NotASocket(path.to_owned()));
                }
            }
            let attempt = connect_nonblocking(path)
                .map_err(|_| VhostUserError::ConnectTimeout {
                    path: path.to_owned(),
                    waited: Duration::ZERO,
                })
                .and_then(|stream| handshake(path, stream, num_queues, deadlines));
            match attempt {
                Ok(session) => break session,
                // Nobody listening yet, a listener that does not accept or answer (a
                // supervisor's socket while its daemon starts, a stopped backend), or one
                // that died mid-handshake: try again until the time is up.
                Err(
                    VhostUserError::ConnectTimeout { .. }
                    | VhostUserError::Unresponsive { .. }
                    | VhostUserError::Protocol { .. },
                ) if Instant::now() < deadline => {
                    if !said {
                        log::warn!("waiting for {} (at most {timeout:?})", path.display());
                        said = true;
                    }
                    std::thread::sleep(CONNECT_RETRY);
                }
                Err(
                    VhostUserError::ConnectTimeout { .. }
                    | VhostUserError::Unresponsive { .. }
                    | VhostUserError::Protocol { .. },
                ) => {
                    return Err(VhostUserError::ConnectTimeout {
                        path: path.to_owned(),
                        waited: timeout,
                    })
                }
                Err(other) => return Err(other),
            }
        };
        let Session {
            frontend,
            socket,
            features,
            protocol,
        } = session;
        log::info!(
            "vhost-user {}: features {features:#x}, protocol {:#x}",
            path.display(),
            protocol.bits()
        );
        Ok(VhostUserConnection {
            path: path.to_owned(),
            display: None,
            display_link: None,
            deadlines: deadlines.clone(),
            socket,
            frontend,
            features,
            protocol,
            num_queues,
            queue_size,
            inflight: None,
        })
    }

    /// What a reconnect needs to know, so it can run without the device's lock.
    pub fn target(&self) -> ReconnectTarget {
        ReconnectTarget {
            path: self.path.clone(),
            display: self.display.clone(),
            deadlines: self.deadlines.clone(),
            features: self.features,
            protocol: self.protocol,
            num_queues: self.num_queues,
            queue_size: self.queue_size,
        }
    }

    /// Makes `new` (from [`ReconnectTarget::connect`]) the session, keeping the in-flight
    /// region.
    pub fn replace_with(&mut self, mut new: VhostUserConnection) {
        new.inflight = self.inflight.take();
        *self = new;
        log::info!("vhost-user {}: reconnected", self.path.display());
    }

    /// Connects to the display process listening on `display` (waiting up to `wait` for it)
    /// and hands that connection to the backend with VHOST_USER_GPU_SET_SOCKET. Scanouts and
    /// pixels go from the GPU process straight to the display; the core keeps a duplicate of
    /// the connection only to notice when the display goes away ([`Self::display_fd`]).
    /// `display` stays configured even when this fails, so it can be attached later.
    pub fn attach_display(&mut self, display: &Path, wait: Duration) -> Result<(), VhostUserError> {
        self.display = Some(display.to_owned());
        let deadline = Instant::now() + wait;
        let stream = loop {
            match connect_display(display) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => std::thread::sleep(CONNECT_RETRY),
                Err(_) => {
                    return Err(VhostUserError::DisplayTimeout {
                        path: display.to_owned(),
                        waited: wait,
                    })
                }
            }
        };
        self.pass_display(stream)
    }

    /// Hands `stream` (a connection to the display process, from [`connect_display`]) to the
    /// backend, mid-session or not, and keeps it as the display link. A backend that holds a
    /// display connection already replaces it (isola-gpu then sends the current picture).
    pub fn pass_display(&mut self, stream: UnixStream) -> Result<(), VhostUserError> {
        self.display_link = None;
        self.send_gpu_socket(&stream)?;
        self.display_link = Some(stream);
        log::info!(
            "vhost-user {}: display connection to {} passed to the backend",
            self.path.display(),
            self.display
                .as_deref()
                .map_or_else(|| "?".into(), |p| p.display().to_string())
        );
        Ok(())
    }

    /// The display socket configured for this (GPU) backend.
    pub fn display_path(&self) -> Option<&Path> {
        self.display.as_deref()
    }

    /// The core's duplicate of the live display connection, to watch for a hang-up.
    pub fn display_fd(&self) -> Option<std::os::fd::RawFd> {
        self.display_link.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Forgets the display connection (the display went away, or the backend did: dropping
    /// the duplicate lets the display process see the end of the session).
    pub fn drop_display_link(&mut self) {
        self.display_link = None;
    }

    /// VHOST_USER_GPU_SET_SOCKET (request 33, no payload, the fd as ancillary data). The
    /// `vhost` crate's `Frontend` has no method for it (nor a public way to send a raw
    /// request), so the 12-byte header is written here on the session's socket: request,
    /// flags (protocol version 1, NEED_REPLY with REPLY_ACK), size 0. The backend's ack is
    /// awaited as for every other message, under the same deadline.
    fn send_gpu_socket(&mut self, display: &UnixStream) -> Result<(), VhostUserError> {
        let dup = self
            .socket
            .try_clone()
            .map_err(|e| VhostUserError::GpuSocket {
                path: self.path.clone(),
                what: format!("cannot duplicate the session socket: {e}"),
            })?;
        let ticket = self.deadlines.watchdog.arm(dup, self.deadlines.timeout);
        let result = self.gpu_socket_exchange(display);
        if self.deadlines.watchdog.disarm(ticket) {
            return Err(VhostUserError::Unresponsive {
                path: self.path.clone(),
                step: "GPU_SET_SOCKET",
                timeout: self.deadlines.timeout,
            });
        }
        result
    }

    fn gpu_socket_exchange(&self, display: &UnixStream) -> Result<(), VhostUserError> {
        let fail = |what: String| VhostUserError::GpuSocket {
            path: self.path.clone(),
            what,
        };
        let need_reply = self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
        let flags = if need_reply {
            VERSION_1 | VhostUserHeaderFlag::NEED_REPLY.bits()
        } else {
            VERSION_1
        };
        let mut header = [0u8; 12];
        header[0..4].copy_from_slice(&u32::from(FrontendReq::GPU_SET_SOCKET).to_le_bytes());
        header[4..8].copy_from_slice(&flags.to_le_bytes());
        let bytes = &header[..];
        // SAFETY: the descriptor is the frontend's socket, which `self.frontend` owns and keeps
        // open for longer than this call.
        let socket = unsafe { BorrowedFd::borrow_raw(self.frontend.as_raw_fd()) };
        let sent = isola_ipc::fds::send_with_fds(socket, bytes, &[display.as_fd()])
            .map_err(|e| fail(format!("send: {e}")))?;
        if sent != bytes.len() {
            return Err(fail(format!("short send of {sent} bytes")));
        }
        if !need_reply {
            return Ok(());
        }
        // The reply: a 12-byte header (same request, REPLY flag, size 8) and a u64, 0 = success.
        let mut reply = [0u8; 20];
        let got = recv(self.frontend.as_raw_fd(), &mut reply, MsgFlags::MSG_WAITALL)
            .map_err(|e| fail(format!("no reply: {e}")))?;
        if got != reply.len() {
            return Err(fail(format!("short reply of {got} bytes")));
        }
        let word = |i: usize| u32::from_le_bytes(reply[i..i + 4].try_into().expect("4 bytes"));
        let value = u64::from_le_bytes(reply[12..20].try_into().expect("8 bytes"));
        let is_reply = word(4) & VhostUserHeaderFlag::REPLY.bits() != 0;
        if word(0) != u32::from(FrontendReq::GPU_SET_SOCKET) || !is_reply || word(8) != 8 {
            return Err(fail(format!(
                "malformed reply (request {}, flags {:#x}, size {})",
                word(0),
                word(4),
                word(8)
            )));
        }
        if value != 0 {
            return Err(fail(format!("refused (status {value})")));
        }
        Ok(())
    }

    /// Ends the session (a backend that died or missed a deadline): the socket is shut down
    /// both ways, so a backend that is still alive sees the end, and the display link dropped.
    pub fn disconnect(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        self.display_link = None;
    }

    /// Forgets the in-flight region (the guest reset the device while no backend was there).
    pub fn forget_inflight(&mut self) {
        self.inflight = None;
    }

    /// The session's socket, to watch for the backend going away.
    pub fn socket_fd(&self) -> std::os::fd::RawFd {
        self.frontend.as_raw_fd()
    }

    /// One exchange on the session, under the deadline.
    fn call<T>(
        &mut self,
        step: &'static str,
        f: impl FnOnce(&mut Frontend) -> Result<T, vhost::Error>,
    ) -> Result<T, VhostUserError> {
        let frontend = &mut self.frontend;
        self.deadlines
            .run(&self.path, &self.socket, step, || f(frontend))
    }

    /// Device features the backend offers (the protocol-features bit removed).
    pub fn device_features(&self) -> u64 {
        self.features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads `size` bytes of device configuration space (zeros if the backend has no CONFIG).
    pub fn read_config(&mut self, size: u32) -> Result<Vec<u8>, VhostUserError> {
        if size == 0 || !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Ok(vec![0; size as usize]);
        }
        let buf = vec![0u8; size as usize];
        let (_, payload) = self.call("GET_CONFIG", |f| {
            f.get_config(0, size, VhostUserConfigFlags::WRITABLE, &buf)
        })?;
        Ok(payload)
    }

    pub fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), VhostUserError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Ok(());
        }
        self.call("SET_CONFIG", |f| {
            f.set_config(offset, VhostUserConfigFlags::WRITABLE, data)
        })
    }

    /// Starts the device: features, memory table, in-flight region and every queue. After a
    /// [`Self::reconnect`] the same call restores it: the in-flight region of the first session
    /// is handed back, so the backend can resubmit what its predecessor had not finished.
    pub fn activate(
        &mut self,
        ram: &GuestRam,
        acked: u64,
        queues: &[QueueSetup<'_>],
    ) -> Result<(), VhostUserError> {
        let mut features = acked;
        if !self.protocol.is_empty()
            || self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
        {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.call("SET_FEATURES", |f| f.set_features(features))?;
        let regions: Vec<VhostUserMemoryRegionInfo> = ram
            .memory()
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                mmap_offset: r.file_offset().map_or(0, |f| f.start()),
                mmap_handle: ram.memfd().as_raw_fd(),
            })
            .collect();
        self.call("SET_MEM_TABLE", |f| f.set_mem_table(&regions))?;
        self.setup_inflight()?;
        for q in queues {
            self.start_queue(ram, q)?;
        }
        Ok(())
    }

    fn setup_inflight(&mut self) -> Result<(), VhostUserError> {
        let num_queues = self.num_queues;
        if !self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            return Ok(());
        }
        if self.inflight.is_none() {
            let ask = VhostUserInflight {
                num_queues,
                queue_size: self.queue_size,
                ..Default::default()
            };
            let (info, file) = self.call("GET_INFLIGHT_FD", |f| f.get_inflight_fd(&ask))?;
            self.inflight = Some((info, file));
        }
        let (info, file) = self.inflight.as_ref().expect("set just above");
        let fd = file.as_raw_fd();
        let info = *info;
        self.call("SET_INFLIGHT_FD", |f| f.set_inflight_fd(&info, fd))
    }

    fn start_queue(&mut self, ram: &GuestRam, q: &QueueSetup<'_>) -> Result<(), VhostUserError> {
        let host = |addr: u64| {
            ram.memory()
                .get_host_address(GuestAddress(addr))
                .map(|p| p as u64)
                .map_err(|_| VhostUserError::BadRingAddress(q.index, addr))
        };
        let index = q.index as usize;
        let ring = VringConfigData {
            queue_max_size: self.queue_size,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: host(q.desc)?,
            used_ring_addr: host(q.used)?,
            avail_ring_addr: host(q.avail)?,
            log_addr: None,
        };
        self.call("SET_VRING_NUM", |f| f.set_vring_num(index, q.size))?;
        self.call("SET_VRING_ADDR", |f| f.set_vring_addr(index, &ring))?;
        self.call("SET_VRING_BASE", |f| f.set_vring_base(index, q.base))?;
        self.call("SET_VRING_CALL", |f| f.set_vring_call(index, q.call))?;
        self.call("SET_VRING_KICK", |f| f.set_vring_kick(index, q.kick))?;
        if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            self.call("SET_VRING_ENABLE", |f| f.set_vring_enable(index, true))?;
        }
        Ok(())
    }

    /// Stops every started queue (GET_VRING_BASE), as on a guest device reset.
    pub fn stop(&mut self, queues: &[u16]) -> Result<(), VhostUserError> {
        for &q in queues {
            let index = q as usize;
            if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
                self.call("SET_VRING_ENABLE", |f| f.set_vring_enable(index, false))?;
            }
            self.call("GET_VRING_BASE", |f| f.get_vring_base(index))?;
        }
        // A reset device starts with fresh rings: the old in-flight state no longer applies.
        self.inflight = None;
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::RESET_DEVICE)
        {
            self.call("RESET_DEVICE", |f| f.reset_device())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("isola-vu-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn connect_display_fails_at_once_without_a_listener_and_hands_back_a_blocking_stream() {
        let dir = scratch("display");
        let path = dir.join("display.sock");
        assert!(connect_display(&path).is_err(), "no socket file");
        let listener = UnixListener::bind(&path).expect("bind");
        let stream = connect_display(&path).expect("a listener is there");
        let (mut peer, _) = listener.accept().expect("accept");
        // Blocking again: a read waits (bounded here) instead of failing with WouldBlock.
        stream
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        let mut buf = [0u8; 1];
        let err = (&stream).read(&mut buf).expect_err("nothing sent yet");
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{err}"
        );
        peer.write_all(b"x").expect("write");
        assert_eq!((&stream).read(&mut buf).expect("read"), 1);
        // A stale socket file nobody listens on is refused, not waited for.
        drop(listener);
        drop(peer);
        assert!(connect_display(&path).is_err(), "stale socket file");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
