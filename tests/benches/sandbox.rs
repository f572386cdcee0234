//! Cost of the device sandbox on block I/O: `isola-blk` with the sandbox off, with namespaces,
//! empty root and dropped capabilities but no seccomp filter, and fully sandboxed (the
//! default), side by side in one run. 4 KiB random reads and writes at queue depth 1 and 32
//! from libblkio's virtio-blk-vhost-user client, on each engine (auto, the default; io-uring;
//! sync); variants interleaved in
//! rounds (a different one first in each) so background noise hits each alike. Reported: the
//! median over the rounds of IOPS and of the device's CPU time per request (all its threads,
//! from schedstat), and the ratios of both: sandboxed / off (the whole sandbox) and sandboxed /
//! no seccomp (the filter alone, what issue #6 asks for). On a shared machine the CPU time
//! per request is the steadier figure.
//!
//! `cargo bench -p isola-tests --bench sandbox`; `ISOLA_BENCH_SECONDS` sets the time per
//! case (default 1), `ISOLA_BENCH_ROUNDS` the rounds (default 3).

use std::fs::File;
use std::mem::MaybeUninit;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use isola_tests::{binary, scratch_dir, wait_for_path};

const BLOCK: usize = 4096;
const IMAGE_SIZE: u64 = 128 << 20;

const VARIANTS: [(&str, &[&str]); 3] = [
    ("sandbox off", &["--sandbox", "off"]),
    ("no seccomp", &["--seccomp", "off"]),
    ("sandboxed", &[]),
];

struct Backend(Child);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(image: &Path, socket: &Path, engine: &str, extra: &[&str]) -> Backend {
    let _ = std::fs::remove_file(socket);
    let child = Command::new(binary("isola-blk"))
        .arg("--socket")
        .arg(socket)
        .arg("--image")
        .arg(image)
        .args(["--engine", engine])
        // libblkio 0.5 keeps its rings in memfds it cannot seal (device-procs/README.md).
        .arg("--allow-unsealed-memory")
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("isola-blk starts");
    wait_for_path(socket, Duration::from_secs(10));
    Backend(child)
}

/// CPU time (ns) every thread of `pid` has run so far (schedstat: exact, unlike ticks).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The process doing the device's work: the reaper's child when sandboxed, else itself.
fn worker_pid(started: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{started}/task/{started}/children"))
        .ok()
        .and_then(|c| c.split_whitespace().next()?.parse().ok())
        .unwrap_or(started)
}

struct Measured {
    iops: f64,
    /// Device CPU time per request, in microseconds: far less sensitive than IOPS to what
    /// else runs on the machine.
    cpu_us: f64,
}

/// 4 KiB random reads or writes at `depth` for `duration` against the device `pid`.
fn measure(socket: &Path, pid: u32, write: bool, depth: usize, duration: Duration) -> Measured {
    // The socket file appears at bind, a moment before listen: retry a refused connection.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut blkio = loop {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("blkio");
        blkio
            .set_str("path", socket.to_str().expect("utf-8 path"))
            .unwrap();
        match blkio.connect() {
            Ok(()) => break blkio,
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("blkio cannot connect: {}", e.message()),
        }
    };
    blkio.set_i32("num-queues", 1).unwrap();
    let mut queue = blkio.start().expect("blkio starts").queues.remove(0);
    let region = blkio.alloc_mem_region(depth * BLOCK).unwrap();
    blkio.map_mem_region(&region).unwrap();
    let buf = |slot: usize| (region.addr + slot * BLOCK) as *mut u8;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut submit = |queue: &mut blkio::Blkioq, slot: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let offset = state % (IMAGE_SIZE / BLOCK as u64) * BLOCK as u64;
        if write {
            queue.write(offset, buf(slot), BLOCK, slot, ReqFlags::empty());
        } else {
            queue.read(offset, buf(slot), BLOCK, slot, ReqFlags::empty());
        }
    };
    for slot in 0..depth {
        submit(&mut queue, slot);
    }
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..depth).map(|_| MaybeUninit::uninit()).collect();
    let mut done = 0u64;
    let worker = worker_pid(pid);
    let cpu_start = cpu_ns(worker);
    let start = Instant::now();
    while start.elapsed() < duration {
        let n = queue.do_io(&mut completions, 1, None, None).expect("do_io");
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            assert_eq!(c.ret, 0, "request failed");
            done += 1;
            submit(&mut queue, c.user_data);
        }
    }
    let elapsed = start.elapsed();
    // Before disconnecting: the queue threads end with the connection.
    let cpu = cpu_ns(worker).saturating_sub(cpu_start);
    Measured {
        iops: done as f64 / elapsed.as_secs_f64(),
        cpu_us: cpu as f64 / 1000.0 / done.max(1) as f64,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let env = |name: &str, default: f64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let duration = Duration::from_secs_f64(env("ISOLA_BENCH_SECONDS", 1.0));
    let rounds = env("ISOLA_BENCH_ROUNDS", 3.0) as usize;
    let dir = scratch_dir("bench-sandbox");
    // On tmpfs when there is one: this measures the device's own cost, and the host disk's
    // writeback would only add noise.
    let shm = Path::new("/dev/shm");
    let image = if shm.is_dir() {
        shm.join(format!("isola-bench-sandbox-{}.img", std::process::id()))
    } else {
        dir.join("bench.img")
    };
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i >> 3) as u8 ^ 0x5a).collect();
    let mut file = File::create(&image).expect("image is writable");
    for _ in 0..IMAGE_SIZE >> 20 {
        std::io::Write::write_all(&mut file, &chunk).expect("image is writable");
    }
    file.sync_all().expect("image syncs");
    let socket = dir.join("blk.sock");
    println!(
        "isola-blk, 4 KiB random I/O on a {} MiB file ({}), {:?} per case, median of {rounds} rounds",
        IMAGE_SIZE >> 20,
        image.display(),
        duration
    );
    println!(
        "{:<26}{:>26}{:>26}{:>26}{:>20}{:>20}",
        "IOPS | device CPU us/request",
        VARIANTS[0].0,
        VARIANTS[1].0,
        VARIANTS[2].0,
        "sandboxed / off",
        "filter on / off"
    );
    for engine in ["auto", "io-uring", "sync"] {
        for (write, depth) in [(false, 1), (false, 32), (true, 1), (true, 32)] {
            let mut iops = vec![Vec::new(); VARIANTS.len()];
            let mut cpu = vec![Vec::new(); VARIANTS.len()];
            for round in 0..rounds {
                // A different variant goes first in each round.
                for k in 0..VARIANTS.len() {
                    let i = (round + k) % VARIANTS.len();
                    let backend = start(&image, &socket, engine, VARIANTS[i].1);
                    let m = measure(&socket, backend.0.id(), write, depth, duration);
                    iops[i].push(m.iops);
                    cpu[i].push(m.cpu_us);
                }
            }
            let iops: Vec<f64> = iops.into_iter().map(median).collect();
            let cpu: Vec<f64> = cpu.into_iter().map(median).collect();
            let label = format!(
                "{engine} {} QD{depth}",
                if write { "randwrite" } else { "randread" }
            );
            let cell = |i: usize| format!("{:.0} | {:.2}", iops[i], cpu[i]);
            println!(
                "{label:<26}{:>26}{:>26}{:>26}{:>10.3}x |{:>6.3}x{:>10.3}x |{:>6.3}x",
                cell(0),
                cell(1),
                cell(2),
                iops[2] / iops[0],
                cpu[2] / cpu[0],
                iops[2] / iops[1],
                cpu[2] / cpu[1]
            );
        }
    }
    let _ = std::fs::remove_file(&image);
}
