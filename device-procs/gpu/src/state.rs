//! What a restarted `isola-gpu` needs to carry on: the resources the guest created (id,
//! format, size), their backing (guest addresses), the scanouts and the cursor.
//!
//! The guest driver creates these once and never again, so a process that starts after a
//! crash would otherwise answer every later command with "no such resource" and show
//! nothing. The state is small (no pixels: those are read back from the backing in guest
//! memory), changes only on create/unref/attach/detach/set-scanout/cursor commands, and is
//! written to `--state-file` after each such command (write to a temporary file, then
//! rename, so a crash mid-write leaves the previous version). A new process loads it and
//! restores it when the core reconnects — but only for the same guest memory: the snapshot
//! records the device and inode of the guest-RAM file, which a new VM does not share.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protocol::{Format, Rect};

/// Largest state file read back (a full table of resources with maximal backing is far
/// smaller in practice; this only bounds a corrupt file).
const MAX_STATE_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedResource {
    pub id: u32,
    pub format: Format,
    pub width: u32,
    pub height: u32,
    /// (guest address, length) of each backing entry.
    pub backing: Option<Vec<(u64, u32)>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedCursor {
    pub scanout: u32,
    pub x: u32,
    pub y: u32,
    pub resource: u32,
    pub hot_x: u32,
    pub hot_y: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    /// (st_dev, st_ino) of the guest-RAM file the backing addresses refer to.
    pub memory_id: Option<(u64, u64)>,
    pub resources: Vec<SavedResource>,
    /// (resource id, rectangle) per scanout; id 0 = disabled.
    pub scanouts: Vec<(u32, Rect)>,
    pub cursor: Option<SavedCursor>,
}

impl Snapshot {
    pub const VERSION: u32 = 1;
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot write {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
    #[error("cannot read {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{} is not a state file of this version", .0.display())]
    Decode(PathBuf),
    #[error("cannot encode the state")]
    Encode(#[source] bincode::error::EncodeError),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_STATE_BYTES>()
}

/// Writes `snap` to `path` atomically (temporary file + rename).
pub fn save(path: &Path, snap: &Snapshot) -> Result<(), StateError> {
    let bytes = bincode::serde::encode_to_vec(snap, config()).map_err(StateError::Encode)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(|e| StateError::Write(tmp.clone(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| StateError::Write(path.to_owned(), e))
}

/// The snapshot in `path`; `Ok(None)` if there is no such file.
pub fn load(path: &Path) -> Result<Option<Snapshot>, StateError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StateError::Read(path.to_owned(), e)),
    };
    match bincode::serde::decode_from_slice::<Snapshot, _>(&bytes, config()) {
        Ok((snap, _)) if snap.version == Snapshot::VERSION => Ok(Some(snap)),
        _ => Err(StateError::Decode(path.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_round_trip_and_garbage_is_refused() {
        let dir = std::env::temp_dir().join(format!("isola-gpu-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        assert!(load(&path).unwrap().is_none());
        let snap = Snapshot {
            version: Snapshot::VERSION,
            memory_id: Some((1, 2)),
            resources: vec![SavedResource {
                id: 7,
                format: Format::B8G8R8X8,
                width: 3,
                height: 4,
                backing: Some(vec![(0x1000, 48)]),
            }],
            scanouts: vec![(
                7,
                Rect {
                    x: 0,
                    y: 0,
                    width: 3,
                    height: 4,
                },
            )],
            cursor: None,
        };
        save(&path, &snap).unwrap();
        assert_eq!(load(&path).unwrap(), Some(snap));
        std::fs::write(&path, b"\xff\xff\xff\xff garbage").unwrap();
        assert!(matches!(load(&path), Err(StateError::Decode(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
