//! Loading a guest kernel and describing the machine to it, by the Linux x86_64 boot protocol.
//!
//! Two entry paths, chosen by the kernel image:
//! - an ELF vmlinux with a PVH note (`XEN_ELFNOTE_PHYS32_ENTRY`) is entered in 32-bit protected
//!   mode at that note's address with `%ebx` pointing at an `hvm_start_info`;
//! - a bzImage (or an ELF without the note) is entered at its 64-bit entry point in long mode
//!   with `%rsi` pointing at `boot_params`.
//!
//! Both get the same memory map ([`layout::memory_map`]), command line and initrd.

pub mod acpi;
pub mod mptable;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::layout::{self, MemoryMapEntry};
use crate::memory::GuestMemoryMmap;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 62;
const BZIMAGE_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BOOT_FLAG: u16 = 0xaa55;
const XLF_KERNEL_64: u16 = 1;
/// Offset of the 64-bit entry point (startup_64) from the start of the protected-mode payload.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// "Loader type undefined" in the boot protocol.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const PVH_MAGIC: u32 = 0x336e_c578;
/// The boot protocol's default when a bzImage predates `initrd_addr_max`.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read kernel {}", .0.display())]
    ReadKernel(PathBuf, #[source] std::io::Error),
    #[error("kernel {} is neither an ELF vmlinux nor a bzImage", .0.display())]
    UnknownFormat(PathBuf),
    #[error("kernel {} is an ELF file but not a 64-bit x86 one", .0.display())]
    NotX86_64(PathBuf),
    #[error("kernel {} ({size} bytes) does not fit in guest RAM between 1 MiB and {limit:#x}", .path.display())]
    KernelTooBig {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("kernel {} could not be loaded", .0.display())]
    Load(PathBuf, #[source] linux_loader::loader::Error),
    #[error(
        "bzImage {} has no 64-bit entry point (boot protocol {version:#x}, xloadflags {xloadflags:#x})",
        .path.display()
    )]
    No64BitEntry {
        path: PathBuf,
        version: u16,
        xloadflags: u16,
    },
    #[error("cannot read initrd {}", .0.display())]
    ReadInitrd(PathBuf, #[source] std::io::Error),
    #[error(
        "initrd {} ({size} bytes) does not fit in guest RAM between the kernel's end {lowest:#x} and {highest:#x}",
        .path.display()
    )]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        lowest: u64,
        highest: u64,
    },
    #[error("command line is {len} bytes, the boot protocol allows at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("command line contains a NUL byte")]
    CmdlineNul,
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error("could not write the boot structures to guest memory")]
    Write(#[source] GuestMemoryError),
}

/// What the caller needs to know about the kernel and its boot files.
#[derive(Debug, Clone)]
pub struct BootConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub num_cpus: u32,
}

/// How the bootstrap vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// 32-bit protected mode, paging off, `%ebx` = `start_info`.
    Pvh { entry: u64, start_info: u64 },
    /// 64-bit long mode on identity-mapped page tables, `%rsi` = `boot_params`.
    Linux64 { entry: u64, boot_params: u64 },
}

enum Format {
    Elf,
    BzImage,
}

fn detect_format(path: &Path, file: &mut File) -> Result<Format, BootError> {
    let read_err = |e| BootError::ReadKernel(path.to_owned(), e);
    let mut head = [0u8; 0x206];
    let mut got = 0;
    while got < head.len() {
        match file.read(&mut head[got..]).map_err(read_err)? {
            0 => break,
            n => got += n,
        }
    }
    if got >= 20 && &head[..4] == ELF_MAGIC {
        let machine = u16::from_le_bytes([head[18], head[19]]);
        if head[4] != ELFCLASS64 || machine != EM_X86_64 {
            return Err(BootError::NotX86_64(path.to_owned()));
        }
        return Ok(Format::Elf);
    }
    if got == head.len()
        && u32::from_le_bytes(head[0x202..0x206].try_into().expect("4 bytes")) == BZIMAGE_MAGIC
    {
        return Ok(Format::BzImage);
    }
    Err(BootError::UnknownFormat(path.to_owned()))
}

fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(layout::MMIO_HOLE_START)
}

/// Loads the kernel, initrd and command line and writes every boot structure.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    config: &BootConfig,
) -> Result<BootEntry, BootError> {
    let kernel_path = config.kernel.as_path();
    let mut kernel =
        File::open(kernel_path).map_err(|e| BootError::ReadKernel(kernel_path.to_owned(), e))?;
    let format = detect_format(kernel_path, &mut kernel)?;
    let kernel_size = kernel
        .seek(SeekFrom::End(0))
        .map_err(|e| BootError::ReadKernel(kernel_path.to_owned(), e))?;
    let limit = low_ram_end(mem_size);
    if kernel_size > limit.saturating_sub(layout::HIMEM_START) {
        return Err(BootError::KernelTooBig {
            path: kernel_path.to_owned(),
            size: kernel_size,
            limit,
        });
    }
    let load_err = |e| BootError::Load(kernel_path.to_owned(), e);
    let highmem = Some(GuestAddress(layout::HIMEM_START));
    let loaded = match format {
        Format::Elf => Elf::load(mem, None, &mut kernel, highmem).map_err(load_err)?,
        Format::BzImage => BzImage::load(mem, None, &mut kernel, highmem).map_err(load_err)?,
    };

    let map = layout::memory_map(mem_size);
    mptable::write(mem, config.num_cpus)?;
    let rsdp = acpi::write(mem, config.num_cpus)?;

    match (format, loaded.pvh_boot_cap) {
        (Format::Elf, PvhBootCapability::PvhEntryPresent(entry)) => {
            write_cmdline(mem, &config.cmdline, layout::CMDLINE_MAX - 1)?;
            let initrd = load_initrd(mem, config, loaded.kernel_end, limit)?;
            write_pvh_start_info(mem, &map, initrd, rsdp)?;
            Ok(BootEntry::Pvh {
                entry: entry.0,
                start_info: layout::PVH_INFO_START,
            })
        }
        (Format::Elf, _) => {
            let hdr = setup_header {
                boot_flag: BOOT_FLAG,
                header: BZIMAGE_MAGIC,
                kernel_alignment: 0x0100_0000,
                cmdline_size: (layout::CMDLINE_MAX - 1) as u32,
                ..Default::default()
            };
            let entry = loaded.kernel_load.0;
            write_linux_boot(mem, config, hdr, loaded.kernel_end, limit, &map, rsdp)?;
            Ok(BootEntry::Linux64 {
                entry,
                boot_params: layout::ZERO_PAGE_START,
            })
        }
        (Format::BzImage, _) => {
            let hdr = loaded
                .setup_header
                .expect("the bzImage loader always returns the setup header");
            if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry {
                    path: kernel_path.to_owned(),
                    version: hdr.version,
                    xloadflags: hdr.xloadflags,
                });
            }
            let entry = loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET;
            write_linux_boot(mem, config, hdr, loaded.kernel_end, limit, &map, rsdp)?;
            Ok(BootEntry::Linux64 {
                entry,
                boot_params: layout::ZERO_PAGE_START,
            })
        }
    }
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, max: usize) -> Result<(), BootError> {
    let max = max.min(layout::CMDLINE_MAX - 1);
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_START))
        .map_err(BootError::Write)
}

/// Where the initrd went, if there is one.
#[derive(Debug, Clone, Copy)]
struct Initrd {
    addr: u64,
    size: u64,
}

/// Places the initrd as high as possible below `highest`, page aligned, above the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    config: &BootConfig,
    kernel_end: u64,
    highest: u64,
) -> Result<Option<Initrd>, BootError> {
    let Some(path) = &config.initrd else {
        return Ok(None);
    };
    let read_err = |e| BootError::ReadInitrd(path.clone(), e);
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let lowest = kernel_end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let too_big = BootError::InitrdTooBig {
        path: path.clone(),
        size,
        lowest,
        highest,
    };
    let addr = highest
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .ok_or(too_big)?;
    if addr < lowest {
        return Err(BootError::InitrdTooBig {
            path: path.clone(),
            size,
            lowest,
            highest,
        });
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| match e {
            GuestMemoryError::IOError(io) => read_err(io),
            other => BootError::Write(other),
        })?;
    // A file that grew between stat and read would be truncated silently; one byte more proves
    // we read all of it.
    if file.read(&mut [0u8; 1]).map_err(read_err)? != 0 {
        return Err(read_err(std::io::Error::other(
            "the file changed while it was being read",
        )));
    }
    Ok(Some(Initrd { addr, size }))
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    map: &[MemoryMapEntry],
    initrd: Option<Initrd>,
    rsdp: u64,
) -> Result<(), BootError> {
    let memmap_addr = layout::PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64;
    let memmap_addr = memmap_addr.next_multiple_of(8);
    let modlist_addr =
        memmap_addr + (map.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
    for (i, entry) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind,
            reserved: 0,
        };
        let at = memmap_addr + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(e, GuestAddress(at))
            .map_err(BootError::Write)?;
    }
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(modlist_addr))
            .map_err(BootError::Write)?;
    }
    let start_info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        flags: 0,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() { modlist_addr } else { 0 },
        cmdline_paddr: layout::CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: memmap_addr,
        memmap_entries: map.len() as u32,
        reserved: 0,
    };
    mem.write_obj(start_info, GuestAddress(layout::PVH_INFO_START))
        .map_err(BootError::Write)
}

fn write_linux_boot(
    mem: &GuestMemoryMmap,
    config: &BootConfig,
    mut hdr: setup_header,
    kernel_end: u64,
    low_end: u64,
    map: &[MemoryMapEntry],
    rsdp: u64,
) -> Result<(), BootError> {
    let cmdline_max = if hdr.version >= 0x0206 || hdr.version == 0 {
        hdr.cmdline_size as usize
    } else {
        255
    };
    write_cmdline(mem, &config.cmdline, cmdline_max)?;
    let initrd_max = match hdr.initrd_addr_max {
        0 => DEFAULT_INITRD_ADDR_MAX,
        max => u64::from(max),
    };
    let initrd = load_initrd(mem, config, kernel_end, low_end.min(initrd_max + 1))?;

    let mut params = boot_params::default();
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.ext_cmd_line_ptr = (layout::CMDLINE_START >> 32) as u32;
    if let Some(initrd) = initrd {
        hdr.ramdisk_image = initrd.addr as u32;
        hdr.ramdisk_size = initrd.size as u32;
        params.ext_ramdisk_image = (initrd.addr >> 32) as u32;
        params.ext_ramdisk_size = (initrd.size >> 32) as u32;
    }
    params.hdr = hdr;
    for (slot, entry) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    params.acpi_rsdp_addr = rsdp;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_START))
        .map_err(BootError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn guest_mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("isola-boot-test-{}-{name}", std::process::id()));
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    fn config(kernel: PathBuf) -> BootConfig {
        BootConfig {
            kernel,
            initrd: None,
            cmdline: String::new(),
            num_cpus: 1,
        }
    }

    #[test]
    fn garbage_empty_and_missing_kernels_are_refused() {
        let mem = guest_mem(16 << 20);
        let garbage = temp_file("garbage", &[0x55; 4096]);
        assert!(matches!(
            load(&mem, 16 << 20, &config(garbage.clone())),
            Err(BootError::UnknownFormat(_))
        ));
        let empty = temp_file("empty", &[]);
        assert!(matches!(
            load(&mem, 16 << 20, &config(empty.clone())),
            Err(BootError::UnknownFormat(_))
        ));
        let missing = PathBuf::from("/nonexistent/isola-kernel");
        assert!(matches!(
            load(&mem, 16 << 20, &config(missing)),
            Err(BootError::ReadKernel(..))
        ));
        let mut elf32 = vec![0u8; 64];
        elf32[..4].copy_from_slice(ELF_MAGIC);
        elf32[4] = 1;
        let elf32 = temp_file("elf32", &elf32);
        assert!(matches!(
            load(&mem, 16 << 20, &config(elf32.clone())),
            Err(BootError::NotX86_64(_))
        ));
        for p in [garbage, empty, elf32] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn command_line_limits_are_enforced() {
        let mem = guest_mem(1 << 20);
        assert!(write_cmdline(&mem, &"x".repeat(2047), 4096).is_ok());
        assert!(matches!(
            write_cmdline(&mem, &"x".repeat(2048), 4096),
            Err(BootError::CmdlineTooLong {
                len: 2048,
                max: 2047
            })
        ));
        assert!(matches!(
            write_cmdline(&mem, "ab", 1),
            Err(BootError::CmdlineTooLong { .. })
        ));
        assert!(matches!(
            write_cmdline(&mem, "a\0b", 100),
            Err(BootError::CmdlineNul)
        ));
        write_cmdline(&mem, "console=ttyS0 quiet", 100).unwrap();
        let mut buf = [0u8; 20];
        mem.read_slice(&mut buf, GuestAddress(layout::CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0 quiet\0");
    }

    #[test]
    fn initrd_goes_high_and_page_aligned_or_is_refused() {
        let mem = guest_mem(16 << 20);
        let initrd = temp_file("initrd", &[7u8; 5000]);
        let mut cfg = config(PathBuf::new());
        cfg.initrd = Some(initrd.clone());
        let placed = load_initrd(&mem, &cfg, 0x20_0000, 16 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(placed.size, 5000);
        assert_eq!(placed.addr % PAGE_SIZE, 0);
        assert!(placed.addr + 5000 <= 16 << 20 && placed.addr >= (16 << 20) - 2 * PAGE_SIZE);
        let mut byte = [0u8; 1];
        mem.read_slice(&mut byte, GuestAddress(placed.addr + 4999))
            .unwrap();
        assert_eq!(byte[0], 7);
        let err = load_initrd(&mem, &cfg, (16 << 20) - 4096, 16 << 20).unwrap_err();
        assert!(
            matches!(err, BootError::InitrdTooBig { size: 5000, .. }),
            "{err}"
        );
        std::fs::remove_file(initrd).unwrap();
    }
}
