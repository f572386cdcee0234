//! Cost of BAR accesses through Isola's vfio-user frontend, and what doorbell ioeventfds
//! change, side by side in one run. The `vfio-user` test guest (mode `bench`), timed in the
//! guest with the TSC, against the vfio-user test device (the `vfio_user` crate's server):
//!
//! - read: a forwarded read, the full path (KVM exit, vCPU -> backend thread, REGION_READ to
//!   the server and back, KVM_RUN);
//! - write: a forwarded write (posted without ioeventfds; with them the vCPU waits for the
//!   server's answer, so a doorbell cannot overtake it);
//! - local: a read the core answers itself (the MSI-X table): the trap-only floor;
//! - doorbell: one doorbell write, back to back (without ioeventfds a posted write; with them
//!   KVM signals the eventfd in the kernel, no exit to the core);
//! - round: one whole DMA round (address, length, doorbell, the interrupt, the data checked).
//!
//! Three set-ups: the server directly; behind the test proxy (`isola_tests::vfio_proxy`, which
//! forwards every message, and answers GET_REGION_IO_FDS the crate's server lacks) with
//! `ioeventfds=off`; the same proxy with `ioeventfds=on`. The last two differ only in the
//! doorbell path, so their ratio is the ioeventfd's effect.
//!
//! `cargo bench -p isola-tests --bench vfio_user`; `ISOLA_BENCH_COUNT` sets the accesses per
//! run (default 20000), `ISOLA_BENCH_ROUNDS` the runs per set-up (default 3); medians.

use std::process::{Command, Stdio};
use std::time::Duration;

use isola_tests::{binary, guest, scratch_dir, vfio_proxy, wait_for_path, Core};

const KEYS: [&str; 5] = ["read", "write", "local", "doorbell", "round"];

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn field(line: &str, key: &str) -> u64 {
    let key = format!("{key}-ns=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key.as_str()))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Medians of each of [`KEYS`] over `rounds` runs with `device`.
fn measure(device: &str, count: u64, rounds: u64) -> Vec<u64> {
    let kernel = guest("vfio-user.elf");
    let cmdline = format!("vfio-user.mode=bench count={count}");
    let mut samples = vec![Vec::new(); KEYS.len()];
    eprintln!("vfio_user bench: --device {device}");
    for _ in 0..rounds {
        let mut core = Core::start(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64",
            "--device",
            device,
            "--cmdline",
            &cmdline,
        ]);
        let line = core.wait_for("vfio-user: bench", Duration::from_secs(300));
        for (k, s) in KEYS.iter().zip(&mut samples) {
            s.push(field(&line, k));
        }
        core.wait_for("vfio-user: ok", Duration::from_secs(60));
        core.finish(Duration::from_secs(60)).assert_success();
    }
    samples.into_iter().map(median).collect()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("vfio_user: bench");
        return;
    }
    let count = env("ISOLA_BENCH_COUNT", 20_000);
    let rounds = env("ISOLA_BENCH_ROUNDS", 3);
    let dir = scratch_dir("bench_vfio_user");
    let socket = dir.join("dev.sock");
    let mut server = Command::new(binary("vfio-user-testdev"))
        .arg("--socket")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("vfio-user-testdev starts");
    wait_for_path(&socket, Duration::from_secs(20));
    let options = vfio_proxy::Options {
        doorbell: true,
        ..Default::default()
    };
    let proxy = vfio_proxy::start(&dir.join("proxy.sock"), &socket, options);
    let direct = measure(
        &format!("vfio-user,socket={}", socket.display()),
        count,
        rounds,
    );
    let off = measure(
        &format!("vfio-user,socket={}", proxy.socket.display()),
        count,
        rounds,
    );
    let on = measure(
        &format!("vfio-user,socket={},ioeventfds=on", proxy.socket.display()),
        count,
        rounds,
    );
    let _ = server.kill();
    let _ = server.wait();
    println!("vfio-user BAR accesses, {count} each (rounds: {}), median of {rounds} runs, ns per access:", count / 20 + 1);
    println!(
        "{:<10} {:>10} {:>16} {:>16} {:>10}",
        "access", "direct", "proxy, fds off", "proxy, fds on", "off / on"
    );
    for (i, k) in KEYS.iter().enumerate() {
        println!(
            "{:<10} {:>10} {:>16} {:>16} {:>10.2}",
            k,
            direct[i],
            off[i],
            on[i],
            off[i] as f64 / on[i].max(1) as f64
        );
    }
    let rung = proxy
        .counters
        .rung
        .load(std::sync::atomic::Ordering::Relaxed);
    println!("doorbells the proxy saw through its eventfds (fds on): {rung}");
}
