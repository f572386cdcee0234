//! The virtio-gpu 2D wire format (virtio 1.2, section 5.7): command and response types,
//! pixel formats, and the fixed sizes of each request. Requests are decoded from their bytes
//! with explicit offsets (all fields little-endian), so a short or odd request is an error
//! value, never a misread.

/// `struct virtio_gpu_ctrl_hdr`: type, flags, fence_id, ctx_id, ring_idx, padding.
pub const HDR_LEN: usize = 24;
pub const FLAG_FENCE: u32 = 1;
pub const FLAG_INFO_RING_IDX: u32 = 2;

// 2D commands (control queue).
pub const CMD_GET_DISPLAY_INFO: u32 = 0x0100;
pub const CMD_RESOURCE_CREATE_2D: u32 = 0x0101;
pub const CMD_RESOURCE_UNREF: u32 = 0x0102;
pub const CMD_SET_SCANOUT: u32 = 0x0103;
pub const CMD_RESOURCE_FLUSH: u32 = 0x0104;
pub const CMD_TRANSFER_TO_HOST_2D: u32 = 0x0105;
pub const CMD_RESOURCE_ATTACH_BACKING: u32 = 0x0106;
pub const CMD_RESOURCE_DETACH_BACKING: u32 = 0x0107;
pub const CMD_GET_EDID: u32 = 0x010a;
// Cursor queue.
pub const CMD_UPDATE_CURSOR: u32 = 0x0300;
pub const CMD_MOVE_CURSOR: u32 = 0x0301;

// Responses.
pub const RESP_OK_NODATA: u32 = 0x1100;
pub const RESP_OK_DISPLAY_INFO: u32 = 0x1101;
pub const RESP_OK_EDID: u32 = 0x1104;
pub const RESP_ERR_UNSPEC: u32 = 0x1200;
pub const RESP_ERR_OUT_OF_MEMORY: u32 = 0x1201;
pub const RESP_ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
pub const RESP_ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
pub const RESP_ERR_INVALID_PARAMETER: u32 = 0x1205;

/// Request lengths (header included).
pub const LEN_RESOURCE_CREATE_2D: usize = HDR_LEN + 16;
pub const LEN_RESOURCE_UNREF: usize = HDR_LEN + 8;
pub const LEN_SET_SCANOUT: usize = HDR_LEN + 24;
pub const LEN_RESOURCE_FLUSH: usize = HDR_LEN + 24;
pub const LEN_TRANSFER_TO_HOST_2D: usize = HDR_LEN + 32;
pub const LEN_ATTACH_BACKING: usize = HDR_LEN + 8;
pub const LEN_MEM_ENTRY: usize = 16;
pub const LEN_DETACH_BACKING: usize = HDR_LEN + 8;
pub const LEN_GET_EDID: usize = HDR_LEN + 8;
pub const LEN_UPDATE_CURSOR: usize = HDR_LEN + 32;

/// `struct virtio_gpu_resp_display_info`: header + 16 x (rect, enabled, flags).
pub const MAX_SCANOUTS: usize = 16;
pub const LEN_RESP_DISPLAY_INFO: usize = HDR_LEN + MAX_SCANOUTS * 24;
/// `struct virtio_gpu_resp_edid`: header, size, padding, edid[1024].
pub const LEN_RESP_EDID: usize = HDR_LEN + 8 + 1024;

/// The 2D pixel formats, all 4 bytes per pixel. The name gives the byte order in memory
/// (B8G8R8X8: blue first), as Linux's virtio-gpu driver uses them (DRM XRGB8888 on a
/// little-endian guest is B8G8R8X8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Format {
    B8G8R8A8 = 1,
    B8G8R8X8 = 2,
    A8R8G8B8 = 3,
    X8R8G8B8 = 4,
    R8G8B8A8 = 67,
    X8B8G8R8 = 68,
    A8B8G8R8 = 121,
    R8G8B8X8 = 134,
}

impl Format {
    pub fn from_wire(v: u32) -> Option<Format> {
        Some(match v {
            1 => Format::B8G8R8A8,
            2 => Format::B8G8R8X8,
            3 => Format::A8R8G8B8,
            4 => Format::X8R8G8B8,
            67 => Format::R8G8B8A8,
            68 => Format::X8B8G8R8,
            121 => Format::A8B8G8R8,
            134 => Format::R8G8B8X8,
            _ => return None,
        })
    }

    /// Byte positions of (blue, green, red, alpha-or-unused) within one pixel.
    fn positions(self) -> [usize; 4] {
        match self {
            Format::B8G8R8A8 | Format::B8G8R8X8 => [0, 1, 2, 3],
            Format::A8R8G8B8 | Format::X8R8G8B8 => [3, 2, 1, 0],
            Format::R8G8B8A8 | Format::R8G8B8X8 => [2, 1, 0, 3],
            Format::X8B8G8R8 | Format::A8B8G8R8 => [1, 2, 3, 0],
        }
    }

    /// Appends `src` (whole pixels of this format) to `out` in the display protocol's format,
    /// PIXMAN x8r8g8b8 / a8r8g8b8 on a little-endian host: bytes blue, green, red, alpha.
    pub fn to_display(self, src: &[u8], out: &mut Vec<u8>) {
        let p = self.positions();
        if p == [0, 1, 2, 3] {
            out.extend_from_slice(src);
            return;
        }
        out.extend(
            src.chunks_exact(4)
                .flat_map(|px| [px[p[0]], px[p[1]], px[p[2]], px[p[3]]]),
        );
    }
}

pub const BYTES_PER_PIXEL: u32 = 4;

/// Little-endian field reader over one request's bytes.
pub struct Fields<'a>(pub &'a [u8]);

impl Fields<'_> {
    pub fn u32(&self, at: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[at..at + 4]);
        u32::from_le_bytes(b)
    }

    pub fn u64(&self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[at..at + 8]);
        u64::from_le_bytes(b)
    }

    pub fn rect(&self, at: usize) -> Rect {
        Rect {
            x: self.u32(at),
            y: self.u32(at + 4),
            width: self.u32(at + 8),
            height: self.u32(at + 12),
        }
    }
}

/// `struct virtio_gpu_rect`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    /// Non-empty and inside a `width` x `height` area, without overflow.
    pub fn is_inside(&self, width: u32, height: u32) -> bool {
        self.width > 0
            && self.height > 0
            && self.x.checked_add(self.width).is_some_and(|r| r <= width)
            && self.y.checked_add(self.height).is_some_and(|b| b <= height)
    }

    /// The overlap of two rectangles, or `None` if they do not overlap (or either one's
    /// edge is past `u32::MAX`: guest values are added with `checked_add`).
    pub fn intersect(&self, other: &Rect) -> Option<Rect> {
        let x = self.x.max(other.x);
        let y = self.y.max(other.y);
        let right = self
            .x
            .checked_add(self.width)?
            .min(other.x.checked_add(other.width)?);
        let bottom = self
            .y
            .checked_add(self.height)?
            .min(other.y.checked_add(other.height)?);
        (right > x && bottom > y).then(|| Rect {
            x,
            y,
            width: right - x,
            height: bottom - y,
        })
    }
}

/// A response header echoing the request's fence (and context/ring index), as the spec asks.
pub fn response_header(kind: u32, request: &[u8]) -> [u8; HDR_LEN] {
    let mut out = [0u8; HDR_LEN];
    out[0..4].copy_from_slice(&kind.to_le_bytes());
    if request.len() >= HDR_LEN {
        let f = Fields(request);
        let flags = f.u32(4) & (FLAG_FENCE | FLAG_INFO_RING_IDX);
        if flags & FLAG_FENCE != 0 {
            out[4..8].copy_from_slice(&flags.to_le_bytes());
            out[8..16].copy_from_slice(&request[8..16]);
            out[16..20].copy_from_slice(&request[16..20]);
            if flags & FLAG_INFO_RING_IDX != 0 {
                out[20] = request[20];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_convert_to_bgrx() {
        // One pixel: blue 1, green 2, red 3, alpha 4, in each format's own byte order.
        let cases = [
            (Format::B8G8R8A8, [1, 2, 3, 4]),
            (Format::B8G8R8X8, [1, 2, 3, 4]),
            (Format::A8R8G8B8, [4, 3, 2, 1]),
            (Format::X8R8G8B8, [4, 3, 2, 1]),
            (Format::R8G8B8A8, [3, 2, 1, 4]),
            (Format::R8G8B8X8, [3, 2, 1, 4]),
            (Format::X8B8G8R8, [4, 1, 2, 3]),
            (Format::A8B8G8R8, [4, 1, 2, 3]),
        ];
        for (format, px) in cases {
            let mut out = Vec::new();
            format.to_display(&px, &mut out);
            assert_eq!(out, [1, 2, 3, 4], "{format:?}");
            assert_eq!(Format::from_wire(format as u32), Some(format));
        }
        assert_eq!(Format::from_wire(0), None);
        assert_eq!(Format::from_wire(5), None);
    }

    #[test]
    fn rectangles_are_checked_without_overflow() {
        let r = |x, y, width, height| Rect {
            x,
            y,
            width,
            height,
        };
        assert!(r(0, 0, 10, 10).is_inside(10, 10));
        assert!(!r(1, 0, 10, 10).is_inside(10, 10));
        assert!(!r(0, 0, 0, 10).is_inside(10, 10));
        assert!(!r(u32::MAX, 0, 2, 1).is_inside(u32::MAX, 10));
        assert!(!r(0, u32::MAX - 1, 1, 5).is_inside(10, u32::MAX));
        assert_eq!(
            r(0, 0, 10, 10).intersect(&r(5, 5, 10, 10)),
            Some(r(5, 5, 5, 5))
        );
        assert_eq!(r(0, 0, 5, 5).intersect(&r(5, 0, 5, 5)), None);
        // Edges past u32::MAX (a guest's rectangle before it is checked): no overlap, no wrap.
        assert_eq!(r(u32::MAX, 0, 2, 5).intersect(&r(0, 0, 5, 5)), None);
        assert_eq!(r(0, 0, 5, 5).intersect(&r(0, u32::MAX - 1, 5, 5)), None);
    }

    #[test]
    fn responses_echo_the_fence() {
        let mut req = [0u8; HDR_LEN];
        req[4] = (FLAG_FENCE | FLAG_INFO_RING_IDX) as u8;
        req[8..16].copy_from_slice(&77u64.to_le_bytes());
        req[16] = 3;
        req[20] = 5;
        let resp = response_header(RESP_OK_NODATA, &req);
        let f = Fields(&resp);
        assert_eq!(f.u32(0), RESP_OK_NODATA);
        assert_eq!(f.u32(4), FLAG_FENCE | FLAG_INFO_RING_IDX);
        assert_eq!(f.u64(8), 77);
        assert_eq!((resp[16], resp[20]), (3, 5));
        let plain = response_header(RESP_ERR_UNSPEC, &[0u8; 4]);
        assert_eq!(Fields(&plain).u32(4), 0);
    }
}
