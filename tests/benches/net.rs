//! Network benchmark: packets per second and Gbit/s through `isola-net`, guest -> host and
//! host -> guest, with 64-byte and 1514-byte Ethernet frames, against the raw limit of this
//! process writing to and reading from the same tap. All in one run, in a network namespace
//! of its own.
//!
//! The "guest" is a vhost-user frontend in this process (rings and buffers in a memfd shared
//! with `isola-net`, as the core shares guest RAM) that drives 256-entry rings (the core's
//! size) the way Linux's virtio-net driver does, with EVENT_IDX: it keeps the transmit ring
//! full and, when it is, sleeps on the call eventfd (its interrupt) until the device has used
//! three quarters of it (`virtqueue_enable_cb_delayed`); on receive it takes every used
//! buffer, refills and asks for a call on the next one (NAPI). It kicks only when the device
//! asked (`avail_event`). The sink and the source are the same for `isola-net` and for the
//! raw case:
//!
//! * guest -> host: frames addressed to another host's MAC, which the host stack drops as
//!   soon as the tap has handed them over. Raw: `write(2)` of each frame to the tap fd.
//! * host -> guest: a thread injecting frames into the tap's transmit side through an
//!   AF_PACKET socket (qdisc bypassed); what counts is what reaches the reader. Raw: a thread
//!   `read(2)`ing the tap fd until it would block, then `poll(2)`.
//!
//! `cargo bench -p isola-tests --bench net` (as root); `ISOLA_BENCH_SECONDS` (default 1) and
//! `ISOLA_BENCH_ROUNDS` (default 3) set the rounds; each case reports its best round, the
//! machines being shared and noisy. `ISOLA_NET_ARGS` adds options to `isola-net`. The
//! `isola-net` used is the release build.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isola_device_common::testing::{self, GuestRam, SplitQueue};
use isola_tests::net::{in_netns, make_tap, open_tap};
use isola_tests::{binary, scratch_dir, wait_for_path};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::VhostBackend;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Address, Bytes, GuestAddress};

const HDR: usize = 12;
const QSIZE: u16 = 256;
const SLOT: u64 = 0x800;
const BUFS: u64 = 0x10_0000;
const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const OTHER_MAC: [u8; 6] = [2, 0xee, 0, 0, 0, 9];

/// An Ethernet frame of `len` bytes from `src` to `dst` (IPv4 ethertype, zero payload).
fn frame(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f
}

struct Result {
    pps: f64,
    bytes: usize,
}

impl Result {
    fn gbps(&self) -> f64 {
        self.pps * self.bytes as f64 * 8.0 / 1e9
    }
}

fn raw_tx(tap: &OwnedFd, len: usize, secs: f64) -> Result {
    let mut buf = vec![0u8; HDR];
    buf.extend(frame(OTHER_MAC, GUEST_MAC, len));
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        // SAFETY: write reads `buf`, alive for the call.
        let w = unsafe { libc::write(tap.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if w > 0 {
            n += 1;
        }
    }
    Result {
        pps: n as f64 / start.elapsed().as_secs_f64(),
        bytes: len,
    }
}

/// Injects frames to the guest's MAC into the tap's transmit side until `stop`.
fn injector(ifindex: i32, len: usize, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    // The AF_PACKET socket is made here, in the namespace of the calling thread.
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is fresh and owned by nobody else.
    let sock: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one int, alive for the call.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const libc::c_int).cast(),
            4,
        )
    };
    std::thread::spawn(move || {
        let f = frame(GUEST_MAC, [2, 0xaa, 0, 0, 0, 1], len);
        // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&GUEST_MAC);
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: sendto reads `f` and `addr`, both alive for the call.
            unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
        }
    })
}

fn raw_rx(tap: &OwnedFd, ifindex: i32, len: usize, secs: f64) -> Result {
    // The efficient reader: wait for the fd, then read until it would block (as isola-net
    // does), so the raw side is not slowed by one wake-up per frame.
    let flags = unsafe_fcntl_nonblock(tap);
    let stop = Arc::new(AtomicBool::new(false));
    let inject = injector(ifindex, len, Arc::clone(&stop));
    let mut buf = vec![0u8; 65536];
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        let mut pfd = libc::pollfd {
            fd: tap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes one pollfd, alive for the call.
        unsafe { libc::poll(&mut pfd, 1, 10) };
        loop {
            // SAFETY: read writes at most buf.len() bytes into `buf`.
            let r = unsafe { libc::read(tap.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if r < 0 {
                break;
            }
            if r as usize == HDR + len {
                n += 1;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    inject.join().unwrap();
    let _ = flags;
    Result {
        pps: n as f64 / elapsed,
        bytes: len,
    }
}

/// Makes `fd` non-blocking.
fn unsafe_fcntl_nonblock(fd: &OwnedFd) -> i32 {
    // SAFETY: F_GETFL/F_SETFL on an fd we own read and write no memory of ours.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
    }
}

/// The frontend: one pair, every buffer one descriptor of `SLOT` bytes.
struct Guest {
    ram: GuestRam,
    _frontend: vhost::vhost_user::Frontend,
    rx: SplitQueue,
    tx: SplitQueue,
}

fn connect(socket: &Path) -> Guest {
    let ram = GuestRam::new(0x80_0000);
    let mut frontend = testing::connect(socket, 2, Duration::from_secs(10));
    testing::negotiate(
        &mut frontend,
        (1 << 32) | (1 << VIRTIO_RING_F_EVENT_IDX),
        isola_device_common::offered_protocol_features()
            & !VhostUserProtocolFeatures::INFLIGHT_SHMFD,
    );
    frontend.set_mem_table(&[ram.region()]).unwrap();
    let rx = SplitQueue::new(0, QSIZE, GuestAddress(0));
    let tx = SplitQueue::new(1, QSIZE, GuestAddress(0x1_0000));
    testing::start_queue(&mut frontend, &rx, &ram, 0);
    testing::start_queue(&mut frontend, &tx, &ram, 0);
    Guest {
        ram,
        _frontend: frontend,
        rx,
        tx,
    }
}

/// Waits (up to 1 ms) for the device's call eventfd, and clears it.
fn wait_call(q: &SplitQueue) {
    let mut pfd = libc::pollfd {
        fd: q.call.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd, alive for the call.
    unsafe { libc::poll(&mut pfd, 1, 1) };
    let _ = q.call.read();
}

/// Asks for a call once the used index passes `after` (EVENT_IDX `used_event`), then says
/// whether the used index already has: a driver re-checks after arming, or it could sleep
/// through the completion it asked about.
fn arm_call(q: &SplitQueue, ram: &GuestRam, after: u16, seen: u16) -> bool {
    q.set_used_event(ram.memory(), after);
    // The device adds used elements, fences, then reads used_event; the driver writes
    // used_event, fences, then reads the used index: one of the two sees the other.
    std::sync::atomic::fence(Ordering::SeqCst);
    let now = q.used_idx(ram.memory());
    now.wrapping_sub(seen) > after.wrapping_sub(seen)
}

/// EVENT_IDX's test: does moving an index from `old` to `new` pass `event`?
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Kicks if the device asked to hear about the available index going from `old` to `new`
/// (its `avail_event`, EVENT_IDX): a device that is still working through the ring has not
/// asked, and costs no kick.
fn kick(q: &SplitQueue, ram: &GuestRam, old: u16, new: u16) {
    std::sync::atomic::fence(Ordering::SeqCst);
    let at = q.used.unchecked_add(4 + 8 * u64::from(q.size));
    let event: u16 = ram.memory().load(at, Ordering::Acquire).unwrap();
    if need_event(event, new, old) {
        q.kick();
    }
}

/// Takes every used element of `q` from `*seen` on and makes each buffer available again
/// (same descriptor, same contents), kicking if the device asked for it; returns the lengths
/// the device reported, through `each`, and how many there were.
fn recycle(q: &mut SplitQueue, ram: &GuestRam, seen: &mut u16, mut each: impl FnMut(u32)) -> u64 {
    let now = q.used_idx(ram.memory());
    let old = q_avail(q, ram);
    let mut n = 0;
    while *seen != now {
        let (head, len) = q.used_elem(ram.memory(), *seen);
        each(len);
        q.publish(ram.memory(), head as u16);
        *seen = seen.wrapping_add(1);
        n += 1;
    }
    if n > 0 {
        kick(q, ram, old, q_avail(q, ram));
    }
    n
}

/// The driver's available index, as published.
fn q_avail(q: &SplitQueue, ram: &GuestRam) -> u16 {
    ram.memory()
        .load(q.avail.unchecked_add(2), Ordering::Acquire)
        .unwrap()
}

/// Transmit as a Linux virtio-net driver sending at full speed does it: the ring is kept
/// full; when it is, the driver sleeps until the device has used three quarters of it
/// (`virtqueue_enable_cb_delayed`), then takes back every used buffer and refills at once.
fn net_tx(g: &mut Guest, len: usize, secs: f64) -> Result {
    let mem = g.ram.memory();
    let mut buf = vec![0u8; HDR];
    buf.extend(frame(OTHER_MAC, GUEST_MAC, len));
    let mut heads = Vec::new();
    for i in 0..u64::from(QSIZE) {
        let at = GuestAddress(BUFS + 0x20_0000 + i * SLOT * 2);
        mem.write_slice(&buf, at).unwrap();
        heads.push(g.tx.add(mem, &[(at, buf.len() as u32, false)]));
    }
    let mut seen = g.tx.used_idx(mem);
    for head in heads {
        g.tx.publish(mem, head);
    }
    g.tx.kick();
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        let outstanding = q_avail(&g.tx, &g.ram).wrapping_sub(seen);
        let after = seen.wrapping_add(outstanding / 4 * 3).wrapping_sub(1);
        if !arm_call(&g.tx, &g.ram, after, seen) {
            wait_call(&g.tx);
        }
        n += recycle(&mut g.tx, &g.ram, &mut seen, |_| {});
    }
    let elapsed = start.elapsed().as_secs_f64();
    Result {
        pps: n as f64 / elapsed,
        bytes: len,
    }
}

/// Receive as a Linux virtio-net driver's NAPI poll does it: on a call, take every used
/// buffer, refill, and ask for a call on the next one.
fn net_rx(g: &mut Guest, ifindex: i32, len: usize, secs: f64) -> Result {
    let mem = g.ram.memory();
    let mut seen = g.rx.used_idx(mem);
    for i in 0..u64::from(QSIZE) {
        let head =
            g.rx.add(mem, &[(GuestAddress(BUFS + i * SLOT), SLOT as u32, true)]);
        g.rx.publish(mem, head);
    }
    g.rx.kick();
    let stop = Arc::new(AtomicBool::new(false));
    let inject = injector(ifindex, len, Arc::clone(&stop));
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        if !arm_call(&g.rx, &g.ram, seen, seen) {
            wait_call(&g.rx);
        }
        recycle(&mut g.rx, &g.ram, &mut seen, |used_len| {
            if used_len as usize == HDR + len {
                n += 1;
            }
        });
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    inject.join().unwrap();
    Result {
        pps: n as f64 / elapsed,
        bytes: len,
    }
}

fn ifindex(name: &str) -> i32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: `c` is a NUL-terminated string alive for the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert!(i > 0, "no interface {name}");
    i as i32
}

/// Extra `isola-net` options from `ISOLA_NET_ARGS`.
fn extra_args() -> Vec<String> {
    std::env::var("ISOLA_NET_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn start_net(socket: &Path, tap: OwnedFd, log: &Path) -> Child {
    let _ = std::fs::remove_file(socket);
    let fd = tap.as_raw_fd();
    let mut cmd = Command::new(binary("isola-net"));
    cmd.arg("--socket")
        .arg(socket)
        .args(["--tap-fd", "3"])
        .args(extra_args())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    // SAFETY: between fork and exec only fcntl and dup2 (async-signal-safe, no allocation)
    // on `fd`, which stays open until spawn returns; the copy above 100 keeps dup2 from
    // clobbering its own source.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
            if high < 0 || libc::dup2(high, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("isola-net starts");
    drop(tap);
    wait_for_path(socket, Duration::from_secs(20));
    child
}

/// One case through isola-net: a fresh process on a fresh tap fd, a fresh frontend.
fn through_isola(dir: &Path, index: i32, to_guest: bool, len: usize, secs: f64) -> Result {
    let socket = dir.join("net.sock");
    let mut net = start_net(&socket, open_tap("tap0"), &dir.join("net.log"));
    let mut guest = connect(&socket);
    let result = if to_guest {
        net_rx(&mut guest, index, len, secs)
    } else {
        net_tx(&mut guest, len, secs)
    };
    drop(guest);
    let _ = net.kill();
    let _ = net.wait();
    result
}

/// The same case with this process on the tap (a single-queue tap has one reader at a time,
/// so the two take turns).
fn raw(index: i32, to_guest: bool, len: usize, secs: f64) -> Result {
    let fd = open_tap("tap0");
    if to_guest {
        raw_rx(&fd, index, len, secs)
    } else {
        raw_tx(&fd, len, secs)
    }
}

fn main() {
    let secs: f64 = std::env::var("ISOLA_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let rounds: usize = std::env::var("ISOLA_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("net bench: skipped (needs root for a network namespace and taps)");
        return;
    }
    in_netns(move || {
        let dir = scratch_dir("net-bench");
        make_tap("tap0");
        let index = ifindex("tap0");
        println!(
            "net bench: best of {rounds} rounds of {secs} s per case, isola-net and raw \
             alternating; frame = Ethernet frame bytes (no FCS); isola-net options: {:?}",
            extra_args()
        );
        println!(
            "{:<12} {:>6} {:>11} {:>7} {:>11} {:>7} {:>6}",
            "direction", "frame", "isola pps", "Gbit/s", "raw pps", "Gbit/s", "ratio"
        );
        for len in [64usize, 1514] {
            for to_guest in [false, true] {
                let mut isola = Result {
                    pps: 0.0,
                    bytes: len,
                };
                let mut raw_best = Result {
                    pps: 0.0,
                    bytes: len,
                };
                for _ in 0..rounds {
                    let i = through_isola(&dir, index, to_guest, len, secs);
                    let r = raw(index, to_guest, len, secs);
                    isola.pps = isola.pps.max(i.pps);
                    raw_best.pps = raw_best.pps.max(r.pps);
                }
                println!(
                    "{:<12} {:>6} {:>11.0} {:>7.2} {:>11.0} {:>7.2} {:>5.0}%",
                    if to_guest {
                        "host->guest"
                    } else {
                        "guest->host"
                    },
                    len,
                    isola.pps,
                    isola.gbps(),
                    raw_best.pps,
                    raw_best.gbps(),
                    100.0 * isola.pps / raw_best.pps
                );
            }
        }
    });
}
