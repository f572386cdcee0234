//! virtio-net semantics over queues and the tap: a transmit queue writes each guest frame to
//! its tap queue, a receive queue reads frames from it into guest buffers, and the control
//! queue answers the commands the device offers (only the queue-pair count).
//!
//! Nothing a guest sends can crash the process or reach outside guest memory: a frame with a
//! malformed header, the wrong size or buffers outside guest memory is dropped and counted,
//! and its buffers are given back.
//!
//! Receive back-pressure: a frame is read from the tap only when it can be placed or there is
//! none held already. When the guest has no buffers, at most one frame waits here and the rest
//! stay in the tap's own bounded queue (the kernel drops past its length, as a full NIC ring
//! does); the driver's next kick resumes reception.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use isola_device_common::chain::{self, Segment};
use isola_device_common::logging::RateLimiter;
use isola_device_common::memory::Memory;
use isola_device_common::{DescriptorChain, Progress, QueueContext, QueueError, QueueHandler};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_OK,
};

use vm_memory::{Address, GuestMemoryBackend};

use crate::tap::{self, Tap, VNET_HDR_LEN};

/// Largest frame after the header with a GSO type: a 64 KiB IP packet, Ethernet and VLAN
/// headers.
pub const MAX_GSO_FRAME: usize = 65535 + 14 + 4;
/// Ethernet and VLAN header on top of the MTU, for frames without GSO.
pub const L2_OVERHEAD: usize = 14 + 4;
/// Shortest frame: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// Frames handled before the worker publishes and signals what is done: the driver refills
/// while the device carries on, instead of both waiting for whole rings.
const BATCH: u32 = 64;
/// Transmitted frames between two checks whether the driver asked for a call (EVENT_IDX).
const NOTIFY_EVERY: usize = 4;
/// Most buffers in one transmitted frame (the kernel's iovec limit, minus the header).
const MAX_TX_SEGMENTS: usize = 1023;
/// Frames (header included) up to this size are copied out of guest memory and written
/// with one plain `write(2)`; larger ones (GSO) are gathered from guest memory in place.
/// For small frames the copy costs less than the kernel's import of an iovec array, and
/// what the kernel sees is exactly what was checked.
const TX_COPY_MAX: usize = 4096;

/// Counters of one device, across queues and connections.
#[derive(Debug, Default)]
pub struct Stats {
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub rx_dropped: AtomicU64,
    /// RX buffers the guest gave that could not be used (bad chain, too short).
    pub rx_bad_buffers: AtomicU64,
}

impl Stats {
    fn add(counter: &AtomicU64, n: u64) -> u64 {
        counter.fetch_add(n, Ordering::Relaxed) + n
    }

    /// One line with every counter, as logged when a queue stops.
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "tx_frames={} tx_bytes={} tx_dropped={} rx_frames={} rx_bytes={} rx_dropped={} rx_bad_buffers={}",
            g(&self.tx_frames),
            g(&self.tx_bytes),
            g(&self.tx_dropped),
            g(&self.rx_frames),
            g(&self.rx_bytes),
            g(&self.rx_dropped),
            g(&self.rx_bad_buffers),
        )
    }
}

fn has(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// `struct virtio_net_hdr_v1`, little endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VnetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHeader {
    pub fn parse(b: &[u8; VNET_HDR_LEN]) -> VnetHeader {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        }
    }

    /// Why a transmitted header is unacceptable under `features`, for a frame of `len` bytes
    /// after the header; `None` if it is fine.
    pub fn tx_problem(&self, features: u64, len: usize, mtu: u16) -> Option<&'static str> {
        if self.flags & !(VIRTIO_NET_HDR_F_NEEDS_CSUM as u8) != 0 {
            return Some("unknown header flags");
        }
        if self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0 {
            if !has(features, VIRTIO_NET_F_CSUM) {
                return Some("checksum offload not negotiated");
            }
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            if end > len {
                return Some("checksum position outside the frame");
            }
        }
        let ecn = self.gso_type & VIRTIO_NET_HDR_GSO_ECN as u8 != 0;
        let gso = u32::from(self.gso_type & !(VIRTIO_NET_HDR_GSO_ECN as u8));
        if ecn && !has(features, VIRTIO_NET_F_HOST_ECN) {
            return Some("ECN segmentation not negotiated");
        }
        let allowed = match gso {
            VIRTIO_NET_HDR_GSO_NONE => {
                if ecn {
                    return Some("ECN bit without a GSO type");
                }
                return if len > usize::from(mtu) + L2_OVERHEAD {
                    Some("oversized frame")
                } else if len < MIN_FRAME {
                    Some("runt frame")
                } else {
                    None
                };
            }
            VIRTIO_NET_HDR_GSO_TCPV4 => has(features, VIRTIO_NET_F_HOST_TSO4),
            VIRTIO_NET_HDR_GSO_TCPV6 => has(features, VIRTIO_NET_F_HOST_TSO6),
            VIRTIO_NET_HDR_GSO_UDP => has(features, VIRTIO_NET_F_HOST_UFO),
            _ => return Some("unknown GSO type"),
        };
        if !allowed {
            Some("GSO type not negotiated")
        } else if self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 == 0 {
            Some("GSO without checksum offload")
        } else if self.gso_size == 0 {
            Some("GSO with a segment size of 0")
        } else if len > MAX_GSO_FRAME {
            Some("oversized frame")
        } else if len < MIN_FRAME {
            Some("runt frame")
        } else {
            None
        }
    }
}

/// Copies the first `buf.len()` bytes of `segs` into `buf` (which they hold: the caller
/// sized it from their total). A buffer in one region is one bounds-checked lookup and one
/// copy; anything else goes the general way, which also names the buffer at fault.
fn copy_out(mem: &Memory, segs: &[Segment], buf: &mut [u8]) -> Result<(), chain::ChainError> {
    let mut done = 0usize;
    for (i, seg) in segs.iter().enumerate() {
        let n = (buf.len() - done).min(seg.len as usize);
        if n == 0 {
            continue;
        }
        match mem.get_slice(seg.addr, n) {
            Ok(slice) => {
                slice.copy_to(&mut buf[done..done + n]);
            }
            Err(_) => return chain::read_bytes(mem, &segs[i..], &mut buf[done..]),
        }
        done += n;
    }
    Ok(())
}

/// A rate-limited log of dropped frames.
struct DropLog {
    limiter: RateLimiter,
    what: &'static str,
}

impl DropLog {
    fn new(what: &'static str) -> Self {
        DropLog {
            limiter: RateLimiter::new(5),
            what,
        }
    }

    fn note(&mut self, reason: &dyn std::fmt::Display, total: u64) {
        if let Some(skipped) = self.limiter.allow() {
            let more = if skipped > 0 {
                format!(" ({skipped} more not logged)")
            } else {
                String::new()
            };
            log::warn!("{}: dropped: {reason}; {total} so far{more}", self.what);
        }
    }
}

/// A transmit queue: guest -> tap.
pub struct TxQueue {
    tap: Arc<Tap>,
    pair: usize,
    features: u64,
    mtu: u16,
    stats: Arc<Stats>,
    drops: DropLog,
    /// The iovecs of the frame being sent, kept to avoid an allocation per frame.
    iov: Vec<libc::iovec>,
    /// The buffers of the frame being sent, kept for the same reason.
    segs: Vec<Segment>,
    /// A small frame, header included, copied out of guest memory.
    copy: Vec<u8>,
    /// The chains of the batch being sent, kept to avoid an allocation per batch.
    chains: Vec<DescriptorChain>,
}

// SAFETY: `iov` only holds pointers between the start and the end of one `send` call (it
// is cleared first thing); a TxQueue moved to another thread carries no live pointer.
unsafe impl Send for TxQueue {}

impl TxQueue {
    pub fn new(tap: Arc<Tap>, pair: usize, features: u64, mtu: u16, stats: Arc<Stats>) -> Self {
        TxQueue {
            tap,
            pair,
            features,
            mtu,
            stats,
            drops: DropLog::new("tx"),
            iov: Vec::with_capacity(16),
            segs: Vec::with_capacity(16),
            copy: vec![0u8; TX_COPY_MAX],
            chains: Vec::with_capacity(BATCH as usize),
        }
    }

    fn drop_frame(&mut self, reason: &dyn std::fmt::Display) {
        let total = Stats::add(&self.stats.tx_dropped, 1);
        self.drops.note(reason, total);
    }

    /// Sends one chain's frame; `Err` is a reason to drop it.
    fn send(&mut self, chain: &DescriptorChain) -> Result<usize, String> {
        let mem = chain.memory();
        let mut segs = std::mem::take(&mut self.segs);
        let result = chain
            .segments_into(&mut segs)
            .map_err(|e| e.to_string())
            .and_then(|()| self.send_segments(mem, &segs));
        self.segs = segs;
        result
    }

    fn send_segments(&mut self, mem: &Memory, segs: &[Segment]) -> Result<usize, String> {
        if segs.iter().any(|s| s.writable) {
            return Err("device-writable buffer in a transmit chain".into());
        }
        let total = chain::total_len(segs);
        let Some(len) = usize::try_from(total)
            .ok()
            .and_then(|t| t.checked_sub(VNET_HDR_LEN))
        else {
            return Err("chain shorter than the virtio-net header".into());
        };
        let fd = self
            .tap
            .queue(self.pair)
            .ok_or("no tap queue for this pair")?
            .as_fd();
        if let Some(copy) = self.copy.get_mut(..VNET_HDR_LEN + len) {
            copy_out(mem, segs, copy).map_err(|e| e.to_string())?;
            let mut hdr = [0u8; VNET_HDR_LEN];
            hdr.copy_from_slice(&copy[..VNET_HDR_LEN]);
            let parsed = VnetHeader::parse(&hdr);
            if let Some(problem) = parsed.tx_problem(self.features, len, self.mtu) {
                return Err(problem.into());
            }
            return match tap::write_frame(fd, copy) {
                Ok(_) => Ok(len),
                Err(e) => Err(format!("the tap refused it: {e}")),
            };
        }
        let mut hdr = [0u8; VNET_HDR_LEN];
        chain::read_bytes(mem, segs, &mut hdr).map_err(|e| e.to_string())?;
        let hdr = &mut hdr;
        let parsed = VnetHeader::parse(hdr);
        if let Some(problem) = parsed.tx_problem(self.features, len, self.mtu) {
            return Err(problem.into());
        }
        // num_buffers means nothing on transmit; the tap ignores it. The frame goes out as
        // our checked copy of the header, then the guest's buffers in place.
        self.iov.clear();
        self.iov.push(libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: VNET_HDR_LEN,
        });
        let mut skip = VNET_HDR_LEN as u64;
        for seg in segs {
            let len = u64::from(seg.len);
            if len <= skip {
                skip -= len;
                continue;
            }
            let addr = seg.addr.checked_add(skip).ok_or("buffer address wraps")?;
            let len = (len - skip) as usize;
            skip = 0;
            // Nearly every buffer lies in one region: one lookup, no iterator.
            if let Ok(slice) = mem.get_slice(addr, len) {
                if self.iov.len() > MAX_TX_SEGMENTS {
                    return Err("too many buffers in one frame".into());
                }
                // The pointer stays valid after `slice` goes, as below.
                self.iov.push(libc::iovec {
                    iov_base: slice.ptr_guard().as_ptr() as *mut libc::c_void,
                    iov_len: slice.len(),
                });
                continue;
            }
            for slice in mem.get_slices(addr, len) {
                let slice =
                    slice.map_err(|_| format!("buffer at {:#x} is not in guest memory", addr.0))?;
                if self.iov.len() > MAX_TX_SEGMENTS {
                    return Err("too many buffers in one frame".into());
                }
                // The pointer stays valid after `slice` goes: it points into the guest
                // mapping, which `mem` (held by the chain for this whole call) keeps mapped.
                self.iov.push(libc::iovec {
                    iov_base: slice.ptr_guard().as_ptr() as *mut libc::c_void,
                    iov_len: slice.len(),
                });
            }
        }
        // SAFETY: the first iovec is `hdr`, alive for the call; the others are ranges of
        // the guest mapping that `get_slice`/`get_slices` bounds-checked, kept mapped by
        // `mem` (borrowed from the chain by `send`, alive for the call). The kernel only
        // reads them.
        match unsafe { tap::write_iov(fd, &self.iov) } {
            Ok(_) => Ok(len),
            Err(e) => Err(format!("the tap refused it: {e}")),
        }
    }
}

impl TxQueue {
    /// Sends up to [`BATCH`] frames; `sent` counts frames and bytes that went out.
    fn send_batch(
        &mut self,
        queue: &mut QueueContext<'_>,
        sent: &mut (u64, u64),
    ) -> Result<(), QueueError> {
        // From taking a frame off the ring to completing it, a stop on request waits (here,
        // for the rest of the batch: one section per batch, not two atomic updates per frame):
        // a frame written to the tap and handed over uncompleted would go out twice.
        let Some(_busy) = isola_device_common::stop::Busy::enter() else {
            return Ok(());
        };
        // Taken together: the available index is read once per batch, not once per frame.
        let mut chains = std::mem::take(&mut self.chains);
        let result = self.send_chains(queue, &mut chains, sent);
        chains.clear();
        self.chains = chains;
        result
    }

    fn send_chains(
        &mut self,
        queue: &mut QueueContext<'_>,
        chains: &mut Vec<DescriptorChain>,
        sent: &mut (u64, u64),
    ) -> Result<(), QueueError> {
        queue.pop_many(BATCH as usize, chains)?;
        for (i, chain) in chains.iter().enumerate() {
            match self.send(chain) {
                Ok(len) => {
                    sent.0 += 1;
                    sent.1 += len as u64;
                }
                Err(reason) => self.drop_frame(&reason),
            }
            queue.complete(chain.head(), 0)?;
            // A driver that asked to hear once part of the ring is used (EVENT_IDX) hears it
            // within NOTIFY_EVERY frames, not at the end of the batch: it refills while the
            // rest is sent, and the ring does not run dry while its call waits behind up to a
            // batch of frames. (The check is a fence and a read of the driver's index.)
            if i % NOTIFY_EVERY == NOTIFY_EVERY - 1 {
                queue.notify()?;
            }
        }
        Ok(())
    }
}

impl QueueHandler for TxQueue {
    fn process(&mut self, queue: &mut QueueContext<'_>) -> Result<Progress, QueueError> {
        // Idle after a batch: the worker signals the driver and calls again while the ring
        // has more.
        // The shared counters are added to once per batch, not twice per frame.
        let mut sent = (0u64, 0u64);
        let result = self.send_batch(queue, &mut sent);
        Stats::add(&self.stats.tx_frames, sent.0);
        Stats::add(&self.stats.tx_bytes, sent.1);
        result.map(|()| Progress::Idle)
    }

    fn drain(&mut self, _queue: &mut QueueContext<'_>) -> Result<(), QueueError> {
        log::info!(
            "tx queue of pair {} stopped: {}",
            self.pair,
            self.stats.summary()
        );
        Ok(())
    }
}

/// A guest receive buffer taken from the ring and not yet used.
struct RxBuffer {
    head: u16,
    segs: Vec<Segment>,
    capacity: usize,
}

/// A receive queue: tap -> guest.
pub struct RxQueue {
    tap: Arc<Tap>,
    pair: usize,
    mergeable: bool,
    features: u64,
    /// Flags the driver may see: none without VIRTIO_NET_F_GUEST_CSUM.
    flag_mask: u8,
    stats: Arc<Stats>,
    drops: DropLog,
    /// The frame read from the tap and not yet placed (`frame_len` bytes of `frame`).
    frame: Vec<u8>,
    frame_len: Option<usize>,
    /// Buffers taken for the frame being placed.
    held: Vec<RxBuffer>,
}

impl RxQueue {
    pub fn new(tap: Arc<Tap>, pair: usize, features: u64, stats: Arc<Stats>) -> Self {
        RxQueue {
            tap,
            pair,
            mergeable: has(features, VIRTIO_NET_F_MRG_RXBUF),
            features,
            flag_mask: if has(features, VIRTIO_NET_F_GUEST_CSUM) {
                (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) as u8
            } else {
                0
            },
            stats,
            drops: DropLog::new("rx"),
            frame: vec![0u8; VNET_HDR_LEN + MAX_GSO_FRAME],
            frame_len: None,
            held: Vec::new(),
        }
    }

    fn held_capacity(&self) -> usize {
        self.held.iter().map(|b| b.capacity).sum()
    }

    /// Takes one more usable buffer; `Ok(false)` when the ring has none.
    fn take_buffer(&mut self, queue: &mut QueueContext<'_>) -> Result<bool, QueueError> {
        loop {
            let Some(chain) = queue.pop()? else {
                return Ok(false);
            };
            let problem = match chain.segments() {
                Ok(segs) if segs.iter().any(|s| !s.writable) => {
                    Some("device-readable buffer in a receive chain".to_owned())
                }
                Ok(segs) => {
                    let capacity = usize::try_from(chain::total_len(&segs)).unwrap_or(usize::MAX);
                    match chain::host_slices(chain.memory(), &segs) {
                        Err(e) => Some(e.to_string()),
                        Ok(_) if capacity < VNET_HDR_LEN => {
                            Some("receive buffer shorter than the header".to_owned())
                        }
                        Ok(_) => {
                            self.held.push(RxBuffer {
                                head: chain.head(),
                                segs,
                                capacity,
                            });
                            return Ok(true);
                        }
                    }
                }
                Err(e) => Some(e.to_string()),
            };
            if let Some(reason) = problem {
                let total = Stats::add(&self.stats.rx_bad_buffers, 1);
                self.drops
                    .note(&format!("bad receive buffer: {reason}"), total);
                queue.complete(chain.head(), 0)?;
            }
        }
    }

    /// Places the held frame; `Ok(false)` if the guest has not given enough buffers yet.
    fn place(&mut self, queue: &mut QueueContext<'_>, len: usize) -> Result<bool, QueueError> {
        if self.mergeable {
            while self.held_capacity() < len {
                if !self.take_buffer(queue)? {
                    return Ok(false);
                }
            }
        } else {
            if self.held.is_empty() && !self.take_buffer(queue)? {
                return Ok(false);
            }
            if self.held[0].capacity < len {
                // Without mergeable buffers one buffer must hold the frame: this frame
                // cannot be delivered into the buffer the guest gave, which stays for the
                // next one.
                let total = Stats::add(&self.stats.rx_dropped, 1);
                let why = format!("{len}-byte frame, {}-byte buffer", self.held[0].capacity);
                self.drops.note(&why, total);
                self.frame_len = None;
                return Ok(true);
            }
        }
        let used = if self.mergeable {
            let mut n = 0;
            let mut covered = 0;
            while covered < len {
                covered += self.held[n].capacity;
                n += 1;
            }
            n
        } else {
            1
        };
        // n <= held.len() <= queue size, so it fits in u16.
        self.frame[10..12].copy_from_slice(&(used as u16).to_le_bytes());
        let mut offset = 0;
        for buf in self.held.drain(..used) {
            let n = buf.capacity.min(len - offset);
            let result =
                chain::write_bytes(queue.memory(), &buf.segs, &self.frame[offset..offset + n]);
            if let Err(e) = result {
                // Checked when taken; only a memory table change could get here.
                let total = Stats::add(&self.stats.rx_bad_buffers, 1);
                self.drops.note(&format!("bad receive buffer: {e}"), total);
            }
            offset += n;
            // n <= len <= 64 KiB + header.
            queue.complete(buf.head, n as u32)?;
        }
        Stats::add(&self.stats.rx_frames, 1);
        Stats::add(&self.stats.rx_bytes, (len - VNET_HDR_LEN) as u64);
        self.frame_len = None;
        Ok(true)
    }

    /// Why the frame just read cannot go to this driver: an offload it did not accept.
    fn unacceptable(&self) -> Option<String> {
        let (flags, gso) = (self.frame[0], u32::from(self.frame[1]));
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 & !self.flag_mask != 0 {
            return Some("partial checksum for a driver without GUEST_CSUM".into());
        }
        let base = gso & !VIRTIO_NET_HDR_GSO_ECN;
        let ok = match base {
            VIRTIO_NET_HDR_GSO_NONE => true,
            VIRTIO_NET_HDR_GSO_TCPV4 => has(self.features, VIRTIO_NET_F_GUEST_TSO4),
            VIRTIO_NET_HDR_GSO_TCPV6 => has(self.features, VIRTIO_NET_F_GUEST_TSO6),
            VIRTIO_NET_HDR_GSO_UDP => has(self.features, VIRTIO_NET_F_GUEST_UFO),
            _ => false,
        } && (gso & VIRTIO_NET_HDR_GSO_ECN == 0
            || has(self.features, VIRTIO_NET_F_GUEST_ECN));
        (!ok).then(|| format!("GSO type {gso} the driver did not accept"))
    }

    fn read(&mut self) -> Result<Option<usize>, QueueError> {
        let fd = match self.tap.queue(self.pair) {
            Some(f) => f.as_fd(),
            None => return Ok(None),
        };
        loop {
            match tap::read_frame(fd, &mut self.frame) {
                Ok(None) => return Ok(None),
                Ok(Some(n)) if n < VNET_HDR_LEN + MIN_FRAME => {
                    let total = Stats::add(&self.stats.rx_dropped, 1);
                    self.drops
                        .note(&format!("{n}-byte frame from the tap"), total);
                }
                Ok(Some(n)) => {
                    if let Some(why) = self.unacceptable() {
                        // Queued in the tap under an earlier driver's offloads.
                        let total = Stats::add(&self.stats.rx_dropped, 1);
                        self.drops.note(&why, total);
                        continue;
                    }
                    // The tap fills everything but num_buffers (set when placed); it may
                    // mark DATA_VALID, which a driver without GUEST_CSUM must not see.
                    self.frame[0] &= self.flag_mask;
                    return Ok(Some(n));
                }
                Err(e) => return Err(QueueError::Device(Box::new(e))),
            }
        }
    }
}

impl QueueHandler for RxQueue {
    fn input_fd(&self) -> Option<BorrowedFd<'_>> {
        self.tap.queue(self.pair).map(|f| f.as_fd())
    }

    fn process(&mut self, queue: &mut QueueContext<'_>) -> Result<Progress, QueueError> {
        // Idle after a batch, as for transmit: the worker signals the driver, then calls
        // again while the ring has buffers (the tap is still readable: no edge is lost).
        for _ in 0..BATCH {
            let len = match self.frame_len {
                Some(len) => len,
                None => match self.read()? {
                    Some(len) => {
                        self.frame_len = Some(len);
                        len
                    }
                    // The tap is empty: wait for it, not for the driver.
                    None => return Ok(Progress::Blocked),
                },
            };
            if !self.place(queue, len)? {
                // Out of buffers: the driver's kick brings more.
                return Ok(Progress::Idle);
            }
        }
        Ok(Progress::Idle)
    }

    /// Buffers held for a frame stay in flight (a restarted backend gets them back); the
    /// frame itself is lost, as on a wire.
    fn drain(&mut self, _queue: &mut QueueContext<'_>) -> Result<(), QueueError> {
        log::info!(
            "rx queue of pair {} stopped: {}",
            self.pair,
            self.stats.summary()
        );
        Ok(())
    }
}

/// The control queue: `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` within the offered count attaches
/// that many tap queues and detaches the rest, so the host steers frames only to pairs the
/// driver uses; anything else gets `VIRTIO_NET_ERR`.
pub struct CtrlQueue {
    tap: Option<Arc<Tap>>,
    max_pairs: u16,
    log: RateLimiter,
}

impl CtrlQueue {
    pub fn new(tap: Option<Arc<Tap>>, max_pairs: u16) -> Self {
        CtrlQueue {
            tap,
            max_pairs,
            log: RateLimiter::new(5),
        }
    }

    fn set_pairs(&self, pairs: u16) -> u8 {
        let Some(tap) = &self.tap else {
            return VIRTIO_NET_OK as u8;
        };
        for i in 0..self.max_pairs {
            if let Err(e) = tap.set_queue_attached(usize::from(i), i < pairs) {
                log::warn!("ctrl: {}", isola_device_common::logging::chain(&e));
                return VIRTIO_NET_ERR as u8;
            }
        }
        log::info!("ctrl: the driver uses {pairs} queue pairs");
        VIRTIO_NET_OK as u8
    }

    fn answer(&self, cmd: &[u8]) -> u8 {
        match cmd {
            [class, op, lo, hi]
                if u32::from(*class) == VIRTIO_NET_CTRL_MQ
                    && u32::from(*op) == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET =>
            {
                let pairs = u16::from_le_bytes([*lo, *hi]);
                if (1..=self.max_pairs).contains(&pairs) {
                    self.set_pairs(pairs)
                } else {
                    VIRTIO_NET_ERR as u8
                }
            }
            _ => VIRTIO_NET_ERR as u8,
        }
    }
}

impl QueueHandler for CtrlQueue {
    fn process(&mut self, queue: &mut QueueContext<'_>) -> Result<Progress, QueueError> {
        while let Some(chain) = queue.pop()? {
            let mem = chain.memory();
            let written = chain
                .segments()
                .map_err(|e| e.to_string())
                .and_then(|segs| {
                    let readable: Vec<Segment> =
                        segs.iter().copied().filter(|s| !s.writable).collect();
                    let writable: Vec<Segment> =
                        segs.iter().copied().filter(|s| s.writable).collect();
                    let len = chain::total_len(&readable).min(64) as usize;
                    let mut cmd = vec![0u8; len];
                    chain::read_bytes(mem, &readable, &mut cmd).map_err(|e| e.to_string())?;
                    let ack = self.answer(&cmd);
                    chain::write_bytes(mem, &writable, &[ack]).map_err(|e| e.to_string())?;
                    Ok(1)
                });
            let len = match written {
                Ok(n) => n,
                Err(reason) => {
                    if self.log.allow().is_some() {
                        log::warn!("ctrl: malformed command: {reason}");
                    }
                    0
                }
            };
            queue.complete(chain.head(), len)?;
        }
        Ok(Progress::Idle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_net::VIRTIO_NET_HDR_GSO_UDP_L4;

    const ALL: u64 = (1 << VIRTIO_NET_F_CSUM)
        | (1 << VIRTIO_NET_F_HOST_TSO4)
        | (1 << VIRTIO_NET_F_HOST_TSO6)
        | (1 << VIRTIO_NET_F_HOST_UFO)
        | (1 << VIRTIO_NET_F_HOST_ECN);
    const CSUM: u8 = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;

    fn hdr(flags: u8, gso: u32, gso_size: u16, start: u16, offset: u16) -> VnetHeader {
        VnetHeader {
            flags,
            gso_type: gso as u8,
            hdr_len: 0,
            gso_size,
            csum_start: start,
            csum_offset: offset,
        }
    }

    #[test]
    fn headers_parse_little_endian() {
        let b = [1, 4, 0x36, 0, 0xa8, 0x05, 34, 0, 16, 0, 9, 9];
        assert_eq!(
            VnetHeader::parse(&b),
            hdr(1, VIRTIO_NET_HDR_GSO_TCPV6, 1448, 34, 16).with_hdr_len(54)
        );
    }

    impl VnetHeader {
        fn with_hdr_len(mut self, n: u16) -> Self {
            self.hdr_len = n;
            self
        }
    }

    #[test]
    fn plain_frames_are_bounded_by_the_mtu() {
        let plain = hdr(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0);
        assert_eq!(plain.tx_problem(0, 1518, 1500), None);
        assert_eq!(plain.tx_problem(0, 1519, 1500), Some("oversized frame"));
        assert_eq!(plain.tx_problem(0, 13, 1500), Some("runt frame"));
        assert_eq!(plain.tx_problem(0, 9018, 9000), None);
    }

    #[test]
    fn offloads_need_their_features_and_sane_fields() {
        let tso = hdr(CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 1448, 34, 16);
        assert_eq!(tso.tx_problem(ALL, 60_000, 1500), None);
        assert_eq!(
            tso.tx_problem(ALL, MAX_GSO_FRAME + 1, 1500),
            Some("oversized frame")
        );
        assert_eq!(
            tso.tx_problem(1 << VIRTIO_NET_F_CSUM, 60_000, 1500),
            Some("GSO type not negotiated")
        );
        assert_eq!(
            tso.tx_problem(0, 60_000, 1500),
            Some("checksum offload not negotiated")
        );
        let no_size = hdr(CSUM, VIRTIO_NET_HDR_GSO_UDP, 0, 34, 6);
        assert_eq!(
            no_size.tx_problem(ALL, 4000, 1500),
            Some("GSO with a segment size of 0")
        );
        let no_csum = hdr(0, VIRTIO_NET_HDR_GSO_TCPV6, 1440, 0, 0);
        assert_eq!(
            no_csum.tx_problem(ALL, 4000, 1500),
            Some("GSO without checksum offload")
        );
        let ecn = hdr(
            CSUM,
            VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN,
            1448,
            34,
            16,
        );
        assert_eq!(ecn.tx_problem(ALL, 4000, 1500), None);
        assert_eq!(
            ecn.tx_problem(ALL & !(1 << VIRTIO_NET_F_HOST_ECN), 4000, 1500),
            Some("ECN segmentation not negotiated")
        );
        let uso = hdr(CSUM, VIRTIO_NET_HDR_GSO_UDP_L4, 1400, 34, 6);
        assert_eq!(uso.tx_problem(ALL, 4000, 1500), Some("unknown GSO type"));
        let outside = hdr(CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, 1000, 100);
        assert_eq!(
            outside.tx_problem(ALL, 1101, 1500),
            Some("checksum position outside the frame")
        );
        assert_eq!(outside.tx_problem(ALL, 1102, 1500), None);
        let flags = hdr(0x82, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0);
        assert_eq!(
            flags.tx_problem(ALL, 100, 1500),
            Some("unknown header flags")
        );
    }

    #[test]
    fn received_offloads_must_be_ones_the_driver_accepted() {
        let rx = |features: u64, flags: u8, gso: u32| {
            let mut q = RxQueue::new(
                Arc::new(Tap::detached()),
                0,
                features,
                Arc::new(Stats::default()),
            );
            q.frame[0] = flags;
            q.frame[1] = gso as u8;
            q.unacceptable()
        };
        let csum = 1 << VIRTIO_NET_F_GUEST_CSUM;
        let tso4 = csum | 1 << VIRTIO_NET_F_GUEST_TSO4;
        assert_eq!(rx(0, 0, VIRTIO_NET_HDR_GSO_NONE), None);
        assert!(rx(0, CSUM, VIRTIO_NET_HDR_GSO_NONE).is_some());
        assert_eq!(rx(csum, CSUM, VIRTIO_NET_HDR_GSO_NONE), None);
        assert!(rx(csum, CSUM, VIRTIO_NET_HDR_GSO_TCPV4).is_some());
        assert_eq!(rx(tso4, CSUM, VIRTIO_NET_HDR_GSO_TCPV4), None);
        assert!(rx(tso4, CSUM, VIRTIO_NET_HDR_GSO_TCPV6).is_some());
        assert!(rx(
            tso4,
            CSUM,
            VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN
        )
        .is_some());
        let ecn = tso4 | 1 << VIRTIO_NET_F_GUEST_ECN;
        assert_eq!(
            rx(ecn, CSUM, VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN),
            None
        );
        assert!(rx(ecn | 1 << VIRTIO_NET_F_GUEST_UFO, CSUM, 9).is_some());
    }

    #[test]
    fn control_commands() {
        let ctrl = CtrlQueue::new(None, 4);
        let set = |n: u16| {
            let [lo, hi] = n.to_le_bytes();
            [
                VIRTIO_NET_CTRL_MQ as u8,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
                lo,
                hi,
            ]
        };
        assert_eq!(ctrl.answer(&set(4)), VIRTIO_NET_OK as u8);
        assert_eq!(ctrl.answer(&set(1)), VIRTIO_NET_OK as u8);
        assert_eq!(ctrl.answer(&set(0)), VIRTIO_NET_ERR as u8);
        assert_eq!(ctrl.answer(&set(5)), VIRTIO_NET_ERR as u8);
        assert_eq!(ctrl.answer(&[0, 0, 1]), VIRTIO_NET_ERR as u8);
        assert_eq!(ctrl.answer(&[]), VIRTIO_NET_ERR as u8);
    }
}
