//! Interrupt routing: KVM's GSI routing table, owned in one place.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so the router keeps every route it has
//! handed out and rewrites the table with KVM's default legacy routes (GSI 0-15 to the PIC and
//! IOAPIC, 16-23 to the IOAPIC) plus every MSI route. Each MSI route gets a GSI of its own from
//! 24 up; an irqfd on that GSI then injects the MSI without any user-space thread.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

/// GSIs below this are the IOAPIC's pins.
const IOAPIC_PINS: u32 = 24;
const PIC_IRQS: u32 = 16;
/// KVM's table holds at most this many entries (KVM_MAX_IRQ_ROUTES).
const MAX_ROUTES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("no free GSI for another MSI route")]
    Exhausted,
    #[error("KVM refused the GSI routing table")]
    Kvm(#[source] kvm_ioctls::Error),
}

/// An MSI message: where the guest asked the device to write, and what.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

pub struct InterruptRouter {
    vm: Arc<VmFd>,
    state: Mutex<RouterState>,
}

struct RouterState {
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

fn irqchip_entry(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip, pin },
        },
        ..Default::default()
    }
}

fn msi_entry(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                address_lo: msg.address as u32,
                address_hi: (msg.address >> 32) as u32,
                data: msg.data,
                ..Default::default()
            },
        },
        ..Default::default()
    }
}

/// The whole routing table for a set of MSI routes.
fn table(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
    let mut entries = Vec::with_capacity((IOAPIC_PINS + PIC_IRQS) as usize + msi.len());
    for gsi in 0..IOAPIC_PINS {
        entries.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < PIC_IRQS {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(irqchip_entry(gsi, chip, gsi % 8));
        }
    }
    entries.extend(msi.iter().map(|(gsi, msg)| msi_entry(*gsi, *msg)));
    entries
}

impl InterruptRouter {
    pub fn new(vm: Arc<VmFd>) -> Self {
        InterruptRouter {
            vm,
            state: Mutex::new(RouterState {
                msi: BTreeMap::new(),
                next_gsi: IOAPIC_PINS,
            }),
        }
    }

    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves a GSI for an MSI route; the route is installed with [`Self::set_msi`].
    pub fn allocate_gsi(&self) -> Result<u32, RoutingError> {
        let mut state = self.lock();
        if state.next_gsi as usize >= MAX_ROUTES {
            return Err(RoutingError::Exhausted);
        }
        let gsi = state.next_gsi;
        state.next_gsi += 1;
        Ok(gsi)
    }

    /// Points `gsi` at `msg` (adding or changing its route) and updates KVM.
    pub fn set_msi(&self, gsi: u32, msg: MsiMessage) -> Result<(), RoutingError> {
        let mut state = self.lock();
        if state.msi.get(&gsi) == Some(&msg) {
            return Ok(());
        }
        state.msi.insert(gsi, msg);
        self.apply(&state.msi)
    }

    fn apply(&self, msi: &BTreeMap<u32, MsiMessage>) -> Result<(), RoutingError> {
        let entries = table(msi);
        let routing = KvmIrqRouting::from_entries(&entries).map_err(|_| RoutingError::Exhausted)?;
        self.vm.set_gsi_routing(&routing).map_err(RoutingError::Kvm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_keeps_legacy_routes_and_adds_msi() {
        let mut msi = BTreeMap::new();
        msi.insert(
            24,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x41,
            },
        );
        let entries = table(&msi);
        assert_eq!(entries.len(), 24 + 16 + 1);
        let gsi4: Vec<_> = entries.iter().filter(|e| e.gsi == 4).collect();
        assert_eq!(gsi4.len(), 2, "GSI 4 reaches both the IOAPIC and the PIC");
        let last = entries.last().unwrap();
        assert_eq!((last.gsi, last.type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: the entry was built as an MSI route, so `msi` is the initialised member.
        let m = unsafe { last.u.msi };
        assert_eq!((m.address_lo, m.address_hi, m.data), (0xfee0_1000, 1, 0x41));
    }
}
