//! A minimal xHCI driver for tests: it lays out its rings and contexts in guest memory,
//! runs the controller, enumerates devices and moves data, over any [`Bus`] — the model
//! in-process (unit tests) or isola-usb over vfio-user (process tests).
//!
//! It polls the event ring (no interrupt needed) and panics on anything unexpected: it is
//! test code.

use std::time::{Duration, Instant};

use crate::trb::{cc, ty, Trb, CHAIN, CYCLE, DIR_IN, IDT, IOC, ISP, TOGGLE_CYCLE};

/// Register access and guest memory, as a driver sees them.
pub trait Bus {
    fn read32(&mut self, offset: u64) -> u32;
    fn write32(&mut self, offset: u64, value: u32);
    fn mem_read(&mut self, addr: u64, buf: &mut [u8]);
    fn mem_write(&mut self, addr: u64, buf: &[u8]);
}

/// Guest-memory layout the driver uses (it needs 1 MiB from `base`).
pub const MEM_SIZE: usize = 1 << 20;
const DCBAA: u64 = 0x1000;
const CMD_RING: u64 = 0x2000;
const ERST: u64 = 0x3000;
const EVENT_RING: u64 = 0x4000;
const EVENT_TRBS: u64 = 64;
const INPUT_CTX: u64 = 0x5000;
const OUTPUT_CTX: u64 = 0x8000;
const RINGS: u64 = 0x20000;
/// Each transfer ring: 64 TRBs, the last a link back.
const RING_TRBS: u64 = 64;
pub const DATA: u64 = 0x80000;

const OP: u64 = 0x40;
const RT: u64 = 0x1000;
const DB: u64 = 0x2000;

pub struct Driver<B: Bus> {
    pub bus: B,
    base: u64,
    cmd: (u64, bool),
    event: (u64, bool),
    rings: std::collections::HashMap<(u8, u8), (u64, bool)>,
    /// Events taken from the ring that were not the one waited for.
    pub stash: Vec<Trb>,
    pub timeout: Duration,
}

impl<B: Bus> Driver<B> {
    pub fn new(bus: B, base: u64) -> Driver<B> {
        Driver {
            bus,
            base,
            cmd: (0, true),
            event: (0, true),
            rings: Default::default(),
            stash: Vec::new(),
            timeout: Duration::from_secs(10),
        }
    }

    pub fn into_bus(self) -> B {
        self.bus
    }

    pub fn at(&self, off: u64) -> u64 {
        self.base + off
    }

    fn write_trb(&mut self, addr: u64, trb: Trb) {
        self.bus.mem_write(addr, &trb.to_bytes());
    }

    fn write64(&mut self, off: u64, v: u64) {
        self.bus.write32(off, v as u32);
        self.bus.write32(off + 4, (v >> 32) as u32);
    }

    pub fn usbsts(&mut self) -> u32 {
        self.bus.read32(OP + 4)
    }
    pub fn portsc(&mut self, port: u8) -> u32 {
        self.bus.read32(OP + 0x400 + 0x10 * (u64::from(port) - 1))
    }

    /// Resets the controller and starts it with the driver's rings.
    pub fn start(&mut self) {
        self.bus.write32(OP, 2); // HCRST
        assert_eq!(self.usbsts() & 1, 1, "halted after reset");
        let zero = vec![0u8; 0x80000];
        self.bus.mem_write(self.at(0), &zero);
        self.bus.write32(OP + 0x38, 8);
        let dcbaa = self.at(DCBAA);
        self.write64(OP + 0x30, dcbaa);
        self.cmd = (self.at(CMD_RING), true);
        // Link at the end of the command ring.
        let link = Trb {
            parameter: self.at(CMD_RING),
            status: 0,
            control: (u32::from(ty::LINK) << 10) | TOGGLE_CYCLE,
        };
        self.write_trb(self.at(CMD_RING) + 63 * 16, link);
        let crcr = self.at(CMD_RING) | 1;
        self.write64(OP + 0x18, crcr);
        let mut entry = [0u8; 16];
        entry[..8].copy_from_slice(&self.at(EVENT_RING).to_le_bytes());
        entry[8..12].copy_from_slice(&(EVENT_TRBS as u32).to_le_bytes());
        let erst = self.at(ERST);
        self.bus.mem_write(erst, &entry);
        self.event = (self.at(EVENT_RING), true);
        self.bus.write32(RT + 0x28, 1);
        let erdp = self.at(EVENT_RING);
        self.write64(RT + 0x38, erdp);
        self.write64(RT + 0x30, erst);
        self.bus.write32(RT + 0x20, 2); // IMAN.IE
        self.bus.write32(OP, 1 | 4); // RS | INTE
        assert_eq!(self.usbsts() & 1, 0, "running");
        self.rings.clear();
        self.stash.clear();
    }

    /// The next event, waiting up to `timeout`; `None` if none came.
    pub fn next_event_within(&mut self, timeout: Duration) -> Option<Trb> {
        if !self.stash.is_empty() {
            return Some(self.stash.remove(0));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let mut b = [0u8; 16];
            self.bus.mem_read(self.event.0, &mut b);
            let trb = Trb::parse(&b);
            if trb.cycle() == self.event.1 {
                self.event.0 += 16;
                if self.event.0 == self.at(EVENT_RING) + EVENT_TRBS * 16 {
                    self.event = (self.at(EVENT_RING), !self.event.1);
                }
                let erdp = self.event.0 | 8;
                self.write64(RT + 0x38, erdp);
                return Some(trb);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Events other than port status changes that come within `timeout`.
    pub fn quiet(&mut self, timeout: Duration) -> Vec<Trb> {
        let mut got = Vec::new();
        while let Some(e) = self.next_event_within(timeout) {
            if e.trb_type() != ty::PORT_STATUS_CHANGE {
                got.push(e);
            }
        }
        got
    }

    /// Waits for an event of type `kind`, keeping others in the stash.
    pub fn wait_event(&mut self, kind: u8) -> Trb {
        let deadline = Instant::now() + self.timeout;
        let mut others = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(e) = self.next_event_within(left) else {
                panic!(
                    "no event of type {kind} within {:?} (others: {others:?})",
                    self.timeout
                );
            };
            if e.trb_type() == kind {
                others.extend(std::mem::take(&mut self.stash));
                self.stash = others;
                return e;
            }
            others.push(e);
        }
    }

    /// Runs one command; its completion event.
    pub fn command(&mut self, mut trb: Trb) -> Trb {
        let (addr, cycle) = self.cmd;
        trb.control = (trb.control & !CYCLE) | u32::from(cycle);
        self.write_trb(addr, trb);
        self.cmd.0 += 16;
        if self.cmd.0 == self.at(CMD_RING) + 63 * 16 {
            // Hand the link TRB over with the current cycle, then wrap.
            let link = Trb {
                parameter: self.at(CMD_RING),
                status: 0,
                control: (u32::from(ty::LINK) << 10) | TOGGLE_CYCLE | u32::from(cycle),
            };
            self.write_trb(self.cmd.0, link);
            self.cmd = (self.at(CMD_RING), !cycle);
        }
        self.bus.write32(DB, 0);
        let e = self.wait_event(ty::COMMAND_COMPLETION);
        assert_eq!(e.parameter, addr, "completion for the command just run");
        e
    }

    pub fn enable_slot(&mut self) -> u8 {
        let e = self.command(Trb::event(ty::ENABLE_SLOT, 0, 0, 0));
        assert_eq!(code(&e), cc::SUCCESS);
        e.slot()
    }

    /// Resets `port` and waits for its change event.
    pub fn reset_port(&mut self, port: u8) {
        let off = OP + 0x400 + 0x10 * (u64::from(port) - 1);
        let portsc = self.bus.read32(off);
        assert_ne!(portsc & 1, 0, "port {port} connected");
        self.bus
            .write32(off, (portsc & 0x0e00_c3e0) | (1 << 4) | (0x7f << 17));
        let portsc = self.bus.read32(off);
        assert_ne!(portsc & 2, 0, "port {port} enabled after reset");
    }

    fn ring(&mut self, slot: u8, dci: u8) -> u64 {
        self.at(RINGS) + (u64::from(slot) * 32 + u64::from(dci)) * RING_TRBS * 16
    }

    /// Address Device on `port` for `slot`, with endpoint 0's ring.
    pub fn address(&mut self, slot: u8, port: u8, max_packet: u16) -> Trb {
        let out = self.at(OUTPUT_CTX) + u64::from(slot) * 0x400;
        let dcbaa = self.at(DCBAA) + u64::from(slot) * 8;
        self.bus.mem_write(dcbaa, &out.to_le_bytes());
        let mut input = vec![0u8; 0x420];
        input[4..8].copy_from_slice(&3u32.to_le_bytes());
        let speed = (self.portsc(port) >> 10) & 0xf;
        let slot0 = (1u32 << 27) | (speed << 20);
        input[32..36].copy_from_slice(&slot0.to_le_bytes());
        input[36..40].copy_from_slice(&(u32::from(port) << 16).to_le_bytes());
        let ring = self.ring(slot, 1);
        self.init_ring(slot, 1, ring);
        let ep0 = (3u32 << 1) | (4 << 3) | (u32::from(max_packet) << 16);
        input[68..72].copy_from_slice(&ep0.to_le_bytes());
        input[72..80].copy_from_slice(&(ring | 1).to_le_bytes());
        let at = self.at(INPUT_CTX);
        self.bus.mem_write(at, &input);
        let mut trb = Trb::event(ty::ADDRESS_DEVICE, at, 0, u32::from(slot) << 24);
        trb.control |= 0;
        self.command(trb)
    }

    fn init_ring(&mut self, slot: u8, dci: u8, ring: u64) {
        let zero = vec![0u8; (RING_TRBS * 16) as usize];
        self.bus.mem_write(ring, &zero);
        let link = Trb {
            parameter: ring,
            status: 0,
            control: (u32::from(ty::LINK) << 10) | TOGGLE_CYCLE,
        };
        self.write_trb(ring + (RING_TRBS - 1) * 16, link);
        self.rings.insert((slot, dci), (ring, true));
    }

    /// Configure Endpoint adding `(dci, type, max packet)` for each.
    pub fn configure(&mut self, slot: u8, eps: &[(u8, u8, u16)]) -> Trb {
        let mut input = vec![0u8; 0x420];
        let mut add = 1u32;
        let mut last = 1;
        for &(dci, ep_type, mp) in eps {
            add |= 1 << dci;
            last = last.max(dci);
            let ring = self.ring(slot, dci);
            self.init_ring(slot, dci, ring);
            let off = 32 * (usize::from(dci) + 1);
            let d1 = (3u32 << 1) | (u32::from(ep_type) << 3) | (u32::from(mp) << 16);
            input[off + 4..off + 8].copy_from_slice(&d1.to_le_bytes());
            input[off + 8..off + 16].copy_from_slice(&(ring | 1).to_le_bytes());
        }
        input[4..8].copy_from_slice(&add.to_le_bytes());
        input[32..36].copy_from_slice(&(u32::from(last) << 27).to_le_bytes());
        let at = self.at(INPUT_CTX);
        self.bus.mem_write(at, &input);
        self.command(Trb::event(
            ty::CONFIGURE_ENDPOINT,
            at,
            0,
            u32::from(slot) << 24,
        ))
    }

    /// Queues TRBs on an endpoint's ring (cycle bits set here) and rings its doorbell.
    pub fn queue(&mut self, slot: u8, dci: u8, trbs: &[Trb]) -> Vec<u64> {
        let mut addrs = Vec::new();
        for &trb in trbs {
            let ring = self.ring(slot, dci);
            let (addr, cycle) = self.rings[&(slot, dci)];
            let mut trb = trb;
            trb.control = (trb.control & !CYCLE) | u32::from(cycle);
            self.write_trb(addr, trb);
            addrs.push(addr);
            let mut next = (addr + 16, cycle);
            if next.0 == ring + (RING_TRBS - 1) * 16 {
                let link = Trb {
                    parameter: ring,
                    status: 0,
                    control: (u32::from(ty::LINK) << 10) | TOGGLE_CYCLE | u32::from(cycle),
                };
                self.write_trb(next.0, link);
                next = (ring, !cycle);
            }
            self.rings.insert((slot, dci), next);
        }
        self.bus.write32(DB + 4 * u64::from(slot), u32::from(dci));
        addrs
    }

    /// A control transfer; (completion code, IN data). OUT data comes from `out`.
    pub fn control(&mut self, slot: u8, setup: [u8; 8], length: u16, out: &[u8]) -> (u8, Vec<u8>) {
        let data_in = setup[0] & 0x80 != 0;
        let mut p = [0u8; 8];
        p.copy_from_slice(&setup);
        let mut trbs = vec![Trb {
            parameter: u64::from_le_bytes(p),
            status: 8,
            control: (u32::from(ty::SETUP) << 10)
                | IDT
                | if length == 0 {
                    0
                } else if data_in {
                    3 << 16
                } else {
                    2 << 16
                },
        }];
        let buf = self.at(DATA);
        if length > 0 {
            if !data_in {
                self.bus.mem_write(buf, out);
            }
            trbs.push(Trb {
                parameter: buf,
                status: u32::from(length),
                control: (u32::from(ty::DATA) << 10) | if data_in { DIR_IN | ISP } else { 0 },
            });
        }
        let status_dir = if data_in || length == 0 { 0 } else { DIR_IN };
        trbs.push(Trb {
            parameter: 0,
            status: 0,
            control: (u32::from(ty::STATUS) << 10) | IOC | status_dir,
        });
        self.queue(slot, 1, &trbs);
        let mut moved = usize::from(length);
        loop {
            let e = self.wait_event(ty::TRANSFER_EVENT);
            match code(&e) {
                cc::SHORT_PACKET => moved = usize::from(length) - (e.status & 0xff_ffff) as usize,
                cc::SUCCESS => break,
                other => return (other, Vec::new()),
            }
        }
        let mut data = vec![0u8; if data_in { moved } else { 0 }];
        self.bus.mem_read(buf, &mut data);
        (cc::SUCCESS, data)
    }

    /// One Normal TRB on a bulk or interrupt endpoint: (completion code, bytes moved).
    pub fn normal(&mut self, slot: u8, dci: u8, buf: u64, len: u32) -> (u8, u32) {
        let flags = IOC | if dci % 2 == 1 { ISP } else { 0 };
        let trb = Trb {
            parameter: buf,
            status: len,
            control: (u32::from(ty::NORMAL) << 10) | flags,
        };
        self.queue(slot, dci, &[trb]);
        let e = self.wait_event(ty::TRANSFER_EVENT);
        (code(&e), len - (e.status & 0xff_ffff))
    }

    /// A bulk TD of several chained Normal TRBs.
    pub fn chained(&mut self, slot: u8, dci: u8, parts: &[(u64, u32)]) -> Vec<Trb> {
        let trbs: Vec<Trb> = parts
            .iter()
            .enumerate()
            .map(|(i, &(buf, len))| Trb {
                parameter: buf,
                status: len,
                control: (u32::from(ty::NORMAL) << 10)
                    | ISP
                    | if i + 1 == parts.len() { IOC } else { CHAIN },
            })
            .collect();
        self.queue(slot, dci, &trbs);
        vec![self.wait_event(ty::TRANSFER_EVENT)]
    }
}

pub fn code(e: &Trb) -> u8 {
    (e.status >> 24) as u8
}

/// GET_DESCRIPTOR(type, index) as a setup packet.
pub fn get_descriptor(kind: u8, index: u8, length: u16) -> [u8; 8] {
    let l = length.to_le_bytes();
    [0x80, 6, index, kind, 0, 0, l[0], l[1]]
}

/// A Command Block Wrapper.
pub fn cbw(tag: u32, length: u32, data_in: bool, cdb: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 31];
    b[..4].copy_from_slice(b"USBC");
    b[4..8].copy_from_slice(&tag.to_le_bytes());
    b[8..12].copy_from_slice(&length.to_le_bytes());
    b[12] = if data_in { 0x80 } else { 0 };
    b[14] = cdb.len() as u8;
    b[15..15 + cdb.len()].copy_from_slice(cdb);
    b
}

/// READ(10) or WRITE(10) of `blocks` at `lba`.
pub fn rw10(write: bool, lba: u32, blocks: u16) -> Vec<u8> {
    let (l, n) = (lba.to_be_bytes(), blocks.to_be_bytes());
    vec![
        if write { 0x2a } else { 0x28 },
        0,
        l[0],
        l[1],
        l[2],
        l[3],
        0,
        n[0],
        n[1],
        0,
    ]
}

/// Storage through the driver: bulk OUT is DCI 4, bulk IN DCI 3.
impl<B: Bus> Driver<B> {
    /// Runs one SCSI command: (CSW status, data read).
    pub fn scsi(
        &mut self,
        slot: u8,
        tag: u32,
        cdb: &[u8],
        data_in: bool,
        data: &[u8],
        len: u32,
    ) -> (u8, Vec<u8>) {
        let buf = self.at(DATA);
        self.bus.mem_write(buf, &cbw(tag, len, data_in, cdb));
        assert_eq!(self.normal(slot, 4, buf, 31), (cc::SUCCESS, 31));
        let mut got = Vec::new();
        if len > 0 {
            let dbuf = self.at(DATA) + 0x1000;
            if data_in {
                let (code, n) = self.normal(slot, 3, dbuf, len);
                assert!(
                    code == cc::SUCCESS || code == cc::SHORT_PACKET,
                    "data in: {code}"
                );
                got = vec![0u8; n as usize];
                self.bus.mem_read(dbuf, &mut got);
            } else {
                self.bus.mem_write(dbuf, data);
                assert_eq!(self.normal(slot, 4, dbuf, len).0, cc::SUCCESS);
            }
        }
        let (code, n) = self.normal(slot, 3, buf, 13);
        assert_eq!((code, n), (cc::SUCCESS, 13));
        let mut csw = [0u8; 13];
        self.bus.mem_read(buf, &mut csw);
        assert_eq!(&csw[..4], b"USBS");
        assert_eq!(u32::from_le_bytes([csw[4], csw[5], csw[6], csw[7]]), tag);
        (csw[12], got)
    }
}
