//! isola-console: Isola's virtio-console device process, a vhost-user backend whose ports
//! lead to Unix sockets a user attaches to, ptys, and append-only log files.
//!
//! `main.rs` turns the command line into a validated [`Config`] and calls [`run`]. The user
//! side of a port is in [`port`], the delivery record that keeps a log exact across a crash
//! in [`record`], the virtio semantics of the queues in [`device`], the MULTIPORT control
//! protocol in [`control`], the thread that watches the user side in [`io`], and the glue to
//! the shared vhost-user server in [`backend`].

pub mod backend;
pub mod control;
pub mod device;
pub mod io;
pub mod port;
pub mod record;
pub mod sandbox;

use std::os::unix::net::UnixListener;
use std::sync::Arc;

use clap::Parser;
use isola_device_common::cli::{ListenArgs, ListenError};
use isola_device_common::sandbox::{self as common_sandbox, SandboxArgs, SandboxError};
use isola_device_common::ServeError;
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::backend::ConsoleDevice;
use crate::control::Control;
use crate::port::{Port, PortError, PortSpec};

/// Most ports (MULTIPORT queues: 2 per port + 2 must fit the core's 64).
pub const MAX_PORTS: usize = 31;

#[derive(Debug, Parser)]
#[command(
    name = "isola-console",
    version,
    about = "Isola's virtio-console device process (a vhost-user console backend)"
)]
pub struct Cli {
    #[command(flatten)]
    pub listen: ListenArgs,
    /// A port: comma-separated `name=NAME`, `socket=PATH` (users attach here, one at a
    /// time), `pty` or `pty=LINK` (a pty; LINK becomes a symlink to it), `log=FILE`
    /// (everything the guest writes is appended). Repeat for more ports; the first is the
    /// console (port 0).
    #[arg(long = "port", value_name = "SPEC", required = true)]
    pub ports: Vec<PortSpec>,
    /// Offer MULTIPORT (control queues, port names, resize) even with one port; on by
    /// default with more than one.
    #[arg(long)]
    pub multiport: bool,
    /// Largest virtqueue the frontend may set up: a power of two, 4 to 32768.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--port given {0} times; at most {MAX_PORTS} ports")]
    TooManyPorts(usize),
    #[error("--queue-size {0}: must be a power of two from 4 to 32768")]
    QueueSize(u16),
    #[error("two ports are named '{0}'")]
    DuplicateName(String),
    #[error("port {0}")]
    Port(u32, #[source] PortError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] nix::Error),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Sandbox(SandboxError),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start the I/O thread")]
    Io(#[source] std::io::Error),
    #[error("serving the console")]
    Serve(#[from] ServeError),
    #[error("entering the sandbox")]
    Sandbox(#[from] SandboxError),
}

/// A validated configuration: logs open, sockets listening, ptys created.
pub struct Config {
    ports: Vec<Arc<Port>>,
    multiport: bool,
    queue_size: u16,
    io_wake: Arc<EventFd>,
    listener: UnixListener,
    sandbox: SandboxArgs,
}

impl Config {
    pub fn from_cli(cli: Cli) -> Result<Config, ConfigError> {
        if cli.ports.len() > MAX_PORTS {
            return Err(ConfigError::TooManyPorts(cli.ports.len()));
        }
        if !cli.queue_size.is_power_of_two() || !(4..=32768).contains(&cli.queue_size) {
            return Err(ConfigError::QueueSize(cli.queue_size));
        }
        let mut names: Vec<&str> = cli.ports.iter().filter_map(|p| p.name.as_deref()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::DuplicateName(w[0].to_owned()));
        }
        common_sandbox::validate(&cli.sandbox).map_err(ConfigError::Sandbox)?;
        let io_wake = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(ConfigError::EventFd)?,
        );
        let ports = cli
            .ports
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                Port::open(i as u32, spec, Arc::clone(&io_wake))
                    .map(Arc::new)
                    .map_err(|e| ConfigError::Port(i as u32, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Last, so that bad input leaves no vhost-user socket file behind.
        let listener = cli.listen.listener()?;
        Ok(Config {
            multiport: cli.multiport || ports.len() > 1,
            ports,
            queue_size: cli.queue_size,
            io_wake,
            listener,
            sandbox: cli.sandbox,
        })
    }
}

/// Enters the sandbox ([`sandbox`]: every file, socket and pty is already open), then
/// serves the console to one frontend at a time, for ever.
pub fn run(config: Config) -> Result<(), RunError> {
    common_sandbox::single_arena();
    common_sandbox::enter(&config.sandbox, &sandbox::policy())?;
    if config.sandbox.sandbox == common_sandbox::Switch::On {
        // A dropped Port removes its socket file or pty link: a path, which the sandbox has
        // no access to and the filter kills for (unlink). Keep every port alive to the end,
        // even if serving fails; a stale socket file is replaced at the next start.
        std::mem::forget(config.ports.clone());
    }
    let control = if config.multiport {
        let event =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| RunError::Io(e.into()))?;
        Some(Arc::new(Control::new(config.ports.clone(), event)))
    } else {
        None
    };
    let device = ConsoleDevice::new(config.ports.clone(), control.clone(), config.queue_size);
    for port in &config.ports {
        log::info!("port {}: {}", port.id, port.describe());
    }
    log::info!(
        "{} ports{}; the core needs --device console,socket=...,queues={}",
        config.ports.len(),
        if config.multiport { ", MULTIPORT" } else { "" },
        device.queues_needed()
    );
    io::spawn(config.ports.clone(), control, config.io_wake).map_err(RunError::Io)?;
    isola_device_common::serve(&config.listener, &Arc::new(device))?;
    Ok(())
}
