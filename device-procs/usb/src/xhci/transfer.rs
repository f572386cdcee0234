//! Transfer rings (xHCI 4.10): a doorbell for a slot's endpoint walks its ring, gathers
//! one TD at a time (a control transfer's setup, data and status stages together), hands
//! it to the device and posts Transfer Events.
//!
//! Limits, so a guest cannot make one doorbell run for ever or hold unbounded memory:
//! [`MAX_TDS`] TDs per doorbell, [`MAX_TRBS_PER_TD`] TRBs and [`MAX_TD_BYTES`] bytes per TD,
//! [`MAX_LINKS`] link TRBs in a row. A TD over a limit, a TRB of a type that does not
//! belong, or a buffer outside guest memory halts the endpoint with a TRB Error event.

use super::command::read_trb;
use super::{guest_warn, Controller};
use crate::mem::{add, GuestMem};
use crate::trb::{cc, ty, Setup, Trb, CHAIN, DIR_IN, IDT, IOC, ISP, TOGGLE_CYCLE, TRB_LEN};
use crate::usb::{Stall, Xfer};

pub const MAX_TDS: usize = 64;
pub const MAX_TRBS_PER_TD: usize = 64;
pub const MAX_TD_BYTES: u64 = 4 << 20;
pub const MAX_LINKS: usize = 8;

/// Endpoint states as the endpoint context carries them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EpState {
    #[default]
    Disabled = 0,
    Running = 1,
    Halted = 2,
    Stopped = 3,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Endpoint {
    pub state: EpState,
    pub dequeue: u64,
    pub cycle: bool,
    pub ep_type: u8,
    pub max_packet: u16,
    /// An IN TD is waiting for the device to have data (retried by `kick`).
    pub waiting: bool,
}

impl Endpoint {
    /// An endpoint as its (input) context describes it, running.
    pub fn from_context<M: GuestMem>(mem: &M, ctx: u64) -> Result<Endpoint, crate::mem::MemError> {
        let dword1 = mem.read_u32(add(ctx, 4))?;
        let dequeue = mem.read_u64(add(ctx, 8))?;
        Ok(Endpoint {
            state: EpState::Running,
            dequeue: dequeue & !0xf,
            cycle: dequeue & 1 != 0,
            ep_type: ((dword1 >> 3) & 7) as u8,
            max_packet: (dword1 >> 16) as u16,
            waiting: false,
        })
    }
}

#[derive(Debug, Default, Clone)]
pub struct Slot {
    pub enabled: bool,
    pub state: u32,
    pub port: u8,
    /// The output device context's address.
    pub context: u64,
    pub endpoints: [Endpoint; 31],
}

/// One TRB of a TD: where it is and what it says.
#[derive(Debug, Clone, Copy)]
struct Item {
    addr: u64,
    trb: Trb,
}

/// A gathered TD and where the ring continues after it.
struct Td {
    items: Vec<Item>,
    next: u64,
    next_cycle: bool,
}

enum Gather {
    Ready(Td),
    /// The guest has not finished writing it (a TRB with the wrong cycle bit).
    Incomplete,
    /// Broken: TRB Error at this TRB.
    Bad(u64, &'static str),
}

/// What a TD did: events to post, then whether the endpoint goes on.
enum Outcome {
    Done(Vec<Trb>),
    Nak,
    Halt(Vec<Trb>),
}

fn transfer_event(addr: u64, code: u8, residual: u32, slot: u8, dci: u8, ed: bool) -> Trb {
    let control = (u32::from(slot) << 24) | (u32::from(dci) << 16) | (u32::from(ed) << 2);
    Trb::event(
        ty::TRANSFER_EVENT,
        addr,
        (u32::from(code) << 24) | (residual & 0xff_ffff),
        control,
    )
}

impl<M: GuestMem> Controller<M> {
    pub(super) fn ring_endpoint(&mut self, slot_id: u8, dci: u8) {
        let Some(slot) = usize::from(slot_id)
            .checked_sub(1)
            .filter(|&s| s < self.slots.len())
        else {
            guest_warn!(
                self,
                "xhci: doorbell for slot {slot_id}, which does not exist"
            );
            return;
        };
        if !self.slots[slot].enabled || !(1..=31).contains(&dci) {
            guest_warn!(
                self,
                "xhci: doorbell for slot {slot_id} endpoint {dci}, not enabled"
            );
            return;
        }
        let ep = &mut self.slots[slot].endpoints[usize::from(dci) - 1];
        match ep.state {
            EpState::Running => {}
            EpState::Stopped => ep.state = EpState::Running,
            _ => return,
        }
        self.run_endpoint(slot, dci);
    }

    pub(super) fn retry_waiting(&mut self) {
        for slot in 0..self.slots.len() {
            for i in 0..31 {
                let ep = &self.slots[slot].endpoints[i];
                if ep.waiting && ep.state == EpState::Running {
                    self.run_endpoint(slot, i as u8 + 1);
                }
            }
        }
    }

    fn run_endpoint(&mut self, slot: usize, dci: u8) {
        let i = usize::from(dci) - 1;
        for _ in 0..MAX_TDS {
            let ep = self.slots[slot].endpoints[i];
            let td = match self.gather(ep.dequeue, ep.cycle, dci == 1) {
                Gather::Ready(td) => td,
                Gather::Incomplete => return,
                Gather::Bad(addr, why) => {
                    guest_warn!(
                        self,
                        "xhci: slot {} endpoint {dci}: {why}; halted",
                        slot + 1
                    );
                    let event = transfer_event(addr, cc::TRB, 0, slot as u8 + 1, dci, false);
                    self.halt(slot, dci, vec![event]);
                    return;
                }
            };
            let outcome = if dci == 1 {
                self.control_td(slot, &td.items)
            } else {
                self.normal_td(slot, dci, &td.items)
            };
            match outcome {
                Outcome::Nak => {
                    self.slots[slot].endpoints[i].waiting = true;
                    return;
                }
                Outcome::Done(events) => {
                    let ep = &mut self.slots[slot].endpoints[i];
                    (ep.dequeue, ep.cycle, ep.waiting) = (td.next, td.next_cycle, false);
                    for e in events {
                        self.post_event(e);
                    }
                }
                Outcome::Halt(events) => {
                    // The dequeue pointer stays on the TD that failed (xHCI 4.10.2.1).
                    self.halt(slot, dci, events);
                    return;
                }
            }
        }
    }

    fn halt(&mut self, slot: usize, dci: u8, events: Vec<Trb>) {
        let ep = &mut self.slots[slot].endpoints[usize::from(dci) - 1];
        ep.state = EpState::Halted;
        ep.waiting = false;
        let _ = self.write_endpoint_context(slot, usize::from(dci), None);
        for e in events {
            self.post_event(e);
        }
    }

    /// Gathers the TD at `dequeue` (for the control endpoint: setup to status stage).
    fn gather(&self, mut addr: u64, mut cycle: bool, control: bool) -> Gather {
        let mut items = Vec::new();
        let mut links = 0;
        loop {
            let trb = match read_trb(&self.mem, addr) {
                Ok(trb) => trb,
                Err(_) => return Gather::Bad(addr, "transfer ring outside guest memory"),
            };
            if trb.cycle() != cycle {
                return Gather::Incomplete;
            }
            if trb.trb_type() == ty::LINK {
                links += 1;
                if links > MAX_LINKS {
                    return Gather::Bad(addr, "link TRBs in a loop");
                }
                addr = trb.parameter & !0xf;
                cycle ^= trb.has(TOGGLE_CYCLE);
                continue;
            }
            links = 0;
            items.push(Item { addr, trb });
            if items.len() > MAX_TRBS_PER_TD {
                return Gather::Bad(addr, "TD longer than the TRB limit");
            }
            addr = add(addr, TRB_LEN);
            let end = if control {
                trb.trb_type() == ty::STATUS || (items.len() == 1 && trb.trb_type() != ty::SETUP)
            } else {
                !trb.has(CHAIN)
            };
            if end {
                return Gather::Ready(Td {
                    items,
                    next: addr,
                    next_cycle: cycle,
                });
            }
        }
    }

    /// Reads the OUT data of `items` (immediate or from guest buffers).
    fn gather_out(&self, items: &[Item]) -> Result<Vec<u8>, u64> {
        let mut data = Vec::new();
        for it in items {
            let len = it.trb.transfer_len() as usize;
            if it.trb.has(IDT) {
                let bytes = it.trb.parameter.to_le_bytes();
                data.extend_from_slice(&bytes[..len.min(8)]);
                continue;
            }
            let start = data.len();
            data.resize(start + len, 0);
            if self.mem.read(it.trb.parameter, &mut data[start..]).is_err() {
                return Err(it.addr);
            }
        }
        Ok(data)
    }

    /// Writes IN `data` across the buffers of `items`; the TRBs' events. `Err` = the TRB
    /// whose buffer is outside guest memory.
    fn scatter_in(&self, items: &[Item], data: &[u8], ids: (u8, u8)) -> Result<Vec<Trb>, u64> {
        let mut events = Vec::new();
        let mut off = 0usize;
        let total: usize = items.iter().map(|it| it.trb.transfer_len() as usize).sum();
        let short = data.len() < total;
        for (n, it) in items.iter().enumerate() {
            let len = it.trb.transfer_len() as usize;
            let chunk = len.min(data.len() - off);
            if chunk > 0
                && self
                    .mem
                    .write(it.trb.parameter, &data[off..off + chunk])
                    .is_err()
            {
                return Err(it.addr);
            }
            off += chunk;
            let residual = (len - chunk) as u32;
            let last = n + 1 == items.len();
            if short && chunk < len {
                // The TD ends at its first short TRB: one Short Packet event (ISP or IOC).
                if it.trb.has(ISP) || it.trb.has(IOC) || last {
                    let e =
                        transfer_event(it.addr, cc::SHORT_PACKET, residual, ids.0, ids.1, false);
                    events.push(e);
                }
                return Ok(events);
            }
            if it.trb.has(IOC) {
                events.push(transfer_event(it.addr, cc::SUCCESS, 0, ids.0, ids.1, false));
            }
        }
        Ok(events)
    }

    /// A bulk or interrupt TD: Normal TRBs (plus Event Data and No Op).
    fn normal_td(&mut self, slot: usize, dci: u8, items: &[Item]) -> Outcome {
        let ids = (slot as u8 + 1, dci);
        let bad = |addr| Outcome::Halt(vec![transfer_event(addr, cc::TRB, 0, ids.0, ids.1, false)]);
        let mut data_items = Vec::new();
        let mut total = 0u64;
        for it in items {
            match it.trb.trb_type() {
                ty::NORMAL => {
                    total += u64::from(it.trb.transfer_len());
                    if it.trb.has(IDT) && (dci % 2 == 1 || it.trb.transfer_len() > 8) {
                        return bad(it.addr);
                    }
                    data_items.push(*it);
                }
                ty::NOOP | ty::EVENT_DATA => {}
                _ => return bad(it.addr),
            }
        }
        if total > MAX_TD_BYTES {
            return bad(items[0].addr);
        }
        let port = self.slots[slot].port;
        let ep_num = dci / 2;
        let (result, moved) = if dci % 2 == 1 {
            let mut buf = vec![0u8; total as usize];
            let Some(device) = self.device_mut(port) else {
                return bad(items[0].addr);
            };
            match device.transfer_in(ep_num, &mut buf) {
                Xfer::Done(n) => {
                    buf.truncate(n.min(total as usize));
                    (self.scatter_in(&data_items, &buf, ids), buf.len())
                }
                Xfer::Nak => return Outcome::Nak,
                Xfer::Stall => {
                    return Outcome::Halt(vec![transfer_event(
                        items[0].addr,
                        cc::STALL,
                        0,
                        ids.0,
                        ids.1,
                        false,
                    )])
                }
            }
        } else {
            let data = match self.gather_out(&data_items) {
                Ok(data) => data,
                Err(addr) => return bad(addr),
            };
            let Some(device) = self.device_mut(port) else {
                return bad(items[0].addr);
            };
            match device.transfer_out(ep_num, &data) {
                Xfer::Done(n) => {
                    let mut events = Vec::new();
                    for it in &data_items {
                        if it.trb.has(IOC) {
                            events.push(transfer_event(
                                it.addr,
                                cc::SUCCESS,
                                0,
                                ids.0,
                                ids.1,
                                false,
                            ));
                        }
                    }
                    (Ok(events), n)
                }
                Xfer::Nak => return Outcome::Nak,
                Xfer::Stall => {
                    return Outcome::Halt(vec![transfer_event(
                        items[0].addr,
                        cc::STALL,
                        0,
                        ids.0,
                        ids.1,
                        false,
                    )])
                }
            }
        };
        match result {
            Err(addr) => bad(addr),
            Ok(mut events) => {
                for it in items
                    .iter()
                    .filter(|it| it.trb.trb_type() == ty::EVENT_DATA && it.trb.has(IOC))
                {
                    let e = transfer_event(
                        it.trb.parameter,
                        cc::SUCCESS,
                        moved as u32,
                        ids.0,
                        ids.1,
                        true,
                    );
                    events.push(e);
                }
                Outcome::Done(events)
            }
        }
    }

    /// A control TD: Setup, optional Data (with chained Normal TRBs), Status.
    fn control_td(&mut self, slot: usize, items: &[Item]) -> Outcome {
        let ids = (slot as u8 + 1, 1u8);
        let bad = |addr| Outcome::Halt(vec![transfer_event(addr, cc::TRB, 0, ids.0, ids.1, false)]);
        let setup_item = items[0];
        let status = items[items.len() - 1];
        if setup_item.trb.trb_type() != ty::SETUP
            || !setup_item.trb.has(IDT)
            || setup_item.trb.transfer_len() != 8
            || status.trb.trb_type() != ty::STATUS
        {
            return bad(setup_item.addr);
        }
        let data_items = &items[1..items.len() - 1];
        for (n, it) in data_items.iter().enumerate() {
            let expected = if n == 0 { ty::DATA } else { ty::NORMAL };
            if it.trb.trb_type() != expected {
                return bad(it.addr);
            }
        }
        let setup = Setup::from_parameter(setup_item.trb.parameter);
        let data_in = data_items.first().is_some_and(|d| d.trb.has(DIR_IN));
        let total: usize = data_items
            .iter()
            .map(|it| it.trb.transfer_len() as usize)
            .sum();
        if !data_items.is_empty() && (data_in != setup.is_in() || total > usize::from(setup.length))
        {
            // A data stage longer than the request, or in the other direction.
            return bad(data_items[0].addr);
        }
        let out = if data_in {
            Vec::new()
        } else {
            match self.gather_out(data_items) {
                Ok(out) => out,
                Err(addr) => return bad(addr),
            }
        };
        let port = self.slots[slot].port;
        let Some(device) = self.device_mut(port) else {
            return bad(setup_item.addr);
        };
        let answer: Result<Vec<u8>, Stall> = device.control(&setup, &out);
        let Ok(mut answer) = answer else {
            return Outcome::Halt(vec![transfer_event(
                setup_item.addr,
                cc::STALL,
                0,
                ids.0,
                ids.1,
                false,
            )]);
        };
        let mut events = Vec::new();
        if setup_item.trb.has(IOC) {
            events.push(transfer_event(
                setup_item.addr,
                cc::SUCCESS,
                0,
                ids.0,
                ids.1,
                false,
            ));
        }
        if data_in {
            answer.truncate(total);
            match self.scatter_in(data_items, &answer, ids) {
                Ok(e) => events.extend(e),
                Err(addr) => return bad(addr),
            }
        } else {
            for it in data_items.iter().filter(|it| it.trb.has(IOC)) {
                events.push(transfer_event(it.addr, cc::SUCCESS, 0, ids.0, ids.1, false));
            }
        }
        if status.trb.has(IOC) {
            events.push(transfer_event(
                status.addr,
                cc::SUCCESS,
                0,
                ids.0,
                ids.1,
                false,
            ));
        }
        Outcome::Done(events)
    }
}
