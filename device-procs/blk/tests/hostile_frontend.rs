//! A hostile frontend against the real `isola-blk` process: each malformed vhost-user
//! exchange gets the connection refused with exactly one log line, the process stays up,
//! and a well-behaved frontend connecting afterwards is served, data path included.

mod support;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use std::time::{Duration, Instant};

use isola_device_common::testing::process::gone;
use isola_device_common::testing::requests::every_request_after_negotiation;
use isola_device_common::testing::{self, GuestRam};
use support::{patterned_image, read_once, Backend, Scratch, TIMEOUT};
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

const V1: u32 = 1;

/// One malformed exchange: what it is, and how to send it.
type Case<'a> = (&'static str, Box<dyn Fn(&UnixStream) + 'a>);

fn state(index: u32, num: u32) -> Vec<u8> {
    [index.to_le_bytes(), num.to_le_bytes()].concat()
}

#[test]
fn malformed_messages_are_refused_with_one_line_and_the_process_keeps_serving() {
    let dir = Scratch::new("hostile");
    let image_path = dir.path("disk.img");
    let image = patterned_image(&image_path, 1 << 20);
    let socket = dir.path("blk.sock");
    let backend = Backend::start(
        &socket,
        &image_path,
        dir.path("stderr"),
        &["--num-queues", "2"],
    );
    let small = GuestRam::new(4096);
    let (pipe_r, _pipe_w) = nix::unistd::pipe().unwrap();
    let cases = cases(small.file().as_raw_fd(), pipe_r.as_raw_fd());
    for (n, (what, send)) in cases.iter().enumerate() {
        let stream = UnixStream::connect(&socket).unwrap();
        // An owner first, so that each case meets the check it is about (before SET_OWNER,
        // every one would be refused for that alone).
        testing::raw_message(&stream, 3, V1, &[], &[]);
        send(&stream);
        assert!(
            testing::closed_by_peer(&stream, TIMEOUT),
            "{what}: not closed"
        );
        assert!(
            backend.wait_log("refusing the connection", n + 1),
            "{what}: {}",
            backend.log_text()
        );
    }
    read_once(&socket, &image);
    let log = backend.log_text();
    assert_eq!(
        log.matches("refusing the connection").count(),
        cases.len(),
        "{log}"
    );
    assert_eq!(
        log.matches("WARN").count(),
        cases.len(),
        "one line per refusal: {log}"
    );
    assert!(log.lines().all(|l| l.starts_with("isola-blk[")), "{log}");
}

/// The malformed exchanges; `small` is a 4 KiB sealed memfd, `pipe` the read end of a pipe.
fn cases(small: RawFd, pipe: RawFd) -> Vec<Case<'static>> {
    let mut region = Vec::new();
    region.extend_from_slice(&1u32.to_le_bytes());
    region.extend_from_slice(&0u32.to_le_bytes());
    for v in [0u64, 1 << 20, 0x7000_0000, 0] {
        region.extend_from_slice(&v.to_le_bytes());
    }
    vec![
        (
            "unknown request",
            Box::new(move |s| testing::raw_message(s, 4242, V1, &[], &[])),
        ),
        (
            "bad header version",
            Box::new(move |s| testing::raw_message(s, 1, 3, &[], &[])),
        ),
        (
            "short SET_VRING_NUM",
            Box::new(move |s| testing::raw_message(s, 8, V1, &[1, 2], &[])),
        ),
        (
            "queue index out of range",
            Box::new(move |s| testing::raw_message(s, 8, V1, &state(2, 16), &[])),
        ),
        (
            "queue size too large",
            Box::new(move |s| testing::raw_message(s, 8, V1, &state(0, 1024), &[])),
        ),
        (
            "fd on SET_OWNER",
            Box::new(move |s| testing::raw_message(s, 3, V1, &[], &[small])),
        ),
        (
            "kick without fd",
            Box::new(move |s| testing::raw_message(s, 12, V1, &1u64.to_le_bytes(), &[])),
        ),
        (
            "kick that is a pipe",
            Box::new(move |s| testing::raw_message(s, 12, V1, &0u64.to_le_bytes(), &[pipe])),
        ),
        (
            "region larger than its file",
            Box::new(move |s| testing::raw_message(s, 5, V1, &region, &[small])),
        ),
        (
            "GET_VRING_BASE out of range",
            Box::new(move |s| testing::raw_message(s, 11, V1, &state(9, 0), &[])),
        ),
    ]
}

/// F1: a frontend that hands over guest RAM or an in-flight region in a memfd it can still
/// shrink (it could truncate it under the device's mapping and make every access a SIGBUS)
/// is refused with one line; the process goes on serving.
#[test]
fn unsealed_memory_and_inflight_fds_are_refused_and_the_process_keeps_serving() {
    let dir = Scratch::new("unsealed");
    let image_path = dir.path("disk.img");
    let image = patterned_image(&image_path, 1 << 20);
    let socket = dir.path("blk.sock");
    let backend = Backend::start(&socket, &image_path, dir.path("stderr"), &[]);

    let unsealed = GuestRam::unsealed(2 << 20);
    let mut fe = testing::connect(&socket, 1, TIMEOUT);
    testing::negotiate(&mut fe, 0, isola_device_common::offered_protocol_features());
    assert!(fe.set_mem_table(&[unsealed.region()]).is_err());
    assert!(
        backend.wait_log("not sealed against shrinking", 1),
        "{}",
        backend.log_text()
    );
    drop(fe);

    let ram = GuestRam::new(2 << 20);
    let mut fe = testing::connect_with_memory(&socket, &ram, TIMEOUT);
    let inflight = VhostUserInflight {
        mmap_size: 4096,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: 16,
    };
    let region = GuestRam::unsealed(4096);
    assert!(fe
        .set_inflight_fd(&inflight, region.file().as_raw_fd())
        .is_err());
    assert!(
        backend.wait_log("not sealed against shrinking", 2),
        "{}",
        backend.log_text()
    );
    drop(fe);

    // F8: SET_INFLIGHT_FD for 60,000 queues on a one-queue device, as GET_INFLIGHT_FD does.
    let mut fe = testing::connect_with_memory(&socket, &ram, TIMEOUT);
    let many = VhostUserInflight {
        num_queues: 60_000,
        ..inflight
    };
    let sealed = GuestRam::new(60_000 * 4096);
    assert!(fe
        .set_inflight_fd(&many, sealed.file().as_raw_fd())
        .is_err());
    assert!(
        backend.wait_log("in-flight region for 60000 queues, the device has 1", 1),
        "{}",
        backend.log_text()
    );
    drop(fe);

    read_once(&socket, &image);
    let log = backend.log_text();
    assert_eq!(log.matches("refusing the connection").count(), 3, "{log}");
    assert!(!log.contains("ERROR"), "{log}");
}

/// F8: requests that set up or use the device, on a connection that never sent SET_OWNER,
/// are refused (one line each); the negotiation queries frontends make before SET_OWNER are
/// still answered.
#[test]
fn requests_before_set_owner_are_refused() {
    let dir = Scratch::new("no-owner");
    let image_path = dir.path("disk.img");
    let image = patterned_image(&image_path, 1 << 20);
    let socket = dir.path("blk.sock");
    let backend = Backend::start(&socket, &image_path, dir.path("stderr"), &[]);
    let ram = GuestRam::new(2 << 20);
    let region = ram.region();
    let mut table = Vec::new();
    table.extend_from_slice(&1u32.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    for v in [0, region.memory_size, region.userspace_addr, 0] {
        table.extend_from_slice(&v.to_le_bytes());
    }
    let ram_fd = ram.file().as_raw_fd();
    let cases: Vec<(&str, u32, Vec<u8>, Vec<RawFd>)> = vec![
        ("SET_MEM_TABLE", 5, table, vec![ram_fd]),
        ("SET_VRING_NUM", 8, state(0, 16), vec![]),
        ("SET_FEATURES", 2, 0u64.to_le_bytes().to_vec(), vec![]),
        ("GET_VRING_BASE", 11, state(0, 0), vec![]),
    ];
    for (n, (what, code, payload, fds)) in cases.iter().enumerate() {
        let stream = UnixStream::connect(&socket).unwrap();
        testing::raw_message(&stream, *code, V1, payload, fds);
        assert!(
            testing::closed_by_peer(&stream, TIMEOUT),
            "{what}: not closed"
        );
        assert!(
            backend.wait_log(&format!("{what} before SET_OWNER"), 1),
            "{what}: {}",
            backend.log_text()
        );
        assert!(backend.wait_log("refusing the connection", n + 1));
    }
    // Queries before SET_OWNER, as QEMU makes them, are answered.
    let fe = testing::connect(&socket, 1, TIMEOUT);
    assert!(fe.get_features().is_ok());
    drop(fe);
    read_once(&socket, &image);
}

/// F8: a frontend that connects and says nothing is dropped after the handshake deadline
/// (`--handshake-timeout-ms`, 10 s by default), and the next frontend is served meanwhile
/// it waits no longer than that.
#[test]
fn a_silent_frontend_is_dropped_after_the_handshake_deadline() {
    let dir = Scratch::new("silent");
    let image_path = dir.path("disk.img");
    let image = patterned_image(&image_path, 1 << 20);
    let socket = dir.path("blk.sock");
    let backend = Backend::start(
        &socket,
        &image_path,
        dir.path("stderr"),
        &["--handshake-timeout-ms", "500"],
    );
    let started = Instant::now();
    let silent = UnixStream::connect(&socket).unwrap();
    assert!(
        testing::closed_by_peer(&silent, TIMEOUT),
        "the silent frontend was not dropped"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(450),
        "dropped too early: {waited:?}"
    );
    assert!(
        backend.wait_log("no SET_OWNER within 500 ms of connecting", 1),
        "{}",
        backend.log_text()
    );
    // The next frontend is served, and one that is slow between messages after SET_OWNER is
    // not dropped (an owned connection may be idle as long as its guest is).
    let (fe, _ram) = read_once(&socket, &image);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(fe.get_features().is_ok(), "an idle owned frontend is kept");
    println!("silent frontend dropped after {waited:?} (deadline 500 ms)");
}

/// F2 and deliverable 4: every request code, with and without fds, after negotiation: each is
/// answered or the connection is closed, the process survives (sandbox and seccomp on) and
/// serves the next frontend.
#[test]
fn every_request_code_after_negotiation_is_answered_or_refused_and_the_process_serves_on() {
    let dir = Scratch::new("every-request");
    let image_path = dir.path("disk.img");
    let image = patterned_image(&image_path, 1 << 20);
    let socket = dir.path("blk.sock");
    let mut backend = Backend::start(&socket, &image_path, dir.path("stderr"), &[]);
    let pid = backend.child.id();
    let alive = || !gone(pid);
    let (answered, closed) = every_request_after_negotiation(&socket, &alive);
    println!("isola-blk: {answered} requests answered, {closed} refused by closing");
    assert!(
        backend.child.try_wait().unwrap().is_none(),
        "{}",
        backend.log_text()
    );
    read_once(&socket, &image);
    assert!(
        !backend.log_text().contains("killed by"),
        "{}",
        backend.log_text()
    );
}

/// F1 as it was found, through the real path: a frontend whose guest RAM can still shrink
/// (allowed here with `--allow-unsealed-memory`, as for libblkio) starts a ring, truncates the
/// file to 0 and kicks. The queue worker's first look at the ring is a SIGBUS; the sandboxed
/// device dies of it at once, named, instead of faulting in a loop for ever.
#[test]
fn a_frontend_that_truncates_unsealed_memory_gets_a_device_that_dies_of_sigbus() {
    use std::os::unix::process::ExitStatusExt;
    use vm_memory::GuestAddress;
    let dir = Scratch::new("truncate");
    let image_path = dir.path("disk.img");
    patterned_image(&image_path, 1 << 20);
    let socket = dir.path("blk.sock");
    let mut backend = Backend::start(
        &socket,
        &image_path,
        dir.path("stderr"),
        &["--allow-unsealed-memory"],
    );
    let ram = GuestRam::unsealed(2 << 20);
    let mut fe = testing::connect_with_memory(&socket, &ram, TIMEOUT);
    let mut q = testing::SplitQueue::new(0, 16, GuestAddress(0));
    testing::start_queue(&mut fe, &q, &ram, 0);
    // A request made available (not kicked) while the memory is still there.
    let head = q.add(
        ram.memory(),
        &[
            (GuestAddress(0x10_0000), 16, false),
            (GuestAddress(0x11_0000), 512, true),
            (GuestAddress(0x12_0000), 1, true),
        ],
    );
    q.publish(ram.memory(), head);
    ram.file().set_len(0).unwrap();
    let truncated = Instant::now();
    q.kick();
    let status = loop {
        if let Some(status) = backend.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            truncated.elapsed() < TIMEOUT,
            "the device did not die: {}",
            backend.log_text()
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let took = truncated.elapsed();
    let log = backend.log_text();
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}\n{log}");
    assert!(log.contains("killed by SIGBUS (fault in thread "), "{log}");
    println!("dead of SIGBUS {took:?} after the truncation and kick");
}

/// A frontend that sends a message's header and never its body is dropped once the message
/// deadline (2 s) passes, even after SET_OWNER; the next frontend is served.
#[test]
fn a_frontend_that_stops_in_the_middle_of_a_message_is_dropped() {
    let dir = Scratch::new("half-message");
    let image_path = dir.path("disk.img");
    let image = patterned_image(&image_path, 1 << 20);
    let socket = dir.path("blk.sock");
    let backend = Backend::start(&socket, &image_path, dir.path("stderr"), &[]);
    let stream = UnixStream::connect(&socket).unwrap();
    testing::raw_message(&stream, 3, V1, &[], &[]);
    // SET_FEATURES announcing an 8-byte body that never comes.
    let mut header = Vec::new();
    for v in [2u32, V1, 8] {
        header.extend_from_slice(&v.to_le_bytes());
    }
    std::io::Write::write_all(&mut &stream, &header).unwrap();
    let started = Instant::now();
    assert!(testing::closed_by_peer(&stream, TIMEOUT), "not dropped");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "dropped too early: {waited:?}"
    );
    assert!(
        backend.wait_log("refusing the connection", 1),
        "{}",
        backend.log_text()
    );
    read_once(&socket, &image);
    println!("a half-sent message was dropped after {waited:?}");
}
