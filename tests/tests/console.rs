//! isola-console end to end: the core, the device process and the `virtio-console` guest.
//!
//! - A 1 MiB random stream goes into a named MULTIPORT port, the guest echoes it, and the
//!   test reads it back through a deliberately slow reader: nothing lost or reordered, the
//!   guest's CRC matches, and while the reader stalls the writer is held back (flow control
//!   reaches the user) instead of the device buffering.
//! - Interactive use through a pty: prompt, a typed line and its answer, a terminal resize
//!   reaching the guest, `exit`.
//! - Twenty SIGKILLs of isola-console while the guest streams: the log holds the stream
//!   exactly (no byte lost or duplicated), the guest's counter advanced while the device was
//!   dead, and resubmitted buffers were recognised from the log's delivery record.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isola_ipc::DeviceLink;
use isola_tests::console::{console_guest, field, slow_user, stream_mismatch, IsolaConsole};
use isola_tests::{device, scratch_dir, wait_for_path, Core};

fn start_core(dir: &Path, vu: &Path, queues: u16, cmdline: &str) -> (Core, std::path::PathBuf) {
    let kernel = console_guest();
    let device = format!("console,socket={},queues={queues}", vu.display());
    Core::start_with_device(dir, &kernel, &device, cmdline)
}

fn connect(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("cannot attach to {path:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

#[test]
fn a_mib_echoed_through_a_named_port_and_a_slow_reader_arrives_intact() {
    const TOTAL: usize = 1 << 20;
    let dir = scratch_dir("console-echo");
    let vu = dir.join("vu.sock");
    let port1 = dir.join("echo.sock");
    let console = IsolaConsole::start(
        &vu,
        &[
            "--port",
            &format!("log={}", dir.join("console.log").display()),
            "--port",
            &format!("name=org.isola.echo,socket={}", port1.display()),
        ],
        &dir.join("isola-console.log"),
    );
    let (mut core, _) = start_core(
        &dir,
        &vu,
        6,
        &format!("console.mode=echo console.name=org.isola.echo console.bytes={TOTAL}"),
    );
    let named = core.wait_for("name=", Duration::from_secs(30));
    assert_eq!(named, "console: port 1 name=org.isola.echo");
    core.wait_for("console: mode=echo port=1", Duration::from_secs(30));

    // Random data (xorshift), sent by its own thread as fast as the socket takes it.
    let mut data = vec![0u8; TOTAL];
    let mut x = 0x1234_5678_9abc_def1_u64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let stream = connect(&port1);
    let mut writer = stream.try_clone().unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let sent_by_writer = Arc::clone(&sent);
    let to_send = data.clone();
    let writer = std::thread::spawn(move || {
        for chunk in to_send.chunks(8192) {
            writer.write_all(chunk).unwrap();
            sent_by_writer.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
    });

    // The reader does not read at all for a second: everything in between fills up and the
    // writer must be held back well short of the whole MiB.
    std::thread::sleep(Duration::from_secs(1));
    let stalled_at = sent.load(Ordering::SeqCst);
    assert!(
        stalled_at < TOTAL as u64 / 2,
        "the writer got {stalled_at} bytes in while nobody read: no back-pressure"
    );

    // Then it reads slowly: 2 KiB at a time, pausing after each read.
    let mut reader = stream;
    let mut got = Vec::with_capacity(TOTAL);
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(120);
    while got.len() < TOTAL {
        assert!(Instant::now() < deadline, "only {} bytes back", got.len());
        let n = reader.read(&mut buf).unwrap();
        assert!(n > 0, "port closed after {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
        std::thread::sleep(Duration::from_micros(300));
    }
    writer.join().unwrap();
    if let Some(i) = got.iter().zip(&data).position(|(a, b)| a != b) {
        panic!("echo differs at byte {i} of {TOTAL}");
    }
    // Flow control, not buffering: the device process never held more than a little.
    let hwm_kib = peak_rss_kib(console.pid());
    assert!(
        hwm_kib < 48 * 1024,
        "isola-console peaked at {hwm_kib} KiB resident"
    );
    let line = core.wait_for("console: echoed", Duration::from_secs(30));
    let crc = crc32fast::hash(&data);
    assert_eq!(
        line,
        format!("console: echoed bytes={TOTAL} crc={crc:08x}"),
        "the guest saw other data"
    );
    core.finish(Duration::from_secs(30)).assert_success();
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM")
}

fn set_winsize(fd: &impl AsRawFd, cols: u16, rows: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `struct winsize` from the pointer, a live local.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    assert_eq!(rc, 0, "TIOCSWINSZ");
}

/// Reads from the pty until `text` has arrived (bounded).
fn read_until(tty: &mut std::fs::File, seen: &mut String, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 256];
    while !seen.contains(text) {
        assert!(
            Instant::now() < deadline,
            "no {text:?} on the pty; got {seen:?}"
        );
        match tty.read(&mut buf) {
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("pty read: {e}"),
        }
    }
}

#[test]
fn interactive_shell_and_resize_through_a_pty() {
    let dir = scratch_dir("console-pty");
    let vu = dir.join("vu.sock");
    let link = dir.join("console.pty");
    let _console = IsolaConsole::start(
        &vu,
        &["--multiport", "--port", &format!("pty={}", link.display())],
        &dir.join("isola-console.log"),
    );
    wait_for_path(&link, Duration::from_secs(10));
    let (mut core, _) = start_core(&dir, &vu, 4, "console.mode=shell");
    core.wait_for("console: shell ready", Duration::from_secs(30));

    // A user's terminal: open the pty (what `screen`, `minicom` or `socat` would do).
    let mut tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&link)
        .expect("the pty opens");
    let mut seen = String::new();
    read_until(&mut tty, &mut seen, "guest> ");
    tty.write_all(b"hello world\r").unwrap();
    read_until(&mut tty, &mut seen, "you typed: hello world\r\nguest> ");
    assert_eq!(
        core.wait_for("shell line", Duration::from_secs(10)),
        "console: shell line 'hello world'"
    );

    set_winsize(&tty, 132, 43);
    assert_eq!(
        core.wait_for("console: resize", Duration::from_secs(10)),
        "console: resize port=0 cols=132 rows=43"
    );

    tty.write_all(b"exit\n").unwrap();
    read_until(&mut tty, &mut seen, "bye\r\n");
    let done = core.finish(Duration::from_secs(30));
    done.assert_success();
    assert!(done.serial.iter().any(|l| l == "console: ok"));
}

use std::os::unix::fs::OpenOptionsExt;

#[test]
fn twenty_isola_console_kills_lose_and_duplicate_nothing_in_the_log() {
    const KILLS: u32 = 20;
    let dir = scratch_dir("console-kills");
    let vu = dir.join("vu.sock");
    let sock = dir.join("c0.sock");
    let log = dir.join("console.log");
    let proc_log = dir.join("isola-console.log");
    let port = format!("socket={},log={}", sock.display(), log.display());
    let args = ["--port", port.as_str()];
    let mut backend = IsolaConsole::start(&vu, &args, &proc_log);
    let (mut core, control_socket) =
        start_core(&dir, &vu, 2, "console.mode=stream console.seconds=120");
    let stop = Arc::new(AtomicU64::new(0));
    let user = slow_user(sock.clone(), Arc::clone(&stop));
    let first = core.wait_for("console: tick", Duration::from_secs(30));

    let mut seed = 0x2545_f491_u32;
    let mut rnd = |range: u32| {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        u64::from(seed % range)
    };
    for kill in 1..=KILLS {
        // Run 20-220 ms, die, stay dead 120-320 ms.
        let lines = core.lines_for(Duration::from_millis(20 + rnd(200)));
        assert!(
            !lines.iter().any(|l| l.contains("stream done")),
            "the guest finished before kill {kill}: make it stream longer"
        );
        backend.kill();
        let dead = core.lines_for(Duration::from_millis(120 + rnd(200)));
        // The vCPU kept running while the device was gone: its loop counter advanced from
        // tick to tick.
        let rounds: Vec<u64> = dead
            .iter()
            .filter(|l| l.starts_with("console: tick"))
            .filter_map(|l| field(l, "rounds"))
            .collect();
        assert!(
            rounds.len() >= 2 && rounds.windows(2).all(|w| w[1] > w[0]),
            "kill {kill}: guest ticks while the device was dead: {dead:?}"
        );
        backend = IsolaConsole::start(&vu, &args, &proc_log);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let d = device(&mut core, &control_socket);
            if d.link == DeviceLink::Connected && d.reconnects == kill {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no reconnect after kill {kill}: {d:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // The user types a byte: the guest stops streaming, waits for its last buffers, reports.
    stop.store(1, Ordering::SeqCst);
    core.wait_for("console: stream stopped by input", Duration::from_secs(30));
    let done_line = core.wait_for("console: stream done", Duration::from_secs(60));
    let done = core.finish(Duration::from_secs(60));
    done.assert_success();
    stop.store(3, Ordering::SeqCst);
    let read_by_user = user.join().unwrap();
    drop(backend);

    let total = field(&done_line, "bytes").expect("stream done bytes=");
    let data = std::fs::read(&log).unwrap();
    assert_eq!(
        data.len() as u64,
        total,
        "the log holds {} bytes, the guest wrote {total}",
        data.len()
    );
    if let Some(at) = stream_mismatch(&data) {
        panic!("the log differs from the stream at byte {at} of {total}");
    }
    let text = std::fs::read_to_string(&proc_log).unwrap();
    let resubmitted = text.matches("resubmitted buffer").count();
    let partial = text
        .lines()
        .filter(|l| l.contains("resubmitted buffer") && !l.contains(": 0 of"))
        .count();
    eprintln!(
        "{total} bytes in {} tick lines from {first:?}; {resubmitted} buffers resubmitted \
         after kills ({partial} already (partly) in the log); the user read {read_by_user} bytes",
        done.serial.len()
    );
    assert!(
        resubmitted >= 1,
        "no kill landed mid-request (no resubmitted buffer):\n{text}"
    );
}

/// Reads `from` until `text` has arrived (bounded).
fn read_text(from: &mut impl Read, seen: &mut String, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 256];
    while !seen.contains(text) {
        assert!(Instant::now() < deadline, "no {text:?}; got {seen:?}");
        let n = from.read(&mut buf).expect("read");
        assert!(n > 0, "closed before {text:?}; got {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

#[test]
fn isolactl_console_attaches_detaches_and_a_user_comes_back() {
    use std::process::{Command, Stdio};
    let dir = scratch_dir("console-isolactl");
    let vu = dir.join("vu.sock");
    let sock = dir.join("console.sock");
    let _console = IsolaConsole::start(
        &vu,
        &["--port", &format!("socket={}", sock.display())],
        &dir.join("isola-console.log"),
    );
    let (mut core, _) = start_core(&dir, &vu, 2, "console.mode=shell");
    core.wait_for("console: shell ready", Duration::from_secs(30));

    // The prompt went out before anyone attached (and was discarded): type a line.
    let mut ctl = Command::new(isola_tests::binary("isolactl"))
        .arg("console")
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("isolactl starts");
    let mut stdin = ctl.stdin.take().unwrap();
    let mut stdout = ctl.stdout.take().unwrap();
    // Let the device take this user before the first byte.
    std::thread::sleep(Duration::from_millis(300));
    stdin.write_all(b"via isolactl\n").unwrap();
    let mut seen = String::new();
    read_text(&mut stdout, &mut seen, "you typed: via isolactl\r\nguest> ");
    // Ctrl-] detaches; the guest keeps running.
    stdin.write_all(&[0x1d]).unwrap();
    let out = ctl.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("isolactl: detached"));

    // Someone else attaches with a plain socket client and ends the session.
    let mut user = connect(&sock);
    std::thread::sleep(Duration::from_millis(300));
    user.write_all(b"exit\r").unwrap();
    let mut seen = String::new();
    read_text(&mut user, &mut seen, "bye\r\n");
    let done = core.finish(Duration::from_secs(30));
    done.assert_success();
    let lines: Vec<&String> = done
        .serial
        .iter()
        .filter(|l| l.starts_with("console: shell line"))
        .collect();
    assert_eq!(
        lines,
        [
            "console: shell line 'via isolactl'",
            "console: shell line 'exit'"
        ]
    );
}

#[test]
fn a_hostile_guest_gets_every_bad_buffer_back_unused_and_the_device_keeps_serving() {
    let dir = scratch_dir("console-hostile");
    let vu = dir.join("vu.sock");
    let log = dir.join("port0.log");
    let mut console = IsolaConsole::start(
        &vu,
        &[
            "--port",
            &format!(
                "socket={},log={}",
                dir.join("p0.sock").display(),
                log.display()
            ),
            "--port",
            &format!("name=second,log={}", dir.join("port1.log").display()),
        ],
        &dir.join("isola-console.log"),
    );
    let (mut core, _) = start_core(&dir, &vu, 6, "console.mode=hostile");
    core.wait_for("console: hostile ok", Duration::from_secs(60));
    let done = core.finish(Duration::from_secs(30));
    done.assert_success();
    let returned = done
        .serial
        .iter()
        .filter(|l| l.starts_with("console: hostile ") && l.ends_with(": returned len=0"))
        .count();
    assert_eq!(returned, 14, "{:?}", done.serial);
    assert!(console.running(), "isola-console died");
    // Only the valid line reached the log: nothing of the half-valid chain leaked.
    assert_eq!(std::fs::read(&log).unwrap(), b"after hostile\n");
    let text = std::fs::read_to_string(dir.join("isola-console.log")).unwrap();
    assert!(text.contains("returned unused"), "{text}");
    assert!(text.contains("dropped"), "{text}");
}
