//! The backend server against the `vhost` crate's `Frontend`, over a real Unix socket, in
//! process: negotiation, the data path with EVENT_IDX, ring stop and restart, in-flight
//! resubmission after a backend that died with requests taken, worker failures, and
//! malformed messages.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use isola_device_common::inflight::InflightRegion;
use isola_device_common::testing::{self, GuestRam, SplitQueue};
use isola_device_common::{
    chain, DeviceError, Progress, QueueContext, QueueError, QueueHandler, VirtioDevice,
};
use nix::sys::eventfd::{EfdFlags, EventFd};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, GuestAddress};

const TIMEOUT: Duration = Duration::from_secs(10);
const CONFIG: &[u8] = b"echo-config-0123";
const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX);

/// Echoes each request's readable bytes, reversed, into its writable buffers.
#[derive(Default)]
struct Echo {
    /// After this many completions, take requests but never finish them (a stuck backend).
    hold_after: std::sync::Mutex<Option<usize>>,
    completed: AtomicUsize,
    fail: AtomicBool,
    /// Calls of `VirtioDevice::reset`.
    resets: AtomicUsize,
    /// Run once by the first `process` call that finds nothing to take: plays a driver that
    /// adds a request right after the device looked (kicks suppressed, so no kick).
    on_idle: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

struct EchoQueue {
    device: Arc<Echo>,
}

struct EchoDevice(Arc<Echo>);

impl VirtioDevice for EchoDevice {
    fn name(&self) -> &str {
        "echo"
    }
    fn num_queues(&self) -> u16 {
        2
    }
    fn max_queue_size(&self) -> u16 {
        64
    }
    fn features(&self) -> u64 {
        FEATURES
    }
    fn config(&self) -> Vec<u8> {
        CONFIG.to_vec()
    }
    fn queue_handler(
        &self,
        _index: u16,
        _features: u64,
    ) -> Result<Box<dyn QueueHandler>, DeviceError> {
        Ok(Box::new(EchoQueue {
            device: Arc::clone(&self.0),
        }))
    }
    fn reset(&self) {
        self.0.resets.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("echo device told to fail")]
struct Told;

impl QueueHandler for EchoQueue {
    fn process(&mut self, q: &mut QueueContext<'_>) -> Result<Progress, QueueError> {
        if self.device.fail.load(Ordering::SeqCst) {
            return Err(QueueError::Device(Box::new(Told)));
        }
        let mut popped = 0;
        while let Some(req) = q.pop()? {
            popped += 1;
            let hold = *self.device.hold_after.lock().unwrap();
            if hold.is_some_and(|n| self.device.completed.load(Ordering::SeqCst) >= n) {
                continue;
            }
            let Ok(segs) = req.segments() else {
                q.complete(req.head(), 0)?;
                continue;
            };
            let (readable, writable): (Vec<_>, Vec<_>) =
                segs.into_iter().partition(|s| !s.writable);
            let mut data = vec![0u8; chain::total_len(&readable) as usize];
            let mem = q.memory().clone();
            let written = match chain::read_bytes(&mem, &readable, &mut data) {
                Ok(()) => {
                    data.reverse();
                    data.truncate(chain::total_len(&writable) as usize);
                    chain::write_bytes(&mem, &writable, &data).map_or(0, |()| data.len())
                }
                Err(_) => 0,
            };
            q.complete(req.head(), written as u32)?;
            self.device.completed.fetch_add(1, Ordering::SeqCst);
        }
        if popped == 0 {
            if let Some(add) = self.device.on_idle.lock().unwrap().take() {
                add();
            }
        }
        Ok(Progress::Idle)
    }
}

struct Server {
    path: PathBuf,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    dir: PathBuf,
}

impl Server {
    fn start(name: &str, device: Arc<Echo>) -> Server {
        isola_device_common::logging::init("echo-test");
        let dir = std::env::temp_dir().join(format!("isola-proto-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("echo.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let stop = Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).unwrap());
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            isola_device_common::serve_until(
                &listener,
                &Arc::new(EchoDevice(device)),
                Some(&stop2),
            )
            .unwrap();
        });
        Server {
            path,
            stop,
            thread: Some(thread),
            dir,
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.write(1).unwrap();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn all_protocol() -> VhostUserProtocolFeatures {
    isola_device_common::offered_protocol_features()
}

/// Adds an echo request (8 readable bytes, 8 writable) whose buffers sit in slot `slot`.
fn echo_request(q: &mut SplitQueue, ram: &GuestRam, slot: u64, text: &[u8; 8]) -> u16 {
    let base = GuestAddress(0x10_0000 + slot * 0x100);
    ram.memory().write_slice(text, base).unwrap();
    q.add(
        ram.memory(),
        &[(base, 8, false), (GuestAddress(base.0 + 0x80), 8, true)],
    )
}

fn echoed(ram: &GuestRam, slot: u64) -> [u8; 8] {
    let mut out = [0u8; 8];
    ram.memory()
        .read_slice(&mut out, GuestAddress(0x10_0000 + slot * 0x100 + 0x80))
        .unwrap();
    out
}

fn connected(server: &Server, ram: &GuestRam) -> Frontend {
    let mut fe = testing::connect(server.path(), 2, TIMEOUT);
    testing::negotiate(&mut fe, FEATURES, all_protocol());
    fe.set_mem_table(&[ram.region()]).unwrap();
    fe
}

#[test]
fn negotiation_config_and_data_path_with_event_idx() {
    let device = Arc::new(Echo::default());
    let server = Server::start("data", Arc::clone(&device));
    let ram = GuestRam::new(2 << 20);
    let mut fe = testing::connect(server.path(), 2, TIMEOUT);
    let acked = testing::negotiate(&mut fe, FEATURES, all_protocol());
    assert_eq!(acked & FEATURES, FEATURES);
    assert_eq!(fe.get_queue_num().unwrap(), 2);
    assert_eq!(fe.get_max_mem_slots().unwrap(), 64);
    let (_, config) = fe
        .get_config(0, 20, VhostUserConfigFlags::WRITABLE, &[0u8; 20])
        .unwrap();
    assert_eq!(&config[..16], CONFIG);
    assert_eq!(&config[16..], &[0u8; 4]);
    // A write to read-only configuration is ignored, not fatal.
    fe.set_config(0, VhostUserConfigFlags::WRITABLE, b"x")
        .unwrap();
    fe.set_mem_table(&[ram.region()]).unwrap();

    let mut q = SplitQueue::new(0, 16, GuestAddress(0));
    // EVENT_IDX: call only once the used index passes 3.
    q.set_used_event(ram.memory(), 3);
    testing::start_queue(&mut fe, &q, &ram, 0);
    for (slot, text) in [(0, b"abcdefgh"), (1, b"12345678")] {
        let head = echo_request(&mut q, &ram, slot, text);
        q.publish(ram.memory(), head);
    }
    q.kick();
    assert!(q.wait_used(ram.memory(), 2, TIMEOUT));
    assert_eq!(&echoed(&ram, 0), b"hgfedcba");
    assert_eq!(&echoed(&ram, 1), b"87654321");
    assert_eq!(q.used_elem(ram.memory(), 0).1, 8);
    assert!(
        q.call.read().is_err(),
        "no call before used_event is passed"
    );
    for slot in 2..4 {
        let head = echo_request(&mut q, &ram, slot, b"ABCDEFGH");
        q.publish(ram.memory(), head);
    }
    q.kick();
    assert!(q.wait_used(ram.memory(), 4, TIMEOUT));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        q.call.read().unwrap(),
        1,
        "one call once used_event is passed"
    );

    // GET_VRING_BASE stops the ring and returns the next available index; a restart at
    // that base carries on.
    assert_eq!(fe.get_vring_base(0).unwrap(), 4);
    let head = echo_request(&mut q, &ram, 4, b"stopped!");
    q.publish(ram.memory(), head);
    q.kick();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        q.used_idx(ram.memory()),
        4,
        "a stopped ring is not processed"
    );
    testing::start_queue(&mut fe, &q, &ram, 4);
    assert!(q.wait_used(ram.memory(), 5, TIMEOUT));
    assert_eq!(&echoed(&ram, 4), b"!deppots");

    // RESET_DEVICE stops everything and tells the device (it drops what the driver made);
    // the ring can then be set up from scratch.
    let resets = device.resets.load(Ordering::SeqCst);
    fe.reset_device().unwrap();
    assert_eq!(device.resets.load(Ordering::SeqCst), resets + 1);
    testing::start_queue(&mut fe, &q, &ram, 5);
    let head = echo_request(&mut q, &ram, 5, b"afterrst");
    q.publish(ram.memory(), head);
    q.kick();
    assert!(q.wait_used(ram.memory(), 6, TIMEOUT));
}

#[test]
fn a_request_added_while_kicks_are_suppressed_is_served_without_a_kick() {
    let device = Arc::new(Echo::default());
    let server = Server::start("no-kick", Arc::clone(&device));
    let ram = GuestRam::new(2 << 20);
    let mut fe = connected(&server, &ram);
    let mut q = SplitQueue::new(0, 16, GuestAddress(0));
    testing::start_queue(&mut fe, &q, &ram, 0);
    let head = echo_request(&mut q, &ram, 0, b"kicked!!");
    q.publish(ram.memory(), head);
    q.kick();
    assert!(q.wait_used(ram.memory(), 1, TIMEOUT));
    // The worker is asleep again. A kick with nothing new wakes it; right after its look at
    // the ring finds nothing, the driver adds a request and, seeing kicks suppressed, does
    // not kick. The device must look again before it sleeps.
    std::thread::sleep(Duration::from_millis(50));
    let head = echo_request(&mut q, &ram, 1, b"no kick!");
    let (mem, avail) = (ram.memory().clone(), q.avail);
    *device.on_idle.lock().unwrap() = Some(Box::new(move || {
        mem.write_obj(head, GuestAddress(avail.0 + 4 + 2)).unwrap();
        mem.store(2u16, GuestAddress(avail.0 + 2), Ordering::Release)
            .unwrap();
    }));
    q.kick();
    assert!(
        q.wait_used(ram.memory(), 2, Duration::from_secs(2)),
        "the request added while kicks were suppressed was never served"
    );
    assert_eq!(&echoed(&ram, 1), b"!kcik on");
}

#[test]
fn inflight_requests_are_resubmitted_after_the_backend_goes_away() {
    let device = Arc::new(Echo::default());
    *device.hold_after.lock().unwrap() = Some(2);
    let server = Server::start("inflight", Arc::clone(&device));
    let ram = GuestRam::new(2 << 20);
    let mut q = SplitQueue::new(0, 16, GuestAddress(0));

    let mut fe = connected(&server, &ram);
    let ask = VhostUserInflight {
        num_queues: 1,
        queue_size: 16,
        ..Default::default()
    };
    let (info, file) = fe.get_inflight_fd(&ask).unwrap();
    assert_eq!(info.mmap_offset, 0);
    assert!(info.mmap_size >= 16 + 16 * 16);
    fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
    testing::start_queue(&mut fe, &q, &ram, 0);
    let texts: Vec<[u8; 8]> = (0..5u8).map(|i| [b'a' + i; 8]).collect();
    for (slot, text) in texts.iter().enumerate() {
        let head = echo_request(&mut q, &ram, slot as u64, text);
        q.publish(ram.memory(), head);
    }
    q.kick();
    assert!(q.wait_used(ram.memory(), 2, TIMEOUT));
    let region = InflightRegion::open(file.try_clone().unwrap(), info.mmap_size, 0, 1, 16).unwrap();
    let tracked = region.queue(0).unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while tracked.inflight_heads().unwrap().len() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let completed_first: Vec<u32> = (0..2).map(|i| q.used_elem(ram.memory(), i).0).collect();
    assert_eq!(tracked.inflight_heads().unwrap().len(), 3);
    // The "backend" goes away with three requests taken; the frontend reconnects with the
    // region it kept, and restarts the ring at the used index, as QEMU does.
    drop(fe);
    *device.hold_after.lock().unwrap() = None;
    let mut fe = connected(&server, &ram);
    fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
    testing::start_queue(&mut fe, &q, &ram, q.used_idx(ram.memory()));
    assert!(q.wait_used(ram.memory(), 5, TIMEOUT));
    let mut heads: Vec<u32> = (0..5).map(|i| q.used_elem(ram.memory(), i).0).collect();
    assert_eq!(&heads[..2], &completed_first[..]);
    heads.sort_unstable();
    assert_eq!(
        heads,
        vec![0, 2, 4, 6, 8],
        "every request completed exactly once"
    );
    for (slot, text) in texts.iter().enumerate() {
        let mut expected = *text;
        expected.reverse();
        assert_eq!(echoed(&ram, slot as u64), expected);
    }
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(q.used_idx(ram.memory()), 5, "nothing completed twice");
    assert!(tracked.inflight_heads().unwrap().is_empty());
}

#[test]
fn a_failing_worker_drops_the_connection_and_the_next_one_works() {
    let device = Arc::new(Echo::default());
    let server = Server::start("fail", Arc::clone(&device));
    let ram = GuestRam::new(2 << 20);
    let mut fe = connected(&server, &ram);
    let mut q = SplitQueue::new(0, 16, GuestAddress(0));
    let err = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    fe.set_vring_err(0, &err).unwrap();
    testing::start_queue(&mut fe, &q, &ram, 0);
    device.fail.store(true, Ordering::SeqCst);
    let head = echo_request(&mut q, &ram, 0, b"failnow!");
    q.publish(ram.memory(), head);
    q.kick();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while err.read().is_err() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        std::time::Instant::now() < deadline,
        "error eventfd signalled"
    );
    assert!(fe.get_features().is_err(), "connection dropped");
    device.fail.store(false, Ordering::SeqCst);
    let fe = testing::connect(server.path(), 2, TIMEOUT);
    assert!(fe.get_features().is_ok());
}

/// Sends one malformed exchange on a fresh connection, checks the backend closes it, and
/// checks that the next connection is served.
fn refused(server: &Server, what: &str, send: impl FnOnce(&UnixStream)) {
    let stream = UnixStream::connect(server.path()).unwrap();
    // An owner first, so that each case meets the check it is about (before SET_OWNER every
    // request that sets anything up is refused for that alone).
    testing::raw_message(&stream, 3, V1, &[], &[]);
    send(&stream);
    assert!(
        testing::closed_by_peer(&stream, TIMEOUT),
        "{what}: connection not closed"
    );
    let fe = testing::connect(server.path(), 2, TIMEOUT);
    assert!(
        fe.get_features().is_ok(),
        "{what}: next connection not served"
    );
}

const V1: u32 = 1;

fn state(index: u32, num: u32) -> Vec<u8> {
    [index.to_le_bytes(), num.to_le_bytes()].concat()
}

fn region_payload(size: u64) -> Vec<u8> {
    // VhostUserMemory { num_regions: 1, padding }, then one region.
    let mut p = Vec::new();
    p.extend_from_slice(&1u32.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    for v in [0u64, size, 0x7000_0000, 0] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

#[test]
fn malformed_headers_and_sizes_refuse_the_connection_and_the_next_one_works() {
    let server = Server::start("hostile", Arc::new(Echo::default()));

    refused(&server, "unknown request", |s| {
        testing::raw_message(s, 9999, V1, &[], &[])
    });
    refused(&server, "bad version", |s| {
        testing::raw_message(s, 1, 2, &[], &[])
    });
    refused(&server, "reserved flags", |s| {
        testing::raw_message(s, 1, V1 | 0x100, &[], &[])
    });
    refused(&server, "oversized", |s| {
        testing::raw_message(s, 8, V1, &vec![0; 0x1001], &[])
    });
    refused(&server, "payload on GET_FEATURES", |s| {
        testing::raw_message(s, 1, V1, &[0; 8], &[])
    });
    refused(&server, "short SET_VRING_NUM", |s| {
        testing::raw_message(s, 8, V1, &[0; 4], &[])
    });
    refused(&server, "queue index out of range", |s| {
        testing::raw_message(s, 8, V1, &state(7, 16), &[])
    });
    refused(&server, "GET_VRING_BASE out of range", |s| {
        testing::raw_message(s, 11, V1, &state(200, 0), &[])
    });
    refused(&server, "queue size not a power of two", |s| {
        testing::raw_message(s, 8, V1, &state(0, 17), &[])
    });
}

#[test]
fn bad_fds_and_memory_refuse_the_connection_and_the_next_one_works() {
    let server = Server::start("hostile-fds", Arc::new(Echo::default()));
    let small = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .create("small")
        .unwrap();
    small.as_file().set_len(4096).unwrap();
    small
        .add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow])
        .unwrap();
    let small = small.into_file();
    let kick = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let (pipe_r, _pipe_w) = nix::unistd::pipe().unwrap();

    refused(&server, "fd on GET_FEATURES", |s| {
        testing::raw_message(s, 1, V1, &[], &[kick.as_raw_fd()])
    });
    refused(&server, "kick without fd", |s| {
        testing::raw_message(s, 12, V1, &0u64.to_le_bytes(), &[])
    });
    refused(&server, "kick that is a pipe", |s| {
        testing::raw_message(s, 12, V1, &0u64.to_le_bytes(), &[pipe_r.as_raw_fd()])
    });
    refused(&server, "mem table without fd", |s| {
        testing::raw_message(s, 5, V1, &region_payload(4096), &[])
    });
    refused(&server, "mem table with two fds for one region", |s| {
        testing::raw_message(
            s,
            5,
            V1,
            &region_payload(4096),
            &[small.as_raw_fd(), small.as_raw_fd()],
        )
    });
    refused(&server, "region larger than its file", |s| {
        testing::raw_message(s, 5, V1, &region_payload(1 << 20), &[small.as_raw_fd()])
    });
    refused(&server, "ring address outside memory", |s| {
        testing::raw_message(s, 5, V1, &region_payload(4096), &[small.as_raw_fd()]);
        let mut addr = Vec::new();
        addr.extend_from_slice(&0u32.to_le_bytes());
        addr.extend_from_slice(&0u32.to_le_bytes());
        for v in [0x9000_0000u64, 0x7000_0100, 0x7000_0200, 0] {
            addr.extend_from_slice(&v.to_le_bytes());
        }
        testing::raw_message(s, 9, V1, &addr, &[]);
    });
    refused(&server, "SET_INFLIGHT_FD not negotiated", |s| {
        let payload = [
            4096u64.to_le_bytes().as_slice(),
            &0u64.to_le_bytes(),
            &1u16.to_le_bytes(),
            &16u16.to_le_bytes(),
        ]
        .concat();
        testing::raw_message(s, 32, V1, &payload, &[small.as_raw_fd()]);
    });
    refused(&server, "truncated header", |s| {
        (&*s).write_all(&[1, 0, 0, 0]).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
    });
    refused(&server, "second SET_OWNER", |s| {
        testing::raw_message(s, 3, V1, &[], &[]);
        testing::raw_message(s, 3, V1, &[], &[]);
    });
    // Sanity: a well-formed GET_FEATURES gets an answer and the connection stays.
    let s = UnixStream::connect(server.path()).unwrap();
    testing::raw_message(&s, 1, V1, &[], &[]);
    let mut reply = [0u8; 20];
    (&s).read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 1);
}
