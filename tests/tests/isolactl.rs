//! `isolactl` as a script uses it (issue 15, item 4): `--run-dir` for every command, the
//! console included, with or without device daemons; no panic when stdout or stderr is a
//! closed pipe, for any command; a default deadline on every command, the console's connect
//! included; help on every argument, with the key names for `key`.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use isola_tests::{binary, guest, scratch_dir, wait_for_path, Core};

/// (exit code, stdout, stderr, time taken) of `isolactl ARGS` with stdin empty.
fn isolactl(args: &[&str]) -> (Option<i32>, String, String, Duration) {
    let t0 = Instant::now();
    let out = Command::new(binary("isolactl"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("isolactl runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t0.elapsed(),
    )
}

/// A core with the `msi` guest (waits for interrupts for ever), its control socket in `dir`,
/// and no device: a VM without device daemons, as `isola-run --kernel K` with no device
/// starts it.
fn core_without_daemons(dir: &Path) -> Core {
    let socket = dir.join("control.sock");
    let kernel = guest("msi.elf");
    let mut core = Core::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "32",
        "--control-socket",
        socket.to_str().unwrap(),
    ]);
    core.wait_for("msi: ready", Duration::from_secs(30));
    wait_for_path(&socket, Duration::from_secs(30));
    core
}

#[test]
fn run_dir_works_for_a_vm_without_device_daemons() {
    let dir = scratch_dir("isolactl-no-daemons");
    let _core = core_without_daemons(&dir);
    let d = dir.to_str().unwrap();
    // status: the core's view, and nothing about a supervisor this VM never had.
    let (code, out, err, _) = isolactl(&["--run-dir", d, "status"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("vcpu0: running"), "{out}");
    assert!(
        err.is_empty(),
        "a VM without daemons is not an error: {err}"
    );
    for cmd in ["pause", "resume"] {
        let (code, out, err, _) = isolactl(&["--run-dir", d, cmd]);
        assert_eq!(code, Some(0), "{cmd}: {out}{err}");
    }
    // Commands for daemons this VM does not have: one line that says so.
    for (args, words) in [
        (&["restart", "blk0"][..], "no device daemons"),
        (&["key", "a"][..], "no input device"),
        (&["input-status"][..], "no input device"),
        (&["screenshot", "/dev/null"][..], "no display"),
        (&["console"][..], "no console"),
    ] {
        let mut all = vec!["--run-dir", d];
        all.extend_from_slice(args);
        let (code, out, err, took) = isolactl(&all);
        assert_eq!(code, Some(1), "{args:?}: {out}{err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
        assert!(err.contains(words), "{args:?}: no '{words}' in {err}");
        assert!(took < Duration::from_secs(4), "{args:?} took {took:?}");
    }
}

/// A stand-in console port: accepts one client, says hello, reads what it sends, hangs up.
fn port(path: &Path, hello: &'static str) -> std::thread::JoinHandle<Vec<u8>> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(hello.as_bytes()).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    })
}

/// `isolactl ARGS` attached to a stand-in port at `socket`: reads its hello, types, detaches
/// with the end of stdin. What the port received.
fn attach(args: &[&str], socket: &Path, hello: &'static str) -> Vec<u8> {
    let server = port(socket, hello);
    let mut child = Command::new(binary("isolactl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = vec![0u8; hello.len()];
    child.stdout.take().unwrap().read_exact(&mut seen).unwrap();
    assert_eq!(seen, hello.as_bytes(), "{args:?}");
    child.stdin.take().unwrap().write_all(b"typed").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {stderr}");
    let name = socket.file_name().unwrap().to_str().unwrap();
    assert!(stderr.contains(name), "{args:?}: {stderr}");
    server.join().unwrap()
}

#[test]
fn console_takes_the_run_dir_and_a_port() {
    let dir = scratch_dir("isolactl-console");
    let d = dir.to_str().unwrap();
    for (args, socket, hello) in [
        (
            &["--run-dir", d, "console"][..],
            "console.sock",
            "port zero\n",
        ),
        (
            &["--run-dir", d, "console", "--port", "2"][..],
            "console-2.sock",
            "port two\n",
        ),
        (&["console", "--run-dir", d][..], "console.sock", "after\n"),
    ] {
        let got = attach(args, &dir.join(socket), hello);
        assert_eq!(got, b"typed", "{args:?}");
        std::fs::remove_file(dir.join(socket)).unwrap();
    }
    // An explicit path still works, and a path and --port together are refused.
    let path = dir.join("elsewhere.sock");
    assert_eq!(
        attach(&["console", path.to_str().unwrap()], &path, "there\n"),
        b"typed"
    );
    let (code, _, err, _) = isolactl(&["--run-dir", d, "console", "x.sock", "--port", "1"]);
    assert_eq!(code, Some(2), "{err}");
}

/// A listening socket whose backlog is full: a connect to it can neither succeed nor fail.
fn full_backlog(path: &Path) -> (std::os::fd::OwnedFd, Vec<std::os::unix::net::UnixStream>) {
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType};
    use nix::sys::socket::{connect, UnixAddr};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    let addr = UnixAddr::new(path).unwrap();
    bind(fd.as_raw_fd(), &addr).unwrap();
    listen(&fd, Backlog::new(0).unwrap()).unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        let c = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap();
        if connect(c.as_raw_fd(), &addr).is_ok() {
            held.push(std::os::unix::net::UnixStream::from(c));
        }
    }
    (fd, held)
}

/// Every command that talks to a socket gives up by itself (5 s by default) on a peer that
/// never accepts or never answers, and says which.
#[test]
fn every_command_has_a_default_deadline() {
    let dir = scratch_dir("isolactl-deadline");
    // Sockets that accept (into the backlog) and never answer.
    let mut silent = Vec::new();
    for name in [
        "control.sock",
        "supervisor.sock",
        "input-control.sock",
        "display-control.sock",
    ] {
        silent.push(UnixListener::bind(dir.join(name)).unwrap());
    }
    // The console's socket cannot even be connected to.
    let _console = full_backlog(&dir.join("console.sock"));
    let d = dir.to_str().unwrap();
    let shot = dir.join("shot.png");
    let cases: [&[&str]; 12] = [
        &["status"][..],
        &["pause"],
        &["resume"],
        &["shutdown"],
        &["inject-msi", "--data", "1"],
        &["restart", "blk0"],
        &["key", "a"],
        &["type", "a"],
        &["pointer", "1", "1"],
        &["input-status"],
        &["screenshot", shot.to_str().unwrap()],
        &["console"],
    ];
    // All at once: each waits its own deadline.
    let runs: Vec<_> = cases
        .iter()
        .map(|args| {
            let mut all: Vec<String> = vec!["--run-dir".into(), d.to_owned()];
            all.extend(args.iter().map(|a| a.to_string()));
            std::thread::spawn(move || {
                let all: Vec<&str> = all.iter().map(String::as_str).collect();
                isolactl(&all)
            })
        })
        .collect();
    for (args, run) in cases.iter().zip(runs) {
        let (code, out, err, took) = run.join().unwrap();
        eprintln!("{args:?}: {took:?}: {}", err.trim());
        assert_eq!(code, Some(1), "{args:?}: {out}{err}");
        assert!(
            err.contains("did not answer") || err.contains("did not accept"),
            "{args:?}: {err}"
        );
        assert!(
            took >= Duration::from_secs(4) && took < Duration::from_secs(30),
            "{args:?}: took {took:?}"
        );
    }
}

/// `isolactl ... | head -0`, for every command, with stdout and stderr both closed pipes:
/// the exit status says how the command went, never a panic (101) or an abort (134).
#[test]
fn no_command_panics_on_a_closed_pipe() {
    let dir = scratch_dir("isolactl-epipe-all");
    let _core = core_without_daemons(&dir);
    let d = dir.to_str().unwrap();
    let cases: &[&[&str]] = &[
        &["--run-dir", d, "status"],
        &["--run-dir", d, "pause"],
        &["--run-dir", d, "resume"],
        &["--run-dir", d, "restart", "blk0"],
        &["--run-dir", d, "key", "a"],
        &["--run-dir", d, "input-status"],
        &["--run-dir", d, "logs", "core"],
        &["--run-dir", d, "console"],
        &["--socket", "/nonexistent/control.sock", "status"],
        &["--run-dir", d, "nosuchcommand"],
        &["--help"],
        &["help", "key"],
        &["key", "--help"],
        &["--version"],
    ];
    for args in cases {
        let (out_r, out_w) = nix::unistd::pipe().unwrap();
        let (err_r, err_w) = nix::unistd::pipe().unwrap();
        drop(out_r);
        drop(err_r);
        let status = Command::new(binary("isolactl"))
            .args(*args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(err_w))
            .status()
            .expect("isolactl runs");
        let code = status.code();
        assert!(
            matches!(code, Some(0..=2)),
            "{args:?}: ended with {status:?} (101 is a panic)"
        );
    }
}

/// Every argument and option of every command has a help line, and `key --help` lists the
/// key names.
#[test]
fn every_argument_has_help_and_key_lists_the_key_names() {
    let (code, top, err, _) = isolactl(&["--help"]);
    assert_eq!(code, Some(0), "{err}");
    let commands: Vec<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect();
    assert!(commands.len() >= 10, "{top}");
    check_help("isolactl", &top);
    for command in &commands {
        let (code, text, err, _) = isolactl(&[command, "--help"]);
        assert_eq!(code, Some(0), "{command}: {err}");
        check_help(command, &text);
    }
    let (_, key, _, _) = isolactl(&["key", "--help"]);
    for name in [
        "enter", "esc", "f12", "leftctrl", "pageup", "kpenter", "delete",
    ] {
        assert!(
            key.split(|c: char| !c.is_ascii_alphanumeric())
                .any(|w| w == name),
            "key --help does not list '{name}':\n{key}"
        );
    }
}

/// In clap's help, an argument without help text is a line with its name alone.
fn check_help(command: &str, text: &str) {
    let mut section = "";
    for line in text.lines() {
        if !line.starts_with(' ') {
            section = line;
            continue;
        }
        if !matches!(section, "Arguments:" | "Options:") {
            continue;
        }
        let line = line.trim_end();
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        // An argument's line is indented by 2; its help follows on the same line after two
        // spaces, or on the next lines, further indented.
        if indent == 2 && !trimmed.contains("  ") {
            let next = text.lines().skip_while(|l| *l != line).nth(1).unwrap_or("");
            let next_indent = next.len() - next.trim_start().len();
            assert!(
                next_indent > 2 && !next.trim().is_empty(),
                "{command}: '{}' has no help:\n{text}",
                trimmed
            );
        }
    }
}
