//! virtio-gpu driven by the crates.io `virtio-drivers` crate (the `vdrivers` guest, its 2D
//! `VirtIOGpu`) against `isola-gpu` (`--resolution WxH`, what `isola-run --display WxH` passes)
//! and `isola-display`: display info is that size, and `isolactl --display ... screenshot`
//! equals the guest's picture pixel for pixel; 100 resets; isola-gpu killed mid-work.

use std::path::Path;
use std::time::{Duration, Instant};

use isola_ipc::DeviceLink;
use isola_tests::display::{first_difference, screenshot, IsolaDisplay};
use isola_tests::gpu::IsolaGpu;
use isola_tests::vdrivers::{self, assert_ok, cmdline, field, number, report, RUN_TIMEOUT};
use isola_tests::{scratch_dir, wait_device, Core};

/// Not the default, so the size can only come from the option.
const W: u32 = 400;
const H: u32 = 240;
const RESOLUTION: &str = "400x240";

fn display(dir: &Path) -> IsolaDisplay {
    let (w, h) = (W.to_string(), H.to_string());
    IsolaDisplay::start(dir, false, &["--width", &w, "--height", &h])
}

fn start_core(
    dir: &Path,
    gpu: &Path,
    display: &IsolaDisplay,
    extra: &str,
) -> (Core, std::path::PathBuf) {
    let device = format!(
        "gpu,socket={},display={}",
        gpu.display(),
        display.socket.display()
    );
    vdrivers::start(
        dir,
        &[device],
        &cmdline("gpu", extra),
        &["--device-timeout", "20"],
    )
}

/// Frame `n` of `isola_guests::gpu_pixel` as XRGB words (what `screenshot` returns).
fn expected(n: u32) -> Vec<u32> {
    let mut px = Vec::with_capacity((W * H) as usize);
    for y in 0..H {
        for x in 0..W {
            let [r, g, b] = isola_guests::gpu_pixel(x, y, n);
            px.push((u32::from(r) << 16) | (u32::from(g) << 8) | u32::from(b));
        }
    }
    px
}

/// Screenshots until one equals frame `n` pixel for pixel (bounded).
fn wait_screenshot(dir: &Path, display: &IsolaDisplay, n: u32) {
    let want = expected(n);
    let out = dir.join(format!("frame{n}.png"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (w, h, got) = screenshot(&display.control, &out);
        let diff = if (w, h) != (W, H) {
            Some(format!("size {w}x{h}"))
        } else {
            first_difference(&got, &want, W)
        };
        let Some(diff) = diff else { return };
        assert!(
            Instant::now() < deadline,
            "the screenshot never showed frame {n}: {diff}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn gpu_display_info_is_the_configured_size_and_the_screenshot_is_the_guests_picture() {
    let dir = scratch_dir("vd-gpu-draw");
    let display = display(&dir);
    let gpu_socket = dir.join("gpu.sock");
    let _gpu = IsolaGpu::start(&gpu_socket, &["--resolution", RESOLUTION]);
    let (mut core, _) = start_core(&dir, &gpu_socket, &display, "vdrivers.hold=3000");
    core.wait_for(
        &format!("vdrivers: flushed {RESOLUTION} frame=1"),
        Duration::from_secs(60),
    );
    wait_screenshot(&dir, &display, 1);
    let done = core.finish(RUN_TIMEOUT);
    let lines = assert_ok(&done);
    assert_eq!(
        field(&lines, "display"),
        Some(RESOLUTION),
        "{}",
        report(&done)
    );
    eprintln!(
        "vdrivers gpu: {:?}",
        lines.iter().find(|l| l.starts_with("edid"))
    );
}

#[test]
fn gpu_reset_and_reinitialised_a_hundred_times_each_drawing_a_frame() {
    let dir = scratch_dir("vd-gpu-resets");
    let display = display(&dir);
    let gpu_socket = dir.join("gpu.sock");
    let _gpu = IsolaGpu::start(&gpu_socket, &["--resolution", RESOLUTION]);
    let (mut core, _) = start_core(
        &dir,
        &gpu_socket,
        &display,
        "vdrivers.mode=resets vdrivers.resets=100 vdrivers.hold=3000",
    );
    let last = core.wait_for("vdrivers: last frame=", Duration::from_secs(90));
    let n: u32 = last.rsplit('=').next().unwrap().parse().unwrap();
    wait_screenshot(&dir, &display, n);
    let done = core.finish(RUN_TIMEOUT);
    let lines = assert_ok(&done);
    assert!(
        lines.contains(&"resets=100 each flushed"),
        "{}",
        report(&done)
    );
}

#[test]
fn gpu_device_process_killed_mid_work_is_only_a_pause() {
    const KILLS: u32 = 2;
    let dir = scratch_dir("vd-gpu-kill");
    let display = display(&dir);
    let gpu_socket = dir.join("gpu.sock");
    let state = dir.join("gpu.state");
    let args = [
        "--resolution",
        RESOLUTION,
        "--state-file",
        state.to_str().unwrap(),
    ];
    let mut gpu = IsolaGpu::start(&gpu_socket, &args);
    let (mut core, control) = start_core(
        &dir,
        &gpu_socket,
        &display,
        "vdrivers.mode=loop vdrivers.ms=6000 vdrivers.hold=3000",
    );
    core.wait_for("vdrivers: frame 20 flushed", Duration::from_secs(60));
    for kill in 1..=KILLS {
        std::thread::sleep(Duration::from_millis(400));
        gpu.kill();
        gpu = IsolaGpu::start(&gpu_socket, &args);
        wait_device(&mut core, &control, "reconnected", |d| {
            d.link == DeviceLink::Connected && d.reconnects == kill
        });
    }
    core.wait_for("vdrivers: last frame=1", Duration::from_secs(60));
    wait_screenshot(&dir, &display, 1);
    let done = core.finish(RUN_TIMEOUT);
    let lines = assert_ok(&done);
    assert!(number(&lines, "frames") > 20, "{}", report(&done));
    eprintln!(
        "vdrivers gpu kills: longest wait {} ms",
        number(&lines, "longest-wait-ms")
    );
    drop(gpu);
}
