//! Helpers for `isola-display`'s tests and benchmark: start the process, play the GPU
//! backend's side of the vhost-user-gpu display protocol, a fake `isola-input` control
//! socket, screenshots through `isolactl`, and `vncprobe`, a VNC client built on
//! LibVNCClient (an implementation independent of Isola's).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use isola_ipc::display::{DisplayRequest, DisplayResponse, DisplayStatus};
use isola_ipc::input::{InputRequest, InputResponse};

use crate::{binary, wait_for_path};

/// Request codes of the display protocol (QEMU `docs/interop/vhost-user-gpu.rst`).
pub mod code {
    pub const GET_PROTOCOL_FEATURES: u32 = 1;
    pub const SET_PROTOCOL_FEATURES: u32 = 2;
    pub const GET_DISPLAY_INFO: u32 = 3;
    pub const CURSOR_POS: u32 = 4;
    pub const CURSOR_POS_HIDE: u32 = 5;
    pub const CURSOR_UPDATE: u32 = 6;
    pub const SCANOUT: u32 = 7;
    pub const UPDATE: u32 = 8;
    pub const DMABUF_SCANOUT: u32 = 9;
    pub const DMABUF_UPDATE: u32 = 10;
    pub const GET_EDID: u32 = 11;
}

/// A running `isola-display`; killed when dropped.
pub struct IsolaDisplay {
    child: Child,
    /// Where GPU sessions connect.
    pub socket: PathBuf,
    /// The control socket (`isolactl --display`).
    pub control: PathBuf,
    /// The TCP address of its VNC server, if started with `--vnc`.
    pub vnc: Option<std::net::SocketAddr>,
    log: Receiver<String>,
    seen: Vec<String>,
}

impl IsolaDisplay {
    /// Starts `isola-display` in `dir` with `extra` arguments. With `tcp_vnc`, VNC listens on
    /// a free loopback port (read back from its log).
    pub fn start(dir: &Path, tcp_vnc: bool, extra: &[&str]) -> IsolaDisplay {
        let socket = dir.join("display.sock");
        let control = dir.join("display-ctl.sock");
        let mut cmd = Command::new(binary("isola-display"));
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--control")
            .arg(&control);
        if tcp_vnc {
            cmd.args(["--vnc", "127.0.0.1:0"]);
        }
        let mut child = cmd
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("isola-display starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut display = IsolaDisplay {
            child,
            socket,
            control,
            vnc: None,
            log,
            seen: Vec::new(),
        };
        if tcp_vnc {
            let line = display.wait_log("VNC on ", Duration::from_secs(20));
            let addr = line.rsplit("VNC on ").next().expect("address follows");
            display.vnc = Some(addr.trim().parse().expect("a socket address"));
        }
        wait_for_path(&display.socket, Duration::from_secs(20));
        wait_for_path(&display.control, Duration::from_secs(20));
        display
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => panic!(
                    "isola-display logged no {needle:?} within {timeout:?}; it said:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash, and reap the process: when this returns it is gone, with every
    /// socket it had.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// How many file descriptors the process has open.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("/proc is mounted")
            .count()
    }

    /// Panics unless the process is still running.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            while let Ok(line) = self.log.recv_timeout(Duration::from_millis(200)) {
                self.seen.push(line);
            }
            panic!("isola-display exited ({status}):\n{}", self.seen.join("\n"));
        }
    }

    pub fn status(&self) -> DisplayStatus {
        match request(&self.control, &DisplayRequest::Status) {
            DisplayResponse::Status(s) => s,
            other => panic!("status answered {other:?}"),
        }
    }

    /// Waits until the display has counted `n` UPDATEs.
    pub fn wait_updates(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.status();
            if s.updates >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "updates stayed at {} (want {n})",
                s.updates
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for IsolaDisplay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request on isola-display's control socket.
pub fn request(control: &Path, req: &DisplayRequest) -> DisplayResponse {
    let mut s = UnixStream::connect(control).expect("display control socket accepts");
    isola_ipc::write_message(&mut s, req).expect("request is sent");
    isola_ipc::read_message(&mut s).expect("isola-display answers")
}

/// A test's side of a GPU session: the role `isola-gpu` or QEMU's `vhost-user-gpu` plays.
pub struct GpuPeer {
    pub stream: UnixStream,
}

impl GpuPeer {
    pub fn connect(socket: &Path) -> GpuPeer {
        let stream = UnixStream::connect(socket).expect("display socket accepts");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        GpuPeer { stream }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn send(&mut self, request: u32, payload: &[u8]) {
        self.send_raw(&message(request, 0, payload))
            .expect("display reads");
    }

    /// Sends a request and reads the reply's (request, flags, payload).
    pub fn ask(&mut self, request: u32, payload: &[u8]) -> (u32, u32, Vec<u8>) {
        self.send(request, payload);
        self.read_reply()
    }

    pub fn read_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 12];
        self.stream.read_exact(&mut h).expect("a reply");
        let word = |i: usize| u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let mut payload = vec![0u8; word(8) as usize];
        self.stream
            .read_exact(&mut payload)
            .expect("the reply's payload");
        (word(0), word(4), payload)
    }

    pub fn scanout(&mut self, id: u32, w: u32, h: u32) {
        self.send(code::SCANOUT, &words(&[id, w, h]));
    }

    pub fn update(&mut self, x: u32, y: u32, w: u32, h: u32, pixels: &[u32]) {
        self.send_raw(&update_message(x, y, w, h, pixels))
            .expect("display reads");
    }

    /// True once the display has closed this session (read gives EOF or reset).
    pub fn closed_by_display(&mut self, timeout: Duration) -> bool {
        self.stream
            .set_read_timeout(Some(timeout))
            .expect("timeout");
        let mut b = [0u8; 1];
        match self.stream.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }
}

pub fn words(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

pub fn message(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = words(&[request, flags, payload.len() as u32]);
    m.extend_from_slice(payload);
    m
}

pub fn update_message(x: u32, y: u32, w: u32, h: u32, pixels: &[u32]) -> Vec<u8> {
    let mut payload = words(&[0, x, y, w, h]);
    payload.extend(pixels.iter().flat_map(|p| p.to_ne_bytes()));
    message(code::UPDATE, 0, &payload)
}

/// A deterministic picture (XRGB words) that differs at every pixel from its neighbours and
/// between seeds: bars, a gradient and a checkerboard.
pub fn pattern(w: u32, h: u32, seed: u32) -> Vec<u32> {
    let mut px = Vec::with_capacity((w * h) as usize);
    for y in 0..h {
        for x in 0..w {
            let r = (x * 255 / w.max(1)) ^ seed;
            let g = (y * 255 / h.max(1)).wrapping_add(seed * 7);
            let b = if (x / 8 + y / 8) % 2 == 0 { 0x20 } else { 0xd0 } ^ (seed * 13);
            px.push(((r & 0xff) << 16) | ((g & 0xff) << 8) | (b & 0xff));
        }
    }
    px
}

/// Runs `isolactl --display CONTROL screenshot OUT` and decodes the PNG to XRGB words.
pub fn screenshot(control: &Path, out: &Path) -> (u32, u32, Vec<u32>) {
    let output = Command::new(binary("isolactl"))
        .arg("--display")
        .arg(control)
        .arg("screenshot")
        .arg(out)
        .output()
        .expect("isolactl runs");
    assert!(
        output.status.success(),
        "isolactl screenshot failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    decode_png(&std::fs::read(out).expect("the PNG was written"))
}

/// Decodes an 8-bit RGB or RGBA PNG into XRGB words.
pub fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u32>) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("sane size")];
    let info = reader.next_frame(&mut buf).expect("one frame");
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let px = buf[..info.buffer_size()]
        .chunks_exact(channels)
        .map(|p| (u32::from(p[0]) << 16) | (u32::from(p[1]) << 8) | u32::from(p[2]))
        .collect();
    (info.width, info.height, px)
}

/// Reads a binary PPM (P6) into XRGB words.
pub fn read_ppm(path: &Path) -> (u32, u32, Vec<u32>) {
    let bytes = std::fs::read(path).expect("the PPM was written");
    let mut fields = Vec::new();
    let mut at = 0;
    while fields.len() < 4 {
        while bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        let start = at;
        while !bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        fields.push(String::from_utf8_lossy(&bytes[start..at]).into_owned());
    }
    assert_eq!(fields[0], "P6");
    let (w, h): (u32, u32) = (fields[1].parse().unwrap(), fields[2].parse().unwrap());
    let data = &bytes[at + 1..];
    let px = data
        .chunks_exact(3)
        .map(|p| (u32::from(p[0]) << 16) | (u32::from(p[1]) << 8) | u32::from(p[2]))
        .collect::<Vec<_>>();
    assert_eq!(px.len(), (w * h) as usize);
    (w, h, px)
}

/// First differing pixel, for an assertion message.
pub fn first_difference(a: &[u32], b: &[u32], width: u32) -> Option<String> {
    if a.len() != b.len() {
        return Some(format!("{} pixels vs {}", a.len(), b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y).map(|i| {
        let i = i as u32;
        format!(
            "pixel ({}, {}): {:06x} vs {:06x}",
            i % width,
            i / width,
            a[i as usize],
            b[i as usize]
        )
    })
}

/// A stand-in for `isola-input`'s control socket: records every request, answers Done.
pub struct FakeInput {
    pub path: PathBuf,
    events: Receiver<InputRequest>,
}

impl FakeInput {
    pub fn start(path: &Path) -> FakeInput {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind the fake input socket");
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { break };
                let tx = tx.clone();
                std::thread::spawn(move || {
                    while let Ok(req) = isola_ipc::read_message::<_, InputRequest>(&mut conn) {
                        if tx.send(req).is_err()
                            || isola_ipc::write_message(&mut conn, &InputResponse::Done).is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
        FakeInput {
            path: path.to_owned(),
            events,
        }
    }

    /// The requests received within `timeout` after the last one, stopping after `n`.
    pub fn take(&self, n: usize, timeout: Duration) -> Vec<InputRequest> {
        let mut got = Vec::new();
        while got.len() < n {
            match self.events.recv_timeout(timeout) {
                Ok(e) => got.push(e),
                Err(_) => break,
            }
        }
        got
    }
}

/// Builds `vncprobe` (LibVNCClient) into `dir`; `None`, with a SKIPPED note, if the
/// library is not installed (Debian 12: `apt-get install libvncserver-dev`).
pub fn vncprobe(dir: &Path) -> Option<PathBuf> {
    let src = dir.join("vncprobe.c");
    std::fs::write(&src, include_str!("display/vncprobe.c")).expect("write the probe source");
    let exe = dir.join("vncprobe");
    let built = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&exe)
        .arg(&src)
        .arg("-lvncclient")
        .stderr(Stdio::piped())
        .output();
    match built {
        Ok(out) if out.status.success() => Some(exe),
        Ok(out) => {
            crate::skip(
                crate::Missing::Installable,
                format!(
                    "cannot build the LibVNCClient probe (Debian 12: apt-get install \
                     libvncserver-dev): {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
            );
            None
        }
        Err(e) => {
            crate::skip(
                crate::Missing::Installable,
                format!("no C compiler for the LibVNCClient probe (Debian 12: gcc): {e}"),
            );
            None
        }
    }
}

/// Runs the probe; returns its stdout lines. Panics if it fails.
pub fn run_probe(
    probe: &Path,
    host: &str,
    port: u16,
    encodings: &str,
    out: &Path,
    actions: &[&str],
) -> Vec<String> {
    let output = Command::new(probe)
        .arg(host)
        .arg(port.to_string())
        .arg(encodings)
        .arg(out)
        .args(actions)
        .output()
        .expect("vncprobe runs");
    assert!(
        output.status.success(),
        "vncprobe {host} {encodings} {actions:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}
