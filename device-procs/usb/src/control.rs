//! The control socket: the same [`InputRequest`]s isola-input takes (`isolactl key|type|
//! pointer`, isola-display's VNC server), each turned into one HID report for the USB
//! keyboard or tablet. After queuing a report the controller is kicked, so an interrupt
//! transfer the guest has waiting completes at once.
//!
//! As in isola-input: `Done` means the report was queued; a report that does not fit the
//! bounded queue is refused; a malformed frame gets an error answer and the connection is
//! closed; at most [`MAX_CLIENTS`] clients at once, a started frame must arrive within
//! [`READ_TIMEOUT`].

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isola_ipc::input::{InputRequest, InputResponse, InputStatus, INPUT_ABS_MAX};
use isola_ipc::IpcError;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::hid::Reports;
use crate::vfio::Device;

pub const MAX_CLIENTS: usize = 16;
const READ_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Targets {
    pub keyboard: Arc<Reports>,
    pub tablet: Arc<Reports>,
    /// The controller to kick after a report (absent in tests of the requests alone).
    pub device: Option<Arc<Mutex<Device>>>,
}

/// Answers one request.
pub fn handle(t: &Targets, request: InputRequest) -> InputResponse {
    let result = match request {
        InputRequest::Key { code, pressed } => t.keyboard.key(code, pressed),
        InputRequest::Pointer { x, y, buttons } => {
            if x > INPUT_ABS_MAX || y > INPUT_ABS_MAX {
                return InputResponse::Error(format!(
                    "pointer position ({x}, {y}) is outside 0..={INPUT_ABS_MAX}"
                ));
            }
            t.tablet.pointer(x as u16, y as u16, buttons)
        }
        InputRequest::Status => {
            return InputResponse::Status(InputStatus {
                keyboard_events: t.keyboard.delivered(),
                tablet_events: t.tablet.delivered(),
                pending: (t.keyboard.pending() + t.tablet.pending()) as u64,
            })
        }
    };
    match result {
        Ok(()) => {
            if let Some(device) = &t.device {
                device.lock().unwrap_or_else(|p| p.into_inner()).ctl.kick();
            }
            InputResponse::Done
        }
        Err(e) => InputResponse::Error(e.to_string()),
    }
}

fn serve_client(t: &Targets, stream: &mut UnixStream) {
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    loop {
        // Idle between frames for as long as the client likes; a frame, once begun, must
        // come whole within READ_TIMEOUT.
        let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(_) => return,
        }
        let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
        let request: InputRequest = match isola_ipc::read_message(stream) {
            Ok(r) => r,
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
        if isola_ipc::write_message(stream, &handle(t, request)).is_err() {
            return;
        }
    }
}

/// Accepts control clients for ever, each on its own thread.
pub fn serve(listener: UnixListener, targets: Targets) -> std::io::Result<()> {
    let clients = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ECONNABORTED)) => {
                continue
            }
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
        let (t, count) = (targets.clone(), Arc::clone(&clients));
        let spawned = isola_device_common::thread::spawn_named("usb-ctl", move || {
            let mut stream = stream;
            serve_client(&t, &mut stream);
            count.fetch_sub(1, Ordering::AcqRel);
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
    use crate::hid::HidKind;

    #[test]
    fn requests_become_reports_or_errors() {
        let t = Targets {
            keyboard: Arc::new(Reports::new(HidKind::Keyboard, 4)),
            tablet: Arc::new(Reports::new(HidKind::Tablet, 4)),
            device: None,
        };
        assert_eq!(
            handle(
                &t,
                InputRequest::Key {
                    code: 30,
                    pressed: true
                }
            ),
            InputResponse::Done
        );
        let bad = handle(
            &t,
            InputRequest::Key {
                code: 0,
                pressed: true,
            },
        );
        assert!(
            matches!(bad, InputResponse::Error(ref s) if s.contains("no USB HID")),
            "{bad:?}"
        );
        let far = InputRequest::Pointer {
            x: INPUT_ABS_MAX + 1,
            y: 0,
            buttons: 0,
        };
        assert!(matches!(handle(&t, far), InputResponse::Error(_)));
        assert_eq!(
            handle(
                &t,
                InputRequest::Pointer {
                    x: 5,
                    y: 6,
                    buttons: 1
                }
            ),
            InputResponse::Done
        );
        assert_eq!(
            handle(&t, InputRequest::Status),
            InputResponse::Status(InputStatus {
                keyboard_events: 0,
                tablet_events: 0,
                pending: 2
            })
        );
    }
}
