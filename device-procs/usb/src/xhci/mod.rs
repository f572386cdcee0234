//! The xHCI controller model (xHCI 1.2), the subset Linux's xhci_hcd and the test guest
//! use: capability, operational and runtime registers, doorbells, the command ring, one
//! event ring (interrupter 0), device slots with control, interrupt and bulk endpoints,
//! and root-hub ports (USB 2 ports 1-2, USB 3 ports 3-4).
//!
//! The model is a library over [`GuestMem`]: register accesses come in as
//! [`Controller::mmio_read`]/[`Controller::mmio_write`] on BAR 0, rings are walked in guest
//! memory, and the one interrupt is raised through a callback. Everything a guest writes is
//! checked before use: a ring outside guest memory, a bad TRB type, a link-TRB loop or a
//! transfer longer than its buffer ends in an error completion, a halted endpoint or (for
//! the controller's own structures) Host System Error — never in a panic or in an access
//! outside guest memory (`mem` refuses those).

mod command;
mod event;
mod transfer;

use std::time::Instant;

use crate::mem::GuestMem;
use crate::usb::{Speed, UsbDevice};

pub use event::Interrupter;

/// BAR 0 layout.
pub const BAR0_SIZE: u64 = 0x1_0000;
pub const CAP_LENGTH: u64 = 0x40;
pub const RUNTIME_OFFSET: u64 = 0x1000;
pub const DOORBELL_OFFSET: u64 = 0x2000;
pub const MSIX_TABLE_OFFSET: u64 = 0x3000;
pub const MSIX_PBA_OFFSET: u64 = 0x3800;
const EXT_CAPS_OFFSET: u64 = 0x800;
const PORT_REGS: u64 = CAP_LENGTH + 0x400;

pub const MAX_SLOTS: u8 = 8;
pub const NUM_PORTS: u8 = 4;
/// Ports 1..=USB2_PORTS are USB 2, the rest USB 3.
pub const USB2_PORTS: u8 = 2;

/// USBCMD bits.
const CMD_RS: u32 = 1 << 0;
const CMD_HCRST: u32 = 1 << 1;
const CMD_INTE: u32 = 1 << 2;
const CMD_CSS: u32 = 1 << 8;
const CMD_CRS: u32 = 1 << 9;
/// USBSTS bits.
pub const STS_HCH: u32 = 1 << 0;
pub const STS_HSE: u32 = 1 << 2;
pub const STS_EINT: u32 = 1 << 3;
pub const STS_PCD: u32 = 1 << 4;
const STS_RW1C: u32 = STS_HSE | STS_EINT | STS_PCD | (1 << 10);

/// PORTSC bits.
pub const PORT_CCS: u32 = 1 << 0;
pub const PORT_PED: u32 = 1 << 1;
pub const PORT_PR: u32 = 1 << 4;
pub const PORT_PP: u32 = 1 << 9;
pub const PORT_LWS: u32 = 1 << 16;
pub const PORT_CSC: u32 = 1 << 17;
pub const PORT_PEC: u32 = 1 << 18;
pub const PORT_WRC: u32 = 1 << 19;
pub const PORT_PRC: u32 = 1 << 21;
pub const PORT_PLC: u32 = 1 << 22;
pub const PORT_WPR: u32 = 1 << 31;
const PORT_CHANGES: u32 =
    PORT_CSC | PORT_PEC | PORT_WRC | (1 << 20) | PORT_PRC | PORT_PLC | (1 << 23);
const PORT_WAKE_BITS: u32 = 0b111 << 25;
const PLS_U0: u32 = 0;
const PLS_U3: u32 = 3;
const PLS_RX_DETECT: u32 = 5;
const PLS_POLLING: u32 = 7;
const PLS_RESUME: u32 = 15;

pub struct Port {
    pub device: Option<Box<dyn UsbDevice>>,
    portsc: u32,
    usb3: bool,
}

impl Port {
    fn pls(&self) -> u32 {
        (self.portsc >> 5) & 0xf
    }
    fn set_pls(&mut self, pls: u32) {
        self.portsc = (self.portsc & !(0xf << 5)) | (pls << 5);
    }
    fn speed(&self) -> Option<Speed> {
        self.device.as_ref().map(|d| d.speed())
    }
    /// Connected (or not) after a controller reset.
    fn reset_state(&mut self) {
        self.portsc = PORT_PP;
        match self.speed() {
            None => self.set_pls(PLS_RX_DETECT),
            Some(speed) => {
                self.portsc |= PORT_CCS | PORT_CSC | ((speed as u32) << 10);
                if self.usb3 {
                    // A USB 3 link trains by itself: enabled, in U0.
                    self.portsc |= PORT_PED;
                    self.set_pls(PLS_U0);
                } else {
                    self.set_pls(PLS_POLLING);
                }
            }
        }
    }
}

/// What the registers hold beyond the rings (kept together so a reset is one assignment).
#[derive(Debug, Default, Clone, Copy)]
struct OpRegs {
    usbcmd: u32,
    usbsts: u32,
    dnctrl: u32,
    dcbaap: u64,
    config: u32,
}

/// Command ring state.
#[derive(Debug, Default, Clone, Copy)]
struct CommandRing {
    dequeue: u64,
    cycle: bool,
    running: bool,
}

pub struct Controller<M: GuestMem> {
    mem: M,
    op: OpRegs,
    crcr: CommandRing,
    pub(crate) interrupter: Interrupter,
    ports: Vec<Port>,
    slots: Vec<transfer::Slot>,
    msix: [u8; 16],
    started: Instant,
    irq: Option<Box<dyn Fn() + Send>>,
    irq_wanted: bool,
    /// Called with `true` when the guest starts the controller, `false` when it stops or
    /// resets it (the restart marker, see `state`).
    on_run: Option<Box<dyn FnMut(bool) + Send>>,
    limiter: isola_device_common::logging::RateLimiter,
}

/// Logs a guest error, rate-limited.
macro_rules! guest_warn {
    ($ctl:expr, $($arg:tt)*) => {
        if let Some(dropped) = $ctl.limiter.allow() {
            if dropped > 0 {
                log::warn!("({dropped} guest errors not logged)");
            }
            log::warn!($($arg)*);
        }
    };
}
pub(crate) use guest_warn;

impl<M: GuestMem> Controller<M> {
    /// A controller with `devices[i]` on port `i + 1` (at most [`NUM_PORTS`]).
    pub fn new(mem: M, mut devices: Vec<Option<Box<dyn UsbDevice>>>) -> Controller<M> {
        devices.resize_with(usize::from(NUM_PORTS), || None);
        let ports = devices
            .into_iter()
            .take(usize::from(NUM_PORTS))
            .enumerate()
            .map(|(i, device)| Port {
                device,
                portsc: 0,
                usb3: i >= usize::from(USB2_PORTS),
            })
            .collect();
        let mut c = Controller {
            mem,
            op: OpRegs::default(),
            crcr: CommandRing::default(),
            interrupter: Interrupter::default(),
            ports,
            slots: (0..MAX_SLOTS).map(|_| transfer::Slot::default()).collect(),
            msix: [0; 16],
            started: Instant::now(),
            irq: None,
            irq_wanted: false,
            on_run: None,
            limiter: isola_device_common::logging::RateLimiter::new(20),
        };
        c.reset();
        c
    }

    pub fn mem(&self) -> &M {
        &self.mem
    }
    pub fn mem_mut(&mut self) -> &mut M {
        &mut self.mem
    }
    /// How the controller raises its interrupt (MSI-X vector 0); `None` to drop them.
    pub fn set_irq(&mut self, irq: Option<Box<dyn Fn() + Send>>) {
        self.irq = irq;
    }
    pub fn set_on_run(&mut self, on_run: Box<dyn FnMut(bool) + Send>) {
        self.on_run = Some(on_run);
    }
    pub fn usbsts(&self) -> u32 {
        self.op.usbsts
    }

    /// Host controller reset (HCRST, or a device reset from the frontend).
    pub fn reset(&mut self) {
        self.op = OpRegs {
            usbsts: STS_HCH,
            ..OpRegs::default()
        };
        self.crcr = CommandRing::default();
        self.interrupter = Interrupter::default();
        for slot in &mut self.slots {
            *slot = transfer::Slot::default();
        }
        for port in &mut self.ports {
            if let Some(d) = port.device.as_mut() {
                d.reset();
            }
            port.reset_state();
        }
        self.irq_wanted = false;
    }

    /// Reports Host System Error: the controller halts and the guest's driver must reset it
    /// (after a restart of this process, when the guest's controller state is gone).
    pub fn host_system_error(&mut self) {
        self.op.usbsts |= STS_HSE | STS_HCH;
        self.op.usbcmd &= !CMD_RS;
        self.crcr.running = false;
        // HSE raises an interrupt when USBCMD.HSEE is set; the guest's driver reads USBSTS.
        self.irq_wanted = true;
        self.flush_irq();
    }

    fn running(&self) -> bool {
        self.op.usbcmd & CMD_RS != 0 && self.op.usbsts & (STS_HCH | STS_HSE) == 0
    }

    /// A register read on BAR 0. Accesses must be 1, 2, 4 or 8 bytes; what is not a
    /// register reads as zero.
    pub fn mmio_read(&mut self, offset: u64, size: usize) -> u64 {
        match size {
            8 => {
                let lo = u64::from(self.read32(offset & !3));
                let hi = u64::from(self.read32((offset & !3) + 4));
                lo | (hi << 32)
            }
            1 | 2 | 4 => {
                let dword = self.read32(offset & !3);
                let shift = (offset & 3) * 8;
                let mask = if size == 4 {
                    u32::MAX
                } else {
                    (1u32 << (size * 8)) - 1
                };
                u64::from((dword >> shift) & mask)
            }
            _ => 0,
        }
    }

    /// A register write on BAR 0: 4 or 8 bytes (8 as low dword, then high).
    pub fn mmio_write(&mut self, offset: u64, size: usize, value: u64) {
        match size {
            4 => self.write32(offset, value as u32),
            8 => {
                self.write32(offset, value as u32);
                self.write32(offset + 4, (value >> 32) as u32);
            }
            _ => {
                guest_warn!(self, "xhci: {size}-byte write at {offset:#x} ignored");
            }
        }
        self.flush_irq();
    }

    fn read32(&mut self, offset: u64) -> u32 {
        match offset {
            0..CAP_LENGTH => self.cap_read(offset),
            EXT_CAPS_OFFSET..0x840 => ext_caps_read(offset - EXT_CAPS_OFFSET),
            CAP_LENGTH..PORT_REGS => self.op_read(offset - CAP_LENGTH),
            PORT_REGS..RUNTIME_OFFSET => {
                let rel = offset - PORT_REGS;
                match (self.ports.get((rel / 16) as usize), rel % 16) {
                    (Some(port), 0) => port.portsc,
                    _ => 0,
                }
            }
            RUNTIME_OFFSET..DOORBELL_OFFSET => self.runtime_read(offset - RUNTIME_OFFSET),
            MSIX_TABLE_OFFSET..0x3010 => {
                let i = (offset - MSIX_TABLE_OFFSET) as usize;
                u32::from_le_bytes([
                    self.msix[i],
                    self.msix[i + 1],
                    self.msix[i + 2],
                    self.msix[i + 3],
                ])
            }
            _ => 0,
        }
    }

    fn write32(&mut self, offset: u64, value: u32) {
        match offset {
            CAP_LENGTH..PORT_REGS => self.op_write(offset - CAP_LENGTH, value),
            PORT_REGS..RUNTIME_OFFSET if (offset - PORT_REGS).is_multiple_of(16) => {
                let i = ((offset - PORT_REGS) / 16) as usize;
                if i < self.ports.len() {
                    self.port_write(i, value);
                }
            }
            RUNTIME_OFFSET..DOORBELL_OFFSET => self.runtime_write(offset - RUNTIME_OFFSET, value),
            DOORBELL_OFFSET..0x2100 => self.doorbell(((offset - DOORBELL_OFFSET) / 4) as u8, value),
            MSIX_TABLE_OFFSET..0x3010 => {
                let i = (offset - MSIX_TABLE_OFFSET) as usize;
                self.msix[i..i + 4].copy_from_slice(&value.to_le_bytes());
            }
            _ => {}
        }
    }

    fn cap_read(&self, offset: u64) -> u32 {
        match offset {
            // CAPLENGTH, HCIVERSION 1.0.
            0x00 => CAP_LENGTH as u32 | (0x0100 << 16),
            // HCSPARAMS1: MaxSlots, MaxIntrs 1, MaxPorts.
            0x04 => u32::from(MAX_SLOTS) | (1 << 8) | (u32::from(NUM_PORTS) << 24),
            // HCSPARAMS2: IST 1 frame, ERST Max 2^1, no scratchpads.
            0x08 => 0x8 | (1 << 4),
            0x0c => 0,
            // HCCPARAMS1: 64-bit addressing, 32-byte contexts, xECP.
            0x10 => 1 | (((EXT_CAPS_OFFSET >> 2) as u32) << 16),
            0x14 => DOORBELL_OFFSET as u32,
            0x18 => RUNTIME_OFFSET as u32,
            _ => 0,
        }
    }

    fn op_read(&self, offset: u64) -> u32 {
        match offset {
            0x00 => self.op.usbcmd,
            0x04 => self.op.usbsts,
            0x08 => 1, // PAGESIZE: 4 KiB
            0x14 => self.op.dnctrl,
            // CRCR: only Command Ring Running reads back.
            0x18 => u32::from(self.crcr.running) << 3,
            0x1c => 0,
            0x30 => self.op.dcbaap as u32,
            0x34 => (self.op.dcbaap >> 32) as u32,
            0x38 => self.op.config,
            _ => 0,
        }
    }

    fn op_write(&mut self, offset: u64, value: u32) {
        match offset {
            0x00 => self.usbcmd_write(value),
            0x04 => self.op.usbsts &= !(value & STS_RW1C),
            0x14 => self.op.dnctrl = value & 0xffff,
            0x18 => self.crcr_write(value),
            0x1c if !self.crcr.running => {
                self.crcr.dequeue = (self.crcr.dequeue & 0xffff_ffff) | (u64::from(value) << 32);
            }
            0x30 => self.op.dcbaap = (self.op.dcbaap & !0xffff_ffff) | u64::from(value & !0x3f),
            0x34 => self.op.dcbaap = (self.op.dcbaap & 0xffff_ffff) | (u64::from(value) << 32),
            0x38 => self.op.config = (value & 0xff).min(u32::from(MAX_SLOTS)),
            _ => {}
        }
    }

    fn usbcmd_write(&mut self, value: u32) {
        if value & CMD_HCRST != 0 {
            self.reset();
            if let Some(on_run) = self.on_run.as_mut() {
                on_run(false);
            }
            return;
        }
        let was_running = self.op.usbcmd & CMD_RS != 0;
        self.op.usbcmd = value & !(CMD_HCRST | CMD_CSS | CMD_CRS);
        let run = value & CMD_RS != 0;
        if run && !was_running && self.op.usbsts & STS_HSE == 0 {
            self.op.usbsts &= !STS_HCH;
            if let Some(on_run) = self.on_run.as_mut() {
                on_run(true);
            }
            // Tell the guest about the devices already connected.
            for i in 0..self.ports.len() {
                if self.ports[i].portsc & PORT_CHANGES != 0 {
                    self.port_event(i);
                }
            }
        } else if !run && was_running {
            self.op.usbsts |= STS_HCH;
            self.crcr.running = false;
            if let Some(on_run) = self.on_run.as_mut() {
                on_run(false);
            }
        }
    }

    fn crcr_write(&mut self, value: u32) {
        const CS: u32 = 1 << 1;
        const CA: u32 = 1 << 2;
        if self.crcr.running {
            if value & (CS | CA) != 0 {
                self.crcr.running = false;
                let dequeue = self.crcr.dequeue;
                self.command_completion(dequeue, crate::trb::cc::COMMAND_RING_STOPPED, 0);
            }
            return;
        }
        self.crcr.dequeue = (self.crcr.dequeue & !0xffff_ffff) | u64::from(value & !0x3f);
        self.crcr.cycle = value & 1 != 0;
    }

    fn port_write(&mut self, i: usize, value: u32) {
        let port = &mut self.ports[i];
        let connected = port.device.is_some();
        // Change bits are write-1-to-clear; PED is cleared by writing 1.
        port.portsc &= !(value & PORT_CHANGES);
        if value & PORT_PED != 0 {
            port.portsc &= !PORT_PED;
        }
        port.portsc = (port.portsc & !PORT_WAKE_BITS) | (value & PORT_WAKE_BITS);
        let mut changed = false;
        if value & (PORT_PR | PORT_WPR) != 0 && connected {
            // Reset completes at once: enabled, U0, reset change (warm reset change too).
            if let Some(d) = port.device.as_mut() {
                d.reset();
            }
            port.portsc |= PORT_PED | PORT_PRC;
            if value & PORT_WPR != 0 && port.usb3 {
                port.portsc |= PORT_WRC;
            }
            port.set_pls(PLS_U0);
            changed = true;
        } else if value & PORT_LWS != 0 && connected && port.portsc & PORT_PED != 0 {
            let pls = (value >> 5) & 0xf;
            match pls {
                PLS_U0 | PLS_RESUME if port.pls() == PLS_U3 => {
                    port.set_pls(PLS_U0);
                    port.portsc |= PORT_PLC;
                    changed = true;
                }
                PLS_U0 | PLS_U3 | 1 | 2 => port.set_pls(pls),
                _ => {}
            }
        }
        if changed {
            self.port_event(i);
        }
    }

    fn port_event(&mut self, i: usize) {
        self.op.usbsts |= STS_PCD;
        if self.running() {
            let port_id = (i as u64 + 1) << 24;
            let trb = crate::trb::Trb::event(
                crate::trb::ty::PORT_STATUS_CHANGE,
                port_id,
                u32::from(crate::trb::cc::SUCCESS) << 24,
                0,
            );
            self.post_event(trb);
        }
    }

    fn runtime_read(&self, offset: u64) -> u32 {
        match offset {
            0x00 => {
                let micro = self.started.elapsed().as_micros() / 125;
                (micro & 0x3fff) as u32
            }
            0x20..0x40 => self.interrupter.read(offset - 0x20),
            _ => 0,
        }
    }

    fn runtime_write(&mut self, offset: u64, value: u32) {
        if let 0x20..0x40 = offset {
            self.interrupter_write(offset - 0x20, value);
        }
    }

    fn doorbell(&mut self, index: u8, value: u32) {
        if !self.running() {
            guest_warn!(self, "xhci: doorbell {index} while halted: ignored");
            return;
        }
        if index == 0 {
            if value & 0xff == 0 {
                self.run_commands();
            }
            return;
        }
        self.ring_endpoint(index, (value & 0xff) as u8);
    }

    fn flush_irq(&mut self) {
        if !std::mem::take(&mut self.irq_wanted) {
            return;
        }
        let enabled = self.op.usbcmd & CMD_INTE != 0 || self.op.usbsts & STS_HSE != 0;
        if enabled && (self.interrupter.enabled() || self.op.usbsts & STS_HSE != 0) {
            if let Some(irq) = &self.irq {
                irq();
            }
        }
    }

    /// Retries every endpoint waiting for device data (an interrupt IN transfer that found
    /// no report). Called when a device has something new.
    pub fn kick(&mut self) {
        if self.running() {
            self.retry_waiting();
        }
        self.flush_irq();
    }
}

/// Extended capabilities: Supported Protocol for USB 2 (ports 1-2), then USB 3 (ports 3-4).
fn ext_caps_read(offset: u64) -> u32 {
    let usb3_ports = u32::from(NUM_PORTS - USB2_PORTS);
    match offset {
        // ID 2, next 4 dwords on, revision 2.0.
        0x00 => 2 | (4 << 8) | (0x0200 << 16),
        0x04 | 0x14 => u32::from_le_bytes(*b"USB "),
        0x08 => 1 | (u32::from(USB2_PORTS) << 8),
        // ID 2, last, revision 3.0.
        0x10 => 2 | (0x0300 << 16),
        0x18 => (u32::from(USB2_PORTS) + 1) | (usb3_ports << 8),
        _ => 0,
    }
}

#[cfg(test)]
mod tests;
