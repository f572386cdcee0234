//! The GPU tests' own display end: a minimal, independent reader of QEMU's vhost-user-gpu
//! display protocol (`docs/interop/vhost-user-gpu.rst`), and the `isola-gpu` process.
//!
//! [`TestDisplay`] listens on a Unix socket as a display process does. The core connects to
//! it and passes the connection to the GPU backend, which then talks to it directly: the
//! display answers GET_PROTOCOL_FEATURES, GET_DISPLAY_INFO and GET_EDID, and collects
//! SCANOUT, UPDATE and CURSOR_* into a framebuffer the test compares pixel for pixel. It
//! shares no code with `isola-gpu`; it works the same with QEMU's `vhost-user-gpu`.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::{binary, wait_for_path};

// Display-protocol requests (the GPU sends them; the display replies to some).
use crate::display::code::{
    CURSOR_POS, CURSOR_POS_HIDE, CURSOR_UPDATE, GET_DISPLAY_INFO, GET_EDID, GET_PROTOCOL_FEATURES,
    SCANOUT, SET_PROTOCOL_FEATURES, UPDATE,
};
const REPLY: u32 = 0x4;
/// The display offers EDID (protocol feature bit 0).
const FEATURES: u64 = 1;
/// Most bytes one message may carry here (a 16384 x 16384 update would be 1 GiB).
const MAX_PAYLOAD: u32 = 64 << 20;

/// What the display has been told so far, on its latest connection.
#[derive(Debug, Clone, Default)]
pub struct DisplayState {
    /// Connections the display accepted (one per GPU session).
    pub connections: u32,
    pub features_set: Option<u64>,
    /// Scanout 0's size, (0, 0) when disabled or never set.
    pub size: (u32, u32),
    /// Scanout 0's pixels, 4 bytes each (blue, green, red, unused), rows of `size.0`.
    pub pixels: Vec<u8>,
    pub updates: u64,
    /// Cursor: position (x, y), hot spot, 64x64 image; `None` when hidden or never set.
    pub cursor_pos: Option<(u32, u32)>,
    pub cursor_hot: (u32, u32),
    pub cursor_image: Option<Vec<u8>>,
    /// Protocol violations seen (the test fails on any).
    pub errors: Vec<String>,
}

impl DisplayState {
    /// (red, green, blue) at (x, y).
    pub fn rgb(&self, x: u32, y: u32) -> [u8; 3] {
        let i = ((y * self.size.0 + x) * 4) as usize;
        [self.pixels[i + 2], self.pixels[i + 1], self.pixels[i]]
    }

    /// Checks every pixel of scanout 0 against `expect(x, y)`; returns the first mismatch.
    pub fn compare(&self, expect: impl Fn(u32, u32) -> [u8; 3]) -> Result<(), String> {
        let (w, h) = self.size;
        if w == 0 || h == 0 {
            return Err("scanout 0 is not set".into());
        }
        for y in 0..h {
            for x in 0..w {
                let (got, want) = (self.rgb(x, y), expect(x, y));
                if got != want {
                    return Err(format!("pixel ({x}, {y}) is {got:?}, expected {want:?}"));
                }
            }
        }
        Ok(())
    }
}

type Shared = Arc<(Mutex<DisplayState>, Condvar)>;

/// A display end listening on a Unix socket; each connection is served on its own thread.
pub struct TestDisplay {
    pub socket: PathBuf,
    state: Shared,
}

impl TestDisplay {
    /// Listens on `socket`, advertising one `width` x `height` display.
    pub fn start(socket: &Path, width: u32, height: u32) -> TestDisplay {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).expect("display socket binds");
        let state: Shared = Arc::default();
        let shared = Arc::clone(&state);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                {
                    let mut s = shared.0.lock().unwrap();
                    let connections = s.connections + 1;
                    *s = DisplayState {
                        connections,
                        ..Default::default()
                    };
                }
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || serve(stream, &shared, width, height));
            }
        });
        TestDisplay {
            socket: socket.to_owned(),
            state,
        }
    }

    pub fn state(&self) -> DisplayState {
        self.state.0.lock().unwrap().clone()
    }

    /// Waits until `pred` holds; panics with the state after `timeout`.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&DisplayState) -> bool,
    ) -> DisplayState {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.0.lock().unwrap();
        loop {
            assert!(
                s.errors.is_empty(),
                "display protocol errors: {:?}",
                s.errors
            );
            if pred(&s) {
                return s.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "display: {what} did not happen within {timeout:?} (size {:?}, {} updates, {} connections)",
                s.size,
                s.updates,
                s.connections
            );
            s = self.state.1.wait_timeout(s, left).unwrap().0;
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn reply(stream: &mut UnixStream, request: u32, payload: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(12 + payload.len());
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&REPLY.to_le_bytes());
    msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    msg.extend_from_slice(payload);
    stream.write_all(&msg)
}

/// A 128-byte EDID 1.4 block whose first detailed timing is `w` x `h` (the test's own).
fn test_edid(w: u32, h: u32) -> Vec<u8> {
    let mut e = vec![0u8; 128];
    e[0..8].copy_from_slice(&[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    e[18] = 1;
    e[19] = 4;
    e[54] = 0x01; // pixel clock 10 kHz units, nonzero
    e[56] = (w & 0xff) as u8;
    e[58] = ((w >> 8) as u8) << 4;
    e[59] = (h & 0xff) as u8;
    e[61] = ((h >> 8) as u8) << 4;
    let sum = e.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

fn serve(mut stream: UnixStream, shared: &Shared, width: u32, height: u32) {
    loop {
        let mut hdr = [0u8; 12];
        if stream.read_exact(&mut hdr).is_err() {
            return;
        }
        let (request, size) = (u32_at(&hdr, 0), u32_at(&hdr, 8));
        let fail = |why: String| {
            let (lock, cvar) = &**shared;
            lock.lock().unwrap().errors.push(why);
            cvar.notify_all();
        };
        if size > MAX_PAYLOAD {
            return fail(format!("request {request}: {size}-byte payload"));
        }
        let mut payload = vec![0u8; size as usize];
        if stream.read_exact(&mut payload).is_err() {
            return;
        }
        let answered = match request {
            GET_PROTOCOL_FEATURES => reply(&mut stream, request, &FEATURES.to_le_bytes()),
            GET_DISPLAY_INFO => {
                // struct virtio_gpu_resp_display_info: header, then 16 pmodes.
                let mut info = vec![0u8; 24 + 16 * 24];
                info[0..4].copy_from_slice(&0x1101u32.to_le_bytes());
                info[32..36].copy_from_slice(&width.to_le_bytes());
                info[36..40].copy_from_slice(&height.to_le_bytes());
                info[40..44].copy_from_slice(&1u32.to_le_bytes());
                reply(&mut stream, request, &info)
            }
            GET_EDID => {
                // struct virtio_gpu_resp_edid: header, size, padding, 1024 bytes.
                let mut edid = vec![0u8; 24 + 8 + 1024];
                edid[0..4].copy_from_slice(&0x1104u32.to_le_bytes());
                edid[24..28].copy_from_slice(&128u32.to_le_bytes());
                edid[32..160].copy_from_slice(&test_edid(width, height));
                reply(&mut stream, request, &edid)
            }
            _ => Ok(()),
        };
        if answered.is_err() {
            return;
        }
        let (lock, cvar) = &**shared;
        let mut s = lock.lock().unwrap();
        if let Err(why) = apply(&mut s, request, &payload) {
            s.errors.push(why);
        }
        cvar.notify_all();
    }
}

fn apply(s: &mut DisplayState, request: u32, p: &[u8]) -> Result<(), String> {
    let need = |n: usize| {
        if p.len() >= n {
            Ok(())
        } else {
            Err(format!("request {request}: {} bytes, need {n}", p.len()))
        }
    };
    match request {
        GET_PROTOCOL_FEATURES | GET_DISPLAY_INFO => {}
        SET_PROTOCOL_FEATURES => {
            need(8)?;
            s.features_set = Some(u64::from_le_bytes(p[0..8].try_into().unwrap()));
        }
        GET_EDID => need(4)?,
        SCANOUT => {
            need(12)?;
            if u32_at(p, 0) == 0 {
                let (w, h) = (u32_at(p, 4), u32_at(p, 8));
                s.size = (w, h);
                s.pixels = vec![0; (w * h * 4) as usize];
            }
        }
        UPDATE => {
            need(20)?;
            let (scanout, x, y, w, h) = (
                u32_at(p, 0),
                u32_at(p, 4),
                u32_at(p, 8),
                u32_at(p, 12),
                u32_at(p, 16),
            );
            let data = &p[20..];
            if data.len() as u64 != u64::from(w) * u64::from(h) * 4 {
                return Err(format!("UPDATE {w}x{h} with {} bytes", data.len()));
            }
            if scanout != 0 {
                return Ok(());
            }
            let (sw, sh) = s.size;
            let inside = x.checked_add(w).is_some_and(|r| r <= sw)
                && y.checked_add(h).is_some_and(|b| b <= sh);
            if !inside {
                return Err(format!("UPDATE ({x}, {y}) {w}x{h} outside {sw}x{sh}"));
            }
            for row in 0..h {
                let src = (row * w * 4) as usize;
                let dst = (((y + row) * sw + x) * 4) as usize;
                let n = (w * 4) as usize;
                s.pixels[dst..dst + n].copy_from_slice(&data[src..src + n]);
            }
            s.updates += 1;
        }
        CURSOR_POS => {
            need(12)?;
            s.cursor_pos = Some((u32_at(p, 4), u32_at(p, 8)));
        }
        CURSOR_POS_HIDE => s.cursor_pos = None,
        CURSOR_UPDATE => {
            need(20 + 64 * 64 * 4)?;
            s.cursor_pos = Some((u32_at(p, 4), u32_at(p, 8)));
            s.cursor_hot = (u32_at(p, 12), u32_at(p, 16));
            s.cursor_image = Some(p[20..20 + 64 * 64 * 4].to_vec());
        }
        other => return Err(format!("unexpected request {other}")),
    }
    Ok(())
}

/// An `isola-gpu` device process; killed when dropped.
pub struct IsolaGpu {
    child: Child,
}

impl IsolaGpu {
    /// Starts `isola-gpu --socket SOCKET ARGS` and waits for its socket.
    pub fn start(socket: &Path, args: &[&str]) -> IsolaGpu {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(binary("isola-gpu"))
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("isola-gpu starts");
        wait_for_path(socket, Duration::from_secs(20));
        IsolaGpu { child }
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The pid the test started (the sandbox's reaper; the device is its child).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for IsolaGpu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// QEMU's vhost-user-gpu backend (Debian package qemu-system-x86), if installed.
pub const QEMU_VHOST_USER_GPU: &str = "/usr/lib/qemu/vhost-user-gpu";

/// QEMU's `vhost-user-gpu` serving on `socket`; killed when dropped.
pub struct QemuGpu {
    child: Child,
}

impl QemuGpu {
    pub fn installed() -> bool {
        Path::new(QEMU_VHOST_USER_GPU).exists()
    }

    /// For a test: whether the backend is installed; if not, the test is skipped (a failure
    /// under CI, whose `.ci/run` installs it) and should return.
    pub fn available() -> bool {
        let installed = Self::installed();
        if !installed {
            crate::skip(
                crate::Missing::Installable,
                format!(
                    "{QEMU_VHOST_USER_GPU} is not installed (Debian 12: apt-get install \
                     qemu-system-gui)"
                ),
            );
        }
        installed
    }

    pub fn start(socket: &Path) -> QemuGpu {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(QEMU_VHOST_USER_GPU)
            .arg("--socket-path")
            .arg(socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("vhost-user-gpu starts");
        wait_for_path(socket, Duration::from_secs(20));
        QemuGpu { child }
    }

    /// Waits up to `timeout` for the process to end; its exit status, or `None` if it runs on.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for QemuGpu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
