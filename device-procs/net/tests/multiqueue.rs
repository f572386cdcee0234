//! Several queue pairs on a multi-queue tap, and the control queue that MQ requires.

mod support;

use std::time::Duration;

use isola_device_common::testing::{self, GuestRam, SplitQueue};
use support::*;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::VhostBackend;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use vm_memory::{Address, Bytes, GuestAddress};

const PAIRS: u16 = 2;
const BUFS: u64 = 0x10_0000;

/// Sends a control command; returns the device's ack byte.
fn control(ram: &GuestRam, ctrl: &mut SplitQueue, cmd: &[u8], n: u16) -> u8 {
    let mem = ram.memory();
    let at = GuestAddress(0xf0_0000);
    mem.write_slice(cmd, at).unwrap();
    mem.write_obj(0xffu8, at.unchecked_add(0x100)).unwrap();
    let head = ctrl.add(
        mem,
        &[
            (at, cmd.len() as u32, false),
            (at.unchecked_add(0x100), 1, true),
        ],
    );
    ctrl.publish(mem, head);
    ctrl.kick();
    assert!(
        ctrl.wait_used(mem, n, TIMEOUT),
        "control command not answered"
    );
    mem.read_obj(at.unchecked_add(0x100)).unwrap()
}

#[test]
fn two_queue_pairs_and_the_control_queue() {
    in_netns(|| {
        let dir = Scratch::new("mq");
        make_tap("tap0", true);
        let net = NetProc::start(
            &dir.path("net.sock"),
            dir.path("net.log"),
            &["--tap", "tap0", "--queue-pairs", "2"],
            vec![],
        );
        let ram = GuestRam::new(0x100_0000);
        let mut frontend = testing::connect(&dir.path("net.sock"), 5, TIMEOUT);
        let wanted = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_MQ)
            | (1 << VIRTIO_NET_F_CTRL_VQ)
            | (1 << VIRTIO_NET_F_MRG_RXBUF);
        let acked = testing::negotiate(
            &mut frontend,
            wanted,
            isola_device_common::offered_protocol_features()
                & !VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        );
        assert_eq!(acked & wanted, wanted, "MQ and CTRL_VQ offered");
        frontend.set_mem_table(&[ram.region()]).unwrap();
        let mut queues: Vec<SplitQueue> = (0..2 * PAIRS + 1)
            .map(|i| SplitQueue::new(i, 64, GuestAddress(u64::from(i) * 0x2000)))
            .collect();
        for q in &queues {
            testing::start_queue(&mut frontend, q, &ram, 0);
        }
        let mem = ram.memory();
        // The control queue: 2 pairs is fine, 3 is more than the device has.
        let set = |n: u16| {
            let mut c = vec![
                VIRTIO_NET_CTRL_MQ as u8,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
            ];
            c.extend_from_slice(&n.to_le_bytes());
            c
        };
        assert_eq!(
            control(&ram, &mut queues[4], &set(2), 1),
            VIRTIO_NET_OK as u8
        );
        assert_eq!(
            control(&ram, &mut queues[4], &set(3), 2),
            VIRTIO_NET_ERR as u8
        );
        assert_eq!(
            control(&ram, &mut queues[4], &[0x77, 0], 3),
            VIRTIO_NET_ERR as u8
        );

        // Transmit on both pairs.
        let host = host_udp(5000);
        for (pair, q) in [1usize, 3].into_iter().enumerate() {
            let frame = udp_frame(4000 + pair as u16, 5000, &[pair as u8; 32], 1);
            let at = GuestAddress(0x80_0000 + pair as u64 * 0x1000);
            mem.write_slice(&[0u8; HDR], at).unwrap();
            mem.write_slice(&frame, at.unchecked_add(HDR as u64))
                .unwrap();
            let head = queues[q].add(mem, &[(at, (HDR + frame.len()) as u32, false)]);
            queues[q].publish(mem, head);
            queues[q].kick();
            let mut buf = [0u8; 128];
            let (n, from) = host.recv_from(&mut buf).expect("frame from each pair");
            assert_eq!(&buf[..n], &[pair as u8; 32]);
            assert_eq!(from.port(), 4000 + pair as u16);
        }

        // Receive: 64 flows spread over both receive queues; every datagram arrives once.
        for (k, q) in [0usize, 2].into_iter().enumerate() {
            for i in 0..64u64 {
                let at = GuestAddress(BUFS + (k as u64 * 64 + i) * 0x800);
                let head = queues[q].add(mem, &[(at, 0x800, true)]);
                queues[q].publish(mem, head);
            }
            queues[q].kick();
        }
        let mut senders = Vec::new();
        for i in 0..64u16 {
            let s = host_udp(7000 + i);
            s.send_to(&i.to_be_bytes(), "10.0.0.2:6000").unwrap();
            senders.push(s);
        }
        std::thread::sleep(Duration::from_millis(300));
        let mut seen = Vec::new();
        let mut per_queue = [0u16; 2];
        for (k, q) in [0usize, 2].into_iter().enumerate() {
            let used = queues[q].used_idx(mem);
            per_queue[k] = used;
            for u in 0..used {
                let (head, len) = queues[q].used_elem(mem, u);
                let at: u64 = mem
                    .read_obj(queues[q].desc.unchecked_add(16 * u64::from(head)))
                    .unwrap();
                let mut buf = vec![0u8; len as usize];
                mem.read_slice(&mut buf, GuestAddress(at)).unwrap();
                assert_eq!(buf[10..12], [1, 0], "num_buffers");
                seen.push(u16::from_be_bytes([
                    buf[len as usize - 2],
                    buf[len as usize - 1],
                ]));
            }
        }
        seen.sort();
        assert_eq!(
            seen,
            (0..64).collect::<Vec<_>>(),
            "per queue: {per_queue:?}"
        );
        assert!(
            per_queue.iter().all(|&n| n > 0),
            "flows spread over both pairs: {per_queue:?}"
        );

        // The driver goes down to one pair: the tap steers every flow to pair 0.
        assert_eq!(
            control(&ram, &mut queues[4], &set(1), 4),
            VIRTIO_NET_OK as u8
        );
        let used0 = queues[0].used_idx(mem);
        for u in 0..used0 {
            let (head, _) = queues[0].used_elem(mem, u);
            queues[0].publish(mem, head as u16);
        }
        queues[0].kick();
        let before = [queues[0].used_idx(mem), queues[2].used_idx(mem)];
        for i in 0..32u16 {
            let s = host_udp(8000 + i);
            s.send_to(&i.to_be_bytes(), "10.0.0.2:6000").unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            queues[0].used_idx(mem).wrapping_sub(before[0]),
            32,
            "all on pair 0"
        );
        assert_eq!(
            queues[2].used_idx(mem),
            before[1],
            "nothing on the detached pair"
        );
        drop(frontend);
        drop(net);
    });
}
