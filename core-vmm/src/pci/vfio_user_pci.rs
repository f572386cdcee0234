//! A PCI function whose device model is a vfio-user server: the generic vfio-user frontend.
//!
//! The core owns what belongs to the machine and forwards the rest:
//!
//! | what | where it is handled |
//! |------|---------------------|
//! | BAR registers (0x10-0x27), the ROM BAR (0x30) | the core: it places every BAR in its MMIO window; the guest may move them |
//! | command register | both: the core decodes memory by its copy; the write is forwarded |
//! | interrupt pin | the core: 0 (MSI-X only, no INTx) |
//! | MSI-X Message Control | both: the core's copy switches the irqfds; the write is forwarded |
//! | the rest of configuration space | forwarded (region 7) |
//! | MSI-X table and PBA in their BAR | the core ([`super::msix`]): each vector is a KVM route and an irqfd the server was given with SET_IRQS |
//! | doorbells the server offers as ioeventfds (`ioeventfds=on`) | KVM: it signals the server's eventfd, no exit ([`super::vfio_ioevents`]) |
//! | the rest of each BAR | forwarded (regions 0-5) |
//!
//! Forwarded accesses go to the device's backend thread ([`super::vfio_backend`]); a read
//! waits there at most the exchange deadline, a write is posted, unless the device has
//! doorbell ioeventfds: then the vCPU waits for the write's answer (at most the deadline),
//! so a doorbell rung next cannot reach the server before the registers it depends on.
//! Nothing here talks to the server.

use std::ops::Range;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::backend::Shared;
use super::config::{PciConfig, PciIds, REG_COMMAND};
use super::msix::{self, Msix};
use super::vfio_backend::{self, DoorbellBar, Session, VfioBackendHandle};
use super::vfio_ioevents::IoEvents;
use super::{PciBus, PciDevice};
use crate::interrupts::InterruptRouter;
use crate::memory::GuestRam;
use crate::vfio_user::client::{VfioUserClient, VfioUserError};
use crate::vfio_user::wire::{self, RegionInfo};

/// BARs are given at least a page, so a guest never shares a page between two devices.
const MIN_BAR_SIZE: u64 = 0x1000;
/// The largest BAR the core places (its MMIO window is 512 MiB).
const MAX_BAR_SIZE: u64 = 256 << 20;
const REG_BAR0: usize = 0x10;
const REG_BAR_END: usize = 0x28;
const REG_ROM: usize = 0x30;
const REG_INTERRUPT_PIN: usize = 0x3d;
const REG_CAPABILITIES: usize = 0x34;
const STATUS_CAPABILITIES: u32 = 1 << 20;
/// Command bits the core keeps: memory decoding and bus mastering.
const COMMAND_OWNED: u16 = 0b110;
const LEGACY_CONFIG: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum VfioPciError {
    #[error(transparent)]
    Protocol(#[from] VfioUserError),
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    #[error(transparent)]
    Bus(#[from] super::PciError),
    #[error(transparent)]
    Msix(#[from] msix::MsixError),
    #[error(transparent)]
    Backend(#[from] vfio_backend::VfioBackendError),
    #[error("cannot duplicate an irqfd")]
    Dup(#[source] std::io::Error),
    #[error("the server's device: {0}")]
    Device(String),
}

/// Where the MSI-X structures live, from the server's capability.
#[derive(Debug, Clone)]
struct MsixLayout {
    cap: usize,
    table_bar: usize,
    table: Range<u64>,
    pba_bar: usize,
    pba: Range<u64>,
}

/// One BAR the core placed: its region's size on the server.
#[derive(Debug, Clone, Copy)]
struct BarRegion {
    index: usize,
    region_size: u64,
}

pub struct VfioUserPciDevice {
    config: PciConfig,
    bars: Vec<BarRegion>,
    msix: Option<(MsixLayout, Msix)>,
    /// The core's copy of MSI-X Message Control: enable and function mask.
    msix_control: u16,
    /// The server's doorbells, registered where the BARs decode.
    ioevents: Arc<IoEvents>,
    backend: VfioBackendHandle,
}

/// What a configuration snapshot says, read once at set-up.
struct Snapshot(Vec<u8>);

impl Snapshot {
    fn read(client: &mut VfioUserClient) -> Result<Snapshot, VfioUserError> {
        let mut bytes = vec![0u8; LEGACY_CONFIG];
        for (i, dword) in bytes.chunks_mut(4).enumerate() {
            client.region_read(wire::PCI_CONFIG_REGION, (i * 4) as u64, dword)?;
        }
        Ok(Snapshot(bytes))
    }
    fn u8(&self, at: usize) -> u8 {
        self.0.get(at).copied().unwrap_or(0)
    }
    fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.u8(at), self.u8(at + 1)])
    }
    fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes([
            self.u8(at),
            self.u8(at + 1),
            self.u8(at + 2),
            self.u8(at + 3),
        ])
    }

    /// The MSI-X capability, if the list has one (a looping list is cut after 48 entries).
    fn msix(&self) -> Option<MsixLayout> {
        if self.u32(REG_COMMAND) & STATUS_CAPABILITIES == 0 {
            return None;
        }
        let mut at = usize::from(self.u8(REG_CAPABILITIES) & 0xfc);
        for _ in 0..48 {
            if at < 0x40 || at + 12 > LEGACY_CONFIG {
                return None;
            }
            if self.u8(at) == msix::CAPABILITY_ID {
                let vectors = u64::from(self.u16(at + 2) & 0x7ff) + 1;
                let (table, pba) = (self.u32(at + 4), self.u32(at + 8));
                let table_start = u64::from(table & !7);
                let pba_start = u64::from(pba & !7);
                return Some(MsixLayout {
                    cap: at,
                    table_bar: (table & 7) as usize,
                    table: table_start..table_start + vectors * msix::ENTRY_SIZE as u64,
                    pba_bar: (pba & 7) as usize,
                    pba: pba_start..pba_start + vectors.div_ceil(64) * 8,
                });
            }
            at = usize::from(self.u8(at + 1) & 0xfc);
        }
        None
    }
}

impl VfioUserPciDevice {
    /// Sets up the device behind `client` (connected, negotiated): reads what it is, places
    /// its BARs on `bus`, wires MSI-X, maps guest RAM, and starts its backend thread.
    pub fn new(
        mut client: VfioUserClient,
        ram: Arc<GuestRam>,
        router: Arc<InterruptRouter>,
        bus: &mut PciBus,
        shared: Arc<Shared>,
        filter: Option<seccompiler::BpfProgram>,
        ioeventfds: bool,
    ) -> Result<Self, VfioPciError> {
        let info = client.device_info()?;
        if info.flags & wire::DEVICE_FLAGS_RESET != 0 {
            client.reset()?;
        }
        let regions = (0..info.num_regions)
            .map(|i| client.region_info(i))
            .collect::<Result<Vec<RegionInfo>, _>>()?;
        let snapshot = Snapshot::read(&mut client)?;
        // Identity only: the core's copy serves the BAR registers and decodes memory.
        let mut config = PciConfig::new(PciIds {
            vendor: snapshot.u16(0),
            device: snapshot.u16(2),
            subsystem_vendor: snapshot.u16(0x2c),
            subsystem: snapshot.u16(0x2e),
            revision: snapshot.u8(8),
            class: (snapshot.u8(0xb), snapshot.u8(0xa), snapshot.u8(9)),
        });
        let bars = place_bars(&snapshot, &regions, &mut config, bus)?;
        let layout = snapshot.msix();
        let irq = if layout.is_some() && info.num_irqs > wire::PCI_MSIX_IRQ {
            client.irq_info(wire::PCI_MSIX_IRQ)?
        } else {
            wire::IrqInfo { flags: 0, count: 0 }
        };
        let msix = match layout {
            Some(layout) if irq.count > 0 && irq.flags & wire::IRQ_INFO_EVENTFD != 0 => {
                let table_vectors =
                    (layout.table.end - layout.table.start) / msix::ENTRY_SIZE as u64;
                let vectors = table_vectors.min(u64::from(irq.count)).min(2048) as u16;
                Some((layout, Msix::new(vectors, Arc::clone(&router))?))
            }
            Some(_) => {
                log::warn!(
                    "{}: the device has an MSI-X capability but offers no MSI-X eventfds",
                    shared.name
                );
                None
            }
            None => None,
        };
        let irqfds = match &msix {
            Some((_, m)) => (0..m.len() as u16)
                .filter_map(|i| m.irqfd(i))
                .map(|fd| fd.try_clone().map_err(VfioPciError::Dup))
                .collect::<Result<Vec<EventFd>, _>>()?,
            None => Vec::new(),
        };
        let command = REG_COMMAND as u64;
        let mut replayed = Vec::new();
        replayed.push(command..command + 2);
        if let Some((layout, _)) = &msix {
            let control = layout.cap as u64 + 2;
            replayed.push(control..control + 2);
        }
        // Only the BARs whose doorbells are asked for (none unless `ioeventfds`).
        let bar_regions: Vec<DoorbellBar> = bars
            .iter()
            .filter(|_| ioeventfds)
            .map(|b| DoorbellBar {
                index: b.index,
                region_size: b.region_size,
                owned: msix
                    .iter()
                    .flat_map(|(l, _)| [(l.table_bar, &l.table), (l.pba_bar, &l.pba)])
                    .filter(|(bar, _)| *bar == b.index)
                    .map(|(_, r)| r.clone())
                    .collect(),
            })
            .collect();
        let doorbells = vfio_backend::doorbells(shared.name, &mut client, &bar_regions)?;
        let ioevents = Arc::new(IoEvents::new(shared.name, Arc::clone(&router), doorbells));
        let session = Session {
            ram,
            irqfds,
            info,
            regions,
            replayed,
            bars: bar_regions,
            ioevents: Arc::clone(&ioevents),
        };
        vfio_backend::prepare(&mut client, &session)?;
        log::info!(
            "{}: {:04x}:{:04x}, {} BAR(s), {} MSI-X vector(s)",
            shared.name,
            snapshot.u16(0),
            snapshot.u16(2),
            bars.len(),
            msix.as_ref().map_or(0, |(_, m)| m.len())
        );
        let backend = vfio_backend::start(client, session, shared, filter)?;
        Ok(VfioUserPciDevice {
            config,
            bars,
            msix,
            msix_control: 0,
            ioevents,
            backend,
        })
    }

    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.backend.shared)
    }

    fn msix_control_range(&self) -> Option<Range<usize>> {
        self.msix.as_ref().map(|(l, _)| l.cap + 2..l.cap + 4)
    }

    /// Overlays the core's own bits on a forwarded configuration read.
    fn overlay(&self, offset: usize, data: &mut [u8]) {
        let mut own = [0u8; 2];
        self.config.read(REG_COMMAND, &mut own);
        let command = u16::from_le_bytes(own);
        let control = self.msix_control_range();
        let control_bits = self.msix.as_ref().map(|_| self.msix_control);
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset + i;
            match at {
                4 => {
                    *byte = (*byte & !(COMMAND_OWNED as u8)) | (command as u8 & COMMAND_OWNED as u8)
                }
                REG_INTERRUPT_PIN => *byte = 0,
                _ => {}
            }
            if let (Some(range), Some(bits)) = (&control, control_bits) {
                if at == range.start + 1 {
                    // Enable (bit 15) and function mask (bit 14) are the core's.
                    *byte = (*byte & 0x3f) | ((bits >> 8) as u8 & 0xc0);
                }
            }
        }
    }

    fn bar_region(&self, bar: usize) -> Option<BarRegion> {
        self.bars.iter().copied().find(|b| b.index == bar)
    }
}

/// Places every memory BAR of the server's device in the core's MMIO window.
fn place_bars(
    snapshot: &Snapshot,
    regions: &[RegionInfo],
    config: &mut PciConfig,
    bus: &mut PciBus,
) -> Result<Vec<BarRegion>, VfioPciError> {
    let mut bars = Vec::new();
    let mut index = 0;
    while index < 6 {
        let register = snapshot.u32(REG_BAR0 + 4 * index);
        let wide = register & 0b111 == 0b100;
        let region = regions.get(index).copied();
        let step = if wide { 2 } else { 1 };
        let Some(region) = region.filter(|r| r.size > 0) else {
            index += step;
            continue;
        };
        if register & 1 != 0 {
            log::warn!(
                "vfio-user: BAR {index} is an I/O BAR, which the core does not forward; hidden"
            );
            index += 1;
            continue;
        }
        if region.flags & (wire::REGION_FLAG_READ | wire::REGION_FLAG_WRITE) == 0 {
            index += step;
            continue;
        }
        let size = region
            .size
            .checked_next_power_of_two()
            .filter(|s| *s <= MAX_BAR_SIZE)
            .ok_or_else(|| {
                VfioPciError::Device(format!(
                    "BAR {index} of {:#x} bytes is too large",
                    region.size
                ))
            })?
            .max(MIN_BAR_SIZE);
        let addr = bus.allocate_bar(size)?;
        if wide {
            config.add_bar64(index, size, addr)?;
        } else {
            config.add_bar32(index, size, addr)?;
        }
        bars.push(BarRegion {
            index,
            region_size: region.size,
        });
        index += step;
    }
    Ok(bars)
}

fn in_range(range: &Range<u64>, offset: u64, len: usize) -> bool {
    offset >= range.start && offset.saturating_add(len as u64) <= range.end
}

impl PciDevice for VfioUserPciDevice {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if (REG_BAR0..REG_BAR_END).contains(&offset) || (REG_ROM..REG_ROM + 4).contains(&offset) {
            self.config.read(offset, data);
            return;
        }
        if offset >= super::config::CONFIG_SPACE_SIZE {
            data.fill(0xff);
            return;
        }
        self.backend
            .read(wire::PCI_CONFIG_REGION, offset as u64, data);
        self.overlay(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        if (REG_BAR0..REG_BAR_END).contains(&offset) || (REG_ROM..REG_ROM + 4).contains(&offset) {
            self.config.write(offset, data);
            self.place_doorbells();
            return;
        }
        if offset >= super::config::CONFIG_SPACE_SIZE {
            return;
        }
        let end = offset + data.len();
        if offset < REG_COMMAND + 2 && end > REG_COMMAND {
            self.config.write(offset, data);
            self.place_doorbells();
        }
        if let Some(range) = self.msix_control_range() {
            if offset < range.end && end > range.start {
                // The core's copy: only the enable and function-mask bits are writable.
                let mut bytes = self.msix_control.to_le_bytes();
                for (i, b) in data.iter().enumerate() {
                    if let Some(k) = (offset + i).checked_sub(range.start).filter(|k| *k < 2) {
                        bytes[k] = *b;
                    }
                }
                let control = u16::from_le_bytes(bytes)
                    & (msix::CONTROL_ENABLE | msix::CONTROL_FUNCTION_MASK);
                self.set_msix_control(control);
            }
        }
        let wait = !self.ioevents.is_empty();
        self.backend
            .write(wire::PCI_CONFIG_REGION, offset as u64, data, wait);
    }

    fn bars(&self) -> Vec<(usize, u64, u64)> {
        if !self.config.memory_enabled() {
            return Vec::new();
        }
        self.config
            .bars()
            .iter()
            .filter_map(|b| Some((b.index, self.config.bar_addr(b.index)?, b.size)))
            .collect()
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if let Some((layout, msix)) = &self.msix {
            if bar == layout.table_bar && in_range(&layout.table, offset, data.len()) {
                return msix.table_read((offset - layout.table.start) as usize, data);
            }
            if bar == layout.pba_bar && in_range(&layout.pba, offset, data.len()) {
                return msix.pba_read((offset - layout.pba.start) as usize, data);
            }
        }
        match self.bar_region(bar) {
            Some(r) if in_range(&(0..r.region_size), offset, data.len()) => {
                self.backend.read(bar as u32, offset, data)
            }
            _ => data.fill(0xff),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if let Some((layout, msix)) = &mut self.msix {
            if bar == layout.table_bar && in_range(&layout.table, offset, data.len()) {
                if let Err(e) = msix.table_write((offset - layout.table.start) as usize, data) {
                    log::error!(
                        "{}: MSI-X table update failed: {e}",
                        self.backend.shared.name
                    );
                }
                return;
            }
            if bar == layout.pba_bar && in_range(&layout.pba, offset, data.len()) {
                return;
            }
        }
        if let Some(r) = self.bar_region(bar) {
            if in_range(&(0..r.region_size), offset, data.len()) {
                let wait = !self.ioevents.is_empty();
                self.backend.write(bar as u32, offset, data, wait);
            }
        }
    }
}

impl VfioUserPciDevice {
    /// Moves the doorbells to where the BARs decode now (a reconnect may bring doorbells
    /// where there were none, so this runs whatever the server offered).
    fn place_doorbells(&self) {
        let bars = self
            .bars()
            .into_iter()
            .map(|(i, addr, _)| (i, addr))
            .collect();
        self.ioevents.place(bars);
    }

    /// Keeps the core's Message Control (enable, function mask) and the irqfds in step.
    fn set_msix_control(&mut self, control: u16) {
        if let Some((_, msix)) = &mut self.msix {
            if let Err(e) = msix.set_control(control) {
                log::error!("{}: MSI-X update failed: {e}", self.backend.shared.name);
            }
        }
        self.msix_control = control;
    }
}
