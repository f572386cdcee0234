//! The restart marker (`--state-file`): whether the guest had the controller running, and
//! on which guest memory (st_dev, st_ino of the DMA-mapped file).
//!
//! isola-usb does not resume a killed predecessor's controller: slots, endpoint state,
//! ring positions and the mass-storage transport stage are not saved. Instead a new process
//! that finds the marker set for the same guest memory reports Host System Error as soon
//! as the frontend maps that memory again, and the guest's driver resets the controller
//! and enumerates again. Writes are never lost by this: a write reaches the image before
//! its status wrapper is given, so what the guest saw acknowledged is on the image; what it
//! did not see acknowledged it sends again after the reset.
//!
//! The file is opened before the sandbox and rewritten in place (one 32-byte pwrite: magic,
//! running flag, st_dev, st_ino, checksum) when the guest starts or stops the controller.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

const MAGIC: &[u8; 8] = b"ISOLAUSB";
const LEN: usize = 32;

pub struct Marker {
    file: Option<File>,
    /// The guest memory currently mapped.
    pub memory: Option<(u64, u64)>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot open the state file {0}")]
pub struct StateError(String, #[source] std::io::Error);

fn checksum(b: &[u8]) -> u32 {
    b.iter().fold(0x811c_9dc5u32, |h, &x| {
        (h ^ u32::from(x)).wrapping_mul(0x0100_0193)
    })
}

impl Marker {
    /// Opens (creating) `path`; returns the marker and the guest memory it says was running.
    pub fn open(path: Option<&Path>) -> Result<(Marker, Option<(u64, u64)>), StateError> {
        let Some(path) = path else {
            return Ok((
                Marker {
                    file: None,
                    memory: None,
                },
                None,
            ));
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| StateError(path.display().to_string(), e))?;
        let mut b = [0u8; LEN];
        let running = match file.read_exact_at(&mut b, 0) {
            Ok(()) => parse(&b),
            Err(_) => None,
        };
        Ok((
            Marker {
                file: Some(file),
                memory: None,
            },
            running,
        ))
    }

    /// Records that the guest started (`true`) or stopped the controller.
    pub fn save(&self, running: bool) {
        let Some(file) = &self.file else { return };
        let (dev, ino) = self.memory.unwrap_or((0, 0));
        let mut b = [0u8; LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8] = u8::from(running && self.memory.is_some());
        b[12..20].copy_from_slice(&dev.to_le_bytes());
        b[20..28].copy_from_slice(&ino.to_le_bytes());
        let sum = checksum(&b[..28]);
        b[28..].copy_from_slice(&sum.to_le_bytes());
        if let Err(e) = file.write_all_at(&b, 0) {
            log::warn!("cannot write the state file: {e}");
        }
    }
}

fn parse(b: &[u8; LEN]) -> Option<(u64, u64)> {
    let sum = u32::from_le_bytes([b[28], b[29], b[30], b[31]]);
    if &b[..8] != MAGIC || sum != checksum(&b[..28]) || b[8] != 1 {
        return None;
    }
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(w)
    };
    Some((word(12), word(20)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_marker_survives_reopening_and_garbage_does_not_count() {
        let dir = std::env::temp_dir().join(format!("isola-usb-state-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let (mut m, running) = Marker::open(Some(&dir)).unwrap();
        assert_eq!(running, None);
        m.memory = Some((7, 9));
        m.save(true);
        assert_eq!(Marker::open(Some(&dir)).unwrap().1, Some((7, 9)));
        m.save(false);
        assert_eq!(Marker::open(Some(&dir)).unwrap().1, None);
        m.save(true);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&dir)
            .unwrap()
            .write_all_at(&[1], 14)
            .unwrap();
        assert_eq!(Marker::open(Some(&dir)).unwrap().1, None);
        let _ = std::fs::remove_file(&dir);
    }
}
