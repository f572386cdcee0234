//! The sandbox of the real `isola-input` process (needs `--features debug-forbidden`):
//! each syscall it must never make (execve, open of a host path, socket, fork), made from a
//! device thread once the sandbox is complete, kills it with SIGSYS and the reaper's log line
//! names the syscall; with `--seccomp log` the open goes through and finds no host path.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("isola-input-sbx-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

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
    let dir = scratch("sigsys");
    each_forbidden_syscall_kills(&dir, start(&dir));
    in_log_mode_the_open_finds_no_host_path(&dir, start(&dir));
    let _ = std::fs::remove_dir_all(&dir);
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
