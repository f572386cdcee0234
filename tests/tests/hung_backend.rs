//! A hung backend stalls nothing: isola-blk is SIGSTOPped at one exact step of the vhost-user
//! protocol (a proxy stops it when the core sends the chosen request), and meanwhile the
//! control socket answers status, pause and resume within a second (pause needs every vCPU
//! to acknowledge, so no vCPU is stuck), status shows the device `unresponsive` once it missed
//! the exchange deadline, and after SIGCONT, or SIGKILL and a new backend, the guest finishes
//! its verified I/O.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use isola_ipc::{ControlRequest, ControlResponse, DeviceLink};
use isola_tests::hang::{code, control_answers, control_within, signal_tree, StopAt};
use isola_tests::{guest, scratch_dir, Core, IsolaBlk};

const LIMIT: Duration = Duration::from_secs(1);
const BOOT: Duration = Duration::from_secs(60);

fn image(dir: &Path) -> PathBuf {
    let path = dir.join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(4096 * 512)
        .unwrap();
    path
}

#[derive(Clone, Copy, PartialEq)]
enum Recovery {
    Continue,
    Kill,
}

struct Setup {
    core: Core,
    control: PathBuf,
    backend: IsolaBlk,
    proxy: StopAt,
    blk: PathBuf,
    disk: PathBuf,
    _dir: isola_tests::ScratchDir,
}

/// isola-blk behind a proxy that stops it at the `nth` request `code`; the core runs the
/// virtio-blk guest with `cmdline` on the proxy's socket.
fn start(test: &str, code: u32, nth: u32, cmdline: &str, extra: &[&str]) -> Setup {
    let dir = scratch_dir(test);
    let disk = image(&dir);
    let blk = dir.join("blk.sock");
    let backend = IsolaBlk::start(&blk, &disk);
    let proxy = StopAt::start(&dir.join("proxy.sock"), &blk, backend.pid(), code, nth);
    let control = dir.join("control.sock");
    let kernel = guest("virtio-blk.elf");
    let device = format!("blk,socket={}", proxy.socket.display());
    let mut args = vec![
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--device",
        &device,
        "--control-socket",
        control.to_str().unwrap(),
        "--cmdline",
        cmdline,
    ];
    args.extend_from_slice(extra);
    let core = Core::start(&args);
    isola_tests::wait_for_path(&control, Duration::from_secs(20));
    Setup {
        core,
        control,
        backend,
        proxy,
        blk,
        disk,
        _dir: dir,
    }
}

/// The backend is stopped: control answers in time, again and again, and the device ends up
/// `unresponsive` (it missed the deadline) or reconnecting; the guest goes on where it does not
/// need the device: it prints `printed` (after `after`, if given) while the backend is still
/// stopped. Then `how` brings the backend back and the guest finishes.
fn stalled_then_recovered(mut s: Setup, how: Recovery, after: Option<&str>, printed: Option<&str>) {
    s.proxy.wait_stopped(BOOT);
    let t0 = Instant::now();
    let mut unresponsive = false;
    // Three seconds of a stopped backend: past the 1 s deadline, into the reconnect path.
    while t0.elapsed() < Duration::from_secs(3) {
        if let Some(report) = s.core.exit_report() {
            panic!("{report}");
        }
        let device = control_answers(&s.control, LIMIT);
        unresponsive |= matches!(device.link, DeviceLink::Unresponsive(_));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(unresponsive, "status never said unresponsive");
    if let Some(line) = after {
        s.core.wait_for(line, BOOT);
    }
    if let Some(line) = printed {
        // The vCPU that wrote the status, or read the configuration, runs on.
        s.core.wait_for(line, Duration::from_secs(20));
        let states = process_state(s.backend.pid());
        assert!(
            !states.is_empty() && states.chars().all(|c| c == 'T' || c == 't'),
            "the backend (reaper and device) was still stopped: {states}"
        );
    }
    s.recover(how);
    wait_connected(&mut s);
    s.finish_ok();
}

impl Setup {
    /// SIGCONT to the stopped backend, or SIGKILL and a new backend on the same socket.
    fn recover(&mut self, how: Recovery) {
        match how {
            Recovery::Continue => signal_tree(self.backend.pid(), libc::SIGCONT),
            Recovery::Kill => {
                let new = IsolaBlk::start(&self.blk, &self.disk);
                // Before the old one dies: the core's next message may be the one to stop at.
                self.proxy.set_pid(new.pid());
                let old = std::mem::replace(&mut self.backend, new);
                signal_tree(old.pid(), libc::SIGKILL);
                old.kill();
            }
        }
    }

    /// The guest finishes its verified I/O and powers off.
    fn finish_ok(self) {
        let done = self.core.finish(BOOT);
        done.assert_success();
        assert!(
            done.serial.iter().any(|l| l == "virtio-blk: ok"),
            "{:?}",
            done.serial
        );
    }
}

/// The state letters of `pid` and its process tree (`T` stopped, `t` stopped by its tracer).
fn process_state(pid: u32) -> String {
    isola_tests::hang::process_tree(pid)
        .iter()
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let after = stat.rsplit_once(')')?.1;
            after.split_whitespace().next().map(str::to_owned)
        })
        .collect()
}

/// Waits (20 s at most) for status to show the device connected again; on a timeout the core
/// is killed and everything it said is part of the failure.
fn wait_connected(s: &mut Setup) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if s.core.exit_report().is_some() {
            // The guest finished already (the caller checks how).
            return;
        }
        let answer = control_within(&s.control, &ControlRequest::Status, LIMIT);
        if let Ok(ControlResponse::Status(status)) = &answer {
            if status.devices.first().map(|d| &d.link) == Some(&DeviceLink::Connected) {
                return;
            }
        }
        if Instant::now() > deadline {
            // SAFETY: kill takes plain integers.
            unsafe { libc::kill(s.core.pid() as libc::pid_t, libc::SIGKILL) };
            std::thread::sleep(Duration::from_millis(200));
            panic!(
                "never connected again (last answer {answer:?}); {}",
                s.core.exit_report().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const NORMAL: &str = "virtio-blk.mode=normal virtio-blk.sectors=64";
/// What the guest prints once it started the device (DRIVER_OK) and read its capacity.
const CAPACITY: &str = "virtio-blk: capacity=";
const RESETTING: &str = "virtio-blk: resetting the device";

#[test]
fn a_backend_stopped_at_activation_stalls_no_vcpu() {
    // SET_FEATURES is the first message of activation (DRIVER_OK).
    let s = start("hung-activation", code::SET_FEATURES, 1, NORMAL, &[]);
    stalled_then_recovered(s, Recovery::Continue, None, Some(CAPACITY));
}

#[test]
fn a_backend_stopped_at_activation_and_killed_is_replaced() {
    let s = start("hung-activation-kill", code::SET_FEATURES, 1, NORMAL, &[]);
    stalled_then_recovered(s, Recovery::Kill, None, Some(CAPACITY));
}

#[test]
fn a_backend_stopped_during_a_config_read_stalls_no_vcpu() {
    // The first GET_CONFIG is the core's at start; the second refreshes the configuration
    // the guest reads after its first reset.
    let s = start("hung-config", code::GET_CONFIG, 2, NORMAL, &[]);
    stalled_then_recovered(s, Recovery::Continue, None, Some(CAPACITY));
}

#[test]
fn a_backend_stopped_during_a_config_read_and_killed_is_replaced() {
    let s = start("hung-config-kill", code::GET_CONFIG, 2, NORMAL, &[]);
    stalled_then_recovered(s, Recovery::Kill, None, Some(CAPACITY));
}

#[test]
fn a_backend_stopped_during_a_reset_stalls_no_vcpu() {
    // The guest resets the running device (virtio-blk.reset=1): the core stops its queues.
    let cmdline = format!("{NORMAL} virtio-blk.reset=1");
    let s = start("hung-reset", code::GET_VRING_BASE, 1, &cmdline, &[]);
    stalled_then_recovered(s, Recovery::Kill, Some(RESETTING), Some(CAPACITY));
}

#[test]
fn a_backend_stopped_during_a_reset_and_continued_recovers() {
    let cmdline = format!("{NORMAL} virtio-blk.reset=1");
    let s = start("hung-reset-cont", code::GET_VRING_BASE, 1, &cmdline, &[]);
    stalled_then_recovered(s, Recovery::Continue, Some(RESETTING), Some(CAPACITY));
}

/// The backend stops at the core's first message: the core answers `starting` meanwhile and
/// carries on once `how` brought a backend back.
fn stopped_at_start(test: &str, how: Recovery) {
    let mut s = start(
        test,
        code::SET_OWNER,
        1,
        NORMAL,
        &["--device-timeout", "30"],
    );
    s.proxy.wait_stopped(BOOT);
    // The core is starting: it answers (an error saying what it waits for) in time.
    for _ in 0..10 {
        let t0 = Instant::now();
        let answer = control_within(&s.control, &ControlRequest::Status, LIMIT)
            .unwrap_or_else(|e| panic!("status while starting: {e}"));
        assert!(t0.elapsed() < LIMIT);
        match answer {
            ControlResponse::Error(why) => assert!(why.contains("waiting"), "{why}"),
            other => panic!("status while starting: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    s.recover(how);
    s.finish_ok();
}

#[test]
fn a_backend_stopped_before_the_handshake_at_start_is_waited_for() {
    stopped_at_start("hung-start", Recovery::Continue);
}

#[test]
fn a_backend_stopped_before_the_handshake_at_start_and_killed_is_replaced() {
    stopped_at_start("hung-start-kill", Recovery::Kill);
}

#[test]
fn a_backend_stopped_during_a_reconnect_stalls_nothing() {
    // The second SET_OWNER is the first of a reconnect.
    let cmdline = "virtio-blk.mode=loop virtio-blk.seconds=8 virtio-blk.sectors=64";
    let s = start("hung-reconnect", code::SET_OWNER, 2, cmdline, &[]);
    stalled_in_reconnect(s, Recovery::Continue);
}

/// The guest's I/O runs; its backend is killed and a new one started, which stops at the
/// reconnect's first message.
fn stalled_in_reconnect(mut s: Setup, how: Recovery) {
    s.core
        .wait_for("virtio-blk: loop cycles=", Duration::from_secs(30));
    s.recover(Recovery::Kill);
    stalled_then_recovered(s, how, None, None);
}

#[test]
fn a_backend_stopped_during_a_reconnect_and_killed_is_replaced() {
    let cmdline = "virtio-blk.mode=loop virtio-blk.seconds=8 virtio-blk.sectors=64";
    let s = start("hung-reconnect-kill", code::SET_OWNER, 2, cmdline, &[]);
    stalled_in_reconnect(s, Recovery::Kill);
}
