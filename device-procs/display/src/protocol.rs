//! The vhost-user-gpu display protocol (QEMU `docs/interop/vhost-user-gpu.rst`), front-end
//! side: reading the GPU backend's requests and writing our replies.
//!
//! Wire format: a 12-byte header (`request`, `flags`, `size`, native-endian `u32`s; flag bit
//! 2 marks a reply) and `size` bytes of payload. The `vhost` crate's `gpu_message` module only
//! carries the *backend* side (its header type is private to the crate and its sender is
//! `GpuBackend`), so this side parses the same layouts itself, with every size checked
//! before anything is allocated:
//!
//! - a payload larger than [`MAX_PAYLOAD`] (an UPDATE of the largest scanout) closes the
//!   connection: it cannot be skipped without reading what a hostile peer may stream forever;
//! - a payload of the wrong size for its request is read (so the stream stays in step) and
//!   dropped, as is an unknown request.
//!
//! File descriptors (DMABUF scanouts) are never accepted: the session reads with plain
//! `read(2)`, so the kernel closes any descriptor a peer attaches.

use std::io::{self, Read, Write};

/// Largest scanout side in pixels.
pub const MAX_SIDE: u32 = 8192;
/// Largest scanout area in pixels (4096 x 2400, 37.5 MiB of XRGB): bounds every buffer.
pub const MAX_PIXELS: u64 = 4096 * 2400;
/// Largest payload: an UPDATE covering the largest scanout.
pub const MAX_PAYLOAD: u64 = UPDATE_HEADER as u64 + MAX_PIXELS * 4;
/// Scanouts a virtio-gpu may have (`VIRTIO_GPU_MAX_SCANOUTS`).
pub const MAX_SCANOUTS: usize = 16;
/// Side of the cursor image (64 x 64 ARGB).
pub const CURSOR_SIDE: usize = 64;

pub const HEADER_LEN: usize = 12;
pub const FLAG_REPLY: u32 = 0x4;
/// Protocol feature bits (`VHOST_USER_GPU_PROTOCOL_F_*`).
pub const PROTOCOL_F_EDID: u64 = 1 << 0;
pub const PROTOCOL_F_DMABUF2: u64 = 1 << 1;

/// `virtio_gpu_ctrl_hdr.type` of the replies.
const RESP_OK_DISPLAY_INFO: u32 = 0x1101;
const RESP_OK_EDID: u32 = 0x1104;

const UPDATE_HEADER: usize = 20;
const CURSOR_POS_LEN: usize = 12;
const CURSOR_UPDATE_LEN: usize = CURSOR_POS_LEN + 8 + CURSOR_SIDE * CURSOR_SIDE * 4;
const DMABUF_SCANOUT_LEN: usize = 40;

/// Request codes (`VhostUserGpuRequest`).
pub mod code {
    pub const GET_PROTOCOL_FEATURES: u32 = 1;
    pub const SET_PROTOCOL_FEATURES: u32 = 2;
    pub const GET_DISPLAY_INFO: u32 = 3;
    pub const CURSOR_POS: u32 = 4;
    pub const CURSOR_POS_HIDE: u32 = 5;
    pub const CURSOR_UPDATE: u32 = 6;
    pub const SCANOUT: u32 = 7;
    pub const UPDATE: u32 = 8;
    pub const DMABUF_SCANOUT: u32 = 9;
    pub const DMABUF_UPDATE: u32 = 10;
    pub const GET_EDID: u32 = 11;
    pub const DMABUF_SCANOUT2: u32 = 12;
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("GPU backend closed the connection")]
    Closed,
    #[error("display socket I/O failed")]
    Io(#[from] io::Error),
    #[error(
        "request {request} announces a {size}-byte payload, more than the {MAX_PAYLOAD} allowed"
    )]
    TooLarge { request: u32, size: u32 },
}

/// A request that was read but is dropped; the session logs it and goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Dropped {
    #[error("unknown request {0}")]
    Unknown(u32),
    #[error("request {request} has a {size}-byte payload, expected {expected}")]
    BadSize {
        request: u32,
        size: usize,
        expected: usize,
    },
    #[error("request {0} has the reply flag set")]
    Reply(u32),
}

/// A cursor position (CURSOR_POS, CURSOR_POS_HIDE, and the head of CURSOR_UPDATE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorPos {
    pub scanout: u32,
    pub x: u32,
    pub y: u32,
}

/// One request of the GPU backend, its payload parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum Request<'a> {
    GetProtocolFeatures,
    SetProtocolFeatures(u64),
    GetDisplayInfo,
    GetEdid {
        scanout: u32,
    },
    CursorPos(CursorPos),
    CursorHide(CursorPos),
    CursorUpdate {
        pos: CursorPos,
        hot_x: u32,
        hot_y: u32,
        /// 64 x 64 native-endian ARGB words.
        image: &'a [u8],
    },
    Scanout {
        scanout: u32,
        width: u32,
        height: u32,
    },
    Update {
        scanout: u32,
        x: u32,
        y: u32,
        width: u32,
        height: u32,
        /// `width * height` native-endian XRGB words, rows packed (checked by the caller
        /// against the rectangle: its size is only known to be `size - 20`).
        data: &'a [u8],
    },
    DmabufScanout {
        scanout: u32,
        width: u32,
        height: u32,
    },
    DmabufUpdate,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&b[at..at + 4]);
    u32::from_ne_bytes(word)
}

/// Reads one message into `buf` (reused between calls; it grows at most to [`MAX_PAYLOAD`]).
/// Returns the raw header fields.
pub fn read_message<R: Read>(r: &mut R, buf: &mut Vec<u8>) -> Result<(u32, u32), ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    match r.read_exact(&mut header) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(ProtocolError::Closed),
        other => other?,
    }
    let request = u32_at(&header, 0);
    let flags = u32_at(&header, 4);
    let size = u32_at(&header, 8);
    if u64::from(size) > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge { request, size });
    }
    buf.resize(size as usize, 0);
    r.read_exact(buf)?;
    Ok((request, flags))
}

fn exact(request: u32, payload: &[u8], expected: usize) -> Result<(), Dropped> {
    if payload.len() == expected {
        Ok(())
    } else {
        Err(Dropped::BadSize {
            request,
            size: payload.len(),
            expected,
        })
    }
}

fn cursor_pos(p: &[u8]) -> CursorPos {
    CursorPos {
        scanout: u32_at(p, 0),
        x: u32_at(p, 4),
        y: u32_at(p, 8),
    }
}

/// Parses one message read by [`read_message`].
pub fn parse(request: u32, flags: u32, p: &[u8]) -> Result<Request<'_>, Dropped> {
    if flags & FLAG_REPLY != 0 {
        return Err(Dropped::Reply(request));
    }
    Ok(match request {
        code::GET_PROTOCOL_FEATURES => {
            exact(request, p, 0)?;
            Request::GetProtocolFeatures
        }
        code::SET_PROTOCOL_FEATURES => {
            exact(request, p, 8)?;
            let mut word = [0u8; 8];
            word.copy_from_slice(p);
            Request::SetProtocolFeatures(u64::from_ne_bytes(word))
        }
        code::GET_DISPLAY_INFO => {
            exact(request, p, 0)?;
            Request::GetDisplayInfo
        }
        code::GET_EDID => {
            exact(request, p, 4)?;
            Request::GetEdid {
                scanout: u32_at(p, 0),
            }
        }
        code::CURSOR_POS => {
            exact(request, p, CURSOR_POS_LEN)?;
            Request::CursorPos(cursor_pos(p))
        }
        code::CURSOR_POS_HIDE => {
            exact(request, p, CURSOR_POS_LEN)?;
            Request::CursorHide(cursor_pos(p))
        }
        code::CURSOR_UPDATE => {
            exact(request, p, CURSOR_UPDATE_LEN)?;
            Request::CursorUpdate {
                pos: cursor_pos(p),
                hot_x: u32_at(p, 12),
                hot_y: u32_at(p, 16),
                image: &p[20..],
            }
        }
        code::SCANOUT => {
            exact(request, p, 12)?;
            Request::Scanout {
                scanout: u32_at(p, 0),
                width: u32_at(p, 4),
                height: u32_at(p, 8),
            }
        }
        code::UPDATE => {
            if p.len() < UPDATE_HEADER {
                return Err(Dropped::BadSize {
                    request,
                    size: p.len(),
                    expected: UPDATE_HEADER,
                });
            }
            Request::Update {
                scanout: u32_at(p, 0),
                x: u32_at(p, 4),
                y: u32_at(p, 8),
                width: u32_at(p, 12),
                height: u32_at(p, 16),
                data: &p[UPDATE_HEADER..],
            }
        }
        code::DMABUF_SCANOUT | code::DMABUF_SCANOUT2 => {
            let expected = DMABUF_SCANOUT_LEN
                + if request == code::DMABUF_SCANOUT2 {
                    8
                } else {
                    0
                };
            exact(request, p, expected)?;
            Request::DmabufScanout {
                scanout: u32_at(p, 0),
                width: u32_at(p, 12),
                height: u32_at(p, 16),
            }
        }
        code::DMABUF_UPDATE => {
            exact(request, p, UPDATE_HEADER)?;
            Request::DmabufUpdate
        }
        other => return Err(Dropped::Unknown(other)),
    })
}

/// Writes one reply (header with the reply flag, then `payload`) in a single write.
pub fn write_reply<W: Write>(w: &mut W, request: u32, payload: &[u8]) -> io::Result<()> {
    let size = u32::try_from(payload.len()).expect("replies are at most a few KiB");
    let mut msg = Vec::with_capacity(HEADER_LEN + payload.len());
    msg.extend_from_slice(&request.to_ne_bytes());
    msg.extend_from_slice(&FLAG_REPLY.to_ne_bytes());
    msg.extend_from_slice(&size.to_ne_bytes());
    msg.extend_from_slice(payload);
    w.write_all(&msg)
}

/// `struct virtio_gpu_resp_display_info`: a 24-byte control header, then 16 entries of
/// `{x, y, width, height, enabled, flags}`. Scanout 0 is enabled at `width` x `height`.
pub fn display_info(width: u32, height: u32) -> Vec<u8> {
    let mut out = vec![0u8; 24 + MAX_SCANOUTS * 24];
    out[..4].copy_from_slice(&RESP_OK_DISPLAY_INFO.to_ne_bytes());
    let one = &mut out[24..48];
    one[8..12].copy_from_slice(&width.to_ne_bytes());
    one[12..16].copy_from_slice(&height.to_ne_bytes());
    one[16..20].copy_from_slice(&1u32.to_ne_bytes());
    out
}

/// `struct virtio_gpu_resp_edid`: control header, `size`, padding, 1024 bytes of EDID.
pub fn edid_reply(edid: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 24 + 8 + 1024];
    out[..4].copy_from_slice(&RESP_OK_EDID.to_ne_bytes());
    let len = edid.len().min(1024);
    out[24..28].copy_from_slice(&(len as u32).to_ne_bytes());
    out[32..32 + len].copy_from_slice(&edid[..len]);
    out
}

/// Builders of the backend's messages, for tests and benchmarks that play the GPU.
pub mod build {
    use super::*;

    pub fn message(request: u32, payload: &[u8]) -> Vec<u8> {
        let mut msg = Vec::with_capacity(HEADER_LEN + payload.len());
        msg.extend_from_slice(&request.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
        msg.extend_from_slice(payload);
        msg
    }

    fn words(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    pub fn scanout(scanout: u32, width: u32, height: u32) -> Vec<u8> {
        message(code::SCANOUT, &words(&[scanout, width, height]))
    }

    /// An UPDATE of the rectangle with `pixels` (XRGB words, row by row).
    pub fn update(
        scanout: u32,
        x: u32,
        y: u32,
        width: u32,
        height: u32,
        pixels: &[u32],
    ) -> Vec<u8> {
        let mut payload = words(&[scanout, x, y, width, height]);
        payload.extend(pixels.iter().flat_map(|p| p.to_ne_bytes()));
        message(code::UPDATE, &payload)
    }

    pub fn cursor_update(pos: CursorPos, hot_x: u32, hot_y: u32, image: &[u32]) -> Vec<u8> {
        let mut payload = words(&[pos.scanout, pos.x, pos.y, hot_x, hot_y]);
        payload.extend(image.iter().flat_map(|p| p.to_ne_bytes()));
        message(code::CURSOR_UPDATE, &payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn roundtrip(msg: &[u8]) -> (u32, u32, Vec<u8>) {
        let mut buf = Vec::new();
        let (req, flags) = read_message(&mut Cursor::new(msg), &mut buf).unwrap();
        (req, flags, buf)
    }

    #[test]
    fn update_parses_with_its_pixels() {
        let msg = build::update(0, 1, 2, 2, 1, &[0x00ff_0000, 0x0000_00ff]);
        let (req, flags, buf) = roundtrip(&msg);
        match parse(req, flags, &buf).unwrap() {
            Request::Update {
                scanout: 0,
                x: 1,
                y: 2,
                width: 2,
                height: 1,
                data,
            } => assert_eq!(data.len(), 8),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn oversized_payload_is_refused_before_allocating() {
        let mut msg = build::message(code::UPDATE, &[]);
        msg[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
        let mut buf = Vec::new();
        let err = read_message(&mut Cursor::new(msg), &mut buf).unwrap_err();
        assert!(matches!(err, ProtocolError::TooLarge { .. }), "{err}");
        assert!(buf.capacity() == 0);
    }

    #[test]
    fn wrong_sizes_unknown_requests_and_replies_are_dropped() {
        assert!(matches!(
            parse(code::SCANOUT, 0, &[0; 8]),
            Err(Dropped::BadSize { expected: 12, .. })
        ));
        assert!(matches!(
            parse(code::CURSOR_UPDATE, 0, &[0; 20]),
            Err(Dropped::BadSize { .. })
        ));
        assert!(matches!(
            parse(code::UPDATE, 0, &[0; 19]),
            Err(Dropped::BadSize { .. })
        ));
        assert_eq!(parse(99, 0, &[]), Err(Dropped::Unknown(99)));
        assert_eq!(parse(0, 0, &[]), Err(Dropped::Unknown(0)));
        assert_eq!(
            parse(code::GET_DISPLAY_INFO, FLAG_REPLY, &[]),
            Err(Dropped::Reply(code::GET_DISPLAY_INFO))
        );
    }

    #[test]
    fn truncated_stream_is_an_error_not_a_panic() {
        let msg = build::scanout(0, 10, 10);
        let mut buf = Vec::new();
        assert!(read_message(&mut Cursor::new(&msg[..15]), &mut buf).is_err());
        assert!(matches!(
            read_message(&mut Cursor::new(&msg[..0]), &mut buf),
            Err(ProtocolError::Closed)
        ));
    }

    #[test]
    fn display_info_enables_scanout_zero_only() {
        let info = display_info(1280, 800);
        assert_eq!(info.len(), 408);
        assert_eq!(u32_at(&info, 0), RESP_OK_DISPLAY_INFO);
        assert_eq!(u32_at(&info, 24 + 8), 1280);
        assert_eq!(u32_at(&info, 24 + 12), 800);
        assert_eq!(u32_at(&info, 24 + 16), 1);
        assert_eq!(u32_at(&info, 48 + 16), 0);
    }
}
