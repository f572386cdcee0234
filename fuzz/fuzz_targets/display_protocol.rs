//! isola-display's side of the display protocol (protocol.rs's framing and parser, and the
//! session that applies scanouts, updates and cursor changes to the framebuffer), fed a
//! byte stream as a GPU backend would send it, over a socket, replies drained.
#![no_main]

use isola_display::framebuffer::Display;
use isola_display::session::{run_session, Screen};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let display = Display::new(64, 48);
    let screen = Screen {
        width: 64,
        height: 48,
    };
    isola_fuzz::over_socket(vec![(data.to_vec(), Vec::new())], |stream| {
        let _ = run_session(stream, &display, screen);
    });
    // Whatever the session did, the framebuffer is still readable in full.
    let _ = display.snapshot();
});
