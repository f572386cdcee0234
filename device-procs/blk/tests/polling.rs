//! `--poll-us`: after a burst the queue worker keeps watching the available ring, kicks
//! suppressed, so a request published without a kick inside the window is served. The window
//! starts at zero and grows while requests come sooner than the limit; after the window the
//! worker sleeps again and needs a kick; and a stop (GET_VRING_BASE) does not wait for the
//! window to end.
//!
//! The test is the frontend (guest RAM in a memfd it owns, no EVENT_IDX, so suppression is
//! the used ring's NO_NOTIFY flag and can be read back).

mod support;

use std::time::{Duration, Instant};

use isola_device_common::testing::{self, GuestRam, SplitQueue};
use support::{patterned_image, Backend, Scratch, TIMEOUT};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY;
use vm_memory::{Bytes, GuestAddress};

const QSIZE: u16 = 64;
/// The limit: long, so that a loaded machine cannot make a window end before the test looks.
const POLL: Duration = Duration::from_secs(1);
/// Time between the test's requests while the window grows (doubling from 4 µs it passes
/// this after 16 sleeps).
const CADENCE: Duration = Duration::from_millis(200);

/// isola-blk with a `POLL` window on a patterned 1 MiB image, its queue 0 started by the test
/// as frontend.
struct Polling {
    _dir: Scratch,
    backend: Backend,
    ram: GuestRam,
    q: SplitQueue,
    fe: Frontend,
    /// The image's contents.
    data: Vec<u8>,
}

impl Polling {
    fn start(name: &str) -> Polling {
        let dir = Scratch::new(name);
        let image = dir.path("disk.img");
        let data = patterned_image(&image, 1 << 20);
        let socket = dir.path("blk.sock");
        let poll_us = POLL.as_micros().to_string();
        let backend = Backend::start(
            &socket,
            &image,
            dir.path("blk.log"),
            &["--queue-size", "64", "--poll-us", &poll_us],
        );
        let ram = GuestRam::new(4 << 20);
        let q = SplitQueue::new(0, QSIZE, GuestAddress(0));
        let mut fe = testing::connect_with_memory(&socket, &ram, TIMEOUT);
        testing::start_queue(&mut fe, &q, &ram, 0);
        Polling {
            _dir: dir,
            backend,
            ram,
            q,
            fe,
            data,
        }
    }
}

/// Publishes a 4 KiB read of sector `n * 8` into slot `n` of RAM (without kicking).
fn publish_read(q: &mut SplitQueue, ram: &GuestRam, n: u64) -> GuestAddress {
    let base = 0x10_0000 + (n % 32) * 0x4000;
    let (hdr, data, status) = (
        GuestAddress(base),
        GuestAddress(base + 0x1000),
        GuestAddress(base + 0x3000),
    );
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    raw[8..].copy_from_slice(&(n * 8).to_le_bytes());
    let mem = ram.memory();
    mem.write_slice(&raw, hdr).unwrap();
    mem.write_obj(0xffu8, status).unwrap();
    let head = q.add(
        mem,
        &[(hdr, 16, false), (data, 4096, true), (status, 1, true)],
    );
    q.publish(mem, head);
    status
}

fn used_flags(q: &SplitQueue, ram: &GuestRam) -> u16 {
    ram.memory().read_obj(q.used).unwrap()
}

/// Sends one read every CADENCE, published without a kick (kicked only if it is not served),
/// until one is served unkicked: the window has grown past CADENCE. Returns the requests sent.
/// The window starts at zero, so the first ones need their kick.
fn grow_window(q: &mut SplitQueue, ram: &GuestRam, backend: &Backend) -> u16 {
    let mut n: u16 = 0;
    while n < 40 {
        std::thread::sleep(CADENCE);
        let status = publish_read(q, ram, u64::from(n));
        n += 1;
        if q.wait_used(ram.memory(), n, Duration::from_millis(50)) {
            assert_eq!(
                used_flags(q, ram),
                VRING_USED_F_NO_NOTIFY as u16,
                "kicks are suppressed while the worker polls"
            );
            assert_eq!(ram.memory().read_obj::<u8>(status).unwrap(), 0);
            return n;
        }
        q.kick();
        assert!(
            q.wait_used(ram.memory(), n, TIMEOUT),
            "{}",
            backend.log_text()
        );
        assert_eq!(ram.memory().read_obj::<u8>(status).unwrap(), 0);
    }
    panic!("no unkicked request was ever served");
}

#[test]
fn a_polling_queue_serves_unkicked_requests_only_inside_its_window() {
    let Polling {
        backend,
        ram,
        mut q,
        fe,
        ..
    } = Polling::start("polling");

    let mut n = grow_window(&mut q, &ram, &backend);
    assert!(n > 3, "the window did not start small (request {n})");

    // After the window the worker re-enables kicks and sleeps.
    let deadline = Instant::now() + POLL + TIMEOUT;
    while used_flags(&q, &ram) != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(used_flags(&q, &ram), 0, "kicks were never re-enabled");
    publish_read(&mut q, &ram, u64::from(n));
    n += 1;
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        q.used_idx(ram.memory()),
        n - 1,
        "a sleeping worker served a request nobody kicked"
    );
    q.kick();
    assert!(q.wait_used(ram.memory(), n, TIMEOUT));

    // The worker polls again, for CADENCE or more; stopping the ring must not wait for that.
    let stop = Instant::now();
    let base = fe.get_vring_base(0).expect("GET_VRING_BASE");
    assert_eq!(base, u32::from(n));
    assert!(
        stop.elapsed() < CADENCE / 2,
        "GET_VRING_BASE waited {:?} for the poll window",
        stop.elapsed()
    );
}

/// Memory the frontend adds (ADD_MEM_REG) while the worker is inside its poll window is usable
/// by the next request: every round of a pass sees the memory table as it is then, not as it
/// was when the pass began (a busy queue may stay in one pass for ever).
#[test]
fn memory_added_while_a_queue_polls_is_seen_by_its_next_request() {
    let Polling {
        backend,
        ram,
        mut q,
        mut fe,
        data,
        ..
    } = Polling::start("polling-add-mem");
    let n = grow_window(&mut q, &ram, &backend);

    // Still inside the window (it has grown past CADENCE, and polls for up to POLL): a second
    // region at 16 MiB, acknowledged (REPLY_ACK) before the request that reads into it.
    let extra = GuestRam::new(1 << 20);
    let at = 16u64 << 20;
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: at,
        ..extra.region()
    };
    fe.add_mem_region(&region).expect("ADD_MEM_REG");
    let mem = ram.memory();
    let (hdr, status) = (GuestAddress(0x20_0000), GuestAddress(0x20_1000));
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    raw[8..].copy_from_slice(&8u64.to_le_bytes());
    mem.write_slice(&raw, hdr).unwrap();
    mem.write_obj(0xffu8, status).unwrap();
    let head = q.add(
        mem,
        &[
            (hdr, 16, false),
            (GuestAddress(at), 4096, true),
            (status, 1, true),
        ],
    );
    q.publish(mem, head);
    // Kicked only after a while, so that the polling worker takes it first if it can.
    if !q.wait_used(mem, n + 1, CADENCE / 2) {
        q.kick();
        assert!(q.wait_used(mem, n + 1, TIMEOUT), "{}", backend.log_text());
    }
    assert_eq!(
        mem.read_obj::<u8>(status).unwrap(),
        0,
        "the read into the new region failed: {}",
        backend.log_text()
    );
    let mut got = vec![0u8; 4096];
    extra
        .memory()
        .read_slice(&mut got, GuestAddress(0))
        .unwrap();
    assert!(got == data[4096..8192], "wrong data in the new region");
}
