//! The sandbox of the real `isola-gpu` process (needs `--features debug-forbidden`): each
//! forbidden syscall (execve, open of a host path, socket, fork), made from a device thread
//! once the sandbox is complete, kills the process with SIGSYS and the reaper names the
//! syscall; with `--seccomp log` the open goes through and finds no host path. (The /proc
//! checks while it serves a guest are in tests/tests/gpu.rs.)

use isola_device_common::testing::Scratch;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use isola_device_common::testing::process::{
    each_forbidden_syscall_kills, in_log_mode_the_open_finds_no_host_path,
};

/// The device with its sockets, stderr to `log`, plus `args`.
fn start(dir: &Path, log: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_isola-gpu"))
        .arg("--socket")
        .arg(dir.join("gpu.sock"))
        .arg("--state-file")
        .arg(dir.join("gpu.state"))
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
    in_log_mode_the_open_finds_no_host_path(&dir, |args, log| start(&dir, log, args));
}
