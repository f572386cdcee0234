//! Cost of the device sandbox on block I/O: `isola-blk` with the sandbox off, with namespaces,
//! empty root and dropped capabilities but no seccomp filter, and fully sandboxed (the
//! default), side by side in one run. 4 KiB random reads and writes at queue depth 1 and 32
//! from libblkio's virtio-blk-vhost-user client, on both engines; variants interleaved in
//! rounds (a different one first in each) so background noise hits each alike; the median of
//! the rounds is reported, and the ratio sandboxed / off.
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
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("isola-blk starts");
    wait_for_path(socket, Duration::from_secs(10));
    Backend(child)
}

/// IOPS of 4 KiB random reads or writes at `depth` for `duration`.
fn iops(socket: &Path, write: bool, depth: usize, duration: Duration) -> f64 {
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
    done as f64 / start.elapsed().as_secs_f64()
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
    let image = dir.join("bench.img");
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i >> 3) as u8 ^ 0x5a).collect();
    let mut file = File::create(&image).expect("image is writable");
    for _ in 0..IMAGE_SIZE >> 20 {
        std::io::Write::write_all(&mut file, &chunk).expect("image is writable");
    }
    file.sync_all().expect("image syncs");
    let socket = dir.join("blk.sock");
    println!(
        "isola-blk, 4 KiB random I/O on a {} MiB file, {:?} per case, median of {rounds} rounds",
        IMAGE_SIZE >> 20,
        duration
    );
    println!(
        "{:<28}{:>14}{:>14}{:>14}{:>22}",
        "", VARIANTS[0].0, VARIANTS[1].0, VARIANTS[2].0, "sandboxed / off"
    );
    for engine in ["io-uring", "sync"] {
        for (write, depth) in [(false, 1), (false, 32), (true, 1), (true, 32)] {
            let mut results = vec![Vec::new(); VARIANTS.len()];
            for round in 0..rounds {
                // A different variant goes first in each round.
                for k in 0..VARIANTS.len() {
                    let i = (round + k) % VARIANTS.len();
                    let _backend = start(&image, &socket, engine, VARIANTS[i].1);
                    results[i].push(iops(&socket, write, depth, duration));
                }
            }
            let medians: Vec<f64> = results.into_iter().map(median).collect();
            let label = format!(
                "{engine} {} QD{depth}",
                if write { "randwrite" } else { "randread" }
            );
            println!(
                "{label:<28}{:>14.0}{:>14.0}{:>14.0}{:>21.3}x",
                medians[0],
                medians[1],
                medians[2],
                medians[2] / medians[0]
            );
        }
    }
}
