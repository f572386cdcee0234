//! isola-net from the host side: a frontend in this process plays the guest (rings in a memfd
//! it shares with the device), the tap lives in a network namespace the test creates, and
//! host sockets in that namespace are the other end.

mod support;

use std::time::Duration;

use support::*;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

const BASE: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_MTU)
    | (1 << VIRTIO_NET_F_STATUS)
    | (1 << VIRTIO_RING_F_EVENT_IDX);

fn udp_payload(frame: &[u8]) -> &[u8] {
    let ihl = usize::from(frame[14] & 0xf) * 4;
    &frame[14 + ihl + 8..]
}

/// Host -> guest: the host sends `n` datagrams, the guest receives them in order.
fn host_to_guest(guest: &mut Guest, n: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
    let host = host_udp(0);
    guest.post_rx(n as u16, 2048);
    let mut got = Vec::new();
    for i in 0..n {
        host.send_to(&i.to_be_bytes(), "10.0.0.2:6000").unwrap();
    }
    while got.len() < n as usize {
        match guest.recv(Duration::from_secs(5)) {
            Some((hdr, frame)) if frame.len() > 34 && frame[23] == 17 => got.push((hdr, frame)),
            // IPv6 router solicitations and the like: not ours.
            Some(_) => guest.post_rx(1, 2048),
            None => panic!("only {} of {n} datagrams arrived", got.len()),
        }
    }
    got
}

#[test]
fn tap_fd_carries_frames_both_ways_with_config_and_checksums() {
    in_netns(|| {
        let dir = Scratch::new("both-ways");
        make_tap("tap0", false);
        let fd = open_tap("tap0", TAP_FLAGS);
        let net = NetProc::start(
            &dir.path("net.sock"),
            dir.path("net.log"),
            &[
                "--tap-fd",
                "3",
                "--mac",
                &mac_text(GUEST_MAC),
                "--mtu",
                "1400",
            ],
            vec![fd],
        );
        let mut guest = Guest::connect(&dir.path("net.sock"), BASE | bit(VIRTIO_NET_F_CSUM));
        let (_, config) = guest
            .frontend
            .get_config(0, 12, VhostUserConfigFlags::WRITABLE, &[0u8; 12])
            .unwrap();
        assert_eq!(config[..6], GUEST_MAC);
        assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "link up");
        assert_eq!(u16::from_le_bytes([config[8], config[9]]), 1, "one pair");
        assert_eq!(u16::from_le_bytes([config[10], config[11]]), 1400);

        // Guest -> host, complete checksums and then checksum offload (partial sums).
        let host = host_udp(5000);
        for i in 0..200u32 {
            let payload = [i.to_be_bytes().as_slice(), &[0x5a; 100]].concat();
            let mut frame = udp_frame(4000, 5000, &payload, i as u16);
            let hdr = if i % 2 == 0 {
                [0u8; HDR]
            } else {
                // As a driver with CSUM does: the pseudo-header sum, folded, not inverted.
                let partial = !csum(pseudo_sum(GUEST_IP, HOST_IP, 17, 8 + payload.len()), &[]);
                frame[40..42].copy_from_slice(&partial.to_be_bytes());
                vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0, 0, 0, 34, 6)
            };
            guest.send(hdr, &frame);
            let mut buf = [0u8; 2048];
            let (n, from) = host.recv_from(&mut buf).expect("datagram reaches the host");
            assert_eq!(&buf[..n], &payload[..]);
            assert_eq!(from.to_string(), "10.0.0.2:4000");
        }

        // Host -> guest without GUEST_CSUM: complete checksums, no flags.
        for (i, (hdr, frame)) in host_to_guest(&mut guest, 50).iter().enumerate() {
            assert_eq!(hdr[0], 0, "no flags without GUEST_CSUM");
            assert_eq!(hdr[10..12], [1, 0], "num_buffers = 1");
            assert_eq!(frame[..6], GUEST_MAC);
            assert_eq!(udp_payload(frame), (i as u32).to_be_bytes());
            let udp = &frame[34..];
            assert_eq!(csum(pseudo_sum(HOST_IP, GUEST_IP, 17, udp.len()), udp), 0);
        }
        drop(guest);

        // A new connection with GUEST_CSUM: the tap may now leave checksums to the guest.
        let mut guest = Guest::connect(&dir.path("net.sock"), BASE | bit(VIRTIO_NET_F_GUEST_CSUM));
        let got = host_to_guest(&mut guest, 20);
        assert!(
            got.iter()
                .all(|(h, _)| h[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0 && h[6..8] == [34, 0]),
            "partial checksums handed to the guest: {:?}",
            got.iter().map(|(h, _)| h.clone()).collect::<Vec<_>>()
        );
        drop(guest);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(net.last_stat("tx_dropped"), Some(0), "{}", net.log_text());
        assert_eq!(net.last_stat("tx_frames"), Some(200));
    });
}

#[test]
fn rx_back_pressure_leaves_frames_in_the_tap() {
    in_netns(|| {
        let dir = Scratch::new("pressure");
        let net = serve_tap0(&dir);
        let mut guest = Guest::connect(&dir.path("net.sock"), BASE);
        // No receive buffers: 5000 datagrams must wait in (or overflow) the tap's queue.
        let host = host_udp(0);
        let before = tap_tx_dropped("tap0");
        for i in 0..5000u32 {
            host.send_to(&i.to_be_bytes(), "10.0.0.2:6000").unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
        let dropped = tap_tx_dropped("tap0") - before;
        // The tap's queue holds qlen frames, the device at most one more.
        let qlen = tap_qlen("tap0");
        assert!(
            dropped >= 5000 - qlen - 1 && dropped <= 5000 - qlen,
            "{dropped} dropped by the tap (qlen {qlen})"
        );
        // The backlog is delivered once buffers come, oldest first.
        guest.post_rx(64, 2048);
        let mut first = None;
        for _ in 0..64 {
            let (_, frame) = guest
                .recv(Duration::from_secs(5))
                .expect("backlog delivered");
            if frame.len() > 34 && frame[23] == 17 {
                let seq = u32::from_be_bytes(udp_payload(&frame)[..4].try_into().unwrap());
                first.get_or_insert(seq);
            }
        }
        assert!(
            first.is_some_and(|s| s < 10),
            "oldest frames first: {first:?}"
        );
        // The process holds no backlog of its own: its memory did not grow by 5000 frames.
        let rss = rss_kib(net.child.id());
        assert!(rss < 64 * 1024, "isola-net uses {rss} KiB");
    });
}

/// The tap's "TX dropped" counter (frames the host sent that the tap could not queue).
fn tap_tx_dropped(name: &str) -> u64 {
    let out = ip(&["-s", "-o", "link", "show", name]);
    // "... TX: bytes packets errors dropped carrier collsns \    N N N N ..."
    let tx = out.split("TX:").nth(1).expect("TX counters");
    let numbers: Vec<u64> = tx
        .split(|c: char| c.is_whitespace() || c == '\\')
        .filter_map(|w| w.parse().ok())
        .collect();
    numbers[3]
}

fn tap_qlen(name: &str) -> u64 {
    let out = ip(&["-o", "link", "show", name]);
    let mut words = out.split_whitespace();
    words.find(|w| *w == "qlen");
    words
        .next()
        .and_then(|w| w.trim_end_matches('\\').parse().ok())
        .expect("qlen")
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// A TCP/IPv4 frame from the guest to `dst` carrying `payload` as one segment of `seq`.
fn tcp_frame(dst: [u8; 4], seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = eth(HOST_MAC, GUEST_MAC, 0x0800);
    f.extend(ipv4(GUEST_IP, dst, 6, 20 + payload.len(), 7));
    let mut t = Vec::new();
    t.extend_from_slice(&1234u16.to_be_bytes());
    t.extend_from_slice(&80u16.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&0u32.to_be_bytes());
    t.extend_from_slice(&[5 << 4, 0x18]);
    t.extend_from_slice(&65535u16.to_be_bytes());
    // Checksum offload: the pseudo-header sum over the whole super-frame, not inverted.
    let partial = !csum(pseudo_sum(GUEST_IP, dst, 6, 20 + payload.len()), &[]);
    t.extend_from_slice(&partial.to_be_bytes());
    t.extend_from_slice(&[0, 0]);
    t.extend_from_slice(payload);
    f.extend(t);
    f
}

#[test]
fn tso_frame_arrives_segmented_and_checksummed() {
    in_netns(|| {
        let dir = Scratch::new("tso");
        make_tap("tap0", false);
        // The far side: a plain tap without offloads, so the host must segment and checksum
        // in software before handing frames to it; we read what it gets.
        ip(&["tuntap", "add", "dev", "tap1", "mode", "tap"]);
        std::fs::write("/proc/sys/net/ipv6/conf/tap1/disable_ipv6", "1").unwrap();
        ip(&["addr", "add", "10.0.1.1/24", "dev", "tap1"]);
        ip(&["link", "set", "tap1", "up"]);
        ip(&[
            "neigh",
            "add",
            "10.0.1.2",
            "lladdr",
            "02:bb:00:00:00:02",
            "dev",
            "tap1",
        ]);
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
        let far = std::fs::File::from(open_tap("tap1", libc::IFF_TAP | libc::IFF_NO_PI));
        nix::fcntl::fcntl(
            &far,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
        let net = NetProc::start(
            &dir.path("net.sock"),
            dir.path("net.log"),
            &["--tap", "tap0"],
            vec![],
        );
        let mut guest = Guest::connect(
            &dir.path("net.sock"),
            BASE | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4),
        );
        assert_ne!(guest.acked & bit(VIRTIO_NET_F_HOST_TSO4), 0);
        let far_ip = [10, 0, 1, 2];
        let data: Vec<u8> = (0..20000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let frame = tcp_frame(far_ip, 1000, &data);
        let hdr = vnet(
            VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            VIRTIO_NET_HDR_GSO_TCPV4 as u8,
            54,
            1448,
            34,
            16,
        );
        guest.send(hdr, &frame);

        let mut got = Vec::new();
        let mut segments = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.len() < data.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "only {} bytes arrived; forwarding={}; {}; {}",
                got.len(),
                std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default(),
                ip(&["-s", "-o", "link"]),
                net.log_text()
            );
            let mut buf = [0u8; 65536];
            let n = match std::io::Read::read(&mut &far, &mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err(e) => panic!("reading tap1: {e}"),
            };
            let f = &buf[..n];
            if n < 54 || f[12..14] != [8, 0] || f[23] != 6 {
                continue;
            }
            let ip_len = usize::from(u16::from_be_bytes([f[16], f[17]]));
            assert!(ip_len <= 1500, "a {ip_len}-byte IP packet: not segmented");
            assert_eq!(csum(0, &f[14..34]), 0, "IP header checksum");
            let tcp = &f[34..14 + ip_len];
            assert_eq!(
                csum(pseudo_sum(GUEST_IP, far_ip, 6, tcp.len()), tcp),
                0,
                "TCP checksum of segment {segments}"
            );
            let seq = u32::from_be_bytes(tcp[4..8].try_into().unwrap());
            assert_eq!(seq as usize, 1000 + got.len(), "segments in order");
            got.extend_from_slice(&tcp[20..]);
            segments += 1;
        }
        assert_eq!(got, data);
        assert_eq!(segments, data.len().div_ceil(1448));
    });
}

#[test]
fn mergeable_buffers_carry_a_frame_across_several_and_without_them_small_buffers_drop_it() {
    in_netns(|| {
        let dir = Scratch::new("mrg");
        let net = serve_tap0(&dir);
        let host = host_udp(0);
        let payload: Vec<u8> = (0..1400u32).map(|i| (i * 13) as u8).collect();

        // MRG_RXBUF: 512-byte buffers; a 1454-byte frame (+ header) takes three.
        let mut guest = Guest::connect(&dir.path("net.sock"), BASE | bit(VIRTIO_NET_F_MRG_RXBUF));
        guest.post_rx(8, 512);
        host.send_to(&payload, "10.0.0.2:6000").unwrap();
        let (hdr, first) = guest.recv(TIMEOUT).expect("first buffer");
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 3, "num_buffers");
        let mut frame = first;
        for _ in 0..2 {
            let (a, b) = guest.recv(TIMEOUT).expect("next buffer");
            frame.extend(a);
            frame.extend(b);
        }
        assert_eq!(frame.len(), 14 + 20 + 8 + payload.len());
        assert_eq!(udp_payload(&frame), &payload[..]);
        drop(guest);

        // Without it, a frame that does not fit the buffer is dropped and the buffer kept for
        // the next frame, which fits.
        let mut guest = Guest::connect(&dir.path("net.sock"), BASE);
        guest.post_rx(1, 512);
        host.send_to(&payload, "10.0.0.2:6000").unwrap();
        host.send_to(b"small", "10.0.0.2:6000").unwrap();
        let (hdr, frame) = guest.recv(TIMEOUT).expect("the small frame");
        assert_eq!(hdr[10..12], [1, 0]);
        assert_eq!(udp_payload(&frame), b"small");
        assert!(guest.recv(Duration::from_millis(200)).is_none());
        drop(guest);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(net.last_stat("rx_dropped"), Some(1), "{}", net.log_text());
    });
}

impl Guest {
    /// The next whole frame (mergeable buffers joined): (header, frame).
    fn recv_frame(&mut self) -> (Vec<u8>, Vec<u8>) {
        let (hdr, mut frame) = self.recv(TIMEOUT).expect("a frame");
        let buffers = u16::from_le_bytes([hdr[10], hdr[11]]);
        for _ in 1..buffers {
            let (a, b) = self.recv(TIMEOUT).expect("the frame's next buffer");
            frame.extend(a);
            frame.extend(b);
        }
        self.post_rx(buffers, 4096);
        (hdr, frame)
    }
}

/// A TCP segment from the guest (10.0.0.2:80) to the host's `port`, checksums complete.
fn tcp_segment(port: u16, seq: u32, ack: u32, flags: u8, options: &[u8]) -> Vec<u8> {
    let mut f = eth(HOST_MAC, GUEST_MAC, 0x0800);
    let len = 20 + options.len();
    f.extend(ipv4(GUEST_IP, HOST_IP, 6, len, 9));
    let mut t = Vec::new();
    t.extend_from_slice(&80u16.to_be_bytes());
    t.extend_from_slice(&port.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    t.extend_from_slice(&[((len / 4) as u8) << 4, flags]);
    t.extend_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(options);
    let c = csum(pseudo_sum(GUEST_IP, HOST_IP, 6, t.len()), &t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    f.extend(t);
    f
}

#[test]
fn host_tcp_reaches_the_guest_as_tso_frames_over_mergeable_buffers() {
    in_netns(|| {
        let dir = Scratch::new("guest-tso");
        let _net = serve_tap0(&dir);
        let mut guest = Guest::connect(
            &dir.path("net.sock"),
            BASE | bit(VIRTIO_NET_F_GUEST_CSUM)
                | bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_MRG_RXBUF),
        );
        guest.post_rx(200, 4096);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let host = std::thread::spawn(move || {
            use std::io::Write;
            let mut s = std::net::TcpStream::connect_timeout(
                &"10.0.0.2:80".parse().unwrap(),
                Duration::from_secs(10),
            )
            .expect("the guest accepts");
            s.write_all(&sent).unwrap();
        });

        // Handshake: answer the SYN with MSS 1460 and window scale 7.
        let (syn_hdr, syn) = loop {
            let (h, f) = guest.recv_frame();
            if f.len() >= 54 && f[23] == 6 && f[47] & 0x02 != 0 {
                break (h, f);
            }
        };
        let _ = syn_hdr;
        let port = u16::from_be_bytes([syn[34], syn[35]]);
        let their_isn = u32::from_be_bytes(syn[38..42].try_into().unwrap());
        let options = [2, 4, 0x05, 0xb4, 1, 3, 3, 7];
        let mine = 5000u32;
        guest.send(
            [0u8; HDR],
            &tcp_segment(port, mine, their_isn + 1, 0x12, &options),
        );

        let mut got = Vec::new();
        let mut gso_frames = 0;
        let mut largest = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while got.len() < data.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "only {} bytes",
                got.len()
            );
            let (hdr, f) = guest.recv_frame();
            if f.len() < 54 || f[23] != 6 {
                continue;
            }
            let ip_len = usize::from(u16::from_be_bytes([f[16], f[17]]));
            let doff = usize::from(f[46] >> 4) * 4;
            let seq = u32::from_be_bytes(f[38..42].try_into().unwrap());
            let payload = &f[34 + doff..14 + ip_len];
            if hdr[1] == VIRTIO_NET_HDR_GSO_TCPV4 as u8 {
                gso_frames += 1;
                assert_ne!(
                    hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
                    0,
                    "GSO needs a partial csum"
                );
                let gso_size = u16::from_le_bytes([hdr[4], hdr[5]]);
                assert!(
                    gso_size > 0 && usize::from(gso_size) <= 1460,
                    "gso_size {gso_size}"
                );
            }
            largest = largest.max(f.len());
            if seq.wrapping_sub(their_isn + 1) as usize == got.len() {
                got.extend_from_slice(payload);
            }
            let ack = their_isn.wrapping_add(1).wrapping_add(got.len() as u32);
            guest.send([0u8; HDR], &tcp_segment(port, mine + 1, ack, 0x10, &[]));
        }
        assert_eq!(got, data);
        assert!(
            gso_frames > 0 && largest > 1514,
            "no TSO frame reached the guest (largest {largest})"
        );
        host.join().unwrap();
    });
}

#[test]
fn an_unprivileged_process_serves_the_tap_fd_its_launcher_opened() {
    in_netns(|| {
        const NOBODY: u32 = 65534;
        let dir = Scratch::new("unprivileged");
        std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        make_tap("tap0", false);
        let fd = open_tap("tap0", TAP_FLAGS);
        let net = NetProc::start_as(
            &dir.path("net.sock"),
            dir.path("net.log"),
            &["--tap-fd", "3"],
            vec![fd],
            Some(NOBODY),
        );
        // (uid, effective capabilities) of the process. Its socket is up before it enters
        // the sandbox, where for a moment it holds every capability of its new user
        // namespace: wait for it to settle.
        let creds = || {
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", net.child.id())).unwrap();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.split_whitespace().next())
                    .unwrap()
                    .to_owned()
            };
            (field("Uid:"), field("CapEff:"))
        };
        let deadline = std::time::Instant::now() + TIMEOUT;
        let (uid, caps) = loop {
            let (uid, caps) = creds();
            if caps == "0000000000000000" || std::time::Instant::now() > deadline {
                break (uid, caps);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(uid, NOBODY.to_string(), "runs as nobody");
        assert_eq!(caps, "0000000000000000", "no capabilities");
        let mut guest = Guest::connect(&dir.path("net.sock"), BASE);
        let host = host_udp(5000);
        guest.send([0u8; HDR], &udp_frame(4000, 5000, b"from nobody", 1));
        let mut buf = [0u8; 64];
        let (n, _) = host
            .recv_from(&mut buf)
            .expect("the frame reaches the host");
        assert_eq!(&buf[..n], b"from nobody");
        guest.post_rx(4, 2048);
        host_udp(0).send_to(b"to nobody", "10.0.0.2:6000").unwrap();
        let (_, frame) = guest.recv(TIMEOUT).expect("the frame reaches the guest");
        assert_eq!(udp_payload(&frame), b"to nobody");
    });
}
