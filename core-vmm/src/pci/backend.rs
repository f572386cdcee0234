//! The backend thread of one virtio device (`<name>-backend`): every vhost-user exchange with
//! the device process happens here, never on a vCPU thread or the control thread.
//!
//! The transport ([`super::virtio_pci`], on vCPU threads) queues [`Job`]s: start the device
//! (the guest set DRIVER_OK), reset it (status 0), forward a configuration write. It never
//! waits for the backend, with one bounded exception: a configuration read right after a
//! configuration write waits (at most the exchange deadline) for the backend's refreshed
//! configuration, since virtio-input's select/subsel window changes what the next read shows.
//! Everything the other threads need to know lives in [`Shared`]: the link state, the cached
//! device configuration, whether a reset is still running.
//!
//! The thread also watches the session's socket and, for a GPU, the display connection: a
//! hang-up, or an exchange that misses its deadline ([`crate::deadline`]), ends the session and
//! starts the reconnect path: connect again (a connect that never blocks), negotiate, check the
//! new backend matches, restore the started queues and the in-flight region.

use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use seccompiler::BpfProgram;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestRam;
use crate::vhost_user::{connect_display, QueueSetup, VhostUserConnection, VhostUserError};
use crate::virtio::DeviceKind;

use super::retry::{Watch, REFUSED_RETRY};

/// While a backend is away, the thread tries to reconnect this often (milliseconds).
const RECONNECT_TICK_MS: u8 = 5;

/// The state of the connection to the device process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    Connected,
    /// The backend went away; guest notifications wait in the ioeventfds meanwhile.
    Reconnecting,
    /// The backend missed an exchange deadline (the text says which); it was disconnected
    /// and the reconnect path runs.
    Unresponsive(String),
    /// A backend came back but could not be adopted; the device is stalled, retries go on.
    Refused(String),
}

/// The display connection of a GPU backend, as status shows it.
#[derive(Debug, Clone)]
pub struct DisplayState {
    pub socket: PathBuf,
    pub link: Link,
    pub reattaches: u32,
}

/// What the transport, the control thread and the backend thread share.
#[derive(Debug)]
pub struct State {
    pub link: Link,
    pub reconnects: u32,
    /// The device configuration the guest reads (refreshed from the backend).
    pub config: Vec<u8>,
    /// Bumped whenever the backend's refresh changed `config`.
    pub config_generation: u8,
    /// Configuration writes the backend has not answered yet.
    pub config_pending: u32,
    /// A reset (status 0) runs in the backend: status reads are not 0 yet.
    pub resetting: bool,
    /// Starting the device failed: the guest sees DEVICE_NEEDS_RESET.
    pub needs_reset: bool,
    pub display: Option<DisplayState>,
    /// A planned handover was announced ([`Shared::expect_handover`]): the backend's next
    /// hang-up before this moment is no flap, and is retried at once.
    pub handover_until: Option<Instant>,
    /// How long the backend was away the last time it came back: from the hang-up (or
    /// missed deadline) to the new backend's rings restored.
    pub last_outage: Option<Duration>,
}

#[derive(Debug)]
pub struct Shared {
    pub name: &'static str,
    pub socket: PathBuf,
    /// The deadline of one exchange; also the longest a config read waits for a refresh.
    pub timeout: Duration,
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }

    /// The shared state of a device that is not virtio (a vfio-user device): only the link
    /// and the reconnect count mean anything.
    pub fn new(name: &'static str, socket: PathBuf, timeout: Duration) -> Shared {
        Shared {
            name,
            socket,
            timeout,
            state: Mutex::new(State {
                link: Link::Connected,
                reconnects: 0,
                config: Vec::new(),
                config_generation: 0,
                config_pending: 0,
                resetting: false,
                needs_reset: false,
                display: None,
                handover_until: None,
                last_outage: None,
            }),
            changed: Condvar::new(),
        }
    }

    /// `isolactl restart` or `upgrade` is about to replace the backend on purpose: its next
    /// hang-up within `window` is a handover, not a backend dying right after coming back.
    pub fn expect_handover(&self, window: Duration) {
        self.update(|s| s.handover_until = Some(Instant::now() + window));
    }

    /// Whether the backend's going away now was announced (clears the announcement).
    pub(crate) fn take_handover(&self) -> bool {
        self.lock()
            .handover_until
            .take()
            .is_some_and(|until| Instant::now() < until)
    }

    /// Waits until `deadline` for the link to be [`Link::Connected`]; returns whether it is.
    pub fn wait_connected(&self, deadline: Instant) -> bool {
        let mut state = self.lock();
        while state.link != Link::Connected {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Waits (at most the exchange deadline) until no configuration write is pending, while
    /// the backend is connected; returns the state to read from. Called on vCPU threads.
    pub fn settled_config(&self) -> MutexGuard<'_, State> {
        let deadline = Instant::now() + self.timeout;
        let mut state = self.lock();
        while state.config_pending > 0 && state.link == Link::Connected {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        state
    }
}

/// One queue the guest enabled, with the fds the backend uses for it.
pub struct QueueSpec {
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub kick: EventFd,
    pub call: EventFd,
}

/// The device as the guest started it.
pub struct Activation {
    pub features: u64,
    pub queues: Vec<QueueSpec>,
}

/// Work for the backend thread, in the order the guest asked for it.
pub enum Job {
    Activate(Activation),
    /// Stop the started queues, forget the in-flight state, refresh the configuration; then
    /// clear [`State::resetting`].
    Reset,
    /// The guest wrote `data` at `offset` of the device configuration (already in the cache).
    WriteConfig {
        offset: u32,
        data: Vec<u8>,
    },
}

/// The transport's end: queue jobs, read the shared state.
pub struct BackendHandle {
    /// `None` only while dropping.
    jobs: Option<Sender<Job>>,
    wake: Arc<EventFd>,
    pub shared: Arc<Shared>,
}

impl BackendHandle {
    pub fn send(&self, job: Job) {
        if self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(job).is_ok())
        {
            let _ = self.wake.write(1);
        } else {
            log::error!("{}: the backend thread is gone", self.shared.name);
        }
    }
}

impl Drop for BackendHandle {
    fn drop(&mut self) {
        // Closed first, so the thread sees the closed channel when this wakes it, and ends.
        self.jobs = None;
        let _ = self.wake.write(1);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start thread {0}")]
    Spawn(String, #[source] std::io::Error),
}

/// Starts the backend thread of a device whose session `conn` is set up and whose
/// configuration (`config`, as the guest will see it) was read; `filter` is its seccomp.
pub fn start(
    kind: DeviceKind,
    num_queues: u16,
    conn: VhostUserConnection,
    config: Vec<u8>,
    ram: Arc<GuestRam>,
    timeout: Duration,
    filter: Option<BpfProgram>,
) -> Result<BackendHandle, BackendError> {
    let name = kind.info().name;
    let display = conn.display_path().map(|p| DisplayState {
        socket: p.to_owned(),
        link: if conn.display_fd().is_some() {
            Link::Connected
        } else {
            Link::Reconnecting
        },
        reattaches: 0,
    });
    let shared = Arc::new(Shared {
        name,
        socket: conn.path().to_owned(),
        timeout,
        state: Mutex::new(State {
            link: Link::Connected,
            reconnects: 0,
            config,
            config_generation: 0,
            config_pending: 0,
            resetting: false,
            needs_reset: false,
            display,
            handover_until: None,
            last_outage: None,
        }),
        changed: Condvar::new(),
    });
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(BackendError::EventFd)?);
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = Worker {
        kind,
        num_queues,
        conn,
        connected: true,
        ram,
        shared: Arc::clone(&shared),
        jobs: rx,
        wake: Arc::clone(&wake),
        activation: None,
        started: false,
        config_stale: false,
        watch: Watch::default(),
        display_watch: Watch::default(),
    };
    let thread = format!("{name}-backend");
    std::thread::Builder::new()
        .name(thread.clone())
        .spawn(move || {
            if let Err(e) = crate::sandbox::install(filter.as_ref()) {
                log::error!("{name}: backend thread: {}", crate::error_chain(&e));
                worker.shared.update(|s| {
                    s.link = Link::Refused("the backend thread could not sandbox itself".into())
                });
                return;
            }
            worker.run();
        })
        .map_err(|e| BackendError::Spawn(thread, e))?;
    Ok(BackendHandle {
        jobs: Some(tx),
        wake,
        shared,
    })
}

struct Worker {
    kind: DeviceKind,
    num_queues: u16,
    /// The current session, or the last one while the backend is away (it keeps what a
    /// reconnect needs: the socket path, the negotiated features, the in-flight region).
    conn: VhostUserConnection,
    connected: bool,
    ram: Arc<GuestRam>,
    shared: Arc<Shared>,
    jobs: Receiver<Job>,
    wake: Arc<EventFd>,
    /// The device as the guest started it (DRIVER_OK), until it resets it.
    activation: Option<Activation>,
    /// The backend has run `activation` (so a new one resumes at the used index).
    started: bool,
    /// A configuration write could not reach the backend, so the cache past the written
    /// bytes may not match what a new backend shows.
    config_stale: bool,
    watch: Watch,
    display_watch: Watch,
}

/// Whether `e` means the session is over (the backend died, or missed a deadline), rather
/// than the backend refusing one request.
fn session_lost(e: &VhostUserError) -> bool {
    use vhost::vhost_user::Error as E;
    match e {
        VhostUserError::Unresponsive { .. } => true,
        VhostUserError::Protocol {
            source: vhost::Error::VhostUserProtocol(inner),
            ..
        } => matches!(
            inner,
            E::Disconnected
                | E::PartialMessage
                | E::SocketBroken(_)
                | E::SocketError(_)
                | E::SocketRetry(_)
        ),
        VhostUserError::GpuSocket { .. } => false,
        _ => false,
    }
}

impl Worker {
    fn name(&self) -> &'static str {
        self.kind.info().name
    }

    fn run(mut self) {
        loop {
            let (session_gone, display_gone) = match self.wait() {
                Ok(events) => events,
                Err(e) => {
                    log::error!("{}: backend thread cannot poll: {e}", self.name());
                    return;
                }
            };
            if session_gone {
                self.lost(Link::Reconnecting, "went away");
            }
            if display_gone {
                self.display_gone();
            }
            let _ = self.wake.read();
            loop {
                match self.jobs.try_recv() {
                    Ok(job) => self.handle(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            if !self.connected && self.watch.due() {
                self.retry();
            }
            if self.connected && self.display_watch.due() {
                self.retry_display();
            }
        }
    }

    /// Polls the wake-up eventfd, the session's socket and the display link; returns whether
    /// each of the latter two hung up.
    fn wait(&mut self) -> Result<(bool, bool), nix::Error> {
        let socket = self.connected.then(|| self.conn.socket_fd());
        let display = if self.connected {
            self.conn.display_fd()
        } else {
            None
        };
        let display_wanted =
            self.connected && display.is_none() && self.conn.display_path().is_some();
        let tick = if !self.connected || display_wanted {
            PollTimeout::from(RECONNECT_TICK_MS)
        } else {
            PollTimeout::NONE
        };
        let borrow = |fd: std::os::fd::RawFd| {
            // SAFETY: every fd borrowed here belongs to `self.wake` or to `self.conn` (its
            // session socket and its duplicate of the display connection); only this thread
            // replaces or drops either, and not before the borrows end with this function.
            unsafe { BorrowedFd::borrow_raw(fd) }
        };
        let mut fds = vec![PollFd::new(
            borrow(std::os::fd::AsRawFd::as_raw_fd(&*self.wake)),
            PollFlags::POLLIN,
        )];
        if let Some(fd) = socket {
            // No events requested: POLLHUP and POLLERR are always reported.
            fds.push(PollFd::new(borrow(fd), PollFlags::empty()));
        }
        if let Some(fd) = display {
            fds.push(PollFd::new(borrow(fd), PollFlags::empty()));
        }
        match poll(&mut fds, tick) {
            Err(nix::errno::Errno::EINTR) => return Ok((false, false)),
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
        let session_gone = socket.is_some() && ready(&fds[1]);
        let display_gone = display.is_some() && ready(&fds[fds.len() - 1]);
        Ok((session_gone, display_gone))
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Activate(activation) => {
                self.activation = Some(activation);
                self.started = false;
                if self.connected {
                    let result = self.activate(false);
                    self.after(result, "cannot start the device", true);
                }
            }
            Job::Reset => self.reset(),
            Job::WriteConfig { offset, data } => {
                if self.connected {
                    let size = self.kind.info().config_size;
                    let result = self
                        .conn
                        .write_config(offset, &data)
                        .and_then(|()| self.conn.read_config(size));
                    match result {
                        Ok(config) => self.take_config(config),
                        Err(e) => {
                            self.config_stale = true;
                            self.after(Err(e), "config write failed", false);
                        }
                    }
                } else {
                    self.config_stale = true;
                }
                self.shared
                    .update(|s| s.config_pending = s.config_pending.saturating_sub(1));
            }
        }
    }

    /// Logs a failed exchange; a lost session starts the reconnect path, a refused start
    /// shows the guest DEVICE_NEEDS_RESET.
    fn after(&mut self, result: Result<(), VhostUserError>, what: &str, start: bool) {
        let Err(e) = result else { return };
        let why = crate::error_chain(&e);
        log::warn!("{}: {what}: {why}", self.name());
        if session_lost(&e) {
            let link = match e {
                VhostUserError::Unresponsive { step, timeout, .. } => {
                    Link::Unresponsive(format!("no answer to {step} within {timeout:?}"))
                }
                _ => Link::Reconnecting,
            };
            self.lost(link, "was disconnected");
        } else if start {
            self.shared.update(|s| s.needs_reset = true);
        }
    }

    /// Takes a configuration the backend showed after a write or reset.
    fn take_config(&mut self, mut config: Vec<u8>) {
        self.kind.fix_config(&mut config, self.num_queues);
        self.shared.update(|s| {
            if s.config != config {
                s.config = config;
                s.config_generation = s.config_generation.wrapping_add(1);
            }
        });
    }

    fn reset(&mut self) {
        let queues: Vec<u16> = match self.activation.take() {
            Some(a) if self.started => a.queues.iter().map(|q| q.index).collect(),
            _ => Vec::new(),
        };
        self.started = false;
        // Whatever was in flight belongs to the rings the guest just reset; a backend that
        // gets this region later must not resubmit from it.
        self.conn.forget_inflight();
        if self.connected {
            let size = self.kind.info().config_size;
            let result = if queues.is_empty() {
                Ok(())
            } else {
                self.conn.stop(&queues)
            }
            .and_then(|()| self.conn.read_config(size));
            match result {
                Ok(config) => self.take_config(config),
                Err(e) => self.after(Err(e), "reset failed", false),
            }
        }
        self.shared.update(|s| {
            s.resetting = false;
            s.needs_reset = false;
        });
    }

    /// Starts the backend on the guest's queues; `restore` resumes each queue where the guest
    /// has seen completions (the used ring's index) instead of at 0.
    fn activate(&mut self, restore: bool) -> Result<(), VhostUserError> {
        let Some(activation) = &self.activation else {
            return Ok(());
        };
        let mem = self.ram.memory();
        let used_idx = |q: &QueueSpec| -> u16 {
            if !restore {
                return 0;
            }
            q.used
                .checked_add(2)
                .and_then(|at| {
                    vm_memory::Bytes::read_obj::<u16>(mem, vm_memory::GuestAddress(at)).ok()
                })
                .unwrap_or(0)
        };
        let setups: Vec<QueueSetup<'_>> = activation
            .queues
            .iter()
            .map(|q| QueueSetup {
                index: q.index,
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                base: used_idx(q),
                kick: &q.kick,
                call: &q.call,
            })
            .collect();
        self.conn
            .activate(&self.ram, activation.features, &setups)?;
        self.started = true;
        log::info!(
            "{}: started with {} queue(s), features {:#x}",
            self.kind.info().name,
            setups.len(),
            activation.features
        );
        Ok(())
    }

    /// The session is over: close it (the backend, if alive, sees it end) and reconnect.
    fn lost(&mut self, link: Link, how: &str) {
        if !self.connected {
            return;
        }
        log::warn!(
            "{}: backend {} {how} ({}), reconnecting",
            self.name(),
            self.conn.path().display(),
            match &link {
                Link::Unresponsive(why) => why.as_str(),
                _ => "hang-up",
            }
        );
        self.connected = false;
        self.conn.disconnect();
        let planned = self.shared.take_handover();
        let backoff = self.watch.went_away(planned);
        if !backoff.is_zero() {
            log::warn!(
                "{}: the backend went away again right after coming back; next attempt in {} ms",
                self.name(),
                backoff.as_millis()
            );
        }
        let display_link = Link::Reconnecting;
        self.shared.update(|s| {
            s.link = link;
            if let Some(d) = &mut s.display {
                d.link = display_link;
            }
        });
    }

    fn display_gone(&mut self) {
        if self.conn.display_fd().is_none() {
            return;
        }
        log::warn!("{}: display went away, reconnecting", self.name());
        self.conn.drop_display_link();
        self.display_watch.went_away(false);
        self.shared.update(|s| {
            if let Some(d) = &mut s.display {
                d.link = Link::Reconnecting;
            }
        });
    }

    /// Passes a new display connection to a connected GPU backend that has none. The connect
    /// never blocks; a display process that is absent means another attempt on the next tick.
    fn retry_display(&mut self) {
        if self.conn.display_fd().is_some() {
            return;
        }
        let Some(path) = self.conn.display_path().map(ToOwned::to_owned) else {
            return;
        };
        let stream = match connect_display(&path) {
            Ok(stream) => stream,
            Err(e) => {
                log::debug!("display {}: connect failed: {e}", path.display());
                return;
            }
        };
        match self.conn.pass_display(stream) {
            Ok(()) => {
                self.display_watch.back_at = Some(Instant::now());
                self.display_watch.not_before = None;
                let name = self.name();
                self.shared.update(|s| {
                    if let Some(d) = &mut s.display {
                        d.link = Link::Connected;
                        d.reattaches += 1;
                        log::info!("{name}: display attached again (#{})", d.reattaches);
                    }
                });
            }
            Err(e) => {
                let why = crate::error_chain(&e);
                // Refused by the backend (or it died meanwhile): not on every tick.
                self.display_watch.not_before = Some(Instant::now() + REFUSED_RETRY);
                if session_lost(&e) {
                    self.after(Err(e), "passing the display connection failed", false);
                    return;
                }
                let name = self.name();
                self.shared.update(|s| {
                    if let Some(d) = &mut s.display {
                        if d.link != Link::Refused(why.clone()) {
                            log::warn!("{name}: passing the display connection failed: {why}");
                        }
                        d.link = Link::Refused(why);
                    }
                });
            }
        }
    }

    /// One reconnect attempt: connect, negotiate, compare, restore.
    fn retry(&mut self) {
        let refused = matches!(self.shared.lock().link, Link::Refused(_));
        if refused {
            self.watch.not_before = Some(Instant::now() + REFUSED_RETRY);
        }
        let size = self.kind.info().config_size;
        let attempt = self
            .conn
            .target()
            .connect()
            .and_then(|mut new| new.read_config(size).map(|config| (new, config)));
        let (mut new, mut config) = match attempt {
            Ok(session) => session,
            Err(e @ VhostUserError::Unresponsive { .. }) => {
                log::debug!("{}: reconnect attempt: {e}", self.name());
                let VhostUserError::Unresponsive { step, timeout, .. } = e else {
                    return;
                };
                self.shared.update(|s| {
                    s.link = Link::Unresponsive(format!("no answer to {step} within {timeout:?}"))
                });
                return;
            }
            // Nobody listening yet, or a backend that died or was still starting while we
            // talked to it: keep trying. Only a backend that answers differently is refused.
            Err(e @ (VhostUserError::ConnectTimeout { .. } | VhostUserError::Protocol { .. })) => {
                log::debug!("{}: reconnect attempt failed: {e}", self.name());
                return;
            }
            Err(e) => return self.refuse(crate::error_chain(&e)),
        };
        // The driver's select bytes (virtio-input) are part of the device's state: give them
        // to the new backend, then compare what it shows with what the guest saw.
        let replay = self.kind.driver_config();
        let cached = self.shared.lock().config.clone();
        if let Some(bytes) = cached.get(replay.clone()).filter(|b| !b.is_empty()) {
            match new
                .write_config(replay.start as u32, bytes)
                .and_then(|()| new.read_config(size))
            {
                Ok(again) => config = again,
                Err(e) => {
                    log::debug!("{}: reconnect attempt failed: {e}", self.name());
                    return;
                }
            }
        }
        self.kind.fix_config(&mut config, self.num_queues);
        // After a write the old backend never saw, the cache is not a reference: take what
        // the new backend shows for the driver's latest select bytes.
        let stale = self.config_stale && !replay.is_empty();
        if config != cached && !stale {
            return self.refuse("its device configuration (e.g. the disk size) differs".into());
        }
        self.config_stale = false;
        self.adopt(new, config);
    }

    /// Makes `new` (checked by [`Self::retry`]) the session: restores the started device and
    /// tells the other threads the device is back.
    fn adopt(&mut self, new: VhostUserConnection, config: Vec<u8>) {
        self.conn.replace_with(new);
        self.connected = true;
        let restore = self.started;
        if let Err(e) = self.activate(restore) {
            // Retried after REFUSED_RETRY, not on every tick.
            self.connected = false;
            self.conn.disconnect();
            return self.refuse(format!(
                "restoring the device failed: {}",
                crate::error_chain(&e)
            ));
        }
        // The kicks that announced the requests in flight went to the backend that died; one
        // more makes the new backend look at every ring (a spurious notification is harmless).
        if let Some(a) = &self.activation {
            for q in &a.queues {
                let _ = q.kick.write(1);
            }
        }
        let outage = self.watch.came_back();
        self.display_watch = Watch::default();
        let name = self.name();
        let has_display = self.conn.display_fd().is_some();
        self.shared.update(|s| {
            s.link = Link::Connected;
            s.config = config;
            s.reconnects += 1;
            s.last_outage = outage;
            log::info!("{name}: backend back after reconnect #{}", s.reconnects);
            if let Some(d) = &mut s.display {
                d.link = if has_display {
                    Link::Connected
                } else {
                    Link::Reconnecting
                };
            }
        });
    }

    fn refuse(&mut self, reason: String) {
        let name = self.name();
        self.shared.update(|s| {
            if s.link != Link::Refused(reason.clone()) {
                log::error!("{name}: refusing the restarted backend: {reason}");
            }
            s.link = Link::Refused(reason);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(pending: u32, link: Link, timeout: Duration) -> Arc<Shared> {
        Arc::new(Shared {
            name: "test",
            socket: PathBuf::from("/nowhere"),
            timeout,
            state: Mutex::new(State {
                link,
                reconnects: 0,
                config: vec![1, 2, 3],
                config_generation: 0,
                config_pending: pending,
                resetting: false,
                needs_reset: false,
                display: None,
                handover_until: None,
                last_outage: None,
            }),
            changed: Condvar::new(),
        })
    }

    #[test]
    fn a_config_read_waits_for_a_pending_refresh_at_most_the_deadline() {
        // Nothing answers: the read gives up after the deadline and serves the cache.
        let s = shared(1, Link::Connected, Duration::from_millis(100));
        let t0 = Instant::now();
        assert_eq!(s.settled_config().config, [1, 2, 3]);
        assert!(t0.elapsed() >= Duration::from_millis(90));
        assert!(t0.elapsed() < Duration::from_secs(5));
        // A backend that is away: no wait at all.
        let s = shared(1, Link::Reconnecting, Duration::from_secs(60));
        let t0 = Instant::now();
        drop(s.settled_config());
        assert!(t0.elapsed() < Duration::from_secs(5));
        // The refresh arrives: the read ends with it, long before the deadline.
        let s = shared(1, Link::Connected, Duration::from_secs(60));
        let worker = Arc::clone(&s);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            worker.update(|st| {
                st.config = vec![9];
                st.config_pending = 0;
            });
        });
        let t0 = Instant::now();
        assert_eq!(s.settled_config().config, [9]);
        assert!(t0.elapsed() < Duration::from_secs(30));
        t.join().unwrap();
    }
}
