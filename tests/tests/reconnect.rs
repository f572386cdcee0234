//! The core survives its block backend being killed: it notices the hang-up, waits for a new
//! backend on the same socket, checks it matches (features, disk size), restores the rings and
//! the guest carries on.
//!
//! The backend here is qemu-storage-daemon, which has no in-flight tracking: the core resumes
//! its rings at the used index. That is exact only while at most one request is in flight; with
//! more, a dead backend that completed out of order gets requests replayed (observed: the guest
//! saw a completion for a descriptor it no longer had in flight). So these tests run the guest
//! at queue depth 1; deep queues need a backend that keeps the in-flight region.

use std::path::Path;
use std::time::Duration;

use isola_ipc::DeviceLink;
use isola_tests::qsd::{qsd_installed, Daemon};
use isola_tests::IsolaBlk;
use isola_tests::{guest, scratch_dir, wait_device, Core};

const SECTOR: u64 = 512;
/// Queue depth for qemu-storage-daemon: see the module documentation.
const QSD_DEPTH: u32 = 1;

fn image(dir: &Path, name: &str, sectors: u64) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .set_len(sectors * SECTOR)
        .unwrap();
    path
}

/// The virtio-blk guest's I/O loop for `seconds` at queue `depth` on `blk`, with a control socket.
fn start_core(dir: &Path, blk: &Path, seconds: u32, depth: u32) -> (Core, std::path::PathBuf) {
    let kernel = guest("virtio-blk.elf");
    let device = format!("blk,socket={}", blk.display());
    let cmdline =
        format!("virtio-blk.mode=loop virtio-blk.seconds={seconds} virtio-blk.sectors=256 virtio-blk.depth={depth}");
    Core::start_with_device(dir, &kernel, &device, &cmdline)
}

#[test]
fn guest_io_survives_repeated_backend_kills() {
    if !qsd_installed() {
        return;
    }
    const KILLS: u32 = 5;
    let dir = scratch_dir("reconnect-kills");
    let disk = image(&dir, "disk.img", 4096);
    let mut daemon = Daemon::start(&dir, &disk);
    let (mut core, control_socket) = start_core(&dir, &daemon.socket.clone(), 8, QSD_DEPTH);
    core.wait_for("virtio-blk: loop cycles=", Duration::from_secs(30));
    // Kill at varied moments: a fixed pseudo-random sequence of delays, 50-450 ms.
    let mut seed = 0x2545_f491_u32;
    for kill in 1..=KILLS {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        std::thread::sleep(Duration::from_millis(50 + u64::from(seed % 400)));
        daemon.kill();
        wait_device(&mut core, &control_socket, "reconnecting", |d| {
            d.link == DeviceLink::Reconnecting
        });
        daemon = Daemon::start(&dir, &disk);
        let status = wait_device(&mut core, &control_socket, "connected", |d| {
            d.link == DeviceLink::Connected
        });
        assert_eq!(status.reconnects, kill);
    }
    let progress = core.wait_for("virtio-blk: loop cycles=", Duration::from_secs(30));
    let done = core.finish(Duration::from_secs(60));
    done.assert_success();
    assert!(
        done.serial.iter().any(|l| l == "virtio-blk: ok"),
        "{:?}",
        done.serial
    );
    assert!(progress.contains("requests="), "{progress}");
    daemon.stop();
}

#[test]
fn restarted_backend_with_another_disk_size_is_refused_until_the_right_one_returns() {
    if !qsd_installed() {
        return;
    }
    let dir = scratch_dir("reconnect-refused");
    let disk = image(&dir, "disk.img", 4096);
    let other_dir = dir.join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let small = image(&other_dir, "small.img", 2048);
    let daemon = Daemon::start(&dir, &disk);
    let blk_socket = daemon.socket.clone();
    let (mut core, control_socket) = start_core(&dir, &blk_socket, 6, QSD_DEPTH);
    core.wait_for("virtio-blk: loop cycles=", Duration::from_secs(30));

    daemon.kill();
    wait_device(&mut core, &control_socket, "reconnecting", |d| {
        d.link == DeviceLink::Reconnecting
    });
    // A backend with half the disk appears on the same socket path.
    let wrong = Daemon::start(&other_dir, &small);
    std::fs::rename(&wrong.socket, &blk_socket).unwrap();
    let refused = wait_device(&mut core, &control_socket, "refused", |d| {
        matches!(d.link, DeviceLink::Refused(_))
    });
    let DeviceLink::Refused(why) = &refused.link else {
        unreachable!()
    };
    assert!(why.contains("disk size"), "{why}");
    let (ok, out) = isolactl_status(&control_socket);
    assert!(
        ok && out.contains("refused (") && out.contains("disk size"),
        "{out}"
    );
    wrong.kill();

    // The right backend comes back: the core adopts it within its retry period.
    let daemon = Daemon::start(&dir, &disk);
    let back = wait_device(&mut core, &control_socket, "connected", |d| {
        d.link == DeviceLink::Connected
    });
    assert_eq!(back.reconnects, 1);
    let done = core.finish(Duration::from_secs(60));
    done.assert_success();
    assert!(
        done.stderr.contains("refusing the restarted backend"),
        "{}",
        done.stderr
    );
    daemon.stop();
}

fn isolactl_status(socket: &Path) -> (bool, String) {
    let out = std::process::Command::new(isola_tests::binary("isolactl"))
        .arg("--socket")
        .arg(socket)
        .arg("status")
        .output()
        .expect("isolactl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn deep_queue_io_survives_twenty_isola_blk_kills_with_nothing_lost() {
    kills_lose_nothing("reconnect-isola-blk", 20, &[]);
}

/// The same with a kernel thread running the I/O (io_uring SQPOLL): a kill finds requests
/// in that thread's hands as well as in the queue thread's.
#[test]
fn deep_queue_io_survives_isola_blk_kills_with_a_kernel_polling_thread() {
    kills_lose_nothing("reconnect-isola-blk-sq-poll", 10, &["--sq-poll-ms", "10"]);
}

/// `KILLS` SIGKILLs of isola-blk (started with `args`) while the guest's I/O loop runs at
/// depth 16; the guest verifies every sector it reads and finishes clean.
fn kills_lose_nothing(name: &str, kills: u32, args: &[&str]) {
    let dir = scratch_dir(name);
    let disk = image(&dir, "disk.img", 4096);
    let blk_socket = dir.join("blk.sock");
    let mut backend = IsolaBlk::start_with(&blk_socket, &disk, args);
    let (mut core, control_socket) = start_core(&dir, &blk_socket, 14, 16);
    let first = core.wait_for("virtio-blk: loop cycles=", Duration::from_secs(30));
    let mut seed = 0x9e37_79b9_u32;
    for kill in 1..=kills {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        // 260-560 ms apart: always mid-request at depth 16, and past the core's flap window.
        std::thread::sleep(Duration::from_millis(260 + u64::from(seed % 300)));
        backend.kill();
        backend = IsolaBlk::start_with(&blk_socket, &disk, args);
        let status = wait_device(&mut core, &control_socket, "connected", |d| {
            d.link == DeviceLink::Connected && d.reconnects == kill
        });
        assert_eq!(status.reconnects, kill);
    }
    // The guest kept running throughout: its request counter moved on.
    let last = core.wait_for("virtio-blk: loop cycles=", Duration::from_secs(30));
    let count = |line: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("requests="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    assert!(count(&last) > count(&first), "{first} / {last}");
    let done = core.finish(Duration::from_secs(60));
    done.assert_success();
    assert!(
        done.serial.iter().any(|l| l == "virtio-blk: ok"),
        "{:?}",
        done.serial
    );
}
