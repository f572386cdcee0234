//! isola-display benchmark (not a test): screenshot latency by screen size, and the VNC
//! frame rate a client (LibVNCClient) receives while the test's GPU peer sends full-screen
//! 1280x800 updates, per encoding, next to how fast the peer alone can push updates into
//! the display (the raw limit) in the same run.
//!
//! The same VNC measurement then runs with QEMU's vhost-user-gpu as the GPU backend (the
//! bench plays the core and a guest driver that redraws the whole 1280x800 scanout in a
//! loop): the rate QEMU's backend alone reaches, and the client's frame rate meanwhile.
//!
//!     cargo bench -p isola-tests --bench display

#[path = "../tests/support/qemu_gpu.rs"]
mod qemu_gpu;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use isola_ipc::display::{DisplayRequest, DisplayResponse};
use isola_tests::display::{
    pattern, request, run_probe, update_message, vncprobe, GpuPeer, IsolaDisplay,
};
use isola_tests::{binary, scratch_dir};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn screenshot_latency() {
    println!("screenshot latency (median):");
    println!("  size         PNG bytes   control round trip   isolactl screenshot");
    for (w, h) in [(320u32, 200u32), (1280, 800), (1920, 1080)] {
        let dir = scratch_dir(&format!("bench-shot-{w}"));
        let display = IsolaDisplay::start(&dir, false, &[]);
        let mut gpu = GpuPeer::connect(&display.socket);
        gpu.scanout(0, w, h);
        gpu.update(0, 0, w, h, &pattern(w, h, 1));
        display.wait_updates(1);
        let mut ipc = Vec::new();
        let mut png_len = 0;
        for _ in 0..20 {
            let t = Instant::now();
            match request(&display.control, &DisplayRequest::Screenshot { scanout: 0 }) {
                DisplayResponse::Screenshot { png, .. } => png_len = png.len(),
                other => panic!("{other:?}"),
            }
            ipc.push(t.elapsed());
        }
        let mut ctl = Vec::new();
        let out = dir.join("shot.png");
        for _ in 0..10 {
            let t = Instant::now();
            let status = Command::new(binary("isolactl"))
                .arg("--display")
                .arg(&display.control)
                .arg("screenshot")
                .arg(&out)
                .output()
                .expect("isolactl runs");
            assert!(status.status.success());
            ctl.push(t.elapsed());
        }
        println!(
            "  {:>4}x{:<4}  {:>10}   {:>15.2?}   {:>15.2?}",
            w,
            h,
            png_len,
            median(ipc),
            median(ctl)
        );
    }
}

/// Pushes alternating full-screen updates until `stop`; counts them.
fn pusher(
    socket: std::path::PathBuf,
    w: u32,
    h: u32,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    let frames: Vec<Vec<u8>> = (0..2)
        .map(|s| update_message(0, 0, w, h, &pattern(w, h, s)))
        .collect();
    std::thread::spawn(move || {
        let mut gpu = GpuPeer::connect(&socket);
        gpu.scanout(0, w, h);
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            gpu.send_raw(&frames[i % 2]).expect("display reads");
            sent.fetch_add(1, Ordering::Relaxed);
            i += 1;
        }
    })
}

fn vnc_rate() {
    let (w, h) = (1280u32, 800u32);
    let dir = scratch_dir("bench-vnc");
    let Some(probe) = vncprobe(&dir) else { return };
    let display = IsolaDisplay::start(&dir, true, &[]);
    let addr = display.vnc.expect("VNC on TCP");
    let secs = 3.0;

    // The raw limit: the peer alone, nobody watching.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let before = display.status().updates;
    let t = Instant::now();
    let push = pusher(display.socket.clone(), w, h, stop.clone(), sent.clone());
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    push.join().unwrap();
    display.wait_updates(before + sent.load(Ordering::Relaxed));
    let alone = (display.status().updates - before) as f64 / t.elapsed().as_secs_f64();
    println!("VNC at {w}x{h}, full-screen updates from the GPU peer:");
    println!("  GPU peer alone (raw limit): {alone:8.1} updates/s");

    for encoding in ["raw", "zrle"] {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let before = display.status().updates;
        let t = Instant::now();
        let push = pusher(display.socket.clone(), w, h, stop.clone(), sent.clone());
        let out = dir.join("frame.ppm");
        let lines = run_probe(
            &probe,
            &addr.ip().to_string(),
            addr.port(),
            encoding,
            &out,
            &[&format!("frames:{secs}")],
        );
        stop.store(true, Ordering::Relaxed);
        push.join().unwrap();
        display.wait_updates(before + sent.load(Ordering::Relaxed));
        let gpu_rate = (display.status().updates - before) as f64 / t.elapsed().as_secs_f64();
        let line = lines
            .iter()
            .find(|l| l.starts_with("frames "))
            .expect("probe reports frames");
        let f: Vec<&str> = line.split_whitespace().collect();
        let pixels: f64 = f[3].parse().unwrap();
        let s: f64 = f[5].parse().unwrap();
        let fps = pixels / f64::from(w * h) / s;
        println!(
            "  VNC client, {encoding:>4}:          {fps:8.1} full frames/s  (GPU peer meanwhile {gpu_rate:.1} updates/s; client/raw limit {:.2})",
            fps / alone
        );
    }
}

/// Full-screen redraws through QEMU's vhost-user-gpu until `stop` says so; returns how many.
fn qemu_redraws(
    gpu: &mut qemu_gpu::QemuGpu,
    frames: &[Vec<u8>],
    w: u32,
    h: u32,
    stop: &dyn Fn() -> bool,
) -> u64 {
    let mut n = 0u64;
    while !stop() {
        gpu.write(qemu_gpu::PIXELS, &frames[(n % 2) as usize]);
        gpu.redraw(0, 0, w, h, w);
        n += 1;
    }
    n
}

fn vnc_rate_qemu() {
    let (w, h) = (1280u32, 800u32);
    let dir = scratch_dir("bench-vnc-qemu");
    let Some(probe) = vncprobe(&dir) else { return };
    let display = IsolaDisplay::start(&dir, true, &[]);
    let addr = display.vnc.expect("VNC on TCP");
    let Some(mut gpu) = qemu_gpu::QemuGpu::start(&dir, &display.socket) else {
        return;
    };
    gpu.set_up_scanout(w, h);
    let frames: Vec<Vec<u8>> = (0..2)
        .map(|s| {
            pattern(w, h, s)
                .iter()
                .flat_map(|p| p.to_le_bytes())
                .collect()
        })
        .collect();
    let secs = 3.0;
    let t = Instant::now();
    let n = qemu_redraws(&mut gpu, &frames, w, h, &|| {
        t.elapsed().as_secs_f64() > secs
    });
    let alone = n as f64 / t.elapsed().as_secs_f64();
    println!("VNC at {w}x{h}, full-screen redraws through QEMU's vhost-user-gpu:");
    println!("  vhost-user-gpu alone:       {alone:8.1} updates/s");
    for encoding in ["raw", "zrle"] {
        let (probe, host, port) = (probe.clone(), addr.ip().to_string(), addr.port());
        let out = dir.join("frame.ppm");
        let done = Arc::new(AtomicBool::new(false));
        let client = {
            let done = done.clone();
            std::thread::spawn(move || {
                let lines = run_probe(
                    &probe,
                    &host,
                    port,
                    encoding,
                    &out,
                    &[&format!("frames:{secs}")],
                );
                done.store(true, Ordering::Relaxed);
                lines
            })
        };
        let t = Instant::now();
        let n = qemu_redraws(&mut gpu, &frames, w, h, &|| done.load(Ordering::Relaxed));
        let gpu_rate = n as f64 / t.elapsed().as_secs_f64();
        let lines = client.join().unwrap();
        let line = lines
            .iter()
            .find(|l| l.starts_with("frames "))
            .expect("probe reports frames");
        let f: Vec<&str> = line.split_whitespace().collect();
        let pixels: f64 = f[3].parse().unwrap();
        let s: f64 = f[5].parse().unwrap();
        let fps = pixels / f64::from(w * h) / s;
        println!(
            "  VNC client, {encoding:>4}:          {fps:8.1} full frames/s  (vhost-user-gpu meanwhile {gpu_rate:.1} updates/s; client/backend alone {:.2})",
            fps / alone
        );
    }
}

fn main() {
    // Build (once) before anything is timed.
    binary("isolactl");
    screenshot_latency();
    vnc_rate();
    vnc_rate_qemu();
}
