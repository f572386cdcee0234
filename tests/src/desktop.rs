//! The whole desktop chain with real processes on every side, for `tests/tests/desktop.rs`:
//! the `desktop` guest in `isola-core` with a GPU backend (`isola-gpu` or QEMU's
//! `vhost-user-gpu`) whose display end is `isola-display`, and `isola-input`'s keyboard and
//! tablet fed by `isola-display`'s VNC server. Built from the helpers of `display.rs`,
//! `gpu.rs` and `input.rs`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::display::{screenshot, IsolaDisplay};
use crate::input::IsolaInput;
use crate::{guest, wait_for_path, Core};

/// The screen the tests use: small, so a full-screen comparison is cheap.
pub const WIDTH: u32 = 320;
pub const HEIGHT: u32 = 200;

/// Frame `n` of the guest's picture (`isola_guests::gpu_pixel`) as XRGB words, the form
/// `display::screenshot` and `display::read_ppm` return.
pub fn expected_frame(n: u32) -> Vec<u32> {
    let mut px = Vec::with_capacity((WIDTH * HEIGHT) as usize);
    for y in 0..HEIGHT {
        for x in 0..WIDTH {
            let [r, g, b] = isola_guests::gpu_pixel(x, y, n);
            px.push((u32::from(r) << 16) | (u32::from(g) << 8) | u32::from(b));
        }
    }
    px
}

/// isola-display (VNC on a loopback port, input to isola-input) and isola-input, started in
/// `dir`; the GPU backend and the core are the caller's.
pub struct Desk {
    pub display: IsolaDisplay,
    pub input: IsolaInput,
    pub gpu_socket: PathBuf,
    pub control: PathBuf,
}

impl Desk {
    pub fn start(dir: &Path) -> Desk {
        let input = IsolaInput::start(dir, &[]);
        let display = Self::start_display(dir, &input);
        Desk {
            display,
            input,
            gpu_socket: dir.join("gpu.sock"),
            control: dir.join("control.sock"),
        }
    }

    /// isola-display on `dir/display.sock`, VNC on a loopback port, input to `input`.
    fn start_display(dir: &Path, input: &IsolaInput) -> IsolaDisplay {
        let (w, h) = (WIDTH.to_string(), HEIGHT.to_string());
        // isola-display connects to isola-input on the first VNC event.
        IsolaDisplay::start(
            dir,
            true,
            &[
                "--width",
                &w,
                "--height",
                &h,
                "--input",
                input.control.to_str().expect("utf-8 path"),
            ],
        )
    }

    /// Starts isola-display again on the same sockets, as the supervisor does after it died
    /// (the caller killed it); the old process is reaped. The new one starts blank.
    pub fn restart_display(&mut self, dir: &Path) {
        let new = Self::start_display(dir, &self.input);
        drop(std::mem::replace(&mut self.display, new));
    }

    /// Starts the core on the `desktop` guest: the GPU (display = isola-display), then the
    /// keyboard and the tablet.
    pub fn start_core(&self, cmdline: &str) -> Core {
        let kernel = guest("desktop.elf");
        let gpu = format!(
            "gpu,socket={},display={}",
            self.gpu_socket.display(),
            self.display.socket.display()
        );
        let [kbd, tablet] = self.input.device_args();
        let core = Core::start(&[
            "--kernel",
            kernel.to_str().expect("utf-8 path"),
            "--memory",
            "64",
            "--device",
            &gpu,
            "--device",
            &kbd,
            "--device",
            &tablet,
            "--device-timeout",
            "20",
            "--control-socket",
            self.control.to_str().expect("utf-8 path"),
            "--cmdline",
            cmdline,
        ]);
        wait_for_path(&self.control, Duration::from_secs(20));
        core
    }

    /// Takes screenshots (`isolactl --display ... screenshot`) until one shows frame `n`;
    /// panics with the last difference after `timeout`.
    pub fn wait_screenshot(&self, dir: &Path, n: u32, timeout: Duration) {
        wait_screenshot(&self.display.control, dir, n, timeout);
    }
}

/// Takes screenshots of the display whose control socket is `control` (`isolactl --display
/// CONTROL screenshot DIR/frameN.png`) until one shows frame `n` at [`WIDTH`] x [`HEIGHT`];
/// panics with the last difference after `timeout`.
pub fn wait_screenshot(control: &Path, dir: &Path, n: u32, timeout: Duration) {
    let want = expected_frame(n);
    let deadline = Instant::now() + timeout;
    let out = dir.join(format!("frame{n}.png"));
    loop {
        let (w, h, got) = screenshot(control, &out);
        let diff = if (w, h) != (WIDTH, HEIGHT) {
            Some(format!("size {w}x{h}"))
        } else {
            crate::display::first_difference(&got, &want, WIDTH)
        };
        let Some(diff) = diff else { return };
        assert!(
            Instant::now() < deadline,
            "the screenshot never showed frame {n}: {diff}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
