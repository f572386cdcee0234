//! virtio-console driven by the crates.io `virtio-drivers` crate (the `vdrivers` guest, its
//! single-port `VirtIOConsole`) against `isola-console`, with a user attached through
//! `isolactl console`: the echo is exactly the bytes sent, in order; 100 resets each with a byte
//! each way; the device process killed mid-echo.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use isola_ipc::DeviceLink;
use isola_tests::console::IsolaConsole;
use isola_tests::vdrivers::{self, assert_ok, cmdline, report, Rng, RUN_TIMEOUT};
use isola_tests::{scratch_dir, wait_device, Core};

/// isolactl's detach key (Ctrl-]): the one byte a user cannot send through it.
const DETACH: u8 = 0x1d;

struct Setup {
    _dir: isola_tests::ScratchDir,
    vu: PathBuf,
    port: PathBuf,
    log: PathBuf,
    console: IsolaConsole,
}

/// Port 0 on `port` (the one `isolactl console` attaches to), and a second port so that the
/// device has MULTIPORT to offer.
fn port_args(port: &Path) -> [String; 4] {
    let second = port.with_file_name("console1.sock");
    [
        "--port".into(),
        format!("socket={}", port.display()),
        "--port".into(),
        format!("socket={}", second.display()),
    ]
}

fn setup(name: &str) -> Setup {
    let dir = scratch_dir(name);
    let vu = dir.join("vu.sock");
    let port = dir.join("console.sock");
    let log = dir.join("isola-console.log");
    let console = IsolaConsole::start(&vu, &port_args(&port).each_ref().map(String::as_str), &log);
    Setup {
        vu,
        port,
        log,
        console,
        _dir: dir,
    }
}

/// With `queues=6` Isola offers MULTIPORT (port 0 plus the control queues and a second port),
/// which the crate does not take: the device must then be a single-port console.
fn start_core(dir: &Path, vu: &Path, extra: &str) -> (Core, PathBuf) {
    let device = format!("console,socket={},queues=6", vu.display());
    vdrivers::start(
        dir,
        &[device],
        &cmdline("console", extra),
        &["--device-timeout", "20"],
    )
}

/// `isolactl console PORT` with piped stdin/stdout.
fn attach(port: &Path) -> (Child, ChildStdin, ChildStdout) {
    let mut ctl = Command::new(isola_tests::binary("isolactl"))
        .arg("console")
        .arg(port)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("isolactl starts");
    let stdin = ctl.stdin.take().unwrap();
    let stdout = ctl.stdout.take().unwrap();
    // Let the device take this user before the first byte.
    std::thread::sleep(Duration::from_millis(300));
    (ctl, stdin, stdout)
}

/// `n` pseudo-random bytes, none of them the detach key.
fn data(n: usize) -> Vec<u8> {
    let mut rng = Rng(0x5eed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let b = rng.next() as u8;
        if b != DETACH {
            out.push(b);
        }
    }
    out
}

/// Writes `data` to `stdin` from a thread while reading exactly as many bytes from `stdout`.
fn echo_through(stdin: ChildStdin, stdout: &mut ChildStdout, data: &[u8]) -> Vec<u8> {
    let to_send = data.to_vec();
    let writer = std::thread::spawn(move || {
        let mut stdin = stdin;
        for chunk in to_send.chunks(1000) {
            stdin.write_all(chunk).expect("isolactl takes input");
        }
        stdin
    });
    let mut got = Vec::with_capacity(data.len());
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < data.len() {
        assert!(
            Instant::now() < deadline,
            "only {} of {} bytes echoed",
            got.len(),
            data.len()
        );
        let n = stdout.read(&mut buf).expect("read isolactl");
        assert!(n > 0, "isolactl closed after {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
    }
    let mut stdin = writer.join().unwrap();
    stdin.write_all(&[DETACH]).unwrap();
    got
}

/// One read from isolactl's stdout, failing the test if nothing arrives within 30 s.
fn read_bounded(from: &mut ChildStdout, buf: &mut [u8]) -> usize {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: from.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd, alive for the call.
    let ready = unsafe { libc::poll(&mut pfd, 1, 30_000) };
    assert!(ready > 0, "isolactl printed nothing for 30 s");
    from.read(buf).expect("read isolactl")
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

#[test]
fn console_echo_through_isolactl_is_exactly_the_bytes_sent_in_order() {
    const BYTES: usize = 64 * 1024;
    let s = setup("vd-console-echo");
    let (mut core, _) = start_core(s._dir.as_ref(), &s.vu, &format!("vdrivers.bytes={BYTES}"));
    core.wait_for("vdrivers: ready", Duration::from_secs(60));
    let (ctl, stdin, mut stdout) = attach(&s.port);
    let sent = data(BYTES);
    let got = echo_through(stdin, &mut stdout, &sent);
    if let Some(at) = first_difference(&got, &sent) {
        panic!("the echo differs from what was sent at byte {at} of {BYTES}");
    }
    let out = ctl.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let done = core.finish(RUN_TIMEOUT);
    let lines = assert_ok(&done);
    let crc = crc32fast::hash(&sent);
    assert!(
        lines.contains(&format!("echoed {BYTES} crc={crc:#010x}").as_str()),
        "{}",
        report(&done)
    );
    // The crate takes SIZE and EMERG_WRITE besides the common features (console.rs
    // SUPPORTED_FEATURES), which Isola does not offer; Isola's MULTIPORT the crate leaves out.
    let crate_set = vdrivers::COMMON_FEATURES | 1 | (1 << 2);
    assert_eq!(
        vdrivers::features_beyond_crate(&lines, crate_set),
        1 << 1,
        "MULTIPORT"
    );
    drop(s.console);
}

/// Reads from `from` until `text` has arrived (bounded); returns everything read.
fn read_until(from: &mut ChildStdout, seen: &mut String, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 256];
    while !seen.contains(text) {
        assert!(Instant::now() < deadline, "no {text:?}; got {seen:?}");
        let n = read_bounded(from, &mut buf);
        assert!(n > 0, "closed before {text:?}; got {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

#[test]
fn console_reset_and_reinitialised_a_hundred_times_with_a_byte_each_way() {
    let s = setup("vd-console-resets");
    // Attach before the guest starts, so its first line is not discarded.
    let (core, _) = start_core(
        s._dir.as_ref(),
        &s.vu,
        "vdrivers.mode=resets vdrivers.resets=100",
    );
    let (ctl, mut stdin, mut stdout) = attach(&s.port);
    let mut seen = String::new();
    for round in 0..100u32 {
        read_until(&mut stdout, &mut seen, &format!("ready {round}\n"));
        let byte = b'a' + (round % 26) as u8;
        stdin.write_all(&[byte]).unwrap();
        read_until(
            &mut stdout,
            &mut seen,
            &format!("round {round} got {byte}\n"),
        );
    }
    stdin.write_all(&[DETACH]).unwrap();
    drop(stdin);
    let _ = ctl.wait_with_output();
    let done = core.finish(RUN_TIMEOUT);
    let lines = assert_ok(&done);
    assert!(
        lines.contains(&"resets=100 each echoed"),
        "{}",
        report(&done)
    );
    drop(s.console);
}

#[test]
fn console_device_process_killed_mid_echo_is_only_a_pause() {
    const BYTES: usize = 16 * 1024;
    let s = setup("vd-console-kill");
    let (mut core, control) = start_core(
        s._dir.as_ref(),
        &s.vu,
        &format!("vdrivers.bytes={}", 2 * BYTES),
    );
    core.wait_for("vdrivers: ready", Duration::from_secs(60));
    let sent = data(2 * BYTES);
    // First half, then a kill and restart of isola-console, then the second half.
    let (ctl, stdin, mut stdout) = attach(&s.port);
    let got = echo_through(stdin, &mut stdout, &sent[..BYTES]);
    assert!(
        got == sent[..BYTES],
        "first half differs at {:?}",
        first_difference(&got, &sent[..BYTES])
    );
    let _ = ctl.wait_with_output();
    s.console.kill();
    let console = IsolaConsole::start(
        &s.vu,
        &port_args(&s.port).each_ref().map(String::as_str),
        &s.log,
    );
    wait_device(&mut core, &control, "reconnected", |d| {
        d.link == DeviceLink::Connected && d.reconnects == 1
    });
    let (ctl, stdin, mut stdout) = attach(&s.port);
    let got = echo_through(stdin, &mut stdout, &sent[BYTES..]);
    assert!(
        got == sent[BYTES..],
        "second half differs at {:?}",
        first_difference(&got, &sent[BYTES..])
    );
    let _ = ctl.wait_with_output();
    let done = core.finish(RUN_TIMEOUT);
    let lines = assert_ok(&done);
    let crc = crc32fast::hash(&sent);
    assert!(
        lines.contains(&format!("echoed {} crc={crc:#010x}", 2 * BYTES).as_str()),
        "{}",
        report(&done)
    );
    drop(console);
}
