//! `isolactl upgrade` of a device daemon under a running guest: one upgrade, awaited until
//! the new instance runs and the core is connected to it again ([`upgrade_once`]), and a run
//! of them ([`Soak`]) with what every device's test checks after it: each old instance gone,
//! no file descriptor leaked, each upgrade recorded in the events, the API and the metrics,
//! and the core never backing off (each upgrade is a planned handover).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use isola_ipc::supervisor::DaemonState;
use isola_ipc::{ControlRequest, ControlResponse, DeviceLink, DeviceStatus};

use crate::api::curl;
use crate::supervisor::{isolactl, processes_mentioning, supervisor_status, wait_until, Lines};

/// The core's view of the device on `socket`.
pub fn device_on(control: &Path, socket: &Path) -> DeviceStatus {
    wait_until("the core's status", Duration::from_secs(30), || {
        try_device_on(control, socket)
    })
}

/// [`device_on`], or `None` if the core did not answer this time (on a loaded machine its
/// control thread may drop a client that took too long).
fn try_device_on(control: &Path, socket: &Path) -> Option<DeviceStatus> {
    match crate::try_control(control, &ControlRequest::Status).ok()? {
        ControlResponse::Status(status) => Some(
            status
                .devices
                .into_iter()
                .find(|d| Path::new(&d.socket) == socket)
                .unwrap_or_else(|| panic!("no device on {}", socket.display())),
        ),
        other => panic!("status answered {other:?}"),
    }
}

/// The core's link to the device on `socket` and its reconnect count.
pub fn link(control: &Path, socket: &Path) -> (DeviceLink, u32) {
    let d = device_on(control, socket);
    (d.link, d.reconnects)
}

/// One upgrade as [`upgrade_once`] saw it.
#[derive(Debug, Clone, Copy)]
pub struct Upgraded {
    /// From the request to the core reconnected, as seen from the test.
    pub took: Duration,
    /// The new instance.
    pub pid: u32,
    /// How long the core had no backend (`last_outage_us` of its status: from the hang-up to
    /// the new instance's queues restored): no request of the guest's is served meanwhile.
    pub outage: Duration,
}

/// One `isolactl --run-dir RUN_DIR upgrade NAME [--binary BINARY]` of the daemon serving
/// `socket`; returns once a new instance runs and the core is connected to it again.
pub fn upgrade_once(run_dir: &Path, name: &str, socket: &Path, binary: Option<&Path>) -> Upgraded {
    let control = run_dir.join("control.sock");
    let supervisor = run_dir.join("supervisor.sock");
    let old = supervisor_status(&supervisor)
        .into_iter()
        .find(|d| d.name == name)
        .and_then(|d| d.pid)
        .expect("the daemon runs");
    let (_, reconnects) = link(&control, socket);
    let mut args = vec!["--run-dir", run_dir.to_str().unwrap(), "upgrade", name];
    if let Some(binary) = binary {
        args.extend(["--binary", binary.to_str().unwrap()]);
    }
    let t0 = Instant::now();
    let (ok, text) = isolactl(&args);
    assert!(ok, "{text}");
    let pid = wait_until("the new instance", Duration::from_secs(30), || {
        supervisor_status(&supervisor)
            .into_iter()
            .find(|d| d.name == name && d.state == DaemonState::Running)
            .and_then(|d| d.pid)
            .filter(|&pid| pid != old)
    });
    let outage = wait_until("the core reconnected", Duration::from_secs(30), || {
        let d = try_device_on(&control, socket)?;
        (d.link == DeviceLink::Connected && d.reconnects > reconnects).then_some(d.last_outage_us)
    });
    Upgraded {
        took: t0.elapsed(),
        pid,
        outage: Duration::from_micros(outage.expect("a reconnected device has an outage")),
    }
}

/// The `max-wait-us=` of a virtio-blk guest's loop progress line.
pub fn max_wait_us(line: &str) -> Option<u64> {
    line.split(' ')
        .find_map(|w| w.strip_prefix("max-wait-us="))
        .and_then(|v| v.parse().ok())
}

/// The pid of the process named `program` (its executable's file name) whose command line
/// mentions `needle` (a run directory).
pub fn pid_of(program: &str, needle: &str) -> u32 {
    crate::supervisor::processes_mentioning(needle)
        .into_iter()
        .map(|(pid, _)| pid)
        .find(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe.file_name().is_some_and(|n| n == program))
        })
        .unwrap_or_else(|| panic!("no {program} process for {needle}"))
}

/// What each of a process's open file descriptors refers to, sorted.
pub fn open_fds(pid: u32) -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .flatten()
        .map(|entry| {
            let target = std::fs::read_link(entry.path()).unwrap_or_default();
            format!(
                "{} -> {}",
                entry.file_name().to_string_lossy(),
                target.display()
            )
        })
        .collect();
    fds.sort();
    fds
}

/// [`open_fds`] at its quietest over half a second: another client's request (isola-api polls
/// the core and the supervisor) holds a connection for a moment.
pub fn quiet_fds(pid: u32) -> Vec<String> {
    (0..20)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(25));
            open_fds(pid)
        })
        .min_by_key(|fds| fds.len())
        .expect("samples")
}

/// How many upgrades a soak runs: `ISOLA_UPGRADES=N`, else `default`.
pub fn upgrades(default: usize) -> usize {
    match std::env::var("ISOLA_UPGRADES") {
        Ok(n) if !n.is_empty() => n.parse().expect("ISOLA_UPGRADES is a number"),
        _ => default,
    }
}

/// The `q`-quantile of sorted durations.
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Median and max of `values` in milliseconds, for the figures a test prints.
pub fn median_max_ms(values: &[Duration]) -> (f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort();
    (
        percentile(&sorted, 0.5).as_secs_f64() * 1e3,
        sorted[sorted.len() - 1].as_secs_f64() * 1e3,
    )
}

/// The processes of the run in `run` whose program's file name starts with `program` (the
/// original or a copy named `PROGRAM-next`).
pub fn daemon_processes(run: &str, program: &str) -> Vec<(u32, String)> {
    processes_mentioning(run)
        .into_iter()
        .filter(|(pid, _)| {
            std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
                exe.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(program))
            })
        })
        .collect()
}

/// Waits until `pid` holds no more file descriptors than `before` again (a control
/// connection being closed may lag its answer); panics with both lists if it does not
/// within 5 s.
pub fn assert_fds_settle(what: &str, pid: u32, before: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = open_fds(pid);
        if now.len() <= before.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} (pid {pid}) held {} fds before the upgrades and {} after\nbefore: \
             {before:#?}\nafter: {now:#?}",
            before.len(),
            now.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The core's flap back-off line (`core-vmm/src/pci/backend.rs`): a planned handover never
/// prints it.
const BACKOFF_LINE: &str = "went away again right after coming back";

/// Upgrades of one daemon of a VM started by `scripts/isola-run`, back to back (each a
/// planned handover, so the core reconnects at once however soon the next one follows):
/// to a copy of the program, back to the original, and every tenth without `--binary`.
pub struct Soak {
    run_dir: PathBuf,
    name: String,
    program: String,
    pub socket: PathBuf,
    original: PathBuf,
    other: PathBuf,
    core: u32,
    supervisor: u32,
    core_fds: Vec<String>,
    supervisor_fds: Vec<String>,
    processes: usize,
    events_curl: Child,
    events: Lines,
    /// Every upgrade so far, in order, with the program it ran.
    pub done: Vec<(Upgraded, PathBuf)>,
    /// The running instance's pid.
    current: u32,
}

impl Soak {
    /// Before the first upgrade of daemon `name` (program `program`, serving the core's
    /// device on `RUN_DIR/SOCKET`) of the VM in `run_dir`: copies the program into `scratch`,
    /// notes the core's and the supervisor's file descriptors and subscribes to the API's
    /// events.
    pub fn new(run_dir: &Path, scratch: &Path, name: &str, program: &str, socket: &str) -> Soak {
        let run = run_dir.to_str().expect("UTF-8 run directory");
        let original = crate::binary(program);
        // The same program under another path: the upgrade really runs another file.
        let other = scratch.join(format!("{program}-next"));
        std::fs::copy(&original, &other).unwrap_or_else(|e| panic!("copy {program}: {e}"));
        let (core, supervisor) = (pid_of("isola-core", run), pid_of("isola-supervisor", run));
        // The API's event stream (isola-api, started by isola-run) through curl.
        let mut events_curl = Command::new("curl")
            .args(["-sS", "-N", "--max-time", "900", "--unix-socket"])
            .arg(run_dir.join("api.sock"))
            .arg("http://localhost/events")
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl runs (Debian package curl)");
        let events = Lines::new(events_curl.stdout.take().expect("piped"));
        // The stream is subscribed once the answer's head is out; give curl that moment.
        std::thread::sleep(Duration::from_millis(500));
        Soak {
            run_dir: run_dir.to_owned(),
            name: name.to_owned(),
            program: program.to_owned(),
            socket: run_dir.join(socket),
            original,
            other,
            core_fds: quiet_fds(core),
            supervisor_fds: quiet_fds(supervisor),
            core,
            supervisor,
            processes: daemon_processes(run, program).len(),
            events_curl,
            events,
            done: Vec::new(),
            current: supervisor_status(&run_dir.join("supervisor.sock"))
                .into_iter()
                .find(|d| d.name == name)
                .and_then(|d| d.pid)
                .unwrap_or_else(|| panic!("{name} runs")),
        }
    }

    /// The next upgrade; checks that the new instance runs the program asked for and that
    /// the API's events record it: `device_died` ("upgraded to PATH", the old pid),
    /// `device_restarted` (the new pid), `device_reconnected`, in that order. The API polls
    /// (every 100 ms), so this waits for them before the next upgrade.
    pub fn upgrade(&mut self) -> Upgraded {
        let old = self.current;
        let up = self.upgrade_now();
        let program = self.done.last().expect("just done").1.clone();
        self.check_events(old, &up, &program);
        up
    }

    /// `n` upgrades each right after the last (no wait for the API): the core must reconnect
    /// at once every time; the events may merge what one poll of the API saw.
    pub fn burst(&mut self, n: usize) -> Vec<Upgraded> {
        let upgrades: Vec<Upgraded> = (0..n).map(|_| self.upgrade_now()).collect();
        // The API's counters are exact however its polls fell: let it catch up.
        self.events.drain(Duration::from_millis(300));
        upgrades
    }

    fn upgrade_now(&mut self) -> Upgraded {
        let i = self.done.len();
        // To the copy, back to the original, and every tenth without --binary (the file at
        // the path it runs from, the copy: i % 10 == 9 follows i % 10 == 8).
        let target = match i % 10 {
            9 => None,
            n if n % 2 == 0 => Some(self.other.as_path()),
            _ => Some(self.original.as_path()),
        };
        let up = upgrade_once(&self.run_dir, &self.name, &self.socket, target);
        let exe = std::fs::read_link(format!("/proc/{}/exe", up.pid)).unwrap_or_default();
        let expected = target.unwrap_or(self.other.as_path()).to_owned();
        assert_eq!(
            exe,
            expected,
            "upgrade {i}: pid {} runs {}",
            up.pid,
            exe.display()
        );
        self.done.push((up, expected));
        self.current = up.pid;
        up
    }

    /// The core's outage of every upgrade so far.
    pub fn outages(&self) -> Vec<Duration> {
        self.done.iter().map(|(u, _)| u.outage).collect()
    }

    /// After the last upgrade, while the VM runs: every old instance is gone, the core and the
    /// supervisor hold as many file descriptors as before, the core never backed off, and
    /// `isolactl status`, `/devices/NAME` and `/metrics` count every upgrade.
    pub fn check_recorded(&mut self) {
        let count = self.done.len();
        let run = self.run_dir.to_str().expect("UTF-8").to_owned();
        let processes = daemon_processes(&run, &self.program);
        // Zombies have an empty command line and are not counted.
        assert_eq!(processes.len(), self.processes, "{processes:#?}");
        assert_fds_settle("isola-core", self.core, &self.core_fds);
        assert_fds_settle("isola-supervisor", self.supervisor, &self.supervisor_fds);
        let core_log = std::fs::read_to_string(self.run_dir.join("logs/core.log"))
            .expect("isola-run keeps the core's log");
        let backoffs: Vec<&str> = core_log
            .lines()
            .filter(|l| l.contains(BACKOFF_LINE))
            .collect();
        assert!(
            backoffs.is_empty(),
            "the core backed off between upgrades: {backoffs:#?}"
        );
        let (ok, text) = isolactl(&["--run-dir", &run, "status"]);
        assert!(ok, "{text}");
        assert!(text.contains(&format!("restarts {count},")), "{text}");
        assert!(text.contains("upgraded to"), "{text}");
        let api = self.run_dir.join("api.sock");
        let device = curl(&api, &[], &format!("/devices/{}", self.name)).json();
        assert_eq!(device["daemon"]["restarts"], count, "{device}");
        assert_eq!(device["reconnects"], count, "{device}");
        let metrics = curl(&api, &[], "/metrics").body;
        for line in [
            format!(
                "isola_device_restarts_total{{device=\"{}\"}} {count}",
                self.name
            ),
            format!(
                "isola_device_reconnects_total{{device=\"{}\"}} {count}",
                self.name
            ),
        ] {
            assert!(
                metrics.lines().any(|l| l == line),
                "no {line:?} in\n{metrics}"
            );
        }
    }

    /// The events of the upgrade from pid `old` to `up`.
    fn check_events(&mut self, old: u32, up: &Upgraded, program: &Path) {
        let i = self.done.len() - 1;
        let name = self.name.clone();
        let mut got: Vec<serde_json::Value> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got
            .last()
            .is_none_or(|e| e["event"] != "device_reconnected")
        {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .events
                .wait_for(&format!("\"device\":\"{name}\""), left)
                .unwrap_or_else(|| panic!("upgrade {i}: no device_reconnected: {got:#?}"));
            got.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")));
        }
        // On a loaded machine the new instance may miss one of the core's exchange deadlines
        // (1 s): the core reports it refused or unresponsive and tries again. Those events
        // may come between; the upgrade's own three must all be there, in order.
        let transient = |e: &serde_json::Value| {
            e["event"] == "device_refused" || e["event"] == "device_unresponsive"
        };
        let retried = got.iter().filter(|e| transient(e)).count();
        if retried > 0 {
            eprintln!("upgrade {i}: the core retried the new instance {retried} time(s)");
        }
        got.retain(|e| !transient(e));
        let names: Vec<&str> = got
            .iter()
            .map(|e| e["event"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            ["device_died", "device_restarted", "device_reconnected"],
            "upgrade {i}: {got:#?}"
        );
        let reason = got[0]["reason"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with(&format!("upgraded to {}", program.display())),
            "upgrade {i}: {reason}"
        );
        assert_eq!(got[0]["pid"], old, "upgrade {i}: {got:#?}");
        assert_eq!(got[1]["pid"], up.pid, "upgrade {i}: {got:#?}");
        assert!(
            got[2]["latency_seconds"].as_f64().is_some(),
            "upgrade {i}: {got:#?}"
        );
    }

    /// The figures a test prints: the core's outage and the request-to-reconnected time.
    pub fn summary(&self) -> String {
        let took: Vec<Duration> = self.done.iter().map(|(u, _)| u.took).collect();
        let (om, ox) = median_max_ms(&self.outages());
        let (tm, tx) = median_max_ms(&took);
        format!(
            "{} upgrades of {}: the core without a backend median {om:.2} ms, max {ox:.2} ms; \
             request to reconnected median {tm:.2} ms, max {tx:.2} ms; fds core {} supervisor {}",
            self.done.len(),
            self.program,
            self.core_fds.len(),
            self.supervisor_fds.len()
        )
    }
}

impl Drop for Soak {
    fn drop(&mut self) {
        let _ = self.events_curl.kill();
        let _ = self.events_curl.wait();
    }
}
