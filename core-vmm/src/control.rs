//! The control socket: a Unix socket speaking `isola_ipc` messages, served on the core's main
//! thread, which otherwise sleeps until a vCPU reports the end of the VM.
//!
//! One request, one response, per message; a client may send many. A client that sends
//! garbage gets an error response (if the frame was readable) and is disconnected; the server
//! keeps serving the others.
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
    VcpuState, VcpuStatus, VmStatus,
};
use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

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
            _ => ControlResponse::Error(format!("the VM is starting: {what}")),
        };
        let _ = isola_ipc::write_message(&mut client, &response);
        if matches!(request, ControlRequest::Shutdown) {
            let _ = std::fs::remove_file(&server.path);
            eprintln!("isola-core: shut down on request while starting ({what})");
            std::process::exit(0);
        }
    }
}

/// What the control loop acts on.
struct Context<'a> {
    vm: &'a VmFd,
    exit: &'a ExitNotifier,
    vcpus: &'a [VcpuHandle],
    acks: &'a Receiver<(u32, VcpuState)>,
    devices: &'a [Arc<Shared>],
    started: Instant,
}

/// Serves the control socket (if any) until a vCPU or a client ends the VM.
pub fn serve(
    server: Option<ControlServer>,
    vm: &VmFd,
    exit: &ExitNotifier,
    vcpus: &[VcpuHandle],
    acks: &Receiver<(u32, VcpuState)>,
    devices: &[Arc<Shared>],
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
    loop {
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
            match poll(&mut fds, PollTimeout::NONE) {
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
                return Ok(reason);
            }
            let _ = exit.eventfd().read();
        }
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
                .map(|(index, device)| device_status(index, device))
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
fn device_status(index: usize, device: &Shared) -> DeviceStatus {
    let state = device.lock();
    DeviceStatus {
        name: device.name.to_owned(),
        slot: format!("00:{:02x}.0", index + 1),
        socket: device.socket.display().to_string(),
        link: link_status(&state.link),
        reconnects: state.reconnects,
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
