//! virtio-blk through the crate's raw `VirtQueue` at every power-of-two size the device allows
//! (the crate's queues are power-of-two sized, `VirtQueue<H, SIZE>`), with the minimal feature
//! set (VERSION_1 only) and with VERSION_1 + INDIRECT_DESC. Each size: a fresh reset and
//! initialisation by hand through the crate's `Transport` calls, then as many write requests as
//! the queue holds in flight, then as many reads, verified.
//!
//! Requests use two buffers (header + data in one, status in the other, or header in one,
//! data + status in the other: virtio 1.2 2.6.4, any framing), so size 2 works without
//! INDIRECT_DESC; with it, one ring descriptor per request, so twice as many are in flight.
//! Size 1 cannot carry a virtio-blk request at all: a chain, indirect entries included, must
//! not be longer than the queue size (virtio 1.2 2.7.5.3.1), and a request needs a
//! device-readable and a device-writable buffer; the crate enforces this (QueueFull).

use alloc::vec::Vec;

use crate::pci::SpecTransport;
use virtio_drivers::device::blk::SECTOR_SIZE;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::pci::bus::DeviceFunction;
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};

use crate::blk::{pattern, random_sectors};
use crate::hal::IdentityHal;
use crate::pci::{self, Root};
use crate::rt::{self, exit};
use crate::{fail, say};

const VERSION_1: u64 = 1 << 32;
const INDIRECT_DESC: u64 = 1 << 28;
const HDR: usize = 16;
/// The largest queue the crate is instantiated for here (a `VirtQueue` keeps a by-value shadow
/// of its descriptor table, which must fit the guest's 64 KiB stack).
const MAX_SWEEP: u32 = 256;

pub fn run(root: &mut Root) {
    let function = pci::find(root, DeviceType::Block, 0);
    let mut transport = pci::transport(root, function);
    let offered = pci::report_features(&mut transport);
    let max = transport.max_queue_size(0);
    drop(transport);
    say!("max-queue-size={max}");
    let seed = rt::arg_u64("seed", 1);
    let mut tested = Vec::new();
    for indirect in [false, true] {
        if indirect && offered & INDIRECT_DESC == 0 {
            say!("INDIRECT_DESC not offered");
            continue;
        }
        let mut size = 2;
        while size <= max.min(MAX_SWEEP) {
            let ok = match size {
                2 => sweep::<2>(root, function, indirect, seed),
                4 => sweep::<4>(root, function, indirect, seed),
                8 => sweep::<8>(root, function, indirect, seed),
                16 => sweep::<16>(root, function, indirect, seed),
                32 => sweep::<32>(root, function, indirect, seed),
                64 => sweep::<64>(root, function, indirect, seed),
                128 => sweep::<128>(root, function, indirect, seed),
                _ => sweep::<256>(root, function, indirect, seed),
            };
            say!("size={size} indirect={} requests={ok}", indirect as u8);
            tested.push(size);
            size *= 2;
        }
    }
    if max > MAX_SWEEP {
        say!("sizes above {MAX_SWEEP} not swept");
    }
    say!("sizes tested={}", tested.len());
}

/// Resets the device and takes it to FEATURES_OK with `features`; fails the run otherwise.
fn negotiate(t: &mut SpecTransport, features: u64) {
    t.set_status(DeviceStatus::empty());
    rt::wait_for(10_000, "device reset", || {
        (t.get_status() == DeviceStatus::empty()).then_some(())
    });
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    t.write_driver_features(features);
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
    if !t.get_status().contains(DeviceStatus::FEATURES_OK) {
        fail!(exit::FAILED, "device refused features {features:#x}");
    }
}

struct Slot {
    /// Header (+ data, for a write).
    out: [u8; HDR + SECTOR_SIZE],
    /// Data + status for a read; status (first byte) for a write.
    inb: [u8; SECTOR_SIZE + 1],
    sector: u64,
    token: Option<u16>,
}

/// One size: returns the number of requests completed.
fn sweep<const N: usize>(
    root: &mut Root,
    function: DeviceFunction,
    indirect: bool,
    seed: u64,
) -> u64 {
    let mut t = pci::transport(root, function);
    let features = VERSION_1 | if indirect { INDIRECT_DESC } else { 0 };
    negotiate(&mut t, features);
    let mut queue = match VirtQueue::<IdentityHal, N>::new(&mut t, 0, indirect, false) {
        Ok(q) => q,
        Err(e) => fail!(exit::FAILED, "VirtQueue<{N}>::new: {e}"),
    };
    t.finish_init();
    // virtio_blk_config.capacity: the crate reads config space in 4-byte units (virtio 1.2
    // 4.1.4.3: only 4-byte alignment of the device configuration is guaranteed).
    let capacity = t
        .read_consistent(|| {
            let lo = t.read_config_space::<u32>(0)?;
            let hi = t.read_config_space::<u32>(4)?;
            Ok(u64::from(lo) | u64::from(hi) << 32)
        })
        .unwrap_or(0);
    let per_request = if indirect { 1 } else { 2 };
    let depth = (N / per_request).max(1);
    let sectors = random_sectors(depth as u64 * 2, seed ^ N as u64, capacity);
    let mut slots: Vec<Slot> = (0..depth)
        .map(|_| Slot {
            out: [0; HDR + SECTOR_SIZE],
            inb: [0; SECTOR_SIZE + 1],
            sector: 0,
            token: None,
        })
        .collect();
    let mut done = 0;
    for write in [true, false] {
        for chunk in sectors.chunks(depth) {
            for (slot, &sector) in slots.iter_mut().zip(chunk) {
                submit(&mut queue, &mut t, slot, sector, seed, write);
            }
            for _ in chunk {
                let token = rt::wait_for(10_000, "queue-size request", || queue.peek_used());
                let Some(slot) = slots.iter_mut().find(|s| s.token == Some(token)) else {
                    fail!(exit::FAILED, "size {N}: used token {token} not in flight");
                };
                complete(&mut queue, slot, seed, write, N);
                done += 1;
            }
        }
    }
    t.set_status(DeviceStatus::empty());
    rt::wait_for(10_000, "device reset", || {
        (t.get_status() == DeviceStatus::empty()).then_some(())
    });
    drop(queue);
    done
}

fn submit<const N: usize>(
    queue: &mut VirtQueue<IdentityHal, N>,
    t: &mut SpecTransport,
    slot: &mut Slot,
    sector: u64,
    seed: u64,
    write: bool,
) {
    slot.sector = sector;
    let kind: u32 = if write { 1 } else { 0 };
    slot.out[0..4].copy_from_slice(&kind.to_le_bytes());
    slot.out[4..8].fill(0);
    slot.out[8..16].copy_from_slice(&sector.to_le_bytes());
    slot.inb.fill(0xff);
    let result = if write {
        let mut data = [0u8; SECTOR_SIZE];
        pattern(sector, seed, &mut data);
        slot.out[HDR..].copy_from_slice(&data);
        // SAFETY: the slot's buffers are neither moved nor touched until pop_used.
        unsafe { queue.add(&[&slot.out[..]], &mut [&mut slot.inb[..1]]) }
    } else {
        // SAFETY: as above.
        unsafe { queue.add(&[&slot.out[..HDR]], &mut [&mut slot.inb[..]]) }
    };
    match result {
        Ok(token) => slot.token = Some(token),
        Err(e) => fail!(exit::FAILED, "size {N}: add: {e}"),
    }
    if queue.should_notify() {
        t.notify(0);
    }
}

fn complete<const N: usize>(
    queue: &mut VirtQueue<IdentityHal, N>,
    slot: &mut Slot,
    seed: u64,
    write: bool,
    size: usize,
) {
    let Some(token) = slot.token.take() else {
        fail!(exit::FAILED, "size {size}: completing an idle slot");
    };
    // SAFETY: the same buffers as were added with this token.
    let result = unsafe {
        if write {
            queue.pop_used(token, &[&slot.out[..]], &mut [&mut slot.inb[..1]])
        } else {
            queue.pop_used(token, &[&slot.out[..HDR]], &mut [&mut slot.inb[..]])
        }
    };
    let len = match result {
        Ok(len) => len,
        Err(e) => fail!(exit::FAILED, "size {size}: pop_used: {e}"),
    };
    let status = if write {
        slot.inb[0]
    } else {
        slot.inb[SECTOR_SIZE]
    };
    if status != 0 {
        fail!(
            exit::FAILED,
            "size {size}: sector {} status {status}",
            slot.sector
        );
    }
    let expected_len = if write { 1 } else { SECTOR_SIZE as u32 + 1 };
    if len != expected_len {
        fail!(
            exit::FAILED,
            "size {size}: used len {len}, expected {expected_len}"
        );
    }
    if !write {
        let mut expected = [0u8; SECTOR_SIZE];
        pattern(slot.sector, seed, &mut expected);
        if slot.inb[..SECTOR_SIZE] != expected {
            fail!(
                exit::FAILED,
                "size {size}: sector {} read back wrong",
                slot.sector
            );
        }
    }
}
