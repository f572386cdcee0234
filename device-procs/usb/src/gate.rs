//! The gate: every vfio-user message from a frontend is read whole, checked, and only then
//! handed to the `vfio_user` crate's server, over a private socket pair that the server
//! serves for the life of the process.
//!
//! Why: the crate's server trusts its peer. It computes a length as `message_size - 20`
//! without checking (a short VERSION is an overflow), unwraps the capability string,
//! allocates what a REGION_READ `count` says (up to 4 GiB), reads with no deadline, and
//! answers an unknown command without reading its payload (the stream is then out of
//! step). The gate removes each of those: sizes are checked against the command's layout
//! and [`MAX_MESSAGE`], the payload must arrive within [`MESSAGE_TIMEOUT`], fds are counted
//! per command (DMA_MAP exactly one, SET_IRQS as many as its count, others none), region
//! accesses must lie in their region, and commands the server does not implement are
//! answered here with ENOTSUP. A message the gate cannot frame (bad size or flags, fds
//! where none may be, a stall) closes the connection; one it can frame but not accept gets
//! an error reply and the connection goes on. Either way the next frontend is served.
//!
//! The server gets every message with NO_REPLY cleared, so each has exactly one reply; the
//! gate drops the reply the frontend did not ask for (an error reply is always passed on).

use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::vfio::{region_size, Device};

pub const HEADER: usize = 16;
/// Largest message accepted (a region access of [`MAX_ACCESS`] and its header).
pub const MAX_MESSAGE: usize = 8192;
/// Largest region read or write.
pub const MAX_ACCESS: u32 = 4096;
/// Once a message has begun, its rest must arrive within this.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(2);
/// The crate's server answers within this, or the process is broken.
const SERVER_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_FDS: usize = 16;

const FLAG_TYPE_MASK: u32 = 0xf;
const FLAG_REPLY: u32 = 1;
const FLAG_NO_REPLY: u32 = 1 << 4;
const FLAG_ERROR: u32 = 1 << 5;

/// vfio-user commands.
pub mod cmd {
    pub const VERSION: u16 = 1;
    pub const DMA_MAP: u16 = 2;
    pub const DMA_UNMAP: u16 = 3;
    pub const DEVICE_GET_INFO: u16 = 4;
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    pub const GET_IRQ_INFO: u16 = 7;
    pub const SET_IRQS: u16 = 8;
    pub const REGION_READ: u16 = 9;
    pub const REGION_WRITE: u16 = 10;
    pub const DEVICE_RESET: u16 = 13;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub command: u16,
    pub size: u32,
    pub flags: u32,
    pub error: u32,
}

impl Header {
    pub fn parse(b: &[u8; HEADER]) -> Header {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            id: u16::from_le_bytes([b[0], b[1]]),
            command: u16::from_le_bytes([b[2], b[3]]),
            size: u32_at(4),
            flags: u32_at(8),
            error: u32_at(12),
        }
    }
    pub fn bytes(&self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..].copy_from_slice(&self.error.to_le_bytes());
        b
    }
    fn error_reply(&self, errno: i32) -> Header {
        Header {
            id: self.id,
            command: self.command,
            size: HEADER as u32,
            flags: FLAG_REPLY | FLAG_ERROR,
            error: errno as u32,
        }
    }
}

/// Why the gate closes a connection (it cannot tell where the next message starts, or the
/// peer broke a rule it cannot answer).
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("the frontend closed the connection")]
    Closed,
    #[error("message size {0} outside {HEADER}..={MAX_MESSAGE}")]
    Size(u32),
    #[error("message flags {0:#x}: not a command")]
    Flags(u32),
    #[error("the rest of a message did not arrive within {MESSAGE_TIMEOUT:?}")]
    Stalled,
    #[error("file descriptors sent with the body of a message")]
    StrayFds,
    #[error("ancillary data truncated (more than {MAX_FDS} fds?)")]
    Truncated,
    #[error("socket")]
    Io(#[source] std::io::Error),
    #[error("the device server's reply")]
    Server(#[source] std::io::Error),
}

/// A message as read from the frontend.
pub struct Message {
    pub header: Header,
    pub body: Vec<u8>,
    pub fds: Vec<File>,
}

/// Reads into `buf` with recvmsg, collecting fds; `Ok(0)` at end of stream.
fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], fds: &mut Vec<File>) -> Result<usize, GateError> {
    loop {
        match isola_ipc::fds::recv_with_fds(fd, buf, MAX_FDS) {
            Ok((n, received)) => {
                fds.extend(received.into_iter().map(File::from));
                return Ok(n);
            }
            // More than MAX_FDS: the kernel cut them or the helper refused them, closed.
            Err(e) if isola_ipc::fds::fds_refused(&e).is_some() => {
                return Err(GateError::Truncated)
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Err(GateError::Stalled),
                _ => return Err(GateError::Io(e)),
            },
        }
    }
}

/// Reads one message: waits as long as it takes for its first byte, then at most
/// [`MESSAGE_TIMEOUT`] for the rest.
pub fn read_message(stream: &mut UnixStream) -> Result<Message, GateError> {
    let fd = stream.as_fd();
    let mut head = [0u8; HEADER];
    let mut fds = Vec::new();
    stream.set_read_timeout(None).map_err(GateError::Io)?;
    let mut got = recv(fd, &mut head, &mut fds)?;
    if got == 0 {
        return Err(GateError::Closed);
    }
    stream
        .set_read_timeout(Some(MESSAGE_TIMEOUT))
        .map_err(GateError::Io)?;
    while got < HEADER {
        let mut more = Vec::new();
        let n = recv(fd, &mut head[got..], &mut more)?;
        if n == 0 {
            return Err(GateError::Closed);
        }
        if !more.is_empty() {
            return Err(GateError::StrayFds);
        }
        got += n;
    }
    let header = Header::parse(&head);
    let size = header.size as usize;
    if !(HEADER..=MAX_MESSAGE).contains(&size) {
        return Err(GateError::Size(header.size));
    }
    if header.flags & FLAG_TYPE_MASK != 0 || header.flags & !(FLAG_TYPE_MASK | FLAG_NO_REPLY) != 0 {
        return Err(GateError::Flags(header.flags));
    }
    let mut body = vec![0u8; size - HEADER];
    let mut at = 0;
    while at < body.len() {
        let mut more = Vec::new();
        let n = recv(fd, &mut body[at..], &mut more)?;
        if n == 0 {
            return Err(GateError::Closed);
        }
        if !more.is_empty() {
            return Err(GateError::StrayFds);
        }
        at += n;
    }
    Ok(Message { header, body, fds })
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    b.get(i..i + 4)
        .map_or(0, |w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from(u32_at(b, i)) | (u64::from(u32_at(b, i + 4)) << 32)
}

/// Checks a framed message against its command's layout: `Err(errno)` to answer it with.
pub fn check(m: &Message, versioned: bool) -> Result<(), i32> {
    use cmd::*;
    let body = m.body.len();
    let fds = m.fds.len();
    let exact = |want: usize, want_fds: usize| -> Result<(), i32> {
        if body == want && fds == want_fds {
            Ok(())
        } else {
            Err(libc::EINVAL)
        }
    };
    if !versioned && m.header.command != VERSION {
        return Err(libc::EINVAL);
    }
    match m.header.command {
        VERSION => {
            // major, minor, then a NUL-terminated JSON object.
            let json = m.body.get(4..).unwrap_or(&[]);
            let text = match json.split_last() {
                Some((0, text)) if !text.contains(&0) => text,
                _ => return Err(libc::EINVAL),
            };
            if versioned || fds != 0 || m.header.flags & FLAG_NO_REPLY != 0 {
                return Err(libc::EINVAL);
            }
            match serde_json::from_slice::<serde_json::Value>(text) {
                Ok(v) if v.is_object() => Ok(()),
                _ => Err(libc::EINVAL),
            }
        }
        DMA_MAP => exact(32, 1),
        DMA_UNMAP => exact(24, 0),
        DEVICE_GET_INFO => exact(16, 0),
        DEVICE_GET_REGION_INFO => {
            exact(32, 0)?;
            (u32_at(&m.body, 8) < vfio_bindings::bindings::vfio::VFIO_PCI_NUM_REGIONS)
                .then_some(())
                .ok_or(libc::EINVAL)
        }
        GET_IRQ_INFO => {
            exact(16, 0)?;
            (u32_at(&m.body, 8) < vfio_bindings::bindings::vfio::VFIO_PCI_NUM_IRQS)
                .then_some(())
                .ok_or(libc::EINVAL)
        }
        SET_IRQS => {
            let count = u32_at(&m.body, 16) as usize;
            let eventfds =
                u32_at(&m.body, 4) & vfio_bindings::bindings::vfio::VFIO_IRQ_SET_DATA_EVENTFD != 0;
            exact(20, if eventfds { count } else { 0 })?;
            (u32_at(&m.body, 8) < vfio_bindings::bindings::vfio::VFIO_PCI_NUM_IRQS)
                .then_some(())
                .ok_or(libc::EINVAL)
        }
        REGION_READ | REGION_WRITE => {
            let (offset, region, count) =
                (u64_at(&m.body, 0), u32_at(&m.body, 8), u32_at(&m.body, 12));
            let data = if m.header.command == REGION_WRITE {
                count as usize
            } else {
                0
            };
            exact(16 + data, 0)?;
            let inside = offset
                .checked_add(u64::from(count))
                .is_some_and(|e| e <= region_size(region));
            (count > 0 && count <= MAX_ACCESS && inside)
                .then_some(())
                .ok_or(libc::EINVAL)
        }
        DEVICE_RESET => exact(0, 0),
        _ => Err(libc::ENOTSUP),
    }
}

/// Sends `m` to the crate's server (NO_REPLY cleared) and reads its reply.
fn forward(server: &mut UnixStream, m: &Message) -> Result<Vec<u8>, GateError> {
    let mut header = m.header;
    header.flags &= !FLAG_NO_REPLY;
    let head = header.bytes();
    let iov = [IoSlice::new(&head), IoSlice::new(&m.body)];
    let fds: Vec<BorrowedFd<'_>> = m.fds.iter().map(|f| f.as_fd()).collect();
    let total = head.len() + m.body.len();
    let sent = isola_ipc::fds::send_vectored_with_fds(server.as_fd(), &iov, &fds)
        .map_err(GateError::Server)?;
    if sent < total {
        let rest: Vec<u8> = head.iter().chain(&m.body).copied().skip(sent).collect();
        server.write_all(&rest).map_err(GateError::Server)?;
    }
    let mut reply = vec![0u8; HEADER];
    server.read_exact(&mut reply).map_err(GateError::Server)?;
    let mut h = [0u8; HEADER];
    h.copy_from_slice(&reply);
    let size = Header::parse(&h).size as usize;
    if !(HEADER..=MAX_MESSAGE * 2).contains(&size) {
        return Err(GateError::Server(std::io::Error::other("bad reply size")));
    }
    reply.resize(size, 0);
    server
        .read_exact(&mut reply[HEADER..])
        .map_err(GateError::Server)?;
    Ok(reply)
}

/// Serves one frontend until it leaves or breaks a rule the gate cannot answer.
pub fn serve_frontend(frontend: &mut UnixStream, server: &mut UnixStream) -> GateError {
    let _ = frontend.set_write_timeout(Some(MESSAGE_TIMEOUT));
    let _ = server.set_read_timeout(Some(SERVER_TIMEOUT));
    let mut versioned = false;
    let mut limiter = isola_device_common::logging::RateLimiter::new(10);
    let ending = loop {
        let m = match read_message(frontend) {
            Ok(m) => m,
            Err(e) => break e,
        };
        let answer = match check(&m, versioned) {
            Err(errno) => {
                if limiter.allow().is_some() {
                    log::warn!(
                        "vfio-user: refusing command {} (size {}, {} fds): errno {errno}",
                        m.header.command,
                        m.header.size,
                        m.fds.len()
                    );
                }
                m.header.error_reply(errno).bytes().to_vec()
            }
            Ok(()) => match forward(server, &m) {
                Ok(mut reply) => {
                    let mut h = [0u8; HEADER];
                    h.copy_from_slice(&reply[..HEADER]);
                    let mut header = Header::parse(&h);
                    let error = header.flags & FLAG_ERROR != 0;
                    if error && header.error == 0 {
                        // The crate reports most failures without an errno.
                        header.error = libc::EINVAL as u32;
                        reply[..HEADER].copy_from_slice(&header.bytes());
                    }
                    if m.header.command == cmd::VERSION && !error {
                        versioned = true;
                    }
                    if m.header.flags & FLAG_NO_REPLY != 0 && !error {
                        continue;
                    }
                    reply
                }
                Err(e) => break e,
            },
        };
        if let Err(e) = frontend.write_all(&answer) {
            break GateError::Io(e);
        }
    };
    ending
}

/// Serves frontends from `listener` one at a time, for ever; `server` is the gate's end of
/// the socket pair the crate's server runs on.
pub fn serve(
    listener: &std::os::unix::net::UnixListener,
    mut server: UnixStream,
    device: &Arc<Mutex<Device>>,
) -> std::io::Result<()> {
    loop {
        let mut frontend = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ECONNABORTED)) => {
                continue
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)
                ) =>
            {
                log::warn!("cannot accept a frontend now: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => return Err(e),
        };
        log::info!("frontend connected");
        let ending = serve_frontend(&mut frontend, &mut server);
        match &ending {
            GateError::Closed => {
                log::info!("frontend disconnected; controller reset, waiting for the next")
            }
            GateError::Server(e) => {
                return Err(std::io::Error::other(format!(
                    "the vfio-user server does not answer: {e}"
                )));
            }
            e => log::warn!(
                "closing the frontend's connection: {}",
                isola_device_common::logging::chain(e)
            ),
        }
        drop(frontend);
        device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .disconnect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::{AsRawFd, FromRawFd, RawFd};

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 just returned both; each is owned once.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    /// A hostile sender, not bound by the fd helper's own send cap.
    fn send(s: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
        let iov = [IoSlice::new(bytes)];
        let cmsgs = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsgs };
        sendmsg::<()>(s.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).unwrap();
    }

    fn get_info(body: usize) -> Vec<u8> {
        let h = Header {
            id: 1,
            command: cmd::DEVICE_GET_INFO,
            size: (HEADER + body) as u32,
            flags: 0,
            error: 0,
        };
        let mut m = h.bytes().to_vec();
        m.resize(HEADER + body, 0);
        m
    }

    /// Fds with a message's first byte are its own; more than MAX_FDS, or any with the rest
    /// of it, end the connection, and every one received is closed.
    #[test]
    fn fds_arrive_with_a_message_and_too_many_or_stray_ones_are_closed() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let (mut read_end, write_end) = pipe();
        let w = write_end.as_raw_fd();
        send(&a, &get_info(16), &[w, w]);
        let m = read_message(&mut b).unwrap();
        assert_eq!(
            (m.header.command, m.body.len(), m.fds.len()),
            (cmd::DEVICE_GET_INFO, 16, 2)
        );
        drop(m);

        let (a, mut b) = UnixStream::pair().unwrap();
        send(&a, &get_info(16), &[w; MAX_FDS + 4]);
        assert!(matches!(read_message(&mut b), Err(GateError::Truncated)));

        let (a, mut b) = UnixStream::pair().unwrap();
        let m = get_info(16);
        send(&a, &m[..HEADER], &[]);
        send(&a, &m[HEADER..], &[w]);
        assert!(matches!(read_message(&mut b), Err(GateError::StrayFds)));

        // Every copy of the write end received above is closed: the pipe reads its end (at
        // once: non-blocking, so a copy left open fails the test rather than hanging it).
        drop((write_end, a, b));
        // SAFETY: fcntl(F_SETFL) on a descriptor this test owns.
        let set = unsafe { libc::fcntl(read_end.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        assert_eq!(set, 0);
        let mut rest = Vec::new();
        assert_eq!(read_end.read_to_end(&mut rest).unwrap(), 0);
    }
}
