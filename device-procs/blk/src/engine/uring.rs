//! io_uring engine: one ring per queue, as deep as the virtqueue, completions signalled on
//! an eventfd registered with the ring.
//!
//! The image is a registered file (no file lookup per request), and a one-buffer request
//! uses READ/WRITE rather than READV/WRITEV (no iovec copy). A commit with nothing queued
//! makes no system call.
//!
//! With a kernel polling thread (`--sq-poll-ms`, io_uring's SQPOLL) the queue's thread only
//! writes submission entries: a kernel thread picks them up and runs them, so the copies of
//! page-cache reads move off the queue's thread onto a second CPU, and a commit makes no
//! system call while that thread is awake. The thread spins for the idle time after the last
//! submission before it sleeps, so it costs a CPU while the disk is busy. One such thread
//! serves all the queues of a device ([`SqPoller`]: the first ring makes it, the others attach
//! to it), optionally on a CPU of its own.
//!
//! Adaptive polling (the default, [`SqPoller::adaptive`]) gives each queue two rings: its own,
//! and one that such a thread serves, made the first time the queue tries it. The
//! [`Chooser`] picks the ring for the next submissions at each commit, from the requests
//! completed per epoch in each; completions are reaped from both, and a token remembers its
//! ring until then.
//!
//! With `sync_writes` (the `auto` engine on a buffered image) writes bypass the ring and run
//! at once on the queue's thread: a filesystem that cannot do nonblocking buffered writes
//! (ext4) makes io_uring hand every write to a kernel worker thread, which costs two
//! context switches per write and serialises on the inode anyway, whereas a buffered write
//! is just a copy into the page cache.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use io_uring::{opcode, types, IoUring};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::chooser::{Chooser, Mode};
use super::{run_sync, Completion, Engine, EngineError, Op};
use crate::disk::{advance, Disk};

/// Idle time after which the kernel polling thread of the adaptive default sleeps: the least
/// io_uring allows, so that a queue that stopped using it costs at most that much spinning.
pub const ADAPTIVE_IDLE_MS: u32 = 1;

/// The kernel thread that polls the submission queues of one device's rings.
#[derive(Debug)]
pub struct SqPoller {
    idle_ms: u32,
    cpu: Option<u32>,
    /// Rings use it only when it measures faster ([`Chooser`]), each beside a ring of its
    /// own that the queue's thread submits.
    adaptive: bool,
    /// Test hook: adaptive rings switch at every commit.
    #[cfg(test)]
    alternate: bool,
    /// A ring served by the thread (a duplicate of its fd, which keeps the thread alive), for
    /// later rings to attach to.
    first: Mutex<Option<OwnedFd>>,
}

impl SqPoller {
    /// A poller that sleeps after `idle_ms` idle milliseconds, bound to `cpu` if given. The
    /// thread itself starts with the first ring.
    pub fn new(idle_ms: u32, cpu: Option<u32>) -> Self {
        SqPoller {
            idle_ms,
            cpu,
            adaptive: false,
            #[cfg(test)]
            alternate: false,
            first: Mutex::new(None),
        }
    }

    /// Test hook: an adaptive poller whose rings switch between the queue's thread and the
    /// polling thread at every commit.
    #[cfg(test)]
    pub fn alternating() -> Self {
        SqPoller {
            alternate: true,
            ..SqPoller::adaptive()
        }
    }

    /// The default: a thread used only when a queue measures it faster (the [`Chooser`]),
    /// sleeping after [`ADAPTIVE_IDLE_MS`] idle. It starts with the first queue that tries it.
    pub fn adaptive() -> Self {
        SqPoller {
            adaptive: true,
            ..SqPoller::new(ADAPTIVE_IDLE_MS, None)
        }
    }

    /// The chooser of a queue using this (adaptive) poller.
    fn chooser(&self) -> Chooser {
        #[cfg(test)]
        if self.alternate {
            return Chooser::alternating();
        }
        Chooser::new()
    }

    /// A ring of `entries` served by this poller. Where the kernel refuses (no SQPOLL, or
    /// the CPU is not allowed), a ring without one, with a warning.
    fn ring(&self, entries: u32) -> std::io::Result<IoUring> {
        // Poisoned only if a thread panicked while holding it; the fd inside is still good.
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        let build = |attach: Option<&OwnedFd>| {
            let mut builder = IoUring::builder();
            builder.setup_sqpoll(self.idle_ms);
            if let Some(cpu) = self.cpu {
                builder.setup_sqpoll_cpu(cpu);
            }
            if let Some(fd) = attach {
                builder.setup_attach_wq(fd.as_raw_fd());
            }
            builder.build(entries)
        };
        // Attach to the running thread; should that fail, start another.
        let attached = first.as_ref().and_then(|fd| build(Some(fd)).ok());
        let ring = match attached {
            Some(ring) => ring,
            None => match build(None) {
                Ok(ring) => {
                    // SAFETY: the ring's fd is open for as long as `ring` lives, which is
                    // longer than this borrow.
                    let fd = unsafe { BorrowedFd::borrow_raw(ring.as_raw_fd()) };
                    *first = fd.try_clone_to_owned().ok();
                    ring
                }
                Err(e) => {
                    log::warn!(
                        "io_uring: no kernel polling thread ({e}); submitting from the queue's thread"
                    );
                    IoUring::new(entries)?
                }
            },
        };
        Ok(ring)
    }
}

impl std::fmt::Display for SqPoller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.adaptive {
            write!(f, "a kernel polling thread where it measures faster")?;
        } else {
            write!(f, "a kernel polling thread")?;
        }
        write!(f, " (sleeps after {} ms idle", self.idle_ms)?;
        match self.cpu {
            Some(cpu) => write!(f, ", on CPU {cpu})"),
            None => write!(f, ")"),
        }
    }
}

pub struct UringEngine {
    /// The queue's thread submits to this ring, or with `--sq-poll-ms` the polling thread.
    ring: IoUring,
    /// Adaptive polling: a second ring the polling thread serves, made the first time the
    /// chooser tries it, and the chooser.
    polled: Option<IoUring>,
    adaptive: Option<Adaptive>,
    /// Where submissions go now.
    mode: Mode,
    disk: Arc<Disk>,
    eventfd: EventFd,
    depth: u16,
    /// Operations in flight, by token, with the ring they went to: they own the iovec arrays
    /// the kernel reads.
    ops: Vec<Option<(Op, Mode)>>,
    /// Operations in flight on `ring` and on `polled`.
    in_flight: [usize; 2],
    /// Writes run synchronously; their completions wait here to be reaped.
    sync_writes: bool,
    done: Vec<Completion>,
}

struct Adaptive {
    poller: Arc<SqPoller>,
    chooser: Chooser,
}

fn slot(mode: Mode) -> usize {
    match mode {
        Mode::Inline => 0,
        Mode::Polled => 1,
    }
}

impl UringEngine {
    /// All operations through the ring, submitted by the calling thread.
    pub fn new(disk: Arc<Disk>, depth: u16) -> Result<Self, EngineError> {
        Self::with_options(disk, depth, false, None)
    }

    /// With `sync_writes`, writes run synchronously in `submit` and only reads and flushes go
    /// through the ring. With a `poller`, its kernel thread submits what the ring is given
    /// (an adaptive one: when the [`Chooser`] measures it faster).
    pub fn with_options(
        disk: Arc<Disk>,
        depth: u16,
        sync_writes: bool,
        poller: Option<&Arc<SqPoller>>,
    ) -> Result<Self, EngineError> {
        let entries = ring_entries(depth);
        let ring = match poller.filter(|p| !p.adaptive) {
            Some(poller) => poller.ring(entries),
            None => IoUring::new(entries),
        }
        .map_err(EngineError::Setup)?;
        let eventfd =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| EngineError::Setup(e.into()))?;
        prepare(&ring, &eventfd, &disk)?;
        Ok(UringEngine {
            ring,
            polled: None,
            adaptive: poller.filter(|p| p.adaptive).map(|p| Adaptive {
                poller: Arc::clone(p),
                chooser: p.chooser(),
            }),
            mode: Mode::Inline,
            disk,
            eventfd,
            depth,
            ops: Vec::new(),
            in_flight: [0, 0],
            sync_writes,
            done: Vec::new(),
        })
    }

    /// Where the chooser sends the next submissions; the polled ring is made on first use.
    fn choose(&mut self) {
        let Some(adaptive) = &mut self.adaptive else {
            return;
        };
        let mode = adaptive.chooser.mode();
        if mode == Mode::Polled && self.polled.is_none() {
            let made = adaptive
                .poller
                .ring(ring_entries(self.depth))
                .map_err(EngineError::Setup)
                .and_then(|ring| prepare(&ring, &self.eventfd, &self.disk).map(|()| ring));
            match made {
                // The kernel refused the polling thread (`SqPoller::ring` said so): nothing
                // to choose between.
                Ok(ring) if !ring.params().is_setup_sqpoll() => {
                    self.adaptive = None;
                    return;
                }
                Ok(ring) => self.polled = Some(ring),
                Err(e) => {
                    log::warn!(
                        "io_uring: no kernel polling thread for this queue ({}); \
                         submitting from the queue's thread",
                        isola_device_common::logging::chain(&e)
                    );
                    self.adaptive = None;
                    return;
                }
            }
        }
        self.mode = mode;
    }

    fn ring_of(&mut self, mode: Mode) -> &mut IoUring {
        match (mode, &mut self.polled) {
            (Mode::Polled, Some(ring)) => ring,
            _ => &mut self.ring,
        }
    }
}

fn ring_entries(depth: u16) -> u32 {
    u32::from(depth.max(1)).next_power_of_two()
}

/// Completions signalled on `eventfd`, the image as registered file 0.
fn prepare(ring: &IoUring, eventfd: &EventFd, disk: &Disk) -> Result<(), EngineError> {
    ring.submitter()
        .register_eventfd(eventfd.as_fd().as_raw_fd())
        .map_err(EngineError::Setup)?;
    ring.submitter()
        .register_files(&[disk.fd().as_raw_fd()])
        .map_err(EngineError::Setup)?;
    Ok(())
}

/// Submits what `ring` holds, retrying on EINTR.
fn submit_all(ring: &mut IoUring) -> Result<(), EngineError> {
    if ring.submission().is_empty() {
        return Ok(());
    }
    loop {
        match ring.submit() {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(EngineError::Submit(e)),
        }
    }
}

/// A short transfer: finish the rest synchronously (the kernel may split large I/O).
fn finish_short(disk: &Disk, op: &Op, done: usize) -> std::io::Result<()> {
    let (offset, iov, write) = match op {
        Op::Read { offset, iov } => (*offset, iov, false),
        Op::Write { offset, iov } => (*offset, iov, true),
        Op::Flush => return Ok(()),
    };
    if done == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let mut rest = iov.as_slice().to_vec();
    let skip = advance(&mut rest, done);
    let offset = offset + done as u64;
    // SAFETY: `rest` is `op`'s list with its first `done` bytes dropped: sub-ranges of
    // entries whose memory stays valid until `op` completes (the `IoVecs` contract), and
    // `op` is still being performed.
    unsafe {
        if write {
            disk.write_at(&rest[skip..], offset)
        } else {
            disk.read_at(&rest[skip..], offset)
        }
    }
}

impl Engine for UringEngine {
    fn submit(&mut self, token: usize, op: Op) -> Result<(), EngineError> {
        if self.sync_writes && matches!(op, Op::Write { .. }) {
            let result = run_sync(&self.disk, &op);
            self.done.push(Completion { token, result });
            return Ok(());
        }
        // Index 0 of the registered files: the image.
        let fd = types::Fixed(0);
        // A 4 GiB chain is split by the chain walk's bound; one buffer fits a u32.
        let entry = match &op {
            Op::Read { offset, iov } => match iov.as_slice() {
                [one] => opcode::Read::new(fd, one.iov_base.cast(), one.iov_len as u32)
                    .offset(*offset)
                    .build(),
                many => opcode::Readv::new(fd, many.as_ptr(), many.len() as u32)
                    .offset(*offset)
                    .build(),
            },
            Op::Write { offset, iov } => match iov.as_slice() {
                [one] => {
                    opcode::Write::new(fd, one.iov_base.cast_const().cast(), one.iov_len as u32)
                        .offset(*offset)
                        .build()
                }
                many => opcode::Writev::new(fd, many.as_ptr(), many.len() as u32)
                    .offset(*offset)
                    .build(),
            },
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(token as u64);
        if self.ops.len() <= token {
            self.ops.resize_with(token + 1, || None);
        }
        // Moving `op` into the table does not move a longer list's iovec array: it is on the
        // heap (a one-buffer op names its buffer in the entry itself).
        let mode = self.mode;
        self.ops[token] = Some((op, mode));
        let ring = self.ring_of(mode);
        loop {
            // SAFETY: `push` needs every buffer the entry names to stay valid until its
            // completion is reaped. A READV/WRITEV's iovec array is the heap array of the list
            // in `self.ops[token]`, which stays there until then (a READ/WRITE names its one
            // buffer in the entry); the memory the buffers are in is kept mapped by the
            // request that owns the token; the image's fd stays open as long as `self.disk`
            // does, which outlives the rings.
            if unsafe { ring.submission().push(&entry) }.is_ok() {
                break;
            }
            // Submission queue full: hand what is queued to the kernel, then retry.
            ring.submit().map_err(EngineError::Submit)?;
        }
        self.in_flight[slot(mode)] += 1;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), EngineError> {
        submit_all(&mut self.ring)?;
        if let Some(polled) = &mut self.polled {
            submit_all(polled)?;
        }
        self.choose();
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        let before = out.len();
        out.append(&mut self.done);
        let rings = std::iter::once(&mut self.ring).chain(self.polled.as_mut());
        for ring in rings {
            // One pass over the completion queue: its head is published once, at the end.
            for cqe in ring.completion() {
                let (token, res) = (cqe.user_data() as usize, cqe.result());
                let Some((op, mode)) = self.ops.get_mut(token).and_then(Option::take) else {
                    continue;
                };
                self.in_flight[slot(mode)] -= 1;
                let result = if res < 0 {
                    Err(std::io::Error::from_raw_os_error(-res))
                } else {
                    let expected = match &op {
                        Op::Read { iov, .. } | Op::Write { iov, .. } => iov.len_bytes(),
                        Op::Flush => 0,
                    };
                    if (res as u64) < expected {
                        finish_short(&self.disk, &op, res as usize)
                    } else {
                        Ok(())
                    }
                };
                out.push(Completion { token, result });
            }
        }
        if let Some(adaptive) = &mut self.adaptive {
            adaptive.chooser.completed(out.len() - before);
        }
    }

    fn wait(&mut self) -> Result<(), EngineError> {
        // Either ring will finish what it holds; wait on one that holds something.
        let ring = match self.in_flight {
            [0, 0] => return Ok(()),
            [_, 0] => &mut self.ring,
            _ => self.ring_of(Mode::Polled),
        };
        match ring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e) => Err(EngineError::Submit(e)),
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight[0] + self.in_flight[1] + self.done.len()
    }

    fn offloaded(&self) -> bool {
        self.mode == Mode::Polled
    }

    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.eventfd.as_fd())
    }

    fn ready(&mut self) -> bool {
        !self.done.is_empty()
            || (self.in_flight[0] > 0 && !self.ring.completion().is_empty())
            || (self.in_flight[1] > 0
                && self
                    .polled
                    .as_mut()
                    .is_some_and(|r| !r.completion().is_empty()))
    }
}

impl Drop for UringEngine {
    /// Operations still in flight (a queue that failed rather than drained) write into
    /// memory their requests keep mapped: wait for them before that memory can go.
    fn drop(&mut self) {
        for mode in [Mode::Inline, Mode::Polled] {
            let mut left = self.in_flight[slot(mode)];
            let ring = self.ring_of(mode);
            while left > 0 {
                match ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    // The ring is unusable: nothing more will complete through it.
                    Err(_) => break,
                }
                let reaped = ring.completion().count();
                left = left.saturating_sub(reaped);
            }
        }
    }
}
