//! The vfio-user wire format (the protocol QEMU, libvfio-user and the `vfio_user` crate speak):
//! a 16-byte header, then a command-specific body, all little-endian, with file descriptors
//! passed alongside (SCM_RIGHTS).
//!
//! This module only encodes requests and checks replies; it does no I/O, so every rule a
//! reply must follow is unit-tested here. A reply is accepted only if it answers the request
//! we sent (same message id and command, the reply type bit), has a size within
//! [`MAX_REPLY`] and a body at least as long as the command needs.

/// Bytes of the header every message starts with.
pub const HEADER_SIZE: usize = 16;
/// The largest reply the core accepts (header included). The biggest legitimate reply it asks
/// for is a region's I/O fd list of [`MAX_IO_FDS`] entries; a register read is 8 bytes.
pub const MAX_REPLY: u32 = 64 * 1024;
/// I/O fds (ioeventfds) the core takes per region.
pub const MAX_IO_FDS: u32 = 16;
/// The protocol version the core speaks (the only one published).
pub const VERSION_MAJOR: u16 = 0;
pub const VERSION_MINOR: u16 = 1;
/// What the core announces: it sends at most this many fds in one message.
pub const CLIENT_MAX_MSG_FDS: u32 = 16;

/// Command numbers.
pub mod command {
    pub const VERSION: u16 = 1;
    pub const DMA_MAP: u16 = 2;
    pub const DEVICE_GET_INFO: u16 = 4;
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    pub const GET_REGION_IO_FDS: u16 = 6;
    pub const GET_IRQ_INFO: u16 = 7;
    pub const SET_IRQS: u16 = 8;
    pub const REGION_READ: u16 = 9;
    pub const REGION_WRITE: u16 = 10;
    pub const DEVICE_RESET: u16 = 13;

    /// The command's name, for messages.
    pub fn name(command: u16) -> &'static str {
        match command {
            VERSION => "VERSION",
            DMA_MAP => "DMA_MAP",
            DEVICE_GET_INFO => "DEVICE_GET_INFO",
            DEVICE_GET_REGION_INFO => "DEVICE_GET_REGION_INFO",
            GET_REGION_IO_FDS => "GET_REGION_IO_FDS",
            GET_IRQ_INFO => "GET_IRQ_INFO",
            SET_IRQS => "SET_IRQS",
            REGION_READ => "REGION_READ",
            REGION_WRITE => "REGION_WRITE",
            DEVICE_RESET => "DEVICE_RESET",
            _ => "unknown command",
        }
    }
}

const TYPE_MASK: u32 = 0xf;
const TYPE_COMMAND: u32 = 0;
const TYPE_REPLY: u32 = 1;
const FLAG_ERROR: u32 = 1 << 5;

/// VFIO constants the protocol reuses (linux/vfio.h).
pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;
pub const REGION_FLAG_READ: u32 = 1 << 0;
pub const REGION_FLAG_WRITE: u32 = 1 << 1;
pub const PCI_CONFIG_REGION: u32 = 7;
pub const PCI_NUM_REGIONS: u32 = 9;
pub const PCI_MSIX_IRQ: u32 = 2;
pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
pub const DMA_READ_WRITE: u32 = 0b11;
/// `vfio_user_sub_region_ioeventfd.type` for an eventfd.
const IO_FD_TYPE_EVENTFD: u32 = 0;
/// `flags` bit of an I/O fd entry: compare the written value with `datamatch`.
const IO_FD_DATAMATCH: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub command: u16,
    pub size: u32,
    pub flags: u32,
    pub error: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("reply of {0} bytes is outside the {HEADER_SIZE}..={MAX_REPLY} bytes accepted")]
    Size(u32),
    #[error("message {got} is not the reply to request {want}")]
    WrongId { want: u16, got: u16 },
    #[error("reply is for command {got}, not {}", command::name(*.want))]
    WrongCommand { want: u16, got: u16 },
    #[error("message of type {0} where a reply was due")]
    NotAReply(u32),
    #[error("the server refused it (errno {0})")]
    Refused(u32),
    #[error("reply body of {got} bytes is shorter than the {want} the command needs")]
    Short { got: usize, want: usize },
    #[error("{0}")]
    Bad(String),
}

impl Header {
    pub fn request(id: u16, command: u16, body_len: usize) -> Result<Header, WireError> {
        let size = u32::try_from(HEADER_SIZE + body_len).map_err(|_| WireError::Size(u32::MAX))?;
        Ok(Header {
            id,
            command,
            size,
            flags: TYPE_COMMAND,
            error: 0,
        })
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        out[0..2].copy_from_slice(&self.id.to_le_bytes());
        out[2..4].copy_from_slice(&self.command.to_le_bytes());
        out[4..8].copy_from_slice(&self.size.to_le_bytes());
        out[8..12].copy_from_slice(&self.flags.to_le_bytes());
        out[12..16].copy_from_slice(&self.error.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; HEADER_SIZE]) -> Header {
        let mut r = Reader(bytes);
        Header {
            id: r.u16(),
            command: r.u16(),
            size: r.u32(),
            flags: r.u32(),
            error: r.u32(),
        }
    }

    /// Checks that `self` is a well-formed reply to `request`; returns the body length.
    pub fn check_reply(&self, request: &Header) -> Result<usize, WireError> {
        if !(HEADER_SIZE as u32..=MAX_REPLY).contains(&self.size) {
            return Err(WireError::Size(self.size));
        }
        if self.flags & TYPE_MASK != TYPE_REPLY {
            return Err(WireError::NotAReply(self.flags & TYPE_MASK));
        }
        if self.id != request.id {
            return Err(WireError::WrongId {
                want: request.id,
                got: self.id,
            });
        }
        if self.command != request.command {
            return Err(WireError::WrongCommand {
                want: request.command,
                got: self.command,
            });
        }
        Ok(self.size as usize - HEADER_SIZE)
    }

    /// The server's error, for a reply with the error bit (after [`Self::check_reply`]).
    pub fn refusal(&self) -> Option<WireError> {
        (self.flags & FLAG_ERROR != 0).then_some(WireError::Refused(self.error))
    }
}

/// Little-endian reads from a body whose length was checked first.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

fn need(body: &[u8], want: usize) -> Result<(), WireError> {
    if body.len() < want {
        return Err(WireError::Short {
            got: body.len(),
            want,
        });
    }
    Ok(())
}

fn words(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// VERSION request body: major, minor, the capabilities as a NUL-terminated JSON string.
pub fn version_body() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&VERSION_MAJOR.to_le_bytes());
    body.extend_from_slice(&VERSION_MINOR.to_le_bytes());
    let caps = format!(
        "{{\"capabilities\":{{\"max_msg_fds\":{CLIENT_MAX_MSG_FDS},\"max_data_xfer_size\":{}}}}}",
        MAX_REPLY
    );
    body.extend_from_slice(caps.as_bytes());
    body.push(0);
    body
}

/// What the server said in its VERSION reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerVersion {
    pub major: u16,
    pub minor: u16,
    /// Fds the server takes in one message (at least 1).
    pub max_msg_fds: u32,
}

#[derive(serde::Deserialize)]
struct CapsJson {
    #[serde(default)]
    capabilities: Option<Caps>,
}

#[derive(serde::Deserialize)]
struct Caps {
    #[serde(default = "one")]
    max_msg_fds: u32,
}

fn one() -> u32 {
    1
}

pub fn parse_version(body: &[u8]) -> Result<ServerVersion, WireError> {
    need(body, 4)?;
    let mut r = Reader(body);
    let (major, minor) = (r.u16(), r.u16());
    if major != VERSION_MAJOR {
        return Err(WireError::Bad(format!(
            "server speaks protocol {major}.{minor}, the core {VERSION_MAJOR}.{VERSION_MINOR}"
        )));
    }
    let json = &body[4..];
    let max_msg_fds = if json.is_empty() {
        1
    } else {
        let text = match json.split_last() {
            Some((0, text)) => text,
            _ => return Err(WireError::Bad("capabilities are not NUL-terminated".into())),
        };
        let caps: CapsJson = serde_json::from_slice(text)
            .map_err(|e| WireError::Bad(format!("capabilities are not valid JSON: {e}")))?;
        caps.capabilities.map_or(1, |c| c.max_msg_fds).max(1)
    };
    Ok(ServerVersion {
        major,
        minor,
        max_msg_fds,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

pub fn device_info_body() -> Vec<u8> {
    words(&[16, 0, 0, 0])
}

pub fn parse_device_info(body: &[u8]) -> Result<DeviceInfo, WireError> {
    need(body, 16)?;
    let mut r = Reader(body);
    let (_argsz, flags, num_regions, num_irqs) = (r.u32(), r.u32(), r.u32(), r.u32());
    if flags & DEVICE_FLAGS_PCI == 0 {
        return Err(WireError::Bad("not a PCI device".into()));
    }
    if !(PCI_NUM_REGIONS - 1..=64).contains(&num_regions) || num_irqs > 16 {
        return Err(WireError::Bad(format!(
            "implausible device: {num_regions} regions, {num_irqs} interrupt types"
        )));
    }
    Ok(DeviceInfo {
        flags,
        num_regions,
        num_irqs,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    pub flags: u32,
    pub size: u64,
}

/// `struct vfio_region_info` without capabilities: argsz, flags, index, cap_offset, size,
/// offset.
pub fn region_info_body(index: u32) -> Vec<u8> {
    let mut body = words(&[32, 0, index, 0]);
    body.extend_from_slice(&[0; 16]);
    body
}

pub fn parse_region_info(body: &[u8], index: u32) -> Result<RegionInfo, WireError> {
    need(body, 32)?;
    let mut r = Reader(body);
    let (_argsz, flags, got, _cap) = (r.u32(), r.u32(), r.u32(), r.u32());
    let size = r.u64();
    if got != index {
        return Err(WireError::Bad(format!(
            "asked for region {index}, got {got}"
        )));
    }
    Ok(RegionInfo { flags, size })
}

/// One ioeventfd the server offers for a region: a write of `size` bytes at `offset`
/// (matching `datamatch`, if set) signals `fd_index` of the fds that came with the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoFd {
    pub offset: u64,
    pub size: u64,
    pub fd_index: u32,
    pub datamatch: Option<u64>,
}

const IO_FD_ENTRY: usize = 40;

pub fn region_io_fds_body(index: u32) -> Vec<u8> {
    let argsz = 16 + MAX_IO_FDS * IO_FD_ENTRY as u32;
    words(&[argsz, 0, index, 0])
}

/// Parses a GET_REGION_IO_FDS reply; `fds` is how many fds came with it. Entries that are not
/// eventfds, or whose fd index is out of range, are refused as a whole.
pub fn parse_region_io_fds(body: &[u8], index: u32, fds: usize) -> Result<Vec<IoFd>, WireError> {
    need(body, 16)?;
    let mut r = Reader(body);
    let (_argsz, _flags, got, count) = (r.u32(), r.u32(), r.u32(), r.u32());
    if got != index {
        return Err(WireError::Bad(format!(
            "asked for the I/O fds of region {index}, got {got}"
        )));
    }
    if count > MAX_IO_FDS {
        return Err(WireError::Bad(format!(
            "{count} I/O fds offered, at most {MAX_IO_FDS} taken"
        )));
    }
    let want = 16 + count as usize * IO_FD_ENTRY;
    need(body, want)?;
    let mut out = Vec::new();
    for _ in 0..count {
        let (offset, size) = (r.u64(), r.u64());
        let (fd_index, kind, flags, _pad) = (r.u32(), r.u32(), r.u32(), r.u32());
        let datamatch = r.u64();
        if kind != IO_FD_TYPE_EVENTFD {
            return Err(WireError::Bad(format!(
                "I/O fd of type {kind}, not an eventfd"
            )));
        }
        if fd_index as usize >= fds {
            return Err(WireError::Bad(format!(
                "I/O fd index {fd_index} but {fds} fds came with the reply"
            )));
        }
        if !matches!(size, 1 | 2 | 4 | 8) {
            return Err(WireError::Bad(format!("I/O fd of {size} bytes")));
        }
        out.push(IoFd {
            offset,
            size,
            fd_index,
            datamatch: (flags & IO_FD_DATAMATCH != 0).then_some(datamatch),
        });
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    pub flags: u32,
    pub count: u32,
}

pub fn irq_info_body(index: u32) -> Vec<u8> {
    words(&[16, 0, index, 0])
}

pub fn parse_irq_info(body: &[u8], index: u32) -> Result<IrqInfo, WireError> {
    need(body, 16)?;
    let mut r = Reader(body);
    let (_argsz, flags, got, count) = (r.u32(), r.u32(), r.u32(), r.u32());
    if got != index {
        return Err(WireError::Bad(format!(
            "asked for interrupt type {index}, got {got}"
        )));
    }
    Ok(IrqInfo { flags, count })
}

/// SET_IRQS: `count` eventfds (passed with the message) trigger vectors `start..`.
pub fn set_irqs_body(index: u32, start: u32, count: u32) -> Vec<u8> {
    words(&[
        20,
        IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
        index,
        start,
        count,
    ])
}

/// DMA_MAP: `size` bytes of the passed fd from `offset` appear at bus address `address`.
pub fn dma_map_body(offset: u64, address: u64, size: u64) -> Vec<u8> {
    let mut body = words(&[32, DMA_READ_WRITE]);
    for v in [offset, address, size] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    body
}

/// REGION_READ / REGION_WRITE: offset, region, count, then (writes) the data.
pub fn region_access_body(region: u32, offset: u64, count: usize, data: &[u8]) -> Vec<u8> {
    let mut body = offset.to_le_bytes().to_vec();
    body.extend_from_slice(&region.to_le_bytes());
    body.extend_from_slice(&(count as u32).to_le_bytes());
    body.extend_from_slice(data);
    body
}

/// Checks a REGION_READ/WRITE reply echoes the access; returns the data (reads).
pub fn parse_region_access(
    body: &[u8],
    region: u32,
    offset: u64,
    count: usize,
    read: bool,
) -> Result<&[u8], WireError> {
    need(body, 16)?;
    let mut r = Reader(body);
    let (got_offset, got_region, got_count) = (r.u64(), r.u32(), r.u32());
    if (got_offset, got_region, got_count as usize) != (offset, region, count) {
        return Err(WireError::Bad(format!(
            "reply for {got_count} bytes at {got_offset:#x} of region {got_region}, \
             not {count} at {offset:#x} of region {region}"
        )));
    }
    let data = &body[16..];
    let want = if read { count } else { 0 };
    if data.len() != want {
        return Err(WireError::Bad(format!(
            "reply carries {} bytes of data, not {want}",
            data.len()
        )));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply_to(request: &Header, size: u32) -> Header {
        Header {
            id: request.id,
            command: request.command,
            size,
            flags: TYPE_REPLY,
            error: 0,
        }
    }

    #[test]
    fn a_header_round_trips() {
        let h = Header::request(7, command::REGION_READ, 16).unwrap();
        assert_eq!(Header::decode(&h.encode()), h);
        assert_eq!(h.size, 32);
    }

    #[test]
    fn replies_must_answer_the_request() {
        let req = Header::request(9, command::REGION_READ, 16).unwrap();
        assert_eq!(reply_to(&req, 36).check_reply(&req), Ok(20));
        let mut r = reply_to(&req, 36);
        r.id = 8;
        assert_eq!(
            r.check_reply(&req),
            Err(WireError::WrongId { want: 9, got: 8 })
        );
        let mut r = reply_to(&req, 36);
        r.command = command::REGION_WRITE;
        assert!(matches!(
            r.check_reply(&req),
            Err(WireError::WrongCommand { .. })
        ));
        let mut r = reply_to(&req, 36);
        r.flags = TYPE_COMMAND;
        assert_eq!(r.check_reply(&req), Err(WireError::NotAReply(0)));
        assert_eq!(reply_to(&req, 8).check_reply(&req), Err(WireError::Size(8)));
        assert_eq!(
            reply_to(&req, u32::MAX).check_reply(&req),
            Err(WireError::Size(u32::MAX)),
            "a huge size is refused before anything is allocated"
        );
        let mut r = reply_to(&req, 16);
        r.flags |= FLAG_ERROR;
        r.error = 22;
        assert_eq!(r.check_reply(&req), Ok(0));
        assert_eq!(r.refusal(), Some(WireError::Refused(22)));
    }

    #[test]
    fn version_replies_are_checked() {
        let mut body = vec![0, 0, 1, 0];
        body.extend_from_slice(b"{\"capabilities\":{\"max_msg_fds\":4}}\0");
        assert_eq!(parse_version(&body).unwrap().max_msg_fds, 4);
        assert_eq!(parse_version(&[0, 0, 0, 0]).unwrap().max_msg_fds, 1);
        assert!(parse_version(&[1, 0, 0, 0]).is_err(), "major 1");
        assert!(parse_version(&[0, 0]).is_err(), "short");
        assert!(parse_version(b"\0\0\0\0{}").is_err(), "no NUL");
        assert!(parse_version(b"\0\0\0\0{nope\0").is_err(), "bad JSON");
        let mut zero = vec![0, 0, 0, 0];
        zero.extend_from_slice(b"{\"capabilities\":{\"max_msg_fds\":0}}\0");
        assert_eq!(parse_version(&zero).unwrap().max_msg_fds, 1);
        // What our own request says parses with our own parser.
        assert_eq!(parse_version(&version_body()).unwrap().max_msg_fds, 16);
    }

    #[test]
    fn device_and_region_info_are_checked() {
        let info = words(&[16, DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET, 9, 5]);
        assert_eq!(parse_device_info(&info).unwrap().num_regions, 9);
        assert!(
            parse_device_info(&words(&[16, 0, 9, 5])).is_err(),
            "not PCI"
        );
        assert!(
            parse_device_info(&words(&[16, 2, 3, 5])).is_err(),
            "no config region"
        );
        assert!(parse_device_info(&words(&[16, 2, 9, 5000])).is_err());
        assert!(parse_device_info(&[0; 8]).is_err());
        let mut region = words(&[32, 3, 2, 0]);
        region.extend_from_slice(&0x1000u64.to_le_bytes());
        region.extend_from_slice(&0u64.to_le_bytes());
        assert_eq!(
            parse_region_info(&region, 2),
            Ok(RegionInfo {
                flags: 3,
                size: 0x1000
            })
        );
        assert!(parse_region_info(&region, 3).is_err(), "wrong index");
        assert!(parse_region_info(&region[..20], 2).is_err());
    }

    #[test]
    fn io_fd_lists_are_checked() {
        let entry = |fd_index: u32, kind: u32, size: u64| {
            let mut e = 0x40u64.to_le_bytes().to_vec();
            e.extend_from_slice(&size.to_le_bytes());
            e.extend_from_slice(&words(&[fd_index, kind, 1, 0]));
            e.extend_from_slice(&7u64.to_le_bytes());
            e
        };
        let mut body = words(&[56, 0, 0, 1]);
        body.extend(entry(0, 0, 4));
        let fds = parse_region_io_fds(&body, 0, 1).unwrap();
        assert_eq!(fds[0].datamatch, Some(7));
        assert!(parse_region_io_fds(&body, 0, 0).is_err(), "fd missing");
        assert!(parse_region_io_fds(&body, 1, 1).is_err(), "wrong region");
        assert!(parse_region_io_fds(&body[..40], 0, 1).is_err(), "truncated");
        let mut other = words(&[56, 0, 0, 1]);
        other.extend(entry(0, 1, 4));
        assert!(parse_region_io_fds(&other, 0, 1).is_err(), "not an eventfd");
        let mut odd = words(&[56, 0, 0, 1]);
        odd.extend(entry(0, 0, 3));
        assert!(parse_region_io_fds(&odd, 0, 1).is_err(), "3 bytes");
        assert!(parse_region_io_fds(&words(&[16, 0, 0, 1000]), 0, 1).is_err());
    }

    #[test]
    fn region_access_replies_must_echo_the_access() {
        let mut body = region_access_body(2, 0x10, 4, &[]);
        body.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            parse_region_access(&body, 2, 0x10, 4, true),
            Ok(&[1, 2, 3, 4][..])
        );
        assert!(
            parse_region_access(&body, 2, 0x14, 4, true).is_err(),
            "offset"
        );
        assert!(
            parse_region_access(&body, 1, 0x10, 4, true).is_err(),
            "region"
        );
        assert!(
            parse_region_access(&body[..18], 2, 0x10, 4, true).is_err(),
            "short data"
        );
        let write = region_access_body(2, 0x10, 4, &[]);
        assert_eq!(parse_region_access(&write, 2, 0x10, 4, false), Ok(&[][..]));
        assert!(
            parse_region_access(&body, 2, 0x10, 4, false).is_err(),
            "data on a write"
        );
    }
}
