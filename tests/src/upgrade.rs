//! `isolactl upgrade` of a device daemon under a running guest: one upgrade, awaited until
//! the new instance runs and the core is connected to it again.

use std::path::Path;
use std::time::{Duration, Instant};

use isola_ipc::supervisor::DaemonState;
use isola_ipc::{ControlRequest, ControlResponse, DeviceLink};

use crate::supervisor::{isolactl, supervisor_status, wait_until};

/// The core's link to the device on `socket` and its reconnect count.
pub fn link(control: &Path, socket: &Path) -> (DeviceLink, u32) {
    match crate::control(control, &ControlRequest::Status) {
        ControlResponse::Status(status) => status
            .devices
            .into_iter()
            .find(|d| Path::new(&d.socket) == socket)
            .map(|d| (d.link, d.reconnects))
            .unwrap_or_else(|| panic!("no device on {}", socket.display())),
        other => panic!("status answered {other:?}"),
    }
}

/// One `isolactl --run-dir RUN_DIR upgrade NAME [--binary BINARY]` of the daemon serving
/// `socket`; returns once a new instance runs and the core is connected to it again, with the
/// time that took as seen from here (request to reconnected) and the new pid.
pub fn upgrade_once(
    run_dir: &Path,
    name: &str,
    socket: &Path,
    binary: Option<&Path>,
) -> (Duration, u32) {
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
    wait_until("the core reconnected", Duration::from_secs(30), || {
        let (link, count) = link(&control, socket);
        (link == DeviceLink::Connected && count > reconnects).then_some(())
    });
    (t0.elapsed(), pid)
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
