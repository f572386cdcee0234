//! A guest on isola-net: the virtio-net test guest behind Isola's core, isola-net on a tap the
//! test opened (as the launcher does, `--tap-fd`), in a network namespace of the test's own.
//! The host side answers ARP and ping, receives a 100,000-datagram stream from the guest and
//! sends one back that the guest verifies; and traffic resumes after isola-net is killed and
//! restarted.

use std::collections::HashSet;
use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use isola_ipc::DeviceLink;
use isola_tests::net::*;
use isola_tests::{guest, scratch_dir, wait_device, Core};

const STREAM: u32 = 100_000;
const PAYLOAD: usize = 64;

fn start_core(dir: &Path, net_socket: &Path, cmdline: &str) -> (Core, PathBuf) {
    let kernel = guest("virtio-net.elf");
    let device = format!("net,socket={}", net_socket.display());
    Core::start_with_device(dir, &kernel, &device, cmdline)
}

/// Receives the guest's stream of `total` datagrams on `socket`, granting credit as it goes.
fn receive_stream(socket: &UdpSocket, total: u32) {
    const WINDOW: u32 = 4096;
    command(socket, CMD_START, total);
    command(socket, CMD_CREDIT, WINDOW);
    let mut seen = HashSet::with_capacity(total as usize);
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < total as usize {
        assert!(Instant::now() < deadline, "only {} datagrams", seen.len());
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) => panic!("after {} datagrams: {e}", seen.len()),
        };
        assert_eq!(from.to_string(), format!("{GUEST_IP}:6001"));
        assert_eq!(n, PAYLOAD, "datagram size");
        let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
        assert!(seq < total, "sequence number {seq}");
        assert_eq!(buf[..n], stream_payload(seq, PAYLOAD), "datagram {seq}");
        assert!(seen.insert(seq), "datagram {seq} twice");
        let got = seen.len() as u32;
        if got.is_multiple_of(1024) {
            command(socket, CMD_CREDIT, got + WINDOW);
        }
    }
}

/// Sends `total` datagrams to the guest's port 6000 from `socket`, at most `WINDOW` ahead of
/// what the guest acknowledged; returns the guest's final (received, errors).
fn send_stream(socket: &UdpSocket, total: u32) -> (u32, u32) {
    const WINDOW: u32 = 384;
    socket
        .set_read_timeout(Some(Duration::from_millis(1)))
        .unwrap();
    let (mut sent, mut acked, mut errors) = (0u32, 0u32, 0u32);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last_progress = Instant::now();
    while acked < total {
        assert!(
            Instant::now() < deadline,
            "guest acknowledged {acked} of {total}"
        );
        while sent < total && sent < acked + WINDOW {
            socket
                .send_to(&stream_payload(sent, PAYLOAD), (GUEST_IP, 6000))
                .unwrap();
            sent += 1;
        }
        let mut buf = [0u8; 64];
        match socket.recv_from(&mut buf) {
            Ok((8, _)) => {
                acked = u32::from_be_bytes(buf[..4].try_into().unwrap());
                errors = u32::from_be_bytes(buf[4..8].try_into().unwrap());
                last_progress = Instant::now();
            }
            Ok(_) => {}
            Err(_) => assert!(
                last_progress.elapsed() < Duration::from_secs(10),
                "no acknowledgement for 10 s at {acked} (sent {sent})"
            ),
        }
    }
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    (acked, errors)
}

#[test]
fn guest_answers_arp_and_ping_and_streams_100k_datagrams_each_way() {
    in_netns(|| {
        let dir = scratch_dir("net-guest");
        make_tap("tap0");
        let net_socket = dir.join("net.sock");
        let net = IsolaNet::start(&net_socket, open_tap("tap0"), dir.join("net.log"), &[]);
        let (mut core, _control) = start_core(&dir, &net_socket, "virtio-net.payload=64");
        let ready = core.wait_for("virtio-net: ready", Duration::from_secs(30));
        assert!(
            ready.contains(&format!("mac={GUEST_MAC} link=1 mtu=1500")),
            "{ready}"
        );

        // ARP (the host has no entry for the guest yet) and ICMP echo.
        let guest_ip: Ipv4Addr = GUEST_IP.parse().unwrap();
        assert_eq!(ping(guest_ip, 5, Duration::from_secs(5)), 5, "ping replies");
        let neigh = ip(&["neigh", "show", GUEST_IP, "dev", "tap0"]);
        assert!(
            neigh.contains(&format!("lladdr {GUEST_MAC}")),
            "ARP resolved the guest: {neigh:?}"
        );

        // Guest -> host, then host -> guest.
        let inbound = host_udp(5000, 32 << 20);
        receive_stream(&inbound, STREAM);
        core.wait_for(
            &format!("virtio-net: stream sent={STREAM}"),
            Duration::from_secs(30),
        );
        let outbound = host_udp(5001, 1 << 20);
        let (received, errors) = send_stream(&outbound, STREAM);
        assert_eq!((received, errors), (STREAM, 0));

        command(&inbound, CMD_BYE, 0);
        let done = core.finish(Duration::from_secs(30));
        done.assert_success();
        assert!(
            done.serial
                .iter()
                .any(|l| l == &format!("virtio-net: stream-in received={STREAM} errors=0")),
            "{:?}",
            done.serial
        );
        assert!(done
            .serial
            .iter()
            .any(|l| l.contains("arp=") && !l.contains("arp=0 ")));
        assert!(
            done.serial.iter().any(|l| l == "virtio-net: ok"),
            "{:?}",
            done.serial
        );
        drop(net);
    });
}

#[test]
fn traffic_resumes_after_isola_net_is_killed_and_restarted() {
    const KILLS: u32 = 3;
    in_netns(|| {
        let dir = scratch_dir("net-reconnect");
        make_tap("tap0");
        let net_socket = dir.join("net.sock");
        let log = dir.join("net.log");
        let mut net = IsolaNet::start(&net_socket, open_tap("tap0"), log.clone(), &[]);
        let (mut core, control_socket) = start_core(&dir, &net_socket, "virtio-net.idle=120");
        core.wait_for("virtio-net: ready", Duration::from_secs(30));
        let host = host_udp(5002, 1 << 20);
        echo(&host, 20);
        for kill in 1..=KILLS {
            // Die with frames in flight both ways: a burst of echoes nobody reads yet.
            for i in 0..200u32 {
                host.send_to(&i.to_be_bytes(), (GUEST_IP, 7)).unwrap();
            }
            net.kill();
            wait_device(&mut core, &control_socket, "reconnecting", |d| {
                d.link == DeviceLink::Reconnecting
            });
            // The launcher opens the tap again for the new process.
            net = IsolaNet::start(&net_socket, open_tap("tap0"), log.clone(), &[]);
            let status = wait_device(&mut core, &control_socket, "connected", |d| {
                d.link == DeviceLink::Connected
            });
            assert_eq!(status.reconnects, kill);
            // The link is back: echo and ping work again.
            echo(&host, 20);
            let guest_ip: Ipv4Addr = GUEST_IP.parse().unwrap();
            assert_eq!(
                ping(guest_ip, 3, Duration::from_secs(2)),
                3,
                "ping after restart {kill}"
            );
        }
        command(&host, CMD_BYE, 0);
        let done = core.finish(Duration::from_secs(30));
        done.assert_success();
        assert!(
            done.serial.iter().any(|l| l == "virtio-net: ok"),
            "{:?}",
            done.serial
        );
        drop(net);
    });
}
