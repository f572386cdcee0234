//! Console throughput in both directions, measured side by side in rounds:
//!
//! 1. the raw limit of the host side: a host thread writing 64 KiB chunks into a Unix stream
//!    socket, read by the same reader as the others;
//! 2. Isola: the `virtio-console` guest on a named MULTIPORT port of isola-console, whose
//!    socket the bench reads (guest -> socket: `console.mode=stream`) or writes (socket ->
//!    guest: `console.mode=sink`);
//! 3. if `qemu-system-x86_64` is installed (Debian package `qemu-system-x86`): the same guest
//!    under QEMU with KVM, on the same kind of port of QEMU's in-process virtio-serial
//!    (`virtserialport`, which QEMU throttles, rather than `virtconsole`, which QEMU lets drop
//!    output its chardev cannot take at once), to a `-chardev socket`.
//!
//! Guest -> socket: the guest sends its buffers without filling them (`console.fill=0`), so
//! the device path, not the guest's pattern loop, is what is measured; the rate is what the
//! reader gets in the window after the first byte. Socket -> guest: once the guest has posted
//! its buffers (8 of 64 KiB), the bench writes 64 KiB chunks for the window; the rate is what
//! the socket took, and the guest's count of what arrived must equal what was written.
//!
//! Every round runs each case once, Isola and QEMU alternating; the ratios are per round and
//! reported as median (lowest..highest). `ISOLA_BENCH_ROUNDS` (default 3).
//!
//! `cargo bench -p isola-tests --bench console`

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use isola_tests::bench::{rounds, Spread};
use isola_tests::console::{console_guest, field, IsolaConsole};
use isola_tests::{scratch_dir, Core};

const WINDOW: Duration = Duration::from_secs(3);
const PORT: &str = "org.isola.bench";
const STREAM_ARGS: &str = "console.mode=stream console.seconds=60 console.fill=0";
const SINK_ARGS: &str = "console.mode=sink console.seconds=60";
const CHUNK: usize = 64 * 1024;
/// Bound on any one socket read or write, and on a guest's start and end.
const STALL: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    /// guest -> socket
    Out,
    /// socket -> guest
    In,
}

/// Reads `stream` for WINDOW after its first byte; returns MiB/s.
fn drain(stream: &mut UnixStream) -> f64 {
    stream.set_read_timeout(Some(STALL)).expect("timeout");
    let mut buf = vec![0u8; 256 * 1024];
    let n = stream.read(&mut buf).expect("first read");
    assert!(n > 0, "nothing arrived");
    let start = Instant::now();
    let mut total = 0u64;
    while start.elapsed() < WINDOW {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) => panic!("read: {e}"),
        }
    }
    total as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64()
}

/// Writes 64 KiB chunks into `stream` for WINDOW; returns MiB/s and the bytes written.
fn feed(stream: &mut UnixStream) -> (f64, u64) {
    stream.set_write_timeout(Some(STALL)).expect("timeout");
    let chunk = vec![0x5au8; CHUNK];
    let start = Instant::now();
    let mut total = 0u64;
    while start.elapsed() < WINDOW {
        match stream.write(&chunk) {
            Ok(n) => total += n as u64,
            Err(e) => panic!("write: {e}"),
        }
    }
    let rate = total as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64();
    (rate, total)
}

fn host_raw() -> f64 {
    let (mut reader, mut writer) = UnixStream::pair().expect("socketpair");
    let chunk = vec![0x5au8; CHUNK];
    let w = std::thread::spawn(move || while writer.write_all(&chunk).is_ok() {});
    let rate = drain(&mut reader);
    drop(reader);
    w.join().expect("writer");
    rate
}

/// Tells the streaming guest to stop and keeps reading until `finish` is done.
fn stop_and_drain(mut user: UnixStream, finish: impl FnOnce()) {
    let _ = user.write_all(b"q");
    let mut rest = user.try_clone().expect("clone");
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        while matches!(rest.read(&mut buf), Ok(n) if n > 0) {}
    });
    finish();
    let _ = user.shutdown(std::net::Shutdown::Both);
    let _ = reader.join();
}

fn connect(path: &Path) -> UnixStream {
    let deadline = Instant::now() + STALL;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("cannot connect to {path:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn guest_args(dir: Direction) -> String {
    let mode = match dir {
        Direction::Out => STREAM_ARGS,
        Direction::In => SINK_ARGS,
    };
    format!("{mode} console.name={PORT}")
}

fn isola(dir: &Path, direction: Direction) -> f64 {
    let vu = dir.join("vu.sock");
    let sock = dir.join("bench.sock");
    let _console = IsolaConsole::start(
        &vu,
        &[
            "--port",
            &format!("socket={}", dir.join("console.sock").display()),
            "--port",
            &format!("name={PORT},socket={}", sock.display()),
        ],
        &dir.join("isola-console.log"),
    );
    let kernel = console_guest();
    let device = format!("console,socket={},queues=6", vu.display());
    let mut user = connect(&sock);
    let (mut core, _) = Core::start_with_device(dir, &kernel, &device, &guest_args(direction));
    match direction {
        Direction::Out => {
            let rate = drain(&mut user);
            stop_and_drain(user, move || {
                core.wait_for("console: stream done", STALL);
                core.finish(STALL).assert_success();
            });
            rate
        }
        Direction::In => {
            core.wait_for("console: sink ready", STALL);
            let (rate, written) = feed(&mut user);
            let done = core.wait_for("console: sink done", STALL);
            assert_eq!(field(&done, "bytes"), Some(written), "isola: {done}");
            drop(user);
            core.finish(STALL).assert_success();
            rate
        }
    }
}

fn qemu_installed() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits for a line containing `needle` in QEMU's serial log.
fn serial_line(log: &Path, needle: &str) -> String {
    let deadline = Instant::now() + STALL;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "QEMU's guest did not print {needle:?}; it said:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_child(child: &mut Child) {
    let deadline = Instant::now() + STALL;
    while child.try_wait().expect("wait works").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("QEMU did not exit within {STALL:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn qemu(dir: &Path, direction: Direction) -> f64 {
    let sock = dir.join("qemu.sock");
    let serial = dir.join("qemu-serial.log");
    let _ = std::fs::remove_file(&serial);
    let kernel = console_guest();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-enable-kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-M",
            "pc",
            "-m",
            "64",
            "-nographic",
            "-nodefaults",
            "-no-reboot",
            "-monitor",
            "none",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=1",
            "-serial",
        ])
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(&kernel)
        .arg("-append")
        .arg(guest_args(direction))
        .arg("-chardev")
        .arg(format!(
            "socket,id=c0,path={},server=on,wait=on",
            sock.display()
        ))
        .args([
            "-device",
            "virtio-serial-pci,disable-legacy=on,max_ports=2",
            "-device",
            &format!("virtserialport,chardev=c0,name={PORT},nr=1"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu starts");
    let mut user = connect(&sock);
    match direction {
        Direction::Out => {
            let rate = drain(&mut user);
            stop_and_drain(user, || {
                let _ = child.kill();
                let _ = child.wait();
            });
            rate
        }
        Direction::In => {
            serial_line(&serial, "console: sink ready");
            let (rate, written) = feed(&mut user);
            let done = serial_line(&serial, "console: sink done");
            assert_eq!(field(&done, "bytes"), Some(written), "QEMU: {done}");
            drop(user);
            wait_child(&mut child);
            rate
        }
    }
}

fn main() {
    let dir = scratch_dir("bench-console");
    let rounds = rounds(3);
    let with_qemu = qemu_installed();
    let mut raw = Vec::new();
    // [direction][round]
    let mut isola_rates = [Vec::new(), Vec::new()];
    let mut qemu_rates = [Vec::new(), Vec::new()];
    let mut ratios = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        raw.push(host_raw());
        for (d, direction) in [Direction::Out, Direction::In].into_iter().enumerate() {
            let i = isola(&dir, direction);
            isola_rates[d].push(i);
            if with_qemu {
                let q = qemu(&dir, direction);
                qemu_rates[d].push(q);
                ratios[d].push(i / q);
            }
        }
        eprintln!("console bench: round {} of {rounds} done", round + 1);
    }
    println!(
        "console throughput, MiB/s, {rounds} rounds of {WINDOW:?} windows, median (lowest..highest):"
    );
    println!(
        "  host thread -> Unix socket (raw limit):   {}",
        Spread::of(&raw).show(1)
    );
    for (d, name) in ["guest -> socket", "socket -> guest"].iter().enumerate() {
        println!("  {name}:");
        println!(
            "    Isola (isola-console):                {}",
            Spread::of(&isola_rates[d]).show(1)
        );
        if with_qemu {
            println!(
                "    QEMU (in-process virtio-serial):      {}",
                Spread::of(&qemu_rates[d]).show(1)
            );
            println!(
                "    Isola / QEMU, per round:              {}",
                Spread::of(&ratios[d]).show(2)
            );
        }
    }
    if !with_qemu {
        println!("  (qemu-system-x86_64 not installed: no QEMU comparison)");
    }
}
