//! Messages to `isola-input`'s control socket, from `isolactl key|pointer` and from
//! `isola-display`'s VNC server.
//!
//! Key codes are Linux evdev codes (`KEY_A` = 30, `BTN_LEFT` = 0x110); pointer positions are
//! absolute, in the tablet's range `0..=INPUT_ABS_MAX` on both axes, so the sender scales from
//! its own screen size and `isola-input` needs no knowledge of the display.

use serde::{Deserialize, Serialize};

/// Largest absolute pointer coordinate (both axes); the tablet's ABS_X/ABS_Y range.
pub const INPUT_ABS_MAX: u32 = 0x7fff;

/// Pointer button bits in [`InputRequest::Pointer`], as in RFB's PointerEvent mask.
pub const BUTTON_LEFT: u8 = 1 << 0;
pub const BUTTON_MIDDLE: u8 = 1 << 1;
pub const BUTTON_RIGHT: u8 = 1 << 2;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InputRequest {
    /// A key press (`pressed`) or release on the keyboard, followed by a SYN report.
    Key { code: u16, pressed: bool },
    /// The tablet's absolute position and button state, followed by a SYN report. Buttons
    /// whose bit changed since the last report produce key events.
    Pointer { x: u32, y: u32, buttons: u8 },
    /// Counters of the device.
    Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InputResponse {
    /// The events were queued for the guest.
    Done,
    Status(InputStatus),
    /// The request was refused; the text says why.
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputStatus {
    /// Events (including SYN reports) handed to the guest so far, per device.
    pub keyboard_events: u64,
    pub tablet_events: u64,
    /// Events waiting for the guest to post event buffers.
    pub pending: u64,
}
