//! The launch script and the supervisor, as a user runs them: `scripts/isola-run` starts the
//! device daemons under `isola-supervisor` and then the core; a daemon that dies is started
//! again; `isolactl` shows it; shutdown and Ctrl-C leave nothing behind.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use isola_ipc::supervisor::{DaemonState, SupervisorRequest, SupervisorResponse};
use isola_tests::supervisor::{
    isolactl, processes_mentioning, supervisor_call, supervisor_status, wait_until, Launch,
    Supervisor,
};
use isola_tests::{binary, scratch_dir};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

fn pid_alive(pid: u32) -> bool {
    // Zombies count as gone: /proc/PID/cmdline is empty for them.
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

/// After a run: the run directory is gone and no process still names it.
fn assert_cleaned_up(launch: &mut Launch, run_dir: &Path) {
    assert!(
        !run_dir.exists(),
        "run directory {} is left behind",
        run_dir.display()
    );
    let left = wait_until_empty(run_dir);
    assert!(
        left.is_empty(),
        "processes left behind: {left:?}\n{}",
        launch.report()
    );
}

fn wait_until_empty(run_dir: &Path) -> Vec<(u32, String)> {
    let needle = run_dir.display().to_string();
    for _ in 0..200 {
        let left = processes_mentioning(&needle);
        if left.is_empty() {
            return left;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    processes_mentioning(&needle)
}

/// `scripts/isola-run` with the GPU guest, which draws and then waits, on a 640x400 display,
/// plus `more` arguments; once the guest waits.
fn launch_waiting_gpu_guest(run_dir: &Path, more: &[&str]) -> Launch {
    let gpu_guest = isola_tests::guest("virtio-gpu.elf");
    let mut args = vec![
        "--kernel",
        gpu_guest.to_str().unwrap(),
        "--cmdline",
        "virtio-gpu.wait=1",
        "--display",
        "640x400",
    ];
    args.extend_from_slice(more);
    Launch::running(run_dir, &args, "virtio-gpu: waiting for vector")
}

#[test]
fn launch_script_restarts_a_killed_disk_daemon_and_the_guest_finishes_clean() {
    let scratch = scratch_dir("launch-kill");
    let run_dir = scratch.join("run");
    let mut launch = Launch::running(
        &run_dir,
        &[
            "--cmdline",
            "virtio-blk.mode=loop virtio-blk.seconds=4 virtio-blk.sectors=512 virtio-blk.depth=16",
        ],
        "virtio-blk: loop cycles=",
    );
    let sup = launch.supervisor_socket();
    let mut killed = Vec::new();
    for round in 1..=5u32 {
        let pid = wait_until("blk0 running", Duration::from_secs(10), || {
            let d = supervisor_status(&sup)
                .into_iter()
                .find(|d| d.name == "blk0")?;
            (d.state == DaemonState::Running).then_some(d.pid?)
        });
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill the daemon");
        killed.push(pid);
        wait_until("blk0 restarted", Duration::from_secs(10), || {
            let d = supervisor_status(&sup)
                .into_iter()
                .find(|d| d.name == "blk0")?;
            (d.restarts == round && d.state == DaemonState::Running).then_some(())
        });
        std::thread::sleep(Duration::from_millis(150));
    }
    let (ok, text) = isolactl(&["--run-dir", run_dir.to_str().unwrap(), "status"]);
    assert!(ok, "{text}");
    assert!(text.contains("vcpu0: running"), "{text}");
    assert!(
        text.contains("restarts 5, last exit: killed by SIGKILL"),
        "{text}"
    );
    assert!(text.contains("daemon blk0: pid "), "{text}");

    launch.finishes_with(Duration::from_secs(60), "virtio-blk: ok");
    for pid in killed {
        assert!(!pid_alive(pid), "killed daemon {pid} still there");
    }
    assert_cleaned_up(&mut launch, &run_dir);
}

/// `--disk PATH,sq-poll`: the disk's isola-blk runs with a kernel polling thread, and the
/// guest's writes and reads go through it.
#[test]
fn disk_options_reach_the_disk_daemon() {
    let scratch = scratch_dir("launch-disk-options");
    let run_dir = scratch.join("run");
    let image = scratch.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let disk = format!("{},sq-poll", image.display());
    let mut launch = Launch::running(
        &run_dir,
        &[
            "--disk",
            &disk,
            "--cmdline",
            "virtio-blk.mode=normal virtio-blk.sectors=256",
        ],
        "virtio-blk:",
    );
    let sup = launch.supervisor_socket();
    let reaper = wait_until("blk0 running", Duration::from_secs(10), || {
        let d = supervisor_status(&sup)
            .into_iter()
            .find(|d| d.name == "blk0")?;
        (d.state == DaemonState::Running).then_some(d.pid?)
    });
    let cmdline = std::fs::read(format!("/proc/{reaper}/cmdline"))
        .unwrap()
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        cmdline.contains(&format!("--image {} --sq-poll-ms 10", image.display())),
        "{cmdline}"
    );
    launch.finishes_with(Duration::from_secs(60), "virtio-blk: ok");
    assert_cleaned_up(&mut launch, &run_dir);
}

#[test]
fn isolactl_shutdown_stops_the_vm_and_every_daemon_and_removes_the_run_directory() {
    let scratch = scratch_dir("launch-shutdown");
    let run_dir = scratch.join("run");
    let mut launch = Launch::running(
        &run_dir,
        &["--cmdline", "virtio-blk.mode=loop virtio-blk.sectors=64"],
        "virtio-blk: mode=loop",
    );
    let daemon_pid = supervisor_status(&launch.supervisor_socket())[0]
        .pid
        .expect("running");
    let (ok, text) = isolactl(&["--run-dir", run_dir.to_str().unwrap(), "shutdown", "--hard"]);
    assert!(ok, "{text}");
    let status = launch.finish(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", launch.report());
    assert!(!pid_alive(daemon_pid));
    assert_cleaned_up(&mut launch, &run_dir);
}

#[test]
fn ctrl_c_stops_the_vm_and_every_daemon_and_removes_the_run_directory() {
    let scratch = scratch_dir("launch-ctrl-c");
    let run_dir = scratch.join("run");
    let mut launch = Launch::running(
        &run_dir,
        &["--cmdline", "virtio-blk.mode=loop virtio-blk.sectors=64"],
        "virtio-blk: mode=loop",
    );
    let daemon_pid = supervisor_status(&launch.supervisor_socket())[0]
        .pid
        .expect("running");
    // What a terminal does on Ctrl-C: SIGINT to the foreground process group.
    killpg(Pid::from_raw(launch.child.id() as i32), Signal::SIGINT).expect("SIGINT");
    let status = launch.finish(Duration::from_secs(30));
    assert_eq!(status.code(), Some(130), "{status:?}\n{}", launch.report());
    assert!(!pid_alive(daemon_pid));
    assert_cleaned_up(&mut launch, &run_dir);
}

#[test]
fn the_launch_script_refuses_a_missing_disk_and_unknown_options() {
    let scratch = scratch_dir("launch-bad");
    let run_dir = scratch.join("run");
    let mut launch = Launch::start(&run_dir, &["--disk", "/nonexistent/disk.img"]);
    let status = launch.finish(Duration::from_secs(60));
    assert_eq!(status.code(), Some(2));
    let report = launch.report();
    assert!(
        report.contains("disk image '/nonexistent/disk.img' does not exist"),
        "{report}"
    );
    assert!(!run_dir.exists());
    let mut launch = Launch::start(&run_dir, &["--frobnicate"]);
    assert_eq!(launch.finish(Duration::from_secs(60)).code(), Some(2));
    assert!(launch.report().contains("unknown option '--frobnicate'"));
    // A run directory with something in it is refused, and left alone.
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::write(run_dir.join("precious.txt"), b"keep me").unwrap();
    let mut launch = Launch::start(&run_dir, &[]);
    assert_eq!(launch.finish(Duration::from_secs(60)).code(), Some(2));
    assert!(
        launch.report().contains("exists and is not empty"),
        "{}",
        launch.report()
    );
    assert_eq!(
        std::fs::read(run_dir.join("precious.txt")).unwrap(),
        b"keep me"
    );
}

#[test]
fn a_daemon_that_keeps_failing_is_given_up_on_and_can_be_restarted_by_hand() {
    let dir = scratch_dir("supervisor-give-up");
    let image = dir.join("later.img");
    // It starts fine; then its image goes away and every restart fails. (A refusal on the
    // first start is final at once: tests/tests/supervisor.rs.)
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let socket = dir.join("blk0.sock");
    let control = dir.join("supervisor.sock");
    let blk = binary("isola-blk");
    let sup = Supervisor::start(
        &control,
        &[format!(
            "blk0:{}:{} --image {}",
            socket.display(),
            blk.display(),
            image.display()
        )],
        &["--restart-limit", "3"],
    );
    // The socket is the supervisor's, there from the start, even while no daemon runs.
    assert!(socket.exists());
    let first = wait_until("blk0 running", Duration::from_secs(10), || {
        sup.daemon("blk0").pid
    });
    std::fs::remove_file(&image).unwrap();
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    let why = wait_until("blk0 given up on", Duration::from_secs(20), || {
        match sup.daemon("blk0").state {
            DaemonState::Failed(why) => Some(why),
            _ => None,
        }
    });
    assert!(why.contains("died 4 times within 60 s"), "{why}");
    assert!(why.contains("exited with status 2"), "{why}");
    let d = sup.daemon("blk0");
    assert_eq!(d.pid, None);
    assert_eq!(d.restarts, 3);

    let (ok, text) = isolactl(&["--supervisor", control.to_str().unwrap(), "status"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("daemon blk0: pid -, failed (died 4 times"),
        "{text}"
    );

    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let (ok, text) = isolactl(&["--supervisor", control.to_str().unwrap(), "restart", "blk0"]);
    assert!(ok, "{text}");
    wait_until("blk0 running again", Duration::from_secs(10), || {
        (sup.daemon("blk0").state == DaemonState::Running).then_some(())
    });
    // A healthy daemon restarts on request too (tests/tests/operations.rs has the details).
    let before = sup.daemon("blk0").pid.unwrap();
    let (ok, text) = isolactl(&["--supervisor", control.to_str().unwrap(), "restart", "blk0"]);
    assert!(ok, "{text}");
    let pid = wait_until("blk0 running anew", Duration::from_secs(10), || {
        let d = sup.daemon("blk0");
        (d.state == DaemonState::Running).then_some(d.pid?)
    });
    let pid = if pid == before {
        wait_until("blk0 replaced", Duration::from_secs(10), || {
            sup.daemon("blk0").pid.filter(|&p| p != before)
        })
    } else {
        pid
    };
    assert_eq!(
        supervisor_call(&control, &SupervisorRequest::Stop),
        SupervisorResponse::Done
    );
    let mut sup = sup;
    let status = sup.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!pid_alive(pid));
    assert!(!socket.exists() && !control.exists());
}

#[test]
fn daemons_die_with_their_supervisor() {
    let dir = scratch_dir("supervisor-dies");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let socket = dir.join("blk0.sock");
    let mut sup = Supervisor::start(
        &dir.join("supervisor.sock"),
        &[format!(
            "blk0:{}:{} --image {}",
            socket.display(),
            binary("isola-blk").display(),
            image.display()
        )],
        &[],
    );
    let pid = wait_until("blk0 pid", Duration::from_secs(10), || {
        sup.daemon("blk0").pid
    });
    // Sandboxed and serving: its uid changed, which clears a parent-death signal unless the
    // sandbox keeps it.
    assert!(
        sup.stderr
            .wait_for("serving", Duration::from_secs(20))
            .is_some(),
        "{:?}",
        sup.stderr.seen
    );
    let needle = image.display().to_string();
    assert_eq!(
        processes_mentioning(&needle).len(),
        3,
        "the supervisor, the reaper and the device"
    );
    sup.child.kill().unwrap();
    sup.child.wait().unwrap();
    wait_until("daemon gone", Duration::from_secs(10), || {
        (!pid_alive(pid) && processes_mentioning(&needle).is_empty()).then_some(())
    });
}

#[test]
fn bad_supervisor_command_lines_exit_2_with_one_line() {
    let dir = scratch_dir("supervisor-bad");
    let control = dir.join("s.sock");
    let c = control.to_str().unwrap();
    let (y, z) = (
        format!("a:{}:true", dir.join("y.sock").display()),
        format!("a:{}:true", dir.join("z.sock").display()),
    );
    let cases: &[(&[&str], &str)] = &[
        (
            &["--control", c, "--daemon", "blk0"],
            "is not NAME:SOCKET:COMMAND",
        ),
        (
            &["--control", c, "--daemon", "a b:/x:true"],
            "daemon name 'a b'",
        ),
        (
            &["--control", c, "--daemon", "a:/x:'oops"],
            "unbalanced quotes",
        ),
        (
            &["--control", c, "--daemon", &y, "--daemon", &z],
            "daemon name 'a' is given twice",
        ),
        (
            &["--control", c, "--daemon", "a:/nonexistent/dir/a.sock:true"],
            "cannot listen on /nonexistent/dir/a.sock",
        ),
        (&["--control", c], "--daemon"),
    ];
    for (args, expected) in cases {
        let out = Command::new(binary("isola-supervisor"))
            .args(*args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(out.status.signal().is_none());
    }
    assert!(!control.exists());
}

#[test]
fn every_device_kind_runs_under_the_supervisor_and_each_daemon_comes_back_after_a_kill() {
    let scratch = scratch_dir("launch-all");
    let run_dir = scratch.join("run");
    let mut launch = launch_waiting_gpu_guest(&run_dir, &["--console"]);
    let run = run_dir.to_str().unwrap();
    let sup = launch.supervisor_socket();
    let mut names: Vec<String> = supervisor_status(&sup)
        .into_iter()
        .map(|d| d.name)
        .collect();
    names.sort();
    assert_eq!(names, ["console", "display", "gpu", "input"]);

    let shot = scratch.join("shot.png");
    let (ok, text) = isolactl(&["--run-dir", run, "screenshot", shot.to_str().unwrap()]);
    assert!(ok && text.contains("640x400"), "{text}");
    let (ok, text) = isolactl(&["--run-dir", run, "key", "a"]);
    assert!(ok, "{text}");

    // Devices connected again after each kill: console, then its two input devices, then gpu.
    for (name, again) in [("console", 1), ("input", 3), ("gpu", 4)] {
        let pid = wait_until(name, Duration::from_secs(10), || {
            supervisor_status(&sup)
                .into_iter()
                .find(|d| d.name == name)?
                .pid
        });
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
        wait_until("restart and reconnect", Duration::from_secs(20), || {
            let d = supervisor_status(&sup)
                .into_iter()
                .find(|d| d.name == name)?;
            let (_, text) = isolactl(&["--run-dir", run, "status"]);
            let reconnected = text.matches("connected (reconnects 1,").count();
            (d.restarts == 1 && d.state == DaemonState::Running && reconnected >= again)
                .then_some(())
        });
    }
    let (ok, text) = isolactl(&["--run-dir", run, "status"]);
    assert!(ok, "{text}");
    assert!(!text.contains("reconnecting"), "{text}");
    // Both input devices (one daemon) reconnected.
    assert_eq!(text.matches("input 00:").count(), 2, "{text}");
    let (ok, text) = isolactl(&["--run-dir", run, "screenshot", shot.to_str().unwrap()]);
    assert!(ok && text.contains("640x400"), "{text}");

    let (ok, text) = isolactl(&["--run-dir", run, "shutdown", "--hard"]);
    assert!(ok, "{text}");
    let status = launch.finish(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", launch.report());
    assert_cleaned_up(&mut launch, &run_dir);
}

/// isola-display SIGKILLed under the supervisor: the supervisor starts it again on the same
/// socket, and the core passes a new connection to the running isola-gpu, which sends it the
/// guest's picture (a screenshot works again: a fresh display has no scanout until a GPU
/// sets one up). isola-gpu is not restarted and the guest does nothing.
#[test]
fn a_killed_display_daemon_comes_back_with_the_picture_from_the_running_gpu() {
    let scratch = scratch_dir("launch-display");
    let run_dir = scratch.join("run");
    let mut launch = launch_waiting_gpu_guest(&run_dir, &[]);
    let run = run_dir.to_str().unwrap();
    let sup = launch.supervisor_socket();
    let shot = scratch.join("shot.png");
    wait_until("a first screenshot", Duration::from_secs(20), || {
        let (ok, text) = isolactl(&["--run-dir", run, "screenshot", shot.to_str().unwrap()]);
        (ok && text.contains("640x400")).then_some(())
    });
    let pid_of = |name: &str| {
        wait_until(name, Duration::from_secs(10), || {
            supervisor_status(&sup)
                .into_iter()
                .find(|d| d.name == name)?
                .pid
        })
    };
    let gpu_pid = pid_of("gpu");
    let (ok, text) = isolactl(&["--run-dir", run, "status"]);
    assert!(
        ok && text.contains("display: connected (reattached 0,"),
        "{text}"
    );

    kill(Pid::from_raw(pid_of("display") as i32), Signal::SIGKILL).unwrap();
    wait_until("display restarted", Duration::from_secs(20), || {
        let d = supervisor_status(&sup)
            .into_iter()
            .find(|d| d.name == "display")?;
        (d.restarts == 1 && d.state == DaemonState::Running).then_some(())
    });
    // Usually one re-attach; two when the core's first attempt reached the dying process in
    // the instant between the end of its session and the close of its listening socket.
    wait_until("display re-attached", Duration::from_secs(20), || {
        let (_, text) = isolactl(&["--run-dir", run, "status"]);
        let count = text
            .split("display: connected (reattached ")
            .nth(1)?
            .split(',')
            .next()?
            .parse::<u32>()
            .ok()?;
        (count >= 1).then_some(())
    });
    wait_until(
        "the picture on the new display",
        Duration::from_secs(20),
        || {
            let (ok, text) = isolactl(&["--run-dir", run, "screenshot", shot.to_str().unwrap()]);
            (ok && text.contains("640x400")).then_some(())
        },
    );
    let gpu = supervisor_status(&sup)
        .into_iter()
        .find(|d| d.name == "gpu")
        .expect("gpu daemon");
    assert_eq!((gpu.pid, gpu.restarts), (Some(gpu_pid), 0), "{gpu:?}");
    let (ok, text) = isolactl(&["--run-dir", run, "status"]);
    assert!(ok, "{text}");
    assert!(text.contains("vcpu0: running"), "{text}");
    assert!(!text.contains("reconnecting"), "{text}");

    let (ok, text) = isolactl(&["--run-dir", run, "shutdown", "--hard"]);
    assert!(ok, "{text}");
    let status = launch.finish(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", launch.report());
    assert_cleaned_up(&mut launch, &run_dir);
}

/// SIGKILL of the launcher, which no trap can catch: within a bound no process of the VM is
/// left (isola-core included, and its guest with it) and the run directory is gone.
#[test]
fn nothing_outlives_a_sigkilled_launcher() {
    let scratch = scratch_dir("launch-sigkill");
    let run_dir = scratch.join("run");
    let mut launch = Launch::running(
        &run_dir,
        &["--cmdline", "virtio-blk.mode=loop virtio-blk.sectors=64"],
        "virtio-blk: mode=loop",
    );
    let needle = run_dir.display().to_string();
    let before = processes_mentioning(&needle);
    assert!(
        before.iter().any(|(_, c)| c.contains("isola-core")),
        "no core among {before:?}"
    );
    kill(Pid::from_raw(launch.child.id() as i32), Signal::SIGKILL).expect("SIGKILL isola-run");
    launch.child.wait().expect("reap isola-run");
    let gone = wait_until_gone(&needle, &run_dir, Duration::from_secs(10));
    assert!(gone.is_ok(), "{}\n{}", gone.unwrap_err(), launch.report());
}

/// Polls until no process mentions `needle` and `run_dir` is gone; what is left otherwise.
fn wait_until_gone(needle: &str, run_dir: &Path, bound: Duration) -> Result<(), String> {
    let deadline = std::time::Instant::now() + bound;
    loop {
        let left = processes_mentioning(needle);
        if left.is_empty() && !run_dir.exists() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            // Leave nothing behind for the next test either.
            for (pid, _) in &left {
                let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            }
            return Err(format!(
                "after {bound:?}: processes {left:?}, run directory there: {}",
                run_dir.exists()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// isola-run that must fail at once: it ends within `bound` with a non-zero status, its
/// output holds `expected`, and it leaves no process and no run directory behind. `bound` is
/// a liveness bound, not a speed target: it tells "ended on the daemon's error" from "retried
/// for a minute" even on a loaded CI machine (a CI run took 10.4 s here with every core busy).
fn fails_at_once(name: &str, args: &[&str], expected: &str, bound: Duration) -> String {
    let scratch = scratch_dir(name);
    let run_dir = scratch.join("run");
    binary("isola-supervisor"); // builds the workspace's binaries once: not part of the time
    let started = std::time::Instant::now();
    let mut launch = Launch::start(&run_dir, args);
    let status = launch.finish(bound + Duration::from_secs(30));
    let took = started.elapsed();
    let report = launch.report();
    eprintln!("{name}: isola-run ended with {status:?} after {took:?}");
    assert!(
        !status.success() && status.code().is_some(),
        "{status:?}\n{report}"
    );
    assert!(took < bound, "took {took:?}, more than {bound:?}\n{report}");
    assert!(report.contains(expected), "no {expected:?} in:\n{report}");
    let gone = wait_until_gone(
        &run_dir.display().to_string(),
        &run_dir,
        Duration::from_secs(5),
    );
    assert!(gone.is_ok(), "{}\n{report}", gone.unwrap_err());
    report
}

/// A tap that does not exist: isola-net's configuration error ends the run at once, with its
/// line, instead of being retried for a minute while the core waits.
#[test]
fn a_missing_tap_stops_the_launch_at_once_with_the_daemons_error() {
    let report = fails_at_once(
        "launch-no-tap",
        &["--net", "nosuchtap9"],
        "nosuchtap9",
        Duration::from_secs(30),
    );
    assert!(report.contains("isola-net"), "{report}");
    let refusals = report.lines().filter(|l| l.contains("isola-net: ")).count();
    assert_eq!(refusals, 1, "the error is not retried:\n{report}");
}

/// A VNC port already in use: isola-display's configuration error ends the run at once.
#[test]
fn a_vnc_port_in_use_stops_the_launch_at_once_with_the_daemons_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let addr = taken.local_addr().unwrap().to_string();
    let report = fails_at_once(
        "launch-vnc-in-use",
        &["--display", "640x400", "--vnc", &addr],
        &addr,
        Duration::from_secs(30),
    );
    assert!(report.contains("isola-display"), "{report}");
    assert!(!report.contains("did not appear"), "{report}");
}

/// Every argument is checked before anything starts: one line, exit status 2, no daemon
/// started, no run directory left.
#[test]
fn the_launch_script_validates_every_argument_before_it_starts_anything() {
    let scratch = scratch_dir("launch-validate");
    let kernel = isola_tests::guest("virtio-blk.elf");
    let kernel = kernel.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--cpus", "abc"], "--cpus 'abc'"),
        (&["--cpus", "0"], "--cpus '0'"),
        (&["--memory", "x"], "--memory 'x'"),
        (
            &["--disk", "/nonexistent/disk.img"],
            "/nonexistent/disk.img",
        ),
        (
            &["--kernel", "/nonexistent/vmlinux"],
            "/nonexistent/vmlinux",
        ),
        (
            &["--kernel", kernel, "--display", "0x400"],
            "--display '0x400'",
        ),
        (
            &[
                "--kernel",
                kernel,
                "--display",
                "640x400",
                "--vnc",
                "nohost",
            ],
            "--vnc 'nohost'",
        ),
        (
            &["--kernel", kernel, "--restart-limit", "many"],
            "--restart-limit 'many'",
        ),
        (
            &["--kernel", kernel, "--net", "a-name-far-too-long-for-a-tap"],
            "--net",
        ),
        (
            &["--kernel", kernel, "--console-log", "/nonexistent/dir/log"],
            "/nonexistent/dir",
        ),
        (&["--kernel", kernel, "--cpus"], "--cpus needs a value"),
        (
            &["--kernel", kernel, "--vnc", "127.0.0.1:5900"],
            "--vnc needs --display",
        ),
        (
            &["--kernel", kernel, "--log-level", "blk=loud"],
            "--log-level 'blk=loud'",
        ),
        (
            &["--kernel", kernel, "--log-dir", "/nonexistent/logs"],
            "--log-dir '/nonexistent/logs'",
        ),
        (
            &["--kernel", kernel, "--bin-dir", "/nonexistent/bin"],
            "/nonexistent/bin/isola-core is missing",
        ),
    ];
    for (i, (args, expected)) in cases.iter().enumerate() {
        let run_dir = scratch.join(format!("run{i}"));
        let mut launch = Launch::start(&run_dir, args);
        let status = launch.finish(Duration::from_secs(30));
        let stderr = launch.stderr.drain(Duration::from_millis(100)).to_vec();
        assert_eq!(status.code(), Some(2), "{args:?}: {status:?} {stderr:?}");
        assert_eq!(stderr.len(), 1, "{args:?}: not one line: {stderr:#?}");
        assert!(
            stderr[0].starts_with("isola-run: ") && stderr[0].contains(expected),
            "{args:?}: {stderr:?}"
        );
        assert!(!run_dir.exists(), "{args:?}: run directory left behind");
    }
}
