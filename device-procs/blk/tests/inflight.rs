//! In-flight resubmission across a backend crash, with real processes.
//!
//! The test is the frontend (the `vhost` crate's `Frontend`, guest RAM in a memfd it owns).
//! The first `isola-blk` is started with `--debug-hold-sector 64` (feature `debug-hold`): of
//! five requests it completes the 1st, 3rd and 5th and keeps the 2nd and 4th in flight, so
//! completion is out of order. It is killed with SIGKILL; three more requests are made
//! available while no backend runs. A second `isola-blk` is started; the frontend reconnects,
//! hands back the in-flight region with SET_INFLIGHT_FD and restarts the ring at the used
//! index, as QEMU does. Every request must complete exactly once with the right data. (A
//! backend that resumed at the used index without the region would complete the 5th request
//! twice and never the 2nd.)

mod support;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::Duration;

use isola_device_common::inflight::InflightRegion;
use isola_device_common::testing::{self, GuestRam, SplitQueue};
use support::{patterned_image, Backend, Scratch, TIMEOUT};
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress};

const QSIZE: u16 = 32;
const BLOCK: usize = 4096;

struct Req {
    head: u16,
    kind: u32,
    sector: u64,
    data: GuestAddress,
    status: GuestAddress,
}

/// Builds request `n` (its buffers in their own 16 KiB slot of RAM); `fill` is the data of
/// a write.
fn request(q: &mut SplitQueue, ram: &GuestRam, n: u64, kind: u32, sector: u64, fill: u8) -> Req {
    let base = 0x10_0000 + n * 0x4000;
    let (hdr, data, status) = (
        GuestAddress(base),
        GuestAddress(base + 0x1000),
        GuestAddress(base + 0x3000),
    );
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&kind.to_le_bytes());
    raw[8..].copy_from_slice(&sector.to_le_bytes());
    let mem = ram.memory();
    mem.write_slice(&raw, hdr).unwrap();
    mem.write_slice(&[fill; BLOCK], data).unwrap();
    mem.write_obj(0xffu8, status).unwrap();
    let mut bufs = vec![(hdr, 16, false)];
    match kind {
        VIRTIO_BLK_T_OUT => bufs.push((data, BLOCK as u32, false)),
        VIRTIO_BLK_T_IN => bufs.push((data, BLOCK as u32, true)),
        _ => {}
    }
    bufs.push((status, 1, true));
    let head = q.add(mem, &bufs);
    Req {
        head,
        kind,
        sector,
        data,
        status,
    }
}

fn connect(socket: &std::path::Path, ram: &GuestRam) -> Frontend {
    testing::connect_with_memory(socket, ram, TIMEOUT)
}

#[test]
fn requests_in_flight_when_the_backend_is_killed_complete_exactly_once() {
    let dir = Scratch::new("inflight");
    let image_path = dir.path("disk.img");
    let image = patterned_image(&image_path, 1 << 20);
    let socket = dir.path("blk.sock");
    let ram = GuestRam::new(4 << 20);
    let mut q = SplitQueue::new(0, QSIZE, GuestAddress(0));
    let hold = [
        "--engine",
        "sync",
        "--queue-size",
        "32",
        "--debug-hold-sector",
        "64",
    ];
    let mut first = Backend::start(&socket, &image_path, dir.path("first.log"), &hold);
    let (fe, info, inflight_file) = start_tracked(&socket, &ram, &q);

    // The 2nd and 4th name sector 64: taken, never finished.
    let mut reqs = vec![
        request(&mut q, &ram, 0, VIRTIO_BLK_T_OUT, 0, 0x11),
        request(&mut q, &ram, 1, VIRTIO_BLK_T_OUT, 64, 0x22),
        request(&mut q, &ram, 2, VIRTIO_BLK_T_IN, 100, 0),
        request(&mut q, &ram, 3, VIRTIO_BLK_T_FLUSH, 64, 0),
        request(&mut q, &ram, 4, VIRTIO_BLK_T_IN, 200, 0),
    ];
    for r in &reqs {
        q.publish(ram.memory(), r.head);
    }
    q.kick();
    assert!(
        q.wait_used(ram.memory(), 3, TIMEOUT),
        "{}",
        first.log_text()
    );
    let region = InflightRegion::open(
        inflight_file.try_clone().unwrap(),
        info.mmap_size,
        0,
        1,
        QSIZE,
    )
    .unwrap();
    let tracked = region.queue(0).unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while tracked.inflight_heads().unwrap().len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        tracked.inflight_heads().unwrap(),
        vec![reqs[1].head, reqs[3].head]
    );
    let completed_first: Vec<u32> = (0..3).map(|i| q.used_elem(ram.memory(), i).0).collect();
    assert_eq!(
        completed_first,
        vec![
            u32::from(reqs[0].head),
            u32::from(reqs[2].head),
            u32::from(reqs[4].head)
        ]
    );

    first.kill(); // SIGKILL
    drop(fe);
    // Made available while no backend runs.
    reqs.push(request(&mut q, &ram, 5, VIRTIO_BLK_T_OUT, 24, 0x44));
    reqs.push(request(&mut q, &ram, 6, VIRTIO_BLK_T_FLUSH, 0, 0));
    reqs.push(request(&mut q, &ram, 7, VIRTIO_BLK_T_IN, 300, 0));
    for r in &reqs[5..] {
        q.publish(ram.memory(), r.head);
    }
    q.kick();
    let second = Backend::start(
        &socket,
        &image_path,
        dir.path("second.log"),
        &["--engine", "io-uring", "--queue-size", "32"],
    );
    let mut fe = connect(&socket, &ram);
    fe.set_inflight_fd(&info, inflight_file.as_raw_fd())
        .unwrap();
    // No kick: a restarted ring picks up resubmitted and pending requests by itself.
    testing::start_queue(&mut fe, &q, &ram, q.used_idx(ram.memory()));
    assert!(
        q.wait_used(ram.memory(), 8, TIMEOUT),
        "{}",
        second.log_text()
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(q.used_idx(ram.memory()), 8, "nothing completed twice");

    check_each_completed_once(&q, &ram, &reqs, &completed_first, &image);
    assert!(tracked.inflight_heads().unwrap().is_empty());
    assert!(
        second.log_text().contains("resubmitting 2 requests"),
        "{}",
        second.log_text()
    );
    drop(fe);
    drop(second);
    check_disk(&image_path, &image);
}

/// Connects, gets the in-flight region (GET_INFLIGHT_FD), hands it back (SET_INFLIGHT_FD) as
/// the core does, and starts queue 0.
fn start_tracked(
    socket: &std::path::Path,
    ram: &GuestRam,
    q: &SplitQueue,
) -> (Frontend, VhostUserInflight, File) {
    let mut fe = connect(socket, ram);
    let ask = VhostUserInflight {
        num_queues: 1,
        queue_size: QSIZE,
        ..Default::default()
    };
    let (info, inflight_file) = fe.get_inflight_fd(&ask).unwrap();
    fe.set_inflight_fd(&info, inflight_file.as_raw_fd())
        .unwrap();
    testing::start_queue(&mut fe, q, ram, 0);
    (fe, info, inflight_file)
}

/// Every request returned exactly once, with status OK, reads with the image's data.
fn check_each_completed_once(
    q: &SplitQueue,
    ram: &GuestRam,
    reqs: &[Req],
    completed_first: &[u32],
    image: &[u8],
) {
    let used: Vec<(u32, u32)> = (0..8).map(|i| q.used_elem(ram.memory(), i)).collect();
    assert_eq!(
        used[..3].iter().map(|u| u.0).collect::<Vec<_>>(),
        completed_first
    );
    let mut heads: Vec<u32> = used.iter().map(|u| u.0).collect();
    heads.sort_unstable();
    let mut want: Vec<u32> = reqs.iter().map(|r| u32::from(r.head)).collect();
    want.sort_unstable();
    assert_eq!(heads, want, "every request returned exactly once");
    for r in reqs {
        let status: u8 = ram.memory().read_obj(r.status).unwrap();
        assert_eq!(status, 0, "status of request at head {}", r.head);
        if r.kind == VIRTIO_BLK_T_IN {
            let mut got = vec![0u8; BLOCK];
            ram.memory().read_slice(&mut got, r.data).unwrap();
            let at = r.sector as usize * 512;
            assert!(got == image[at..at + BLOCK], "read at sector {}", r.sector);
        }
    }
}

/// Writes landed; nothing else changed.
fn check_disk(image_path: &std::path::Path, image: &[u8]) {
    let disk = std::fs::read(image_path).unwrap();
    for (sector, fill) in [(0usize, 0x11u8), (64, 0x22), (24, 0x44)] {
        assert!(
            disk[sector * 512..sector * 512 + BLOCK]
                .iter()
                .all(|&b| b == fill),
            "sector {sector}"
        );
    }
    assert_eq!(disk[8 * 512..24 * 512], image[8 * 512..24 * 512]);
    assert_eq!(disk[72 * 512..], image[72 * 512..]);
}
