//! Starting a real, sandboxed isola-usb, and driving it with the `vfio_user` crate's client
//! (which nobody here wrote) and the test driver (`isola_usb::testing`).

#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use isola_device_common::testing::{GuestRam, Scratch};
use isola_usb::testing::{Bus, Driver};
use vm_memory::{Bytes, GuestAddress};

pub const RAM: u64 = 16 << 20;
/// Where the driver's structures start in guest memory.
pub const BASE: u64 = 0x10_0000;
pub const DISK_BLOCKS: u64 = 4096;

pub struct Usb {
    pub child: Child,
    pub socket: PathBuf,
    pub control: PathBuf,
    pub disk: PathBuf,
    pub log: PathBuf,
}

/// Starts isola-usb in `dir` (disk and state file there; the disk is created if missing).
pub fn start(dir: &Scratch, extra: &[&str]) -> Usb {
    let (socket, control, disk) = (
        dir.path("usb.sock"),
        dir.path("usb-ctl.sock"),
        dir.path("disk.img"),
    );
    if !disk.exists() {
        let f = std::fs::File::create(&disk).unwrap();
        f.set_len(DISK_BLOCKS * 512).unwrap();
    }
    let _ = std::fs::remove_file(&socket);
    let log = dir.path(&format!(
        "usb-{}.log",
        Instant::now().elapsed().as_nanos() ^ std::process::id() as u128
    ));
    let child = Command::new(env!("CARGO_BIN_EXE_isola-usb"))
        .arg("--socket")
        .arg(&socket)
        .arg("--control-socket")
        .arg(&control)
        .arg("--disk")
        .arg(&disk)
        .arg("--state-file")
        .arg(dir.path("usb.state"))
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "isola-usb did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    Usb {
        child,
        socket,
        control,
        disk,
        log,
    }
}

impl Drop for Usb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The controller as the crate's client reaches it, and guest RAM it DMA-maps.
pub struct Remote {
    pub client: vfio_user::Client,
    pub ram: GuestRam,
    pub irq: vmm_sys_util::eventfd::EventFd,
}

impl Bus for Remote {
    fn read32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.client.region_read(0, offset, &mut b).unwrap();
        u32::from_le_bytes(b)
    }
    fn write32(&mut self, offset: u64, value: u32) {
        self.client
            .region_write(0, offset, &value.to_le_bytes())
            .unwrap();
    }
    fn mem_read(&mut self, addr: u64, buf: &mut [u8]) {
        self.ram
            .memory()
            .read_slice(buf, GuestAddress(addr))
            .unwrap();
    }
    fn mem_write(&mut self, addr: u64, buf: &[u8]) {
        self.ram
            .memory()
            .write_slice(buf, GuestAddress(addr))
            .unwrap();
    }
}

/// Connects with the crate's client, maps `ram` (or fresh RAM) and sets the MSI-X eventfd.
pub fn connect(socket: &Path, ram: Option<GuestRam>) -> Driver<Remote> {
    let mut client = vfio_user::Client::new(socket).expect("the crate's client connects");
    let ram = ram.unwrap_or_else(|| GuestRam::new(RAM));
    client
        .dma_map(0, 0, RAM, ram.file().as_raw_fd())
        .expect("DMA map of guest RAM");
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let flags = vfio_bindings::bindings::vfio::VFIO_IRQ_SET_DATA_EVENTFD
        | vfio_bindings::bindings::vfio::VFIO_IRQ_SET_ACTION_TRIGGER;
    client
        .set_irqs(2, flags, 0, 1, &[irq.as_raw_fd()])
        .expect("MSI-X eventfd");
    Driver::new(Remote { client, ram, irq }, BASE)
}

/// A key press or release through the control socket, as `isolactl key` sends it.
pub fn key(control: &Path, code: u16, pressed: bool) -> isola_ipc::input::InputResponse {
    let mut s = std::os::unix::net::UnixStream::connect(control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    isola_ipc::write_message(
        &mut s,
        &isola_ipc::input::InputRequest::Key { code, pressed },
    )
    .unwrap();
    isola_ipc::read_message(&mut s).unwrap()
}
