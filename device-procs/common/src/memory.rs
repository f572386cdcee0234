//! Guest memory as the frontend describes it: SET_MEM_TABLE, ADD_MEM_REG and REM_MEM_REG.
//!
//! Each region arrives as a file descriptor (the core's sealed guest-RAM memfd) plus where it
//! sits in guest-physical space and in the frontend's own address space. Regions are mapped
//! with `vm-memory`; every later access to guest memory goes through its bounds-checked
//! accessors. The frontend's addresses are kept only to translate the ring addresses of
//! SET_VRING_ADDR, which are in the frontend's address space.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};

/// Guest memory as device code sees it.
pub type Memory = GuestMemoryMmap<()>;

/// The most regions a frontend may add with ADD_MEM_REG (GET_MAX_MEM_SLOTS).
pub const MAX_MEM_SLOTS: usize = 64;

const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory region of size 0 or with an address range that wraps around")]
    BadRange,
    #[error("mmap offset {0:#x} is not page aligned")]
    UnalignedOffset(u64),
    #[error("region needs {needed:#x} bytes of its file, which has {have:#x}")]
    FileTooSmall { needed: u64, have: u64 },
    #[error("cannot map the region")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    #[error("regions overlap in guest-physical or frontend address space")]
    Overlap,
    #[error("{0} regions: the limit is {MAX_MEM_SLOTS}")]
    TooManyRegions(usize),
    #[error("no region at guest address {gpa:#x} of size {size:#x}")]
    NoSuchRegion { gpa: u64, size: u64 },
    #[error("{0} fds for {1} regions")]
    FdCount(usize, usize),
    #[error("region file")]
    File(#[source] SharedFileError),
}

/// Why a file a peer passed to be mapped shared (guest RAM, an in-flight region) is refused.
#[derive(Debug, thiserror::Error)]
pub enum SharedFileError {
    #[error("cannot inspect the file")]
    Stat(#[source] std::io::Error),
    #[error("not a regular file (mode {0:#o}): only a sealed memfd is mapped")]
    NotRegular(u32),
    #[error("cannot read its seals (not a memfd?)")]
    Seals(#[source] std::io::Error),
    #[error(
        "not sealed against shrinking (seals {0:#x}): a peer could truncate it under the mapping"
    )]
    NotSealed(u32),
    #[error("needs {needed:#x} bytes of the file, which has {have:#x}")]
    TooSmall { needed: u64, have: u64 },
    #[error("offset {offset:#x} + length {len:#x} overflows")]
    Overflow { offset: u64, len: u64 },
}

static ALLOW_UNSEALED: AtomicBool = AtomicBool::new(false);

/// Whether files that are not sealed against shrinking are mapped too (`--allow-unsealed-memory`,
/// for frontends that cannot seal; off by default).
pub fn allow_unsealed(allow: bool) {
    ALLOW_UNSEALED.store(allow, Ordering::Relaxed);
}

/// Checks a file a peer passed before any of it is mapped: it must be a regular file (a memfd)
/// sealed against shrinking (`F_SEAL_SHRINK`), so that nobody, the peer included, can truncate
/// it under the mapping (touching a truncated page is SIGBUS), and it must hold
/// `[offset, offset + len)`. With [`allow_unsealed`] the seal is not required (a warning is
/// logged once per process).
pub fn check_shared_file(file: &File, offset: u64, len: u64) -> Result<(), SharedFileError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().map_err(SharedFileError::Stat)?;
    if !meta.file_type().is_file() {
        return Err(SharedFileError::NotRegular(meta.mode()));
    }
    // SAFETY: F_GET_SEALS takes no argument and reads no memory; on a descriptor that does
    // not support seals it fails with EINVAL.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        if !ALLOW_UNSEALED.load(Ordering::Relaxed) {
            return Err(match seals {
                0.. => SharedFileError::NotSealed(seals as u32),
                _ => SharedFileError::Seals(std::io::Error::last_os_error()),
            });
        }
        static WARNED: AtomicBool = AtomicBool::new(false);
        if !WARNED.swap(true, Ordering::Relaxed) {
            log::warn!(
                "mapping memory the frontend can still shrink (--allow-unsealed-memory): a \
                 truncation by the frontend ends this process"
            );
        }
    }
    let needed = offset
        .checked_add(len)
        .ok_or(SharedFileError::Overflow { offset, len })?;
    let have = meta.len();
    if needed > have {
        return Err(SharedFileError::TooSmall { needed, have });
    }
    Ok(())
}

/// Where one region sits, as the frontend described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    pub guest_phys_addr: u64,
    pub size: u64,
    /// Start of the region in the frontend's address space.
    pub user_addr: u64,
    pub mmap_offset: u64,
}

impl RegionInfo {
    fn validate(&self) -> Result<(), MemoryError> {
        let end_ok = |base: u64| base.checked_add(self.size).is_some();
        if self.size == 0
            || !end_ok(self.guest_phys_addr)
            || !end_ok(self.user_addr)
            || !end_ok(self.mmap_offset)
            || usize::try_from(self.size).is_err()
        {
            return Err(MemoryError::BadRange);
        }
        if !self.mmap_offset.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::UnalignedOffset(self.mmap_offset));
        }
        Ok(())
    }

    fn overlaps(&self, other: &RegionInfo) -> bool {
        let meet = |a: u64, b: u64| a < b + other.size && b < a + self.size;
        meet(self.guest_phys_addr, other.guest_phys_addr) || meet(self.user_addr, other.user_addr)
    }
}

/// The current memory table, shared with the queue workers through [`GuestMemoryAtomic`].
pub struct MemoryTable {
    regions: Vec<(RegionInfo, Arc<GuestRegionMmap<()>>)>,
    atomic: GuestMemoryAtomic<Memory>,
}

impl Default for MemoryTable {
    fn default() -> Self {
        MemoryTable {
            regions: Vec::new(),
            atomic: GuestMemoryAtomic::new(Memory::new()),
        }
    }
}

impl MemoryTable {
    /// The handle workers load guest memory from; it sees every later table change.
    pub fn atomic(&self) -> GuestMemoryAtomic<Memory> {
        self.atomic.clone()
    }

    pub fn len(&self) -> usize {
        self.regions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Replaces the whole table (SET_MEM_TABLE).
    pub fn set_table(&mut self, infos: &[RegionInfo], files: Vec<File>) -> Result<(), MemoryError> {
        if infos.len() != files.len() {
            return Err(MemoryError::FdCount(files.len(), infos.len()));
        }
        let mut regions = Vec::with_capacity(infos.len());
        for (info, file) in infos.iter().zip(files) {
            let region = map_region(info, file)?;
            if regions.iter().any(|(r, _)| info.overlaps(r)) {
                return Err(MemoryError::Overlap);
            }
            regions.push((*info, region));
        }
        self.publish(&regions)?;
        self.regions = regions;
        Ok(())
    }

    /// Adds one region (ADD_MEM_REG).
    pub fn add(&mut self, info: &RegionInfo, file: File) -> Result<(), MemoryError> {
        if self.regions.len() >= MAX_MEM_SLOTS {
            return Err(MemoryError::TooManyRegions(self.regions.len() + 1));
        }
        let region = map_region(info, file)?;
        if self.regions.iter().any(|(r, _)| info.overlaps(r)) {
            return Err(MemoryError::Overlap);
        }
        let mut regions = self.regions.clone();
        regions.push((*info, region));
        self.publish(&regions)?;
        self.regions = regions;
        Ok(())
    }

    /// Removes the region with this guest address, size and frontend address (REM_MEM_REG).
    pub fn remove(&mut self, gpa: u64, size: u64, user_addr: u64) -> Result<(), MemoryError> {
        let index = self
            .regions
            .iter()
            .position(|(r, _)| {
                r.guest_phys_addr == gpa && r.size == size && r.user_addr == user_addr
            })
            .ok_or(MemoryError::NoSuchRegion { gpa, size })?;
        let mut regions = self.regions.clone();
        regions.remove(index);
        self.publish(&regions)?;
        self.regions = regions;
        Ok(())
    }

    /// Drops every region. Workers that still hold a snapshot keep theirs mapped until done.
    pub fn clear(&mut self) {
        self.regions.clear();
        if let Ok(guard) = self.atomic.lock() {
            guard.replace(Memory::new());
        }
    }

    /// Translates `[addr, addr + len)` in the frontend's address space to a guest address, if
    /// one region holds all of it.
    pub fn frontend_to_guest(&self, addr: u64, len: u64) -> Option<GuestAddress> {
        self.regions.iter().find_map(|(r, _)| {
            let offset = addr.checked_sub(r.user_addr)?;
            (offset.checked_add(len)? <= r.size).then(|| GuestAddress(r.guest_phys_addr + offset))
        })
    }

    fn publish(
        &self,
        regions: &[(RegionInfo, Arc<GuestRegionMmap<()>>)],
    ) -> Result<(), MemoryError> {
        let mut sorted: Vec<_> = regions.iter().map(|(_, r)| Arc::clone(r)).collect();
        sorted.sort_by_key(|r| vm_memory::GuestMemoryRegion::start_addr(r.as_ref()));
        let memory = if sorted.is_empty() {
            Memory::new()
        } else {
            Memory::from_arc_regions(sorted).map_err(|_| MemoryError::Overlap)?
        };
        // A poisoned lock only means another thread panicked while swapping; the swap itself
        // is a single atomic store, so the table is still consistent.
        let guard = self.atomic.lock().unwrap_or_else(|p| p.into_inner());
        guard.replace(memory);
        Ok(())
    }
}

fn map_region(info: &RegionInfo, file: File) -> Result<Arc<GuestRegionMmap<()>>, MemoryError> {
    info.validate()?;
    // A region past the end of its file, or in a file that can shrink later, would raise
    // SIGBUS on touch: refuse it now.
    check_shared_file(&file, info.mmap_offset, info.size).map_err(|e| match e {
        SharedFileError::TooSmall { needed, have } => MemoryError::FileTooSmall { needed, have },
        other => MemoryError::File(other),
    })?;
    let size = usize::try_from(info.size).map_err(|_| MemoryError::BadRange)?;
    let mapping = MmapRegion::<()>::from_file(FileOffset::new(file, info.mmap_offset), size)
        .map_err(MemoryError::Map)?;
    let region = GuestRegionMmap::new(mapping, GuestAddress(info.guest_phys_addr))
        .ok_or(MemoryError::BadRange)?;
    Ok(Arc::new(region))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddressSpace};

    fn memfd(size: u64) -> File {
        let fd = unsealed(size);
        let fd = memfd::Memfd::try_from_file(fd).expect("a memfd");
        fd.add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow])
            .expect("seal");
        fd.into_file()
    }

    fn unsealed(size: u64) -> File {
        let fd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .create("test-ram")
            .expect("memfd");
        fd.as_file().set_len(size).expect("set_len");
        fd.into_file()
    }

    fn info(gpa: u64, size: u64, user: u64) -> RegionInfo {
        RegionInfo {
            guest_phys_addr: gpa,
            size,
            user_addr: user,
            mmap_offset: 0,
        }
    }

    #[test]
    fn table_maps_translates_and_shares() {
        let mut table = MemoryTable::default();
        let atomic = table.atomic();
        table
            .set_table(&[info(0x10000, 0x4000, 0x7000_0000)], vec![memfd(0x4000)])
            .unwrap();
        assert_eq!(
            table.frontend_to_guest(0x7000_0100, 0x10),
            Some(GuestAddress(0x10100))
        );
        assert_eq!(table.frontend_to_guest(0x7000_3ff8, 0x10), None);
        assert_eq!(table.frontend_to_guest(0x6fff_ffff, 1), None);
        atomic
            .memory()
            .write_obj(0xabcdu16, GuestAddress(0x10000))
            .unwrap();
        table
            .add(&info(0x0, 0x1000, 0x1000), memfd(0x1000))
            .unwrap();
        assert_eq!(table.len(), 2);
        atomic.memory().write_obj(1u8, GuestAddress(0x0)).unwrap();
        table.remove(0x0, 0x1000, 0x1000).unwrap();
        assert!(atomic.memory().write_obj(1u8, GuestAddress(0x0)).is_err());
        table.clear();
        assert!(table.is_empty());
    }

    #[test]
    fn hostile_tables_are_refused() {
        let mut table = MemoryTable::default();
        // Region larger than its file: would SIGBUS later.
        assert!(matches!(
            table.set_table(&[info(0, 0x2000, 0)], vec![memfd(0x1000)]),
            Err(MemoryError::FileTooSmall { .. })
        ));
        // Wrapping address range.
        assert!(matches!(
            table.set_table(&[info(u64::MAX - 10, 0x1000, 0)], vec![memfd(0x1000)]),
            Err(MemoryError::BadRange)
        ));
        // Unaligned mmap offset.
        let mut bad = info(0, 0x1000, 0);
        bad.mmap_offset = 12;
        assert!(matches!(
            table.set_table(&[bad], vec![memfd(0x2000)]),
            Err(MemoryError::UnalignedOffset(12))
        ));
        // Overlapping guest ranges.
        assert!(matches!(
            table.set_table(
                &[info(0, 0x2000, 0), info(0x1000, 0x1000, 0x10000)],
                vec![memfd(0x2000), memfd(0x1000)]
            ),
            Err(MemoryError::Overlap)
        ));
        // A memfd that can still shrink: a peer could truncate it under the mapping (F1).
        assert!(matches!(
            table.set_table(&[info(0, 0x1000, 0)], vec![unsealed(0x1000)]),
            Err(MemoryError::File(SharedFileError::NotSealed(_)))
        ));
        assert!(matches!(
            table.add(&info(0, 0x1000, 0), unsealed(0x1000)),
            Err(MemoryError::File(SharedFileError::NotSealed(_)))
        ));
        // Sealed only against growing is not enough.
        let grow_only = memfd::Memfd::try_from_file(unsealed(0x1000)).expect("memfd");
        grow_only.add_seal(memfd::FileSeal::SealGrow).expect("seal");
        assert!(matches!(
            table.set_table(&[info(0, 0x1000, 0)], vec![grow_only.into_file()]),
            Err(MemoryError::File(SharedFileError::NotSealed(_)))
        ));
        // A memfd made without MFD_ALLOW_SEALING (libblkio's kind) carries only F_SEAL_SEAL.
        let plain = memfd::MemfdOptions::default()
            .create("plain")
            .expect("memfd");
        plain.as_file().set_len(0x1000).expect("set_len");
        assert!(matches!(
            table.set_table(&[info(0, 0x1000, 0)], vec![plain.into_file()]),
            Err(MemoryError::File(SharedFileError::NotSealed(_)))
        ));
        // Not a memfd at all: a regular file on disk, a pipe.
        let tmp = std::env::temp_dir().join(format!("isola-mem-{}", std::process::id()));
        let disk = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .expect("tmp file");
        disk.set_len(0x1000).expect("set_len");
        let _ = std::fs::remove_file(&tmp);
        assert!(matches!(
            table.set_table(&[info(0, 0x1000, 0)], vec![disk]),
            Err(MemoryError::File(
                SharedFileError::Seals(_) | SharedFileError::NotSealed(_)
            ))
        ));
        let (pipe_read, _pipe_write) = std::io::pipe().expect("pipe");
        assert!(matches!(
            table.set_table(
                &[info(0, 0x1000, 0)],
                vec![File::from(std::os::fd::OwnedFd::from(pipe_read))]
            ),
            Err(MemoryError::File(SharedFileError::NotRegular(_)))
        ));
        // An offset that, added to the size, passes the end of u64 space.
        let mut far = info(0, 0x1000, 0);
        far.mmap_offset = u64::MAX - 0xfff;
        assert!(matches!(
            table.set_table(&[far], vec![memfd(0x1000)]),
            Err(MemoryError::BadRange)
        ));
        // fd count mismatch.
        assert!(matches!(
            table.set_table(&[info(0, 0x1000, 0)], vec![]),
            Err(MemoryError::FdCount(0, 1))
        ));
        assert!(matches!(
            table.remove(0, 0x1000, 0),
            Err(MemoryError::NoSuchRegion { .. })
        ));
        assert!(table.is_empty());
    }
}
