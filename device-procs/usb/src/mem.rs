//! Guest memory as the controller sees it: DMA by guest physical address, every access
//! bounds-checked against what the frontend mapped. The xHCI model only knows [`GuestMem`],
//! so tests build rings in plain test memory ([`TestMemory`]) and the process uses
//! [`DmaMemory`], the regions the vfio-user frontend mapped with DMA_MAP.

use std::fs::File;
use std::os::unix::fs::MetadataExt;

use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemError {
    #[error("{len:#x} bytes at {addr:#x} are not all in guest memory")]
    Outside { addr: u64, len: usize },
}

/// What the controller may do with guest memory: copy bytes in and out by guest address.
/// An access that is not entirely inside guest memory fails and touches nothing.
pub trait GuestMem {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError>;
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError>;

    fn read_u32(&self, addr: u64) -> Result<u32, MemError> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn write_u32(&self, addr: u64, value: u32) -> Result<(), MemError> {
        self.write(addr, &value.to_le_bytes())
    }
}

/// `base + offset` for a guest address: saturates instead of wrapping, and no access at
/// `u64::MAX` is ever inside guest memory, so an overflowing guest address is refused by the
/// access rather than wrapped to an address the guest did not give.
pub fn add(base: u64, offset: u64) -> u64 {
    base.saturating_add(offset)
}

fn outside(addr: u64, len: usize) -> MemError {
    MemError::Outside { addr, len }
}

impl GuestMem for GuestMemoryMmap {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        // `read_slice` fails unless the whole range is mapped (it may cross regions).
        self.read_slice(buf, GuestAddress(addr))
            .map_err(|_| outside(addr, buf.len()))
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        self.write_slice(buf, GuestAddress(addr))
            .map_err(|_| outside(addr, buf.len()))
    }
}

/// Plain memory for tests: `len` bytes at guest address `base`.
pub struct TestMemory {
    base: u64,
    bytes: std::sync::Mutex<Vec<u8>>,
}

impl TestMemory {
    pub fn new(base: u64, len: usize) -> TestMemory {
        TestMemory {
            base,
            bytes: std::sync::Mutex::new(vec![0; len]),
        }
    }

    fn range(&self, addr: u64, len: usize, have: usize) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(addr.checked_sub(self.base)?).ok()?;
        let end = start.checked_add(len)?;
        (end <= have).then_some(start..end)
    }
}

impl GuestMem for TestMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let bytes = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let r = self
            .range(addr, buf.len(), bytes.len())
            .ok_or_else(|| outside(addr, buf.len()))?;
        buf.copy_from_slice(&bytes[r]);
        Ok(())
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        let mut bytes = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let have = bytes.len();
        let r = self
            .range(addr, buf.len(), have)
            .ok_or_else(|| outside(addr, buf.len()))?;
        bytes[r].copy_from_slice(buf);
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    #[error("DMA map without a file descriptor (DMA_READ/DMA_WRITE are not offered)")]
    NoFd,
    #[error(
        "DMA map at {addr:#x} size {size:#x}: address, size or offset not page aligned, or size 0"
    )]
    Alignment { addr: u64, size: u64 },
    #[error("DMA map at {addr:#x} size {size:#x} overlaps a mapped range or wraps")]
    Overlap { addr: u64, size: u64 },
    #[error("at most {0} DMA regions")]
    TooMany(usize),
    #[error("the DMA file")]
    File(#[source] isola_device_common::memory::SharedFileError),
    #[error("cannot map the DMA file")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    #[error("cannot add the DMA region")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
    #[error("no DMA region at {addr:#x} size {size:#x}")]
    NoSuchRegion { addr: u64, size: u64 },
}

/// Most DMA regions one frontend may map (the core maps its RAM in one or two).
pub const MAX_DMA_REGIONS: usize = 16;
const PAGE: u64 = 4096;

/// One mapped region: guest address, size, the mapping, (st_dev, st_ino) of its file.
type DmaRegion = (u64, u64, std::sync::Arc<GuestRegionMmap>, (u64, u64));

/// The regions the frontend mapped, kept with their files' identities.
#[derive(Default)]
pub struct DmaMemory {
    regions: Vec<DmaRegion>,
    mmap: GuestMemoryMmap,
}

impl DmaMemory {
    /// Maps `[offset, offset + size)` of `file` at guest address `addr`.
    pub fn map(&mut self, addr: u64, size: u64, offset: u64, file: File) -> Result<(), DmaError> {
        if size == 0 || ![addr, size, offset].iter().all(|v| v.is_multiple_of(PAGE)) {
            return Err(DmaError::Alignment { addr, size });
        }
        let end = addr
            .checked_add(size)
            .ok_or(DmaError::Overlap { addr, size })?;
        if self
            .regions
            .iter()
            .any(|&(a, s, ..)| addr < a + s && a < end)
        {
            return Err(DmaError::Overlap { addr, size });
        }
        if self.regions.len() >= MAX_DMA_REGIONS {
            return Err(DmaError::TooMany(MAX_DMA_REGIONS));
        }
        isola_device_common::memory::check_shared_file(&file, offset, size)
            .map_err(DmaError::File)?;
        let id = file
            .metadata()
            .map(|m| (m.dev(), m.ino()))
            .unwrap_or((0, 0));
        let len = usize::try_from(size).map_err(|_| DmaError::Overlap { addr, size })?;
        let mapping =
            MmapRegion::from_file(FileOffset::new(file, offset), len).map_err(DmaError::Map)?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(addr))
            .ok_or(DmaError::Overlap { addr, size })?;
        self.regions
            .push((addr, size, std::sync::Arc::new(region), id));
        self.rebuild()
    }

    /// Unmaps the region mapped exactly at `addr` with `size`.
    pub fn unmap(&mut self, addr: u64, size: u64) -> Result<(), DmaError> {
        let i = self
            .regions
            .iter()
            .position(|&(a, s, ..)| a == addr && s == size)
            .ok_or(DmaError::NoSuchRegion { addr, size })?;
        self.regions.remove(i);
        self.rebuild()
    }

    pub fn clear(&mut self) {
        self.regions.clear();
        self.mmap = GuestMemoryMmap::default();
    }

    /// (st_dev, st_ino) of the first region's file: which guest memory this is.
    pub fn identity(&self) -> Option<(u64, u64)> {
        self.regions.first().map(|r| r.3)
    }

    fn rebuild(&mut self) -> Result<(), DmaError> {
        let mut regions: Vec<_> = self.regions.iter().map(|r| r.2.clone()).collect();
        regions.sort_by_key(|r| r.start_addr());
        if regions.is_empty() {
            self.mmap = GuestMemoryMmap::default();
            return Ok(());
        }
        self.mmap = GuestMemoryMmap::from_arc_regions(regions).map_err(DmaError::Collection)?;
        Ok(())
    }
}

impl GuestMem for DmaMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        GuestMem::read(&self.mmap, addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        GuestMem::write(&self.mmap, addr, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(len: u64) -> File {
        let mfd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .create("dma")
            .unwrap();
        mfd.as_file().set_len(len).unwrap();
        mfd.add_seals(&[memfd::FileSeal::SealShrink]).unwrap();
        mfd.into_file()
    }

    #[test]
    fn test_memory_is_bounded() {
        let m = TestMemory::new(0x1000, 0x100);
        m.write(0x1000, &[1, 2]).unwrap();
        assert_eq!(m.read_u32(0x1000).unwrap(), 0x0201);
        assert!(m.read_u32(0x10fd).is_err());
        assert!(m.read_u32(0xfff).is_err());
        assert!(m.write(u64::MAX, &[0]).is_err());
    }

    #[test]
    fn dma_maps_are_checked_and_accesses_bounded() {
        let mut d = DmaMemory::default();
        assert!(matches!(
            d.map(0x1001, 0x1000, 0, sealed(0x1000)),
            Err(DmaError::Alignment { .. })
        ));
        assert!(matches!(
            d.map(0x1000, 0x2000, 0, sealed(0x1000)),
            Err(DmaError::File(_))
        ));
        d.map(0x10000, 0x2000, 0, sealed(0x2000)).unwrap();
        assert!(matches!(
            d.map(0x11000, 0x2000, 0, sealed(0x2000)),
            Err(DmaError::Overlap { .. })
        ));
        assert!(matches!(
            d.map(u64::MAX - 0xfff, 0x2000, 0, sealed(0x2000)),
            Err(DmaError::Overlap { .. })
        ));
        d.write_u32(0x11ffc, 7).unwrap();
        assert_eq!(d.read_u32(0x11ffc).unwrap(), 7);
        assert!(d.read_u32(0x11ffe).is_err());
        assert!(d.read_u32(0xfffe).is_err());
        d.unmap(0x10000, 0x2000).unwrap();
        assert!(d.read_u32(0x10000).is_err());
        assert!(d.unmap(0x10000, 0x2000).is_err());
    }
}
