//! Guest RAM: one sealed memfd, mapped shared, registered with KVM.
//!
//! All of the guest's RAM lives in a single memfd so that it can later be handed, as one fd,
//! to device processes. Before the fd can leave this process it is sealed against shrinking,
//! growing and further sealing: a compromised device process holding the fd cannot truncate
//! the memory under the core (which would turn the core's next access into SIGBUS).

use std::fs::File;
use std::os::fd::AsRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use memfd::{FileSeal, HugetlbSize, MemfdOptions};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::layout;

/// Guest memory as the core (and later the device processes) see it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("could not create the guest memory memfd")]
    Create(#[source] memfd::Error),
    #[error("could not size the guest memory memfd to {0} bytes")]
    Resize(u64, #[source] std::io::Error),
    #[error("could not seal the guest memory memfd")]
    Seal(#[source] memfd::Error),
    #[error("could not duplicate the guest memory fd")]
    Dup(#[source] std::io::Error),
    #[error("could not map {size} bytes of guest memory at offset {offset:#x}")]
    Map {
        offset: u64,
        size: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("mapped region does not fit the guest address space")]
    Region(#[source] vm_memory::GuestRegionCollectionError),
    #[error("KVM refused memory slot {slot} at {addr:#x}")]
    KvmSlot {
        slot: u32,
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// How guest RAM is backed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryOptions {
    /// Back RAM with 2 MiB huge pages (memfd MFD_HUGETLB); the host must have them reserved.
    pub hugepages: bool,
    /// Fault every page in at start (MAP_POPULATE) instead of on the guest's first touch.
    pub prefault: bool,
}

/// The guest's RAM: the memfd and the mapping of it in this process.
pub struct GuestRam {
    memfd: File,
    mem: GuestMemoryMmap,
    size: u64,
}

impl GuestRam {
    /// Creates, sizes, seals and maps `size` bytes of guest RAM.
    pub fn new(size: u64, options: MemoryOptions) -> Result<Self, MemoryError> {
        let hugetlb = options.hugepages.then_some(HugetlbSize::Huge2MB);
        let memfd = MemfdOptions::default()
            .close_on_exec(true)
            .allow_sealing(true)
            .hugetlb(hugetlb)
            .create("isola-guest-ram")
            .map_err(MemoryError::Create)?;
        memfd
            .as_file()
            .set_len(size)
            .map_err(|e| MemoryError::Resize(size, e))?;
        memfd
            .add_seals(&[FileSeal::SealShrink, FileSeal::SealGrow])
            .and_then(|()| memfd.add_seal(FileSeal::SealSeal))
            .map_err(MemoryError::Seal)?;
        let memfd = memfd.into_file();

        let mut flags = libc::MAP_SHARED | libc::MAP_NORESERVE;
        if options.prefault {
            flags |= libc::MAP_POPULATE;
        }
        let mut regions = Vec::new();
        let mut file_offset = 0u64;
        for (guest_addr, region_size) in layout::ram_ranges(size) {
            let file = memfd.try_clone().map_err(MemoryError::Dup)?;
            let map_err = |source| MemoryError::Map {
                offset: file_offset,
                size: region_size,
                source,
            };
            let mapping = MmapRegionBuilder::new(region_size as usize)
                .with_file_offset(FileOffset::new(file, file_offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .with_hugetlbfs(options.hugepages)
                .build()
                .map_err(map_err)?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(guest_addr))
                .expect("ram_ranges never returns a range that overflows the address space");
            regions.push(region);
            file_offset += region_size;
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Region)?;
        Ok(GuestRam { memfd, mem, size })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The sealed memfd that backs all of guest RAM (what device processes will map).
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// Registers every region as a KVM memory slot, slot numbers from 0.
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        for (slot, region) in self.mem.iter().enumerate() {
            let slot = slot as u32;
            let addr = region.start_addr().0;
            let kvm_region = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: addr,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: `userspace_addr` is the start of a live MAP_SHARED mapping of exactly
            // `memory_size` bytes owned by `self.mem`. `GuestRam` outlives every vCPU (the VM
            // object owns it and joins its vCPU threads before dropping it), so the mapping is
            // never unmapped while KVM can access it; the slots do not overlap because the
            // regions come from disjoint `layout::ram_ranges`.
            unsafe { vm.set_user_memory_region(kvm_region) }
                .map_err(|source| MemoryError::KvmSlot { slot, addr, source })?;
        }
        Ok(())
    }
}

impl AsRawFd for GuestRam {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.memfd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn seals(file: &File) -> i32 {
        // SAFETY: F_GET_SEALS only reads the seal set of a valid open fd.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) }
    }

    #[test]
    fn memfd_is_sealed_against_resize_and_more_seals() {
        let ram = GuestRam::new(16 << 20, MemoryOptions::default()).unwrap();
        let s = seals(ram.memfd());
        assert_eq!(
            s & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL),
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL
        );
        assert!(
            ram.memfd().set_len(1 << 20).is_err(),
            "shrink must be refused"
        );
        assert!(
            ram.memfd().set_len(32 << 20).is_err(),
            "grow must be refused"
        );
    }

    #[test]
    fn writes_through_the_mapping_land_in_the_memfd() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new(
            8 << 20,
            MemoryOptions {
                prefault: true,
                ..Default::default()
            },
        )
        .unwrap();
        ram.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1234))
            .unwrap();
        let mut buf = [0u8; 4];
        ram.memfd().read_exact_at(&mut buf, 0x1234).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(ram.memory().num_regions(), 1);
    }
}
