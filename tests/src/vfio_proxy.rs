//! A vfio-user proxy for tests: sits between Isola's frontend and a real server (the
//! `vfio_user` crate's, in `vfio-user-testdev`), forwards every message with its fds, and can
//!
//! - spoil one reply ([`Fault`]): the `nth` reply to a command gets a wrong message id, a huge
//!   size, is cut short, is replaced by a refusal, or never comes (the proxy hangs);
//! - offer doorbell ioeventfds ([`Options::doorbell`]): it answers GET_REGION_IO_FDS itself
//!   (the crate's server does not implement it), for region 0 with one eventfd per value in
//!   [`DOORBELL_VALUES`], each for a 4-byte write of that value at [`DOORBELL_OFFSET`]
//!   (datamatch), and turns each signal of one into the REGION_WRITE the device model expects;
//! - offer bogus ioeventfds ([`Options::bogus`]): one past the end of region 0, one whose
//!   datamatch does not fit its size, and one over MSI-X entry 0's data in region 2 (the table
//!   the core serves itself); a signal of any is counted in [`Counters::bogus_rung`].
//!
//! The server answers in order, so replies are matched to requests by a queue, not by id.

use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

pub const DOORBELL_OFFSET: u64 = 0x14;
/// The doorbell values the guest writes (`vfio-user.c`: 0x30 + attempt % 16).
pub const DOORBELL_VALUES: std::ops::Range<u32> = 0x30..0x40;
const REGION_WRITE: u16 = 10;
const GET_REGION_IO_FDS: u16 = 6;
const HEADER: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    WrongId,
    HugeSize,
    Short,
    Refuse,
    Hang,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// (command, n, fault): spoil the n-th reply (from 1) to `command`, once.
    pub fault: Option<(u16, u32, Fault)>,
    pub doorbell: bool,
    pub bogus: bool,
}

/// What the proxy saw, for the test's assertions.
#[derive(Default)]
pub struct Counters {
    pub connections: AtomicU32,
    pub faults: AtomicU32,
    /// Doorbells that came through the eventfd.
    pub rung: AtomicU32,
    /// Doorbell writes that came as REGION_WRITE messages instead.
    pub forwarded_doorbells: AtomicU32,
    /// Doorbells that came through the eventfd on the second or a later connection (after
    /// the core reconnected).
    pub rung_after_reconnect: AtomicU32,
    /// Signals of the bogus eventfds.
    pub bogus_rung: AtomicU32,
    seen: AtomicU32,
}

pub struct Proxy {
    pub socket: PathBuf,
    pub counters: Arc<Counters>,
}

/// Starts the proxy on `socket`, in front of the server listening on `upstream`.
pub fn start(socket: &Path, upstream: &Path, options: Options) -> Proxy {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).expect("proxy socket binds");
    let counters = Arc::new(Counters::default());
    let (upstream, shared) = (upstream.to_owned(), Arc::clone(&counters));
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = UnixStream::connect(&upstream) else {
                continue;
            };
            let number = shared.connections.fetch_add(1, Ordering::Relaxed) + 1;
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || Connection::run(client, server, options, shared, number));
        }
    });
    Proxy {
        socket: socket.to_owned(),
        counters,
    }
}

struct Message {
    head: [u8; HEADER],
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn id(&self) -> u16 {
        u16::from_le_bytes([self.head[0], self.head[1]])
    }
    fn command(&self) -> u16 {
        u16::from_le_bytes([self.head[2], self.head[3]])
    }
}

fn recv_exact(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Option<()> {
    let mut done = 0;
    while done < buf.len() {
        let mut space = nix::cmsg_space!([RawFd; 32]);
        let mut iov = [IoSliceMut::new(&mut buf[done..])];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .ok()?;
        for cmsg in msg.cmsgs().ok()? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: just received with SCM_RIGHTS: open and owned by nobody else.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if msg.bytes == 0 {
            return None;
        }
        done += msg.bytes;
    }
    Some(())
}

fn recv(stream: &UnixStream) -> Option<Message> {
    let mut head = [0u8; HEADER];
    let mut fds = Vec::new();
    recv_exact(stream, &mut head, &mut fds)?;
    let size = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
    let mut body = vec![0u8; size.checked_sub(HEADER)?.min(1 << 20)];
    recv_exact(stream, &mut body, &mut fds)?;
    Some(Message { head, body, fds })
}

fn send(stream: &UnixStream, parts: &[&[u8]], fds: &[RawFd]) -> Option<()> {
    let bytes: Vec<u8> = parts.concat();
    let iov = [IoSlice::new(&bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    let n = sendmsg::<()>(
        stream.as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .ok()?;
    (n == bytes.len()).then_some(())
}

#[derive(Clone, Copy, PartialEq)]
enum Origin {
    Client,
    Bridge,
}

struct Connection {
    client: UnixStream,
    server: Mutex<UnixStream>,
    outstanding: Mutex<VecDeque<(Origin, u16)>>,
    options: Options,
    counters: Arc<Counters>,
    closed: AtomicBool,
    /// 1 for the first connection, 2 for the next...
    number: u32,
}

fn header(id: u16, command: u16, size: usize, flags: u32, error: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..2].copy_from_slice(&id.to_le_bytes());
    h[2..4].copy_from_slice(&command.to_le_bytes());
    h[4..8].copy_from_slice(&(size as u32).to_le_bytes());
    h[8..12].copy_from_slice(&flags.to_le_bytes());
    h[12..16].copy_from_slice(&error.to_le_bytes());
    h
}

impl Connection {
    fn run(
        client: UnixStream,
        server: UnixStream,
        options: Options,
        counters: Arc<Counters>,
        number: u32,
    ) {
        let (Ok(client_r), Ok(server_r)) = (client.try_clone(), server.try_clone()) else {
            return;
        };
        let conn = Arc::new(Connection {
            client,
            server: Mutex::new(server),
            outstanding: Mutex::new(VecDeque::new()),
            options,
            counters,
            closed: AtomicBool::new(false),
            number,
        });
        // One eventfd per doorbell value, then (if asked) the bogus one.
        let mut efds: Vec<OwnedFd> = Vec::new();
        if options.doorbell {
            efds.extend(DOORBELL_VALUES.map(|_| eventfd()));
        }
        if options.bogus {
            efds.push(eventfd());
        }
        if !efds.is_empty() {
            let conn = Arc::clone(&conn);
            let dups: Vec<OwnedFd> = efds.iter().map(|e| e.try_clone().expect("dup")).collect();
            std::thread::spawn(move || conn.bridge(dups));
        }
        let replies = {
            let conn = Arc::clone(&conn);
            std::thread::spawn(move || conn.replies(server_r))
        };
        while let Some(m) = recv(&client_r) {
            if m.command() == GET_REGION_IO_FDS && !efds.is_empty() {
                conn.answer_io_fds(&m, &efds);
                continue;
            }
            if m.command() == REGION_WRITE && read_u64(&m.body, 0) == DOORBELL_OFFSET {
                conn.counters
                    .forwarded_doorbells
                    .fetch_add(1, Ordering::Relaxed);
            }
            let raw: Vec<RawFd> = m.fds.iter().map(|f| f.as_raw_fd()).collect();
            let server = conn.server.lock().expect("lock");
            conn.outstanding
                .lock()
                .expect("lock")
                .push_back((Origin::Client, m.id()));
            if send(&server, &[&m.head, &m.body], &raw).is_none() {
                break;
            }
        }
        conn.close();
        let _ = replies.join();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        let _ = self.client.shutdown(std::net::Shutdown::Both);
        let _ = self
            .server
            .lock()
            .expect("lock")
            .shutdown(std::net::Shutdown::Both);
    }

    fn replies(&self, server: UnixStream) {
        while let Some(m) = recv(&server) {
            let origin = self.outstanding.lock().expect("lock").pop_front();
            if matches!(origin, Some((Origin::Bridge, _))) {
                continue;
            }
            if let Some((command, nth, fault)) = self.options.fault {
                if m.command() == command
                    && self.counters.seen.fetch_add(1, Ordering::Relaxed) + 1 == nth
                {
                    self.counters.faults.fetch_add(1, Ordering::Relaxed);
                    if !self.spoil(&m, fault) {
                        break;
                    }
                    continue;
                }
            }
            let raw: Vec<RawFd> = m.fds.iter().map(|f| f.as_raw_fd()).collect();
            if send(&self.client, &[&m.head, &m.body], &raw).is_none() {
                break;
            }
        }
        self.close();
    }

    /// Sends the spoiled reply; false when the connection is to end.
    fn spoil(&self, m: &Message, fault: Fault) -> bool {
        let size = HEADER + m.body.len();
        let flags = u32::from_le_bytes([m.head[8], m.head[9], m.head[10], m.head[11]]);
        match fault {
            Fault::WrongId => {
                let h = header(m.id() ^ 0x5555, m.command(), size, flags, 0);
                send(&self.client, &[&h, &m.body], &[]).is_some()
            }
            Fault::HugeSize => {
                let h = header(m.id(), m.command(), u32::MAX as usize, flags, 0);
                send(&self.client, &[&h], &[]).is_some()
            }
            Fault::Short => {
                let _ = send(&self.client, &[&m.head[..8]], &[]);
                false
            }
            Fault::Refuse => {
                let h = header(m.id(), m.command(), HEADER, 1 | 1 << 5, 5);
                send(&self.client, &[&h], &[]).is_some()
            }
            Fault::Hang => {
                while !self.closed.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                false
            }
        }
    }

    /// Answers GET_REGION_IO_FDS: `efds` are the doorbell eventfds (one per value in
    /// [`DOORBELL_VALUES`], if asked for) followed by the bogus one (if asked for).
    fn answer_io_fds(&self, m: &Message, efds: &[OwnedFd]) {
        let region = read_u32(&m.body, 8);
        // (offset, size, fd index, datamatch)
        let mut entries: Vec<(u64, u64, usize, Option<u64>)> = Vec::new();
        let values = if self.options.doorbell {
            DOORBELL_VALUES.len()
        } else {
            0
        };
        if region == 0 {
            for (i, v) in DOORBELL_VALUES.take(values).enumerate() {
                entries.push((DOORBELL_OFFSET, 4, i, Some(u64::from(v))));
            }
        }
        if self.options.bogus {
            let bogus = values;
            match region {
                0 => {
                    entries.push((0x1000, 4, bogus, None));
                    entries.push((DOORBELL_OFFSET, 1, bogus, Some(0x1234)));
                }
                2 => entries.push((8, 4, bogus, None)),
                _ => {}
            }
        }
        // The fds are sent once each, in order of first use; entries name them by position.
        let mut sent: Vec<usize> = Vec::new();
        let mut body = Vec::new();
        let count = entries.len() as u32;
        for v in [16 + 40 * count, 0, region, count] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        for (offset, size, fd, datamatch) in entries {
            let index = sent.iter().position(|s| *s == fd).unwrap_or_else(|| {
                sent.push(fd);
                sent.len() - 1
            });
            body.extend_from_slice(&offset.to_le_bytes());
            body.extend_from_slice(&size.to_le_bytes());
            let flags = u32::from(datamatch.is_some());
            for v in [index as u32, 0, flags, 0] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            body.extend_from_slice(&datamatch.unwrap_or(0).to_le_bytes());
        }
        let fds: Vec<RawFd> = sent.iter().map(|i| efds[*i].as_raw_fd()).collect();
        let h = header(m.id(), m.command(), HEADER + body.len(), 1, 0);
        let _ = send(&self.client, &[&h, &body], &fds);
    }

    /// Turns each signal of a doorbell eventfd into the device's REGION_WRITE of its value;
    /// counts signals of the bogus one.
    fn bridge(&self, efds: Vec<OwnedFd>) {
        let mut id = 0x8000u16;
        let values = if self.options.doorbell {
            DOORBELL_VALUES.len()
        } else {
            0
        };
        while !self.closed.load(Ordering::Relaxed) {
            let mut pfds: Vec<libc::pollfd> = efds
                .iter()
                .map(|e| libc::pollfd {
                    fd: e.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: `pfds` is a valid array of its length; a 100 ms timeout.
            if unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100) } < 1 {
                continue;
            }
            for (i, p) in pfds.iter().enumerate() {
                if p.revents & libc::POLLIN == 0 {
                    continue;
                }
                let mut count = [0u8; 8];
                // SAFETY: reads 8 bytes into `count` from an eventfd this thread owns
                // (non-blocking, and poll said it is readable).
                if unsafe { libc::read(p.fd, count.as_mut_ptr().cast(), 8) } != 8 {
                    continue;
                }
                if i >= values {
                    self.counters.bogus_rung.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                self.counters.rung.fetch_add(1, Ordering::Relaxed);
                if self.number > 1 {
                    self.counters
                        .rung_after_reconnect
                        .fetch_add(1, Ordering::Relaxed);
                }
                let value = DOORBELL_VALUES.start + i as u32;
                let mut body = DOORBELL_OFFSET.to_le_bytes().to_vec();
                body.extend_from_slice(&0u32.to_le_bytes());
                body.extend_from_slice(&4u32.to_le_bytes());
                body.extend_from_slice(&value.to_le_bytes());
                let h = header(id, REGION_WRITE, HEADER + body.len(), 0, 0);
                let server = self.server.lock().expect("lock");
                self.outstanding
                    .lock()
                    .expect("lock")
                    .push_back((Origin::Bridge, id));
                id = id.wrapping_add(1);
                let _ = send(&server, &[&h, &body], &[]);
            }
        }
    }
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd with constant flags; a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd only this function owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn read_u32(body: &[u8], at: usize) -> u32 {
    body.get(at..at + 4)
        .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
}

fn read_u64(body: &[u8], at: usize) -> u64 {
    body.get(at..at + 8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}
