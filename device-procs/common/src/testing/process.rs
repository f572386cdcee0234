//! Helpers for the integration tests of a real, sandboxed device process (`tests/sandbox.rs`
//! of each device crate): waiting for it, reading /proc about it, checking that it is
//! sandboxed, and the forbidden-syscall checks of the `debug-forbidden` test hook. Each
//! device keeps its own way of starting itself. Test code: failures panic.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// How long a test waits for a device process to do something.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Waits for `child` to end; its status. `what` names it in the panic message.
pub fn wait_end(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "{what} did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `log` contains `text`; the log's text.
pub fn wait_log(log: &Path, text: &str) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let got = std::fs::read_to_string(log).unwrap_or_default();
        if got.contains(text) {
            return got;
        }
        assert!(Instant::now() < deadline, "no {text:?} in\n{got}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` is gone (or a zombie nobody has reaped yet).
pub fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// The value of `key:` in /proc/PID/status.
pub fn status_field(pid: u32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// Asserts that `pid` runs under the sandbox: a seccomp filter, no new privileges, no
/// capabilities, user nobody (when the test runs as root), namespaces other than the calling
/// thread's, and an empty root of its own. `what` names it in the panic messages.
pub fn assert_sandboxed(pid: u32, what: &str) {
    check_sandboxed(pid, what, false);
}

/// [`assert_sandboxed`] for `isola-net`, which keeps its launcher's network namespace: the
/// calling thread's (the network tests run in a namespace of their own); every other
/// namespace must still differ.
pub fn assert_sandboxed_on_host_network(pid: u32, what: &str) {
    check_sandboxed(pid, what, true);
}

fn check_sandboxed(pid: u32, what: &str, host_network: bool) {
    assert_eq!(
        status_field(pid, "Seccomp"),
        "2",
        "{what}: seccomp filter mode"
    );
    assert_eq!(status_field(pid, "NoNewPrivs"), "1", "{what}");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            status_field(pid, caps),
            "0000000000000000",
            "{what}: {caps}"
        );
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let uid = status_field(pid, "Uid");
        assert!(
            uid.split_whitespace().all(|u| u == "65534"),
            "{what}: Uid {uid}"
        );
    }
    for ns in ["user", "mnt", "ipc", "uts", "net"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/thread-self/ns/{ns}")).unwrap();
        if ns == "net" && host_network {
            assert_eq!(
                theirs, ours,
                "{what}: keeps its launcher's network namespace"
            );
        } else {
            assert_ne!(theirs, ours, "{what}: {ns} namespace");
        }
    }
    // Its root is not the host's, and holds nothing.
    let root = std::fs::metadata(format!("/proc/{pid}/root/")).unwrap();
    let host = std::fs::metadata("/").unwrap();
    assert_ne!(
        (root.dev(), root.ino()),
        (host.dev(), host.ino()),
        "{what}: its root is the host's"
    );
    let entries = std::fs::read_dir(format!("/proc/{pid}/root/"))
        .unwrap()
        .count();
    assert_eq!(entries, 0, "{what}: its root is not empty");
}

/// The device process: the reaper's only child.
pub fn device_pid(reaper: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{reaper}/task/{reaper}/children"))
        .unwrap_or_default();
    let pids: Vec<u32> = children
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 1, "the reaper has one child: {children:?}");
    pids[0]
}

/// The syscalls the test hook makes (`--debug-forbidden-syscall`) and their numbers.
pub const FORBIDDEN: [(&str, libc::c_long); 4] = [
    ("execve", libc::SYS_execve),
    ("open", libc::SYS_openat),
    ("socket", libc::SYS_socket),
    ("fork", libc::SYS_clone),
];

/// Runs the device (`start` with the hook's arguments and a log file) once per forbidden
/// syscall: each kills it with SIGSYS and the reaper names the syscall.
pub fn each_forbidden_syscall_kills(dir: &Path, start: impl Fn(&[&str], &Path) -> Child) {
    for (call, nr) in FORBIDDEN {
        let log = dir.join(format!("stderr-{call}"));
        let mut child = start(&["--debug-forbidden-syscall", call], &log);
        let status = wait_end(&mut child, "the device process");
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
pub fn in_log_mode_the_open_finds_no_host_path(
    dir: &Path,
    start: impl Fn(&[&str], &Path) -> Child,
) {
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
