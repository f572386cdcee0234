//! Boot-time register state.
//!
//! Application processors are left in their reset state: with the in-kernel LAPIC they wait
//! for INIT/SIPI like on a PC. Only the bootstrap processor gets the entry state of the boot
//! protocol ([`BootEntry`]).

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::boot::BootEntry;
use crate::layout;
use crate::memory::GuestMemoryMmap;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_DEFAULT_WB: u64 = (1 << 11) | 6;

/// LAPIC register offsets and LVT delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// GDT selectors of the Linux boot protocol (__BOOT_CS, __BOOT_DS) and our TSS.
const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("KVM refused the {0} state")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("KVM accepted {set} of {wanted} boot MSRs")]
    Msrs { set: usize, wanted: usize },
    #[error("could not write boot tables to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// A GDT descriptor from flags (access byte + flags nibble as in `0xa09b`), base and limit.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The `kvm_segment` a GDT entry describes, as the CPU would load it for `selector`.
fn segment(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let granular = (entry >> 55) & 1 == 1;
    let limit = if granular {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the boot GDT ([null, null, code, data, tss]) and an empty IDT; returns the GDT.
fn write_gdt(mem: &GuestMemoryMmap, code_flags: u16) -> Result<[u64; 5], RegsError> {
    let gdt = [
        0,
        0,
        gdt_entry(code_flags, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ];
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::BOOT_GDT_START + 8 * i as u64))
            .map_err(RegsError::Write)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
        .map_err(RegsError::Write)?;
    Ok(gdt)
}

/// Identity-maps 0-4 GiB with 2 MiB pages: PML4 -> one PDPT -> four page directories.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let w = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(RegsError::Write)
    };
    w(layout::PDPTE_START | 0x3, layout::PML4_START)?;
    for gib in 0..4u64 {
        let pd = layout::PDE_START + gib * 0x1000;
        w(pd | 0x3, layout::PDPTE_START + gib * 8)?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            w(addr | 0x83, pd + i * 8)?; // present, writable, 2 MiB page
        }
    }
    Ok(())
}

fn set_sregs_for(vcpu: &VcpuFd, mem: &GuestMemoryMmap, entry: &BootEntry) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(|e| RegsError::Kvm("sregs", e))?;
    let long_mode = matches!(entry, BootEntry::Linux64 { .. });
    // 64-bit code segment for the Linux entry, 32-bit flat code segment for PVH.
    let gdt = write_gdt(mem, if long_mode { 0xa09b } else { 0xc09b })?;
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;
    let data = segment(gdt[3], BOOT_DS);
    sregs.cs = segment(gdt[2], BOOT_CS);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[4], BOOT_TSS);
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    if long_mode {
        write_page_tables(mem)?;
        sregs.cr3 = layout::PML4_START;
        sregs.cr4 |= X86_CR4_PAE;
        sregs.cr0 |= X86_CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| RegsError::Kvm("sregs", e))
}

/// Puts the bootstrap vCPU in the entry state `entry` asks for.
pub fn setup_boot_cpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: &BootEntry,
) -> Result<(), RegsError> {
    set_sregs_for(vcpu, mem, entry)?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match *entry {
        BootEntry::Pvh { entry, start_info } => {
            regs.rip = entry;
            regs.rbx = start_info;
        }
        BootEntry::Linux64 { entry, boot_params } => {
            regs.rip = entry;
            regs.rsi = boot_params;
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
        }
    }
    vcpu.set_regs(&regs)
        .map_err(|e| RegsError::Kvm("general registers", e))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| RegsError::Kvm("FPU", e))
}

/// MSRs as Linux expects them at boot, on every vCPU.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_DEFAULT_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).expect("11 entries is below KVM_MAX_MSR_ENTRIES");
    let set = vcpu.set_msrs(&msrs).map_err(|e| RegsError::Kvm("MSR", e))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

/// LINT0 delivers the PIC's ExtINT and LINT1 delivers NMI, as on a PC.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(|e| RegsError::Kvm("LAPIC", e))?;
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Kvm("LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_the_segments_linux_expects() {
        let code64 = segment(gdt_entry(0xa09b, 0, 0xfffff), BOOT_CS);
        assert_eq!(
            (code64.l, code64.db, code64.type_, code64.present, code64.s),
            (1, 0, 0xb, 1, 1)
        );
        assert_eq!(code64.limit, 0xffff_ffff);
        let code32 = segment(gdt_entry(0xc09b, 0, 0xfffff), BOOT_CS);
        assert_eq!((code32.l, code32.db, code32.g), (0, 1, 1));
        let data = segment(gdt_entry(0xc093, 0, 0xfffff), BOOT_DS);
        assert_eq!((data.type_, data.db, data.base), (3, 1, 0));
        let tss = segment(gdt_entry(0x008b, 0x1234_5678, 0x67), BOOT_TSS);
        assert_eq!(
            (tss.base, tss.limit, tss.s, tss.type_),
            (0x1234_5678, 0x67, 0, 0xb)
        );
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&mem).unwrap();
        let read = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).unwrap();
        assert_eq!(read(layout::PML4_START), layout::PDPTE_START | 3);
        // Walk 0xfee0_0000 (the LAPIC): PDPT index 3, PD index 0x1f7.
        let pd = read(layout::PDPTE_START + 3 * 8) & !0xfff;
        assert_eq!(read(pd + 0x1f7 * 8), 0xfee0_0000 | 0x83);
    }
}
