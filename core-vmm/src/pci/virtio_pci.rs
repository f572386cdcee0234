//! The virtio 1.x PCI transport in front of a vhost-user backend.
//!
//! BAR 0 (64-bit, 32 KiB) holds every region the capabilities point at:
//!
//! | offset  | region |
//! |---------|--------|
//! | 0x0000  | common configuration (`virtio_pci_common_cfg`) |
//! | 0x1000  | ISR status |
//! | 0x2000  | device configuration (a cache of the backend's GET_CONFIG) |
//! | 0x3000  | notifications: queue n at 0x3000 + 4n, each a KVM ioeventfd |
//! | 0x4000  | MSI-X table |
//! | 0x6000  | MSI-X pending-bit array |
//!
//! Only the set-up path traps to the core: guest writes to the notify addresses are caught by
//! KVM ioeventfds the backend reads directly, and the backend signals MSI-X irqfds directly.
//!
//! This transport runs on vCPU threads and never talks to the backend itself: starting,
//! resetting and configuration writes are queued to the device's backend thread
//! ([`super::backend`]), and configuration reads answer from the cache it keeps.

use std::sync::Arc;
use std::time::Duration;

use kvm_ioctls::{IoEventAddress, NoDatamatch};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{self, Activation, BackendHandle, Job, QueueSpec, Shared};
use super::config::{PciConfig, PciIds, REG_COMMAND};
use super::msix::{self, Msix};
use super::PciDevice;
use crate::interrupts::InterruptRouter;
use crate::memory::GuestRam;
use crate::vhost_user::VhostUserConnection;
use crate::virtio::DeviceKind;

pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x40;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
const REGION_SIZE: u64 = 0x1000;

const VIRTIO_VENDOR: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_PCI: u8 = 5;
/// `queue_msix_vector` / `config_msix_vector` value meaning "no vector".
const NO_VECTOR: u16 = 0xffff;

const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 0x40;

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    #[error(transparent)]
    Msix(#[from] msix::MsixError),
    #[error(transparent)]
    VhostUser(#[from] crate::vhost_user::VhostUserError),
    #[error("cannot create a notify eventfd")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
}

pub use super::backend::Link;

#[derive(Debug, Clone, Copy)]
struct QueueState {
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueState {
    fn new(max: u16) -> Self {
        QueueState {
            size: max,
            vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

pub struct VirtioPciDevice {
    kind: DeviceKind,
    config: PciConfig,
    msix: Msix,
    msix_cap: usize,
    pci_cfg_cap: usize,
    backend: BackendHandle,
    router: Arc<InterruptRouter>,
    offered: u64,
    // Common configuration.
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_vector: u16,
    status: u8,
    /// What status reads show while a reset runs in the backend (the status before it).
    status_in_reset: u8,
    queue_select: u16,
    queues: Vec<QueueState>,
    notify: Vec<EventFd>,
    /// Address the notify ioeventfds are registered at, if any.
    notify_base: Option<u64>,
    /// Signalled when a queue has no MSI-X vector: the backend needs some call fd.
    no_vector: EventFd,
    active: bool,
}

/// How the transport reaches its backend thread.
pub struct BackendOptions {
    /// The deadline of one vhost-user exchange.
    pub timeout: Duration,
    /// The backend thread's seccomp filter.
    pub filter: Option<seccompiler::BpfProgram>,
}

/// Byte-wise read of a little-endian value of up to 8 bytes at `offset` within it.
fn read_le(value: u64, width: usize, offset: usize, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    for (i, out) in data.iter_mut().enumerate() {
        *out = if offset + i < width {
            bytes[offset + i]
        } else {
            0
        };
    }
}

/// Little-endian value of `data` (1, 2, 4 or 8 bytes).
fn le_value(data: &[u8]) -> u64 {
    data.iter()
        .rev()
        .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut body = vec![(16 + extra.len()) as u8, cfg_type, 0, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

impl VirtioPciDevice {
    /// A device in front of `backend` (connected and negotiated); the session moves to the
    /// device's backend thread, started here.
    pub fn new(
        kind: DeviceKind,
        num_queues: u16,
        mut backend: VhostUserConnection,
        ram: Arc<GuestRam>,
        router: Arc<InterruptRouter>,
        bar_addr: u64,
        options: BackendOptions,
    ) -> Result<Self, VirtioPciError> {
        let info = kind.info();
        let ids = PciIds {
            vendor: VIRTIO_VENDOR,
            device: VIRTIO_PCI_DEVICE_BASE + info.virtio_id,
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: 0x40,
            revision: 1,
            class: info.class,
        };
        let mut config = PciConfig::new(ids);
        config.add_bar64(0, BAR_SIZE, bar_addr)?;
        let none = [0u8; 20];
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(CFG_COMMON, COMMON_OFFSET, COMMON_SIZE, &[]),
            &none,
        )?;
        config.add_capability(CAP_VENDOR, &virtio_cap(CFG_ISR, ISR_OFFSET, 1, &[]), &none)?;
        let device_len = u64::from(info.config_size).max(1);
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(CFG_DEVICE, DEVICE_OFFSET, device_len, &[]),
            &none,
        )?;
        let notify_len = u64::from(num_queues) * u64::from(NOTIFY_MULTIPLIER);
        let multiplier = NOTIFY_MULTIPLIER.to_le_bytes();
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(CFG_NOTIFY, NOTIFY_OFFSET, notify_len, &multiplier),
            &none,
        )?;
        // VIRTIO_PCI_CAP_PCI_CFG: a window onto the BARs through config space; bar, offset,
        // length and data are the guest's to write.
        let pci_cfg_writable = [
            0, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff,
        ];
        let pci_cfg_cap = config.add_capability(
            CAP_VENDOR,
            &virtio_cap(CFG_PCI, 0, 0, &[0; 4]),
            &pci_cfg_writable,
        )?;
        let vectors = num_queues + 1;
        let mut msix_body = (vectors - 1).to_le_bytes().to_vec();
        msix_body.extend_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes());
        let msix_cap = config.add_capability(
            msix::CAPABILITY_ID,
            &msix_body,
            &[0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0],
        )?;
        let msix = Msix::new(vectors, Arc::clone(&router))?;
        let notify = (0..num_queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioPciError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        let mut device_config = backend.read_config(info.config_size)?;
        kind.fix_config(&mut device_config, num_queues);
        let offered = kind.offerable(backend.device_features());
        let backend = backend::start(
            kind,
            num_queues,
            backend,
            device_config,
            ram,
            options.timeout,
            options.filter,
        )?;
        let mut device = VirtioPciDevice {
            kind,
            config,
            msix,
            msix_cap,
            pci_cfg_cap,
            backend,
            router,
            offered,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_vector: NO_VECTOR,
            status: 0,
            status_in_reset: 0,
            queue_select: 0,
            queues: vec![QueueState::new(info.queue_size); num_queues as usize],
            notify,
            notify_base: None,
            no_vector: EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioPciError::EventFd)?,
            active: false,
        };
        device.sync_notify();
        Ok(device)
    }

    /// Keeps the notify ioeventfds at the BAR's current address (when memory decoding is on).
    fn sync_notify(&mut self) {
        let wanted = match (self.config.memory_enabled(), self.config.bar_addr(0)) {
            (true, Some(addr)) if addr != 0 => Some(addr + NOTIFY_OFFSET),
            _ => None,
        };
        if wanted == self.notify_base {
            return;
        }
        let vm = self.router.vm();
        if let Some(old) = self.notify_base.take() {
            for (i, fd) in self.notify.iter().enumerate() {
                let addr = IoEventAddress::Mmio(old + i as u64 * u64::from(NOTIFY_MULTIPLIER));
                if let Err(e) = vm.unregister_ioevent(fd, &addr, NoDatamatch) {
                    log::warn!("{}: cannot remove ioeventfd: {e}", self.kind.info().name);
                }
            }
        }
        if let Some(base) = wanted {
            for (i, fd) in self.notify.iter().enumerate() {
                let addr = IoEventAddress::Mmio(base + i as u64 * u64::from(NOTIFY_MULTIPLIER));
                if let Err(e) = vm.register_ioevent(fd, &addr, NoDatamatch) {
                    log::warn!(
                        "{}: cannot place ioeventfd at {base:#x}: {e}",
                        self.kind.info().name
                    );
                }
            }
            self.notify_base = Some(base);
        }
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let q = self.queues.get(self.queue_select as usize);
        let (value, width, base): (u64, usize, u64) = match offset {
            0x00..=0x03 => (u64::from(self.device_feature_select), 4, 0x00),
            0x04..=0x07 => {
                let shift = 32 * u64::from(self.device_feature_select.min(2));
                let features = if self.device_feature_select < 2 {
                    self.offered >> shift
                } else {
                    0
                };
                (features & 0xffff_ffff, 4, 0x04)
            }
            0x08..=0x0b => (u64::from(self.driver_feature_select), 4, 0x08),
            0x0c..=0x0f => {
                let shift = 32 * u64::from(self.driver_feature_select.min(1));
                let features = if self.driver_feature_select < 2 {
                    self.driver_features >> shift
                } else {
                    0
                };
                (features & 0xffff_ffff, 4, 0x0c)
            }
            0x10..=0x11 => (u64::from(self.config_vector), 2, 0x10),
            0x12..=0x13 => (self.queues.len() as u64, 2, 0x12),
            0x14 => (u64::from(self.read_status()), 1, 0x14),
            0x15 => (
                u64::from(self.backend.shared.lock().config_generation),
                1,
                0x15,
            ),
            0x16..=0x17 => (u64::from(self.queue_select), 2, 0x16),
            0x18..=0x19 => (q.map_or(0, |q| u64::from(q.size)), 2, 0x18),
            0x1a..=0x1b => (
                q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
                2,
                0x1a,
            ),
            0x1c..=0x1d => (q.map_or(0, |q| u64::from(q.enabled)), 2, 0x1c),
            0x1e..=0x1f => (u64::from(self.queue_select), 2, 0x1e),
            0x20..=0x27 => (q.map_or(0, |q| q.desc), 8, 0x20),
            0x28..=0x2f => (q.map_or(0, |q| q.driver), 8, 0x28),
            0x30..=0x37 => (q.map_or(0, |q| q.device), 8, 0x30),
            _ => (0, 0, offset),
        };
        read_le(value, width, (offset - base) as usize, data);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let value = le_value(data);
        let select = self.queue_select as usize;
        // Queue configuration is frozen once the driver is running, as the spec requires.
        let can_configure = !self.active;
        let set_half = |old: u64, at: u64, base: u64| {
            let shift = 8 * (at - base);
            let mask = (u64::MAX >> (64 - 8 * data.len() as u64)) << shift;
            (old & !mask) | ((value << shift) & mask)
        };
        match offset {
            0x00 => self.device_feature_select = value as u32,
            0x08 => self.driver_feature_select = value as u32,
            0x0c => {
                if self.driver_feature_select < 2 && self.status & STATUS_FEATURES_OK == 0 {
                    let shift = 32 * self.driver_feature_select;
                    let mask = 0xffff_ffffu64 << shift;
                    self.driver_features =
                        (self.driver_features & !mask) | (((value & 0xffff_ffff) << shift) & mask);
                }
            }
            0x10 => self.config_vector = self.checked_vector(value as u16),
            0x14 => self.write_status(value as u8),
            0x16 => self.queue_select = value as u16,
            0x18 if can_configure => {
                let max = self.kind.info().queue_size;
                if let Some(q) = self.queues.get_mut(select) {
                    let size = value as u16;
                    q.size = if size.is_power_of_two() && size <= max {
                        size
                    } else {
                        q.size
                    };
                }
            }
            0x1a => {
                let vector = self.checked_vector(value as u16);
                if let Some(q) = self.queues.get_mut(select) {
                    q.vector = vector;
                }
            }
            0x1c if can_configure => {
                if let Some(q) = self.queues.get_mut(select) {
                    q.enabled = value == 1;
                }
            }
            0x20..=0x37 if can_configure => {
                if let Some(q) = self.queues.get_mut(select) {
                    let (field, base) = match offset {
                        0x20..=0x27 => (&mut q.desc, 0x20),
                        0x28..=0x2f => (&mut q.driver, 0x28),
                        _ => (&mut q.device, 0x30),
                    };
                    *field = set_half(*field, offset, base);
                }
            }
            _ => log::debug!(
                "{}: ignored common config write at {offset:#x}",
                self.kind.info().name
            ),
        }
    }

    /// A vector the device cannot honour reads back as NO_VECTOR, as the spec asks.
    fn checked_vector(&self, vector: u16) -> u16 {
        if (vector as usize) < self.msix.len() {
            vector
        } else {
            NO_VECTOR
        }
    }

    /// The status register: the old value while a reset still runs in the backend (the
    /// driver re-reads it until it reads 0), DEVICE_NEEDS_RESET when starting failed.
    fn read_status(&self) -> u8 {
        let shared = self.backend.shared.lock();
        if shared.resetting {
            self.status_in_reset.max(1)
        } else if shared.needs_reset && self.status != 0 {
            self.status | STATUS_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn write_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        if self.backend.shared.lock().resetting {
            // The driver must wait for 0 before it writes anything else.
            log::debug!("{}: status write during a reset ignored", self.name());
            return;
        }
        let newly = status & !self.status;
        if newly & STATUS_FEATURES_OK != 0 && self.driver_features & !self.offered != 0 {
            log::warn!(
                "{}: driver accepted features {:#x} that were not offered",
                self.kind.info().name,
                self.driver_features & !self.offered
            );
            self.status = status & !STATUS_FEATURES_OK;
            return;
        }
        self.status = status;
        if newly & STATUS_DRIVER_OK != 0 && !self.active {
            match self.activation() {
                Ok(activation) => {
                    // Returns at once: the backend thread starts the device.
                    self.active = true;
                    self.backend.send(Job::Activate(activation));
                }
                Err(e) => {
                    log::error!("{}: cannot start the device: {e}", self.name());
                    self.backend.shared.lock().needs_reset = true;
                }
            }
        }
    }

    /// The queues the guest enabled, with duplicates of their kick and call eventfds for the
    /// backend thread.
    fn activation(&self) -> std::io::Result<Activation> {
        let queues = self
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.enabled)
            .map(|(i, q)| {
                let call = self.msix.irqfd(q.vector).unwrap_or(&self.no_vector);
                Ok(QueueSpec {
                    index: i as u16,
                    size: q.size,
                    desc: q.desc,
                    avail: q.driver,
                    used: q.device,
                    kick: self.notify[i].try_clone()?,
                    call: call.try_clone()?,
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Activation {
            features: self.driver_features,
            queues,
        })
    }

    /// Status 0: the transport's registers reset at once; the backend's part (stopping the
    /// queues, a fresh configuration) runs on the backend thread, and status reads stay
    /// non-zero until it is done or the backend was declared gone.
    fn reset(&mut self) {
        self.status_in_reset = self.status;
        self.backend.shared.lock().resetting = true;
        self.backend.send(Job::Reset);
        let max = self.kind.info().queue_size;
        self.queues
            .iter_mut()
            .for_each(|q| *q = QueueState::new(max));
        self.active = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.config_vector = NO_VECTOR;
        self.queue_select = 0;
    }

    pub fn name(&self) -> &'static str {
        self.kind.info().name
    }

    /// What the control thread reads for status.
    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.backend.shared)
    }

    /// A driver write to the device configuration: into the cache at once, forwarded to the
    /// backend by its thread, which then refreshes the cache (a write may change what the
    /// device shows, as virtio-input's select/subsel window does).
    fn device_config_write(&mut self, offset: u64, data: &[u8]) {
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        let Some(end) = start.checked_add(data.len()) else {
            return;
        };
        {
            let mut shared = self.backend.shared.lock();
            let Some(bytes) = shared.config.get_mut(start..end) else {
                return;
            };
            bytes.copy_from_slice(data);
            shared.config_pending = shared.config_pending.saturating_add(1);
        }
        self.backend.send(Job::WriteConfig {
            offset: offset as u32,
            data: data.to_vec(),
        });
    }

    /// A driver read of the device configuration, from the cache (after a write, once the
    /// backend refreshed it or the deadline passed).
    fn device_config_read(&self, offset: u64, data: &mut [u8]) {
        let shared = self.backend.shared.settled_config();
        let start = offset as usize;
        for (i, out) in data.iter_mut().enumerate() {
            *out = start
                .checked_add(i)
                .and_then(|at| shared.config.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Accesses through the VIRTIO_PCI_CAP_PCI_CFG window: `pci_cfg_data` reaches BAR 0.
    fn pci_cfg_window(&mut self, data: Option<&[u8]>, out: &mut [u8]) {
        let cap = self.pci_cfg_cap;
        let mut field = [0u8; 4];
        self.config.read(cap + 4, &mut field[..1]);
        let bar = field[0];
        self.config.read(cap + 8, &mut field);
        let offset = u64::from(u32::from_le_bytes(field));
        self.config.read(cap + 12, &mut field);
        let length = u32::from_le_bytes(field) as usize;
        if bar != 0 || !matches!(length, 1 | 2 | 4) {
            return;
        }
        match data {
            Some(bytes) => self.bar_write(0, offset, &bytes[..length.min(bytes.len())]),
            None => {
                let mut value = [0u8; 4];
                self.bar_read(0, offset, &mut value[..length]);
                out.copy_from_slice(&value[..out.len()]);
            }
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        let window = self.pci_cfg_cap + 16;
        if offset == window && data.len() == 4 {
            self.pci_cfg_window(None, data);
            return;
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        let window = self.pci_cfg_cap + 16;
        if offset == window && data.len() == 4 {
            self.pci_cfg_window(Some(data), &mut []);
            return;
        }
        self.config.write(offset, data);
        let control = self.msix_cap + 2;
        if offset < control + 2 && offset + data.len() > control {
            let mut bytes = [0u8; 2];
            self.config.read(control, &mut bytes);
            if let Err(e) = self.msix.set_control(u16::from_le_bytes(bytes)) {
                log::error!("{}: MSI-X update failed: {e}", self.kind.info().name);
            }
        }
        if offset < REG_COMMAND + 2 || (0x10..0x28).contains(&offset) {
            self.sync_notify();
        }
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

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.common_read(o - COMMON_OFFSET, data),
            ISR_OFFSET => {
                // With MSI-X the ISR is unused; reading it returns and clears nothing pending.
                data.fill(0);
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + REGION_SIZE).contains(&o) => {
                self.device_config_read(o - DEVICE_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.table_read((o - MSIX_TABLE_OFFSET) as usize, data)
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                self.msix.pba_read((o - MSIX_PBA_OFFSET) as usize, data)
            }
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.common_write(o - COMMON_OFFSET, data),
            o if (DEVICE_OFFSET..DEVICE_OFFSET + REGION_SIZE).contains(&o) => {
                self.device_config_write(o - DEVICE_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + REGION_SIZE).contains(&o) => {
                // Normally caught by the ioeventfd; reached only if KVM could not place it.
                let queue = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(fd) = self.notify.get(queue) {
                    let _ = fd.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                if let Err(e) = self
                    .msix
                    .table_write((o - MSIX_TABLE_OFFSET) as usize, data)
                {
                    log::error!("{}: MSI-X table update failed: {e}", self.kind.info().name);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn little_endian_helpers() {
        let mut out = [0u8; 2];
        read_le(0x1122_3344, 4, 1, &mut out);
        assert_eq!(out, [0x33, 0x22]);
        read_le(0xab, 1, 0, &mut out);
        assert_eq!(out, [0xab, 0]);
        assert_eq!(le_value(&[0x44, 0x33, 0x22, 0x11]), 0x1122_3344);
    }

    #[test]
    fn virtio_capabilities_have_the_spec_layout() {
        let cap = virtio_cap(CFG_NOTIFY, NOTIFY_OFFSET, 8, &4u32.to_le_bytes());
        // cap_len counts id/next too: 16 bytes + the multiplier.
        assert_eq!(cap[0], 20);
        assert_eq!(cap[1], CFG_NOTIFY);
        assert_eq!(u32::from_le_bytes(cap[6..10].try_into().unwrap()), 0x3000);
        assert_eq!(u32::from_le_bytes(cap[10..14].try_into().unwrap()), 8);
        assert_eq!(cap.len(), 18);
    }
}
