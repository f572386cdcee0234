//! Helpers for Isola's end-to-end tests: build and find the binaries a user runs, start them,
//! and read what the guest prints.

pub mod api;
pub mod bench;
pub mod display;
pub mod hang;
pub mod net;

/// The one way a test that cannot run says so (see `isola_device_common::testing::skip`).
pub use isola_device_common::testing::skip::{skip, Missing};

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The directory cargo puts this profile's binaries in (`target/debug` or `target/release`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its path");
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps")
        .to_owned()
}

/// Path of one of the workspace's binaries, built (once per test process) with the same
/// profile as the running test. Cargo does not build other packages' binaries for a test, so
/// the harness asks it to, exactly as a user would with `cargo build`.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = profile_dir();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--workspace", "--bins"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cargo runs");
        assert!(
            status.success(),
            "cargo build of the workspace binaries failed"
        );
    });
    let path = profile_dir().join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Like [`binary`], but `None` if the workspace has no binary of that name.
pub fn binary_if_built(name: &str) -> Option<PathBuf> {
    binary("isola-core");
    let path = profile_dir().join(name);
    path.exists().then_some(path)
}

/// Path of a test guest image built by `isola-guests`.
pub fn guest(name: &str) -> PathBuf {
    isola_guests::image(name).unwrap_or_else(|| panic!("no guest image named {name}"))
}

/// A fresh scratch directory for one test, removed when dropped.
pub struct ScratchDir(PathBuf);

impl std::ops::Deref for ScratchDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for ScratchDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn scratch_dir(test: &str) -> ScratchDir {
    let dir = std::env::temp_dir().join(format!("isola-test-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir is writable");
    ScratchDir(dir)
}

/// A running `isola-core` whose stdout (the guest's serial port) is read line by line.
pub struct Core {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Option<std::process::ChildStderr>,
}

impl Core {
    /// Starts `isola-core` on `kernel` with 64 MiB, one `--device` (its spec), `cmdline`, and
    /// a control socket in `dir`; returns once the control socket is there, with its path.
    pub fn start_with_device(
        dir: &Path,
        kernel: &Path,
        device: &str,
        cmdline: &str,
    ) -> (Core, PathBuf) {
        let control_socket = dir.join("control.sock");
        let core = Core::start(&[
            "--kernel",
            kernel.to_str().expect("utf-8 path"),
            "--memory",
            "64",
            "--device",
            device,
            "--control-socket",
            control_socket.to_str().expect("utf-8 path"),
            "--cmdline",
            cmdline,
        ]);
        wait_for_path(&control_socket, Duration::from_secs(20));
        (core, control_socket)
    }

    /// Starts `isola-core` with `args`.
    pub fn start(args: &[&str]) -> Core {
        let mut child = Command::new(binary("isola-core"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("isola-core starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Core {
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a serial line containing `needle`; panics with everything seen on timeout.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no line with {needle:?} within {timeout:?}; guest said:\n{}",
                        self.seen.join("\n")
                    )
                }
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "core ended before {needle:?}; guest said:\n{}\nstderr:\n{}",
                    self.seen.join("\n"),
                    self.take_stderr()
                ),
            }
        }
    }

    /// If the core has exited: its status, the guest's output and stderr, for a failure message.
    pub fn exit_report(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok()??;
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(line);
        }
        Some(format!(
            "core exited ({status}); guest said:\n{}\nstderr:\n{}",
            self.seen.join("\n"),
            self.take_stderr()
        ))
    }

    /// Every serial line that arrives within `window` (the core may be running or gone).
    pub fn lines_for(&mut self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    out.push(line);
                }
                Err(_) => return out,
            }
        }
    }

    /// Asserts that no serial line arrives within `window`.
    pub fn assert_quiet(&mut self, window: Duration) {
        if let Ok(line) = self.lines.recv_timeout(window) {
            panic!("unexpected guest output while it should be silent: {line:?}");
        }
    }

    fn take_stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut err) = self.stderr.take() {
            let _ = err.read_to_string(&mut text);
        }
        text
    }

    /// Waits (bounded) for the core to exit; returns its status, every serial line and stderr.
    pub fn finish(mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait works") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "core did not exit within {timeout:?}; guest said:\n{}",
                    self.seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        let stderr = self.take_stderr();
        Finished {
            status,
            serial: std::mem::take(&mut self.seen),
            stderr,
        }
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How a core run ended.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub serial: Vec<String>,
    pub stderr: String,
}

impl Finished {
    /// Panics, with everything the run printed, unless the core exited with status 0.
    pub fn assert_success(&self) {
        assert!(
            self.status.success(),
            "core exited with {:?}\nstderr:\n{}\nguest said:\n{}",
            self.status,
            self.stderr,
            self.serial.join("\n")
        );
    }
}

/// Sends one control request to a core's socket and returns the answer.
pub fn control(socket: &Path, request: &isola_ipc::ControlRequest) -> isola_ipc::ControlResponse {
    try_control(socket, request).unwrap_or_else(|e| panic!("{e}"))
}

/// As [`control`], with the step that failed (and why) instead of a panic.
pub fn try_control(
    socket: &Path,
    request: &isola_ipc::ControlRequest,
) -> Result<isola_ipc::ControlResponse, String> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("control socket accepts: {e}"))?;
    isola_ipc::write_message(&mut stream, request).map_err(|e| format!("request is sent: {e}"))?;
    isola_ipc::read_message(&mut stream).map_err(|e| format!("core answers: {e}"))
}

/// The core's status of its first (or only) device, asked on its control socket; panics with
/// the core's output if the core has ended.
pub fn device(core: &mut Core, socket: &Path) -> isola_ipc::DeviceStatus {
    if let Some(report) = core.exit_report() {
        panic!("{report}");
    }
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(socket) else {
        // The core removes its socket as it exits: wait for the exit and say why it came.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(report) = core.exit_report() {
                panic!("the control socket went away: {report}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "the control socket {} went away and the core runs on",
            socket.display()
        );
    };
    isola_ipc::write_message(&mut stream, &isola_ipc::ControlRequest::Status)
        .expect("request is sent");
    match isola_ipc::read_message(&mut stream).expect("core answers") {
        isola_ipc::ControlResponse::Status(status) => {
            status.devices.into_iter().next().expect("one device")
        }
        other => panic!("unexpected answer {other:?}"),
    }
}

/// Polls [`device`] until `pred` holds (20 s at most); `what` names the awaited state.
pub fn wait_device(
    core: &mut Core,
    socket: &Path,
    what: &str,
    pred: impl Fn(&isola_ipc::DeviceStatus) -> bool,
) -> isola_ipc::DeviceStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = device(core, socket);
        if pred(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "device never became {what}: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `isola-core` on the `msi` guest (it waits for interrupts for ever), 32 MiB, `cpus` vCPUs,
/// no device, its control socket in `dir`; returns once the guest is ready and the socket is
/// there, with the socket's path.
pub fn msi_core(dir: &Path, cpus: u32) -> (Core, PathBuf) {
    let socket = dir.join("control.sock");
    let kernel = guest("msi.elf");
    let cpus = cpus.to_string();
    let mut core = Core::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "32",
        "--cpus",
        &cpus,
        "--control-socket",
        socket.to_str().unwrap(),
    ]);
    core.wait_for("msi: ready", Duration::from_secs(30));
    wait_for_path(&socket, Duration::from_secs(30));
    (core, socket)
}

/// Waits until `path` exists (a socket the core creates at start).
pub fn wait_for_path(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub mod console;
pub mod desktop;
pub mod input;
pub mod linux;

pub mod sandbox;
/// `qemu-storage-daemon`, the independent vhost-user-blk backend the tests use.
pub mod supervisor;
/// `isolactl upgrade` of a device daemon under a running guest, and the processes' fds.
pub mod upgrade;

pub mod qsd {
    use std::fs::File;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    pub fn qsd_installed() -> bool {
        let found = Command::new("qemu-storage-daemon")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            crate::skip(
                crate::Missing::Installable,
                "qemu-storage-daemon is not installed (Debian 12: apt-get install \
                 qemu-system-common); the virtio-blk end-to-end tests need it as the backend",
            );
        }
        found
    }

    /// A `qemu-storage-daemon` exporting one raw image as vhost-user-blk; killed when dropped.
    pub struct Daemon {
        child: Child,
        pub socket: PathBuf,
        log: PathBuf,
    }

    impl Daemon {
        pub fn start(dir: &Path, image: &Path) -> Daemon {
            Daemon::start_with_queues(dir, image, 1)
        }

        pub fn start_with_queues(dir: &Path, image: &Path, queues: u16) -> Daemon {
            let socket = dir.join("blk.sock");
            let log = dir.join("qsd.log");
            let _ = std::fs::remove_file(&socket);
            let child = Command::new("qemu-storage-daemon")
                .arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=file0,filename={},cache.direct=off",
                    image.display()
                ))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},\
                     writable=on,num-queues={queues}",
                    socket.display()
                ))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&log).expect("log file"))
                .spawn()
                .expect("qemu-storage-daemon starts");
            let mut daemon = Daemon { child, socket, log };
            let deadline = Instant::now() + Duration::from_secs(20);
            while !daemon.socket.exists() {
                if let Ok(Some(status)) = daemon.child.try_wait() {
                    panic!(
                        "qemu-storage-daemon exited ({status}) before listening:\n{}",
                        daemon.log_text()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "qemu-storage-daemon did not create {} within 20 s",
                    daemon.socket.display()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            daemon
        }

        pub fn log_text(&self) -> String {
            std::fs::read_to_string(&self.log).unwrap_or_default()
        }

        /// SIGTERM, then SIGKILL if it has not exited within 10 s; returns its log.
        /// SIGKILL, as a crash: the socket file stays behind, as after a real crash.
        pub fn kill(mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }

        pub fn stop(mut self) -> String {
            let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits");
            // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            self.log_text()
        }
    }

    impl Drop for Daemon {
        fn drop(&mut self) {
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// An `isola-blk` device process serving one image; killed when dropped.
pub struct IsolaBlk {
    child: Child,
}

impl IsolaBlk {
    /// Starts `isola-blk` on `socket` with `image` and extra `args`; waits for the socket.
    pub fn start_with(socket: &Path, image: &Path, args: &[&str]) -> IsolaBlk {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(binary("isola-blk"))
            .arg("--socket")
            .arg(socket)
            .arg("--image")
            .arg(image)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("isola-blk starts");
        wait_for_path(socket, Duration::from_secs(20));
        IsolaBlk { child }
    }

    pub fn start(socket: &Path, image: &Path) -> IsolaBlk {
        Self::start_with(socket, image, &[])
    }

    /// The pid a supervisor waits on (with the sandbox on: the reaper, see
    /// `isola_device_common::sandbox`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for IsolaBlk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
pub mod gpu;
pub mod vdrivers;
pub mod vfio_proxy;
