//! Upgrade benchmark: the guest-visible pause of `isolactl upgrade` per device type (blk,
//! console, gpu, net), median and max over `ISOLA_BENCH_UPGRADES` upgrades (default 100)
//! each, every upgrade to another copy of the program and back, back to back.
//!
//! `cargo bench -p isola-tests --bench upgrade`
//!
//! The VM is started by `scripts/isola-run` on this profile's (release) binaries, as a user
//! runs it, with a guest that keeps the device busy: virtio-blk's verified write/read loop,
//! virtio-console's stream, virtio-gpu's endless frames, virtio-net's UDP stream. For every
//! device the pause is the time the core had no backend (`last_outage_us` of its status: from
//! the old instance's hang-up to the new one's queues restored; the guest's requests wait at
//! least that long, and no longer than that plus their own service time). For blk the guest
//! also measures its own longest wait for a completion around each upgrade, shown beside the
//! same measure without an upgrade (the wait a request has anyway on these machines). Also
//! shown: request to reconnected as `isolactl` sees it (the program's start included).

use std::time::Duration;

use isola_tests::console::console_guest;
use isola_tests::net::{in_netns, make_tap, GuestStream};
use isola_tests::supervisor::{isolactl, Launch};
use isola_tests::upgrade::{max_wait_us, percentile, upgrade_once};
use isola_tests::{binary, guest, scratch_dir};

const BLK_PROGRESS: &str = "virtio-blk: loop cycles=";

/// One device's figures: pauses (the core without a backend), request to reconnected, and
/// for blk the guest's own longest waits with and without upgrades.
#[derive(Default)]
struct Figures {
    outage: Vec<Duration>,
    took: Vec<Duration>,
    guest: Vec<Duration>,
    quiet: Vec<Duration>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// "median / max" of `values`, in ms.
fn median_max(values: &mut [Duration]) -> String {
    if values.is_empty() {
        return "-".into();
    }
    values.sort();
    format!(
        "{:.2} / {:.2}",
        ms(percentile(values, 0.5)),
        ms(values[values.len() - 1])
    )
}

/// Runs `upgrades` upgrades of daemon `name` (program `program`, socket `socket` in the run
/// directory) of the VM that `args` describe once the guest printed `ready`; `each` runs
/// after every upgrade (with the launch), e.g. to read the guest's measure.
fn run(
    what: &str,
    args: &[&str],
    ready: &str,
    daemon: (&str, &str, &str),
    upgrades: usize,
    mut each: impl FnMut(&mut Launch, &mut Figures),
) -> Figures {
    let (name, program, socket) = daemon;
    let scratch = scratch_dir(&format!("bench-upgrade-{what}"));
    let run_dir = scratch.join("run");
    let other = scratch.join(format!("{program}-next"));
    std::fs::copy(binary(program), &other).expect("a copy of the program");
    let original = binary(program);
    let mut launch = Launch::running(&run_dir, args, ready);
    let socket = run_dir.join(socket);
    let mut figures = Figures::default();
    each(&mut launch, &mut figures);
    for i in 0..upgrades {
        let target = if i % 2 == 0 { &other } else { &original };
        let up = upgrade_once(&run_dir, name, &socket, Some(target));
        figures.outage.push(up.outage);
        figures.took.push(up.took);
        each(&mut launch, &mut figures);
    }
    let run = run_dir.to_str().expect("UTF-8");
    let (ok, text) = isolactl(&["--run-dir", run, "shutdown"]);
    if !ok {
        eprintln!("{what}: shutdown: {text}");
    }
    launch.finish(Duration::from_secs(30));
    figures
}

fn blk(upgrades: usize) -> Figures {
    let cmdline = "virtio-blk.mode=loop virtio-blk.sectors=512 virtio-blk.depth=16 \
                   virtio-blk.timeout=30 virtio-blk.report_ms=50";
    let mut quiet_taken = false;
    run(
        "blk",
        &["--cmdline", cmdline],
        BLK_PROGRESS,
        ("blk0", "isola-blk", "blk0.sock"),
        upgrades,
        |launch, figures| {
            let mut wait = || {
                let line = launch
                    .stdout
                    .wait_for(BLK_PROGRESS, Duration::from_secs(30))
                    .expect("the guest goes on");
                Duration::from_micros(max_wait_us(&line).expect("max-wait-us"))
            };
            if !quiet_taken {
                // Before the first upgrade: the same measure without one.
                quiet_taken = true;
                figures.quiet = (0..20).map(|_| wait()).collect();
                return;
            }
            // The upgrade's wait is in one of the two progress lines after the reconnect
            // (or in the one that was printing while it happened).
            let a = wait();
            let b = wait();
            figures.guest.push(a.max(b));
        },
    )
}

fn console(upgrades: usize) -> Figures {
    let kernel = console_guest();
    run(
        "console",
        &[
            "--kernel",
            kernel.to_str().expect("UTF-8"),
            "--console",
            "--cmdline",
            "console.mode=stream console.seconds=3600 console.fill=0",
        ],
        "console: mode=stream",
        ("console", "isola-console", "console0.sock"),
        upgrades,
        |launch, _| {
            launch
                .stdout
                .wait_for("console: tick", Duration::from_secs(30))
                .expect("the guest goes on");
        },
    )
}

fn gpu(upgrades: usize) -> Figures {
    let kernel = guest("virtio-gpu.elf");
    run(
        "gpu",
        &[
            "--kernel",
            kernel.to_str().expect("UTF-8"),
            "--display",
            "320x200",
            "--cmdline",
            "virtio-gpu.frames=1000000 virtio-gpu.timeout=60",
        ],
        "virtio-gpu: frame 1 flushed",
        ("gpu", "isola-gpu", "gpu.sock"),
        upgrades,
        |_, _| {},
    )
}

fn net(upgrades: usize) -> Option<Figures> {
    let out = std::sync::Arc::new(std::sync::Mutex::new(None));
    let result = std::sync::Arc::clone(&out);
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        in_netns(move || {
            make_tap("tapbench0");
            let kernel = guest("virtio-net.elf");
            let mut stream = None;
            let figures = run(
                "net",
                &[
                    "--kernel",
                    kernel.to_str().expect("UTF-8"),
                    "--net",
                    "tapbench0",
                    "--cmdline",
                    "virtio-net.idle=3600",
                ],
                "virtio-net: ready",
                ("net", "isola-net", "net.sock"),
                upgrades,
                |_, _| {
                    let s = stream.get_or_insert_with(|| GuestStream::start(5005, 64, 256));
                    let at = s.count().next;
                    s.wait_past(at, Duration::from_secs(30))
                        .expect("the guest's stream goes on");
                },
            );
            if let Some(s) = stream {
                println!("net: the guest's stream over the upgrades: {:?}", s.stop());
            }
            *result.lock().expect("not poisoned") = Some(figures);
        })
    }));
    if ran.is_err() {
        println!("(net skipped: needs root, `ip` and /dev/net/tun; see stderr)");
    }
    let figures = out.lock().expect("not poisoned").take();
    figures
}

fn main() {
    let upgrades: usize = std::env::var("ISOLA_BENCH_UPGRADES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    println!(
        "upgrade: guest-visible pause of `isolactl upgrade`, {upgrades} upgrades per device, \
         back to back; ms, median / max"
    );
    println!(
        "| device | pause: the core without a backend | request -> reconnected | guest's own \
         longest wait around an upgrade | the same without an upgrade |\n|---|---|---|---|---|"
    );
    let row = |name: &str, figures: Option<Figures>| match figures {
        Some(mut f) => println!(
            "| {name} | {} | {} | {} | {} |",
            median_max(&mut f.outage),
            median_max(&mut f.took),
            median_max(&mut f.guest),
            median_max(&mut f.quiet)
        ),
        None => println!("| {name} | skipped | | | |"),
    };
    row("blk", Some(blk(upgrades)));
    row("console", Some(console(upgrades)));
    row("gpu", Some(gpu(upgrades)));
    row("net", net(upgrades));
}
