//! A hung backend on cue: [`StopAt`] sits between the core and a real device process,
//! forwards every vhost-user message both ways unchanged (bytes and fds), and when the core
//! sends the chosen request for the n-th time it SIGSTOPs the device process (with every
//! process under it: a sandboxed device runs as its reaper's child) before forwarding it. So
//! the backend is stopped at an exact step of the protocol, as a hung device process would be.
//!
//! Also: bounded control requests ([`control_within`]) and signal helpers.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// vhost-user request codes (frontend to backend) the tests stop at.
pub mod code {
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const GET_VRING_BASE: u32 = 11;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
}

/// The proxy. Dropping it stops accepting; relays end with their connections.
pub struct StopAt {
    pub socket: PathBuf,
    pid: Arc<AtomicU32>,
    fired: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

struct Trigger {
    code: u32,
    nth: u32,
    seen: AtomicU32,
    pid: Arc<AtomicU32>,
    fired: Arc<AtomicBool>,
}

impl StopAt {
    /// Listens on `socket`; every connection is relayed to `backend`. When the core sends
    /// request `code` for the `nth` time (counted over all connections), the process `pid`
    /// (see [`StopAt::set_pid`]) and its descendants are SIGSTOPped first.
    pub fn start(socket: &Path, backend: &Path, pid: u32, code: u32, nth: u32) -> StopAt {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).expect("proxy socket");
        listener.set_nonblocking(true).expect("non-blocking");
        let pid = Arc::new(AtomicU32::new(pid));
        let fired = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let trigger = Arc::new(Trigger {
            code,
            nth,
            seen: AtomicU32::new(0),
            pid: Arc::clone(&pid),
            fired: Arc::clone(&fired),
        });
        let backend = backend.to_owned();
        let stopping = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((core, _)) => {
                        let _ = core.set_nonblocking(false);
                        let trigger = Arc::clone(&trigger);
                        let backend = backend.clone();
                        std::thread::spawn(move || relay(core, &backend, &trigger));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        StopAt {
            socket: socket.to_owned(),
            pid,
            fired,
            stop,
        }
    }

    /// The device process to stop from now on (after a restart).
    pub fn set_pid(&self, pid: u32) {
        self.pid.store(pid, Ordering::SeqCst);
    }

    /// Waits until the backend was stopped; panics after `timeout`.
    pub fn wait_stopped(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.fired.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "the core never sent the request to stop at"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for StopAt {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// `pid` and every process below it.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        if let Ok(children) = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")) {
            all.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    all
}

/// Sends `signal` to `pid` and every process below it, parents first. A sandboxed device is
/// the ptrace tracee of its reaper, which resumes a tracee's stop on its own: stopped first,
/// the reaper cannot, and the device then stays in its signal-delivery stop. On SIGCONT the
/// reaper, continued first, lets the device run again.
pub fn signal_tree(pid: u32, signal: libc::c_int) {
    for p in process_tree(pid) {
        // SAFETY: kill takes plain integers; a pid that is gone only makes it fail.
        unsafe { libc::kill(p as libc::pid_t, signal) };
    }
}

fn relay(core: UnixStream, backend: &Path, trigger: &Trigger) {
    let Ok(device) = UnixStream::connect(backend) else {
        return;
    };
    let (core2, device2) = match (core.try_clone(), device.try_clone()) {
        (Ok(c), Ok(d)) => (c, d),
        _ => return,
    };
    let back = std::thread::spawn(move || {
        pump(&device2, &core2, None);
        let _ = core2.shutdown(std::net::Shutdown::Both);
        let _ = device2.shutdown(std::net::Shutdown::Both);
    });
    pump(&core, &device, Some(trigger));
    let _ = core.shutdown(std::net::Shutdown::Both);
    let _ = device.shutdown(std::net::Shutdown::Both);
    let _ = back.join();
}

/// Copies bytes and fds from `from` to `to` until either side ends. With a trigger, the
/// stream is parsed into vhost-user messages (12-byte header: request, flags, size) and the
/// trigger checked before a chunk holding a header is forwarded.
fn pump(from: &UnixStream, to: &UnixStream, trigger: Option<&Trigger>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut header: Vec<u8> = Vec::new();
    let mut skip: usize = 0;
    loop {
        let mut space = nix::cmsg_space!([RawFd; 16]);
        let (n, fds) = {
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<()>(
                from.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => msg,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return,
            };
            let mut fds: Vec<OwnedFd> = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: SCM_RIGHTS fds were just installed in this process for us.
                        fds.extend(raw.into_iter().map(|fd| unsafe {
                            <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
                        }));
                    }
                }
            }
            (msg.bytes, fds)
        };
        if n == 0 {
            return;
        }
        if let Some(t) = trigger {
            for &byte in &buf[..n] {
                if skip > 0 {
                    skip -= 1;
                    continue;
                }
                header.push(byte);
                if header.len() == 12 {
                    let word = |i: usize| {
                        u32::from_le_bytes(header[i..i + 4].try_into().expect("4 bytes"))
                    };
                    let (request, size) = (word(0), word(8));
                    header.clear();
                    skip = size as usize;
                    if request == t.code && t.seen.fetch_add(1, Ordering::SeqCst) + 1 == t.nth {
                        signal_tree(t.pid.load(Ordering::SeqCst), libc::SIGSTOP);
                        t.fired.store(true, Ordering::SeqCst);
                    }
                }
            }
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
        let mut sent = 0;
        while sent < n {
            let iov = [std::io::IoSlice::new(&buf[sent..n])];
            let with = if sent == 0 { cmsgs } else { &[] };
            match sendmsg::<()>(to.as_raw_fd(), &iov, with, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(k) => sent += k,
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return,
            }
        }
    }
}

/// One control request with every step bounded by `timeout`: the answer, or why there was
/// none in time.
pub fn control_within(
    socket: &Path,
    request: &isola_ipc::ControlRequest,
    timeout: Duration,
) -> Result<isola_ipc::ControlResponse, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("timeouts: {e}"))?;
    isola_ipc::write_message(&mut stream, request).map_err(|e| format!("send: {e}"))?;
    isola_ipc::read_message(&mut stream).map_err(|e| format!("no answer within {timeout:?}: {e}"))
}

/// Asks for status, pause and resume, each of which must be answered within `limit`; returns
/// the first device's status. This proves the control thread and every vCPU thread are free
/// (pause needs each vCPU to acknowledge).
pub fn control_answers(socket: &Path, limit: Duration) -> isola_ipc::DeviceStatus {
    use isola_ipc::{ControlRequest, ControlResponse};
    let t0 = Instant::now();
    let status = control_within(socket, &ControlRequest::Status, limit)
        .unwrap_or_else(|e| panic!("status: {e}"));
    assert!(t0.elapsed() < limit, "status took {:?}", t0.elapsed());
    let ControlResponse::Status(status) = status else {
        panic!("status answered {status:?}");
    };
    for request in [ControlRequest::Pause, ControlRequest::Resume] {
        let t0 = Instant::now();
        let answer =
            control_within(socket, &request, limit).unwrap_or_else(|e| panic!("{request:?}: {e}"));
        assert_eq!(answer, ControlResponse::Done, "{request:?}");
        assert!(t0.elapsed() < limit, "{request:?} took {:?}", t0.elapsed());
    }
    status.devices.into_iter().next().expect("one device")
}
