//! `isola-supervisor`: starts Isola's device daemons and starts again any that dies.
//!
//! It is a separate small process rather than a role of the core: restarting a daemon means
//! fork + exec, which the core's seccomp filters forbid on purpose, and a supervisor that
//! outlives a daemon crash must not share its fate with the VM either. See ARCHITECTURE.md.
//!
//! For each `--daemon NAME:SOCKET:COMMAND` it binds SOCKET itself and runs `COMMAND --fd 3`
//! with the listening socket as fd 3. It binds its control socket (`--control`) last, so once
//! that exists every device socket does too. SIGTERM, SIGINT, SIGHUP or a `Stop` request stop
//! every daemon (SIGTERM, then SIGKILL after `--stop-timeout-ms`) and remove the sockets.
//!
//! A daemon whose first start fails with a configuration error (it cannot be started, or it
//! exits with status 2) is failed at once, not retried. With `--exit-on-config-error` (what
//! `scripts/isola-run` uses) such an error at launch stops the supervisor too: every daemon is stopped and it
//! exits with status 2, naming the daemon and its error line, so the launcher can end the
//! VM at once instead of running it without a device.

mod daemon;
mod exit;
mod output;
mod time;

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use isola_ipc::supervisor::{SupervisorRequest, SupervisorResponse};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use daemon::{Daemon, DaemonSpec, RestartPolicy};

#[derive(Debug, Parser)]
#[command(
    name = "isola-supervisor",
    version,
    about = "Start Isola's device daemons on sockets this process owns; restart any that dies"
)]
struct Cli {
    /// A daemon: NAME:SOCKET:COMMAND. COMMAND is split like a shell would and run with
    /// `--fd 3` appended, fd 3 being the listening socket SOCKET; SOCKET `-` for a daemon that
    /// binds its own sockets (no `--fd`). Repeatable.
    #[arg(long = "daemon", value_name = "NAME:SOCKET:COMMAND", required = true)]
    daemons: Vec<DaemonSpec>,
    /// Serve status and stop requests (`isolactl`) on this Unix socket.
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// A daemon that ran at least this long is restarted at once.
    #[arg(long, default_value_t = 500, value_name = "MS")]
    min_uptime_ms: u64,
    /// Give up on a daemon that died more than this many times within --restart-window.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    restart_limit: u32,
    #[arg(long, default_value_t = 60, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    restart_window: u64,
    /// How long daemons get to exit after SIGTERM before SIGKILL.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    stop_timeout_ms: u64,
    /// Stop everything and exit with status 2 when a daemon's first start at launch fails
    /// with a configuration error (it cannot be started, or exits with status 2). After
    /// `isolactl restart` such an error only fails that daemon again.
    #[arg(long)]
    exit_on_config_error: bool,
    /// Write each daemon's output (stdout and stderr, each line after its UTC time) to
    /// DIR/NAME.log, appending, instead of this process's stderr.
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// Log filter of this process (error, warn, info, debug, trace, or MODULE=LEVEL,...);
    /// overrides RUST_LOG. Daemons take their own --log-level in their COMMAND.
    #[arg(long, value_name = "FILTER", value_parser = parse_log_level)]
    log_level: Option<String>,
}

fn parse_log_level(s: &str) -> Result<String, String> {
    if isola_ipc::log_filter::valid(s) {
        Ok(s.to_owned())
    } else {
        Err(format!("'{s}' is not a log filter"))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    isola_device_common::logging::init_with_level("isola-supervisor", cli.log_level.as_deref());
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "isola-supervisor: error: {}",
                isola_device_common::logging::chain(&e)
            );
            ExitCode::from(2)
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("daemon name '{0}' is given twice")]
    DuplicateName(String),
    #[error(transparent)]
    Listen(#[from] isola_device_common::cli::ListenError),
    #[error("cannot set up signal handling: {0}")]
    Signals(nix::Error),
    #[error("cannot serve the control socket: {0}")]
    Control(std::io::Error),
    #[error("cannot use the log directory {}", .0.display())]
    LogDir(PathBuf, #[source] std::io::Error),
    #[error("{0}; every daemon stopped")]
    Config(String),
}

/// Why the main loop ended.
enum Stop {
    /// A signal, a `Stop` request, or a failed poll.
    Asked(String),
    /// `--exit-on-config-error`: this daemon's configuration error (its name and reason).
    ConfigError(String),
}

fn run(cli: Cli) -> Result<(), Error> {
    let policy = RestartPolicy {
        min_uptime: Duration::from_millis(cli.min_uptime_ms),
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_secs(2),
        limit: cli.restart_limit,
        window: Duration::from_secs(cli.restart_window),
        stop_timeout: Duration::from_millis(cli.stop_timeout_ms),
    };
    // Signals arrive on a signalfd; the mask is reset in every daemon before exec.
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        signals.add(s);
    }
    signals.thread_block().map_err(Error::Signals)?;
    let signal_fd = SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(Error::Signals)?;
    // Stop the daemons if whoever started us (the launch script) goes away.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) };

    if let Some(dir) = &cli.log_dir {
        if !dir.is_dir() {
            let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
            return Err(Error::LogDir(dir.clone(), missing));
        }
    }
    let mut daemons: Vec<Daemon> = Vec::new();
    for spec in cli.daemons {
        if daemons.iter().any(|d| d.spec.name == spec.name) {
            return Err(Error::DuplicateName(spec.name));
        }
        let listener = spec
            .socket
            .as_deref()
            .map(isola_device_common::cli::bind)
            .transpose()?;
        let daemon = Daemon::new(spec, listener);
        daemons.push(match &cli.log_dir {
            Some(dir) => daemon.log_to(dir),
            None => daemon,
        });
    }
    let mut kernel_log = exit::KernelLog::open();
    let now = Instant::now();
    for d in &mut daemons {
        d.start_if_due(&policy, now);
    }
    let control = isola_device_common::cli::bind(&cli.control)?;
    control.set_nonblocking(true).map_err(Error::Control)?;
    log::info!(
        "supervising {} daemon(s); control socket {}",
        daemons.len(),
        cli.control.display()
    );

    let fatal = cli.exit_on_config_error;
    let stopped = serve(
        &mut daemons,
        &policy,
        &signal_fd,
        &control,
        &mut kernel_log,
        fatal,
    );
    let timeout = Duration::from_millis(cli.stop_timeout_ms);
    match stopped {
        Stop::Asked(reason) => {
            log::info!("stopping: {reason}");
            stop(&mut daemons, timeout);
            let _ = std::fs::remove_file(&cli.control);
            Ok(())
        }
        Stop::ConfigError(why) => {
            stop(&mut daemons, timeout);
            let _ = std::fs::remove_file(&cli.control);
            Err(Error::Config(why))
        }
    }
}

/// The main loop; returns why it ended. `fatal`: a configuration error ends it.
fn serve(
    daemons: &mut [Daemon],
    policy: &RestartPolicy,
    signal_fd: &SignalFd,
    control: &UnixListener,
    kernel_log: &mut exit::KernelLog,
    fatal: bool,
) -> Stop {
    loop {
        if fatal {
            if let Some(d) = daemons
                .iter()
                .find(|d| d.config_error_at_launch().is_some())
            {
                let why = d.config_error_at_launch().unwrap_or_default();
                return Stop::ConfigError(format!("{}: {why}", d.spec.name));
            }
        }
        let now = Instant::now();
        let timeout = daemons
            .iter()
            .filter_map(Daemon::wake_at)
            .min()
            .map(|due| {
                let ms = due.saturating_duration_since(now).as_millis();
                PollTimeout::try_from(ms.min(60_000) as i32 + 1).unwrap_or(PollTimeout::NONE)
            })
            .unwrap_or(PollTimeout::NONE);
        let mut fds = [
            PollFd::new(signal_fd.as_fd(), PollFlags::POLLIN),
            PollFd::new(control.as_fd(), PollFlags::POLLIN),
        ];
        if let Err(e) = poll(&mut fds, timeout) {
            if e != nix::errno::Errno::EINTR {
                return Stop::Asked(format!("poll failed: {e}"));
            }
        }
        while let Ok(Some(info)) = signal_fd.read_signal() {
            let signal = info.ssi_signo as i32;
            if signal != libc::SIGCHLD {
                let name = Signal::try_from(signal).map_or("?", |s| s.as_str());
                return Stop::Asked(format!("received {name}"));
            }
        }
        let now = Instant::now();
        for d in daemons.iter_mut() {
            let (name, program) = (d.spec.name.clone(), d.spec.argv[0].clone());
            d.reap(policy, now, &mut |report| {
                if !exit::is_seccomp_kill(report.status) {
                    return None;
                }
                // The daemon's own report first; the kernel's audit record otherwise
                // (printk rate-limits it).
                let note = match &report.seccomp_line {
                    Some(line) => format!("seccomp blocked {line}"),
                    None => kernel_log.seccomp_note(report.pid, &program),
                };
                log::error!("{name}: {note}");
                Some(note)
            });
        }
        for d in daemons.iter_mut() {
            d.enforce_stop(Instant::now());
            d.start_if_due(policy, Instant::now());
        }
        loop {
            match control.accept() {
                Ok((stream, _)) => {
                    if serve_client(daemons, policy, stream) {
                        return Stop::Asked("stop requested".into());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::warn!("control socket: accept failed: {e}");
                    break;
                }
            }
        }
    }
}

/// Answers one request; true if it asked the supervisor to stop.
fn serve_client(daemons: &mut [Daemon], policy: &RestartPolicy, mut stream: UnixStream) -> bool {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let request: SupervisorRequest = match isola_ipc::read_message(&mut stream) {
        Ok(request) => request,
        Err(e) => {
            log::warn!("control socket: bad request: {e}");
            let _ = isola_ipc::write_message(
                &mut stream,
                &SupervisorResponse::Error(format!("bad request: {e}")),
            );
            return false;
        }
    };
    let (response, stop) = match request {
        SupervisorRequest::Status => (
            SupervisorResponse::Status(daemons.iter().map(Daemon::status).collect()),
            false,
        ),
        SupervisorRequest::Restart { name } => (restart(daemons, policy, &name, None), false),
        SupervisorRequest::Upgrade { name, binary } => {
            (restart(daemons, policy, &name, Some(binary)), false)
        }
        SupervisorRequest::Stop => (SupervisorResponse::Done, true),
    };
    let _ = isola_ipc::write_message(&mut stream, &response);
    stop
}

/// `isolactl restart NAME`, or `upgrade NAME` with `binary` (`None`: the same program again).
fn restart(
    daemons: &mut [Daemon],
    policy: &RestartPolicy,
    name: &str,
    binary: Option<Option<String>>,
) -> SupervisorResponse {
    let Some(daemon) = daemons.iter_mut().find(|d| d.spec.name == name) else {
        return SupervisorResponse::Error(format!("no daemon named '{name}'"));
    };
    let program = match &binary {
        Some(Some(path)) => {
            if let Err(why) = executable(path) {
                return SupervisorResponse::Error(why);
            }
            Some(path.clone())
        }
        // `upgrade` without --binary: the file at the same path, now.
        Some(None) => Some(daemon.spec.argv[0].clone()),
        None => None,
    };
    match daemon.restart_on_request(Instant::now(), policy, program.as_deref()) {
        Ok(()) => {
            let what = if binary.is_some() {
                "upgrade"
            } else {
                "restart"
            };
            log::info!("{name}: {what} requested");
            SupervisorResponse::Done
        }
        Err(why) => SupervisorResponse::Error(why),
    }
}

/// Whether `path` is an absolute path to a regular file someone may execute.
fn executable(path: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if !path.starts_with('/') {
        return Err(format!("--binary '{path}' is not an absolute path"));
    }
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(format!("--binary '{path}' is not an executable file")),
        Err(e) => Err(format!("--binary '{path}': {e}")),
    }
}

/// SIGTERM to every daemon, SIGKILL to those still there after `timeout`; removes the sockets.
fn stop(daemons: &mut [Daemon], timeout: Duration) {
    for d in daemons.iter() {
        d.signal(Signal::SIGTERM);
    }
    let deadline = Instant::now() + timeout;
    for d in daemons.iter_mut() {
        if !d.wait_stopped(deadline) {
            log::warn!("{}: still running after SIGTERM; killing it", d.spec.name);
            d.signal(Signal::SIGKILL);
            d.wait_stopped(Instant::now() + Duration::from_secs(5));
        }
    }
    for socket in daemons.iter().filter_map(|d| d.spec.socket.as_ref()) {
        let _ = std::fs::remove_file(socket);
    }
}
