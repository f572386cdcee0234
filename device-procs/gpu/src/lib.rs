//! isola-gpu: Isola's virtio-gpu device process (2D), a vhost-user-gpu backend.
//!
//! The guest's commands are served in [`device`] (resources, backing, scanouts, cursor; wire
//! format in [`protocol`]); what the guest shows goes to the display process over the
//! vhost-user-gpu display protocol ([`display`]), on the connection the core passes with
//! VHOST_USER_GPU_SET_SOCKET. [`state`] keeps what a restarted process needs; [`backend`]
//! is the glue to the shared vhost-user server; [`edid`] describes the display.

pub mod backend;
pub mod device;
pub mod display;
pub mod edid;
pub mod protocol;
pub mod sandbox;
pub mod state;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use isola_device_common::cli::{ListenArgs, ListenError};
use isola_device_common::sandbox::{self as common_sandbox, SandboxArgs, SandboxError};
use isola_device_common::ServeError;

use crate::backend::GpuDevice;
use crate::edid::MAX_EDID_DIM;
use crate::state::{Snapshot, StateError, StateFile};

/// Smallest scanout side.
pub const MIN_DIM: u32 = 16;

#[derive(Debug, Parser)]
#[command(
    name = "isola-gpu",
    version,
    about = "Isola's virtio-gpu device process (2D; a vhost-user-gpu backend)"
)]
pub struct Cli {
    #[command(flatten)]
    pub listen: ListenArgs,
    /// Size of the scanout the guest is offered (GET_DISPLAY_INFO, EDID), WIDTHxHEIGHT.
    #[arg(long, value_name = "WxH", default_value = "1280x800")]
    pub resolution: String,
    /// Host memory all resources together may use, in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 256)]
    pub max_memory: u64,
    /// Keep the resource/backing/scanout table here, so that a restarted process carries on
    /// where a dead one stopped (put it on a tmpfs only this user can write).
    #[arg(long, value_name = "PATH")]
    pub state_file: Option<PathBuf>,
    /// Largest virtqueue the frontend may set up: a power of two, 4 to 32768.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--resolution {0}: expected WIDTHxHEIGHT, each {MIN_DIM} to {MAX_EDID_DIM}")]
    Resolution(String),
    #[error("--max-memory {0}: must be 1 to 65536 MiB")]
    MaxMemory(u64),
    #[error("--queue-size {0}: must be a power of two from 4 to 32768")]
    QueueSize(u16),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("entering the sandbox")]
    Sandbox(#[from] SandboxError),
    #[error("serving the device")]
    Serve(#[from] ServeError),
}

/// `WIDTHxHEIGHT`, each side in range.
pub fn parse_resolution(s: &str) -> Option<(u32, u32)> {
    let (w, h) = s.split_once('x')?;
    let side = |v: &str| {
        v.parse::<u32>()
            .ok()
            .filter(|n| (MIN_DIM..=MAX_EDID_DIM).contains(n))
    };
    Some((side(w)?, side(h)?))
}

/// A validated configuration: the state file read and the socket listening.
pub struct Config {
    width: u32,
    height: u32,
    budget: u64,
    queue_size: u16,
    state_file: Option<StateFile>,
    snapshot: Option<Snapshot>,
    listener: UnixListener,
    sandbox: SandboxArgs,
}

impl Config {
    pub fn from_cli(cli: Cli) -> Result<Config, ConfigError> {
        let (width, height) =
            parse_resolution(&cli.resolution).ok_or(ConfigError::Resolution(cli.resolution))?;
        if cli.max_memory == 0 || cli.max_memory > 65536 {
            return Err(ConfigError::MaxMemory(cli.max_memory));
        }
        if !cli.queue_size.is_power_of_two() || !(4..=32768).contains(&cli.queue_size) {
            return Err(ConfigError::QueueSize(cli.queue_size));
        }
        common_sandbox::validate(&cli.sandbox)?;
        // Opened now: inside the sandbox there is no path to open.
        let (state_file, snapshot) = match &cli.state_file {
            Some(path) => match StateFile::open(path) {
                Ok((file, snap)) => (Some(file), snap),
                Err(StateError::Unusable(p, file)) => {
                    log::warn!("{} is not a usable state file; starting empty", p.display());
                    (Some(*file), None)
                }
                Err(e) => return Err(e.into()),
            },
            None => (None, None),
        };
        let listener = cli.listen.listener()?;
        Ok(Config {
            width,
            height,
            budget: cli.max_memory << 20,
            queue_size: cli.queue_size,
            state_file,
            snapshot,
            listener,
            sandbox: cli.sandbox,
        })
    }
}

/// Enters the sandbox, then serves the device to one frontend at a time, for ever.
pub fn run(config: Config) -> Result<(), RunError> {
    common_sandbox::enter(&config.sandbox, &sandbox::policy(config.budget))?;
    log::info!(
        "scanout {}x{}, {} MiB for resources{}",
        config.width,
        config.height,
        config.budget >> 20,
        match (&config.state_file, &config.snapshot) {
            (Some(_), Some(s)) => format!(", {} saved resource(s) to restore", s.resources.len()),
            (Some(f), None) => format!(", state in {}", f.path().display()),
            (None, _) => String::new(),
        }
    );
    let device = GpuDevice::new(
        config.width,
        config.height,
        config.budget,
        config.queue_size,
        config.state_file,
        config.snapshot,
    );
    isola_device_common::serve(&config.listener, &Arc::new(device))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolutions_parse_and_refuse_nonsense() {
        assert_eq!(parse_resolution("1280x800"), Some((1280, 800)));
        assert_eq!(parse_resolution("16x4095"), Some((16, 4095)));
        for bad in [
            "", "1280", "1280x", "x800", "0x0", "15x800", "4096x800", "-1x5", "axb",
        ] {
            assert_eq!(parse_resolution(bad), None, "{bad}");
        }
    }
}
