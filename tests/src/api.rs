//! Clients of a VM's API socket (`DIR/api.sock`) for the tests and the benchmark: curl, the
//! independent client every endpoint is exercised with, and a raw HTTP/1.1 writer for the
//! byte-level bad-input cases; and the Python tools (`.ci/run` installs them in a venv).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::supervisor::{Launch, Lines};
use crate::wait_for_path;

/// One answer: status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// `curl --unix-socket SOCKET` with `args` (method, data, ...) on `path`; the status and body.
pub fn curl(socket: &Path, args: &[&str], path: &str) -> Answer {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code}",
            "--unix-socket",
        ])
        .arg(socket)
        .args(args)
        .arg(format!("http://localhost{path}"))
        .output()
        .expect("curl runs (Debian package curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    Answer {
        status: status.trim().parse().unwrap_or_else(|_| {
            panic!(
                "curl {args:?} {path}: no status: {text:?} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        }),
        body: body.to_owned(),
    }
}

/// curl on a JSON body: `POST path` with `data`.
pub fn post_json(socket: &Path, path: &str, data: &str) -> Answer {
    curl(
        socket,
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data-binary",
            data,
        ],
        path,
    )
}

/// Writes `request` as it is and reads until the server closes or `timeout` passes; what
/// arrived (possibly nothing).
pub fn raw(socket: &Path, request: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(request)?;
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    Ok(got)
}

/// The status code of a raw HTTP answer.
pub fn status_of(answer: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(answer);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// A Python with schemathesis, openapi-spec-validator and prometheus_client: `$ISOLA_API_PYTHON`,
/// else the venv `.ci/run` makes (`target/api-venv`). `None` if it is not there.
pub fn python() -> Option<PathBuf> {
    let python = std::env::var_os("ISOLA_API_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/api-venv/bin/python3")
        });
    let ok = Command::new(&python)
        .args([
            "-c",
            "import schemathesis, openapi_spec_validator, prometheus_client",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(python)
}

/// The OpenAPI document.
pub fn document() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api.yaml")
}

/// `curl -N /events` in the background; its lines arrive on the returned receiver.
pub struct EventReader {
    child: std::process::Child,
    lines: Lines,
}

impl EventReader {
    pub fn start(socket: &Path) -> EventReader {
        let mut child = Command::new("curl")
            .args(["-sS", "-N", "--max-time", "300", "--unix-socket"])
            .arg(socket)
            .arg("http://localhost/events")
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl runs");
        let lines = Lines::new(child.stdout.take().expect("piped"));
        // The stream is subscribed once the answer's head is out; give curl that moment.
        std::thread::sleep(Duration::from_millis(500));
        EventReader { child, lines }
    }

    /// Events (parsed) until one named `last` arrives; panics after `timeout`.
    pub fn until(&mut self, last: &str, timeout: Duration) -> Vec<serde_json::Value> {
        let named = |line: &str| {
            serde_json::from_str::<serde_json::Value>(line)
                .is_ok_and(|event| event["event"] == last)
        };
        let lines = self
            .lines
            .until(named, timeout)
            .unwrap_or_else(|seen| panic!("no {last} event within {timeout:?}; saw {seen:?}"));
        lines
            .iter()
            .map(|line| {
                let event: serde_json::Value =
                    serde_json::from_str(line).expect("each line is JSON");
                assert!(
                    event["timestamp_ms"].as_u64().is_some_and(|t| t > 0),
                    "{event}"
                );
                assert!(
                    event["time"].as_str().is_some_and(|t| t.ends_with('Z')),
                    "{event}"
                );
                event
            })
            .collect()
    }

    /// Whether curl ended (the server closed the stream) within `timeout`.
    pub fn ends_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for EventReader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// isola-run with the virtio-blk guest writing and reading its disk in a loop for `seconds`;
/// returns once the API socket is there and the loop runs.
pub fn launch_blk(run_dir: &Path, seconds: u32) -> Launch {
    let cmdline =
        format!("virtio-blk.mode=loop virtio-blk.seconds={seconds} virtio-blk.sectors=2048");
    launch_until(
        run_dir,
        &["--cmdline", &cmdline],
        "virtio-blk: loop cycles=",
        "the guest never ran its I/O loop",
    )
}

/// The GPU guest, which draws and waits, on a 640x400 display with a keyboard and tablet.
pub fn launch_gpu(run_dir: &Path) -> Launch {
    let kernel = crate::guest("virtio-gpu.elf");
    let args = [
        "--kernel",
        kernel.to_str().expect("utf-8 path"),
        "--cmdline",
        "virtio-gpu.wait=1",
        "--display",
        "640x400",
    ];
    launch_until(
        run_dir,
        &args,
        "virtio-gpu: waiting for vector",
        "the GPU guest never drew",
    )
}

/// isola-run with `args`, once its API socket is there and the guest printed `marker`;
/// `failure` and the launch's report otherwise.
fn launch_until(run_dir: &Path, args: &[&str], marker: &str, failure: &str) -> Launch {
    let mut launch = Launch::start(run_dir, args);
    wait_for_path(&run_dir.join("api.sock"), Duration::from_secs(120));
    assert!(
        launch
            .stdout
            .wait_for(marker, Duration::from_secs(180))
            .is_some(),
        "{failure}\n{}",
        launch.report()
    );
    launch
}
