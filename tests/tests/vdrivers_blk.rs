//! virtio-blk driven by the crates.io `virtio-drivers` crate (the `vdrivers` guest) against
//! `isola-blk`: random-sector write/flush/read-back with verification (and the image checked
//! from the host), a read-only disk, 100 resets, every queue size, and the device process
//! killed mid-work.

use std::path::{Path, PathBuf};
use std::time::Duration;

use isola_ipc::DeviceLink;
use isola_tests::vdrivers::{self, assert_ok, cmdline, field, number, report, RUN_TIMEOUT};
use isola_tests::{scratch_dir, wait_device, IsolaBlk};

const SECTOR: u64 = 512;
/// VIRTIO_F_VERSION_1, and the crate's whole virtio-blk feature set (blk.rs SUPPORTED_FEATURES):
/// RO, FLUSH, INDIRECT_DESC, EVENT_IDX, VERSION_1.
const VERSION_1: u64 = 1 << 32;
const CRATE_BLK_FEATURES: u64 = (1 << 5) | (1 << 9) | (1 << 28) | (1 << 29) | VERSION_1;

fn image(dir: &Path, sectors: u64) -> PathBuf {
    let path = dir.join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(sectors * SECTOR)
        .unwrap();
    path
}

fn device(socket: &Path) -> Vec<String> {
    vec![format!("blk,socket={}", socket.display())]
}

#[test]
fn blk_ten_thousand_random_sectors_written_flushed_and_read_back() {
    let dir = scratch_dir("vd-blk-work");
    let sectors = 65536; // 32 MiB
    let disk = image(&dir, sectors);
    let socket = dir.join("blk.sock");
    let _blk = IsolaBlk::start(&socket, &disk);
    let seed = 11;
    let (core, _) = vdrivers::start(
        &dir,
        &device(&socket),
        &cmdline("blk", &format!("vdrivers.count=10000 vdrivers.seed={seed}")),
        &[],
    );
    let done = core.finish(RUN_TIMEOUT);
    let lines = assert_ok(&done);
    assert_eq!(number(&lines, "capacity"), sectors, "{}", report(&done));
    assert_eq!(field(&lines, "readonly"), Some("0"));
    for expected in ["wrote 10000 sectors", "flushed", "verified 10000 sectors"] {
        assert!(lines.contains(&expected), "{expected}: {}", report(&done));
    }
    assert_eq!(number(&lines, "requests"), 20_000);
    // Isola offers more than the crate takes; the crate's subset is what ran.
    let offered = number(&lines, "offered");
    assert_ne!(offered & VERSION_1, 0);
    assert_ne!(offered & !CRATE_BLK_FEATURES, 0, "offered {offered:#x}");
    // The host sees exactly the guest's pattern on the chosen sectors and zeros elsewhere.
    let chosen: std::collections::HashSet<u64> = vdrivers::random_sectors(10_000, seed, sectors)
        .into_iter()
        .collect();
    let bytes = std::fs::read(&disk).unwrap();
    for (n, data) in bytes.chunks(SECTOR as usize).enumerate() {
        let n = n as u64;
        if chosen.contains(&n) {
            assert!(
                data == vdrivers::sector_pattern(n, seed),
                "sector {n} differs"
            );
        } else {
            assert!(data.iter().all(|&b| b == 0), "sector {n} was not written");
        }
    }
    eprintln!(
        "vdrivers blk: {} distinct sectors, 20000 requests in {} ms",
        chosen.len(),
        number(&lines, "ms")
    );
}

#[test]
fn blk_read_only_disk_refuses_writes_with_ioerr() {
    let dir = scratch_dir("vd-blk-ro");
    let disk = image(&dir, 2048);
    std::fs::write(&disk, vec![0x5a; 2048 * SECTOR as usize]).unwrap();
    let socket = dir.join("blk.sock");
    let _blk = IsolaBlk::start_with(&socket, &disk, &["--readonly"]);
    let (core, _) = vdrivers::start(
        &dir,
        &device(&socket),
        &cmdline("blk", "vdrivers.mode=ro"),
        &[],
    );
    let done = core.finish(RUN_TIMEOUT);
    let lines = assert_ok(&done);
    assert_eq!(field(&lines, "readonly"), Some("1"));
    for expected in ["read ok", "write refused: IOERR", "read after refusal ok"] {
        assert!(lines.contains(&expected), "{expected}: {}", report(&done));
    }
    let bytes = std::fs::read(&disk).unwrap();
    assert!(
        bytes.iter().all(|&b| b == 0x5a),
        "the read-only image changed"
    );
}

#[test]
fn blk_reset_and_reinitialised_a_hundred_times_with_io_between() {
    let dir = scratch_dir("vd-blk-resets");
    let disk = image(&dir, 4096);
    let socket = dir.join("blk.sock");
    let _blk = IsolaBlk::start(&socket, &disk);
    let (core, _) = vdrivers::start(
        &dir,
        &device(&socket),
        &cmdline("blk", "vdrivers.mode=resets vdrivers.resets=100"),
        &[],
    );
    let done = core.finish(RUN_TIMEOUT);
    let lines = assert_ok(&done);
    assert!(
        lines.contains(&"resets=100 each verified"),
        "{}",
        report(&done)
    );
}

#[test]
fn blk_every_power_of_two_queue_size_with_and_without_indirect_descriptors() {
    let dir = scratch_dir("vd-blk-qsizes");
    let disk = image(&dir, 4096);
    let socket = dir.join("blk.sock");
    let _blk = IsolaBlk::start(&socket, &disk);
    let (core, _) = vdrivers::start(
        &dir,
        &device(&socket),
        &cmdline("blk", "vdrivers.mode=qsizes"),
        &[],
    );
    let done = core.finish(RUN_TIMEOUT);
    let lines = assert_ok(&done);
    let max = number(&lines, "max-queue-size");
    assert!(max.is_power_of_two() && max <= 256, "{}", report(&done));
    let log2 = u64::from(max.trailing_zeros());
    // 2..=max, direct and indirect (size 1 cannot hold a two-buffer request: virtio 1.2
    // 2.7.5.3.1).
    assert_eq!(number(&lines, "tested"), 2 * log2, "{}", report(&done));
    for size in (1..=log2).map(|k| 1u64 << k) {
        assert!(
            lines.contains(&format!("size={size} indirect=0 requests={}", 2 * size).as_str()),
            "size {size}: {}",
            report(&done)
        );
        assert!(
            lines.contains(&format!("size={size} indirect=1 requests={}", 4 * size).as_str()),
            "size {size}: {}",
            report(&done)
        );
    }
}

#[test]
fn blk_device_process_killed_mid_work_is_only_a_pause() {
    const KILLS: u32 = 3;
    let dir = scratch_dir("vd-blk-kill");
    let disk = image(&dir, 4096);
    let socket = dir.join("blk.sock");
    let mut blk = IsolaBlk::start(&socket, &disk);
    let (mut core, control) = vdrivers::start(
        &dir,
        &device(&socket),
        &cmdline(
            "blk",
            "vdrivers.mode=loop vdrivers.count=512 vdrivers.ms=6000",
        ),
        &["--device-timeout", "20"],
    );
    core.wait_for("vdrivers: round 1 verified", Duration::from_secs(60));
    for kill in 1..=KILLS {
        std::thread::sleep(Duration::from_millis(300 + 150 * u64::from(kill)));
        blk.kill();
        blk = IsolaBlk::start(&socket, &disk);
        wait_device(&mut core, &control, "reconnected", |d| {
            d.link == DeviceLink::Connected && d.reconnects == kill
        });
    }
    let done = core.finish(RUN_TIMEOUT);
    let lines = assert_ok(&done);
    assert!(number(&lines, "rounds") >= 2, "{}", report(&done));
    eprintln!(
        "vdrivers blk kills: longest wait {} ms",
        number(&lines, "longest-wait-ms")
    );
    drop(blk);
}
