//! The sandbox of the real `isola-console` process (needs `--features debug-forbidden`):
//! each syscall it must never make (execve, open of a host path, socket, fork), made from a
//! device thread once the sandbox is complete, kills it with SIGSYS and the reaper's log line
//! names the syscall; with `--seccomp log` the open goes through and finds no host path.

use isola_device_common::testing::Scratch;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use isola_device_common::testing::process::{
    each_forbidden_syscall_kills, in_log_mode_the_open_finds_no_host_path,
};

/// `isola-console` with a socket port, a log and a pty port (everything it opens before
/// the sandbox), plus `args`.
fn start(dir: &Path) -> impl Fn(&[&str], &Path) -> Child + '_ {
    move |args, log| {
        let user = dir.join("user.sock");
        let port_log = dir.join("port.log");
        Command::new(env!("CARGO_BIN_EXE_isola-console"))
            .arg("--socket")
            .arg(dir.join("vu.sock"))
            .arg("--port")
            .arg(format!(
                "socket={},log={}",
                user.display(),
                port_log.display()
            ))
            .args(["--port", "pty"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    }
}

#[test]
fn forbidden_syscalls_kill_isola_console_with_sigsys() {
    let dir = Scratch::new("sigsys");
    each_forbidden_syscall_kills(&dir, start(&dir));
    in_log_mode_the_open_finds_no_host_path(&dir, start(&dir));
}
