//! A minimal PCI device served by the `vfio_user` crate's `Server` (rust-vmm), the independent
//! peer Isola's vfio-user frontend is tested against. Only the device model is written here;
//! the protocol side, message parsing and fd handling are the crate's.
//!
//! Configuration space: vendor 0x1234, device 0x0e51, a 64-bit memory BAR 0 (registers,
//! 4 KiB), a 32-bit memory BAR 2 holding the MSI-X table (at 0) and PBA (at 0x800), and an
//! MSI-X capability with [`VECTORS`] vectors at 0x40.
//!
//! BAR 0 registers (little-endian):
//!
//! | offset | access | meaning |
//! |--------|--------|---------|
//! | 0x00 | read | magic 0x15014a11 |
//! | 0x04 | read/write | scratch |
//! | 0x08 | read/write | DMA address (64-bit) |
//! | 0x10 | read/write | DMA length (at most 1 MiB) |
//! | 0x14 | write | doorbell: fill [address, address + length) with byte i = value + i, then signal MSI-X vector 0 |
//! | 0x18 | read | doorbells served by this instance |
//! | 0x1c | read | this instance's process id (changes on a restart) |
//! | 0x20 | write | hang: the server stops answering (sleeps an hour) |
//! | 0x24 | read | resets seen by this instance |
//!
//! Usage: `vfio-user-testdev --socket PATH` (binds PATH, removing a stale socket file) or
//! `--fd N` (a listening socket it inherited, as `isola-supervisor` passes it). It serves one
//! frontend after another until killed.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_IRQ_INFO_EVENTFD, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_BAR2_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};

const VECTORS: u16 = 2;
const MAGIC: u32 = 0x1501_4a11;
const MAX_DMA: u64 = 1 << 20;
const MSIX_CAP: usize = 0x40;

struct Mapping {
    address: u64,
    size: u64,
    ptr: *mut u8,
}

struct Device {
    config: [u8; 256],
    scratch: u32,
    dma_address: u64,
    /// Whether the low half of the DMA address was written since the server started (or the
    /// device was reset): a server that replaced a killed one may have seen only the last
    /// writes of a round, and must not DMA to an address the guest never gave it.
    dma_address_set: bool,
    dma_len: u32,
    doorbells: u32,
    resets: u32,
    irqs: Vec<Option<File>>,
    maps: Vec<Mapping>,
}

fn bad(what: String) -> std::io::Error {
    eprintln!("vfio-user-testdev: {what}");
    std::io::Error::new(std::io::ErrorKind::InvalidInput, what)
}

impl Device {
    fn new() -> Device {
        let mut c = [0u8; 256];
        c[0..4].copy_from_slice(&0x0e51_1234u32.to_le_bytes());
        c[6..8].copy_from_slice(&0x0010u16.to_le_bytes()); // capability list
        c[8] = 1; // revision
        c[0xb] = 0xff; // class: unassigned
        c[0x10..0x14].copy_from_slice(&0b100u32.to_le_bytes()); // BAR 0: 64-bit memory
        c[0x18..0x1c].copy_from_slice(&0u32.to_le_bytes()); // BAR 2: 32-bit memory
        c[0x2c..0x30].copy_from_slice(&0x0001_1234u32.to_le_bytes());
        c[0x34] = MSIX_CAP as u8;
        c[0x3d] = 1; // claims INTA; the frontend hides it
        c[MSIX_CAP] = 0x11;
        c[MSIX_CAP + 2..MSIX_CAP + 4].copy_from_slice(&(VECTORS - 1).to_le_bytes());
        c[MSIX_CAP + 4..MSIX_CAP + 8].copy_from_slice(&2u32.to_le_bytes()); // table: BAR 2 at 0
        c[MSIX_CAP + 8..MSIX_CAP + 12].copy_from_slice(&(0x800u32 | 2).to_le_bytes());
        Device {
            config: c,
            scratch: 0,
            dma_address: 0,
            dma_address_set: false,
            dma_len: 0,
            doorbells: 0,
            resets: 0,
            irqs: Vec::new(),
            maps: Vec::new(),
        }
    }

    fn register(&self, offset: u64) -> u64 {
        match offset {
            0x00 => u64::from(MAGIC),
            0x04 => u64::from(self.scratch),
            0x08 => self.dma_address,
            0x0c => self.dma_address >> 32,
            0x10 => u64::from(self.dma_len),
            0x18 => u64::from(self.doorbells),
            0x1c => u64::from(std::process::id()),
            0x24 => u64::from(self.resets),
            _ => 0,
        }
    }

    fn doorbell(&mut self, value: u8) -> std::io::Result<()> {
        let (address, len) = (self.dma_address, u64::from(self.dma_len));
        if !self.dma_address_set || len == 0 {
            return Err(bad(format!(
                "doorbell before the DMA address and length were written (address {address:#x}, length {len})"
            )));
        }
        let map = self
            .maps
            .iter()
            .find(|m| address >= m.address && address - m.address + len <= m.size)
            .ok_or_else(|| bad(format!("DMA to {address:#x}+{len:#x} is not mapped")))?;
        let at = (address - map.address) as usize;
        for i in 0..len as usize {
            // SAFETY: the range was checked against the mapping's size just above, and the
            // mapping stays until DMA_UNMAP or the end of the connection.
            unsafe {
                map.ptr
                    .add(at + i)
                    .write_volatile(value.wrapping_add(i as u8))
            };
        }
        self.doorbells += 1;
        if let Some(Some(irq)) = self.irqs.first_mut() {
            irq.write_all(&1u64.to_le_bytes())?;
        }
        Ok(())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        for m in self.maps.drain(..) {
            // SAFETY: each mapping was made by mmap with this pointer and size.
            unsafe { libc::munmap(m.ptr.cast(), m.size as usize) };
        }
    }
}

impl ServerBackend for Device {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX => {
                let at = offset as usize;
                let src = self
                    .config
                    .get(at..at + data.len())
                    .ok_or_else(|| bad(format!("config read at {offset:#x}")))?;
                data.copy_from_slice(src);
            }
            VFIO_PCI_BAR0_REGION_INDEX => {
                let base = offset & !3;
                let value = self.register(base) | (self.register(base + 4) << 32);
                let shift = (offset - base) as usize;
                let bytes = value.to_le_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = bytes.get(shift + i).copied().unwrap_or(0);
                }
            }
            _ => return Err(bad(format!("read of region {region}"))),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX => {
                for (i, b) in data.iter().enumerate() {
                    let at = offset as usize + i;
                    // The command register and the MSI-X control are writable.
                    if matches!(at, 4 | 5) || at == MSIX_CAP + 3 {
                        self.config[at] = *b;
                    }
                }
            }
            VFIO_PCI_BAR0_REGION_INDEX => {
                let mut word = [0u8; 8];
                word[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
                let value = u64::from_le_bytes(word);
                match (offset, data.len()) {
                    (0x04, 4) => self.scratch = value as u32,
                    (0x08, 8) => (self.dma_address, self.dma_address_set) = (value, true),
                    (0x08, 4) => {
                        self.dma_address = (self.dma_address & !0xffff_ffff) | value;
                        self.dma_address_set = true;
                    }
                    (0x0c, 4) => {
                        self.dma_address = (self.dma_address & 0xffff_ffff) | (value << 32)
                    }
                    (0x10, 4) if value <= MAX_DMA => self.dma_len = value as u32,
                    (0x14, _) => self.doorbell(value as u8)?,
                    (0x20, _) => std::thread::sleep(std::time::Duration::from_secs(3600)),
                    _ => return Err(bad(format!("write of {} bytes at {offset:#x}", data.len()))),
                }
            }
            _ => return Err(bad(format!("write to region {region}"))),
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        _flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = fd.ok_or_else(|| bad("DMA_MAP without an fd".into()))?;
        // SAFETY: a fresh shared mapping of `size` bytes of `fd` at `offset`; the kernel
        // checks the arguments, and the pointer is only used within `size`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        self.maps.push(Mapping {
            address,
            size,
            ptr: ptr.cast(),
        });
        Ok(())
    }

    fn dma_unmap(
        &mut self,
        _flags: DmaUnmapFlags,
        address: u64,
        _size: u64,
    ) -> std::io::Result<()> {
        if let Some(at) = self.maps.iter().position(|m| m.address == address) {
            let m = self.maps.swap_remove(at);
            // SAFETY: the mapping was made by mmap with this pointer and size.
            unsafe { libc::munmap(m.ptr.cast(), m.size as usize) };
        }
        Ok(())
    }

    fn reset(&mut self) -> std::io::Result<()> {
        self.resets += 1;
        self.scratch = 0;
        self.dma_address = 0;
        self.dma_address_set = false;
        self.dma_len = 0;
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        _flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> std::io::Result<()> {
        if index != VFIO_PCI_MSIX_IRQ_INDEX || start + count > u32::from(VECTORS) {
            return Err(bad(format!("SET_IRQS {index} {start}+{count}")));
        }
        self.irqs.resize_with(usize::from(VECTORS), || None);
        for (i, fd) in fds.into_iter().enumerate() {
            self.irqs[start as usize + i] = Some(fd);
        }
        Ok(())
    }
}

fn regions() -> Vec<ServerRegion> {
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let size = match index {
                VFIO_PCI_CONFIG_REGION_INDEX => 256,
                VFIO_PCI_BAR0_REGION_INDEX | VFIO_PCI_BAR2_REGION_INDEX => 0x1000,
                _ => 0,
            };
            ServerRegion {
                region_info: vfio_region_info {
                    argsz: std::mem::size_of::<vfio_region_info>() as u32,
                    index,
                    size,
                    flags: if size > 0 {
                        VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
                    } else {
                        0
                    },
                    ..Default::default()
                },
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        })
        .collect()
}

fn irqs() -> Vec<IrqInfo> {
    (0..VFIO_PCI_NUM_IRQS)
        .map(|index| IrqInfo {
            index,
            flags: if index == VFIO_PCI_MSIX_IRQ_INDEX {
                VFIO_IRQ_INFO_EVENTFD
            } else {
                0
            },
            count: if index == VFIO_PCI_MSIX_IRQ_INDEX {
                u32::from(VECTORS)
            } else {
                0
            },
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let server = match args.as_slice() {
        [flag, path] if flag == "--socket" => {
            let path = PathBuf::from(path);
            let _ = std::fs::remove_file(&path);
            match Server::new(&path, true, irqs(), regions()) {
                Ok(server) => server,
                Err(e) => {
                    eprintln!(
                        "vfio-user-testdev: cannot listen on {}: {e}",
                        path.display()
                    );
                    std::process::exit(2);
                }
            }
        }
        [flag, fd] if flag == "--fd" => {
            let Ok(fd) = fd.parse::<i32>() else {
                eprintln!("vfio-user-testdev: --fd takes a number");
                std::process::exit(2);
            };
            // SAFETY: the caller passed this descriptor, a listening socket, for us to own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            Server::from_owned_fd(fd, true, irqs(), regions())
        }
        _ => {
            eprintln!("usage: vfio-user-testdev --socket PATH | --fd N");
            std::process::exit(2);
        }
    };
    eprintln!("vfio-user-testdev: serving (pid {})", std::process::id());
    loop {
        // A new device state per frontend, as a freshly started server would have.
        let mut device = Device::new();
        if let Err(e) = server.run(&mut device) {
            eprintln!("vfio-user-testdev: connection ended: {e}");
        }
    }
}
