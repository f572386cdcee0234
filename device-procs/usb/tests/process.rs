//! isola-usb as a process, driven by a vfio-user client nobody here wrote (the `vfio_user`
//! crate's `Client`): enumeration of the keyboard and the disk, a key press from the control
//! socket arriving as a HID report with an MSI-X interrupt, sectors written and read back;
//! and a restart: kill -9 in the middle, Host System Error, the driver resets, nothing
//! acknowledged is lost and the keyboard works.

mod support;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use isola_device_common::testing::process::{assert_sandboxed, device_pid, wait_log};
use isola_device_common::testing::{GuestRam, Scratch};
use isola_ipc::input::InputResponse;
use isola_usb::testing::{code, get_descriptor, rw10, Bus, Driver, DATA};
use isola_usb::trb::{cc, ty, Trb};
use support::{connect, key, start, Remote};

fn attach(drv: &mut Driver<Remote>, port: u8, max_packet: u16) -> u8 {
    drv.reset_port(port);
    let slot = drv.enable_slot();
    assert_eq!(code(&drv.address(slot, port, max_packet)), cc::SUCCESS);
    assert_eq!(
        drv.control(slot, [0, 9, 1, 0, 0, 0, 0, 0], 0, &[]).0,
        cc::SUCCESS
    );
    slot
}

fn keyboard(drv: &mut Driver<Remote>) -> u8 {
    let slot = attach(drv, 1, 64);
    assert_eq!(code(&drv.configure(slot, &[(3, 7, 8)])), cc::SUCCESS);
    slot
}

fn disk(drv: &mut Driver<Remote>) -> u8 {
    let slot = attach(drv, 3, 512);
    assert_eq!(
        code(&drv.configure(slot, &[(3, 6, 1024), (4, 2, 1024)])),
        cc::SUCCESS
    );
    slot
}

/// Queues an interrupt IN transfer, presses `code` through the control socket, and returns
/// the report that arrives.
fn press(drv: &mut Driver<Remote>, control: &std::path::Path, slot: u8, code_: u16) -> [u8; 8] {
    let buf = drv.at(DATA) + 0x2000;
    let trb = Trb {
        parameter: buf,
        status: 8,
        control: (u32::from(ty::NORMAL) << 10) | isola_usb::trb::IOC,
    };
    drv.queue(slot, 3, &[trb]);
    assert_eq!(key(control, code_, true), InputResponse::Done);
    let e = drv.wait_event(ty::TRANSFER_EVENT);
    assert_eq!(code(&e), cc::SUCCESS);
    let mut report = [0u8; 8];
    drv.bus.mem_read(buf, &mut report);
    assert_eq!(key(control, code_, false), InputResponse::Done);
    // Take the release report too, so the next press starts from an empty queue.
    drv.queue(slot, 3, &[trb]);
    assert_eq!(code(&drv.wait_event(ty::TRANSFER_EVENT)), cc::SUCCESS);
    report
}

fn pattern(lba: u32, round: u8) -> Vec<u8> {
    (0..512u32)
        .map(|i| (i as u8) ^ (lba as u8).wrapping_mul(31) ^ round)
        .collect()
}

#[test]
fn the_crate_client_enumerates_the_keyboard_and_the_disk() {
    let dir = Scratch::new("usb-interop");
    let mut usb = start(&dir, &[]);
    wait_log(&usb.log, "serving the xHCI controller");
    assert_sandboxed(device_pid(usb.child.id()), "isola-usb");
    let mut drv = connect(&usb.socket, None);
    let bar = drv.bus.client.region(0).expect("BAR 0");
    assert_eq!(bar.size, 0x1_0000);
    let mut id = [0u8; 12];
    drv.bus.client.region_read(7, 0, &mut id).unwrap();
    assert_eq!(
        (&id[..2], &id[9..12]),
        (&[0x36, 0x1b][..], &[0x30, 0x03, 0x0c][..])
    );
    drv.start();
    let slot = keyboard(&mut drv);
    let (_, desc) = drv.control(slot, get_descriptor(1, 0, 18), 18, &[]);
    assert_eq!(desc.len(), 18);
    assert_eq!(
        press(&mut drv, &usb.control, slot, 30),
        [0, 0, 4, 0, 0, 0, 0, 0]
    );
    assert!(drv.bus.irq.read().is_ok(), "MSI-X eventfd signalled");
    let slot = disk(&mut drv);
    for lba in 0..64u32 {
        let data = pattern(lba, 1);
        assert_eq!(
            drv.scsi(slot, lba, &rw10(true, lba * 7, 1), false, &data, 512)
                .0,
            0
        );
    }
    let image = std::fs::File::open(&usb.disk).unwrap();
    for lba in 0..64u32 {
        let (status, back) = drv.scsi(slot, 1000 + lba, &rw10(false, lba * 7, 1), true, &[], 512);
        assert_eq!(status, 0);
        assert_eq!(back, pattern(lba, 1), "sector {}", lba * 7);
        let mut on_disk = vec![0u8; 512];
        image
            .read_exact_at(&mut on_disk, u64::from(lba * 7) * 512)
            .unwrap();
        assert_eq!(on_disk, pattern(lba, 1));
    }
    assert!(usb.child.try_wait().unwrap().is_none(), "still running");
}

#[test]
fn after_a_kill_host_system_error_then_reset_and_nothing_acknowledged_is_lost() {
    let dir = Scratch::new("usb-restart");
    let ram = GuestRam::new(support::RAM);
    let mut usb = start(&dir, &[]);
    let mut drv = connect(&usb.socket, Some(ram));
    drv.start();
    let slot = disk(&mut drv);
    let mut acknowledged = Vec::new();
    for lba in 0..500u32 {
        if drv
            .scsi(slot, lba, &rw10(true, lba, 1), false, &pattern(lba, 2), 512)
            .0
            == 0
        {
            acknowledged.push(lba);
        }
    }
    assert_eq!(acknowledged.len(), 500);
    // Kill it in the middle of a command: the CBW of a write has gone, its data has not.
    let buf = drv.at(DATA);
    drv.bus.mem_write(
        buf,
        &isola_usb::testing::cbw(9999, 512, false, &rw10(true, 600, 1)),
    );
    assert_eq!(drv.normal(slot, 4, buf, 31).0, cc::SUCCESS);
    usb.child.kill().unwrap();
    usb.child.wait().unwrap();
    // The supervisor's part: the same command line again.
    let usb2 = start(&dir, &[]);
    // The same guest memory (the core keeps it across a device restart).
    let ram = drv.into_bus().ram;
    let mut drv = connect(&usb2.socket, Some(ram));
    let sts = drv.usbsts();
    assert_ne!(
        sts & (1 << 2),
        0,
        "Host System Error after the restart: {sts:#x}"
    );
    // A frontend's DEVICE_RESET (the core may send one after its DMA maps) keeps it.
    drv.bus.client.reset().unwrap();
    let sts = drv.usbsts();
    assert_ne!(
        sts & (1 << 2),
        0,
        "Host System Error after a reset: {sts:#x}"
    );
    // The guest driver's part: reset and enumerate again, then carry on.
    drv.start();
    let slot = disk(&mut drv);
    for &lba in &acknowledged {
        let (status, back) = drv.scsi(slot, lba, &rw10(false, lba, 1), true, &[], 512);
        assert_eq!((status, back == pattern(lba, 2)), (0, true), "sector {lba}");
    }
    for lba in 500..1000u32 {
        assert_eq!(
            drv.scsi(slot, lba, &rw10(true, lba, 1), false, &pattern(lba, 3), 512)
                .0,
            0
        );
        let (status, back) = drv.scsi(slot, lba, &rw10(false, lba, 1), true, &[], 512);
        assert_eq!((status, back == pattern(lba, 3)), (0, true), "sector {lba}");
    }
    let kbd = keyboard(&mut drv);
    assert_eq!(
        press(&mut drv, &usb2.control, kbd, 31),
        [0, 0, 22, 0, 0, 0, 0, 0]
    );
    let _ = Duration::ZERO;
}
