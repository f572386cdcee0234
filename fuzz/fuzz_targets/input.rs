//! isola-input's guest-fed parsers: configuration-space writes (select, subsel) and the
//! bytes read back for each selection, the status queue (LED events from the driver) and
//! the event queue, over chains the fuzzer builds.
#![no_main]

use std::sync::Arc;

use isola_device_common::VirtioDevice;
use isola_fuzz::{Reader, Rig};
use isola_input::backend::InputDevice;
use isola_input::config::{Kind, CONFIG_LEN};
use isola_input::device::{EventQueue, Events, InputEvent, StatusQueue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let kind = if r.u8() & 1 == 0 {
        Kind::Keyboard
    } else {
        Kind::Tablet
    };
    let events = Arc::new(Events::new(kind, 64).expect("eventfd"));
    let device = InputDevice::new(Arc::clone(&events));
    for _ in 0..usize::from(r.u8() % 16) {
        let offset = u32::from(r.u8());
        let len = usize::from(r.u8() % 9);
        let _ = device.write_config(offset, r.bytes(len));
        let config = device.config();
        assert_eq!(config.len(), CONFIG_LEN);
        // `size` (byte 2) never claims more than the 128-byte union.
        assert!(
            config[2] <= 128,
            "size {} for {:?}",
            config[2],
            &config[..2]
        );
    }
    // Host-side events (from the display or isolactl) waiting for the guest.
    let report: Vec<InputEvent> = (0..usize::from(r.u8() % 4))
        .map(|_| InputEvent::new(r.u16(), r.u16(), r.u32()))
        .collect();
    let _ = events.push(&report);
    let mut rig = Rig::new(&mut r, 2);
    let _ = rig.run(0, &mut EventQueue::new(Arc::clone(&events)));
    let _ = rig.run(1, &mut StatusQueue::new(Arc::clone(&events)));
    rig.check();
});
