//! Console throughput, guest -> user socket, measured side by side in one run:
//!
//! 1. the raw limit of the host side: a host thread writing 64 KiB chunks into a Unix stream
//!    socket, read by the same reader as the others;
//! 2. Isola: the `virtio-console` guest streaming on a named MULTIPORT port of isola-console,
//!    whose socket the reader drains;
//! 3. if `qemu-system-x86_64` is installed (Debian package `qemu-system-x86`): the same guest
//!    under QEMU with KVM, streaming on the same kind of port of QEMU's in-process
//!    virtio-serial (`virtserialport`, which QEMU throttles, rather than `virtconsole`, which
//!    QEMU lets drop output its chardev cannot take at once), to a `-chardev socket`.
//!
//! The guest sends its buffers without filling them (`console.fill=0`), so the device path,
//! not the guest's pattern loop, is what is measured. Ratios are what to compare.
//!
//! `cargo bench -p isola-tests --bench console`

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use isola_tests::console::{console_guest, IsolaConsole};
use isola_tests::{scratch_dir, Core};

const WINDOW: Duration = Duration::from_secs(3);
const PORT: &str = "org.isola.bench";
const GUEST_ARGS: &str = "console.mode=stream console.seconds=60 console.fill=0";

/// Reads `stream` for WINDOW after its first byte; returns MiB/s.
fn drain(stream: &mut UnixStream) -> f64 {
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

fn host_raw() -> f64 {
    let (mut reader, mut writer) = UnixStream::pair().expect("socketpair");
    let chunk = vec![0x5au8; 64 * 1024];
    let w = std::thread::spawn(move || while writer.write_all(&chunk).is_ok() {});
    let rate = drain(&mut reader);
    drop(reader);
    w.join().expect("writer");
    rate
}

/// Tells the guest to stop and keeps reading until `finish` is done.
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
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("cannot connect to {path:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn isola(dir: &Path) -> f64 {
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
    let (mut core, _) = Core::start_with_device(
        dir,
        &kernel,
        &device,
        &format!("{GUEST_ARGS} console.name={PORT}"),
    );
    let rate = drain(&mut user);
    stop_and_drain(user, move || {
        core.wait_for("console: stream done", Duration::from_secs(60));
        core.finish(Duration::from_secs(60)).assert_success();
    });
    rate
}

fn qemu_installed() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn qemu(dir: &Path) -> f64 {
    let sock = dir.join("qemu.sock");
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
            "-serial",
            "null",
            "-monitor",
            "none",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=1",
            "-kernel",
        ])
        .arg(&kernel)
        .arg("-append")
        .arg(format!("{GUEST_ARGS} console.name={PORT}"))
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
    let rate = drain(&mut user);
    stop_and_drain(user, || {
        let _ = child.kill();
        let _ = child.wait();
    });
    rate
}

fn main() {
    let dir = scratch_dir("bench-console");
    let raw = host_raw();
    let isola = isola(&dir);
    let qemu = qemu_installed().then(|| qemu(&dir));
    println!(
        "console throughput, guest -> port -> Unix socket reader, {WINDOW:?} windows, one run:"
    );
    println!("  host thread -> Unix socket (raw limit):        {raw:8.1} MiB/s");
    println!(
        "  Isola: guest -> isola-console -> socket:       {isola:8.1} MiB/s   ({:.3} of raw)",
        isola / raw
    );
    match qemu {
        Some(q) => {
            println!(
                "  QEMU: guest -> virtio-serial (in-process):     {q:8.1} MiB/s   ({:.3} of raw)",
                q / raw
            );
            println!(
                "  Isola / QEMU:                                  {:8.2}",
                isola / q
            );
        }
        None => println!("  (qemu-system-x86_64 not installed: no QEMU comparison)"),
    }
}
