//! An independent client against the real process: libblkio's Rust `blkio` crate (driver
//! `virtio-blk-vhost-user`, its own vhost-user frontend and virtio-blk driver) runs
//! thousands of mixed, concurrent reads, writes, flushes, discards and write-zeroes on four
//! queues at depth 32 against `isola-blk`, checking every byte read against a model; after the
//! backend exits, the image file must equal the model.

mod support;

use std::mem::MaybeUninit;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use isola_device_common::testing::process::device_pid;
use support::{patterned_image, Backend, Rng, Scratch};

const QUEUES: usize = 4;
const DEPTH: usize = 32;
const OPS_PER_QUEUE: usize = 2500;
const AREA: u64 = 4 << 20;
const IMAGE: u64 = AREA * QUEUES as u64;
const MAX_IO: u64 = 32 * 1024;
const SECTOR: u64 = 512;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    kind: Kind,
    /// Offset within this queue's area.
    offset: u64,
    len: u64,
}

/// One queue's share of the work: its own area of the disk, so the model is exact.
struct Worker<'a> {
    queue: Blkioq,
    index: usize,
    /// Base address of this queue's DEPTH buffers in the mapped memory region.
    buffers: usize,
    model: &'a mut [u8],
    rng: Rng,
    slots: Vec<Option<InFlight>>,
}

impl Worker<'_> {
    fn buffer(&mut self, slot: usize, len: u64) -> &mut [u8] {
        let ptr = (self.buffers + slot * MAX_IO as usize) as *mut u8;
        // SAFETY: `from_raw_parts_mut` needs `len` bytes at `ptr`, valid and unaliased for
        // the slice's life. Each slot owns MAX_IO bytes (len <= MAX_IO) of a region blkio
        // allocated and mapped for this test, which outlives the worker; a slot's buffer is
        // only touched by this thread, and never while the device is using it.
        unsafe { std::slice::from_raw_parts_mut(ptr, len as usize) }
    }

    fn overlaps(&self, offset: u64, len: u64) -> bool {
        self.slots
            .iter()
            .flatten()
            .any(|f| offset < f.offset + f.len && f.offset < offset + len)
    }

    fn pick(&mut self) -> InFlight {
        let kind = match self.rng.below(100) {
            0..=39 => Kind::Read,
            40..=79 => Kind::Write,
            80..=86 => Kind::Flush,
            87..=93 => Kind::Discard,
            _ => Kind::WriteZeroes,
        };
        if let Kind::Flush = kind {
            return InFlight {
                kind,
                offset: 0,
                len: 0,
            };
        }
        loop {
            let len = (1 + self.rng.below(MAX_IO / SECTOR)) * SECTOR;
            let offset = self.rng.below((AREA - len) / SECTOR + 1) * SECTOR;
            if !self.overlaps(offset, len) {
                return InFlight { kind, offset, len };
            }
        }
    }

    fn submit(&mut self, slot: usize) {
        let op = self.pick();
        let base = self.index as u64 * AREA;
        let start = (op.offset) as usize..(op.offset + op.len) as usize;
        let ptr = (self.buffers + slot * MAX_IO as usize) as *mut u8;
        let flags = ReqFlags::empty();
        match op.kind {
            Kind::Read => {
                self.buffer(slot, op.len).fill(0xcc);
                self.queue
                    .read(base + op.offset, ptr, op.len as usize, slot, flags);
            }
            Kind::Write => {
                let seed = self.rng.next();
                let buf = self.buffer(slot, op.len);
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = (seed >> (i % 8 * 8)) as u8 ^ i as u8;
                }
                let written = self.buffer(slot, op.len).to_vec();
                self.model[start].copy_from_slice(&written);
                self.queue
                    .write(base + op.offset, ptr, op.len as usize, slot, flags);
            }
            Kind::Flush => self.queue.flush(slot, flags),
            Kind::Discard => {
                // isola-blk punches a hole on a regular file: the range reads as zeros.
                self.model[start].fill(0);
                self.queue.discard(base + op.offset, op.len, slot, flags);
            }
            Kind::WriteZeroes => {
                self.model[start].fill(0);
                self.queue
                    .write_zeroes(base + op.offset, op.len, slot, flags);
            }
        }
        self.slots[slot] = Some(op);
    }

    fn complete(&mut self, c: &Completion) {
        let slot = c.user_data;
        let op = self.slots[slot]
            .take()
            .expect("completion for a slot in flight");
        assert_eq!(c.ret, 0, "queue {}: {op:?} failed", self.index);
        if let Kind::Read = op.kind {
            let got = self.buffer(slot, op.len).to_vec();
            let want = &self.model[op.offset as usize..(op.offset + op.len) as usize];
            assert!(
                got == want,
                "queue {}: read of {} bytes at {} returned wrong data",
                self.index,
                op.len,
                op.offset
            );
        }
    }

    fn run(mut self) -> usize {
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..DEPTH).map(|_| MaybeUninit::uninit()).collect();
        let mut submitted = 0;
        let mut done = 0;
        for slot in 0..DEPTH {
            self.submit(slot);
            submitted += 1;
        }
        while done < submitted {
            let mut timeout = Duration::from_secs(20);
            let n = self
                .queue
                .do_io(&mut completions, 1, Some(&mut timeout), None)
                .expect("do_io");
            assert!(n > 0, "queue {}: no completion within 20 s", self.index);
            for c in &completions[..n] {
                // SAFETY: `assume_init_read` needs an initialised value: do_io initialised
                // the first `n` entries.
                let c = unsafe { c.assume_init_read() };
                self.complete(&c);
                done += 1;
                if submitted < OPS_PER_QUEUE {
                    self.submit(c.user_data);
                    submitted += 1;
                }
            }
        }
        done
    }
}

/// What a backend's threads should look like while its queues run.
struct Threads {
    /// Kernel polling threads (io_uring SQPOLL).
    pollers: usize,
    /// The CPU the poller has to itself (`--sq-poll-cpu`).
    poll_cpu: Option<usize>,
}

/// (name, `Cpus_allowed_list`) of each thread of process `pid`.
fn threads_of(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| {
            let dir = t.unwrap().path();
            let name = std::fs::read_to_string(dir.join("comm")).unwrap();
            let status = std::fs::read_to_string(dir.join("status")).unwrap();
            let cpus = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap()
                .trim()
                .to_owned();
            (name.trim().to_owned(), cpus)
        })
        .collect()
}

/// The CPUs this process may use.
fn own_cpus() -> Vec<usize> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    (0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap())
        .collect()
}

fn mixed_load(name: &str, engine_args: &[&str]) {
    mixed_load_with(name, engine_args, None);
}

fn mixed_load_with(name: &str, engine_args: &[&str], threads: Option<Threads>) {
    let dir = Scratch::new(&format!("blkio-{name}"));
    let image = dir.path("disk.img");
    let mut model = patterned_image(&image, IMAGE);
    let socket = dir.path("blk.sock");
    // libblkio (virtio-driver 0.6) keeps its rings and buffers in memfds made without
    // MFD_ALLOW_SEALING, which can never be sealed: isola-blk maps those only when told to.
    let mut args = vec![
        "--num-queues",
        "4",
        "--queue-size",
        "64",
        "--allow-unsealed-memory",
    ];
    args.extend_from_slice(engine_args);
    let mut backend = Backend::start(&socket, &image, dir.path("stderr"), &args);

    let mut blkio = Blkio::new("virtio-blk-vhost-user").unwrap();
    blkio.set_str("path", socket.to_str().unwrap()).unwrap();
    blkio.connect().unwrap();
    assert_eq!(blkio.get_u64("capacity").unwrap(), IMAGE);
    assert_eq!(blkio.get_i32("max-queues").unwrap(), QUEUES as i32);
    blkio.set_i32("num-queues", QUEUES as i32).unwrap();
    blkio.set_i32("queue-size", 64).unwrap();
    let queues = blkio.start().unwrap().queues;
    let mut regions = Vec::new();
    for _ in 0..QUEUES {
        let region = blkio.alloc_mem_region(DEPTH * MAX_IO as usize).unwrap();
        blkio.map_mem_region(&region).unwrap();
        regions.push(region);
    }
    let done: usize = std::thread::scope(|s| {
        let workers: Vec<_> = queues
            .into_iter()
            .zip(model.chunks_mut(AREA as usize))
            .zip(&regions)
            .enumerate()
            .map(|(index, ((queue, model), region))| {
                let worker = Worker {
                    queue,
                    index,
                    buffers: region.addr,
                    model,
                    rng: Rng(0x9e37_79b9_7f4a_7c15 ^ (index as u64 + 1)),
                    slots: vec![None; DEPTH],
                };
                s.spawn(move || worker.run())
            })
            .collect();
        let done = workers.into_iter().map(|w| w.join().unwrap()).sum();
        // The queues are still running.
        if let Some(threads) = &threads {
            let listing = threads_of(device_pid(backend.child.id()));
            let pollers: Vec<_> = listing
                .iter()
                .filter(|(name, _)| name.starts_with("iou-sqp"))
                .collect();
            assert_eq!(pollers.len(), threads.pollers, "{listing:?}");
            if let Some(cpu) = threads.poll_cpu {
                for (name, cpus) in &listing {
                    let on_poll_cpu = cpus.split(',').any(|c| c == cpu.to_string());
                    let poller = name.starts_with("iou-sqp");
                    assert!(
                        if poller {
                            *cpus == cpu.to_string()
                        } else {
                            !on_poll_cpu
                        },
                        "{name} may run on CPUs {cpus}; the poller has CPU {cpu} to itself"
                    );
                }
            }
        }
        done
    });
    assert_eq!(done, QUEUES * OPS_PER_QUEUE);
    drop(blkio);
    assert!(
        backend.wait_log("frontend disconnected", 1),
        "{}",
        backend.log_text()
    );
    backend.kill();
    let on_disk = std::fs::read(&image).unwrap();
    assert!(
        on_disk == model,
        "image differs from the model after the backend exited"
    );
    // One warning only: the one --allow-unsealed-memory asks for.
    let log = backend.log_text();
    assert_eq!(log.matches("WARN").count(), 1, "{log}");
    assert!(log.contains("--allow-unsealed-memory"), "{log}");
}

#[test]
fn blkio_mixed_load_sync_engine() {
    mixed_load("sync", &["--engine", "sync"]);
}

#[test]
fn blkio_mixed_load_io_uring_engine() {
    mixed_load("io-uring", &["--engine", "io-uring"]);
}

/// One kernel thread submits the requests of all four queues (io_uring SQPOLL), inside the
/// sandbox.
#[test]
fn blkio_mixed_load_io_uring_with_kernel_polling() {
    let threads = Threads {
        pollers: 1,
        poll_cpu: None,
    };
    mixed_load_with(
        "sq-poll",
        &["--engine", "io-uring", "--sq-poll-ms", "5"],
        Some(threads),
    );
}

/// The default engine with kernel polling on a CPU of its own: reads through the polled
/// ring, writes on the queue's thread, and no thread of the process on the polling CPU.
#[test]
fn blkio_mixed_load_auto_engine_with_kernel_polling_on_its_own_cpu() {
    let cpus = own_cpus();
    let Some(&cpu) = cpus.last().filter(|_| cpus.len() > 1) else {
        eprintln!("one CPU only: --sq-poll-cpu needs two; testing without it");
        return mixed_load("auto-sq-poll", &["--sq-poll-ms", "5"]);
    };
    let threads = Threads {
        pollers: 1,
        poll_cpu: Some(cpu),
    };
    let cpu_arg = cpu.to_string();
    mixed_load_with(
        "auto-sq-poll",
        &["--sq-poll-ms", "5", "--sq-poll-cpu", &cpu_arg],
        Some(threads),
    );
}
