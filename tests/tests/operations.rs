//! Day-2 operations as an operator meets them (issue 16): logs in files of their own, the
//! guest's console alone on the terminal, `isolactl logs`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use isola_ipc::supervisor::DaemonState;
use isola_tests::supervisor::{isolactl, supervisor_status, wait_until, Launch};
use isola_tests::{binary, scratch_dir};

/// `PROCESS[PID]: LEVEL DEVICE/THREAD: message`, after the supervisor's UTC time in a daemon's
/// log file: whether `line` names all four.
fn names_process_pid_device_thread(line: &str, process: &str, device: &str) -> bool {
    let Some(at) = line.find(&format!("{process}[")) else {
        return false;
    };
    let rest = &line[at + process.len() + 1..];
    let Some((pid, rest)) = rest.split_once("]: ") else {
        return false;
    };
    let Some((_level, rest)) = rest.split_once(' ') else {
        return false;
    };
    let Some((who, _message)) = rest.split_once(": ") else {
        return false;
    };
    let Some((dev, thread)) = who.split_once('/') else {
        return false;
    };
    pid.parse::<u32>().is_ok() && dev == device && !thread.is_empty()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn logs_land_in_their_files_and_never_in_the_guest_console_stream() {
    let scratch = scratch_dir("ops-logs");
    let run_dir = scratch.join("run");
    let dir = run_dir.to_str().unwrap();
    let mut launch = Launch::running(
        &run_dir,
        &[
            "--console",
            "--log-level",
            "info",
            "--cmdline",
            "virtio-blk.mode=loop virtio-blk.sectors=64",
        ],
        "virtio-blk: mode=loop",
    );
    let logs = run_dir.join("logs");
    // Each daemon's lines in its own file, naming process, pid, device and thread.
    let blk = wait_until("blk0.log has a line", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(logs.join("blk0.log")).ok()?;
        text.lines()
            .any(|l| l.contains("isola-blk["))
            .then_some(text)
    });
    for line in blk.lines() {
        assert!(
            names_process_pid_device_thread(line, "isola-blk", "blk0"),
            "blk0.log: {line:?}"
        );
        assert!(line.starts_with("20"), "no UTC time first: {line:?}");
    }
    let console = read(&logs.join("console.log"));
    assert!(
        console
            .lines()
            .any(|l| names_process_pid_device_thread(l, "isola-console", "console")),
        "console.log:\n{console}"
    );
    assert!(!console.contains("isola-blk["), "{console}");
    let supervisor = read(&logs.join("supervisor.log"));
    assert!(
        supervisor.lines().any(|l| names_process_pid_device_thread(
            l,
            "isola-supervisor",
            "supervisor"
        )),
        "supervisor.log:\n{supervisor}"
    );
    assert!(logs.join("core.log").exists());

    // isolactl logs prints a file; an unknown name is one line that lists the known ones.
    let (ok, text) = isolactl(&["--run-dir", dir, "logs", "blk0"]);
    assert!(ok, "{text}");
    assert!(text.starts_with(&blk), "{text}");
    let (ok, text) = isolactl(&["--run-dir", dir, "logs", "nosuch"]);
    assert!(!ok);
    assert!(text.contains("blk0, console, core, supervisor"), "{text}");
    let (ok, text) = isolactl(&["--run-dir", dir, "logs", "../control"]);
    assert!(!ok && text.contains("not a log name"), "{text}");

    // --follow shows what is written later (a killed daemon's restart), and ends on its own
    // when the VM ends and its run directory goes.
    let mut follow = Command::new(binary("isolactl"))
        .args(["--run-dir", dir, "logs", "supervisor", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("isolactl logs --follow starts");
    let (tx, rx) = std::sync::mpsc::channel();
    let out = follow.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let sup = launch.supervisor_socket();
    let pid = supervisor_status(&sup)
        .into_iter()
        .find(|d| d.name == "blk0")
        .and_then(|d| d.pid)
        .expect("blk0 runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill blk0");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut followed = Vec::new();
    while !followed
        .iter()
        .any(|l: &String| l.contains("blk0: restarted"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => followed.push(line),
            Err(_) => panic!("--follow never showed the restart: {followed:#?}"),
        }
    }
    wait_until("blk0 back", Duration::from_secs(20), || {
        supervisor_status(&sup)
            .into_iter()
            .any(|d| d.name == "blk0" && d.state == DaemonState::Running)
            .then_some(())
    });
    let (ok, text) = isolactl(&["--run-dir", dir, "shutdown", "--hard"]);
    assert!(ok, "{text}");
    let status = launch.finish(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", launch.report());
    let ended = wait_until("--follow ends", Duration::from_secs(10), || {
        follow.try_wait().expect("wait works")
    });
    assert!(ended.success(), "{ended:?}");

    // The terminal: the guest's console on stdout, nothing but isola-run's lines on stderr.
    let stdout = launch.stdout.drain(Duration::from_millis(100)).to_vec();
    assert!(
        stdout.iter().any(|l| l.starts_with("virtio-blk: ")),
        "{stdout:#?}"
    );
    let process_line = |l: &String| {
        [
            "isola-blk[",
            "isola-console[",
            "isola-supervisor[",
            "isola-core[",
        ]
        .iter()
        .any(|p| l.contains(p))
    };
    assert!(!stdout.iter().any(process_line), "{stdout:#?}");
    let stderr = launch.stderr.drain(Duration::from_millis(100)).to_vec();
    assert!(
        stderr.iter().all(|l| l.starts_with("isola-run: ")),
        "{stderr:#?}"
    );
}

/// Every binary takes `--log-level`, and refuses a filter it cannot use with status 2 before
/// it does anything else.
#[test]
fn every_binary_takes_log_level_and_refuses_a_bad_one() {
    let programs = [
        "isola-core",
        "isola-supervisor",
        "isola-blk",
        "isola-net",
        "isola-console",
        "isola-gpu",
        "isola-display",
        "isola-input",
        "isola-usb",
    ];
    for program in programs {
        let help = Command::new(binary(program))
            .arg("--help")
            .output()
            .expect("runs");
        let text = String::from_utf8_lossy(&help.stdout);
        assert!(text.contains("--log-level"), "{program} --help:\n{text}");
        let out = Command::new(binary(program))
            .args(["--log-level", "blk=loud"])
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{program}: {stderr}");
        // The first line says what is wrong (the core and the supervisor add clap's hint).
        let first = stderr.lines().next().unwrap_or_default();
        assert!(first.contains("blk=loud"), "{program}: {stderr}");
    }
}

/// `isolactl restart NAME` on a healthy daemon: the running instance is stopped (SIGTERM) and
/// a new one started at once, without counting against the give-up budget; one that ignores
/// SIGTERM is killed after the stop timeout.
#[test]
fn restart_on_demand_works_on_a_healthy_daemon() {
    let dir = scratch_dir("ops-restart-healthy");
    let control = dir.join("supervisor.sock");
    let daemons = [
        "calm:-:sh -c 'trap \"exit 0\" TERM; while :; do sleep 0.05; done'".to_owned(),
        "stubborn:-:sh -c 'trap \"\" TERM; while :; do sleep 0.05; done'".to_owned(),
    ];
    let sup = isola_tests::supervisor::Supervisor::start(
        &control,
        &daemons,
        &["--restart-limit", "1", "--stop-timeout-ms", "300"],
    );
    let running = |name: &str| {
        let d = sup.daemon(name);
        (d.state == DaemonState::Running).then_some(d.pid?)
    };
    for name in ["calm", "stubborn"] {
        // More restarts than the give-up budget (1): on demand, none of them counts.
        for round in 1..=3u32 {
            let old = wait_until("running", Duration::from_secs(10), || running(name));
            let (ok, text) =
                isolactl(&["--supervisor", control.to_str().unwrap(), "restart", name]);
            assert!(ok, "{name}: {text}");
            let new = wait_until("a new instance", Duration::from_secs(10), || {
                running(name).filter(|&pid| pid != old)
            });
            let status = sup.daemon(name);
            assert_eq!(status.restarts, round, "{status:?}");
            assert!(
                std::fs::read(format!("/proc/{old}/cmdline")).is_ok_and(|c| c.is_empty())
                    || std::fs::metadata(format!("/proc/{old}")).is_err(),
                "{name}: the old instance {old} still runs beside {new}"
            );
        }
        let last = sup.daemon(name).last_exit.unwrap_or_default();
        let expected = if name == "calm" {
            "restarted on request"
        } else {
            "restarted on request: killed by SIGKILL"
        };
        assert!(last.contains(expected), "{name}: {last}");
    }
    let (ok, text) = isolactl(&["--supervisor", control.to_str().unwrap(), "restart", "nope"]);
    assert!(!ok && text.contains("no daemon named 'nope'"), "{text}");
}

/// `isola-run --detach` returns once the VM runs with the run directory on stdout; the VM
/// goes on with DIR/isola.pid naming its launcher; `isolactl shutdown` ends it all.
#[test]
fn detach_prints_the_run_directory_writes_the_pidfile_and_shutdown_ends_it() {
    let scratch = scratch_dir("ops-detach");
    let run_dir = scratch.join("run");
    let dir = run_dir.to_str().unwrap();
    binary("isola-supervisor");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/isola-run");
    let mut child = Command::new(&script)
        .args(["--bin-dir", isola_tests::profile_dir().to_str().unwrap()])
        .args(["--run-dir", dir, "--detach"])
        .args(["--cmdline", "virtio-blk.mode=loop virtio-blk.sectors=64"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("isola-run starts");
    let status = wait_until(
        "isola-run --detach returns",
        Duration::from_secs(120),
        || child.try_wait().expect("wait works"),
    );
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(status.success(), "{status:?}\n{stdout}\n{stderr}");
    assert_eq!(stdout.trim_end(), dir, "stderr: {stderr}");
    // It returned once the VM runs: the core answers status at once.
    let (ok, text) = isolactl(&["--run-dir", dir, "status"]);
    assert!(ok && text.contains("vcpu0: running"), "{text}");
    let pid: i32 = read(&run_dir.join("isola.pid"))
        .trim()
        .parse()
        .expect("a pid");
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    // The guest's console went to its own file, not to the terminal that started it.
    wait_until(
        "the guest's lines in serial.log",
        Duration::from_secs(30),
        || {
            read(&run_dir.join("logs/serial.log"))
                .contains("virtio-blk: mode=loop")
                .then_some(())
        },
    );
    let (ok, text) = isolactl(&["--run-dir", dir, "shutdown", "--hard"]);
    assert!(ok, "{text}");
    wait_until("the launcher gone", Duration::from_secs(30), || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        (stat.is_empty() || stat.contains(") Z ")).then_some(())
    });
    wait_until("the run directory gone", Duration::from_secs(10), || {
        (!run_dir.exists()).then_some(())
    });
}

/// A detached start that fails says why on stderr and returns the run's status.
#[test]
fn a_detached_start_that_fails_returns_its_error() {
    let scratch = scratch_dir("ops-detach-fail");
    let run_dir = scratch.join("run");
    binary("isola-supervisor");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/isola-run");
    let out = Command::new(&script)
        .args(["--bin-dir", isola_tests::profile_dir().to_str().unwrap()])
        .args(["--run-dir", run_dir.to_str().unwrap(), "--detach"])
        .args(["--net", "nosuchtap8"])
        .stdin(Stdio::null())
        .output()
        .expect("isola-run runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(stderr.contains("nosuchtap8"), "{stderr}");
    assert!(!run_dir.exists());
}

/// Under systemd (Type=notify): READY=1 and MAINPID on $NOTIFY_SOCKET once the VM runs.
#[test]
fn the_launcher_notifies_systemd_when_the_vm_runs() {
    let scratch = scratch_dir("ops-notify");
    let run_dir = scratch.join("run");
    let notify_path = scratch.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("bind");
    notify
        .set_read_timeout(Some(Duration::from_secs(90)))
        .unwrap();
    let mut launch = Launch::start_with_env(
        &run_dir,
        &["--cmdline", "virtio-blk.mode=loop virtio-blk.sectors=64"],
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 4096];
    let n = notify.recv(&mut buf).unwrap_or_else(|e| {
        panic!("no notification: {e}\n{}", launch.report());
    });
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.contains(&"READY=1"), "{text}");
    let main_pid = format!("MAINPID={}", launch.child.id());
    assert!(lines.contains(&main_pid.as_str()), "{text}");
    assert_eq!(
        read(&run_dir.join("isola.pid")).trim(),
        launch.child.id().to_string()
    );
    let (ok, text) = isolactl(&["--run-dir", run_dir.to_str().unwrap(), "status"]);
    assert!(ok, "{text}");
    let (ok, text) = isolactl(&["--run-dir", run_dir.to_str().unwrap(), "shutdown", "--hard"]);
    assert!(ok, "{text}");
    let status = launch.finish(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", launch.report());
}
