//! Helpers for the `vdrivers` guest's tests (`tests/vdrivers_*.rs`): the guest's drivers are the
//! crates.io `virtio-drivers` crate, so these tests check Isola against a driver stack written
//! by other people. See tests/guests/README.md for the guest's modes and lines.

use std::path::Path;
use std::time::Duration;

use crate::{guest, Core, Finished};

/// Serial line prefix of the guest.
pub const PREFIX: &str = "vdrivers: ";
/// Generous bound for one guest run on this shared machine.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// `vdrivers.dev=<dev>` plus `extra` (space-separated `vdrivers.key=value` tokens).
pub fn cmdline(dev: &str, extra: &str) -> String {
    format!("vdrivers.dev={dev} {extra}")
}

/// Starts the core on the vdrivers guest with `devices` (`--device` values), 64 MiB and a
/// control socket in `dir`; returns it and the socket path.
pub fn start(
    dir: &Path,
    devices: &[String],
    cmdline: &str,
    extra: &[&str],
) -> (Core, std::path::PathBuf) {
    let kernel = guest("vdrivers.elf");
    let control_socket = dir.join("control.sock");
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        kernel.to_str().expect("utf-8 path").into(),
        "--memory".into(),
        "64".into(),
        "--control-socket".into(),
        control_socket.to_str().expect("utf-8 path").into(),
        "--cmdline".into(),
        cmdline.into(),
    ];
    for device in devices {
        args.push("--device".into());
        args.push(device.clone());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let core = Core::start(&refs);
    crate::wait_for_path(&control_socket, Duration::from_secs(20));
    (core, control_socket)
}

/// Everything a finished run printed, for failure messages.
pub fn report(done: &Finished) -> String {
    format!(
        "exit {:?}\nserial:\n{}\nstderr:\n{}",
        done.status,
        done.serial.join("\n"),
        done.stderr
    )
}

/// The guest's lines without the prefix.
pub fn lines(done: &Finished) -> Vec<&str> {
    done.serial
        .iter()
        .filter_map(|l| l.strip_prefix(PREFIX))
        .collect()
}

/// Asserts a clean run (exit 0, last line `ok`, no `FAIL`) and returns its lines.
pub fn assert_ok(done: &Finished) -> Vec<&str> {
    let lines = lines(done);
    assert!(
        done.status.success() && lines.last() == Some(&"ok"),
        "{}",
        report(done)
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("FAIL")),
        "{}",
        report(done)
    );
    lines
}

/// The value of `key=` in the first line that has it.
pub fn field<'a>(lines: &[&'a str], key: &str) -> Option<&'a str> {
    lines.iter().find_map(|l| {
        l.split(' ')
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    })
}

/// [`field`] as a number (decimal, or hex with 0x); panics with the lines if absent.
pub fn number(lines: &[&str], key: &str) -> u64 {
    let text = field(lines, key).unwrap_or_else(|| panic!("no {key}= in {lines:#?}"));
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .unwrap_or_else(|e| panic!("{key}={text}: {e}"))
}

/// The guest's splitmix64 (vdrivers/src/rt.rs).
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }
}

pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What the guest writes to `sector` with `seed` (vdrivers/src/blk.rs `pattern`).
pub fn sector_pattern(sector: u64, seed: u64) -> [u8; 512] {
    let base = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut out = [0u8; 512];
    for (i, word) in out.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&mix64(base ^ (sector << 6 | i as u64)).to_le_bytes());
    }
    out
}

/// The sectors the guest's blk `work` mode picks: `count` of splitmix64(`seed`) % capacity.
pub fn random_sectors(count: u64, seed: u64, capacity: u64) -> Vec<u64> {
    let mut rng = Rng(seed);
    (0..count).map(|_| rng.next() % capacity).collect()
}

/// VIRTIO_F_VERSION_1, VIRTIO_F_INDIRECT_DESC and VIRTIO_F_EVENT_IDX: in every driver's set.
pub const COMMON_FEATURES: u64 = (1 << 32) | (1 << 28) | (1 << 29);

/// Checks the `offered=` line against the crate driver's feature set `crate_set`: VERSION_1 is
/// offered, and returns the bits Isola offers that the crate leaves out (so the crate's subset,
/// not Isola's full set, is what the run negotiated).
pub fn features_beyond_crate(lines: &[&str], crate_set: u64) -> u64 {
    let offered = number(lines, "offered");
    assert_ne!(offered & (1 << 32), 0, "VERSION_1 offered: {offered:#x}");
    eprintln!(
        "offered {offered:#x}, the crate takes {:#x}",
        offered & crate_set
    );
    offered & !crate_set
}
