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
//! `ISOLA_BENCH_ROUNDS` (default 5) set the rounds; each case reports the median and the
//! lowest and highest round, and the ratio is taken per round (isola-net and raw run one
//! after the other in each), the machines being shared and noisy. Each case also reports the
//! CPU time per frame of the isola-net process (every thread, `schedstat`) against the raw
//! thread's own (`CLOCK_THREAD_CPUTIME_ID`): what the device costs per frame whatever the
//! machine's load, where the packet rate also depends on how the 2 CPUs are shared. `ISOLA_NET_ARGS` adds options to `isola-net`. The
//! `isola-net` used is the release build. `ISOLA_NET_BASELINE=PATH` also runs the
//! `isola-net` binary at PATH (e.g. a copy built from an earlier commit) in every round, next
//! to the current one, and reports current / baseline per round and the baseline's own
//! ratio to the raw tap (line `baseline`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isola_device_common::testing::{self, GuestRam, SplitQueue};
use isola_tests::bench::{rounds, Spread};
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
    frames: u64,
    /// CPU time of the side under test over the window: this thread (raw) or every thread of
    /// the isola-net process tree (isola-net), in nanoseconds.
    cpu_ns: u64,
}

impl Result {
    fn cpu_ns_per_frame(&self) -> f64 {
        self.cpu_ns as f64 / self.frames.max(1) as f64
    }
}

/// CPU time this thread has used, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time used so far by every thread of process `pid` and of its descendants (the
/// sandboxed isola-net runs as its reaper's child), in nanoseconds (`schedstat`).
fn tree_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut total = 0;
    for task in tasks.flatten() {
        let path = task.path();
        let stat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let children = std::fs::read_to_string(path.join("children")).unwrap_or_default();
        total += children
            .split_whitespace()
            .filter_map(|c| c.parse().ok())
            .map(tree_cpu_ns)
            .sum::<u64>();
    }
    total
}

fn raw_tx(tap: &OwnedFd, len: usize, secs: f64) -> Result {
    let mut buf = vec![0u8; HDR];
    buf.extend(frame(OTHER_MAC, GUEST_MAC, len));
    let start = Instant::now();
    let cpu = thread_cpu_ns();
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
        frames: n,
        cpu_ns: thread_cpu_ns() - cpu,
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
    let cpu = thread_cpu_ns();
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
    let cpu = thread_cpu_ns() - cpu;
    stop.store(true, Ordering::Relaxed);
    inject.join().unwrap();
    let _ = flags;
    Result {
        pps: n as f64 / elapsed,
        frames: n,
        cpu_ns: cpu,
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
fn net_tx(g: &mut Guest, net: u32, len: usize, secs: f64) -> Result {
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
    let cpu = tree_cpu_ns(net);
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
        frames: n,
        cpu_ns: tree_cpu_ns(net) - cpu,
    }
}

/// Receive as a Linux virtio-net driver's NAPI poll does it: on a call, take every used
/// buffer, refill, and ask for a call on the next one.
fn net_rx(g: &mut Guest, net: u32, ifindex: i32, len: usize, secs: f64) -> Result {
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
    let cpu = tree_cpu_ns(net);
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
    let cpu = tree_cpu_ns(net) - cpu;
    stop.store(true, Ordering::Relaxed);
    inject.join().unwrap();
    Result {
        pps: n as f64 / elapsed,
        frames: n,
        cpu_ns: cpu,
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

fn start_net(bin: &Path, socket: &Path, tap: OwnedFd, log: &Path) -> Child {
    let _ = std::fs::remove_file(socket);
    let fd = tap.as_raw_fd();
    let mut cmd = Command::new(bin);
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
fn through_isola(
    bin: &Path,
    dir: &Path,
    index: i32,
    to_guest: bool,
    len: usize,
    secs: f64,
) -> Result {
    let socket = dir.join("net.sock");
    let mut net = start_net(bin, &socket, open_tap("tap0"), &dir.join("net.log"));
    let mut guest = connect(&socket);
    let result = if to_guest {
        net_rx(&mut guest, net.id(), index, len, secs)
    } else {
        net_tx(&mut guest, net.id(), len, secs)
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
    let rounds = rounds(5);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("net bench: skipped (needs root for a network namespace and taps)");
        return;
    }
    let bin = binary("isola-net");
    let baseline = std::env::var_os("ISOLA_NET_BASELINE").map(std::path::PathBuf::from);
    in_netns(move || {
        let dir = scratch_dir("net-bench");
        make_tap("tap0");
        let index = ifindex("tap0");
        println!(
            "net bench: {rounds} rounds of {secs} s per case, isola-net and raw alternating; \
             median (lowest..highest) over the rounds, the ratio taken per round; frame = \
             Ethernet frame bytes (no FCS); CPU ns/frame: the isola-net process (all threads) \
             against the raw thread; isola-net options: {:?}",
            extra_args()
        );
        println!(
            "{:<12} {:>6} {:>28} {:>28} {:>20}",
            "direction", "frame", "isola kpps", "raw kpps", "isola / raw"
        );
        for len in [64usize, 1514] {
            for to_guest in [false, true] {
                let mut isola = Vec::new();
                let mut raw_pps = Vec::new();
                let mut ratio = Vec::new();
                let mut cpu = Vec::new();
                let mut against_baseline = Vec::new();
                let mut baseline_vs_raw = Vec::new();
                let mut baseline_cpu = Vec::new();
                for _ in 0..rounds {
                    let b = baseline
                        .as_ref()
                        .map(|old| through_isola(old, &dir, index, to_guest, len, secs));
                    let i = through_isola(&bin, &dir, index, to_guest, len, secs);
                    let r = raw(index, to_guest, len, secs);
                    if let Some(b) = b {
                        against_baseline.push(i.pps / b.pps);
                        baseline_vs_raw.push(b.pps / r.pps);
                        baseline_cpu.push(b.cpu_ns_per_frame());
                    }
                    isola.push(i.pps / 1e3);
                    raw_pps.push(r.pps / 1e3);
                    ratio.push(i.pps / r.pps);
                    cpu.push((i.cpu_ns_per_frame(), r.cpu_ns_per_frame()));
                }
                let gbps = |kpps: f64| kpps * 1e3 * len as f64 * 8.0 / 1e9;
                let (i, r) = (Spread::of(&isola), Spread::of(&raw_pps));
                println!(
                    "{:<12} {:>6} {:>28} {:>28} {:>20}",
                    if to_guest {
                        "host->guest"
                    } else {
                        "guest->host"
                    },
                    len,
                    format!("{} {:.2} Gb/s", i.show(0), gbps(i.median)),
                    format!("{} {:.2} Gb/s", r.show(0), gbps(r.median)),
                    Spread::of(&ratio).show(2),
                );
                let isola_cpu: Vec<f64> = cpu.iter().map(|c| c.0).collect();
                let raw_cpu: Vec<f64> = cpu.iter().map(|c| c.1).collect();
                let cpu_ratio: Vec<f64> = cpu.iter().map(|c| c.0 / c.1).collect();
                println!(
                    "{:<12} {:>6} {:>28} {:>28} {:>20}",
                    "  CPU ns/frame",
                    "",
                    Spread::of(&isola_cpu).show(0),
                    Spread::of(&raw_cpu).show(0),
                    Spread::of(&cpu_ratio).show(2),
                );
                if !against_baseline.is_empty() {
                    println!(
                        "{:<12} {:>6} {:>28} {:>28} {:>20}",
                        "  baseline",
                        "",
                        "isola / baseline:",
                        Spread::of(&against_baseline).show(2),
                        format!("{} of raw", Spread::of(&baseline_vs_raw).show(2)),
                    );
                    println!(
                        "{:<12} {:>6} {:>28}",
                        "  baseline CPU ns/frame",
                        "",
                        Spread::of(&baseline_cpu).show(0),
                    );
                }
            }
        }
    });
}
