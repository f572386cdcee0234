//! Control answers in every state: after the supervisor gave up on a daemon (F4), with the
//! supervisor gone, with a peer that never answers; `isola-core` waits a bounded time for a
//! missing device socket (F7); `isolactl` has a timeout and survives a closed stdout.

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use isola_ipc::supervisor::DaemonState;
use isola_ipc::{ControlRequest, ControlResponse};
use isola_tests::hang::{control_answers, control_within, signal_tree};
use isola_tests::supervisor::{supervisor_status, wait_until, Launch};
use isola_tests::{binary, guest, msi_core, scratch_dir, wait_for_path, Core};

const LIMIT: Duration = Duration::from_secs(1);

fn isolactl(args: &[&str]) -> (Option<i32>, String, String, Duration) {
    let isolactl = binary("isolactl");
    let t0 = Instant::now();
    let out = Command::new(isolactl)
        .args(args)
        .output()
        .expect("isolactl runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t0.elapsed(),
    )
}

/// F4's repro: `isola-run --restart-limit 1` with the virtio-blk guest's I/O loop (a request
/// may take `timeout` seconds), blk0 killed twice by its pid, so the supervisor gives up and
/// keeps its socket listening with nobody accepting.
fn given_up(run_dir: &Path, timeout: u32) -> Launch {
    let cmdline =
        format!("virtio-blk.mode=loop virtio-blk.seconds=60 virtio-blk.timeout={timeout}");
    let launch = Launch::start(run_dir, &["--restart-limit", "1", "--cmdline", &cmdline]);
    let sup = launch.supervisor_socket();
    let control = launch.control_socket();
    wait_for_path(&control, Duration::from_secs(60));
    // The core runs the guest on blk0 (it answers `starting` until its devices are there).
    wait_until(
        "the core running",
        Duration::from_secs(60),
        || match control_within(&control, &ControlRequest::Status, LIMIT) {
            Ok(ControlResponse::Status(s)) => Some(s),
            _ => None,
        },
    );
    for _ in 0..2 {
        let pid = wait_until("blk0 running", Duration::from_secs(30), || {
            supervisor_status(&sup)
                .into_iter()
                .find(|d| d.name == "blk0" && d.state == DaemonState::Running)
                .and_then(|d| d.pid)
        });
        signal_tree(pid, libc::SIGKILL);
        wait_until("blk0 gone", Duration::from_secs(30), || {
            supervisor_status(&sup)
                .into_iter()
                .find(|d| d.name == "blk0")
                .filter(|d| d.pid != Some(pid))
        });
    }
    wait_until("blk0 given up on", Duration::from_secs(30), || {
        supervisor_status(&sup)
            .into_iter()
            .find(|d| d.name == "blk0" && matches!(d.state, DaemonState::Failed(_)))
    });
    launch
}

#[test]
fn f4_control_answers_after_the_supervisor_gave_up_on_a_daemon() {
    let dir = scratch_dir("f4-give-up");
    let run_dir = dir.join("run");
    let mut launch = given_up(&run_dir, 100);
    let control = launch.control_socket();
    // Long enough for many reconnect attempts into the backlog nobody accepts.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        control_answers(&control, LIMIT);
        std::thread::sleep(Duration::from_millis(100));
    }
    let run = run_dir.to_str().unwrap();
    let (code, out, err, took) = isolactl(&["--run-dir", run, "status"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        took < Duration::from_secs(5),
        "isolactl status took {took:?}"
    );
    assert!(out.contains("blk") && out.contains("failed"), "{out}");
    let answer = control_within(&control, &ControlRequest::Shutdown, LIMIT);
    assert_eq!(answer, Ok(ControlResponse::Done));
    launch.finish(Duration::from_secs(30));
}

#[test]
fn f4_the_guests_own_exit_ends_the_vm_after_a_give_up() {
    let dir = scratch_dir("f4-guest-exit");
    let run_dir = dir.join("run");
    // The guest gives up on its stalled request after 4 s and debug-exits (17).
    let mut launch = given_up(&run_dir, 4);
    let status = launch.finish(Duration::from_secs(40));
    assert!(!status.success(), "the guest reported its timeout");
}

#[test]
fn a_missing_device_socket_is_waited_for_a_bounded_time_with_one_line() {
    let dir = scratch_dir("missing-socket");
    let missing = dir.join("nobody.sock");
    let kernel = guest("virtio-blk.elf");
    let device = format!("blk,socket={}", missing.display());
    binary("isola-core"); // built before the clock starts
    let t0 = Instant::now();
    let core = Core::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--device",
        &device,
        "--device-timeout",
        "2",
    ]);
    let done = core.finish(Duration::from_secs(30));
    let took = t0.elapsed();
    assert_eq!(done.status.code(), Some(2), "{}", done.stderr);
    assert!(took < Duration::from_secs(15), "took {took:?}");
    let waiting: Vec<&str> = done
        .stderr
        .lines()
        .filter(|l| l.contains("waiting for"))
        .collect();
    assert_eq!(waiting.len(), 1, "{}", done.stderr);
    assert!(waiting[0].contains("nobody.sock"), "{}", done.stderr);
    assert!(done.stderr.contains("error:"), "{}", done.stderr);
}

#[test]
fn a_socket_nobody_accepts_on_is_waited_for_a_bounded_time() {
    let dir = scratch_dir("silent-socket");
    let path = dir.join("silent.sock");
    let _listener = UnixListener::bind(&path).unwrap();
    let kernel = guest("virtio-blk.elf");
    let device = format!("blk,socket={}", path.display());
    let core = Core::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--device",
        &device,
        "--device-timeout",
        "2",
    ]);
    let done = core.finish(Duration::from_secs(30));
    assert_eq!(done.status.code(), Some(2), "{}", done.stderr);
}

#[test]
fn a_device_socket_that_is_a_regular_file_is_refused_at_once() {
    let dir = scratch_dir("file-socket");
    let file = dir.join("not-a-socket");
    std::fs::write(&file, b"x").unwrap();
    let kernel = guest("virtio-blk.elf");
    let device = format!("blk,socket={}", file.display());
    binary("isola-core"); // built before the clock starts
    let t0 = Instant::now();
    let core = Core::start(&["--kernel", kernel.to_str().unwrap(), "--device", &device]);
    let done = core.finish(Duration::from_secs(30));
    assert_eq!(done.status.code(), Some(2), "{}", done.stderr);
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(done.stderr.contains("is not a socket"), "{}", done.stderr);
}

#[test]
fn isolactl_gives_up_on_a_socket_that_never_answers_and_names_it() {
    let dir = scratch_dir("isolactl-timeout");
    let path = dir.join("control.sock");
    let _listener = UnixListener::bind(&path).unwrap();
    let (code, _out, err, took) = isolactl(&[
        "--socket",
        path.to_str().unwrap(),
        "--timeout",
        "1",
        "status",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(
        err.contains("did not answer") && err.contains("control.sock"),
        "{err}"
    );
}

#[test]
fn isolactl_status_reports_the_core_with_the_supervisor_gone() {
    let dir = scratch_dir("isolactl-no-supervisor");
    let (_core, _socket) = msi_core(&dir, 1);
    // A killed supervisor leaves its socket file, which nobody listens on any more. (A run
    // directory without one is a VM without device daemons: tests/tests/isolactl.rs.)
    drop(UnixListener::bind(dir.join("supervisor.sock")).unwrap());
    let (code, out, err, _) = isolactl(&["--run-dir", dir.to_str().unwrap(), "status"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("vcpu0"), "{out}");
    assert!(
        err.contains("supervisor") && err.contains("supervisor.sock"),
        "{err}"
    );
}

#[test]
fn isolactl_status_into_a_closed_pipe_exits_quietly() {
    let dir = scratch_dir("isolactl-epipe");
    let (_core, socket) = msi_core(&dir, 1);
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let out = Command::new(binary("isolactl"))
        .args(["--socket", socket.to_str().unwrap(), "status"])
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .expect("isolactl runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

#[test]
fn while_waiting_for_an_absent_device_every_request_is_answered_and_shutdown_ends_it() {
    let dir = scratch_dir("absent-at-start");
    let control = dir.join("control.sock");
    let kernel = guest("virtio-blk.elf");
    let device = format!("blk,socket={}", dir.join("later.sock").display());
    let core = Core::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--device",
        &device,
        "--device-timeout",
        "60",
        "--control-socket",
        control.to_str().unwrap(),
    ]);
    wait_for_path(&control, Duration::from_secs(30));
    for request in [
        ControlRequest::Status,
        ControlRequest::Pause,
        ControlRequest::Resume,
    ] {
        let t0 = Instant::now();
        match control_within(&control, &request, LIMIT) {
            Ok(ControlResponse::Error(why)) => {
                assert!(why.contains("later.sock"), "{why}")
            }
            other => panic!("{request:?} while starting: {other:?}"),
        }
        assert!(t0.elapsed() < LIMIT, "{request:?} took {:?}", t0.elapsed());
    }
    let answer = control_within(&control, &ControlRequest::Shutdown, LIMIT);
    assert_eq!(answer, Ok(ControlResponse::Done));
    let done = core.finish(Duration::from_secs(10));
    done.assert_success();
    assert!(!control.exists(), "the control socket is removed");
}
