//! The sandbox of the real `isola-input` process (needs `--features debug-forbidden`):
//! each syscall it must never make (execve, open of a host path, socket, fork), made from a
//! device thread once the sandbox is complete, kills it with SIGSYS and the reaper's log line
//! names the syscall; with `--seccomp log` the open goes through and finds no host path.

use isola_device_common::testing::Scratch;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use isola_device_common::testing::process::{
    each_forbidden_syscall_kills, in_log_mode_the_open_finds_no_host_path,
};

/// `isola-input` with its three sockets, plus `args`.
fn start(dir: &Path) -> impl Fn(&[&str], &Path) -> Child + '_ {
    move |args, log| {
        Command::new(env!("CARGO_BIN_EXE_isola-input"))
            .arg("--keyboard-socket")
            .arg(dir.join("kbd.sock"))
            .arg("--tablet-socket")
            .arg(dir.join("tablet.sock"))
            .arg("--control-socket")
            .arg(dir.join("input.sock"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    }
}

#[test]
fn forbidden_syscalls_kill_isola_input_with_sigsys() {
    let dir = Scratch::new("sigsys");
    each_forbidden_syscall_kills(&dir, start(&dir));
    in_log_mode_the_open_finds_no_host_path(&dir, start(&dir));
}
