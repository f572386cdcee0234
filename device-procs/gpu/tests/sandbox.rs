//! The sandbox of the real `isola-gpu` process (needs `--features debug-forbidden`): each
//! forbidden syscall (execve, open of a host path, socket, fork), made from a device thread
//! once the sandbox is complete, kills the process with SIGSYS and the reaper names the
//! syscall; with `--seccomp log` the open goes through and finds no host path. (The /proc
//! checks while it serves a guest are in tests/tests/gpu.rs.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use isola_device_common::testing::process::{
    each_forbidden_syscall_kills, in_log_mode_the_open_finds_no_host_path,
};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("isola-gpu-sandbox-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

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
    let dir = scratch("sigsys");
    each_forbidden_syscall_kills(&dir, |args, log| start(&dir, log, args));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn in_log_mode_the_open_goes_through_and_finds_no_host_path() {
    let dir = scratch("logmode");
    in_log_mode_the_open_finds_no_host_path(&dir, |args, log| start(&dir, log, args));
    std::fs::remove_dir_all(&dir).unwrap();
}
