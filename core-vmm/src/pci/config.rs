//! One PCI function's configuration space: the type 0 header, BARs and a capability list,
//! with per-bit write masks so that the guest can change only what hardware would let it.
//!
//! BAR sizing works as on hardware: the address bits below the BAR's size are read-only zero,
//! so writing all ones and reading back yields the size mask.

/// Size of a PCIe configuration space (ECAM gives 4 KiB per function).
pub const CONFIG_SPACE_SIZE: usize = 4096;
const DWORDS: usize = CONFIG_SPACE_SIZE / 4;
/// Capabilities live between the standard header and the end of the legacy 256 bytes.
const FIRST_CAPABILITY: usize = 0x40;
const LEGACY_CONFIG_END: usize = 0x100;

pub const REG_COMMAND: usize = 0x04;
const REG_BAR0: usize = 0x10;
const REG_CAPABILITIES: usize = 0x34;
const REG_INTERRUPT_LINE: usize = 0x3c;
pub const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAPABILITIES: u16 = 1 << 4;
const BAR_MEM64: u32 = 0b100;

/// Identity of a function, written once into its header.
#[derive(Debug, Clone, Copy)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
    pub revision: u8,
    /// Class code, subclass, programming interface.
    pub class: (u8, u8, u8),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {0} is not a usable BAR slot for this size")]
    BadBar(usize),
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes")]
    BadBarSize(u64),
    #[error("capability of {0} bytes does not fit in the configuration space")]
    NoRoomForCapability(usize),
}

/// A memory BAR as currently programmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    pub index: usize,
    pub size: u64,
    /// 64-bit (two registers) rather than 32-bit.
    pub wide: bool,
}

pub struct PciConfig {
    regs: Box<[u32; DWORDS]>,
    writable: Box<[u32; DWORDS]>,
    bars: Vec<Bar>,
    next_capability: usize,
    last_capability: Option<usize>,
}

impl PciConfig {
    pub fn new(ids: PciIds) -> Self {
        let mut config = PciConfig {
            regs: Box::new([0; DWORDS]),
            writable: Box::new([0; DWORDS]),
            bars: Vec::new(),
            next_capability: FIRST_CAPABILITY,
            last_capability: None,
        };
        config.regs[0] = u32::from(ids.vendor) | (u32::from(ids.device) << 16);
        let (class, subclass, prog_if) = ids.class;
        config.regs[2] = u32::from(ids.revision)
            | (u32::from(prog_if) << 8)
            | (u32::from(subclass) << 16)
            | (u32::from(class) << 24);
        config.regs[0x2c / 4] = u32::from(ids.subsystem_vendor) | (u32::from(ids.subsystem) << 16);
        let command_mask = COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        config.writable[REG_COMMAND / 4] = u32::from(command_mask);
        // Interrupt line is scratch space for the OS; interrupt pin 0 (no INTx, MSI-X only).
        config.writable[REG_INTERRUPT_LINE / 4] = 0xff;
        config
    }

    /// Declares a 64-bit memory BAR at `index` (using `index` and `index + 1`) at `addr`.
    pub fn add_bar64(&mut self, index: usize, size: u64, addr: u64) -> Result<(), ConfigError> {
        if index >= 5
            || self.bars.iter().any(|b| {
                b.index == index || b.index == index + 1 || (b.wide && b.index + 1 == index)
            })
        {
            return Err(ConfigError::BadBar(index));
        }
        if !size.is_power_of_two() || size < 16 {
            return Err(ConfigError::BadBarSize(size));
        }
        let reg = REG_BAR0 / 4 + index;
        let mask = !(size - 1);
        self.regs[reg] = (addr as u32 & mask as u32) | BAR_MEM64;
        self.regs[reg + 1] = (addr >> 32) as u32;
        self.writable[reg] = mask as u32 & !0xf;
        self.writable[reg + 1] = (mask >> 32) as u32;
        self.bars.push(Bar {
            index,
            size,
            wide: true,
        });
        Ok(())
    }

    /// Declares a 32-bit memory BAR at `index` at `addr` (below 4 GiB).
    pub fn add_bar32(&mut self, index: usize, size: u64, addr: u64) -> Result<(), ConfigError> {
        if index >= 6
            || self
                .bars
                .iter()
                .any(|b| b.index == index || (b.wide && b.index + 1 == index))
        {
            return Err(ConfigError::BadBar(index));
        }
        if !size.is_power_of_two() || !(16..=1 << 31).contains(&size) || addr >> 32 != 0 {
            return Err(ConfigError::BadBarSize(size));
        }
        let reg = REG_BAR0 / 4 + index;
        let mask = !(size - 1) as u32;
        self.regs[reg] = addr as u32 & mask;
        self.writable[reg] = mask & !0xf;
        self.bars.push(Bar {
            index,
            size,
            wide: false,
        });
        Ok(())
    }

    /// Current guest-programmed address of the 64-bit BAR at `index`.
    pub fn bar_addr(&self, index: usize) -> Option<u64> {
        let bar = self.bars.iter().find(|b| b.index == index)?;
        let reg = REG_BAR0 / 4 + index;
        let high = if bar.wide { self.regs[reg + 1] } else { 0 };
        Some((u64::from(high) << 32) | u64::from(self.regs[reg] & !0xf))
    }

    pub fn bars(&self) -> &[Bar] {
        &self.bars
    }

    pub fn memory_enabled(&self) -> bool {
        self.regs[REG_COMMAND / 4] as u16 & COMMAND_MEMORY != 0
    }

    /// Appends a capability whose body (after the id/next bytes) is `body`; `writable` gives
    /// per-byte write masks for the body. Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigError> {
        let len = (2 + body.len()).next_multiple_of(4);
        let offset = self.next_capability;
        if offset + len > LEGACY_CONFIG_END {
            return Err(ConfigError::NoRoomForCapability(len));
        }
        self.set_byte(offset, id);
        self.set_byte(offset + 1, 0);
        for (i, b) in body.iter().enumerate() {
            self.set_byte(offset + 2 + i, *b);
        }
        for (i, m) in writable.iter().enumerate().take(body.len()) {
            let at = offset + 2 + i;
            let shift = (at % 4) * 8;
            self.writable[at / 4] |= u32::from(*m) << shift;
        }
        match self.last_capability {
            Some(prev) => self.set_byte(prev + 1, offset as u8),
            None => {
                self.set_byte(REG_CAPABILITIES, offset as u8);
                self.regs[REG_COMMAND / 4] |= u32::from(STATUS_CAPABILITIES) << 16;
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = offset + len;
        Ok(offset)
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.regs[offset / 4];
        *reg = (*reg & !(0xff << shift)) | (u32::from(value) << shift);
    }

    /// Reads `data.len()` (1, 2 or 4) bytes at `offset`; out-of-range reads see all ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset + i;
            *byte = if at < CONFIG_SPACE_SIZE {
                (self.regs[at / 4] >> ((at % 4) * 8)) as u8
            } else {
                0xff
            };
        }
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        self.regs.get(offset / 4).copied().unwrap_or(u32::MAX)
    }

    /// Writes through the write masks; returns true if a BAR register changed.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> bool {
        let mut bar_changed = false;
        for (i, byte) in data.iter().enumerate() {
            let at = offset + i;
            if at >= CONFIG_SPACE_SIZE {
                break;
            }
            let shift = (at % 4) * 8;
            let mask = (self.writable[at / 4] >> shift) & 0xff;
            let old = self.regs[at / 4];
            let new = (old & !(mask << shift)) | ((u32::from(*byte) & mask) << shift);
            self.regs[at / 4] = new;
            if new != old && (REG_BAR0..REG_BAR0 + 24).contains(&at) {
                bar_changed = true;
            }
        }
        bar_changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
            revision: 1,
            class: (0x01, 0x80, 0x00),
        }
    }

    #[test]
    fn header_identity_is_read_only() {
        let mut config = PciConfig::new(ids());
        config.write(0, &[0xff; 4]);
        assert_eq!(config.read_u32(0), 0x1042_1af4);
        assert_eq!(config.read_u32(8) >> 8, 0x01_8000);
    }

    #[test]
    fn bar64_sizing_and_relocation() {
        let mut config = PciConfig::new(ids());
        config.add_bar64(0, 0x8000, 0xc000_0000).unwrap();
        assert_eq!(config.bar_addr(0), Some(0xc000_0000));
        assert_eq!(config.read_u32(0x10), 0xc000_0004);
        // Sizing: all ones in, size mask (with the 64-bit type bits) out.
        assert!(config.write(0x10, &[0xff; 4]));
        config.write(0x14, &[0xff; 4]);
        assert_eq!(config.read_u32(0x10), 0xffff_8004);
        assert_eq!(config.read_u32(0x14), 0xffff_ffff);
        config.write(0x10, &0xd000_0000u32.to_le_bytes());
        config.write(0x14, &1u32.to_le_bytes());
        assert_eq!(config.bar_addr(0), Some(0x1_d000_0000));
        assert!(!config.write(0x3c, &[5]), "interrupt line is not a BAR");
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut config = PciConfig::new(ids());
        assert_eq!(
            config.add_bar64(0, 0x3000, 0),
            Err(ConfigError::BadBarSize(0x3000))
        );
        config.add_bar64(0, 0x1000, 0).unwrap();
        assert_eq!(config.add_bar64(1, 0x1000, 0), Err(ConfigError::BadBar(1)));
        assert_eq!(config.add_bar64(5, 0x1000, 0), Err(ConfigError::BadBar(5)));
        assert_eq!(config.add_bar32(1, 0x1000, 0), Err(ConfigError::BadBar(1)));
        assert_eq!(
            config.add_bar32(2, 0x1000, 1 << 32),
            Err(ConfigError::BadBarSize(0x1000))
        );
    }

    #[test]
    fn bar32_sizing_and_relocation() {
        let mut config = PciConfig::new(ids());
        config.add_bar32(2, 0x1000, 0xc000_0000).unwrap();
        assert_eq!(config.read_u32(0x18), 0xc000_0000, "32-bit memory type");
        config.write(0x18, &[0xff; 4]);
        assert_eq!(config.read_u32(0x18), 0xffff_f000);
        config.write(0x1c, &[0xff; 4]);
        assert_eq!(config.read_u32(0x1c), 0, "the next register is no BAR");
        config.write(0x18, &0xd000_0000u32.to_le_bytes());
        assert_eq!(config.bar_addr(2), Some(0xd000_0000));
        config.add_bar64(3, 0x1000, 0).unwrap();
        assert_eq!(config.add_bar32(4, 0x1000, 0), Err(ConfigError::BadBar(4)));
    }

    #[test]
    fn capabilities_are_chained_with_their_write_masks() {
        let mut config = PciConfig::new(ids());
        let a = config.add_capability(0x09, &[1, 2, 3], &[0, 0, 0]).unwrap();
        let b = config.add_capability(0x11, &[0, 0], &[0, 0xc0]).unwrap();
        assert_eq!((a, b), (0x40, 0x48));
        let mut byte = [0u8];
        config.read(0x34, &mut byte);
        assert_eq!(byte[0], 0x40);
        config.read(0x41, &mut byte);
        assert_eq!(byte[0], 0x48);
        assert_ne!(
            config.read_u32(4) & (1 << 20),
            0,
            "status says capabilities"
        );
        config.write(0x4a, &[0xff, 0xff]);
        let mut two = [0u8; 2];
        config.read(0x4a, &mut two);
        assert_eq!(two, [0, 0xc0]);
    }

    #[test]
    fn out_of_range_access_is_harmless() {
        let mut config = PciConfig::new(ids());
        let mut data = [0u8; 4];
        config.read(CONFIG_SPACE_SIZE - 2, &mut data);
        assert_eq!(&data[2..], &[0xff, 0xff]);
        assert!(!config.write(CONFIG_SPACE_SIZE - 1, &[1, 2, 3, 4]));
    }
}
