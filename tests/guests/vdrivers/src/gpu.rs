//! virtio-gpu (2D) through the crate's `VirtIOGpu`. Modes (`vdrivers.mode=`):
//!
//! * `draw` (default): `display=<w>x<h>` (GET_DISPLAY_INFO), `edid=<w>x<h>` if EDID was
//!   negotiated, then the crate's framebuffer setup (RESOURCE_CREATE_2D, ATTACH_BACKING,
//!   SET_SCANOUT), frame `frame` of `isola_guests::gpu_pixel` drawn into it, TRANSFER_TO_HOST_2D
//!   and RESOURCE_FLUSH: `flushed <w>x<h> frame=<n>`; then the guest stays `hold` ms.
//! * `resets`: `resets` rounds of a new driver (reset + initialisation) drawing and flushing
//!   frame (round % 3) + 1, then `hold` ms as above with `last frame=<n>`.
//! * `loop`: one driver redrawing and flushing frames 1, 2, 3, 1, ... for `ms` milliseconds
//!   (`frame <k> flushed` every 20th), then frame 1 again: `frames=<n> longest-wait-ms=<ms>`
//!   and `last frame=1`. The crate's requests block without a deadline, so a device process
//!   killed meanwhile is a pause (the test bounds the run).

use crate::pci::SpecTransport;
use virtio_drivers::device::gpu::VirtIOGpu;
use virtio_drivers::transport::DeviceType;

use crate::hal::{dma_pages_in_use, IdentityHal};
use crate::pci::{self, Root};
use crate::rt::{self, exit, Deadline};
use crate::{fail, say};

type Gpu = VirtIOGpu<IdentityHal, SpecTransport>;

pub fn run() {
    let mut buf = [0u8; 16];
    let mode = rt::arg("mode", &mut buf).unwrap_or("draw");
    let mut root = pci::root();
    match mode {
        "draw" => draw(&mut root),
        "resets" => resets(&mut root),
        "loop" => run_loop(&mut root),
        _ => fail!(exit::SETUP, "unknown vdrivers.mode={mode:?}"),
    }
    let hold = rt::arg_u64("hold", 0);
    let end = Deadline::after_ms(hold);
    while !end.passed() {
        core::hint::spin_loop();
    }
}

/// Pixel (x, y) of frame `frame` as (red, green, blue): `isola_guests::gpu_pixel`.
fn pixel(x: u32, y: u32, frame: u32) -> [u8; 3] {
    let b = x.wrapping_mul(5).wrapping_add(frame * 40) & 0xff;
    let g = y.wrapping_mul(3).wrapping_add((x >> 8) * 64) & 0xff;
    let r = (x ^ y).wrapping_add(frame * 100) & 0xff;
    [r as u8, g as u8, b as u8]
}

fn open(root: &mut Root, report: bool) -> Gpu {
    let function = pci::find(root, DeviceType::GPU, 0);
    let mut transport = pci::transport(root, function);
    if report {
        pci::report_features(&mut transport);
    }
    match Gpu::new(transport) {
        Ok(g) => g,
        Err(e) => fail!(exit::FAILED, "VirtIOGpu::new: {e}"),
    }
}

/// Frame `frame` into a B8G8R8A8 framebuffer of `w` x `h`.
fn paint(fb: &mut [u8], w: u32, h: u32, frame: u32) {
    for y in 0..h {
        for x in 0..w {
            let [r, g, b] = pixel(x, y, frame);
            let at = ((y * w + x) * 4) as usize;
            // B8G8R8A8_UNORM, the crate's format.
            fb[at..at + 4].copy_from_slice(&[b, g, r, 0xff]);
        }
    }
}

fn run_loop(root: &mut Root) {
    let ms = rt::arg_u64("ms", 5000);
    let mut gpu = open(root, true);
    let (w, h) = show(&mut gpu, 1, true);
    say!("flushed {w}x{h} frame=1");
    let end = Deadline::after_ms(ms);
    let mut frames = 1u64;
    let mut longest = 0;
    while !end.passed() {
        let frame = (frames % 3) as u32 + 1;
        let fb = match gpu.setup_framebuffer() {
            Ok(fb) => fb,
            Err(e) => fail!(exit::FAILED, "frame {frames}: framebuffer setup: {e}"),
        };
        paint(fb, w, h, frame);
        let start = rt::now_ms();
        if let Err(e) = gpu.flush() {
            fail!(exit::FAILED, "frame {frames}: transfer + flush: {e}");
        }
        longest = longest.max(rt::now_ms().saturating_sub(start));
        frames += 1;
        if frames.is_multiple_of(20) {
            say!("frame {frames} flushed");
        }
    }
    show(&mut gpu, 1, false);
    say!("frames={frames} longest-wait-ms={longest}");
    say!("last frame=1");
    core::mem::forget(gpu);
}

/// Display info, framebuffer, frame `frame`, transfer + flush; returns the size.
fn show(gpu: &mut Gpu, frame: u32, report: bool) -> (u32, u32) {
    let (w, h) = match gpu.resolution() {
        Ok(r) => r,
        Err(e) => fail!(exit::FAILED, "GET_DISPLAY_INFO: {e}"),
    };
    if report {
        say!("display={w}x{h}");
        match gpu.edid_preferred_resolution() {
            Ok((ew, eh)) => say!("edid={ew}x{eh}"),
            Err(e) => say!("edid: {e}"),
        }
    }
    let fb = match gpu.setup_framebuffer() {
        Ok(fb) => fb,
        Err(e) => fail!(exit::FAILED, "framebuffer setup: {e}"),
    };
    if fb.len() < (w * h * 4) as usize {
        fail!(
            exit::FAILED,
            "framebuffer of {} bytes for {w}x{h}",
            fb.len()
        );
    }
    paint(fb, w, h, frame);
    if let Err(e) = gpu.flush() {
        fail!(exit::FAILED, "transfer + flush: {e}");
    }
    (w, h)
}

fn draw(root: &mut Root) {
    let mut gpu = open(root, true);
    let frame = rt::arg_u64("frame", 1) as u32;
    let (w, h) = show(&mut gpu, frame, true);
    say!("flushed {w}x{h} frame={frame}");
    // The driver (and its resources) stay alive while the guest holds.
    core::mem::forget(gpu);
}

fn resets(root: &mut Root) {
    let times = rt::arg_u64("resets", 100);
    let baseline = dma_pages_in_use();
    let mut last = 0;
    for round in 0..times {
        let mut gpu = open(root, round == 0);
        last = (round % 3) as u32 + 1;
        show(&mut gpu, last, round == 0);
        if round + 1 == times {
            core::mem::forget(gpu);
            break;
        }
        drop(gpu);
        if dma_pages_in_use() != baseline {
            fail!(exit::FAILED, "round {round}: DMA pages not returned");
        }
    }
    say!("resets={times} each flushed");
    say!("last frame={last}");
}
