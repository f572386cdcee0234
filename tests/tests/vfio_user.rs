//! Isola's vfio-user frontend against a server nobody here wrote: the `vfio_user` crate's
//! `Server` (rust-vmm), with a minimal device model (`src/bin/vfio-user-testdev.rs`), driven
//! by the `vfio-user` test guest: configuration space, BAR sizing, BAR reads and writes, an
//! MSI-X interrupt, DMA into guest memory; a server killed and restarted under a running
//! guest; a server that hangs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use isola_ipc::DeviceLink;
use isola_tests::{binary, guest, scratch_dir, vfio_proxy, wait_device, wait_for_path, Core};

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
    start_core_with(
        dir,
        &format!("vfio-user,socket={}", socket.display()),
        cmdline,
        extra,
    )
}

fn start_core_with(dir: &Path, device: &str, cmdline: &str, extra: &[&str]) -> (Core, PathBuf) {
    let control = dir.join("control.sock");
    let kernel = guest("vfio-user.elf");
    let mut args = vec![
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--device",
        device,
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

/// A guest's bursts of posted writes (the bench's 20000 scratch writes and 20000 doorbells,
/// twice, the second while the server may still be busy with the first core's) are queued
/// only up to a bound: the core neither grows the queue without limit nor dies.
#[test]
fn bursts_of_posted_writes_are_bounded() {
    let dir = scratch_dir("vfio_user_burst");
    let socket = dir.join("dev.sock");
    let _server = Server::start(&socket);
    for run in 0..2 {
        let (mut core, _control) =
            start_core(&dir, &socket, "vfio-user.mode=bench count=20000", &[]);
        let line = core.wait_for("vfio-user: bench", BOOT);
        eprintln!("run {run}: {line}");
        core.wait_for("vfio-user: ok", BOOT);
        core.finish(BOOT).assert_success();
    }
}

/// The test device behind a proxy with `options`; the core runs the guest with `cmdline`.
fn behind_proxy(
    test: &str,
    options: vfio_proxy::Options,
    cmdline: &str,
    extra: &[&str],
) -> (
    Core,
    PathBuf,
    vfio_proxy::Proxy,
    Server,
    isola_tests::ScratchDir,
) {
    let dir = scratch_dir(test);
    let upstream = dir.join("dev.sock");
    let server = Server::start(&upstream);
    let proxy = vfio_proxy::start(&dir.join("proxy.sock"), &upstream, options);
    let mut device = format!("vfio-user,socket={}", proxy.socket.display());
    if options.doorbell || options.bogus {
        device.push_str(",ioeventfds=on");
    }
    let (core, control) = start_core_with(&dir, &device, cmdline, extra);
    (core, control, proxy, server, dir)
}

#[test]
fn a_doorbell_the_server_offers_as_an_ioeventfd_is_rung_through_kvm() {
    let options = vfio_proxy::Options {
        doorbell: true,
        ..Default::default()
    };
    let (mut core, _control, proxy, _server, _dir) =
        behind_proxy("vfio_user_doorbell", options, "vfio-user.mode=basic", &[]);
    core.wait_for("vfio-user: dma ok", BOOT);
    core.wait_for("vfio-user: ok", BOOT);
    core.finish(BOOT).assert_success();
    let rung = proxy.counters.rung.load(Ordering::Relaxed);
    let forwarded = proxy.counters.forwarded_doorbells.load(Ordering::Relaxed);
    assert!(rung >= 1, "the doorbell never came through the eventfd");
    assert_eq!(forwarded, 0, "the doorbell came as a message too");
}

/// Restart with doorbells as ioeventfds: the new server's eventfds replace the old ones where
/// the BARs decode, and the guest's doorbells reach the new server through them.
#[test]
fn a_restarted_server_gets_its_doorbells_registered_again() {
    let options = vfio_proxy::Options {
        doorbell: true,
        ..Default::default()
    };
    let dir = scratch_dir("vfio_user_doorbell_restart");
    let upstream = dir.join("dev.sock");
    let server = Server::start(&upstream);
    let proxy = vfio_proxy::start(&dir.join("proxy.sock"), &upstream, options);
    let device = format!("vfio-user,socket={},ioeventfds=on", proxy.socket.display());
    let (mut core, control) = start_core_with(
        &dir,
        &device,
        "vfio-user.mode=loop ms=6000 stall=30000",
        &[],
    );
    core.wait_for("vfio-user: round 50", BOOT);
    assert!(proxy.counters.rung.load(Ordering::Relaxed) >= 50);
    server.kill();
    wait_device(&mut core, &control, "away", |d| {
        d.link != DeviceLink::Connected
    });
    let _server = Server::start(&upstream);
    let status = wait_device(&mut core, &control, "back", |d| {
        d.link == DeviceLink::Connected && d.reconnects >= 1
    });
    assert_eq!(status.reconnects, 1);
    core.wait_for("server pid changed", BOOT);
    let summary = core.wait_for("vfio-user: rounds=", BOOT);
    eprintln!("{summary}");
    core.wait_for("vfio-user: ok", BOOT);
    core.finish(BOOT).assert_success();
    let after = proxy.counters.rung_after_reconnect.load(Ordering::Relaxed);
    let forwarded = proxy.counters.forwarded_doorbells.load(Ordering::Relaxed);
    eprintln!("doorbells through the new server's eventfds: {after}");
    assert!(after >= 1, "no doorbell reached the new server's eventfds");
    assert_eq!(forwarded, 0, "doorbells came as messages");
}

/// A server offering ioeventfds the core cannot honour (past its region, over the MSI-X table
/// the core serves, a datamatch wider than the access): each is refused with an error, the
/// device works (MSI-X included), and writes there go as messages.
#[test]
fn bogus_ioeventfds_from_a_hostile_server_are_refused() {
    let options = vfio_proxy::Options {
        bogus: true,
        ..Default::default()
    };
    let (mut core, _control, proxy, _server, _dir) = behind_proxy(
        "vfio_user_bogus_ioeventfd",
        options,
        "vfio-user.mode=basic",
        &[],
    );
    core.wait_for("vfio-user: dma ok", BOOT);
    core.wait_for("vfio-user: ok", BOOT);
    let finished = core.finish(BOOT);
    finished.assert_success();
    for why in [
        "offset 0x1000 (4 bytes): outside the region",
        "offset 0x14 (1 bytes): datamatch 0x1234 does not fit in 1 bytes",
        "BAR 2 offset 0x8 (4 bytes): over 0x0..",
    ] {
        assert!(
            finished.stderr.contains(why),
            "no refusal {why:?} in:\n{}",
            finished.stderr
        );
    }
    assert_eq!(proxy.counters.bogus_rung.load(Ordering::Relaxed), 0);
    assert!(proxy.counters.forwarded_doorbells.load(Ordering::Relaxed) >= 1);
}

/// A spoiled reply in the middle of the guest's work: the session ends (or, for a refusal,
/// one access fails), the core reconnects, the guest sees a pause and finishes.
fn spoiled_reply(test: &str, fault: vfio_proxy::Fault, reconnects: bool) {
    // REGION_READ 300: past the core's set-up (64 reads) and the guest's first rounds.
    let options = vfio_proxy::Options {
        fault: Some((9, 300, fault)),
        ..Default::default()
    };
    let (mut core, control, proxy, _server, _dir) = behind_proxy(
        test,
        options,
        "vfio-user.mode=loop ms=8000 stall=30000",
        &["--backend-timeout-ms", "300"],
    );
    core.wait_for("vfio-user: loop", BOOT);
    let deadline = Instant::now() + BOOT;
    while proxy.counters.faults.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the guest never made 300 reads");
        std::thread::sleep(Duration::from_millis(10));
    }
    // While the guest still runs: the device is back (or never left, for a refusal).
    let status = wait_device(&mut core, &control, "connected again", |d| {
        d.link == DeviceLink::Connected && (d.reconnects >= 1) == reconnects
    });
    eprintln!("{fault:?}: {status:?}");
    let summary = core.wait_for("vfio-user: rounds=", BOOT);
    eprintln!("{fault:?}: {summary}");
    core.wait_for("vfio-user: ok", BOOT);
    core.finish(BOOT).assert_success();
    assert_eq!(proxy.counters.faults.load(Ordering::Relaxed), 1);
    if reconnects {
        assert!(proxy.counters.connections.load(Ordering::Relaxed) >= 2);
    } else {
        assert_eq!(status.reconnects, 0, "{status:?}");
    }
}

#[test]
fn hostile_reply_with_a_wrong_id_is_a_pause() {
    spoiled_reply("vfio_user_wrong_id", vfio_proxy::Fault::WrongId, true);
}

#[test]
fn hostile_reply_with_a_huge_size_is_a_pause() {
    spoiled_reply("vfio_user_huge", vfio_proxy::Fault::HugeSize, true);
}

#[test]
fn hostile_reply_cut_short_is_a_pause() {
    spoiled_reply("vfio_user_short", vfio_proxy::Fault::Short, true);
}

#[test]
fn hostile_reply_that_never_comes_is_a_pause() {
    spoiled_reply("vfio_user_silent", vfio_proxy::Fault::Hang, true);
}

#[test]
fn a_refused_access_fails_alone() {
    spoiled_reply("vfio_user_refused", vfio_proxy::Fault::Refuse, false);
}
