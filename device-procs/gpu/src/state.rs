//! What a restarted `isola-gpu` needs to carry on: the resources the guest created (id,
//! format, size), their backing (guest addresses), the scanouts and the cursor.
//!
//! The guest driver creates these once and never again, so a process that starts after a
//! crash would otherwise answer every later command with "no such resource" and show
//! nothing. The state is small (no pixels: those are read back from the backing in guest
//! memory) and changes only on create/unref/attach/detach/set-scanout/cursor commands.
//!
//! The file is opened once, before the sandbox (which leaves the process no path to open
//! or rename), and rewritten in place through that descriptor with `pwrite`. It holds two
//! slots, at offsets 0 and [`SLOT_SPAN`] (the file is sparse: only what is written takes
//! space). Each save goes to the slot *not* holding the newest valid snapshot, with a header
//! carrying a generation number and a checksum of the generation, length and payload; a
//! load takes the valid slot with the highest generation. A process killed in the middle of
//! a save (or a write cut short) leaves that slot invalid and the other slot, the previous
//! version, intact. No fsync: the state is only worth anything to a process restarted while
//! the same guest RAM still exists, which a power loss ends too.
//!
//! A new process loads it and restores it when the core reconnects — but only for the same
//! guest memory: the snapshot records the device and inode of the guest-RAM file, which a
//! new VM does not share.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protocol::{Format, Rect};

/// Largest state file read back (a full table of resources with maximal backing is far
/// smaller in practice; this only bounds a corrupt file).
const MAX_STATE_BYTES: usize = 64 << 20;
/// Slot header: magic, payload length (u32), generation (u64), checksum (u64), 4 spare.
const HEADER_LEN: usize = 32;
const MAGIC: &[u8; 8] = b"ISOLAGPU";
/// Offset of the second slot; the first is at 0.
pub const SLOT_SPAN: u64 = (HEADER_LEN + MAX_STATE_BYTES) as u64;

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
    /// 2: the payload is postcard (1 was bincode); a file of another version is unusable.
    pub const VERSION: u32 = 2;
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot write {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
    #[error("cannot read {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{} is not a regular file", .0.display())]
    NotAFile(PathBuf),
    /// Not a state file of this version (or both slots torn); the open file is kept, to be
    /// overwritten by the next save.
    #[error("{} is not a state file of this version", .0.display())]
    Unusable(PathBuf, Box<StateFile>),
    #[error("cannot encode the state")]
    Encode(#[source] postcard::Error),
    #[error("the state is {0} bytes, over the bound of {MAX_STATE_BYTES}")]
    TooLarge(usize),
}

/// The snapshot in a slot's payload: postcard, the whole payload, this version.
fn decode(payload: &[u8]) -> Option<Snapshot> {
    match postcard::take_from_bytes::<Snapshot>(payload) {
        Ok((snap, rest)) if rest.is_empty() && snap.version == Snapshot::VERSION => Some(snap),
        _ => None,
    }
}

/// FNV-1a (64 bit) over the generation, the length and the payload: enough to tell a torn
/// or stale slot from a whole one (it is no defence against someone who can write the file).
fn checksum(generation: u64, payload: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let len = payload.len() as u64;
    for &b in generation
        .to_le_bytes()
        .iter()
        .chain(&len.to_le_bytes())
        .chain(payload)
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The state file, open for the life of the process.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    file: File,
    /// Generation of the newest valid snapshot in the file (0: none).
    generation: u64,
    /// The slot that snapshot is in (the next save goes to the other one).
    newest_slot: u64,
}

/// What one slot holds, if it is valid.
fn read_slot(file: &File, slot: u64) -> std::io::Result<Option<(u64, Vec<u8>)>> {
    let at = slot * SLOT_SPAN;
    let mut header = [0u8; HEADER_LEN];
    match file.read_exact_at(&mut header, at) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let field = |range: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b[..range.len()].copy_from_slice(&header[range]);
        u64::from_le_bytes(b)
    };
    let (len, generation, sum) = (field(8..12) as usize, field(12..20), field(20..28));
    if &header[..8] != MAGIC || len > MAX_STATE_BYTES || generation == 0 {
        return Ok(None);
    }
    let mut payload = vec![0u8; len];
    match file.read_exact_at(&mut payload, at + HEADER_LEN as u64) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    Ok((checksum(generation, &payload) == sum).then_some((generation, payload)))
}

impl StateFile {
    /// Opens (or creates, mode 0600) the state file and reads the newest valid snapshot in it.
    /// A non-empty file with no valid slot (foreign, from an older version, or both slots
    /// torn) is [`StateError::Unusable`], which still carries the open file.
    pub fn open(path: &Path) -> Result<(StateFile, Option<Snapshot>), StateError> {
        let read_err = |e| StateError::Read(path.to_owned(), e);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        // Slots are rewritten in place at fixed offsets: only a regular file keeps them
        // (/dev/null would swallow every save and read back empty).
        if !meta.file_type().is_file() {
            return Err(StateError::NotAFile(path.to_owned()));
        }
        let empty = meta.len() == 0;
        let mut newest: Option<(u64, u64, Vec<u8>)> = None;
        for slot in 0..2 {
            if let Some((generation, payload)) = read_slot(&file, slot).map_err(read_err)? {
                if newest.as_ref().is_none_or(|(g, _, _)| generation > *g) {
                    newest = Some((generation, slot, payload));
                }
            }
        }
        let mut state = StateFile {
            path: path.to_owned(),
            file,
            generation: 0,
            newest_slot: 1,
        };
        let Some((generation, slot, payload)) = newest else {
            if empty {
                return Ok((state, None));
            }
            return Err(StateError::Unusable(path.to_owned(), Box::new(state)));
        };
        state.generation = generation;
        state.newest_slot = slot;
        match decode(&payload) {
            Some(snap) => Ok((state, Some(snap))),
            None => Err(StateError::Unusable(path.to_owned(), Box::new(state))),
        }
    }

    /// Writes `snap` to the slot not holding the newest snapshot, which stays valid until
    /// this write is complete.
    pub fn save(&mut self, snap: &Snapshot) -> Result<(), StateError> {
        let payload = postcard::to_allocvec(snap).map_err(StateError::Encode)?;
        if payload.len() > MAX_STATE_BYTES {
            return Err(StateError::TooLarge(payload.len()));
        }
        let generation = self.generation + 1;
        let slot = 1 - self.newest_slot;
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&generation.to_le_bytes());
        bytes.extend_from_slice(&checksum(generation, &payload).to_le_bytes());
        bytes.extend_from_slice(&[0; 4]);
        bytes.extend_from_slice(&payload);
        self.file
            .write_all_at(&bytes, slot * SLOT_SPAN)
            .map_err(|e| StateError::Write(self.path.clone(), e))?;
        self.generation = generation;
        self.newest_slot = slot;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isola_device_common::testing::Scratch;

    fn snapshot(id: u32) -> Snapshot {
        Snapshot {
            version: Snapshot::VERSION,
            memory_id: Some((1, 2)),
            resources: vec![SavedResource {
                id,
                format: Format::B8G8R8X8,
                width: 3,
                height: 4,
                backing: Some(vec![(0x1000, 48)]),
            }],
            scanouts: vec![(
                id,
                Rect {
                    x: 0,
                    y: 0,
                    width: 3,
                    height: 4,
                },
            )],
            cursor: None,
        }
    }

    #[test]
    fn snapshots_round_trip_and_garbage_is_refused() {
        let dir = Scratch::new("trip");
        let path = dir.join("state");
        let (mut file, none) = StateFile::open(&path).unwrap();
        assert!(none.is_none());
        file.save(&snapshot(7)).unwrap();
        file.save(&snapshot(8)).unwrap();
        file.save(&snapshot(9)).unwrap();
        drop(file);
        let (_, got) = StateFile::open(&path).unwrap();
        assert_eq!(got, Some(snapshot(9)));
        std::fs::write(&path, b"\xff\xff\xff\xff garbage").unwrap();
        let Err(StateError::Unusable(_, mut file)) = StateFile::open(&path) else {
            panic!("garbage accepted");
        };
        // The unusable file is overwritten by the next save.
        file.save(&snapshot(3)).unwrap();
        assert_eq!(StateFile::open(&path).unwrap().1, Some(snapshot(3)));
    }

    #[test]
    fn another_version_or_a_malformed_payload_is_unusable() {
        let whole = postcard::to_allocvec(&snapshot(5)).unwrap();
        assert_eq!(decode(&whole), Some(snapshot(5)));
        let mut old = snapshot(5);
        old.version = 1;
        assert_eq!(decode(&postcard::to_allocvec(&old).unwrap()), None);
        for cut in 0..whole.len() {
            assert_eq!(decode(&whole[..cut]), None, "cut at {cut}");
        }
        let mut trailing = whole.clone();
        trailing.push(0);
        assert_eq!(decode(&trailing), None);
        // A resource count far past the payload.
        assert_eq!(decode(&[2, 0, 0xff, 0xff, 0xff, 0xff, 0x0f]), None);
        // A whole slot of a well-formed older snapshot: the file is unusable, not misread.
        let dir = Scratch::new("old");
        let path = dir.join("state");
        let (mut file, _) = StateFile::open(&path).unwrap();
        file.save(&old).unwrap();
        assert!(matches!(
            StateFile::open(&path),
            Err(StateError::Unusable(..))
        ));
    }

    #[test]
    fn a_torn_save_leaves_the_previous_snapshot() {
        let dir = Scratch::new("torn");
        let path = dir.join("state");
        let (mut file, _) = StateFile::open(&path).unwrap();
        file.save(&snapshot(1)).unwrap();
        file.save(&snapshot(2)).unwrap();
        // The newest (2) is in slot 1; the next save goes to slot 0. Write only part of it,
        // as a process killed mid-save would.
        let slot = 1 - file.newest_slot;
        assert_eq!(slot, 0);
        let mut next = StateFile {
            path: path.clone(),
            file: file.file.try_clone().unwrap(),
            generation: file.generation,
            newest_slot: file.newest_slot,
        };
        next.save(&snapshot(3)).unwrap();
        let (_, got) = StateFile::open(&path).unwrap();
        assert_eq!(got, Some(snapshot(3)));
        // Tear it: cut one payload byte of slot 0 (checksum no longer matches).
        let mut byte = [0u8; 1];
        let at = HEADER_LEN as u64 + 5;
        file.file.read_exact_at(&mut byte, at).unwrap();
        file.file.write_all_at(&[byte[0] ^ 0xff], at).unwrap();
        let (mut reopened, got) = StateFile::open(&path).unwrap();
        assert_eq!(got, Some(snapshot(2)), "falls back to the previous version");
        // A save after that goes to the torn slot, not over the good one.
        reopened.save(&snapshot(4)).unwrap();
        assert_eq!(StateFile::open(&path).unwrap().1, Some(snapshot(4)));
    }
}
