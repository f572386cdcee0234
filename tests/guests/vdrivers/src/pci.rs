//! Finding virtio functions through the crate's PCI bus code, over Isola's ECAM window.

use virtio_drivers::transport::pci::bus::{Cam, Command, DeviceFunction, MmioCam, PciRoot};
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport};
use virtio_drivers::transport::{DeviceType, Transport};

use crate::hal::IdentityHal;
use crate::rt::exit;
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

/// A transport for `function` (the crate's capability walk and BAR sizing).
pub fn transport(root: &mut Root, function: DeviceFunction) -> PciTransport {
    match PciTransport::new::<IdentityHal, _>(root, function) {
        Ok(t) => t,
        Err(e) => fail!(exit::FAILED, "PciTransport::new({function}): {e}"),
    }
}

/// Prints the device's offered feature bits (the crate negotiates its own subset of them).
pub fn report_features(transport: &mut PciTransport) -> u64 {
    let offered = transport.read_device_features();
    say!("offered={offered:#x}");
    offered
}
