//! isola-usb: Isola's USB device process. One process serves an xHCI controller over
//! vfio-user, with a HID keyboard (port 1) and tablet (port 2) on its USB 2 ports, fed by
//! an isola-input-compatible control socket, and, with `--disk`, a mass-storage disk on its
//! first USB 3 port (port 3).
//!
//! Threads: `vfio-server` runs the `vfio_user` crate's server on a private socket pair;
//! `gate` accepts frontends and passes each checked message to it ([`gate`]); `control`
//! accepts `isolactl`/isola-display clients ([`control`]). The controller ([`xhci`], a
//! library over guest memory) sits behind one lock that the server and the control clients
//! take.

pub mod control;
pub mod gate;
pub mod hid;
pub mod mem;
pub mod pci;
pub mod sandbox;
pub mod scsi;
pub mod state;
pub mod storage;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod trb;
pub mod usb;
pub mod vfio;
pub mod xhci;

use std::fs::File;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::Parser;
use isola_device_common::cli::{bind, ListenError};
use isola_device_common::sandbox::{self as common_sandbox, SandboxArgs, SandboxError};

use crate::hid::{HidDevice, HidKind, Reports};
use crate::state::{Marker, StateError};
use crate::storage::Storage;
use crate::usb::{Speed, UsbDevice};
use crate::vfio::{Backend, Device};

#[derive(Debug, Parser)]
#[command(
    name = "isola-usb",
    version,
    about = "Isola's USB device process: an xHCI controller (vfio-user server) with a HID keyboard, tablet and mass-storage disk"
)]
pub struct Cli {
    /// Where to serve the controller (vfio-user): `--socket PATH`, or `--fd N` for a
    /// listening socket handed over (isola-supervisor's `--fd 3`).
    #[command(flatten)]
    pub listen: isola_device_common::cli::ListenAt,
    /// Take key and pointer requests (isolactl key|type|pointer, isola-display) here.
    #[arg(long, value_name = "PATH")]
    pub control_socket: PathBuf,
    /// A raw image for the mass-storage disk (none: no disk).
    #[arg(long, value_name = "PATH")]
    pub disk: Option<PathBuf>,
    /// Open the disk read only; writes fail with DATA PROTECT.
    #[arg(long, requires = "disk")]
    pub readonly: bool,
    /// Where the restart marker lives (see `state`): a new process that finds the guest had
    /// the controller running reports Host System Error so the guest resets it.
    #[arg(long, value_name = "PATH")]
    pub state_file: Option<PathBuf>,
    /// HID reports each device holds while the guest takes none.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_pending: usize,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--max-pending {0}: must be 16 to 65536")]
    MaxPending(usize),
    #[error("cannot open the disk image {}", .0.display())]
    Disk(PathBuf, #[source] std::io::Error),
    #[error("the disk image {} is {len} bytes: not a whole number of 512-byte blocks, or empty", .path.display())]
    DiskSize { path: PathBuf, len: u64 },
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot set up the vfio-user server's socket pair")]
    Pair(#[source] std::io::Error),
    #[error(transparent)]
    Sandbox(SandboxError),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the vfio-user server")]
    Server(#[source] vfio_user::Error),
    #[error("serving frontends")]
    Gate(#[source] std::io::Error),
    #[error("serving the control socket")]
    Control(#[source] std::io::Error),
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
    #[error("entering the sandbox")]
    Sandbox(#[from] SandboxError),
}

/// A validated configuration: the image and state file open, every socket listening.
pub struct Config {
    device: Arc<Mutex<Device>>,
    targets: control::Targets,
    listener: UnixListener,
    control: UnixListener,
    /// The crate server's listener, and the gate's connection to it (already queued).
    server: (UnixListener, UnixStream),
    sandbox: SandboxArgs,
}

fn open_disk(path: &PathBuf, readonly: bool) -> Result<(File, u64), ConfigError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(path)
        .map_err(|e| ConfigError::Disk(path.clone(), e))?;
    let len = file
        .metadata()
        .map_err(|e| ConfigError::Disk(path.clone(), e))?
        .len();
    if len == 0 || len % scsi::BLOCK != 0 {
        return Err(ConfigError::DiskSize {
            path: path.clone(),
            len,
        });
    }
    Ok((file, len / scsi::BLOCK))
}

/// A listener only this process can reach, and a connection to it already queued: bound
/// in a fresh directory of mode 0700, connected, then the path removed.
fn private_pair() -> std::io::Result<(UnixListener, UnixStream)> {
    use std::os::unix::fs::DirBuilderExt;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("isola-usb-{}-{nanos}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let path = dir.join("s");
    let pair = UnixListener::bind(&path).and_then(|l| Ok((UnixStream::connect(&path)?, l)));
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
    let (stream, listener) = pair?;
    Ok((listener, stream))
}

impl Config {
    pub fn from_cli(cli: Cli) -> Result<Config, ConfigError> {
        if !(16..=65536).contains(&cli.max_pending) {
            return Err(ConfigError::MaxPending(cli.max_pending));
        }
        common_sandbox::validate(&cli.sandbox).map_err(ConfigError::Sandbox)?;
        let keyboard = Arc::new(Reports::new(HidKind::Keyboard, cli.max_pending));
        let tablet = Arc::new(Reports::new(HidKind::Tablet, cli.max_pending));
        let mut devices: Vec<Option<Box<dyn UsbDevice>>> = vec![
            Some(Box::new(HidDevice::new(Arc::clone(&keyboard)))),
            Some(Box::new(HidDevice::new(Arc::clone(&tablet)))),
        ];
        if let Some(path) = &cli.disk {
            let (file, blocks) = open_disk(path, cli.readonly)?;
            devices.push(Some(Box::new(Storage::new(
                file,
                blocks,
                cli.readonly,
                Speed::Super,
            ))));
        }
        let (marker, running) = Marker::open(cli.state_file.as_deref())?;
        let device = Arc::new(Mutex::new(Device::new(devices, marker, running)));
        let server = private_pair().map_err(ConfigError::Pair)?;
        let listener = cli.listen.listener()?;
        let control = match bind(&cli.control_socket) {
            Ok(c) => c,
            Err(e) => {
                if let Some(path) = &cli.listen.socket {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e.into());
            }
        };
        Ok(Config {
            targets: control::Targets {
                keyboard,
                tablet,
                device: Some(Arc::clone(&device)),
            },
            device,
            listener,
            control,
            server,
            sandbox: cli.sandbox,
        })
    }
}

/// Enters the sandbox, then serves frontends, the crate's server and the control socket
/// until one of them fails.
pub fn run(config: Config) -> Result<(), RunError> {
    common_sandbox::single_arena();
    common_sandbox::enter(&config.sandbox, &sandbox::policy())?;
    let (server_listener, gate_end) = config.server;
    let mut backend = Backend(Arc::clone(&config.device));
    let server = isola_device_common::thread::spawn_named("vfio-server", move || {
        let server = vfio_user::Server::from_owned_fd(
            server_listener.into(),
            true,
            vfio::irqs(),
            vfio::regions(),
        );
        // One connection (the gate's) for the life of the process.
        server.run(&mut backend)
    })
    .map_err(RunError::Thread)?;
    let (listener, device) = (config.listener, config.device);
    let gate = isola_device_common::thread::spawn_named("gate", move || {
        gate::serve(&listener, gate_end, &device)
    })
    .map_err(RunError::Thread)?;
    let (control, targets) = (config.control, config.targets);
    let control = isola_device_common::thread::spawn_named("control", move || {
        control::serve(control, targets)
    })
    .map_err(RunError::Thread)?;
    log::info!("serving the xHCI controller");
    loop {
        if server.is_finished() {
            return match server.join() {
                Ok(Ok(())) => Err(RunError::Gate(std::io::Error::other("the gate hung up"))),
                Ok(Err(e)) => Err(RunError::Server(e)),
                Err(_) => Err(RunError::Panicked("vfio-server")),
            };
        }
        if gate.is_finished() {
            return match gate.join() {
                Ok(r) => r.map_err(RunError::Gate),
                Err(_) => Err(RunError::Panicked("gate")),
            };
        }
        if control.is_finished() {
            return match control.join() {
                Ok(r) => r.map_err(RunError::Control),
                Err(_) => Err(RunError::Panicked("control")),
            };
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
