//! One supervised device daemon: how it is started, and when it is started again.
//!
//! The supervisor, not the daemon, owns the daemon's listening vhost-user socket and hands it
//! to every instance as fd 3 (`--fd 3`). The socket file therefore never disappears while a
//! daemon restarts: the core's reconnect finds it at once, and its connection waits in the
//! listen backlog until the new instance accepts it. A daemon with several sockets of its own
//! (isola-input, isola-display) is given as `NAME:-:COMMAND`: it binds them itself, replacing
//! the stale socket files a dead instance left, and gets no `--fd`.
//!
//! A configuration error is final at once: an instance that cannot be started at all, or
//! that exits with status 2 (bad command line or configuration: a missing tap, a port in
//! use, no such image) on the daemon's first start, fails the daemon without a retry.
//! Restarting would only print the same error again.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use isola_ipc::supervisor::{DaemonState, DaemonStatus};

use crate::output::{forward_output, StderrWatch};

/// The descriptor number the listening socket has in a daemon.
pub const LISTEN_FD: i32 = 3;

/// The exit status of a device process refusing its command line or configuration.
const CONFIG_ERROR_STATUS: i32 = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("--daemon '{0}' is not NAME:SOCKET:COMMAND")]
    Shape(String),
    #[error("daemon name '{0}' must be 1-32 letters, digits, '-' or '_'")]
    Name(String),
    #[error("the command of daemon '{0}' is empty or has unbalanced quotes")]
    Command(String),
}

/// `--daemon NAME:SOCKET:COMMAND`; COMMAND is split like a shell would (quotes, no expansion).
/// SOCKET `-`: the daemon binds its own sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonSpec {
    pub name: String,
    pub socket: Option<PathBuf>,
    pub argv: Vec<String>,
}

impl FromStr for DaemonSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.splitn(3, ':');
        let (Some(name), Some(socket), Some(command)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(SpecError::Shape(s.to_owned()));
        };
        let name_ok = (1..=32).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(SpecError::Name(name.to_owned()));
        }
        if socket.is_empty() {
            return Err(SpecError::Shape(s.to_owned()));
        }
        let argv = shlex::split(command)
            .filter(|argv| !argv.is_empty())
            .ok_or_else(|| SpecError::Command(name.to_owned()))?;
        Ok(DaemonSpec {
            name: name.to_owned(),
            socket: (socket != "-").then(|| PathBuf::from(socket)),
            argv,
        })
    }
}

/// When a dead daemon is started again, and when the supervisor gives up on it.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// An instance that lived at least this long is restarted at once.
    pub min_uptime: Duration,
    /// Instances that die sooner are restarted after a back-off that doubles from
    /// `backoff_min` up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Give up when the daemon died more than `limit` times within `window`.
    pub limit: u32,
    pub window: Duration,
    /// How long an instance stopped on request (restart, upgrade) has after SIGTERM before
    /// SIGKILL.
    pub stop_timeout: Duration,
}

/// A running instance stopped on request (`isolactl restart` or `upgrade`): it does not count
/// as a death, and the next instance starts as soon as it is gone.
struct StopRequest {
    /// What its ending is recorded as ("restarted on request", "upgraded to PATH").
    why: String,
    /// SIGKILL then, if it is still there (cleared once sent).
    kill_at: Option<Instant>,
}

/// An upgraded daemon's first instance, until it has lived `min_uptime`: if it dies sooner,
/// the previous program is put back.
struct Upgrade {
    previous: String,
    since: Option<Instant>,
}

enum Life {
    Running {
        child: Child,
        since: Instant,
        /// What the instance's stderr said (see [`forward_stderr`]).
        stderr: StderrWatch,
    },
    Waiting {
        until: Instant,
    },
    Failed(String),
}

pub struct Daemon {
    pub spec: DaemonSpec,
    listener: Option<OwnedFd>,
    life: Life,
    restarts: u32,
    last_exit: Option<String>,
    deaths: VecDeque<Instant>,
    backoff: Duration,
    /// The next start is a first start (at launch, or after `isolactl restart`).
    first_start: bool,
    /// Failed for a configuration error on its first start (rather than given up on).
    config_error: bool,
    /// Not yet revived by `isolactl restart`: its first start is the one at launch.
    at_launch: bool,
    /// Where its output goes (appended); the supervisor's stderr if `None`.
    log_file: Option<PathBuf>,
    /// The running instance is being stopped on request.
    stop_request: Option<StopRequest>,
    /// The program was just replaced by `isolactl upgrade`.
    upgrade: Option<Upgrade>,
}

impl Daemon {
    pub fn new(spec: DaemonSpec, listener: Option<UnixListener>) -> Daemon {
        Daemon {
            spec,
            listener: listener.map(OwnedFd::from),
            life: Life::Waiting {
                until: Instant::now(),
            },
            restarts: 0,
            last_exit: None,
            deaths: VecDeque::new(),
            backoff: Duration::ZERO,
            first_start: true,
            config_error: false,
            at_launch: true,
            log_file: None,
            stop_request: None,
            upgrade: None,
        }
    }

    /// Sends the daemon's output (stdout and stderr, line by line, each with the time) to
    /// `dir/NAME.log` instead of the supervisor's stderr.
    pub fn log_to(mut self, dir: &std::path::Path) -> Daemon {
        self.log_file = Some(dir.join(format!("{}.log", self.spec.name)));
        self
    }

    /// Why the daemon failed, if a configuration error on its first start failed it.
    pub fn config_error(&self) -> Option<&str> {
        match &self.life {
            Life::Failed(why) if self.config_error => Some(why),
            _ => None,
        }
    }

    /// [`Daemon::config_error`], if that first start was the one at launch (not one after
    /// `isolactl restart`, when the VM has been running without the daemon anyway).
    pub fn config_error_at_launch(&self) -> Option<&str> {
        self.config_error().filter(|_| self.at_launch)
    }

    pub fn pid(&self) -> Option<u32> {
        match &self.life {
            Life::Running { child, .. } => Some(child.id()),
            _ => None,
        }
    }

    /// When this daemon is due to be started, if it is waiting.
    pub fn due(&self) -> Option<Instant> {
        match self.life {
            Life::Waiting { until } => Some(until),
            _ => None,
        }
    }

    /// Starts an instance if one is due. A failure to start at all (no such program) is a
    /// configuration error on the first start, and a death on a later one.
    pub fn start_if_due(&mut self, policy: &RestartPolicy, now: Instant) {
        if self.due().is_none_or(|until| until > now) {
            return;
        }
        let first = self.last_exit.is_none() && self.restarts == 0 && self.deaths.is_empty();
        match self.spawn() {
            Ok((child, output)) => {
                if first {
                    log::info!("{}: started, pid {}", self.spec.name, child.id());
                } else {
                    self.restarts += 1;
                    log::warn!(
                        "{}: restarted, pid {} (restart {})",
                        self.spec.name,
                        child.id(),
                        self.restarts
                    );
                }
                if let Some(upgrade) = &mut self.upgrade {
                    upgrade.since.get_or_insert(now);
                }
                let stderr = forward_output(&self.spec.name, output, self.log_file.as_deref());
                self.life = Life::Running {
                    child,
                    since: now,
                    stderr,
                };
            }
            Err(e) => {
                let reason = format!("cannot start {}: {e}", self.spec.argv[0]);
                if std::mem::take(&mut self.first_start) {
                    self.fail_config(reason);
                } else {
                    log::error!("{}: {reason}", self.spec.name);
                    self.died(reason, Duration::ZERO, policy, now);
                }
            }
        }
    }

    fn spawn(&self) -> std::io::Result<(Child, OwnedFd)> {
        let listen_fd = self.listener.as_ref().map(|l| l.as_raw_fd());
        let mut command = Command::new(&self.spec.argv[0]);
        command.args(&self.spec.argv[1..]);
        if listen_fd.is_some() {
            command.arg("--fd").arg(LISTEN_FD.to_string());
        }
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (dup2, fcntl, prctl, sigprocmask) on plain integers.
        unsafe {
            command.pre_exec(move || {
                // dup2 onto itself would keep close-on-exec; clear it instead.
                let failed = match listen_fd {
                    Some(LISTEN_FD) => libc::fcntl(LISTEN_FD, libc::F_SETFD, 0) < 0,
                    Some(fd) => libc::dup2(fd, LISTEN_FD) < 0,
                    None => false,
                };
                if failed {
                    return Err(std::io::Error::last_os_error());
                }
                // A supervisor that dies takes its daemons with it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The supervisor blocks the signals it reads from a signalfd; the daemon
                // must not inherit that mask.
                let mut empty = std::mem::zeroed::<libc::sigset_t>();
                libc::sigemptyset(&mut empty);
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                Ok(())
            });
        }
        command.env(isola_device_common::logging::DEVICE_ENV, &self.spec.name);
        // stdout and stderr into one pipe: a daemon's every line goes to its log.
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(write.try_clone()?))
            .stderr(Stdio::from(write));
        let child = command.spawn()?;
        Ok((child, read))
    }

    /// Reaps the instance if it has exited, and schedules the next one (or gives up).
    /// `explain` adds to the exit reason, e.g. which syscall a seccomp filter killed it for.
    pub fn reap(
        &mut self,
        policy: &RestartPolicy,
        now: Instant,
        explain: &mut dyn FnMut(&ExitReport) -> Option<String>,
    ) -> Option<ExitReport> {
        let Life::Running {
            child,
            since,
            stderr,
        } = &mut self.life
        else {
            return None;
        };
        let status = match child.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) => return None,
            Err(e) => {
                log::error!(
                    "{}: cannot wait for pid {}: {e}",
                    self.spec.name,
                    child.id()
                );
                return None;
            }
        };
        let tail = stderr.last_words();
        let report = ExitReport {
            pid: child.id(),
            status,
            seccomp_line: tail
                .seccomp
                .filter(|_| crate::exit::is_seccomp_kill(status)),
        };
        let uptime = now.saturating_duration_since(*since);
        let mut reason = crate::exit::describe(status);
        // What explains the ending best: the seccomp note, else the daemon's last error line.
        if let Some(note) = explain(&report).or(tail.error_line) {
            reason.push_str(": ");
            reason.push_str(&note);
        }
        if let Some(request) = self.stop_request.take() {
            let reason = format!("{}: {reason}", request.why);
            log::info!("{}: {reason}; starting the next instance", self.spec.name);
            self.last_exit = Some(reason);
            self.life = Life::Waiting { until: now };
            return Some(report);
        }
        if let Some(upgrade) = self.upgrade.take() {
            let early = upgrade
                .since
                .is_none_or(|since| now.saturating_duration_since(since) < policy.min_uptime);
            if early {
                log::error!(
                    "{}: the upgraded {} ended after {} ms ({reason}); back to {}",
                    self.spec.name,
                    self.spec.argv[0],
                    uptime.as_millis(),
                    upgrade.previous
                );
                self.spec.argv[0] = upgrade.previous;
            }
        }
        if std::mem::take(&mut self.first_start) && status.code() == Some(CONFIG_ERROR_STATUS) {
            self.fail_config(reason);
        } else {
            self.died(reason, uptime, policy, now);
        }
        Some(report)
    }

    /// A configuration error on the first start: failed at once, no retry.
    fn fail_config(&mut self, reason: String) {
        let why = format!("configuration error on its first start: {reason}");
        log::error!("{}: {why}; not restarting it", self.spec.name);
        self.last_exit = Some(reason);
        self.config_error = true;
        self.life = Life::Failed(why);
    }

    fn died(&mut self, reason: String, uptime: Duration, policy: &RestartPolicy, now: Instant) {
        self.deaths.push_back(now);
        while self
            .deaths
            .front()
            .is_some_and(|&at| now.saturating_duration_since(at) > policy.window)
        {
            self.deaths.pop_front();
        }
        self.backoff = if uptime >= policy.min_uptime {
            Duration::ZERO
        } else {
            (self.backoff * 2).clamp(policy.backoff_min, policy.backoff_max)
        };
        self.last_exit = Some(reason.clone());
        if self.deaths.len() > policy.limit as usize {
            let why = format!(
                "died {} times within {} s, last: {reason}",
                self.deaths.len(),
                policy.window.as_secs()
            );
            log::error!("{}: {why}; giving up", self.spec.name);
            self.life = Life::Failed(why);
        } else {
            log::warn!(
                "{}: {reason}; restarting in {} ms",
                self.spec.name,
                self.backoff.as_millis()
            );
            self.life = Life::Waiting {
                until: now + self.backoff,
            };
        }
    }

    /// `isolactl restart NAME` (`binary` None) or `isolactl upgrade NAME [--binary PATH]`: a
    /// running instance gets SIGTERM (SIGKILL after `policy.stop_timeout`) and the next one
    /// starts as soon as it is gone, the listening socket staying open meanwhile, so the core's
    /// reconnect waits in its backlog; none of this counts as a death. A daemon waiting for its
    /// back-off starts at once; one given up on gets a fresh budget. With `binary`, this and
    /// every later instance run that program (put back if its first instance dies within
    /// `min_uptime`). Refused while an instance is already being stopped.
    pub fn restart_on_request(
        &mut self,
        now: Instant,
        policy: &RestartPolicy,
        binary: Option<&str>,
    ) -> Result<(), String> {
        if self.stop_request.is_some() {
            return Err(format!("{} is already being restarted", self.spec.name));
        }
        let why = match binary {
            Some(path) => {
                let previous = std::mem::replace(&mut self.spec.argv[0], path.to_owned());
                self.upgrade = Some(Upgrade {
                    previous,
                    since: None,
                });
                format!("upgraded to {path}")
            }
            None => "restarted on request".to_owned(),
        };
        match &self.life {
            Life::Failed(_) => {
                self.revive(now);
            }
            Life::Waiting { .. } => {
                self.backoff = Duration::ZERO;
                self.life = Life::Waiting { until: now };
            }
            Life::Running { .. } => {
                self.signal(nix::sys::signal::Signal::SIGTERM);
                self.stop_request = Some(StopRequest {
                    why,
                    kill_at: Some(now + policy.stop_timeout),
                });
            }
        }
        Ok(())
    }

    /// When the main loop must look at this daemon again: its next start, or the SIGKILL of
    /// an instance stopped on request.
    pub fn wake_at(&self) -> Option<Instant> {
        self.due()
            .or_else(|| self.stop_request.as_ref().and_then(|r| r.kill_at))
    }

    /// SIGKILL to an instance stopped on request that outlived its stop timeout.
    pub fn enforce_stop(&mut self, now: Instant) {
        let Some(request) = &mut self.stop_request else {
            return;
        };
        if request.kill_at.is_some_and(|at| at <= now) {
            request.kill_at = None;
            log::warn!(
                "{}: still running {} after SIGTERM; killing it",
                self.spec.name,
                "on request"
            );
            self.signal(nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// `isolactl restart NAME` on a daemon that was given up on: a fresh retry budget.
    pub fn revive(&mut self, now: Instant) -> bool {
        if !matches!(self.life, Life::Failed(_)) {
            return false;
        }
        self.deaths.clear();
        self.backoff = Duration::ZERO;
        self.first_start = true;
        self.config_error = false;
        self.at_launch = false;
        self.life = Life::Waiting { until: now };
        true
    }

    pub fn status(&self) -> DaemonStatus {
        DaemonStatus {
            name: self.spec.name.clone(),
            socket: self
                .spec
                .socket
                .as_ref()
                .map(|s| s.display().to_string())
                .unwrap_or_default(),
            pid: self.pid(),
            state: match &self.life {
                Life::Running { .. } => DaemonState::Running,
                Life::Waiting { .. } => DaemonState::Restarting,
                Life::Failed(why) => DaemonState::Failed(why.clone()),
            },
            restarts: self.restarts,
            last_exit: self.last_exit.clone(),
        }
    }

    /// Sends `signal` to the running instance.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
        }
    }

    /// Waits for the running instance to end (after [`Daemon::signal`]); true if it did.
    pub fn wait_stopped(&mut self, deadline: Instant) -> bool {
        let Life::Running { child, .. } = &mut self.life else {
            return true;
        };
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    log::info!(
                        "{}: stopped ({})",
                        self.spec.name,
                        crate::exit::describe(status)
                    );
                    self.life = Life::Failed("stopped".into());
                    return true;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => return false,
            }
        }
    }
}

/// A reaped instance.
pub struct ExitReport {
    pub pid: u32,
    pub status: std::process::ExitStatus,
    /// The daemon's own "killed by seccomp: syscall=N ..." line, if it printed one.
    pub seccomp_line: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let spec: DaemonSpec = "blk0:/run/x/blk0.sock:/usr/bin/isola-blk --image 'my disk.img'"
            .parse()
            .unwrap();
        assert_eq!(spec.name, "blk0");
        assert_eq!(spec.socket, Some(PathBuf::from("/run/x/blk0.sock")));
        let own: DaemonSpec = "input:-:isola-input --control-socket /c".parse().unwrap();
        assert_eq!(own.socket, None);
        assert_eq!(
            spec.argv,
            ["/usr/bin/isola-blk", "--image", "my disk.img"].map(String::from)
        );
        assert_eq!(
            "blk0:/s".parse::<DaemonSpec>(),
            Err(SpecError::Shape("blk0:/s".into()))
        );
        assert_eq!(
            "b/a:/s:x".parse::<DaemonSpec>(),
            Err(SpecError::Name("b/a".into()))
        );
        assert_eq!(
            "b::x".parse::<DaemonSpec>(),
            Err(SpecError::Shape("b::x".into()))
        );
        assert_eq!(
            "b:/s:'unbalanced".parse::<DaemonSpec>(),
            Err(SpecError::Command("b".into()))
        );
        assert_eq!(
            "b:/s:   ".parse::<DaemonSpec>(),
            Err(SpecError::Command("b".into()))
        );
    }

    fn policy() -> RestartPolicy {
        RestartPolicy {
            min_uptime: Duration::from_millis(500),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(80),
            limit: 3,
            window: Duration::from_secs(10),
            stop_timeout: Duration::from_millis(300),
        }
    }

    fn daemon(dir: &std::path::Path) -> Daemon {
        let socket = dir.join("d.sock");
        let listener = isola_device_common::cli::bind(&socket).unwrap();
        Daemon::new(
            DaemonSpec {
                name: "d".into(),
                socket: Some(socket),
                argv: vec!["/bin/true".into()],
            },
            Some(listener),
        )
    }

    #[test]
    fn healthy_instances_restart_at_once_quick_deaths_back_off_and_give_up() {
        let dir = std::env::temp_dir().join(format!("isola-sup-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut d = daemon(&dir);
        let p = policy();
        let t0 = Instant::now();
        d.died("killed".into(), Duration::from_secs(5), &p, t0);
        assert_eq!(d.due(), Some(t0), "a healthy instance restarts at once");
        d.died("exited".into(), Duration::ZERO, &p, t0);
        assert_eq!(d.due(), Some(t0 + Duration::from_millis(10)));
        d.died("exited".into(), Duration::ZERO, &p, t0);
        assert_eq!(d.due(), Some(t0 + Duration::from_millis(20)));
        assert_eq!(d.status().state, DaemonState::Restarting);
        d.died("exited with status 1".into(), Duration::ZERO, &p, t0);
        let DaemonState::Failed(why) = d.status().state else {
            panic!("not given up: {:?}", d.status());
        };
        assert!(why.contains("died 4 times within 10 s"), "{why}");
        assert!(why.contains("exited with status 1"), "{why}");
        assert!(d.revive(t0));
        assert_eq!(d.due(), Some(t0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Starts `d` and waits (bounded) for its instance to end.
    fn run_once(d: &mut Daemon, p: &RestartPolicy) {
        d.start_if_due(p, Instant::now());
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.reap(p, Instant::now(), &mut |_| None).is_none() && d.pid().is_some() {
            assert!(Instant::now() < deadline, "the instance did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn shell_daemon(script: &str) -> Daemon {
        Daemon::new(
            DaemonSpec {
                name: "sh".into(),
                socket: None,
                argv: vec!["sh".into(), "-c".into(), script.into()],
            },
            None,
        )
    }

    #[test]
    fn a_configuration_error_on_the_first_start_is_final_at_once() {
        let p = policy();
        let mut d = shell_daemon("echo 'sh: no such tap' >&2; exit 2");
        run_once(&mut d, &p);
        let why = d
            .config_error()
            .expect("failed for its configuration")
            .to_owned();
        assert_eq!(
            why,
            "configuration error on its first start: exited with status 2: sh: no such tap"
        );
        assert_eq!(d.due(), None, "not retried");
        assert_eq!(d.restarts, 0);
        assert!(d.config_error_at_launch().is_some());
        // `isolactl restart`: its next start is a first start again, though not at launch.
        assert!(d.revive(Instant::now()));
        assert_eq!(d.config_error(), None);
        run_once(&mut d, &p);
        assert!(d.config_error().is_some());
        assert_eq!(d.config_error_at_launch(), None);
    }

    #[test]
    fn status_2_after_a_first_start_that_ran_is_a_death_like_any_other() {
        let p = policy();
        let mut d = shell_daemon("exit 2");
        d.first_start = false;
        run_once(&mut d, &p);
        assert_eq!(d.config_error(), None);
        assert!(d.due().is_some(), "restarted: {:?}", d.status());
    }

    #[test]
    fn a_missing_program_is_a_configuration_error_on_the_first_start_only() {
        let p = policy();
        let mut d = Daemon::new(
            DaemonSpec {
                name: "ghost".into(),
                socket: None,
                argv: vec!["/nonexistent/isola-ghost".into()],
            },
            None,
        );
        d.start_if_due(&p, Instant::now());
        let why = d.config_error().expect("refused at once").to_owned();
        assert!(
            why.contains("cannot start /nonexistent/isola-ghost"),
            "{why}"
        );
        assert!(d.revive(Instant::now()));
        d.first_start = false;
        d.start_if_due(&p, Instant::now());
        assert_eq!(d.config_error(), None);
        assert!(d.due().is_some(), "a later failure to start backs off");
    }

    #[test]
    fn the_reason_carries_the_last_error_line_not_routine_logging() {
        let p = policy();
        let mut d = shell_daemon(
            "echo 'd[1]: ERROR main: disk on fire' >&2; echo 'd[1]: INFO main: bye' >&2; exit 1",
        );
        d.first_start = false;
        run_once(&mut d, &p);
        assert_eq!(
            d.status().last_exit.as_deref(),
            Some("exited with status 1: d[1]: ERROR main: disk on fire")
        );
        let mut quiet = shell_daemon("echo 'd[1]: INFO main: fine' >&2; kill -USR1 $$");
        quiet.first_start = false;
        run_once(&mut quiet, &p);
        assert_eq!(
            quiet.status().last_exit.as_deref(),
            Some("killed by SIGUSR1")
        );
    }

    #[test]
    fn an_upgrade_whose_program_dies_at_once_is_rolled_back() {
        let p = policy();
        let mut d = shell_daemon("trap 'exit 0' TERM; while :; do sleep 0.05; done");
        d.start_if_due(&p, Instant::now());
        let first = d.pid().expect("started");
        d.restart_on_request(Instant::now(), &p, Some("/bin/false"))
            .unwrap();
        assert!(d.restart_on_request(Instant::now(), &p, None).is_err());
        let deadline = Instant::now() + Duration::from_secs(10);
        // The old instance goes (not a death), /bin/false runs and fails, sh comes back.
        while !(d.restarts == 2 && d.pid().is_some()) {
            assert!(Instant::now() < deadline, "{:?}", d.status());
            let now = Instant::now();
            d.reap(&p, now, &mut |_| None);
            d.enforce_stop(now);
            d.start_if_due(&p, now);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_ne!(d.pid(), Some(first));
        assert_eq!(d.spec.argv[0], "sh");
        assert_eq!(d.deaths.len(), 1, "only /bin/false's ending counts");
        assert_eq!(
            d.status().last_exit.as_deref(),
            Some("exited with status 1")
        );
    }

    #[test]
    fn deaths_outside_the_window_are_forgotten() {
        let dir = std::env::temp_dir().join(format!("isola-sup-unit2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut d = daemon(&dir);
        let p = policy();
        let t0 = Instant::now();
        for i in 0..10 {
            d.died(
                "killed".into(),
                Duration::from_secs(5),
                &p,
                t0 + Duration::from_secs(11 * i),
            );
        }
        assert_eq!(d.status().state, DaemonState::Restarting);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
