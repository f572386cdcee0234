//! The control-frame decoder (crate isola-ipc's `read_message`), which the core's control
//! socket (`ControlRequest`), the supervisor, isola-display and isola-input all use for what
//! a peer sends: every message type, framing and all. A decoded message encodes back to the
//! same frame.
#![no_main]

use std::io::Cursor;

use isola_ipc::display::{DisplayRequest, DisplayResponse};
use isola_ipc::input::{InputRequest, InputResponse};
use isola_ipc::supervisor::{SupervisorRequest, SupervisorResponse};
use isola_ipc::{read_message, write_message, ControlRequest, ControlResponse};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Decodes frames off `data` until one fails; each decoded one must re-encode to a frame
/// that decodes to the same encoding.
fn frames<T: Serialize + DeserializeOwned>(data: &[u8]) {
    let mut r = Cursor::new(data);
    while let Ok(msg) = read_message::<_, T>(&mut r) {
        let mut again = Vec::new();
        write_message(&mut again, &msg).expect("a decoded message encodes");
        let back: T = read_message(&mut Cursor::new(&again)).expect("and decodes again");
        let mut twice = Vec::new();
        write_message(&mut twice, &back).expect("encodes");
        assert_eq!(again, twice);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 8 {
        0 => frames::<ControlRequest>(rest),
        1 => frames::<ControlResponse>(rest),
        2 => frames::<SupervisorRequest>(rest),
        3 => frames::<SupervisorResponse>(rest),
        4 => frames::<DisplayRequest>(rest),
        5 => frames::<DisplayResponse>(rest),
        6 => frames::<InputRequest>(rest),
        _ => frames::<InputResponse>(rest),
    }
});
