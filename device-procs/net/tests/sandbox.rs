//! The sandbox of the real `isola-net` process (needs `--features debug-forbidden`): each
//! syscall it must never make (execve, open of a host path, socket — even though it keeps
//! the host's network namespace — and fork), made from a device thread once the sandbox is
//! complete, kills it with SIGSYS and the reaper's log line names the syscall; with
//! `--seccomp log` the open goes through and finds no host path.

mod support;

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use isola_device_common::testing::process::{
    each_forbidden_syscall_kills, in_log_mode_the_open_finds_no_host_path,
};

use support::{in_netns, make_tap, open_tap, Scratch, TAP_FLAGS};

/// `isola-net --tap-fd 3` on a fresh queue of tap `sbx0` (as a launcher hands it over),
/// plus `args`.
fn start(dir: &Path) -> impl Fn(&[&str], &Path) -> Child + '_ {
    move |args, log| {
        let tap = open_tap("sbx0", TAP_FLAGS);
        let fd = tap.as_raw_fd();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_isola-net"));
        cmd.arg("--socket")
            .arg(dir.join("net.sock"))
            .args(["--tap-fd", "3"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap());
        // SAFETY: runs in the child between fork and exec and only calls fcntl and dup2
        // (async-signal-safe, no allocation) on `fd`, open in the parent until spawn
        // returns; the copy above 100 keeps dup2 from clobbering its source.
        unsafe {
            cmd.pre_exec(move || {
                let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                if high < 0 || libc::dup2(high, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(tap);
        child
    }
}

#[test]
fn forbidden_syscalls_kill_isola_net_with_sigsys() {
    in_netns(|| {
        make_tap("sbx0", false);
        let dir = Scratch::new("sigsys");
        each_forbidden_syscall_kills(&dir.0, start(&dir.0));
        in_log_mode_the_open_finds_no_host_path(&dir.0, start(&dir.0));
    });
}
