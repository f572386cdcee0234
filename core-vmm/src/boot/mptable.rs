//! Intel MultiProcessor Specification 1.4 tables, which tell the guest how many CPUs it has and
//! where its IOAPIC is.
//!
//! The floating pointer sits at [`layout::MPTABLE_START`] (the last KiB of base memory, one of
//! the places Linux's `smp_scan_config` searches) and the configuration table follows it. With
//! many CPUs the table runs past 0xa0000 into the legacy VGA/BIOS area, which is guest RAM the
//! e820 map does not offer as usable, so the guest never overwrites it.

use vm_memory::{Bytes, GuestAddress};

use crate::layout;
use crate::memory::GuestMemoryMmap;

/// Local APIC version reported for every CPU (an integrated xAPIC).
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// ISA IRQs 0-15 are described as wired straight to the IOAPIC pins of the same number, as
/// KVM's in-kernel IOAPIC routes them by default.
const ISA_IRQS: u8 = 16;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;

/// xAPIC ids are 8 bits, 0xff is broadcast and one id goes to the IOAPIC.
pub const MAX_CPUS: u32 = 254;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} CPUs cannot be described in an MP table (at most {MAX_CPUS})")]
    TooManyCpus(u32),
    #[error("could not write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// Builds the floating pointer followed by the configuration table, as they sit in memory
/// at `base`.
pub fn build(num_cpus: u32, base: u64) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus as u8;
    let config_addr = base + 16;

    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x0600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x0201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    for irq in 0..ISA_IRQS {
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
    }
    // LINT0 of the bootstrap CPU is the PIC's ExtINT; LINT1 of every CPU is NMI.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = num_cpus as u16 + 1 + 1 + ISA_IRQS as u16 + 2;

    let mut config = Vec::with_capacity(44 + entries.len());
    config.extend_from_slice(b"PCMP");
    config.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    config.push(4); // spec revision 1.4
    config.push(0); // checksum, set below
    config.extend_from_slice(b"ISOLA   ");
    config.extend_from_slice(b"ISOLA-VM    ");
    config.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    config.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    config.extend_from_slice(&entry_count.to_le_bytes());
    config.extend_from_slice(&(layout::LAPIC_START as u32).to_le_bytes());
    config.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut table = Vec::with_capacity(16 + config.len());
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&(config_addr as u32).to_le_bytes());
    table.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 1 paragraph, rev 1.4, features
    table[10] = checksum(&table);
    table.extend_from_slice(&config);
    Ok(table)
}

/// Writes the tables for `num_cpus` CPUs at [`layout::MPTABLE_START`].
pub fn write(mem: &GuestMemoryMmap, num_cpus: u32) -> Result<(), MpTableError> {
    let table = build(num_cpus, layout::MPTABLE_START)?;
    mem.write_slice(&table, GuestAddress(layout::MPTABLE_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    /// Walks the table the way a guest does and counts enabled processors.
    fn count_cpus(table: &[u8], base: u64) -> usize {
        assert_eq!(&table[..4], b"_MP_");
        assert_eq!(sum(&table[..16]), 0);
        let config = (u32::from_le_bytes(table[4..8].try_into().unwrap()) as u64 - base) as usize;
        let len = u16::from_le_bytes(table[config + 4..config + 6].try_into().unwrap()) as usize;
        let body = &table[config..config + len];
        assert_eq!(&body[..4], b"PCMP");
        assert_eq!(sum(body), 0);
        let count = u16::from_le_bytes(body[34..36].try_into().unwrap());
        let (mut off, mut cpus) = (44, 0);
        for _ in 0..count {
            match body[off] {
                0 => {
                    cpus += usize::from(body[off + 3] & CPU_ENABLED != 0);
                    off += 20;
                }
                1..=4 => off += 8,
                t => panic!("unknown entry type {t}"),
            }
        }
        assert_eq!(off, len, "entry count and length agree");
        cpus
    }

    #[test]
    fn describes_every_cpu_with_valid_checksums() {
        for n in [1, 2, 4, 64, MAX_CPUS] {
            let table = build(n, layout::MPTABLE_START).unwrap();
            assert_eq!(count_cpus(&table, layout::MPTABLE_START), n as usize);
        }
    }

    #[test]
    fn refuses_zero_and_too_many_cpus() {
        assert!(build(0, 0).is_err());
        assert!(build(MAX_CPUS + 1, 0).is_err());
    }
}
