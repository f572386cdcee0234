//! Helpers for the console tests: an `isola-console` process whose log lines are kept in a
//! file (so a test can count what each incarnation did), and the guest's stream pattern.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{binary, wait_for_path};

/// An `isola-console` device process; killed when dropped.
pub struct IsolaConsole {
    child: Child,
}

impl IsolaConsole {
    /// Starts `isola-console --socket SOCKET ARGS...`, appending its log to `log`, and waits
    /// for the socket.
    pub fn start(socket: &Path, args: &[&str], log: &Path) -> IsolaConsole {
        let _ = std::fs::remove_file(socket);
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file opens");
        let child = Command::new(binary("isola-console"))
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .spawn()
            .expect("isola-console starts");
        wait_for_path(socket, Duration::from_secs(20));
        IsolaConsole { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running (not exited or killed).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, as a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for IsolaConsole {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Byte `pos` of the `virtio-console` guest's stream: byte `pos % 4` of the little-endian
/// u32 `pos / 4`.
pub fn stream_byte(pos: u64) -> u8 {
    ((pos >> 2) as u32).to_le_bytes()[(pos & 3) as usize]
}

/// The first offset where `data` differs from the stream, if any.
pub fn stream_mismatch(data: &[u8]) -> Option<usize> {
    data.iter()
        .enumerate()
        .find(|&(i, &b)| b != stream_byte(i as u64))
        .map(|(i, _)| i)
}

/// A number from a serial line's `key=value` word.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// The `virtio-console` guest image.
pub fn console_guest() -> PathBuf {
    crate::guest("virtio-console.elf")
}
