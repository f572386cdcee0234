//! isola-display under an independent GPU backend: QEMU's `vhost-user-gpu` (Debian,
//! `/usr/lib/qemu/vhost-user-gpu`, 2D mode). The test plays the core's part (it connects to
//! isola-display and hands the connection to the backend with `VHOST_USER_GPU_SET_SOCKET`)
//! and the guest's (a virtio-gpu driver). What the "guest" draws must come out of
//! `isolactl screenshot` and a VNC client pixel for pixel, and GET_DISPLAY_INFO must reach
//! isola-display and come back.

#[path = "support/qemu_gpu.rs"]
mod qemu_gpu;

use std::time::Duration;

use isola_tests::display::{
    first_difference, pattern, read_ppm, run_probe, screenshot, vncprobe, IsolaDisplay,
};
use isola_tests::scratch_dir;
use qemu_gpu::{
    cmd, lo_hi, QemuGpu, CMD_GET_DISPLAY_INFO, CMD_RESOURCE_ATTACH_BACKING, CMD_RESOURCE_CREATE_2D,
    CMD_TRANSFER_TO_HOST_2D, CMD_UPDATE_CURSOR, CURSOR_PIXELS, FORMAT_B8G8R8A8, PIXELS,
    RESP_OK_DISPLAY_INFO,
};

fn to_bytes(px: &[u32]) -> Vec<u8> {
    px.iter().flat_map(|p| p.to_le_bytes()).collect()
}

#[test]
fn qemu_vhost_user_gpu_drives_isola_display() {
    let dir = scratch_dir("display-qemu");
    let mut display = IsolaDisplay::start(&dir, true, &["--width", "1024", "--height", "768"]);
    let Some(mut gpu) = QemuGpu::start(&dir, &display.socket) else {
        return;
    };
    display.wait_log("GPU session 1 connected", Duration::from_secs(20));

    // GET_DISPLAY_INFO travels backend -> isola-display -> backend.
    let info = gpu.command(&cmd(CMD_GET_DISPLAY_INFO, &[]), 24 + 16 * 24);
    let word = |i: usize| u32::from_le_bytes(info[i..i + 4].try_into().unwrap());
    assert_eq!(word(0), RESP_OK_DISPLAY_INFO);
    assert_eq!(
        (word(32), word(36), word(40)),
        (1024, 768, 1),
        "scanout 0 as isola-display says"
    );

    // Draw: a resource backed by guest RAM, shown on scanout 0.
    let (w, h) = (640u32, 400u32);
    let picture = pattern(w, h, 9);
    gpu.write(PIXELS, &to_bytes(&picture));
    gpu.set_up_scanout(w, h);
    gpu.redraw(0, 0, w, h, w);
    display.wait_updates(1);
    let (sw, sh, shot) = screenshot(&display.control, &dir.join("qemu.png"));
    assert_eq!((sw, sh), (w, h));
    if let Some(diff) = first_difference(&shot, &picture, w) {
        panic!("screenshot differs from what the guest drew through vhost-user-gpu: {diff}");
    }

    // A partial redraw: only that rectangle changes.
    let mut next = picture.clone();
    for y in 100..150u32 {
        for x in 200..300u32 {
            next[(y * w + x) as usize] = 0x00ff_8000;
        }
    }
    gpu.write(PIXELS, &to_bytes(&next));
    gpu.redraw(200, 100, 100, 50, w);
    display.wait_updates(2);
    let (_, _, shot) = screenshot(&display.control, &dir.join("qemu2.png"));
    if let Some(diff) = first_difference(&shot, &next, w) {
        panic!("partial update through vhost-user-gpu: {diff}");
    }

    // A cursor: a 64x64 resource sent on the cursor queue reaches isola-display as
    // CURSOR_UPDATE, and from there a VNC client as its cursor shape.
    gpu.write(CURSOR_PIXELS, &to_bytes(&[0xff00_00ffu32; 64 * 64]));
    gpu.ok(&cmd(CMD_RESOURCE_CREATE_2D, &[2, FORMAT_B8G8R8A8, 64, 64]));
    let [clo, chi] = lo_hi(CURSOR_PIXELS);
    gpu.ok(&cmd(
        CMD_RESOURCE_ATTACH_BACKING,
        &[2, 1, clo, chi, 64 * 64 * 4, 0],
    ));
    gpu.ok(&cmd(CMD_TRANSFER_TO_HOST_2D, &[0, 0, 64, 64, 0, 0, 2, 0]));
    gpu.cursor_command(&cmd(CMD_UPDATE_CURSOR, &[0, 10, 20, 0, 2, 1, 2, 0]));

    if let Some(probe) = vncprobe(&dir) {
        let addr = display.vnc.expect("VNC on TCP");
        let out = dir.join("qemu-vnc.ppm");
        let lines = run_probe(
            &probe,
            &addr.ip().to_string(),
            addr.port(),
            "zrle",
            &out,
            &[],
        );
        assert!(
            lines.iter().any(|l| l == "cursor 64 64 1 2 4096"),
            "cursor: {lines:?}"
        );
        let (vw, vh, got) = read_ppm(&out);
        assert_eq!((vw, vh), (w, h));
        if let Some(diff) = first_difference(&got, &next, w) {
            panic!("VNC picture through vhost-user-gpu: {diff}");
        }
    }

    let status = display.status();
    assert!(status.gpu_connected);
    assert_eq!(status.scanouts, vec![Some((w, h))]);
    assert_eq!(status.updates, 2);
    display.assert_alive();
}
