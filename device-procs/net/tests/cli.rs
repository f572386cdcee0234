//! Bad command lines: one line on stderr, exit status 2, no socket left behind.

mod support;

use std::process::Command;

use support::*;

fn refused(args: &[&str], fds: Vec<std::os::fd::OwnedFd>, needle: &str) {
    let dir = Scratch::new("cli");
    let socket = dir.path("net.sock");
    let log = dir.path("net.log");
    let mut proc = NetProc::spawn(&socket, log, args, fds);
    let deadline = std::time::Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = proc.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{args:?}: still running"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let text = proc.log_text();
    assert_eq!(status.code(), Some(2), "{args:?}: {text}");
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains(needle), "{args:?}: {text}");
    assert!(!socket.exists(), "socket left behind");
}

#[test]
fn bad_command_lines_are_refused() {
    in_netns(|| {
        make_tap("tap0", false);
        refused(
            &["--tap", "nosuchtap"],
            vec![],
            "no network device 'nosuchtap'",
        );
        refused(
            &["--tap", "a-name-that-is-too-long"],
            vec![],
            "longer than 15 bytes",
        );
        refused(
            &["--tap-fd", "3"],
            vec![],
            "--tap-fd 3 is not an open file descriptor",
        );
        let not_tap = std::fs::File::open("/dev/null").unwrap();
        refused(
            &["--tap-fd", "3"],
            vec![not_tap.into()],
            "is not a tap device",
        );
        let no_hdr = open_tap("tap0", libc::IFF_TAP | libc::IFF_NO_PI);
        refused(&["--tap-fd", "3"], vec![no_hdr], "without IFF_VNET_HDR");
        refused(
            &["--tap", "tap0", "--mac", "01:00:00:00:00:01"],
            vec![],
            "multicast",
        );
        refused(
            &["--tap", "tap0", "--mac", "02:00:00:00:00"],
            vec![],
            "--mac",
        );
        refused(&["--tap", "tap0", "--mtu", "20"], vec![], "--mtu 20");
        refused(
            &["--tap", "tap0", "--queue-pairs", "0"],
            vec![],
            "--queue-pairs 0",
        );
        refused(
            &["--tap", "tap0", "--queue-size", "100"],
            vec![],
            "--queue-size 100",
        );
        refused(
            &["--tap", "tap0", "--tap-fd", "3"],
            vec![],
            "cannot be used with",
        );
        refused(
            &["--tap", "tap0", "--queue-pairs", "2"],
            vec![],
            "cannot attach",
        );
    });
}

#[test]
fn help_exits_zero() {
    let out = Command::new(env!("CARGO_BIN_EXE_isola-net"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--tap-fd"));
}
