//! ZRLE (RFB encoding 16, RFC 6143 section 7.7.6): the rectangle is cut into 64 x 64 tiles,
//! each sent as a single colour, a packed palette (2 to 16 colours) or raw compressed pixels,
//! and everything goes through one zlib stream per connection (sync-flushed per rectangle).
//!
//! Why ZRLE: it is lossless (Tight's usual mode is JPEG) and the one compressed encoding that
//! TigerVNC, RealVNC, gtk-vnc, libvncclient, noVNC and vncdotool all decode.

use flate2::{Compress, Compression, FlushCompress};

use super::pixel::PixelFormat;
use crate::framebuffer::Rect;

const TILE: u32 = 64;
const MAX_PALETTE: usize = 16;

#[derive(Debug, thiserror::Error)]
#[error("zlib compression failed")]
pub struct ZrleError(#[from] flate2::CompressError);

/// One connection's ZRLE state: the zlib stream must continue across rectangles.
pub struct ZrleEncoder {
    z: Compress,
    raw: Vec<u8>,
}

impl Default for ZrleEncoder {
    fn default() -> Self {
        ZrleEncoder {
            z: Compress::new(Compression::fast(), true),
            raw: Vec::new(),
        }
    }
}

/// The colours of a tile, if there are at most 16.
fn palette(tile: impl Iterator<Item = u32>) -> Option<Vec<u32>> {
    let mut pal: Vec<u32> = Vec::with_capacity(MAX_PALETTE);
    for p in tile {
        if !pal.contains(&p) {
            if pal.len() == MAX_PALETTE {
                return None;
            }
            pal.push(p);
        }
    }
    Some(pal)
}

impl ZrleEncoder {
    /// Appends the encoded rectangle (`pixels` are `r.w * r.h` XRGB words): a u32 length
    /// and the zlib data.
    pub fn encode(
        &mut self,
        out: &mut Vec<u8>,
        r: Rect,
        pixels: &[u32],
        pf: &PixelFormat,
    ) -> Result<(), ZrleError> {
        self.raw.clear();
        let cbytes = pf.cpixel_bytes();
        // The display's own format with 3-byte CPIXELs: the common case, copied directly.
        let native = *pf == super::pixel::NATIVE && cbytes == (0..3);
        let width = r.w as usize;
        for ty in (0..r.h).step_by(TILE as usize) {
            let th = TILE.min(r.h - ty) as usize;
            for tx in (0..r.w).step_by(TILE as usize) {
                let tw = TILE.min(r.w - tx) as usize;
                let rows = (0..th).map(|row| {
                    let start = (ty as usize + row) * width + tx as usize;
                    &pixels[start..start + tw]
                });
                let tile = || rows.clone().flat_map(|row| row.iter().copied());
                match palette(tile()) {
                    Some(pal) if pal.len() == 1 => {
                        self.raw.push(1);
                        pf.put_c(&mut self.raw, pal[0], &cbytes);
                    }
                    Some(pal) => {
                        self.raw.push(pal.len() as u8);
                        for c in &pal {
                            pf.put_c(&mut self.raw, *c, &cbytes);
                        }
                        let bits = match pal.len() {
                            2 => 1,
                            3..=4 => 2,
                            _ => 4,
                        };
                        for row in rows.clone() {
                            let mut byte = 0u8;
                            let mut used = 0;
                            for p in row {
                                let index = pal.iter().position(|c| c == p).unwrap_or(0) as u8;
                                byte |= index << (8 - bits - used);
                                used += bits;
                                if used == 8 {
                                    self.raw.push(byte);
                                    byte = 0;
                                    used = 0;
                                }
                            }
                            if used > 0 {
                                self.raw.push(byte);
                            }
                        }
                    }
                    None if native => {
                        self.raw.push(0);
                        for row in rows {
                            for p in row {
                                self.raw.extend_from_slice(&p.to_le_bytes()[..3]);
                            }
                        }
                    }
                    None => {
                        self.raw.push(0);
                        for p in tile() {
                            pf.put_c(&mut self.raw, p, &cbytes);
                        }
                    }
                }
            }
        }
        self.compress(out)
    }

    fn compress(&mut self, out: &mut Vec<u8>) -> Result<(), ZrleError> {
        let len_at = out.len();
        out.extend_from_slice(&[0; 4]);
        let data_at = out.len();
        let mut consumed = 0usize;
        loop {
            out.reserve(self.raw.len() / 4 + 4096);
            let before = self.z.total_in();
            self.z
                .compress_vec(&self.raw[consumed..], out, FlushCompress::Sync)?;
            consumed += (self.z.total_in() - before) as usize;
            // The flush is complete once all input is taken and the output had room left.
            if consumed == self.raw.len() && out.len() < out.capacity() {
                break;
            }
        }
        let len = (out.len() - data_at) as u32;
        out[len_at..data_at].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vnc::pixel::NATIVE;
    use flate2::{Decompress, FlushDecompress};

    fn inflate(d: &mut Decompress, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 << 20);
        d.decompress_vec(data, &mut out, FlushDecompress::Sync)
            .unwrap();
        out
    }

    #[test]
    fn solid_palette_and_raw_tiles() {
        let mut enc = ZrleEncoder::default();
        let mut dec = Decompress::new(true);
        // 65 x 1: a full tile and a 1-pixel tile.
        let mut px = vec![0x0000_00ffu32; 64];
        px.push(0x0012_3456);
        let mut out = Vec::new();
        enc.encode(&mut out, Rect::new(0, 0, 65, 1), &px, &NATIVE)
            .unwrap();
        let len = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
        assert_eq!(out.len(), 4 + len);
        let raw = inflate(&mut dec, &out[4..]);
        assert_eq!(raw, [1, 0xff, 0, 0, 1, 0x56, 0x34, 0x12]);

        // Two colours: a packed palette, 1 bit per pixel, rows padded.
        let px = vec![0, 0x00ff_ffff, 0x00ff_ffff];
        let mut out = Vec::new();
        enc.encode(&mut out, Rect::new(0, 0, 3, 1), &px, &NATIVE)
            .unwrap();
        let raw = inflate(&mut dec, &out[4..]);
        assert_eq!(raw, [2, 0, 0, 0, 0xff, 0xff, 0xff, 0b0110_0000]);

        // Seventeen colours: raw CPIXELs.
        let px: Vec<u32> = (0..17).collect();
        let mut out = Vec::new();
        enc.encode(&mut out, Rect::new(0, 0, 17, 1), &px, &NATIVE)
            .unwrap();
        let raw = inflate(&mut dec, &out[4..]);
        assert_eq!(raw.len(), 1 + 17 * 3);
        assert_eq!(raw[0], 0);
        assert_eq!(&raw[1..7], &[0, 0, 0, 1, 0, 0]);
    }
}
