//! Console throughput, guest -> user socket, side by side with the raw limit of the same path
//! on the host: a host thread writing 64 KiB chunks into a Unix stream socket read by the same
//! reader. Both figures come from one run; the ratio is what to compare across machines.
//!
//! `cargo bench -p isola-tests --bench console`

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use isola_tests::console::{console_guest, IsolaConsole};
use isola_tests::{scratch_dir, wait_for_path, Core};

const WINDOW: Duration = Duration::from_secs(3);

/// Reads `stream` for WINDOW after its first byte; returns MiB/s.
fn drain(mut stream: UnixStream) -> f64 {
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
    let (reader, mut writer) = UnixStream::pair().expect("socketpair");
    let chunk = vec![0x5au8; 64 * 1024];
    let w = std::thread::spawn(move || while writer.write_all(&chunk).is_ok() {});
    let rate = drain(reader);
    w.join().expect("writer");
    rate
}

fn guest(dir: &Path) -> f64 {
    let vu = dir.join("vu.sock");
    let sock = dir.join("c0.sock");
    let _console = IsolaConsole::start(
        &vu,
        &["--port", &format!("socket={}", sock.display())],
        &dir.join("isola-console.log"),
    );
    let kernel = console_guest();
    let device = format!("console,socket={},queues=2", vu.display());
    let control = dir.join("control.sock");
    // Attach before the guest starts, so no output is discarded.
    let mut core = Core::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--device",
        &device,
        "--control-socket",
        control.to_str().unwrap(),
        "--cmdline",
        "console.mode=stream console.seconds=30",
    ]);
    wait_for_path(&control, Duration::from_secs(20));
    let user = UnixStream::connect(&sock).expect("attach");
    let mut stop = user.try_clone().expect("clone");
    let mut rest = user.try_clone().expect("clone");
    let rate = drain(user);
    // Tell the guest to stop, and keep reading what it still has in flight.
    let _ = stop.write_all(b"q");
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        while matches!(rest.read(&mut buf), Ok(n) if n > 0) {}
    });
    core.wait_for("console: stream done", Duration::from_secs(60));
    core.finish(Duration::from_secs(60)).assert_success();
    let _ = stop.shutdown(std::net::Shutdown::Both);
    let _ = reader.join();
    rate
}

fn main() {
    let dir = scratch_dir("bench-console");
    let raw = host_raw();
    let through_guest = guest(&dir);
    println!(
        "console throughput, guest -> isola-console -> Unix socket reader, {WINDOW:?} windows:"
    );
    println!("  host process -> Unix socket (raw limit): {raw:9.1} MiB/s");
    println!("  guest -> virtio-console -> socket:       {through_guest:9.1} MiB/s");
    println!(
        "  ratio guest / raw:                       {:9.3}",
        through_guest / raw
    );
}
