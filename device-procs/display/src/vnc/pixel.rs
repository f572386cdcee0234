//! RFB pixel formats: the display's XRGB words converted to whatever true-colour format a
//! client asked for with SetPixelFormat (8, 16 or 32 bits per pixel, either byte order).
//! Colour-map formats are refused: every client in use today asks for true colour.

/// An RFB PIXEL_FORMAT (RFC 6143 section 7.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelFormat {
    pub bits_per_pixel: u8,
    pub depth: u8,
    pub big_endian: bool,
    pub red_max: u16,
    pub green_max: u16,
    pub blue_max: u16,
    pub red_shift: u8,
    pub green_shift: u8,
    pub blue_shift: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{0} bits per pixel (only 8, 16 and 32 are valid)")]
    Bpp(u8),
    #[error("colour-map pixel formats are not supported")]
    ColourMap,
    #[error("a colour channel does not fit in the pixel (max {max}, shift {shift})")]
    Channel { max: u16, shift: u8 },
}

/// The display's own format: 32 bits, little endian, 8 bits per channel in XRGB order.
pub const NATIVE: PixelFormat = PixelFormat {
    bits_per_pixel: 32,
    depth: 24,
    big_endian: false,
    red_max: 255,
    green_max: 255,
    blue_max: 255,
    red_shift: 16,
    green_shift: 8,
    blue_shift: 0,
};

impl PixelFormat {
    /// Parses and checks the 16 bytes of a PIXEL_FORMAT.
    pub fn parse(b: &[u8; 16]) -> Result<PixelFormat, FormatError> {
        let be16 = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let pf = PixelFormat {
            bits_per_pixel: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            red_max: be16(4),
            green_max: be16(6),
            blue_max: be16(8),
            red_shift: b[10],
            green_shift: b[11],
            blue_shift: b[12],
        };
        if ![8, 16, 32].contains(&pf.bits_per_pixel) {
            return Err(FormatError::Bpp(pf.bits_per_pixel));
        }
        if b[3] == 0 {
            return Err(FormatError::ColourMap);
        }
        for (max, shift) in [
            (pf.red_max, pf.red_shift),
            (pf.green_max, pf.green_shift),
            (pf.blue_max, pf.blue_shift),
        ] {
            let bits = 16 - max.leading_zeros();
            if u32::from(shift) + bits > u32::from(pf.bits_per_pixel) {
                return Err(FormatError::Channel { max, shift });
            }
        }
        Ok(pf)
    }

    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.bits_per_pixel;
        b[1] = self.depth;
        b[2] = u8::from(self.big_endian);
        b[3] = 1;
        b[4..6].copy_from_slice(&self.red_max.to_be_bytes());
        b[6..8].copy_from_slice(&self.green_max.to_be_bytes());
        b[8..10].copy_from_slice(&self.blue_max.to_be_bytes());
        b[10] = self.red_shift;
        b[11] = self.green_shift;
        b[12] = self.blue_shift;
        b
    }

    pub fn bytes_per_pixel(&self) -> usize {
        usize::from(self.bits_per_pixel / 8)
    }

    /// The pixel value of XRGB `p` in this format.
    pub fn value(&self, p: u32) -> u32 {
        if *self == NATIVE {
            return p & 0x00ff_ffff;
        }
        let scale = |c: u32, max: u16| (c * u32::from(max) + 127) / 255;
        (scale((p >> 16) & 0xff, self.red_max) << self.red_shift)
            | (scale((p >> 8) & 0xff, self.green_max) << self.green_shift)
            | (scale(p & 0xff, self.blue_max) << self.blue_shift)
    }

    /// Appends pixels in this format.
    pub fn put_all(&self, out: &mut Vec<u8>, pixels: &[u32]) {
        if *self == NATIVE {
            out.reserve(pixels.len() * 4);
            for p in pixels {
                out.extend_from_slice(&p.to_le_bytes());
            }
            return;
        }
        for p in pixels {
            self.put(out, *p);
        }
    }

    /// Appends one pixel.
    pub fn put(&self, out: &mut Vec<u8>, p: u32) {
        let v = self.value(p);
        match (self.bits_per_pixel, self.big_endian) {
            (8, _) => out.push(v as u8),
            (16, false) => out.extend_from_slice(&(v as u16).to_le_bytes()),
            (16, true) => out.extend_from_slice(&(v as u16).to_be_bytes()),
            (_, false) => out.extend_from_slice(&v.to_le_bytes()),
            (_, true) => out.extend_from_slice(&v.to_be_bytes()),
        }
    }

    /// Which bytes of a pixel make up ZRLE's compressed pixel (CPIXEL): all of them, or the
    /// three that hold the colour when a 32-bit pixel's colour fits in 24 bits.
    pub fn cpixel_bytes(&self) -> std::ops::Range<usize> {
        if self.bits_per_pixel != 32 || self.depth > 24 {
            return 0..self.bytes_per_pixel();
        }
        let top = |max: u16, shift: u8| u32::from(shift) + (16 - max.leading_zeros());
        let high = [
            top(self.red_max, self.red_shift),
            top(self.green_max, self.green_shift),
            top(self.blue_max, self.blue_shift),
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        let low = self.red_shift.min(self.green_shift).min(self.blue_shift);
        let fits_low = high <= 24;
        let fits_high = low >= 8;
        match (fits_low, fits_high, self.big_endian) {
            (true, _, false) => 0..3,
            (true, _, true) => 1..4,
            (false, true, false) => 1..4,
            (false, true, true) => 0..3,
            (false, false, _) => 0..4,
        }
    }

    /// Appends one CPIXEL (`bytes` from [`Self::cpixel_bytes`]).
    pub fn put_c(&self, out: &mut Vec<u8>, p: u32, bytes: &std::ops::Range<usize>) {
        let v = self.value(p);
        let full = match (self.bits_per_pixel, self.big_endian) {
            (8, _) => [v as u8, 0, 0, 0],
            (16, false) => {
                let b = (v as u16).to_le_bytes();
                [b[0], b[1], 0, 0]
            }
            (16, true) => {
                let b = (v as u16).to_be_bytes();
                [b[0], b[1], 0, 0]
            }
            (_, false) => v.to_le_bytes(),
            (_, true) => v.to_be_bytes(),
        };
        out.extend_from_slice(&full[bytes.clone()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_roundtrips_and_is_identity() {
        assert_eq!(PixelFormat::parse(&NATIVE.to_bytes()), Ok(NATIVE));
        let mut out = Vec::new();
        NATIVE.put(&mut out, 0x0011_2233);
        assert_eq!(out, [0x33, 0x22, 0x11, 0]);
        assert_eq!(NATIVE.cpixel_bytes(), 0..3);
    }

    #[test]
    fn rgb565_big_endian() {
        let pf = PixelFormat {
            bits_per_pixel: 16,
            depth: 16,
            big_endian: true,
            red_max: 31,
            green_max: 63,
            blue_max: 31,
            red_shift: 11,
            green_shift: 5,
            blue_shift: 0,
        };
        assert_eq!(PixelFormat::parse(&pf.to_bytes()), Ok(pf));
        let mut out = Vec::new();
        pf.put(&mut out, 0x00ff_0000);
        assert_eq!(out, [0xf8, 0x00]);
        assert_eq!(pf.cpixel_bytes(), 0..2);
    }

    #[test]
    fn bad_formats_are_refused() {
        let mut b = NATIVE.to_bytes();
        b[0] = 24;
        assert_eq!(PixelFormat::parse(&b), Err(FormatError::Bpp(24)));
        let mut b = NATIVE.to_bytes();
        b[3] = 0;
        assert_eq!(PixelFormat::parse(&b), Err(FormatError::ColourMap));
        let mut b = NATIVE.to_bytes();
        b[10] = 30;
        assert!(matches!(
            PixelFormat::parse(&b),
            Err(FormatError::Channel { .. })
        ));
    }

    #[test]
    fn cpixel_of_high_bytes_format() {
        // Colour in the top three bytes of a little-endian word (shifts 24/16/8).
        let pf = PixelFormat {
            red_shift: 24,
            green_shift: 16,
            blue_shift: 8,
            ..NATIVE
        };
        assert_eq!(pf.cpixel_bytes(), 1..4);
        let mut out = Vec::new();
        pf.put_c(&mut out, 0x0011_2233, &pf.cpixel_bytes());
        assert_eq!(out, [0x33, 0x22, 0x11]);
    }
}
