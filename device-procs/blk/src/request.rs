//! Parsing one virtio-blk request (virtio 1.2, 5.2.6) from its descriptor chain.
//!
//! Every field comes from the guest and is checked before use: the chain's structure, the
//! header length, the status byte's place, sector ranges (with overflow), alignment, the
//! read-only flag, discard/write-zeroes segments and their limits. What cannot be honoured
//! becomes an IOERR or UNSUPP status; a request without a usable status byte is returned
//! with nothing written.

use isola_device_common::chain::{self, ChainError, Segment, Segments};
use isola_device_common::DescriptorChain;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::disk::{Disk, SECTOR};

pub const HEADER_LEN: u64 = 16;
const SEGMENT_LEN: u64 = 16;
/// Most sectors one discard or write-zeroes segment may cover (1 GiB).
pub const MAX_DWZ_SECTORS: u32 = 1 << 21;
/// Most segments in one discard or write-zeroes request.
pub const MAX_DWZ_SEGMENTS: u32 = 16;

pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Why a request gets no status at all (it is returned with nothing written).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NoStatus {
    #[error("malformed chain")]
    Chain(#[source] ChainError),
    #[error("no device-writable byte for the status")]
    Missing,
    #[error("status byte at {0:#x} is not in guest memory")]
    Unmapped(u64),
}

/// Why a request fails with a status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("header of {0} bytes, 16 needed")]
    ShortHeader(u64),
    #[error("guest buffer")]
    Buffer(#[source] ChainError),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("request type {kind}: {len} data bytes in buffers of the wrong direction")]
    WrongDirection { kind: u32, len: u64 },
    #[error("sectors {sector}..+{len} bytes are past the end of the disk")]
    OutOfRange { sector: u64, len: u64 },
    #[error("{len} bytes at sector {sector} are not aligned to {align}")]
    Unaligned { sector: u64, len: u64, align: u64 },
    #[error("request type {0} is not supported")]
    UnknownType(u32),
    #[error("feature for request type {0} was not negotiated")]
    NotNegotiated(u32),
    #[error("discard/write-zeroes payload of {0} bytes")]
    BadSegments(u64),
    #[error("discard/write-zeroes segment limits exceeded or reserved flags set")]
    SegmentLimits,
}

impl Refusal {
    pub fn status(&self) -> u8 {
        match self {
            Refusal::UnknownType(_) | Refusal::NotNegotiated(_) | Refusal::SegmentLimits => {
                STATUS_UNSUPP
            }
            _ => STATUS_IOERR,
        }
    }
}

/// A byte range of the disk, for discard and write-zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
    pub unmap: bool,
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Fails with the refusal's status.
    Refuse(Refusal),
    /// Already done (GET_ID): `written` data bytes, status OK.
    Done {
        written: u32,
    },
    Read {
        offset: u64,
        data: Segments,
    },
    Write {
        offset: u64,
        data: Segments,
    },
    Flush,
    Discard(Vec<Range>),
    WriteZeroes(Vec<Range>),
}

/// A request with a place for its status byte.
#[derive(Debug)]
pub struct Request {
    pub status: GuestAddress,
    pub action: Action,
}

/// Parses the request of `chain` for `disk`, given the negotiated `features`. `segs` is
/// scratch space for the chain's buffers, reused across requests.
pub fn parse(
    chain: &DescriptorChain,
    disk: &Disk,
    features: u64,
    segs: &mut Vec<Segment>,
) -> Result<Request, NoStatus> {
    let mem = chain.memory();
    chain.segments_into(segs).map_err(NoStatus::Chain)?;
    // The chain walk guarantees readable buffers come first.
    let split = segs.iter().position(|s| s.writable).unwrap_or(segs.len());
    let (readable, writable) = segs.split_at(split);
    let wlen = chain::total_len(writable);
    if wlen == 0 {
        return Err(NoStatus::Missing);
    }
    let (wdata, wstatus) = chain::split_at(writable, wlen - 1).map_err(NoStatus::Chain)?;
    let status = wstatus
        .iter()
        .find(|s| s.len > 0)
        .map(|s| s.addr)
        .ok_or(NoStatus::Missing)?;
    if !mem.check_range(status, 1) {
        return Err(NoStatus::Unmapped(status.0));
    }
    let action = match header(mem, readable) {
        Ok((kind, sector)) => match chain::split_at(readable, HEADER_LEN) {
            Ok((_, rdata)) => decide(mem, disk, features, kind, sector, rdata, wdata)
                .unwrap_or_else(Action::Refuse),
            Err(e) => Action::Refuse(Refusal::Buffer(e)),
        },
        Err(refusal) => Action::Refuse(refusal),
    };
    Ok(Request { status, action })
}

fn header(mem: &isola_device_common::Memory, readable: &[Segment]) -> Result<(u32, u64), Refusal> {
    let len = chain::total_len(readable);
    if len < HEADER_LEN {
        return Err(Refusal::ShortHeader(len));
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    chain::read_bytes(mem, readable, &mut raw).map_err(Refusal::Buffer)?;
    let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let sector = u64::from_le_bytes([
        raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
    ]);
    Ok((kind, sector))
}

fn decide(
    mem: &isola_device_common::Memory,
    disk: &Disk,
    features: u64,
    kind: u32,
    sector: u64,
    rdata: Segments,
    wdata: Segments,
) -> Result<Action, Refusal> {
    match kind {
        // Data the device should fill offered read-only (or the reverse) is an error, not
        // a request for zero bytes answered OK with nothing done.
        VIRTIO_BLK_T_IN if !rdata.is_empty() => Err(Refusal::WrongDirection {
            kind,
            len: chain::total_len(&rdata),
        }),
        VIRTIO_BLK_T_OUT if !wdata.is_empty() => Err(Refusal::WrongDirection {
            kind,
            len: chain::total_len(&wdata),
        }),
        VIRTIO_BLK_T_IN => {
            let offset = data_range(disk, sector, chain::total_len(&wdata))?;
            Ok(Action::Read {
                offset,
                data: wdata,
            })
        }
        VIRTIO_BLK_T_OUT => {
            if disk.readonly() {
                return Err(Refusal::ReadOnly);
            }
            let offset = data_range(disk, sector, chain::total_len(&rdata))?;
            Ok(Action::Write {
                offset,
                data: rdata,
            })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Action::Flush),
        VIRTIO_BLK_T_GET_ID => {
            let n = chain::total_len(&wdata).min(disk.serial().len() as u64) as usize;
            chain::write_bytes(mem, &wdata, &disk.serial()[..n]).map_err(Refusal::Buffer)?;
            Ok(Action::Done { written: n as u32 })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let feature = if kind == VIRTIO_BLK_T_DISCARD {
                VIRTIO_BLK_F_DISCARD
            } else {
                VIRTIO_BLK_F_WRITE_ZEROES
            };
            if features & (1 << feature) == 0 {
                return Err(Refusal::NotNegotiated(kind));
            }
            if disk.readonly() {
                return Err(Refusal::ReadOnly);
            }
            let ranges = segments(mem, disk, &rdata, kind == VIRTIO_BLK_T_DISCARD)?;
            Ok(if kind == VIRTIO_BLK_T_DISCARD {
                Action::Discard(ranges)
            } else {
                Action::WriteZeroes(ranges)
            })
        }
        other => Err(Refusal::UnknownType(other)),
    }
}

/// The byte offset of `len` bytes at `sector`, if they are whole blocks inside the disk.
fn data_range(disk: &Disk, sector: u64, len: u64) -> Result<u64, Refusal> {
    let out = || Refusal::OutOfRange { sector, len };
    let offset = sector.checked_mul(SECTOR).ok_or_else(out)?;
    let end = offset.checked_add(len).ok_or_else(out)?;
    if end > disk.size() {
        return Err(out());
    }
    let align = disk.block_size();
    if !offset.is_multiple_of(align) || !len.is_multiple_of(align) {
        return Err(Refusal::Unaligned { sector, len, align });
    }
    Ok(offset)
}

/// The `struct virtio_blk_discard_write_zeroes` segments of a discard or write-zeroes.
fn segments(
    mem: &isola_device_common::Memory,
    disk: &Disk,
    rdata: &[Segment],
    discard: bool,
) -> Result<Vec<Range>, Refusal> {
    let len = chain::total_len(rdata);
    if len == 0 || !len.is_multiple_of(SEGMENT_LEN) {
        return Err(Refusal::BadSegments(len));
    }
    if len / SEGMENT_LEN > u64::from(MAX_DWZ_SEGMENTS) {
        return Err(Refusal::SegmentLimits);
    }
    let mut raw = vec![0u8; len as usize];
    chain::read_bytes(mem, rdata, &mut raw).map_err(Refusal::Buffer)?;
    raw.chunks_exact(SEGMENT_LEN as usize)
        .map(|s| {
            let sector = u64::from_le_bytes(s[0..8].try_into().expect("8 bytes"));
            let sectors = u32::from_le_bytes(s[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(s[12..16].try_into().expect("4 bytes"));
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
                || (discard && unmap)
                || sectors > MAX_DWZ_SECTORS
            {
                return Err(Refusal::SegmentLimits);
            }
            let bytes = u64::from(sectors) * SECTOR;
            let offset = sector
                .checked_mul(SECTOR)
                .ok_or(Refusal::OutOfRange { sector, len: bytes })?;
            match offset.checked_add(bytes) {
                Some(end) if end <= disk.size() => Ok(Range {
                    offset,
                    len: bytes,
                    unmap,
                }),
                _ => Err(Refusal::OutOfRange { sector, len: bytes }),
            }
        })
        .collect()
}
