//! Helpers for the launch script and `isola-supervisor`: start them, ask them, and look for
//! processes they left behind.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use isola_ipc::supervisor::{DaemonStatus, SupervisorRequest, SupervisorResponse};

use crate::{binary, profile_dir, wait_for_path};

/// Polls `f` every 5 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `isolactl ARGS`: whether it succeeded, and its stdout and stderr together.
pub fn isolactl(args: &[&str]) -> (bool, String) {
    let out = Command::new(binary("isolactl"))
        .args(args)
        .output()
        .expect("isolactl runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// One request to a supervisor's control socket.
pub fn supervisor_call(socket: &Path, request: &SupervisorRequest) -> SupervisorResponse {
    let mut stream =
        std::os::unix::net::UnixStream::connect(socket).expect("supervisor socket accepts");
    isola_ipc::write_message(&mut stream, request).expect("request is sent");
    isola_ipc::read_message(&mut stream).expect("supervisor answers")
}

/// Every daemon's status.
pub fn supervisor_status(socket: &Path) -> Vec<DaemonStatus> {
    match supervisor_call(socket, &SupervisorRequest::Status) {
        SupervisorResponse::Status(daemons) => daemons,
        other => panic!("status answered with {other:?}"),
    }
}

/// Pids of processes whose command line contains `needle` (e.g. a run directory's path).
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc")
        .expect("/proc is readable")
        .flatten()
    {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        // Zombies have an empty command line; they are gone for our purposes.
        if text.contains(needle) {
            found.push((pid, text));
        }
    }
    found
}

/// Lines of a child's stdout or stderr, collected by a thread.
pub struct Lines {
    rx: Receiver<String>,
    pub seen: Vec<String>,
}

impl Lines {
    pub fn new(stream: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `needle`; `None` on timeout or end of stream.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.rx.recv_timeout(left).ok()?;
            self.seen.push(line.clone());
            if line.contains(needle) {
                return Some(line);
            }
        }
    }

    /// The lines that arrive from now until one for which `last` holds (that one included);
    /// after `timeout`, or at the end of the stream, `Err` with the lines that did arrive.
    pub fn until(
        &mut self,
        last: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<Vec<String>, Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.rx.recv_timeout(left) else {
                return Err(got);
            };
            self.seen.push(line.clone());
            let done = last(&line);
            got.push(line);
            if done {
                return Ok(got);
            }
        }
    }

    /// Everything that arrives within `linger`.
    pub fn drain(&mut self, linger: Duration) -> &[String] {
        while let Ok(line) = self.rx.recv_timeout(linger) {
            self.seen.push(line);
        }
        &self.seen
    }
}

/// `scripts/isola-run` on this profile's binaries, in its own process group (so a test can
/// deliver a terminal's Ctrl-C to it).
pub struct Launch {
    pub child: Child,
    pub run_dir: PathBuf,
    pub stdout: Lines,
    pub stderr: Lines,
}

impl Launch {
    pub fn start(run_dir: &Path, args: &[&str]) -> Launch {
        Launch::start_with_env(run_dir, args, &[])
    }

    /// [`Launch::start`] with these environment variables added.
    pub fn start_with_env(run_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Launch {
        binary("isola-supervisor");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/isola-run");
        let mut child = Command::new(script)
            .envs(env.iter().copied())
            .arg("--bin-dir")
            .arg(profile_dir())
            .arg("--run-dir")
            .arg(run_dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("scripts/isola-run starts");
        let stdout = Lines::new(child.stdout.take().expect("piped"));
        let stderr = Lines::new(child.stderr.take().expect("piped"));
        Launch {
            child,
            run_dir: run_dir.to_owned(),
            stdout,
            stderr,
        }
    }

    /// [`Launch::start`], once the core is up and the guest has printed a line containing
    /// `guest_line`.
    pub fn running(run_dir: &Path, args: &[&str], guest_line: &str) -> Launch {
        let mut launch = Launch::start(run_dir, args);
        wait_for_path(&launch.control_socket(), Duration::from_secs(60));
        assert!(
            launch
                .stdout
                .wait_for(guest_line, Duration::from_secs(30))
                .is_some(),
            "the guest never printed {guest_line:?}\n{}",
            launch.report()
        );
        launch
    }

    pub fn control_socket(&self) -> PathBuf {
        self.run_dir.join("control.sock")
    }

    pub fn supervisor_socket(&self) -> PathBuf {
        self.run_dir.join("supervisor.sock")
    }

    /// Waits for the script to end; panics with its output after `timeout`.
    pub fn finish(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait works") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(self.child.id() as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                panic!(
                    "isola-run did not end within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout.drain(Duration::from_millis(100)).join("\n"),
                    self.stderr.drain(Duration::from_millis(100)).join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (up to `timeout`) for isola-run to end: it must succeed, and the guest must have
    /// printed `guest_line` (a whole line, e.g. `virtio-blk: ok`).
    pub fn finishes_with(&mut self, timeout: Duration, guest_line: &str) {
        let status = self.finish(timeout);
        let report = self.report();
        assert!(
            status.success(),
            "isola-run ended with {status:?}\n{report}"
        );
        assert!(
            self.stdout.seen.iter().any(|l| l == guest_line),
            "the guest never printed {guest_line:?}\n{report}"
        );
    }

    /// The output so far and the logs (while the run directory is there), for failure
    /// messages.
    pub fn report(&mut self) -> String {
        let mut logs = String::new();
        if let Ok(entries) = std::fs::read_dir(self.run_dir.join("logs")) {
            for entry in entries.flatten() {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                logs += &format!("{}:\n{text}", entry.path().display());
            }
        }
        format!(
            "stdout:\n{}\nstderr:\n{}\n{logs}",
            self.stdout.drain(Duration::from_millis(200)).join("\n"),
            self.stderr.drain(Duration::from_millis(200)).join("\n")
        )
    }
}

impl Drop for Launch {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = self.child.wait();
        }
    }
}

/// `isola-supervisor` started directly; stopped when dropped.
pub struct Supervisor {
    pub child: Child,
    pub control: PathBuf,
    pub stderr: Lines,
}

impl Supervisor {
    /// Starts it with `--control control`, one `--daemon` per entry and `extra` options, and
    /// waits for its control socket.
    pub fn start(control: &Path, daemons: &[String], extra: &[&str]) -> Supervisor {
        let mut command = Command::new(binary("isola-supervisor"));
        command.arg("--control").arg(control);
        for daemon in daemons {
            command.arg("--daemon").arg(daemon);
        }
        let mut child = command
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("isola-supervisor starts");
        let stderr = Lines::new(child.stderr.take().expect("piped"));
        wait_for_path(control, Duration::from_secs(20));
        Supervisor {
            child,
            control: control.to_owned(),
            stderr,
        }
    }

    pub fn status(&self) -> Vec<DaemonStatus> {
        supervisor_status(&self.control)
    }

    /// The named daemon's status.
    pub fn daemon(&self, name: &str) -> DaemonStatus {
        self.status()
            .into_iter()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("no daemon {name}"))
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = self.child.wait();
        }
    }
}
