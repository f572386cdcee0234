//! Block benchmark: 4 KiB random read and random write at queue depth 1 and 32, and random
//! read at depth 1 by a polling driver, driven by an
//! independent vhost-user-blk frontend (libblkio's Rust `blkio` crate) against `isola-blk`
//! (as it starts by default, with a kernel polling thread, and with that thread on a CPU of
//! its own) and against `qemu-storage-daemon`'s vhost-user-blk export on the same file, plus
//! the raw limit: the same pattern with io_uring straight on the file from this process. All
//! in one run, targets interleaved per repetition so background noise hits every target alike.
//! CPU time is reported for the backend (its whole process tree) and the client, and how often
//! per request isola-blk's queue threads and the client thread slept (voluntary context
//! switches: each is a wakeup someone paid for). With more than one repetition, each isola-blk
//! target's IOPS ratio to raw io_uring and to the baseline is also taken within each
//! repetition and reported as median (min-max), with the spread of its p50 latency.
//! The floors under depth-1 reads on this machine are measured too: in each repetition the
//! `server thread` target hands each request to a thread of this process that reads 4 KiB
//! (no virtqueue, no other process), the client asleep or spinning as in the case; and once,
//! an eventfd wake-up across CPUs and on one.
//!
//! `cargo bench -p isola-tests --bench blk`. Environment:
//! - `ISOLA_BENCH_SECONDS`: time per case (default 2);
//! - `ISOLA_BENCH_REPEAT`: runs per case and target, interleaved; the median is reported;
//! - `ISOLA_BENCH_CASES` / `ISOLA_BENCH_TARGETS`: comma-separated subsets (`randread QD32`,
//!   `isola-blk,raw`: a target's name, or the first word of one other than isola-blk's);
//!   `ISOLA_BENCH_CORE=0` skips the guest context-switch count;
//! - `ISOLA_BLK_ENGINE`: isola-blk's engine (`auto`, `io-uring` or `sync`; default: isola-blk's
//!   own default); `ISOLA_BLK_ARGS`: more isola-blk arguments;
//! - `ISOLA_BENCH_BASELINE`: a directory holding another build's `isola-blk` (e.g. main's
//!   `target/release`), run as one more target, `isola-blk baseline`, with its default options:
//!   before and after a change, interleaved in one run.
//!
//! Targets that are not available (no `qemu-storage-daemon`, or `isola-blk` not built) are
//! reported as skipped.

use std::fs::File;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use isola_tests::{binary_if_built, guest, scratch_dir, wait_for_path, Core};

const BLOCK: usize = 4096;
const IMAGE_SIZE: u64 = 256 << 20;

#[derive(Clone, Copy, PartialEq)]
enum Pattern {
    RandRead,
    RandWrite,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
        }
    }
}

/// How the client waits for completions.
#[derive(Clone, Copy, PartialEq)]
enum Driver {
    /// Asks for the backend's signal and sleeps on the completion eventfd, as a guest driver
    /// taking interrupts on a vCPU that halts.
    Sleeping,
    /// A libblkio poll queue: no signal asked for, the client spins on the used ring, as a
    /// guest with virtio-blk `poll_queues` or a vCPU the host halt-polls.
    Polling,
}

struct Stats {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU time of the backend process over the run, in cores (1.0: one CPU busy all along).
    cpu: Option<f64>,
    /// CPU time of the client (this process) over the run, in cores.
    client_cpu: f64,
    /// Times the client slept (voluntary context switches) per request: how often it had to
    /// be woken, by the backend's signal or its own io_uring.
    client_sleeps: f64,
    /// Times the backend's queue threads slept per request.
    queue_sleeps: Option<f64>,
}

/// The `q` quantile of `sorted` (ascending, not empty), in microseconds.
fn quantile_us(sorted: &[Duration], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6
}

fn stats(mut latencies: Vec<Duration>, elapsed: Duration) -> Stats {
    latencies.sort();
    Stats {
        iops: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_us: quantile_us(&latencies, 0.5),
        p99_us: quantile_us(&latencies, 0.99),
        cpu: None,
        client_cpu: 0.0,
        client_sleeps: 0.0,
        queue_sleeps: None,
    }
}

/// xorshift64: a cheap, repeatable stream of block numbers.
struct Rng(u64);

impl Rng {
    fn block(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % (IMAGE_SIZE / BLOCK as u64)
    }
}

/// isola-blk with a kernel thread polling each io_uring (`--sq-poll-ms`).
const SQPOLL: &str = "isola-blk sq-poll";
/// As [`SQPOLL`], with the kernel thread on a CPU of its own (`--sq-poll-cpu`, the machine's
/// last CPU) and the client on the others, as on a host that keeps a CPU for storage.
const SQPOLL_CPU: &str = "isola-blk sq-poll-cpu";
const RAW: &str = "raw io_uring";
/// The depth-1 read floor: a server thread in this process ([`run_handoff`]).
const FLOOR: &str = "server thread";
/// `isola-blk` from the `ISOLA_BENCH_BASELINE` directory, default options.
const BASELINE: &str = "isola-blk baseline";

/// The `isola-blk` binary of another build, to compare against (`ISOLA_BENCH_BASELINE`).
fn baseline_binary() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("ISOLA_BENCH_BASELINE")?);
    let path = dir.join("isola-blk");
    path.exists().then_some(path)
}

/// The CPUs this thread may run on.
fn own_cpus() -> nix::sched::CpuSet {
    nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("affinity is readable")
}

/// The CPU `SQPOLL_CPU` dedicates to polling: the last one this process may use, if it may
/// use more than one.
fn polling_cpu() -> Option<usize> {
    let set = own_cpus();
    let cpus: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect();
    (cpus.len() > 1).then(|| cpus[cpus.len() - 1])
}

/// Runs `f` on the CPUs this thread may use but `cpu`.
fn avoiding_cpu<T>(cpu: Option<usize>, f: impl FnOnce() -> T) -> T {
    use nix::sched::sched_setaffinity;
    use nix::unistd::Pid;
    let Some(cpu) = cpu else {
        return f();
    };
    let before = own_cpus();
    let mut others = before;
    others.unset(cpu).expect("a CPU number in range");
    sched_setaffinity(Pid::from_raw(0), &others).expect("affinity is settable");
    let out = f();
    sched_setaffinity(Pid::from_raw(0), &before).expect("affinity is settable");
    out
}

/// libblkio 0.5 keeps its rings in memfds it cannot seal (device-procs/README.md).
const UNSEALED: &str = "--allow-unsealed-memory";

/// A vhost-user-blk backend process serving `image` on `socket`.
struct Backend {
    child: Child,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_backend(target: &str, image: &Path, socket: &Path) -> Option<Backend> {
    let _ = std::fs::remove_file(socket);
    let mut cmd = match target {
        BASELINE => {
            let mut cmd = Command::new(baseline_binary()?);
            cmd.arg("--socket").arg(socket).arg("--image").arg(image);
            cmd.arg(UNSEALED);
            cmd
        }
        "isola-blk" | SQPOLL | SQPOLL_CPU => {
            let mut cmd = Command::new(binary_if_built("isola-blk")?);
            cmd.arg("--socket").arg(socket).arg("--image").arg(image);
            cmd.arg(UNSEALED);
            if target != "isola-blk" {
                cmd.args(["--sq-poll-ms", "10"]);
            }
            if target == SQPOLL_CPU {
                cmd.args(["--sq-poll-cpu", &polling_cpu()?.to_string()]);
            }
            if let Ok(engine) = std::env::var("ISOLA_BLK_ENGINE") {
                cmd.args(["--engine", &engine]);
            }
            if let Ok(extra) = std::env::var("ISOLA_BLK_ARGS") {
                cmd.args(extra.split_whitespace());
            }
            cmd
        }
        _ => {
            let mut cmd = Command::new("qemu-storage-daemon");
            cmd.args(["--object", "iothread,id=iot0", "--blockdev"])
                .arg(format!("driver=file,node-name=file0,filename={},aio=io_uring", image.display()))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=exp0,node-name=file0,iothread=iot0,addr.type=unix,addr.path={},writable=on",
                    socket.display()
                ));
            cmd
        }
    };
    let child = cmd
        .stdout(Stdio::null())
        // Kept next to the socket, to see why a backend stopped serving.
        .stderr(File::create(socket.with_extension("log")).ok()?)
        .spawn()
        .ok()?;
    let backend = Backend { child };
    wait_for_path(socket, Duration::from_secs(10));
    Some(backend)
}

/// The pattern through libblkio's virtio-blk-vhost-user driver.
/// `backend_sleeps` counts the backend's queue-thread sleeps so far (read at the start and the
/// end of the timed loop, while the queue runs).
fn run_blkio(
    socket: &Path,
    pattern: Pattern,
    depth: usize,
    driver: Driver,
    duration: Duration,
    backend_sleeps: &dyn Fn() -> Option<u64>,
) -> Result<Stats, String> {
    let err = |e: blkio::Error| e.message().to_owned();
    let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(err)?;
    blkio
        .set_str("path", socket.to_str().expect("utf-8 path"))
        .map_err(err)?;
    blkio.connect().map_err(err)?;
    let polled = driver == Driver::Polling;
    blkio
        .set_i32("num-queues", i32::from(!polled))
        .map_err(err)?;
    blkio
        .set_i32("num-poll-queues", i32::from(polled))
        .map_err(err)?;
    let started = blkio.start().map_err(err)?;
    let mut queue = if polled {
        started.poll_queues
    } else {
        started.queues
    }
    .remove(0);
    let region = blkio.alloc_mem_region(depth * BLOCK).map_err(err)?;
    blkio.map_mem_region(&region).map_err(err)?;
    let buf = |slot: usize| (region.addr + slot * BLOCK) as *mut u8;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut submitted = vec![Instant::now(); depth];
    let mut submit = |queue: &mut blkio::Blkioq, slot: usize, submitted: &mut [Instant]| {
        let offset = rng.block() * BLOCK as u64;
        submitted[slot] = Instant::now();
        match pattern {
            Pattern::RandRead => queue.read(offset, buf(slot), BLOCK, slot, ReqFlags::empty()),
            Pattern::RandWrite => queue.write(offset, buf(slot), BLOCK, slot, ReqFlags::empty()),
        }
    };
    for slot in 0..depth {
        submit(&mut queue, slot, &mut submitted);
    }
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..depth).map(|_| MaybeUninit::uninit()).collect();
    let mut latencies = Vec::with_capacity(1 << 20);
    let queue0 = backend_sleeps();
    let (start, cpu0, sleeps0) = (Instant::now(), own_cpu_seconds(), own_sleeps());
    while start.elapsed() < duration {
        let n = queue.do_io(&mut completions, 1, None, None).map_err(err)?;
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            if c.ret != 0 {
                return Err(format!("request failed: {}", c.ret));
            }
            latencies.push(submitted[c.user_data].elapsed());
            submit(&mut queue, c.user_data, &mut submitted);
        }
    }
    let elapsed = start.elapsed();
    let client_cpu = (own_cpu_seconds() - cpu0) / elapsed.as_secs_f64();
    let client_sleeps = (own_sleeps() - sleeps0) as f64 / latencies.len().max(1) as f64;
    let queue_sleeps = backend_sleeps()
        .zip(queue0)
        .map(|(b, a)| (b - a) as f64 / latencies.len().max(1) as f64);
    Ok(Stats {
        client_cpu,
        client_sleeps,
        queue_sleeps,
        ..stats(latencies, elapsed)
    })
}

/// The raw limit: io_uring on the image file from this process.
fn run_raw(
    image: &Path,
    pattern: Pattern,
    depth: usize,
    duration: Duration,
) -> Result<Stats, String> {
    use io_uring::{opcode, types, IoUring};
    let file = File::options()
        .read(true)
        .write(true)
        .open(image)
        .map_err(|e| e.to_string())?;
    let fd = types::Fd(file.as_raw_fd());
    let mut ring = IoUring::new(depth.next_power_of_two() as u32).map_err(|e| e.to_string())?;
    let mut bufs = vec![0u8; depth * BLOCK];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut submitted = vec![Instant::now(); depth];
    let mut push = |ring: &mut IoUring, slot: usize, submitted: &mut [Instant], bufs: &mut [u8]| {
        let offset = rng.block() * BLOCK as u64;
        let ptr = bufs[slot * BLOCK..].as_mut_ptr();
        let entry = match pattern {
            Pattern::RandRead => opcode::Read::new(fd, ptr, BLOCK as u32)
                .offset(offset)
                .build(),
            Pattern::RandWrite => opcode::Write::new(fd, ptr, BLOCK as u32)
                .offset(offset)
                .build(),
        };
        submitted[slot] = Instant::now();
        // SAFETY: the buffer slot stays alive and untouched until its completion is reaped, and
        // the queue has room: at most `depth` entries are ever outstanding.
        unsafe { ring.submission().push(&entry.user_data(slot as u64)) }
            .expect("room for one entry");
    };
    for slot in 0..depth {
        push(&mut ring, slot, &mut submitted, &mut bufs);
    }
    let mut latencies = Vec::with_capacity(1 << 20);
    let (start, cpu0, sleeps0) = (Instant::now(), own_cpu_seconds(), own_sleeps());
    while start.elapsed() < duration {
        ring.submit_and_wait(1).map_err(|e| e.to_string())?;
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (slot, result) in done {
            if result != BLOCK as i32 {
                return Err(format!("raw I/O returned {result}"));
            }
            latencies.push(submitted[slot as usize].elapsed());
            push(&mut ring, slot as usize, &mut submitted, &mut bufs);
        }
    }
    let elapsed = start.elapsed();
    let client_cpu = (own_cpu_seconds() - cpu0) / elapsed.as_secs_f64();
    let client_sleeps = (own_sleeps() - sleeps0) as f64 / latencies.len().max(1) as f64;
    // Drain what is still in flight before the buffers go away.
    let outstanding = depth;
    let mut reaped = 0;
    while reaped < outstanding {
        ring.submit_and_wait(1).map_err(|e| e.to_string())?;
        reaped += ring.completion().count();
    }
    Ok(Stats {
        client_cpu,
        client_sleeps,
        ..stats(latencies, elapsed)
    })
}

/// User + system CPU time of process `pid` and every process below it (a sandboxed
/// isola-blk is a reaper whose worker is a grandchild), all threads, so far, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let ticks: f64 = process_tree(pid)
        .into_iter()
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // Fields after the command name, which is in parentheses and may hold spaces.
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .sum();
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / per_second)
}

/// Voluntary context switches of this thread (the client's) so far.
fn own_sleeps() -> i64 {
    let mut usage = MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr());
        usage.assume_init()
    };
    usage.ru_nvcsw
}

/// `pid` and every process below it.
fn process_tree(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parents.iter().filter(|&&(_, pp)| pp == p).map(|&(c, _)| c));
        i += 1;
    }
    tree
}

/// Voluntary context switches (sleeps) of the queue threads (`blk-q*`) of a backend's process
/// tree.
fn queue_sleeps(pid: u32) -> u64 {
    process_tree(pid)
        .into_iter()
        .map(|p| context_switches_of(p, "blk-q", "voluntary_ctxt_switches"))
        .sum()
}

/// User + system CPU time of this process (the client) so far, in seconds.
fn own_cpu_seconds() -> f64 {
    let mut usage = MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Sum of voluntary and involuntary context switches of every thread of `pid` whose name
/// starts with `prefix`.
fn context_switches(pid: u32, prefix: &str) -> u64 {
    context_switches_of(pid, prefix, "voluntary_ctxt_switches")
        + context_switches_of(pid, prefix, "nonvoluntary_ctxt_switches")
}

/// Sum of the `/proc` status counter `counter` of every thread of `pid` whose name starts
/// with `prefix`.
fn context_switches_of(pid: u32, prefix: &str, counter: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let name = std::fs::read_to_string(dir.join("comm")).ok()?;
            if !name.trim().starts_with(prefix) {
                return None;
            }
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            Some(
                status
                    .lines()
                    .filter(|l| l.split(':').next() == Some(counter))
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum::<u64>(),
            )
        })
        .sum()
}

/// `requests=<n>` from a loop progress line of the virtio-blk guest.
fn requests_in(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("requests="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Runs the virtio-blk guest's I/O loop on isola-core with `target` as the backend and
/// counts the core's context switches per guest request over `duration`, per thread type.
fn core_switches_per_request(
    target: &str,
    image: &Path,
    dir: &Path,
    duration: Duration,
) -> Option<(f64, f64, u64)> {
    let socket = dir.join(format!("{target}-guest.sock"));
    let _backend = start_backend(target, image, &socket)?;
    let kernel = guest("virtio-blk.elf");
    let seconds = (duration.as_secs() + 3).to_string();
    let device = format!("blk,socket={}", socket.display());
    let cmdline = format!("virtio-blk.mode=loop virtio-blk.seconds={seconds} virtio-blk.sectors=256 virtio-blk.depth=16");
    let mut core = Core::start(&[
        "--kernel",
        kernel.to_str()?,
        "--memory",
        "64",
        "--device",
        &device,
        "--cmdline",
        &cmdline,
    ]);
    let pid = core.pid();
    let first = core.wait_for("virtio-blk: loop cycles=", Duration::from_secs(30));
    let (control0, vcpu0) = (
        context_switches(pid, "isola-core"),
        context_switches(pid, "vcpu"),
    );
    let start = Instant::now();
    let mut last = first.clone();
    while start.elapsed() < duration {
        last = core.wait_for("virtio-blk: loop cycles=", Duration::from_secs(30));
    }
    let (control1, vcpu1) = (
        context_switches(pid, "isola-core"),
        context_switches(pid, "vcpu"),
    );
    let requests = requests_in(&last) - requests_in(&first);
    drop(core);
    let per = |a: u64, b: u64| (b - a) as f64 / requests.max(1) as f64;
    Some((per(control0, control1), per(vcpu0, vcpu1), requests))
}

fn prepare_image(dir: &Path) -> PathBuf {
    let path = dir.join("bench.img");
    // Real data, so reads are not served from holes.
    let chunk: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut file = File::create(&path).expect("image is writable");
    for _ in 0..IMAGE_SIZE >> 20 {
        std::io::Write::write_all(&mut file, &chunk).expect("image is writable");
    }
    file.sync_all().expect("image syncs");
    path
}

/// The cases: pattern, queue depth and how the client waits. The polling driver runs at depth
/// 1 only, where the signal and the client's wake-up are most of a request's time.
const CASES: [(Pattern, usize, Driver); 5] = [
    (Pattern::RandRead, 1, Driver::Sleeping),
    (Pattern::RandRead, 32, Driver::Sleeping),
    (Pattern::RandWrite, 1, Driver::Sleeping),
    (Pattern::RandWrite, 32, Driver::Sleeping),
    (Pattern::RandRead, 1, Driver::Polling),
];

/// `ISOLA_BENCH_<name>` as a list of comma-separated words, if set.
fn env_list(name: &str) -> Option<Vec<String>> {
    std::env::var(format!("ISOLA_BENCH_{name}"))
        .ok()
        .map(|v| v.split(',').map(|w| w.trim().to_owned()).collect())
}

/// The median of `runs` by IOPS (the upper one of an even count).
fn median(mut runs: Vec<Stats>) -> Option<Stats> {
    runs.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    let mid = runs.len() / 2;
    runs.into_iter().nth(mid)
}

fn main() {
    let seconds: f64 = std::env::var("ISOLA_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2.0);
    let repeat: usize = std::env::var("ISOLA_BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let only_cases = env_list("CASES");
    let only_targets = env_list("TARGETS");
    let duration = Duration::from_secs_f64(seconds);
    let dir = scratch_dir("bench-blk");
    let image = prepare_image(&dir);
    let targets = [
        "isola-blk",
        SQPOLL,
        SQPOLL_CPU,
        "qemu-storage-daemon",
        RAW,
        BASELINE,
        FLOOR,
    ];
    // A name selects the target of that name, or the one it is the first word of.
    let wanted = |target: &str| {
        only_targets.as_ref().is_none_or(|list| {
            list.iter().any(|t| {
                target == t
                    || target.split(' ').next() == Some(t.as_str())
                        && !target.starts_with("isola-blk")
                    || target == BASELINE && t == "baseline"
            })
        })
    };
    let mut rows: Vec<(String, Vec<Option<Stats>>)> = Vec::new();
    let mut spreads: Vec<(String, Vec<String>)> = Vec::new();
    for (pattern, depth, driver) in CASES {
        let label = match driver {
            Driver::Sleeping => format!("{} QD{depth}", pattern.name()),
            Driver::Polling => format!("{} QD{depth} polling driver", pattern.name()),
        };
        if only_cases.as_ref().is_some_and(|list| {
            !list
                .iter()
                .any(|c| c.replace(' ', "") == label.replace(' ', ""))
        }) {
            continue;
        }
        // Repetitions interleave the targets, so slow phases of the machine hit all alike.
        let mut runs: Vec<Vec<Stats>> = targets.iter().map(|_| Vec::new()).collect();
        for _ in 0..repeat {
            for (t, target) in targets.iter().enumerate() {
                if !wanted(target) {
                    continue;
                }
                let result = if *target == RAW {
                    run_raw(&image, pattern, depth, duration).map(Some)
                } else if *target == FLOOR {
                    (pattern == Pattern::RandRead && depth == 1)
                        .then(|| run_handoff(&image, driver, duration))
                        .transpose()
                } else {
                    let socket = dir.join(format!("{target}.sock"));
                    match start_backend(target, &image, &socket) {
                        Some(backend) => {
                            let pid = backend.child.id();
                            let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
                            let avoid = (*target == SQPOLL_CPU).then(polling_cpu).flatten();
                            let sleeps =
                                || target.starts_with("isola-blk").then(|| queue_sleeps(pid));
                            avoiding_cpu(avoid, || {
                                run_blkio(&socket, pattern, depth, driver, duration, &sleeps)
                            })
                            .map(|mut s| {
                                s.cpu = cpu_seconds(pid)
                                    .zip(cpu0)
                                    .map(|(b, a)| (b - a) / t0.elapsed().as_secs_f64());

                                Some(s)
                            })
                        }
                        None => Ok(None),
                    }
                };
                match result {
                    Ok(Some(stats)) => {
                        if repeat > 1 {
                            println!(
                                    "  {label} {target}: {:.0} IOPS p50 {:.1}us cpu {} client cpu {:.2} sleeps/request client {:.3} queue {}",
                                    stats.iops,
                                    stats.p50_us,
                                    stats.cpu.map_or("-".into(), |c| format!("{c:.2}")),
                                    stats.client_cpu,
                                    stats.client_sleeps,
                                    stats.queue_sleeps.map_or("-".into(), |c| format!("{c:.3}")),
                                );
                        }
                        runs[t].push(stats)
                    }
                    Ok(None) => {}
                    Err(e) => {
                        println!("{target} {label}: {e}");
                        // What the backend said about it, if it logged anything.
                        let log = dir.join(format!("{target}.log"));
                        for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
                            if !line.contains(" INFO ") {
                                println!("  backend: {line}");
                            }
                        }
                    }
                }
            }
        }
        spreads.push((label.clone(), ratio_spreads(&targets, &runs)));
        rows.push((label, runs.into_iter().map(median).collect()));
    }

    println!("4 KiB random I/O on a {} MiB file (page cache), {seconds} s per case, median of {repeat}, blkio virtio-blk-vhost-user client", IMAGE_SIZE >> 20);
    println!(
        "isola-blk engine: {}, extra arguments: {}; `{SQPOLL}` adds --sq-poll-ms 10, `{SQPOLL_CPU}` also --sq-poll-cpu {} (the client then runs on the other CPUs)",
        std::env::var("ISOLA_BLK_ENGINE").unwrap_or_else(|_| "default".into()),
        std::env::var("ISOLA_BLK_ARGS").unwrap_or_else(|_| "none".into()),
        polling_cpu().map_or("-".into(), |c| c.to_string()),
    );
    println!("cpu: CPUs busy in the backend (all its threads and kernel threads) / in the client process, over the run");
    println!("sleeps/request: times isola-blk's queue threads / the client thread slept (voluntary context switches), per request");
    for (label, cells) in &rows {
        println!("{label}");
        for (target, cell) in targets.iter().zip(cells) {
            if *target == FLOOR && !label.starts_with("randread QD1") {
                // Measured for depth-1 reads only.
                continue;
            }
            let text = match cell {
                Some(s) => format!(
                    "{:>8.0} IOPS  p50 {:>7.1}us  p99 {:>7.1}us  cpu {} / {:.2}  sleeps/request {} / {:.3}",
                    s.iops,
                    s.p50_us,
                    s.p99_us,
                    s.cpu.map_or("   -".into(), |c| format!("{c:.2}")),
                    s.client_cpu,
                    s.queue_sleeps.map_or("    -".into(), |c| format!("{c:.3}")),
                    s.client_sleeps,
                ),
                None => "skipped".into(),
            };
            println!("  {target:<22}{text}");
        }
    }
    let core = std::env::var("ISOLA_BENCH_CORE").map_or(true, |v| v != "0");
    if core {
        println!("core context switches per guest request (virtio-blk guest I/O loop, 4 KiB requests, depth 16):");
        for target in ["isola-blk", "qemu-storage-daemon"] {
            match core_switches_per_request(target, &image, &dir, duration.max(Duration::from_secs(2))) {
            Some((control, vcpu, requests)) => println!(
                "  backend {target:<20} control thread {control:.4}/request   vCPU thread {vcpu:.4}/request   ({requests} requests)"
            ),
            None => println!("  backend {target:<20} skipped"),
        }
        }
    }
    println!("ratios (IOPS) to qemu-storage-daemon and to raw io_uring:");
    for (label, cells) in &rows {
        let iops = |i: usize| cells[i].as_ref().map(|s| s.iops);
        let (qsd, raw) = (iops(3), iops(4));
        let ratios: Vec<String> = [0, 1, 2, 5]
            .into_iter()
            .filter(|&i| cells[i].is_some())
            .map(|i| {
                let ratio = |b: Option<f64>, percent: bool| match (iops(i), b) {
                    (Some(a), Some(b)) if percent => format!("{:.0}%", 100.0 * a / b),
                    (Some(a), Some(b)) => format!("{:.2}x", a / b),
                    _ => "-".into(),
                };
                format!(
                    "{}: {} / {}",
                    targets[i],
                    ratio(qsd, false),
                    ratio(raw, true)
                )
            })
            .collect();
        let before = match (iops(0), iops(5)) {
            (Some(a), Some(b)) => format!("   isola-blk / baseline: {:.2}x", a / b),
            _ => String::new(),
        };
        println!("  {label:<16} {}{before}", ratios.join("   "));
    }
    if only_cases.as_ref().is_none_or(|list| {
        list.iter()
            .any(|c| c.replace(' ', "").starts_with("randreadQD1"))
    }) {
        wake_floor();
    }
    if repeat > 1 {
        println!("ratios within each repetition (side by side): median (min-max) over {repeat} runs; p50 latency median (min-max)");
        for (label, lines) in &spreads {
            for line in lines {
                println!("  {label:<16} {line}");
            }
        }
    }
}

/// The floor under depth-1 latency for any backend in another process whose driver sleeps
/// while it waits: one wake-up of a thread blocked on an eventfd (the call eventfd), written
/// from another thread. Measured as half an eventfd ping-pong between two threads pinned to
/// two different CPUs, and to the same one, each thread blocking in `read`. Printed as p50
/// (p99) of the one-way time.
fn wake_floor() {
    let cpus: Vec<usize> = {
        let set = own_cpus();
        (0..nix::sched::CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect()
    };
    let mut line =
        String::from("wake-up floor (eventfd write -> blocked reader returns, one way):");
    for (what, a, b) in [
        ("other CPU", cpus[0], cpus[cpus.len() - 1]),
        ("same CPU", cpus[0], cpus[0]),
    ] {
        if what == "other CPU" && cpus.len() < 2 {
            line += " other CPU skipped (one CPU);";
            continue;
        }
        let mut one_way = ping_pong(a, b, 20_000);
        one_way.sort();
        line += &format!(
            " {what} p50 {:.1}us (p99 {:.1}us);",
            quantile_us(&one_way, 0.5),
            quantile_us(&one_way, 0.99)
        );
    }
    println!("{}", line.trim_end_matches(';'));
}

/// The floor under depth-1 reads for any backend that serves from a thread of its own, with
/// no virtqueue and no process boundary ([`FLOOR`]): a server thread that never sleeps (it
/// spins on a request counter, as isola-blk's queue thread watches its ring) reads 4 KiB of
/// `image` at a random block and answers; this thread publishes one request at a time and
/// waits, asleep on an eventfd the server writes ([`Driver::Sleeping`]) or spinning on the
/// server's answer counter ([`Driver::Polling`]). Threads unpinned, as the backends' are.
/// CPU time is the whole process's (both threads). A read that fails ends the run: the server
/// answers [`FAILED`] and signals, so the client never waits for an answer that cannot come.
fn run_handoff(image: &Path, driver: Driver, duration: Duration) -> Result<Stats, String> {
    /// The answer counter's value after a failed read.
    const FAILED: u64 = u64::MAX;
    use nix::sys::eventfd::{EfdFlags, EventFd};
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let file = File::open(image).map_err(|e| format!("{}: {e}", image.display()))?;
    let requested = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let signal = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).expect("eventfd"));
    let server = {
        let (requested, answered, stop, signal) = (
            Arc::clone(&requested),
            Arc::clone(&answered),
            Arc::clone(&stop),
            Arc::clone(&signal),
        );
        std::thread::spawn(move || -> Result<(), String> {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let mut buf = vec![0u8; BLOCK];
            let mut served = 0;
            loop {
                while requested.load(Ordering::Acquire) == served {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    std::hint::spin_loop();
                }
                served += 1;
                let read = file.read_exact_at(&mut buf, rng.block() * BLOCK as u64);
                answered.store(
                    if read.is_ok() { served } else { FAILED },
                    Ordering::Release,
                );
                if driver == Driver::Sleeping {
                    signal.write(1).map_err(|e| format!("signal: {e}"))?;
                }
                read.map_err(|e| format!("server read: {e}"))?;
            }
        })
    };
    let mut latencies = Vec::with_capacity(1 << 20);
    let (start, cpu0, sleeps0) = (Instant::now(), own_cpu_seconds(), own_sleeps());
    let mut sent = 0;
    while start.elapsed() < duration {
        sent += 1;
        let t = Instant::now();
        requested.store(sent, Ordering::Release);
        match driver {
            Driver::Sleeping => {
                signal.read().map_err(|e| format!("answer: {e}"))?;
            }
            Driver::Polling => {
                while answered.load(Ordering::Acquire) < sent {
                    std::hint::spin_loop();
                }
            }
        }
        if answered.load(Ordering::Acquire) == FAILED {
            break;
        }
        latencies.push(t.elapsed());
    }
    let elapsed = start.elapsed();
    let client_cpu = (own_cpu_seconds() - cpu0) / elapsed.as_secs_f64();
    let client_sleeps = (own_sleeps() - sleeps0) as f64 / latencies.len().max(1) as f64;
    stop.store(true, Ordering::Relaxed);
    server.join().map_err(|_| "server thread panicked")??;
    Ok(Stats {
        client_cpu,
        client_sleeps,
        ..stats(latencies, elapsed)
    })
}

/// Half of each of `rounds` eventfd round trips between a thread on CPU `a` and one on `b`.
fn ping_pong(a: usize, b: usize, rounds: usize) -> Vec<Duration> {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    use std::sync::Arc;
    let pin = |cpu: usize| {
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu).expect("a CPU number in range");
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("pinned");
    };
    let ping = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).expect("eventfd"));
    let pong = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).expect("eventfd"));
    let (ping2, pong2) = (Arc::clone(&ping), Arc::clone(&pong));
    let echo = std::thread::spawn(move || {
        pin(b);
        for _ in 0..rounds {
            ping2.read().expect("ping");
            pong2.write(1).expect("pong");
        }
    });
    let before = own_cpus();
    pin(a);
    // Let the echo thread reach its first read.
    std::thread::sleep(Duration::from_millis(10));
    let mut out = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        ping.write(1).expect("ping");
        pong.read().expect("pong");
        out.push(t.elapsed() / 2);
    }
    echo.join().expect("echo thread");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &before).expect("unpinned");
    out
}

/// `median (min-max)` of `values`, formatted by `f`.
fn spread(mut values: Vec<f64>, f: impl Fn(f64) -> String) -> String {
    values.sort_by(f64::total_cmp);
    match (values.first(), values.last()) {
        (Some(&lo), Some(&hi)) => format!("{} ({}-{})", f(values[values.len() / 2]), f(lo), f(hi)),
        _ => "-".into(),
    }
}

/// For each isola-blk target: its IOPS over raw io_uring's and over the baseline's in the same
/// repetition, and its p50 latency, each as median and range over the repetitions.
fn ratio_spreads(targets: &[&str], runs: &[Vec<Stats>]) -> Vec<String> {
    let index = |name: &str| targets.iter().position(|t| *t == name);
    let per_rep = |t: usize, other: Option<usize>| -> Vec<f64> {
        let Some(o) = other else { return Vec::new() };
        runs[t]
            .iter()
            .zip(&runs[o])
            .map(|(a, b)| a.iops / b.iops)
            .collect()
    };
    targets
        .iter()
        .enumerate()
        .filter(|(t, name)| name.starts_with("isola-blk") && !runs[*t].is_empty())
        .map(|(t, name)| {
            let mut line = format!(
                "{name}: p50 {}",
                spread(runs[t].iter().map(|s| s.p50_us).collect(), |v| format!(
                    "{v:.1}us"
                ))
            );
            for (what, other) in [("raw io_uring", index(RAW)), ("baseline", index(BASELINE))] {
                let ratios = per_rep(t, other);
                if !ratios.is_empty() && other != Some(t) {
                    line += &format!("   / {what} {}", spread(ratios, |v| format!("{v:.2}")));
                }
            }
            if let Some(floor) = index(FLOOR).filter(|&f| !runs[f].is_empty()) {
                let above: Vec<f64> = runs[t]
                    .iter()
                    .zip(&runs[floor])
                    .map(|(a, b)| a.p50_us - b.p50_us)
                    .collect();
                line += &format!(
                    "   p50 above {FLOOR} {}",
                    spread(above, |v| format!("{v:+.1}us"))
                );
            }
            line
        })
        .collect()
}
