//! A hostile frontend against the real `isola-blk` process: each malformed vhost-user
//! exchange gets the connection refused with exactly one log line, the process stays up,
//! and a well-behaved frontend connecting afterwards is served, data path included.

mod support;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use isola_device_common::testing;
use support::{patterned_image, read_once, Backend, Scratch, TIMEOUT};

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
    let small = std::fs::File::create(dir.path("small")).unwrap();
    small.set_len(4096).unwrap();
    let (pipe_r, _pipe_w) = nix::unistd::pipe().unwrap();
    let cases = cases(small.as_raw_fd(), pipe_r.as_raw_fd());
    for (n, (what, send)) in cases.iter().enumerate() {
        let stream = UnixStream::connect(&socket).unwrap();
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

/// The malformed exchanges; `small` is a 4 KiB file, `pipe` the read end of a pipe.
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
