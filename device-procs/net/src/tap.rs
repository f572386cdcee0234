//! The TAP device: opened by name (`--tap NAME`, which needs the right to attach to that
//! device, e.g. a persistent tap owned by this user) or adopted from descriptors a launcher
//! opened (`--tap-fd N`, so this process needs no privilege at all).
//!
//! Every queue of the tap carries the 12-byte virtio-net header (`IFF_VNET_HDR`,
//! `TUNSETVNETHDRSZ`), so frames pass between the guest's rings and the tap with their
//! offload metadata unchanged; which offloads the tap may hand us is set with
//! `TUNSETOFFLOAD` from what the guest acknowledged. The crates that wrap taps use the old
//! 10-byte header, hence this small wrapper.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};

/// Size of `struct virtio_net_hdr_v1` (with `num_buffers`), used by every virtio 1.x driver.
pub const VNET_HDR_LEN: usize = 12;

const IFNAMSIZ: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name '{0}' is empty or longer than 15 bytes")]
    BadName(String),
    #[error("there is no network device '{0}' (create the tap first, e.g. `ip tuntap add`)")]
    NoSuchDevice(String),
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    #[error("cannot attach to tap '{name}' (does it exist, and may this user use it?)")]
    Attach {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--tap-fd {0} is not an open file descriptor")]
    BadFd(RawFd),
    #[error("--tap-fd {0} is not a tap device")]
    NotATap(RawFd),
    #[error("--tap-fd {0} was opened without IFF_VNET_HDR and IFF_NO_PI")]
    WrongFlags(RawFd),
    #[error("--tap-fd {0}: several fds must be queues of one multi-queue tap")]
    Mismatch(RawFd),
    #[error("{what} failed on tap '{name}'")]
    Ioctl {
        what: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// `struct ifreq` as the TUN ioctls use it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_int) -> IfReq {
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            // The IFF_* values used here all fit in 16 bits, as the kernel's ifreq has it.
            flags: flags as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// The queues of one tap device, one fd per queue pair.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<File>,
}

/// How long an attach waits for a tap that another process still holds. A single-queue tap is
/// busy while any process has it open; the instance an upgrade or restart replaces (the
/// sandbox's reaper and the device it traces) lets go of it a moment after its supervisor
/// saw it end, when the next instance is already starting.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// TUNSETIFF on `file` for tap `name`, retried while the tap is busy (up to [`BUSY_WAIT`]).
fn attach(file: &File, name: &str, flags: libc::c_int) -> Result<(), TapError> {
    let deadline = std::time::Instant::now() + BUSY_WAIT;
    loop {
        let mut req = IfReq::new(name, flags);
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` is a live,
        // correctly sized #[repr(C)] value for the duration of the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc == 0 {
            return Ok(());
        }
        let source = std::io::Error::last_os_error();
        if source.raw_os_error() != Some(libc::EBUSY) || std::time::Instant::now() >= deadline {
            return Err(TapError::Attach {
                name: name.to_owned(),
                source,
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

fn check_name(name: &str) -> Result<(), TapError> {
    if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('\0') {
        return Err(TapError::BadName(name.to_owned()));
    }
    Ok(())
}

impl Tap {
    /// Attaches `queues` queues to the existing tap `name` (multi-queue if more than one).
    pub fn open(name: &str, queues: u16) -> Result<Tap, TapError> {
        check_name(name)?;
        // TUNSETIFF would create a missing tap if allowed to; this process only attaches.
        let cname = std::ffi::CString::new(name).map_err(|_| TapError::BadName(name.to_owned()))?;
        // SAFETY: `cname` is a NUL-terminated string alive for the call, which only reads it.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::NoSuchDevice(name.to_owned()));
        }
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut files = Vec::with_capacity(usize::from(queues));
        for _ in 0..queues {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
                .open("/dev/net/tun")
                .map_err(TapError::OpenTun)?;
            attach(&file, name, flags)?;
            files.push(file);
        }
        Tap::finish(name.to_owned(), files)
    }

    /// Adopts tap fds a launcher opened (with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, and
    /// `IFF_MULTI_QUEUE` if more than one). Call once per fd set: the tap takes ownership.
    pub fn from_fds(fds: &[RawFd]) -> Result<Tap, TapError> {
        let mut files = Vec::with_capacity(fds.len());
        let mut name: Option<String> = None;
        for &fd in fds {
            let (owned, ifname) = adopt(fd)?;
            if name.as_ref().is_some_and(|n| *n != ifname) || files.len() > usize::from(u16::MAX) {
                return Err(TapError::Mismatch(fd));
            }
            name = Some(ifname);
            files.push(File::from(owned));
        }
        Tap::finish(name.unwrap_or_default(), files)
    }

    fn finish(name: String, queues: Vec<File>) -> Result<Tap, TapError> {
        let tap = Tap { name, queues };
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        for q in &tap.queues {
            // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at
            // `size`, alive for the call.
            let rc = unsafe { libc::ioctl(q.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
            tap.check(rc, "TUNSETVNETHDRSZ")?;
        }
        // Probe every offload the device may offer, then start with none.
        tap.set_offload(
            libc::TUN_F_CSUM
                | libc::TUN_F_TSO4
                | libc::TUN_F_TSO6
                | libc::TUN_F_TSO_ECN
                | libc::TUN_F_UFO,
        )?;
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn check(&self, rc: libc::c_int, what: &'static str) -> Result<(), TapError> {
        if rc < 0 {
            return Err(TapError::Ioctl {
                what,
                name: self.name.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// A tap without queues, for unit tests of frame handling.
    #[cfg(test)]
    pub(crate) fn detached() -> Tap {
        Tap {
            name: String::new(),
            queues: Vec::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Queue `i`'s fd, if there is one.
    pub fn queue(&self, i: usize) -> Option<&File> {
        self.queues.get(i)
    }

    /// Attaches queue `i` to the tap, or detaches it so the tap steers no frames to it
    /// (`TUNSETQUEUE`; multi-queue taps only). Already in that state is fine.
    pub fn set_queue_attached(&self, i: usize, attached: bool) -> Result<(), TapError> {
        let Some(q) = self.queues.get(i) else {
            return Ok(());
        };
        if self.queues.len() < 2 {
            return Ok(());
        }
        let flag = if attached {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        let mut req = IfReq::new("", flag);
        // SAFETY: TUNSETQUEUE reads one `struct ifreq` (the flags), `req`, alive for the call.
        let rc = unsafe { libc::ioctl(q.as_raw_fd(), libc::TUNSETQUEUE, &mut req) };
        if rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            // Already attached (or detached).
            return Ok(());
        }
        self.check(rc, "TUNSETQUEUE")
    }

    /// Which offloads the tap may use on frames it hands us (`TUN_F_*`); per device.
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        let Some(q) = self.queues.first() else {
            return Ok(());
        };
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let rc = unsafe { libc::ioctl(q.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) };
        self.check(rc, "TUNSETOFFLOAD")
    }
}

fn adopt(fd: RawFd) -> Result<(OwnedFd, String), TapError> {
    if fd < 0 {
        return Err(TapError::BadFd(fd));
    }
    // SAFETY: F_GETFD reads no memory; on a number that is not an open fd it fails (EBADF).
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(TapError::BadFd(fd));
    }
    let mut req = IfReq::new("", 0);
    // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`, which is live and correctly
    // sized; on an fd that is not a tun/tap queue it fails without writing.
    let rc = unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req) };
    if rc < 0 {
        return Err(TapError::NotATap(fd));
    }
    let flags = libc::c_int::from(req.flags);
    if flags & libc::IFF_TAP == 0 {
        return Err(TapError::NotATap(fd));
    }
    if flags & libc::IFF_VNET_HDR == 0 || flags & libc::IFF_NO_PI == 0 {
        return Err(TapError::WrongFlags(fd));
    }
    // SAFETY: `fd` is open (F_GETFD succeeded) and was handed to this process for the tap;
    // this is the only place that takes it, once, at start-up.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    fcntl(owned.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|_| TapError::BadFd(fd))?;
    let fl = fcntl(owned.as_fd(), FcntlArg::F_GETFL).map_err(|_| TapError::BadFd(fd))?;
    let fl = OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK;
    fcntl(owned.as_fd(), FcntlArg::F_SETFL(fl)).map_err(|_| TapError::BadFd(fd))?;
    Ok((owned, req.name()))
}

// NO_CANCEL: frames go through `libc::syscall` rather than glibc's `read`/`write`/`writev`.
// Those are pthread cancellation points, and in a threaded process each call wraps the system
// call in `__pthread_enable_asynccancel`/`__pthread_disable_asynccancel` (two atomic updates of
// the thread's cancel state): about 5% of the transmit thread's time at one frame per call
// (perf, 64-byte frames). Nothing here uses thread cancellation. Same system calls, so the
// seccomp allowlist is unchanged.

/// Reads one frame (header included) into `buf`. `Ok(None)`: nothing waiting.
pub fn read_frame(fd: BorrowedFd<'_>, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    loop {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which is a live,
        // exclusively borrowed buffer. (`syscall`, not libc's `read`: see `NO_CANCEL`.)
        let n =
            unsafe { libc::syscall(libc::SYS_read, fd.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::Interrupted => continue,
            std::io::ErrorKind::WouldBlock => return Ok(None),
            // A detached queue (the driver uses fewer pairs): nothing will come.
            _ if e.raw_os_error() == Some(libc::EBADFD) => return Ok(None),
            _ => return Err(e),
        }
    }
}

/// Writes one frame (header included) from `buf`, as one packet.
pub fn write_frame(fd: BorrowedFd<'_>, buf: &[u8]) -> std::io::Result<usize> {
    loop {
        // SAFETY: the kernel reads at most `buf.len()` bytes from `buf`, a live buffer.
        // (`syscall`, not libc's `write`: see `NO_CANCEL`.)
        let n = unsafe { libc::syscall(libc::SYS_write, fd.as_raw_fd(), buf.as_ptr(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Writes one frame, gathered from `iov`, as one packet.
///
/// # Safety
///
/// Every iovec must describe memory that stays mapped and readable for the call. (The guest
/// may change it meanwhile: the kernel copies it once and validates what it copied.)
pub unsafe fn write_iov(fd: BorrowedFd<'_>, iov: &[libc::iovec]) -> std::io::Result<usize> {
    let count = libc::c_int::try_from(iov.len())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: writev reads `count` iovecs from `iov` and the memory they describe, which
        // the caller guarantees is mapped and readable for the call. (`syscall`, not libc's
        // `writev`: see `NO_CANCEL`.)
        let n = unsafe { libc::syscall(libc::SYS_writev, fd.as_raw_fd(), iov.as_ptr(), count) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
