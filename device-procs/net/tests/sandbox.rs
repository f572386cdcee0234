//! The sandbox of the real `isola-net` process (needs `--features debug-forbidden`): each
//! syscall it must never make (execve, open of a host path, socket — even though it keeps
//! the host's network namespace — and fork), made from a device thread once the sandbox is
//! complete, kills it with SIGSYS and the reaper's log line names the syscall; with
//! `--seccomp log` the open goes through and finds no host path.

mod support;

use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

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

/// The syscalls the test hook makes (`--debug-forbidden-syscall`) and their numbers.
const FORBIDDEN: [(&str, libc::c_long); 4] = [
    ("execve", libc::SYS_execve),
    ("open", libc::SYS_openat),
    ("socket", libc::SYS_socket),
    ("fork", libc::SYS_clone),
];

/// Waits for `child` to end; its status.
fn wait_end(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the device process did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `log` contains `text`.
fn wait_log(log: &Path, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = std::fs::read_to_string(log).unwrap_or_default();
        if got.contains(text) {
            return got;
        }
        assert!(Instant::now() < deadline, "no {text:?} in\n{got}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs the device (`start` with the hook's arguments and a log file) once per forbidden
/// syscall: each kills it with SIGSYS and the reaper names the syscall.
fn each_forbidden_syscall_kills(dir: &Path, start: impl Fn(&[&str], &Path) -> Child) {
    for (call, nr) in FORBIDDEN {
        let log = dir.join(format!("stderr-{call}"));
        let mut child = start(&["--debug-forbidden-syscall", call], &log);
        let status = wait_end(&mut child);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(
            status.signal(),
            Some(libc::SIGSYS),
            "{call}: {status:?}\n{text}"
        );
        let line = format!("killed by seccomp: syscall={nr} ");
        assert!(text.contains(&line), "{call}: no '{line}' in\n{text}");
        assert!(text.contains("sandboxed: "), "{text}");
    }
}

/// With `--seccomp log` the open is let through and finds no host path (the empty root),
/// and the process goes on.
fn in_log_mode_the_open_finds_no_host_path(dir: &Path, start: impl Fn(&[&str], &Path) -> Child) {
    let log = dir.join("stderr-log-mode");
    let mut child = start(
        &["--seccomp", "log", "--debug-forbidden-syscall", "open"],
        &log,
    );
    let text = wait_log(&log, "forbidden syscall Open returned -1");
    assert!(text.contains("No such file or directory"), "{text}");
    assert!(child.try_wait().unwrap().is_none(), "it ended:\n{text}");
    let _ = child.kill();
    let _ = child.wait();
}
