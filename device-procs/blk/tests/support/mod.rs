//! Shared by the process-level tests: scratch directories and `isola-blk` run as a user
//! runs it, from the built binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use isola_device_common::testing::{self, GuestRam, SplitQueue};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use vm_memory::{Bytes, GuestAddress};

pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A scratch directory, removed on drop.
pub use isola_device_common::testing::Scratch;

/// A running `isola-blk`, killed on drop. Its stderr goes to a file.
pub struct Backend {
    pub child: Child,
    pub log: PathBuf,
}

impl Backend {
    pub fn start(socket: &Path, image: &Path, log: PathBuf, extra: &[&str]) -> Backend {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(env!("CARGO_BIN_EXE_isola-blk"))
            .arg("--socket")
            .arg(socket)
            .arg("--image")
            .arg(image)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "isola-blk did not create {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Backend { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has at least `n` lines containing `needle`.
    pub fn wait_log(&self, needle: &str, n: usize) -> bool {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            if self.log_text().matches(needle).count() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A repeatable byte stream.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writes an image of `size` bytes whose every byte depends on its offset.
pub fn patterned_image(path: &Path, size: u64) -> Vec<u8> {
    let data: Vec<u8> = (0..size)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

/// Reads 4 KiB at sector 8 through a fresh frontend connection and checks the data; returns
/// the frontend and memory so the caller can keep the connection open.
pub fn read_once(socket: &Path, image: &[u8]) -> (vhost::vhost_user::Frontend, GuestRam) {
    let ram = GuestRam::new(2 << 20);
    let mut fe = testing::connect_with_memory(socket, &ram, TIMEOUT);
    let mut q = SplitQueue::new(0, 16, GuestAddress(0));
    testing::start_queue(&mut fe, &q, &ram, 0);
    let (hdr, data, status) = (
        GuestAddress(0x10_0000),
        GuestAddress(0x11_0000),
        GuestAddress(0x12_0000),
    );
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    raw[8..].copy_from_slice(&8u64.to_le_bytes());
    ram.memory().write_slice(&raw, hdr).unwrap();
    let head = q.add(
        ram.memory(),
        &[(hdr, 16, false), (data, 4096, true), (status, 1, true)],
    );
    q.publish(ram.memory(), head);
    q.kick();
    assert!(q.wait_used(ram.memory(), 1, TIMEOUT));
    assert_eq!(ram.memory().read_obj::<u8>(status).unwrap(), 0);
    let mut got = vec![0u8; 4096];
    ram.memory().read_slice(&mut got, data).unwrap();
    assert!(got == image[4096..8192]);
    (fe, ram)
}
