//! The VNC server: RFB 3.8 (3.7 and 3.3 clients too) with security type None, on a TCP
//! address (meant for localhost) and/or a Unix socket.
//!
//! Encodings: Raw and ZRLE ([`zrle`]); pseudo-encodings DesktopSize (the scanout changed
//! size) and Cursor (the GPU's cursor image). Updates are incremental: a client is sent only
//! the regions damaged since its last update, and only when it has asked for one.
//!
//! Each client has two threads: a reader (client messages; key and pointer events go on to
//! `isola-input`) and a writer that waits for damage and sends it. The GPU session never
//! waits for a client: it only adds damage to the client's mailbox
//! ([`crate::framebuffer::ClientSlot`]).

pub mod pixel;
pub mod zrle;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isola_device_common::logging::chain;
use isola_device_common::thread::spawn_named;
use isola_ipc::input::{InputRequest, INPUT_ABS_MAX};

use crate::framebuffer::{ClientSlot, Display, Rect};
use crate::input::InputSink;
use crate::keymap;
use pixel::{FormatError, PixelFormat, NATIVE};
use zrle::{ZrleEncoder, ZrleError};

pub const ENCODING_RAW: i32 = 0;
pub const ENCODING_ZRLE: i32 = 16;
pub const ENCODING_DESKTOP_SIZE: i32 = -223;
pub const ENCODING_CURSOR: i32 = -239;

/// Most VNC clients at once (each has two threads); more are turned away.
pub const MAX_CLIENTS: usize = 32;
/// How long a client may take over the handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest ClientCutText accepted (it is read and thrown away).
const MAX_CUT_TEXT: u32 = 1 << 20;
/// The desktop name clients show.
const NAME: &str = "Isola";

#[derive(Debug, thiserror::Error)]
pub enum VncError {
    #[error("client connection I/O failed")]
    Io(#[from] io::Error),
    #[error("client sent protocol version {0:?}")]
    Version(String),
    #[error("client chose security type {0}; only None (1) is offered")]
    Security(u8),
    #[error("client sent an unknown message type {0}")]
    UnknownMessage(u8),
    #[error("client set a pixel format this server does not send")]
    PixelFormat(#[from] FormatError),
    #[error("client cut text of {0} bytes is larger than {MAX_CUT_TEXT}")]
    CutText(u32),
    #[error(transparent)]
    Zrle(#[from] ZrleError),
}

/// A client connection, over TCP or a Unix socket.
pub enum VncStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl VncStream {
    fn try_clone(&self) -> io::Result<VncStream> {
        Ok(match self {
            VncStream::Tcp(s) => VncStream::Tcp(s.try_clone()?),
            VncStream::Unix(s) => VncStream::Unix(s.try_clone()?),
        })
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            VncStream::Tcp(s) => s.set_read_timeout(t),
            VncStream::Unix(s) => s.set_read_timeout(t),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            VncStream::Tcp(s) => s.shutdown(Shutdown::Both),
            VncStream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for VncStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            VncStream::Tcp(s) => s.read(buf),
            VncStream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for VncStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            VncStream::Tcp(s) => s.write(buf),
            VncStream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            VncStream::Tcp(s) => s.flush(),
            VncStream::Unix(s) => s.flush(),
        }
    }
}

/// What the client asked for with SetPixelFormat and SetEncodings.
#[derive(Debug, Clone, Copy)]
struct Settings {
    format: PixelFormat,
    zrle: bool,
    desktop_size: bool,
    cursor: bool,
}

/// What the reader and writer of one client share.
struct Client {
    slot: Arc<ClientSlot>,
    settings: Mutex<Settings>,
    wants_cursor: AtomicBool,
}

impl Client {
    fn settings(&self) -> Settings {
        *self.settings.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serves VNC clients on a TCP listener forever.
pub fn serve_tcp(listener: TcpListener, display: Arc<Display>, input: Arc<InputSink>) {
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                start_client(VncStream::Tcp(s), &display, &input);
            }
            Err(e) => log::warn!("accepting a VNC connection failed: {e}"),
        }
    }
}

/// Serves VNC clients on a Unix socket forever.
pub fn serve_unix(listener: UnixListener, display: Arc<Display>, input: Arc<InputSink>) {
    for conn in listener.incoming() {
        match conn {
            Ok(s) => start_client(VncStream::Unix(s), &display, &input),
            Err(e) => log::warn!("accepting a VNC connection failed: {e}"),
        }
    }
}

/// Clients connected now, over every listener.
static CLIENTS: AtomicUsize = AtomicUsize::new(0);

fn start_client(stream: VncStream, display: &Arc<Display>, input: &Arc<InputSink>) {
    if CLIENTS.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
        CLIENTS.fetch_sub(1, Ordering::AcqRel);
        log::warn!("VNC client turned away: {MAX_CLIENTS} are connected already");
        stream.shutdown();
        return;
    }
    let display = Arc::clone(display);
    let input = Arc::clone(input);
    let spawned = spawn_named("vnc-client", move || {
        match serve_client(stream, &display, &input) {
            Ok(()) => log::info!("VNC client disconnected"),
            Err(e) => log::info!("VNC client closed: {}", chain(&e)),
        }
        CLIENTS.fetch_sub(1, Ordering::AcqRel);
    });
    if let Err(e) = spawned {
        CLIENTS.fetch_sub(1, Ordering::AcqRel);
        log::warn!("cannot start a VNC client thread: {e}");
    }
}

/// Version, security and initialisation messages; returns the size told to the client.
fn handshake(s: &mut VncStream, display: &Display) -> Result<(u16, u16), VncError> {
    s.write_all(b"RFB 003.008\n")?;
    let mut version = [0u8; 12];
    s.read_exact(&mut version)?;
    let text = String::from_utf8_lossy(&version).into_owned();
    let minor = match text.as_bytes() {
        [b'R', b'F', b'B', b' ', b'0', b'0', b'3', b'.', m @ .., b'\n'] => std::str::from_utf8(m)
            .ok()
            .and_then(|m| m.parse::<u32>().ok()),
        _ => None,
    };
    let Some(minor) = minor else {
        return Err(VncError::Version(text));
    };
    if minor >= 7 {
        s.write_all(&[1, 1])?; // one security type: None
        let mut chosen = [0u8; 1];
        s.read_exact(&mut chosen)?;
        if chosen[0] != 1 {
            if minor >= 8 {
                let reason = b"only security type None is offered";
                let mut msg = 1u32.to_be_bytes().to_vec();
                msg.extend_from_slice(&(reason.len() as u32).to_be_bytes());
                msg.extend_from_slice(reason);
                s.write_all(&msg)?;
            }
            return Err(VncError::Security(chosen[0]));
        }
        if minor >= 8 {
            s.write_all(&0u32.to_be_bytes())?; // SecurityResult OK
        }
    } else {
        s.write_all(&1u32.to_be_bytes())?; // 3.3: the server picks None
    }
    let mut shared = [0u8; 1];
    s.read_exact(&mut shared)?; // every client shares the display
    let st = display.lock();
    let (w, h) = (st.surface.width as u16, st.surface.height as u16);
    drop(st);
    let mut init = Vec::new();
    init.extend_from_slice(&w.to_be_bytes());
    init.extend_from_slice(&h.to_be_bytes());
    init.extend_from_slice(&NATIVE.to_bytes());
    init.extend_from_slice(&(NAME.len() as u32).to_be_bytes());
    init.extend_from_slice(NAME.as_bytes());
    s.write_all(&init)?;
    Ok((w, h))
}

fn serve_client(
    mut stream: VncStream,
    display: &Arc<Display>,
    input: &InputSink,
) -> Result<(), VncError> {
    // A client that stalls in the handshake must not hold its slot forever.
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let size = handshake(&mut stream, display)?;
    stream.set_read_timeout(None)?;
    log::info!("VNC client connected");
    let client = Arc::new(Client {
        slot: display.register_client(),
        settings: Mutex::new(Settings {
            format: NATIVE,
            zrle: false,
            desktop_size: false,
            cursor: false,
        }),
        wants_cursor: AtomicBool::new(false),
    });
    let writer_stream = stream.try_clone()?;
    let writer = {
        let client = Arc::clone(&client);
        let display = Arc::clone(display);
        spawn_named("vnc-writer", move || {
            let mut w = Writer {
                stream: writer_stream,
                size,
                zrle: ZrleEncoder::default(),
            };
            let result = w.run(&client, &display);
            // The reader is still blocked on the socket: wake it.
            w.stream.shutdown();
            result
        })?
    };
    let result = read_loop(&mut stream, &client, display, input);
    client.slot.update(|p| p.closed = true);
    stream.shutdown();
    let written = writer.join().unwrap_or(Ok(()));
    result.and(written)
}

fn read_loop(
    s: &mut VncStream,
    client: &Client,
    display: &Display,
    input: &InputSink,
) -> Result<(), VncError> {
    loop {
        let mut kind = [0u8; 1];
        match s.read_exact(&mut kind) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            other => other?,
        }
        match kind[0] {
            0 => {
                let mut b = [0u8; 19];
                s.read_exact(&mut b)?;
                let mut pf = [0u8; 16];
                pf.copy_from_slice(&b[3..]);
                let format = PixelFormat::parse(&pf)?;
                client
                    .settings
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .format = format;
            }
            2 => {
                let mut b = [0u8; 3];
                s.read_exact(&mut b)?;
                let n = usize::from(u16::from_be_bytes([b[1], b[2]]));
                let mut list = vec![0u8; n * 4];
                s.read_exact(&mut list)?;
                set_encodings(client, &list);
            }
            3 => {
                let mut b = [0u8; 9];
                s.read_exact(&mut b)?;
                let be = |i: usize| u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
                let incremental = b[0] != 0;
                let r = Rect::new(be(1), be(3), be(5), be(7));
                client.slot.update(|p| {
                    if !incremental {
                        p.damage.add(r);
                    }
                    p.requested = true;
                });
            }
            4 => {
                let mut b = [0u8; 7];
                s.read_exact(&mut b)?;
                let keysym = u32::from_be_bytes([b[3], b[4], b[5], b[6]]);
                match keymap::evdev_code(keysym) {
                    Some(code) => input.send(&InputRequest::Key {
                        code,
                        pressed: b[0] != 0,
                    }),
                    None => log::debug!("no key for keysym {keysym:#x}"),
                }
            }
            5 => pointer_event(s, display, input)?,
            6 => skip_cut_text(s)?,
            other => return Err(VncError::UnknownMessage(other)),
        }
    }
}

/// PointerEvent: the position scaled to the tablet, buttons left, middle, right.
fn pointer_event(s: &mut VncStream, display: &Display, input: &InputSink) -> Result<(), VncError> {
    let mut b = [0u8; 5];
    s.read_exact(&mut b)?;
    let x = u32::from(u16::from_be_bytes([b[1], b[2]]));
    let y = u32::from(u16::from_be_bytes([b[3], b[4]]));
    let st = display.lock();
    let (w, h) = (st.surface.width, st.surface.height);
    drop(st);
    input.send(&InputRequest::Pointer {
        x: scale(x, w),
        y: scale(y, h),
        buttons: b[0] & 0x7,
    });
    Ok(())
}

/// ClientCutText: read and thrown away (no clipboard in the guest).
fn skip_cut_text(s: &mut VncStream) -> Result<(), VncError> {
    let mut b = [0u8; 7];
    s.read_exact(&mut b)?;
    // A negative length is the extended-clipboard form; either way, skip it.
    let len = i32::from_be_bytes([b[3], b[4], b[5], b[6]]).unsigned_abs();
    if len > MAX_CUT_TEXT {
        return Err(VncError::CutText(len));
    }
    io::copy(&mut Read::by_ref(s).take(u64::from(len)), &mut io::sink())?;
    Ok(())
}

/// A pointer coordinate in `0..size` scaled to the tablet's `0..=INPUT_ABS_MAX`.
pub fn scale(pos: u32, size: u32) -> u32 {
    let last = u64::from(size.max(2) - 1);
    (u64::from(pos.min(size.saturating_sub(1))) * u64::from(INPUT_ABS_MAX) / last) as u32
}

fn set_encodings(client: &Client, list: &[u8]) {
    let mut settings = client.settings.lock().unwrap_or_else(|e| e.into_inner());
    let mut preferred = None;
    settings.desktop_size = false;
    settings.cursor = false;
    for e in list.chunks_exact(4) {
        match i32::from_be_bytes([e[0], e[1], e[2], e[3]]) {
            ENCODING_RAW if preferred.is_none() => preferred = Some(ENCODING_RAW),
            ENCODING_ZRLE if preferred.is_none() => preferred = Some(ENCODING_ZRLE),
            ENCODING_DESKTOP_SIZE => settings.desktop_size = true,
            ENCODING_CURSOR => settings.cursor = true,
            _ => {}
        }
    }
    settings.zrle = preferred == Some(ENCODING_ZRLE);
    let cursor = settings.cursor;
    drop(settings);
    client.wants_cursor.store(cursor, Ordering::Relaxed);
    if cursor {
        client.slot.update(|p| p.cursor = true);
    }
}

/// What the writer sends in one FramebufferUpdate.
struct Frame {
    resize: Option<(u16, u16)>,
    cursor: Option<(Rect, Vec<u32>)>,
    rects: Vec<(Rect, Vec<u32>)>,
}

struct Writer {
    stream: VncStream,
    /// The framebuffer size the client knows.
    size: (u16, u16),
    zrle: ZrleEncoder,
}

impl Writer {
    fn run(&mut self, client: &Client, display: &Display) -> Result<(), VncError> {
        loop {
            let (damage, resized, cursor) = {
                let mut p = client.slot.lock();
                loop {
                    if p.closed {
                        return Ok(());
                    }
                    let cursor = p.cursor && client.wants_cursor.load(Ordering::Relaxed);
                    if p.requested && (!p.damage.is_empty() || p.resized || cursor) {
                        break;
                    }
                    p = client.slot.wake.wait(p).unwrap_or_else(|e| e.into_inner());
                }
                p.requested = false;
                let cursor = std::mem::take(&mut p.cursor);
                (p.damage.take(), std::mem::take(&mut p.resized), cursor)
            };
            let settings = client.settings();
            let frame = self.collect(display, &settings, damage, resized, cursor);
            let msg = self.encode(&frame, &settings)?;
            self.stream.write_all(&msg)?;
        }
    }

    /// Copies what is to be sent out of the display (holding its lock only for the copy).
    fn collect(
        &mut self,
        display: &Display,
        settings: &Settings,
        damage: Vec<Rect>,
        resized: bool,
        cursor: bool,
    ) -> Frame {
        let st = display.lock();
        let (sw, sh) = (st.surface.width, st.surface.height);
        let mut resize = None;
        let mut damage = damage;
        if resized && settings.desktop_size && (sw as u16, sh as u16) != self.size {
            self.size = (sw as u16, sh as u16);
            resize = Some(self.size);
            damage = vec![Rect::new(0, 0, sw, sh)];
        }
        let (cw, ch) = (
            u32::from(self.size.0).min(sw),
            u32::from(self.size.1).min(sh),
        );
        let rects = damage
            .into_iter()
            .map(|r| r.clip(cw, ch))
            .filter(|r| !r.is_empty())
            .map(|r| (r, st.surface.read(r)))
            .collect();
        let cursor = (cursor && settings.cursor).then(|| {
            let c = &st.cursor;
            if c.visible && c.defined {
                let side = crate::protocol::CURSOR_SIDE as u32;
                (Rect::new(c.hot_x, c.hot_y, side, side), c.image.clone())
            } else {
                (Rect::new(0, 0, 0, 0), Vec::new())
            }
        });
        Frame {
            resize,
            cursor,
            rects,
        }
    }

    fn encode(&mut self, frame: &Frame, settings: &Settings) -> Result<Vec<u8>, VncError> {
        let count = frame.rects.len()
            + usize::from(frame.resize.is_some())
            + usize::from(frame.cursor.is_some());
        let mut out = vec![0u8, 0];
        out.extend_from_slice(&(count as u16).to_be_bytes());
        let header = |out: &mut Vec<u8>, r: Rect, encoding: i32| {
            for v in [r.x, r.y, r.w, r.h] {
                out.extend_from_slice(&(v as u16).to_be_bytes());
            }
            out.extend_from_slice(&encoding.to_be_bytes());
        };
        if let Some((w, h)) = frame.resize {
            header(
                &mut out,
                Rect::new(0, 0, u32::from(w), u32::from(h)),
                ENCODING_DESKTOP_SIZE,
            );
        }
        if let Some((r, image)) = &frame.cursor {
            header(&mut out, *r, ENCODING_CURSOR);
            settings.format.put_all(&mut out, image);
            // Bit mask, one row of ceil(w / 8) bytes per line: opaque where alpha >= 128.
            for row in image.chunks(r.w.max(1) as usize) {
                for byte in row.chunks(8) {
                    let mut bits = 0u8;
                    for (i, p) in byte.iter().enumerate() {
                        if p >> 31 != 0 {
                            bits |= 0x80 >> i;
                        }
                    }
                    out.push(bits);
                }
            }
        }
        for (r, pixels) in &frame.rects {
            if settings.zrle {
                header(&mut out, *r, ENCODING_ZRLE);
                self.zrle.encode(&mut out, *r, pixels, &settings.format)?;
            } else {
                header(&mut out, *r, ENCODING_RAW);
                settings.format.put_all(&mut out, pixels);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_scaling_covers_the_tablet() {
        assert_eq!(scale(0, 1280), 0);
        assert_eq!(scale(1279, 1280), INPUT_ABS_MAX);
        assert_eq!(scale(5000, 1280), INPUT_ABS_MAX);
        assert_eq!(scale(640, 1281), INPUT_ABS_MAX / 2);
        assert_eq!(scale(0, 1), 0);
        assert_eq!(scale(0, 0), 0);
    }
}
