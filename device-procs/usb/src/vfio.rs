//! The device behind the `vfio_user` crate's server: region 0 is the xHCI BAR, region 7 the
//! configuration space, IRQ index 2 MSI-X (one vector); DMA maps become [`DmaMemory`].
//! Every call checks its arguments again (the gate checked them first) and answers bad
//! ones with an error, never a panic.

use std::fs::File;
use std::io::{Error, ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_DMA_UNMAP_FLAG_ALL, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_TYPE_MASK, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_IRQ_SET_DATA_TYPE_MASK, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, ServerBackend, ServerRegion};

use crate::mem::DmaMemory;
use crate::pci::{ConfigSpace, CONFIG_SIZE};
use crate::state::Marker;
use crate::usb::UsbDevice;
use crate::xhci::{Controller, BAR0_SIZE};

pub const BAR0: u32 = 0;
pub const CONFIG: u32 = VFIO_PCI_CONFIG_REGION_INDEX;

/// The size of region `index` (0 for the regions this device does not have).
pub fn region_size(index: u32) -> u64 {
    match index {
        BAR0 => BAR0_SIZE,
        CONFIG => CONFIG_SIZE as u64,
        _ => 0,
    }
}

/// The region table the crate's server answers DEVICE_GET_REGION_INFO from.
pub fn regions() -> Vec<ServerRegion> {
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let size = region_size(index);
            let flags = if size > 0 {
                VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
            } else {
                0
            };
            ServerRegion {
                region_info: vfio_region_info {
                    argsz: std::mem::size_of::<vfio_region_info>() as u32,
                    flags,
                    index,
                    cap_offset: 0,
                    size,
                    offset: 0,
                },
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        })
        .collect()
}

/// The IRQ table: only MSI-X, one vector.
pub fn irqs() -> Vec<IrqInfo> {
    (0..VFIO_PCI_NUM_IRQS)
        .map(|index| IrqInfo {
            index,
            flags: if index == VFIO_PCI_MSIX_IRQ_INDEX {
                VFIO_IRQ_INFO_EVENTFD
            } else {
                0
            },
            count: u32::from(index == VFIO_PCI_MSIX_IRQ_INDEX),
        })
        .collect()
}

pub struct Device {
    pub ctl: Controller<DmaMemory>,
    config: ConfigSpace,
    irq: Arc<Mutex<Option<File>>>,
    marker: Arc<Mutex<Marker>>,
    /// The guest memory a killed predecessor had running (see `state`).
    resume_hse: Option<(u64, u64)>,
    /// Host System Error was reported for a restart and the guest has not yet started the
    /// controller again: a DEVICE_RESET from the frontend (which may come after its DMA
    /// maps) must not clear it, or the guest's driver would never learn of the restart.
    restart_pending: Arc<AtomicBool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn invalid(what: String) -> Error {
    log::warn!("vfio-user: {what}");
    Error::new(ErrorKind::InvalidInput, what)
}

impl Device {
    pub fn new(
        devices: Vec<Option<Box<dyn UsbDevice>>>,
        marker: Marker,
        resume_hse: Option<(u64, u64)>,
    ) -> Device {
        let mut ctl = Controller::new(DmaMemory::default(), devices);
        let irq: Arc<Mutex<Option<File>>> = Arc::default();
        let fd = Arc::clone(&irq);
        ctl.set_irq(Some(Box::new(move || {
            if let Some(mut f) = lock(&fd).as_ref() {
                if let Err(e) = f.write_all(&1u64.to_ne_bytes()) {
                    log::warn!("cannot signal the MSI-X eventfd: {e}");
                }
            }
        })));
        let marker = Arc::new(Mutex::new(marker));
        let m = Arc::clone(&marker);
        let restart_pending = Arc::new(AtomicBool::new(false));
        let pending = Arc::clone(&restart_pending);
        ctl.set_on_run(Box::new(move |running| {
            if running {
                pending.store(false, Ordering::Relaxed);
            }
            lock(&m).save(running)
        }));
        Device {
            ctl,
            config: ConfigSpace::default(),
            irq,
            marker,
            resume_hse,
            restart_pending,
        }
    }

    /// The frontend went away: forget its memory and eventfd, reset the controller.
    pub fn disconnect(&mut self) {
        *lock(&self.irq) = None;
        self.ctl.reset();
        self.ctl.mem_mut().clear();
        self.config = ConfigSpace::default();
        lock(&self.marker).memory = None;
    }
}

/// What the crate's server calls: the device behind a lock shared with the control thread.
pub struct Backend(pub Arc<Mutex<Device>>);

fn bar_access(offset: u64, len: usize) -> Result<(), Error> {
    let ok = matches!(len, 1 | 2 | 4 | 8)
        && offset.is_multiple_of(len as u64)
        && offset
            .checked_add(len as u64)
            .is_some_and(|e| e <= BAR0_SIZE);
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "BAR 0 access of {len} bytes at {offset:#x}"
        )))
    }
}

impl ServerBackend for Backend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        let mut d = lock(&self.0);
        match region {
            BAR0 => {
                bar_access(offset, data.len())?;
                let value = d.ctl.mmio_read(offset, data.len());
                data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
                Ok(())
            }
            CONFIG => {
                let offset = usize::try_from(offset).unwrap_or(usize::MAX);
                if d.config.read(offset, data) {
                    Ok(())
                } else {
                    Err(invalid(format!(
                        "config read of {} at {offset:#x}",
                        data.len()
                    )))
                }
            }
            _ => Err(invalid(format!("read of region {region}, which is empty"))),
        }
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        let mut d = lock(&self.0);
        match region {
            BAR0 => {
                bar_access(offset, data.len())?;
                let mut value = [0u8; 8];
                value[..data.len()].copy_from_slice(data);
                d.ctl
                    .mmio_write(offset, data.len(), u64::from_le_bytes(value));
                Ok(())
            }
            CONFIG => {
                let offset = usize::try_from(offset).unwrap_or(usize::MAX);
                if d.config.write(offset, data) {
                    Ok(())
                } else {
                    Err(invalid(format!(
                        "config write of {} at {offset:#x}",
                        data.len()
                    )))
                }
            }
            _ => Err(invalid(format!("write to region {region}, which is empty"))),
        }
    }

    fn dma_map(
        &mut self,
        _flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> Result<(), Error> {
        let mut d = lock(&self.0);
        let file = fd.ok_or_else(|| invalid("DMA map without a file descriptor".into()))?;
        d.ctl
            .mem_mut()
            .map(address, size, offset, file)
            .map_err(|e| invalid(isola_device_common::logging::chain(&e)))?;
        let identity = d.ctl.mem().identity();
        lock(&d.marker).memory = identity;
        if identity.is_some() && identity == d.resume_hse {
            log::warn!(
                "the guest had this controller running before this process started: \
                 reporting Host System Error so that its driver resets the controller"
            );
            d.resume_hse = None;
            d.restart_pending.store(true, Ordering::Relaxed);
            d.ctl.host_system_error();
        }
        Ok(())
    }

    fn dma_unmap(&mut self, flags: DmaUnmapFlags, address: u64, size: u64) -> Result<(), Error> {
        // The flags as the vfio-user specification (and Linux's vfio.h) number them: bit 1 is
        // "unmap all", bit 0 asks for a dirty bitmap. The vfio_user crate (0.1.7) names bit 1
        // GET_DIRTY_PAGE_INFO and bit 2 UNMAP_ALL, and drops bit 0 before this is called, so
        // the raw bits are read here; anything but bit 1 is refused.
        let bits = flags.bits();
        if bits & !VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            return Err(invalid(format!(
                "DMA_UNMAP flags {bits:#x}: only unmap all (bit 1) is supported"
            )));
        }
        let mut d = lock(&self.0);
        if bits & VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            d.ctl.mem_mut().clear();
            return Ok(());
        }
        d.ctl
            .mem_mut()
            .unmap(address, size)
            .map_err(|e| invalid(e.to_string()))
    }

    fn reset(&mut self) -> Result<(), Error> {
        let mut d = lock(&self.0);
        d.ctl.reset();
        if d.restart_pending.load(Ordering::Relaxed) {
            d.ctl.host_system_error();
        }
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), Error> {
        if index != VFIO_PCI_MSIX_IRQ_INDEX {
            return Err(invalid(format!(
                "SET_IRQS for index {index}, which has no vectors"
            )));
        }
        if flags & VFIO_IRQ_SET_ACTION_TYPE_MASK != VFIO_IRQ_SET_ACTION_TRIGGER {
            return Err(invalid(format!("SET_IRQS action {flags:#x}: only trigger")));
        }
        let d = lock(&self.0);
        let mut fds = fds;
        match (flags & VFIO_IRQ_SET_DATA_TYPE_MASK, start, count) {
            (VFIO_IRQ_SET_DATA_NONE, 0, 0) => *lock(&d.irq) = None,
            (VFIO_IRQ_SET_DATA_EVENTFD, 0, 1) if fds.len() == 1 => {
                let fd = fds.remove(0);
                if !isola_device_common::is_eventfd(&fd) {
                    return Err(invalid("the MSI-X fd is not an eventfd".into()));
                }
                *lock(&d.irq) = Some(fd);
            }
            other => {
                return Err(invalid(format!(
                    "SET_IRQS (data {:#x}, start {}, count {}) with {} fds",
                    other.0,
                    other.1,
                    other.2,
                    fds.len()
                )))
            }
        }
        drop(d);
        // A Host System Error reported before the vector existed is signalled now.
        let mut d = lock(&self.0);
        if d.ctl.usbsts() & crate::xhci::STS_HSE != 0 {
            d.ctl.host_system_error();
        }
        Ok(())
    }
}
