//! COM1: `vm-superio`'s 16550 model with its interrupt line on an irqfd.

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Raises the UART's interrupt by writing its irqfd.
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Flushes after every write so the guest's output shows up as it is written.
struct Unbuffered(Box<dyn Write + Send>);

impl Write for Unbuffered {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, Unbuffered>,
    write_failed: bool,
}

impl SerialDevice {
    pub fn new(out: Box<dyn Write + Send>, irq: EventFd) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), Unbuffered(out)),
            write_failed: false,
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            // Output that cannot be written (a closed stdout, a full disk) must not stop the
            // guest; say so once.
            if !self.write_failed {
                log::warn!("serial output lost: {e:?}");
                self.write_failed = true;
            }
        }
    }
}
