//! `isolactl` as a script uses it (issue 15, item 4): `--run-dir` for every command, the
//! console included, with or without device daemons; no panic when stdout or stderr is a
//! closed pipe, for any command; a default deadline on every command, the console's connect
//! included; help on every argument, with the key names for `key`.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use isola_tests::api::launch_blk;
use isola_tests::supervisor::Lines;
use isola_tests::{binary, msi_core, scratch_dir, Core};

/// (exit code, stdout, stderr, time taken) of `isolactl ARGS` with stdin empty.
fn isolactl(args: &[&str]) -> (Option<i32>, String, String, Duration) {
    let t0 = Instant::now();
    let out = Command::new(binary("isolactl"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("isolactl runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t0.elapsed(),
    )
}

/// Runs isolactl with `prefix` and each of `cases` all at once (each waits its own deadline);
/// the results in the order of `cases`.
fn isolactl_all(
    prefix: &[&str],
    cases: &[&[&str]],
) -> Vec<(Option<i32>, String, String, Duration)> {
    let runs: Vec<_> = cases
        .iter()
        .map(|args| {
            let all: Vec<String> = prefix
                .iter()
                .chain(args.iter())
                .map(|a| a.to_string())
                .collect();
            std::thread::spawn(move || {
                let all: Vec<&str> = all.iter().map(String::as_str).collect();
                isolactl(&all)
            })
        })
        .collect();
    runs.into_iter().map(|run| run.join().unwrap()).collect()
}

/// A core with the `msi` guest (waits for interrupts for ever), its control socket in `dir`,
/// and no device: a VM without device daemons, as `isola-run --kernel K` with no device
/// starts it.
fn core_without_daemons(dir: &Path) -> Core {
    msi_core(dir, 1).0
}

#[test]
fn run_dir_works_for_a_vm_without_device_daemons() {
    let dir = scratch_dir("isolactl-no-daemons");
    let _core = core_without_daemons(&dir);
    let d = dir.to_str().unwrap();
    // status: the core's view, and nothing about a supervisor this VM never had.
    let (code, out, err, _) = isolactl(&["--run-dir", d, "status"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("vcpu0: running"), "{out}");
    assert!(
        err.is_empty(),
        "a VM without daemons is not an error: {err}"
    );
    for cmd in ["pause", "resume"] {
        let (code, out, err, _) = isolactl(&["--run-dir", d, cmd]);
        assert_eq!(code, Some(0), "{cmd}: {out}{err}");
    }
    // Commands for daemons this VM does not have: one line that says so.
    for (args, words) in [
        (&["restart", "blk0"][..], "no device daemons"),
        (&["key", "a"][..], "no input device"),
        (&["input-status"][..], "no input device"),
        (&["screenshot", "/dev/null"][..], "no display"),
        (&["console"][..], "no console"),
    ] {
        let mut all = vec!["--run-dir", d];
        all.extend_from_slice(args);
        let (code, out, err, took) = isolactl(&all);
        assert_eq!(code, Some(1), "{args:?}: {out}{err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
        assert!(err.contains(words), "{args:?}: no '{words}' in {err}");
        assert!(took < Duration::from_secs(4), "{args:?} took {took:?}");
    }
}

/// A stand-in console port: accepts one client, says hello, reads what it sends, hangs up.
fn port(path: &Path, hello: &'static str) -> std::thread::JoinHandle<Vec<u8>> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(hello.as_bytes()).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    })
}

/// `isolactl ARGS` attached to a stand-in port at `socket`: reads its hello, types, detaches
/// with the end of stdin. What the port received.
fn attach(args: &[&str], socket: &Path, hello: &'static str) -> Vec<u8> {
    let server = port(socket, hello);
    let mut child = Command::new(binary("isolactl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = vec![0u8; hello.len()];
    child.stdout.take().unwrap().read_exact(&mut seen).unwrap();
    assert_eq!(seen, hello.as_bytes(), "{args:?}");
    child.stdin.take().unwrap().write_all(b"typed").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {stderr}");
    let name = socket.file_name().unwrap().to_str().unwrap();
    assert!(stderr.contains(name), "{args:?}: {stderr}");
    server.join().unwrap()
}

#[test]
fn console_takes_the_run_dir_and_a_port() {
    let dir = scratch_dir("isolactl-console");
    let d = dir.to_str().unwrap();
    for (args, socket, hello) in [
        (
            &["--run-dir", d, "console"][..],
            "console.sock",
            "port zero\n",
        ),
        (
            &["--run-dir", d, "console", "--port", "2"][..],
            "console-2.sock",
            "port two\n",
        ),
        (&["console", "--run-dir", d][..], "console.sock", "after\n"),
    ] {
        let got = attach(args, &dir.join(socket), hello);
        assert_eq!(got, b"typed", "{args:?}");
        std::fs::remove_file(dir.join(socket)).unwrap();
    }
    // An explicit path still works, and a path and --port together are refused.
    let path = dir.join("elsewhere.sock");
    assert_eq!(
        attach(&["console", path.to_str().unwrap()], &path, "there\n"),
        b"typed"
    );
    let (code, _, err, _) = isolactl(&["--run-dir", d, "console", "x.sock", "--port", "1"]);
    assert_eq!(code, Some(2), "{err}");
}

/// A listening socket whose backlog is full: a connect to it can neither succeed nor fail.
fn full_backlog(path: &Path) -> (std::os::fd::OwnedFd, Vec<std::os::unix::net::UnixStream>) {
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType};
    use nix::sys::socket::{connect, UnixAddr};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    let addr = UnixAddr::new(path).unwrap();
    bind(fd.as_raw_fd(), &addr).unwrap();
    listen(&fd, Backlog::new(0).unwrap()).unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        let c = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap();
        if connect(c.as_raw_fd(), &addr).is_ok() {
            held.push(std::os::unix::net::UnixStream::from(c));
        }
    }
    (fd, held)
}

/// Every command that talks to a socket gives up by itself (5 s by default) on a peer that
/// never accepts or never answers, and says which.
#[test]
fn every_command_has_a_default_deadline() {
    let dir = scratch_dir("isolactl-deadline");
    // Sockets that accept (into the backlog) and never answer.
    let mut silent = Vec::new();
    for name in [
        "control.sock",
        "supervisor.sock",
        "input-control.sock",
        "display-control.sock",
    ] {
        silent.push(UnixListener::bind(dir.join(name)).unwrap());
    }
    // The console's socket cannot even be connected to.
    let _console = full_backlog(&dir.join("console.sock"));
    let d = dir.to_str().unwrap();
    let shot = dir.join("shot.png");
    let cases: [&[&str]; 13] = [
        &["status"][..],
        &["pause"],
        &["resume"],
        &["shutdown", "--hard"],
        // A graceful shutdown's answer comes when the VM ends: its deadline is the guest's
        // grace period (--timeout) plus 10 s.
        &["shutdown", "--timeout", "2"],
        &["inject-msi", "--data", "1"],
        &["restart", "blk0"],
        &["key", "a"],
        &["type", "a"],
        &["pointer", "1", "1"],
        &["input-status"],
        &["screenshot", shot.to_str().unwrap()],
        &["console"],
    ];
    for (args, (code, out, err, took)) in cases.iter().zip(isolactl_all(&["--run-dir", d], &cases))
    {
        eprintln!("{args:?}: {took:?}: {}", err.trim());
        assert_eq!(code, Some(1), "{args:?}: {out}{err}");
        assert!(
            err.contains("did not answer") || err.contains("did not accept"),
            "{args:?}: {err}"
        );
        assert!(
            took >= Duration::from_secs(4) && took < Duration::from_secs(30),
            "{args:?}: took {took:?}"
        );
    }
}

/// `isolactl ... | head -0`, for every command, with stdout and stderr both closed pipes:
/// the exit status says how the command went, never a panic (101) or an abort (134).
#[test]
fn no_command_panics_on_a_closed_pipe() {
    let dir = scratch_dir("isolactl-epipe-all");
    let _core = core_without_daemons(&dir);
    let d = dir.to_str().unwrap();
    let cases: &[&[&str]] = &[
        &["--run-dir", d, "status"],
        &["--run-dir", d, "pause"],
        &["--run-dir", d, "resume"],
        &["--run-dir", d, "restart", "blk0"],
        &["--run-dir", d, "key", "a"],
        &["--run-dir", d, "input-status"],
        &["--run-dir", d, "logs", "core"],
        &["--run-dir", d, "console"],
        &["--socket", "/nonexistent/control.sock", "status"],
        &["--run-dir", d, "nosuchcommand"],
        &["--help"],
        &["help", "key"],
        &["key", "--help"],
        &["--version"],
    ];
    for args in cases {
        let (out_r, out_w) = nix::unistd::pipe().unwrap();
        let (err_r, err_w) = nix::unistd::pipe().unwrap();
        drop(out_r);
        drop(err_r);
        let status = Command::new(binary("isolactl"))
            .args(*args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(err_w))
            .status()
            .expect("isolactl runs");
        let code = status.code();
        assert!(
            matches!(code, Some(0..=2)),
            "{args:?}: ended with {status:?} (101 is a panic)"
        );
    }
}

/// Every argument and option of every command has a help line, and `key --help` lists the
/// key names.
#[test]
fn every_argument_has_help_and_key_lists_the_key_names() {
    let (code, top, err, _) = isolactl(&["--help"]);
    assert_eq!(code, Some(0), "{err}");
    let commands: Vec<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect();
    assert!(commands.len() >= 10, "{top}");
    check_help("isolactl", &top);
    for command in &commands {
        let (code, text, err, _) = isolactl(&[command, "--help"]);
        assert_eq!(code, Some(0), "{command}: {err}");
        check_help(command, &text);
    }
    let (_, key, _, _) = isolactl(&["key", "--help"]);
    for name in [
        "enter", "esc", "f12", "leftctrl", "pageup", "kpenter", "delete",
    ] {
        assert!(
            key.split(|c: char| !c.is_ascii_alphanumeric())
                .any(|w| w == name),
            "key --help does not list '{name}':\n{key}"
        );
    }
}

/// In clap's help, an argument without help text is a line with its name alone.
fn check_help(command: &str, text: &str) {
    let mut section = "";
    for line in text.lines() {
        if !line.starts_with(' ') {
            section = line;
            continue;
        }
        if !matches!(section, "Arguments:" | "Options:") {
            continue;
        }
        let line = line.trim_end();
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        // An argument's line is indented by 2; its help follows on the same line after two
        // spaces, or on the next lines, further indented.
        if indent == 2 && !trimmed.contains("  ") {
            let next = text.lines().skip_while(|l| *l != line).nth(1).unwrap_or("");
            let next_indent = next.len() - next.trim_start().len();
            assert!(
                next_indent > 2 && !next.trim().is_empty(),
                "{command}: '{}' has no help:\n{text}",
                trimmed
            );
        }
    }
}

/// `isolactl --json ARGS`: its stdout parsed as one JSON document, and the exit code.
fn json(args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err, _) = isolactl(&all);
    let value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("{args:?}: stdout is not one JSON document ({e}): {out}{err}"));
    (code, value, err)
}

/// The sorted keys of a JSON object.
fn keys(v: &serde_json::Value) -> Vec<String> {
    let mut keys: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    keys.sort();
    keys
}

/// The API's `Vm` keys (docs/api.yaml), which isolactl's own JSON (no API socket) repeats.
const VM_KEYS: [&str; 6] = ["exit", "pid", "state", "uptime_ms", "vcpus", "waiting_for"];

/// `--json` on every command of a VM with no API socket and no device daemons: the core's
/// answers in the API's shapes, logs and notify as JSON lines, errors as `{"error": ...}`.
#[test]
fn json_for_every_command_without_the_api() {
    let dir = scratch_dir("isolactl-json-direct");
    let _core = core_without_daemons(&dir);
    let d = dir.to_str().unwrap();
    let (code, status, err) = json(&["--run-dir", d, "status"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(keys(&status["vm"]), VM_KEYS);
    assert_eq!(status["vm"]["state"], "running", "{status}");
    assert_eq!(status["vm"]["vcpus"][0]["state"], "running", "{status}");
    assert!(status["vm"]["uptime_ms"].as_u64().is_some(), "{status}");
    assert_eq!(status["devices"], serde_json::json!([]), "{status}");

    let (code, paused, err) = json(&["--run-dir", d, "pause"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(paused["state"], "paused", "{paused}");
    assert_eq!(paused["vcpus"][0]["state"], "paused", "{paused}");
    let (code, resumed, err) = json(&["--run-dir", d, "resume"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(resumed["state"], "running", "{resumed}");
    let (code, msi, err) = json(&["--run-dir", d, "inject-msi", "--data", "0x40"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(keys(&msi), VM_KEYS);

    // Commands this VM has no socket for: the error, as JSON.
    for args in [
        &["--run-dir", d, "key", "a"][..],
        &["--run-dir", d, "type", "hi"],
        &["--run-dir", d, "pointer", "1", "2"],
        &["--run-dir", d, "input-status"],
        &["--run-dir", d, "screenshot", "/tmp/never.png"],
        &["--run-dir", d, "restart", "blk0"],
        &["--run-dir", d, "upgrade", "blk0"],
        &["--run-dir", d, "events"],
        &["--run-dir", d, "logs", "nosuchlog"],
        &["--run-dir", d, "console", "--port", "7"],
    ] {
        let (code, e, _) = json(args);
        assert_eq!(code, Some(1), "{args:?}: {e}");
        assert_eq!(keys(&e), ["error"], "{args:?}: {e}");
        assert!(!e["error"].as_str().unwrap().is_empty(), "{args:?}: {e}");
    }
    let (code, e, _) = json(&["--run-dir", d, "events"]);
    assert_eq!(code, Some(1));
    assert!(e["error"].as_str().unwrap().contains("api.sock"), "{e}");

    // logs: a JSON line per log line, the last one without its newline too.
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    std::fs::write(
        dir.join("logs/blk0.log"),
        "first line\n\"quoted\" second\nthird",
    )
    .unwrap();
    let (code, out, err, _) = isolactl(&["--json", "--run-dir", d, "logs", "blk0"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let texts: Vec<&str> = lines.iter().map(|l| l["line"].as_str().unwrap()).collect();
    assert_eq!(texts, ["first line", "\"quoted\" second", "third"], "{out}");
    assert!(lines.iter().all(|l| l["log"] == "blk0"), "{out}");

    // notify: what was sent, and the datagram arrived.
    let notify = dir.join("notify.sock");
    let receiver = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let out = Command::new(binary("isolactl"))
        .args(["--json", "notify", "READY=1"])
        .env("NOTIFY_SOCKET", &notify)
        .output()
        .unwrap();
    assert!(out.status.success());
    let sent: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sent, serde_json::json!({ "sent": ["READY=1"] }));
    let mut buf = [0u8; 64];
    let n = receiver.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");

    // console: the notices on stderr are JSON lines; the port's bytes go through unchanged.
    let got = attach(
        &["--json", "--run-dir", d, "console"],
        &dir.join("console.sock"),
        "hi",
    );
    assert_eq!(got, b"typed");

    let (code, end, err) = json(&["--run-dir", d, "shutdown", "--hard"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(keys(&end), VM_KEYS);
}

/// A socket that accepts and never answers, as `DIR/api.sock`: every command that goes
/// through the API gives up at `--timeout`, says so, and prints `{"error": ...}`.
#[test]
fn the_timeout_bounds_commands_through_a_silent_api_socket() {
    let dir = scratch_dir("isolactl-api-deadline");
    let _silent = UnixListener::bind(dir.join("api.sock")).unwrap();
    let d = dir.to_str().unwrap();
    let cases: [&[&str]; 5] = [
        &["--json", "status"][..],
        &["--json", "pause"],
        &["--json", "key", "a"],
        &["--json", "restart", "blk0"],
        &["events"],
    ];
    let prefix = ["--run-dir", d, "--timeout", "1.5"];
    for (args, (code, out, err, took)) in cases.iter().zip(isolactl_all(&prefix, &cases)) {
        eprintln!("{args:?}: {took:?}: {}", err.trim());
        assert_eq!(code, Some(1), "{args:?}: {out}{err}");
        assert!(
            err.contains("isola-api did not answer") && err.contains("1.5s"),
            "{args:?}: {err}"
        );
        assert!(
            took >= Duration::from_millis(1400) && took < Duration::from_secs(20),
            "{args:?}: took {took:?}"
        );
        if args[0] == "--json" {
            let e: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON error");
            assert!(
                e["error"].as_str().unwrap().contains("did not answer"),
                "{e}"
            );
        }
    }
}

/// `isolactl events` (prose, and `--json`) in the background: its lines, and the child.
struct Events {
    child: std::process::Child,
    lines: Lines,
}

impl Events {
    fn start(args: &[&str]) -> Events {
        let mut child = Command::new(binary("isolactl"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("isolactl runs");
        let lines = Lines::new(child.stdout.take().expect("piped"));
        Events { child, lines }
    }

    /// Lines until one containing `needle`; panics after `timeout`.
    fn until(&mut self, needle: &str, timeout: Duration) -> Vec<String> {
        self.lines
            .until(|line| line.contains(needle), timeout)
            .unwrap_or_else(|seen| panic!("no {needle:?} within {timeout:?}; saw {seen:?}"))
    }

    /// The exit status, if isolactl ended by itself within `timeout`.
    fn ends_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A VM with a disk started by isola-run (so with isola-api): `--json` answers through
/// `DIR/api.sock` and straight from the internal sockets have the same shape; `isolactl
/// events` sees blk0 killed, restarted and reconnected, in that order, and ends with the VM.
#[test]
fn json_through_the_api_and_events_follow_a_killed_device() {
    let scratch = scratch_dir("isolactl-api");
    let run_dir = scratch.join("run");
    let mut launch = launch_blk(&run_dir, 40);
    let d = run_dir.to_str().unwrap();
    let mut json_events = Events::start(&["--run-dir", d, "--json", "events"]);
    let mut prose_events = Events::start(&["--run-dir", d, "events"]);
    // The stream is subscribed once the answer's head is out.
    std::thread::sleep(Duration::from_millis(500));

    // status: through the API, and from the core and supervisor sockets: same shape.
    let (code, api, err) = json(&["--run-dir", d, "status"]);
    assert_eq!(code, Some(0), "{err}");
    let control = run_dir.join("control.sock");
    let supervisor = run_dir.join("supervisor.sock");
    let direct_args = [
        "--socket",
        control.to_str().unwrap(),
        "--supervisor",
        supervisor.to_str().unwrap(),
        "status",
    ];
    let (code, direct, err) = json(&direct_args);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(keys(&api["vm"]), VM_KEYS);
    assert_eq!(keys(&api["vm"]), keys(&direct["vm"]));
    assert!(
        api["vm"]["pid"].as_u64().is_some(),
        "the API knows the core's pid: {api}"
    );
    let (api_devices, direct_devices) = (
        api["devices"].as_array().unwrap(),
        direct["devices"].as_array().unwrap(),
    );
    assert_eq!(api_devices.len(), direct_devices.len(), "{api}\n{direct}");
    for (a, b) in api_devices.iter().zip(direct_devices) {
        assert_eq!(keys(a), keys(b), "{a}\n{b}");
        assert_eq!(keys(&a["daemon"]), keys(&b["daemon"]), "{a}\n{b}");
        for field in ["name", "kind", "slot", "socket", "link", "reconnects"] {
            assert_eq!(a[field], b[field], "{field}: {a}\n{b}");
        }
        assert_eq!(a["daemon"]["pid"], b["daemon"]["pid"], "{a}\n{b}");
    }
    let blk0 = api_devices
        .iter()
        .find(|d| d["name"] == "blk0")
        .unwrap_or_else(|| panic!("no blk0: {api}"));
    let pid = blk0["daemon"]["pid"].as_u64().expect("blk0 runs") as i32;

    // Kill blk0's daemon: died, restarted, reconnected, in that order, in both streams.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill blk0");
    let seen = json_events.until("device_reconnected", Duration::from_secs(60));
    let parsed: Vec<serde_json::Value> = seen
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let order: Vec<&str> = parsed
        .iter()
        .filter(|e| e["device"] == "blk0")
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        order,
        ["device_died", "device_restarted", "device_reconnected"],
        "{seen:?}"
    );
    assert_eq!(parsed[0]["reason"], "killed by SIGKILL", "{seen:?}");
    assert!(parsed.iter().all(|e| e["timestamp_ms"].as_u64().is_some()));
    let prose = prose_events.until("device_reconnected blk0", Duration::from_secs(30));
    let at = |needle: &str| prose.iter().position(|l| l.contains(needle));
    assert!(
        at("device_died blk0") < at("device_restarted blk0")
            && at("device_died blk0").is_some()
            && prose[at("device_died blk0").unwrap()].ends_with(": killed by SIGKILL"),
        "{prose:?}"
    );

    // restart through the API: the device after it; pause and resume: the VM.
    let (code, restarted, err) = json(&["--run-dir", d, "restart", "blk0"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(restarted["name"], "blk0", "{restarted}");
    assert_eq!(keys(&restarted), keys(blk0));
    // (isola-api sees a pause by asking the core, so the stream shows it before the resume.)
    let (code, paused, err) = json(&["--run-dir", d, "pause"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(paused["state"], "paused", "{paused}");
    json_events.until("vcpus_paused", Duration::from_secs(30));
    let (code, resumed, err) = json(&["--run-dir", d, "resume"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(resumed["state"], "running", "{resumed}");
    json_events.until("vcpus_resumed", Duration::from_secs(30));
    let (code, e, _) = json(&["--run-dir", d, "restart", "nosuchdevice"]);
    assert_eq!(code, Some(1));
    assert!(e["error"].as_str().unwrap().contains("HTTP 404"), "{e}");

    // The guest finishes and powers off: the stream says so, and isolactl events ends.
    let mut json_events = json_events;
    let end = json_events.until("vm_ended", Duration::from_secs(120));
    assert!(
        end.iter().any(|l| l.contains("guest_powered_off")),
        "{end:?}"
    );
    let status = json_events.ends_within(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "isolactl events did not end with the VM: {status:?}"
    );
    let finished = launch.finish(Duration::from_secs(60));
    assert!(finished.success(), "{}", launch.report());
}

/// The sum of an `Input` answer's counters: events handed to the guest or waiting for it.
fn input_count(v: &serde_json::Value) -> u64 {
    ["keyboard_events", "tablet_events", "pending"]
        .iter()
        .map(|k| v[k].as_u64().unwrap_or_else(|| panic!("no {k}: {v}")))
        .sum()
}

/// A VM with a display, a keyboard and a tablet: `--json` for key, type, pointer,
/// input-status and screenshot, through the API and straight to isola-input and
/// isola-display, answers the same shapes; each input command's counters grow.
#[test]
fn json_for_input_and_screenshot_through_the_api_and_directly() {
    let scratch = scratch_dir("isolactl-json-input");
    let run_dir = scratch.join("run");
    let mut launch = isola_tests::api::launch_gpu(&run_dir);
    let d = run_dir.to_str().unwrap();
    let input = run_dir.join("input-control.sock");
    let display = run_dir.join("display-control.sock");
    let direct_input = ["--input", input.to_str().unwrap()];
    let direct_display = ["--display", display.to_str().unwrap()];
    let via_api = ["--run-dir", d];
    let with = |first: &[&str], rest: &[&str]| -> serde_json::Value {
        let all: Vec<&str> = first.iter().chain(rest).copied().collect();
        let (code, v, err) = json(&all);
        assert_eq!(code, Some(0), "{all:?}: {v} {err}");
        v
    };
    let mut last = input_count(&with(&via_api, &["input-status"]));
    let input_keys = keys(&with(&direct_input, &["input-status"]));
    assert_eq!(input_keys, ["keyboard_events", "pending", "tablet_events"]);
    for how in [&via_api[..], &direct_input[..]] {
        for command in [
            &["key", "ctrl+alt+delete", "a"][..],
            &["key", "leftshift", "--press"],
            &["key", "leftshift", "--release"],
            &["type", "Hi!\\n"],
            &["pointer", "16384", "100", "--buttons", "left,right"],
            &["input-status"],
        ] {
            let v = with(how, command);
            assert_eq!(keys(&v), input_keys, "{how:?} {command:?}: {v}");
            let now = input_count(&v);
            if command[0] == "input-status" {
                assert_eq!(now, last, "{how:?}: {v}");
            } else {
                assert!(now > last, "{how:?} {command:?}: {last} -> {v}");
            }
            last = now;
        }
        let (code, e, _) = json(&[how, &["key", "nosuchkey"][..]].concat());
        assert_eq!(code, Some(1), "{how:?}: {e}");
        assert!(e["error"].as_str().unwrap().contains("nosuchkey"), "{e}");
    }
    for (how, name) in [
        (&via_api[..], "api.png"),
        (&direct_display[..], "direct.png"),
    ] {
        let out = scratch.join(name);
        let v = with(how, &["screenshot", out.to_str().unwrap()]);
        assert_eq!(keys(&v), ["file", "height", "scanout", "width"], "{v}");
        assert_eq!(
            (v["width"].as_u64(), v["height"].as_u64()),
            (Some(640), Some(400))
        );
        assert_eq!(v["file"], out.to_str().unwrap(), "{v}");
        let png = std::fs::read(&out).expect("the screenshot was written");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{name}");
    }
    let (code, e, _) = json(&[
        "--run-dir",
        d,
        "screenshot",
        "/tmp/x.png",
        "--scanout",
        "99",
    ]);
    assert_eq!(code, Some(1), "{e}");
    assert!(e["error"].as_str().unwrap().contains("scanout"), "{e}");

    let end = with(&via_api, &["shutdown", "--hard"]);
    assert_eq!(keys(&end), VM_KEYS);
    let status = launch.finish(Duration::from_secs(60));
    assert!(status.success(), "{status:?}\n{}", launch.report());
}
