//! GPU sessions: each connection on the display socket is one GPU backend speaking the
//! vhost-user-gpu protocol (the core connects and hands the connection to the backend with
//! `VHOST_USER_GPU_SET_SOCKET`). A new connection replaces the current one (the GPU backend
//! restarted and the core connected again); the picture stays meanwhile.
//!
//! Everything a peer sends is checked: a request that is malformed or names a rectangle
//! outside the scanout is logged (rate-limited) and dropped; a payload too large to be any
//! valid request closes the connection.

use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use isola_device_common::logging::{chain, RateLimiter};
use isola_device_common::thread::spawn_named;

use crate::edid;
use crate::framebuffer::{Display, Rect};
use crate::protocol::{
    self, code, read_message, write_reply, Dropped, ProtocolError, Request, MAX_PIXELS, MAX_SIDE,
    PROTOCOL_F_EDID,
};

/// What the display tells the GPU about itself.
#[derive(Debug, Clone, Copy)]
pub struct Screen {
    pub width: u32,
    pub height: u32,
}

/// Accepts GPU sessions on `listener` forever, one at a time (the newest wins).
pub fn serve(listener: UnixListener, display: Arc<Display>, screen: Screen) {
    let current: Arc<Mutex<Option<UnixStream>>> = Arc::default();
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(stream) => stream,
            Err(e) => {
                log::warn!("accepting a GPU connection failed: {e}");
                continue;
            }
        };
        let id = display.session_started();
        {
            let mut cur = current.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(old) = cur.take() {
                log::info!("a new GPU session replaces the current one");
                let _ = old.shutdown(std::net::Shutdown::Both);
            }
            *cur = stream.try_clone().ok();
        }
        let session_display = Arc::clone(&display);
        let spawned = spawn_named(&format!("gpu-{id}"), move || {
            log::info!("GPU session {id} connected");
            match run_session(stream, &session_display, screen) {
                Ok(()) | Err(ProtocolError::Closed) => log::info!("GPU session {id} ended"),
                Err(e) => log::warn!("GPU session {id} closed: {}", chain(&e)),
            }
            session_display.session_ended(id);
        });
        if let Err(e) = spawned {
            log::error!("cannot start a thread for GPU session {id}: {e}");
            display.session_ended(id);
        }
    }
}

/// One GPU session's state.
struct Session<'a> {
    display: &'a Display,
    screen: Screen,
    writer: UnixStream,
    features: u64,
    log: RateLimiter,
    dmabuf_refused: bool,
}

/// Serves one GPU connection until it closes or misbehaves beyond repair.
pub fn run_session(
    stream: UnixStream,
    display: &Display,
    screen: Screen,
) -> Result<(), ProtocolError> {
    let writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(64 << 10, stream);
    let mut session = Session {
        display,
        screen,
        writer,
        features: 0,
        log: RateLimiter::new(10),
        dmabuf_refused: false,
    };
    let mut buf = Vec::new();
    let result = loop {
        let (request, flags) = match read_message(&mut reader, &mut buf) {
            Ok(header) => header,
            Err(e) => break Err(e),
        };
        match protocol::parse(request, flags, &buf) {
            Ok(req) => {
                if let Err(e) = session.handle(req) {
                    break Err(e);
                }
            }
            Err(dropped) => session.drop_request(&dropped),
        }
    };
    // The accept loop keeps a handle on the connection (to end it when a new session
    // comes): close it here so the peer sees the end now.
    let _ = session.writer.shutdown(std::net::Shutdown::Both);
    result
}

impl Session<'_> {
    fn warn(&mut self, what: std::fmt::Arguments<'_>) {
        if let Some(skipped) = self.log.allow() {
            if skipped > 0 {
                log::warn!("{what} ({skipped} similar lines dropped)");
            } else {
                log::warn!("{what}");
            }
        }
    }

    fn drop_request(&mut self, why: &Dropped) {
        self.warn(format_args!("dropped a GPU request: {why}"));
    }

    fn handle(&mut self, req: Request<'_>) -> Result<(), ProtocolError> {
        match req {
            Request::GetProtocolFeatures => {
                write_reply(
                    &mut self.writer,
                    code::GET_PROTOCOL_FEATURES,
                    &PROTOCOL_F_EDID.to_ne_bytes(),
                )?;
            }
            Request::SetProtocolFeatures(features) => {
                if features & !PROTOCOL_F_EDID != 0 {
                    self.warn(format_args!(
                        "GPU set protocol features {features:#x}, only {PROTOCOL_F_EDID:#x} offered; ignoring the rest"
                    ));
                }
                self.features = features & PROTOCOL_F_EDID;
            }
            Request::GetDisplayInfo => {
                let info = protocol::display_info(self.screen.width, self.screen.height);
                write_reply(&mut self.writer, code::GET_DISPLAY_INFO, &info)?;
            }
            Request::GetEdid { scanout } => {
                // Always answer (a backend waits for the reply); a scanout we do not show
                // gets an empty EDID.
                let edid = edid::generate(self.screen.width, self.screen.height);
                let blob: &[u8] = if scanout == 0 { &edid } else { &[] };
                if scanout != 0 {
                    self.warn(format_args!(
                        "GET_EDID for scanout {scanout}: only scanout 0 is shown"
                    ));
                }
                write_reply(
                    &mut self.writer,
                    code::GET_EDID,
                    &protocol::edid_reply(blob),
                )?;
            }
            Request::CursorPos(pos) | Request::CursorHide(pos) if pos.scanout != 0 => {
                self.warn(format_args!(
                    "cursor on scanout {}: only scanout 0 is shown",
                    pos.scanout
                ));
            }
            Request::CursorPos(pos) => self.display.move_cursor(pos.x, pos.y, true),
            Request::CursorHide(pos) => self.display.move_cursor(pos.x, pos.y, false),
            Request::CursorUpdate {
                pos,
                hot_x,
                hot_y,
                image,
            } => {
                if pos.scanout != 0 {
                    self.warn(format_args!(
                        "cursor on scanout {}: only scanout 0 is shown",
                        pos.scanout
                    ));
                } else {
                    self.display.set_cursor(image, hot_x, hot_y, pos.x, pos.y);
                }
            }
            Request::Scanout {
                scanout,
                width,
                height,
            } => self.scanout(scanout, width, height),
            Request::Update {
                scanout,
                x,
                y,
                width,
                height,
                data,
            } => self.update(scanout, Rect::new(x, y, width, height), data),
            Request::DmabufScanout {
                scanout,
                width,
                height,
            } => {
                if !self.dmabuf_refused && width != 0 {
                    self.dmabuf_refused = true;
                    log::warn!(
                        "GPU sent a DMABUF scanout ({width}x{height} on scanout {scanout}): refused, \
                         isola-display shows only shared-memory UPDATEs (run the GPU backend without GL)"
                    );
                }
            }
            Request::DmabufUpdate => {
                // The backend waits for this reply before it goes on; answer at once.
                write_reply(&mut self.writer, code::DMABUF_UPDATE, &[])?;
            }
        }
        Ok(())
    }

    fn scanout(&mut self, scanout: u32, width: u32, height: u32) {
        if scanout != 0 {
            self.warn(format_args!("SCANOUT {scanout}: only scanout 0 is shown"));
        } else if width == 0 || height == 0 {
            self.display.disable_scanout();
        } else if width > MAX_SIDE
            || height > MAX_SIDE
            || u64::from(width) * u64::from(height) > MAX_PIXELS
        {
            self.warn(format_args!(
                "SCANOUT {width}x{height} refused: larger than {MAX_SIDE} per side or {MAX_PIXELS} pixels"
            ));
        } else {
            self.display.set_scanout(width, height);
        }
    }

    fn update(&mut self, scanout: u32, r: Rect, data: &[u8]) {
        // Both sides come from the peer: 2^32 x 2^32 x 4 does not fit in 64 bits, and
        // wrapped it could match a short payload.
        let expected = u64::from(r.w)
            .checked_mul(u64::from(r.h))
            .and_then(|pixels| pixels.checked_mul(4));
        if scanout != 0 {
            self.warn(format_args!(
                "UPDATE of scanout {scanout}: only scanout 0 is shown"
            ));
        } else if expected != Some(data.len() as u64) {
            let expected = expected.map_or("more than 2^64".to_owned(), |e| e.to_string());
            self.warn(format_args!(
                "UPDATE {}x{} carries {} bytes of pixels, expected {expected}",
                r.w,
                r.h,
                data.len()
            ));
        } else if !self.display.update(r, data) {
            let st = self.display.lock();
            let (w, h, on) = (st.surface.width, st.surface.height, st.enabled);
            drop(st);
            self.warn(format_args!(
                "UPDATE {}x{}+{}+{} dropped: outside the {w}x{h} scanout{}",
                r.w,
                r.h,
                r.x,
                r.y,
                if on { "" } else { " (not enabled)" }
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::protocol::build;

    /// Found by the `display_protocol` fuzz target (fuzz/corpus/display_protocol/
    /// crash-update-size-overflow): an UPDATE whose width x height x 4 does not fit in 64 bits
    /// overflowed the size check (a panic in a checked build; in a release build the product
    /// wrapped, so a 2^31 x 2^31 rectangle "expected" 0 bytes of pixels). It is dropped, and
    /// the session goes on serving.
    #[test]
    fn an_update_too_large_for_64_bits_is_dropped_and_the_session_goes_on() {
        let display = Display::new(64, 48);
        let screen = Screen {
            width: 64,
            height: 48,
        };
        let (mut gpu, served) = UnixStream::pair().unwrap();
        for (w, h) in [(u32::MAX, u32::MAX), (1 << 31, 1 << 31)] {
            gpu.write_all(&build::update(0, 0, 0, w, h, &[])).unwrap();
        }
        gpu.write_all(&build::message(code::GET_DISPLAY_INFO, &[]))
            .unwrap();
        gpu.shutdown(std::net::Shutdown::Write).unwrap();
        let session = std::thread::spawn(move || {
            let display = display;
            let result = run_session(served, &display, screen);
            let updates = display.lock().updates;
            (result, updates)
        });
        let mut replies = Vec::new();
        gpu.read_to_end(&mut replies).unwrap();
        let (result, updates) = session.join().expect("the session does not panic");
        assert!(matches!(result, Err(ProtocolError::Closed)), "{result:?}");
        assert_eq!(updates, 0, "no update was applied");
        // The one reply is GET_DISPLAY_INFO's.
        assert!(replies.len() > 12, "{replies:?}");
        assert_eq!(replies[..4], code::GET_DISPLAY_INFO.to_ne_bytes());
    }
}
