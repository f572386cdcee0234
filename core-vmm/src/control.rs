//! The control socket: a Unix socket speaking `isola_ipc` messages, served on the core's main
//! thread, which otherwise sleeps until a vCPU reports the end of the VM.
//!
//! One request, one response, per message; a client may send many. A client that sends
//! garbage gets an error response (if the frame was readable) and is disconnected; the server
//! keeps serving the others.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use isola_ipc::{ControlRequest, ControlResponse, IpcError, VcpuState, VcpuStatus, VmStatus};
use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::vcpu::{ExitNotifier, VcpuEvent, VcpuHandle, VmExit};

/// How long a client may take to send the rest of a frame it started.
const CLIENT_READ_TIMEOUT: Duration = Duration::from_secs(2);
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
    #[error("waiting for control or vCPU events failed")]
    Poll(#[source] nix::Error),
}

impl ControlError {
    pub fn is_bad_input(&self) -> bool {
        matches!(self, ControlError::InUse(_) | ControlError::Bind(..))
    }
}

/// The listening socket; the socket file is removed when this is dropped.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlServer {
    /// Binds `path`. A stale socket file nobody listens on is replaced; a live one is an error.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(|e| ControlError::Bind(path.to_owned(), e))?;
        }
        let listener =
            UnixListener::bind(path).map_err(|e| ControlError::Bind(path.to_owned(), e))?;
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
    started: Instant,
}

/// Serves the control socket (if any) until a vCPU or a client ends the VM.
pub fn serve(
    server: Option<ControlServer>,
    vm: &VmFd,
    exit: &ExitNotifier,
    vcpus: &[VcpuHandle],
    acks: &Receiver<(u32, VcpuState)>,
    started: Instant,
) -> Result<VmExit, ControlError> {
    let ctx = Context {
        vm,
        exit,
        vcpus,
        acks,
        started,
    };
    let mut clients: Vec<UnixStream> = Vec::new();
    loop {
        let (exit_ready, listener_ready, ready_clients) = {
            let mut fds = vec![PollFd::new(exit.as_fd(), PollFlags::POLLIN)];
            if let Some(server) = &server {
                fds.push(PollFd::new(server.listener.as_fd(), PollFlags::POLLIN));
            }
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
            let first_client = 1 + usize::from(server.is_some());
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
