//! The guest-physical address map of an Isola VM on x86_64.
//!
//! ```text
//! 0x0000_0500  boot GDT (64-bit and PVH entry)         0x0000_0520  boot IDT (empty)
//! 0x0000_6000  PVH hvm_start_info, memory map, module list
//! 0x0000_7000  Linux boot_params ("zero page")
//! 0x0000_9000  boot page tables: PML4, PDPT, 4 PDs identity-mapping 0-4 GiB (to 0xefff)
//! 0x0002_0000  kernel command line (CMDLINE_MAX bytes)
//! 0x0009_fc00  MP table (last KiB of base memory; e820 reserved)
//! 0x000e_0000  ACPI tables (RSDP first), up to 1 MiB
//! 0x0010_0000  kernel image; initrd at the top of low RAM
//! 0xc000_0000  start of the 32-bit MMIO hole (1 GiB): PCI BARs to 0xe000_0000, ECAM at 0xe000_0000,
//!              IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000 RAM above the hole, if the guest has more than 3 GiB
//! ```
//!
//! The e820 map (and the PVH memory map, which carries the same entries) is:
//! `[0, 0x9fc00)` RAM, `[0x9fc00, 0xa0000)` reserved, `[0x10_0000, min(mem, 3 GiB))` RAM,
//! `[0xe000_0000, 0xe010_0000)` reserved (PCI ECAM, so Linux trusts the MCFG table) and, for
//! more than 3 GiB, `[4 GiB, 4 GiB + mem - 3 GiB)` RAM.

pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
pub const PVH_INFO_START: u64 = 0x6000;
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit Linux entry (grows down, below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
/// Four page directories follow, one per GiB.
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line including its NUL, as Linux's x86 COMMAND_LINE_SIZE.
pub const CMDLINE_MAX: usize = 2048;
pub const MPTABLE_START: u64 = 0x9_fc00;
/// End of the usable part of base memory (the MP table lives above it).
pub const EBDA_START: u64 = MPTABLE_START;
pub const BASE_MEMORY_END: u64 = 0xa_0000;
/// ACPI tables, in the BIOS area where Linux also looks for the RSDP.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
pub const HIMEM_START: u64 = 0x10_0000;
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// 32-bit window the core assigns PCI BARs from.
pub const PCI_MMIO_START: u64 = MMIO_HOLE_START;
pub const PCI_MMIO_END: u64 = 0xe000_0000;
/// ECAM (memory-mapped configuration) for bus 0: 32 devices x 8 functions x 4 KiB.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map on Intel; keep them in the hole.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// e820 / PVH memory types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One entry of the guest's memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// Guest RAM ranges (guest address, size) for `mem_size` bytes: below the hole, then above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, mem_size - MMIO_HOLE_START),
        ]
    }
}

/// The memory map the guest is given (see the module documentation).
pub fn memory_map(mem_size: u64) -> Vec<MemoryMapEntry> {
    let low_end = mem_size.min(MMIO_HOLE_START);
    let mut map = vec![
        MemoryMapEntry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        MemoryMapEntry {
            addr: EBDA_START,
            size: BASE_MEMORY_END - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    if low_end > HIMEM_START {
        map.push(MemoryMapEntry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        });
    }
    map.push(MemoryMapEntry {
        addr: PCI_ECAM_START,
        size: PCI_ECAM_SIZE,
        kind: E820_RESERVED,
    });
    if mem_size > MMIO_HOLE_START {
        map.push(MemoryMapEntry {
            addr: MMIO_HOLE_END,
            size: mem_size - MMIO_HOLE_START,
            kind: E820_RAM,
        });
    }
    map
}

// The fixed boot structures must not overlap; checked when the crate is compiled.
const _: () = {
    assert!(PVH_INFO_START + 0x1000 <= ZERO_PAGE_START);
    assert!(BOOT_STACK_POINTER < PML4_START);
    assert!(PDE_START + 4 * 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX as u64 <= MPTABLE_START);
    assert!(MPTABLE_START < BASE_MEMORY_END);
    assert!(BASE_MEMORY_END <= ACPI_START && ACPI_END <= HIMEM_START);
    assert!(PCI_MMIO_END <= PCI_ECAM_START && PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_ram_range_and_four_map_entries() {
        let mem = 64 << 20;
        assert_eq!(ram_ranges(mem), vec![(0, mem)]);
        let map = memory_map(mem);
        assert_eq!(map.len(), 4);
        assert_eq!((map[3].addr, map[3].kind), (PCI_ECAM_START, E820_RESERVED));
        assert_eq!(
            map[2],
            MemoryMapEntry {
                addr: HIMEM_START,
                size: mem - HIMEM_START,
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn large_guest_is_split_around_the_mmio_hole() {
        let mem = 5u64 << 30;
        assert_eq!(ram_ranges(mem), vec![(0, 3 << 30), (4 << 30, 2 << 30)]);
        let map = memory_map(mem);
        assert_eq!(map.len(), 5);
        assert_eq!(map[2].addr + map[2].size, MMIO_HOLE_START);
        assert!(
            map.windows(2).all(|w| w[0].addr + w[0].size <= w[1].addr),
            "sorted, disjoint"
        );
        assert_eq!(
            map[4],
            MemoryMapEntry {
                addr: 4 << 30,
                size: 2 << 30,
                kind: E820_RAM
            }
        );
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, mem - (HIMEM_START - EBDA_START));
    }
}
