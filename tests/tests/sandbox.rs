//! isola-blk sandboxed while it serves the `virtio-blk` guest through `isola-core`: both of
//! its processes run under seccomp with no_new_privs, no capabilities, uid 65534 (the tests
//! run as root), their own namespaces and an empty root, the device process being pid 1 of
//! its own pid namespace; and the guest's whole workload still passes. (The SIGSYS tests
//! need a test hook compiled into isola-blk: `device-procs/blk/tests/sandbox.rs`.)

use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use isola_ipc::input::{InputRequest, InputResponse};
use isola_tests::console::{console_guest, IsolaConsole};
use isola_tests::input::{request, IsolaInput};
use isola_tests::net::{
    command, host_udp, in_netns, make_tap, open_tap, ping, IsolaNet, CMD_BYE, GUEST_IP,
};
use isola_tests::sandbox::{
    assert_sandboxed, assert_sandboxed_on_host_network, device_pid, status_field,
};
use isola_tests::{guest, scratch_dir, Core, IsolaBlk};

const TIMEOUT: Duration = Duration::from_secs(90);

#[test]
fn isola_blk_is_sandboxed_while_it_serves_the_guest() {
    let dir = scratch_dir("sandbox-guest");
    let image = dir.join("disk.img");
    File::create(&image).unwrap().set_len(4096 * 512).unwrap();
    let socket = dir.join("blk.sock");
    let backend = IsolaBlk::start_with(&socket, &image, &["--engine", "io-uring"]);
    let kernel = guest("virtio-blk.elf");
    let device = format!("blk,socket={}", socket.display());
    let mut core = Core::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--device",
        &device,
        "--device-timeout",
        "20",
        "--cmdline",
        "virtio-blk.mode=loop virtio-blk.seconds=3 virtio-blk.sectors=1000 \
         virtio-blk.seed=7 virtio-blk.depth=32",
    ]);
    // The first progress line (after a second of I/O): the guest is being served now.
    core.wait_for("virtio-blk: loop cycles=", TIMEOUT);
    let reaper = backend.pid();
    let device_process = device_pid(reaper);
    assert_sandboxed(reaper, "reaper");
    assert_sandboxed(device_process, "device");
    let nspid = status_field(device_process, "NSpid");
    assert_eq!(nspid.split_whitespace().last(), Some("1"), "NSpid {nspid}");
    let done = core.finish(TIMEOUT);
    done.assert_success();
    assert!(
        done.serial
            .iter()
            .any(|l| l.starts_with("virtio-blk: loop done cycles=")),
        "{:?}",
        done.serial
    );
}

/// The reaper a launcher started and its device process (pid 1 of its own pid namespace),
/// both sandboxed; `host_network` for isola-net.
fn assert_both_sandboxed(reaper: u32, host_network: bool) {
    let device_process = device_pid(reaper);
    for (pid, what) in [(reaper, "reaper"), (device_process, "device")] {
        if host_network {
            assert_sandboxed_on_host_network(pid, what);
        } else {
            assert_sandboxed(pid, what);
        }
    }
    let nspid = status_field(device_process, "NSpid");
    assert_eq!(nspid.split_whitespace().last(), Some("1"), "NSpid {nspid}");
}

/// Reads from `from` until `text` has arrived.
fn read_until(from: &mut impl Read, text: &str) -> String {
    let deadline = Instant::now() + TIMEOUT;
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains(text) {
        assert!(Instant::now() < deadline, "no {text:?}; got {seen:?}");
        let n = from.read(&mut buf).expect("read");
        assert!(n > 0, "closed before {text:?}; got {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    seen
}

#[test]
fn isola_console_is_sandboxed_while_a_user_talks_to_the_guest() {
    let dir = scratch_dir("sandbox-console");
    let vu = dir.join("vu.sock");
    let user_socket = dir.join("console.sock");
    let log = dir.join("port0.log");
    let console = IsolaConsole::start(
        &vu,
        &[
            "--port",
            &format!("socket={},log={}", user_socket.display(), log.display()),
        ],
        &dir.join("isola-console.log"),
    );
    let kernel = console_guest();
    let device = format!("console,socket={},queues=2", vu.display());
    let mut core = Core::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--device",
        &device,
        "--cmdline",
        "console.mode=shell",
    ]);
    core.wait_for("console: shell ready", TIMEOUT);
    // A user attaches (accept on the listener bound before the sandbox) and types a line;
    // the answer comes back and everything the guest wrote goes to the log opened before.
    let mut user = UnixStream::connect(&user_socket).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    user.write_all(b"sandboxed\r").unwrap();
    read_until(&mut user, "you typed: sandboxed\r\n");
    assert_both_sandboxed(console.pid(), false);
    user.write_all(b"exit\r").unwrap();
    read_until(&mut user, "bye\r\n");
    let done = core.finish(TIMEOUT);
    done.assert_success();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("you typed: sandboxed"), "{logged:?}");
    assert!(logged.contains("bye"), "{logged:?}");
}

#[test]
fn isola_input_is_sandboxed_while_its_control_socket_feeds_the_guest() {
    let dir = scratch_dir("sandbox-input");
    let input = IsolaInput::start(&dir, &[]);
    let (mut core, _) = isola_tests::input::start_core(&dir, &input, "virtio-input.mode=normal");
    core.wait_for("virtio-input: ready devices=2", TIMEOUT);
    // More control clients at once than glibc gives arenas by default (8): each is a thread.
    let clients: Vec<UnixStream> = (0..12)
        .map(|_| UnixStream::connect(&input.control).unwrap())
        .collect();
    for pressed in [true, false] {
        let answer = request(&input.control, &InputRequest::Key { code: 30, pressed });
        assert_eq!(answer, InputResponse::Done);
    }
    assert_both_sandboxed(input.pid(), false);
    drop(clients);
    // Esc pressed ends the guest.
    let answer = request(
        &input.control,
        &InputRequest::Key {
            code: 1,
            pressed: true,
        },
    );
    assert_eq!(answer, InputResponse::Done);
    let done = core.finish(TIMEOUT);
    done.assert_success();
    let reports = isola_tests::input::reports(&done.serial);
    assert!(
        reports
            .iter()
            .any(|r| r.dev == 0 && r.events.contains(&(1, 30, 1))),
        "{reports:?}"
    );
}

#[test]
fn isola_net_is_sandboxed_on_its_launchers_network_while_the_guest_answers_ping() {
    in_netns(|| {
        let dir = scratch_dir("sandbox-net");
        make_tap("tap0");
        let net_socket = dir.join("net.sock");
        let net = IsolaNet::start(&net_socket, open_tap("tap0"), dir.join("net.log"), &[]);
        let kernel = guest("virtio-net.elf");
        let device = format!("net,socket={}", net_socket.display());
        let mut core = Core::start(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64",
            "--device",
            &device,
            "--cmdline",
            "virtio-net.idle=60",
        ]);
        core.wait_for("virtio-net: ready", TIMEOUT);
        let guest_ip: Ipv4Addr = GUEST_IP.parse().unwrap();
        assert_eq!(ping(guest_ip, 3, Duration::from_secs(5)), 3, "ping replies");
        assert_both_sandboxed(net.pid(), true);
        assert_eq!(ping(guest_ip, 3, Duration::from_secs(5)), 3, "ping replies");
        let host = host_udp(5002, 1 << 20);
        command(&host, CMD_BYE, 0);
        let done = core.finish(TIMEOUT);
        done.assert_success();
        assert!(
            done.serial.iter().any(|l| l == "virtio-net: ok"),
            "{:?}",
            done.serial
        );
        drop(net);
    });
}
