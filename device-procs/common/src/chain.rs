//! Descriptor chains, walked defensively.
//!
//! `virtio-queue` reads the rings; the chain itself is walked here so that every way a guest
//! can get it wrong is an error the device sees (rather than a chain that silently ends
//! early), and so that a chain can be rebuilt from a bare head index when in-flight requests
//! are resubmitted after a reconnect. Nothing here touches memory except through
//! `vm-memory`'s bounds-checked accessors, or inside a slice one of them returned.

use std::sync::Arc;

use smallvec::SmallVec;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

use crate::memory::Memory;

const DESC_SIZE: u64 = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("head {0} is outside the queue")]
    HeadOutOfRange(u16),
    #[error("next index {0} is outside its descriptor table")]
    NextOutOfRange(u16),
    #[error("chain is longer than its descriptor table (a loop)")]
    TooLong,
    #[error("descriptor at {0:#x} is not in guest memory")]
    Unreadable(u64),
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("indirect descriptor that is not the only one of its chain")]
    MisplacedIndirect,
    #[error("indirect table of {0} bytes")]
    BadIndirectTable(u32),
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("chain is longer than 4 GiB in total")]
    TooLarge,
    #[error("buffers hold {have} bytes, {needed} needed")]
    Short { needed: usize, have: usize },
    #[error("buffer [{addr:#x}, +{len:#x}) is not in guest memory")]
    BadBuffer { addr: u64, len: u64 },
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (the device fills it) rather than device-readable.
    pub writable: bool,
}

/// Buffers of one request, inline up to four (a header, data and status chain needs three),
/// so that splitting a usual chain allocates nothing.
pub type Segments = SmallVec<[Segment; 4]>;

/// A chain named by its head, in the descriptor table of a queue.
#[derive(Debug, Clone)]
pub struct DescriptorChain {
    mem: Arc<Memory>,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
}

struct Walk {
    table: GuestAddress,
    size: u16,
    index: u16,
    budget: u32,
    indirect: bool,
    total: u64,
}

impl DescriptorChain {
    pub fn new(mem: Arc<Memory>, table: GuestAddress, queue_size: u16, head: u16) -> Self {
        DescriptorChain {
            mem,
            table,
            queue_size,
            head,
        }
    }

    pub fn head(&self) -> u16 {
        self.head
    }

    /// The guest memory snapshot this chain was taken with; it stays mapped while held.
    pub fn memory(&self) -> &Arc<Memory> {
        &self.mem
    }

    fn read_desc(&self, walk: &Walk) -> Result<Descriptor, ChainError> {
        let addr = walk
            .table
            .0
            .checked_add(u64::from(walk.index) * DESC_SIZE)
            .ok_or(ChainError::Unreadable(walk.table.0))?;
        let mut raw = [0u8; DESC_SIZE as usize];
        read_small(&self.mem, GuestAddress(addr), &mut raw)
            .map_err(|_| ChainError::Unreadable(addr))?;
        let word = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
        let (addr, rest) = (word(0), word(8));
        // len: bytes 8..12, flags 12..14, next 14..16.
        Ok(Descriptor::new(
            addr,
            rest as u32,
            (rest >> 32) as u16,
            (rest >> 48) as u16,
        ))
    }

    /// Every buffer of the chain, in order, with the chain's structure validated: indices in
    /// range, no loops, at most one level of indirection, readable buffers before writable
    /// ones, under 4 GiB in total. Buffer addresses are checked when they are used.
    pub fn segments(&self) -> Result<Vec<Segment>, ChainError> {
        let mut out = Vec::new();
        self.segments_into(&mut out)?;
        Ok(out)
    }

    /// As [`Self::segments`], into `out` (cleared first): a device that walks a chain per
    /// frame reuses one vector instead of allocating each time. On error `out` holds the
    /// segments walked so far.
    pub fn segments_into(&self, out: &mut Vec<Segment>) -> Result<(), ChainError> {
        out.clear();
        if self.head >= self.queue_size {
            return Err(ChainError::HeadOutOfRange(self.head));
        }
        let mut walk = Walk {
            table: self.table,
            size: self.queue_size,
            index: self.head,
            budget: u32::from(self.queue_size),
            indirect: false,
            total: 0,
        };
        loop {
            if walk.budget == 0 {
                return Err(ChainError::TooLong);
            }
            walk.budget -= 1;
            let desc = self.read_desc(&walk)?;
            let flags = u32::from(desc.flags());
            if flags & VRING_DESC_F_INDIRECT != 0 {
                self.enter_indirect(&mut walk, &desc, out.is_empty())?;
                continue;
            }
            let writable = flags & VRING_DESC_F_WRITE != 0;
            if !writable && out.last().is_some_and(|s| s.writable) {
                return Err(ChainError::ReadableAfterWritable);
            }
            // A buffer whose end is past the top of the address space would wrap to low
            // guest memory when a device walks into it: refuse the chain.
            if desc.addr().0.checked_add(u64::from(desc.len())).is_none() {
                return Err(ChainError::BadBuffer {
                    addr: desc.addr().0,
                    len: u64::from(desc.len()),
                });
            }
            walk.total += u64::from(desc.len());
            if walk.total > u64::from(u32::MAX) {
                return Err(ChainError::TooLarge);
            }
            out.push(Segment {
                addr: desc.addr(),
                len: desc.len(),
                writable,
            });
            if flags & VRING_DESC_F_NEXT == 0 {
                return Ok(());
            }
            walk.index = desc.next();
            if walk.index >= walk.size {
                return Err(ChainError::NextOutOfRange(walk.index));
            }
        }
    }

    fn enter_indirect(
        &self,
        walk: &mut Walk,
        desc: &Descriptor,
        first: bool,
    ) -> Result<(), ChainError> {
        if walk.indirect {
            return Err(ChainError::NestedIndirect);
        }
        if !first || u32::from(desc.flags()) & VRING_DESC_F_NEXT != 0 {
            return Err(ChainError::MisplacedIndirect);
        }
        let len = desc.len();
        let entries = u64::from(len) / DESC_SIZE;
        if len == 0 || u64::from(len) % DESC_SIZE != 0 || entries > u64::from(u16::MAX) {
            return Err(ChainError::BadIndirectTable(len));
        }
        walk.table = desc.addr();
        walk.size = entries as u16;
        walk.index = 0;
        walk.budget = u32::from(walk.size);
        walk.indirect = true;
        Ok(())
    }
}

/// Total bytes of `segs`.
pub fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Splits `segs` at byte `at`: the first part holds exactly `at` bytes (or all, if fewer).
/// Fails (rather than wrap) if a split point lies past the top of the address space, which a
/// chain from [`DescriptorChain::segments`] never has.
pub fn split_at(segs: &[Segment], mut at: u64) -> Result<(Segments, Segments), ChainError> {
    let mut head = Segments::new();
    let mut tail = Segments::new();
    for seg in segs {
        let len = u64::from(seg.len);
        if at >= len {
            head.push(*seg);
            at -= len;
        } else if at == 0 {
            tail.push(*seg);
        } else {
            let addr = seg.addr.0.checked_add(at).ok_or(ChainError::BadBuffer {
                addr: seg.addr.0,
                len,
            })?;
            // at < len <= u32::MAX, so the cast is exact.
            let at32 = at as u32;
            head.push(Segment { len: at32, ..*seg });
            tail.push(Segment {
                addr: GuestAddress(addr),
                len: seg.len - at32,
                ..*seg
            });
            at = 0;
        }
    }
    Ok((head, tail))
}

fn bad(seg: &Segment, len: u64) -> ChainError {
    ChainError::BadBuffer {
        addr: seg.addr.0,
        len,
    }
}

/// Reads `buf.len()` bytes at `addr`: what `Bytes::read_slice` does, but for the small reads
/// of every request (a descriptor, a request header) with one region lookup and volatile
/// loads (8-byte words where aligned, else bytes) instead of a `memcpy` call per read (5-7%
/// of a block queue thread's time at depth 32). Larger reads, or reads across a region
/// boundary, take the general path.
pub fn read_small(mem: &Memory, addr: GuestAddress, buf: &mut [u8]) -> Result<(), ChainError> {
    if buf.len() <= 16 {
        if let Ok(slice) = mem.get_slice(addr, buf.len()) {
            let guard = slice.ptr_guard();
            let ptr = guard.as_ptr();
            if ptr.cast::<u64>().is_aligned() && buf.len().is_multiple_of(8) {
                for (i, word) in buf.chunks_exact_mut(8).enumerate() {
                    // SAFETY: `slice` covers `buf.len()` mapped bytes from `ptr`, which is
                    // 8-aligned; guest memory stays mapped while `mem` is borrowed. Volatile,
                    // as vm-memory's own accessors: the guest may write it meanwhile.
                    let v = unsafe { std::ptr::read_volatile(ptr.cast::<u64>().add(i)) };
                    word.copy_from_slice(&v.to_ne_bytes());
                }
            } else {
                for (i, byte) in buf.iter_mut().enumerate() {
                    // SAFETY: as above, byte by byte (any alignment).
                    *byte = unsafe { std::ptr::read_volatile(ptr.add(i)) };
                }
            }
            return Ok(());
        }
    }
    let len = buf.len() as u64;
    mem.read_slice(buf, addr)
        .map_err(|_| ChainError::BadBuffer { addr: addr.0, len })
}

/// Reads `buf.len()` bytes from the start of `segs`.
pub fn read_bytes(mem: &Memory, segs: &[Segment], buf: &mut [u8]) -> Result<(), ChainError> {
    let mut done = 0usize;
    for seg in segs {
        if done == buf.len() {
            break;
        }
        let n = (buf.len() - done).min(seg.len as usize);
        read_small(mem, seg.addr, &mut buf[done..done + n]).map_err(|_| bad(seg, n as u64))?;
        done += n;
    }
    if done < buf.len() {
        return Err(ChainError::Short {
            needed: buf.len(),
            have: done,
        });
    }
    Ok(())
}

/// Writes `data` to the start of `segs`; fails if they are too short.
pub fn write_bytes(mem: &Memory, segs: &[Segment], data: &[u8]) -> Result<(), ChainError> {
    let mut done = 0usize;
    for seg in segs {
        if done == data.len() {
            break;
        }
        let n = (data.len() - done).min(seg.len as usize);
        mem.write_slice(&data[done..done + n], seg.addr)
            .map_err(|_| bad(seg, n as u64))?;
        done += n;
    }
    if done < data.len() {
        return Err(ChainError::Short {
            needed: data.len(),
            have: done,
        });
    }
    Ok(())
}

/// The host memory behind `segs`, as slices of the mapped guest memory. Fails if any byte is
/// outside guest memory. The slices stay valid while `mem` is mapped.
pub fn host_slices<'m>(
    mem: &'m Memory,
    segs: &[Segment],
) -> Result<Vec<VolatileSlice<'m>>, ChainError> {
    let mut out = Vec::with_capacity(segs.len());
    for_each_host_slice(mem, segs, |slice| out.push(slice))?;
    Ok(out)
}

/// As [`host_slices`], handing each slice to `f` instead of collecting them. On error `f` has
/// seen the slices before the bad one.
pub fn for_each_host_slice<'m>(
    mem: &'m Memory,
    segs: &[Segment],
    mut f: impl FnMut(VolatileSlice<'m>),
) -> Result<(), ChainError> {
    for seg in segs.iter().filter(|s| s.len > 0) {
        for slice in mem.get_slices(seg.addr, seg.len as usize) {
            f(slice.map_err(|_| bad(seg, u64::from(seg.len)))?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;

    const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    fn mem() -> Arc<Memory> {
        Arc::new(
            Memory::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x20000), 0x10000)])
                .unwrap(),
        )
    }

    fn put(mem: &Memory, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let desc = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        mem.write_obj(desc, GuestAddress(table + 16 * u64::from(index)))
            .unwrap();
    }

    fn chain(mem: &Arc<Memory>, head: u16) -> DescriptorChain {
        DescriptorChain::new(Arc::clone(mem), GuestAddress(0x1000), 8, head)
    }

    #[test]
    fn walks_direct_and_indirect_chains() {
        let m = mem();
        put(&m, 0x1000, 3, 0x4000, 16, F_NEXT, 5);
        put(&m, 0x1000, 5, 0x5000, 512, F_NEXT | F_WRITE, 1);
        put(&m, 0x1000, 1, 0x6000, 1, F_WRITE, 0);
        let segs = chain(&m, 3).segments().unwrap();
        assert_eq!(segs.len(), 3);
        assert_eq!(total_len(&segs), 529);
        assert!(!segs[0].writable && segs[1].writable && segs[2].writable);

        // Head 0 points at an indirect table of 2 entries at 0x3000.
        put(&m, 0x1000, 0, 0x3000, 32, F_INDIRECT, 0);
        put(&m, 0x3000, 0, 0x4000, 16, F_NEXT, 1);
        put(&m, 0x3000, 1, 0x6000, 1, F_WRITE, 0);
        let segs = chain(&m, 0).segments().unwrap();
        assert_eq!(segs.iter().map(|s| s.len).collect::<Vec<_>>(), vec![16, 1]);
    }

    #[test]
    fn segments_into_reuses_the_vector_it_is_given() {
        let m = mem();
        put(&m, 0x1000, 3, 0x4000, 16, F_NEXT, 5);
        put(&m, 0x1000, 5, 0x5000, 512, F_WRITE, 0);
        put(&m, 0x1000, 6, 0x6000, 7, 0, 0);
        let mut out = Vec::with_capacity(8);
        chain(&m, 3).segments_into(&mut out).unwrap();
        assert_eq!(out, chain(&m, 3).segments().unwrap());
        let capacity = out.capacity();
        // The previous chain's segments are gone, and no new allocation was needed.
        chain(&m, 6).segments_into(&mut out).unwrap();
        assert_eq!(
            out,
            [Segment {
                addr: GuestAddress(0x6000),
                len: 7,
                writable: false
            }]
        );
        assert_eq!(out.capacity(), capacity);
        assert_eq!(
            chain(&m, 8).segments_into(&mut out),
            Err(ChainError::HeadOutOfRange(8))
        );
    }

    /// F3: header, 512-byte data buffer, and a last writable buffer of 16 bytes at
    /// 0xFFFF_FFFF_FFFF_FFF8, whose 16th byte (where a device puts the status) would be at
    /// guest address 0x7 if the split wrapped around.
    #[test]
    fn a_buffer_that_wraps_the_address_space_is_refused() {
        let m = mem();
        put(&m, 0x1000, 0, 0x4000, 16, F_NEXT, 1);
        put(&m, 0x1000, 1, 0x5000, 512, F_NEXT | F_WRITE, 2);
        put(&m, 0x1000, 2, 0xFFFF_FFFF_FFFF_FFF8, 16, F_WRITE, 0);
        assert_eq!(
            chain(&m, 0).segments(),
            Err(ChainError::BadBuffer {
                addr: 0xFFFF_FFFF_FFFF_FFF8,
                len: 16
            })
        );
        // One that ends exactly at the top is refused too (its end is not representable);
        // one that ends a byte below is a well-formed chain (its bytes are checked on use).
        put(&m, 0x1000, 2, 0xFFFF_FFFF_FFFF_FFF0, 16, F_WRITE, 0);
        assert!(chain(&m, 0).segments().is_err());
        put(&m, 0x1000, 2, 0xFFFF_FFFF_FFFF_FFEF, 16, F_WRITE, 0);
        let segs = chain(&m, 0).segments().unwrap();
        assert!(host_slices(&m, &segs).is_err());
        // Segments built by hand that would wrap: split_at fails instead of wrapping.
        let wrapping = [
            Segment {
                addr: GuestAddress(0x5000),
                len: 512,
                writable: true,
            },
            Segment {
                addr: GuestAddress(0xFFFF_FFFF_FFFF_FFF8),
                len: 16,
                writable: true,
            },
        ];
        assert_eq!(
            split_at(&wrapping, 512 + 15),
            Err(ChainError::BadBuffer {
                addr: 0xFFFF_FFFF_FFFF_FFF8,
                len: 16
            })
        );
        // Splitting inside the first segment, or at a boundary, needs no addition past it.
        assert!(split_at(&wrapping, 100).is_ok());
        assert!(split_at(&wrapping, 512).is_ok());
    }

    #[test]
    fn hostile_chains_are_errors() {
        let m = mem();
        assert_eq!(chain(&m, 8).segments(), Err(ChainError::HeadOutOfRange(8)));
        // A loop: 0 -> 1 -> 0.
        put(&m, 0x1000, 0, 0x4000, 1, F_NEXT, 1);
        put(&m, 0x1000, 1, 0x4000, 1, F_NEXT, 0);
        assert_eq!(chain(&m, 0).segments(), Err(ChainError::TooLong));
        // next beyond the table.
        put(&m, 0x1000, 2, 0x4000, 1, F_NEXT, 9);
        assert_eq!(chain(&m, 2).segments(), Err(ChainError::NextOutOfRange(9)));
        // Readable after writable.
        put(&m, 0x1000, 3, 0x4000, 1, F_NEXT | F_WRITE, 4);
        put(&m, 0x1000, 4, 0x4000, 1, 0, 0);
        assert_eq!(
            chain(&m, 3).segments(),
            Err(ChainError::ReadableAfterWritable)
        );
        // Indirect table with a bad length, nested, or not alone.
        put(&m, 0x1000, 5, 0x3000, 20, F_INDIRECT, 0);
        assert_eq!(
            chain(&m, 5).segments(),
            Err(ChainError::BadIndirectTable(20))
        );
        put(&m, 0x1000, 5, 0x3000, 16, F_INDIRECT, 0);
        put(&m, 0x3000, 0, 0x3000, 16, F_INDIRECT, 0);
        assert_eq!(chain(&m, 5).segments(), Err(ChainError::NestedIndirect));
        put(&m, 0x1000, 6, 0x4000, 1, F_NEXT, 7);
        put(&m, 0x1000, 7, 0x3000, 16, F_INDIRECT, 0);
        assert_eq!(chain(&m, 6).segments(), Err(ChainError::MisplacedIndirect));
        // An indirect table outside guest memory.
        put(&m, 0x1000, 7, 0xf_0000, 16, F_INDIRECT, 0);
        assert_eq!(
            chain(&m, 7).segments(),
            Err(ChainError::Unreadable(0xf_0000))
        );
        // A descriptor table outside guest memory.
        let far = DescriptorChain::new(Arc::clone(&m), GuestAddress(u64::MAX - 8), 8, 1);
        assert!(matches!(far.segments(), Err(ChainError::Unreadable(_))));
        // Over 4 GiB in total.
        put(&m, 0x1000, 0, 0x4000, u32::MAX, F_NEXT, 1);
        put(&m, 0x1000, 1, 0x4000, 1, 0, 0);
        assert_eq!(chain(&m, 0).segments(), Err(ChainError::TooLarge));
    }

    #[test]
    fn small_reads_match_read_slice_at_any_alignment_and_across_regions() {
        let m = mem();
        let bytes: Vec<u8> = (0..=255u8).collect();
        m.write_slice(&bytes[..64], GuestAddress(0xffc0)).unwrap();
        m.write_slice(&bytes[64..128], GuestAddress(0x20000))
            .unwrap();
        for len in [1usize, 2, 7, 8, 15, 16, 17, 32] {
            for offset in 0..9u64 {
                let addr = GuestAddress(0xffc0 + offset);
                let mut fast = vec![0u8; len];
                let mut slow = vec![0u8; len];
                read_small(&m, addr, &mut fast).unwrap();
                m.read_slice(&mut slow, addr).unwrap();
                assert_eq!(fast, slow, "len {len} at {addr:?}");
            }
        }
        // The last bytes of a region: the slow path finds the hole after it.
        let mut buf = [0u8; 16];
        read_small(&m, GuestAddress(0xfff0), &mut buf).unwrap();
        assert_eq!(buf[..], bytes[48..64]);
        assert!(read_small(&m, GuestAddress(0xfff8), &mut buf).is_err());
        assert!(read_small(&m, GuestAddress(0x1_0000), &mut buf).is_err());
        assert!(read_small(&m, GuestAddress(u64::MAX - 4), &mut buf).is_err());
    }

    #[test]
    fn buffers_are_bounds_checked() {
        let m = mem();
        let segs = [
            Segment {
                addr: GuestAddress(0xfff8),
                len: 8,
                writable: true,
            },
            Segment {
                addr: GuestAddress(0x20000),
                len: 8,
                writable: true,
            },
        ];
        write_bytes(&m, &segs, &[1u8; 16]).unwrap();
        let mut back = [0u8; 12];
        read_bytes(&m, &segs, &mut back).unwrap();
        assert_eq!(back, [1u8; 12]);
        assert!(write_bytes(&m, &segs, &[0u8; 17]).is_err());
        // A buffer straddling the hole between the two regions.
        let hole = [Segment {
            addr: GuestAddress(0xfff0),
            len: 0x20,
            writable: true,
        }];
        assert!(host_slices(&m, &hole).is_err());
        assert!(write_bytes(&m, &hole, &[0u8; 0x20]).is_err());
        assert_eq!(host_slices(&m, &segs).unwrap().len(), 2);
        let (a, b) = split_at(&segs, 12).unwrap();
        assert_eq!(total_len(&a), 12);
        assert_eq!(
            b.as_slice(),
            [Segment {
                addr: GuestAddress(0x20004),
                len: 4,
                writable: true
            }]
        );
    }
}
