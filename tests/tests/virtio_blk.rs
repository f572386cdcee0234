//! The `virtio-blk` guest drives a virtio-blk PCI function of the core whose backend is
//! `qemu-storage-daemon`'s vhost-user-blk export (an implementation independent of Isola):
//! the data the guest writes must reach the disk image exactly, reads must verify, corruption
//! must be caught, and malformed requests must be answered or dropped within a bounded time.
//!
//! Skipped, with a message, when `qemu-storage-daemon` is not installed (Debian 12: package
//! `qemu-system-common`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use isola_tests::qsd::{qsd_installed, Daemon};
use isola_tests::{guest, scratch_dir, Core, Finished, IsolaBlk};

const SECTOR: usize = 512;
const TIMEOUT: Duration = Duration::from_secs(90);
const SECTOR_MAGIC: u32 = 0x626f_7369; // "isob"
const VIRTIO_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_F_EVENT_IDX: u64 = 1 << 29;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const EXIT_MISMATCH: i32 = isola_guests::EXIT_VBLK_MISMATCH as i32;
const EXIT_HOSTILE: i32 = isola_guests::EXIT_VBLK_HOSTILE as i32;

fn make_image(dir: &Path, sectors: u64) -> PathBuf {
    let path = dir.join("disk.img");
    let file = File::create(&path).unwrap();
    file.set_len(sectors * SECTOR as u64).unwrap();
    path
}

/// Runs the guest with the device backed by `socket`.
fn run_guest(socket: &Path, cmdline: &str) -> Finished {
    run_guest_on(&format!("blk,socket={}", socket.display()), cmdline)
}

fn run_guest_on(device: &str, cmdline: &str) -> Finished {
    let kernel = guest("virtio-blk.elf");
    Core::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--device",
        device,
        "--device-timeout",
        "20",
        "--cmdline",
        cmdline,
    ])
    .finish(TIMEOUT)
}

fn report(done: &Finished) -> String {
    format!(
        "exit {:?}\nserial:\n{}\nstderr:\n{}",
        done.status,
        done.serial.join("\n"),
        done.stderr
    )
}

/// The guest's `virtio-blk: ` lines, without the prefix.
fn guest_lines(done: &Finished) -> Vec<&str> {
    done.serial
        .iter()
        .filter_map(|l| l.strip_prefix("virtio-blk: "))
        .collect()
}

/// The value of `key=` in the first line starting with `prefix`.
fn field<'a>(lines: &[&'a str], prefix: &str, key: &str) -> Option<&'a str> {
    let line = lines.iter().find(|l| l.starts_with(prefix))?;
    line.split(' ')
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

fn assert_ok(done: &Finished) -> Vec<&str> {
    assert!(done.status.success(), "{}", report(done));
    let lines = guest_lines(done);
    assert_eq!(lines.last(), Some(&"ok"), "{}", report(done));
    assert!(!done.stderr.contains("panicked"), "{}", done.stderr);
    lines
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What the guest writes to `sector` in generation `gen` (documented in isola-guests).
fn pattern(sector: u64, gen: u64) -> [u8; SECTOR] {
    let mut out = [0u8; SECTOR];
    out[0..8].copy_from_slice(&sector.to_le_bytes());
    out[8..16].copy_from_slice(&gen.to_le_bytes());
    for i in 2..63u64 {
        let word = mix64(
            gen.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(sector.wrapping_mul(64))
                .wrapping_add(i),
        );
        let at = i as usize * 8;
        out[at..at + 8].copy_from_slice(&word.to_le_bytes());
    }
    out[504..508].copy_from_slice(&SECTOR_MAGIC.to_le_bytes());
    let crc = crc32fast::hash(&out[..508]);
    out[508..512].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The image holds generation `gen` in sectors [0, written) and zeros after, at its size.
fn assert_image(image: &Path, sectors: u64, written: u64, gen: u64) {
    let bytes = std::fs::read(image).unwrap();
    assert_eq!(bytes.len() as u64, sectors * SECTOR as u64, "image size");
    for (n, sector) in bytes.chunks(SECTOR).enumerate() {
        let n = n as u64;
        if n < written {
            assert!(
                sector == pattern(n, gen),
                "sector {n} does not hold generation {gen}: starts {:02x?}",
                &sector[..16]
            );
        } else {
            assert!(
                sector.iter().all(|&b| b == 0),
                "sector {n} beyond what the guest wrote is not zero"
            );
        }
    }
}

/// Checks the set-up lines and returns (offered, negotiated) features.
fn assert_setup(lines: &[&str], capacity: u64) -> (u64, u64) {
    assert_eq!(
        field(lines, "capacity=", "capacity"),
        Some(capacity.to_string().as_str()),
        "{lines:?}"
    );
    let features = hex(field(lines, "capacity=", "features").expect("features"));
    let offered = hex(field(lines, "offered=", "offered").expect("offered line"));
    assert_ne!(features & VIRTIO_F_VERSION_1, 0, "VERSION_1 negotiated");
    assert_eq!(features & !offered, 0, "only offered features accepted");
    (offered, features)
}

fn interrupts_and_requests(lines: &[&str]) -> (u64, u64) {
    let interrupts = field(lines, "interrupts=", "interrupts")
        .expect("interrupts line")
        .parse()
        .unwrap();
    let requests = field(lines, "requests=", "requests")
        .expect("requests line")
        .parse()
        .unwrap();
    (interrupts, requests)
}

#[test]
fn writes_flushes_and_verifies_with_event_idx_and_the_image_holds_the_pattern() {
    if !qsd_installed() {
        return;
    }
    let dir = scratch_dir("vblk-normal");
    let sectors = 32768; // 16 MiB
    let image = make_image(&dir, sectors);
    let daemon = Daemon::start(&dir, &image);
    // 3001 sectors: the last request is shorter than the others.
    let done = run_guest(
        &daemon.socket,
        "virtio-blk.sectors=3001 virtio-blk.depth=16 virtio-blk.seed=7",
    );
    let log = daemon.stop();
    let lines = assert_ok(&done);
    let (offered, features) = assert_setup(&lines, sectors);
    if offered & VIRTIO_F_EVENT_IDX != 0 {
        assert_ne!(features & VIRTIO_F_EVENT_IDX, 0, "EVENT_IDX negotiated");
        assert_eq!(field(&lines, "mode=", "event-idx"), Some("1"));
    }
    assert_eq!(features & VIRTIO_F_INDIRECT_DESC, 0, "not asked for");
    assert_eq!(field(&lines, "mode=", "depth"), Some("16"));
    for expected in ["wrote 3001 sectors", "flushed", "verified 3001 sectors"] {
        assert!(lines.contains(&expected), "{expected:?}: {}", report(&done));
    }
    let id = lines
        .iter()
        .find_map(|l| l.strip_prefix("id="))
        .expect("id line");
    assert!(!id.is_empty(), "device id");
    let (interrupts, requests) = interrupts_and_requests(&lines);
    // 376 writes + 376 reads (8 sectors each, the last 1), flush, get-id.
    assert_eq!(requests, 2 * 376 + 2);
    assert!(
        (1..=requests).contains(&interrupts),
        "{interrupts} interrupts for {requests} requests"
    );
    assert_image(&image, sectors, 3001, 7);
    assert!(!log.contains("vu_panic"), "backend log:\n{log}");
}

#[test]
fn indirect_descriptors_without_event_idx_survive_a_device_reset() {
    if !qsd_installed() {
        return;
    }
    let dir = scratch_dir("vblk-indirect");
    let sectors = 8192;
    let image = make_image(&dir, sectors);
    let daemon = Daemon::start(&dir, &image);
    let done = run_guest(
        &daemon.socket,
        "virtio-blk.sectors=8192 virtio-blk.depth=100 virtio-blk.req=16 virtio-blk.indirect=1 \
         virtio-blk.event_idx=0 virtio-blk.reset=1 virtio-blk.seed=0xfeed",
    );
    daemon.stop();
    let lines = assert_ok(&done);
    let (offered, features) = assert_setup(&lines, sectors);
    assert_eq!(features & VIRTIO_F_EVENT_IDX, 0, "EVENT_IDX not asked for");
    if offered & VIRTIO_F_INDIRECT_DESC != 0 {
        assert_ne!(features & VIRTIO_F_INDIRECT_DESC, 0);
        // One descriptor per request: the depth is not cut to a third of the queue.
        assert_eq!(field(&lines, "mode=", "depth"), Some("100"));
    }
    for expected in [
        "wrote 8192 sectors",
        "verified 8192 sectors",
        "resetting the device",
        "verified 8192 sectors after reset",
    ] {
        assert!(lines.contains(&expected), "{expected:?}: {}", report(&done));
    }
    assert_image(&image, sectors, 8192, 0xfeed);
}

/// The backend serves 4 queues; the device shows 1 (the default) or 2. The configuration's
/// `num_queues` must say what the transport has, or a driver that negotiates MQ would set up
/// queues that do not exist (the guest checks this and exits 19).
#[test]
fn config_num_queues_matches_the_transport_when_the_backend_has_more() {
    if !qsd_installed() {
        return;
    }
    let dir = scratch_dir("vblk-queues");
    let image = make_image(&dir, 2048);
    let daemon = Daemon::start_with_queues(&dir, &image, 4);
    for queues in [1, 2] {
        let device = format!("blk,socket={},queues={queues}", daemon.socket.display());
        let done = run_guest_on(&device, "virtio-blk.sectors=256 virtio-blk.seed=3");
        let lines = assert_ok(&done);
        assert_eq!(
            field(&lines, "offered=", "queues"),
            Some(queues.to_string().as_str()),
            "{}",
            report(&done)
        );
        assert!(lines.contains(&"verified 256 sectors"));
    }
    daemon.stop();
    assert_image(&image, 2048, 256, 3);
}

#[test]
fn verify_mode_accepts_the_pattern_and_reports_the_first_corrupt_sector() {
    if !qsd_installed() {
        return;
    }
    let dir = scratch_dir("vblk-verify");
    let sectors = 2048u64;
    let image = make_image(&dir, sectors);
    let mut bytes: Vec<u8> = (0..1024).flat_map(|s| pattern(s, 42)).collect();
    bytes.resize(sectors as usize * SECTOR, 0);
    std::fs::write(&image, &bytes).unwrap();

    let daemon = Daemon::start(&dir, &image);
    let done = run_guest(
        &daemon.socket,
        "virtio-blk.mode=verify virtio-blk.sectors=1024 virtio-blk.seed=42",
    );
    daemon.stop();
    let lines = assert_ok(&done);
    assert!(
        lines.contains(&"verified 1024 sectors"),
        "{}",
        report(&done)
    );

    // One flipped bit in sector 900 and one in 700's CRC: the lowest is reported.
    bytes[900 * SECTOR + 100] ^= 0x10;
    bytes[700 * SECTOR + 510] ^= 0x01;
    std::fs::write(&image, &bytes).unwrap();
    let daemon = Daemon::start(&dir, &image);
    let done = run_guest(
        &daemon.socket,
        "virtio-blk.mode=verify virtio-blk.sectors=1024 virtio-blk.seed=42 virtio-blk.depth=7",
    );
    daemon.stop();
    assert_eq!(done.status.code(), Some(EXIT_MISMATCH), "{}", report(&done));
    assert_eq!(
        guest_lines(&done).last(),
        Some(&"verify failed: first bad sector=700 (2 bad sectors)"),
        "{}",
        report(&done)
    );
}

#[test]
fn loop_mode_cycles_and_leaves_the_last_generation() {
    if !qsd_installed() {
        return;
    }
    let dir = scratch_dir("vblk-loop");
    let sectors = 4096;
    let image = make_image(&dir, sectors);
    let daemon = Daemon::start(&dir, &image);
    let done = run_guest(
        &daemon.socket,
        "virtio-blk.mode=loop virtio-blk.cycles=5 virtio-blk.sectors=1000 virtio-blk.seed=100 \
         virtio-blk.depth=32",
    );
    daemon.stop();
    let lines = assert_ok(&done);
    let progress: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("loop cycles="))
        .collect();
    assert!(!progress.is_empty(), "{}", report(&done));
    assert_eq!(
        field(&lines, "loop cycles=5 ", "requests"),
        Some("1250"),
        "last progress line: 5 x (125 writes + 125 reads)\n{}",
        report(&done)
    );
    assert!(lines.contains(&"loop done cycles=5 sectors=1000"));
    assert_image(&image, sectors, 1000, 104);
}

#[test]
fn hostile_requests_that_qemu_storage_daemon_survives() {
    if !qsd_installed() {
        return;
    }
    let dir = scratch_dir("vblk-hostile");
    let image = make_image(&dir, 2048);
    let daemon = Daemon::start(&dir, &image);
    let done = run_guest(
        &daemon.socket,
        "virtio-blk.mode=hostile virtio-blk.timeout=10 \
         virtio-blk.cases=short-header,read-past-end,unknown-type",
    );
    let log = daemon.stop();
    let lines = assert_ok(&done);
    let case = |name: &str| -> &str {
        lines
            .iter()
            .find_map(|l| {
                l.strip_prefix("hostile ")?
                    .strip_prefix(name)?
                    .strip_prefix(": ")
            })
            .unwrap_or_else(|| panic!("no line for {name}: {}", report(&done)))
    };
    let short = case("short-header");
    assert!(
        short == "dropped" || (short.starts_with("status=") && !short.starts_with("status=0 ")),
        "a header without the sector field must not succeed: {short}"
    );
    assert!(case("read-past-end").starts_with("status=1 (ioerr)"));
    assert!(case("unknown-type").starts_with("status=2 (unsupp)"));
    assert!(lines.contains(&"hostile ok"), "{}", report(&done));
    assert!(!log.contains("vu_panic"), "backend log:\n{log}");
}

/// Addresses outside guest RAM and looped chains make qemu-storage-daemon's libvhost-user
/// mark the device broken (`vu_panic`) and stop serving it. Whatever the backend does, the
/// guest must report the case and end within its time limits, and the core must carry on
/// until the guest exits: either the device still works ("hostile ok", exit 0) or the guest
/// says the follow-up request got no answer (exit 18).
#[test]
fn hostile_requests_that_break_qemu_storage_daemon_end_in_bounded_time() {
    if !qsd_installed() {
        return;
    }
    let cases = ["header-outside-ram", "data-outside-ram", "looped-chain"];
    std::thread::scope(|scope| {
        for name in cases {
            scope.spawn(move || {
                let dir = scratch_dir(&format!("vblk-hostile-{name}"));
                let image = make_image(&dir, 2048);
                let daemon = Daemon::start(&dir, &image);
                let started = Instant::now();
                let done = run_guest(
                    &daemon.socket,
                    &format!(
                        "virtio-blk.mode=hostile virtio-blk.timeout=3 virtio-blk.cases={name}"
                    ),
                );
                let elapsed = started.elapsed();
                let log = daemon.stop();
                assert!(!done.stderr.contains("panicked"), "{}", done.stderr);
                let lines = guest_lines(&done);
                let prefix = format!("hostile {name}: ");
                let outcome = lines
                    .iter()
                    .find_map(|l| l.strip_prefix(&prefix))
                    .unwrap_or_else(|| panic!("no line for {name}: {}", report(&done)));
                // Outside RAM any answer will do (some platforms read unbacked memory as
                // zeros); a looped chain has no end, so it must not succeed.
                assert!(
                    outcome == "dropped"
                        || (outcome.starts_with("status=")
                            && (name != "looped-chain" || !outcome.starts_with("status=0 "))),
                    "{name}: {outcome}"
                );
                let survived = done.status.success() && lines.contains(&"hostile ok");
                let gave_up = format!("{prefix}valid request afterwards got no answer");
                let broke = done.status.code() == Some(EXIT_HOSTILE)
                    && lines.last().is_some_and(|l| l.starts_with(&gave_up));
                assert!(survived || broke, "{name}: {}", report(&done));
                eprintln!(
                    "{name}: {outcome}; device {} ({elapsed:?}); backend: {}",
                    if survived {
                        "still works"
                    } else {
                        "stopped answering"
                    },
                    log.trim()
                );
            });
        }
    });
}

/// Isola's own backend behind Isola's frontend: the same workload and image check.
#[test]
fn isola_blk_serves_the_guest_and_the_image_holds_the_pattern() {
    let dir = scratch_dir("vblk-isola-normal");
    let sectors = 32768;
    let image = make_image(&dir, sectors);
    let socket = dir.join("blk.sock");
    let backend = IsolaBlk::start_with(&socket, &image, &["--engine", "io-uring"]);
    let done = run_guest(
        &socket,
        "virtio-blk.sectors=3001 virtio-blk.depth=16 virtio-blk.seed=9",
    );
    backend.kill();
    let lines = assert_ok(&done);
    let (_, features) = assert_setup(&lines, sectors);
    assert_ne!(
        features & VIRTIO_F_EVENT_IDX,
        0,
        "isola-blk offers EVENT_IDX"
    );
    for expected in ["wrote 3001 sectors", "flushed", "verified 3001 sectors"] {
        assert!(lines.contains(&expected), "{expected:?}: {}", report(&done));
    }
    assert_image(&image, sectors, 3001, 9);
}

/// With a kernel polling thread: the guest's I/O, a device reset (the queue's ring goes and a
/// new one attaches to the same poller) and the I/O after it.
#[test]
fn isola_blk_with_a_kernel_poller_serves_the_guest_across_a_device_reset() {
    let dir = scratch_dir("vblk-isola-sq-poll");
    let sectors = 8192;
    let image = make_image(&dir, sectors);
    let socket = dir.join("blk.sock");
    let backend = IsolaBlk::start_with(&socket, &image, &["--sq-poll-ms", "10"]);
    let done = run_guest(
        &socket,
        "virtio-blk.sectors=4096 virtio-blk.depth=32 virtio-blk.reset=1 virtio-blk.seed=0x5a",
    );
    backend.kill();
    let lines = assert_ok(&done);
    for expected in [
        "wrote 4096 sectors",
        "verified 4096 sectors",
        "resetting the device",
        "verified 4096 sectors after reset",
    ] {
        assert!(lines.contains(&expected), "{expected:?}: {}", report(&done));
    }
    assert_image(&image, sectors, 4096, 0x5a);
}

/// Every hostile case, including the three that break qemu-storage-daemon, gets an answer or
/// is dropped, and isola-blk keeps serving the valid request after each.
#[test]
fn isola_blk_survives_every_hostile_request() {
    let dir = scratch_dir("vblk-isola-hostile");
    let image = make_image(&dir, 2048);
    let socket = dir.join("blk.sock");
    let _backend = IsolaBlk::start(&socket, &image);
    let done = run_guest(&socket, "virtio-blk.mode=hostile virtio-blk.timeout=10");
    let lines = assert_ok(&done);
    assert!(lines.contains(&"hostile ok"), "{}", report(&done));
    // F6 through the guest: a read whose data buffer is device-readable gets IOERR.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("hostile readable-data: status=1 ")),
        "{}",
        report(&done)
    );
    // F3 through the guest: the wrapping chain is answered without a status (or dropped), and
    // the guest saw no write to low memory (it checks and would have failed).
    let wrap = lines
        .iter()
        .find(|l| l.starts_with("hostile wrapping-status: "))
        .unwrap_or_else(|| panic!("no line for wrapping-status: {}", report(&done)));
    assert!(
        !wrap.contains("status=0 ") && !wrap.contains("status=1 "),
        "{wrap}"
    );
    for case in [
        "header-outside-ram",
        "data-outside-ram",
        "looped-chain",
        "short-header",
    ] {
        let line = lines
            .iter()
            .find(|l| l.starts_with(&format!("hostile {case}: ")))
            .unwrap_or_else(|| panic!("no line for {case}: {}", report(&done)));
        assert!(
            !line.contains("status=0 "),
            "{case} must not succeed: {line}"
        );
    }
}
