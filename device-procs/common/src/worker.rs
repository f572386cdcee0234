//! One thread per running queue: waits on its kick eventfd (epoll), runs the device's queue
//! handler, and signals the call eventfd when the driver wants to hear about used buffers
//! (`needs_notification`, which honours EVENT_IDX).
//!
//! A handler may ask for polling ([`QueueHandler::poll_time`]): after a pass the worker keeps
//! kicks suppressed and watches the available ring for a while before it sleeps. A driver that
//! answers a completion with a new request within that time then costs no kick, no eventfd
//! read and no wakeup of a sleeping thread; on machines where a cross-CPU wakeup is slow (VMs)
//! that is most of a request's round trip. The window adapts, as QEMU's event loop polling
//! does: it starts at zero, doubles (from 4 µs, up to the handler's limit) each time the
//! worker slept for less than the limit (a longer window would have caught the event), and
//! halves, down to zero, each time it slept for longer. A queue whose driver is idle or
//! sparse therefore costs no polling at all.
//!
//! A failure of the worker is not silent: it is logged once, the error eventfd (if any) is
//! signalled, and the connection is shut down so the protocol thread drops it and the
//! process waits for the next frontend.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

use crate::device::{Progress, QueueHandler};
use crate::inflight::InflightQueue;
use crate::memory::Memory;
use crate::queue::{QueueContext, QueueError};

const EV_KICK: u64 = 1;
const EV_WAKE: u64 = 2;
const EV_COMPLETION: u64 = 3;
const EV_INPUT: u64 = 4;
/// Smallest non-zero poll window.
const POLL_MIN: Duration = Duration::from_micros(4);

/// The adaptive poll window of one worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PollWindow {
    window: Duration,
}

impl PollWindow {
    /// The worker slept `slept` before its next event; `max` is the handler's limit.
    fn adjust(&mut self, slept: Duration, max: Duration) {
        if max.is_zero() {
            self.window = Duration::ZERO;
        } else if slept > max {
            self.window /= 2;
            if self.window < POLL_MIN {
                self.window = Duration::ZERO;
            }
        } else if slept > self.window {
            // Not `clamp`: a limit under POLL_MIN is the window itself.
            self.window = (self.window * 2).max(POLL_MIN).min(max);
        }
        self.window = self.window.min(max);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("queue {index}: cannot wait for events")]
    Poll {
        index: u16,
        #[source]
        source: nix::Error,
    },
    #[error("queue {index}: cannot read an eventfd")]
    EventRead {
        index: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("queue {index}")]
    Queue {
        index: u16,
        #[source]
        source: QueueError,
    },
    #[error("queue {0}: worker thread panicked")]
    Panicked(u16),
    #[error("queue {0}: worker failed earlier (logged)")]
    Failed(u16),
}

/// State shared between the protocol thread and a queue's worker.
pub(crate) struct RingShared {
    wake: EventFd,
    stop: AtomicBool,
    enabled: AtomicBool,
    call: Mutex<Option<File>>,
    err: Mutex<Option<File>>,
}

impl RingShared {
    pub(crate) fn new() -> std::io::Result<Self> {
        let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(std::io::Error::from)?;
        Ok(RingShared {
            wake,
            stop: AtomicBool::new(false),
            enabled: AtomicBool::new(false),
            call: Mutex::new(None),
            err: Mutex::new(None),
        })
    }

    fn lock(slot: &Mutex<Option<File>>) -> std::sync::MutexGuard<'_, Option<File>> {
        // The slots hold plain fds; a panic elsewhere cannot leave them inconsistent.
        slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_call(&self, file: Option<File>) {
        *Self::lock(&self.call) = file;
    }

    pub(crate) fn set_err(&self, file: Option<File>) {
        *Self::lock(&self.err) = file;
    }

    pub(crate) fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Release);
        self.poke();
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    fn poke(&self) {
        // Only fails if the counter would overflow, in which case the worker is woken anyway.
        let _ = self.wake.write(1);
    }

    /// Signals the vring's call eventfd, if it has one.
    pub(crate) fn signal_call(&self) -> std::io::Result<()> {
        Self::signal(&self.call)
    }

    fn signal(slot: &Mutex<Option<File>>) -> std::io::Result<()> {
        match Self::lock(slot).as_ref() {
            Some(mut file) => file.write_all(&1u64.to_ne_bytes()),
            None => Ok(()),
        }
    }
}

/// Everything a worker owns while its queue runs.
pub(crate) struct Worker {
    pub index: u16,
    pub queue: Queue,
    pub memory: GuestMemoryAtomic<Memory>,
    pub kick: File,
    pub shared: Arc<RingShared>,
    pub inflight: Option<InflightQueue>,
    pub resubmit: VecDeque<u16>,
    pub handler: Box<dyn QueueHandler>,
    /// Whether PROTOCOL_FEATURES was negotiated: if not, the ring is always enabled.
    pub gated: bool,
    pub connection: UnixStream,
    /// Whether a request completed since the queue started (logged once: the restart
    /// benchmark times a restarted daemon's first completion by that line).
    pub served: bool,
}

/// What a stopped worker hands back.
pub(crate) struct WorkerExit {
    pub queue: Queue,
}

pub(crate) type WorkerHandle = JoinHandle<Result<WorkerExit, WorkerError>>;

impl Worker {
    pub(crate) fn spawn(self, thread_name: &str) -> std::io::Result<WorkerHandle> {
        crate::thread::spawn_named(thread_name, move || self.run())
    }

    fn run(mut self) -> Result<WorkerExit, WorkerError> {
        let result = self.event_loop();
        if let Err(e) = &result {
            log::error!("{}; dropping the connection", crate::logging::chain(e));
            let _ = RingShared::signal(&self.shared.err);
            let _ = self.connection.shutdown(Shutdown::Both);
        }
        result.map(|()| WorkerExit { queue: self.queue })
    }

    fn enabled(&self) -> bool {
        !self.gated || self.shared.enabled()
    }

    fn queue_err(&self, source: QueueError) -> WorkerError {
        WorkerError::Queue {
            index: self.index,
            source,
        }
    }

    fn event_loop(&mut self) -> Result<(), WorkerError> {
        let index = self.index;
        let poll_err = |source| WorkerError::Poll { index, source };
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(poll_err)?;
        epoll
            .add(&self.kick, EpollEvent::new(EpollFlags::EPOLLIN, EV_KICK))
            .map_err(poll_err)?;
        epoll
            .add(
                &self.shared.wake,
                EpollEvent::new(EpollFlags::EPOLLIN, EV_WAKE),
            )
            .map_err(poll_err)?;
        if let Some(fd) = self.handler.completion_fd() {
            epoll
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, EV_COMPLETION))
                .map_err(poll_err)?;
        }
        if let Some(fd) = self.handler.input_fd() {
            epoll
                .add(
                    fd,
                    EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, EV_INPUT),
                )
                .map_err(poll_err)?;
        }
        // Resubmitted requests, and anything made available while no backend was listening.
        self.pass(Duration::ZERO)?;
        let mut poll = PollWindow::default();
        let mut events = [EpollEvent::empty(); 5];
        loop {
            let asleep = Instant::now();
            let n = match epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(poll_err(e)),
            };
            let max = self.handler.poll_time();
            poll.adjust(asleep.elapsed(), max);
            for event in &events[..n] {
                match event.data() {
                    EV_KICK => self.clear(&self.kick)?,
                    EV_WAKE => {
                        // Nonblocking: EAGAIN just means another wake already consumed it.
                        let _ = self.shared.wake.read();
                    }
                    // Edge-triggered and read by the handler itself.
                    EV_INPUT => {}
                    _ => self.clear_completion()?,
                }
            }
            if self.shared.stop.load(Ordering::Acquire) {
                return self.stop();
            }
            self.pass(poll.window)?;
        }
    }

    fn clear(&self, mut file: &File) -> Result<(), WorkerError> {
        let mut buf = [0u8; 8];
        file.read_exact(&mut buf)
            .map_err(|source| WorkerError::EventRead {
                index: self.index,
                source,
            })
    }

    fn clear_completion(&self) -> Result<(), WorkerError> {
        let Some(fd) = self.handler.completion_fd() else {
            return Ok(());
        };
        let mut buf = [0u8; 8];
        match nix::unistd::read(fd, &mut buf) {
            Ok(_) | Err(nix::Error::EAGAIN) => Ok(()),
            Err(e) => Err(WorkerError::EventRead {
                index: self.index,
                source: e.into(),
            }),
        }
    }

    /// One round of processing: repeat while the driver keeps adding requests, with
    /// notifications suppressed, then re-enable them and check once more (no lost kick).
    /// `poll`: how long to watch the ring after the driver stops adding requests.
    fn pass(&mut self, poll: Duration) -> Result<(), WorkerError> {
        let enabled = self.enabled();
        let poll = if enabled { poll } else { Duration::ZERO };
        loop {
            // The memory table as it is now, each round: a busy queue may stay in one pass for
            // ever, and the frontend may add regions meanwhile (ADD_MEM_REG) and then use them.
            let mem = self.memory.memory().into_inner();
            if enabled {
                self.queue
                    .disable_notification(&*mem)
                    .map_err(|e| self.queue_err(QueueError::Ring(e)))?;
            }
            let taken_before = self.queue.next_avail();
            let avail_before = self.avail_idx(&mem)?;
            let mut ctx = QueueContext::new(
                self.index,
                &mut self.queue,
                Arc::clone(&mem),
                &mut self.resubmit,
            )
            .with_tracking(self.inflight.as_mut(), enabled)
            .with_signal(&self.shared);
            let progress = self.handler.process(&mut ctx);
            let unsignalled = ctx.unsignalled();
            let completed = ctx.completed();
            drop(ctx);
            let took_nothing = completed == 0 && self.queue.next_avail() == taken_before;
            if unsignalled > 0 {
                self.notify(&mem)?;
            }
            if completed > 0 && !self.served {
                self.served = true;
                log::info!("queue {}: first request completed", self.index);
            }
            let progress = progress.map_err(|e| self.queue_err(e))?;
            if !enabled || progress == Progress::Blocked {
                return Ok(());
            }
            if !poll.is_zero() && self.poll_for_work(&mem, poll)? {
                continue;
            }
            let more = self
                .queue
                .enable_notification(&*mem)
                .map_err(|e| self.queue_err(QueueError::Ring(e)))?;
            // A handler that says Idle but took nothing of what was available would have this
            // loop spin for ever, deaf to GET_VRING_BASE: the next kick or completion calls
            // it again. But requests the driver added after the handler looked were added
            // while kicks were suppressed, so no kick will come for them: go round again.
            // A stop request ends the pass too.
            let declined = took_nothing && self.avail_idx(&mem)? == avail_before;
            if !more || declined || self.shared.stop.load(Ordering::Acquire) {
                return Ok(());
            }
        }
    }

    /// Watches the available ring and the handler for up to `budget`, kicks still
    /// suppressed. `true`: there is work. `false`: nothing came, or the queue is stopping or
    /// being disabled (the wake eventfd then still holds the news for the event loop).
    fn poll_for_work(&mut self, mem: &Memory, budget: Duration) -> Result<bool, WorkerError> {
        let start = Instant::now();
        loop {
            if self.handler.ready() {
                return Ok(true);
            }
            if self.avail_idx(mem)? != Wrapping(self.queue.next_avail()) {
                return Ok(true);
            }
            if self.shared.stop.load(Ordering::Acquire) || !self.enabled() {
                return Ok(false);
            }
            if start.elapsed() >= budget {
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }

    /// The driver's available index, as it is now.
    fn avail_idx(&self, mem: &Memory) -> Result<Wrapping<u16>, WorkerError> {
        self.queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|e| self.queue_err(QueueError::Ring(e)))
    }

    fn notify(&mut self, mem: &Memory) -> Result<(), WorkerError> {
        let needed = self
            .queue
            .needs_notification(mem)
            .map_err(|e| self.queue_err(QueueError::Ring(e)))?;
        if needed {
            RingShared::signal(&self.shared.call)
                .map_err(|e| self.queue_err(QueueError::Signal(e)))?;
        }
        Ok(())
    }

    /// GET_VRING_BASE or disconnect: let the handler finish what is in flight.
    fn stop(&mut self) -> Result<(), WorkerError> {
        let mem = self.memory.memory().into_inner();
        let mut ctx = QueueContext::new(
            self.index,
            &mut self.queue,
            Arc::clone(&mem),
            &mut self.resubmit,
        )
        .with_tracking(self.inflight.as_mut(), false);
        let drained = self.handler.drain(&mut ctx);
        let completed = ctx.completed();
        drop(ctx);
        if completed > 0 {
            self.notify(&mem)?;
        }
        drained.map_err(|e| self.queue_err(e))
    }
}

/// Stops a running worker and waits for it.
pub(crate) fn stop(
    shared: &RingShared,
    handle: WorkerHandle,
    index: u16,
) -> Result<WorkerExit, WorkerError> {
    shared.stop.store(true, Ordering::Release);
    shared.poke();
    let result = handle.join();
    shared.stop.store(false, Ordering::Release);
    match result {
        Ok(Ok(exit)) => Ok(exit),
        Ok(Err(_)) => Err(WorkerError::Failed(index)),
        Err(_) => Err(WorkerError::Panicked(index)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn the_poll_window_grows_on_short_sleeps_and_shrinks_on_long_ones() {
        let max = 50 * US;
        let mut p = PollWindow::default();
        // Events that come sooner than the limit: 4, 8, 16, 32, 50 µs, then stays.
        let mut seen = Vec::new();
        for _ in 0..6 {
            p.adjust(45 * US, max);
            seen.push(p.window.as_micros());
        }
        assert_eq!(seen, vec![4, 8, 16, 32, 50, 50]);
        // A sleep shorter than the window needs no growth.
        p.adjust(10 * US, max);
        assert_eq!(p.window, max);
        // Sleeps longer than the limit halve it, down to zero.
        let mut seen = Vec::new();
        for _ in 0..5 {
            p.adjust(10 * max, max);
            seen.push(p.window.as_micros());
        }
        assert_eq!(seen, vec![25, 12, 6, 0, 0]);
        // No polling asked for: none, whatever the sleeps.
        p.adjust(US, Duration::ZERO);
        assert_eq!(p.window, Duration::ZERO);
        // A lowered limit caps the window at once.
        let mut p = PollWindow { window: max };
        p.adjust(US, 8 * US);
        assert_eq!(p.window, 8 * US);
        // A limit under the smallest window is the window.
        let mut p = PollWindow::default();
        p.adjust(US, 2 * US);
        assert_eq!(p.window, 2 * US);
        p.adjust(US, 2 * US);
        assert_eq!(p.window, 2 * US);
    }
}
