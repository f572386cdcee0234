//! An independent client against the real process: libblkio's Rust `blkio` crate (driver
//! `virtio-blk-vhost-user`, its own vhost-user frontend and virtio-blk driver) runs
//! thousands of mixed, concurrent reads, writes, flushes, discards and write-zeroes on four
//! queues at depth 32 against `isola-blk`, checking every byte read against a model; after the
//! backend exits, the image file must equal the model.

mod support;

use std::mem::MaybeUninit;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
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

fn mixed_load(name: &str, engine_args: &[&str]) {
    let dir = Scratch::new(&format!("blkio-{name}"));
    let image = dir.path("disk.img");
    let mut model = patterned_image(&image, IMAGE);
    let socket = dir.path("blk.sock");
    let mut args = vec!["--num-queues", "4", "--queue-size", "64"];
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
        workers.into_iter().map(|w| w.join().unwrap()).sum()
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
    assert!(
        !backend.log_text().contains("WARN"),
        "{}",
        backend.log_text()
    );
}

#[test]
fn blkio_mixed_load_sync_engine() {
    mixed_load("sync", &["--engine", "sync"]);
}

#[test]
fn blkio_mixed_load_io_uring_engine() {
    mixed_load("io-uring", &["--engine", "io-uring"]);
}

/// A kernel thread per queue submits the requests (io_uring SQPOLL), inside the sandbox.
#[test]
fn blkio_mixed_load_io_uring_with_kernel_polling() {
    mixed_load("sq-poll", &["--engine", "io-uring", "--sq-poll-ms", "5"]);
}

/// The default engine with kernel polling: reads through the polled ring, writes on the
/// queue's thread.
#[test]
fn blkio_mixed_load_auto_engine_with_kernel_polling() {
    mixed_load("auto-sq-poll", &["--sq-poll-ms", "5"]);
}
