//! A hostile guest cannot crash isola-net or make it touch memory outside guest RAM: every
//! malformed transmit chain and receive buffer is dropped, counted and given back, and the
//! device keeps serving good frames.

mod support;

use std::time::Duration;

use support::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_HOST_TSO4);

const SCRATCH: u64 = 0xc0_0000;

#[test]
fn hostile_frames_are_dropped_counted_and_survived() {
    in_netns(|| {
        let dir = Scratch::new("hostile");
        make_tap("tap0", false);
        let mut net = NetProc::start(
            &dir.path("net.sock"),
            dir.path("net.log"),
            &["--tap", "tap0"],
            vec![],
        );
        let mut guest = Guest::connect(&dir.path("net.sock"), FEATURES);
        let host = host_udp(5000);
        let good = udp_frame(4000, 5000, b"good", 1);
        let mut bad = 0u64;

        // Bad headers and sizes, each sent as a well-formed chain.
        let oversized = udp_frame(4000, 5000, &[0u8; 1500], 2);
        let cases: Vec<([u8; HDR], Vec<u8>)> = vec![
            ([0u8; HDR], oversized),
            ([0u8; HDR], good[..10].to_vec()),
            (vnet(0x80, 0, 0, 0, 0, 0), good.clone()),
            (vnet(0, 9, 0, 0, 0, 0), good.clone()),
            (
                vnet(
                    VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
                    VIRTIO_NET_HDR_GSO_UDP as u8,
                    42,
                    1000,
                    34,
                    6,
                ),
                good.clone(),
            ),
            (
                vnet(
                    VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
                    VIRTIO_NET_HDR_GSO_TCPV4 as u8,
                    54,
                    0,
                    34,
                    16,
                ),
                good.clone(),
            ),
            (
                vnet(0, VIRTIO_NET_HDR_GSO_TCPV4 as u8, 54, 1448, 0, 0),
                good.clone(),
            ),
            (
                vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0, 0, 0, 40, 0xfff0),
                good.clone(),
            ),
            (
                vnet(0, VIRTIO_NET_HDR_GSO_ECN as u8, 0, 0, 0, 0),
                good.clone(),
            ),
        ];
        for (hdr, frame) in &cases {
            guest.send(*hdr, frame);
            bad += 1;
        }

        // Chains built by hand: outside RAM, straddling its end, empty, too short for the
        // header, device-writable, looping.
        let mem = guest.ram.memory();
        mem.write_slice(&[0u8; HDR], GuestAddress(SCRATCH)).unwrap();
        mem.write_slice(&good, GuestAddress(SCRATCH + HDR as u64))
            .unwrap();
        let chains: Vec<Vec<(u64, u32, bool)>> = vec![
            vec![(RAM + 0x1000, 64, false)],
            vec![(SCRATCH, HDR as u32, false), (RAM - 16, 64, false)],
            vec![(SCRATCH, HDR as u32, false), (u64::MAX - 8, 64, false)],
            vec![(SCRATCH, 0, false)],
            vec![(SCRATCH, 4, false)],
            vec![
                (SCRATCH, HDR as u32, false),
                (SCRATCH + HDR as u64, good.len() as u32, true),
            ],
        ];
        for chain in &chains {
            let bufs: Vec<_> = chain
                .iter()
                .map(|&(a, l, w)| (GuestAddress(a), l, w))
                .collect();
            let head = guest.tx.add(guest.ram.memory(), &bufs);
            guest.send_head(head);
            bad += 1;
        }
        // A descriptor that chains to itself.
        let head = guest.tx.add(
            guest.ram.memory(),
            &[(GuestAddress(SCRATCH), HDR as u32, false)],
        );
        guest.tx.put(
            guest.ram.memory(),
            head,
            SCRATCH,
            HDR as u32,
            VRING_DESC_F_NEXT as u16,
            head,
        );
        guest.send_head(head);
        bad += 1;

        // Nothing above reached the host; a good frame still does.
        guest.send([0u8; HDR], &good);
        let mut buf = [0u8; 2048];
        let (n, _) = host.recv_from(&mut buf).expect("the good frame arrives");
        assert_eq!(&buf[..n], b"good");
        host.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        assert!(host.recv_from(&mut buf).is_err(), "a bad frame got through");

        // Receive side: buffers outside RAM, device-readable, shorter than the header,
        // then a good one, which gets the frame.
        for &(addr, len, flags) in &[
            (RAM + 0x10_0000, 2048u32, VRING_DESC_F_WRITE as u16),
            (RAM - 100, 2048, VRING_DESC_F_WRITE as u16),
            (SCRATCH, 2048, 0),
            (SCRATCH, 4, VRING_DESC_F_WRITE as u16),
        ] {
            let head = guest
                .rx
                .add(guest.ram.memory(), &[(GuestAddress(SCRATCH), 1, true)]);
            guest.rx.put(guest.ram.memory(), head, addr, len, flags, 0);
            guest.rx.publish(guest.ram.memory(), head);
        }
        guest.post_rx(1, 2048);
        host.send_to(b"to guest", "10.0.0.2:6000").unwrap();
        for _ in 0..4 {
            let (hdr, frame) = guest.recv(TIMEOUT).expect("bad buffer returned");
            assert!(hdr.len() + frame.len() == 0, "bad buffer used: {hdr:?}");
        }
        let (_, frame) = guest.recv(TIMEOUT).expect("frame in the good buffer");
        assert!(frame.ends_with(b"to guest"));

        assert!(net.child.try_wait().unwrap().is_none(), "isola-net died");
        drop(guest);
        std::thread::sleep(Duration::from_millis(200));
        let log = net.log_text();
        assert_eq!(net.last_stat("tx_dropped"), Some(bad), "{log}");
        assert_eq!(net.last_stat("tx_frames"), Some(1), "{log}");
        assert_eq!(net.last_stat("rx_bad_buffers"), Some(4), "{log}");
        assert!(log.contains("dropped: oversized frame"), "{log}");
        assert!(!log.contains("panicked"), "{log}");
    });
}
