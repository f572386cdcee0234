//! USB mass-storage benchmark: 4 KiB random-read IOPS through a guest, against isola-usb's
//! bulk-only disk (the `usb` test guest's own xHCI driver, through isola-core's vfio-user
//! frontend) and against isola-blk (the `virtio-blk` test guest, through the core's
//! vhost-user frontend), on the same image file, in one run.
//!
//! Both guests read 8 sectors at random 4 KiB-aligned offsets across the whole image, one
//! request at a time (bulk-only transport carries one command at a time; virtio-blk runs at
//! depth 1 to match), for a fixed time, and check that every sector read starts with its own
//! number (the image is prepared so). The two targets alternate within every round (the
//! order flips each round), so slow phases of the shared machine hit both alike. Reported:
//! median IOPS of each with the spread (lowest and highest round), and the ratio usb /
//! virtio-blk of the medians and of each round.
//!
//! `cargo bench -p isola-tests --bench usb`. Environment:
//! - `ISOLA_BENCH_REPEAT`: rounds (default 5);
//! - `ISOLA_BENCH_MS`: time each guest reads per round, in milliseconds (default 3000).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use isola_tests::{binary, guest, scratch_dir, wait_for_path, Core, IsolaBlk};

const IMAGE_SIZE: u64 = 64 << 20;
const SECTOR: usize = 512;
/// Enumeration and device set-up before the reads start (a nested-KVM machine is slow).
const SETUP: Duration = Duration::from_secs(120);

/// The image: every 512-byte sector starts with its number (u64, little endian), the rest is
/// data that is not zeros, so reads are not served from holes.
fn prepare_image(dir: &Path) -> PathBuf {
    let path = dir.join("bench.img");
    let mut bytes = vec![0u8; IMAGE_SIZE as usize];
    for (n, sector) in bytes.chunks_mut(SECTOR).enumerate() {
        sector[..8].copy_from_slice(&(n as u64).to_le_bytes());
        for (i, b) in sector[8..].iter_mut().enumerate() {
            *b = ((n as u32).wrapping_mul(2_654_435_761) ^ (i as u32).wrapping_mul(40_503) >> 3)
                as u8;
        }
    }
    std::fs::write(&path, &bytes).expect("image is writable");
    path
}

/// One guest run: reads completed, milliseconds the guest measured.
struct Run {
    reads: u64,
    ms: u64,
}

impl Run {
    fn iops(&self) -> f64 {
        self.reads as f64 * 1000.0 / self.ms.max(1) as f64
    }
}

/// `reads=<n> ms=<t>` from a guest's bench line.
fn parse(line: &str) -> Run {
    let field = |key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
    };
    Run {
        reads: field("reads="),
        ms: field("ms="),
    }
}

/// Runs `kernel` on isola-core with one `device` and `cmdline`, and returns its bench line
/// (`<prefix>bench reads=`); the guest must then say `<prefix>ok` and power off.
fn run_guest(kernel: &str, device: &str, cmdline: &str, prefix: &str, ms: u64) -> Run {
    let kernel = guest(kernel);
    let mut core = Core::start(&[
        "--kernel",
        kernel.to_str().expect("utf-8 path"),
        "--memory",
        "64",
        "--device",
        device,
        "--cmdline",
        cmdline,
    ]);
    core.wait_for(&format!("{prefix}bench start"), SETUP);
    let line = core.wait_for(
        &format!("{prefix}bench reads="),
        Duration::from_millis(ms) + Duration::from_secs(60),
    );
    core.wait_for(&format!("{prefix}ok"), Duration::from_secs(30));
    core.finish(Duration::from_secs(30)).assert_success();
    parse(&line)
}

/// isola-usb serving `image` as its disk; killed when dropped.
struct Usb(Child);

impl Drop for Usb {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_usb(dir: &Path, image: &Path, ms: u64) -> Run {
    let socket = dir.join("usb.sock");
    let _ = std::fs::remove_file(&socket);
    let _usb = Usb(Command::new(binary("isola-usb"))
        .arg("--socket")
        .arg(&socket)
        .arg("--control-socket")
        .arg(dir.join("input-control.sock"))
        .arg("--disk")
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("isola-usb starts"));
    wait_for_path(&socket, Duration::from_secs(20));
    run_guest(
        "usb.elf",
        &format!("vfio-user,socket={}", socket.display()),
        &format!("usb.mode=bench usb.ms={ms}"),
        "usb: ",
        ms,
    )
}

fn run_blk(dir: &Path, image: &Path, ms: u64) -> Run {
    let socket = dir.join("blk.sock");
    let _blk = IsolaBlk::start(&socket, image);
    run_guest(
        "virtio-blk.elf",
        &format!("blk,socket={}", socket.display()),
        &format!("virtio-blk.mode=bench virtio-blk.depth=1 virtio-blk.req=8 virtio-blk.ms={ms}"),
        "virtio-blk: ",
        ms,
    )
}

/// The median of `values` (the upper one of an even count).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn spread(values: &[f64]) -> (f64, f64) {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let rounds = env_u64("ISOLA_BENCH_REPEAT", 5).max(1) as usize;
    let ms = env_u64("ISOLA_BENCH_MS", 3000).max(1);
    let dir = scratch_dir("bench-usb");
    let image = prepare_image(&dir);
    let (mut usb, mut blk) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // The order flips every round.
        let (u, b) = if round % 2 == 0 {
            let u = run_usb(&dir, &image, ms);
            (u, run_blk(&dir, &image, ms))
        } else {
            let b = run_blk(&dir, &image, ms);
            (run_usb(&dir, &image, ms), b)
        };
        println!(
            "  round {}: usb {:.0} IOPS ({} reads in {} ms)   virtio-blk {:.0} IOPS ({} reads in {} ms)   ratio {:.3}",
            round + 1,
            u.iops(),
            u.reads,
            u.ms,
            b.iops(),
            b.reads,
            b.ms,
            u.iops() / b.iops()
        );
        usb.push(u.iops());
        blk.push(b.iops());
    }
    let ratios: Vec<f64> = usb.iter().zip(&blk).map(|(u, b)| u / b).collect();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "4 KiB random reads, one at a time, through the guest, on one {} MiB image (page cache), {ms} ms per guest run, {rounds} rounds interleaved, {profile} build",
        IMAGE_SIZE >> 20
    );
    for (name, values) in [
        ("isola-usb (xHCI, bulk-only, vfio-user)", &usb),
        ("isola-blk (virtio-blk, vhost-user)", &blk),
    ] {
        let (lo, hi) = spread(values);
        println!(
            "  {name:<40} median {:>8.0} IOPS   spread {lo:.0}..{hi:.0}",
            median(values)
        );
    }
    let (lo, hi) = spread(&ratios);
    println!(
        "  usb / virtio-blk: {:.3} (ratio of the medians); per round median {:.3}, spread {lo:.3}..{hi:.3}",
        median(&usb) / median(&blk),
        median(&ratios)
    );
}
