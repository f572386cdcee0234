//! Finding virtio functions through the crate's PCI bus code, over Isola's ECAM window.

use core::sync::atomic::{AtomicU64, Ordering};

use virtio_drivers::transport::pci::bus::{Cam, Command, DeviceFunction, MmioCam, PciRoot};
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{PhysAddr, Result};

use crate::hal::IdentityHal;
use crate::rt::{self, exit};
use crate::{fail, say};

/// Isola's ECAM window for PCI bus 0 (core-vmm `layout::PCI_ECAM_START`, also in the MCFG).
const ECAM_BASE: usize = 0xe000_0000;

pub type Root = PciRoot<MmioCam<'static>>;

/// The PCI root over the ECAM window.
pub fn root() -> Root {
    // SAFETY: the ECAM window is MMIO, identity mapped and user-accessible (shim page tables),
    // and only bus 0 (its first MiB, which Isola decodes) is ever addressed; nothing else in
    // the guest touches it.
    PciRoot::new(unsafe { MmioCam::new(ECAM_BASE as *mut u8, Cam::Ecam) })
}

/// The `index`-th virtio function of `kind` on bus 0, with memory decoding and bus mastering
/// turned on; fails the run if there is none.
pub fn find(root: &mut Root, kind: DeviceType, index: usize) -> DeviceFunction {
    let found = root
        .enumerate_bus(0)
        .filter(|(_, info)| virtio_device_type(info) == Some(kind))
        .map(|(function, _)| function)
        .nth(index);
    let Some(function) = found else {
        fail!(exit::SETUP, "no virtio {kind:?} function #{index} on bus 0");
    };
    root.set_command(function, Command::MEMORY_SPACE | Command::BUS_MASTER);
    function
}

/// A transport for `function` (the crate's capability walk and BAR sizing), wrapped in
/// [`SpecTransport`].
pub fn transport(root: &mut Root, function: DeviceFunction) -> SpecTransport {
    match PciTransport::new::<IdentityHal, _>(root, function) {
        Ok(t) => SpecTransport(t),
        Err(e) => fail!(exit::FAILED, "PciTransport::new({function}): {e}"),
    }
}

/// Resets after which the device status read non-zero at first (the crate would have gone on
/// without waiting; see [`SpecTransport`]).
pub static SLOW_RESETS: AtomicU64 = AtomicU64::new(0);

/// The crate's `PciTransport` with two driver obligations the crate's `begin_init` skips,
/// added in the guest only (the crate is used unchanged):
///
/// * virtio 1.2 4.1.4.3.2: "After writing 0 to device_status, the driver MUST wait for a read of
///   device_status to return 0 before reinitializing the device." `begin_init` writes 0 and
///   then ACKNOWLEDGE | DRIVER at once. Isola resets asynchronously (the vhost-user backend is
///   told on its own thread) and ignores status writes until the reset is done, so without
///   the wait the device never starts.
/// * virtio 1.2 3.1.1 step 6: after setting FEATURES_OK the driver MUST re-read the status to
///   ensure FEATURES_OK is still set (else the device refused the subset). `begin_init` does
///   not; a refusal here fails the run with a clear line instead of a later hang.
pub struct SpecTransport(pub PciTransport);

impl Transport for SpecTransport {
    fn device_type(&self) -> DeviceType {
        self.0.device_type()
    }
    fn read_device_features(&mut self) -> u64 {
        self.0.read_device_features()
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        self.0.write_driver_features(driver_features)
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.0.max_queue_size(queue)
    }
    fn notify(&mut self, queue: u16) {
        self.0.notify(queue)
    }
    fn get_status(&self) -> DeviceStatus {
        self.0.get_status()
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.0.set_status(status);
        if status.is_empty() {
            if !self.0.get_status().is_empty() {
                SLOW_RESETS.fetch_add(1, Ordering::Relaxed);
            }
            rt::wait_for(10_000, "device status 0 after reset", || {
                self.0.get_status().is_empty().then_some(())
            });
        } else if status.contains(DeviceStatus::FEATURES_OK)
            && !status.contains(DeviceStatus::DRIVER_OK)
            && !self.0.get_status().contains(DeviceStatus::FEATURES_OK)
        {
            fail!(
                exit::FAILED,
                "the device cleared FEATURES_OK: it refused the crate's features"
            );
        }
    }
    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.0.set_guest_page_size(guest_page_size)
    }
    fn requires_legacy_layout(&self) -> bool {
        self.0.requires_legacy_layout()
    }
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        desc: PhysAddr,
        driver: PhysAddr,
        device: PhysAddr,
    ) {
        self.0.queue_set(queue, size, desc, driver, device)
    }
    fn queue_unset(&mut self, queue: u16) {
        self.0.queue_unset(queue)
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.0.queue_used(queue)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.0.ack_interrupt()
    }
    fn read_config_generation(&self) -> u32 {
        self.0.read_config_generation()
    }
    fn read_config_space<T: zerocopy::FromBytes + zerocopy::IntoBytes>(
        &self,
        offset: usize,
    ) -> Result<T> {
        self.0.read_config_space(offset)
    }
    fn write_config_space<T: zerocopy::IntoBytes + zerocopy::Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> Result<()> {
        self.0.write_config_space(offset, value)
    }
}

/// Prints the device's offered feature bits (the crate negotiates its own subset of them).
pub fn report_features(transport: &mut SpecTransport) -> u64 {
    let offered = transport.read_device_features();
    say!("offered={offered:#x}");
    offered
}
