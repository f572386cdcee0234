//! Passing descriptors beside bytes over a Unix socket (SCM_RIGHTS), in one place.
//!
//! Two levels, as crosvm's `Tube`: [`send_with_fds`] / [`recv_with_fds`] carry raw bytes (the
//! vhost-user frontend's `GPU_SET_SOCKET`, isola-display's connector channel, the core's
//! vfio-user client, isola-usb's gate, test peers; [`send_vectored_with_fds`] gathers a
//! header and a body), and
//! [`write_message_with_fds`] / [`read_message_with_fds`] carry one framed message of this
//! crate (same framing, version check and bound as [`crate::write_message`]) with the
//! descriptors beside it.
//!
//! What the receiving side gets is checked here, so no caller forgets: descriptors arrive
//! close-on-exec (`MSG_CMSG_CLOEXEC`), a control message the kernel had to cut
//! (`MSG_CTRUNC`: the sender passed more than there was room for) is an error, and so are
//! more descriptors than the caller takes; every descriptor received is owned
//! ([`OwnedFd`]), so one that is refused is closed, never leaked. Sends never raise SIGPIPE.

use std::fmt;
use std::io::{self, IoSlice, Read};
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{IpcError, MAX_FRAME};

/// Most descriptors one message carries (the kernel's own limit is 253).
pub const MAX_FDS: usize = 16;

/// Room for `MAX_FDS` descriptors' control message, `u64`-aligned as `cmsghdr` needs.
const CONTROL_WORDS: usize = 16;
const _: () = assert!(CONTROL_WORDS * 8 >= 16 + MAX_FDS * size_of::<RawFd>());

/// Sends `bytes` (one `sendmsg`, which may send fewer: the count is returned) with `fds`
/// attached to its first byte.
pub fn send_with_fds(
    socket: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    send_vectored_with_fds(socket, &[IoSlice::new(bytes)], fds)
}

/// As [`send_with_fds`], gathering the bytes from `parts` (a header and a body without
/// copying them together): one `sendmsg`, which may send fewer than all; the count is
/// returned.
pub fn send_vectored_with_fds(
    socket: BorrowedFd<'_>,
    parts: &[IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} descriptors in one message, at most {MAX_FDS}",
                fds.len()
            ),
        ));
    }
    let mut control = [0u64; CONTROL_WORDS];
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is ABI-compatible with iovec (std guarantees it on Unix); the kernel only
    // reads through these pointers.
    msg.msg_iov = parts.as_ptr().cast_mut().cast();
    msg.msg_iovlen = parts.len();
    if !fds.is_empty() {
        let data_len = (fds.len() * size_of::<RawFd>()) as u32;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(data_len) } as usize;
        // SAFETY: msg_control points at `control`, 128 bytes, and msg_controllen (at most
        // CMSG_SPACE(16 * 4) = 80) is within it, so CMSG_FIRSTHDR is the start of `control`
        // and the header plus `fds.len()` ints written after it stay inside `control`.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as usize;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: `msg` points at `parts` (iovecs pointing at borrowed bytes, read only) and at
    // `control`, all alive for the call; the kernel reads them and writes nothing.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

/// Receives into `buf` (one `recvmsg`: `Ok((0, _))` is the end of the stream) and the
/// descriptors that came with those bytes, at most `max_fds` (itself at most [`MAX_FDS`]).
pub fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; CONTROL_WORDS];
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points at `iov` (which points at `buf`, writable, `buf.len()` bytes) and
    // at `control` (its full size as msg_controllen); both outlive the call.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walks the control messages the kernel wrote into `control`, within the
    // msg_controllen it set; an SCM_RIGHTS message's data is an array of descriptors the
    // kernel just installed in this process, each owned once here.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let max = max_fds.min(MAX_FDS);
    let truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;
    if truncated || fds.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            FdsRefused {
                count: fds.len(),
                max,
                truncated,
            },
        ));
    }
    Ok((n as usize, fds))
}

/// The error [`recv_with_fds`] returns (kind `InvalidData`) when a message brought more
/// descriptors than the caller takes, or more than there was room for (`MSG_CTRUNC`); every
/// descriptor that did arrive is already closed. Find it with [`fds_refused`], to tell a
/// protocol violation from an I/O error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdsRefused {
    /// Descriptors received (and closed); with `truncated`, the peer sent more still.
    pub count: usize,
    /// The most the caller took.
    pub max: usize,
    /// The kernel cut the control message (`MSG_CTRUNC`).
    pub truncated: bool,
}

impl fmt::Display for FdsRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.truncated {
            write!(f, "the peer passed more than {MAX_FDS} descriptors")
        } else {
            write!(
                f,
                "{} descriptors where at most {} are taken",
                self.count, self.max
            )
        }
    }
}

impl std::error::Error for FdsRefused {}

/// The [`FdsRefused`] inside `e`, if that is what `e` is.
pub fn fds_refused(e: &io::Error) -> Option<&FdsRefused> {
    e.get_ref().and_then(|inner| inner.downcast_ref())
}

/// Writes one framed message (as [`crate::write_message`]) with `fds` beside it.
pub fn write_message_with_fds<S: AsFd, T: Serialize>(
    socket: &S,
    msg: &T,
    fds: &[BorrowedFd<'_>],
) -> Result<(), IpcError> {
    let frame = crate::frame(msg)?;
    let sent = send_with_fds(socket.as_fd(), &frame, fds)?;
    if sent < frame.len() {
        // The descriptors went with the first part; the rest is plain bytes.
        let mut rest = &frame[sent..];
        while !rest.is_empty() {
            let more = send_with_fds(socket.as_fd(), rest, &[])?;
            rest = &rest[more..];
        }
    }
    Ok(())
}

/// Reads one framed message (as [`crate::read_message`]) and the descriptors sent with it,
/// at most `max_fds`.
pub fn read_message_with_fds<S: AsFd, T: DeserializeOwned>(
    socket: &S,
    max_fds: usize,
) -> Result<(T, Vec<OwnedFd>), IpcError> {
    let mut header = [0u8; 6];
    let (mut got, mut fds) = recv_with_fds(socket.as_fd(), &mut header, max_fds)?;
    if got == 0 {
        return Err(IpcError::Closed);
    }
    while got < header.len() {
        let (n, more) = recv_with_fds(socket.as_fd(), &mut header[got..], 0)?;
        drop(more);
        if n == 0 {
            return Err(IpcError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        got += n;
    }
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    if !(2..=MAX_FRAME).contains(&len) {
        return Err(IpcError::FrameSize(len));
    }
    let mut reader = Reader(socket.as_fd());
    let msg = crate::read_body(&mut reader, len, [header[4], header[5]])?;
    fds.shrink_to_fit();
    Ok((msg, fds))
}

/// Plain reads of the frame's rest (descriptors only ever come with its first byte).
struct Reader<'a>(BorrowedFd<'a>);

impl Read for Reader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (n, fds) = recv_with_fds(self.0, buf, 0)?;
        drop(fds);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ControlRequest;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    /// A pipe: what is written into the passed write end comes out of the kept read end.
    fn pipe() -> (std::fs::File, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 just returned both; each is owned once.
        unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        }
    }

    #[test]
    fn a_message_and_its_descriptors_arrive_together() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut read_end, write_end) = pipe();
        let msg = ControlRequest::InjectMsi {
            address: 0xfee0_0000,
            data: 7,
        };
        write_message_with_fds(&a, &msg, &[write_end.as_fd(), write_end.as_fd()]).unwrap();
        drop(write_end);
        let (got, fds): (ControlRequest, _) = read_message_with_fds(&b, 2).unwrap();
        assert_eq!(got, msg);
        assert_eq!(fds.len(), 2);
        // The descriptors are live copies of the pipe's write end, close-on-exec.
        for fd in &fds {
            // SAFETY: fcntl(F_GETFD) on a descriptor this test owns.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        }
        std::fs::File::from(fds.into_iter().next().unwrap())
            .write_all(b"through")
            .unwrap();
        let mut buf = [0u8; 7];
        read_end.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"through");
        // A frame with no descriptors reads as one with none; plain and fd framing agree.
        crate::write_message(&mut &a, &ControlRequest::Pause).unwrap();
        let (got, fds): (ControlRequest, _) = read_message_with_fds(&b, 2).unwrap();
        assert_eq!((got, fds.len()), (ControlRequest::Pause, 0));
        write_message_with_fds(&a, &ControlRequest::Resume, &[]).unwrap();
        let got: ControlRequest = crate::read_message(&mut &b).unwrap();
        assert_eq!(got, ControlRequest::Resume);
        drop(a);
        assert!(matches!(
            read_message_with_fds::<_, ControlRequest>(&b, 2),
            Err(IpcError::Closed)
        ));
    }

    #[test]
    fn more_descriptors_than_taken_are_refused_and_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut read_end, write_end) = pipe();
        let three = [write_end.as_fd(), write_end.as_fd(), write_end.as_fd()];
        write_message_with_fds(&a, &ControlRequest::Status, &three).unwrap();
        drop(write_end);
        let err = read_message_with_fds::<_, ControlRequest>(&b, 1).unwrap_err();
        assert!(
            matches!(err, IpcError::Io(ref e) if e.kind() == io::ErrorKind::InvalidData),
            "{err:?}"
        );
        // Every copy of the write end is closed: the pipe reads its end.
        let mut rest = Vec::new();
        assert_eq!(read_end.read_to_end(&mut rest).unwrap(), 0);
        // Too many to send at all.
        let many = vec![a.as_fd(); MAX_FDS + 1];
        assert!(send_with_fds(a.as_fd(), b"x", &many).is_err());
    }

    #[test]
    fn vectored_sends_and_refusals_callers_can_tell_from_io_errors() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut read_end, write_end) = pipe();
        let parts = [
            IoSlice::new(b"head"),
            IoSlice::new(b""),
            IoSlice::new(b"body"),
        ];
        let sent = send_vectored_with_fds(a.as_fd(), &parts, &[write_end.as_fd()]).unwrap();
        assert_eq!(sent, 8);
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf, 1).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"headbody"[..], 1));
        // Two where one is taken: refused, counted, both closed.
        let two = [write_end.as_fd(), write_end.as_fd()];
        send_vectored_with_fds(a.as_fd(), &[IoSlice::new(b"x")], &two).unwrap();
        drop((fds, write_end));
        // Non-blocking, so a copy left open fails the test rather than hanging it.
        // SAFETY: fcntl(F_SETFL) on a descriptor this test owns.
        let set = unsafe { libc::fcntl(read_end.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        assert_eq!(set, 0);
        let err = recv_with_fds(b.as_fd(), &mut buf, 1).unwrap_err();
        assert_eq!(
            fds_refused(&err),
            Some(&FdsRefused {
                count: 2,
                max: 1,
                truncated: false
            })
        );
        let mut rest = Vec::new();
        assert_eq!(read_end.read_to_end(&mut rest).unwrap(), 0);
        // An I/O error is not a refusal.
        b.set_nonblocking(true).unwrap();
        let err = recv_with_fds(b.as_fd(), &mut buf, 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(fds_refused(&err).is_none());
    }

    #[test]
    fn the_version_and_bound_hold_with_descriptors_too() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut frame = crate::frame(&ControlRequest::Status).unwrap();
        frame[4] = 99;
        send_with_fds(a.as_fd(), &frame, &[a.as_fd()]).unwrap();
        let err = read_message_with_fds::<_, ControlRequest>(&b, 1).unwrap_err();
        assert!(matches!(err, IpcError::Version { peer: 99 }), "{err}");
        send_with_fds(a.as_fd(), &u32::MAX.to_le_bytes(), &[]).unwrap();
        send_with_fds(a.as_fd(), &[0, 0], &[]).unwrap();
        let err = read_message_with_fds::<_, ControlRequest>(&b, 1).unwrap_err();
        assert!(matches!(err, IpcError::FrameSize(u32::MAX)), "{err}");
    }
}
