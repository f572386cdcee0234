//! The controller's PCI configuration space (vfio-user region 7): an xHCI function (class
//! 0C0330) with one 64-bit memory BAR and an MSI-X capability whose table and PBA are in
//! BAR 0. The frontend owns BAR placement; this only keeps what the guest wrote, masked to
//! the BAR's size, so a sizing probe reads back the size.

use crate::xhci::{BAR0_SIZE, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET};

pub const CONFIG_SIZE: usize = 256;
const MSIX_CAP: usize = 0x70;
pub const VENDOR_REDHAT: u16 = 0x1b36;
/// QEMU's xHCI device id; Linux binds xhci_hcd by class code, not by it.
pub const DEVICE_XHCI: u16 = 0x000d;

pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
}

impl Default for ConfigSpace {
    fn default() -> Self {
        let mut b = [0u8; CONFIG_SIZE];
        b[0..2].copy_from_slice(&VENDOR_REDHAT.to_le_bytes());
        b[2..4].copy_from_slice(&DEVICE_XHCI.to_le_bytes());
        b[6] = 0x10; // status: capability list
        b[8] = 1; // revision
        b[9..12].copy_from_slice(&[0x30, 0x03, 0x0c]);
        b[0x10] = 0x04; // BAR 0: 64-bit memory
        b[0x2c..0x30].copy_from_slice(&[0xf4, 0x1a, 0x00, 0x11]);
        b[0x34] = MSIX_CAP as u8;
        b[0x60] = 0x30; // SBRN: USB 3.0
        b[0x61] = 0x20; // FLADJ
                        // MSI-X: one vector, table and PBA in BAR 0.
        b[MSIX_CAP] = 0x11;
        b[MSIX_CAP + 4..MSIX_CAP + 8].copy_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes());
        b[MSIX_CAP + 8..MSIX_CAP + 12].copy_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes());
        ConfigSpace { bytes: b }
    }
}

impl ConfigSpace {
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> bool {
        match offset.checked_add(buf.len()) {
            Some(end) if end <= CONFIG_SIZE => {
                buf.copy_from_slice(&self.bytes[offset..end]);
                true
            }
            _ => false,
        }
    }

    /// Writes what is writable (command register, BAR 0, interrupt line, MSI-X enable and
    /// mask); the rest is read-only and ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> bool {
        let Some(end) = offset.checked_add(data.len()).filter(|&e| e <= CONFIG_SIZE) else {
            return false;
        };
        for (i, &byte) in (offset..end).zip(data) {
            let mask = match i {
                0x04 => 0x46, // memory space, bus master, parity error response
                0x05 => 0x05, // SERR, INTx disable
                0x10 => (!(BAR0_SIZE as u32 - 1) & 0xf0) as u8,
                0x11 => (!(BAR0_SIZE as u32 - 1) >> 8) as u8,
                0x12 => (!(BAR0_SIZE as u32 - 1) >> 16) as u8,
                0x13 => (!(BAR0_SIZE as u32 - 1) >> 24) as u8,
                0x14..=0x17 | 0x3c => 0xff,
                x if x == MSIX_CAP + 3 => 0xc0,
                _ => 0,
            };
            self.bytes[i] = (self.bytes[i] & !mask) | (byte & mask);
        }
        true
    }

    pub fn msix_enabled(&self) -> bool {
        self.bytes[MSIX_CAP + 3] & 0x80 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_sizing_and_read_only_fields() {
        let mut c = ConfigSpace::default();
        assert!(c.write(0x10, &[0xff; 8]));
        let mut bar = [0u8; 8];
        assert!(c.read(0x10, &mut bar));
        assert_eq!(u64::from_le_bytes(bar), 0xffff_ffff_ffff_0004);
        assert!(c.write(0, &[0; 4]));
        let mut id = [0u8; 4];
        c.read(0, &mut id);
        assert_eq!(id, [0x36, 0x1b, 0x0d, 0x00]);
        assert!(!c.write(250, &[0; 8]));
        assert!(!c.read(usize::MAX, &mut id));
        c.write(MSIX_CAP + 2, &[0, 0x80]);
        assert!(c.msix_enabled());
    }
}
