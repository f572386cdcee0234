//! The picture: what the GPU backend last showed on scanout 0, the cursor, and the damage
//! each VNC client has not been sent yet.
//!
//! One [`Display`] is shared by the GPU session (the only writer of pixels), the control
//! socket (screenshots) and the VNC clients. The GPU session holds the lock only to copy an
//! update in and to add its rectangle to each client's [`Damage`], which is a handful of
//! rectangles merged into their bounding box when there are more: a slow client never makes
//! anything queue up, it just gets the latest pixels of a larger area when it asks next.
//!
//! Lock order: the display's lock, then a client's lock; a client thread never takes the
//! display's lock while holding its own.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

use crate::protocol::CURSOR_SIDE;

/// A rectangle in scanout pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

impl Rect {
    pub fn new(x: u32, y: u32, w: u32, h: u32) -> Rect {
        Rect { x, y, w, h }
    }

    pub fn is_empty(&self) -> bool {
        self.w == 0 || self.h == 0
    }

    // Rectangles come from peers (a VNC client's update request, the GPU's UPDATE): an
    // edge past u32::MAX saturates, which still clips and unites as the geometry says.
    fn right(&self) -> u32 {
        self.x.saturating_add(self.w)
    }

    fn bottom(&self) -> u32 {
        self.y.saturating_add(self.h)
    }

    pub fn union(&self, o: &Rect) -> Rect {
        let x = self.x.min(o.x);
        let y = self.y.min(o.y);
        Rect::new(
            x,
            y,
            self.right().max(o.right()) - x,
            self.bottom().max(o.bottom()) - y,
        )
    }

    /// The part of `self` inside `0..w` x `0..h`.
    pub fn clip(&self, w: u32, h: u32) -> Rect {
        let x = self.x.min(w);
        let y = self.y.min(h);
        Rect::new(x, y, self.right().min(w) - x, self.bottom().min(h) - y)
    }
}

/// Most rectangles a client's damage keeps before merging them.
const MAX_DAMAGE_RECTS: usize = 4;

/// Regions changed since a client was last sent them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Damage {
    rects: Vec<Rect>,
}

impl Damage {
    pub fn add(&mut self, r: Rect) {
        if r.is_empty() {
            return;
        }
        if self.rects.iter().any(|d| d.union(&r) == *d) {
            return;
        }
        self.rects.retain(|d| r.union(d) != r);
        self.rects.push(r);
        if self.rects.len() > MAX_DAMAGE_RECTS {
            let all = self
                .rects
                .iter()
                .skip(1)
                .fold(self.rects[0], |a, b| a.union(b));
            self.rects = vec![all];
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rects.is_empty()
    }

    pub fn take(&mut self) -> Vec<Rect> {
        std::mem::take(&mut self.rects)
    }
}

/// What one VNC client still has to be sent.
#[derive(Debug, Default)]
pub struct Pending {
    pub damage: Damage,
    /// The scanout changed size since the client was last told.
    pub resized: bool,
    /// The cursor image changed.
    pub cursor: bool,
    /// The client asked for an update (FramebufferUpdateRequest) not yet answered.
    pub requested: bool,
    /// The client's connection is ending.
    pub closed: bool,
}

/// A client's mailbox: the GPU session adds damage and wakes the client's writer.
#[derive(Debug, Default)]
pub struct ClientSlot {
    pub pending: Mutex<Pending>,
    pub wake: Condvar,
}

impl ClientSlot {
    pub fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn update(&self, f: impl FnOnce(&mut Pending)) {
        f(&mut self.lock());
        self.wake.notify_all();
    }
}

/// The 64 x 64 cursor and where it is.
#[derive(Debug, Clone)]
pub struct Cursor {
    /// ARGB words, row by row.
    pub image: Vec<u32>,
    pub hot_x: u32,
    pub hot_y: u32,
    pub x: u32,
    pub y: u32,
    pub visible: bool,
    /// Whether the GPU ever defined a cursor image.
    pub defined: bool,
}

/// Scanout 0's pixels (XRGB words, row by row).
#[derive(Debug, Clone)]
pub struct Surface {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u32>,
}

impl Surface {
    fn black(width: u32, height: u32) -> Surface {
        Surface {
            width,
            height,
            pixels: vec![0; width as usize * height as usize],
        }
    }

    /// Copies out `r` (which must lie inside the surface).
    pub fn read(&self, r: Rect) -> Vec<u32> {
        let mut out = Vec::with_capacity(r.w as usize * r.h as usize);
        for row in r.y..r.y + r.h {
            let start = row as usize * self.width as usize + r.x as usize;
            out.extend_from_slice(&self.pixels[start..start + r.w as usize]);
        }
        out
    }
}

/// Everything behind the display's lock.
#[derive(Debug)]
pub struct State {
    pub surface: Surface,
    /// The GPU set scanout 0 and has not disabled it.
    pub enabled: bool,
    pub cursor: Cursor,
    pub gpu_connected: bool,
    /// The GPU session currently connected (a new one replaces the old).
    pub session: u64,
    pub updates: u64,
    clients: Vec<Weak<ClientSlot>>,
}

impl State {
    fn each_client(&mut self, mut f: impl FnMut(&mut Pending)) {
        self.clients.retain(|c| match c.upgrade() {
            Some(slot) => {
                slot.update(&mut f);
                true
            }
            None => false,
        });
    }

    pub fn vnc_clients(&self) -> u32 {
        self.clients.iter().filter(|c| c.strong_count() > 0).count() as u32
    }
}

/// The shared picture.
#[derive(Debug)]
pub struct Display {
    state: Mutex<State>,
}

impl Display {
    /// A black display of the configured size, no GPU connected yet.
    pub fn new(width: u32, height: u32) -> Display {
        Display {
            state: Mutex::new(State {
                surface: Surface::black(width, height),
                enabled: false,
                cursor: Cursor {
                    image: vec![0; CURSOR_SIDE * CURSOR_SIDE],
                    hot_x: 0,
                    hot_y: 0,
                    x: 0,
                    y: 0,
                    visible: false,
                    defined: false,
                },
                gpu_connected: false,
                session: 0,
                updates: 0,
                clients: Vec::new(),
            }),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking holder cannot leave the picture inconsistent in a way that matters
        // more than stopping the display would.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new client's mailbox, with the whole screen damaged.
    pub fn register_client(&self) -> Arc<ClientSlot> {
        let slot = Arc::new(ClientSlot::default());
        let mut st = self.lock();
        let (w, h) = (st.surface.width, st.surface.height);
        slot.lock().damage.add(Rect::new(0, 0, w, h));
        slot.lock().cursor = st.cursor.defined;
        st.clients.push(Arc::downgrade(&slot));
        slot
    }

    /// A GPU session starts (replacing any other); returns its number.
    pub fn session_started(&self) -> u64 {
        let mut st = self.lock();
        st.session += 1;
        st.gpu_connected = true;
        st.session
    }

    /// Session `id` ended; unless a newer one replaced it, no GPU is connected now. The
    /// picture stays.
    pub fn session_ended(&self, id: u64) {
        let mut st = self.lock();
        if st.session == id {
            st.gpu_connected = false;
        }
    }

    /// SCANOUT with a size (already checked against the limits).
    pub fn set_scanout(&self, width: u32, height: u32) {
        let mut st = self.lock();
        st.enabled = true;
        if (st.surface.width, st.surface.height) != (width, height) {
            st.surface = Surface::black(width, height);
            st.each_client(|p| {
                p.resized = true;
                p.damage = Damage::default();
                p.damage.add(Rect::new(0, 0, width, height));
            });
        }
    }

    /// SCANOUT with size 0: the screen goes black, its size stays.
    pub fn disable_scanout(&self) {
        let mut st = self.lock();
        st.enabled = false;
        st.surface.pixels.fill(0);
        let (w, h) = (st.surface.width, st.surface.height);
        st.each_client(|p| p.damage.add(Rect::new(0, 0, w, h)));
    }

    /// Copies an UPDATE in. `data` must hold exactly `r.w * r.h` native-endian words and `r`
    /// must lie inside the surface: the session checks both, and this re-checks rather than
    /// trust it.
    pub fn update(&self, r: Rect, data: &[u8]) -> bool {
        let mut st = self.lock();
        let (sw, sh) = (st.surface.width, st.surface.height);
        let fits = r.x.checked_add(r.w).is_some_and(|e| e <= sw)
            && r.y.checked_add(r.h).is_some_and(|e| e <= sh)
            && data.len() as u64 == u64::from(r.w) * u64::from(r.h) * 4;
        if !fits || !st.enabled {
            return false;
        }
        st.updates += 1;
        if r.is_empty() {
            return true;
        }
        let row_bytes = r.w as usize * 4;
        for (i, src) in data.chunks_exact(row_bytes).enumerate() {
            let start = (r.y as usize + i) * sw as usize + r.x as usize;
            let dst = &mut st.surface.pixels[start..start + r.w as usize];
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = u32::from_ne_bytes([s[0], s[1], s[2], s[3]]) & 0x00ff_ffff;
            }
        }
        st.each_client(|p| p.damage.add(r));
        true
    }

    /// CURSOR_UPDATE: a new image (64 x 64 native-endian ARGB) and hot spot.
    pub fn set_cursor(&self, image: &[u8], hot_x: u32, hot_y: u32, x: u32, y: u32) {
        let mut st = self.lock();
        let c = &mut st.cursor;
        for (d, s) in c.image.iter_mut().zip(image.chunks_exact(4)) {
            *d = u32::from_ne_bytes([s[0], s[1], s[2], s[3]]);
        }
        c.hot_x = hot_x.min(CURSOR_SIDE as u32 - 1);
        c.hot_y = hot_y.min(CURSOR_SIDE as u32 - 1);
        c.x = x;
        c.y = y;
        c.visible = true;
        c.defined = true;
        st.each_client(|p| p.cursor = true);
    }

    /// CURSOR_POS / CURSOR_POS_HIDE.
    pub fn move_cursor(&self, x: u32, y: u32, visible: bool) {
        let mut st = self.lock();
        let changed = st.cursor.visible != visible;
        st.cursor.x = x;
        st.cursor.y = y;
        st.cursor.visible = visible;
        if changed {
            st.each_client(|p| p.cursor = true);
        }
    }

    /// Scanout 0's picture, if the GPU has one enabled.
    pub fn snapshot(&self) -> Option<Surface> {
        let st = self.lock();
        st.enabled.then(|| st.surface.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    #[test]
    fn rectangles_past_the_end_of_u32_clip_and_unite_without_overflow() {
        let huge = Rect::new(u32::MAX - 1, 5, u32::MAX, u32::MAX);
        assert_eq!(huge.clip(640, 480), Rect::new(640, 5, 0, 475));
        assert_eq!(
            Rect::new(0, 0, 1, 1).union(&huge),
            Rect::new(0, 0, u32::MAX, u32::MAX)
        );
    }

    #[test]
    fn damage_merges_and_is_bounded() {
        let mut d = Damage::default();
        d.add(Rect::new(0, 0, 10, 10));
        d.add(Rect::new(2, 2, 3, 3)); // inside: nothing new
        assert_eq!(d.rects.len(), 1);
        for i in 0..10 {
            d.add(Rect::new(100 * i, 50, 5, 5));
        }
        assert!(d.rects.len() <= MAX_DAMAGE_RECTS);
        let all = d.take();
        let bbox = all.iter().skip(1).fold(all[0], |a, b| a.union(b));
        assert_eq!(bbox, Rect::new(0, 0, 905, 55));
        assert!(d.is_empty());
    }

    #[test]
    fn updates_land_and_bad_ones_are_refused() {
        let display = Display::new(4, 3);
        assert!(
            !display.update(Rect::new(0, 0, 1, 1), &bytes(&[1])),
            "not enabled yet"
        );
        display.set_scanout(4, 3);
        let client = display.register_client();
        client.lock().damage.take();
        assert!(display.update(Rect::new(1, 1, 2, 1), &bytes(&[0xff11_2233, 0x0044_5566])));
        let snap = display.snapshot().unwrap();
        assert_eq!(snap.pixels[5..7], [0x0011_2233, 0x0044_5566]);
        assert_eq!(client.lock().damage.take(), vec![Rect::new(1, 1, 2, 1)]);
        // Outside, overflowing, and short data.
        assert!(!display.update(Rect::new(3, 0, 2, 1), &bytes(&[0, 0])));
        assert!(!display.update(Rect::new(u32::MAX, 0, 2, 1), &bytes(&[0, 0])));
        assert!(!display.update(Rect::new(0, 0, 2, 2), &bytes(&[0, 0])));
        assert!(client.lock().damage.is_empty());
    }

    #[test]
    fn resize_marks_clients_and_disable_blacks_out() {
        let display = Display::new(4, 3);
        display.set_scanout(4, 3);
        display.update(Rect::new(0, 0, 1, 1), &bytes(&[7]));
        let client = display.register_client();
        display.set_scanout(8, 2);
        assert!(client.lock().resized);
        assert_eq!(display.snapshot().unwrap().pixels, vec![0; 16]);
        display.disable_scanout();
        assert!(display.snapshot().is_none());
        drop(client);
        display.set_scanout(8, 2);
        assert_eq!(display.lock().vnc_clients(), 0);
    }
}
