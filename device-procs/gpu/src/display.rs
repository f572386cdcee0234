//! The display end of the vhost-user-gpu protocol, as seen from the GPU: the socket the
//! frontend passed with VHOST_USER_GPU_SET_SOCKET (in Isola, a connection to the display
//! process that the core made and handed over). Messages go out with the `vhost` crate's
//! `GpuBackend`; this wraps it so that a display that goes away costs one log line and the
//! device keeps serving the guest without one.

use std::sync::Mutex;

use vhost::vhost_user::gpu_message::{
    VhostUserGpuCursorPos, VhostUserGpuCursorUpdate, VhostUserGpuScanout, VhostUserGpuUpdate,
};
use vhost::vhost_user::message::VhostUserU64;
use vhost::vhost_user::GpuBackend;

use crate::gpu::DisplayOp;

/// Protocol features this GPU asks the display for: none (it makes its own EDID and sends
/// pixels in UPDATE messages, no DMABUF).
const WANTED_FEATURES: u64 = 0;

#[derive(Default)]
pub struct Display {
    backend: Mutex<Option<GpuBackend>>,
}

impl Display {
    /// Adopts a new display connection (replacing any old one) after the protocol-feature
    /// handshake.
    pub fn attach(&self, backend: GpuBackend) -> std::io::Result<()> {
        let offered = backend.get_protocol_features()?.value;
        backend.set_protocol_features(&VhostUserU64::new(offered & WANTED_FEATURES))?;
        *self.backend.lock().expect("display lock") = Some(backend);
        log::info!("display connected (protocol features {offered:#x})");
        Ok(())
    }

    pub fn detach(&self) {
        self.backend.lock().expect("display lock").take();
    }

    pub fn connected(&self) -> bool {
        self.backend.lock().expect("display lock").is_some()
    }

    /// Sends `ops` in order. On a failure the display is dropped (one warning).
    pub fn send(&self, ops: &[DisplayOp]) {
        if ops.is_empty() {
            return;
        }
        let mut guard = self.backend.lock().expect("display lock");
        let Some(backend) = guard.as_ref() else {
            return;
        };
        for op in ops {
            if let Err(e) = send_one(backend, op) {
                log::warn!("display connection lost ({e}); carrying on without a display");
                *guard = None;
                return;
            }
        }
    }
}

fn send_one(backend: &GpuBackend, op: &DisplayOp) -> std::io::Result<()> {
    match op {
        DisplayOp::Scanout {
            scanout,
            width,
            height,
        } => backend.set_scanout(&VhostUserGpuScanout {
            scanout_id: *scanout,
            width: *width,
            height: *height,
        }),
        DisplayOp::Update {
            scanout,
            rect,
            data,
        } => backend.update_scanout(
            &VhostUserGpuUpdate {
                scanout_id: *scanout,
                x: rect.x,
                y: rect.y,
                width: rect.width,
                height: rect.height,
            },
            data,
        ),
        DisplayOp::CursorUpdate {
            scanout,
            x,
            y,
            hot_x,
            hot_y,
            image,
        } => backend.cursor_update(
            &VhostUserGpuCursorUpdate {
                pos: VhostUserGpuCursorPos {
                    scanout_id: *scanout,
                    x: *x,
                    y: *y,
                },
                hot_x: *hot_x,
                hot_y: *hot_y,
            },
            image,
        ),
        DisplayOp::CursorMove { scanout, x, y } => backend.cursor_pos(&VhostUserGpuCursorPos {
            scanout_id: *scanout,
            x: *x,
            y: *y,
        }),
        DisplayOp::CursorHide { scanout, x, y } => {
            backend.cursor_pos_hide(&VhostUserGpuCursorPos {
                scanout_id: *scanout,
                x: *x,
                y: *y,
            })
        }
    }
}
