//! `isolactl upgrade` under a guest doing verified I/O (issue 16, item 2): upgrades of the
//! disk's daemon in a row, half of them to another copy of the program, while Isola's
//! virtio-blk guest writes and reads back a pattern that changes every pass. The guest checks
//! every sector it reads and every request's status, and ends the VM with an error at the
//! first wrong byte, failed request or request that is never answered (30 s); it must still
//! be looping, unharmed, after the last upgrade; each pause must stay under 5 s, every old
//! instance must be gone, and the core and the supervisor must hold as many file descriptors
//! as before the first. The API records each one: `GET /events` gives `device_died` ("upgraded
//! to PATH"), `device_restarted` (the new pid) and `device_reconnected` per upgrade, and
//! `/devices/blk0` and `/metrics` count them all.
//!
//! 20 upgrades by default; `ISOLA_SOAK=1` makes it 100 (the soak), and
//! `ISOLA_UPGRADES=N` any other count. Each upgrade's guest-visible pause is the guest's own
//! longest wait for a completion around it (`max-wait-us=` of its progress lines); the median
//! and max are printed with the host-side time from the request to the core's reconnect.

use std::time::{Duration, Instant};

use std::process::{Command, Stdio};

use isola_tests::api::curl;
use isola_tests::supervisor::{isolactl, processes_mentioning, Launch, Lines};
use isola_tests::upgrade::{max_wait_us, open_fds, pid_of, quiet_fds, upgrade_once};
use isola_tests::{binary, scratch_dir};

const PROGRESS: &str = "virtio-blk: loop cycles=";

/// The guest's progress lines, each with its longest wait since the last, come this often.
const REPORT_MS: u32 = 50;

/// The core backs off from a backend that goes away again within 250 ms of coming back (a
/// daemon that dies at once, `core-vmm/src/pci/retry.rs`), doubling the wait each time; the
/// upgrades are spaced beyond that so that each pause is the upgrade's own.
const SPACING: Duration = Duration::from_millis(300);

/// No upgrade may stall the guest longer than this (its own request timeout is 30 s). A
/// bound, not a performance target: the figures are printed.
const MAX_PAUSE: Duration = Duration::from_secs(5);

fn upgrades() -> usize {
    match std::env::var("ISOLA_UPGRADES") {
        Ok(n) if !n.is_empty() => n.parse().expect("ISOLA_UPGRADES is a number"),
        _ if std::env::var("ISOLA_SOAK").is_ok_and(|v| v == "1") => 100,
        _ => 20,
    }
}

/// Waits until `pid` holds no more file descriptors than `before` again (a control connection being
/// closed may lag its answer); panics with both lists if it does not within 5 s.
fn assert_fds_settle(what: &str, pid: u32, before: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = open_fds(pid);
        if now.len() <= before.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} (pid {pid}) held {} fds before the upgrades and {} after\nbefore: \
             {before:#?}\nafter: {now:#?}",
            before.len(),
            now.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The disk daemon's processes (the original program or its copy) of the run in `run`.
fn blk_processes(run: &str) -> Vec<(u32, String)> {
    processes_mentioning(run)
        .into_iter()
        .filter(|(pid, _)| {
            std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
                exe.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("isola-blk"))
            })
        })
        .collect()
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[test]
fn upgrades_of_the_disk_daemon_under_verified_io_lose_nothing() {
    let count = upgrades();
    assert!(count >= 1, "ISOLA_UPGRADES must be at least 1");
    let scratch = scratch_dir("upgrade-blk");
    let run_dir = scratch.join("run");
    let run = run_dir.to_str().unwrap();
    // The same program under another path: the upgrade really runs another file.
    let other = scratch.join("isola-blk-next");
    std::fs::copy(binary("isola-blk"), &other).expect("copy isola-blk");
    let cmdline = format!(
        "virtio-blk.mode=loop virtio-blk.sectors=512 virtio-blk.depth=16 virtio-blk.timeout=30 \
         virtio-blk.report_ms={REPORT_MS}"
    );
    let mut launch = Launch::running(&run_dir, &["--cmdline", &cmdline], PROGRESS);
    let socket = run_dir.join("blk0.sock");
    let original = binary("isola-blk");
    let core = pid_of("isola-core", run);
    let supervisor = pid_of("isola-supervisor", run);
    let (core_fds, supervisor_fds) = (quiet_fds(core), quiet_fds(supervisor));
    // The API's event stream (isola-api, started by isola-run) through curl.
    let api = run_dir.join("api.sock");
    let mut events_curl = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "600", "--unix-socket"])
        .arg(&api)
        .arg("http://localhost/events")
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl runs (Debian package curl)");
    let mut events = Lines::new(events_curl.stdout.take().expect("piped"));
    // The stream is subscribed once the answer's head is out; give curl that moment.
    std::thread::sleep(Duration::from_millis(500));
    let blk_before = blk_processes(run);

    // The same measure without an upgrade, for comparison: the longest wait in each of 20
    // progress windows.
    let mut quiet: Vec<Duration> = (0..20)
        .map(|_| {
            let line = launch
                .stdout
                .wait_for(PROGRESS, Duration::from_secs(30))
                .unwrap_or_else(|| panic!("the guest stopped\n{}", launch.report()));
            Duration::from_micros(max_wait_us(&line).expect("max-wait-us"))
        })
        .collect();
    quiet.sort();

    let mut took = Vec::new();
    let mut paused = Vec::new();
    let mut pids = Vec::new();
    let mut reconnected = Instant::now();
    for i in 0..count {
        std::thread::sleep(SPACING.saturating_sub(reconnected.elapsed()));
        // To the copy, back to the original, and every tenth without --binary (the file at
        // the path it runs from, the copy: i % 10 == 9 follows i % 10 == 8).
        let target = match i % 10 {
            9 => None,
            n if n % 2 == 0 => Some(other.as_path()),
            _ => Some(original.as_path()),
        };
        // A progress line printed from now on opens the window the upgrade falls in.
        launch.stdout.drain(Duration::ZERO);
        launch
            .stdout
            .wait_for(PROGRESS, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("the guest stopped before upgrade {i}\n{}", launch.report()));
        let window = launch.stdout.seen.len();
        let (time, pid) = upgrade_once(&run_dir, "blk0", &socket, target);
        reconnected = Instant::now();
        // Two more progress lines after the core reconnected: the cycle that waited through
        // the upgrade has ended, and its wait is in one of the lines since the window opened.
        for _ in 0..2 {
            launch
                .stdout
                .wait_for(PROGRESS, Duration::from_secs(30))
                .unwrap_or_else(|| {
                    panic!("the guest stopped after upgrade {i}\n{}", launch.report())
                });
        }
        let waits: Vec<u64> = launch.stdout.seen[window..]
            .iter()
            .filter(|l| l.contains(PROGRESS))
            .map(|l| max_wait_us(l).unwrap_or_else(|| panic!("no max-wait-us in {l}")))
            .collect();
        let pause = Duration::from_micros(waits.into_iter().max().expect("progress lines"));
        assert!(
            pause < MAX_PAUSE,
            "upgrade {i}: the guest waited {pause:?} for a completion"
        );
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        let expected = target.unwrap_or(other.as_path());
        assert_eq!(
            exe,
            expected,
            "upgrade {i}: pid {pid} runs {}",
            exe.display()
        );
        took.push(time);
        paused.push(pause);
        pids.push((pid, expected.to_owned()));
        assert!(
            launch.child.try_wait().expect("wait works").is_none(),
            "the VM ended at upgrade {i}\n{}",
            launch.report()
        );
    }

    // As many disk daemon processes as before (its sandbox makes it two): every old instance
    // is gone (zombies have an empty command line).
    assert_eq!(
        blk_processes(run).len(),
        blk_before.len(),
        "before: {blk_before:#?}\nafter: {:#?}",
        blk_processes(run)
    );
    assert_fds_settle("isola-core", core, &core_fds);
    assert_fds_settle("isola-supervisor", supervisor, &supervisor_fds);
    let (ok, text) = isolactl(&["--run-dir", run, "status"]);
    assert!(ok, "{text}");
    assert!(text.contains(&format!("restarts {count},")), "{text}");
    assert!(text.contains("upgraded to"), "{text}");

    // Events and the API's device record each upgrade: blk0 died ("upgraded to PATH"), was
    // restarted with the new pid and reconnected, once per upgrade and in that order.
    let deadline = Instant::now() + Duration::from_secs(10);
    let blk0 = |events: &Lines| -> Vec<serde_json::Value> {
        events
            .seen
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .filter(|e: &serde_json::Value| e["device"] == "blk0")
            .collect()
    };
    while blk0(&events)
        .iter()
        .filter(|e| e["event"] == "device_reconnected")
        .count()
        < count
    {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            events.wait_for("device_reconnected", left).is_some(),
            "not {count} device_reconnected events: {:#?}",
            events.seen
        );
    }
    let recorded = blk0(&events);
    assert_eq!(recorded.len(), 3 * count, "{recorded:#?}");
    for (i, (triple, (pid, program))) in recorded.chunks(3).zip(&pids).enumerate() {
        let names: Vec<&str> = triple
            .iter()
            .map(|e| e["event"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["device_died", "device_restarted", "device_reconnected"],
            "upgrade {i}: {triple:#?}"
        );
        let reason = triple[0]["reason"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with(&format!("upgraded to {}", program.display())),
            "upgrade {i}: {reason}"
        );
        assert_eq!(triple[1]["pid"], *pid, "upgrade {i}: {triple:#?}");
        assert!(
            triple[2]["latency_seconds"].as_f64().is_some(),
            "upgrade {i}: {triple:#?}"
        );
    }
    let device = curl(&api, &[], "/devices/blk0").json();
    assert_eq!(device["daemon"]["restarts"], count, "{device}");
    assert_eq!(device["reconnects"], count, "{device}");
    let metrics = curl(&api, &[], "/metrics").body;
    for line in [
        format!("isola_device_restarts_total{{device=\"blk0\"}} {count}"),
        format!("isola_device_reconnects_total{{device=\"blk0\"}} {count}"),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
    let _ = events_curl.kill();
    let _ = events_curl.wait();
    took.sort();
    paused.sort();
    eprintln!(
        "{count} upgrades of isola-blk: guest-visible pause median {:.2} ms, p90 {:.2} ms, max {:.2} ms; \
         request to reconnected median {:.2} ms, max {:.2} ms; fds core {} supervisor {}; \
         without an upgrade, a {} ms window's longest wait: median {:.2} ms, max {:.2} ms",
        percentile(&paused, 0.5).as_secs_f64() * 1e3,
        percentile(&paused, 0.9).as_secs_f64() * 1e3,
        paused[count - 1].as_secs_f64() * 1e3,
        percentile(&took, 0.5).as_secs_f64() * 1e3,
        took[count - 1].as_secs_f64() * 1e3,
        core_fds.len(),
        supervisor_fds.len(),
        REPORT_MS,
        percentile(&quiet, 0.5).as_secs_f64() * 1e3,
        quiet[quiet.len() - 1].as_secs_f64() * 1e3
    );

    let (ok, text) = isolactl(&["--run-dir", run, "shutdown", "--hard"]);
    assert!(ok, "{text}");
    let status = launch.finish(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", launch.report());
    let guest = launch.stdout.drain(Duration::from_millis(100)).to_vec();
    // Every line the guest printed is a set-up or progress line: a failed request, a wrong
    // sector or a timeout would have printed its own line (and ended the VM).
    let odd: Vec<&String> = guest
        .iter()
        .filter(|l| l.starts_with("virtio-blk: ") && !l.starts_with(PROGRESS))
        .filter(|l| {
            !["found ", "offered=", "capacity=", "mode="]
                .iter()
                .any(|p| l["virtio-blk: ".len()..].starts_with(p))
        })
        .collect();
    assert!(odd.is_empty(), "unexpected guest lines: {odd:#?}");
    let last = guest.iter().rev().find(|l| l.contains(PROGRESS));
    eprintln!("last guest progress: {}", last.expect("progress lines"));
}
