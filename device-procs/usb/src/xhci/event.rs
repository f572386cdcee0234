//! Interrupter 0 and its event ring (xHCI 4.9.4): the segment table the guest gives in
//! ERSTSZ/ERSTBA, the enqueue pointer the controller keeps, the dequeue pointer the guest
//! writes to ERDP. Events that do not fit (the guest has not consumed enough) wait in a
//! bounded backlog and go out when ERDP moves.

use std::collections::VecDeque;

use super::{guest_warn, Controller, STS_EINT, STS_HCH, STS_HSE};
use crate::mem::{add, GuestMem};
use crate::trb::{Trb, TRB_LEN};

/// Segments the controller reads (HCSPARAMS2.ERST Max = 2^1).
const MAX_SEGMENTS: u32 = 2;
/// Events kept while the ring is full; beyond it they are dropped (logged).
const MAX_BACKLOG: usize = 256;
const IMAN_IP: u32 = 1 << 0;
const IMAN_IE: u32 = 1 << 1;
const ERDP_EHB: u64 = 1 << 3;

#[derive(Debug, Default, Clone)]
pub struct Interrupter {
    iman: u32,
    imod: u32,
    erstsz: u32,
    erstba: u64,
    erdp: u64,
    /// Where the next event goes, and what is left of its segment.
    enqueue: u64,
    segment: u32,
    left: u32,
    cycle: bool,
    /// Segment table read when ERSTBA was written: (base, TRB count) per segment.
    segments: Vec<(u64, u32)>,
    backlog: VecDeque<Trb>,
}

impl Interrupter {
    pub fn enabled(&self) -> bool {
        self.iman & IMAN_IE != 0
    }

    pub fn read(&self, offset: u64) -> u32 {
        match offset {
            0x00 => self.iman,
            0x04 => self.imod,
            0x08 => self.erstsz,
            0x10 => self.erstba as u32,
            0x14 => (self.erstba >> 32) as u32,
            0x18 => self.erdp as u32,
            0x1c => (self.erdp >> 32) as u32,
            _ => 0,
        }
    }

    /// The ring is full when the slot after the enqueue pointer is the dequeue pointer.
    fn full(&self) -> bool {
        let (next, _, _, _) = self.advance();
        next == self.erdp & !0xf
    }

    /// The enqueue position after the current one: (address, segment, left, cycle).
    fn advance(&self) -> (u64, u32, u32, bool) {
        if self.left > 1 {
            return (
                add(self.enqueue, TRB_LEN),
                self.segment,
                self.left - 1,
                self.cycle,
            );
        }
        let next = (self.segment + 1) % self.segments.len().max(1) as u32;
        let (base, size) = self.segments.get(next as usize).copied().unwrap_or((0, 0));
        let cycle = if next == 0 { !self.cycle } else { self.cycle };
        (base, next, size, cycle)
    }
}

impl<M: GuestMem> Controller<M> {
    pub(super) fn interrupter_write(&mut self, offset: u64, value: u32) {
        let i = &mut self.interrupter;
        match offset {
            0x00 => {
                i.iman = (i.iman & !IMAN_IE) | (value & IMAN_IE);
                if value & IMAN_IP != 0 {
                    i.iman &= !IMAN_IP;
                }
            }
            0x04 => i.imod = value,
            0x08 => i.erstsz = value & 0xffff,
            0x10 => {
                i.erstba = (i.erstba & !0xffff_ffff) | u64::from(value & !0x3f);
                self.init_event_ring();
            }
            0x14 => {
                i.erstba = (i.erstba & 0xffff_ffff) | (u64::from(value) << 32);
                self.init_event_ring();
            }
            0x18 => {
                // EHB is write-1-to-clear; DESI and the pointer are the guest's.
                let ehb = i.erdp & ERDP_EHB != 0 && value & (ERDP_EHB as u32) == 0;
                i.erdp = (i.erdp & !0xffff_ffff) | u64::from(value & !(ERDP_EHB as u32));
                if ehb {
                    i.erdp |= ERDP_EHB;
                }
                self.flush_backlog();
            }
            0x1c => {
                i.erdp = (i.erdp & 0xffff_ffff) | (u64::from(value) << 32);
                self.flush_backlog();
            }
            _ => {}
        }
    }

    /// Reads the segment table (ERSTBA, ERSTSZ entries) and starts the ring at its start.
    fn init_event_ring(&mut self) {
        let count = self.interrupter.erstsz.min(MAX_SEGMENTS);
        let mut segments = Vec::new();
        for n in 0..u64::from(count) {
            let entry = Some(add(self.interrupter.erstba, n * 16));
            let read = entry.map(|e| (self.mem.read_u64(e), self.mem.read_u32(add(e, 8))));
            match read {
                Some((Ok(base), Ok(size))) if (16..=4096).contains(&(size & 0xffff)) => {
                    segments.push((base & !0x3f, size & 0xffff));
                }
                _ => {
                    // Not a usable table (yet): the guest may write ERSTSZ after ERSTBA.
                    self.interrupter.segments.clear();
                    return;
                }
            }
        }
        let i = &mut self.interrupter;
        i.segments = segments;
        i.segment = 0;
        (i.enqueue, i.left) = i.segments.first().copied().unwrap_or((0, 0));
        i.cycle = true;
        i.backlog.clear();
    }

    /// Puts an event on the ring (or in the backlog if the ring is full).
    pub(super) fn post_event(&mut self, trb: Trb) {
        if !self.interrupter.backlog.is_empty() {
            self.queue_backlog(trb);
            self.flush_backlog();
            return;
        }
        if !self.write_event(trb) {
            self.queue_backlog(trb);
        }
    }

    fn queue_backlog(&mut self, trb: Trb) {
        if self.interrupter.backlog.len() >= MAX_BACKLOG {
            guest_warn!(
                self,
                "xhci: event ring full and backlog full: event dropped"
            );
            return;
        }
        self.interrupter.backlog.push_back(trb);
    }

    fn flush_backlog(&mut self) {
        while let Some(&trb) = self.interrupter.backlog.front() {
            if !self.write_event(trb) {
                return;
            }
            self.interrupter.backlog.pop_front();
        }
    }

    /// Writes one event if there is room; false if the ring is full or not set up.
    fn write_event(&mut self, mut trb: Trb) -> bool {
        let i = &self.interrupter;
        if i.segments.is_empty() || i.full() {
            return false;
        }
        trb.control = (trb.control & !1) | u32::from(i.cycle);
        // Parameter, status and the control word without its cycle bit first, then the
        // cycle bit: the guest never sees a half-written event as valid.
        let mut bytes = trb.to_bytes();
        bytes[12] &= !1;
        bytes[12] |= u8::from(!i.cycle);
        let enqueue = i.enqueue;
        let written = self
            .mem
            .write(enqueue, &bytes)
            .and_then(|()| self.mem.write(add(enqueue, 12), &trb.control.to_le_bytes()));
        if written.is_err() {
            guest_warn!(
                self,
                "xhci: event ring segment at {enqueue:#x} is outside guest memory"
            );
            self.op.usbsts |= STS_HSE | STS_HCH;
            self.op.usbcmd &= !1;
            self.irq_wanted = true;
            return true;
        }
        let (next, segment, left, cycle) = self.interrupter.advance();
        let i = &mut self.interrupter;
        (i.enqueue, i.segment, i.left, i.cycle) = (next, segment, left, cycle);
        i.iman |= IMAN_IP;
        i.erdp |= ERDP_EHB;
        self.op.usbsts |= STS_EINT;
        self.irq_wanted = true;
        true
    }

    /// A Command Completion event for the command TRB at `addr`.
    pub(super) fn command_completion(&mut self, addr: u64, code: u8, slot: u8) {
        let trb = Trb::event(
            crate::trb::ty::COMMAND_COMPLETION,
            addr,
            u32::from(code) << 24,
            u32::from(slot) << 24,
        );
        self.post_event(trb);
    }
}
