//! The control socket (`--control`): `isolactl screenshot` and status, as
//! [`DisplayRequest`]/[`DisplayResponse`] framed by `isola_ipc`.

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use isola_device_common::logging::chain;
use isola_device_common::thread::spawn_named;
use isola_ipc::display::{DisplayRequest, DisplayResponse, DisplayStatus};
use isola_ipc::{IpcError, MAX_FRAME};

use crate::framebuffer::{Display, Surface};

#[derive(Debug, thiserror::Error)]
pub enum PngError {
    #[error("PNG encoding failed")]
    Encode(#[from] png::EncodingError),
}

/// Encodes a surface as an 8-bit RGB PNG (fast deflate: a screenshot is asked for
/// interactively, and screens compress well anyway).
pub fn encode_png(s: &Surface) -> Result<Vec<u8>, PngError> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, s.width, s.height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        let mut writer = enc.write_header()?;
        let mut rgb = Vec::with_capacity(s.pixels.len() * 3);
        for p in &s.pixels {
            rgb.extend_from_slice(&[(p >> 16) as u8, (p >> 8) as u8, *p as u8]);
        }
        writer.write_image_data(&rgb)?;
        writer.finish()?;
    }
    Ok(out)
}

/// The answer to one request.
pub fn answer(display: &Display, request: DisplayRequest) -> DisplayResponse {
    match request {
        DisplayRequest::Screenshot { scanout } if scanout != 0 => {
            DisplayResponse::Error(format!("scanout {scanout} is not shown; only scanout 0 is"))
        }
        DisplayRequest::Screenshot { .. } => {
            let Some(surface) = display.snapshot() else {
                return DisplayResponse::Error(
                    "scanout 0 has no picture: the GPU has not set it up (or disabled it)".into(),
                );
            };
            match encode_png(&surface) {
                // Room for the frame's own fields around the PNG.
                Ok(png) if png.len() as u64 + 64 > u64::from(MAX_FRAME) => {
                    DisplayResponse::Error(format!(
                        "the PNG is {} bytes, more than a control message carries",
                        png.len()
                    ))
                }
                Ok(png) => DisplayResponse::Screenshot {
                    width: surface.width,
                    height: surface.height,
                    png,
                },
                Err(e) => DisplayResponse::Error(chain(&e)),
            }
        }
        DisplayRequest::Status => {
            let st = display.lock();
            DisplayResponse::Status(DisplayStatus {
                scanouts: vec![st.enabled.then_some((st.surface.width, st.surface.height))],
                gpu_connected: st.gpu_connected,
                vnc_clients: st.vnc_clients(),
                updates: st.updates,
            })
        }
    }
}

fn serve_client(mut stream: UnixStream, display: &Display) {
    loop {
        let request = match isola_ipc::read_message::<_, DisplayRequest>(&mut stream) {
            Ok(request) => request,
            Err(IpcError::Closed) => return,
            Err(e @ (IpcError::Version { .. } | IpcError::Decode(_))) => {
                let _ = isola_ipc::write_message(&mut stream, &DisplayResponse::Error(chain(&e)));
                log::warn!("control request refused: {}", chain(&e));
                return;
            }
            Err(e) => {
                log::warn!("control connection closed: {}", chain(&e));
                return;
            }
        };
        if let Err(e) = isola_ipc::write_message(&mut stream, &answer(display, request)) {
            log::warn!("cannot answer a control request: {}", chain(&e));
            return;
        }
    }
}

/// Serves the control socket forever, one thread per connection.
pub fn serve(listener: UnixListener, display: Arc<Display>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let display = Arc::clone(&display);
                if let Err(e) = spawn_named("control", move || serve_client(stream, &display)) {
                    log::warn!("cannot start a control thread: {e}");
                }
            }
            Err(e) => log::warn!("accepting a control connection failed: {e}"),
        }
    }
}
