//! GPU update throughput: full-screen TRANSFER_TO_HOST_2D + RESOURCE_FLUSH at 1280x800 (4 MB
//! per frame), the virtio-gpu guest driving the GPU backend through isola-core, each frame
//! going to the tests' own display end (tests/src/gpu.rs) as one vhost-user-gpu UPDATE.
//! isola-gpu and QEMU's vhost-user-gpu (if installed) are measured side by side, interleaved,
//! in one run; the guest times `frames` synchronous transfer+flush pairs with its TSC.
//!
//! Run with `cargo bench -p isola-tests --bench gpu` (`ISOLA_BENCH_FRAMES`, default 300;
//! `ISOLA_BENCH_RUNS`, default 3).

use std::path::Path;
use std::time::Duration;

use isola_tests::gpu::{IsolaGpu, QemuGpu, TestDisplay};
use isola_tests::{guest, scratch_dir, Core};

const W: u32 = 1280;
const H: u32 = 800;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Frames per second of one guest run against the backend on `gpu_socket`.
fn run(dir: &Path, gpu_socket: &Path, frames: u64) -> f64 {
    let display = TestDisplay::start(&dir.join("display.sock"), W, H);
    let kernel = guest("virtio-gpu.elf");
    let device = format!(
        "gpu,socket={},display={}",
        gpu_socket.display(),
        display.socket.display()
    );
    let cmdline = format!("virtio-gpu.mode=draw virtio-gpu.frames={frames} virtio-gpu.timeout=120");
    let core = Core::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--device",
        &device,
        "--cmdline",
        &cmdline,
    ]);
    let done = core.finish(Duration::from_secs(600));
    done.assert_success();
    let state = display.state();
    assert!(
        state.updates > frames,
        "display got {} updates for {frames} frames",
        state.updates
    );
    let line = done
        .serial
        .iter()
        .find_map(|l| l.strip_prefix("virtio-gpu: frames="))
        .expect("the guest reports its timing");
    let us: f64 = line
        .split("us=")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("us=<n>");
    frames as f64 / (us / 1e6)
}

fn main() {
    let frames = env("ISOLA_BENCH_FRAMES", 300);
    let runs = env("ISOLA_BENCH_RUNS", 3);
    let qemu = QemuGpu::installed();
    let (mut isola, mut other) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let dir = scratch_dir(&format!("bench-gpu-{i}"));
        let socket = dir.join("isola-gpu.sock");
        let gpu = IsolaGpu::start(&socket, &["--resolution", "1280x800"]);
        isola.push(run(&dir, &socket, frames));
        drop(gpu);
        if qemu {
            let socket = dir.join("qemu-gpu.sock");
            let gpu = QemuGpu::start(&socket);
            other.push(run(&dir, &socket, frames));
            drop(gpu);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!("full-screen TRANSFER_TO_HOST_2D + RESOURCE_FLUSH at {W}x{H}, {frames} frames x {runs} runs (median):");
    let i = median(&mut isola);
    println!(
        "  isola-gpu            {i:8.1} frames/s  ({:.0} MB/s)",
        i * f64::from(W * H * 4) / 1e6
    );
    if qemu {
        let q = median(&mut other);
        println!(
            "  qemu vhost-user-gpu  {q:8.1} frames/s  ({:.0} MB/s)",
            q * f64::from(W * H * 4) / 1e6
        );
        println!("  ratio isola/qemu     {:8.2}", i / q);
    } else {
        println!("  qemu vhost-user-gpu  skipped (not installed)");
    }
}
