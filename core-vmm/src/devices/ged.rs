//! The Generic Event Device (ACPI0013) behind the guest's power button.
//!
//! Hardware-reduced ACPI has no fixed power-button event, so the button is a device of its own
//! (`\_SB.PWRB`, PNP0C0C) that a GED notifies, as Cloud Hypervisor does. The GED is one byte
//! at port [`GED_PORT`]: each set bit is an event that happened since the guest last read it
//! (reading clears it). Raising an event sets its bit and pulses IOAPIC pin [`GED_IRQ`]
//! (an irqfd); the DSDT's `_EVT` reads the byte and, for [`GED_EVENT_POWER_BUTTON`], does
//! `Notify(\_SB.PWRB, 0x80)`, which Linux's button driver turns into `KEY_POWER`.
//!
//! A guest without an AML interpreter can read the byte itself, with or without taking the
//! interrupt (tests/guests: the `power` guest).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// The GED's event register: read to take (and clear) the pending events; writes ignored.
pub const GED_PORT: u16 = 0xb00;
/// The GSI (IOAPIC pin) the GED raises; its `_CRS` says edge-triggered, active high.
pub const GED_IRQ: u32 = 5;
/// Event bit: the power button was pressed.
pub const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;

pub struct Ged {
    pending: AtomicU8,
    irq: EventFd,
    presses: AtomicU64,
}

impl Ged {
    /// `irq` is an irqfd on [`GED_IRQ`].
    pub fn new(irq: EventFd) -> Self {
        Ged {
            pending: AtomicU8::new(0),
            irq,
            presses: AtomicU64::new(0),
        }
    }

    /// Presses the power button: sets the event bit and raises the interrupt.
    pub fn press_power_button(&self) -> std::io::Result<()> {
        self.pending
            .fetch_or(GED_EVENT_POWER_BUTTON, Ordering::SeqCst);
        let n = self.presses.fetch_add(1, Ordering::Relaxed) + 1;
        log::info!("power button pressed ({n} so far)");
        self.irq.write(1)
    }

    /// A guest read of the event register: the pending events, now cleared.
    pub fn read(&self) -> u8 {
        self.pending.swap(0, Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_press_is_read_once_and_raises_the_interrupt() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ged = Ged::new(irq.try_clone().unwrap());
        assert_eq!(ged.read(), 0);
        ged.press_power_button().unwrap();
        ged.press_power_button().unwrap();
        assert_eq!(irq.read().unwrap(), 2, "each press raises the interrupt");
        assert_eq!(ged.read(), GED_EVENT_POWER_BUTTON);
        assert_eq!(ged.read(), 0, "reading clears the event");
    }
}
