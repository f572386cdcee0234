//! The sandbox of the real `isola-display` process (needs `--features debug-forbidden`): each
//! forbidden syscall (execve, open of a host path, socket, fork), made from a device thread
//! once the sandbox is complete, kills the process with SIGSYS and the reaper names the
//! syscall; with `--seccomp log` the open goes through and finds no host path, and the
//! input connector (`--input`) ends with the process. (The /proc checks while it serves a
//! guest are in tests/tests/display.rs.)

use isola_device_common::testing::Scratch;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use isola_device_common::testing::process::{
    each_forbidden_syscall_kills, gone, wait_log, TIMEOUT,
};

/// The device with its sockets, stderr to `log`, plus `args`.
fn start(dir: &Path, log: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_isola-display"))
        .arg("--socket")
        .arg(dir.join("display.sock"))
        .arg("--input")
        .arg(dir.join("input.sock"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

#[test]
fn forbidden_syscalls_kill_with_sigsys_and_the_number_is_logged() {
    let dir = Scratch::new("sigsys");
    each_forbidden_syscall_kills(&dir, |args, log| start(&dir, log, args));
}

#[test]
fn in_log_mode_the_open_goes_through_and_finds_no_host_path() {
    let dir = Scratch::new("logmode");
    let log = dir.join("stderr");
    let mut child = start(
        &dir,
        &log,
        &["--seccomp", "log", "--debug-forbidden-syscall", "open"],
    );
    let text = wait_log(&log, "forbidden syscall Open returned -1");
    assert!(text.contains("No such file or directory"), "{text}");
    assert!(child.try_wait().unwrap().is_none(), "still serving");
    // The reaper's children: the device and the input connector.
    let reaper = child.id();
    let children =
        std::fs::read_to_string(format!("/proc/{reaper}/task/{reaper}/children")).unwrap();
    let pids: Vec<u32> = children
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "device and connector: {children:?}");
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + TIMEOUT;
    for pid in pids {
        while !gone(pid) {
            assert!(Instant::now() < deadline, "{pid} outlived the reaper");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
