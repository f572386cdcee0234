//! Shared by isola-net's process-level tests: a private network namespace per test (on the
//! test's own thread, so nothing leaks into the host's), taps in it, `isola-net` run as a
//! launcher runs it, a frontend playing the guest, and frame builders.

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use isola_device_common::testing::{self, GuestRam, SplitQueue};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Frontend;
use vm_memory::{Address, Bytes, GuestAddress};

pub const TIMEOUT: Duration = Duration::from_secs(20);
pub const HOST_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 1];
pub const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
pub const HOST_IP: [u8; 4] = [10, 0, 0, 1];
pub const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
pub const HDR: usize = 12;

/// Runs `f` on a thread in a network namespace of its own, which disappears with the thread
/// and the processes it started.
pub fn in_netns<F: FnOnce() + Send + 'static>(f: F) {
    let handle = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET) (tests run as root)");
        ip(&["link", "set", "lo", "up"]);
        f();
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Runs a command in this thread's namespace; panics if it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn ip(args: &[&str]) -> String {
    run("ip", args)
}

pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A persistent tap `name` with the virtio-net header, up, at 10.0.0.1/24, the guest's
/// address resolved statically.
pub fn make_tap(name: &str, multi_queue: bool) {
    let mut args = vec!["tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"];
    if multi_queue {
        args.push("multi_queue");
    }
    ip(&args);
    ip(&["link", "set", name, "address", &mac_text(HOST_MAC)]);
    // No IPv6 chatter (router solicitations) on the test's wire.
    std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1")
        .expect("disable IPv6 on the tap");
    ip(&["addr", "add", "10.0.0.1/24", "dev", name]);
    ip(&["link", "set", name, "up"]);
    ip(&[
        "neigh",
        "add",
        "10.0.0.2",
        "lladdr",
        &mac_text(GUEST_MAC),
        "dev",
        name,
    ]);
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens a queue of tap `name` as a launcher would, with `flags` (IFF_*).
pub fn open_tap(name: &str, flags: libc::c_int) -> OwnedFd {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("/dev/net/tun");
    let mut req = IfReq {
        name: [0; 16],
        flags: flags as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one ifreq, `req`, alive for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert!(
        rc == 0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    OwnedFd::from(file)
}

pub const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// A running `isola-net`, killed on drop; its log goes to a file.
pub struct NetProc {
    pub child: Child,
    pub log: PathBuf,
}

impl NetProc {
    /// Starts `isola-net --socket SOCKET ARGS`, handing it `fds` as 3, 4, ... (named on the
    /// command line by the caller).
    pub fn start(socket: &Path, log: PathBuf, args: &[&str], fds: Vec<OwnedFd>) -> NetProc {
        NetProc::start_as(socket, log, args, fds, None)
    }

    /// As [`NetProc::start`], optionally as user and group `uid` with no supplementary
    /// groups (root drops everything before exec).
    pub fn start_as(
        socket: &Path,
        log: PathBuf,
        args: &[&str],
        fds: Vec<OwnedFd>,
        uid: Option<u32>,
    ) -> NetProc {
        let proc = NetProc::spawn_as(socket, log, args, fds, uid);
        let deadline = Instant::now() + TIMEOUT;
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "isola-net did not create {}: {}",
                socket.display(),
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        proc
    }

    /// Starts it without waiting for the socket.
    pub fn spawn(socket: &Path, log: PathBuf, args: &[&str], fds: Vec<OwnedFd>) -> NetProc {
        NetProc::spawn_as(socket, log, args, fds, None)
    }

    fn spawn_as(
        socket: &Path,
        log: PathBuf,
        args: &[&str],
        fds: Vec<OwnedFd>,
        uid: Option<u32>,
    ) -> NetProc {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_isola-net"));
        cmd.arg("--socket")
            .arg(socket)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        assert!(fds.len() <= 8);
        let mut raw = [-1 as RawFd; 8];
        for (slot, fd) in raw.iter_mut().zip(&fds) {
            *slot = fd.as_raw_fd();
        }
        let count = fds.len();
        // SAFETY: the closure runs in the child between fork and exec, allocates nothing and
        // only calls fcntl(F_DUPFD), dup2, setgroups, setgid and setuid, which are
        // async-signal-safe, on fds open in the
        // parent (`fds` lives until spawn returns). Every source is first copied above 100,
        // so placing them at 3.. cannot overwrite a source not yet copied.
        unsafe {
            cmd.pre_exec(move || {
                let mut high = [-1 as RawFd; 8];
                for i in 0..count {
                    high[i] = libc::fcntl(raw[i], libc::F_DUPFD_CLOEXEC, 100);
                    if high[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, fd) in high.iter().enumerate().take(count) {
                    if libc::dup2(*fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(uid) = uid {
                    if libc::setgroups(0, std::ptr::null()) < 0
                        || libc::setgid(uid) < 0
                        || libc::setuid(uid) < 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(fds);
        NetProc { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last stats summary logged (when queues stop), as (name, value) pairs.
    pub fn last_stat(&self, name: &str) -> Option<u64> {
        let text = self.log_text();
        let line = text.lines().rev().find(|l| l.contains("tx_frames="))?;
        line.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.parse().ok())
    }
}

impl Drop for NetProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory, removed on drop.
pub use isola_device_common::testing::Scratch;

/// Makes `tap0` (one queue) and starts isola-net on it, with its socket and log in `dir`.
pub fn serve_tap0(dir: &Scratch) -> NetProc {
    make_tap("tap0", false);
    NetProc::start(
        &dir.path("net.sock"),
        dir.path("net.log"),
        &["--tap", "tap0"],
        vec![],
    )
}

/// Where the test guest keeps its buffers.
pub const RX_BUFS: u64 = 0x10_0000;
pub const TX_BUFS: u64 = 0x80_0000;
/// Bytes between receive buffers (one slot per descriptor).
pub const RX_SLOT: u64 = 0x4000;
pub const RAM: u64 = 0x100_0000 + 0x80_0000;

/// One queue pair driven by the test, as a guest driver would.
pub struct Guest {
    pub ram: GuestRam,
    pub frontend: Frontend,
    pub rx: SplitQueue,
    pub tx: SplitQueue,
    pub acked: u64,
    rx_posted: u16,
    rx_seen: u16,
    tx_sent: u16,
    tx_buf: u16,
}

pub const QSIZE: u16 = 256;

impl Guest {
    /// Connects to `socket`, acknowledges `features` (of what is offered) and starts pair 0.
    pub fn connect(socket: &Path, features: u64) -> Guest {
        let ram = GuestRam::new(RAM);
        let mut frontend = testing::connect(socket, 2, TIMEOUT);
        let acked = testing::negotiate(
            &mut frontend,
            features,
            isola_device_common::offered_protocol_features()
                & !VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        );
        use vhost::VhostBackend;
        frontend
            .set_mem_table(&[ram.region()])
            .expect("SET_MEM_TABLE");
        let rx = SplitQueue::new(0, QSIZE, GuestAddress(0));
        let tx = SplitQueue::new(1, QSIZE, GuestAddress(0x1_0000));
        testing::start_queue(&mut frontend, &rx, &ram, 0);
        testing::start_queue(&mut frontend, &tx, &ram, 0);
        Guest {
            ram,
            frontend,
            rx,
            tx,
            acked,
            rx_posted: 0,
            rx_seen: 0,
            tx_sent: 0,
            tx_buf: 0,
        }
    }

    /// Posts `n` receive buffers of `size` bytes each.
    pub fn post_rx(&mut self, n: u16, size: u32) {
        let mem = self.ram.memory();
        for _ in 0..n {
            let slot = u64::from(self.rx_posted % QSIZE);
            let head = self
                .rx
                .add(mem, &[(GuestAddress(RX_BUFS + slot * RX_SLOT), size, true)]);
            self.rx.publish(mem, head);
            self.rx_posted = self.rx_posted.wrapping_add(1);
        }
        self.rx.kick();
    }

    /// Waits for the next received buffer: (vnet header, frame bytes in that buffer).
    pub fn recv(&mut self, timeout: Duration) -> Option<(Vec<u8>, Vec<u8>)> {
        let mem = self.ram.memory();
        let deadline = Instant::now() + timeout;
        while self.rx.used_idx(mem) == self.rx_seen {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let (head, len) = self.rx.used_elem(mem, self.rx_seen);
        self.rx_seen = self.rx_seen.wrapping_add(1);
        // Every receive chain here is one descriptor: its address is the buffer's.
        let addr: u64 = mem
            .read_obj(
                self.rx
                    .desc
                    .unchecked_add(16 * u64::from(head % u32::from(QSIZE))),
            )
            .unwrap();
        let mut buf = vec![0u8; len as usize];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        let frame = buf.split_off(HDR.min(buf.len()));
        Some((buf, frame))
    }

    /// Sends one frame with header `hdr`; returns once the device has used it.
    pub fn send(&mut self, hdr: [u8; HDR], frame: &[u8]) {
        let mem = self.ram.memory();
        let slot = u64::from(self.tx_buf % 64);
        self.tx_buf = self.tx_buf.wrapping_add(1);
        let addr = TX_BUFS + slot * 0x1_1000;
        mem.write_slice(&hdr, GuestAddress(addr)).unwrap();
        mem.write_slice(frame, GuestAddress(addr + HDR as u64))
            .unwrap();
        let head = self.tx.add(
            mem,
            &[
                (GuestAddress(addr), HDR as u32, false),
                (GuestAddress(addr + HDR as u64), frame.len() as u32, false),
            ],
        );
        self.send_head(head);
    }

    /// Publishes `head` on the transmit queue, kicks, waits until it is used.
    pub fn send_head(&mut self, head: u16) {
        let mem = self.ram.memory();
        self.tx.publish(mem, head);
        self.tx.kick();
        self.tx_sent = self.tx_sent.wrapping_add(1);
        assert!(
            self.tx.wait_used(mem, self.tx_sent, TIMEOUT),
            "transmit chain {head} never used"
        );
    }
}

/// Internet checksum of `data` with an initial sum.
pub fn csum(mut sum: u32, data: &[u8]) -> u16 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sum of the IPv4 pseudo-header (not folded, not inverted).
pub fn pseudo_sum(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    let w = |b: [u8; 4]| {
        u32::from(u16::from_be_bytes([b[0], b[1]])) + u32::from(u16::from_be_bytes([b[2], b[3]]))
    };
    w(src) + w(dst) + u32::from(proto) + len as u32
}

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(1514);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An IPv4 header (20 bytes, checksum filled in) for `payload_len` bytes of `proto`.
pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload_len: usize, id: u16) -> Vec<u8> {
    let total = (20 + payload_len) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&[0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = csum(0, &h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// A complete UDP/IPv4 frame from the guest to the host, checksums filled in.
pub fn udp_frame(sport: u16, dport: u16, payload: &[u8], id: u16) -> Vec<u8> {
    let mut f = eth(HOST_MAC, GUEST_MAC, 0x0800);
    f.extend(ipv4(GUEST_IP, HOST_IP, 17, 8 + payload.len(), id));
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let c = csum(pseudo_sum(GUEST_IP, HOST_IP, 17, u.len()), &u);
    u[6..8].copy_from_slice(&c.to_be_bytes());
    f.extend(u);
    f
}

/// A vnet header: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
pub fn vnet(
    flags: u8,
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    start: u16,
    offset: u16,
) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[0] = flags;
    h[1] = gso_type;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&start.to_le_bytes());
    h[8..10].copy_from_slice(&offset.to_le_bytes());
    h
}

pub fn bit(n: u32) -> u64 {
    1 << n
}

/// A UDP socket in this thread's namespace on the host side of the tap.
pub fn host_udp(port: u16) -> std::net::UdpSocket {
    let s = std::net::UdpSocket::bind(("10.0.0.1", port)).expect("bind on the tap's address");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Takes ownership of an fd number the test opened itself.
pub fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller passes an fd it opened and owns nothing else of.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
