//! The control socket: `isolactl key|pointer` and `isola-display`'s VNC server send
//! [`InputRequest`]s here; each becomes one report (events, then EV_SYN) queued for the guest.
//!
//! `Done` means the report was queued whole; it reaches the guest as soon as the driver has
//! buffers posted. A report that does not fit the bounded queue is refused with an error
//! (nothing of it is queued): a sender is never blocked and memory never grows. A malformed
//! frame gets an error answer and the connection is closed; at most [`MAX_CLIENTS`]
//! connections are served at once, further ones are closed at once.

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use isola_ipc::input::{
    InputRequest, InputResponse, InputStatus, BUTTON_LEFT, BUTTON_MIDDLE, BUTTON_RIGHT,
    INPUT_ABS_MAX,
};
use isola_ipc::IpcError;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::config::{
    Kind, ABS_X, ABS_Y, BTN_LEFT, BTN_MIDDLE, BTN_RIGHT, EV_ABS, EV_KEY, EV_REL, REL_HWHEEL,
    REL_WHEEL,
};
use crate::device::{Events, InputEvent};

/// Control connections served at once.
pub const MAX_CLIENTS: usize = 16;
/// A client that sends part of a frame and stalls is dropped after this long.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// RFB pointer-mask bits for the wheel: up, down, left, right (one step per press).
const WHEEL_UP: u8 = 1 << 3;
const WHEEL_DOWN: u8 = 1 << 4;
const WHEEL_LEFT: u8 = 1 << 5;
const WHEEL_RIGHT: u8 = 1 << 6;

/// The devices this process serves, as the control socket sees them.
#[derive(Clone, Default)]
pub struct Targets {
    pub keyboard: Option<Arc<Events>>,
    pub tablet: Option<Arc<Events>>,
}

/// The events of a key press or release.
pub fn key_report(code: u16, pressed: bool) -> Vec<InputEvent> {
    vec![
        InputEvent::new(EV_KEY, code, u32::from(pressed)),
        InputEvent::syn(),
    ]
}

/// The events that take the tablet from button state `before` to (`x`, `y`, `buttons`).
pub fn pointer_report(x: u32, y: u32, buttons: u8, before: u8) -> Vec<InputEvent> {
    let mut report = vec![
        InputEvent::new(EV_ABS, ABS_X, x),
        InputEvent::new(EV_ABS, ABS_Y, y),
    ];
    for (bit, code) in [
        (BUTTON_LEFT, BTN_LEFT),
        (BUTTON_MIDDLE, BTN_MIDDLE),
        (BUTTON_RIGHT, BTN_RIGHT),
    ] {
        if (buttons ^ before) & bit != 0 {
            report.push(InputEvent::new(EV_KEY, code, u32::from(buttons & bit != 0)));
        }
    }
    let pressed = buttons & !before;
    for (bit, code, step) in [
        (WHEEL_UP, REL_WHEEL, 1i32),
        (WHEEL_DOWN, REL_WHEEL, -1),
        (WHEEL_LEFT, REL_HWHEEL, -1),
        (WHEEL_RIGHT, REL_HWHEEL, 1),
    ] {
        if pressed & bit != 0 {
            report.push(InputEvent::new(EV_REL, code, step as u32));
        }
    }
    report.push(InputEvent::syn());
    report
}

/// Answers one request.
pub fn handle(targets: &Targets, request: InputRequest) -> InputResponse {
    let result = match request {
        InputRequest::Key { code, pressed } => match &targets.keyboard {
            None => Err("this isola-input serves no keyboard (--keyboard-socket)".to_owned()),
            Some(_) if !Kind::Keyboard.supports(EV_KEY, code) => Err(format!(
                "key code {code} is not on the keyboard (it has codes {}..={})",
                crate::config::FIRST_KEY,
                crate::config::LAST_KEY
            )),
            Some(events) => events
                .push(&key_report(code, pressed))
                .map_err(|e| e.to_string()),
        },
        InputRequest::Pointer { x, y, buttons } => match &targets.tablet {
            None => Err("this isola-input serves no tablet (--tablet-socket)".to_owned()),
            Some(_) if x > INPUT_ABS_MAX || y > INPUT_ABS_MAX => Err(format!(
                "pointer position ({x}, {y}) is outside 0..={INPUT_ABS_MAX}"
            )),
            Some(events) => events
                .push_pointer(buttons, |before| pointer_report(x, y, buttons, before))
                .map_err(|e| e.to_string()),
        },
        InputRequest::Status => return InputResponse::Status(status(targets)),
    };
    match result {
        Ok(()) => InputResponse::Done,
        Err(why) => InputResponse::Error(why),
    }
}

fn status(targets: &Targets) -> InputStatus {
    let count = |t: &Option<Arc<Events>>| t.as_ref().map_or(0, |e| e.delivered_count());
    let pending = |t: &Option<Arc<Events>>| t.as_ref().map_or(0, |e| e.pending_count());
    InputStatus {
        keyboard_events: count(&targets.keyboard),
        tablet_events: count(&targets.tablet),
        pending: pending(&targets.keyboard) + pending(&targets.tablet),
    }
}

/// Serves one client until it closes the connection or sends something malformed. A client
/// may stay idle between requests for as long as it likes (a VNC server keeps one
/// connection), but a frame it has started must arrive within [`READ_TIMEOUT`].
fn serve_client(targets: &Targets, stream: &mut UnixStream) {
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    loop {
        // Wait for the first byte of the next frame (or the end of the connection).
        let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(_) => return,
        }
        let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
        let request: InputRequest = match isola_ipc::read_message(stream) {
            Ok(request) => request,
            Err(IpcError::Closed) => return,
            Err(e) => {
                log::warn!(
                    "control: dropping a client: {}",
                    isola_device_common::logging::chain(&e)
                );
                let answer = InputResponse::Error(format!("malformed request: {e}"));
                let _ = isola_ipc::write_message(stream, &answer);
                return;
            }
        };
        let answer = handle(targets, request);
        if isola_ipc::write_message(stream, &answer).is_err() {
            return;
        }
    }
}

/// Accepts control clients for ever, each on its own thread.
pub fn serve(listener: UnixListener, targets: Targets) -> std::io::Result<()> {
    let clients = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                log::warn!("control: cannot accept a client now: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => return Err(e),
        };
        if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::AcqRel);
            log::warn!("control: {MAX_CLIENTS} clients already connected; closing a new one");
            continue;
        }
        let (targets, count) = (targets.clone(), Arc::clone(&clients));
        let spawned = isola_device_common::thread::spawn_named("input-ctl", move || {
            let mut stream = stream;
            serve_client(&targets, &mut stream);
            // Before the client sees the connection close, its slot is free again.
            count.fetch_sub(1, Ordering::AcqRel);
            drop(stream);
        });
        if let Err(e) = spawned {
            clients.fetch_sub(1, Ordering::AcqRel);
            log::warn!("control: cannot start a client thread: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EV_SYN;

    /// Devices that have delivered their opening SYN.
    fn targets(limit: usize) -> Targets {
        let fresh = |kind| {
            let events = Arc::new(Events::new(kind, limit).unwrap());
            assert_eq!(events.drain(), vec![InputEvent::syn()]);
            Some(events)
        };
        Targets {
            keyboard: fresh(Kind::Keyboard),
            tablet: fresh(Kind::Tablet),
        }
    }

    #[test]
    fn pointer_reports_follow_button_edges() {
        let r = pointer_report(5, 7, BUTTON_LEFT, 0);
        assert_eq!(
            r,
            vec![
                InputEvent::new(EV_ABS, ABS_X, 5),
                InputEvent::new(EV_ABS, ABS_Y, 7),
                InputEvent::new(EV_KEY, BTN_LEFT, 1),
                InputEvent::new(EV_SYN, 0, 0),
            ]
        );
        let r = pointer_report(0, 0, BUTTON_RIGHT | WHEEL_DOWN, BUTTON_LEFT);
        assert_eq!(
            r[2..],
            [
                InputEvent::new(EV_KEY, BTN_LEFT, 0),
                InputEvent::new(EV_KEY, BTN_RIGHT, 1),
                InputEvent::new(EV_REL, REL_WHEEL, u32::MAX),
                InputEvent::syn(),
            ]
        );
        // A held wheel bit is not a second step; bit 7 means nothing.
        assert_eq!(pointer_report(0, 0, WHEEL_DOWN | 0x80, WHEEL_DOWN).len(), 3);
    }

    #[test]
    fn requests_are_validated() {
        let t = targets(64);
        let bad = [
            InputRequest::Key {
                code: 0,
                pressed: true,
            },
            InputRequest::Key {
                code: 0x110,
                pressed: true,
            },
            InputRequest::Pointer {
                x: INPUT_ABS_MAX + 1,
                y: 0,
                buttons: 0,
            },
        ];
        for request in bad {
            assert!(
                matches!(handle(&t, request.clone()), InputResponse::Error(_)),
                "{request:?}"
            );
        }
        let none = Targets::default();
        let InputResponse::Error(why) = handle(
            &none,
            InputRequest::Key {
                code: 30,
                pressed: true,
            },
        ) else {
            panic!("a missing keyboard is an error");
        };
        assert!(why.contains("no keyboard"), "{why}");
        assert_eq!(
            handle(&t, InputRequest::Status),
            InputResponse::Status(InputStatus {
                keyboard_events: 0,
                tablet_events: 0,
                pending: 0
            })
        );
    }

    #[test]
    fn a_full_queue_refuses_whole_reports_and_keeps_button_state() {
        let t = targets(8);
        let key = |code| InputRequest::Key {
            code,
            pressed: true,
        };
        for code in 30..34 {
            assert_eq!(handle(&t, key(code)), InputResponse::Done);
        }
        let InputResponse::Error(why) = handle(&t, key(34)) else {
            panic!("8 events fit, 10 do not");
        };
        assert!(why.contains("keyboard has 8 events waiting"), "{why}");
        let pointer = |buttons| InputRequest::Pointer {
            x: 1,
            y: 2,
            buttons,
        };
        let tablet = t.tablet.as_ref().unwrap();
        // The first report states every button (x, y, 3 buttons, syn).
        assert_eq!(handle(&t, pointer(0)), InputResponse::Done);
        assert_eq!(tablet.pending_count(), 6);
        match handle(&t, InputRequest::Status) {
            InputResponse::Status(s) => assert_eq!(s.pending, 14),
            other => panic!("{other:?}"),
        }
        // Pressing left (4 events) does not fit; since it was refused, left is still up.
        assert!(matches!(
            handle(&t, pointer(BUTTON_LEFT)),
            InputResponse::Error(_)
        ));
        tablet.drain();
        assert_eq!(handle(&t, pointer(0)), InputResponse::Done);
        assert_eq!(
            tablet.drain(),
            vec![
                InputEvent::new(EV_ABS, ABS_X, 1),
                InputEvent::new(EV_ABS, ABS_Y, 2),
                InputEvent::syn()
            ]
        );
    }
}
