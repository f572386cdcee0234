//! The command ring (xHCI 4.6): slots, device addressing, endpoint configuration.
//! Contexts are 32 bytes (HCCPARAMS1.CSZ = 0); the input context starts with the input
//! control context, the output (device) context with the slot context.

use super::transfer::{Endpoint, EpState};
use super::{guest_warn, Controller, STS_HCH, STS_HSE};
use crate::mem::{add, GuestMem, MemError};
use crate::trb::{cc, ty, Trb, TRB_LEN};

/// Commands run per doorbell; TRBs (links included) visited per doorbell.
const MAX_COMMANDS: usize = 256;
const MAX_VISITS: usize = 1024;
const CTX: u64 = 32;

/// Slot states in the slot context (bits 31:27 of dword 3).
const SLOT_DEFAULT: u32 = 1;
const SLOT_ADDRESSED: u32 = 2;
const SLOT_CONFIGURED: u32 = 3;

/// A command's outcome: completion code (and the slot, for Enable Slot).
type Outcome = Result<u8, u8>;

impl<M: GuestMem> Controller<M> {
    pub(super) fn run_commands(&mut self) {
        self.crcr.running = true;
        let (mut done, mut visits) = (0, 0);
        while done < MAX_COMMANDS && self.crcr.running {
            visits += 1;
            if visits > MAX_VISITS {
                guest_warn!(
                    self,
                    "xhci: command ring: {MAX_VISITS} TRBs without end (a link loop?)"
                );
                return;
            }
            let addr = self.crcr.dequeue;
            let trb = match read_trb(&self.mem, addr) {
                Ok(trb) => trb,
                Err(e) => {
                    guest_warn!(self, "xhci: command ring: {e}; Host System Error");
                    self.op.usbsts |= STS_HSE | STS_HCH;
                    self.op.usbcmd &= !1;
                    self.crcr.running = false;
                    self.irq_wanted = true;
                    return;
                }
            };
            if trb.cycle() != self.crcr.cycle {
                return;
            }
            if trb.trb_type() == ty::LINK {
                self.crcr.dequeue = trb.parameter & !0xf;
                if trb.has(crate::trb::TOGGLE_CYCLE) {
                    self.crcr.cycle = !self.crcr.cycle;
                }
                continue;
            }
            self.crcr.dequeue = add(addr, TRB_LEN);
            let (code, slot) = match self.command(&trb) {
                Ok(slot) => (cc::SUCCESS, slot),
                Err(code) => (code, trb.slot()),
            };
            self.command_completion(addr, code, slot);
            done += 1;
        }
    }

    fn command(&mut self, trb: &Trb) -> Outcome {
        match trb.trb_type() {
            ty::ENABLE_SLOT => self.enable_slot(),
            ty::NOOP_COMMAND => Ok(0),
            t => {
                let slot = self.slot_index(trb.slot())?;
                let result = match t {
                    ty::DISABLE_SLOT => {
                        self.slots[slot] = super::transfer::Slot::default();
                        Ok(())
                    }
                    ty::ADDRESS_DEVICE => self.address_device(slot, trb),
                    ty::CONFIGURE_ENDPOINT => self.configure_endpoint(slot, trb),
                    ty::EVALUATE_CONTEXT => self.evaluate_context(slot, trb),
                    ty::RESET_ENDPOINT => self.reset_endpoint(slot, trb.endpoint()),
                    ty::STOP_ENDPOINT => self.stop_endpoint(slot, trb.endpoint()),
                    ty::SET_TR_DEQUEUE => self.set_dequeue(slot, trb),
                    ty::RESET_DEVICE => self.reset_device(slot),
                    other => {
                        guest_warn!(self, "xhci: command TRB type {other}: TRB Error");
                        Err(cc::TRB)
                    }
                };
                result.map(|()| 0)
            }
        }
    }

    /// The index of enabled slot `id`, or Slot Not Enabled.
    fn slot_index(&self, id: u8) -> Result<usize, u8> {
        let i = usize::from(id).checked_sub(1).ok_or(cc::SLOT_NOT_ENABLED)?;
        match self.slots.get(i) {
            Some(slot) if slot.enabled => Ok(i),
            _ => Err(cc::SLOT_NOT_ENABLED),
        }
    }

    fn enable_slot(&mut self) -> Outcome {
        let i = self
            .slots
            .iter()
            .position(|s| !s.enabled)
            .ok_or(cc::NO_SLOTS)?;
        self.slots[i] = super::transfer::Slot {
            enabled: true,
            ..Default::default()
        };
        Ok(i as u8 + 1)
    }

    /// The output context of slot index `slot` (from the DCBAA).
    fn output_context(&self, slot: usize) -> Result<u64, u8> {
        let entry = self
            .op
            .dcbaap
            .checked_add(8 * (slot as u64 + 1))
            .ok_or(cc::PARAMETER)?;
        let addr = self.mem.read_u64(entry).map_err(|_| cc::PARAMETER)?;
        match addr & !0x3f {
            0 => Err(cc::PARAMETER),
            a => Ok(a),
        }
    }

    /// Reads an input context: (add flags, drop flags) and the context array base.
    fn input_context(&self, trb: &Trb) -> Result<(u32, u32, u64), u8> {
        let input = trb.parameter & !0xf;
        let drop = self.mem.read_u32(input).map_err(|_| cc::PARAMETER)?;
        let adds = self
            .mem
            .read_u32(add(input, 4))
            .map_err(|_| cc::PARAMETER)?;
        Ok((adds, drop, add(input, CTX)))
    }

    fn copy_context(&self, from: u64, to: u64) -> Result<[u8; 32], MemError> {
        let mut ctx = [0u8; 32];
        self.mem.read(from, &mut ctx)?;
        self.mem.write(to, &ctx)?;
        Ok(ctx)
    }

    fn address_device(&mut self, slot: usize, trb: &Trb) -> Result<(), u8> {
        const BSR: u32 = 1 << 9;
        let (adds, _, ctx) = self.input_context(trb)?;
        if adds & 0b11 != 0b11 {
            return Err(cc::PARAMETER);
        }
        let out = self.output_context(slot)?;
        let slot_ctx = self.copy_context(ctx, out).map_err(|_| cc::PARAMETER)?;
        let dword =
            |i: usize| u32::from_le_bytes(slot_ctx[i * 4..i * 4 + 4].try_into().unwrap_or([0; 4]));
        let port = (dword(1) >> 16) & 0xff;
        let port_index = usize::try_from(port).ok().and_then(|p| p.checked_sub(1));
        match port_index.and_then(|p| self.ports.get(p)) {
            Some(p) if p.device.is_some() && p.portsc & super::PORT_PED != 0 => {}
            _ => {
                guest_warn!(
                    self,
                    "xhci: Address Device for port {port}, which has no enabled device"
                );
                return Err(cc::PARAMETER);
            }
        }
        let ep0 = Endpoint::from_context(&self.mem, add(ctx, CTX)).map_err(|_| cc::PARAMETER)?;
        let s = &mut self.slots[slot];
        s.port = port as u8;
        s.context = out;
        s.endpoints = Default::default();
        s.endpoints[0] = ep0;
        let (state, address) = if trb.control & BSR != 0 {
            (SLOT_DEFAULT, 0)
        } else {
            (SLOT_ADDRESSED, slot as u32 + 1)
        };
        s.state = state;
        let d3 = (state << 27) | address;
        self.mem
            .write_u32(add(out, 12), d3)
            .map_err(|_| cc::PARAMETER)?;
        self.write_endpoint_context(slot, 1, Some(add(ctx, CTX)))
    }

    fn configure_endpoint(&mut self, slot: usize, trb: &Trb) -> Result<(), u8> {
        const DC: u32 = 1 << 9;
        let out = self.slots[slot].context;
        if self.slots[slot].state < SLOT_ADDRESSED || out == 0 {
            return Err(cc::CONTEXT_STATE);
        }
        if trb.control & DC != 0 {
            for dci in 2..=31 {
                self.slots[slot].endpoints[dci - 1] = Endpoint::default();
                self.write_endpoint_context(slot, dci, None)?;
            }
            self.slots[slot].state = SLOT_ADDRESSED;
            return self.write_slot_state(slot);
        }
        let (adds, drop, ctx) = self.input_context(trb)?;
        for dci in 2..=31usize {
            if drop & (1 << dci) != 0 {
                self.slots[slot].endpoints[dci - 1] = Endpoint::default();
                self.write_endpoint_context(slot, dci, None)?;
            }
            if adds & (1 << dci) != 0 {
                let input = add(ctx, CTX * dci as u64);
                let ep = Endpoint::from_context(&self.mem, input).map_err(|_| cc::PARAMETER)?;
                // Bulk and interrupt only (types 2, 3 OUT; 6, 7 IN), in the DCI's direction.
                let dir_in = dci % 2 == 1;
                if !matches!((ep.ep_type, dir_in), (2 | 3, false) | (6 | 7, true)) {
                    guest_warn!(
                        self,
                        "xhci: endpoint type {} at DCI {dci}: not supported",
                        ep.ep_type
                    );
                    return Err(cc::PARAMETER);
                }
                self.slots[slot].endpoints[dci - 1] = ep;
                self.write_endpoint_context(slot, dci, Some(input))?;
            }
        }
        if adds & 1 != 0 {
            // Context Entries and the rest of the slot context come from the input.
            let mut slot_ctx = [0u8; 16];
            self.mem
                .read(ctx, &mut slot_ctx)
                .map_err(|_| cc::PARAMETER)?;
            self.mem
                .write(out, &slot_ctx[..12])
                .map_err(|_| cc::PARAMETER)?;
        }
        self.slots[slot].state = SLOT_CONFIGURED;
        self.write_slot_state(slot)
    }

    fn evaluate_context(&mut self, slot: usize, trb: &Trb) -> Result<(), u8> {
        let (adds, _, ctx) = self.input_context(trb)?;
        if adds & 0b10 != 0 {
            // Endpoint 0's max packet size (the guest learnt it from the device descriptor).
            let dword1 = self
                .mem
                .read_u32(add(ctx, CTX + 4))
                .map_err(|_| cc::PARAMETER)?;
            let ep0 = &mut self.slots[slot].endpoints[0];
            ep0.max_packet = (dword1 >> 16) as u16;
            let out = self.slots[slot].context;
            let cur = self
                .mem
                .read_u32(add(out, CTX + 4))
                .map_err(|_| cc::PARAMETER)?;
            let new = (cur & 0xffff) | (dword1 & 0xffff_0000);
            self.mem
                .write_u32(add(out, CTX + 4), new)
                .map_err(|_| cc::PARAMETER)?;
        }
        Ok(())
    }

    fn endpoint_mut(&mut self, slot: usize, dci: u8) -> Result<&mut Endpoint, u8> {
        match usize::from(dci).checked_sub(1) {
            Some(i) if i < 31 => {
                let ep = &mut self.slots[slot].endpoints[i];
                if ep.state == EpState::Disabled {
                    Err(cc::EP_NOT_ENABLED)
                } else {
                    Ok(ep)
                }
            }
            _ => Err(cc::TRB),
        }
    }

    fn reset_endpoint(&mut self, slot: usize, dci: u8) -> Result<(), u8> {
        let ep = self.endpoint_mut(slot, dci)?;
        if ep.state != EpState::Halted {
            return Err(cc::CONTEXT_STATE);
        }
        ep.state = EpState::Stopped;
        let port = self.slots[slot].port;
        if let Some(d) = self.device_mut(port) {
            d.clear_halt(dci / 2);
        }
        self.write_endpoint_context(slot, usize::from(dci), None)
    }

    fn stop_endpoint(&mut self, slot: usize, dci: u8) -> Result<(), u8> {
        let ep = self.endpoint_mut(slot, dci)?;
        if ep.state == EpState::Running {
            ep.state = EpState::Stopped;
        }
        ep.waiting = false;
        self.write_endpoint_context(slot, usize::from(dci), None)
    }

    fn set_dequeue(&mut self, slot: usize, trb: &Trb) -> Result<(), u8> {
        let ep = self.endpoint_mut(slot, trb.endpoint())?;
        if ep.state != EpState::Stopped {
            return Err(cc::CONTEXT_STATE);
        }
        ep.dequeue = trb.parameter & !0xf;
        ep.cycle = trb.parameter & 1 != 0;
        ep.waiting = false;
        self.write_endpoint_context(slot, usize::from(trb.endpoint()), None)
    }

    fn reset_device(&mut self, slot: usize) -> Result<(), u8> {
        if self.slots[slot].state < SLOT_ADDRESSED {
            return Err(cc::CONTEXT_STATE);
        }
        for i in 1..31 {
            self.slots[slot].endpoints[i] = Endpoint::default();
        }
        let port = self.slots[slot].port;
        if let Some(d) = self.device_mut(port) {
            d.reset();
        }
        self.slots[slot].state = SLOT_DEFAULT;
        self.write_slot_state(slot)
    }

    fn write_slot_state(&mut self, slot: usize) -> Result<(), u8> {
        let out = self.slots[slot].context;
        let address = if self.slots[slot].state >= SLOT_ADDRESSED {
            slot as u32 + 1
        } else {
            0
        };
        let d3 = (self.slots[slot].state << 27) | address;
        self.mem
            .write_u32(add(out, 12), d3)
            .map_err(|_| cc::PARAMETER)
    }

    /// Writes endpoint `dci`'s context in the output context: copied from `input` if given,
    /// then with the controller's state and dequeue pointer.
    pub(super) fn write_endpoint_context(
        &mut self,
        slot: usize,
        dci: usize,
        input: Option<u64>,
    ) -> Result<(), u8> {
        let out = add(self.slots[slot].context, CTX * dci as u64);
        if let Some(input) = input {
            self.copy_context(input, out).map_err(|_| cc::PARAMETER)?;
        }
        let ep = &self.slots[slot].endpoints[dci - 1];
        let dword0 = self.mem.read_u32(out).map_err(|_| cc::PARAMETER)?;
        let dword0 = (dword0 & !0x7) | ep.state as u32;
        self.mem.write_u32(out, dword0).map_err(|_| cc::PARAMETER)?;
        let dequeue = ep.dequeue | u64::from(ep.cycle);
        self.mem
            .write(add(out, 8), &dequeue.to_le_bytes())
            .map_err(|_| cc::PARAMETER)
    }

    pub(super) fn device_mut(&mut self, port: u8) -> Option<&mut Box<dyn crate::usb::UsbDevice>> {
        let i = usize::from(port).checked_sub(1)?;
        self.ports.get_mut(i)?.device.as_mut()
    }
}

pub(super) fn read_trb<M: GuestMem>(mem: &M, addr: u64) -> Result<Trb, MemError> {
    let mut b = [0u8; 16];
    mem.read(addr, &mut b)?;
    Ok(Trb::parse(&b))
}
