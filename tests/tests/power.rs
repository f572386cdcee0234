//! The ACPI power button and graceful shutdown, end to end: the `power` guest takes the GED's
//! interrupt and answers (or ignores) the button; `isolactl shutdown`, `isolactl power-button`
//! and the API's `POST /vm/shutdown` and `POST /vm/power-button` drive it.

use std::path::Path;
use std::time::Duration;

use isola_tests::api::{curl, post_json, EventReader};
use isola_tests::supervisor::{isolactl, Launch};
use isola_tests::{guest, scratch_dir, wait_for_path, Core};

const TIMEOUT: Duration = Duration::from_secs(60);

/// The `power` guest in `mode` under a bare core with a control socket in `dir`.
fn start_power_guest(dir: &Path, mode: &str) -> (Core, std::path::PathBuf) {
    let socket = dir.join("control.sock");
    let kernel = guest("power.elf");
    let mut core = Core::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "32",
        "--cmdline",
        &format!("power.mode={mode}"),
        "--control-socket",
        socket.to_str().unwrap(),
    ]);
    core.wait_for("power: ready", TIMEOUT);
    wait_for_path(&socket, TIMEOUT);
    (core, socket)
}

#[test]
fn isolactl_shutdown_is_graceful_when_the_guest_answers_the_button() {
    let dir = scratch_dir("power-graceful");
    let (core, socket) = start_power_guest(&dir, "answer");
    // A generous grace period: the guest answers at once, so the test does not wait for it.
    let (ok, text) = isolactl(&[
        "--socket",
        socket.to_str().unwrap(),
        "shutdown",
        "--timeout",
        "60",
    ]);
    assert!(ok, "isolactl shutdown: {text}");
    assert!(
        text.starts_with("graceful: the guest powered off"),
        "isolactl says how the VM ended: {text}"
    );
    let end = core.finish(TIMEOUT);
    end.assert_success();
    assert!(
        end.serial
            .iter()
            .any(|l| l == "power: button pressed count=1 irqs=1")
            && end.serial.iter().any(|l| l == "power: powering off"),
        "the guest took the GED interrupt and powered off: {:?}",
        end.serial
    );
    assert!(
        end.stderr.contains("shut down gracefully"),
        "{}",
        end.stderr
    );
}

#[test]
fn isolactl_shutdown_stops_a_guest_that_ignores_the_button_after_the_timeout() {
    let dir = scratch_dir("power-ignored");
    let (mut core, socket) = start_power_guest(&dir, "ignore");
    let socket = socket.to_str().unwrap();
    // The button alone does not end a guest that ignores it.
    let (ok, text) = isolactl(&["--socket", socket, "power-button"]);
    assert!(ok, "isolactl power-button: {text}");
    core.wait_for("power: button pressed count=1", TIMEOUT);
    let started = std::time::Instant::now();
    let (ok, text) = isolactl(&["--socket", socket, "shutdown", "--timeout", "1.5"]);
    let took = started.elapsed();
    assert!(ok, "isolactl shutdown: {text}");
    assert!(
        text.starts_with("hard: the guest did not power off within 1.500 s"),
        "{text}"
    );
    assert!(
        took >= Duration::from_millis(1500),
        "stopped hard before the grace period ran out ({took:?})"
    );
    let end = core.finish(TIMEOUT);
    end.assert_success();
    assert!(
        end.serial
            .iter()
            .any(|l| l.starts_with("power: button pressed count=2")),
        "the shutdown pressed the button too: {:?}",
        end.serial
    );
    assert!(!end.serial.iter().any(|l| l.contains("powering off")));
    assert!(end.stderr.contains("shut down hard"), "{}", end.stderr);
}

#[test]
fn isolactl_power_button_powers_off_an_answering_guest_and_hard_stops_at_once() {
    let dir = scratch_dir("power-button");
    let (core, socket) = start_power_guest(&dir, "answer");
    let (ok, text) = isolactl(&["--socket", socket.to_str().unwrap(), "power-button"]);
    assert!(ok, "isolactl power-button: {text}");
    let end = core.finish(TIMEOUT);
    end.assert_success();
    assert!(
        !end.stderr.contains("shut down"),
        "a guest poweroff: {}",
        end.stderr
    );
    assert!(end.serial.iter().any(|l| l == "power: powering off"));

    // --hard stops at once, without the button.
    let dir = scratch_dir("power-hard");
    let (core, socket) = start_power_guest(&dir, "answer");
    let (ok, text) = isolactl(&["--socket", socket.to_str().unwrap(), "shutdown", "--hard"]);
    assert!(ok, "isolactl shutdown --hard: {text}");
    assert!(text.starts_with("hard: stopped at once"), "{text}");
    let end = core.finish(TIMEOUT);
    end.assert_success();
    assert!(!end.serial.iter().any(|l| l.contains("button pressed")));
}

fn launch_power_guest(run_dir: &Path, mode: &str) -> Launch {
    let kernel = guest("power.elf");
    let cmdline = format!("power.mode={mode}");
    let launch = Launch::running(
        run_dir,
        &["--kernel", kernel.to_str().unwrap(), "--cmdline", &cmdline],
        "power: ready",
    );
    wait_for_path(&run_dir.join("api.sock"), TIMEOUT);
    launch
}

#[test]
fn the_api_shuts_down_gracefully_or_hard_and_says_which() {
    let scratch = scratch_dir("power-api");
    // A guest that answers: graceful, in the answer, the exit and the events.
    let run_dir = scratch.join("answer");
    let mut launch = launch_power_guest(&run_dir, "answer");
    let api = run_dir.join("api.sock");
    let mut events = EventReader::start(&api);
    let bad = post_json(
        &api,
        "/vm/shutdown",
        r#"{"force": true, "timeout_seconds": 1}"#,
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    let bad = post_json(&api, "/vm/shutdown", r#"{"timeout_seconds": 0}"#);
    assert_eq!(bad.status, 400, "{}", bad.body);
    let down = post_json(&api, "/vm/shutdown", r#"{"timeout_seconds": 15}"#);
    assert_eq!(down.status, 200, "{}", down.body);
    let vm = down.json();
    assert_eq!(vm["state"], "stopped", "{vm}");
    assert_eq!(vm["exit"]["reason"], "shutdown", "{vm}");
    assert!(
        vm["exit"]["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("graceful: the guest powered off")),
        "{vm}"
    );
    let seen = events.until("vm_ended", TIMEOUT);
    let shutdown = seen
        .iter()
        .find(|e| e["event"] == "vm_shutdown")
        .unwrap_or_else(|| panic!("no vm_shutdown event: {seen:?}"));
    assert!(
        shutdown["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("graceful:")),
        "{shutdown}"
    );
    let status = launch.finish(TIMEOUT);
    assert!(
        status.success(),
        "isola-run: {status:?}\n{}",
        launch.report()
    );

    // A guest that ignores the button: pressed through the API, then a hard stop after the
    // grace period.
    let run_dir = scratch.join("ignore");
    let mut launch = launch_power_guest(&run_dir, "ignore");
    let api = run_dir.join("api.sock");
    let pressed = curl(&api, &["-X", "POST"], "/vm/power-button");
    assert_eq!(pressed.status, 200, "{}", pressed.body);
    assert_eq!(pressed.json()["state"], "running", "{}", pressed.body);
    assert!(
        launch
            .stdout
            .wait_for("power: button pressed count=1", TIMEOUT)
            .is_some(),
        "{}",
        launch.report()
    );
    let down = post_json(&api, "/vm/shutdown", r#"{"timeout_seconds": 1}"#);
    assert_eq!(down.status, 200, "{}", down.body);
    let vm = down.json();
    assert!(
        vm["exit"]["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("hard: the guest did not power off within 1.000 s")),
        "{vm}"
    );
    let status = launch.finish(TIMEOUT);
    assert!(
        status.success(),
        "isola-run: {status:?}\n{}",
        launch.report()
    );
}

/// `--on-reset restart`: a guest that resets (the `boot-check` guest pulses the i8042 reset
/// line every boot) comes back and runs again, with the same device daemon (a console),
/// which serves the new core; the API's event stream says so and goes on.
#[test]
fn a_guest_reset_restarts_the_vm_in_place_with_on_reset_restart() {
    let scratch = scratch_dir("power-on-reset");
    let run_dir = scratch.join("run");
    let kernel = guest("boot-check.elf");
    let mut launch = Launch::start(
        &run_dir,
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "boot-check.end=reset",
            "--on-reset",
            "restart",
            "--console",
        ],
    );
    wait_for_path(&run_dir.join("api.sock"), TIMEOUT);
    let mut events = EventReader::start(&run_dir.join("api.sock"));
    let console_pid = |launch: &Launch| {
        isola_tests::supervisor::supervisor_status(&launch.supervisor_socket())
            .into_iter()
            .find(|d| d.name == "console")
            .and_then(|d| d.pid)
    };
    // Three boots that each end in a reset: the VM came back at least twice.
    for boot in 1..=3 {
        for line in ["boot-check: ok", "boot-check: resetting"] {
            assert!(
                launch.stdout.wait_for(line, TIMEOUT).is_some(),
                "boot {boot}: no {line:?}\n{}",
                launch.report()
            );
        }
    }
    let first = console_pid(&launch).expect("the console daemon runs");
    for n in 1..=2 {
        let seen = events.until("guest_reset", TIMEOUT);
        let reset = seen.last().expect("the event");
        assert_eq!(
            reset["reason"],
            format!("the VM restarts in place (restart {n})"),
            "{seen:?}"
        );
        assert!(
            !seen.iter().any(|e| e["event"] == "vm_ended"),
            "the VM did not end: {seen:?}"
        );
    }
    // One more boot, served by the same console daemon, never restarted.
    assert!(launch.stdout.wait_for("boot-check: ok", TIMEOUT).is_some());
    assert_eq!(console_pid(&launch), Some(first), "the same console daemon");
    let console = isola_tests::supervisor::supervisor_status(&launch.supervisor_socket())
        .into_iter()
        .find(|d| d.name == "console")
        .expect("console");
    assert_eq!(console.restarts, 0, "{console:?}");
    // SIGTERM ends it all, as for any VM.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(launch.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    launch.finish(TIMEOUT);
}
