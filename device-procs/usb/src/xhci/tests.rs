//! The controller driven by the test driver (`crate::testing`) in test memory: enumeration,
//! HID reports, storage, and a hostile guest.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::hid::{HidDevice, HidKind, Reports};
use crate::mem::TestMemory;
use crate::storage::Storage;
use crate::testing::{code, get_descriptor, rw10, Bus, Driver, DATA, MEM_SIZE};
use crate::trb::{cc, ty, Trb};

const BASE: u64 = 0x10_0000;

struct Local(Controller<TestMemory>);

impl Bus for Local {
    fn read32(&mut self, offset: u64) -> u32 {
        self.0.mmio_read(offset, 4) as u32
    }
    fn write32(&mut self, offset: u64, value: u32) {
        self.0.mmio_write(offset, 4, u64::from(value));
    }
    fn mem_read(&mut self, addr: u64, buf: &mut [u8]) {
        self.0.mem().read(addr, buf).unwrap();
    }
    fn mem_write(&mut self, addr: u64, buf: &[u8]) {
        self.0.mem().write(addr, buf).unwrap();
    }
}

struct Rig {
    drv: Driver<Local>,
    keyboard: Arc<Reports>,
    disk: std::fs::File,
    irqs: Arc<AtomicUsize>,
}

fn rig() -> Rig {
    let keyboard = Arc::new(Reports::new(HidKind::Keyboard, 64));
    let tablet = Arc::new(Reports::new(HidKind::Tablet, 64));
    let disk = memfd::MemfdOptions::default()
        .create("disk")
        .unwrap()
        .into_file();
    disk.set_len(1 << 20).unwrap();
    let storage = Storage::new(disk.try_clone().unwrap(), 2048, false, Speed::Super);
    let devices: Vec<Option<Box<dyn UsbDevice>>> = vec![
        Some(Box::new(HidDevice::new(keyboard.clone()))),
        Some(Box::new(HidDevice::new(tablet))),
        Some(Box::new(storage)),
    ];
    let mut c = Controller::new(TestMemory::new(BASE, MEM_SIZE), devices);
    let irqs = Arc::new(AtomicUsize::new(0));
    let count = irqs.clone();
    c.set_irq(Some(Box::new(move || {
        count.fetch_add(1, Ordering::Relaxed);
    })));
    let mut drv = Driver::new(Local(c), BASE);
    drv.timeout = Duration::from_millis(50);
    drv.start();
    Rig {
        drv,
        keyboard,
        disk,
        irqs,
    }
}

/// Port reset, Enable Slot, Address Device: the slot.
fn attach(drv: &mut Driver<Local>, port: u8, max_packet: u16) -> u8 {
    drv.reset_port(port);
    let slot = drv.enable_slot();
    assert_eq!(code(&drv.address(slot, port, max_packet)), cc::SUCCESS);
    slot
}

#[test]
fn ports_report_their_devices_and_speeds() {
    let mut r = rig();
    let events: Vec<Trb> = (0..3)
        .map(|_| r.drv.wait_event(ty::PORT_STATUS_CHANGE))
        .collect();
    let ports: Vec<u64> = events.iter().map(|e| e.parameter >> 24).collect();
    assert_eq!(ports, vec![1, 2, 3]);
    assert_eq!((r.drv.portsc(1) >> 10) & 0xf, Speed::High as u32);
    assert_eq!((r.drv.portsc(3) >> 10) & 0xf, Speed::Super as u32);
    // USB 3 ports are enabled at once; USB 2 ports after a reset.
    assert_ne!(r.drv.portsc(3) & PORT_PED, 0);
    assert_eq!(r.drv.portsc(1) & PORT_PED, 0);
    assert_eq!(r.drv.portsc(4) & PORT_CCS, 0);
    assert!(r.irqs.load(Ordering::Relaxed) > 0);
}

#[test]
fn keyboard_enumerates_and_reports_keys() {
    let mut r = rig();
    let slot = attach(&mut r.drv, 1, 64);
    let (c, desc) = r.drv.control(slot, get_descriptor(1, 0, 18), 18, &[]);
    assert_eq!((c, desc.len(), desc[1]), (cc::SUCCESS, 18, 1));
    // A config request for more than there is: a short packet, then success.
    let (c, config) = r.drv.control(slot, get_descriptor(2, 0, 255), 255, &[]);
    assert_eq!((c, config.len()), (cc::SUCCESS, 34));
    assert_eq!(config[14..16], [3, 1], "HID boot keyboard");
    let set_config = [0, 9, 1, 0, 0, 0, 0, 0];
    assert_eq!(r.drv.control(slot, set_config, 0, &[]).0, cc::SUCCESS);
    assert_eq!(code(&r.drv.configure(slot, &[(3, 7, 8)])), cc::SUCCESS);
    // No key yet: the transfer waits.
    let buf = r.drv.at(DATA);
    let trb = Trb {
        parameter: buf,
        status: 8,
        control: (u32::from(ty::NORMAL) << 10) | crate::trb::IOC,
    };
    r.drv.queue(slot, 3, &[trb]);
    assert_eq!(r.drv.quiet(Duration::from_millis(20)), vec![]);
    r.keyboard.key(30, true).unwrap();
    r.drv.bus.0.kick();
    let e = r.drv.wait_event(ty::TRANSFER_EVENT);
    assert_eq!(code(&e), cc::SUCCESS);
    let mut report = [0u8; 8];
    r.drv.bus.mem_read(buf, &mut report);
    assert_eq!(report, [0, 0, 4, 0, 0, 0, 0, 0]);
    assert_eq!(r.keyboard.delivered(), 1);
}

#[test]
fn storage_writes_and_reads_back_sectors() {
    let mut r = rig();
    let slot = attach(&mut r.drv, 3, 512);
    let (_, dev) = r.drv.control(slot, get_descriptor(1, 0, 18), 18, &[]);
    assert_eq!(u16::from_le_bytes([dev[2], dev[3]]), 0x0320);
    let (_, bos) = r.drv.control(slot, get_descriptor(15, 0, 5), 5, &[]);
    assert_eq!(bos[1], 15);
    assert_eq!(
        r.drv.control(slot, [0, 9, 1, 0, 0, 0, 0, 0], 0, &[]).0,
        cc::SUCCESS
    );
    assert_eq!(
        code(&r.drv.configure(slot, &[(3, 6, 1024), (4, 2, 1024)])),
        cc::SUCCESS
    );
    let (status, inquiry) = r.drv.scsi(slot, 1, &[0x12, 0, 0, 0, 36, 0], true, &[], 36);
    assert_eq!((status, &inquiry[8..13]), (0, &b"ISOLA"[..]));
    let (_, cap) = r
        .drv
        .scsi(slot, 2, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], true, &[], 8);
    assert_eq!(cap, vec![0, 0, 7, 0xff, 0, 0, 2, 0]);
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(
        r.drv
            .scsi(slot, 3, &rw10(true, 100, 8), false, &data, 4096)
            .0,
        0
    );
    let mut on_disk = vec![0u8; 4096];
    r.disk.read_exact_at(&mut on_disk, 100 * 512).unwrap();
    assert_eq!(on_disk, data);
    let (status, back) = r.drv.scsi(slot, 4, &rw10(false, 100, 8), true, &[], 4096);
    assert_eq!((status, back == data), (0, true));
    // A read past the end: check condition, then the sense says why.
    assert_eq!(
        r.drv
            .scsi(slot, 5, &rw10(false, 2047, 2), true, &[], 1024)
            .0,
        1
    );
    let (_, sense) = r.drv.scsi(slot, 6, &[0x03, 0, 0, 0, 18, 0], true, &[], 18);
    assert_eq!((sense[2], sense[12]), (5, 0x21));
}

#[test]
fn chained_td_short_at_a_middle_trb_gives_one_event_there() {
    let mut r = rig();
    let slot = attach(&mut r.drv, 3, 512);
    r.drv.configure(slot, &[(3, 6, 1024), (4, 2, 1024)]);
    let buf = r.drv.at(DATA);
    // INQUIRY gives 36 bytes into a TD of 3 x 32 bytes: short in the second TRB.
    r.drv.bus.mem_write(
        buf,
        &crate::testing::cbw(9, 96, true, &[0x12, 0, 0, 0, 96, 0]),
    );
    assert_eq!(r.drv.normal(slot, 4, buf, 31).0, cc::SUCCESS);
    let parts = [(buf + 0x100, 32), (buf + 0x200, 32), (buf + 0x300, 32)];
    let e = r.drv.chained(slot, 3, &parts);
    assert_eq!(code(&e[0]), cc::SHORT_PACKET);
    assert_eq!(e[0].status & 0xff_ffff, 28);
    assert_eq!(r.drv.quiet(Duration::from_millis(5)), vec![]);
    let (c, n) = r.drv.normal(slot, 3, buf, 13);
    assert_eq!((c, n), (cc::SUCCESS, 13));
}

// ---- a hostile guest ----

fn command_code(drv: &mut Driver<Local>, kind: u8, parameter: u64, slot: u8) -> u8 {
    code(&drv.command(Trb::event(kind, parameter, 0, u32::from(slot) << 24)))
}

#[test]
fn bad_commands_complete_with_errors() {
    let mut r = rig();
    assert_eq!(command_code(&mut r.drv, 63, 0, 0), cc::SLOT_NOT_ENABLED);
    let slot = r.drv.enable_slot();
    assert_eq!(command_code(&mut r.drv, 63, 0, slot), cc::TRB);
    assert_eq!(command_code(&mut r.drv, ty::NORMAL, 0, slot), cc::TRB);
    assert_eq!(
        command_code(&mut r.drv, ty::DISABLE_SLOT, 0, 200),
        cc::SLOT_NOT_ENABLED
    );
    assert_eq!(
        command_code(&mut r.drv, ty::RESET_ENDPOINT, 0, slot),
        cc::TRB
    );
    // Input contexts outside guest memory, or a port that does not exist.
    assert_eq!(
        command_code(&mut r.drv, ty::ADDRESS_DEVICE, 0x10, slot),
        cc::PARAMETER
    );
    assert_eq!(
        command_code(&mut r.drv, ty::ADDRESS_DEVICE, u64::MAX, slot),
        cc::PARAMETER
    );
    assert_eq!(
        r.drv.address(slot, 4, 512).status >> 24,
        u32::from(cc::PARAMETER)
    );
    for _ in 0..MAX_SLOTS - 1 {
        r.drv.enable_slot();
    }
    assert_eq!(
        command_code(&mut r.drv, ty::ENABLE_SLOT, 0, 0),
        cc::NO_SLOTS
    );
    assert_eq!(r.drv.usbsts() & STS_HSE, 0);
}

#[test]
fn doorbells_for_missing_slots_and_endpoints_do_nothing() {
    let mut r = rig();
    let slot = attach(&mut r.drv, 1, 64);
    for (target, value) in [
        (200u64, 1u32),
        (9, 1),
        (slot.into(), 0),
        (slot.into(), 31),
        (slot.into(), 200),
    ] {
        r.drv
            .bus
            .write32(DOORBELL_OFFSET + 4 * (target % 64), value);
    }
    while let Some(e) = r.drv.next_event_within(Duration::from_millis(5)) {
        assert_eq!(e.trb_type(), ty::PORT_STATUS_CHANGE, "{e:?}");
    }
    assert_eq!(
        r.drv.control(slot, get_descriptor(1, 0, 8), 8, &[]).0,
        cc::SUCCESS
    );
}

#[test]
fn a_command_ring_outside_memory_is_host_system_error() {
    let mut r = rig();
    r.drv.bus.write32(CAP_LENGTH, 0); // stop
    r.drv.bus.write32(CAP_LENGTH + 0x18, 0x40 | 1);
    r.drv.bus.write32(CAP_LENGTH + 0x1c, 0);
    r.drv.bus.write32(CAP_LENGTH, 1 | 4);
    r.drv.bus.write32(DOORBELL_OFFSET, 0);
    assert_ne!(r.drv.usbsts() & STS_HSE, 0);
    assert_ne!(r.drv.usbsts() & STS_HCH, 0);
    // The driver's way out: reset, and everything works again.
    r.drv.start();
    attach(&mut r.drv, 1, 64);
}

#[test]
fn bad_transfer_rings_halt_the_endpoint() {
    let mut r = rig();
    let slot = attach(&mut r.drv, 3, 512);
    r.drv.configure(slot, &[(3, 6, 1024), (4, 2, 1024)]);
    let end = BASE + MEM_SIZE as u64;
    // A buffer that runs past the end of guest memory.
    let (c, _) = r.drv.normal(slot, 4, end - 16, 31);
    assert_eq!(c, cc::TRB);
    assert_eq!(
        r.drv.bus.0.slots[usize::from(slot) - 1].endpoints[3].state,
        transfer::EpState::Halted
    );
    // Doorbells on a halted endpoint do nothing until Reset Endpoint.
    r.drv.bus.write32(DOORBELL_OFFSET + 4 * u64::from(slot), 4);
    assert_eq!(r.drv.quiet(Duration::from_millis(5)), vec![]);
    let trb = Trb::event(
        ty::RESET_ENDPOINT,
        0,
        0,
        (u32::from(slot) << 24) | (4 << 16),
    );
    assert_eq!(code(&r.drv.command(trb)), cc::SUCCESS);
    // A TRB type that does not belong on a bulk ring.
    let setup = Trb::event(ty::SETUP, 0, 8, crate::trb::IOC | crate::trb::IDT);
    let addrs = r.drv.queue(slot, 3, &[setup]);
    let e = r.drv.wait_event(ty::TRANSFER_EVENT);
    assert_eq!((code(&e), e.parameter), (cc::TRB, addrs[0]));
    // A TD longer than the byte limit (40 x 128 KiB).
    let reset = Trb::event(
        ty::RESET_ENDPOINT,
        0,
        0,
        (u32::from(slot) << 24) | (3 << 16),
    );
    assert_eq!(code(&r.drv.command(reset)), cc::SUCCESS);
    let trb = Trb::event(ty::NORMAL, BASE, 0x1_ffff, crate::trb::IOC);
    let mut trbs = vec![
        Trb {
            control: trb.control | crate::trb::CHAIN,
            ..trb
        };
        39
    ];
    trbs.push(trb);
    r.drv.queue(slot, 3, &trbs);
    assert_eq!(code(&r.drv.wait_event(ty::TRANSFER_EVENT)), cc::TRB);
}

#[test]
fn link_loops_and_rings_outside_memory_end_in_errors() {
    let mut r = rig();
    let slot = attach(&mut r.drv, 1, 64);
    // Point endpoint 0 at a ring whose link TRB points at itself.
    let ring = r.drv.at(DATA) + 0x4000;
    let link = Trb {
        parameter: ring,
        status: 0,
        control: (u32::from(ty::LINK) << 10) | 1,
    };
    r.drv.bus.mem_write(ring, &link.to_bytes());
    let stop = Trb::event(ty::STOP_ENDPOINT, 0, 0, (u32::from(slot) << 24) | (1 << 16));
    assert_eq!(code(&r.drv.command(stop)), cc::SUCCESS);
    let set = Trb::event(
        ty::SET_TR_DEQUEUE,
        ring | 1,
        0,
        (u32::from(slot) << 24) | (1 << 16),
    );
    assert_eq!(code(&r.drv.command(set)), cc::SUCCESS);
    r.drv.bus.write32(DOORBELL_OFFSET + 4 * u64::from(slot), 1);
    assert_eq!(code(&r.drv.wait_event(ty::TRANSFER_EVENT)), cc::TRB);
    // Then a ring outside guest memory.
    let reset = Trb::event(
        ty::RESET_ENDPOINT,
        0,
        0,
        (u32::from(slot) << 24) | (1 << 16),
    );
    assert_eq!(code(&r.drv.command(reset)), cc::SUCCESS);
    let set = Trb::event(
        ty::SET_TR_DEQUEUE,
        0xdead_0000 | 1,
        0,
        (u32::from(slot) << 24) | (1 << 16),
    );
    assert_eq!(code(&r.drv.command(set)), cc::SUCCESS);
    r.drv.bus.write32(DOORBELL_OFFSET + 4 * u64::from(slot), 1);
    let e = r.drv.wait_event(ty::TRANSFER_EVENT);
    assert_eq!((code(&e), e.parameter), (cc::TRB, 0xdead_0000));
    // A command-ring link loop: no completion, no hang, and the controller still answers.
    let cmd_loop = r.drv.at(DATA) + 0x5000;
    let link = Trb {
        parameter: cmd_loop,
        status: 0,
        control: (u32::from(ty::LINK) << 10) | 1,
    };
    r.drv.bus.mem_write(cmd_loop, &link.to_bytes());
    r.drv.bus.write32(CAP_LENGTH, 0);
    r.drv.bus.write32(CAP_LENGTH + 0x18, cmd_loop as u32 | 1);
    r.drv.bus.write32(CAP_LENGTH + 0x1c, 0);
    r.drv.bus.write32(CAP_LENGTH, 1 | 4);
    r.drv.bus.write32(DOORBELL_OFFSET, 0);
    assert_eq!(r.drv.quiet(Duration::from_millis(5)), vec![]);
    assert_eq!(r.drv.usbsts() & STS_HSE, 0);
}

#[test]
fn control_data_longer_than_the_request_is_a_trb_error() {
    let mut r = rig();
    let slot = attach(&mut r.drv, 2, 64);
    let setup = Trb {
        parameter: u64::from_le_bytes(get_descriptor(1, 0, 8)),
        status: 8,
        control: (u32::from(ty::SETUP) << 10) | crate::trb::IDT | (3 << 16),
    };
    let data = Trb::event(ty::DATA, r.drv.at(DATA), 64, crate::trb::DIR_IN);
    let status = Trb::event(ty::STATUS, 0, 0, crate::trb::IOC);
    r.drv.queue(slot, 1, &[setup, data, status]);
    assert_eq!(code(&r.drv.wait_event(ty::TRANSFER_EVENT)), cc::TRB);
}

#[test]
fn an_event_ring_outside_memory_is_host_system_error() {
    let mut r = rig();
    let mut entry = [0u8; 16];
    entry[..8].copy_from_slice(&0xdead_0000u64.to_le_bytes());
    entry[8] = 16;
    let erst = r.drv.at(DATA) + 0x6000;
    r.drv.bus.mem_write(erst, &entry);
    r.drv.bus.write32(RUNTIME_OFFSET + 0x30, erst as u32);
    r.drv.bus.write32(RUNTIME_OFFSET + 0x34, 0);
    // The port reset's change event cannot be written.
    r.drv.reset_port(1);
    assert_ne!(r.drv.usbsts() & STS_HSE, 0);
}

/// Random register writes and random ring contents: the model never panics, and test
/// memory (which refuses accesses outside itself) is never asked for more.
#[test]
fn random_guest_never_crashes_the_model() {
    let mut r = rig();
    let slot = attach(&mut r.drv, 3, 512);
    r.drv.configure(slot, &[(3, 6, 1024), (4, 2, 1024)]);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..2000 {
        let v = next();
        match v % 6 {
            0 => {
                let off = RINGS_AND_DATA + (next() % 0x60000);
                r.drv.bus.mem_write(BASE + off, &next().to_le_bytes());
            }
            1 => r
                .drv
                .bus
                .write32(DOORBELL_OFFSET + 4 * (next() % 10), (next() % 40) as u32),
            2 => r.drv.bus.write32((next() % 0x2100) & !3, next() as u32),
            3 => {
                let trb = Trb {
                    parameter: next(),
                    status: next() as u32,
                    control: next() as u32,
                };
                r.drv
                    .bus
                    .mem_write(BASE + 0x2000 + (next() % 64) * 16, &trb.to_bytes());
                r.drv.bus.write32(DOORBELL_OFFSET, 0);
            }
            4 => {
                let _ = r
                    .drv
                    .bus
                    .0
                    .mmio_read(next() % BAR0_SIZE, [1, 2, 4, 8][(next() % 4) as usize]);
            }
            _ => {
                if round % 100 == 0 {
                    r.drv.bus.write32(CAP_LENGTH, 1 | 4);
                }
                r.drv.bus.0.kick();
            }
        }
    }
}

const RINGS_AND_DATA: u64 = 0x20000;
