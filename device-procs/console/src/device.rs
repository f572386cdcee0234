//! virtio-console over its queues and guest memory: the handlers of a port's transmit and
//! receive queues and of the two control queues. Unit-testable on hand-built queues.
//!
//! Transmit (guest -> user): one buffer at a time, in order. Its bytes go to the log first,
//! then to the interactive endpoint; the buffer is returned to the guest only when both have
//! taken all of it. While the endpoint is slow the buffer stays taken and the next ones stay
//! in the guest's ring: that is the back-pressure, and it costs no memory here. A socket with
//! nobody attached discards output (a console must not stop the guest because nobody looks).
//!
//! Receive (user -> guest): one guest buffer is held while waiting for input; input is read
//! straight into a bounded copy of at most 64 KiB and written to that buffer. With no guest
//! buffer posted, input stays in the kernel's socket or pty buffer.
//!
//! Exactly-once into the log across a crash: see [`crate::record`]. Before the first byte of
//! a buffer is appended the log offset is recorded; a resubmitted buffer whose head matches a
//! live record skips what the log already holds. A record is live only while its head is
//! still in flight: when a queue starts with no chain taken, a record whose head is not among
//! the heads waiting for resubmission is stale (its buffer was returned) and is cleared.
//!
//! Malformed chains (outside guest memory, wrong direction, looping) are returned with
//! nothing written and one rate-limited log line; the queue keeps serving.

use std::sync::Arc;

use isola_device_common::chain::{self, ChainError, Segment};
use isola_device_common::logging::{chain as error_chain, RateLimiter};
use isola_device_common::{DescriptorChain, Progress, QueueContext, QueueError, QueueHandler};
use std::os::fd::{AsFd, BorrowedFd};

use crate::control::{Control, Header, HEADER};
use crate::port::{Moved, Port};

/// The most bytes moved per system call into the log or out of the user side, and the size
/// of each queue's copy buffer. Output to the user side goes straight from guest memory.
pub const CHUNK: usize = 64 * 1024;
/// Most guest buffers handed to one `writev`.
const MAX_IOV: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ChainRefusal {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("device-writable buffer in a chain the device should only read")]
    Writable,
    #[error("device-readable buffer in a chain the device should fill")]
    Readable,
    #[error("control message of {0} bytes is shorter than its 8-byte header")]
    ShortControl(u64),
    #[error("control buffer of {have} bytes cannot hold a {need}-byte message")]
    SmallControl { have: u64, need: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum ConsoleQueueError {
    #[error("cannot update the log's delivery record")]
    Record(#[source] crate::record::RecordError),
    #[error("cannot read the log's length")]
    LogLength(#[source] std::io::Error),
}

fn device_err(e: ConsoleQueueError) -> QueueError {
    QueueError::Device(Box::new(e))
}

/// A chain the device reads (`writable == false`) or fills, checked whole before use.
fn checked_segments(chain: &DescriptorChain, writable: bool) -> Result<Vec<Segment>, ChainRefusal> {
    let segs = chain.segments()?;
    if segs.iter().any(|s| s.writable != writable) {
        return Err(if writable {
            ChainRefusal::Readable
        } else {
            ChainRefusal::Writable
        });
    }
    chain::host_slices(chain.memory(), &segs)?;
    Ok(segs)
}

struct Warner {
    what: String,
    limiter: RateLimiter,
}

impl Warner {
    fn new(what: String) -> Self {
        Warner {
            what,
            limiter: RateLimiter::new(10),
        }
    }

    fn warn(&mut self, head: u16, e: &dyn std::error::Error) {
        if let Some(dropped) = self.limiter.allow() {
            let note = if dropped > 0 {
                format!(" ({dropped} similar lines dropped)")
            } else {
                String::new()
            };
            log::warn!(
                "{}: buffer {head}: {}; returned unused{note}",
                self.what,
                error_chain(e)
            );
        }
    }
}

/// Copies `buf.len()` bytes from offset `at` of a chain's buffers.
fn read_at(chain: &DescriptorChain, segs: &[Segment], at: u64, buf: &mut [u8]) -> bool {
    chain::split_at(segs, at)
        .and_then(|(_, rest)| chain::read_bytes(chain.memory(), &rest, buf))
        .is_ok()
}

struct Current {
    chain: DescriptorChain,
    segs: Vec<Segment>,
    total: u64,
    log_done: u64,
    user_done: u64,
}

/// The transmit queue of one port.
pub struct TxQueue {
    port: Arc<Port>,
    control: Option<Arc<Control>>,
    current: Option<Current>,
    buf: Vec<u8>,
    warner: Warner,
}

impl TxQueue {
    pub fn new(port: Arc<Port>, control: Option<Arc<Control>>) -> Self {
        let what = format!("port {} transmit", port.id);
        TxQueue {
            port,
            control,
            current: None,
            buf: vec![0u8; CHUNK],
            warner: Warner::new(what),
        }
    }

    /// With no chain taken, a record whose head is not waiting for resubmission names a
    /// buffer that was already returned: forget it before taking anything.
    fn forget_stale_record(&mut self, q: &QueueContext<'_>) -> Result<(), QueueError> {
        let Some(mut log) = self.port.log() else {
            return Ok(());
        };
        if let Some((head, _)) = log.record.get() {
            if !q.pending_resubmits().any(|h| h == head) {
                log.record
                    .clear()
                    .map_err(|e| device_err(ConsoleQueueError::Record(e)))?;
            }
        }
        Ok(())
    }

    fn start(
        &mut self,
        chain: DescriptorChain,
        resubmitted: bool,
    ) -> Result<Result<Current, ChainRefusal>, QueueError> {
        let segs = match checked_segments(&chain, false) {
            Ok(segs) => segs,
            Err(e) => return Ok(Err(e)),
        };
        let total = chain::total_len(&segs);
        let head = chain.head();
        let mut log_done = 0;
        if let Some(mut log) = self.port.log() {
            let len = log
                .file
                .metadata()
                .map_err(|e| device_err(ConsoleQueueError::LogLength(e)))?
                .len();
            match log.record.get() {
                Some((h, start)) if resubmitted && h == head => {
                    log_done = len.saturating_sub(start).min(total);
                    log::info!(
                        "port {}: resubmitted buffer {head}: {log_done} of its {total} bytes \
                         are already in the log, appending the rest",
                        self.port.id
                    );
                }
                _ => log
                    .record
                    .set(head, len)
                    .map_err(|e| device_err(ConsoleQueueError::Record(e)))?,
            }
        }
        Ok(Ok(Current {
            chain,
            segs,
            total,
            log_done,
            // The user side resumes where the log did: a user attached now is a new one.
            user_done: log_done,
        }))
    }

    /// Moves the current buffer on; `false` if the endpoint is full.
    fn deliver(&mut self) -> bool {
        let Some(cur) = self.current.as_mut() else {
            return true;
        };
        if let Some(mut log) = self.port.log() {
            while cur.log_done < cur.total {
                let n = (cur.total - cur.log_done).min(CHUNK as u64) as usize;
                let ok = read_at(&cur.chain, &cur.segs, cur.log_done, &mut self.buf[..n])
                    && std::io::Write::write_all(&mut log.file, &self.buf[..n]).is_ok();
                if !ok {
                    log::error!(
                        "port {}: cannot append to {}; the rest of buffer {} is not logged",
                        self.port.id,
                        log.path.display(),
                        cur.chain.head()
                    );
                    cur.log_done = cur.total;
                    break;
                }
                cur.log_done += n as u64;
            }
        }
        if !self.port.has_endpoint() {
            return true;
        }
        while cur.user_done < cur.total {
            let Ok((_, rest)) = chain::split_at(&cur.segs, cur.user_done) else {
                return true;
            };
            let Ok(slices) = chain::host_slices(cur.chain.memory(), &rest) else {
                return true;
            };
            let iov: Vec<libc::iovec> = slices
                .iter()
                .take(MAX_IOV)
                .map(|s| libc::iovec {
                    iov_base: s.ptr_guard().as_ptr().cast_mut().cast::<libc::c_void>(),
                    iov_len: s.len(),
                })
                .collect();
            // SAFETY: the iovecs are slices of guest memory that `host_slices` checked to be
            // inside the mapping; `cur.chain` holds that mapping (an Arc) for the whole call.
            match unsafe { self.port.write_iov(&iov) } {
                Moved::Bytes(k) => cur.user_done += k as u64,
                Moved::WouldBlock => {
                    self.port.want(false);
                    return false;
                }
                Moved::Detached => return true,
                Moved::Closed => {
                    if let Some(c) = &self.control {
                        c.host_connected(self.port.id, false);
                    }
                    return true;
                }
            }
        }
        true
    }
}

impl QueueHandler for TxQueue {
    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.port.tx_event.as_fd())
    }

    fn process(&mut self, q: &mut QueueContext<'_>) -> Result<Progress, QueueError> {
        loop {
            if self.current.is_none() {
                self.forget_stale_record(q)?;
                let Some((chain, resubmitted)) = q.pop_tracked()? else {
                    return Ok(Progress::Idle);
                };
                let head = chain.head();
                match self.start(chain, resubmitted)? {
                    Ok(cur) => self.current = Some(cur),
                    Err(e) => {
                        self.warner.warn(head, &e);
                        q.complete(head, 0)?;
                        continue;
                    }
                }
            }
            if !self.deliver() {
                return Ok(Progress::Blocked);
            }
            if let Some(cur) = self.current.take() {
                q.complete(cur.chain.head(), 0)?;
                if let Some(mut log) = self.port.log() {
                    log.record
                        .clear()
                        .map_err(|e| device_err(ConsoleQueueError::Record(e)))?;
                }
            }
        }
    }
}

/// The receive queue of one port.
pub struct RxQueue {
    port: Arc<Port>,
    control: Option<Arc<Control>>,
    held: Option<(DescriptorChain, Vec<Segment>, usize)>,
    buf: Vec<u8>,
    warner: Warner,
}

impl RxQueue {
    pub fn new(port: Arc<Port>, control: Option<Arc<Control>>) -> Self {
        let what = format!("port {} receive", port.id);
        RxQueue {
            port,
            control,
            held: None,
            buf: vec![0u8; CHUNK],
            warner: Warner::new(what),
        }
    }
}

impl QueueHandler for RxQueue {
    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.port.rx_event.as_fd())
    }

    fn process(&mut self, q: &mut QueueContext<'_>) -> Result<Progress, QueueError> {
        if !self.port.has_endpoint() {
            // A log-only port has no input: its receive buffers wait unused. Blocked, not
            // Idle: it took none of the available buffers (Idle made the worker look again
            // at once, for ever, and never see a GET_VRING_BASE).
            return Ok(Progress::Blocked);
        }
        loop {
            if self.held.is_none() {
                let Some(chain) = q.pop()? else {
                    return Ok(Progress::Idle);
                };
                let head = chain.head();
                match checked_segments(&chain, true) {
                    Ok(segs) => {
                        let cap = chain::total_len(&segs).min(CHUNK as u64) as usize;
                        if cap == 0 {
                            q.complete(head, 0)?;
                            continue;
                        }
                        self.held = Some((chain, segs, cap));
                    }
                    Err(e) => {
                        self.warner.warn(head, &e);
                        q.complete(head, 0)?;
                        continue;
                    }
                }
            }
            let Some((chain, segs, cap)) = self.held.as_ref() else {
                continue;
            };
            match self.port.read(&mut self.buf[..*cap]) {
                Moved::Bytes(n) => {
                    let head = chain.head();
                    let written = chain::write_bytes(chain.memory(), segs, &self.buf[..n]);
                    if let Err(e) = &written {
                        self.warner.warn(head, e);
                    }
                    q.complete(head, if written.is_ok() { n as u32 } else { 0 })?;
                    self.held = None;
                }
                Moved::WouldBlock => {
                    self.port.want(true);
                    return Ok(Progress::Blocked);
                }
                Moved::Detached => return Ok(Progress::Blocked),
                Moved::Closed => {
                    if let Some(c) = &self.control {
                        c.host_connected(self.port.id, false);
                    }
                    return Ok(Progress::Blocked);
                }
            }
        }
    }
}

/// The control transmit queue (driver -> device).
pub struct ControlTx {
    control: Arc<Control>,
    warner: Warner,
    protocol: RateLimiter,
}

impl ControlTx {
    pub fn new(control: Arc<Control>) -> Self {
        ControlTx {
            control,
            warner: Warner::new("control transmit".into()),
            protocol: RateLimiter::new(10),
        }
    }

    fn read_header(chain: &DescriptorChain) -> Result<Header, ChainRefusal> {
        let segs = checked_segments(chain, false)?;
        let total = chain::total_len(&segs);
        if total < HEADER as u64 {
            return Err(ChainRefusal::ShortControl(total));
        }
        let mut raw = [0u8; HEADER];
        chain::read_bytes(chain.memory(), &segs, &mut raw)?;
        Ok(Header::decode(&raw))
    }
}

impl QueueHandler for ControlTx {
    fn process(&mut self, q: &mut QueueContext<'_>) -> Result<Progress, QueueError> {
        while let Some(chain) = q.pop()? {
            let head = chain.head();
            match Self::read_header(&chain) {
                Ok(h) => {
                    if let Err(e) = self.control.handle(h) {
                        if let Some(dropped) = self.protocol.allow() {
                            log::warn!(
                                "control message {h:?} dropped: {e} ({dropped} similar lines dropped)"
                            );
                        }
                    }
                }
                Err(e) => self.warner.warn(head, &e),
            }
            q.complete(head, 0)?;
        }
        Ok(Progress::Idle)
    }
}

/// The control receive queue (device -> driver).
pub struct ControlRx {
    control: Arc<Control>,
    warner: Warner,
}

impl ControlRx {
    pub fn new(control: Arc<Control>) -> Self {
        ControlRx {
            control,
            warner: Warner::new("control receive".into()),
        }
    }
}

impl QueueHandler for ControlRx {
    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.control.event.as_fd())
    }

    fn process(&mut self, q: &mut QueueContext<'_>) -> Result<Progress, QueueError> {
        while let Some(msg) = self.control.take() {
            let Some(chain) = q.pop()? else {
                self.control.put_back(msg);
                return Ok(Progress::Idle);
            };
            let head = chain.head();
            let result = checked_segments(&chain, true).and_then(|segs| {
                let have = chain::total_len(&segs);
                if have < msg.len() as u64 {
                    return Err(ChainRefusal::SmallControl {
                        have,
                        need: msg.len(),
                    });
                }
                chain::write_bytes(chain.memory(), &segs, &msg)?;
                Ok(msg.len() as u32)
            });
            match result {
                Ok(len) => q.complete(head, len)?,
                Err(e) => {
                    // The message is lost with the bad buffer; the driver asked for that.
                    self.warner.warn(head, &e);
                    q.complete(head, 0)?;
                }
            }
        }
        Ok(Progress::Idle)
    }
}
