//! isola-gpu end to end: the virtio-gpu guest draws through the core and a GPU backend, and
//! the test's own display end (tests/src/gpu.rs) must receive exactly the picture the guest
//! drew. The same run with QEMU's vhost-user-gpu in place of isola-gpu checks the core's
//! display pass-through against an independent backend; hostile guests and a killed
//! isola-gpu follow.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use isola_guests::gpu_pixel;
use isola_ipc::{ControlRequest, ControlResponse, DeviceLink, DeviceStatus};
use isola_tests::gpu::{DisplayState, IsolaGpu, QemuGpu, TestDisplay};
use isola_tests::sandbox::{assert_sandboxed, device_pid, status_field};
use isola_tests::{control, guest, scratch_dir, Core, Finished};

const W: u32 = 320;
const H: u32 = 200;
const RESOLUTION: &str = "320x200";
const WAIT: Duration = Duration::from_secs(60);

fn start_core(dir: &Path, gpu: &Path, display: Option<&Path>, cmdline: &str) -> (Core, PathBuf) {
    let kernel = guest("virtio-gpu.elf");
    let mut device = format!("gpu,socket={}", gpu.display());
    if let Some(display) = display {
        device.push_str(&format!(",display={}", display.display()));
    }
    Core::start_with_device(dir, &kernel, &device, cmdline)
}

fn frame(n: u32) -> impl Fn(u32, u32) -> [u8; 3] {
    move |x, y| gpu_pixel(x, y, n)
}

fn shows_frame(s: &DisplayState, n: u32) -> bool {
    s.size == (W, H) && s.compare(frame(n)).is_ok()
}

/// The guest's cursor image as the display protocol carries it (B, G, R, A).
fn cursor_image() -> Vec<u8> {
    let mut v = Vec::new();
    for y in 0..64u32 {
        for x in 0..64u32 {
            let alpha = if x + y < 64 { 0xff } else { 0 };
            v.extend_from_slice(&[(x * 4) as u8, (y * 4) as u8, 0x80, alpha]);
        }
    }
    v
}

/// Runs the GPU guest with `cmdline` against whichever backend listens on `gpu_socket`, with
/// a test display, until the guest ends.
fn run_with_display(dir: &Path, gpu_socket: &Path, cmdline: &str) -> (Finished, TestDisplay) {
    let display = TestDisplay::start(&dir.join("display.sock"), W, H);
    let (core, _) = start_core(dir, gpu_socket, Some(&display.socket), cmdline);
    (core.finish(WAIT), display)
}

/// Runs the draw-mode guest against whichever backend listens on `gpu_socket` and returns
/// what the display end got.
fn draw_and_collect(dir: &Path, gpu_socket: &Path) -> (DisplayState, Vec<String>) {
    let (done, display) = run_with_display(dir, gpu_socket, "virtio-gpu.mode=draw");
    done.assert_success();
    let state = display.wait_until("frame 1 and the cursor", WAIT, |s| {
        shows_frame(s, 1) && s.cursor_pos == Some((30, 40))
    });
    (state, done.serial)
}

#[test]
fn the_display_receives_the_guests_picture_pixel_for_pixel() {
    let dir = scratch_dir("gpu-draw");
    let gpu_socket = dir.join("gpu.sock");
    let _gpu = IsolaGpu::start(&gpu_socket, &["--resolution", RESOLUTION]);
    let (state, serial) = draw_and_collect(&dir, &gpu_socket);
    state.compare(frame(1)).unwrap();
    assert_eq!(state.connections, 1);
    assert_eq!(
        state.features_set,
        Some(0),
        "isola-gpu asks for no display features"
    );
    assert_eq!(state.cursor_hot, (3, 5));
    assert_eq!(state.cursor_image.as_deref(), Some(&cursor_image()[..]));
    for line in [
        "virtio-gpu: display 320x200 enabled=1",
        "virtio-gpu: edid size=128 checksum=ok preferred=320x200",
        "virtio-gpu: frame 1 flushed 320x200",
        "virtio-gpu: ok",
    ] {
        assert!(serial.iter().any(|l| l == line), "{line}: {serial:?}");
    }
}

#[test]
fn qemu_vhost_user_gpu_through_the_core_shows_the_same_picture() {
    if !QemuGpu::available() {
        return;
    }
    let dir = scratch_dir("gpu-qemu");
    let gpu_socket = dir.join("gpu.sock");
    let _gpu = QemuGpu::start(&gpu_socket);
    let (state, serial) = draw_and_collect(&dir, &gpu_socket);
    // The same picture, pixel for pixel, as isola-gpu's (both compared to the guest's).
    state.compare(frame(1)).unwrap();
    assert_eq!(state.cursor_hot, (3, 5));
    assert_eq!(state.cursor_image.as_deref(), Some(&cursor_image()[..]));
    assert!(serial
        .iter()
        .any(|l| l == "virtio-gpu: display 320x200 enabled=1"));
}

#[test]
fn a_guest_reset_drops_the_resources_and_the_device_starts_over() {
    let dir = scratch_dir("gpu-reset");
    let gpu_socket = dir.join("gpu.sock");
    let mut gpu = IsolaGpu::start(&gpu_socket, &["--resolution", RESOLUTION]);
    let (done, display) =
        run_with_display(&dir, &gpu_socket, "virtio-gpu.mode=draw virtio-gpu.reset=1");
    // Creating resource 1 again after the reset succeeds only if the reset dropped it.
    done.assert_success();
    assert!(done
        .serial
        .iter()
        .any(|l| l == "virtio-gpu: resetting the device"));
    assert!(done
        .serial
        .iter()
        .any(|l| l == "virtio-gpu: frame 2 flushed 320x200"));
    display.wait_until("frame 2 after the reset", WAIT, |s| shows_frame(s, 2));
    assert!(gpu.alive());
}

#[test]
fn a_gpu_without_a_display_serves_the_guest() {
    let dir = scratch_dir("gpu-nodisplay");
    let gpu_socket = dir.join("gpu.sock");
    let mut gpu = IsolaGpu::start(&gpu_socket, &["--resolution", RESOLUTION]);
    let (core, _) = start_core(&dir, &gpu_socket, None, "virtio-gpu.mode=draw");
    let done = core.finish(WAIT);
    done.assert_success();
    assert!(done.serial.iter().any(|l| l == "virtio-gpu: ok"));
    assert!(gpu.alive());
}

#[test]
fn a_missing_display_process_is_an_error_at_start() {
    let dir = scratch_dir("gpu-missing-display");
    let gpu_socket = dir.join("gpu.sock");
    let _gpu = IsolaGpu::start(&gpu_socket, &["--resolution", RESOLUTION]);
    let kernel = guest("virtio-gpu.elf");
    let device = format!(
        "gpu,socket={},display={}",
        gpu_socket.display(),
        dir.join("nobody.sock").display()
    );
    let core = Core::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--device",
        &device,
        "--device-timeout",
        "1",
    ]);
    let done = core.finish(WAIT);
    assert!(!done.status.success());
    assert!(
        done.stderr.contains("no display process listening"),
        "{}",
        done.stderr
    );
}

#[test]
fn a_backend_that_refuses_the_display_socket_stops_the_start() {
    // isola-blk is no GPU: it refuses VHOST_USER_GPU_SET_SOCKET, and the core must say so.
    let dir = scratch_dir("gpu-refused");
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let blk_socket = dir.join("blk.sock");
    let _blk = isola_tests::IsolaBlk::start_with(&blk_socket, &image, &["--num-queues", "2"]);
    let display = TestDisplay::start(&dir.join("display.sock"), W, H);
    let kernel = guest("virtio-gpu.elf");
    let device = format!(
        "gpu,socket={},display={}",
        blk_socket.display(),
        display.socket.display()
    );
    let core = Core::start(&["--kernel", kernel.to_str().unwrap(), "--device", &device]);
    let done = core.finish(WAIT);
    assert!(!done.status.success());
    assert!(
        done.stderr.contains("VHOST_USER_GPU_SET_SOCKET"),
        "{}",
        done.stderr
    );
}

#[test]
fn hostile_guest_commands_get_error_responses_and_the_device_survives() {
    let dir = scratch_dir("gpu-hostile");
    let gpu_socket = dir.join("gpu.sock");
    let mut gpu = IsolaGpu::start(&gpu_socket, &["--resolution", RESOLUTION]);
    let (done, display) = run_with_display(&dir, &gpu_socket, "virtio-gpu.mode=hostile");
    done.assert_success();
    let cases = done
        .serial
        .iter()
        .filter(|l| l.starts_with("virtio-gpu: hostile ") && l.ends_with(" ok"))
        .count();
    assert!(cases >= 30, "only {cases} hostile cases: {:?}", done.serial);
    assert!(done.serial.iter().any(|l| l == "virtio-gpu: hostile ok"));
    assert!(gpu.alive(), "isola-gpu died");
    display.wait_until("frame 1 after the hostile cases", WAIT, |s| {
        shows_frame(s, 1)
    });
}

fn gpu_device(core: &mut Core, socket: &Path) -> DeviceStatus {
    if let Some(report) = core.exit_report() {
        panic!("{report}");
    }
    match control(socket, &ControlRequest::Status) {
        ControlResponse::Status(status) => status.devices.into_iter().next().expect("one device"),
        other => panic!("unexpected answer {other:?}"),
    }
}

fn wait_link(core: &mut Core, socket: &Path, want: DeviceLink) -> DeviceStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = gpu_device(core, socket);
        if status.link == want {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "device never {want:?}: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_killed_isola_gpu_comes_back_with_the_picture_and_keeps_serving() {
    let dir = scratch_dir("gpu-restart");
    let gpu_socket = dir.join("gpu.sock");
    let state_file = dir.join("gpu.state");
    let args = [
        "--resolution",
        RESOLUTION,
        "--state-file",
        state_file.to_str().unwrap(),
    ];
    let gpu = IsolaGpu::start(&gpu_socket, &args);
    let display = TestDisplay::start(&dir.join("display.sock"), W, H);
    let (mut core, control_socket) = start_core(
        &dir,
        &gpu_socket,
        Some(&display.socket),
        "virtio-gpu.mode=draw virtio-gpu.wait=1",
    );
    core.wait_for("virtio-gpu: waiting for vector 0x50", WAIT);
    display.wait_until("frame 1", WAIT, |s| shows_frame(s, 1));

    gpu.kill();
    wait_link(&mut core, &control_socket, DeviceLink::Reconnecting);
    let _gpu = IsolaGpu::start(&gpu_socket, &args);
    let status = wait_link(&mut core, &control_socket, DeviceLink::Connected);
    assert_eq!(status.reconnects, 1);
    // A fresh display connection, and the restored picture on it without the guest's help.
    let restored = display.wait_until("the restored frame 1 and cursor", WAIT, |s| {
        s.connections == 2 && shows_frame(s, 1) && s.cursor_image.is_some()
    });
    assert_eq!(restored.cursor_image.as_deref(), Some(&cursor_image()[..]));

    // The guest carries on with the resources the dead process had: frame 2 on resource 1.
    let go = ControlRequest::InjectMsi {
        address: 0xfee0_0000,
        data: 0x50,
    };
    assert!(matches!(
        control(&control_socket, &go),
        ControlResponse::Done
    ));
    core.wait_for("virtio-gpu: frame 2 flushed 320x200", WAIT);
    display.wait_until("frame 2", WAIT, |s| shows_frame(s, 2));
    let done = core.finish(WAIT);
    done.assert_success();
}

/// isola-gpu sandboxed while it serves the guest (seccomp, no_new_privs, no capabilities,
/// namespaces, an empty root), its state file still written through the descriptor it
/// opened before the sandbox, and the guest's whole workload (frame 2 after the wait) passes.
#[test]
fn isola_gpu_is_sandboxed_while_it_serves_the_guest() {
    let dir = scratch_dir("gpu-sandbox");
    let gpu_socket = dir.join("gpu.sock");
    let state_file = dir.join("gpu.state");
    let gpu = IsolaGpu::start(
        &gpu_socket,
        &[
            "--resolution",
            RESOLUTION,
            "--state-file",
            state_file.to_str().unwrap(),
        ],
    );
    let display = TestDisplay::start(&dir.join("display.sock"), W, H);
    let (mut core, control_socket) = start_core(
        &dir,
        &gpu_socket,
        Some(&display.socket),
        "virtio-gpu.mode=draw virtio-gpu.wait=1",
    );
    core.wait_for("virtio-gpu: waiting for vector 0x50", WAIT);
    display.wait_until("frame 1", WAIT, |s| shows_frame(s, 1));
    let reaper = gpu.pid();
    let device = device_pid(reaper);
    assert_sandboxed(reaper, "reaper");
    assert_sandboxed(device, "device");
    let nspid = status_field(device, "NSpid");
    assert_eq!(nspid.split_whitespace().last(), Some("1"), "NSpid {nspid}");
    // The resources the guest made are in the state file (written after the sandbox).
    assert!(std::fs::metadata(&state_file).unwrap().len() > 0);
    let go = ControlRequest::InjectMsi {
        address: 0xfee0_0000,
        data: 0x50,
    };
    assert!(matches!(
        control(&control_socket, &go),
        ControlResponse::Done
    ));
    core.wait_for("virtio-gpu: frame 2 flushed 320x200", WAIT);
    display.wait_until("frame 2", WAIT, |s| shows_frame(s, 2));
    core.finish(WAIT).assert_success();
}
