//! The backend thread of one vfio-user device (`vfio-user-backend`): every exchange with the
//! vfio-user server after set-up happens here, never on a vCPU thread.
//!
//! A vCPU forwards a BAR or configuration access by queueing a [`Request`]: a write is posted
//! (the vCPU goes on at once, as PCI writes are posted; with doorbell ioeventfds it waits for
//! the answer, see [`super::vfio_user_pci`]), a read carries a channel the vCPU waits on for
//! at most the exchange deadline; when that passes the read returns all ones.
//! Requests are served in order. While the server is away they wait here, each at most the
//! exchange deadline from when it was queued, so the guest sees a bounded pause.
//!
//! The thread watches the session socket: a hang-up, or an exchange that misses its deadline,
//! ends the session and starts the reconnect path: connect again, check the new server shows
//! the same device (regions and interrupts), map guest RAM, hand over the MSI-X irqfds, take
//! the new server's doorbell ioeventfds in place of the old ones (if asked for), replay the
//! command register and MSI-X control the guest wrote, then serve what waited.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use seccompiler::BpfProgram;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{Link, Shared};
use super::retry::{Watch, REFUSED_RETRY};
use super::vfio_ioevents::{IoEvent, IoEvents};
use crate::memory::GuestRam;
use crate::vfio_user::client::{VfioUserClient, VfioUserError};
use crate::vfio_user::wire::{self, DeviceInfo, RegionInfo};

/// While the server is away, the thread tries to reconnect this often (milliseconds).
const RECONNECT_TICK_MS: u8 = 5;
/// Failed accesses logged before the log goes quiet (then one in every 4096).
const LOG_BURST: u64 = 16;

/// A forwarded access, in the order the guest made it.
pub enum Request {
    Read {
        region: u32,
        offset: u64,
        len: usize,
        queued: Instant,
        /// Gets the data, or `None` when the access failed.
        reply: SyncSender<Option<[u8; 8]>>,
    },
    Write {
        region: u32,
        offset: u64,
        data: [u8; 8],
        len: usize,
        queued: Instant,
        /// Told when the server answered, for a write the vCPU waits for.
        done: Option<SyncSender<()>>,
        /// Counts the write as queued until it is served or dropped.
        ticket: Ticket,
    },
}

/// Writes queued and not yet served or dropped, at most [`MAX_QUEUED_WRITES`] before a vCPU
/// waits for its write's answer instead of posting it: a guest's burst of writes to a slow
/// or hung server must not grow the queue without bound (its memory, and a vCPU thread's
/// heap arena growing by `mprotect`, which the vCPU filter does not allow).
pub const MAX_QUEUED_WRITES: usize = 256;

/// One queued write; dropping it (served, expired or discarded) takes it off the count.
pub struct Ticket(Arc<AtomicUsize>);

impl Ticket {
    fn new(count: &Arc<AtomicUsize>) -> Ticket {
        count.fetch_add(1, Ordering::AcqRel);
        Ticket(Arc::clone(count))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Request {
    fn queued(&self) -> Instant {
        match self {
            Request::Read { queued, .. } | Request::Write { queued, .. } => *queued,
        }
    }
}

/// What every session with the server is given, the first and each after a reconnect.
pub struct Session {
    pub ram: Arc<GuestRam>,
    /// One per MSI-X vector, handed over with SET_IRQS (duplicates of the core's irqfds).
    pub irqfds: Vec<EventFd>,
    /// What the device looked like at start; a restarted server must look the same.
    pub info: DeviceInfo,
    pub regions: Vec<RegionInfo>,
    /// Offsets in configuration space whose bytes the guest writes are replayed to a new
    /// server: the command register and the MSI-X Message Control.
    pub replayed: Vec<std::ops::Range<u64>>,
    /// Every BAR whose doorbells are asked for (none unless `ioeventfds=on`), again of a new
    /// server; and where those doorbells are registered.
    pub bars: Vec<DoorbellBar>,
    pub ioevents: Arc<IoEvents>,
}

/// A BAR whose doorbells (ioeventfds) the core asks the server for.
#[derive(Debug, Clone)]
pub struct DoorbellBar {
    /// The BAR index, which is also the region index.
    pub index: usize,
    pub region_size: u64,
    /// Ranges of the BAR the core serves itself (the MSI-X table and PBA): no doorbell there.
    pub owned: Vec<std::ops::Range<u64>>,
}

/// Why a doorbell the server offers is refused, if it is.
fn refusal(bar: &DoorbellBar, offset: u64, size: u64, datamatch: Option<u64>) -> Option<String> {
    let Some(end) = offset
        .checked_add(size)
        .filter(|end| *end <= bar.region_size)
    else {
        return Some(format!("outside the region ({:#x} bytes)", bar.region_size));
    };
    if let Some(r) = bar.owned.iter().find(|r| offset < r.end && end > r.start) {
        return Some(format!(
            "over {:#x}..{:#x}, which the core serves (MSI-X table or PBA)",
            r.start, r.end
        ));
    }
    if let Some(v) = datamatch {
        if size < 8 && v >> (size * 8) != 0 {
            return Some(format!("datamatch {v:#x} does not fit in {size} bytes"));
        }
    }
    None
}

/// The doorbells (ioeventfds) the server offers for `bars`. One the core cannot honour
/// (outside its region, over what the core serves, a datamatch wider than the access) is
/// refused with an error in the log, and writes there keep going as REGION_WRITE.
pub fn doorbells(
    name: &str,
    client: &mut VfioUserClient,
    bars: &[DoorbellBar],
) -> Result<Vec<IoEvent>, VfioUserError> {
    let mut out = Vec::new();
    for bar in bars {
        for (entry, fd) in client.region_io_fds(bar.index as u32)? {
            if let Some(why) = refusal(bar, entry.offset, entry.size, entry.datamatch) {
                log::error!(
                    "{name}: refusing the server's ioeventfd at BAR {} offset {:#x} ({} bytes): {why}",
                    bar.index,
                    entry.offset,
                    entry.size
                );
                continue;
            }
            out.push(IoEvent {
                bar: bar.index,
                offset: entry.offset,
                size: entry.size,
                datamatch: entry.datamatch,
                // SAFETY: `fd` is an open descriptor this process owns (received with the
                // reply); ownership moves into the EventFd. KVM refuses it at registration if
                // it is not an eventfd.
                fd: unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) },
            });
        }
    }
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub enum VfioBackendError {
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start thread {0}")]
    Spawn(String, #[source] std::io::Error),
}

/// Maps guest RAM and hands the irqfds over: what a fresh server needs before it serves.
pub fn prepare(client: &mut VfioUserClient, session: &Session) -> Result<(), VfioUserError> {
    let memfd = session.ram.memfd().as_raw_fd();
    for region in session.ram.memory().iter() {
        let offset = region.file_offset().map_or(0, |f| f.start());
        client.dma_map(offset, region.start_addr().0, region.len(), memfd)?;
    }
    if !session.irqfds.is_empty() {
        let fds: Vec<_> = session.irqfds.iter().map(|e| e.as_raw_fd()).collect();
        client.set_irqs(wire::PCI_MSIX_IRQ, &fds)?;
    }
    Ok(())
}

/// The vCPU side's handle on the thread.
pub struct VfioBackendHandle {
    /// `None` only while dropping.
    requests: Option<Sender<Request>>,
    wake: Arc<EventFd>,
    pub shared: Arc<Shared>,
    queued_writes: Arc<AtomicUsize>,
}

impl VfioBackendHandle {
    /// Forwards a write. Posted (the vCPU goes on at once) unless `wait` (then the vCPU waits
    /// for the server's answer, at most the exchange deadline, so that a doorbell the guest
    /// rings next through an ioeventfd cannot overtake it) or [`MAX_QUEUED_WRITES`] are
    /// queued already (then it waits the same way: back-pressure).
    pub fn write(&self, region: u32, offset: u64, bytes: &[u8], wait: bool) {
        let wait = wait || self.queued_writes.load(Ordering::Acquire) >= MAX_QUEUED_WRITES;
        let mut data = [0u8; 8];
        let len = bytes.len().min(8);
        data[..len].copy_from_slice(&bytes[..len]);
        let (done, answered) = if wait {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        self.send(Request::Write {
            region,
            offset,
            data,
            len,
            queued: Instant::now(),
            done,
            ticket: Ticket::new(&self.queued_writes),
        });
        if let Some(rx) = answered {
            let _ = rx.recv_timeout(self.shared.timeout);
        }
    }

    /// Forwards a read and waits at most the exchange deadline; all ones when it fails.
    pub fn read(&self, region: u32, offset: u64, out: &mut [u8]) {
        let len = out.len().min(8);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.send(Request::Read {
            region,
            offset,
            len,
            queued: Instant::now(),
            reply: tx,
        });
        match rx.recv_timeout(self.shared.timeout) {
            Ok(Some(data)) => out[..len].copy_from_slice(&data[..len]),
            _ => out.fill(0xff),
        }
    }

    fn send(&self, request: Request) {
        if self
            .requests
            .as_ref()
            .is_some_and(|r| r.send(request).is_ok())
        {
            let _ = self.wake.write(1);
        }
    }
}

impl Drop for VfioBackendHandle {
    fn drop(&mut self) {
        self.requests = None;
        let _ = self.wake.write(1);
    }
}

/// Starts the backend thread with the set-up session `client`.
pub fn start(
    client: VfioUserClient,
    session: Session,
    shared: Arc<Shared>,
    filter: Option<BpfProgram>,
) -> Result<VfioBackendHandle, VfioBackendError> {
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(VfioBackendError::EventFd)?);
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = Worker {
        client,
        connected: true,
        session,
        shared: Arc::clone(&shared),
        requests: rx,
        wake: Arc::clone(&wake),
        pending: VecDeque::new(),
        replay: BTreeMap::new(),
        watch: Watch::default(),
        failures: 0,
    };
    let thread = format!("{}-backend", shared.name);
    std::thread::Builder::new()
        .name(thread.clone())
        .spawn(move || {
            if let Err(e) = crate::sandbox::install(filter.as_ref()) {
                log::error!(
                    "{}: backend thread: {}",
                    worker.shared.name,
                    crate::error_chain(&e)
                );
                worker.shared.update(|s| {
                    s.link = Link::Refused("the backend thread could not sandbox itself".into())
                });
                return;
            }
            worker.run();
        })
        .map_err(|e| VfioBackendError::Spawn(thread, e))?;
    Ok(VfioBackendHandle {
        requests: Some(tx),
        wake,
        shared,
        queued_writes: Arc::new(AtomicUsize::new(0)),
    })
}

struct Worker {
    client: VfioUserClient,
    connected: bool,
    session: Session,
    shared: Arc<Shared>,
    requests: Receiver<Request>,
    wake: Arc<EventFd>,
    /// Requests taken from the channel and not yet served (while the server is away).
    pending: VecDeque<Request>,
    /// The guest's latest bytes at the replayed configuration offsets.
    replay: BTreeMap<u64, u8>,
    watch: Watch,
    failures: u64,
}

impl Worker {
    fn name(&self) -> &'static str {
        self.shared.name
    }

    fn run(mut self) {
        loop {
            match self.wait() {
                Ok(true) => self.lost(Link::Reconnecting),
                Ok(false) => {}
                Err(e) => {
                    log::error!("{}: backend thread cannot poll: {e}", self.name());
                    return;
                }
            }
            let _ = self.wake.read();
            loop {
                match self.requests.try_recv() {
                    Ok(request) => self.pending.push_back(request),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            if !self.connected && self.watch.due() {
                self.retry();
            }
            if self.connected {
                while let Some(request) = self.pending.pop_front() {
                    self.serve(request);
                }
            } else {
                self.expire();
            }
        }
    }

    /// Polls the wake-up eventfd and the session socket; true when the socket hung up.
    fn wait(&self) -> Result<bool, nix::Error> {
        let borrow = |fd: std::os::fd::RawFd| {
            // SAFETY: both fds belong to `self.wake` and `self.client`, which only this
            // thread replaces or drops, and not before the borrows end with this function.
            unsafe { BorrowedFd::borrow_raw(fd) }
        };
        let mut fds = vec![PollFd::new(
            borrow(self.wake.as_raw_fd()),
            PollFlags::POLLIN,
        )];
        if self.connected {
            fds.push(PollFd::new(
                borrow(self.client.socket_fd()),
                PollFlags::empty(),
            ));
        }
        let tick = if self.connected && self.pending.is_empty() {
            PollTimeout::NONE
        } else {
            PollTimeout::from(RECONNECT_TICK_MS)
        };
        match poll(&mut fds, tick) {
            Err(nix::errno::Errno::EINTR) => return Ok(false),
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        Ok(self.connected && fds[1].revents().is_some_and(|r| !r.is_empty()))
    }

    /// Drops the waiting requests whose deadline passed (their vCPU read all ones already).
    fn expire(&mut self) {
        let timeout = self.shared.timeout;
        let before = self.pending.len();
        self.pending.retain(|r| r.queued().elapsed() < timeout);
        let dropped = before - self.pending.len();
        if dropped > 0 {
            self.log_failure(format_args!(
                "{dropped} access(es) dropped: the server did not come back within {timeout:?}"
            ));
        }
    }

    fn serve(&mut self, request: Request) {
        match request {
            Request::Read {
                region,
                offset,
                len,
                reply,
                ..
            } => {
                let mut data = [0u8; 8];
                match self.client.region_read(region, offset, &mut data[..len]) {
                    Ok(()) => {
                        let _ = reply.try_send(Some(data));
                    }
                    Err(e) => {
                        let _ = reply.try_send(None);
                        self.failed(e, region, offset);
                    }
                }
            }
            Request::Write {
                region,
                offset,
                data,
                len,
                done,
                ..
            } => {
                if region == wire::PCI_CONFIG_REGION {
                    self.remember(offset, &data[..len]);
                }
                let result = self.client.region_write(region, offset, &data[..len]);
                if let Some(done) = done {
                    let _ = done.try_send(());
                }
                if let Err(e) = result {
                    self.failed(e, region, offset);
                }
            }
        }
    }

    fn remember(&mut self, offset: u64, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            let at = offset + i as u64;
            if self.session.replayed.iter().any(|r| r.contains(&at)) {
                self.replay.insert(at, *byte);
            }
        }
    }

    fn failed(&mut self, e: VfioUserError, region: u32, offset: u64) {
        let why = crate::error_chain(&e);
        self.log_failure(format_args!(
            "access at {offset:#x} of region {region} failed: {why}"
        ));
        if e.session_lost() {
            let link = match e {
                VfioUserError::Unresponsive { step, timeout } => {
                    Link::Unresponsive(format!("no answer to {step} within {timeout:?}"))
                }
                _ => Link::Reconnecting,
            };
            self.lost(link);
        }
    }

    fn log_failure(&mut self, what: std::fmt::Arguments<'_>) {
        self.failures += 1;
        if self.failures <= LOG_BURST || self.failures.is_multiple_of(4096) {
            log::warn!("{}: {what} ({} so far)", self.name(), self.failures);
        }
    }

    fn lost(&mut self, link: Link) {
        if !self.connected {
            return;
        }
        log::warn!(
            "{}: server {} {}, reconnecting",
            self.name(),
            self.client.path().display(),
            match &link {
                Link::Unresponsive(why) => why.as_str(),
                _ => "went away",
            }
        );
        self.connected = false;
        self.client.disconnect();
        let planned = self.shared.take_handover();
        if !self.watch.went_away(planned).is_zero() {
            log::warn!(
                "{}: the server went away again right after coming back; backing off",
                self.name()
            );
        }
        self.shared.update(|s| s.link = link);
    }

    /// One reconnect attempt: connect, compare, prepare, replay.
    fn retry(&mut self) {
        if matches!(self.shared.lock().link, Link::Refused(_)) {
            self.watch.not_before = Some(Instant::now() + REFUSED_RETRY);
        }
        let path = self.client.path().to_owned();
        let deadlines = self.client.deadlines().clone();
        let mut new = match VfioUserClient::connect_once(&path, &deadlines) {
            Ok(new) => new,
            Err(e) if e.worth_retrying() => {
                log::debug!("{}: reconnect attempt: {e}", self.name());
                if let VfioUserError::Unresponsive { step, timeout } = e {
                    self.shared.update(|s| {
                        s.link =
                            Link::Unresponsive(format!("no answer to {step} within {timeout:?}"))
                    });
                }
                return;
            }
            Err(e) => return self.refuse(crate::error_chain(&e)),
        };
        match self.adopt(&mut new) {
            Ok(()) => {}
            Err(Adopt::Differs(why)) => return self.refuse(why),
            Err(Adopt::Failed(e)) if e.worth_retrying() => {
                log::debug!("{}: reconnect attempt: {e}", self.name());
                return;
            }
            Err(Adopt::Failed(e)) => {
                return self.refuse(format!(
                    "restoring the device failed: {}",
                    crate::error_chain(&e)
                ))
            }
        }
        self.client = new;
        self.connected = true;
        let outage = self.watch.came_back();
        let name = self.name();
        self.shared.update(|s| {
            s.link = Link::Connected;
            s.reconnects += 1;
            s.last_outage = outage;
            log::info!("{name}: server back after reconnect #{}", s.reconnects);
        });
    }

    /// Checks that `new` shows the same device and brings it to where the guest left the old
    /// one.
    fn adopt(&mut self, new: &mut VfioUserClient) -> Result<(), Adopt> {
        let info = new.device_info().map_err(Adopt::Failed)?;
        if (info.num_regions, info.num_irqs)
            != (self.session.info.num_regions, self.session.info.num_irqs)
        {
            return Err(Adopt::Differs(format!(
                "it has {} regions and {} interrupt types, not {} and {}",
                info.num_regions,
                info.num_irqs,
                self.session.info.num_regions,
                self.session.info.num_irqs
            )));
        }
        for (index, old) in self.session.regions.iter().enumerate() {
            let region = new.region_info(index as u32).map_err(Adopt::Failed)?;
            if region.size != old.size {
                return Err(Adopt::Differs(format!(
                    "region {index} is {:#x} bytes, not {:#x}",
                    region.size, old.size
                )));
            }
        }
        prepare(new, &self.session).map_err(Adopt::Failed)?;
        let doorbells =
            doorbells(self.shared.name, new, &self.session.bars).map_err(Adopt::Failed)?;
        self.session.ioevents.replace(doorbells);
        // Runs of consecutive bytes, written as the guest last left them.
        let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
        for (&at, &byte) in &self.replay {
            match runs.last_mut() {
                Some((start, bytes)) if *start + bytes.len() as u64 == at => bytes.push(byte),
                _ => runs.push((at, vec![byte])),
            }
        }
        for (offset, bytes) in runs {
            new.region_write(wire::PCI_CONFIG_REGION, offset, &bytes)
                .map_err(Adopt::Failed)?;
        }
        Ok(())
    }

    fn refuse(&mut self, reason: String) {
        let name = self.name();
        self.watch.not_before = Some(Instant::now() + REFUSED_RETRY);
        self.shared.update(|s| {
            if s.link != Link::Refused(reason.clone()) {
                log::error!("{name}: refusing the restarted server: {reason}");
            }
            s.link = Link::Refused(reason);
        });
    }
}

enum Adopt {
    Differs(String),
    Failed(VfioUserError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbells_the_core_cannot_honour_are_refused() {
        let bar = DoorbellBar {
            index: 0,
            region_size: 0x1000,
            owned: vec![0x800..0x820, 0xc00..0xc08],
        };
        assert_eq!(refusal(&bar, 0x14, 4, Some(0x3c)), None);
        assert_eq!(refusal(&bar, 0xffc, 4, None), None);
        assert_eq!(
            refusal(&bar, 0x7fc, 4, None),
            None,
            "ends where the table starts"
        );
        assert!(refusal(&bar, 0xffd, 4, None).unwrap().contains("outside"));
        assert!(refusal(&bar, u64::MAX, 8, None)
            .unwrap()
            .contains("outside"));
        assert!(refusal(&bar, 0x81c, 8, None).unwrap().contains("MSI-X"));
        assert!(refusal(&bar, 0x7fc, 8, None).unwrap().contains("MSI-X"));
        assert!(refusal(&bar, 0x14, 1, Some(0x100))
            .unwrap()
            .contains("does not fit"));
        assert!(refusal(&bar, 0xc04, 2, None).unwrap().contains("MSI-X"));
        assert_eq!(refusal(&bar, 0x14, 8, Some(u64::MAX)), None);
    }
}
