//! PCI: one bus (bus 0) behind a host bridge, reached through configuration mechanism #1
//! (ports 0xcf8/0xcfc) and through ECAM in the MMIO hole.
//!
//! Slot 0 is the host bridge; devices take slots 1 up, function 0 each. BAR accesses are
//! dispatched by address to the device whose BAR (as the guest last programmed it, with memory
//! decoding on) contains it.

pub mod backend;
pub mod config;
pub mod msix;
mod retry;
pub mod vfio_backend;
pub mod vfio_ioevents;
pub mod vfio_user_pci;
pub mod virtio_pci;

use std::sync::{Arc, Mutex, RwLock};

use config::{PciConfig, PciIds};

use crate::layout;

const CONF1_ADDRESS_PORT: u16 = 0xcf8;
const CONF1_DATA_PORT: u16 = 0xcfc;
const CONF1_ENABLE: u32 = 1 << 31;
/// Devices per bus.
pub const MAX_SLOTS: usize = 32;

/// A PCI function as the bus sees it.
pub trait PciDevice: Send {
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// (BAR index, address, size) of every BAR that currently decodes.
    fn bars(&self) -> Vec<(usize, u64, u64)>;
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// The host bridge at 00:00.0: identity only.
struct HostBridge(PciConfig);

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.0.read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.0.write(offset, data);
    }
    fn bars(&self) -> Vec<(usize, u64, u64)> {
        Vec::new()
    }
    fn bar_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
}

#[derive(Debug, Clone, Copy)]
struct BarMapping {
    start: u64,
    size: u64,
    slot: usize,
    bar: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("the PCI bus is full ({MAX_SLOTS} slots)")]
    Full,
    #[error("the PCI MMIO window has no room for a BAR of {0:#x} bytes")]
    NoBarSpace(u64),
}

pub struct PciBus {
    slots: Vec<Arc<Mutex<dyn PciDevice>>>,
    bars: RwLock<Vec<BarMapping>>,
    conf1_address: Mutex<u32>,
    next_bar: u64,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    pub fn new() -> Self {
        let bridge = PciConfig::new(PciIds {
            vendor: 0x1b36,
            device: 0x0008,
            subsystem_vendor: 0x1b36,
            subsystem: 0,
            revision: 0,
            class: (0x06, 0x00, 0x00),
        });
        PciBus {
            slots: vec![Arc::new(Mutex::new(HostBridge(bridge)))],
            bars: RwLock::new(Vec::new()),
            conf1_address: Mutex::new(0),
            next_bar: layout::PCI_MMIO_START,
        }
    }

    /// Reserves a naturally aligned range of `size` bytes for a BAR.
    pub fn allocate_bar(&mut self, size: u64) -> Result<u64, PciError> {
        let addr = self.next_bar.next_multiple_of(size);
        if addr + size > layout::PCI_MMIO_END {
            return Err(PciError::NoBarSpace(size));
        }
        self.next_bar = addr + size;
        Ok(addr)
    }

    /// Plugs `device` into the next free slot; returns the slot.
    pub fn add(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> Result<usize, PciError> {
        if self.slots.len() >= MAX_SLOTS {
            return Err(PciError::Full);
        }
        self.slots.push(device);
        self.remap();
        Ok(self.slots.len() - 1)
    }

    fn device(&self, slot: usize) -> Option<std::sync::MutexGuard<'_, dyn PciDevice + 'static>> {
        self.slots
            .get(slot)
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Rebuilds the address -> BAR map after a configuration write.
    fn remap(&self) {
        let mut map = Vec::new();
        for slot in 0..self.slots.len() {
            if let Some(device) = self.device(slot) {
                for (bar, start, size) in device.bars() {
                    map.push(BarMapping {
                        start,
                        size,
                        slot,
                        bar,
                    });
                }
            }
        }
        *self.bars.write().unwrap_or_else(|p| p.into_inner()) = map;
    }

    fn config_access(
        &self,
        slot: usize,
        function: usize,
        offset: usize,
        write: Option<&[u8]>,
        read: &mut [u8],
    ) {
        let device = if function == 0 {
            self.device(slot)
        } else {
            None
        };
        match (device, write) {
            (Some(mut device), Some(data)) => {
                device.config_write(offset, data);
                drop(device);
                self.remap();
            }
            (Some(mut device), None) => device.config_read(offset, read),
            (None, _) => read.fill(0xff),
        }
    }

    /// Port I/O at 0xcf8-0xcff; returns false if the port is not PCI's.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        match port {
            CONF1_ADDRESS_PORT if data.len() == 4 => {
                let address = *self.conf1_address.lock().unwrap_or_else(|p| p.into_inner());
                data.copy_from_slice(&address.to_le_bytes());
            }
            CONF1_DATA_PORT..=0xcff => match self.conf1_target(port) {
                Some((slot, function, offset)) => {
                    self.config_access(slot, function, offset, None, data)
                }
                None => data.fill(0xff),
            },
            CONF1_ADDRESS_PORT..=0xcfb => data.fill(0xff),
            _ => return false,
        }
        true
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        match port {
            CONF1_ADDRESS_PORT if data.len() == 4 => {
                let value = u32::from_le_bytes(data.try_into().expect("length checked"));
                *self.conf1_address.lock().unwrap_or_else(|p| p.into_inner()) = value;
            }
            CONF1_DATA_PORT..=0xcff => {
                if let Some((slot, function, offset)) = self.conf1_target(port) {
                    self.config_access(slot, function, offset, Some(data), &mut []);
                }
            }
            CONF1_ADDRESS_PORT..=0xcfb => {}
            _ => return false,
        }
        true
    }

    /// (slot, function, register offset) the current conf1 address selects on bus 0.
    fn conf1_target(&self, port: u16) -> Option<(usize, usize, usize)> {
        let address = *self.conf1_address.lock().unwrap_or_else(|p| p.into_inner());
        if address & CONF1_ENABLE == 0 || (address >> 16) & 0xff != 0 {
            return None;
        }
        let slot = ((address >> 11) & 0x1f) as usize;
        let function = ((address >> 8) & 0x7) as usize;
        let offset = (address & 0xfc) as usize + usize::from(port - CONF1_DATA_PORT);
        Some((slot, function, offset))
    }

    /// MMIO inside ECAM or a BAR; returns false if nothing on the bus claims the address.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        if let Some((slot, function, offset)) = ecam_target(addr) {
            self.config_access(slot, function, offset, None, data);
            return true;
        }
        match self.bar_at(addr) {
            Some(m) => {
                if let Some(mut device) = self.device(m.slot) {
                    device.bar_read(m.bar, addr - m.start, data);
                }
                true
            }
            None => false,
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        if let Some((slot, function, offset)) = ecam_target(addr) {
            self.config_access(slot, function, offset, Some(data), &mut []);
            return true;
        }
        match self.bar_at(addr) {
            Some(m) => {
                if let Some(mut device) = self.device(m.slot) {
                    device.bar_write(m.bar, addr - m.start, data);
                }
                true
            }
            None => false,
        }
    }

    fn bar_at(&self, addr: u64) -> Option<BarMapping> {
        let map = self.bars.read().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .copied()
            .find(|m| addr >= m.start && addr - m.start < m.size)
    }
}

/// (slot, function, offset) for an address in bus 0's ECAM window.
fn ecam_target(addr: u64) -> Option<(usize, usize, usize)> {
    let offset = addr.checked_sub(layout::PCI_ECAM_START)?;
    if offset >= layout::PCI_ECAM_SIZE {
        return None;
    }
    Some((
        (offset >> 15) as usize & 0x1f,
        (offset >> 12) as usize & 0x7,
        offset as usize & 0xfff,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        config: PciConfig,
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl PciDevice for Fake {
        fn config_read(&mut self, offset: usize, data: &mut [u8]) {
            self.config.read(offset, data);
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data);
        }
        fn bars(&self) -> Vec<(usize, u64, u64)> {
            if !self.config.memory_enabled() {
                return Vec::new();
            }
            vec![(0, self.config.bar_addr(0).unwrap(), 0x1000)]
        }
        fn bar_read(&mut self, _: usize, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn bar_write(&mut self, _: usize, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn bus_with_fake() -> PciBus {
        let mut bus = PciBus::new();
        let addr = bus.allocate_bar(0x1000).unwrap();
        let mut config = PciConfig::new(PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            subsystem_vendor: 0,
            subsystem: 0,
            revision: 0,
            class: (1, 0, 0),
        });
        config.add_bar64(0, 0x1000, addr).unwrap();
        bus.add(Arc::new(Mutex::new(Fake {
            config,
            last_write: None,
        })))
        .unwrap();
        bus
    }

    fn conf1_read(bus: &PciBus, slot: u32, offset: u32) -> u32 {
        bus.pio_write(0xcf8, &(CONF1_ENABLE | (slot << 11) | offset).to_le_bytes());
        let mut data = [0u8; 4];
        bus.pio_read(0xcfc, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn conf1_and_ecam_see_the_same_functions() {
        let bus = bus_with_fake();
        assert_eq!(conf1_read(&bus, 0, 0), 0x0008_1b36);
        assert_eq!(conf1_read(&bus, 1, 0), 0x1042_1af4);
        assert_eq!(conf1_read(&bus, 2, 0), 0xffff_ffff, "empty slot");
        let mut data = [0u8; 4];
        bus.mmio_read(layout::PCI_ECAM_START + (1 << 15), &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x1042_1af4);
        bus.mmio_read(layout::PCI_ECAM_START + (1 << 15) + (1 << 12), &mut data);
        assert_eq!(data, [0xff; 4], "function 1 does not exist");
        // Disabled conf1 address: all ones.
        bus.pio_write(0xcf8, &(1u32 << 11).to_le_bytes());
        bus.pio_read(0xcfc, &mut data);
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.pio_read(0x3f8, &mut data), "not a PCI port");
    }

    #[test]
    fn bars_decode_only_when_memory_is_enabled_and_follow_relocation() {
        let bus = bus_with_fake();
        let bar = layout::PCI_MMIO_START;
        let mut data = [0u8; 1];
        assert!(
            !bus.mmio_read(bar + 5, &mut data),
            "memory decoding is off at reset"
        );
        let select =
            |reg: u32| bus.pio_write(0xcf8, &(CONF1_ENABLE | (1 << 11) | reg).to_le_bytes());
        select(4);
        bus.pio_write(0xcfc, &[0x02]);
        assert!(bus.mmio_read(bar + 5, &mut data));
        assert_eq!(data[0], 5);
        select(0x10);
        bus.pio_write(0xcfc, &((bar + 0x10_0000) as u32).to_le_bytes());
        assert!(!bus.mmio_read(bar + 5, &mut data), "moved away");
        assert!(bus.mmio_write(bar + 0x10_0000 + 8, &[1, 2]));
    }

    #[test]
    fn bar_space_runs_out_cleanly() {
        let mut bus = PciBus::new();
        assert!(bus.allocate_bar(1 << 40).is_err());
    }
}
