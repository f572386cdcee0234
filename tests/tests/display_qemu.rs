//! isola-display under an independent GPU backend: QEMU's `vhost-user-gpu` (Debian,
//! `/usr/lib/qemu/vhost-user-gpu`, 2D mode). The test plays the core's part: a vhost-user
//! frontend that connects to isola-display's socket and hands that connection to the
//! backend with `VHOST_USER_GPU_SET_SOCKET`, and a virtio-gpu driver on the control and
//! cursor queues. What the "guest" draws must come out of `isolactl screenshot` pixel for
//! pixel, and GET_DISPLAY_INFO must reach isola-display and come back.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use isola_device_common::testing::{
    connect, negotiate, raw_message, start_queue, GuestRam, SplitQueue,
};
use isola_device_common::Memory;
use isola_tests::display::{
    first_difference, pattern, read_ppm, run_probe, screenshot, vncprobe, IsolaDisplay,
};
use isola_tests::{scratch_dir, wait_for_path};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress};

const QEMU_GPU: &str = "/usr/lib/qemu/vhost-user-gpu";
const GPU_SET_SOCKET: u32 = 33;
/// vhost-user header flags: protocol version 1.
const VERSION_1: u32 = 0x1;

const CMD_GET_DISPLAY_INFO: u32 = 0x0100;
const CMD_RESOURCE_CREATE_2D: u32 = 0x0101;
const CMD_SET_SCANOUT: u32 = 0x0103;
const CMD_RESOURCE_FLUSH: u32 = 0x0104;
const CMD_TRANSFER_TO_HOST_2D: u32 = 0x0105;
const CMD_RESOURCE_ATTACH_BACKING: u32 = 0x0106;
const CMD_UPDATE_CURSOR: u32 = 0x0300;
const RESP_OK_NODATA: u32 = 0x1100;
const RESP_OK_DISPLAY_INFO: u32 = 0x1101;
const FORMAT_B8G8R8X8: u32 = 2;
const FORMAT_B8G8R8A8: u32 = 1;

/// Guest-physical layout of the test's RAM.
const CTRL_RING: u64 = 0x1000;
const CURSOR_RING: u64 = 0x8000;
const CMD: u64 = 0x10000;
const RESP: u64 = 0x11000;
const PIXELS: u64 = 0x100000;
const CURSOR_PIXELS: u64 = 0x800000;

struct Backend(Child);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A virtio-gpu driver on the test's RAM.
struct Driver<'a> {
    mem: &'a Memory,
    ctrl: SplitQueue,
    done: u16,
}

impl Driver<'_> {
    /// Sends one control command and returns the response's bytes.
    fn command(&mut self, cmd: &[u8], resp_len: u32) -> Vec<u8> {
        self.mem.write_slice(cmd, GuestAddress(CMD)).unwrap();
        self.mem
            .write_slice(&vec![0u8; resp_len as usize], GuestAddress(RESP))
            .unwrap();
        let head = self.ctrl.add(
            self.mem,
            &[
                (GuestAddress(CMD), cmd.len() as u32, false),
                (GuestAddress(RESP), resp_len, true),
            ],
        );
        self.ctrl.publish(self.mem, head);
        self.ctrl.kick();
        self.done = self.done.wrapping_add(1);
        assert!(
            self.ctrl
                .wait_used(self.mem, self.done, Duration::from_secs(20)),
            "vhost-user-gpu did not answer command {:#x}",
            u32::from_le_bytes(cmd[..4].try_into().unwrap())
        );
        let mut resp = vec![0u8; resp_len as usize];
        self.mem.read_slice(&mut resp, GuestAddress(RESP)).unwrap();
        resp
    }

    fn ok(&mut self, cmd: &[u8]) {
        let resp = self.command(cmd, 24);
        let kind = u32::from_le_bytes(resp[..4].try_into().unwrap());
        assert_eq!(
            kind,
            RESP_OK_NODATA,
            "command {:#x} failed with {kind:#x}",
            u32::from_le_bytes(cmd[..4].try_into().unwrap())
        );
    }
}

/// A command: the 24-byte control header, then `fields` as little-endian u32s.
fn cmd(kind: u32, fields: &[u32]) -> Vec<u8> {
    let mut c = vec![0u8; 24];
    c[..4].copy_from_slice(&kind.to_le_bytes());
    for f in fields {
        c.extend_from_slice(&f.to_le_bytes());
    }
    c
}

fn lo_hi(v: u64) -> [u32; 2] {
    [v as u32, (v >> 32) as u32]
}

#[test]
fn qemu_vhost_user_gpu_drives_isola_display() {
    if !Path::new(QEMU_GPU).exists() {
        eprintln!(
            "SKIPPED: {QEMU_GPU} is not installed (Debian 12: apt-get install qemu-system-common)"
        );
        return;
    }
    let dir = scratch_dir("display-qemu");
    let mut display = IsolaDisplay::start(&dir, true, &["--width", "1024", "--height", "768"]);
    let gpu_sock = dir.join("gpu.sock");
    let _backend = Backend(
        Command::new(QEMU_GPU)
            .arg("--socket-path")
            .arg(&gpu_sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("vhost-user-gpu starts"),
    );
    wait_for_path(&gpu_sock, Duration::from_secs(20));

    let ram = GuestRam::new(16 << 20);
    let mem = ram.memory();
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
    let display_conn = UnixStream::connect(&display.socket).expect("display accepts");
    let frontend_fd = frontend.as_raw_fd();
    // SAFETY: `frontend_fd` is the frontend's open socket, borrowed for the duration of
    // this call only; ManuallyDrop keeps the UnixStream from closing it.
    let stream = std::mem::ManuallyDrop::new(unsafe {
        <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(frontend_fd)
    });
    raw_message(
        &stream,
        GPU_SET_SOCKET,
        VERSION_1,
        &[],
        &[display_conn.as_raw_fd()],
    );
    drop(display_conn);
    display.wait_log("GPU session 1 connected", Duration::from_secs(20));

    let ctrl = SplitQueue::new(0, 64, GuestAddress(CTRL_RING));
    let cursor = SplitQueue::new(1, 64, GuestAddress(CURSOR_RING));
    start_queue(&mut frontend, &ctrl, &ram, 0);
    start_queue(&mut frontend, &cursor, &ram, 0);
    let mut driver = Driver { mem, ctrl, done: 0 };

    // GET_DISPLAY_INFO travels backend -> isola-display -> backend.
    let info = driver.command(&cmd(CMD_GET_DISPLAY_INFO, &[]), 24 + 16 * 24);
    let word = |i: usize| u32::from_le_bytes(info[i..i + 4].try_into().unwrap());
    assert_eq!(word(0), RESP_OK_DISPLAY_INFO);
    assert_eq!(
        (word(32), word(36), word(40)),
        (1024, 768, 1),
        "scanout 0 as isola-display says"
    );

    // Draw: a resource backed by guest RAM, shown on scanout 0.
    let (w, h) = (640u32, 400u32);
    let picture = pattern(w, h, 9);
    let bytes: Vec<u8> = picture.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(PIXELS)).unwrap();
    driver.ok(&cmd(CMD_RESOURCE_CREATE_2D, &[1, FORMAT_B8G8R8X8, w, h]));
    let [lo, hi] = lo_hi(PIXELS);
    driver.ok(&cmd(
        CMD_RESOURCE_ATTACH_BACKING,
        &[1, 1, lo, hi, w * h * 4, 0],
    ));
    driver.ok(&cmd(CMD_SET_SCANOUT, &[0, 0, w, h, 0, 1]));
    driver.ok(&cmd(CMD_TRANSFER_TO_HOST_2D, &[0, 0, w, h, 0, 0, 1, 0]));
    driver.ok(&cmd(CMD_RESOURCE_FLUSH, &[0, 0, w, h, 1, 0]));
    display.wait_updates(1);
    let (sw, sh, shot) = screenshot(&display.control, &dir.join("qemu.png"));
    assert_eq!((sw, sh), (w, h));
    if let Some(diff) = first_difference(&shot, &picture, w) {
        panic!("screenshot differs from what the guest drew through vhost-user-gpu: {diff}");
    }

    // A partial redraw: only that rectangle changes.
    let mut next = picture.clone();
    for y in 100..150u32 {
        for x in 200..300u32 {
            next[(y * w + x) as usize] = 0x00ff_8000;
        }
    }
    let bytes: Vec<u8> = next.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(PIXELS)).unwrap();
    let offset = u64::from(100 * w + 200) * 4;
    let [olo, ohi] = lo_hi(offset);
    driver.ok(&cmd(
        CMD_TRANSFER_TO_HOST_2D,
        &[200, 100, 100, 50, olo, ohi, 1, 0],
    ));
    driver.ok(&cmd(CMD_RESOURCE_FLUSH, &[200, 100, 100, 50, 1, 0]));
    display.wait_updates(2);
    let (_, _, shot) = screenshot(&display.control, &dir.join("qemu2.png"));
    if let Some(diff) = first_difference(&shot, &next, w) {
        panic!("partial update through vhost-user-gpu: {diff}");
    }

    // A cursor: a 64x64 resource sent on the cursor queue reaches isola-display as
    // CURSOR_UPDATE, and from there a VNC client as its cursor shape.
    let cursor_img: Vec<u8> = (0..64 * 64)
        .flat_map(|_| 0xff00_00ffu32.to_le_bytes())
        .collect();
    mem.write_slice(&cursor_img, GuestAddress(CURSOR_PIXELS))
        .unwrap();
    driver.ok(&cmd(CMD_RESOURCE_CREATE_2D, &[2, FORMAT_B8G8R8A8, 64, 64]));
    let [clo, chi] = lo_hi(CURSOR_PIXELS);
    driver.ok(&cmd(
        CMD_RESOURCE_ATTACH_BACKING,
        &[2, 1, clo, chi, 64 * 64 * 4, 0],
    ));
    driver.ok(&cmd(CMD_TRANSFER_TO_HOST_2D, &[0, 0, 64, 64, 0, 0, 2, 0]));
    let mut cursor = cursor;
    let update = cmd(CMD_UPDATE_CURSOR, &[0, 10, 20, 0, 2, 1, 2, 0]);
    mem.write_slice(&update, GuestAddress(CMD + 0x800)).unwrap();
    let head = cursor.add(
        mem,
        &[(GuestAddress(CMD + 0x800), update.len() as u32, false)],
    );
    cursor.publish(mem, head);
    cursor.kick();
    assert!(
        cursor.wait_used(mem, 1, Duration::from_secs(20)),
        "cursor queue not served"
    );

    if let Some(probe) = vncprobe(&dir) {
        let addr = display.vnc.expect("VNC on TCP");
        let out = dir.join("qemu-vnc.ppm");
        let lines = run_probe(
            &probe,
            &addr.ip().to_string(),
            addr.port(),
            "zrle",
            &out,
            &[],
        );
        assert!(
            lines.iter().any(|l| l == "cursor 64 64 1 2 4096"),
            "cursor: {lines:?}"
        );
        let (vw, vh, got) = read_ppm(&out);
        assert_eq!((vw, vh), (w, h));
        if let Some(diff) = first_difference(&got, &next, w) {
            panic!("VNC picture through vhost-user-gpu: {diff}");
        }
    }

    let status = display.status();
    assert!(status.gpu_connected);
    assert_eq!(status.scanouts, vec![Some((w, h))]);
    assert_eq!(status.updates, 2);
    display.assert_alive();
}
