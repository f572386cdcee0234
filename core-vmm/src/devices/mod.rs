//! The few register-level devices a PC guest needs to boot, trapped on port I/O exits.
//!
//! These are not virtio devices and cannot live in a device process: each access is a vCPU
//! exit that must be answered before the vCPU continues. Everything else is a device process.
//!
//! | ports        | device                                                          |
//! |--------------|-----------------------------------------------------------------|
//! | 0x3f8-0x3ff  | 16550 UART (COM1, IRQ 4), output to stdout or `--serial-log`     |
//! | 0x60, 0x64   | i8042 stub: writing 0xfe to 0x64 (pulse reset) ends the VM       |
//! | 0xf4         | debug exit: writing byte v ends the VM with exit status v        |
//! | 0x3c0        | ACPI sleep control: SLP_EN with SLP_TYP 5 (S5) powers off        |
//! | 0xb00        | ACPI Generic Event Device: pending events, cleared by a read (IRQ 5) |
//! | 0x80, 0xed   | POST / delay ports: ignored                                       |
//! | 0xcf8-0xcff  | PCI configuration mechanism #1 (forwarded to [`PciBus`])          |
//!
//! Every other port reads as all ones and ignores writes (logged, rate-limited).

mod ged;
mod serial;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::pci::PciBus;

pub use ged::{Ged, GED_EVENT_POWER_BUTTON, GED_IRQ, GED_PORT};
pub use serial::SerialDevice;

pub const SERIAL_PORT_BASE: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
const SERIAL_PORT_END: u16 = SERIAL_PORT_BASE + 8;
const I8042_DATA_PORT: u16 = 0x60;
const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_RESET_COMMAND: u8 = 0xfe;
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
const ACPI_SLP_EN: u8 = 1 << 5;
const ACPI_SLP_TYP_S5: u8 = 5;
const POST_PORT: u16 = 0x80;
const DELAY_PORT: u16 = 0xed;

/// Unhandled accesses logged before the log goes quiet (then one in every 4096).
const UNHANDLED_LOG_BURST: u64 = 16;

/// A guest action that ends the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestRequest {
    Poweroff,
    Reset,
    DebugExit(u8),
}

/// Everything a vCPU exit can reach: the legacy ports and the PCI bus. Shared by all vCPU
/// threads.
pub struct LegacyDevices {
    serial: Mutex<SerialDevice>,
    ged: Arc<Ged>,
    pci: Arc<PciBus>,
    unhandled: AtomicU64,
}

impl LegacyDevices {
    /// `serial_out` receives what the guest writes to COM1; `serial_irq` is raised (an irqfd
    /// on GSI 4) when the UART wants attention; `ged` is the power button's event device.
    pub fn new(
        serial_out: Box<dyn Write + Send>,
        serial_irq: EventFd,
        ged: Arc<Ged>,
        pci: Arc<PciBus>,
    ) -> Self {
        LegacyDevices {
            serial: Mutex::new(SerialDevice::new(serial_out, serial_irq)),
            ged,
            pci,
            unhandled: AtomicU64::new(0),
        }
    }

    fn serial(&self) -> std::sync::MutexGuard<'_, SerialDevice> {
        // A vCPU thread that panicked while holding the lock leaves a UART whose registers are
        // still consistent (every write is one register); keep serving it.
        self.serial
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Logs an access no device claims, rate-limited: a guest can make millions of them.
    fn log_unhandled(&self, what: std::fmt::Arguments<'_>) {
        let n = self.unhandled.fetch_add(1, Ordering::Relaxed);
        if n < UNHANDLED_LOG_BURST || n.is_multiple_of(4096) {
            log::debug!("unhandled {what} ({n} unhandled so far)");
        }
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if self.pci.pio_read(port, data) {
            return;
        }
        match port {
            SERIAL_PORT_BASE..SERIAL_PORT_END if data.len() == 1 => {
                data[0] = self.serial().read((port - SERIAL_PORT_BASE) as u8);
            }
            // i8042 status: output buffer empty, input buffer empty, system flag set.
            I8042_COMMAND_PORT => data.fill(0x04),
            I8042_DATA_PORT => data.fill(0),
            GED_PORT if data.len() == 1 => data[0] = self.ged.read(),
            _ => {
                self.log_unhandled(format_args!("port read at {port:#x}, {} bytes", data.len()));
                data.fill(0xff);
            }
        }
    }

    /// MMIO reaches PCI (ECAM and BARs); anything else reads as all ones.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if self.pci.mmio_read(addr, data) {
            return;
        }
        self.log_unhandled(format_args!("MMIO read at {addr:#x}, {} bytes", data.len()));
        data.fill(0xff);
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if self.pci.mmio_write(addr, data) {
            return;
        }
        self.log_unhandled(format_args!(
            "MMIO write at {addr:#x}, {} bytes",
            data.len()
        ));
    }

    /// Handles a guest write; returns the request if the write ends the VM.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<GuestRequest> {
        let first = *data.first()?;
        if self.pci.pio_write(port, data) {
            return None;
        }
        match port {
            SERIAL_PORT_BASE..SERIAL_PORT_END if data.len() == 1 => {
                self.serial().write((port - SERIAL_PORT_BASE) as u8, first);
                None
            }
            I8042_COMMAND_PORT if first == I8042_RESET_COMMAND => Some(GuestRequest::Reset),
            I8042_COMMAND_PORT | I8042_DATA_PORT | POST_PORT | DELAY_PORT | GED_PORT => None,
            DEBUG_EXIT_PORT => Some(GuestRequest::DebugExit(first)),
            ACPI_SLEEP_CONTROL_PORT
                if first & ACPI_SLP_EN != 0 && (first >> 2) & 0x7 == ACPI_SLP_TYP_S5 =>
            {
                Some(GuestRequest::Poweroff)
            }
            ACPI_SLEEP_CONTROL_PORT => None,
            _ => {
                self.log_unhandled(format_args!(
                    "port write at {port:#x}, {} bytes",
                    data.len()
                ));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn devices() -> (LegacyDevices, Sink) {
        let sink = Sink::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ged = Arc::new(Ged::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        (
            LegacyDevices::new(Box::new(sink.clone()), evt, ged, Arc::new(PciBus::new())),
            sink,
        )
    }

    #[test]
    fn guest_requests_end_the_vm() {
        let (dev, _) = devices();
        assert_eq!(dev.pio_write(0x64, &[0xfe]), Some(GuestRequest::Reset));
        assert_eq!(dev.pio_write(0x64, &[0xad]), None);
        assert_eq!(dev.pio_write(0xf4, &[7]), Some(GuestRequest::DebugExit(7)));
        assert_eq!(
            dev.pio_write(0xf4, &[0, 0, 0, 0]),
            Some(GuestRequest::DebugExit(0))
        );
        assert_eq!(dev.pio_write(0x3c0, &[0x34]), Some(GuestRequest::Poweroff));
        assert_eq!(dev.pio_write(0x3c0, &[0x14]), None, "S5 without SLP_EN");
        assert_eq!(dev.pio_write(0x3c0, &[0x24]), None, "SLP_EN with S1");
        assert_eq!(dev.pio_write(0x1234, &[1]), None);
        assert_eq!(dev.pio_write(0x1234, &[]), None);
    }

    #[test]
    fn serial_output_reaches_the_writer_and_unknown_ports_read_ones() {
        let (dev, sink) = devices();
        for b in b"hi\n" {
            dev.pio_write(0x3f8, &[*b]);
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hi\n");
        let mut lsr = [0u8];
        dev.pio_read(0x3fd, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter holding register empty");
        let mut buf = [0u8; 2];
        dev.pio_read(0x1234, &mut buf);
        assert_eq!(buf, [0xff, 0xff]);
    }

    #[test]
    fn the_ged_register_reports_a_press_once() {
        let (dev, _) = devices();
        let mut byte = [0xffu8];
        dev.pio_read(GED_PORT, &mut byte);
        assert_eq!(byte, [0]);
        dev.ged.press_power_button().unwrap();
        assert_eq!(dev.pio_write(GED_PORT, &[0]), None, "writes are ignored");
        dev.pio_read(GED_PORT, &mut byte);
        assert_eq!(byte, [GED_EVENT_POWER_BUTTON]);
        dev.pio_read(GED_PORT, &mut byte);
        assert_eq!(byte, [0]);
    }
}
