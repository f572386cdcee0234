//! Messages between Isola's processes.
//!
//! Every message is a closed `serde` enum, encoded with postcard (a compact, maintained serde
//! format: varint integers and enum indices, length-prefixed strings and sequences) and
//! framed as:
//!
//! ```text
//! u32 LE  length of what follows (version + body), at most MAX_FRAME
//! u16 LE  PROTOCOL_VERSION of the sender
//! [u8]    postcard body, exactly one message (trailing bytes are refused)
//! ```
//!
//! The version is read before the body, so a peer speaking another version gets a clear
//! [`IpcError::Version`] instead of a garbled decode. Frames larger than [`MAX_FRAME`] are
//! refused before anything is allocated, so a hostile peer cannot make the reader allocate
//! unbounded memory: the body is decoded from that bounded buffer, and every length in it is
//! checked against the bytes that are left.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Version of every message in this crate; bump it on any change of a message's shape or of
/// the encoding (7: postcard replaced bincode; 8: the power button and graceful shutdown;
/// 9: `ControlRequest::Handover`, `DeviceStatus::last_outage_us`).
pub const PROTOCOL_VERSION: u16 = 9;

/// Largest frame (version + body) a reader accepts: room for a PNG screenshot of a large
/// display, small enough that a hostile peer cannot make the reader allocate much.
pub const MAX_FRAME: u32 = 16 << 20;

pub mod display;
pub mod fds;
pub mod input;
pub mod keys;
pub mod listen;
pub mod log_filter;
pub mod supervisor;

/// Errors of the framing layer.
#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    #[error("connection closed by the peer")]
    Closed,
    #[error("socket I/O failed")]
    Io(#[from] io::Error),
    #[error("peer speaks protocol version {peer}, this side speaks {PROTOCOL_VERSION}")]
    Version { peer: u16 },
    #[error("frame of {0} bytes is outside 2..={MAX_FRAME}")]
    FrameSize(u32),
    #[error("malformed message body")]
    Decode(#[source] postcard::Error),
    #[error("malformed message body: {0} trailing bytes after the message")]
    Trailing(usize),
    #[error("message could not be encoded")]
    Encode(#[source] postcard::Error),
}

/// A request to the core's control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Report vCPU states and uptime.
    Status,
    /// Stop every vCPU at its next exit; the guest's clock keeps running.
    Pause,
    /// Let paused vCPUs run again.
    Resume,
    /// End the VM now (a hard stop: the guest is not asked).
    Shutdown,
    /// Debugging aid: deliver one MSI (KVM_SIGNAL_MSI) with this address and data.
    InjectMsi { address: u64, data: u32 },
    /// Press the guest's ACPI power button (answered `Done` at once). Added in version 8.
    PowerButton,
    /// Press the power button and give the guest `timeout_ms` (at most
    /// [`MAX_GRACE_MS`]) to end itself; then end the VM as `Shutdown` does. Answered with
    /// [`ControlResponse::ShutDown`] when the VM ends, however it ends. Added in version 8.
    GracefulShutdown { timeout_ms: u64 },
    /// The backend on `socket` is about to be replaced on purpose (`isolactl restart` or
    /// `upgrade`): its next hang-up, within [`HANDOVER_WINDOW_MS`], is reconnected at once
    /// even if it comes right after the last reconnect (no flap back-off). Added in
    /// version 9.
    Handover { socket: String },
}

/// How long a [`ControlRequest::Handover`] announcement holds.
pub const HANDOVER_WINDOW_MS: u64 = 10_000;

/// The longest grace period a graceful shutdown may ask for (one hour).
pub const MAX_GRACE_MS: u64 = 3_600_000;

/// How a VM that was asked to shut down ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownReport {
    /// True when the guest ended itself (powered off or reset) after the power button; false
    /// when the core stopped it (the grace period ran out, or a hard shutdown came), or it
    /// ended otherwise (`detail` says how).
    pub graceful: bool,
    /// What happened, e.g. `the guest powered off 1.204 s after the power button`.
    pub detail: String,
}

/// The core's answer to one [`ControlRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlResponse {
    Status(VmStatus),
    /// The request was carried out.
    Done,
    /// The request was refused; the text says why.
    Error(String),
    /// The answer to [`ControlRequest::GracefulShutdown`]: the VM has ended.
    ShutDown(ShutdownReport),
}

/// What `isolactl status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub uptime_ms: u64,
    pub vcpus: Vec<VcpuStatus>,
    pub devices: Vec<DeviceStatus>,
}

/// One vhost-user device as the core sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// Device type and PCI slot, e.g. `blk` at `00:01.0`.
    pub name: String,
    pub slot: String,
    pub socket: String,
    pub link: DeviceLink,
    /// Times the core reconnected to a restarted backend.
    pub reconnects: u32,
    /// How long the backend was away the last time the core reconnected: microseconds from
    /// the hang-up to the new backend's queues restored (the guest's requests wait that
    /// long at most, plus their own service time). Added in protocol version 9.
    pub last_outage_us: Option<u64>,
    /// A GPU's link to its display process (`display=` of `--device gpu`), if it has one.
    /// Added in protocol version 4.
    pub display: Option<DisplayLinkStatus>,
}

/// The display connection the core passed to a GPU backend (VHOST_USER_GPU_SET_SOCKET).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisplayLinkStatus {
    /// The display process's socket.
    pub socket: String,
    /// `Connected`: the GPU backend holds a live connection; `Reconnecting`: the display
    /// process (or the GPU backend) is away and the core is connecting again; `Refused`: the
    /// GPU backend did not take the new connection (retried).
    pub link: DeviceLink,
    /// Times the core passed a new connection because the display process went away. One
    /// restart usually counts once; twice when the first attempt reached the dying process
    /// in the instant before its listening socket closed (that connection hung up at once).
    pub reattaches: u32,
}

/// The core's connection to a device process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceLink {
    Connected,
    Reconnecting,
    /// The backend missed an exchange deadline and was disconnected (the text says which
    /// exchange); the core reconnects as for a backend that went away. Added in protocol
    /// version 5.
    Unresponsive(String),
    /// A backend came back but was refused; the text says why.
    Refused(String),
}

impl std::fmt::Display for DeviceLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceLink::Connected => f.write_str("connected"),
            DeviceLink::Reconnecting => f.write_str("reconnecting"),
            DeviceLink::Unresponsive(why) => write!(f, "unresponsive ({why})"),
            DeviceLink::Refused(why) => write!(f, "refused ({why})"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuStatus {
    pub index: u32,
    pub state: VcpuState,
}

/// Life cycle of one vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VcpuState {
    Running,
    Paused,
    Exited,
}

impl std::fmt::Display for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VcpuState::Running => "running",
            VcpuState::Paused => "paused",
            VcpuState::Exited => "exited",
        })
    }
}

/// Writes one framed message.
pub fn write_message<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), IpcError> {
    w.write_all(&frame(msg)?)?;
    w.flush()?;
    Ok(())
}

/// One message, framed.
fn frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, IpcError> {
    let body = postcard::to_allocvec(msg).map_err(IpcError::Encode)?;
    let len = u32::try_from(body.len() + 2)
        .ok()
        .filter(|len| *len <= MAX_FRAME)
        .ok_or(IpcError::FrameSize(u32::MAX))?;
    let mut frame = Vec::with_capacity(body.len() + 6);
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Reads one framed message. A clean end of stream before the first byte is [`IpcError::Closed`].
pub fn read_message<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, IpcError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(IpcError::Closed),
        other => other?,
    }
    let len = u32::from_le_bytes(len);
    if !(2..=MAX_FRAME).contains(&len) {
        return Err(IpcError::FrameSize(len));
    }
    let mut version = [0u8; 2];
    r.read_exact(&mut version)?;
    read_body(r, len, version)
}

/// The rest of a frame of `len` (already checked against the bound) from `version` on.
fn read_body<R: Read, T: DeserializeOwned>(
    r: &mut R,
    len: u32,
    version: [u8; 2],
) -> Result<T, IpcError> {
    let peer = u16::from_le_bytes(version);
    // The version is checked before the body is read, but the body is still consumed so the
    // stream stays in step if the caller wants to answer with an error.
    let mut body = vec![0u8; len as usize - 2];
    r.read_exact(&mut body)?;
    if peer != PROTOCOL_VERSION {
        return Err(IpcError::Version { peer });
    }
    let (msg, rest) = postcard::take_from_bytes(&body).map_err(IpcError::Decode)?;
    if !rest.is_empty() {
        return Err(IpcError::Trailing(rest.len()));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn roundtrip<T: Serialize + DeserializeOwned>(msg: &T) -> T {
        let mut buf = Vec::new();
        write_message(&mut buf, msg).unwrap();
        read_message(&mut Cursor::new(buf)).unwrap()
    }

    #[test]
    fn requests_and_responses_roundtrip() {
        for req in [
            ControlRequest::Status,
            ControlRequest::Pause,
            ControlRequest::Resume,
            ControlRequest::Shutdown,
            ControlRequest::InjectMsi {
                address: 0xfee0_0000,
                data: 0x41,
            },
            ControlRequest::PowerButton,
            ControlRequest::GracefulShutdown { timeout_ms: 30_000 },
        ] {
            assert_eq!(roundtrip(&req), req);
        }
        let status = ControlResponse::Status(VmStatus {
            uptime_ms: 12,
            vcpus: vec![VcpuStatus {
                index: 1,
                state: VcpuState::Paused,
            }],
            devices: vec![DeviceStatus {
                name: "blk".into(),
                slot: "00:01.0".into(),
                socket: "/run/blk.sock".into(),
                link: DeviceLink::Refused("disk size differs".into()),
                reconnects: 2,
                last_outage_us: None,
                display: Some(DisplayLinkStatus {
                    socket: "/run/display.sock".into(),
                    link: DeviceLink::Reconnecting,
                    reattaches: 3,
                }),
            }],
        });
        assert_eq!(roundtrip(&status), status);
    }

    #[test]
    fn other_version_is_refused() {
        let mut buf = Vec::new();
        write_message(&mut buf, &ControlRequest::Status).unwrap();
        let other = PROTOCOL_VERSION + 1;
        buf[4..6].copy_from_slice(&other.to_le_bytes());
        let err = read_message::<_, ControlRequest>(&mut Cursor::new(buf)).unwrap_err();
        assert!(
            matches!(err, IpcError::Version { peer } if peer == other),
            "{err}"
        );
    }

    #[test]
    fn oversized_and_undersized_frames_are_refused() {
        let huge = (MAX_FRAME + 1).to_le_bytes().to_vec();
        let err = read_message::<_, ControlRequest>(&mut Cursor::new(huge)).unwrap_err();
        assert!(matches!(err, IpcError::FrameSize(_)));
        let tiny = 1u32.to_le_bytes().to_vec();
        let err = read_message::<_, ControlRequest>(&mut Cursor::new(tiny)).unwrap_err();
        assert!(matches!(err, IpcError::FrameSize(1)));
    }

    #[test]
    fn garbage_body_and_unknown_variant_are_decode_errors() {
        let mut buf = 6u32.to_le_bytes().to_vec();
        buf.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        buf.extend_from_slice(&[0xff, 0xff, 0xff, 0x7f]); // variant index far past the enum
        let err = read_message::<_, ControlRequest>(&mut Cursor::new(buf)).unwrap_err();
        assert!(matches!(err, IpcError::Decode(_)), "{err}");
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut buf = Vec::new();
        write_message(&mut buf, &ControlRequest::Status).unwrap();
        buf.push(0);
        let len = u32::from_le_bytes(buf[..4].try_into().unwrap()) + 1;
        buf[..4].copy_from_slice(&len.to_le_bytes());
        let err = read_message::<_, ControlRequest>(&mut Cursor::new(buf)).unwrap_err();
        assert!(matches!(err, IpcError::Trailing(1)), "{err}");
    }

    #[test]
    fn truncated_bodies_and_lying_lengths_are_decode_errors() {
        // A status whose device list claims far more entries than the body holds, and every
        // cut of a whole status: errors, never a panic or a huge allocation.
        let mut body = vec![0u8]; // ControlResponse::Status
        body.push(12); // uptime_ms
        body.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]); // vcpus: u32::MAX entries
        let mut buf = (body.len() as u32 + 2).to_le_bytes().to_vec();
        buf.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        buf.extend_from_slice(&body);
        let err = read_message::<_, ControlResponse>(&mut Cursor::new(buf)).unwrap_err();
        assert!(matches!(err, IpcError::Decode(_)), "{err}");

        let mut whole = Vec::new();
        let status = ControlResponse::Status(VmStatus {
            uptime_ms: 1 << 40,
            vcpus: vec![VcpuStatus {
                index: 3,
                state: VcpuState::Running,
            }],
            devices: vec![DeviceStatus {
                name: "net".into(),
                slot: "00:02.0".into(),
                socket: "/run/net.sock".into(),
                link: DeviceLink::Unresponsive("GET_VRING_BASE".into()),
                reconnects: 7,
                last_outage_us: None,
                display: None,
            }],
        });
        write_message(&mut whole, &status).unwrap();
        for cut in 7..whole.len() {
            let mut frame = whole[..cut].to_vec();
            frame[..4].copy_from_slice(&(cut as u32 - 4).to_le_bytes());
            let err = read_message::<_, ControlResponse>(&mut Cursor::new(frame)).unwrap_err();
            assert!(matches!(err, IpcError::Decode(_)), "cut at {cut}: {err}");
        }
    }

    #[test]
    fn the_encoding_is_postcard() {
        // InjectMsi is variant 4; varint address and data.
        let mut buf = Vec::new();
        let msi = ControlRequest::InjectMsi {
            address: 0xfee0_0000,
            data: 0x41,
        };
        write_message(&mut buf, &msi).unwrap();
        assert_eq!(&buf[6..], &[4, 0x80, 0x80, 0x80, 0xf7, 0x0f, 0x41]);
        assert_eq!(u32::from_le_bytes(buf[..4].try_into().unwrap()), 9);
    }

    #[test]
    fn empty_stream_is_closed() {
        let err = read_message::<_, ControlRequest>(&mut Cursor::new(Vec::new())).unwrap_err();
        assert!(matches!(err, IpcError::Closed));
    }
}
