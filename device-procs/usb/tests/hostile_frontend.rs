//! A hostile frontend against the real, sandboxed isola-usb: malformed vfio-user messages,
//! bad DMA maps, region accesses out of range, fds missing or extra. Each gets an error
//! reply or a closed connection, the process lives, and the next frontend (the `vfio_user`
//! crate's client) is served.

mod support;

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use isola_device_common::testing::{GuestRam, Scratch};
use isola_usb::gate::{cmd, Header, HEADER};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use support::start;

/// How a message ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Ok,
    Error(u32),
    Closed,
}

fn message(command: u16, id: u16, body: &[u8], flags: u32) -> Vec<u8> {
    let h = Header {
        id,
        command,
        size: (HEADER + body.len()) as u32,
        flags,
        error: 0,
    };
    let mut m = h.bytes().to_vec();
    m.extend_from_slice(body);
    m
}

fn send(s: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
    let iov = [std::io::IoSlice::new(bytes)];
    let cmsgs = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsgs };
    let _ = sendmsg::<()>(s.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None);
}

fn answer(s: &mut UnixStream) -> Answer {
    let mut h = [0u8; HEADER];
    if s.read_exact(&mut h).is_err() {
        return Answer::Closed;
    }
    let h = Header::parse(&h);
    let mut rest = vec![0u8; (h.size as usize).saturating_sub(HEADER)];
    if s.read_exact(&mut rest).is_err() {
        return Answer::Closed;
    }
    if h.flags & (1 << 5) != 0 {
        Answer::Error(h.error)
    } else {
        Answer::Ok
    }
}

fn version_body(json: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 1, 0];
    b.extend_from_slice(json);
    b
}

fn connect(socket: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn negotiated(socket: &std::path::Path) -> UnixStream {
    let mut s = connect(socket);
    send(
        &s,
        &message(
            cmd::VERSION,
            1,
            &version_body(b"{\"capabilities\":{}}\0"),
            0,
        ),
        &[],
    );
    assert_eq!(answer(&mut s), Answer::Ok);
    s
}

fn region_access(command: u16, region: u32, offset: u64, count: u32, data: &[u8]) -> Vec<u8> {
    let mut b = offset.to_le_bytes().to_vec();
    b.extend_from_slice(&region.to_le_bytes());
    b.extend_from_slice(&count.to_le_bytes());
    b.extend_from_slice(data);
    message(command, 7, &b, 0)
}

fn dma_map(address: u64, size: u64, offset: u64) -> Vec<u8> {
    let mut b = 32u32.to_le_bytes().to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&address.to_le_bytes());
    b.extend_from_slice(&size.to_le_bytes());
    message(cmd::DMA_MAP, 3, &b, 0)
}

#[test]
fn malformed_messages_get_errors_or_a_closed_connection_and_the_next_frontend_is_served() {
    let dir = Scratch::new("usb-hostile");
    let mut usb = start(&dir, &[]);
    let einval = Answer::Error(libc::EINVAL as u32);

    // Before VERSION nothing else is answered but with an error.
    let mut s = connect(&usb.socket);
    send(&s, &message(cmd::DEVICE_GET_INFO, 1, &[0; 16], 0), &[]);
    assert_eq!(answer(&mut s), einval);
    // VERSION that is too short, not NUL-terminated, not JSON, or with an interior NUL.
    for body in [
        vec![],
        version_body(b"{}"),
        version_body(b"nope\0"),
        version_body(b"{}\0{}\0"),
    ] {
        send(&s, &message(cmd::VERSION, 2, &body, 0), &[]);
        assert_eq!(answer(&mut s), einval, "{body:?}");
    }
    // A JSON object the crate cannot take (no "capabilities"): its error, passed on.
    send(
        &s,
        &message(cmd::VERSION, 2, &version_body(b"{\"x\":1}\0"), 0),
        &[],
    );
    assert_eq!(answer(&mut s), einval);
    // One frontend at a time: the next is served once this one has gone.
    drop(s);

    let mut s = negotiated(&usb.socket);
    let ram = GuestRam::new(1 << 20);
    let unsealed = GuestRam::unsealed(1 << 20);
    let pipe = nix::unistd::pipe().unwrap();
    let cases: Vec<(Vec<u8>, Vec<RawFd>, Answer)> = vec![
        // Region accesses out of range, too large, empty, or to regions that are empty.
        (
            region_access(cmd::REGION_READ, 0, 0xfffc, 8, &[]),
            vec![],
            einval.clone(),
        ),
        (
            region_access(cmd::REGION_READ, 0, u64::MAX - 3, 4, &[]),
            vec![],
            einval.clone(),
        ),
        (
            region_access(cmd::REGION_READ, 0, 0, 0x1000_0000, &[]),
            vec![],
            einval.clone(),
        ),
        (
            region_access(cmd::REGION_READ, 0, 0, 0, &[]),
            vec![],
            einval.clone(),
        ),
        (
            region_access(cmd::REGION_READ, 3, 0, 4, &[]),
            vec![],
            einval.clone(),
        ),
        (
            region_access(cmd::REGION_READ, 99, 0, 4, &[]),
            vec![],
            einval.clone(),
        ),
        (
            region_access(cmd::REGION_READ, 0, 0, 3, &[]),
            vec![],
            einval.clone(),
        ),
        (
            region_access(cmd::REGION_WRITE, 7, 250, 8, &[0; 8]),
            vec![],
            einval.clone(),
        ),
        // A write whose payload is shorter than its count.
        (
            region_access(cmd::REGION_WRITE, 0, 0, 8, &[0; 4]),
            vec![],
            einval.clone(),
        ),
        // DMA maps: no fd, two fds, a pipe, unaligned, larger than the file, unsealed memory.
        (dma_map(0, 1 << 20, 0), vec![], einval.clone()),
        (
            dma_map(0, 1 << 20, 0),
            vec![ram.file().as_raw_fd(), ram.file().as_raw_fd()],
            einval.clone(),
        ),
        (
            dma_map(0, 1 << 20, 0),
            vec![pipe.0.as_raw_fd()],
            einval.clone(),
        ),
        (
            dma_map(0x1001, 1 << 20, 0),
            vec![ram.file().as_raw_fd()],
            einval.clone(),
        ),
        (
            dma_map(0, 2 << 20, 0),
            vec![ram.file().as_raw_fd()],
            einval.clone(),
        ),
        (
            dma_map(0, 1 << 20, 0),
            vec![unsealed.file().as_raw_fd()],
            einval.clone(),
        ),
        (
            message(cmd::DMA_UNMAP, 4, &[0; 24], 0),
            vec![],
            einval.clone(),
        ),
        // Fds where none belong; SET_IRQS with a non-eventfd, or with fewer fds than count.
        (
            message(cmd::DEVICE_GET_INFO, 5, &[0; 16], 0),
            vec![pipe.1.as_raw_fd()],
            einval.clone(),
        ),
        (set_irqs(2, 1), vec![pipe.1.as_raw_fd()], einval.clone()),
        (set_irqs(2, 1), vec![], einval.clone()),
        (set_irqs(0, 1), vec![], einval.clone()),
        // Commands the device does not implement, and numbers that are no command.
        (
            message(6, 6, &[0; 16], 0),
            vec![],
            Answer::Error(libc::ENOTSUP as u32),
        ),
        (
            message(11, 6, &[0; 24], 0),
            vec![],
            Answer::Error(libc::ENOTSUP as u32),
        ),
        (
            message(999, 6, &[], 0),
            vec![],
            Answer::Error(libc::ENOTSUP as u32),
        ),
        // After all that, a good DMA map and a good register read.
        (
            dma_map(0, 1 << 20, 0),
            vec![ram.file().as_raw_fd()],
            Answer::Ok,
        ),
        (
            region_access(cmd::REGION_READ, 0, 0, 4, &[]),
            vec![],
            Answer::Ok,
        ),
    ];
    for (i, (bytes, fds, want)) in cases.iter().enumerate() {
        send(&s, bytes, fds);
        assert_eq!(&answer(&mut s), want, "case {i}");
    }

    drop(s);
    // Messages the gate cannot frame close the connection.
    let unframeable: Vec<(Vec<u8>, &str)> = vec![
        (
            message(cmd::DEVICE_GET_INFO, 1, &[0; 16], 0)[..10].to_vec(),
            "a header cut short, then silence",
        ),
        (
            message(cmd::DEVICE_GET_INFO, 1, &[0; 4], 0)[..HEADER].to_vec(),
            "a body that never comes",
        ),
        (
            {
                let mut m = message(cmd::DEVICE_GET_INFO, 1, &[], 0);
                m[4..8].copy_from_slice(&8u32.to_le_bytes());
                m
            },
            "a size below the header",
        ),
        (
            {
                let mut m = message(cmd::REGION_WRITE, 1, &[], 0);
                m[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
                m
            },
            "a size of 4 GiB",
        ),
        (
            message(cmd::DEVICE_GET_INFO, 1, &[0; 16], 1),
            "a reply sent as a command",
        ),
    ];
    for (bytes, what) in unframeable {
        let mut s = negotiated(&usb.socket);
        send(&s, &bytes, &[]);
        assert_eq!(answer(&mut s), Answer::Closed, "{what}");
    }
    // Fds on the body of a message, not its start.
    let mut s2 = negotiated(&usb.socket);
    let m = region_access(cmd::REGION_READ, 0, 0, 4, &[]);
    send(&s2, &m[..HEADER], &[]);
    send(&s2, &m[HEADER..], &[pipe.1.as_raw_fd()]);
    assert_eq!(answer(&mut s2), Answer::Closed);
    drop(s2);

    // The process is alive and serves the crate's client.
    assert!(
        usb.child.try_wait().unwrap().is_none(),
        "isola-usb still runs"
    );
    let mut client = vfio_user::Client::new(&usb.socket).expect("the next frontend is served");
    let mut b = [0u8; 4];
    client.region_read(0, 0, &mut b).unwrap();
    assert_eq!(b[0], 0x40, "CAPLENGTH");
}

fn dma_unmap(flags: u32, address: u64, size: u64) -> Vec<u8> {
    let mut b = 24u32.to_le_bytes().to_vec();
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&address.to_le_bytes());
    b.extend_from_slice(&size.to_le_bytes());
    message(cmd::DMA_UNMAP, 9, &b, 0)
}

/// DMA_UNMAP's "unmap all" is bit 1 of its flags in the vfio-user specification and in
/// Linux's vfio.h (VFIO_DMA_UNMAP_FLAG_ALL), which libvfio-user's client sends; the vfio_user
/// crate numbers it bit 2. Found by libvfio-user's sample client: isola-usb answered "no DMA
/// region at 0x0 size 0x0".
#[test]
fn unmap_all_as_the_specification_numbers_it_clears_every_map() {
    let dir = Scratch::new("usb-unmap-all");
    let mut usb = start(&dir, &[]);
    let einval = Answer::Error(libc::EINVAL as u32);
    let mut s = negotiated(&usb.socket);
    let ram = GuestRam::new(1 << 20);
    for (address, offset) in [(0, 0), (1 << 20, 1 << 19)] {
        send(
            &s,
            &dma_map(address, 1 << 19, offset),
            &[ram.file().as_raw_fd()],
        );
        assert_eq!(answer(&mut s), Answer::Ok, "map at {address:#x}");
    }
    // The crate's bit 2 is no flag of the specification's: refused, nothing unmapped.
    send(&s, &dma_unmap(1 << 2, 0, 0), &[]);
    assert_eq!(answer(&mut s), einval);
    send(&s, &dma_unmap(0, 0, 1 << 19), &[]);
    assert_eq!(answer(&mut s), Answer::Ok, "the first map was still there");
    // Unmap all (bit 1): the second map goes too.
    send(&s, &dma_unmap(1 << 1, 0, 0), &[]);
    assert_eq!(answer(&mut s), Answer::Ok, "unmap all");
    send(&s, &dma_unmap(0, 1 << 20, 1 << 19), &[]);
    assert_eq!(
        answer(&mut s),
        einval,
        "the second map was unmapped by unmap all"
    );
    assert!(
        usb.child.try_wait().unwrap().is_none(),
        "isola-usb still runs"
    );
}

fn set_irqs(index: u32, count: u32) -> Vec<u8> {
    let flags = vfio_bindings::bindings::vfio::VFIO_IRQ_SET_DATA_EVENTFD
        | vfio_bindings::bindings::vfio::VFIO_IRQ_SET_ACTION_TRIGGER;
    let mut b = 20u32.to_le_bytes().to_vec();
    for v in [flags, index, 0, count] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    message(cmd::SET_IRQS, 8, &b, 0)
}
