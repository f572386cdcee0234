//! Helpers for the console tests: an `isola-console` process whose log lines are kept in a
//! file (so a test can count what each incarnation did), and the guest's stream pattern.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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

/// The length of the file at `path` and the first offset where it differs from the stream,
/// if any; read a MiB at a time and compared word by word, for logs of gigabytes.
pub fn file_stream_mismatch(path: &Path) -> (u64, Option<u64>) {
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let len = file.metadata().expect("a file's metadata").len();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        // Whole reads of the buffer but the last, so `at` stays a multiple of 4 until then.
        let mut n = 0;
        while n < buf.len() {
            match file.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => panic!("{}: {e}", path.display()),
            }
        }
        let chunk = &buf[..n];
        let words = chunk.chunks_exact(4);
        let tail = words.remainder();
        for (i, w) in words.enumerate() {
            let pos = at + 4 * i as u64;
            if w != ((pos >> 2) as u32).to_le_bytes() {
                let off = w
                    .iter()
                    .zip(((pos >> 2) as u32).to_le_bytes())
                    .position(|(a, b)| *a != b);
                return (len, Some(pos + off.unwrap_or(0) as u64));
            }
        }
        let base = at + (n - tail.len()) as u64;
        if let Some(i) = (0..tail.len()).find(|&i| tail[i] != stream_byte(base + i as u64)) {
            return (len, Some(base + i as u64));
        }
        at += n as u64;
        if n < buf.len() {
            return (at, None);
        }
    }
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

/// A user on the console socket who reads slowly and attaches again whenever the device
/// process is restarted, so transmit buffers are usually held when the kill comes (and the
/// guest's stream goes at the reader's pace, not the disk's). `stop`: 1 asks it to type `q`
/// (the `stream` guest stops on input), which makes it 2; 3 ends it. Returns the bytes read.
pub fn slow_user(path: PathBuf, stop: Arc<AtomicU64>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut total = 0u64;
        let mut buf = [0u8; 16 * 1024];
        while stop.load(Ordering::SeqCst) < 3 {
            let Ok(mut s) = UnixStream::connect(&path) else {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            };
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            while stop.load(Ordering::SeqCst) < 3 {
                if stop.load(Ordering::SeqCst) == 1 && s.write_all(b"q").is_ok() {
                    // Told the guest to finish; keep reading what it still sends.
                    stop.store(2, Ordering::SeqCst);
                }
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => break,
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        total
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_of_the_stream_matches_and_one_wrong_byte_is_found_where_it_is() {
        let dir = crate::scratch_dir("stream-file");
        let path = dir.join("log");
        let len = (2 << 20) + 3;
        let mut data: Vec<u8> = (0..len).map(stream_byte).collect();
        std::fs::write(&path, &data).unwrap();
        assert_eq!(file_stream_mismatch(&path), (len, None));
        for at in [5, (1 << 20) + 2, len - 1] {
            data[at as usize] ^= 1;
            std::fs::write(&path, &data).unwrap();
            assert_eq!(file_stream_mismatch(&path), (len, Some(at)), "at {at}");
            data[at as usize] ^= 1;
        }
    }
}
