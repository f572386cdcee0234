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

use crate::device::DisplayOp;

/// Protocol features this GPU asks the display for: none (it makes its own EDID and sends
/// pixels in UPDATE messages, no DMABUF).
const WANTED_FEATURES: u64 = 0;

#[derive(Default)]
pub struct Display {
    /// The connection, and the generation it was announced as (see [`Display::detach`]).
    backend: Mutex<(Option<GpuBackend>, u64)>,
}

impl Display {
    /// Adopts connection `generation` (from [`Display::detach`]) after the protocol-feature
    /// handshake, unless a newer connection was announced meanwhile (a handshake with an old
    /// display that answers late must not replace the new one). Returns whether it did.
    pub fn attach(&self, backend: GpuBackend, generation: u64) -> std::io::Result<bool> {
        let offered = backend.get_protocol_features()?.value;
        backend.set_protocol_features(&VhostUserU64::new(offered & WANTED_FEATURES))?;
        let mut guard = self.backend.lock().expect("display lock");
        if guard.1 != generation {
            return Ok(false);
        }
        guard.0 = Some(backend);
        log::info!("display connected (protocol features {offered:#x})");
        Ok(true)
    }

    /// Drops the current connection ahead of a new one; returns the new one's generation.
    pub fn detach(&self) -> u64 {
        let mut guard = self.backend.lock().expect("display lock");
        guard.0 = None;
        guard.1 += 1;
        guard.1
    }

    pub fn connected(&self) -> bool {
        self.backend.lock().expect("display lock").0.is_some()
    }

    /// Sends `ops` in order. On a failure the display is dropped (one warning).
    pub fn send(&self, ops: &[DisplayOp]) {
        if ops.is_empty() {
            return;
        }
        let mut guard = self.backend.lock().expect("display lock");
        let Some(backend) = guard.0.as_ref() else {
            return;
        };
        for op in ops {
            if let Err(e) = send_one(backend, op) {
                log::warn!("display connection lost ({e}); carrying on without a display");
                guard.0 = None;
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::protocol::Rect;

    /// A display end that answers GET_PROTOCOL_FEATURES and returns every other message
    /// (request, payload) it reads.
    fn peer(mut s: UnixStream) -> std::thread::JoinHandle<Vec<(u32, Vec<u8>)>> {
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut hdr = [0u8; 12];
            while s.read_exact(&mut hdr).is_ok() {
                let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
                let mut payload = vec![0u8; word(8) as usize];
                s.read_exact(&mut payload).unwrap();
                if word(0) == 1 {
                    let mut reply = vec![1, 0, 0, 0, 4, 0, 0, 0, 8, 0, 0, 0];
                    reply.extend_from_slice(&3u64.to_le_bytes());
                    s.write_all(&reply).unwrap();
                } else {
                    seen.push((word(0), payload));
                }
            }
            seen
        })
    }

    #[test]
    fn the_newest_connection_wins_and_a_lost_one_is_dropped() {
        let display = Display::default();
        let (old_gpu, old_display) = UnixStream::pair().unwrap();
        let (new_gpu, new_display) = UnixStream::pair().unwrap();
        let (old_peer, new_peer) = (peer(old_display), peer(new_display));
        let old_gen = display.detach();
        let new_gen = display.detach();
        // The old handshake finishes last but must not replace the new connection.
        assert!(display
            .attach(GpuBackend::from_stream(new_gpu), new_gen)
            .unwrap());
        assert!(!display
            .attach(GpuBackend::from_stream(old_gpu), old_gen)
            .unwrap());
        assert!(display.connected());
        display.send(&[
            DisplayOp::Scanout {
                scanout: 0,
                width: 2,
                height: 1,
            },
            DisplayOp::Update {
                scanout: 0,
                rect: Rect {
                    x: 1,
                    y: 0,
                    width: 1,
                    height: 1,
                },
                data: vec![9, 8, 7, 6],
            },
        ]);
        let seen = |h: std::thread::JoinHandle<Vec<(u32, Vec<u8>)>>| h.join().unwrap();
        display.detach();
        let new = seen(new_peer);
        assert_eq!(
            new[0],
            (2, 0u64.to_le_bytes().to_vec()),
            "SET_PROTOCOL_FEATURES 0"
        );
        assert_eq!(new[1].0, 7);
        assert_eq!(new[1].1, [0, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(new[2].0, 8);
        assert_eq!(new[2].1[20..], [9, 8, 7, 6]);
        assert_eq!(
            seen(old_peer).len(),
            1,
            "the old display only saw the handshake"
        );
        // A display that went away: the send fails once and the device carries on without.
        let (gpu, mut gone) = UnixStream::pair().unwrap();
        let generation = display.detach();
        let handshake = std::thread::spawn(move || {
            let mut buf = [0u8; 12];
            gone.read_exact(&mut buf).unwrap();
            let mut reply = vec![1, 0, 0, 0, 4, 0, 0, 0, 8, 0, 0, 0];
            reply.extend_from_slice(&0u64.to_le_bytes());
            gone.write_all(&reply).unwrap();
            let mut set = [0u8; 20];
            gone.read_exact(&mut set).unwrap();
            // Shut the socket down rather than only dropping this fd: a test running
            // beside this one may fork a child that inherits a copy of it, and the
            // connection stays open until the last copy closes.
            gone.shutdown(std::net::Shutdown::Both).unwrap();
        });
        assert!(display
            .attach(GpuBackend::from_stream(gpu), generation)
            .unwrap());
        handshake.join().unwrap();
        let op = DisplayOp::CursorMove {
            scanout: 0,
            x: 1,
            y: 2,
        };
        display.send(std::slice::from_ref(&op));
        assert!(!display.connected());
        display.send(&[op]);
    }
}
