//! The EDID (VESA E-EDID 1.4 base block, 128 bytes) the display answers GET_EDID with, so a
//! guest driver that reads EDID picks `--width` x `--height` as its preferred mode.
//!
//! One detailed timing descriptor at 60 Hz with reduced blanking (the timings only need to be
//! plausible: no pixel is ever clocked out), a monitor name and range-limits descriptor.

/// Largest side a detailed timing descriptor can carry (12 bits).
pub const MAX_EDID_SIDE: u32 = 4095;

const H_BLANK: u32 = 160;
const H_FRONT: u32 = 48;
const H_SYNC: u32 = 32;
const V_BLANK: u32 = 23;
const V_FRONT: u32 = 3;
const V_SYNC: u32 = 6;

/// Manufacturer "ISO" in EDID's 5-bit letter code.
fn manufacturer() -> [u8; 2] {
    let letter = |c: u8| u16::from(c - b'A' + 1);
    let id = (letter(b'I') << 10) | (letter(b'S') << 5) | letter(b'O');
    id.to_be_bytes()
}

fn detailed_timing(width: u32, height: u32) -> [u8; 18] {
    let (w, h) = (width.min(MAX_EDID_SIDE), height.min(MAX_EDID_SIDE));
    let clock_10khz = u64::from(w + H_BLANK) * u64::from(h + V_BLANK) * 60 / 10_000;
    let clock = u16::try_from(clock_10khz.max(1)).unwrap_or(u16::MAX);
    // Image size at 96 dpi, in millimetres.
    let (mm_w, mm_h) = (w * 254 / 960, h * 254 / 960);
    let lo = |v: u32| (v & 0xff) as u8;
    let hi = |v: u32| ((v >> 8) & 0xf) as u8;
    let mut d = [0u8; 18];
    d[0..2].copy_from_slice(&clock.to_le_bytes());
    d[2] = lo(w);
    d[3] = lo(H_BLANK);
    d[4] = (hi(w) << 4) | hi(H_BLANK);
    d[5] = lo(h);
    d[6] = lo(V_BLANK);
    d[7] = (hi(h) << 4) | hi(V_BLANK);
    d[8] = lo(H_FRONT);
    d[9] = lo(H_SYNC);
    d[10] = ((V_FRONT as u8 & 0xf) << 4) | (V_SYNC as u8 & 0xf);
    d[11] = 0;
    d[12] = lo(mm_w);
    d[13] = lo(mm_h);
    d[14] = (hi(mm_w) << 4) | hi(mm_h);
    // Digital separate sync, +hsync, -vsync (as CVT reduced blanking).
    d[17] = 0x1a;
    d
}

fn text_descriptor(tag: u8, text: &str) -> [u8; 18] {
    let mut d = [0u8; 18];
    d[3] = tag;
    let mut field = [b' '; 13];
    let bytes = text.as_bytes();
    let n = bytes.len().min(12);
    field[..n].copy_from_slice(&bytes[..n]);
    field[n] = b'\n';
    d[5..18].copy_from_slice(&field);
    d
}

fn range_limits() -> [u8; 18] {
    let mut d = [0u8; 18];
    d[3] = 0xfd;
    d[5] = 50; // min vertical Hz
    d[6] = 75; // max vertical Hz
    d[7] = 30; // min horizontal kHz
    d[8] = 255; // max horizontal kHz
    d[9] = 255; // max pixel clock / 10 MHz
    d[10] = 0x01; // range limits only
    d[11] = b'\n';
    for b in &mut d[12..18] {
        *b = b' ';
    }
    d
}

/// The 128-byte EDID for a display whose preferred mode is `width` x `height`.
pub fn generate(width: u32, height: u32) -> [u8; 128] {
    let mut e = [0u8; 128];
    e[0..8].copy_from_slice(&[0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]);
    e[8..10].copy_from_slice(&manufacturer());
    e[10..12].copy_from_slice(&0x1234u16.to_le_bytes()); // product code
    e[12..16].copy_from_slice(&1u32.to_le_bytes()); // serial
    e[16] = 1; // week
    e[17] = 35; // year: 1990 + 35
    e[18] = 1; // EDID 1.4
    e[19] = 4;
    e[20] = 0xa5; // digital, 8 bits per colour, DisplayPort
    let w_cm = (width.min(MAX_EDID_SIDE) * 254 / 9600).clamp(1, 255);
    let h_cm = (height.min(MAX_EDID_SIDE) * 254 / 9600).clamp(1, 255);
    e[21] = w_cm as u8;
    e[22] = h_cm as u8;
    e[23] = 120; // gamma 2.2
    e[24] = 0x06; // RGB 4:4:4, sRGB default, preferred timing is native
                  // sRGB chromaticity.
    e[25..35].copy_from_slice(&[0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54]);
    // No established timings; standard timings unused (0x0101).
    for slot in e[38..54].chunks_mut(2) {
        slot.copy_from_slice(&[0x01, 0x01]);
    }
    e[54..72].copy_from_slice(&detailed_timing(width, height));
    e[72..90].copy_from_slice(&text_descriptor(0xfc, "Isola"));
    e[90..108].copy_from_slice(&range_limits());
    e[108..126].copy_from_slice(&text_descriptor(0xfe, "isola-display"));
    e[126] = 0; // no extensions
    let sum = e[..127].iter().fold(0u8, |s, b| s.wrapping_add(*b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

/// The preferred mode (width, height) a base block's first detailed timing describes.
pub fn preferred_mode(e: &[u8]) -> Option<(u32, u32)> {
    let d = e.get(54..72)?;
    if d[0] == 0 && d[1] == 0 {
        return None;
    }
    let w = u32::from(d[2]) | (u32::from(d[4] >> 4) << 8);
    let h = u32::from(d[5]) | (u32::from(d[7] >> 4) << 8);
    Some((w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_header_and_mode() {
        for (w, h) in [(1280, 800), (640, 480), (4095, 2160), (1, 1)] {
            let e = generate(w, h);
            assert_eq!(&e[..8], &[0, 255, 255, 255, 255, 255, 255, 0]);
            assert_eq!(e.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
            assert_eq!(preferred_mode(&e), Some((w, h)));
        }
    }
}
