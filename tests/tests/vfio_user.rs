//! Isola's vfio-user frontend against a server nobody here wrote: the `vfio_user` crate's
//! `Server` (rust-vmm), with a minimal device model (`src/bin/vfio-user-testdev.rs`), driven
//! by the `vfio-user` test guest: configuration space, BAR sizing, BAR reads and writes, an
//! MSI-X interrupt, DMA into guest memory; a server killed and restarted under a running
//! guest; a server that hangs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use isola_ipc::DeviceLink;
use isola_tests::{binary, guest, scratch_dir, wait_device, wait_for_path, Core};

const BOOT: Duration = Duration::from_secs(60);

struct Server {
    child: Child,
}

impl Server {
    fn start(socket: &Path) -> Server {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(binary("vfio-user-testdev"))
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("vfio-user-testdev starts");
        wait_for_path(socket, Duration::from_secs(20));
        Server { child }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_core(dir: &Path, socket: &Path, cmdline: &str, extra: &[&str]) -> (Core, PathBuf) {
    let control = dir.join("control.sock");
    let kernel = guest("vfio-user.elf");
    let device = format!("vfio-user,socket={}", socket.display());
    let mut args = vec![
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--device",
        &device,
        "--control-socket",
        control.to_str().unwrap(),
        "--cmdline",
        cmdline,
    ];
    args.extend_from_slice(extra);
    let core = Core::start(&args);
    wait_for_path(&control, Duration::from_secs(20));
    (core, control)
}

#[test]
fn config_space_bars_msix_and_dma_work_against_the_crates_server() {
    let dir = scratch_dir("vfio_user_basic");
    let socket = dir.join("dev.sock");
    let _server = Server::start(&socket);
    let (mut core, control) = start_core(&dir, &socket, "vfio-user.mode=basic", &[]);
    core.wait_for("vfio-user: found", BOOT);
    let status = wait_device(&mut core, &control, "connected", |d| {
        d.link == DeviceLink::Connected
    });
    assert_eq!(status.name, "vfio-user");
    assert_eq!(status.socket, socket.display().to_string());
    core.wait_for("vfio-user: dma ok", BOOT);
    core.wait_for("vfio-user: ok", BOOT);
    core.finish(BOOT).assert_success();
}

#[test]
fn a_restarted_server_is_a_pause_for_the_guest() {
    let dir = scratch_dir("vfio_user_restart");
    let socket = dir.join("dev.sock");
    let server = Server::start(&socket);
    let (mut core, control) = start_core(
        &dir,
        &socket,
        "vfio-user.mode=loop ms=6000 stall=30000",
        &[],
    );
    core.wait_for("vfio-user: round 50", BOOT);
    server.kill();
    wait_device(&mut core, &control, "away", |d| {
        d.link != DeviceLink::Connected
    });
    let _server = Server::start(&socket);
    let status = wait_device(&mut core, &control, "back", |d| {
        d.link == DeviceLink::Connected && d.reconnects >= 1
    });
    assert_eq!(status.reconnects, 1);
    let changed = core.wait_for("server pid changed", BOOT);
    eprintln!("{changed}");
    let summary = core.wait_for("vfio-user: rounds=", BOOT);
    eprintln!("{summary}");
    core.wait_for("vfio-user: ok", BOOT);
    core.finish(BOOT).assert_success();
}

#[test]
fn a_hung_server_is_a_bounded_pause_and_the_core_keeps_serving() {
    let dir = scratch_dir("vfio_user_hang");
    let socket = dir.join("dev.sock");
    let server = Server::start(&socket);
    let (mut core, control) = start_core(
        &dir,
        &socket,
        "vfio-user.mode=hang stall=60000",
        &["--backend-timeout-ms", "300"],
    );
    let line = core.wait_for("vfio-user: hung read=", BOOT);
    let waited: u64 = line
        .rsplit("waited-ms=")
        .next()
        .and_then(|v| v.trim().parse().ok())
        .expect("waited-ms=N");
    // The read waited about the deadline (300 ms), not forever; generous margin for load.
    assert!(waited < 20_000, "{line}");
    let status = wait_device(&mut core, &control, "unresponsive", |d| {
        matches!(d.link, DeviceLink::Unresponsive(_))
    });
    eprintln!("while hung: {status:?}");
    // The control socket answers meanwhile (wait_device asked it); replace the hung server.
    let t0 = Instant::now();
    server.kill();
    let _server = Server::start(&socket);
    core.wait_for("vfio-user: answers again", BOOT);
    core.wait_for("vfio-user: dma ok after the hang", BOOT);
    eprintln!("back {:?} after the restart", t0.elapsed());
    core.wait_for("vfio-user: ok", BOOT);
    core.finish(BOOT).assert_success();
}
