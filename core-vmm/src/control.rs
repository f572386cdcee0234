//! The control socket: a Unix socket speaking `isola_ipc` messages, served on the core's main
//! thread, which otherwise sleeps until a vCPU reports the end of the VM.
//!
//! One request, one response, per message; a client may send many. A client that sends
//! garbage gets an error response (if the frame was readable) and is disconnected; the server
//! keeps serving the others.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use isola_ipc::listen::BindError;
use isola_ipc::{
    ControlRequest, ControlResponse, DeviceLink, DeviceStatus, DisplayLinkStatus, IpcError,
    VcpuState, VcpuStatus, VmStatus,
};
use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::pci::virtio_pci::{attempt_reconnect, Link, VirtioPciDevice};
use crate::vcpu::{ExitNotifier, VcpuEvent, VcpuHandle, VmExit};
use crate::vhost_user::connect_display;
use crate::vm::SharedVirtioDevice;

/// How long a client may take to send the rest of a frame it started.
const CLIENT_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long Pause/Resume wait for every vCPU to acknowledge.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// While a backend is away, the core tries to reconnect this often (milliseconds).
const RECONNECT_TICK_MS: u8 = 5;
/// A backend that was refused (changed features or disk size) is retried this often.
const REFUSED_RETRY: Duration = Duration::from_secs(1);
/// A backend that dies within this time of being restored is flapping: back off.
const FLAP_WINDOW: Duration = Duration::from_millis(250);
const FLAP_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// At most this many clients at once; further connections are closed at once.
const MAX_CLIENTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {} is in use by a running process", .0.display())]
    InUse(PathBuf),
    #[error("cannot create control socket {}", .0.display())]
    Bind(PathBuf, #[source] io::Error),
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("waiting for control or vCPU events failed")]
    Poll(#[source] nix::Error),
}

impl ControlError {
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            ControlError::InUse(_) | ControlError::NotASocket(_) | ControlError::Bind(..)
        )
    }
}

/// The listening socket; the socket file is removed when this is dropped.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlServer {
    /// Binds `path`. A stale socket file nobody listens on is replaced; a live one, or a file
    /// that is not a socket, is an error. The path appears only once the socket listens.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        let listener = isola_ipc::listen::bind(path).map_err(|e| match e {
            BindError::InUse(path) => ControlError::InUse(path),
            BindError::NotASocket(path) => ControlError::NotASocket(path),
            BindError::Bind { path, source } => ControlError::Bind(path, source),
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ControlError::Bind(path.to_owned(), e))?;
        Ok(ControlServer {
            listener,
            path: path.to_owned(),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What the control loop acts on.
struct Context<'a> {
    vm: &'a VmFd,
    exit: &'a ExitNotifier,
    vcpus: &'a [VcpuHandle],
    acks: &'a Receiver<(u32, VcpuState)>,
    devices: &'a [SharedVirtioDevice],
    started: Instant,
}

/// Serves the control socket (if any) until a vCPU or a client ends the VM.
pub fn serve(
    server: Option<ControlServer>,
    vm: &VmFd,
    exit: &ExitNotifier,
    vcpus: &[VcpuHandle],
    acks: &Receiver<(u32, VcpuState)>,
    devices: &[SharedVirtioDevice],
    started: Instant,
) -> Result<VmExit, ControlError> {
    let ctx = Context {
        vm,
        exit,
        vcpus,
        acks,
        devices,
        started,
    };
    let mut clients: Vec<UnixStream> = Vec::new();
    let mut reconnect = Reconnector::new(devices.len());
    loop {
        let watched = reconnect.watched_fds(devices);
        let (exit_ready, listener_ready, ready_clients, gone) = {
            let mut fds = vec![PollFd::new(exit.as_fd(), PollFlags::POLLIN)];
            if let Some(server) = &server {
                fds.push(PollFd::new(server.listener.as_fd(), PollFlags::POLLIN));
            }
            let first_client = fds.len();
            fds.extend(
                clients
                    .iter()
                    .map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)),
            );
            let first_device = fds.len();
            for (_, _, fd) in &watched {
                // SAFETY: the fd belongs to a device's vhost-user session or to the core's
                // duplicate of a GPU's display connection; only this thread replaces or drops
                // either (in `Reconnector`, after this poll), so it stays open for as long as
                // the borrow is used.
                let fd = unsafe { BorrowedFd::borrow_raw(*fd) };
                // No events requested: POLLHUP and POLLERR are always reported, and nothing
                // else wakes us (replies to a vCPU thread's requests do not).
                fds.push(PollFd::new(fd, PollFlags::empty()));
            }
            match poll(&mut fds, reconnect.timeout()) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(ControlError::Poll(e)),
                Ok(_) => {}
            }
            let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
            let ready_clients: Vec<usize> = fds[first_client..first_device]
                .iter()
                .enumerate()
                .filter(|(_, f)| ready(f))
                .map(|(i, _)| i)
                .collect();
            let gone: Vec<(usize, Watched)> = fds[first_device..]
                .iter()
                .zip(&watched)
                .filter(|(f, _)| ready(f))
                .map(|(_, (index, what, _))| (*index, *what))
                .collect();
            (
                ready(&fds[0]),
                server.is_some() && ready(&fds[1]),
                ready_clients,
                gone,
            )
        };
        if exit_ready {
            if let Some(reason) = exit.take() {
                return Ok(reason);
            }
            let _ = exit.eventfd().read();
        }
        // Backends first: a GPU backend that died takes its display link with it.
        for (index, _) in gone.iter().filter(|(_, w)| *w == Watched::Backend) {
            reconnect.gone(*index, &devices[*index]);
        }
        for (index, _) in gone.iter().filter(|(_, w)| *w == Watched::Display) {
            reconnect.display_gone(*index, &devices[*index]);
        }
        reconnect.retry(devices);
        reconnect.retry_displays(devices);
        // Serve clients before accepting, so indices stay valid; drop the ones that are done.
        let mut finished = Vec::new();
        for i in ready_clients {
            if !serve_one(&ctx, &mut clients[i]) {
                finished.push(i);
            }
        }
        for i in finished.into_iter().rev() {
            clients.swap_remove(i);
        }
        if listener_ready {
            if let Some(server) = &server {
                accept_all(&server.listener, &mut clients);
            }
        }
    }
}

fn lock(device: &SharedVirtioDevice) -> std::sync::MutexGuard<'_, VirtioPciDevice> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

/// Watches device sockets and brings back devices whose backend went away; watches the
/// display connections passed to GPU backends and passes a new one when the display process
/// went away and is back.
struct Reconnector {
    devices: Vec<DeviceWatch>,
    displays: Vec<DeviceWatch>,
    any_down: bool,
}

/// What a watched fd belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watched {
    /// A device's vhost-user session.
    Backend,
    /// The core's duplicate of the display connection a GPU backend holds.
    Display,
}

#[derive(Default)]
struct DeviceWatch {
    /// No attempt before this moment.
    not_before: Option<Instant>,
    /// When the device last came back, to spot a backend that dies again at once.
    back_at: Option<Instant>,
    backoff: Duration,
}

impl DeviceWatch {
    /// The peer hung up: the next attempt comes at once, or after a growing back-off when it
    /// went away within [`FLAP_WINDOW`] of the last success.
    fn went_away(&mut self) {
        let flapping = self.back_at.is_some_and(|at| at.elapsed() < FLAP_WINDOW);
        self.backoff = if flapping {
            (self.backoff * 2).clamp(FLAP_BACKOFF_MIN, REFUSED_RETRY)
        } else {
            Duration::ZERO
        };
        self.not_before = Some(Instant::now() + self.backoff);
    }
}

impl Reconnector {
    fn new(devices: usize) -> Self {
        Reconnector {
            devices: (0..devices).map(|_| DeviceWatch::default()).collect(),
            displays: (0..devices).map(|_| DeviceWatch::default()).collect(),
            any_down: false,
        }
    }

    /// (device index, kind, fd) of every connected device and live display connection.
    fn watched_fds(&mut self, devices: &[SharedVirtioDevice]) -> Vec<(usize, Watched, RawFd)> {
        let mut watched = Vec::new();
        self.any_down = false;
        for (index, device) in devices.iter().enumerate() {
            let device = lock(device);
            match device.backend_fd() {
                Some(fd) => watched.push((index, Watched::Backend, fd)),
                None => self.any_down = true,
            }
            match device.display_fd() {
                Some(fd) => watched.push((index, Watched::Display, fd)),
                None if device.display_target().is_some() => self.any_down = true,
                None => {}
            }
        }
        watched
    }

    /// Poll timeout: a short tick while some device waits for its backend.
    fn timeout(&self) -> PollTimeout {
        if self.any_down {
            PollTimeout::from(RECONNECT_TICK_MS)
        } else {
            PollTimeout::NONE
        }
    }

    /// The backend of device `index` hung up. One that dies again soon after coming back (a
    /// crash loop, or a request that kills it every time) is retried ever more slowly.
    fn gone(&mut self, index: usize, device: &SharedVirtioDevice) {
        lock(device).backend_gone();
        self.devices[index].went_away();
    }

    /// The display process of GPU device `index` hung up: connect again (soon, or more slowly
    /// when it keeps going away right after being attached).
    fn display_gone(&mut self, index: usize, device: &SharedVirtioDevice) {
        lock(device).display_gone();
        self.displays[index].went_away();
    }

    /// Passes a new display connection to every connected GPU backend that has none. The
    /// connect runs without the device's lock and never blocks; a display process that is
    /// absent just means another attempt on the next tick.
    fn retry_displays(&mut self, devices: &[SharedVirtioDevice]) {
        for (device, watch) in devices.iter().zip(&mut self.displays) {
            if watch.not_before.is_some_and(|at| Instant::now() < at) {
                continue;
            }
            let Some(path) = lock(device).display_target() else {
                continue;
            };
            let stream = match connect_display(&path) {
                Ok(stream) => stream,
                Err(e) => {
                    log::debug!("display {}: connect failed: {e}", path.display());
                    continue;
                }
            };
            if lock(device).finish_display(stream) {
                watch.back_at = Some(Instant::now());
                watch.not_before = None;
            } else {
                // Refused by the backend (or it died meanwhile): not on every tick.
                watch.not_before = Some(Instant::now() + REFUSED_RETRY);
            }
        }
    }

    fn retry(&mut self, devices: &[SharedVirtioDevice]) {
        for (device, watch) in devices.iter().zip(&mut self.devices) {
            if watch.not_before.is_some_and(|at| Instant::now() < at) {
                continue;
            }
            let target = {
                let device = lock(device);
                match device.link() {
                    Link::Connected => continue,
                    Link::Reconnecting => {}
                    Link::Refused(_) => watch.not_before = Some(Instant::now() + REFUSED_RETRY),
                }
                device.reconnect_target()
            };
            let attempt = attempt_reconnect(target);
            if lock(device).finish_reconnect(attempt) {
                watch.back_at = Some(Instant::now());
            }
        }
    }
}

fn accept_all(listener: &UnixListener, clients: &mut Vec<UnixStream>) {
    loop {
        match listener.accept() {
            Ok((stream, _)) if clients.len() < MAX_CLIENTS => {
                if stream.set_nonblocking(false).is_ok()
                    && stream.set_read_timeout(Some(CLIENT_READ_TIMEOUT)).is_ok()
                {
                    clients.push(stream);
                }
            }
            Ok(_) => log::warn!("control: more than {MAX_CLIENTS} clients, closing a new one"),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                log::warn!("control: accept failed: {e}");
                return;
            }
        }
    }
}

/// Reads and answers one request; false when the client should be dropped.
fn serve_one(ctx: &Context<'_>, stream: &mut UnixStream) -> bool {
    let request = match isola_ipc::read_message::<_, ControlRequest>(stream) {
        Ok(request) => request,
        Err(IpcError::Closed) => return false,
        Err(e) => {
            log::warn!("control: bad request: {e}");
            let answer = ControlResponse::Error(format!("bad request: {e}"));
            let _ = isola_ipc::write_message(stream, &answer);
            return false;
        }
    };
    log::debug!("control: {request:?}");
    let response = handle(ctx, request);
    isola_ipc::write_message(stream, &response).is_ok()
}

fn handle(ctx: &Context<'_>, request: ControlRequest) -> ControlResponse {
    match request {
        ControlRequest::Status => ControlResponse::Status(VmStatus {
            uptime_ms: ctx.started.elapsed().as_millis() as u64,
            vcpus: ctx
                .vcpus
                .iter()
                .map(|v| VcpuStatus {
                    index: v.index,
                    state: v.state(),
                })
                .collect(),
            devices: ctx
                .devices
                .iter()
                .enumerate()
                .map(|(index, device)| device_status(index, &lock(device)))
                .collect(),
        }),
        ControlRequest::Pause => change_state(ctx, VcpuEvent::Pause, VcpuState::Paused),
        ControlRequest::Resume => change_state(ctx, VcpuEvent::Resume, VcpuState::Running),
        ControlRequest::Shutdown => {
            ctx.exit.notify(VmExit::Shutdown);
            ControlResponse::Done
        }
        ControlRequest::InjectMsi { address, data } => {
            let msi = kvm_msi {
                address_lo: address as u32,
                address_hi: (address >> 32) as u32,
                data,
                ..Default::default()
            };
            match ctx.vm.signal_msi(msi) {
                Ok(0) => ControlResponse::Error("the guest blocked the MSI".into()),
                Ok(_) => ControlResponse::Done,
                Err(e) => ControlResponse::Error(format!("KVM_SIGNAL_MSI failed: {e}")),
            }
        }
    }
}

/// Devices sit in PCI slots 1 up, in `--device` order.
fn device_status(index: usize, device: &VirtioPciDevice) -> DeviceStatus {
    DeviceStatus {
        name: device.name().to_owned(),
        slot: format!("00:{:02x}.0", index + 1),
        socket: device.socket_path().display().to_string(),
        link: link_status(device.link()),
        reconnects: device.reconnects(),
        display: device.display_path().map(|path| DisplayLinkStatus {
            socket: path.display().to_string(),
            link: device
                .display_link()
                .map_or(DeviceLink::Reconnecting, |l| link_status(&l)),
            reattaches: device.display_reattaches(),
        }),
    }
}

fn link_status(link: &Link) -> DeviceLink {
    match link {
        Link::Connected => DeviceLink::Connected,
        Link::Reconnecting => DeviceLink::Reconnecting,
        Link::Refused(why) => DeviceLink::Refused(why.clone()),
    }
}

/// Sends `event` to every live vCPU and waits until each reports `target`.
fn change_state(ctx: &Context<'_>, event: VcpuEvent, target: VcpuState) -> ControlResponse {
    while ctx.acks.try_recv().is_ok() {}
    let mut waiting: Vec<u32> = ctx
        .vcpus
        .iter()
        .filter(|v| v.state() != VcpuState::Exited)
        .map(|v| v.index)
        .collect();
    for v in ctx.vcpus.iter().filter(|v| waiting.contains(&v.index)) {
        v.send(event);
    }
    let deadline = Instant::now() + ACK_TIMEOUT;
    while !waiting.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match ctx.acks.recv_timeout(left) {
            Ok((index, state)) if state == target => waiting.retain(|i| *i != index),
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                let names: Vec<String> = waiting.iter().map(|i| format!("vcpu{i}")).collect();
                return ControlResponse::Error(format!(
                    "{} did not become {target}",
                    names.join(", ")
                ));
            }
        }
    }
    ControlResponse::Done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_that_keeps_dying_right_after_coming_back_is_retried_ever_more_slowly() {
        let mut watch = DeviceWatch::default();
        watch.went_away();
        assert_eq!(watch.backoff, Duration::ZERO, "first loss: at once");
        let mut last = Duration::ZERO;
        for _ in 0..8 {
            watch.back_at = Some(Instant::now());
            watch.went_away();
            assert!(watch.backoff >= FLAP_BACKOFF_MIN && watch.backoff >= last);
            assert!(watch.backoff <= REFUSED_RETRY);
            last = watch.backoff;
        }
        assert_eq!(last, REFUSED_RETRY, "capped");
        // Up for longer than the flap window: at once again.
        watch.back_at = Instant::now().checked_sub(FLAP_WINDOW * 2);
        watch.went_away();
        assert_eq!(watch.backoff, Duration::ZERO);
    }
}
