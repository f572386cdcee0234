//! isola-input: Isola's virtio-input device process. One process serves a keyboard and a
//! tablet (each its own virtio device, so each its own vhost-user socket) and one control
//! socket that feeds both.
//!
//! Why one process for both devices: they have one source (the control socket, which
//! `isolactl` and `isola-display`'s VNC server write to, and whose status covers both), so
//! one process means one socket for every sender and one process to sandbox and restart.
//! A crash takes both devices down together, and the core reconnects both.
//!
//! `main.rs` turns the command line into a validated [`Config`] and calls [`run`]. The
//! configuration space is in [`config`], the queues in [`device`], the glue to the shared
//! vhost-user server in [`backend`], and the control socket in [`control`].

pub mod backend;
pub mod config;
pub mod control;
pub mod device;
pub mod sandbox;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use isola_device_common::cli::{bind, ListenError};
use isola_device_common::sandbox::{self as common_sandbox, SandboxArgs, SandboxError};
use isola_device_common::ServeError;

use crate::backend::InputDevice;
use crate::config::Kind;
use crate::control::Targets;
use crate::device::Events;

/// Default bound of each device's queue of events waiting for the guest.
pub const DEFAULT_MAX_PENDING: usize = 1024;

#[derive(Debug, Parser)]
#[command(
    name = "isola-input",
    version,
    about = "Isola's virtio-input device process: a keyboard and a tablet (vhost-user backends)"
)]
pub struct Cli {
    /// Serve the keyboard (a vhost-user-input backend) on this Unix socket.
    #[arg(long, value_name = "PATH", required_unless_present = "tablet_socket")]
    pub keyboard_socket: Option<PathBuf>,
    /// Serve the tablet (absolute pointer) on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub tablet_socket: Option<PathBuf>,
    /// Take key and pointer requests (isolactl key|pointer, isola-display) on this socket.
    #[arg(long, value_name = "PATH")]
    pub control_socket: PathBuf,
    /// Events each device holds while the guest takes none; reports beyond it are refused.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_PENDING)]
    pub max_pending: usize,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--max-pending {0}: must be 16 to 65536")]
    MaxPending(usize),
    #[error("--keyboard-socket and --tablet-socket must differ")]
    SameSocket,
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Sandbox(SandboxError),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("serving the {0}")]
    Serve(&'static str, #[source] ServeError),
    #[error("serving the control socket")]
    Control(#[source] std::io::Error),
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
    #[error("entering the sandbox")]
    Sandbox(#[from] SandboxError),
}

/// A validated configuration: every socket is listening.
pub struct Config {
    devices: Vec<(Arc<InputDevice>, UnixListener)>,
    control: UnixListener,
    control_path: PathBuf,
    targets: Targets,
    sandbox: SandboxArgs,
}

impl Config {
    pub fn from_cli(cli: Cli) -> Result<Config, ConfigError> {
        if !(16..=65536).contains(&cli.max_pending) {
            return Err(ConfigError::MaxPending(cli.max_pending));
        }
        if cli.keyboard_socket.is_some() && cli.keyboard_socket == cli.tablet_socket {
            return Err(ConfigError::SameSocket);
        }
        common_sandbox::validate(&cli.sandbox).map_err(ConfigError::Sandbox)?;
        let mut targets = Targets::default();
        let mut devices = Vec::new();
        for (kind, path) in [
            (Kind::Keyboard, &cli.keyboard_socket),
            (Kind::Tablet, &cli.tablet_socket),
        ] {
            let Some(path) = path else { continue };
            let events =
                Arc::new(Events::new(kind, cli.max_pending).map_err(ConfigError::EventFd)?);
            match kind {
                Kind::Keyboard => targets.keyboard = Some(Arc::clone(&events)),
                Kind::Tablet => targets.tablet = Some(Arc::clone(&events)),
            }
            devices.push((Arc::new(InputDevice::new(events)), path.clone()));
        }
        // Sockets last, and all or none, so that bad input leaves no socket file behind.
        let mut bound: Vec<PathBuf> = Vec::new();
        let mut listen = |path: &PathBuf| -> Result<UnixListener, ConfigError> {
            match bind(path) {
                Ok(listener) => {
                    bound.push(path.clone());
                    Ok(listener)
                }
                Err(e) => {
                    for path in &bound {
                        let _ = std::fs::remove_file(path);
                    }
                    Err(e.into())
                }
            }
        };
        let mut listeners = Vec::new();
        for (_, path) in &devices {
            listeners.push(listen(path)?);
        }
        let control = listen(&cli.control_socket)?;
        let devices = devices
            .into_iter()
            .map(|(device, _)| device)
            .zip(listeners)
            .collect();
        Ok(Config {
            devices,
            control,
            control_path: cli.control_socket,
            targets,
            sandbox: cli.sandbox,
        })
    }
}

/// Enters the sandbox ([`sandbox`]: the three sockets are already bound), then serves the
/// devices and the control socket for ever.
pub fn run(config: Config) -> Result<(), RunError> {
    common_sandbox::single_arena();
    common_sandbox::enter(&config.sandbox, &sandbox::policy())?;
    let mut threads = Vec::new();
    for (device, listener) in config.devices {
        let kind = device.events().kind();
        log::info!("serving the {} \"{}\"", kind.short(), kind.device_name());
        let handle = isola_device_common::thread::spawn_named(
            &format!("serve-{}", kind.short()),
            move || isola_device_common::serve(&listener, &device),
        )
        .map_err(RunError::Thread)?;
        threads.push((kind.short(), handle));
    }
    log::info!("control socket {}", config.control_path.display());
    let targets = config.targets;
    let control = config.control;
    let control = isola_device_common::thread::spawn_named("control", move || {
        control::serve(control, targets)
    })
    .map_err(RunError::Thread)?;
    // Nothing ends normally; the first thread that does ends the process.
    loop {
        if control.is_finished() {
            return match control.join() {
                Ok(result) => result.map_err(RunError::Control),
                Err(_) => Err(RunError::Panicked("control")),
            };
        }
        if let Some(i) = threads.iter().position(|(_, h)| h.is_finished()) {
            let (name, handle) = threads.swap_remove(i);
            return match handle.join() {
                Ok(result) => result.map_err(|e| RunError::Serve(name, e)),
                Err(_) => Err(RunError::Panicked(name)),
            };
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
