//! Restart benchmark: time from a device daemon's death (SIGKILL) to the first request it
//! completes after `isola-supervisor` started it again and the core reconnected, while a
//! guest keeps the device busy. Median and max over `ISOLA_BENCH_KILLS` kills (default 20)
//! per device type.
//!
//! `cargo bench -p isola-tests --bench restart`
//!
//! The end of the interval is the line "queue N: first request completed" that the shared
//! device library logs once per queue start; the bench reads it from the daemon's stderr
//! as it is written. Kills are spaced beyond the supervisor's `--min-uptime-ms` so every
//! restart is immediate (the back-off applies to daemons that die right after starting).
//! Also reported: death -> restarted (the supervisor's log line), the part of the interval
//! spent before the core could even reconnect.

use std::path::Path;
use std::time::{Duration, Instant};

use isola_tests::supervisor::{supervisor_status, Supervisor};
use isola_tests::{binary, guest, scratch_dir, Core};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

struct Case {
    name: &'static str,
    /// Daemon command (the supervisor adds `--fd 3`).
    daemon: String,
    /// The core's `--device` value, without the socket.
    device: &'static str,
    kernel: String,
    cmdline: String,
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn measure(case: &Case, dir: &Path, kills: usize) -> Option<(Vec<Duration>, Vec<Duration>)> {
    let socket = dir.join(format!("{}.sock", case.name));
    let control = dir.join(format!("{}-supervisor.sock", case.name));
    std::env::set_var("RUST_LOG", "info");
    let mut sup = Supervisor::start(
        &control,
        &[format!(
            "{}:{}:{}",
            case.name,
            socket.display(),
            case.daemon
        )],
        &["--restart-limit", "1000", "--min-uptime-ms", "200"],
    );
    let mut core = Core::start(&[
        "--kernel",
        &case.kernel,
        "--cmdline",
        &case.cmdline,
        "--memory",
        "64",
        "--device",
        &format!("{},socket={}", case.device, socket.display()),
    ]);
    sup.stderr
        .wait_for("first request completed", Duration::from_secs(30))?;
    let mut to_first = Vec::new();
    let mut to_restart = Vec::new();
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(300));
        let pid = supervisor_status(&control)[0].pid?;
        let t0 = Instant::now();
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).ok()?;
        sup.stderr
            .wait_for("restarted, pid", Duration::from_secs(10))?;
        to_restart.push(t0.elapsed());
        sup.stderr
            .wait_for("first request completed", Duration::from_secs(10))?;
        to_first.push(t0.elapsed());
    }
    if let Some(report) = core.exit_report() {
        eprintln!("{}: the core ended early: {report}", case.name);
        return None;
    }
    Some((to_first, to_restart))
}

fn main() {
    let kills: usize = std::env::var("ISOLA_BENCH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = scratch_dir("bench-restart");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 4 << 20]).expect("scratch image");
    let cases = [Case {
        name: "blk",
        daemon: format!(
            "{} --image {}",
            binary("isola-blk").display(),
            image.display()
        ),
        device: "blk",
        kernel: guest("virtio-blk.elf").display().to_string(),
        cmdline: "virtio-blk.mode=loop virtio-blk.sectors=256 virtio-blk.depth=16".into(),
    }];

    println!("restart: death (SIGKILL) -> first completed request, {kills} kills per device");
    println!(
        "| device | median | max | p90 | death -> restarted (median) |\n|---|---|---|---|---|"
    );
    for case in &cases {
        match measure(case, &dir, kills) {
            Some((mut first, mut restart)) => {
                first.sort();
                restart.sort();
                println!(
                    "| {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
                    case.name,
                    ms(percentile(&first, 0.5)),
                    ms(*first.last().expect("kills > 0")),
                    ms(percentile(&first, 0.9)),
                    ms(percentile(&restart, 0.5)),
                );
            }
            None => println!("| {} | failed (see stderr) | | | |", case.name),
        }
    }
}
