//! virtio-net driven by the crates.io `virtio-drivers` crate (the `vdrivers` guest, its
//! `VirtIONetRaw`) against `isola-net` on a tap, in a network namespace each test creates
//! for itself (unshared, so its name is its own): MAC and link status, ARP and ping from the
//! host, 10,000 UDP datagrams each way counted and content-checked, 100 resets, every queue
//! size, and isola-net killed mid-work.

use std::collections::HashSet;
use std::net::{Ipv4Addr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isola_ipc::DeviceLink;
use isola_tests::net::{
    host_udp, in_netns, ip, make_tap, open_tap, ping, IsolaNet, GUEST_IP, GUEST_MAC,
};
use isola_tests::vdrivers::{self, assert_ok, cmdline, number, report, RUN_TIMEOUT};
use isola_tests::{scratch_dir, wait_device, Core};

const TAP: &str = "vdnet0";
const STREAM: u32 = 10_000;
const STREAM_LEN: usize = 60;
const CMD_START: u32 = 1;
const CMD_CREDIT: u32 = 2;
const CMD_BYE: u32 = 3;
const CMD_REPORT: u32 = 4;

/// The guest's stream datagram `seq` (vdrivers/src/net.rs `stream_payload`).
fn stream_payload(seq: u32) -> Vec<u8> {
    let mut p = vec![0u8; STREAM_LEN];
    p[..4].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in p.iter_mut().enumerate().skip(4) {
        *b = seq.wrapping_mul(31).wrapping_add(i as u32 * 7) as u8;
    }
    p
}

fn command(socket: &UdpSocket, cmd: u32, arg: u32) {
    let mut m = cmd.to_be_bytes().to_vec();
    m.extend_from_slice(&arg.to_be_bytes());
    socket
        .send_to(&m, (GUEST_IP, 6002))
        .expect("command is sent");
}

fn start_core(dir: &Path, net_socket: &Path, extra: &str) -> (Core, std::path::PathBuf) {
    let device = format!("net,socket={}", net_socket.display());
    vdrivers::start(
        dir,
        &[device],
        &cmdline("net", extra),
        &["--device-timeout", "20"],
    )
}

/// Host -> guest: `total` datagrams to port 6000, at most `WINDOW` ahead of the guest's
/// acknowledgements (to host port 5001); returns the guest's final (received, errors).
fn send_stream(acks: &UdpSocket, total: u32) -> (u32, u32) {
    const WINDOW: u32 = 256;
    acks.set_read_timeout(Some(Duration::from_millis(2)))
        .unwrap();
    let (mut sent, mut acked, mut errors) = (0u32, 0u32, 0u32);
    let mut last_progress = Instant::now();
    let mut asked = Instant::now();
    while acked < total {
        assert!(
            last_progress.elapsed() < Duration::from_secs(20),
            "guest acknowledged {acked} of {total} (sent {sent}, errors {errors})"
        );
        while sent < total && sent < acked + WINDOW {
            acks.send_to(&stream_payload(sent), (GUEST_IP, 6000))
                .unwrap();
            sent += 1;
        }
        let mut buf = [0u8; 64];
        match acks.recv_from(&mut buf) {
            Ok((8, _)) => {
                let got = u32::from_be_bytes(buf[..4].try_into().unwrap());
                errors = u32::from_be_bytes(buf[4..8].try_into().unwrap());
                if got > acked {
                    acked = got;
                    last_progress = Instant::now();
                }
            }
            Ok(_) => {}
            // The guest acknowledges every 32nd datagram; ask for the count when it is quiet.
            Err(_) if asked.elapsed() > Duration::from_millis(100) => {
                command(acks, CMD_REPORT, 0);
                asked = Instant::now();
            }
            Err(_) => {}
        }
    }
    (acked, errors)
}

/// Guest -> host: asks for `total` datagrams on `stream` (host port 5000) with a credit window
/// and checks each; returns how many distinct, correct ones arrived.
fn receive_stream(control: &UdpSocket, stream: &UdpSocket, total: u32) -> usize {
    const WINDOW: u32 = 512;
    command(control, CMD_START, total);
    command(control, CMD_CREDIT, WINDOW);
    let mut seen = HashSet::with_capacity(total as usize);
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < total as usize {
        assert!(Instant::now() < deadline, "only {} datagrams", seen.len());
        let (n, from) = stream
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("after {} datagrams: {e}", seen.len()));
        assert_eq!(from.to_string(), format!("{GUEST_IP}:6001"));
        assert_eq!(n, STREAM_LEN, "datagram size");
        let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
        assert!(seq < total, "sequence number {seq}");
        assert_eq!(buf[..n], stream_payload(seq), "datagram {seq}");
        assert!(seen.insert(seq), "datagram {seq} twice");
        if seen.len() % 256 == 0 {
            command(control, CMD_CREDIT, seen.len() as u32 + WINDOW);
        }
    }
    seen.len()
}

#[test]
fn net_mac_link_arp_ping_and_ten_thousand_udp_datagrams_each_way() {
    in_netns(|| {
        let dir = scratch_dir("vd-net-work");
        make_tap(TAP);
        let net_socket = dir.join("net.sock");
        let _net = IsolaNet::start(&net_socket, open_tap(TAP), dir.join("net.log"), &[]);
        let (mut core, _) = start_core(&dir, &net_socket, "");
        let mac = core.wait_for("vdrivers: mac=", Duration::from_secs(60));
        assert_eq!(mac, format!("vdrivers: mac={GUEST_MAC} link=1"));
        core.wait_for("vdrivers: ready", Duration::from_secs(30));

        let guest_ip: Ipv4Addr = GUEST_IP.parse().unwrap();
        assert_eq!(ping(guest_ip, 5, Duration::from_secs(5)), 5, "ping replies");
        let neigh = ip(&["neigh", "show", GUEST_IP, "dev", TAP]);
        assert!(
            neigh.contains(&format!("lladdr {GUEST_MAC}")),
            "ARP: {neigh:?}"
        );

        let control = host_udp(5001, 4 << 20);
        let (received, errors) = send_stream(&control, STREAM);
        assert_eq!((received, errors), (STREAM, 0));
        let stream = host_udp(5000, 32 << 20);
        assert_eq!(receive_stream(&control, &stream, STREAM), STREAM as usize);
        core.wait_for(
            &format!("vdrivers: stream sent={STREAM}"),
            Duration::from_secs(30),
        );
        command(&control, CMD_BYE, 0);

        let done = core.finish(RUN_TIMEOUT);
        let lines = assert_ok(&done);
        assert!(
            lines.contains(&format!("stream-in received={STREAM} errors=0").as_str()),
            "{}",
            report(&done)
        );
        assert_eq!(number(&lines, "sent"), u64::from(STREAM));
        // MAC, STATUS (net.rs SUPPORTED_FEATURES): Isola offers more (checksum offloads,
        // MRG_RXBUF, the control queue, ...), which the crate leaves out.
        let crate_set = vdrivers::COMMON_FEATURES | (1 << 5) | (1 << 16);
        assert_ne!(vdrivers::features_beyond_crate(&lines, crate_set), 0);
        assert!(
            number(&lines, "arp") >= 1 && number(&lines, "icmp") >= 5,
            "{}",
            report(&done)
        );
    });
}

/// Echoes every datagram that reaches host port 7007 back to its sender, until dropped.
struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl EchoServer {
    fn start() -> EchoServer {
        let socket = host_udp(7007, 4 << 20);
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut echoed = 0;
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], from);
                    echoed += 1;
                }
            }
            echoed
        });
        EchoServer {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map(|t| t.join().unwrap()).unwrap_or(0)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs the guest in `mode` against isola-net and a host echo server; returns its lines.
fn echo_run(name: &str, extra: &str) -> Vec<String> {
    let mut out = Vec::new();
    let extra = extra.to_owned();
    let name = name.to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    in_netns(move || {
        let dir = scratch_dir(&name);
        make_tap(TAP);
        let net_socket = dir.join("net.sock");
        let _net = IsolaNet::start(&net_socket, open_tap(TAP), dir.join("net.log"), &[]);
        let echo = EchoServer::start();
        let (core, _) = start_core(&dir, &net_socket, &extra);
        let done = core.finish(RUN_TIMEOUT);
        let echoed = echo.stop();
        assert_ok(&done);
        assert!(echoed > 0);
        tx.send(done.serial).unwrap();
    });
    out.extend(rx.recv().unwrap());
    out.into_iter()
        .filter_map(|l| l.strip_prefix(vdrivers::PREFIX).map(str::to_owned))
        .collect()
}

#[test]
fn net_reset_and_reinitialised_a_hundred_times_with_an_echo_between() {
    let lines = echo_run("vd-net-resets", "vdrivers.mode=resets vdrivers.resets=100");
    assert!(
        lines.iter().any(|l| l == "resets=100 each echoed"),
        "{lines:?}"
    );
}

#[test]
fn net_every_power_of_two_queue_size() {
    let lines = echo_run("vd-net-qsizes", "vdrivers.mode=qsizes");
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let max = number(&refs, "max-queue-size");
    assert!(max.is_power_of_two() && max <= 256, "{lines:?}");
    for k in 0..=max.trailing_zeros() {
        let size = 1u64 << k;
        assert!(
            refs.contains(&format!("size={size} echoed").as_str()),
            "{size}: {lines:?}"
        );
    }
    assert_eq!(number(&refs, "tested"), u64::from(max.trailing_zeros()) + 1);
}

#[test]
fn net_device_process_killed_mid_work_is_only_a_pause() {
    const KILLS: u32 = 3;
    in_netns(|| {
        let dir = scratch_dir("vd-net-kill");
        make_tap(TAP);
        let net_socket = dir.join("net.sock");
        let log = dir.join("net.log");
        let mut net = IsolaNet::start(&net_socket, open_tap(TAP), log.clone(), &[]);
        let echo = EchoServer::start();
        let (mut core, control) =
            start_core(&dir, &net_socket, "vdrivers.mode=loop vdrivers.ms=6000");
        core.wait_for("vdrivers: round 100 echoed", Duration::from_secs(60));
        for kill in 1..=KILLS {
            std::thread::sleep(Duration::from_millis(300));
            net.kill();
            net = IsolaNet::start(&net_socket, open_tap(TAP), log.clone(), &[]);
            wait_device(&mut core, &control, "reconnected", |d| {
                d.link == DeviceLink::Connected && d.reconnects == kill
            });
        }
        let done = core.finish(RUN_TIMEOUT);
        echo.stop();
        let lines = assert_ok(&done);
        assert!(number(&lines, "rounds") > 100, "{}", report(&done));
        eprintln!(
            "vdrivers net kills: longest wait {} ms",
            number(&lines, "longest-wait-ms")
        );
        drop(net);
    });
}
