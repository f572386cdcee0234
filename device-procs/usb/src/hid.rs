//! USB HID: a boot-protocol keyboard and an absolute tablet. Reports are made on the
//! control thread (from `InputRequest`s, see `control`) into a bounded queue per device and
//! taken by the guest's interrupt IN transfers; an interrupt transfer with nothing queued
//! waits (NAK) until the next report.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::trb::Setup;
use crate::usb::{
    config_descriptor, device_descriptor, endpoint_descriptor, standard, Descriptors, Speed, Stall,
    StandardState, UsbDevice, Xfer, DT_INTERFACE,
};

/// HID usage (keyboard page, 0..=0xe7) -> Linux evdev key code, from Linux's
/// `drivers/hid/usbhid/usbkbd.c` (`usb_kbd_keycode`). Inverted by [`usage_of`].
const USAGE_TO_EVDEV: [u8; 0xe8] = [
    0, 0, 0, 0, 30, 48, 46, 32, 18, 33, 34, 35, 23, 36, 37, 38, 50, 49, 24, 25, 16, 19, 31, 20, 22,
    47, 17, 45, 21, 44, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 28, 1, 14, 15, 57, 12, 13, 26, 27, 43, 43,
    39, 40, 41, 51, 52, 53, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 87, 88, 99, 70, 119, 110,
    102, 104, 111, 107, 109, 106, 105, 108, 103, 69, 98, 55, 74, 78, 96, 79, 80, 81, 75, 76, 77,
    71, 72, 73, 82, 83, 86, 127, 116, 117, 183, 184, 185, 186, 187, 188, 189, 190, 191, 192, 193,
    194, 134, 138, 130, 132, 128, 129, 131, 137, 133, 135, 136, 113, 115, 114, 0, 0, 0, 121, 0, 89,
    93, 124, 92, 94, 95, 0, 0, 0, 122, 123, 90, 91, 85, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 29, 42,
    56, 125, 97, 54, 100, 126,
];

/// The HID usage of an evdev key code: the first usage that maps to it.
pub fn usage_of(code: u16) -> Option<u8> {
    if code == 0 {
        return None;
    }
    (4u8..0xe8).find(|&u| u16::from(USAGE_TO_EVDEV[usize::from(u)]) == code)
}

/// The boot keyboard of HID 1.11 appendix B.1, with key usages up to 0xff.
const KEYBOARD_REPORT: &[u8] = &[
    0x05, 0x01, 0x09, 0x06, 0xa1, 0x01, 0x05, 0x07, 0x19, 0xe0, 0x29, 0xe7, 0x15, 0x00, 0x25, 0x01,
    0x75, 0x01, 0x95, 0x08, 0x81, 0x02, 0x95, 0x01, 0x75, 0x08, 0x81, 0x01, 0x95, 0x05, 0x75, 0x01,
    0x05, 0x08, 0x19, 0x01, 0x29, 0x05, 0x91, 0x02, 0x95, 0x01, 0x75, 0x03, 0x91, 0x01, 0x95, 0x06,
    0x75, 0x08, 0x15, 0x00, 0x26, 0xff, 0x00, 0x05, 0x07, 0x19, 0x00, 0x2a, 0xff, 0x00, 0x81, 0x00,
    0xc0,
];

/// Buttons (3 bits), absolute X and Y (0..=0x7fff, 16 bits each), wheel, horizontal wheel.
const TABLET_REPORT: &[u8] = &[
    0x05, 0x01, 0x09, 0x02, 0xa1, 0x01, 0x09, 0x01, 0xa1, 0x00, 0x05, 0x09, 0x19, 0x01, 0x29, 0x03,
    0x15, 0x00, 0x25, 0x01, 0x95, 0x03, 0x75, 0x01, 0x81, 0x02, 0x95, 0x01, 0x75, 0x05, 0x81, 0x01,
    0x05, 0x01, 0x09, 0x30, 0x09, 0x31, 0x15, 0x00, 0x26, 0xff, 0x7f, 0x35, 0x00, 0x46, 0xff, 0x7f,
    0x75, 0x10, 0x95, 0x02, 0x81, 0x02, 0x09, 0x38, 0x15, 0x81, 0x25, 0x7f, 0x35, 0x00, 0x45, 0x00,
    0x75, 0x08, 0x95, 0x01, 0x81, 0x06, 0x05, 0x0c, 0x0a, 0x38, 0x02, 0x95, 0x01, 0x81, 0x06, 0xc0,
    0xc0,
];

pub const KEYBOARD_REPORT_LEN: usize = 8;
pub const TABLET_REPORT_LEN: usize = 7;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HidKind {
    Keyboard,
    Tablet,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HidError {
    #[error("the {0} has {1} reports waiting for the guest; refused")]
    Full(&'static str, usize),
    #[error("key code {0} has no USB HID keyboard usage")]
    NoUsage(u16),
}

#[derive(Default)]
struct Queue {
    reports: VecDeque<Vec<u8>>,
    /// Keyboard: modifier bits and held usages. Tablet: button bits of the last report.
    modifiers: u8,
    held: Vec<u8>,
    buttons: u8,
}

/// One device's reports, shared by the control thread (producer) and the controller.
pub struct Reports {
    kind: HidKind,
    max: usize,
    queue: Mutex<Queue>,
    delivered: AtomicU64,
}

impl Reports {
    pub fn new(kind: HidKind, max: usize) -> Reports {
        Reports {
            kind,
            max,
            queue: Mutex::new(Queue::default()),
            delivered: AtomicU64::new(0),
        }
    }
    pub fn kind(&self) -> HidKind {
        self.kind
    }
    fn name(&self) -> &'static str {
        match self.kind {
            HidKind::Keyboard => "keyboard",
            HidKind::Tablet => "tablet",
        }
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn push(&self, q: &mut Queue, report: Vec<u8>) -> Result<(), HidError> {
        if q.reports.len() >= self.max {
            return Err(HidError::Full(self.name(), q.reports.len()));
        }
        q.reports.push_back(report);
        Ok(())
    }

    /// A key press or release (evdev code); queues the keyboard's new state.
    pub fn key(&self, code: u16, pressed: bool) -> Result<(), HidError> {
        let usage = usage_of(code).ok_or(HidError::NoUsage(code))?;
        let mut q = self.lock();
        let (old_mod, old_held) = (q.modifiers, q.held.clone());
        if usage >= 0xe0 {
            let bit = 1 << (usage - 0xe0);
            q.modifiers = if pressed {
                q.modifiers | bit
            } else {
                q.modifiers & !bit
            };
        } else if pressed {
            if !q.held.contains(&usage) {
                q.held.push(usage);
            }
        } else {
            q.held.retain(|&u| u != usage);
        }
        let report = keyboard_report(q.modifiers, &q.held);
        let result = self.push(&mut q, report);
        if result.is_err() {
            (q.modifiers, q.held) = (old_mod, old_held);
        }
        result
    }

    /// The tablet at (`x`, `y`) with `buttons` (RFB mask: bits 0-2 buttons, 3-6 wheel).
    pub fn pointer(&self, x: u16, y: u16, buttons: u8) -> Result<(), HidError> {
        let mut q = self.lock();
        let pressed = buttons & !q.buttons;
        let step = |bit_pos: u8, bit_neg: u8| -> u8 {
            match (pressed & bit_pos != 0, pressed & bit_neg != 0) {
                (true, false) => 1,
                (false, true) => 0xff,
                _ => 0,
            }
        };
        let (x, y) = (x.to_le_bytes(), y.to_le_bytes());
        let report = vec![
            buttons & 7,
            x[0],
            x[1],
            y[0],
            y[1],
            step(1 << 3, 1 << 4),
            step(1 << 6, 1 << 5),
        ];
        self.push(&mut q, report)?;
        q.buttons = buttons;
        Ok(())
    }

    fn take(&self) -> Option<Vec<u8>> {
        let report = self.lock().reports.pop_front()?;
        self.delivered.fetch_add(1, Ordering::Relaxed);
        Some(report)
    }
    /// The current state, for GET_REPORT.
    fn current(&self) -> Vec<u8> {
        let q = self.lock();
        match self.kind {
            HidKind::Keyboard => keyboard_report(q.modifiers, &q.held),
            HidKind::Tablet => vec![q.buttons & 7, 0, 0, 0, 0, 0, 0],
        }
    }
    pub fn pending(&self) -> usize {
        self.lock().reports.len()
    }
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
}

fn keyboard_report(modifiers: u8, held: &[u8]) -> Vec<u8> {
    let mut r = vec![modifiers, 0, 0, 0, 0, 0, 0, 0];
    if held.len() > 6 {
        // Phantom state: too many keys (HID usage "ErrorRollOver").
        r[2..].fill(1);
    } else {
        r[2..2 + held.len()].copy_from_slice(held);
    }
    r
}

const GET_REPORT: u8 = 1;
const GET_IDLE: u8 = 2;
const GET_PROTOCOL: u8 = 3;
const SET_REPORT: u8 = 9;
const SET_IDLE: u8 = 10;
const SET_PROTOCOL: u8 = 11;
const DT_HID: u8 = 0x21;
const DT_REPORT: u8 = 0x22;

/// A HID device on a USB 2 port.
pub struct HidDevice {
    reports: Arc<Reports>,
    desc: Descriptors,
    state: StandardState,
    protocol: u8,
    idle: u8,
}

impl HidDevice {
    pub fn new(reports: Arc<Reports>) -> HidDevice {
        let (product, subclass, protocol, report, name, len) = match reports.kind {
            HidKind::Keyboard => (1, 1, 1, KEYBOARD_REPORT, "Isola USB keyboard", 8),
            HidKind::Tablet => (2, 0, 0, TABLET_REPORT, "Isola USB tablet", 8),
        };
        let rlen = (report.len() as u16).to_le_bytes();
        let mut body = vec![9, DT_INTERFACE, 0, 0, 1, 3, subclass, protocol, 0];
        body.extend_from_slice(&[9, DT_HID, 0x11, 0x01, 0, 1, DT_REPORT, rlen[0], rlen[1]]);
        // Interrupt IN endpoint 1, every 8 ms (2^(7-1) microframes).
        body.extend_from_slice(&endpoint_descriptor(0x81, 3, len, 7));
        HidDevice {
            desc: Descriptors {
                device: device_descriptor(Speed::High, 0x1d6b, 0x0100 + product),
                config: config_descriptor(1, &body),
                strings: vec!["Isola", name, "1"],
                bos: None,
            },
            reports,
            state: StandardState::default(),
            protocol: 1,
            idle: 0,
        }
    }

    fn report_descriptor(&self) -> &'static [u8] {
        match self.reports.kind {
            HidKind::Keyboard => KEYBOARD_REPORT,
            HidKind::Tablet => TABLET_REPORT,
        }
    }
}

impl UsbDevice for HidDevice {
    fn speed(&self) -> Speed {
        Speed::High
    }

    fn control(&mut self, setup: &Setup, _data_out: &[u8]) -> Result<Vec<u8>, Stall> {
        let truncate = |mut v: Vec<u8>| {
            v.truncate(usize::from(setup.length));
            Ok(v)
        };
        match (setup.request_type, setup.request) {
            (0x81, crate::usb::GET_DESCRIPTOR) => match (setup.value >> 8) as u8 {
                DT_REPORT => truncate(self.report_descriptor().to_vec()),
                DT_HID => truncate(self.desc.config[18..27].to_vec()),
                _ => Err(Stall),
            },
            (0xa1, GET_REPORT) => truncate(self.reports.current()),
            (0xa1, GET_IDLE) => truncate(vec![self.idle]),
            (0xa1, GET_PROTOCOL) => truncate(vec![self.protocol]),
            (0x21, SET_REPORT) => Ok(Vec::new()),
            (0x21, SET_IDLE) => {
                self.idle = (setup.value >> 8) as u8;
                Ok(Vec::new())
            }
            (0x21, SET_PROTOCOL) if setup.value <= 1 => {
                self.protocol = setup.value as u8;
                Ok(Vec::new())
            }
            _ => standard(&mut self.state, &self.desc, setup).unwrap_or(Err(Stall)),
        }
    }

    fn transfer_in(&mut self, ep: u8, buf: &mut [u8]) -> Xfer {
        if ep != 1 {
            return Xfer::Stall;
        }
        match self.reports.take() {
            None => Xfer::Nak,
            Some(report) => {
                let n = report.len().min(buf.len());
                buf[..n].copy_from_slice(&report[..n]);
                Xfer::Done(n)
            }
        }
    }

    fn transfer_out(&mut self, _ep: u8, _data: &[u8]) -> Xfer {
        Xfer::Stall
    }

    fn reset(&mut self) {
        self.state = StandardState::default();
        self.protocol = 1;
        self.idle = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_usages_and_reports_follow_state() {
        assert_eq!(usage_of(30), Some(4)); // KEY_A
        assert_eq!(usage_of(28), Some(0x28)); // KEY_ENTER
        assert_eq!(usage_of(42), Some(0xe1)); // KEY_LEFTSHIFT
        assert_eq!(usage_of(0), None);
        assert_eq!(usage_of(248), None);
        let r = Reports::new(HidKind::Keyboard, 4);
        r.key(42, true).unwrap();
        r.key(30, true).unwrap();
        r.key(30, false).unwrap();
        assert_eq!(r.take().unwrap(), vec![2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r.take().unwrap(), vec![2, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(r.take().unwrap(), vec![2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r.take(), None);
        assert_eq!(r.delivered(), 3);
        assert_eq!(r.key(248, true), Err(HidError::NoUsage(248)));
    }

    #[test]
    fn a_full_queue_refuses_and_keeps_state() {
        let r = Reports::new(HidKind::Keyboard, 2);
        r.key(30, true).unwrap();
        r.key(31, true).unwrap();
        assert!(matches!(
            r.key(32, true),
            Err(HidError::Full("keyboard", 2))
        ));
        r.take();
        r.take();
        r.key(33, true).unwrap();
        // 32 was refused, so it is not held.
        assert_eq!(r.take().unwrap(), vec![0, 0, 4, 22, 9, 0, 0, 0]);
    }

    #[test]
    fn tablet_reports_carry_position_buttons_and_wheel_edges() {
        let r = Reports::new(HidKind::Tablet, 8);
        r.pointer(0x1234, 0x7fff, 1 | (1 << 4)).unwrap();
        r.pointer(1, 2, 1 << 4).unwrap();
        assert_eq!(r.take().unwrap(), vec![1, 0x34, 0x12, 0xff, 0x7f, 0xff, 0]);
        // The held wheel bit is no second step.
        assert_eq!(r.take().unwrap(), vec![0, 1, 0, 2, 0, 0, 0]);
    }

    #[test]
    fn class_requests_and_report_descriptor() {
        let r = Arc::new(Reports::new(HidKind::Keyboard, 8));
        let mut d = HidDevice::new(r.clone());
        let get_report_desc = Setup {
            request_type: 0x81,
            request: 6,
            value: 0x2200,
            index: 0,
            length: 200,
        };
        assert_eq!(d.control(&get_report_desc, &[]).unwrap(), KEYBOARD_REPORT);
        let set_protocol = Setup {
            request_type: 0x21,
            request: SET_PROTOCOL,
            value: 0,
            index: 0,
            length: 0,
        };
        d.control(&set_protocol, &[]).unwrap();
        assert_eq!(d.protocol, 0);
        let mut buf = [0u8; 8];
        assert_eq!(d.transfer_in(1, &mut buf), Xfer::Nak);
        r.key(30, true).unwrap();
        assert_eq!(d.transfer_in(1, &mut buf), Xfer::Done(8));
        assert_eq!(buf[2], 4);
        assert_eq!(d.transfer_in(2, &mut buf), Xfer::Stall);
    }
}
