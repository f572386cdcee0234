//! A device reset while the receive queue waits for input (the guest's poweroff path): the
//! frontend stops every queue (SET_VRING_ENABLE 0, GET_VRING_BASE) and resets the device, as
//! isola-core does, and each answer comes within a deadline. Found with a Linux guest: with a
//! virtio-console attached, poweroff hung, the core's vCPU waiting for the console backend.

mod support;

use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use isola_device_common::testing::{GuestRam, Scratch};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress};

use support::{single_port, RAM, WAIT};

/// Runs `f` on the frontend on another thread; panics if it takes longer than `WAIT`.
fn within<T: Send + 'static>(
    what: &str,
    fe: Frontend,
    f: impl FnOnce(&mut Frontend) -> T + Send + 'static,
) -> (Frontend, T) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut fe = fe;
        let out = f(&mut fe);
        let _ = tx.send((fe, out));
    });
    rx.recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("{what}: no answer within {WAIT:?}"))
}

/// Which endpoint the port has besides its log.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    /// A socket nobody attaches to.
    Socket,
    /// A socket with a user attached.
    User,
    /// None: a log-only port (the guest's input has nowhere to come from).
    LogOnly,
}

fn reset_while_rx_waits(endpoint: Endpoint) {
    let name = match endpoint {
        Endpoint::Socket => "reset-socket",
        Endpoint::User => "reset-user",
        Endpoint::LogOnly => "reset-log",
    };
    let d = Scratch::new(name);
    let vu = d.join("vu.sock");
    let port = d.join("p0.sock");
    let log = d.join("p0.log");
    let port_arg = match endpoint {
        Endpoint::LogOnly => format!("log={}", log.display()),
        _ => format!("socket={},log={}", port.display(), log.display()),
    };
    let ram = GuestRam::new(RAM);
    let mem = ram.memory();
    let (_proc, mut fe, mut q) = single_port(&vu, &port_arg, &ram);
    let _user = (endpoint == Endpoint::User).then(|| {
        let user = UnixStream::connect(&port).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        user
    });
    // Receive buffers the device holds, waiting for input that never comes.
    for i in 0..4 {
        let head = q[0].add(mem, &[(GuestAddress(0x10_000 + 0x1000 * i), 256, true)]);
        q[0].publish(mem, head);
    }
    q[0].kick();
    // A line of output, as the guest's hvc0 writes it.
    mem.write_slice(b"hello\n", GuestAddress(0x20_000)).unwrap();
    let head = q[1].add(mem, &[(GuestAddress(0x20_000), 6, false)]);
    q[1].publish(mem, head);
    q[1].kick();
    assert!(q[1].wait_used(mem, 1, WAIT), "the line was taken");
    std::thread::sleep(Duration::from_millis(100));
    // The core's reset: every queue disabled and stopped, then RESET_DEVICE.
    for index in 0..2usize {
        let (back, r) = within("SET_VRING_ENABLE 0", fe, move |fe| {
            fe.set_vring_enable(index, false)
        });
        r.unwrap();
        let (back, r) = within("GET_VRING_BASE", back, move |fe| fe.get_vring_base(index));
        let base = r.unwrap();
        if index == 1 {
            assert_eq!(base, 1, "transmit queue base");
        }
        fe = back;
    }
    let (back, r) = within("RESET_DEVICE", fe, |fe| fe.reset_device());
    r.unwrap();
    // And the device can be set up again on the same connection.
    let (_fe, r) = within("GET_FEATURES after reset", back, |fe| fe.get_features());
    r.unwrap();
    assert_eq!(std::fs::read(&log).unwrap(), b"hello\n");
}

#[test]
fn a_reset_while_the_receive_queue_waits_is_answered() {
    reset_while_rx_waits(Endpoint::Socket);
}

#[test]
fn a_reset_while_the_receive_queue_waits_with_a_user_attached_is_answered() {
    reset_while_rx_waits(Endpoint::User);
}

#[test]
fn a_reset_of_a_log_only_port_with_receive_buffers_posted_is_answered() {
    reset_while_rx_waits(Endpoint::LogOnly);
}
