//! Tests of `device.rs`: virtio-blk requests on guest memory with hand-built descriptor
//! chains, both engines, and a hostile guest.

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use isola_device_common::testing::SplitQueue;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::{Queue, QueueT};
use vm_memory::Address;

use super::*;
use crate::disk::DiskOptions;
use crate::engine::{new_engine, EngineKind, SqPoller};
use crate::request::STATUS_UNSUPP;

const NEXT_FLAG: u16 = VRING_DESC_F_NEXT as u16;

/// Guest RAM: [0, 1 MiB) and [2 MiB, 3 MiB), with a hole between.
const LOW_END: u64 = 0x10_0000;
const HIGH: u64 = 0x20_0000;
const DISK_SIZE: u64 = 256 * 1024;
const QSIZE: u16 = 64;
const CANARY: u8 = 0xee;

fn all_features() -> u64 {
    (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES) | (1 << VIRTIO_BLK_F_FLUSH)
}

fn pattern(offset: u64) -> u8 {
    ((offset / 512) as u8) ^ ((offset % 251) as u8)
}

struct Rig {
    mem: Arc<Memory>,
    driver: SplitQueue,
    queue: Queue,
    blk: BlkQueue,
    path: PathBuf,
    next_buf: u64,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Rig {
    fn new(name: &str, readonly: bool, direct: bool, kind: EngineKind, features: u64) -> Rig {
        Rig::with_poller(name, readonly, direct, kind, None, features)
    }

    fn with_poller(
        name: &str,
        readonly: bool,
        direct: bool,
        kind: EngineKind,
        poller: Option<SqPoller>,
        features: u64,
    ) -> Rig {
        let path =
            std::env::temp_dir().join(format!("isola-blk-dev-{}-{name}.img", std::process::id()));
        let image: Vec<u8> = (0..DISK_SIZE).map(pattern).collect();
        std::fs::write(&path, &image).unwrap();
        let opts = DiskOptions {
            readonly,
            direct,
            serial: Some("serial-of-test".into()),
        };
        let disk = Arc::new(Disk::open(&path, &opts).unwrap());
        let mem = Arc::new(
            Memory::from_ranges(&[
                (GuestAddress(0), LOW_END as usize),
                (GuestAddress(HIGH), LOW_END as usize),
            ])
            .unwrap(),
        );
        mem.write_slice(&vec![CANARY; LOW_END as usize], GuestAddress(0))
            .unwrap();
        mem.write_slice(&vec![CANARY; LOW_END as usize], GuestAddress(HIGH))
            .unwrap();
        let driver = SplitQueue::new(0, QSIZE, GuestAddress(0));
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.try_set_desc_table_address(driver.desc).unwrap();
        queue.try_set_avail_ring_address(driver.avail).unwrap();
        queue.try_set_used_ring_address(driver.used).unwrap();
        queue.set_ready(true);
        // Zero the rings (they were filled with the canary).
        let rings = driver.end().0 as usize;
        mem.write_slice(&vec![0; rings], GuestAddress(0)).unwrap();
        let engine = new_engine(
            kind,
            Arc::clone(&disk),
            QSIZE,
            poller.map(Arc::new).as_ref(),
        )
        .unwrap();
        let blk = BlkQueue::new(0, disk, engine, features);
        Rig {
            mem,
            driver,
            queue,
            blk,
            path,
            next_buf: 0x4_0000,
        }
    }

    /// A fresh, 4 KiB aligned buffer in low memory.
    fn buf(&mut self, len: u64) -> GuestAddress {
        let at = self.next_buf;
        self.next_buf = (at + len).div_ceil(4096) * 4096;
        assert!(self.next_buf < LOW_END - 0x1_0000);
        GuestAddress(at)
    }

    fn header(&mut self, kind: u32, sector: u64) -> GuestAddress {
        let at = self.buf(16);
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&raw, at).unwrap();
        at
    }

    fn submit(&mut self, bufs: &[(GuestAddress, u32, bool)]) -> u16 {
        let head = self.driver.add(&self.mem, bufs);
        self.driver.publish(&self.mem, head);
        head
    }

    fn run(&mut self) -> Result<(), QueueError> {
        let mut resubmit = VecDeque::new();
        let mut ctx = QueueContext::new(0, &mut self.queue, Arc::clone(&self.mem), &mut resubmit);
        self.blk.process(&mut ctx)?;
        self.blk.drain(&mut ctx)
    }

    /// The used length of `head`, if it was returned.
    fn used_len(&self, head: u16) -> Option<u32> {
        (0..self.driver.used_idx(&self.mem))
            .map(|i| self.driver.used_elem(&self.mem, i))
            .find(|&(id, _)| id == u32::from(head))
            .map(|(_, len)| len)
    }

    fn byte(&self, at: GuestAddress) -> u8 {
        self.mem.read_obj(at).unwrap()
    }

    fn bytes(&self, at: GuestAddress, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        self.mem.read_slice(&mut out, at).unwrap();
        out
    }

    fn file(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        std::fs::File::open(&self.path)
            .unwrap()
            .read_exact_at(&mut out, offset)
            .unwrap();
        out
    }

    /// hdr + data + status request; returns (head, status address).
    fn simple(
        &mut self,
        kind: u32,
        sector: u64,
        data: Option<(GuestAddress, u32, bool)>,
    ) -> (u16, GuestAddress) {
        let hdr = self.header(kind, sector);
        let status = self.buf(1);
        let mut bufs = vec![(hdr, 16, false)];
        bufs.extend(data);
        bufs.push((status, 1, true));
        (self.submit(&bufs), status)
    }

    fn segment(&mut self, sector: u64, sectors: u32, flags: u32) -> GuestAddress {
        let at = self.buf(16);
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&sector.to_le_bytes());
        raw[8..12].copy_from_slice(&sectors.to_le_bytes());
        raw[12..].copy_from_slice(&flags.to_le_bytes());
        self.mem.write_slice(&raw, at).unwrap();
        at
    }
}

fn round_trip(kind: EngineKind, poller: Option<SqPoller>) {
    let name = format!("rt-{kind:?}-{poller:?}");
    let mut rig = Rig::with_poller(&name, false, false, kind, poller, all_features());
    let data = rig.buf(1024);
    rig.mem.write_slice(&[0x5a; 1024], data).unwrap();
    let (w, w_status) = rig.simple(VIRTIO_BLK_T_OUT, 2, Some((data, 1024, false)));
    // Requests in flight together are unordered: the write completes before the read-back.
    rig.run().unwrap();
    // Read it back into two buffers, one in each memory region.
    let hdr = rig.header(VIRTIO_BLK_T_IN, 2);
    let low = rig.buf(512);
    let r_status = rig.buf(1);
    let high = GuestAddress(HIGH + 0x100);
    let r = rig.submit(&[
        (hdr, 16, false),
        (low, 512, true),
        (high, 512, true),
        (r_status, 1, true),
    ]);
    // And into one buffer (io_uring: READ rather than READV).
    let one = rig.buf(1024);
    let (o, o_status) = rig.simple(VIRTIO_BLK_T_IN, 2, Some((one, 1024, true)));
    let (f, f_status) = rig.simple(VIRTIO_BLK_T_FLUSH, 0, None);
    let id = rig.buf(20);
    let (g, g_status) = rig.simple(VIRTIO_BLK_T_GET_ID, 0, Some((id, 20, true)));
    let seg = rig.segment(8, 2, 0);
    let (d, d_status) = rig.simple(VIRTIO_BLK_T_DISCARD, 0, Some((seg, 16, false)));
    let seg = rig.segment(12, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let (z, z_status) = rig.simple(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((seg, 16, false)));
    rig.run().unwrap();
    for (head, status, len) in [
        (w, w_status, 1),
        (r, r_status, 1025),
        (o, o_status, 1025),
        (f, f_status, 1),
        (g, g_status, 21),
        (d, d_status, 1),
        (z, z_status, 1),
    ] {
        assert_eq!(rig.byte(status), 0, "status of request {head}");
        assert_eq!(
            rig.used_len(head),
            Some(len),
            "used length of request {head}"
        );
    }
    assert_eq!(rig.bytes(low, 512), vec![0x5a; 512]);
    assert_eq!(rig.bytes(high, 512), vec![0x5a; 512]);
    assert_eq!(rig.bytes(one, 1024), vec![0x5a; 1024]);
    assert_eq!(&rig.bytes(id, 20)[..14], b"serial-of-test");
    assert_eq!(rig.file(1024, 1024), vec![0x5a; 1024]);
    assert_eq!(rig.file(8 * 512, 1024), vec![0; 1024], "discarded");
    assert_eq!(rig.file(12 * 512, 512), vec![0; 512], "zeroed");
    assert_eq!(rig.file(13 * 512, 1)[0], pattern(13 * 512), "untouched");
}

#[test]
fn requests_round_trip_on_the_sync_engine() {
    round_trip(EngineKind::Sync, None);
}

#[test]
fn requests_round_trip_on_io_uring() {
    round_trip(EngineKind::IoUring, None);
}

#[test]
fn requests_round_trip_on_the_auto_engine() {
    round_trip(EngineKind::Auto, None);
}

#[test]
fn requests_round_trip_on_io_uring_with_a_kernel_polling_thread() {
    round_trip(EngineKind::IoUring, Some(SqPoller::new(5, None)));
}

#[test]
fn requests_round_trip_with_adaptive_polling_switching_rings_at_every_commit() {
    round_trip(EngineKind::IoUring, Some(SqPoller::alternating()));
    round_trip(EngineKind::Auto, Some(SqPoller::alternating()));
}

#[test]
fn hostile_requests_get_error_statuses_and_the_queue_keeps_serving() {
    let mut rig = Rig::new("hostile", false, false, EngineKind::Sync, all_features());
    let mut expect: Vec<(u16, Option<GuestAddress>, u8, &str)> = Vec::new();
    // Data crossing from the end of low memory into the hole: IOERR, and the part that is
    // in memory is left alone.
    let edge = GuestAddress(LOW_END - 0x200);
    let (h, s) = rig.simple(VIRTIO_BLK_T_IN, 0, Some((edge, 1024, true)));
    expect.push((h, Some(s), STATUS_IOERR, "buffer into the hole"));
    let (h, s) = rig.simple(
        VIRTIO_BLK_T_OUT,
        0,
        Some((GuestAddress(0xffff_ffff_0000), 512, false)),
    );
    expect.push((h, Some(s), STATUS_IOERR, "buffer far outside memory"));
    let hdr = rig.header(VIRTIO_BLK_T_IN, 0);
    let s = rig.buf(1);
    let h = rig.submit(&[(hdr, 8, false), (s, 1, true)]);
    expect.push((h, Some(s), STATUS_IOERR, "8-byte header"));
    let b = rig.buf(512);
    let (h, s) = rig.simple(VIRTIO_BLK_T_IN, DISK_SIZE / 512, Some((b, 512, true)));
    expect.push((h, Some(s), STATUS_IOERR, "sector past the end"));
    let b = rig.buf(512);
    let (h, s) = rig.simple(VIRTIO_BLK_T_IN, u64::MAX / 512 + 1, Some((b, 512, true)));
    expect.push((h, Some(s), STATUS_IOERR, "sector * 512 overflows"));
    let b = rig.buf(1024);
    let (h, s) = rig.simple(VIRTIO_BLK_T_IN, u64::MAX / 512, Some((b, 1024, true)));
    expect.push((h, Some(s), STATUS_IOERR, "offset + length overflows"));
    let b = rig.buf(100);
    let (h, s) = rig.simple(VIRTIO_BLK_T_IN, 0, Some((b, 100, true)));
    expect.push((h, Some(s), STATUS_IOERR, "length not a whole sector"));
    let (h, s) = rig.simple(77, 0, None);
    expect.push((h, Some(s), STATUS_UNSUPP, "unknown type"));
    let seg = rig.segment(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let (h, s) = rig.simple(VIRTIO_BLK_T_DISCARD, 0, Some((seg, 16, false)));
    expect.push((h, Some(s), STATUS_UNSUPP, "discard with unmap"));
    let seg = rig.segment(0, 1, 4);
    let (h, s) = rig.simple(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((seg, 16, false)));
    expect.push((h, Some(s), STATUS_UNSUPP, "reserved flag"));
    let seg = rig.segment(DISK_SIZE / 512 - 1, 2, 0);
    let (h, s) = rig.simple(VIRTIO_BLK_T_DISCARD, 0, Some((seg, 16, false)));
    expect.push((h, Some(s), STATUS_IOERR, "discard past the end"));
    let b = rig.buf(8);
    let (h, s) = rig.simple(VIRTIO_BLK_T_DISCARD, 0, Some((b, 8, false)));
    expect.push((
        h,
        Some(s),
        STATUS_IOERR,
        "discard payload not whole segments",
    ));
    rig.run().unwrap();
    for (head, status, code, what) in &expect {
        assert_eq!(rig.used_len(*head), Some(1), "{what}: used length");
        assert_eq!(rig.byte(status.unwrap()), *code, "{what}: status");
    }
    assert_eq!(
        rig.bytes(edge, 0x200),
        vec![CANARY; 0x200],
        "nothing written at the edge"
    );
}

#[test]
fn requests_without_a_usable_status_are_returned_empty() {
    let mut rig = Rig::new("nostatus", false, false, EngineKind::Sync, all_features());
    let mut empty = Vec::new();
    let hdr = rig.header(VIRTIO_BLK_T_FLUSH, 0);
    empty.push((rig.submit(&[(hdr, 16, false)]), "no writable descriptor"));
    let hdr = rig.header(VIRTIO_BLK_T_IN, 0);
    let (data, status) = (rig.buf(512), rig.buf(1));
    empty.push((
        rig.submit(&[(hdr, 16, false), (data, 512, true), (status, 1, false)]),
        "read-only status",
    ));
    let hdr = rig.header(VIRTIO_BLK_T_FLUSH, 0);
    empty.push((
        rig.submit(&[(hdr, 16, false), (GuestAddress(0x50_0000), 1, true)]),
        "status outside memory",
    ));
    // A loop, and a next index outside the table, written by hand over fresh chains.
    let hdr = rig.header(VIRTIO_BLK_T_FLUSH, 0);
    let lp = rig.submit(&[(hdr, 16, false), (hdr, 16, false)]);
    rig.driver.put(&rig.mem, lp + 1, hdr.0, 16, NEXT_FLAG, lp);
    empty.push((lp, "descriptor loop"));
    let far = rig.submit(&[(hdr, 16, false)]);
    rig.driver
        .put(&rig.mem, far, hdr.0, 16, NEXT_FLAG, QSIZE + 3);
    empty.push((far, "next index outside the table"));
    let ind = rig.submit(&[(hdr, 16, false)]);
    rig.driver.put(
        &rig.mem,
        ind,
        0x70_0000,
        64,
        VRING_DESC_F_INDIRECT as u16,
        0,
    );
    empty.push((ind, "indirect table outside memory"));
    // A head index beyond the queue in the available ring: skipped.
    rig.driver.publish(&rig.mem, 200);
    let (good, good_status) = rig.simple(VIRTIO_BLK_T_IN, 1, Some((data, 512, true)));
    rig.run().unwrap();
    for (head, what) in empty {
        assert_eq!(rig.used_len(head), Some(0), "{what}");
    }
    assert_eq!(
        rig.byte(status),
        CANARY,
        "read-only status byte not written"
    );
    assert_eq!(rig.used_len(good), Some(513), "the queue keeps serving");
    assert_eq!(rig.byte(good_status), 0);
    assert_eq!(
        rig.bytes(data, 4),
        (512..516).map(pattern).collect::<Vec<_>>()
    );
    assert_eq!(
        rig.driver.used_idx(&rig.mem),
        7,
        "head 200 was not returned"
    );
}

#[test]
fn writes_to_a_readonly_disk_and_unnegotiated_features_are_refused() {
    let mut rig = Rig::new("ro", true, false, EngineKind::Sync, 0);
    let data = rig.buf(512);
    rig.mem.write_slice(&[1; 512], data).unwrap();
    let (w, ws) = rig.simple(VIRTIO_BLK_T_OUT, 0, Some((data, 512, false)));
    let seg = rig.segment(0, 1, 0);
    let (d, ds) = rig.simple(VIRTIO_BLK_T_DISCARD, 0, Some((seg, 16, false)));
    rig.run().unwrap();
    assert_eq!(rig.byte(ws), STATUS_IOERR);
    assert_eq!(rig.byte(ds), STATUS_UNSUPP, "discard was not negotiated");
    assert_eq!((rig.used_len(w), rig.used_len(d)), (Some(1), Some(1)));
    assert_eq!(rig.file(0, 512), (0..512).map(pattern).collect::<Vec<_>>());
}

#[test]
fn an_available_index_far_ahead_is_a_queue_error_not_a_crash() {
    let mut rig = Rig::new("availidx", false, false, EngineKind::Sync, all_features());
    let idx = rig.driver.avail.unchecked_add(2);
    rig.mem.write_obj(1000u16, idx).unwrap();
    assert!(matches!(rig.run(), Err(QueueError::Ring(_))));
}

#[test]
fn direct_io_bounces_unaligned_buffers_and_refuses_unaligned_sectors() {
    let mut rig = Rig::new("direct", false, true, EngineKind::IoUring, all_features());
    let data = GuestAddress(rig.buf(8192).0 + 512);
    rig.mem.write_slice(&[0x77; 4096], data).unwrap();
    let (w, ws) = rig.simple(VIRTIO_BLK_T_OUT, 8, Some((data, 4096, false)));
    rig.run().unwrap();
    let back = GuestAddress(rig.buf(8192).0 + 100);
    let (r, rs) = rig.simple(VIRTIO_BLK_T_IN, 8, Some((back, 4096, true)));
    let b = rig.buf(4096);
    let (u, us) = rig.simple(VIRTIO_BLK_T_IN, 1, Some((b, 4096, true)));
    rig.run().unwrap();
    assert_eq!(
        (rig.byte(ws), rig.byte(rs), rig.byte(us)),
        (0, 0, STATUS_IOERR)
    );
    assert_eq!(
        (rig.used_len(w), rig.used_len(r), rig.used_len(u)),
        (Some(1), Some(4097), Some(1))
    );
    assert_eq!(rig.bytes(back, 4096), vec![0x77; 4096]);
    assert_eq!(rig.file(4096, 4096), vec![0x77; 4096]);
}

/// F3: header, a 512-byte data buffer, then a last device-writable buffer at
/// 0xFFFF_FFFF_FFFF_FFF8 (16 or 512 bytes). Its last byte, where the status goes, would wrap
/// to guest address 0x7 (or 0x1F7): the request must be returned with nothing written
/// anywhere, and the queue must go on serving.
#[test]
fn a_status_buffer_that_wraps_the_address_space_gets_no_stray_write() {
    for (len, stray) in [(16u32, 0x7u64), (512, 0x1f7)] {
        let mut rig = Rig::new(&format!("wrap{len}"), false, false, EngineKind::Sync, 0);
        let stray = GuestAddress(stray);
        // Mark the byte the wrapped status would land on (an unused descriptor's byte).
        rig.mem.write_obj(CANARY, stray).unwrap();
        let hdr = rig.header(VIRTIO_BLK_T_IN, 0);
        let data = rig.buf(512);
        let head = rig.submit(&[
            (hdr, 16, false),
            (data, 512, true),
            (GuestAddress(0xFFFF_FFFF_FFFF_FFF8), len, true),
        ]);
        // 0x7 is inside descriptor 0 (this chain's head): compare with what is there now.
        let before = rig.bytes(GuestAddress(0), 0x400);
        let expected = rig.byte(stray);
        let (good, good_status) = rig.simple(VIRTIO_BLK_T_FLUSH, 0, None);
        rig.run().unwrap();
        assert_eq!(
            rig.byte(stray),
            expected,
            "len {len}: status written at {stray:?}"
        );
        assert_eq!(rig.used_len(head), Some(0), "len {len}: returned empty");
        assert_eq!(
            rig.bytes(data, 512),
            vec![CANARY; 512],
            "len {len}: data untouched"
        );
        // Nothing else of the descriptor table changed but the flush's own descriptors.
        let after = rig.bytes(GuestAddress(0), 0x30);
        assert_eq!(after, before[..0x30], "len {len}");
        assert_eq!(
            rig.used_len(good),
            Some(1),
            "len {len}: the queue keeps serving"
        );
        assert_eq!(rig.byte(good_status), 0);
    }
}

/// F6: data buffers of the wrong direction (an IN whose data the device may only read, an OUT
/// whose data it may only write) get IOERR, not OK with nothing done.
#[test]
fn data_buffers_of_the_wrong_direction_get_ioerr() {
    let mut rig = Rig::new("direction", false, false, EngineKind::Sync, all_features());
    let data = rig.buf(512);
    let (read, read_status) = rig.simple(VIRTIO_BLK_T_IN, 0, Some((data, 512, false)));
    let hdr = rig.header(VIRTIO_BLK_T_OUT, 0);
    let (wdata, wstatus) = (rig.buf(512), rig.buf(1));
    rig.mem.write_slice(&[0x77; 512], wdata).unwrap();
    let write = rig.submit(&[(hdr, 16, false), (wdata, 512, true), (wstatus, 1, true)]);
    rig.run().unwrap();
    assert_eq!(
        rig.byte(read_status),
        STATUS_IOERR,
        "IN with read-only data"
    );
    assert_eq!(rig.used_len(read), Some(1));
    assert_eq!(
        rig.bytes(data, 512),
        vec![CANARY; 512],
        "nothing read into it"
    );
    assert_eq!(rig.byte(wstatus), STATUS_IOERR, "OUT with write-only data");
    assert_eq!(rig.used_len(write), Some(1));
    assert_eq!(rig.file(0, 512), (0..512).map(pattern).collect::<Vec<_>>());
}
