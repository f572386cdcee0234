//! The delivery record of a log port: which transmit buffer is being appended to the log, and
//! at which file offset it started. It lives in a small file next to the log
//! (`LOG.isola-record`) so that it outlives this process.
//!
//! Why: a transmit buffer is returned to the guest only after its bytes are in the log. If
//! the process is killed between the two, the in-flight region makes the next process
//! resubmit the buffer, and appending it again would duplicate bytes. The log's own length is
//! the exact measure of what reached it (a `write` killed half-way leaves a shorter file, never
//! a torn count), so recording the start offset *before* the first byte is written lets the
//! next process compute how much of the resubmitted buffer is already there:
//! `len(log) - start`, and append only the rest.
//!
//! The record is one 24-byte `pwrite` inside one page, which a kill cannot tear. Layout
//! (little endian): magic `ISCR` u32, valid u32, head u32, reserved u32, start u64.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: u32 = u32::from_le_bytes(*b"ISCR");
const SIZE: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot open the record file {}", .0.display())]
    Open(PathBuf, #[source] std::io::Error),
    #[error("cannot update the record file")]
    Write(#[source] std::io::Error),
}

/// The record file of one log.
#[derive(Debug)]
pub struct Record {
    file: File,
    current: Option<(u16, u64)>,
}

impl Record {
    /// Where the record of `log` lives.
    pub fn path_for(log: &Path) -> PathBuf {
        let mut name = log.as_os_str().to_owned();
        name.push(".isola-record");
        PathBuf::from(name)
    }

    /// Opens (or creates) the record file and reads what it holds; a file that is not a
    /// record (wrong size or magic) counts as empty.
    pub fn open(path: &Path) -> Result<Record, RecordError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| RecordError::Open(path.to_owned(), e))?;
        let mut raw = [0u8; SIZE];
        let current = match file.read_exact_at(&mut raw, 0) {
            Ok(()) => decode(&raw),
            Err(_) => None,
        };
        Ok(Record { file, current })
    }

    /// The transmit buffer (head) being appended, and the log offset it started at.
    pub fn get(&self) -> Option<(u16, u64)> {
        self.current
    }

    /// Records that buffer `head` starts at log offset `start`; nothing of it is written yet.
    pub fn set(&mut self, head: u16, start: u64) -> Result<(), RecordError> {
        self.store(Some((head, start)))
    }

    /// No buffer is being appended.
    pub fn clear(&mut self) -> Result<(), RecordError> {
        if self.current.is_none() {
            return Ok(());
        }
        self.store(None)
    }

    fn store(&mut self, value: Option<(u16, u64)>) -> Result<(), RecordError> {
        let mut raw = [0u8; SIZE];
        raw[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        if let Some((head, start)) = value {
            raw[4..8].copy_from_slice(&1u32.to_le_bytes());
            raw[8..12].copy_from_slice(&u32::from(head).to_le_bytes());
            raw[16..24].copy_from_slice(&start.to_le_bytes());
        }
        self.file
            .write_all_at(&raw, 0)
            .map_err(RecordError::Write)?;
        self.current = value;
        Ok(())
    }
}

fn decode(raw: &[u8; SIZE]) -> Option<(u16, u64)> {
    let word = |at: usize| u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
    if word(0) != MAGIC || word(4) != 1 {
        return None;
    }
    let head = u16::try_from(word(8)).ok()?;
    let mut start = [0u8; 8];
    start.copy_from_slice(&raw[16..24]);
    Some((head, u64::from_le_bytes(start)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_and_garbage_reads_as_empty() {
        let dir = std::env::temp_dir().join(format!("isola-console-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = Record::path_for(&dir.join("c.log"));
        assert!(path.ends_with("c.log.isola-record"));
        let _ = std::fs::remove_file(&path);
        let mut r = Record::open(&path).unwrap();
        assert_eq!(r.get(), None);
        r.set(7, 1 << 40).unwrap();
        assert_eq!(Record::open(&path).unwrap().get(), Some((7, 1 << 40)));
        r.clear().unwrap();
        assert_eq!(Record::open(&path).unwrap().get(), None);
        std::fs::write(&path, b"not a record at all, no").unwrap();
        assert_eq!(Record::open(&path).unwrap().get(), None);
        let mut raw = [0u8; SIZE];
        raw[0..4].copy_from_slice(b"ISCR");
        raw[4] = 1;
        raw[8..12].copy_from_slice(&0x1_0000u32.to_le_bytes());
        std::fs::write(&path, raw).unwrap();
        assert_eq!(Record::open(&path).unwrap().get(), None, "head beyond u16");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
