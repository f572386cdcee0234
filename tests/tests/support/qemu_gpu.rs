#![allow(dead_code)] // each user needs a different part

//! QEMU's `vhost-user-gpu` (Debian, `/usr/lib/qemu/vhost-user-gpu`, 2D mode) driven from a
//! test or benchmark, which plays the core's part (a vhost-user frontend that hands the
//! backend a connection to isola-display with `VHOST_USER_GPU_SET_SOCKET`) and the guest's
//! (a virtio-gpu driver on the control and cursor queues, guest RAM in a memfd).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use isola_device_common::testing::{
    connect, negotiate, raw_message, start_queue, GuestRam, SplitQueue,
};
use isola_tests::wait_for_path;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress};

pub const QEMU_GPU: &str = isola_tests::gpu::QEMU_VHOST_USER_GPU;
const GPU_SET_SOCKET: u32 = 33;
/// vhost-user header flags: protocol version 1.
const VERSION_1: u32 = 0x1;

pub const CMD_GET_DISPLAY_INFO: u32 = 0x0100;
pub const CMD_RESOURCE_CREATE_2D: u32 = 0x0101;
pub const CMD_SET_SCANOUT: u32 = 0x0103;
pub const CMD_RESOURCE_FLUSH: u32 = 0x0104;
pub const CMD_TRANSFER_TO_HOST_2D: u32 = 0x0105;
pub const CMD_RESOURCE_ATTACH_BACKING: u32 = 0x0106;
pub const CMD_UPDATE_CURSOR: u32 = 0x0300;
pub const RESP_OK_NODATA: u32 = 0x1100;
pub const RESP_OK_DISPLAY_INFO: u32 = 0x1101;
pub const FORMAT_B8G8R8A8: u32 = 1;
pub const FORMAT_B8G8R8X8: u32 = 2;

/// Guest-physical layout of the test's RAM.
const CTRL_RING: u64 = 0x1000;
const CURSOR_RING: u64 = 0x8000;
const CMD: u64 = 0x10000;
const CURSOR_CMD: u64 = 0x10800;
const RESP: u64 = 0x11000;
pub const PIXELS: u64 = 0x100000;
pub const CURSOR_PIXELS: u64 = 0x800000;
const RAM: u64 = 16 << 20;

/// A command: the 24-byte control header, then `fields` as little-endian u32s.
pub fn cmd(kind: u32, fields: &[u32]) -> Vec<u8> {
    let mut c = vec![0u8; 24];
    c[..4].copy_from_slice(&kind.to_le_bytes());
    for f in fields {
        c.extend_from_slice(&f.to_le_bytes());
    }
    c
}

pub fn lo_hi(v: u64) -> [u32; 2] {
    [v as u32, (v >> 32) as u32]
}

/// The backend process, its vhost-user session, and the driver's queues.
pub struct QemuGpu {
    child: Child,
    pub ram: GuestRam,
    _frontend: Frontend,
    ctrl: SplitQueue,
    cursor: SplitQueue,
    done: u16,
    cursor_done: u16,
}

impl Drop for QemuGpu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl QemuGpu {
    /// Starts the backend in `dir` and connects it to isola-display at `display_socket`;
    /// `None` (with a SKIPPED note) if QEMU's backend is not installed.
    pub fn start(dir: &Path, display_socket: &Path) -> Option<QemuGpu> {
        if !isola_tests::gpu::QemuGpu::available() {
            return None;
        }
        let gpu_sock = dir.join("gpu.sock");
        let child = Command::new(QEMU_GPU)
            .arg("--socket-path")
            .arg(&gpu_sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("vhost-user-gpu starts");
        wait_for_path(&gpu_sock, Duration::from_secs(20));
        let ram = GuestRam::new(RAM);
        let mut frontend = connect(&gpu_sock, 2, Duration::from_secs(20));
        negotiate(
            &mut frontend,
            1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1,
            VhostUserProtocolFeatures::CONFIG,
        );
        frontend
            .set_mem_table(&[ram.region()])
            .expect("SET_MEM_TABLE");

        // The core's part: connect to isola-display and pass the connection on.
        let display_conn = UnixStream::connect(display_socket).expect("display accepts");
        // SAFETY: the frontend's socket stays open for this whole function (the frontend
        // is alive); ManuallyDrop keeps this borrowed UnixStream from closing it.
        let stream = std::mem::ManuallyDrop::new(unsafe {
            <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(frontend.as_raw_fd())
        });
        raw_message(
            &stream,
            GPU_SET_SOCKET,
            VERSION_1,
            &[],
            &[display_conn.as_raw_fd()],
        );
        drop(display_conn);

        let ctrl = SplitQueue::new(0, 64, GuestAddress(CTRL_RING));
        let cursor = SplitQueue::new(1, 64, GuestAddress(CURSOR_RING));
        start_queue(&mut frontend, &ctrl, &ram, 0);
        start_queue(&mut frontend, &cursor, &ram, 0);
        Some(QemuGpu {
            child,
            ram,
            _frontend: frontend,
            ctrl,
            cursor,
            done: 0,
            cursor_done: 0,
        })
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        self.ram
            .memory()
            .write_slice(bytes, GuestAddress(gpa))
            .unwrap();
    }

    /// Sends one control command and returns the response's bytes.
    pub fn command(&mut self, cmd: &[u8], resp_len: u32) -> Vec<u8> {
        let mem = self.ram.memory();
        mem.write_slice(cmd, GuestAddress(CMD)).unwrap();
        mem.write_slice(&vec![0u8; resp_len as usize], GuestAddress(RESP))
            .unwrap();
        let head = self.ctrl.add(
            mem,
            &[
                (GuestAddress(CMD), cmd.len() as u32, false),
                (GuestAddress(RESP), resp_len, true),
            ],
        );
        self.ctrl.publish(mem, head);
        self.ctrl.kick();
        self.done = self.done.wrapping_add(1);
        assert!(
            self.ctrl.wait_used(mem, self.done, Duration::from_secs(20)),
            "vhost-user-gpu did not answer command {:#x}",
            u32::from_le_bytes(cmd[..4].try_into().unwrap())
        );
        let mut resp = vec![0u8; resp_len as usize];
        mem.read_slice(&mut resp, GuestAddress(RESP)).unwrap();
        resp
    }

    /// Sends a command that answers OK_NODATA.
    pub fn ok(&mut self, cmd: &[u8]) {
        let resp = self.command(cmd, 24);
        let kind = u32::from_le_bytes(resp[..4].try_into().unwrap());
        assert_eq!(
            kind,
            RESP_OK_NODATA,
            "command {:#x} failed with {kind:#x}",
            u32::from_le_bytes(cmd[..4].try_into().unwrap())
        );
    }

    /// Resource 1 (`w` x `h`, XRGB) on scanout 0, backed at [`PIXELS`].
    pub fn set_up_scanout(&mut self, w: u32, h: u32) {
        self.ok(&cmd(CMD_RESOURCE_CREATE_2D, &[1, FORMAT_B8G8R8X8, w, h]));
        let [lo, hi] = lo_hi(PIXELS);
        self.ok(&cmd(
            CMD_RESOURCE_ATTACH_BACKING,
            &[1, 1, lo, hi, w * h * 4, 0],
        ));
        self.ok(&cmd(CMD_SET_SCANOUT, &[0, 0, w, h, 0, 1]));
    }

    /// Transfers and flushes a rectangle of resource 1 (whose width is `stride_px`).
    pub fn redraw(&mut self, x: u32, y: u32, w: u32, h: u32, stride_px: u32) {
        let [olo, ohi] = lo_hi(u64::from(y * stride_px + x) * 4);
        self.ok(&cmd(CMD_TRANSFER_TO_HOST_2D, &[x, y, w, h, olo, ohi, 1, 0]));
        self.ok(&cmd(CMD_RESOURCE_FLUSH, &[x, y, w, h, 1, 0]));
    }

    /// Sends one cursor-queue command.
    pub fn cursor_command(&mut self, cmd: &[u8]) {
        let mem = self.ram.memory();
        mem.write_slice(cmd, GuestAddress(CURSOR_CMD)).unwrap();
        let head = self
            .cursor
            .add(mem, &[(GuestAddress(CURSOR_CMD), cmd.len() as u32, false)]);
        self.cursor.publish(mem, head);
        self.cursor.kick();
        self.cursor_done = self.cursor_done.wrapping_add(1);
        assert!(
            self.cursor
                .wait_used(mem, self.cursor_done, Duration::from_secs(20)),
            "cursor queue not served"
        );
    }
}
