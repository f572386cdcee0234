//! The control socket: a Unix socket speaking `isola_ipc` messages, served on the core's main
//! thread, which otherwise sleeps until a vCPU reports the end of the VM.
//!
//! One request, one response, per message; a client may send many. A client that sends
//! garbage gets an error response (if the frame was readable) and is disconnected; the server
//! keeps serving the others.
//!
//! A graceful shutdown presses the guest's power button and arms a deadline here; the client
//! that asked is answered only when the VM ends, with how it ended (the guest ended itself, or
//! the deadline ran out and the core stopped it). That is the one place this logic lives:
//! `isolactl shutdown` and the API's `POST /vm/shutdown` both send the same request.
//!
//! This thread never talks to a device process: each device's backend thread
//! ([`crate::pci::backend`]) does, and keeps the link state this thread reports. So a hung,
//! absent or given-up backend cannot delay an answer.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isola_ipc::listen::BindError;
use isola_ipc::{
    ControlRequest, ControlResponse, DeviceLink, DeviceStatus, DisplayLinkStatus, IpcError,
    ShutdownReport, VcpuState, VcpuStatus, VmStatus, HANDOVER_WINDOW_MS, MAX_GRACE_MS,
};
use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::devices::Ged;
use crate::pci::backend::{Link, Shared};
use crate::vcpu::{ExitNotifier, VcpuEvent, VcpuHandle, VmExit};

/// How long a client may take to send the rest of a frame it started, or to take an answer.
const CLIENT_IO_TIMEOUT: Duration = Duration::from_millis(500);
/// How long Pause/Resume wait for every vCPU to acknowledge.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
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

/// The control socket served while the VM starts (device backends connect, which may take
/// up to `--device-timeout`): every request gets an answer at once; status says what the core
/// waits for. [`Starting::finish`] hands the socket back for [`serve`].
pub struct Starting {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<ControlServer>>,
    /// What the core waits for, for status answers.
    pub waiting: Arc<Mutex<String>>,
}

/// How often the start-up server looks at its stop flag.
const STARTING_TICK_MS: u8 = 20;

impl Starting {
    /// Serves `server` on a thread (`control-start`) with `filter` installed; status answers
    /// say `waiting` until it is changed.
    pub fn start(
        server: ControlServer,
        filter: Option<seccompiler::BpfProgram>,
        waiting: String,
    ) -> Result<Starting, io::Error> {
        let stop = Arc::new(AtomicBool::new(false));
        let waiting = Arc::new(Mutex::new(waiting));
        let (flag, text) = (Arc::clone(&stop), Arc::clone(&waiting));
        let thread = std::thread::Builder::new()
            .name("control-start".into())
            .spawn(move || {
                if let Err(e) = crate::sandbox::install(filter.as_ref()) {
                    log::error!("control-start: {}", crate::error_chain(&e));
                    return server;
                }
                while !flag.load(Ordering::SeqCst) {
                    let mut fds = [PollFd::new(server.listener.as_fd(), PollFlags::POLLIN)];
                    if poll(&mut fds, PollTimeout::from(STARTING_TICK_MS)).unwrap_or(0) > 0 {
                        answer_while_starting(&server, &text);
                    }
                }
                server
            })?;
        Ok(Starting {
            stop,
            thread: Some(thread),
            waiting,
        })
    }

    /// Stops serving and returns the socket.
    pub fn finish(mut self) -> Option<ControlServer> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers every waiting client once: the VM is not running yet. A shutdown ends the process
/// here and now (nothing runs yet that needs tearing down; the socket file is removed).
fn answer_while_starting(server: &ControlServer, waiting: &Mutex<String>) {
    let mut clients = Vec::new();
    accept_all(&server.listener, &mut clients);
    for mut client in clients {
        let Ok(request) = isola_ipc::read_message::<_, ControlRequest>(&mut client) else {
            continue;
        };
        let what = waiting.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let response = match request {
            ControlRequest::Shutdown => ControlResponse::Done,
            // No guest runs yet to answer the button.
            ControlRequest::GracefulShutdown { .. } => ControlResponse::ShutDown(ShutdownReport {
                graceful: false,
                detail: format!("stopped while starting ({what})"),
            }),
            _ => ControlResponse::Error(format!("the VM is starting: {what}")),
        };
        let _ = isola_ipc::write_message(&mut client, &response);
        if matches!(
            request,
            ControlRequest::Shutdown | ControlRequest::GracefulShutdown { .. }
        ) {
            let _ = std::fs::remove_file(&server.path);
            eprintln!("isola-core: shut down on request while starting ({what})");
            std::process::exit(0);
        }
    }
}

/// What the control loop acts on.
pub struct Context<'a> {
    pub vm: &'a VmFd,
    /// Where vCPUs report the VM's end.
    pub exit: &'a ExitNotifier,
    pub vcpus: &'a [VcpuHandle],
    /// Each vCPU's acknowledgement of a pause or resume.
    pub acks: &'a Receiver<(u32, VcpuState)>,
    /// The status of each PCI device, in bus order.
    pub devices: &'a [Arc<Shared>],
    /// The power button's event device.
    pub ged: &'a Ged,
    /// When the vCPUs started, for the uptime.
    pub started: Instant,
}

/// A graceful shutdown under way: the power button was pressed at `pressed`; the VM is
/// stopped at `deadline` unless the guest ends first. `waiters` are told how it ended.
struct Pending {
    pressed: Instant,
    deadline: Instant,
    waiters: Vec<UnixStream>,
}

impl Pending {
    /// What the VM's end means for this shutdown: a guest that powers off or resets now ended
    /// gracefully (a reset is not run again: the guest was asked to stop).
    fn outcome(&self, exit: VmExit) -> VmExit {
        let after = self.pressed.elapsed().as_secs_f64();
        let what = match exit {
            VmExit::Poweroff => "powered off",
            VmExit::Reset => "reset",
            other => return other,
        };
        VmExit::Shutdown {
            graceful: true,
            detail: format!("the guest {what} {after:.3} s after the power button"),
        }
    }

    fn timed_out(&self) -> VmExit {
        let grace = self.deadline.duration_since(self.pressed).as_secs_f64();
        VmExit::Shutdown {
            graceful: false,
            detail: format!("the guest did not power off within {grace:.3} s of the power button"),
        }
    }

    /// Tells every waiter how the VM ended.
    fn answer(self, exit: &VmExit) {
        let report = match exit {
            VmExit::Shutdown { graceful, detail } => ShutdownReport {
                graceful: *graceful,
                detail: detail.clone(),
            },
            other => ShutdownReport {
                graceful: false,
                detail: format!("the VM ended otherwise: {}", other.summary()),
            },
        };
        for mut waiter in self.waiters {
            let answer = ControlResponse::ShutDown(report.clone());
            let _ = isola_ipc::write_message(&mut waiter, &answer);
        }
    }
}

/// What to do with a client after its request.
enum After {
    Keep,
    Drop,
    /// Hold it until the VM ends (a graceful shutdown's requester).
    Wait,
}

/// Serves the control socket (if any) until a vCPU or a client ends the VM.
pub fn serve(server: Option<ControlServer>, ctx: Context<'_>) -> Result<VmExit, ControlError> {
    let exit = ctx.exit;
    let mut clients: Vec<UnixStream> = Vec::new();
    let mut pending: Option<Pending> = None;
    loop {
        if let Some(p) = pending.take_if(|p| Instant::now() >= p.deadline) {
            let end = p.timed_out();
            log::warn!("graceful shutdown: {}", end.summary());
            p.answer(&end);
            return Ok(end);
        }
        let wait = match &pending {
            // Rounded up, so the loop wakes after the deadline rather than spinning before it.
            Some(p) => {
                let ms = p
                    .deadline
                    .saturating_duration_since(Instant::now())
                    .as_millis()
                    + 1;
                PollTimeout::try_from(i32::try_from(ms).unwrap_or(i32::MAX))
                    .unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        let (exit_ready, listener_ready, ready_clients) = {
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
            match poll(&mut fds, wait) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(ControlError::Poll(e)),
                Ok(_) => {}
            }
            let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
            let ready_clients: Vec<usize> = fds[first_client..]
                .iter()
                .enumerate()
                .filter(|(_, f)| ready(f))
                .map(|(i, _)| i)
                .collect();
            (
                ready(&fds[0]),
                server.is_some() && ready(&fds[1]),
                ready_clients,
            )
        };
        if exit_ready {
            if let Some(reason) = exit.take() {
                return Ok(match pending {
                    Some(p) => {
                        let end = p.outcome(reason);
                        log::info!("graceful shutdown: {}", end.summary());
                        p.answer(&end);
                        end
                    }
                    None => reason,
                });
            }
            let _ = exit.eventfd().read();
        }
        // Serve clients before accepting, so indices stay valid; drop the ones that are done.
        let mut finished = Vec::new();
        for i in ready_clients {
            match serve_one(&ctx, &mut clients[i], &mut pending) {
                After::Keep => {}
                After::Drop => finished.push((i, false)),
                After::Wait => finished.push((i, true)),
            }
        }
        for (i, wait) in finished.into_iter().rev() {
            let client = clients.swap_remove(i);
            if let (true, Some(p)) = (wait, pending.as_mut()) {
                p.waiters.push(client);
            }
        }
        if listener_ready {
            if let Some(server) = &server {
                accept_all(&server.listener, &mut clients);
            }
        }
    }
}

fn accept_all(listener: &UnixListener, clients: &mut Vec<UnixStream>) {
    loop {
        match listener.accept() {
            Ok((stream, _)) if clients.len() < MAX_CLIENTS => {
                if stream.set_nonblocking(false).is_ok()
                    && stream.set_read_timeout(Some(CLIENT_IO_TIMEOUT)).is_ok()
                    && stream.set_write_timeout(Some(CLIENT_IO_TIMEOUT)).is_ok()
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

/// Reads and answers one request (a graceful shutdown's answer waits for the VM's end).
fn serve_one(ctx: &Context<'_>, stream: &mut UnixStream, pending: &mut Option<Pending>) -> After {
    let request = match isola_ipc::read_message::<_, ControlRequest>(stream) {
        Ok(request) => request,
        Err(IpcError::Closed) => return After::Drop,
        Err(e) => {
            log::warn!("control: bad request: {e}");
            let answer = ControlResponse::Error(format!("bad request: {e}"));
            let _ = isola_ipc::write_message(stream, &answer);
            return After::Drop;
        }
    };
    log::debug!("control: {request:?}");
    let response = match request {
        ControlRequest::GracefulShutdown { timeout_ms } => {
            match begin_graceful_shutdown(ctx, timeout_ms, pending) {
                Ok(()) => return After::Wait,
                Err(e) => ControlResponse::Error(e),
            }
        }
        // Answered before the VM is told to end: the process may exit as soon as it is, and
        // the client must not find its connection reset instead of the answer.
        ControlRequest::Shutdown => {
            let _ = isola_ipc::write_message(stream, &ControlResponse::Done);
            ctx.exit.notify(VmExit::Shutdown {
                graceful: false,
                detail: "stopped at once on request".into(),
            });
            return After::Drop;
        }
        request => handle(ctx, request),
    };
    match isola_ipc::write_message(stream, &response) {
        Ok(()) => After::Keep,
        Err(_) => After::Drop,
    }
}

/// Presses the power button and arms the deadline; a shutdown already under way keeps its
/// (earlier or later) deadline, and the button is pressed again.
fn begin_graceful_shutdown(
    ctx: &Context<'_>,
    timeout_ms: u64,
    pending: &mut Option<Pending>,
) -> Result<(), String> {
    if timeout_ms > MAX_GRACE_MS {
        return Err(format!(
            "a grace period of {timeout_ms} ms is longer than the {MAX_GRACE_MS} ms allowed"
        ));
    }
    ctx.ged
        .press_power_button()
        .map_err(|e| format!("cannot raise the power button's interrupt: {e}"))?;
    if pending.is_none() {
        let pressed = Instant::now();
        log::info!("graceful shutdown: the guest has {timeout_ms} ms to power off");
        *pending = Some(Pending {
            pressed,
            deadline: pressed + Duration::from_millis(timeout_ms),
            waiters: Vec::new(),
        });
    }
    Ok(())
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
                .map(|(index, device)| device_status(index, device))
                .collect(),
        }),
        ControlRequest::Pause => change_state(ctx, VcpuEvent::Pause, VcpuState::Paused),
        ControlRequest::Resume => change_state(ctx, VcpuEvent::Resume, VcpuState::Running),
        ControlRequest::PowerButton => match ctx.ged.press_power_button() {
            Ok(()) => ControlResponse::Done,
            Err(e) => {
                ControlResponse::Error(format!("cannot raise the power button's interrupt: {e}"))
            }
        },
        // Served by `serve_one`: a shutdown is answered before the VM ends, a graceful one
        // when it has.
        ControlRequest::Shutdown | ControlRequest::GracefulShutdown { .. } => {
            ControlResponse::Error("shutdown is not served here".into())
        }
        ControlRequest::Handover { socket } => {
            match ctx.devices.iter().find(|d| d.socket == Path::new(&socket)) {
                Some(device) => {
                    device.expect_handover(Duration::from_millis(HANDOVER_WINDOW_MS));
                    log::info!("{}: planned handover of {socket}", device.name);
                    ControlResponse::Done
                }
                None => ControlResponse::Error(format!("no device on socket {socket}")),
            }
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
fn device_status(index: usize, device: &Shared) -> DeviceStatus {
    let state = device.lock();
    DeviceStatus {
        name: device.name.to_owned(),
        slot: format!("00:{:02x}.0", index + 1),
        socket: device.socket.display().to_string(),
        link: link_status(&state.link),
        reconnects: state.reconnects,
        last_outage_us: state
            .last_outage
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
        display: state.display.as_ref().map(|d| DisplayLinkStatus {
            socket: d.socket.display().to_string(),
            link: link_status(&d.link),
            reattaches: d.reattaches,
        }),
    }
}

fn link_status(link: &Link) -> DeviceLink {
    match link {
        Link::Connected => DeviceLink::Connected,
        Link::Reconnecting => DeviceLink::Reconnecting,
        Link::Unresponsive(why) => DeviceLink::Unresponsive(why.clone()),
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
