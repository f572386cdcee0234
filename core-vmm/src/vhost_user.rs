//! The one generic vhost-user frontend of the core.
//!
//! Every device type goes through this same code; what differs per type is a row of
//! [`crate::virtio::DeviceKind`]. The frontend only wires things: it hands the backend the
//! guest-RAM memfd, the ring addresses, an ioeventfd to read kicks from and an irqfd to raise
//! interrupts with. After that, requests and completions flow between the guest and the device
//! process without passing through the core.

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{recv, sendmsg, ControlMessage, MsgFlags};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight,
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

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
/// Longest wait for a restarted backend to answer the first messages of a reconnect.
const RECONNECT_HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("no vhost-user backend listening on {} after {waited:?}", .path.display())]
    ConnectTimeout { path: PathBuf, waited: Duration },
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
        // One plain connect: `Frontend::connect` would retry for half a second on its own.
        let stream = std::os::unix::net::UnixStream::connect(&self.path).map_err(|_| {
            VhostUserError::ConnectTimeout {
                path: self.path.clone(),
                waited: Duration::ZERO,
            }
        })?;
        let session = handshake(
            &self.path,
            stream,
            self.num_queues,
            RECONNECT_HANDSHAKE_TIMEOUT,
        )?;
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
            frontend: session.frontend,
            features: self.features,
            protocol: self.protocol,
            num_queues: self.num_queues,
            queue_size: self.queue_size,
            inflight: None,
        };
        if let Some(display) = &self.display {
            // A fresh connection for the new backend. If the display process is not there,
            // the GPU carries on without one rather than stalling the guest's device.
            if let Err(e) = new.attach_display(display, Duration::ZERO) {
                match e {
                    VhostUserError::DisplayTimeout { .. } => log::warn!(
                        "vhost-user {}: {}; the restarted GPU has no display",
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
    /// The display socket passed to this (GPU) backend, passed again on every reconnect.
    display: Option<PathBuf>,
    frontend: Frontend,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    num_queues: u16,
    queue_size: u16,
    /// The in-flight region the backend gave us; kept so a reconnect can hand it back.
    inflight: Option<(VhostUserInflight, File)>,
}

/// A fresh session on the socket, negotiated but not yet configured.
struct Session {
    frontend: Frontend,
    features: u64,
    protocol: VhostUserProtocolFeatures,
}

/// [`negotiate`] on a connected stream, waiting at most `timeout` for each answer.
///
/// The socket may be one a supervisor keeps listening while no backend runs: the connection
/// then waits in the listen backlog, and without a bound the handshake would block the
/// calling thread for as long as the backend stays away. After the handshake, messages wait
/// as long as the backend needs (draining in-flight I/O may take a while).
fn handshake(
    path: &Path,
    stream: std::os::unix::net::UnixStream,
    num_queues: u16,
    timeout: Duration,
) -> Result<Session, VhostUserError> {
    let options = stream.try_clone().ok();
    if let Some(s) = &options {
        let _ = s.set_read_timeout(Some(timeout.max(Duration::from_millis(1))));
    }
    let frontend = Frontend::from_stream(stream, u64::from(num_queues));
    let session = negotiate(path, frontend, num_queues)?;
    if let Some(s) = &options {
        let _ = s.set_read_timeout(None);
    }
    Ok(session)
}

/// SET_OWNER and feature/protocol negotiation on a freshly connected frontend.
fn negotiate(
    path: &Path,
    mut frontend: Frontend,
    num_queues: u16,
) -> Result<Session, VhostUserError> {
    let err = |what| {
        move |e| VhostUserError::Protocol {
            path: path.to_owned(),
            step: what,
            source: e,
        }
    };
    frontend.set_owner().map_err(err("SET_OWNER"))?;
    let features = frontend.get_features().map_err(err("GET_FEATURES"))?;
    if features & (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1) == 0 {
        return Err(VhostUserError::NotModern(path.to_owned()));
    }
    let mut protocol = VhostUserProtocolFeatures::empty();
    if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
        let offered = frontend
            .get_protocol_features()
            .map_err(err("GET_PROTOCOL_FEATURES"))?;
        protocol = offered & wanted_protocol_features();
        frontend
            .set_protocol_features(protocol)
            .map_err(err("SET_PROTOCOL_FEATURES"))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Without NEED_REPLY a backend error would pass silently.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
    }
    if protocol.contains(VhostUserProtocolFeatures::MQ) {
        let have = frontend.get_queue_num().map_err(err("GET_QUEUE_NUM"))?;
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
        features,
        protocol,
    })
}

impl VhostUserConnection {
    /// Connects to `path`, waiting up to `timeout` for the backend to appear, and negotiates
    /// the protocol. `num_queues` is what the device will expose.
    pub fn connect(
        path: &Path,
        num_queues: u16,
        queue_size: u16,
        timeout: Duration,
    ) -> Result<Self, VhostUserError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => std::thread::sleep(CONNECT_RETRY),
                Err(_) => {
                    return Err(VhostUserError::ConnectTimeout {
                        path: path.to_owned(),
                        waited: timeout,
                    })
                }
            }
        };
        let Session {
            frontend,
            features,
            protocol,
        } = handshake(
            path,
            stream,
            num_queues,
            deadline.saturating_duration_since(Instant::now()),
        )?;
        log::info!(
            "vhost-user {}: features {features:#x}, protocol {:#x}",
            path.display(),
            protocol.bits()
        );
        Ok(VhostUserConnection {
            path: path.to_owned(),
            display: None,
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
    /// and hands that connection to the backend with VHOST_USER_GPU_SET_SOCKET. The core keeps
    /// no copy of it: scanouts and pixels go from the GPU process straight to the display.
    pub fn attach_display(&mut self, display: &Path, wait: Duration) -> Result<(), VhostUserError> {
        let deadline = Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(display) {
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
        self.send_gpu_socket(&stream)?;
        self.display = Some(display.to_owned());
        log::info!(
            "vhost-user {}: display connection to {} passed to the backend",
            self.path.display(),
            display.display()
        );
        Ok(())
    }

    /// VHOST_USER_GPU_SET_SOCKET (request 33, no payload, the fd as ancillary data). The
    /// `vhost` crate's `Frontend` has no method for it (nor a public way to send a raw
    /// request), so the 12-byte header is written here on the session's socket: request,
    /// flags (protocol version 1, NEED_REPLY with REPLY_ACK), size 0. The backend's ack is
    /// awaited as for every other message.
    fn send_gpu_socket(&mut self, display: &UnixStream) -> Result<(), VhostUserError> {
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
        let fds = [display.as_raw_fd()];
        let sent = sendmsg::<()>(
            self.frontend.as_raw_fd(),
            &[IoSlice::new(bytes)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
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

    /// The session's socket, to watch for the backend going away.
    pub fn socket_fd(&self) -> std::os::fd::RawFd {
        self.frontend.as_raw_fd()
    }

    fn err(&self, what: &'static str) -> impl Fn(vhost::Error) -> VhostUserError + '_ {
        move |e| VhostUserError::Protocol {
            path: self.path.clone(),
            step: what,
            source: e,
        }
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
        let (_, payload) = self
            .frontend
            .get_config(0, size, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(|e| VhostUserError::Protocol {
                path: self.path.clone(),
                step: "GET_CONFIG",
                source: e,
            })?;
        Ok(payload)
    }

    pub fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), VhostUserError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Ok(());
        }
        self.frontend
            .set_config(offset, VhostUserConfigFlags::WRITABLE, data)
            .map_err(|e| VhostUserError::Protocol {
                path: self.path.clone(),
                step: "SET_CONFIG",
                source: e,
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
        self.frontend
            .set_features(features)
            .map_err(self.err("SET_FEATURES"))?;
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
        self.frontend
            .set_mem_table(&regions)
            .map_err(self.err("SET_MEM_TABLE"))?;
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
            let (info, file) = self
                .frontend
                .get_inflight_fd(&ask)
                .map_err(self.err("GET_INFLIGHT_FD"))?;
            self.inflight = Some((info, file));
        }
        let (info, file) = self.inflight.as_ref().expect("set just above");
        let fd = file.as_raw_fd();
        let info = *info;
        self.frontend
            .set_inflight_fd(&info, fd)
            .map_err(self.err("SET_INFLIGHT_FD"))
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
        self.frontend
            .set_vring_num(index, q.size)
            .map_err(self.err("SET_VRING_NUM"))?;
        self.frontend
            .set_vring_addr(index, &ring)
            .map_err(self.err("SET_VRING_ADDR"))?;
        self.frontend
            .set_vring_base(index, q.base)
            .map_err(self.err("SET_VRING_BASE"))?;
        self.frontend
            .set_vring_call(index, q.call)
            .map_err(self.err("SET_VRING_CALL"))?;
        self.frontend
            .set_vring_kick(index, q.kick)
            .map_err(self.err("SET_VRING_KICK"))?;
        if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            self.frontend
                .set_vring_enable(index, true)
                .map_err(self.err("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Stops every started queue (GET_VRING_BASE), as on a guest device reset.
    pub fn stop(&mut self, queues: &[u16]) -> Result<(), VhostUserError> {
        for &q in queues {
            let index = q as usize;
            if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
                self.frontend
                    .set_vring_enable(index, false)
                    .map_err(self.err("SET_VRING_ENABLE"))?;
            }
            self.frontend
                .get_vring_base(index)
                .map_err(self.err("GET_VRING_BASE"))?;
        }
        // A reset device starts with fresh rings: the old in-flight state no longer applies.
        self.inflight = None;
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::RESET_DEVICE)
        {
            self.frontend
                .reset_device()
                .map_err(self.err("RESET_DEVICE"))?;
        }
        Ok(())
    }
}
