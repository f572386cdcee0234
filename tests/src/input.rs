//! Helpers for the virtio-input tests: `isola-input` run as a user runs it, its control
//! socket, and the `virtio-input` guest's report lines.

use std::fs::OpenOptions;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use isola_ipc::input::{InputRequest, InputResponse, InputStatus};

use crate::{binary, guest, wait_for_path, Core};

/// An `isola-input` process serving a keyboard and a tablet; killed when dropped. Its log
/// (RUST_LOG=info) accumulates over restarts in `input.log`.
pub struct IsolaInput {
    child: Child,
    pub keyboard: PathBuf,
    pub tablet: PathBuf,
    pub control: PathBuf,
    log: PathBuf,
    extra: Vec<String>,
}

impl IsolaInput {
    pub fn start(dir: &Path, extra: &[&str]) -> IsolaInput {
        let keyboard = dir.join("kbd.sock");
        let tablet = dir.join("tablet.sock");
        let control = dir.join("input.sock");
        let log = dir.join("input.log");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let child = Self::spawn(&keyboard, &tablet, &control, &log, &extra);
        IsolaInput {
            child,
            keyboard,
            tablet,
            control,
            log,
            extra,
        }
    }

    fn spawn(
        keyboard: &Path,
        tablet: &Path,
        control: &Path,
        log: &Path,
        extra: &[String],
    ) -> Child {
        // A crashed process leaves its socket files; wait for the new ones.
        let _ = std::fs::remove_file(control);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = Command::new(binary("isola-input"))
            .arg("--keyboard-socket")
            .arg(keyboard)
            .arg("--tablet-socket")
            .arg(tablet)
            .arg("--control-socket")
            .arg(control)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("isola-input starts");
        wait_for_path(control, Duration::from_secs(20));
        // The file appears at bind(2); connections succeed once it listens.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(control).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "isola-input does not accept on {}",
                control.display()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        child
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, as a crash, then a new process on the same sockets.
    pub fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(
            &self.keyboard,
            &self.tablet,
            &self.control,
            &self.log,
            &self.extra,
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `--device` values for the core: keyboard first, then tablet.
    pub fn device_args(&self) -> [String; 2] {
        [
            format!("input,socket={}", self.keyboard.display()),
            format!("input,socket={}", self.tablet.display()),
        ]
    }
}

impl Drop for IsolaInput {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request on a fresh connection to `isola-input`'s control socket.
pub fn request(control: &Path, request: &InputRequest) -> InputResponse {
    let mut stream = UnixStream::connect(control).expect("isola-input's control socket accepts");
    isola_ipc::write_message(&mut stream, request).expect("request is sent");
    isola_ipc::read_message(&mut stream).expect("isola-input answers")
}

pub fn status(control: &Path) -> InputStatus {
    match request(control, &InputRequest::Status) {
        InputResponse::Status(s) => s,
        other => panic!("unexpected answer {other:?}"),
    }
}

/// Starts the core on the `virtio-input` guest with `input`'s two devices.
pub fn start_core(dir: &Path, input: &IsolaInput, cmdline: &str) -> (Core, PathBuf) {
    let control = dir.join("control.sock");
    let kernel = guest("virtio-input.elf");
    let [kbd, tablet] = input.device_args();
    let core = Core::start(&[
        "--kernel",
        kernel.to_str().expect("utf-8 path"),
        "--memory",
        "64",
        "--device",
        &kbd,
        "--device",
        &tablet,
        "--device-timeout",
        "20",
        "--control-socket",
        control.to_str().expect("utf-8 path"),
        "--cmdline",
        cmdline,
    ]);
    wait_for_path(&control, Duration::from_secs(20));
    (core, control)
}

/// One report the guest printed: device number and its events (type, code, value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub dev: u32,
    pub events: Vec<(u16, u16, u32)>,
}

/// Every `virtio-input: dev=<n> report ...` line, in order.
pub fn reports(serial: &[String]) -> Vec<Report> {
    serial
        .iter()
        .filter_map(|line| {
            let rest = line.strip_prefix("virtio-input: dev=")?;
            let (dev, rest) = rest.split_once(" report")?;
            let events = rest
                .split_whitespace()
                .map(|e| {
                    let mut parts = e.split(':').map(|n| n.parse::<u32>().expect("number"));
                    let mut next = || parts.next().expect("type:code:value");
                    (next() as u16, next() as u16, next())
                })
                .collect();
            Some(Report {
                dev: dev.parse().expect("device number"),
                events,
            })
        })
        .collect()
}
