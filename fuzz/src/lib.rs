//! What the fuzz targets share: a byte reader over the fuzzer's input, a small guest with a
//! split virtqueue whose descriptor table and buffers the fuzzer writes, an oracle that checks
//! a device wrote only where the guest let it, and a socket driver that feeds a byte stream to
//! a server function and drains its replies.
//!
//! Fuzz code: a broken invariant panics (libFuzzer reports the input as a crash).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Once};
use std::time::Duration;

use isola_device_common::testing::SplitQueue;
use isola_device_common::{DescriptorChain, Memory, QueueContext, QueueError, QueueHandler};
use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Ignores SIGPIPE (libFuzzer's `main` is C's, which leaves it fatal): a server that closes
/// its end early is a normal outcome, not a crash.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code and
        // touches no memory; it is done once, before any socket is written.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
    });
}

/// Reads values off the fuzzer's input; past its end every value is zero.
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The bytes not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// The guest: RAM at [0, 64 KiB) and [128 KiB, 192 KiB), with a hole between them.
pub const LOW: (u64, u64) = (0, 0x1_0000);
pub const HIGH: (u64, u64) = (0x2_0000, 0x1_0000);
/// Queue size of the rig's queues.
pub const QSIZE: u16 = 16;
/// Where the fuzzer's payload (headers, data, indirect tables) goes.
pub const DATA: u64 = 0x8000;

/// A guest with `queues` split virtqueues at fixed places, a descriptor table per queue the
/// fuzzer fills, and the fuzzer's payload in RAM at [`DATA`].
pub struct Rig {
    pub mem: Arc<Memory>,
    pub drivers: Vec<SplitQueue>,
    pub queues: Vec<Queue>,
    /// Heads published on each queue.
    pub published: Vec<Vec<u16>>,
    /// Guest memory before the device ran, per region.
    before: Vec<Vec<u8>>,
    /// [start, end) ranges the device may write: the writable buffers of the published
    /// chains and the used rings.
    allowed: Vec<(u64, u64)>,
    /// The writable buffers alone.
    buffers: Vec<(u64, u64)>,
    /// A writable buffer overlaps what the device reads to find chains (a descriptor table,
    /// an available ring, an indirect table): the guest rewrites its own requests as the
    /// device serves them, so what the device may write is no longer known beforehand.
    self_modifying: bool,
    /// Writable bytes of each published head, per queue (`None`: the chain is malformed).
    writable: Vec<Vec<(u16, Option<u64>)>>,
}

/// A guest address from the fuzzer: mostly inside the payload or the high region, sometimes
/// a raw 64-bit value (the hostile cases: holes, the top of the address space).
fn address(r: &mut Reader<'_>) -> u64 {
    let sel = r.u8();
    match sel & 3 {
        0 => DATA + u64::from(r.u16() % 0x8000),
        1 => HIGH.0 + u64::from(r.u16()),
        2 => r.u64(),
        _ => u64::MAX - u64::from(r.u8()),
    }
}

impl Rig {
    /// Builds the guest from `r`: per queue, the number of heads to publish and the
    /// descriptors; then the payload (the rest of the input, up to what fits).
    pub fn new(r: &mut Reader<'_>, queues: usize) -> Rig {
        let mem = Arc::new(
            Memory::from_ranges(&[
                (GuestAddress(LOW.0), LOW.1 as usize),
                (GuestAddress(HIGH.0), HIGH.1 as usize),
            ])
            .expect("guest RAM maps"),
        );
        let mut drivers = Vec::new();
        let mut queue_objs = Vec::new();
        let mut published = Vec::new();
        for q in 0..queues {
            // Each queue's rings in its own 4 KiB-aligned 8 KiB slot below DATA.
            let base = GuestAddress(0x2000 * q as u64);
            assert!(base.0 + 0x2000 <= DATA, "too many queues for the rig");
            let mut driver = SplitQueue::new(q as u16, QSIZE, base);
            let heads = usize::from(r.u8() % 9);
            let mut descs = 0u16;
            let mut mine = Vec::new();
            for _ in 0..heads {
                // Mostly a fresh chain of 1-4 descriptors, sometimes a raw head (out of
                // range, or one already published).
                let sel = r.u8();
                let head = if sel & 0x80 != 0 {
                    u16::from(sel & 0x1f)
                } else {
                    let n = u16::from(sel % 4) + 1;
                    let head = descs % QSIZE;
                    for i in 0..n {
                        let index = (descs + i) % QSIZE;
                        let addr = address(r);
                        let len = if r.u8() & 1 == 0 {
                            u32::from(r.u16())
                        } else {
                            r.u32()
                        };
                        let mut flags = u16::from(r.u8() & 7);
                        let mut next = (index + 1) % QSIZE;
                        if r.u8() & 0x80 != 0 {
                            next = r.u16() % (QSIZE + 2);
                        }
                        if i + 1 < n {
                            flags |= 1;
                        }
                        driver.put(&mem, index, addr, len, flags, next);
                    }
                    descs += n;
                    head
                };
                driver.publish(&mem, head);
                mine.push(head);
            }
            let mut queue = Queue::new(QSIZE).expect("queue size is valid");
            queue
                .try_set_desc_table_address(driver.desc)
                .expect("aligned");
            queue
                .try_set_avail_ring_address(driver.avail)
                .expect("aligned");
            queue
                .try_set_used_ring_address(driver.used)
                .expect("aligned");
            queue.set_ready(true);
            drivers.push(driver);
            queue_objs.push(queue);
            published.push(mine);
        }
        let payload = r.bytes((LOW.1 - DATA) as usize);
        mem.write_slice(payload, GuestAddress(DATA))
            .expect("payload fits");
        let mut rig = Rig {
            mem,
            drivers,
            queues: queue_objs,
            published,
            before: Vec::new(),
            allowed: Vec::new(),
            buffers: Vec::new(),
            self_modifying: false,
            writable: Vec::new(),
        };
        rig.snapshot();
        rig
    }

    fn read_region(&self, (start, len): (u64, u64)) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        self.mem
            .read_slice(&mut out, GuestAddress(start))
            .expect("region is mapped");
        out
    }

    /// Records guest memory and where the device may write, before it runs.
    fn snapshot(&mut self) {
        self.before = vec![self.read_region(LOW), self.read_region(HIGH)];
        let mut allowed = Vec::new();
        let mut buffers = Vec::new();
        let mut writable = Vec::new();
        for (q, driver) in self.drivers.iter().enumerate() {
            allowed.push((driver.used.0, driver.end().0));
            let mut per_queue = Vec::new();
            for &head in &self.published[q] {
                let chain = DescriptorChain::new(Arc::clone(&self.mem), driver.desc, QSIZE, head);
                let total = match chain.segments() {
                    Ok(segs) => {
                        let mut total = 0u64;
                        for s in segs.iter().filter(|s| s.writable) {
                            // A buffer whose range wraps allows nothing past the top.
                            let end = s.addr.0.checked_add(u64::from(s.len)).unwrap_or(u64::MAX);
                            buffers.push((s.addr.0, end));
                            total += u64::from(s.len);
                        }
                        Some(total)
                    }
                    Err(_) => None,
                };
                per_queue.push((head, total));
            }
            writable.push(per_queue);
        }
        allowed.extend_from_slice(&buffers);
        self.self_modifying = self
            .tables()
            .iter()
            .any(|&(ts, te)| buffers.iter().any(|&(bs, be)| bs < te && ts < be));
        self.allowed = allowed;
        self.buffers = buffers;
        self.writable = writable;
    }

    /// What the device reads to find its chains: descriptor tables, available rings and the
    /// indirect tables the published heads name.
    fn tables(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for (q, driver) in self.drivers.iter().enumerate() {
            let n = u64::from(QSIZE);
            out.push((driver.desc.0, driver.desc.0 + 16 * n));
            out.push((driver.avail.0, driver.avail.0 + 6 + 2 * n));
            for &head in self.published[q].iter().filter(|&&h| h < QSIZE) {
                let mut raw = [0u8; 16];
                let at = GuestAddress(driver.desc.0 + 16 * u64::from(head));
                if self.mem.read_slice(&mut raw, at).is_err() {
                    continue;
                }
                let addr = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes"));
                let len = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
                let flags = u16::from_le_bytes([raw[12], raw[13]]);
                if u32::from(flags) & VRING_DESC_F_INDIRECT != 0 {
                    out.push((addr, addr.saturating_add(u64::from(len))));
                }
            }
        }
        out
    }

    /// Runs `handler` over queue `q` once (process, then drain), as a queue worker would.
    pub fn run(&mut self, q: usize, handler: &mut dyn QueueHandler) -> Result<(), QueueError> {
        let mut resubmit = VecDeque::new();
        let mut ctx = QueueContext::new(
            q as u16,
            &mut self.queues[q],
            Arc::clone(&self.mem),
            &mut resubmit,
        );
        handler.process(&mut ctx)?;
        handler.drain(&mut ctx)
    }

    /// The oracle: every byte the device changed is in a writable buffer of a published
    /// chain or in a used ring, and every used element names a published head with a length
    /// no larger than that chain's writable bytes. Returns the used elements per queue (`None`
    /// where the guest offered the used ring itself as a buffer). A guest whose writable
    /// buffers overlap its own descriptor tables or available ring is not checked.
    pub fn check(&self) -> Vec<Option<Vec<(u32, u32)>>> {
        if self.self_modifying {
            return vec![None; self.drivers.len()];
        }
        for (region, before) in [LOW, HIGH].into_iter().zip(&self.before) {
            let after = self.read_region(region);
            // Chunks compare with memcmp: a byte loop would be one traced comparison each.
            let chunks = before.chunks(256).zip(after.chunks(256));
            for (c, (ca, cb)) in chunks.enumerate().filter(|(_, (a, b))| a != b) {
                for (i, _) in ca.iter().zip(cb).enumerate().filter(|(_, (a, b))| a != b) {
                    let gpa = region.0 + (c * 256 + i) as u64;
                    assert!(
                        self.allowed.iter().any(|&(s, e)| s <= gpa && gpa < e),
                        "the device wrote guest address {gpa:#x}, outside every writable buffer \
                         the guest offered ({:#x?})",
                        self.allowed
                    );
                }
            }
        }
        let mut all = Vec::new();
        for (q, driver) in self.drivers.iter().enumerate() {
            // A guest that offered its own used ring as a writable buffer gets what it asked
            // for: the device's writes there make the ring unreadable.
            let (ring_start, ring_end) = (driver.used.0, driver.end().0);
            let offered = self
                .buffers
                .iter()
                .any(|&(s, e)| s < ring_end && ring_start < e);
            if offered {
                all.push(None);
                continue;
            }
            let used = driver.used_idx(&self.mem);
            let mut elems = Vec::new();
            for i in 0..used {
                let (id, len) = driver.used_elem(&self.mem, i);
                let entry = self.writable[q]
                    .iter()
                    .find(|(head, _)| u32::from(*head) == id);
                let Some(&(_, writable)) = entry else {
                    panic!("queue {q}: used element names head {id}, which was never published");
                };
                let limit = writable.unwrap_or(0);
                assert!(
                    u64::from(len) <= limit,
                    "queue {q}: head {id} returned with {len} bytes written, its chain has \
                     {limit} writable bytes"
                );
                elems.push((id, len));
            }
            all.push(Some(elems));
        }
        all
    }

    /// Heads published on queue `q`.
    pub fn published(&self, q: usize) -> usize {
        self.published[q].len()
    }

    /// Asserts that queue `q` returned every head published on it that can be returned (a
    /// head outside the queue has no used element to go in: it is dropped).
    pub fn all_returned(&self, q: usize, used: &Option<Vec<(u32, u32)>>) {
        let Some(used) = used else { return };
        let returnable = self.published[q].iter().filter(|&&h| h < QSIZE).count();
        assert_eq!(
            used.len(),
            returnable,
            "queue {q}: heads {:?} were published, {used:?} returned (head, length)",
            self.published[q]
        );
    }
}

/// Feeds `messages` to `server` over a Unix socket pair: a writer thread sends each message's
/// bytes in one `sendmsg` with its descriptors attached (SCM_RIGHTS, none if empty), shuts its
/// writing half and drains whatever comes back until the server closes. `server` runs on
/// this thread with the other end and must return once the peer's end is shut.
pub fn over_socket<F>(messages: Vec<(Vec<u8>, Vec<std::os::fd::OwnedFd>)>, server: F)
where
    F: FnOnce(UnixStream),
{
    init();
    let (client, served) = UnixStream::pair().expect("socketpair");
    // A server that stops reading (a hang) must not hang the writer past the fuzzer's
    // own timeout: it reports the hang with the input.
    client
        .set_write_timeout(Some(Duration::from_secs(30)))
        .expect("write timeout");
    let writer = std::thread::spawn(move || {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
        use std::os::fd::{AsRawFd, RawFd};
        for (bytes, fds) in &messages {
            let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
            let iov = [std::io::IoSlice::new(bytes)];
            let cmsgs = [ControlMessage::ScmRights(&raw)];
            let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
            let sent = sendmsg::<UnixAddr>(
                client.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            );
            match sent {
                Ok(n) if n == bytes.len() => {}
                Ok(n) => {
                    // The rest, without descriptors.
                    if (&client).write_all(&bytes[n..]).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = client.shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 4096];
        while let Ok(n) = (&client).read(&mut sink) {
            if n == 0 {
                break;
            }
        }
    });
    server(served);
    writer.join().expect("the writer thread does not panic");
}
