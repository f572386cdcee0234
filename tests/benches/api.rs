//! API latency: `GET /vm` (the VM's status) and `GET /metrics` on `DIR/api.sock`, one fresh
//! connection per request as curl and isolactl make them, p50 and p99 over
//! `ISOLA_BENCH_REQUESTS` requests each (default 500): with the VM idle (its vCPUs paused, no
//! guest I/O) and while the virtio-blk guest keeps isola-blk busy. Target: p50 < 1 ms.
//!
//! `cargo bench -p isola-tests --bench api` (release binaries; the VM is started by
//! `scripts/isola-run`).

use std::time::{Duration, Instant};

use isola_tests::api::{curl, raw, status_of};
use isola_tests::supervisor::Launch;
use isola_tests::{scratch_dir, wait_for_path};

fn requests() -> usize {
    std::env::var("ISOLA_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}

/// p50 and p99 of `n` requests for `path`, in microseconds.
fn measure(socket: &std::path::Path, path: &str, n: usize) -> (f64, f64) {
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    let mut times: Vec<Duration> = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let answer =
            raw(socket, request.as_bytes(), Duration::from_secs(5)).expect("the API answers");
        times.push(start.elapsed());
        assert_eq!(
            status_of(&answer),
            Some(200),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    times.sort();
    let at = |q: f64| times[((n as f64 * q) as usize).min(n - 1)].as_secs_f64() * 1e6;
    (at(0.50), at(0.99))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n = requests();
    let scratch = scratch_dir("bench-api");
    let run_dir = scratch.join("run");
    let mut launch = Launch::start(
        &run_dir,
        &[
            "--cmdline",
            "virtio-blk.mode=loop virtio-blk.seconds=600 virtio-blk.sectors=2048",
        ],
    );
    let socket = run_dir.join("api.sock");
    wait_for_path(&socket, Duration::from_secs(120));
    launch
        .stdout
        .wait_for("virtio-blk: loop cycles=", Duration::from_secs(60))
        .expect("the guest runs its I/O loop");
    println!("API latency, {n} requests each, one connection per request (microseconds)");
    println!("{:<28} {:>10} {:>10}", "case", "p50", "p99");
    let pause = curl(&socket, &["-X", "POST"], "/vm/pause");
    assert_eq!(pause.status, 200, "{}", pause.body);
    for path in ["/vm", "/metrics"] {
        let (p50, p99) = measure(&socket, path, n);
        println!(
            "{:<28} {p50:>10.0} {p99:>10.0}",
            format!("GET {path}, idle")
        );
    }
    let resume = curl(&socket, &["-X", "POST"], "/vm/resume");
    assert_eq!(resume.status, 200, "{}", resume.body);
    std::thread::sleep(Duration::from_millis(500));
    for path in ["/vm", "/metrics"] {
        let (p50, p99) = measure(&socket, path, n);
        println!(
            "{:<28} {p50:>10.0} {p99:>10.0}",
            format!("GET {path}, guest I/O")
        );
    }
    let metrics = curl(&socket, &[], "/metrics");
    for line in metrics
        .body
        .lines()
        .filter(|l| l.starts_with("isola_process_resident_memory_bytes"))
    {
        println!("{line}");
    }
    let _ = isola_tests::api::post_json(&socket, "/vm/shutdown", r#"{"force": true}"#);
    let _ = launch.finish(Duration::from_secs(60));
}
