//! In-flight I/O tracking for split virtqueues, per QEMU's `docs/interop/vhost-user.rst`,
//! "Inflight I/O tracking".
//!
//! The region is a shared file that outlives this process: the backend creates it
//! (GET_INFLIGHT_FD), the frontend keeps it, and hands it to a restarted backend
//! (SET_INFLIGHT_FD), which resubmits what the dead one had popped but not completed.
//!
//! Layout, one region per queue, each `align_up(16 + 16 * queue_size, 64)` bytes:
//!
//! ```text
//! QueueRegionSplit { features u64 @0, version u16 @8, desc_num u16 @10,
//!                    last_batch_head u16 @12, used_idx u16 @14, desc[desc_num] @16 }
//! DescStateSplit   { inflight u8 @0, padding [u8; 5] @1, next u16 @6, counter u64 @8 }
//! ```
//!
//! A head is marked in flight (with a per-queue, increasing counter) when it is popped and
//! cleared after its used element is published. Each used element is its own batch of one.
//! Every store is an atomic store with release ordering, so a process killed at any point
//! leaves a region that the recovery steps of the spec can repair.

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use memfd::{FileSeal, MemfdOptions};

use crate::memory::{check_shared_file, SharedFileError};
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

/// Alignment of each queue's region.
pub const QUEUE_REGION_ALIGN: usize = 64;
/// Largest split virtqueue.
pub const MAX_QUEUE_SIZE: u16 = 32768;

const HEADER_SIZE: usize = 16;
const DESC_SIZE: usize = 16;
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const DESC_OFF_INFLIGHT: usize = 0;
const DESC_OFF_NEXT: usize = 6;
const DESC_OFF_COUNTER: usize = 8;
const REGION_VERSION: u16 = 1;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("{num_queues} queues of size {queue_size} is not a valid in-flight layout")]
    BadLayout { num_queues: u16, queue_size: u16 },
    #[error("in-flight area of {have:#x} bytes is smaller than the {needed:#x} its layout needs")]
    TooSmall { needed: u64, have: u64 },
    #[error("in-flight mmap offset {0:#x} is not page aligned")]
    UnalignedOffset(u64),
    #[error("cannot create the in-flight memfd")]
    Create(#[source] memfd::Error),
    #[error("cannot size or inspect the in-flight file")]
    File(#[source] std::io::Error),
    #[error("in-flight file")]
    Unsafe(#[source] SharedFileError),
    #[error("cannot map the in-flight file")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    #[error("access outside the in-flight region")]
    Access(#[source] vm_memory::volatile_memory::Error),
    #[error("queue region has version {0}, only version 1 is known")]
    UnknownVersion(u16),
    #[error("queue region holds {region} descriptors, the ring has {ring}")]
    SizeMismatch { region: u16, ring: u16 },
    #[error("descriptor head {0} is outside the queue region")]
    HeadOutOfRange(u16),
    #[error("last used batch of {0} entries cannot be repaired")]
    BadBatch(u16),
}

/// Bytes one queue's region takes for a queue of `queue_size` descriptors.
pub fn queue_region_size(queue_size: u16) -> usize {
    let raw = HEADER_SIZE + DESC_SIZE * usize::from(queue_size);
    raw.div_ceil(QUEUE_REGION_ALIGN) * QUEUE_REGION_ALIGN
}

/// The mapped in-flight area of every queue.
pub struct InflightRegion {
    mapping: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

impl std::fmt::Debug for InflightRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightRegion")
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

impl InflightRegion {
    fn check_layout(num_queues: u16, queue_size: u16) -> Result<usize, InflightError> {
        if num_queues == 0 || queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
            return Err(InflightError::BadLayout {
                num_queues,
                queue_size,
            });
        }
        Ok(usize::from(num_queues) * queue_region_size(queue_size))
    }

    /// Creates a zeroed region in a new memfd (GET_INFLIGHT_FD). Returns the region, a
    /// descriptor of the same file for the frontend, and the area's size.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(Arc<Self>, File, u64), InflightError> {
        let size = Self::check_layout(num_queues, queue_size)?;
        let memfd = MemfdOptions::default()
            .allow_sealing(true)
            .create("isola-inflight")
            .map_err(InflightError::Create)?;
        memfd
            .as_file()
            .set_len(size as u64)
            .map_err(InflightError::File)?;
        // The frontend keeps this file; sealing its size means neither side can make the
        // other's mapping fault by truncating it.
        memfd
            .add_seals(&[FileSeal::SealShrink, FileSeal::SealGrow, FileSeal::SealSeal])
            .map_err(InflightError::Create)?;
        let file = memfd.into_file();
        let for_frontend = file.try_clone().map_err(InflightError::File)?;
        // All zero: version 0 marks each queue's region uninitialised until its queue starts
        // and `recover` fills in the header from the ring.
        let region = Self::map(file, 0, size, num_queues, queue_size)?;
        Ok((Arc::new(region), for_frontend, size as u64))
    }

    /// Maps a region the frontend hands back (SET_INFLIGHT_FD), validating its sizes first.
    pub fn open(
        file: File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Arc<Self>, InflightError> {
        let needed = Self::check_layout(num_queues, queue_size)?;
        if mmap_size < needed as u64 {
            return Err(InflightError::TooSmall {
                needed: needed as u64,
                have: mmap_size,
            });
        }
        if !mmap_offset.is_multiple_of(PAGE_SIZE) {
            return Err(InflightError::UnalignedOffset(mmap_offset));
        }
        // Sealed against shrinking and large enough, or the mapping could SIGBUS later.
        check_shared_file(&file, mmap_offset, needed as u64).map_err(|e| match e {
            SharedFileError::TooSmall { needed, have } => InflightError::TooSmall { needed, have },
            other => InflightError::Unsafe(other),
        })?;
        Ok(Arc::new(Self::map(
            file,
            mmap_offset,
            needed,
            num_queues,
            queue_size,
        )?))
    }

    fn map(
        file: File,
        offset: u64,
        size: usize,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let mapping = MmapRegion::<()>::from_file(FileOffset::new(file, offset), size)
            .map_err(InflightError::Map)?;
        Ok(InflightRegion {
            mapping,
            num_queues,
            queue_size,
        })
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn queue_slice(&self, base: usize) -> Result<VolatileSlice<'_>, InflightError> {
        self.mapping
            .get_slice(base, queue_region_size(self.queue_size))
            .map_err(InflightError::Access)
    }

    /// The tracking state of queue `index`, if the region covers it.
    pub fn queue(self: &Arc<Self>, index: u16) -> Option<InflightQueue> {
        (index < self.num_queues).then(|| InflightQueue {
            region: Arc::clone(self),
            base: usize::from(index) * queue_region_size(self.queue_size),
            counter: 1,
        })
    }
}

/// One queue's part of the region, owned by that queue's worker while the queue runs.
#[derive(Debug)]
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    base: usize,
    counter: u64,
}

impl InflightQueue {
    fn slice(&self) -> Result<VolatileSlice<'_>, InflightError> {
        self.region.queue_slice(self.base)
    }

    fn desc_off(&self, head: u16) -> Result<usize, InflightError> {
        if head >= self.region.queue_size {
            return Err(InflightError::HeadOutOfRange(head));
        }
        Ok(HEADER_SIZE + DESC_SIZE * usize::from(head))
    }

    fn load16(&self, off: usize) -> Result<u16, InflightError> {
        self.slice()?
            .load(off, Ordering::Acquire)
            .map_err(InflightError::Access)
    }

    fn store16(&self, val: u16, off: usize) -> Result<(), InflightError> {
        self.slice()?
            .store(val, off, Ordering::Release)
            .map_err(InflightError::Access)
    }

    fn set_inflight(&self, head: u16, val: u8) -> Result<(), InflightError> {
        let off = self.desc_off(head)? + DESC_OFF_INFLIGHT;
        self.slice()?
            .store(val, off, Ordering::Release)
            .map_err(InflightError::Access)
    }

    fn initialize(&self, used_idx: u16) -> Result<(), InflightError> {
        let slice = self.slice()?;
        let zeros = vec![0u8; queue_region_size(self.region.queue_size)];
        slice
            .write_slice(&zeros, 0)
            .map_err(InflightError::Access)?;
        self.store16(self.region.queue_size, OFF_DESC_NUM)?;
        self.store16(used_idx, OFF_USED_IDX)?;
        self.store16(REGION_VERSION, OFF_VERSION)
    }

    /// Brings the region in line with the ring when the queue starts, and returns the heads
    /// to resubmit, oldest first. `ring_used_idx` is the `idx` of the guest's used ring.
    ///
    /// A zeroed region (version 0) is initialised. Otherwise the last used batch is repaired
    /// if the previous backend died between publishing used elements and clearing them here.
    pub fn recover(
        &mut self,
        ring_size: u16,
        ring_used_idx: u16,
    ) -> Result<Vec<u16>, InflightError> {
        if ring_size > self.region.queue_size {
            return Err(InflightError::SizeMismatch {
                region: self.region.queue_size,
                ring: ring_size,
            });
        }
        let version = self.load16(OFF_VERSION)?;
        if version == 0 {
            self.initialize(ring_used_idx)?;
            return Ok(Vec::new());
        }
        if version != REGION_VERSION {
            return Err(InflightError::UnknownVersion(version));
        }
        let desc_num = self.load16(OFF_DESC_NUM)?;
        if desc_num != self.region.queue_size {
            return Err(InflightError::SizeMismatch {
                region: desc_num,
                ring: ring_size,
            });
        }
        let region_used = self.load16(OFF_USED_IDX)?;
        if region_used != ring_used_idx {
            self.repair_last_batch(ring_used_idx.wrapping_sub(region_used))?;
            self.store16(ring_used_idx, OFF_USED_IDX)?;
        }
        let slice = self.slice()?;
        let mut pending = Vec::new();
        for head in 0..desc_num {
            let off = self.desc_off(head)?;
            let flag: u8 = slice
                .load(off + DESC_OFF_INFLIGHT, Ordering::Acquire)
                .map_err(InflightError::Access)?;
            if flag == 0 {
                continue;
            }
            if flag != 1 || head >= ring_size {
                // Not a state this protocol produces; the entry cannot name a request.
                self.set_inflight(head, 0)?;
                continue;
            }
            let counter: u64 = slice
                .load(off + DESC_OFF_COUNTER, Ordering::Acquire)
                .map_err(InflightError::Access)?;
            pending.push((counter, head));
        }
        pending.sort_unstable();
        self.counter = pending.last().map_or(1, |&(c, _)| c.wrapping_add(1));
        Ok(pending.into_iter().map(|(_, head)| head).collect())
    }

    fn repair_last_batch(&self, batch: u16) -> Result<(), InflightError> {
        if batch > self.region.queue_size {
            return Err(InflightError::BadBatch(batch));
        }
        let slice = self.slice()?;
        let mut head = self.load16(OFF_LAST_BATCH_HEAD)?;
        for _ in 0..batch {
            self.set_inflight(head, 0)?;
            head = slice
                .load(self.desc_off(head)? + DESC_OFF_NEXT, Ordering::Acquire)
                .map_err(InflightError::Access)?;
        }
        Ok(())
    }

    /// Records that `head` was taken from the available ring.
    pub fn mark(&mut self, head: u16) -> Result<(), InflightError> {
        let off = self.desc_off(head)?;
        self.slice()?
            .store(self.counter, off + DESC_OFF_COUNTER, Ordering::Release)
            .map_err(InflightError::Access)?;
        self.counter = self.counter.wrapping_add(1);
        self.set_inflight(head, 1)
    }

    /// Step before publishing `head` in the used ring: it becomes the last batch.
    pub fn begin_used(&mut self, head: u16) -> Result<(), InflightError> {
        let off = self.desc_off(head)?;
        let last = self.load16(OFF_LAST_BATCH_HEAD)?;
        self.store16(last, off + DESC_OFF_NEXT)?;
        self.store16(head, OFF_LAST_BATCH_HEAD)
    }

    /// Step after publishing `head`: it is no longer in flight, and the region's used index
    /// matches the ring's again.
    pub fn end_used(&mut self, head: u16, used_idx: u16) -> Result<(), InflightError> {
        self.set_inflight(head, 0)?;
        self.store16(used_idx, OFF_USED_IDX)
    }

    /// Heads currently marked in flight (for tests and diagnostics).
    pub fn inflight_heads(&self) -> Result<Vec<u16>, InflightError> {
        let slice = self.slice()?;
        let mut heads = Vec::new();
        for head in 0..self.region.queue_size {
            let flag: u8 = slice
                .load(self.desc_off(head)? + DESC_OFF_INFLIGHT, Ordering::Acquire)
                .map_err(InflightError::Access)?;
            if flag == 1 {
                heads.push(head);
            }
        }
        Ok(heads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reopen(file: &File, size: u64, queues: u16, qsize: u16) -> Arc<InflightRegion> {
        InflightRegion::open(file.try_clone().unwrap(), size, 0, queues, qsize).unwrap()
    }

    #[test]
    fn layout_matches_the_spec() {
        assert_eq!(queue_region_size(1), 64);
        assert_eq!(queue_region_size(2), 64);
        assert_eq!(queue_region_size(3), 64);
        assert_eq!(queue_region_size(4), 128);
        assert_eq!(queue_region_size(256), 16 + 16 * 256 + 48);
        let (region, file, size) = InflightRegion::create(2, 8).unwrap();
        assert_eq!(size, 2 * 192);
        assert_eq!(file.metadata().unwrap().len(), size);
        let read = || {
            let mut bytes = vec![0u8; size as usize];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, 0).unwrap();
            bytes
        };
        assert!(read().iter().all(|&b| b == 0), "created zeroed");
        // Starting queue 1 on a ring whose used index is 5 initialises its header only:
        // version 1, desc_num 8, last_batch_head 0, used_idx 5.
        assert!(region.queue(1).unwrap().recover(8, 5).unwrap().is_empty());
        let bytes = read();
        assert!(bytes[..192].iter().all(|&b| b == 0));
        assert_eq!(&bytes[192 + 8..192 + 16], &[1, 0, 8, 0, 0, 0, 5, 0]);
        assert!(bytes[192 + 16..].iter().all(|&b| b == 0));
    }

    #[test]
    fn marks_survive_in_the_file_and_are_resubmitted_in_order() {
        let (region, file, size) = InflightRegion::create(1, 8).unwrap();
        let mut q = region.queue(0).unwrap();
        assert!(q.recover(8, 0).unwrap().is_empty());
        for head in [5, 2, 7, 0] {
            q.mark(head).unwrap();
        }
        // Head 2 completes normally: used idx 0 -> 1.
        q.begin_used(2).unwrap();
        q.end_used(2, 1).unwrap();
        // Head 7 is published in the used ring (idx 2) but the backend dies before clearing.
        q.begin_used(7).unwrap();
        drop(q);
        drop(region);

        let region = reopen(&file, size, 1, 8);
        let mut q = region.queue(0).unwrap();
        assert_eq!(q.inflight_heads().unwrap(), vec![0, 5, 7]);
        assert_eq!(q.recover(8, 2).unwrap(), vec![5, 0]);
        assert_eq!(q.inflight_heads().unwrap(), vec![0, 5]);
        // New marks order after the resubmitted ones.
        q.mark(3).unwrap();
        drop(q);
        let mut q = region.queue(0).unwrap();
        assert_eq!(q.recover(8, 2).unwrap(), vec![5, 0, 3]);
    }

    fn sealed(name: &str, size: u64) -> File {
        let fd = MemfdOptions::default()
            .allow_sealing(true)
            .create(name)
            .unwrap();
        fd.as_file().set_len(size).unwrap();
        fd.add_seals(&[FileSeal::SealShrink, FileSeal::SealGrow])
            .unwrap();
        fd.into_file()
    }

    #[test]
    fn the_created_region_is_sealed() {
        let (_region, file, size) = InflightRegion::create(2, 8).unwrap();
        // SAFETY: F_GET_SEALS reads no memory.
        let seals =
            unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_GET_SEALS) };
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(seals & want, want, "seals {seals:#x}");
        assert!(file.set_len(0).is_err(), "the frontend cannot truncate it");
        assert!(file.set_len(size + 4096).is_err(), "nor grow it");
    }

    #[test]
    fn unsealed_or_foreign_files_are_refused() {
        // A memfd the frontend could truncate under the backend's mapping (F1).
        let fd = MemfdOptions::default()
            .allow_sealing(true)
            .create("unsealed")
            .unwrap();
        fd.as_file().set_len(4096).unwrap();
        assert!(matches!(
            InflightRegion::open(fd.into_file(), 4096, 0, 1, 16),
            Err(InflightError::Unsafe(SharedFileError::NotSealed(_)))
        ));
        let (pipe_read, _w) = std::io::pipe().unwrap();
        assert!(matches!(
            InflightRegion::open(
                File::from(std::os::fd::OwnedFd::from(pipe_read)),
                4096,
                0,
                1,
                16
            ),
            Err(InflightError::Unsafe(SharedFileError::NotRegular(_)))
        ));
        // Offset + size past the end of u64 space.
        assert!(matches!(
            InflightRegion::open(sealed("far", 4096), 4096, !4095u64, 1, 16),
            Err(InflightError::TooSmall { .. })
        ));
        assert!(matches!(
            InflightRegion::open(sealed("far", 4096), u64::MAX, !4095u64, 1000, 32768),
            Err(InflightError::Unsafe(SharedFileError::Overflow { .. }))
        ));
    }

    #[test]
    fn zeroed_frontend_region_is_initialised() {
        let region = InflightRegion::open(sealed("zero", 4096), 4096, 0, 2, 16).unwrap();
        let mut q = region.queue(1).unwrap();
        assert!(q.recover(16, 9).unwrap().is_empty());
        q.mark(4).unwrap();
        let mut q = region.queue(1).unwrap();
        assert_eq!(q.recover(16, 9).unwrap(), vec![4]);
        assert!(region.queue(2).is_none());
    }

    #[test]
    fn hostile_regions_are_refused() {
        let file = sealed("small", 100);
        // Claims more than the file holds.
        assert!(matches!(
            InflightRegion::open(file.try_clone().unwrap(), 4096, 0, 1, 256),
            Err(InflightError::TooSmall { .. })
        ));
        // mmap_size smaller than the layout.
        assert!(matches!(
            InflightRegion::open(file.try_clone().unwrap(), 10, 0, 1, 4),
            Err(InflightError::TooSmall { .. })
        ));
        assert!(matches!(
            InflightRegion::open(file.try_clone().unwrap(), 64, 3, 1, 1),
            Err(InflightError::UnalignedOffset(3))
        ));
        assert!(matches!(
            InflightRegion::create(1, 0),
            Err(InflightError::BadLayout { .. })
        ));

        // Garbage inside a well-sized region.
        let (region, file, _size) = InflightRegion::create(1, 4).unwrap();
        let mut q = region.queue(0).unwrap();
        assert!(matches!(
            q.recover(8, 0),
            Err(InflightError::SizeMismatch { region: 4, ring: 8 })
        ));
        assert!(q.recover(4, 0).unwrap().is_empty());
        std::os::unix::fs::FileExt::write_all_at(&file, &[7, 0], 8).unwrap();
        assert!(matches!(
            q.recover(4, 0),
            Err(InflightError::UnknownVersion(7))
        ));
        std::os::unix::fs::FileExt::write_all_at(&file, &[1, 0], 8).unwrap();
        // A used index far ahead of the region: a batch larger than the queue.
        assert!(matches!(
            q.recover(4, 1000),
            Err(InflightError::BadBatch(1000))
        ));
        // A last batch head outside the queue.
        std::os::unix::fs::FileExt::write_all_at(&file, &[99, 0], 12).unwrap();
        assert!(matches!(
            q.recover(4, 1),
            Err(InflightError::HeadOutOfRange(99))
        ));
        // An in-flight flag of 3 or a head beyond the ring is dropped, not resubmitted.
        std::os::unix::fs::FileExt::write_all_at(&file, &[0, 0, 0, 0], 12).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[3], 16).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[1], 16 + 48).unwrap();
        assert!(q.recover(2, 0).unwrap().is_empty());
        assert!(q.inflight_heads().unwrap().is_empty());
        assert!(q.mark(4).is_err());
    }
}
