//! One vfio-user session as the core's client: connect, negotiate, and one exchange at a time,
//! each under the exchange deadline ([`crate::deadline`]).
//!
//! Runs on the main thread while the VM is set up, then only on the device's backend thread
//! ([`crate::pci::vfio_backend`]); never on a vCPU thread.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use isola_ipc::fds;
use nix::errno::Errno;

use super::wire::{self, command, DeviceInfo, Header, IoFd, IrqInfo, RegionInfo, WireError};
use crate::vhost_user::{connect_nonblocking, Deadlines};

/// How often a connect at start is retried while the server is not there yet.
const CONNECT_RETRY: Duration = Duration::from_millis(10);
/// Fds the core takes with one reply (more are closed and the reply refused).
const MAX_REPLY_FDS: usize = wire::MAX_IO_FDS as usize;
const _: () = assert!(MAX_REPLY_FDS <= fds::MAX_FDS);

/// The errno of a failed send or receive (`EIO` for one that is not a system error: the
/// helper refusing more descriptors than it sends, which these exchanges never pass).
fn errno(e: &std::io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::EIO, Errno::from_raw)
}

#[derive(Debug, thiserror::Error)]
pub enum VfioUserError {
    #[error("{} is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("no vfio-user server answered at {} within {waited:?}", path.display())]
    ConnectTimeout { path: PathBuf, waited: Duration },
    #[error("{step}: no answer within {timeout:?}")]
    Unresponsive {
        step: &'static str,
        timeout: Duration,
    },
    #[error("{step}: the server closed the connection")]
    Closed { step: &'static str },
    #[error("{step}: socket error")]
    Io {
        step: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("{step}: bad reply")]
    Reply {
        step: &'static str,
        #[source]
        source: WireError,
    },
    #[error("{step}: {count} fds came with the reply, at most {max} expected")]
    Fds {
        step: &'static str,
        count: usize,
        max: usize,
    },
}

impl VfioUserError {
    /// Nobody listening yet, a listener that does not answer (a supervisor's socket while its
    /// server starts), or one that died mid-handshake: another attempt may succeed.
    pub fn worth_retrying(&self) -> bool {
        matches!(
            self,
            VfioUserError::ConnectTimeout { .. }
                | VfioUserError::Unresponsive { .. }
                | VfioUserError::Closed { .. }
                | VfioUserError::Io { .. }
        )
    }

    /// Whether the session is over (rather than the server refusing one request).
    pub fn session_lost(&self) -> bool {
        match self {
            VfioUserError::Unresponsive { .. }
            | VfioUserError::Closed { .. }
            | VfioUserError::Io { .. }
            | VfioUserError::Fds { .. } => true,
            // A reply that does not answer the request leaves the stream out of step.
            VfioUserError::Reply { source, .. } => !matches!(source, WireError::Refused(_)),
            _ => false,
        }
    }
}

/// A reply's body and the fds that came with it.
pub struct Reply {
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

pub struct VfioUserClient {
    path: PathBuf,
    stream: UnixStream,
    deadlines: Deadlines,
    next_id: u16,
    max_msg_fds: u32,
}

impl VfioUserClient {
    /// Connects to `path`, waiting up to `wait` for a server to listen and answer VERSION.
    pub fn connect(
        path: &Path,
        wait: Duration,
        deadlines: &Deadlines,
    ) -> Result<Self, VfioUserError> {
        let until = Instant::now() + wait;
        let mut said = false;
        loop {
            if let Ok(meta) = std::fs::metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if !meta.file_type().is_socket() {
                    return Err(VfioUserError::NotASocket(path.to_owned()));
                }
            }
            match Self::connect_once(path, deadlines) {
                Ok(client) => return Ok(client),
                Err(e) if e.worth_retrying() && Instant::now() < until => {
                    if !said {
                        log::warn!(
                            "waiting for vfio-user server {} (at most {wait:?})",
                            path.display()
                        );
                        said = true;
                    }
                    std::thread::sleep(CONNECT_RETRY);
                }
                Err(e) if e.worth_retrying() => {
                    return Err(VfioUserError::ConnectTimeout {
                        path: path.to_owned(),
                        waited: wait,
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt: a connect that never blocks, then VERSION under the deadline.
    pub fn connect_once(path: &Path, deadlines: &Deadlines) -> Result<Self, VfioUserError> {
        let stream = connect_nonblocking(path).map_err(|_| VfioUserError::ConnectTimeout {
            path: path.to_owned(),
            waited: Duration::ZERO,
        })?;
        let mut client = VfioUserClient {
            path: path.to_owned(),
            stream,
            deadlines: deadlines.clone(),
            next_id: 0,
            max_msg_fds: 1,
        };
        let reply = client.exchange(command::VERSION, &wire::version_body(), &[])?;
        let version = wire::parse_version(&reply.body).map_err(|source| VfioUserError::Reply {
            step: "VERSION",
            source,
        })?;
        client.max_msg_fds = version.max_msg_fds;
        log::info!(
            "vfio-user {}: protocol {}.{}, up to {} fds a message",
            path.display(),
            version.major,
            version.minor,
            version.max_msg_fds
        );
        Ok(client)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn deadlines(&self) -> &Deadlines {
        &self.deadlines
    }

    pub fn socket_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Shuts the session down (the server sees it end).
    pub fn disconnect(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Sends one request and reads its reply, under the exchange deadline. A refusal (the
    /// error bit) is returned as [`WireError::Refused`].
    pub fn exchange(
        &mut self,
        command: u16,
        body: &[u8],
        fds: &[RawFd],
    ) -> Result<Reply, VfioUserError> {
        let step = command::name(command);
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let request = Header::request(id, command, body.len())
            .map_err(|source| VfioUserError::Reply { step, source })?;
        let ticket = match self.stream.try_clone() {
            Ok(dup) => Some(self.deadlines.watchdog.arm(dup, self.deadlines.timeout)),
            Err(e) => {
                log::warn!(
                    "vfio-user {}: no deadline for {step}: {e}",
                    self.path.display()
                );
                None
            }
        };
        let result = self.exchange_unguarded(step, &request, body, fds);
        let late = ticket.is_some_and(|t| self.deadlines.watchdog.disarm(t));
        if late {
            return Err(VfioUserError::Unresponsive {
                step,
                timeout: self.deadlines.timeout,
            });
        }
        result
    }

    fn exchange_unguarded(
        &mut self,
        step: &'static str,
        request: &Header,
        body: &[u8],
        fds: &[RawFd],
    ) -> Result<Reply, VfioUserError> {
        let header = request.encode();
        self.send_all(step, &[&header, body], fds)?;
        let mut head = [0u8; wire::HEADER_SIZE];
        let mut got_fds = Vec::new();
        self.recv_exact(step, &mut head, &mut got_fds)?;
        let reply = Header::decode(&head);
        let len = reply
            .check_reply(request)
            .map_err(|source| VfioUserError::Reply { step, source })?;
        let mut body = vec![0u8; len];
        self.recv_exact(step, &mut body, &mut got_fds)?;
        if let Some(source) = reply.refusal() {
            return Err(VfioUserError::Reply { step, source });
        }
        Ok(Reply { body, fds: got_fds })
    }

    fn send_all(
        &self,
        step: &'static str,
        parts: &[&[u8]],
        fds: &[RawFd],
    ) -> Result<(), VfioUserError> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let borrowed: Vec<BorrowedFd<'_>> = fds
            .iter()
            // SAFETY: the callers' descriptors (DMA_MAP's memory fd, SET_IRQS' eventfds) are
            // open and owned by them for the whole call; these borrows end with it.
            .map(|&fd| unsafe { BorrowedFd::borrow_raw(fd) })
            .collect();
        let mut sent = 0usize;
        while sent < total {
            // The parts not yet sent, the first one cut where the last send stopped.
            let mut skip = sent;
            let slices: Vec<IoSlice<'_>> = parts
                .iter()
                .filter_map(|p| {
                    if skip >= p.len() {
                        skip -= p.len();
                        None
                    } else {
                        let s = IoSlice::new(&p[skip..]);
                        skip = 0;
                        Some(s)
                    }
                })
                .collect();
            let rights = if sent == 0 { &borrowed[..] } else { &[] };
            match fds::send_vectored_with_fds(self.stream.as_fd(), &slices, rights) {
                Ok(0) => return Err(VfioUserError::Closed { step }),
                Ok(n) => sent += n,
                Err(e) => match errno(&e) {
                    Errno::EINTR => {}
                    Errno::EPIPE | Errno::ECONNRESET => return Err(VfioUserError::Closed { step }),
                    source => return Err(VfioUserError::Io { step, source }),
                },
            }
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes, keeping any fds that come with them.
    fn recv_exact(
        &self,
        step: &'static str,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
    ) -> Result<(), VfioUserError> {
        let mut done = 0;
        while done < buf.len() {
            let received = fds::recv_with_fds(self.stream.as_fd(), &mut buf[done..], MAX_REPLY_FDS);
            let (n, got) = match received {
                Ok(received) => received,
                Err(e) => {
                    // More than one message's worth, or cut by the kernel: all closed already.
                    if let Some(refused) = fds::fds_refused(&e) {
                        return Err(VfioUserError::Fds {
                            step,
                            count: fds.len() + refused.count,
                            max: MAX_REPLY_FDS,
                        });
                    }
                    match errno(&e) {
                        Errno::EINTR => continue,
                        Errno::ECONNRESET => return Err(VfioUserError::Closed { step }),
                        source => return Err(VfioUserError::Io { step, source }),
                    }
                }
            };
            fds.extend(got);
            if fds.len() > MAX_REPLY_FDS {
                return Err(VfioUserError::Fds {
                    step,
                    count: fds.len(),
                    max: MAX_REPLY_FDS,
                });
            }
            if n == 0 {
                return Err(VfioUserError::Closed { step });
            }
            done += n;
        }
        Ok(())
    }

    fn parse<T>(step: &'static str, result: Result<T, WireError>) -> Result<T, VfioUserError> {
        result.map_err(|source| VfioUserError::Reply { step, source })
    }

    pub fn device_info(&mut self) -> Result<DeviceInfo, VfioUserError> {
        let reply = self.exchange(command::DEVICE_GET_INFO, &wire::device_info_body(), &[])?;
        Self::parse("DEVICE_GET_INFO", wire::parse_device_info(&reply.body))
    }

    /// A region's size and flags. An fd offered for mmap is closed: every access is forwarded.
    pub fn region_info(&mut self, index: u32) -> Result<RegionInfo, VfioUserError> {
        let body = wire::region_info_body(index);
        let reply = self.exchange(command::DEVICE_GET_REGION_INFO, &body, &[])?;
        Self::parse(
            "DEVICE_GET_REGION_INFO",
            wire::parse_region_info(&reply.body, index),
        )
    }

    /// The ioeventfds the server offers for region `index`, each with its fd; a server that
    /// refuses the command (it is optional) offers none.
    pub fn region_io_fds(&mut self, index: u32) -> Result<Vec<(IoFd, OwnedFd)>, VfioUserError> {
        let body = wire::region_io_fds_body(index);
        let reply = match self.exchange(command::GET_REGION_IO_FDS, &body, &[]) {
            Ok(reply) => reply,
            Err(VfioUserError::Reply {
                source: WireError::Refused(_),
                ..
            }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let entries = Self::parse(
            "GET_REGION_IO_FDS",
            wire::parse_region_io_fds(&reply.body, index, reply.fds.len()),
        )?;
        let mut out = Vec::new();
        for entry in entries {
            let fd = reply.fds[entry.fd_index as usize]
                .try_clone()
                .map_err(|e| VfioUserError::Io {
                    step: "GET_REGION_IO_FDS",
                    source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                })?;
            out.push((entry, fd));
        }
        Ok(out)
    }

    pub fn irq_info(&mut self, index: u32) -> Result<IrqInfo, VfioUserError> {
        let reply = self.exchange(command::GET_IRQ_INFO, &wire::irq_info_body(index), &[])?;
        Self::parse("GET_IRQ_INFO", wire::parse_irq_info(&reply.body, index))
    }

    /// Hands the server one eventfd per vector of interrupt type `index`, in as many messages
    /// as its fd limit needs.
    pub fn set_irqs(&mut self, index: u32, fds: &[RawFd]) -> Result<(), VfioUserError> {
        let chunk = (self.max_msg_fds as usize).clamp(1, wire::CLIENT_MAX_MSG_FDS as usize);
        for (n, part) in fds.chunks(chunk).enumerate() {
            let start = (n * chunk) as u32;
            let body = wire::set_irqs_body(index, start, part.len() as u32);
            self.exchange(command::SET_IRQS, &body, part)?;
        }
        Ok(())
    }

    pub fn dma_map(
        &mut self,
        offset: u64,
        address: u64,
        size: u64,
        fd: RawFd,
    ) -> Result<(), VfioUserError> {
        let body = wire::dma_map_body(offset, address, size);
        self.exchange(command::DMA_MAP, &body, &[fd]).map(drop)
    }

    pub fn reset(&mut self) -> Result<(), VfioUserError> {
        self.exchange(command::DEVICE_RESET, &[], &[]).map(drop)
    }

    pub fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), VfioUserError> {
        let body = wire::region_access_body(region, offset, data.len(), &[]);
        let reply = self.exchange(command::REGION_READ, &body, &[])?;
        let got = Self::parse(
            "REGION_READ",
            wire::parse_region_access(&reply.body, region, offset, data.len(), true),
        )?;
        data.copy_from_slice(got);
        Ok(())
    }

    pub fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), VfioUserError> {
        let body = wire::region_access_body(region, offset, data.len(), data);
        let reply = self.exchange(command::REGION_WRITE, &body, &[])?;
        Self::parse(
            "REGION_WRITE",
            wire::parse_region_access(&reply.body, region, offset, data.len(), false),
        )
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deadline::{Watchdog, WatchdogGuard};
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    const TIMEOUT: Duration = Duration::from_millis(300);

    struct Peer {
        _dir: tempdir::Dir,
        path: PathBuf,
        thread: std::thread::JoinHandle<()>,
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    /// A scripted server: answers VERSION properly, then runs `script` on the connection.
    fn peer(name: &str, script: impl FnOnce(&mut UnixStream) + Send + 'static) -> Peer {
        let dir =
            std::env::temp_dir().join(format!("isola-vfio-client-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let thread = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let (header, _) = request(&mut stream);
            let mut body = vec![0, 0, 1, 0];
            body.extend_from_slice(b"{\"capabilities\":{\"max_msg_fds\":8}}\0");
            reply(&mut stream, &header, 0, &body);
            script(&mut stream);
        });
        Peer {
            _dir: tempdir::Dir(dir),
            path,
            thread,
        }
    }

    fn request(stream: &mut UnixStream) -> (Header, Vec<u8>) {
        let mut head = [0u8; wire::HEADER_SIZE];
        stream.read_exact(&mut head).unwrap();
        let header = Header::decode(&head);
        let mut body = vec![0u8; header.size as usize - wire::HEADER_SIZE];
        stream.read_exact(&mut body).unwrap();
        (header, body)
    }

    fn reply(stream: &mut UnixStream, to: &Header, flags: u32, body: &[u8]) {
        let h = Header {
            id: to.id,
            command: to.command,
            size: (wire::HEADER_SIZE + body.len()) as u32,
            flags: 1 | flags,
            error: if flags != 0 { 22 } else { 0 },
        };
        stream.write_all(&h.encode()).unwrap();
        stream.write_all(body).unwrap();
    }

    fn deadlines() -> (Deadlines, WatchdogGuard) {
        let watchdog = Watchdog::start(Box::new(|| Ok(()))).unwrap();
        let guard = WatchdogGuard(watchdog.clone());
        (
            Deadlines {
                watchdog,
                timeout: TIMEOUT,
            },
            guard,
        )
    }

    fn read_reply(body: &[u8], data: &[u8]) -> Vec<u8> {
        let mut out = body[..16].to_vec();
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn a_good_server_is_read_and_the_fd_limit_is_taken() {
        let p = peer("good", |s| {
            let (h, body) = request(s);
            reply(s, &h, 0, &read_reply(&body, &[1, 2, 3, 4]));
        });
        let (d, _g) = deadlines();
        let mut c = VfioUserClient::connect(&p.path, Duration::from_secs(5), &d).unwrap();
        assert_eq!(c.max_msg_fds, 8);
        let mut data = [0u8; 4];
        c.region_read(0, 0x10, &mut data).unwrap();
        assert_eq!(data, [1, 2, 3, 4]);
        p.thread.join().unwrap();
    }

    /// Runs one REGION_READ against a server that answers with `bad`; returns the error.
    fn one_bad_read(
        name: &str,
        bad: impl FnOnce(&mut UnixStream, Header, Vec<u8>) + Send + 'static,
    ) -> VfioUserError {
        let p = peer(name, move |s| {
            let (h, body) = request(s);
            bad(s, h, body);
            // Keep the connection open a while, as a live but wrong server would.
            std::thread::sleep(TIMEOUT * 3);
        });
        let (d, _g) = deadlines();
        let mut c = VfioUserClient::connect(&p.path, Duration::from_secs(5), &d).unwrap();
        let mut data = [0u8; 4];
        let t0 = Instant::now();
        let err = c.region_read(0, 0x10, &mut data).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(20), "bounded");
        p.thread.join().unwrap();
        err
    }

    #[test]
    fn hostile_replies_with_a_wrong_id_or_command_end_the_session() {
        let e = one_bad_read("id", |s, mut h, body| {
            h.id = h.id.wrapping_add(5);
            reply(s, &h, 0, &read_reply(&body, &[0; 4]));
        });
        assert!(
            matches!(
                e,
                VfioUserError::Reply {
                    source: WireError::WrongId { .. },
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.session_lost());
        let e = one_bad_read("cmd", |s, mut h, body| {
            h.command = wire::command::REGION_WRITE;
            reply(s, &h, 0, &read_reply(&body, &[0; 4]));
        });
        assert!(
            matches!(
                e,
                VfioUserError::Reply {
                    source: WireError::WrongCommand { .. },
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn hostile_replies_with_a_huge_size_are_refused_before_reading_on() {
        let e = one_bad_read("huge", |s, h, _| {
            let bad = Header {
                id: h.id,
                command: h.command,
                size: u32::MAX,
                flags: 1,
                error: 0,
            };
            s.write_all(&bad.encode()).unwrap();
        });
        assert!(
            matches!(
                e,
                VfioUserError::Reply {
                    source: WireError::Size(u32::MAX),
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.session_lost());
    }

    #[test]
    fn hostile_replies_that_are_short_or_carry_the_wrong_data_fail() {
        let e = one_bad_read("short", |s, h, body| {
            let r = read_reply(&body, &[0; 4]);
            let full = Header {
                id: h.id,
                command: h.command,
                size: (wire::HEADER_SIZE + r.len()) as u32,
                flags: 1,
                error: 0,
            };
            s.write_all(&full.encode()).unwrap();
            s.write_all(&r[..5]).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
        });
        assert!(matches!(e, VfioUserError::Closed { .. }), "{e}");
        let e = one_bad_read("data", |s, h, body| {
            reply(s, &h, 0, &read_reply(&body, &[0; 2]));
        });
        assert!(
            matches!(
                e,
                VfioUserError::Reply {
                    source: WireError::Bad(_),
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn hostile_replies_that_never_come_miss_the_deadline() {
        let e = one_bad_read("hang", |_, _, _| {});
        assert!(matches!(e, VfioUserError::Unresponsive { .. }), "{e}");
        assert!(e.session_lost());
    }

    #[test]
    fn hostile_replies_with_too_many_fds_end_the_session() {
        let e = one_bad_read("fds", |s, h, body| {
            let r = read_reply(&body, &[0; 4]);
            let head = Header {
                id: h.id,
                command: h.command,
                size: (wire::HEADER_SIZE + r.len()) as u32,
                flags: 1,
                error: 0,
            }
            .encode();
            let fds: Vec<std::fs::File> = (0..MAX_REPLY_FDS + 4)
                .map(|_| std::fs::File::open("/dev/null").unwrap())
                .collect();
            let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
            let parts = [IoSlice::new(&head), IoSlice::new(&r)];
            sendmsg::<()>(
                s.as_raw_fd(),
                &parts,
                &[ControlMessage::ScmRights(&raw)],
                MsgFlags::empty(),
                None,
            )
            .unwrap();
        });
        assert!(matches!(e, VfioUserError::Fds { .. }), "{e}");
    }

    #[test]
    fn a_refusal_fails_one_request_and_the_session_goes_on() {
        let p = peer("refusal", |s| {
            let (h, _) = request(s);
            reply(s, &h, 1 << 5, &[]);
            let (h, body) = request(s);
            reply(s, &h, 0, &read_reply(&body, &[9; 4]));
        });
        let (d, _g) = deadlines();
        let mut c = VfioUserClient::connect(&p.path, Duration::from_secs(5), &d).unwrap();
        let mut data = [0u8; 4];
        let e = c.region_read(0, 0, &mut data).unwrap_err();
        assert!(
            matches!(
                e,
                VfioUserError::Reply {
                    source: WireError::Refused(22),
                    ..
                }
            ),
            "{e}"
        );
        assert!(!e.session_lost());
        c.region_read(0, 0, &mut data).unwrap();
        assert_eq!(data, [9; 4]);
        p.thread.join().unwrap();
    }

    #[test]
    fn hostile_io_fd_lists_without_their_fds_are_refused() {
        let p = peer("iofds", |s| {
            let (h, _) = request(s);
            // One eventfd entry naming fd 0, but no fd comes with the reply.
            let mut body = Vec::new();
            for v in [56u32, 0, 0, 1] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            body.extend_from_slice(&0x14u64.to_le_bytes());
            body.extend_from_slice(&4u64.to_le_bytes());
            for v in [0u32, 0, 0, 0] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            body.extend_from_slice(&0u64.to_le_bytes());
            reply(s, &h, 0, &body);
            // A server without the (optional) command refuses it: no io fds, no error.
            let (h, _) = request(s);
            reply(s, &h, 1 << 5, &[]);
        });
        let (d, _g) = deadlines();
        let mut c = VfioUserClient::connect(&p.path, Duration::from_secs(5), &d).unwrap();
        let e = c.region_io_fds(0).unwrap_err();
        assert!(
            matches!(
                e,
                VfioUserError::Reply {
                    source: WireError::Bad(_),
                    ..
                }
            ),
            "{e}"
        );
        assert!(c.region_io_fds(0).unwrap().is_empty());
        p.thread.join().unwrap();
    }

    #[test]
    fn a_path_that_is_not_a_socket_is_refused_at_once_and_silence_is_bounded() {
        let (d, _g) = deadlines();
        let file = std::env::temp_dir().join(format!("isola-vfio-notsock-{}", std::process::id()));
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            VfioUserClient::connect(&file, Duration::from_secs(5), &d),
            Err(VfioUserError::NotASocket(_))
        ));
        let _ = std::fs::remove_file(&file);
        let t0 = Instant::now();
        let missing = std::env::temp_dir().join("isola-vfio-nobody-here.sock");
        assert!(matches!(
            VfioUserClient::connect(&missing, Duration::from_millis(200), &d),
            Err(VfioUserError::ConnectTimeout { .. })
        ));
        assert!(t0.elapsed() < Duration::from_secs(20));
    }
}
