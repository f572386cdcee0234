//! isola-net: Isola's virtio-net device process, a vhost-user-net backend on a TAP device.
//!
//! `main.rs` turns the command line into a validated [`Config`] and calls [`run`]. Frame
//! handling is in [`device`], the tap in [`tap`], and the glue to the shared vhost-user
//! server (features, configuration space, queue layout) in [`backend`].

pub mod backend;
pub mod device;
pub mod sandbox;
pub mod tap;

use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use clap::Parser;
use isola_device_common::cli::{ListenArgs, ListenError};
use isola_device_common::sandbox::{self as common_sandbox, SandboxArgs, SandboxError};
use isola_device_common::ServeError;

use crate::backend::NetDevice;
use crate::tap::{Tap, TapError};

/// Most queue pairs (one receive and one transmit thread each).
pub const MAX_PAIRS: u16 = 16;

#[derive(Debug, Parser)]
#[command(
    name = "isola-net",
    version,
    about = "Isola's virtio-net device process (a vhost-user-net backend on a tap)"
)]
pub struct Cli {
    #[command(flatten)]
    pub listen: ListenArgs,
    #[command(flatten)]
    pub tap: TapArgs,
    /// Queue pairs with --tap (a multi-queue tap gets one queue per pair). With --tap-fd,
    /// one pair per fd.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub queue_pairs: u16,
    /// MAC address the guest sees.
    #[arg(
        long,
        value_name = "XX:XX:XX:XX:XX:XX",
        default_value = "02:00:00:00:00:01"
    )]
    pub mac: String,
    /// MTU the guest sees (the tap's own MTU is the host's business), 68 to 65535.
    #[arg(long, value_name = "BYTES", default_value_t = 1500)]
    pub mtu: u16,
    /// Largest virtqueue the frontend may set up: a power of two, 4 to 32768.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

/// `--tap NAME` or `--tap-fd N` (repeatable).
#[derive(Debug, Clone, clap::Args)]
#[group(required = true, multiple = false)]
pub struct TapArgs {
    /// Attach to this existing tap device.
    #[arg(long, value_name = "NAME")]
    pub tap: Option<String>,
    /// Use this inherited tap fd, opened by a launcher with IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR (and IFF_MULTI_QUEUE); repeat for more queue pairs.
    #[arg(long, value_name = "N")]
    pub tap_fd: Vec<RawFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--queue-pairs {0}: must be 1 to {MAX_PAIRS}")]
    QueuePairs(u16),
    #[error("--queue-pairs goes with --tap; with --tap-fd, pass one fd per pair")]
    PairsWithFds,
    #[error("{0} --tap-fd: at most {MAX_PAIRS}")]
    TooManyFds(usize),
    #[error("--queue-size {0}: must be a power of two from 4 to 32768")]
    QueueSize(u16),
    #[error("--mtu {0}: must be 68 to 65535")]
    Mtu(u16),
    #[error("--mac '{0}': expected six hex bytes separated by ':'")]
    Mac(String),
    #[error("--mac {0}: a multicast address cannot be a NIC's")]
    MulticastMac(String),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Sandbox(SandboxError),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("serving the network device")]
    Serve(#[from] ServeError),
    #[error("entering the sandbox")]
    Sandbox(#[from] SandboxError),
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || ConfigError::Mac(text.to_owned());
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(ConfigError::MulticastMac(text.to_owned()));
    }
    Ok(mac)
}

/// A validated configuration: the tap attached and the socket listening.
pub struct Config {
    tap: Arc<Tap>,
    listener: UnixListener,
    mac: [u8; 6],
    mtu: u16,
    queue_size: u16,
    sandbox: SandboxArgs,
}

impl Config {
    pub fn from_cli(cli: Cli) -> Result<Config, ConfigError> {
        if cli.queue_pairs == 0 || cli.queue_pairs > MAX_PAIRS {
            return Err(ConfigError::QueuePairs(cli.queue_pairs));
        }
        if !cli.queue_size.is_power_of_two() || !(4..=32768).contains(&cli.queue_size) {
            return Err(ConfigError::QueueSize(cli.queue_size));
        }
        if cli.mtu < 68 {
            return Err(ConfigError::Mtu(cli.mtu));
        }
        let mac = parse_mac(&cli.mac)?;
        common_sandbox::validate(&cli.sandbox).map_err(ConfigError::Sandbox)?;
        let tap = match &cli.tap.tap {
            Some(name) => Tap::open(name, cli.queue_pairs)?,
            None => {
                if cli.queue_pairs != 1 {
                    return Err(ConfigError::PairsWithFds);
                }
                if cli.tap.tap_fd.len() > usize::from(MAX_PAIRS) {
                    return Err(ConfigError::TooManyFds(cli.tap.tap_fd.len()));
                }
                Tap::from_fds(&cli.tap.tap_fd)?
            }
        };
        // Last, so that bad input leaves no socket file behind.
        let listener = cli.listen.listener()?;
        Ok(Config {
            tap: Arc::new(tap),
            listener,
            mac,
            mtu: cli.mtu,
            queue_size: cli.queue_size,
            sandbox: cli.sandbox,
        })
    }
}

/// Enters the sandbox (keeping the host's network namespace: [`sandbox`]), then serves the
/// tap to one frontend at a time, for ever.
pub fn run(config: Config) -> Result<(), RunError> {
    common_sandbox::single_arena();
    common_sandbox::enter(&config.sandbox, &sandbox::policy())?;
    let m = config.mac;
    log::info!(
        "serving tap {} ({} queue pairs), mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, mtu {}, queues of up to {}",
        config.tap.name(),
        config.tap.num_queues(),
        m[0], m[1], m[2], m[3], m[4], m[5],
        config.mtu,
        config.queue_size,
    );
    let device = NetDevice::new(config.tap, config.queue_size, config.mac, config.mtu);
    isola_device_common::serve(&config.listener, &Arc::new(device))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_multicast_is_refused() {
        assert_eq!(
            parse_mac("02:aB:00:10:ff:09").unwrap(),
            [2, 0xab, 0, 0x10, 0xff, 9]
        );
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "2:00:00:00:00:00",
            "zz:00:00:00:00:00",
        ] {
            assert!(matches!(parse_mac(bad), Err(ConfigError::Mac(_))), "{bad}");
        }
        assert!(matches!(
            parse_mac("03:00:00:00:00:01"),
            Err(ConfigError::MulticastMac(_))
        ));
    }
}
