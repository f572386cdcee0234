//! isola-display: the far end of QEMU's vhost-user-gpu display protocol, showing the guest's
//! screen to people.
//!
//! The core connects to this process's display socket and passes the connection to the GPU
//! backend (`isola-gpu` or QEMU's `vhost-user-gpu`) with `VHOST_USER_GPU_SET_SOCKET`, so
//! pixels go from the GPU backend straight here and never cross the core. What arrives is
//! kept in one [`framebuffer::Display`] and shown as PNG screenshots on the control socket
//! ([`control`]) and over VNC ([`vnc`]), whose key and pointer events go on to `isola-input`
//! ([`input`]).
//!
//! Threads: one accepting GPU sessions plus one per session ([`session`]), one accepting
//! control connections plus one per connection, one per VNC listener, and two per VNC
//! client.

pub mod connector;
pub mod control;
pub mod edid;
pub mod framebuffer;
pub mod input;
pub mod keymap;
pub mod protocol;
pub mod sandbox;
pub mod session;
pub mod vnc;

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use isola_device_common::cli::{bind, ListenError};
use isola_device_common::sandbox::{self as common_sandbox, SandboxArgs, SandboxError, Switch};
use isola_device_common::thread::spawn_named;

use crate::connector::{Connector, ConnectorError, InputPath};
use crate::edid::MAX_EDID_SIDE;
use crate::framebuffer::Display;
use crate::input::InputSink;
use crate::protocol::MAX_PIXELS;
use crate::session::Screen;

#[derive(Debug, Parser)]
#[command(
    name = "isola-display",
    version,
    about = "Isola's display process: shows what the GPU backend sends (screenshots, VNC)"
)]
pub struct Cli {
    /// Listen here for GPU sessions (the core connects and passes the connection on to the
    /// GPU backend).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Control socket for `isolactl screenshot` and status.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Preferred display width (GET_DISPLAY_INFO and EDID).
    #[arg(long, value_name = "PIXELS", default_value_t = 1280)]
    pub width: u32,
    /// Preferred display height.
    #[arg(long, value_name = "PIXELS", default_value_t = 800)]
    pub height: u32,
    /// Serve VNC (RFB 3.8, no authentication) on this TCP address; keep it on localhost.
    #[arg(long, value_name = "ADDR:PORT")]
    pub vnc: Option<SocketAddr>,
    /// Serve VNC on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub vnc_unix: Option<PathBuf>,
    /// Serve VNC on a non-loopback address anyway (anyone who reaches it controls the guest).
    #[arg(long)]
    pub vnc_allow_remote: bool,
    /// isola-input's control socket, where VNC key and pointer events go.
    #[arg(long, value_name = "PATH")]
    pub input: Option<PathBuf>,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--width {0} x --height {1}: each side must be 1 to {MAX_EDID_SIDE} and the area at most {MAX_PIXELS} pixels")]
    Size(u32, u32),
    #[error("--vnc {0}: not a loopback address; VNC here has no authentication (add --vnc-allow-remote to insist)")]
    Remote(SocketAddr),
    #[error("cannot listen for VNC on {0}")]
    VncBind(SocketAddr, #[source] std::io::Error),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("entering the sandbox")]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Connector(#[from] ConnectorError),
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
}

/// A validated configuration: every socket is listening.
pub struct Config {
    screen: Screen,
    gpu: UnixListener,
    control: Option<UnixListener>,
    vnc_tcp: Option<TcpListener>,
    vnc_unix: Option<UnixListener>,
    input: Option<PathBuf>,
    sandbox: SandboxArgs,
}

impl Config {
    pub fn from_cli(cli: Cli) -> Result<Config, ConfigError> {
        let (w, h) = (cli.width, cli.height);
        if !(1..=MAX_EDID_SIDE).contains(&w)
            || !(1..=MAX_EDID_SIDE).contains(&h)
            || u64::from(w) * u64::from(h) > MAX_PIXELS
        {
            return Err(ConfigError::Size(w, h));
        }
        common_sandbox::validate(&cli.sandbox)?;
        if let Some(addr) = cli.vnc {
            if !addr.ip().is_loopback() && !cli.vnc_allow_remote {
                return Err(ConfigError::Remote(addr));
            }
        }
        let vnc_tcp = cli
            .vnc
            .map(|addr| TcpListener::bind(addr).map_err(|e| ConfigError::VncBind(addr, e)))
            .transpose()?;
        Ok(Config {
            screen: Screen {
                width: w,
                height: h,
            },
            gpu: bind(&cli.socket)?,
            control: cli.control.as_deref().map(bind).transpose()?,
            vnc_tcp,
            vnc_unix: cli.vnc_unix.as_deref().map(bind).transpose()?,
            input: cli.input,
            sandbox: cli.sandbox,
        })
    }

    /// The TCP address VNC listens on (useful with port 0).
    pub fn vnc_addr(&self) -> Option<SocketAddr> {
        self.vnc_tcp.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// Enters the sandbox (with the input connector started first, outside it), then serves
/// until the process is killed.
pub fn run(config: Config) -> Result<(), RunError> {
    let input = match config.input {
        None => None,
        Some(path) if config.sandbox.sandbox == Switch::Off => Some(InputPath::Direct(path)),
        Some(path) => {
            let connector = Connector::spawn(&path, &config.sandbox)?;
            Some(InputPath::Connector(path, connector))
        }
    };
    common_sandbox::enter(&config.sandbox, &sandbox::policy())?;
    let display = Arc::new(Display::new(config.screen.width, config.screen.height));
    let input = Arc::new(InputSink::new(input));
    if let Some(listener) = config.control {
        let display = Arc::clone(&display);
        spawn_named("control-accept", move || control::serve(listener, display))
            .map_err(|e| RunError::Thread("control", e))?;
    }
    if let Some(listener) = config.vnc_tcp {
        if let Ok(addr) = listener.local_addr() {
            log::info!("VNC on {addr}");
        }
        let (display, input) = (Arc::clone(&display), Arc::clone(&input));
        spawn_named("vnc-tcp", move || vnc::serve_tcp(listener, display, input))
            .map_err(|e| RunError::Thread("VNC", e))?;
    }
    if let Some(listener) = config.vnc_unix {
        let (display, input) = (Arc::clone(&display), Arc::clone(&input));
        spawn_named("vnc-unix", move || {
            vnc::serve_unix(listener, display, input)
        })
        .map_err(|e| RunError::Thread("VNC", e))?;
    }
    session::serve(config.gpu, display, config.screen);
    Ok(())
}
