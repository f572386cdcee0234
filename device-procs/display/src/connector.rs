//! The one path isola-display needs once sandboxed: `--input`, isola-input's control socket,
//! connected again whenever isola-input restarts. A process in an empty root cannot connect
//! by path, and bind-mounting the socket's directory into that root would hand the display
//! every other socket there (the core's control socket, the supervisor's, the other
//! devices'). So a *connector* does it: a small process forked before the sandbox, which
//! stays in the host's mount namespace and does one thing, on request: connect to that one
//! path (fixed when it starts) and pass the connected socket back over a socketpair
//! (SCM_RIGHTS), or the errno. The display can ask for a connection to isola-input and for
//! nothing else. The display's side passes and takes descriptors with `isola_ipc::fds`; the
//! connector's side writes its `sendmsg` by hand, because between the fork and its `_exit`
//! it must not allocate (the helper allocates nothing on send, but the rule is kept simple:
//! no library code in the child).
//!
//! The connector has no capabilities (bounding set too), no_new_privs, is not dumpable,
//! dies with its parent (PDEATHSIG) or when the display's end of the pair closes, holds no
//! descriptor but its end of the pair and stdio, and runs under a seccomp filter: the shared
//! base plus `socket(AF_UNIX, ...)`, `connect` and two `setsockopt(SOL_SOCKET, SO_RCVTIMEO /
//! SO_SNDTIMEO)`; no open, no exec, no new process. It keeps the uid it was started with
//! (so it can reach a socket that isola-input, started the same way, owns), without the
//! capabilities that would let root bypass file permissions.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use isola_device_common::sandbox::{
    device_programs, install, BpfProgram, Policy, SandboxArgs, SandboxError, SeccompCmpArgLen,
    SeccompCmpOp, SeccompCondition, SeccompRule,
};

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("--input {0}: path too long for a Unix socket")]
    PathTooLong(PathBuf),
    #[error("cannot start the input connector: {0}")]
    Sys(&'static str, #[source] io::Error),
    #[error("cannot build the input connector's seccomp filter")]
    Filter(#[from] SandboxError),
}

/// How long the display waits for the connector's answer (its connect to a Unix socket
/// does not block on a live listener; a dead one fails at once).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// The display's end: asks the connector for a fresh connection to isola-input.
#[derive(Debug)]
pub struct Connector {
    channel: UnixStream,
}

fn eq(arg: u8, value: libc::c_int) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value as u64)
        .map_err(SandboxError::Filter)
}

fn one_rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, SandboxError> {
    SeccompRule::new(conds).map_err(SandboxError::Filter)
}

/// The connector's filter: the base plus what [`serve`] calls.
pub fn connector_policy() -> Result<Policy, SandboxError> {
    let timeout = |opt| one_rule(vec![eq(1, libc::SOL_SOCKET)?, eq(2, opt)?]);
    Ok(Policy {
        name: "isola-display-connector",
        // connect's address is in memory, which a filter cannot read; the path is fixed in
        // the connector before the filter goes on and nothing it reads can change it.
        syscalls: &[libc::SYS_connect],
        rules: vec![
            // Unix sockets only: no network, whatever namespace it is in.
            (
                libc::SYS_socket,
                vec![one_rule(vec![eq(0, libc::AF_UNIX)?])?],
            ),
            (
                libc::SYS_setsockopt,
                vec![timeout(libc::SO_RCVTIMEO)?, timeout(libc::SO_SNDTIMEO)?],
            ),
        ],
        host_network: true,
        max_fds: 16,
        max_data: 16 << 20,
    })
}

fn sys(what: &'static str) -> ConnectorError {
    ConnectorError::Sys(what, io::Error::last_os_error())
}

impl Connector {
    /// Forks the connector for `path`. Call it before the sandbox (the connector needs the
    /// host's paths). With `--sandbox off` there is no need for one: see [`InputPath`].
    ///
    /// Safe in a multi-threaded process too: everything the child needs (its seccomp
    /// programs, the socket address, its end of the pair) is made before the fork, and from
    /// the fork to its `_exit` the child makes only raw system calls on that memory. It never
    /// allocates, takes a lock or touches std's I/O, so a lock another thread held at the
    /// fork (the allocator's, stdout's) cannot deadlock it: POSIX's async-signal-safe rule
    /// for the child of a multi-threaded process.
    pub fn spawn(path: &Path, args: &SandboxArgs) -> Result<Connector, ConnectorError> {
        let mut addr = sockaddr(path).ok_or_else(|| ConnectorError::PathTooLong(path.into()))?;
        let programs = device_programs(&connector_policy()?, args.seccomp)?;
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair writes.
        let ret = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if ret < 0 {
            return Err(sys("socketpair"));
        }
        // SAFETY: socketpair just returned these two descriptors; each is owned once.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: fork has no memory preconditions; what makes it sound with other threads
        // running is what the child does: `child` makes only raw system calls on memory made
        // before the fork (no allocation, no lock, no std I/O) and never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(sys("fork"));
        }
        if pid == 0 {
            let fd = theirs.as_raw_fd();
            std::mem::forget(ours);
            child(parent, fd, &programs, &mut addr);
        }
        drop(theirs);
        let channel = UnixStream::from(ours);
        channel
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .and_then(|()| channel.set_write_timeout(Some(ANSWER_TIMEOUT)))
            .map_err(|e| ConnectorError::Sys("set a timeout", e))?;
        Ok(Connector { channel })
    }

    /// A fresh connection to isola-input, made by the connector.
    pub fn connect(&self) -> io::Result<UnixStream> {
        match isola_ipc::fds::send_with_fds(self.channel.as_fd(), &[1u8], &[]) {
            Ok(1) => {}
            Ok(_) => return Err(io::Error::other("the input connector is gone")),
            Err(e) => {
                return Err(io::Error::other(format!(
                    "the input connector is gone ({e})"
                )))
            }
        }
        let mut errno = [0u8; 4];
        // The connector sends one socket at most; anything more is refused (and closed).
        let (n, fds) = isola_ipc::fds::recv_with_fds(self.channel.as_fd(), &mut errno, 1)?;
        let received = fds.into_iter().next();
        if n != 4 {
            return Err(io::Error::other("the input connector is gone"));
        }
        match (i32::from_ne_bytes(errno), received) {
            (0, Some(fd)) => Ok(UnixStream::from(fd)),
            (0, None) => Err(io::Error::other("the input connector sent no socket")),
            (e, _) => Err(io::Error::from_raw_os_error(e)),
        }
    }
}

fn sockaddr(path: &Path) -> Option<libc::sockaddr_un> {
    let bytes = CString::new(path.as_os_str().as_bytes()).ok()?;
    let bytes = bytes.as_bytes_with_nul();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() > addr.sun_path.len() {
        return None;
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    Some(addr)
}

/// The connector process: shed everything, then serve requests until the display is gone.
fn child(
    parent: libc::pid_t,
    fd: libc::c_int,
    programs: &[BpfProgram],
    addr: &mut libc::sockaddr_un,
) -> ! {
    // SAFETY: prctl, getppid, close_range, capset and _exit take integers or pointers to
    // the live local structures below. (This process is a fork's child: only such raw calls
    // are made here, see `Connector::spawn`.)
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0
            || libc::getppid() != parent
        {
            libc::_exit(1);
        }
        // Nothing of the display's but our end of the pair (and stdio for nothing: no log).
        if fd > 3 {
            libc::syscall(libc::SYS_close_range, 3u32, (fd - 1) as u32, 0u32);
        }
        libc::syscall(libc::SYS_close_range, (fd + 1) as u32, u32::MAX, 0u32);
        let mut cap = 0;
        while cap < 64 && libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) == 0 {
            cap += 1;
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        #[repr(C)]
        struct Header {
            version: u32,
            pid: libc::c_int,
        }
        let header = Header {
            version: 0x2008_0522,
            pid: 0,
        };
        let data = [0u32; 6];
        if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0
            || libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        {
            libc::_exit(1);
        }
    }
    // `install` makes a prctl and a seccomp call per program; its error carries only an
    // errno (no allocation).
    if install(programs).is_err() {
        // SAFETY: _exit never returns.
        unsafe { libc::_exit(1) };
    }
    serve(fd, addr)
}

/// One request (any datagram) -> one connect -> one answer, until the pair closes.
fn serve(fd: libc::c_int, addr: &mut libc::sockaddr_un) -> ! {
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    loop {
        let mut byte = [0u8; 1];
        // SAFETY: reads at most one byte into `byte`.
        let n = unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) };
        if n == 0 || (n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted) {
            // SAFETY: _exit never returns.
            unsafe { libc::_exit(0) };
        }
        if n < 0 {
            continue;
        }
        // SAFETY: socket/connect/setsockopt take integers and pointers to the live `addr`
        // and `timeout`; the new descriptor is closed below.
        let (sock, errno) = unsafe {
            let sock = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            let ok = sock >= 0
                && libc::connect(sock, (addr as *mut libc::sockaddr_un).cast(), len) == 0
                && [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO].iter().all(|&opt| {
                    libc::setsockopt(
                        sock,
                        libc::SOL_SOCKET,
                        opt,
                        (&timeout as *const libc::timeval).cast(),
                        std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                    ) == 0
                });
            let errno = if ok {
                0
            } else {
                io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO)
            };
            (sock, errno)
        };
        answer(fd, errno, (errno == 0).then_some(sock));
        if sock >= 0 {
            // SAFETY: closes our copy of the socket just made (the display has its own).
            unsafe { libc::close(sock) };
        }
    }
}

fn answer(fd: libc::c_int, errno: i32, sock: Option<libc::c_int>) {
    let mut payload = errno.to_ne_bytes();
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; all-zero is a valid value. The cmsg written stays
    // within `control` (CMSG_SPACE of one int is 24 bytes of its 32).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(sock) = sock {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen =
                libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as usize;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
            libc::CMSG_DATA(cmsg)
                .cast::<libc::c_int>()
                .write_unaligned(sock);
        }
        libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL);
    }
}

/// How the display reaches isola-input: by path (no sandbox), or through the connector.
#[derive(Debug)]
pub enum InputPath {
    Direct(PathBuf),
    Connector(PathBuf, Connector),
}

impl InputPath {
    pub fn path(&self) -> &Path {
        match self {
            InputPath::Direct(p) | InputPath::Connector(p, _) => p,
        }
    }

    /// A new connection with one-second read and write timeouts.
    pub fn connect(&self) -> io::Result<UnixStream> {
        match self {
            InputPath::Direct(path) => {
                let stream = UnixStream::connect(path)?;
                stream.set_read_timeout(Some(Duration::from_secs(1)))?;
                stream.set_write_timeout(Some(Duration::from_secs(1)))?;
                Ok(stream)
            }
            InputPath::Connector(_, connector) => connector.connect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// The fork is sound with other threads running: while four threads allocate and free
    /// without pause (so the allocator's locks are often held at the fork), connectors are
    /// forked and each still serves. A child that allocated would sooner or later deadlock
    /// on a lock copied in its held state.
    #[test]
    fn connectors_fork_and_serve_while_other_threads_allocate() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let dir = std::env::temp_dir().join(format!("isola-display-mt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("input.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let busy: Vec<_> = (0..4)
            .map(|i| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut keep = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        keep.push(vec![i as u8; 64 + keep.len() % 4096]);
                        if keep.len() > 256 {
                            keep.clear();
                        }
                    }
                })
            })
            .collect();
        for _ in 0..40 {
            let connector = Connector::spawn(&path, &SandboxArgs::default()).unwrap();
            let stream = connector.connect().expect("the forked connector answers");
            let _ = listener.accept().unwrap();
            drop(stream);
        }
        stop.store(true, Ordering::Relaxed);
        for t in busy {
            t.join().unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_connector_connects_to_its_path_again_and_again_and_reports_failures() {
        // Forking from a multi-threaded test binary: the child only makes system calls
        // after the fork (the filter was built before it).
        let dir = std::env::temp_dir().join(format!("isola-display-conn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("input.sock");
        let _ = std::fs::remove_file(&path);
        let connector = Connector::spawn(&path, &SandboxArgs::default()).unwrap();
        // Nobody listening yet: the errno comes back.
        let err = connector.connect().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
        let listener = UnixListener::bind(&path).unwrap();
        for round in 0..3u8 {
            let mut stream = connector.connect().unwrap();
            let (mut server, _) = listener.accept().unwrap();
            use std::io::{Read, Write};
            stream.write_all(&[round]).unwrap();
            let mut b = [0u8];
            server.read_exact(&mut b).unwrap();
            assert_eq!(b[0], round);
            assert!(stream.read_timeout().unwrap().is_some());
        }
        // A restarted listener (new socket at the same path) is found.
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        let _again = UnixListener::bind(&path).unwrap();
        assert!(connector.connect().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
