//! isola-usb's guest-fed parsers and state machines: TRBs, SETUP packets, CBWs and SCSI CDBs
//! (mode 0); the bulk-only transport over an image (mode 1); the whole xHCI controller with
//! its devices, driven by register writes and by what the fuzzer puts in guest memory
//! (mode 2: rings, contexts, TRBs of every type, link loops).
#![no_main]

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use isola_fuzz::Reader;
use isola_usb::hid::{HidDevice, HidKind, Reports};
use isola_usb::mem::{GuestMem, TestMemory};
use isola_usb::scsi::{self, Cbw, DiskInfo, Plan, Sense, BLOCK};
use isola_usb::storage::Storage;
use isola_usb::trb::{Setup, Trb};
use isola_usb::usb::{Speed, UsbDevice, Xfer};
use isola_usb::xhci::{Controller, BAR0_SIZE};
use libfuzzer_sys::fuzz_target;

const IMAGE_BLOCKS: u64 = 128;
const MEM_BASE: u64 = 0x1_0000;
const MEM_LEN: usize = 0x1_0000;

fn image() -> std::fs::File {
    let f = memfd::MemfdOptions::default()
        .create("usb-fuzz-image")
        .expect("memfd")
        .into_file();
    f.set_len(IMAGE_BLOCKS * BLOCK).expect("size");
    f
}

fn parsers(r: &mut Reader) {
    while !r.is_empty() {
        let mut raw = [0u8; 16];
        raw.copy_from_slice(
            &r.bytes(16)
                .iter()
                .copied()
                .chain([0; 16])
                .take(16)
                .collect::<Vec<_>>(),
        );
        let trb = Trb::parse(&raw);
        assert_eq!(Trb::parse(&trb.to_bytes()), trb);
        let _ = (
            trb.trb_type(),
            trb.slot(),
            trb.endpoint(),
            trb.transfer_len(),
        );
        let _ = Setup::from_parameter(trb.parameter).is_in();
        let cbw_len = usize::from(r.u8() % 40);
        let cbw = r.bytes(cbw_len).to_vec();
        let _ = Cbw::parse(&cbw);
        let info = DiskInfo {
            blocks: u64::from(r.u32()),
            readonly: r.u8() & 1 != 0,
        };
        let cdb_len = usize::from(r.u8() % 17);
        let cdb = r.bytes(cdb_len).to_vec();
        match scsi::plan(&cdb, &info, Sense(r.u8(), r.u8(), r.u8())) {
            Plan::Read { lba, blocks } | Plan::Write { lba, blocks } => {
                assert!(lba.checked_add(blocks).is_some_and(|e| e <= info.blocks));
            }
            Plan::Data(d) => assert!(d.len() <= 0x1_0000),
            _ => {}
        }
    }
}

fn transport(r: &mut Reader) {
    let file = image();
    let mut disk = Storage::new(
        file.try_clone().expect("dup"),
        IMAGE_BLOCKS,
        r.u8() & 1 != 0,
        Speed::Super,
    );
    while !r.is_empty() {
        let len = usize::from(r.u16() % 2048);
        let ep = r.u8() % 4;
        match r.u8() % 3 {
            0 => {
                let data = r.bytes(len).to_vec();
                if let Xfer::Done(n) = disk.transfer_out(ep, &data) {
                    assert!(n <= data.len());
                }
            }
            1 => {
                let mut buf = vec![0u8; len];
                if let Xfer::Done(n) = disk.transfer_in(ep, &mut buf) {
                    assert!(n <= len);
                }
            }
            _ => {
                let setup = Setup::from_parameter(u64::from(r.u32()) | (u64::from(r.u32()) << 32));
                if let Ok(d) = disk.control(&setup, &[]) {
                    assert!(d.len() <= usize::from(setup.length));
                }
            }
        }
    }
    assert_eq!(file.metadata().expect("stat").len(), IMAGE_BLOCKS * BLOCK);
    let mut b = [0u8; 1];
    assert!(file.read_at(&mut b, IMAGE_BLOCKS * BLOCK).expect("read") == 0);
}

fn controller(r: &mut Reader) {
    let keyboard = Arc::new(Reports::new(HidKind::Keyboard, 16));
    let tablet = Arc::new(Reports::new(HidKind::Tablet, 16));
    let devices: Vec<Option<Box<dyn UsbDevice>>> = vec![
        Some(Box::new(HidDevice::new(Arc::clone(&keyboard)))),
        Some(Box::new(HidDevice::new(tablet))),
        Some(Box::new(Storage::new(
            image(),
            IMAGE_BLOCKS,
            false,
            Speed::Super,
        ))),
    ];
    let mut c = Controller::new(TestMemory::new(MEM_BASE, MEM_LEN), devices);
    let mut steps = 0;
    while !r.is_empty() && steps < 512 {
        steps += 1;
        match r.u8() % 5 {
            0 => {
                let at = MEM_BASE + u64::from(r.u16()) % MEM_LEN as u64;
                let bytes = r.bytes(16).to_vec();
                let _ = c.mem().write(at, &bytes);
            }
            1 | 2 => {
                let offset = u64::from(r.u16() & !3) % 0x2100;
                c.mmio_write(offset, 4, u64::from(r.u32()));
            }
            3 => {
                let size = [1, 2, 4, 8, 3][usize::from(r.u8() % 5)];
                let _ = c.mmio_read(u64::from(r.u16()) % BAR0_SIZE, size);
            }
            _ => {
                let _ = keyboard.key(u16::from(r.u8()), r.u8() & 1 != 0);
                c.kick();
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    match r.u8() % 3 {
        0 => parsers(&mut r),
        1 => transport(&mut r),
        _ => controller(&mut r),
    }
});
