//! Guest memory as the frontend describes it: SET_MEM_TABLE, ADD_MEM_REG and REM_MEM_REG.
//!
//! Each region arrives as a file descriptor (the core's sealed guest-RAM memfd) plus where it
//! sits in guest-physical space and in the frontend's own address space. Regions are mapped
//! with `vm-memory`; every later access to guest memory goes through its bounds-checked
//! accessors. The frontend's addresses are kept only to translate the ring addresses of
//! SET_VRING_ADDR, which are in the frontend's address space.

use std::fs::File;
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
    #[error("cannot inspect the region's file")]
    Stat(#[source] std::io::Error),
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
    // A region past the end of its file would raise SIGBUS on first touch: refuse it now.
    let have = file.metadata().map_err(MemoryError::Stat)?.len();
    let needed = info.mmap_offset + info.size;
    if needed > have {
        return Err(MemoryError::FileTooSmall { needed, have });
    }
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
        let fd = memfd::MemfdOptions::default()
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
