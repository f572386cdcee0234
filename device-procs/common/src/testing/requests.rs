//! Every vhost-user request code, sent to a real device process after negotiation, by a
//! frontend written here from the protocol text (raw messages, not the `vhost` crate's
//! `Frontend`, which refuses to send most of them). Each request must get a reply or a
//! closed connection, and the process must then serve the next frontend. Test code: failures
//! panic.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{raw_message, GuestRam};

/// Header flags: version 1.
const V1: u32 = 0x1;
/// Version 1 and NEED_REPLY, so that every request the backend accepts answers (once
/// REPLY_ACK is negotiated).
const V1_NEED_REPLY: u32 = V1 | 0x8;
/// The request codes the `vhost` crate defines are 1..=44 (FrontendReq); 0 and a few past the
/// end are sent too, as codes nobody defines.
pub const CODES: std::ops::RangeInclusive<u32> = 0..=48;
/// How long one request may take to be answered or refused.
const ANSWER: Duration = Duration::from_secs(5);
const RAM: u64 = 1 << 20;

/// What rides along with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    Nothing,
    /// One end of a Unix stream socket pair (GPU_SET_SOCKET's kind of fd).
    Socket,
    /// A sealed memfd (SET_MEM_TABLE's, SET_INFLIGHT_FD's kind).
    Memfd,
    /// An eventfd (the ring kick/call kind).
    Eventfd,
}

/// One request's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Answered,
    Closed,
}

fn recv_exact(stream: &mut UnixStream, buf: &mut [u8]) -> std::io::Result<()> {
    stream.read_exact(buf)
}

/// Sends a request with NEED_REPLY and reads the reply's u64 payload (or nothing).
fn call(stream: &mut UnixStream, code: u32, payload: &[u8], fds: &[RawFd]) -> Option<u64> {
    raw_message(stream, code, V1_NEED_REPLY, payload, fds);
    let mut header = [0u8; 12];
    recv_exact(stream, &mut header).ok()?;
    let size = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
    let mut body = vec![0u8; size];
    recv_exact(stream, &mut body).ok()?;
    Some(match size {
        8.. => u64::from_le_bytes(body[..8].try_into().expect("8 bytes")),
        _ => 0,
    })
}

/// SET_OWNER, features (every one offered), protocol features (every one offered), and `ram`
/// as the memory table: the state a frontend is in once it may start rings.
fn negotiated(socket: &Path, ram: &GuestRam) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => panic!("connect {}: {e}", socket.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    stream.set_read_timeout(Some(ANSWER)).expect("read timeout");
    let step = |s: &mut UnixStream, code, payload: &[u8], fds: &[RawFd], what| {
        call(s, code, payload, fds).unwrap_or_else(|| panic!("negotiation: {what} not answered"))
    };
    // Until REPLY_ACK is acknowledged, requests without a reply of their own get none.
    raw_message(&stream, 3, V1, &[], &[]);
    let features = step(&mut stream, 1, &[], &[], "GET_FEATURES");
    let protocol = step(&mut stream, 15, &[], &[], "GET_PROTOCOL_FEATURES");
    raw_message(&stream, 16, V1, &protocol.to_le_bytes(), &[]);
    step(&mut stream, 2, &features.to_le_bytes(), &[], "SET_FEATURES");
    let region = ram.region();
    let mut table = Vec::new();
    table.extend_from_slice(&1u32.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    for v in [
        region.guest_phys_addr,
        region.memory_size,
        region.userspace_addr,
        region.mmap_offset,
    ] {
        table.extend_from_slice(&v.to_le_bytes());
    }
    step(
        &mut stream,
        5,
        &table,
        &[ram.file().as_raw_fd()],
        "SET_MEM_TABLE",
    );
    stream
}

/// Sends request `code` with `payload` and `attached` on a negotiated connection; waits for a
/// reply or the connection's end. Panics if neither comes within the deadline.
pub fn send_one(
    socket: &Path,
    ram: &GuestRam,
    code: u32,
    payload: &[u8],
    attached: Attached,
) -> Outcome {
    let mut stream = negotiated(socket, ram);
    let (socket_end, _other_end) = UnixStream::pair().expect("socketpair");
    let eventfd = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
    let fds: Vec<RawFd> = match attached {
        Attached::Nothing => Vec::new(),
        Attached::Socket => vec![socket_end.as_raw_fd()],
        Attached::Memfd => vec![ram.file().as_raw_fd()],
        Attached::Eventfd => vec![eventfd.as_raw_fd()],
    };
    raw_message(&stream, code, V1_NEED_REPLY, payload, &fds);
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let outcome = match stream.read(&mut buf) {
        Ok(0) => Outcome::Closed,
        Ok(_) => Outcome::Answered,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Outcome::Closed,
        Err(e) => panic!(
            "request {code} ({} payload bytes, {attached:?}): neither answered nor refused \
             after {:?}: {e}",
            payload.len(),
            started.elapsed()
        ),
    };
    let _ = stream.flush();
    outcome
}

/// Every code of [`CODES`], with payloads of 0, 8 and 24 zero bytes and 40 bytes of 0xff, each
/// with nothing, a socket, a memfd and an eventfd attached, on a fresh negotiated
/// connection each. After each, `alive` must hold (the process did not die); at the end a
/// fresh frontend is negotiated. Returns how many requests were answered and how many closed.
pub fn every_request_after_negotiation(socket: &Path, alive: &dyn Fn() -> bool) -> (usize, usize) {
    let ram = GuestRam::new(RAM);
    let payloads: [Vec<u8>; 4] = [Vec::new(), vec![0; 8], vec![0; 24], vec![0xff; 40]];
    let mut counts = (0, 0);
    for code in CODES {
        for payload in &payloads {
            for attached in [
                Attached::Nothing,
                Attached::Socket,
                Attached::Memfd,
                Attached::Eventfd,
            ] {
                match send_one(socket, &ram, code, payload, attached) {
                    Outcome::Answered => counts.0 += 1,
                    Outcome::Closed => counts.1 += 1,
                }
                assert!(
                    alive(),
                    "the device died after request {code} ({} payload bytes, {attached:?})",
                    payload.len()
                );
            }
        }
    }
    // The next frontend is served as if nothing happened.
    drop(negotiated(socket, &ram));
    counts
}

/// Runs `device` (a command for a device process that serves `socket` and logs "sandboxed"
/// at info level once its sandbox is in place), sends it [`every_request_after_negotiation`]
/// and asserts that it still runs and nothing was killed. `dir` holds its stderr log.
pub fn assert_the_device_serves_on_after_every_request(
    mut device: std::process::Command,
    socket: &Path,
    dir: &super::Scratch,
) {
    let log = dir.path("stderr");
    let mut child = device
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("create the device's log"))
        .spawn()
        .expect("start the device");
    super::process::wait_log(&log, "sandboxed");
    let pid = child.id();
    let (answered, closed) =
        every_request_after_negotiation(socket, &|| !super::process::gone(pid));
    println!("{device:?}: {answered} requests answered, {closed} refused by closing");
    let text = std::fs::read_to_string(&log).expect("read the device's log");
    let running = child.try_wait().expect("poll the device").is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(running, "{text}");
    assert!(!text.contains("killed by"), "{text}");
}
