//! Helpers for the network tests: a private network namespace per test, taps in it, and
//! `isola-net` started the way a launcher starts it (with a tap fd it opened).
//!
//! A test calls [`in_netns`]: its body runs on a thread that has unshared its network
//! namespace, so taps, addresses and sockets it creates, and every process it starts, live
//! in that namespace only, which disappears with them. Tests run as root.

use std::fs::File;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The guest's MAC (isola-net's default) and the host side of the tap.
pub const GUEST_MAC: &str = "02:00:00:00:00:01";
pub const HOST_IP: &str = "10.0.0.1";
pub const GUEST_IP: &str = "10.0.0.2";

/// Runs `f` on a thread in a network namespace of its own.
pub fn in_netns<F: FnOnce() + Send + 'static>(f: F) {
    let handle = std::thread::spawn(move || {
        // SAFETY: unshare takes a flag word and touches no memory of ours.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {} (tests run as root)",
            std::io::Error::last_os_error()
        );
        ip(&["link", "set", "lo", "up"]);
        f();
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Runs `ip ARGS` in this thread's namespace; panics if it fails.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A persistent tap `name` with the virtio-net header, up at 10.0.0.1/24, IPv6 off (no
/// router solicitations on the test's wire). The guest's address is left to ARP.
pub fn make_tap(name: &str) {
    ip(&["tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"]);
    std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1")
        .expect("IPv6 can be disabled on the tap");
    ip(&["addr", "add", "10.0.0.1/24", "dev", name]);
    ip(&["link", "set", name, "up"]);
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens a queue of tap `name` as the launcher does: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`.
///
/// A single-queue tap is busy while another process holds it open. A killed isola-net is two
/// processes (the sandbox's reaper and the device it traces), and the device's descriptors
/// close a moment after the reaper is reaped, so EBUSY is retried for a while.
pub fn open_tap(name: &str) -> OwnedFd {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("/dev/net/tun opens");
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one ifreq, `req`, alive for the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        let err = std::io::Error::last_os_error();
        if rc == 0 {
            return OwnedFd::from(file);
        }
        assert!(
            err.raw_os_error() == Some(libc::EBUSY) && std::time::Instant::now() < deadline,
            "TUNSETIFF: {err}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// An `isola-net` process serving a tap fd handed to it as fd 3; killed on drop.
pub struct IsolaNet {
    child: Child,
    pub log: PathBuf,
}

impl IsolaNet {
    /// Starts `isola-net --socket SOCKET --tap-fd 3 ARGS` with `tap` as its fd 3 and waits
    /// for the socket.
    pub fn start(socket: &Path, tap: OwnedFd, log: PathBuf, args: &[&str]) -> IsolaNet {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new(crate::binary("isola-net"));
        cmd.arg("--socket")
            .arg(socket)
            .args(["--tap-fd", "3"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file"));
        let fd: RawFd = tap.as_raw_fd();
        // SAFETY: runs in the child between fork and exec; only calls fcntl and dup2 (both
        // async-signal-safe, no allocation) on `fd`, open in the parent until spawn returns.
        // The copy above 100 first means dup2 never clobbers the source even if it is 3.
        unsafe {
            cmd.pre_exec(move || {
                let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                if high < 0 || libc::dup2(high, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("isola-net starts");
        drop(tap);
        crate::wait_for_path(socket, Duration::from_secs(20));
        IsolaNet { child, log }
    }

    /// The pid it was started as (with the sandbox: the reaper's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for IsolaNet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A UDP socket on the host side of the tap, with a receive buffer of `rcvbuf` bytes (forced,
/// as root) and a read timeout.
pub fn host_udp(port: u16, rcvbuf: usize) -> UdpSocket {
    let s = UdpSocket::bind((HOST_IP, port)).expect("bind on the tap's address");
    let size = libc::c_int::try_from(rcvbuf).expect("buffer size fits an int");
    // SAFETY: setsockopt reads one int from `size`, alive for the call.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// The guest's stream payload for sequence number `seq`: `seq` big endian, then
/// `(seq + i) & 0xff` for byte `i`.
pub fn stream_payload(seq: u32, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[..4].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in p.iter_mut().enumerate().skip(4) {
        *b = (seq as usize + i) as u8;
    }
    p
}

/// A command to the guest's control port: two big-endian u32s.
pub fn command(socket: &UdpSocket, cmd: u32, arg: u32) {
    let mut m = cmd.to_be_bytes().to_vec();
    m.extend_from_slice(&arg.to_be_bytes());
    socket
        .send_to(&m, (GUEST_IP, 6001))
        .expect("command is sent");
}

pub const CMD_START: u32 = 1;
pub const CMD_CREDIT: u32 = 2;
pub const CMD_BYE: u32 = 3;

fn icmp_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `count` ICMP echo requests to `dst` (a raw socket; this resolves the guest's MAC by
/// ARP first); returns how many matching replies came back, each within `wait`.
pub fn ping(dst: Ipv4Addr, count: u16, wait: Duration) -> u16 {
    // SAFETY: plain socket(2) call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let sock: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    let id = (std::process::id() & 0xffff) as u16;
    let mut replies = 0;
    for seq in 0..count {
        let mut msg = vec![8u8, 0, 0, 0];
        msg.extend_from_slice(&id.to_be_bytes());
        msg.extend_from_slice(&seq.to_be_bytes());
        msg.extend_from_slice(b"isola ping payload");
        let c = icmp_checksum(&msg);
        msg[2..4].copy_from_slice(&c.to_be_bytes());
        // SAFETY: sendto reads `msg` and `addr`, both alive for the call, with their lengths.
        let sent = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert_eq!(
            sent,
            msg.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            let mut buf = [0u8; 1500];
            // SAFETY: recv writes at most buf.len() bytes into `buf`; MSG_DONTWAIT.
            let n = unsafe {
                libc::recv(
                    sock.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let n = n as usize;
            let ihl = usize::from(buf[0] & 0xf) * 4;
            let icmp = &buf[ihl..n];
            if icmp.len() >= 8
                && icmp[0] == 0
                && icmp[4..6] == id.to_be_bytes()
                && icmp[6..8] == seq.to_be_bytes()
                && icmp_checksum(icmp) == 0
                && icmp[8..] == msg[8..]
            {
                replies += 1;
                break;
            }
        }
    }
    replies
}

/// Echoes `n` datagrams through the guest's UDP echo port; frames lost on the wire are
/// retried, as an application on a real network would. Returns how many needed a retry.
pub fn echo(socket: &UdpSocket, n: u32) -> u32 {
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut retries = 0;
    for i in 0..n {
        let msg = format!("echo {i}");
        let mut sends = 0;
        'attempt: loop {
            sends += 1;
            assert!(sends <= 50, "no echo for {msg:?}");
            socket.send_to(msg.as_bytes(), (GUEST_IP, 7)).unwrap();
            let mut buf = [0u8; 64];
            // Late echoes of earlier datagrams (sent before a kill) are skipped.
            while let Ok((len, _)) = socket.recv_from(&mut buf) {
                if &buf[..len] == msg.as_bytes() {
                    break 'attempt;
                }
            }
            retries += 1;
        }
    }
    retries
}

/// What [`GuestStream`] saw of the guest's sequence-numbered stream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StreamCount {
    /// Datagrams received in order, each once (the next expected sequence number).
    pub next: u32,
    /// Datagrams that came again (a sequence number below `next`).
    pub repeated: u32,
    /// Sequence numbers skipped: datagrams lost.
    pub lost: u32,
    /// Datagrams of the wrong size, sender or contents.
    pub corrupt: u32,
}

/// The guest's UDP stream (`START` with an endless count), received and checked on a thread
/// while the test does something else: it grants credit `window` datagrams ahead of what
/// arrived, and grants it again every 20 ms while nothing arrives (a credit command is a frame
/// to the guest, which may be lost like any other).
pub struct GuestStream {
    count: std::sync::Arc<std::sync::Mutex<StreamCount>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GuestStream {
    pub fn start(port: u16, payload: usize, window: u32) -> GuestStream {
        let socket = host_udp(port, 4 << 20);
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("a read timeout");
        command(&socket, CMD_START, u32::MAX);
        let count = std::sync::Arc::new(std::sync::Mutex::new(StreamCount::default()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (rx, c, s) = (
            socket.try_clone().expect("a second handle"),
            count.clone(),
            stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut granted = (0u32, Instant::now() - Duration::from_secs(1));
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok((n, from)) = rx.recv_from(&mut buf) {
                    let ours = n == payload && from.to_string() == format!("{GUEST_IP}:6001");
                    let seq = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                    let mut c = c.lock().expect("not poisoned");
                    if !ours || buf[..n] != stream_payload(seq, payload) {
                        c.corrupt += 1;
                    } else if seq < c.next {
                        c.repeated += 1;
                    } else {
                        c.lost += seq - c.next;
                        c.next = seq + 1;
                    }
                }
                let next = c.lock().expect("not poisoned").next;
                let low = granted.0.saturating_sub(window * 3 / 4);
                if next >= low || granted.1.elapsed() >= Duration::from_millis(20) {
                    command(&rx, CMD_CREDIT, next.saturating_add(window));
                    granted = (next.saturating_add(window), Instant::now());
                }
            }
        });
        GuestStream {
            count,
            stop,
            thread: Some(thread),
        }
    }

    pub fn count(&self) -> StreamCount {
        *self.count.lock().expect("not poisoned")
    }

    /// Waits until the stream has gone past `after` (at most `timeout`); returns where it is.
    pub fn wait_past(&self, after: u32, timeout: Duration) -> Option<u32> {
        let deadline = Instant::now() + timeout;
        loop {
            let next = self.count().next;
            if next > after {
                return Some(next);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops receiving (the guest's stream stops for want of credit); the final count.
    pub fn stop(mut self) -> StreamCount {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("the receiving thread");
        }
        self.count()
    }
}
