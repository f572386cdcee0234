//! The EDID the device reports for its scanout (GET_EDID): one 128-byte EDID 1.4 base block
//! whose preferred (first detailed) timing is the resolution from the command line, so a
//! guest's mode list starts with the size the display expects.

/// Largest width or height an EDID detailed timing descriptor can express (12 bits).
pub const MAX_EDID_DIM: u32 = 4095;

/// Blanking (reduced-blanking style) and sync used for the detailed timing.
const H_BLANK: u32 = 160;
const V_BLANK: u32 = 30;
const REFRESH_HZ: u32 = 60;

/// The EDID block for a `width` x `height` display (both 1..=MAX_EDID_DIM).
pub fn edid(width: u32, height: u32) -> [u8; 128] {
    let mut e = [0u8; 128];
    e[0..8].copy_from_slice(&[0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]);
    // Manufacturer "ISO": three 5-bit letters (A = 1), big-endian.
    let letters = |c: u8| u16::from(c - b'A' + 1);
    let id = (letters(b'I') << 10) | (letters(b'S') << 5) | letters(b'O');
    e[8..10].copy_from_slice(&id.to_be_bytes());
    e[10..12].copy_from_slice(&1u16.to_le_bytes()); // product code
    e[16] = 1; // week
    e[17] = 34; // year 2024 (since 1990)
    e[18] = 1; // EDID 1.4
    e[19] = 4;
    e[20] = 0xa5; // digital, 8 bits per colour, DisplayPort
                  // Physical size in cm, as at 96 dpi.
    let cm = |px: u32| u8::try_from(px * 254 / 9600).unwrap_or(u8::MAX).max(1);
    e[21] = cm(width);
    e[22] = cm(height);
    e[23] = 120; // gamma 2.2
    e[24] = 0x06; // sRGB, preferred timing is native
    e[25..35].copy_from_slice(&[0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54]);
    for t in e[38..54].chunks_exact_mut(2) {
        t.copy_from_slice(&[0x01, 0x01]); // standard timings unused
    }
    e[54..72].copy_from_slice(&detailed_timing(width, height));
    // Monitor name.
    let mut name = [0u8; 18];
    name[3] = 0xfc;
    name[5..18].copy_from_slice(b"Isola\n       ");
    e[72..90].copy_from_slice(&name);
    // Two dummy descriptors.
    e[93] = 0x10;
    e[111] = 0x10;
    let sum = e[..127].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

fn detailed_timing(width: u32, height: u32) -> [u8; 18] {
    let (w, h) = (width.min(MAX_EDID_DIM), height.min(MAX_EDID_DIM));
    let clock_10khz = (w + H_BLANK) * (h + V_BLANK) * REFRESH_HZ / 10_000;
    let clock = u16::try_from(clock_10khz).unwrap_or(u16::MAX).max(1);
    let (h_sync_off, h_sync_w, v_sync_off, v_sync_w) = (48u32, 32u32, 3u32, 5u32);
    let mm = |px: u32| px * 254 / 960;
    let (wmm, hmm) = (mm(w).min(4095), mm(h).min(4095));
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
    d[8] = lo(h_sync_off);
    d[9] = lo(h_sync_w);
    d[10] = ((v_sync_off as u8 & 0xf) << 4) | (v_sync_w as u8 & 0xf);
    d[11] = 0;
    d[12] = lo(wmm);
    d[13] = lo(hmm);
    d[14] = (hi(wmm) << 4) | hi(hmm);
    d[17] = 0x1e; // digital separate sync, both polarities positive
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edid_is_valid_and_names_the_resolution() {
        for (w, h) in [(1280, 800), (640, 480), (4095, 2160), (1, 1)] {
            let e = edid(w, h);
            assert_eq!(&e[0..8], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
            assert_eq!(e.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
            let d = &e[54..72];
            assert_ne!(
                u16::from_le_bytes([d[0], d[1]]),
                0,
                "a timing, not a descriptor"
            );
            let hactive = u32::from(d[2]) | (u32::from(d[4] >> 4) << 8);
            let vactive = u32::from(d[5]) | (u32::from(d[7] >> 4) << 8);
            assert_eq!((hactive, vactive), (w, h));
        }
    }
}
