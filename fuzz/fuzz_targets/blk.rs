//! isola-blk's request path (request.rs's parser and device.rs's queue handler, with the
//! synchronous engine on a small in-memory image) over chains the fuzzer builds: the device
//! writes only into buffers the guest made writable, returns every request it takes, and
//! never reports more bytes written than the chain could hold.
#![no_main]

use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};

use isola_blk::device::BlkQueue;
use isola_blk::disk::{Disk, DiskOptions};
use isola_blk::engine::{new_engine, EngineKind};
use isola_fuzz::{Reader, Rig, QSIZE};
use libfuzzer_sys::fuzz_target;

/// A 64 KiB image in a memfd (nothing left on disk), opened read-write and read-only.
fn disks() -> &'static [Arc<Disk>; 2] {
    static DISKS: OnceLock<[Arc<Disk>; 2]> = OnceLock::new();
    DISKS.get_or_init(|| {
        let fd = memfd::MemfdOptions::default()
            .create("fuzz-blk-image")
            .expect("memfd");
        fd.as_file().set_len(64 * 1024).expect("sized");
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let open = |readonly| {
            let opts = DiskOptions {
                readonly,
                direct: false,
                serial: Some("fuzz".into()),
            };
            Arc::new(Disk::open(std::path::Path::new(&path), &opts).expect("image opens"))
        };
        let disks = [open(false), open(true)];
        // The disks hold their own descriptors; the memfd's is no longer needed.
        drop(fd);
        disks
    })
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let sel = r.u8();
    // Feature bits the driver may acknowledge: FLUSH (9), DISCARD (13), WRITE_ZEROES (14).
    let features = u64::from(r.u16()) << 9 & ((1 << 9) | (1 << 13) | (1 << 14));
    let disk = Arc::clone(&disks()[usize::from(sel & 1)]);
    let engine = new_engine(EngineKind::Sync, Arc::clone(&disk), QSIZE, None).expect("engine");
    let mut blk = BlkQueue::new(0, disk, engine, features);
    let mut rig = Rig::new(&mut r, 1);
    let ran = rig.run(0, &mut blk);
    let used = rig.check();
    if ran.is_ok() {
        rig.all_returned(0, &used[0]);
    }
});
