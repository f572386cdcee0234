//! Checks of a sandboxed device process from the outside, through /proc: the pid a
//! supervisor started (the reaper) and its one child (the device, pid 1 of its own pid
//! namespace).

use std::os::unix::fs::MetadataExt;

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

/// The device process: the reaper's only child.
pub fn device_pid(reaper: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{reaper}/task/{reaper}/children"))
        .unwrap_or_default();
    let pids: Vec<u32> = children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert_eq!(pids.len(), 1, "the reaper has one child: {children:?}");
    pids[0]
}

/// Panics unless `pid` runs under a seccomp filter with no_new_privs, no capabilities, an
/// unprivileged uid (when the test runs as root), namespaces other than the test's, and an
/// empty root that is not the host's.
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

/// The children of `pid` (a reaper's: its device, and any helper it forked before the
/// sandbox, such as isola-display's input connector).
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Whether `pid` is pid 1 of a pid namespace of its own (a sandboxed device process).
pub fn is_namespace_init(pid: u32) -> bool {
    let nspid = status_field(pid, "NSpid");
    let ids: Vec<&str> = nspid.split_whitespace().collect();
    ids.len() > 1 && ids.last() == Some(&"1")
}
