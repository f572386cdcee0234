//! virtio-blk through the crate's `VirtIOBlk` (and, for the queue-size sweep, its raw
//! `VirtQueue`). Modes (`vdrivers.mode=`):
//!
//! * `work` (default): capacity and id, then `count` random sectors (splitmix64 from `seed`)
//!   written with `depth` requests in flight, a flush, and every one read back and verified.
//! * `ro`: the disk is read-only: the crate sees VIRTIO_BLK_F_RO, a read works and a write is
//!   refused by the device with VIRTIO_BLK_S_IOERR (the crate's `Error::IoError`).
//! * `resets`: `resets` times: a new transport and driver (a full reset and re-initialisation),
//!   some sectors written, read and verified, then the driver dropped (which resets the device).
//! * `qsizes`: the raw `VirtQueue` at every power-of-two size the device allows, each filled
//!   with requests.
//! * `loop`: `count` sectors written and verified over and over for `ms` milliseconds; a device
//!   process killed meanwhile is a pause, not an error (each request may take `stall` ms).

use alloc::vec::Vec;

use crate::pci::SpecTransport;
use virtio_drivers::device::blk::{BlkReq, BlkResp, RespStatus, VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::DeviceType;
use virtio_drivers::Error;

use crate::hal::{dma_pages_in_use, IdentityHal};
use crate::pci::{self, Root};
use crate::rt::{self, exit, mix64, Rng};
use crate::{fail, say};

type Blk = VirtIOBlk<IdentityHal, SpecTransport>;

/// What the guest writes to `sector` with `seed`: 64 little-endian words, word i =
/// mix64(seed * 0x9e3779b97f4a7c15 ^ (sector << 6 | i)). The tests recompute it.
pub fn pattern(sector: u64, seed: u64, out: &mut [u8; SECTOR_SIZE]) {
    let base = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for (i, word) in out.chunks_exact_mut(8).enumerate() {
        let v = mix64(base ^ (sector << 6 | i as u64));
        word.copy_from_slice(&v.to_le_bytes());
    }
}

pub fn run() {
    let mut buf = [0u8; 16];
    let mode = rt::arg("mode", &mut buf).unwrap_or("work");
    let mut root = pci::root();
    match mode {
        "work" => work(&mut root),
        "ro" => readonly(&mut root),
        "resets" => resets(&mut root),
        "qsizes" => crate::qsizes::run(&mut root),
        "loop" => run_loop(&mut root),
        _ => fail!(exit::SETUP, "unknown vdrivers.mode={mode:?}"),
    }
}

fn open(root: &mut Root, report: bool) -> Blk {
    let function = pci::find(root, DeviceType::Block, 0);
    let mut transport = pci::transport(root, function);
    if report {
        pci::report_features(&mut transport);
    }
    match Blk::new(transport) {
        Ok(blk) => blk,
        Err(e) => fail!(exit::FAILED, "VirtIOBlk::new: {e}"),
    }
}

fn work(root: &mut Root) {
    let mut blk = open(root, true);
    let capacity = blk.capacity();
    let mut id = [0u8; 20];
    let id_len = match blk.device_id(&mut id) {
        Ok(n) => n,
        Err(e) => fail!(exit::FAILED, "get-id: {e}"),
    };
    let id = core::str::from_utf8(&id[..id_len]).unwrap_or("?");
    say!(
        "capacity={capacity} readonly={} id={id}",
        blk.readonly() as u8
    );
    let count = rt::arg_u64("count", 10_000);
    let seed = rt::arg_u64("seed", 1);
    let depth = rt::arg_u64("depth", 8) as usize;
    let sectors = random_sectors(count, seed, capacity);
    let start = rt::now_ms();
    let mut io = Pipeline::new(depth, 10_000);
    io.run(&mut blk, &sectors, seed, true);
    say!("wrote {count} sectors");
    if let Err(e) = blk.flush() {
        fail!(exit::FAILED, "flush: {e}");
    }
    say!("flushed");
    io.run(&mut blk, &sectors, seed, false);
    say!("verified {count} sectors");
    say!(
        "requests={} ms={}",
        io.requests,
        rt::now_ms().saturating_sub(start)
    );
}

/// `count` sectors from splitmix64(`seed`), each `next() % capacity` (repeats allowed: a
/// sector's content depends only on the sector and the seed).
pub fn random_sectors(count: u64, seed: u64, capacity: u64) -> Vec<u64> {
    if capacity == 0 {
        fail!(exit::FAILED, "capacity 0");
    }
    let mut rng = Rng(seed);
    (0..count).map(|_| rng.next() % capacity).collect()
}

fn readonly(root: &mut Root) {
    let mut blk = open(root, true);
    say!(
        "capacity={} readonly={}",
        blk.capacity(),
        blk.readonly() as u8
    );
    if !blk.readonly() {
        fail!(exit::FAILED, "the crate does not see VIRTIO_BLK_F_RO");
    }
    let mut data = [0u8; SECTOR_SIZE];
    if let Err(e) = blk.read_blocks(0, &mut data) {
        fail!(exit::FAILED, "read on a read-only disk: {e}");
    }
    say!("read ok");
    pattern(0, 1, &mut data);
    match blk.write_blocks(0, &data) {
        Err(Error::IoError) => say!("write refused: IOERR"),
        Err(e) => fail!(exit::FAILED, "write refused with {e}, expected IOERR"),
        Ok(()) => fail!(exit::FAILED, "write on a read-only disk succeeded"),
    }
    // The device keeps serving after the refusal.
    if let Err(e) = blk.read_blocks(1, &mut data) {
        fail!(exit::FAILED, "read after the refused write: {e}");
    }
    say!("read after refusal ok");
}

fn resets(root: &mut Root) {
    let times = rt::arg_u64("resets", 100);
    let seed = rt::arg_u64("seed", 1);
    let baseline = dma_pages_in_use();
    let mut capacity = 0;
    for round in 0..times {
        let mut blk = open(root, round == 0);
        say!("round {round}");
        capacity = blk.capacity();
        // Work between resets: 16 sectors of this round's pattern, written then verified.
        let sectors = random_sectors(16, seed.wrapping_add(round), capacity);
        let mut io = Pipeline::new(4, 10_000);
        io.run(&mut blk, &sectors, seed.wrapping_add(round), true);
        io.run(&mut blk, &sectors, seed.wrapping_add(round), false);
        drop(io);
        drop(blk);
        if dma_pages_in_use() != baseline {
            fail!(exit::FAILED, "round {round}: DMA pages not returned");
        }
    }
    say!("capacity={capacity}");
    say!("resets={times} each verified");
}

fn run_loop(root: &mut Root) {
    let mut blk = open(root, true);
    let count = rt::arg_u64("count", 256);
    let seed = rt::arg_u64("seed", 1);
    let ms = rt::arg_u64("ms", 5000);
    let stall = rt::arg_u64("stall", 30_000);
    let sectors = random_sectors(count, seed, blk.capacity());
    let mut io = Pipeline::new(8, stall);
    let end = rt::Deadline::after_ms(ms);
    let mut rounds = 0u64;
    say!("looping");
    while !end.passed() {
        let round_seed = seed.wrapping_add(rounds);
        io.run(&mut blk, &sectors, round_seed, true);
        io.run(&mut blk, &sectors, round_seed, false);
        rounds += 1;
        say!("round {rounds} verified longest-wait-ms={}", io.longest_ms);
    }
    say!(
        "rounds={rounds} requests={} longest-wait-ms={}",
        io.requests,
        io.longest_ms
    );
}

/// One request slot: the buffers stay put (heap, never moved) while the device owns them.
struct Slot {
    req: BlkReq,
    resp: BlkResp,
    data: [u8; SECTOR_SIZE],
    sector: u64,
    token: Option<u16>,
}

/// Up to `depth` requests in flight through the crate's non-blocking calls.
struct Pipeline {
    slots: Vec<Slot>,
    /// A request may wait this long for its completion (a device restart is a pause).
    stall_ms: u64,
    requests: u64,
    longest_ms: u64,
}

impl Pipeline {
    fn new(depth: usize, stall_ms: u64) -> Pipeline {
        let slots = (0..depth.max(1))
            .map(|_| Slot {
                req: BlkReq::default(),
                resp: BlkResp::default(),
                data: [0; SECTOR_SIZE],
                sector: 0,
                token: None,
            })
            .collect();
        Pipeline {
            slots,
            stall_ms,
            requests: 0,
            longest_ms: 0,
        }
    }

    /// Writes (or reads back and verifies) the pattern of `seed` on every sector of `sectors`.
    fn run(&mut self, blk: &mut Blk, sectors: &[u64], seed: u64, write: bool) {
        let mut next = 0;
        let mut in_flight = 0;
        let mut waited_since = rt::now_ms();
        while next < sectors.len() || in_flight > 0 {
            while next < sectors.len() {
                let Some(slot) = self.slots.iter_mut().find(|s| s.token.is_none()) else {
                    break;
                };
                slot.sector = sectors[next];
                let result = if write {
                    pattern(slot.sector, seed, &mut slot.data);
                    // SAFETY: the slot's buffers live in `self.slots`, which is neither moved
                    // nor touched until the request completes (token set below).
                    unsafe {
                        blk.write_blocks_nb(
                            slot.sector as usize,
                            &mut slot.req,
                            &slot.data,
                            &mut slot.resp,
                        )
                    }
                } else {
                    slot.data = [0; SECTOR_SIZE];
                    // SAFETY: as for the write.
                    unsafe {
                        blk.read_blocks_nb(
                            slot.sector as usize,
                            &mut slot.req,
                            &mut slot.data,
                            &mut slot.resp,
                        )
                    }
                };
                match result {
                    Ok(token) => slot.token = Some(token),
                    Err(Error::QueueFull) => break,
                    Err(e) => fail!(exit::FAILED, "submit sector {}: {e}", slot.sector),
                }
                next += 1;
                in_flight += 1;
            }
            match blk.peek_used() {
                Some(token) => {
                    self.complete(blk, token, seed, write);
                    in_flight -= 1;
                    let now = rt::now_ms();
                    self.longest_ms = self.longest_ms.max(now.saturating_sub(waited_since));
                    waited_since = now;
                }
                None => {
                    if rt::now_ms().saturating_sub(waited_since) > self.stall_ms {
                        fail!(
                            exit::TIMEOUT,
                            "timeout: no completion for {} ms ({in_flight} in flight)",
                            self.stall_ms
                        );
                    }
                    core::hint::spin_loop();
                }
            }
        }
    }

    fn complete(&mut self, blk: &mut Blk, token: u16, seed: u64, write: bool) {
        let Some(slot) = self.slots.iter_mut().find(|s| s.token == Some(token)) else {
            fail!(exit::FAILED, "used token {token} is not in flight");
        };
        // SAFETY: the same buffers as were submitted with this token.
        let result = unsafe {
            if write {
                blk.complete_write_blocks(token, &slot.req, &slot.data, &mut slot.resp)
            } else {
                blk.complete_read_blocks(token, &slot.req, &mut slot.data, &mut slot.resp)
            }
        };
        slot.token = None;
        self.requests += 1;
        if let Err(e) = result {
            let status = slot.resp.status();
            fail!(
                exit::FAILED,
                "sector {}: {e} (status {})",
                slot.sector,
                status_name(status)
            );
        }
        if !write {
            let mut expected = [0u8; SECTOR_SIZE];
            pattern(slot.sector, seed, &mut expected);
            if slot.data != expected {
                fail!(exit::FAILED, "sector {} read back wrong", slot.sector);
            }
        }
    }
}

fn status_name(status: RespStatus) -> &'static str {
    match status {
        RespStatus::OK => "OK",
        RespStatus::IO_ERR => "IOERR",
        RespStatus::UNSUPPORTED => "UNSUPP",
        _ => "other",
    }
}
