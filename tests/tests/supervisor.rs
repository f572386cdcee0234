//! `isola-supervisor` on its own: a configuration error on a daemon's first start is final at
//! once, and every ending is reported with the daemon's own last error line and, for a
//! signal, the signal's name.

use std::process::Command;
use std::time::{Duration, Instant};

use isola_ipc::supervisor::DaemonState;
use isola_tests::supervisor::{wait_until, Supervisor};
use isola_tests::{binary, scratch_dir};

fn isolactl_status(control: &std::path::Path) -> String {
    let out = Command::new(binary("isolactl"))
        .args(["--supervisor", control.to_str().unwrap(), "status"])
        .output()
        .expect("isolactl runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// isola-blk on an image that does not exist exits 2 on its first start: the daemon is
/// failed at once, with isola-blk's line as the reason, and never started again.
#[test]
fn a_configuration_error_on_the_first_start_fails_the_daemon_at_once() {
    let dir = scratch_dir("sup-config-error");
    let image = dir.join("missing.img");
    let control = dir.join("supervisor.sock");
    let started = Instant::now();
    let mut sup = Supervisor::start(
        &control,
        &[format!(
            "blk0:{}:{} --image {}",
            dir.join("blk0.sock").display(),
            binary("isola-blk").display(),
            image.display()
        )],
        &[],
    );
    let why = wait_until("blk0 failed", Duration::from_secs(10), || {
        match sup.daemon("blk0").state {
            DaemonState::Failed(why) => Some(why),
            _ => None,
        }
    });
    eprintln!("failed after {:?}: {why}", started.elapsed());
    assert!(why.contains("configuration error"), "{why}");
    assert!(why.contains("exited with status 2"), "{why}");
    assert!(
        why.contains("isola-blk: ") && why.contains("missing.img"),
        "isola-blk's own line: {why}"
    );
    // Not retried: no restart, and none happens later either.
    std::thread::sleep(Duration::from_millis(500));
    let d = sup.daemon("blk0");
    assert_eq!((d.restarts, d.pid), (0, None), "{d:?}");
    let lines = sup.stderr.drain(Duration::from_millis(100)).join("\n");
    assert!(!lines.contains("restarting in"), "{lines}");
    // isolactl shows the daemon's line.
    let text = isolactl_status(&control);
    assert!(
        text.contains("daemon blk0: pid -, failed (configuration error"),
        "{text}"
    );
    assert!(text.contains("missing.img"), "{text}");
    // Fixed by hand, it can be started again, and runs.
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let out = Command::new(binary("isolactl"))
        .args(["--supervisor", control.to_str().unwrap(), "restart", "blk0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_until("blk0 running", Duration::from_secs(10), || {
        (sup.daemon("blk0").state == DaemonState::Running).then_some(())
    });
    let _ = sup.child.kill();
}

/// A daemon whose program does not exist is refused at once, not retried.
#[test]
fn a_missing_daemon_program_is_refused_at_once() {
    let dir = scratch_dir("sup-missing-program");
    let control = dir.join("supervisor.sock");
    let sup = Supervisor::start(
        &control,
        &[format!(
            "ghost:{}:/nonexistent/isola-ghost --flag",
            dir.join("ghost.sock").display()
        )],
        &[],
    );
    let why = wait_until("ghost failed", Duration::from_secs(10), || {
        match sup.daemon("ghost").state {
            DaemonState::Failed(why) => Some(why),
            _ => None,
        }
    });
    assert!(why.contains("configuration error"), "{why}");
    assert!(
        why.contains("cannot start /nonexistent/isola-ghost"),
        "{why}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sup.daemon("ghost").restarts, 0);
}

/// With `--exit-on-config-error` (what isola-run uses) such a daemon ends the supervisor at
/// once: status 2, the daemon's line on stderr, the other daemons stopped, sockets removed.
#[test]
fn exit_on_config_error_stops_everything_at_once_with_the_daemons_line() {
    let dir = scratch_dir("sup-exit-on-config-error");
    let control = dir.join("supervisor.sock");
    let good = dir.join("good.sock");
    let started = Instant::now();
    let out = Command::new(binary("isola-supervisor"))
        .arg("--control")
        .arg(&control)
        .arg("--exit-on-config-error")
        .arg("--daemon")
        .arg(format!("good:{}:sleep 30", good.display()))
        .arg("--daemon")
        .arg(format!(
            "bad:{}:{} --image {}",
            dir.join("bad.sock").display(),
            binary("isola-blk").display(),
            dir.join("missing.img").display()
        ))
        .output()
        .expect("isola-supervisor runs");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("ended after {took:?}");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(took < Duration::from_secs(10), "took {took:?}\n{stderr}");
    assert!(
        stderr.contains("isola-blk: ") && stderr.contains("missing.img"),
        "{stderr}"
    );
    assert!(stderr.contains("configuration error"), "{stderr}");
    assert!(!good.exists() && !control.exists(), "sockets left");
    let left = isola_tests::supervisor::processes_mentioning(&good.display().to_string());
    assert!(left.is_empty(), "{left:?}");
}

/// The last exit reason names a signal by name, and carries the daemon's last error line.
#[test]
fn exit_reasons_name_the_signal_and_carry_the_daemons_last_error_line() {
    let dir = scratch_dir("sup-exit-reasons");
    let control = dir.join("supervisor.sock");
    let sup = Supervisor::start(
        &control,
        &[
            format!(
                "crash:{}:sh -c 'ulimit -c 0; echo \"crash: about to fall over\" >&2; kill -SEGV $$'",
                dir.join("crash.sock").display()
            ),
            format!(
                "fail:{}:sh -c 'echo \"fail: disk on fire\" >&2; echo \"fail[1]: INFO main: cleaning up\" >&2; exit 1'",
                dir.join("fail.sock").display()
            ),
        ],
        &["--restart-limit", "1"],
    );
    let reasons = wait_until("both given up on", Duration::from_secs(20), || {
        let crash = sup.daemon("crash");
        let fail = sup.daemon("fail");
        match (&crash.state, &fail.state) {
            (DaemonState::Failed(_), DaemonState::Failed(_)) => Some((crash, fail)),
            _ => None,
        }
    });
    let (crash, fail) = reasons;
    let crash_exit = crash.last_exit.clone().unwrap_or_default();
    assert!(crash_exit.starts_with("killed by SIGSEGV"), "{crash:?}");
    assert!(
        crash_exit.contains("crash: about to fall over"),
        "{crash:?}"
    );
    let fail_exit = fail.last_exit.clone().unwrap_or_default();
    assert!(
        fail_exit.starts_with("exited with status 1: fail: disk on fire"),
        "{fail:?}"
    );
    let text = isolactl_status(&control);
    assert!(
        text.contains("last exit: killed by SIGSEGV: crash: about to fall over"),
        "{text}"
    );
    assert!(
        text.contains(
            "failed (died 2 times within 60 s, last: exited with status 1: fail: disk on fire)"
        ),
        "{text}"
    );
}
