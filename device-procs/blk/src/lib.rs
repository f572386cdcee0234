//! isola-blk: Isola's virtio-blk device process, a vhost-user-blk backend over a raw image
//! file or block device.
//!
//! `main.rs` turns the command line into a validated [`Config`] and calls [`run`]. The
//! request semantics are in [`device`] and [`request`], the image in [`disk`], the I/O
//! engines (sync, io_uring) in [`engine`], and the glue to the shared vhost-user server in
//! [`backend`].

pub mod backend;
pub mod device;
pub mod disk;
pub mod engine;
pub mod request;
pub mod sandbox;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use isola_device_common::cli::{ListenArgs, ListenError};
use isola_device_common::sandbox::{self as common_sandbox, SandboxArgs, SandboxError, Switch};
use isola_device_common::ServeError;

use crate::backend::BlkDevice;
use crate::disk::{Disk, DiskError, DiskOptions};
use crate::engine::{EngineError, EngineKind, SqPoller, UringEngine};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// Most queues (one worker thread each).
pub const MAX_QUEUES: u16 = 64;
/// Default poll window, in microseconds.
pub const DEFAULT_POLL_US: u32 = 64;
/// Longest poll window, in microseconds (one second).
pub const MAX_POLL_US: u32 = 1_000_000;
/// Longest idle time of a kernel polling thread, in milliseconds.
pub const MAX_SQ_POLL_MS: u32 = 10_000;

#[derive(Debug, Parser)]
#[command(
    name = "isola-blk",
    version,
    about = "Isola's virtio-blk device process (a vhost-user-blk backend)"
)]
pub struct Cli {
    #[command(flatten)]
    pub listen: ListenArgs,
    /// Raw image file or block device to serve.
    #[arg(long, value_name = "PATH")]
    pub image: PathBuf,
    /// Serve the image read-only (the driver sees VIRTIO_BLK_F_RO).
    #[arg(long)]
    pub readonly: bool,
    /// Number of virtqueues, each served by its own thread.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub num_queues: u16,
    /// Largest virtqueue the frontend may set up: a power of two, 4 to 32768.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,
    /// I/O engine: `auto` is io_uring for reads and flushes with synchronous writes on a
    /// buffered image (and falls back to `sync` where io_uring is not available).
    #[arg(long, value_enum, default_value_t = EngineKind::Auto)]
    pub engine: EngineKind,
    /// Longest time a queue thread keeps watching its ring after a burst before it sleeps
    /// (0: never). The window adapts from 0 up to this while requests follow each other
    /// closely; it saves the driver's kick and this thread's wakeup, at the price of a busy
    /// thread for that long after each burst.
    #[arg(long, value_name = "US", default_value_t = DEFAULT_POLL_US)]
    pub poll_us: u32,
    /// A kernel thread that polls the queues' io_uring submission queues and runs their I/O
    /// (io_uring SQPOLL; one for all queues), sleeping after MS idle milliseconds (0: no such
    /// thread). It moves the I/O off the queue threads onto another CPU, for the most IOPS on
    /// a busy disk; the price is a CPU spinning while the disk is in use, and with no CPU
    /// to spare (other work, or a driver that polls) it is slower than the default.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub sq_poll_ms: u32,
    /// Without `--sq-poll-ms`: a kernel polling thread that a queue uses only while it
    /// measures faster than submitting from the queue's own thread (a spare CPU), tried now
    /// and then for three 10 ms epochs when the queue is busy; it sleeps 1 ms after its last
    /// submission. `off`: the queue's thread always submits.
    #[arg(long, value_enum, value_name = "on|off", default_value_t = Switch::On)]
    pub adaptive_sq_poll: Switch,
    /// Dedicate CPU N to the kernel polling thread (with `--sq-poll-ms`): the thread runs on
    /// N, and this process's own threads on the other CPUs it may use. For hosts that keep
    /// a CPU for storage polling; the guest's vCPUs belong elsewhere too.
    #[arg(long, value_name = "N")]
    pub sq_poll_cpu: Option<u32>,
    /// Open the image with O_DIRECT; the device then has 4 KiB blocks, and unaligned guest
    /// buffers go through a bounce buffer.
    #[arg(long)]
    pub direct: bool,
    /// Serial number the driver reads with GET_ID (at most 20 bytes; default: the image's
    /// file name).
    #[arg(long, value_name = "ID")]
    pub serial: Option<String>,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// Test hook: requests whose header names sector S are taken and never finished.
    #[cfg(feature = "debug-hold")]
    #[arg(long, value_name = "S")]
    pub debug_hold_sector: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--num-queues {0}: must be 1 to {MAX_QUEUES}")]
    NumQueues(u16),
    #[error("--queue-size {0}: must be a power of two from 4 to 32768")]
    QueueSize(u16),
    #[error("--poll-us {0}: must be at most {MAX_POLL_US}")]
    PollUs(u32),
    #[error("--sq-poll-ms {0}: must be at most {MAX_SQ_POLL_MS}")]
    SqPollMs(u32),
    #[error("--sq-poll-ms needs an io_uring engine (`--engine io-uring` or `auto`)")]
    SqPollSync,
    #[error("--sq-poll-cpu needs --sq-poll-ms")]
    SqPollCpuAlone,
    #[error("--sq-poll-cpu {cpu}: this process may use CPUs {allowed:?}; N must be one of them, and not the only one")]
    SqPollCpu { cpu: u32, allowed: Vec<usize> },
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("--engine io-uring is not available here")]
    Engine(#[source] EngineError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Sandbox(SandboxError),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("serving the image")]
    Serve(#[from] ServeError),
    #[error("entering the sandbox")]
    Sandbox(#[from] SandboxError),
    #[error("cannot keep this process off the polling CPU")]
    Affinity(#[source] nix::Error),
}

/// The CPUs this process may use other than `cpu`, if `cpu` is one of them and not the only
/// one.
fn cpus_besides(cpu: u32) -> Result<CpuSet, ConfigError> {
    let mut allowed = Vec::new();
    if let Ok(set) = sched_getaffinity(Pid::from_raw(0)) {
        allowed = (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect();
    }
    let refuse = |allowed| ConfigError::SqPollCpu { cpu, allowed };
    if !allowed.contains(&(cpu as usize)) || allowed.len() < 2 {
        return Err(refuse(allowed));
    }
    let mut own = CpuSet::new();
    for &c in allowed.iter().filter(|&&c| c != cpu as usize) {
        own.set(c).map_err(|_| refuse(allowed.clone()))?;
    }
    Ok(own)
}

/// A validated configuration: the image is open and the socket listening.
pub struct Config {
    image: PathBuf,
    disk: Arc<Disk>,
    listener: UnixListener,
    num_queues: u16,
    queue_size: u16,
    engine: EngineKind,
    poll: Duration,
    sq_poller: Option<SqPoller>,
    /// With a dedicated polling CPU: the CPUs left for this process's threads.
    own_cpus: Option<CpuSet>,
    sandbox: SandboxArgs,
    #[cfg(feature = "debug-hold")]
    hold_sector: Option<u64>,
}

impl Config {
    pub fn from_cli(cli: Cli) -> Result<Config, ConfigError> {
        if cli.num_queues == 0 || cli.num_queues > MAX_QUEUES {
            return Err(ConfigError::NumQueues(cli.num_queues));
        }
        if !cli.queue_size.is_power_of_two() || !(4..=32768).contains(&cli.queue_size) {
            return Err(ConfigError::QueueSize(cli.queue_size));
        }
        if cli.poll_us > MAX_POLL_US {
            return Err(ConfigError::PollUs(cli.poll_us));
        }
        if cli.sq_poll_ms > MAX_SQ_POLL_MS {
            return Err(ConfigError::SqPollMs(cli.sq_poll_ms));
        }
        if cli.sq_poll_ms > 0 && cli.engine == EngineKind::Sync {
            return Err(ConfigError::SqPollSync);
        }
        let own_cpus = match cli.sq_poll_cpu {
            Some(_) if cli.sq_poll_ms == 0 => return Err(ConfigError::SqPollCpuAlone),
            Some(cpu) => Some(cpus_besides(cpu)?),
            None => None,
        };
        common_sandbox::validate(&cli.sandbox).map_err(ConfigError::Sandbox)?;
        let options = DiskOptions {
            readonly: cli.readonly,
            direct: cli.direct,
            serial: cli.serial.clone(),
        };
        let disk = Arc::new(Disk::open(&cli.image, &options)?);
        let mut engine = cli.engine;
        if engine != EngineKind::Sync {
            match UringEngine::new(Arc::clone(&disk), 4) {
                Ok(_) => {}
                Err(e) if engine == EngineKind::Auto => {
                    log::warn!(
                        "io_uring is not available ({}); using the sync engine",
                        isola_device_common::logging::chain(&e)
                    );
                    engine = EngineKind::Sync;
                }
                Err(e) => return Err(ConfigError::Engine(e)),
            }
        }
        let polling = cli.sq_poll_ms > 0 && engine != EngineKind::Sync;
        if cli.sq_poll_ms > 0 && !polling {
            log::warn!("no io_uring: --sq-poll-ms and --sq-poll-cpu have no effect");
        }
        let sq_poller = if polling {
            Some(SqPoller::new(cli.sq_poll_ms, cli.sq_poll_cpu))
        } else if cli.adaptive_sq_poll == Switch::On && engine != EngineKind::Sync {
            Some(SqPoller::adaptive())
        } else {
            None
        };
        // Last, so that bad input leaves no socket file behind.
        let listener = cli.listen.listener()?;
        Ok(Config {
            image: cli.image,
            disk,
            listener,
            num_queues: cli.num_queues,
            queue_size: cli.queue_size,
            engine,
            poll: Duration::from_micros(u64::from(cli.poll_us)),
            sq_poller,
            own_cpus: own_cpus.filter(|_| polling),
            sandbox: cli.sandbox,
            #[cfg(feature = "debug-hold")]
            hold_sector: cli.debug_hold_sector,
        })
    }
}

/// Enters the sandbox, then serves the image to one frontend at a time, for ever.
pub fn run(config: Config) -> Result<(), RunError> {
    if let Some(cpus) = &config.own_cpus {
        // Before any thread (and the sandbox's processes) exists: all inherit it.
        sched_setaffinity(Pid::from_raw(0), cpus).map_err(RunError::Affinity)?;
    }
    common_sandbox::single_arena();
    common_sandbox::enter(&config.sandbox, &sandbox::policy(config.engine))?;
    log::info!(
        "serving {} ({} bytes{}{}), {} queues of up to {}, {:?} engine{}",
        config.image.display(),
        config.disk.size(),
        if config.disk.readonly() {
            ", read-only"
        } else {
            ""
        },
        if config.disk.direct() {
            ", O_DIRECT"
        } else {
            ""
        },
        config.num_queues,
        config.queue_size,
        config.engine,
        config
            .sq_poller
            .as_ref()
            .map_or(String::new(), |p| format!(", {p}")),
    );
    let device = BlkDevice::new(
        config.disk,
        config.num_queues,
        config.queue_size,
        config.engine,
    )
    .with_poll(config.poll)
    .with_sq_poller(config.sq_poller);
    #[cfg(feature = "debug-hold")]
    let device = device.with_hold_sector(config.hold_sector);
    isola_device_common::serve(&config.listener, &Arc::new(device))?;
    Ok(())
}
