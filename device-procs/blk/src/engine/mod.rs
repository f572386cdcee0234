//! I/O engines: how reads, writes and flushes reach the image.
//!
//! - [`SyncEngine`]: `preadv`/`pwritev`/`fdatasync` on the queue's worker thread, one request
//!   at a time. Simple, and the lowest latency at queue depth 1.
//! - [`UringEngine`]: io_uring, many requests in flight per queue, completions signalled on
//!   an eventfd the queue worker also waits on.
//! - `auto` (the default): io_uring for reads and flushes; on a buffered image writes run
//!   synchronously like the sync engine, because buffered writes are copies into the page
//!   cache that io_uring hands to a kernel worker thread on filesystems without nonblocking
//!   buffered writes (ext4), which costs more than the copy. With `--direct` all of it goes
//!   through io_uring.
//!
//! Both take a request with a token, and hand back `(token, result)` completions; a request
//! is only ever reported complete once every byte has been transferred.

pub mod chooser;
mod sync;
mod uring;

use std::os::fd::BorrowedFd;
use std::sync::Arc;

pub use sync::SyncEngine;
pub use uring::{SqPoller, UringEngine};

use crate::disk::Disk;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot set up io_uring")]
    Setup(#[source] std::io::Error),
    #[error("io_uring submission failed")]
    Submit(#[source] std::io::Error),
}

/// Which engine `--engine` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    Sync,
    #[value(name = "io-uring")]
    IoUring,
    /// io_uring for reads and flushes, synchronous writes on a buffered image.
    Auto,
}

/// Scatter-gather list of one request: host addresses inside mapped guest memory or a
/// bounce buffer, which the owner of the request keeps mapped until it completes. A
/// one-buffer list (the usual case) is held inline, so it costs no allocation; a longer one
/// is on the heap, where its address does not change when the list moves (io_uring's READV
/// reads it after submission).
///
/// Entries can only be added through the `unsafe` [`IoVecs::one`] and [`IoVecs::push`], whose
/// callers promise what every user of the list (the engines, [`Disk::read_at`]) relies on:
/// each entry names memory that stays mapped and valid for reads and writes until the
/// operation carrying the list has completed (been reaped) or was dropped unsubmitted.
#[derive(Debug, Default)]
pub struct IoVecs(List);

#[derive(Debug)]
enum List {
    One(libc::iovec),
    Many(Vec<libc::iovec>),
}

impl Default for List {
    fn default() -> Self {
        List::Many(Vec::new())
    }
}

// SAFETY: `Send` needs the raw pointers to stay valid wherever the value moves. They point
// into guest memory mappings or bounce buffers owned (through `Arc`s) by the same request
// as this list (the contract of `one` and `push`), so the mappings live as long as the
// list; only the kernel dereferences them, and one thread at a time owns the request.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// A list of one buffer.
    ///
    /// # Safety
    /// `iov` names `iov_len` bytes that stay mapped and valid for reads and writes until the
    /// operation carrying this list has completed or was dropped unsubmitted.
    pub unsafe fn one(iov: libc::iovec) -> Self {
        IoVecs(List::One(iov))
    }

    /// Appends one buffer.
    ///
    /// # Safety
    /// As for [`IoVecs::one`].
    pub unsafe fn push(&mut self, iov: libc::iovec) {
        match &mut self.0 {
            List::Many(v) if v.is_empty() => self.0 = List::One(iov),
            List::Many(v) => v.push(iov),
            List::One(first) => self.0 = List::Many(vec![*first, iov]),
        }
    }

    /// The entries (raw: reading them is safe, using what they point to is not).
    pub fn as_slice(&self) -> &[libc::iovec] {
        match &self.0 {
            List::One(iov) => std::slice::from_ref(iov),
            List::Many(v) => v,
        }
    }

    pub fn len_bytes(&self) -> u64 {
        self.as_slice().iter().map(|v| v.iov_len as u64).sum()
    }
}

/// One operation on the image.
#[derive(Debug)]
pub enum Op {
    Read { offset: u64, iov: IoVecs },
    Write { offset: u64, iov: IoVecs },
    Flush,
}

/// A finished operation.
#[derive(Debug)]
pub struct Completion {
    pub token: usize,
    pub result: std::io::Result<()>,
}

pub trait Engine: Send {
    /// Queues `op`. The sync engine performs it at once.
    fn submit(&mut self, token: usize, op: Op) -> Result<(), EngineError>;
    /// Starts everything queued (one system call for io_uring).
    fn commit(&mut self) -> Result<(), EngineError>;
    /// Moves finished operations to `out`, without blocking.
    fn reap(&mut self, out: &mut Vec<Completion>);
    /// Blocks until at least one operation finishes, if any is in flight.
    fn wait(&mut self) -> Result<(), EngineError>;
    /// Operations submitted and not yet reaped.
    fn in_flight(&self) -> usize;
    /// Eventfd signalled when operations finish (io_uring only).
    fn completion_fd(&self) -> Option<BorrowedFd<'_>>;
    /// Whether finished operations wait to be reaped (a cheap check, for polling).
    fn ready(&mut self) -> bool {
        false
    }
    /// Whether a kernel thread runs what is submitted now (SQPOLL): the queue's thread then
    /// has nothing to gain by spinning on its CPU, which the kernel thread may need.
    fn offloaded(&self) -> bool {
        false
    }
}

/// An engine of `kind` for one queue of `depth` entries; io_uring engines served by
/// `poller`'s kernel thread, if given.
pub fn new_engine(
    kind: EngineKind,
    disk: Arc<Disk>,
    depth: u16,
    poller: Option<&Arc<SqPoller>>,
) -> Result<Box<dyn Engine>, EngineError> {
    Ok(match kind {
        EngineKind::Sync => Box::new(SyncEngine::new(disk)),
        EngineKind::IoUring => Box::new(UringEngine::with_options(disk, depth, false, poller)?),
        EngineKind::Auto => {
            let sync_writes = !disk.direct();
            match UringEngine::with_options(Arc::clone(&disk), depth, sync_writes, poller) {
                Ok(engine) => Box::new(engine),
                // E.g. a sandbox that refuses io_uring after the start-up check passed.
                Err(e) => {
                    log::warn!(
                        "io_uring is not available ({}); this queue uses the sync engine",
                        isola_device_common::logging::chain(&e)
                    );
                    Box::new(SyncEngine::new(disk))
                }
            }
        }
    })
}

/// Performs `op` synchronously (the sync engine, and the tail of a short io_uring transfer).
pub(crate) fn run_sync(disk: &Disk, op: &Op) -> std::io::Result<()> {
    match op {
        // SAFETY: an `IoVecs` only holds entries whose memory stays mapped and valid for
        // reads and writes until its operation completes (the contract of `IoVecs::one` and
        // `IoVecs::push`); `op` is being performed now, so it has not completed.
        Op::Read { offset, iov } => unsafe { disk.read_at(iov.as_slice(), *offset) },
        // SAFETY: as above.
        Op::Write { offset, iov } => unsafe { disk.write_at(iov.as_slice(), *offset) },
        Op::Flush => disk.flush(),
    }
}
