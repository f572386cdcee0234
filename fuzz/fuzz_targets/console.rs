//! isola-console's guest-fed parsers: control messages on the control transmit queue (the
//! multiport handshake: DEVICE_READY, PORT_READY, PORT_OPEN, and whatever else a driver
//! sends), the answers the device queues for the control receive queue, and the port data
//! queues, over chains the fuzzer builds.
#![no_main]

use std::sync::Arc;

use isola_console::control::{Control, Header, HEADER};
use isola_console::device::{ControlRx, ControlTx, RxQueue, TxQueue};
use isola_console::port::{Port, PortSpec};
use isola_fuzz::{Reader, Rig};
use libfuzzer_sys::fuzz_target;
use nix::sys::eventfd::{EfdFlags, EventFd};

fn eventfd() -> EventFd {
    EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .expect("eventfd")
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let wake = Arc::new(eventfd());
    let ports: Vec<Arc<Port>> = (0..2u32)
        .map(|id| {
            let spec = PortSpec {
                name: (id == 1).then(|| "org.fuzz.port".to_owned()),
                socket: None,
                pty: None,
                log: None,
            };
            Arc::new(Port::open(id, &spec, Arc::clone(&wake)).expect("port without endpoint"))
        })
        .collect();
    let control = Arc::new(Control::new(ports.clone(), eventfd()));
    // Headers decoded straight from the input first (the wire format without a chain).
    for _ in 0..usize::from(r.u8() % 8) {
        let mut raw = [0u8; HEADER];
        let got = r.bytes(HEADER);
        raw[..got.len()].copy_from_slice(got);
        let h = Header::decode(&raw);
        let _ = control.handle(h);
    }
    let mut rig = Rig::new(&mut r, 4);
    let mut ctx = ControlTx::new(Arc::clone(&control));
    let mut crx = ControlRx::new(Arc::clone(&control));
    let mut tx = TxQueue::new(Arc::clone(&ports[0]), Some(Arc::clone(&control)));
    let mut rx = RxQueue::new(Arc::clone(&ports[1]), Some(Arc::clone(&control)));
    let _ = rig.run(0, &mut ctx);
    let _ = rig.run(1, &mut crx);
    let _ = rig.run(2, &mut tx);
    let _ = rig.run(3, &mut rx);
    rig.check();
    // Every queued answer is a header plus its data.
    while let Some(msg) = control.take() {
        assert!(msg.len() >= HEADER);
    }
});
