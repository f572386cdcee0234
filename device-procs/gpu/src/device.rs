//! virtio-gpu 2D semantics: resources, their guest backing, scanouts and the cursor, and what
//! each command changes. No sockets and no threads here: a command goes in as the bytes the
//! guest wrote, a response and a list of [`DisplayOp`]s (what the display must be told) come
//! out, so all of it is unit-tested on plain guest memory.
//!
//! Everything the guest controls is validated before use: ids, formats, sizes (bounded per
//! dimension and by a host-memory budget, with checked arithmetic), rectangles (inside their
//! resource, no overflow), backing entries (inside guest memory), transfer offsets (inside
//! the backing). A bad command gets a `VIRTIO_GPU_RESP_ERR_*` and changes nothing.

use std::collections::BTreeMap;

use isola_device_common::Memory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::edid::edid;
use crate::protocol::*;
use crate::state::{SavedCursor, SavedResource, Snapshot};

/// Largest width or height of a resource.
pub const MAX_DIM: u32 = 16384;
/// Most backing entries in one ATTACH_BACKING (QEMU's limit too).
pub const MAX_ENTRIES: u32 = 16384;
/// Most resources alive at once.
pub const MAX_RESOURCES: usize = 16384;
/// Bytes of one request the device reads at most (an ATTACH_BACKING with every entry).
pub const MAX_REQUEST: usize = LEN_ATTACH_BACKING + MAX_ENTRIES as usize * LEN_MEM_ENTRY;
/// Cursor images are 64 x 64.
pub const CURSOR_DIM: u32 = 64;
pub const CURSOR_BYTES: usize = (CURSOR_DIM * CURSOR_DIM * BYTES_PER_PIXEL) as usize;

/// The one scanout this device has.
pub const NUM_SCANOUTS: u32 = 1;

/// Why a command failed; each maps to one response type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CmdError {
    #[error("unsupported or malformed command")]
    Unspec,
    #[error("over the host memory budget")]
    OutOfMemory,
    #[error("no such scanout")]
    InvalidScanout,
    #[error("no such resource (or id in use)")]
    InvalidResource,
    #[error("invalid parameter")]
    InvalidParameter,
}

impl CmdError {
    pub fn response(self) -> u32 {
        match self {
            CmdError::Unspec => RESP_ERR_UNSPEC,
            CmdError::OutOfMemory => RESP_ERR_OUT_OF_MEMORY,
            CmdError::InvalidScanout => RESP_ERR_INVALID_SCANOUT_ID,
            CmdError::InvalidResource => RESP_ERR_INVALID_RESOURCE_ID,
            CmdError::InvalidParameter => RESP_ERR_INVALID_PARAMETER,
        }
    }
}

/// What the display end must be told (vhost-user-gpu SCANOUT, UPDATE, CURSOR_*).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisplayOp {
    /// Size of a scanout; 0 x 0 disables it.
    Scanout {
        scanout: u32,
        width: u32,
        height: u32,
    },
    /// Pixels (display format, rows of `width` pixels) at (x, y) of a scanout.
    Update {
        scanout: u32,
        rect: Rect,
        data: Vec<u8>,
    },
    CursorUpdate {
        scanout: u32,
        x: u32,
        y: u32,
        hot_x: u32,
        hot_y: u32,
        image: Box<[u8; CURSOR_BYTES]>,
    },
    CursorMove {
        scanout: u32,
        x: u32,
        y: u32,
    },
    CursorHide {
        scanout: u32,
        x: u32,
        y: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    addr: u64,
    len: u32,
    /// Offset of this entry within the whole backing.
    start: u64,
}

struct Resource {
    format: Format,
    width: u32,
    height: u32,
    /// The host copy, `width * height * 4` bytes, rows without padding.
    pixels: Vec<u8>,
    backing: Option<Vec<Entry>>,
}

impl Resource {
    fn stride(&self) -> u64 {
        u64::from(self.width) * u64::from(BYTES_PER_PIXEL)
    }

    fn backing_len(&self) -> u64 {
        self.backing
            .as_ref()
            .and_then(|b| b.last())
            .map_or(0, |e| e.start.saturating_add(u64::from(e.len)))
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Scanout {
    /// 0: disabled.
    resource: u32,
    rect: Rect,
}

/// What a command answers with on success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    NoData,
    DisplayInfo,
    Edid,
}

/// The device state of one guest.
pub struct Gpu {
    width: u32,
    height: u32,
    budget: u64,
    used: u64,
    resources: BTreeMap<u32, Resource>,
    scanouts: Vec<Scanout>,
    cursor: Option<SavedCursor>,
    /// Something a restarted process needs (resources, backing, scanouts, cursor) changed.
    dirty: bool,
}

fn u32_at(req: &[u8], at: usize) -> u32 {
    Fields(req).u32(at)
}

/// Copies `buf.len()` bytes at `offset` of a backing out of guest memory.
fn read_backing(
    mem: &Memory,
    entries: &[Entry],
    offset: u64,
    buf: &mut [u8],
) -> Result<(), CmdError> {
    // The entry holding `offset`: the last one starting at or before it.
    let mut i = entries
        .partition_point(|e| e.start <= offset)
        .saturating_sub(1);
    let mut done = 0usize;
    let mut pos = offset;
    while done < buf.len() {
        let e = entries.get(i).ok_or(CmdError::InvalidParameter)?;
        let within = pos.checked_sub(e.start).ok_or(CmdError::InvalidParameter)?;
        let left = u64::from(e.len).saturating_sub(within);
        if left == 0 {
            i += 1;
            continue;
        }
        let n = left.min((buf.len() - done) as u64) as usize;
        let addr = e.addr.checked_add(within).ok_or(CmdError::Unspec)?;
        mem.read_slice(&mut buf[done..done + n], GuestAddress(addr))
            .map_err(|_| CmdError::Unspec)?;
        done += n;
        pos += n as u64;
        i += 1;
    }
    Ok(())
}

impl Gpu {
    /// A device with one `width` x `height` scanout and `budget` bytes for resources.
    pub fn new(width: u32, height: u32, budget: u64) -> Gpu {
        Gpu {
            width,
            height,
            budget,
            used: 0,
            resources: BTreeMap::new(),
            scanouts: vec![Scanout::default(); NUM_SCANOUTS as usize],
            cursor: None,
            dirty: false,
        }
    }

    /// Drops every resource, scanout and the cursor (device reset).
    pub fn reset(&mut self) {
        self.resources.clear();
        self.scanouts.fill(Scanout::default());
        self.cursor = None;
        self.used = 0;
        self.dirty = true;
    }

    /// Whether the persistent part changed since the last call.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    pub fn resource_count(&self) -> usize {
        self.resources.len()
    }

    /// Runs one control-queue command; `req` holds the bytes the driver wrote (at most
    /// [`MAX_REQUEST`]). Returns the response bytes and what the display must be told.
    pub fn control(&mut self, mem: &Memory, req: &[u8]) -> (Vec<u8>, Vec<DisplayOp>) {
        let mut ops = Vec::new();
        let result = if req.len() < HDR_LEN {
            Err(CmdError::Unspec)
        } else {
            self.command(mem, req, &mut ops)
        };
        let body = match result {
            Ok(Response::NoData) => response_header(RESP_OK_NODATA, req).to_vec(),
            Ok(Response::DisplayInfo) => self.display_info(req),
            Ok(Response::Edid) => {
                let mut out = vec![0u8; LEN_RESP_EDID];
                out[..HDR_LEN].copy_from_slice(&response_header(RESP_OK_EDID, req));
                out[HDR_LEN..HDR_LEN + 4].copy_from_slice(&128u32.to_le_bytes());
                out[HDR_LEN + 8..HDR_LEN + 8 + 128].copy_from_slice(&edid(self.width, self.height));
                out
            }
            Err(e) => {
                ops.clear();
                response_header(e.response(), req).to_vec()
            }
        };
        (body, ops)
    }

    fn command(
        &mut self,
        mem: &Memory,
        req: &[u8],
        ops: &mut Vec<DisplayOp>,
    ) -> Result<Response, CmdError> {
        let need = |len: usize| {
            if req.len() >= len {
                Ok(Fields(req))
            } else {
                Err(CmdError::InvalidParameter)
            }
        };
        match u32_at(req, 0) {
            CMD_GET_DISPLAY_INFO => Ok(Response::DisplayInfo),
            CMD_GET_EDID => {
                let f = need(LEN_GET_EDID)?;
                if f.u32(HDR_LEN) >= NUM_SCANOUTS {
                    return Err(CmdError::InvalidScanout);
                }
                Ok(Response::Edid)
            }
            CMD_RESOURCE_CREATE_2D => {
                let f = need(LEN_RESOURCE_CREATE_2D)?;
                let format =
                    Format::from_wire(f.u32(HDR_LEN + 4)).ok_or(CmdError::InvalidParameter)?;
                self.create(
                    f.u32(HDR_LEN),
                    format,
                    f.u32(HDR_LEN + 8),
                    f.u32(HDR_LEN + 12),
                )?;
                Ok(Response::NoData)
            }
            CMD_RESOURCE_UNREF => {
                let f = need(LEN_RESOURCE_UNREF)?;
                self.unref(f.u32(HDR_LEN), ops)?;
                Ok(Response::NoData)
            }
            CMD_RESOURCE_ATTACH_BACKING => {
                let f = need(LEN_ATTACH_BACKING)?;
                let nr = f.u32(HDR_LEN + 4);
                if nr == 0 || nr > MAX_ENTRIES {
                    return Err(CmdError::InvalidParameter);
                }
                let len = LEN_ATTACH_BACKING + nr as usize * LEN_MEM_ENTRY;
                let f = need(len)?;
                let entries: Vec<(u64, u32)> = (0..nr as usize)
                    .map(|i| {
                        let at = LEN_ATTACH_BACKING + i * LEN_MEM_ENTRY;
                        (f.u64(at), f.u32(at + 8))
                    })
                    .collect();
                self.attach(mem, f.u32(HDR_LEN), &entries)?;
                Ok(Response::NoData)
            }
            CMD_RESOURCE_DETACH_BACKING => {
                let f = need(LEN_DETACH_BACKING)?;
                let res = self
                    .resources
                    .get_mut(&f.u32(HDR_LEN))
                    .ok_or(CmdError::InvalidResource)?;
                res.backing.take().ok_or(CmdError::Unspec)?;
                self.dirty = true;
                Ok(Response::NoData)
            }
            CMD_SET_SCANOUT => {
                let f = need(LEN_SET_SCANOUT)?;
                self.set_scanout(
                    f.u32(HDR_LEN + 16),
                    f.u32(HDR_LEN + 20),
                    f.rect(HDR_LEN),
                    ops,
                )?;
                Ok(Response::NoData)
            }
            CMD_TRANSFER_TO_HOST_2D => {
                let f = need(LEN_TRANSFER_TO_HOST_2D)?;
                self.transfer(
                    mem,
                    f.u32(HDR_LEN + 24),
                    f.rect(HDR_LEN),
                    f.u64(HDR_LEN + 16),
                )?;
                Ok(Response::NoData)
            }
            CMD_RESOURCE_FLUSH => {
                let f = need(LEN_RESOURCE_FLUSH)?;
                self.flush(f.u32(HDR_LEN + 16), f.rect(HDR_LEN), ops)?;
                Ok(Response::NoData)
            }
            _ => Err(CmdError::Unspec),
        }
    }

    fn display_info(&self, req: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; LEN_RESP_DISPLAY_INFO];
        out[..HDR_LEN].copy_from_slice(&response_header(RESP_OK_DISPLAY_INFO, req));
        // pmodes[0]: rect (0, 0, width, height), enabled = 1, flags = 0.
        let at = HDR_LEN;
        out[at + 8..at + 12].copy_from_slice(&self.width.to_le_bytes());
        out[at + 12..at + 16].copy_from_slice(&self.height.to_le_bytes());
        out[at + 16..at + 20].copy_from_slice(&1u32.to_le_bytes());
        out
    }

    fn create(&mut self, id: u32, format: Format, width: u32, height: u32) -> Result<(), CmdError> {
        if id == 0 || self.resources.contains_key(&id) {
            return Err(CmdError::InvalidResource);
        }
        if width == 0 || height == 0 || width > MAX_DIM || height > MAX_DIM {
            return Err(CmdError::InvalidParameter);
        }
        let bytes = u64::from(width) * u64::from(height) * u64::from(BYTES_PER_PIXEL);
        if self.resources.len() >= MAX_RESOURCES || bytes > self.budget - self.used {
            return Err(CmdError::OutOfMemory);
        }
        let mut pixels = Vec::new();
        pixels
            .try_reserve_exact(bytes as usize)
            .map_err(|_| CmdError::OutOfMemory)?;
        pixels.resize(bytes as usize, 0);
        self.used += bytes;
        self.resources.insert(
            id,
            Resource {
                format,
                width,
                height,
                pixels,
                backing: None,
            },
        );
        self.dirty = true;
        Ok(())
    }

    fn unref(&mut self, id: u32, ops: &mut Vec<DisplayOp>) -> Result<(), CmdError> {
        let res = self
            .resources
            .remove(&id)
            .ok_or(CmdError::InvalidResource)?;
        self.used -= res.pixels.len() as u64;
        for (i, s) in self.scanouts.iter_mut().enumerate() {
            if s.resource == id {
                *s = Scanout::default();
                ops.push(DisplayOp::Scanout {
                    scanout: i as u32,
                    width: 0,
                    height: 0,
                });
            }
        }
        self.dirty = true;
        Ok(())
    }

    fn attach(&mut self, mem: &Memory, id: u32, raw: &[(u64, u32)]) -> Result<(), CmdError> {
        let res = self
            .resources
            .get_mut(&id)
            .ok_or(CmdError::InvalidResource)?;
        if res.backing.is_some() {
            return Err(CmdError::Unspec);
        }
        let mut entries = Vec::with_capacity(raw.len());
        let mut start = 0u64;
        for &(addr, len) in raw {
            let inside = addr.checked_add(u64::from(len)).is_some()
                && mem.check_range(GuestAddress(addr), len as usize);
            if !inside {
                return Err(CmdError::Unspec);
            }
            entries.push(Entry { addr, len, start });
            start += u64::from(len);
        }
        res.backing = Some(entries);
        self.dirty = true;
        Ok(())
    }

    fn set_scanout(
        &mut self,
        scanout: u32,
        id: u32,
        rect: Rect,
        ops: &mut Vec<DisplayOp>,
    ) -> Result<(), CmdError> {
        let slot = self
            .scanouts
            .get_mut(scanout as usize)
            .ok_or(CmdError::InvalidScanout)?;
        if id == 0 {
            *slot = Scanout::default();
            ops.push(DisplayOp::Scanout {
                scanout,
                width: 0,
                height: 0,
            });
            self.dirty = true;
            return Ok(());
        }
        let res = self.resources.get(&id).ok_or(CmdError::InvalidResource)?;
        if !rect.is_inside(res.width, res.height) {
            return Err(CmdError::InvalidParameter);
        }
        *slot = Scanout { resource: id, rect };
        ops.push(DisplayOp::Scanout {
            scanout,
            width: rect.width,
            height: rect.height,
        });
        self.dirty = true;
        Ok(())
    }

    fn transfer(&mut self, mem: &Memory, id: u32, r: Rect, offset: u64) -> Result<(), CmdError> {
        let res = self
            .resources
            .get_mut(&id)
            .ok_or(CmdError::InvalidResource)?;
        if !r.is_inside(res.width, res.height) {
            return Err(CmdError::InvalidParameter);
        }
        let backing_len = res.backing_len();
        let entries = res.backing.as_ref().ok_or(CmdError::Unspec)?;
        let stride = res.stride();
        let row = u64::from(r.width) * u64::from(BYTES_PER_PIXEL);
        // The source rows: `offset + stride * h` for h in 0..height, `row` bytes each.
        let last = stride
            .checked_mul(u64::from(r.height - 1))
            .and_then(|v| v.checked_add(offset))
            .and_then(|v| v.checked_add(row))
            .ok_or(CmdError::InvalidParameter)?;
        if last > backing_len {
            return Err(CmdError::InvalidParameter);
        }
        let dst0 = u64::from(r.y) * stride + u64::from(r.x) * u64::from(BYTES_PER_PIXEL);
        if r.x == 0 && r.width == res.width {
            // Whole rows: one contiguous copy.
            let len = (stride * u64::from(r.height)) as usize;
            let dst = dst0 as usize;
            return read_backing(mem, entries, offset, &mut res.pixels[dst..dst + len]);
        }
        for h in 0..u64::from(r.height) {
            let dst = (dst0 + h * stride) as usize;
            read_backing(
                mem,
                entries,
                offset + h * stride,
                &mut res.pixels[dst..dst + row as usize],
            )?;
        }
        Ok(())
    }

    fn flush(&mut self, id: u32, r: Rect, ops: &mut Vec<DisplayOp>) -> Result<(), CmdError> {
        let res = self.resources.get(&id).ok_or(CmdError::InvalidResource)?;
        if !r.is_inside(res.width, res.height) {
            return Err(CmdError::InvalidParameter);
        }
        for (i, s) in self.scanouts.iter().enumerate() {
            if s.resource != id {
                continue;
            }
            if let Some(part) = r.intersect(&s.rect) {
                ops.push(update(res, i as u32, &s.rect, &part));
            }
        }
        Ok(())
    }

    /// Runs one cursor-queue command. The cursor queue has no responses; a bad command is
    /// reported as an error for the caller to log and changes nothing.
    pub fn cursor(&mut self, req: &[u8]) -> Result<Vec<DisplayOp>, CmdError> {
        if req.len() < LEN_UPDATE_CURSOR {
            return Err(CmdError::InvalidParameter);
        }
        let f = Fields(req);
        let (scanout, x, y) = (f.u32(HDR_LEN), f.u32(HDR_LEN + 4), f.u32(HDR_LEN + 8));
        if scanout >= NUM_SCANOUTS {
            return Err(CmdError::InvalidScanout);
        }
        match f.u32(0) {
            // As QEMU does (and as Linux drives it): a move naming no resource hides the cursor.
            CMD_MOVE_CURSOR if f.u32(HDR_LEN + 16) == 0 => {
                Ok(vec![DisplayOp::CursorHide { scanout, x, y }])
            }
            CMD_MOVE_CURSOR => Ok(vec![DisplayOp::CursorMove { scanout, x, y }]),
            CMD_UPDATE_CURSOR => {
                let cursor = SavedCursor {
                    scanout,
                    x,
                    y,
                    resource: f.u32(HDR_LEN + 16),
                    hot_x: f.u32(HDR_LEN + 20),
                    hot_y: f.u32(HDR_LEN + 24),
                };
                let op = self.cursor_op(&cursor)?;
                self.cursor = Some(cursor);
                self.dirty = true;
                Ok(vec![op])
            }
            _ => Err(CmdError::Unspec),
        }
    }

    fn cursor_op(&self, c: &SavedCursor) -> Result<DisplayOp, CmdError> {
        if c.resource == 0 {
            return Ok(DisplayOp::CursorHide {
                scanout: c.scanout,
                x: c.x,
                y: c.y,
            });
        }
        let res = self
            .resources
            .get(&c.resource)
            .ok_or(CmdError::InvalidResource)?;
        if res.width != CURSOR_DIM || res.height != CURSOR_DIM {
            return Err(CmdError::InvalidParameter);
        }
        let mut data = Vec::with_capacity(CURSOR_BYTES);
        res.format.to_display(&res.pixels, &mut data);
        let image: Box<[u8; CURSOR_BYTES]> = data
            .into_boxed_slice()
            .try_into()
            .map_err(|_| CmdError::Unspec)?;
        Ok(DisplayOp::CursorUpdate {
            scanout: c.scanout,
            x: c.x,
            y: c.y,
            hot_x: c.hot_x,
            hot_y: c.hot_y,
            image,
        })
    }

    /// Everything a newly connected display needs to show what the guest shows now: each
    /// enabled scanout's size and whole picture, and the cursor.
    pub fn current_picture(&self) -> Vec<DisplayOp> {
        let mut ops = Vec::new();
        for (i, s) in self.scanouts.iter().enumerate() {
            let Some(res) = self.resources.get(&s.resource) else {
                continue;
            };
            ops.push(DisplayOp::Scanout {
                scanout: i as u32,
                width: s.rect.width,
                height: s.rect.height,
            });
            ops.push(update(res, i as u32, &s.rect, &s.rect));
        }
        if let Some(op) = self.cursor.as_ref().and_then(|c| self.cursor_op(c).ok()) {
            ops.push(op);
        }
        ops
    }

    /// The persistent part, for a restarted process.
    pub fn snapshot(&self, memory_id: Option<(u64, u64)>) -> Snapshot {
        Snapshot {
            version: Snapshot::VERSION,
            memory_id,
            resources: self
                .resources
                .iter()
                .map(|(&id, r)| SavedResource {
                    id,
                    format: r.format,
                    width: r.width,
                    height: r.height,
                    backing: r
                        .backing
                        .as_ref()
                        .map(|b| b.iter().map(|e| (e.addr, e.len)).collect()),
                })
                .collect(),
            scanouts: self.scanouts.iter().map(|s| (s.resource, s.rect)).collect(),
            cursor: self.cursor.clone(),
        }
    }

    /// Rebuilds the state a dead process had from its snapshot: resources, backing (checked
    /// against guest memory again), scanouts and cursor. The pixels are read back from each
    /// resource's backing in guest memory, which holds what the guest last drew. Entries that
    /// no longer validate are skipped. Returns how many resources were restored.
    pub fn restore(&mut self, mem: &Memory, snap: &Snapshot) -> usize {
        self.reset();
        for r in &snap.resources {
            if self.create(r.id, r.format, r.width, r.height).is_err() {
                log::warn!("restore: resource {} skipped (invalid)", r.id);
                continue;
            }
            if let Some(backing) = &r.backing {
                if self.attach(mem, r.id, backing).is_err() {
                    log::warn!(
                        "restore: backing of resource {} is not in guest memory",
                        r.id
                    );
                    continue;
                }
                let whole = Rect {
                    x: 0,
                    y: 0,
                    width: r.width,
                    height: r.height,
                };
                // A backing shorter than the resource: take the rows it has.
                let stride = u64::from(r.width) * u64::from(BYTES_PER_PIXEL);
                let have = self.resources.get(&r.id).map_or(0, |x| x.backing_len());
                let rows = u32::try_from((have / stride).min(u64::from(r.height))).unwrap_or(0);
                if rows > 0 {
                    let _ = self.transfer(
                        mem,
                        r.id,
                        Rect {
                            height: rows,
                            ..whole
                        },
                        0,
                    );
                }
            }
        }
        let mut ops = Vec::new();
        for (i, &(id, rect)) in snap.scanouts.iter().enumerate().take(NUM_SCANOUTS as usize) {
            if id != 0 && self.set_scanout(i as u32, id, rect, &mut ops).is_err() {
                log::warn!("restore: scanout {i} skipped");
            }
        }
        self.cursor = snap.cursor.clone();
        self.dirty = false;
        self.resources.len()
    }
}

/// An UPDATE for the part `part` (in resource coordinates) of a scanout showing `rect`.
fn update(res: &Resource, scanout: u32, rect: &Rect, part: &Rect) -> DisplayOp {
    let stride = res.stride() as usize;
    let bpp = BYTES_PER_PIXEL as usize;
    let row = part.width as usize * bpp;
    let mut data = Vec::with_capacity(row * part.height as usize);
    for y in part.y..part.y + part.height {
        let start = y as usize * stride + part.x as usize * bpp;
        res.format
            .to_display(&res.pixels[start..start + row], &mut data);
    }
    DisplayOp::Update {
        scanout,
        rect: Rect {
            x: part.x - rect.x,
            y: part.y - rect.y,
            width: part.width,
            height: part.height,
        },
        data,
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
