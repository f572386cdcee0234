//! A hostile driver against the real `isola-console` binary, played from the host over a real
//! vhost-user socket: unknown control events, bad port ids, short and misdirected control
//! messages, descriptors outside guest memory, oversized and out-of-range chains, buffers of
//! the wrong direction. Each is returned unused (or ignored); the process stays up, nothing
//! outside guest memory is touched (it is not mapped here), and valid traffic still flows
//! both ways afterwards.

mod support;

use isola_device_common::testing::Scratch;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use isola_device_common::testing::{connect, negotiate, start_queue, GuestRam, SplitQueue};
use vhost::VhostBackend;
use vm_memory::{Address, Bytes, GuestAddress};

use support::{single_port, Proc, RAM, VERSION_1, WAIT};

const MULTIPORT: u64 = 1 << 1;

fn control(id: u32, event: u16, value: u16) -> Vec<u8> {
    let mut m = id.to_le_bytes().to_vec();
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m
}

#[test]
fn hostile_driver_gets_errors_and_the_device_keeps_serving() {
    let d = Scratch::new("driver");
    let vu = d.join("vu.sock");
    let p0 = d.join("p0.sock");
    let log = d.join("p1.log");
    let child = Command::new(env!("CARGO_BIN_EXE_isola-console"))
        .arg("--socket")
        .arg(&vu)
        .arg("--port")
        .arg(format!("socket={}", p0.display()))
        .arg("--port")
        .arg(format!("name=org.isola.log,log={}", log.display()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut proc = Proc(child);
    let ram = GuestRam::new(RAM);
    let mem = ram.memory();
    let mut fe = connect(&vu, 6, WAIT);
    let acked = negotiate(
        &mut fe,
        VERSION_1 | MULTIPORT,
        isola_device_common::offered_protocol_features(),
    );
    assert_ne!(acked & MULTIPORT, 0, "MULTIPORT offered with two ports");
    fe.set_mem_table(&[ram.region()]).unwrap();
    let mut q: Vec<SplitQueue> = (0..4)
        .map(|i| SplitQueue::new(i, 16, GuestAddress(0x1000 * (1 + 2 * u64::from(i)))))
        .collect();
    for queue in &q {
        start_queue(&mut fe, queue, &ram, 0);
    }
    let data = |i: u64| GuestAddress(0x10_000 + 0x1000 * i);
    let outside = GuestAddress(RAM + 0x1000);

    // Control receive buffers: a 4-byte one first (too small for any message), then good ones.
    let tiny = q[2].add(mem, &[(data(0), 4, true)]);
    q[2].publish(mem, tiny);
    for i in 1..5 {
        let head = q[2].add(mem, &[(data(i), 64, true)]);
        q[2].publish(mem, head);
    }
    q[2].kick();

    // Hostile control messages, each returned unused.
    let mut sent = 0u16;
    let mut send = |q: &mut SplitQueue, bufs: &[(GuestAddress, u32, bool)]| {
        let head = q.add(mem, bufs);
        q.publish(mem, head);
        q.kick();
        sent += 1;
        sent
    };
    mem.write_slice(&control(0, 99, 1), data(10)).unwrap(); // unknown event
    send(&mut q[3], &[(data(10), 8, false)]);
    mem.write_slice(&control(7, 3, 1), data(11)).unwrap(); // PORT_READY, no such port
    send(&mut q[3], &[(data(11), 8, false)]);
    mem.write_slice(&control(0xffff_ffff, 6, 1), data(12))
        .unwrap(); // PORT_OPEN, bad id
    send(&mut q[3], &[(data(12), 8, false)]);
    send(&mut q[3], &[(data(12), 4, false)]); // shorter than a header
    send(&mut q[3], &[(outside, 8, false)]); // outside guest memory
    send(&mut q[3], &[(data(12), 8, true)]); // device-writable
    send(&mut q[3], &[(GuestAddress(0), 0xffff_0000, false)]); // oversized
    let n = send(&mut q[3], &[(GuestAddress(u64::MAX - 4), 8, false)]); // wraps around
    assert!(
        q[3].wait_used(mem, n, WAIT),
        "hostile control messages returned"
    );
    // Nothing was sent to the driver for any of them.
    assert_eq!(q[2].used_idx(mem), 0);

    // A valid DEVICE_READY: DEVICE_ADD for both ports; the first lands in the tiny buffer,
    // which cannot hold it (returned empty, message dropped), the second in a good one.
    mem.write_slice(&control(0, 0, 1), data(13)).unwrap();
    let n = send(&mut q[3], &[(data(13), 8, false)]);
    assert!(q[3].wait_used(mem, n, WAIT));
    assert!(q[2].wait_used(mem, 2, WAIT), "DEVICE_ADD messages");
    assert_eq!(q[2].used_elem(mem, 0), (u32::from(tiny), 0));
    let (_, len) = q[2].used_elem(mem, 1);
    assert_eq!(len, 8);
    let mut msg = [0u8; 8];
    mem.read_slice(&mut msg, data(1)).unwrap();
    assert_eq!(msg.to_vec(), control(1, 1, 0), "DEVICE_ADD for port 1");

    // Port 0: a user attaches; hostile transmit chains, then a good one.
    let mut user = UnixStream::connect(&p0).unwrap();
    user.set_read_timeout(Some(WAIT)).unwrap();
    // Output with nobody attached is discarded: let the I/O thread take the user first.
    std::thread::sleep(Duration::from_millis(300));
    let mut tx_sent = 0u16;
    let mut tx = |q: &mut SplitQueue, bufs: &[(GuestAddress, u32, bool)]| {
        let head = q.add(mem, bufs);
        q.publish(mem, head);
        q.kick();
        tx_sent += 1;
        tx_sent
    };
    tx(&mut q[1], &[(outside, 16, false)]);
    tx(&mut q[1], &[(data(20), 16, false), (outside, 16, false)]); // half outside
    tx(&mut q[1], &[(data(20), 16, true)]); // device-writable
    tx(&mut q[1], &[(GuestAddress(0), u32::MAX, false)]); // 4 GiB
                                                          // A head outside the queue, straight into the available ring.
    q[1].put(mem, 5, data(20).0, 4, 0, 0);
    mem.write_obj(200u16, q[1].avail.unchecked_add(4 + 2 * 4))
        .unwrap();
    mem.store(
        5u16,
        q[1].avail.unchecked_add(2),
        std::sync::atomic::Ordering::Release,
    )
    .unwrap();
    q[1].kick();
    mem.write_slice(b"still here", data(21)).unwrap();
    // Descriptor 5 was used by the hand-written entry; continue after it.
    q[1].put(mem, 6, data(21).0, 10, 0, 0);
    mem.write_obj(6u16, q[1].avail.unchecked_add(4 + 2 * 5))
        .unwrap();
    mem.store(
        6u16,
        q[1].avail.unchecked_add(2),
        std::sync::atomic::Ordering::Release,
    )
    .unwrap();
    q[1].kick();
    let mut got = [0u8; 10];
    user.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"still here", "valid output after the hostile chains");
    // Head 200 cannot be returned; the other five are.
    assert!(q[1].wait_used(mem, 5, WAIT));

    // Receive: a device-readable buffer is returned unused; a good one gets the input.
    let bad = q[0].add(mem, &[(data(30), 64, false)]);
    q[0].publish(mem, bad);
    let good = q[0].add(mem, &[(data(31), 64, true)]);
    q[0].publish(mem, good);
    q[0].kick();
    user.write_all(b"input").unwrap();
    assert!(q[0].wait_used(mem, 2, WAIT));
    assert_eq!(q[0].used_elem(mem, 0), (u32::from(bad), 0));
    assert_eq!(q[0].used_elem(mem, 1), (u32::from(good), 5));
    let mut back = [0u8; 5];
    mem.read_slice(&mut back, data(31)).unwrap();
    assert_eq!(&back, b"input");

    let deadline = Instant::now() + Duration::from_millis(200);
    while Instant::now() < deadline {
        assert!(proc.0.try_wait().unwrap().is_none(), "isola-console died");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(fe);
}

/// CPU time (user + system, in clock ticks) of process `pid`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which ends with ')'): utime and stime are 12 and 13.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn input_waits_in_the_kernel_until_the_guest_posts_a_buffer_without_spinning() {
    let d = Scratch::new("wait");
    let vu = d.join("vu.sock");
    let p0 = d.join("p0.sock");
    let ram = GuestRam::new(RAM);
    let mem = ram.memory();
    let (proc, fe, mut q) = single_port(&vu, &format!("socket={}", p0.display()), &ram);
    // A user types and hangs up while the guest has no receive buffer posted.
    let mut user = UnixStream::connect(&p0).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    user.write_all(b"typed early").unwrap();
    drop(user);
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks(proc.0.id());
    std::thread::sleep(Duration::from_millis(1000));
    let spent = cpu_ticks(proc.0.id()) - before;
    assert!(
        spent <= 10,
        "isola-console used {spent} ticks in 1 s while idle"
    );
    // The guest posts a buffer: the input was kept, in the kernel, and arrives whole.
    let head = q[0].add(mem, &[(GuestAddress(0x20_000), 64, true)]);
    q[0].publish(mem, head);
    q[0].kick();
    assert!(q[0].wait_used(mem, 1, WAIT));
    assert_eq!(q[0].used_elem(mem, 0), (u32::from(head), 11));
    let mut got = [0u8; 11];
    mem.read_slice(&mut got, GuestAddress(0x20_000)).unwrap();
    assert_eq!(&got, b"typed early");
    drop(fe);
}
