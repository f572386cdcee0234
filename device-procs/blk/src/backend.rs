//! Glue between virtio-blk and the shared vhost-user server: features, configuration space,
//! and a [`BlkQueue`] with its own I/O engine for each queue that starts.

use std::sync::Arc;
use std::time::Duration;

use isola_device_common::{DeviceError, QueueHandler, VirtioDevice};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::device::BlkQueue;
use crate::disk::{Disk, SECTOR};
use crate::engine::{new_engine, EngineKind, SqPoller};
use crate::request::{MAX_DWZ_SECTORS, MAX_DWZ_SEGMENTS};

/// Largest single data buffer (SIZE_MAX).
pub const SIZE_MAX: u32 = 1 << 20;
/// Length of the configuration space (virtio 1.2 `struct virtio_blk_config` up to and
/// including `write_zeroes_may_unmap` and its padding).
pub const CONFIG_LEN: usize = 60;

/// The virtio-blk device served by this process.
pub struct BlkDevice {
    disk: Arc<Disk>,
    num_queues: u16,
    queue_size: u16,
    engine: EngineKind,
    poll: Duration,
    sq_poller: Option<Arc<SqPoller>>,
    #[cfg(feature = "debug-hold")]
    hold: Option<u64>,
}

impl BlkDevice {
    pub fn new(disk: Arc<Disk>, num_queues: u16, queue_size: u16, engine: EngineKind) -> Self {
        BlkDevice {
            disk,
            num_queues,
            queue_size,
            engine,
            poll: Duration::ZERO,
            sq_poller: None,
            #[cfg(feature = "debug-hold")]
            hold: None,
        }
    }

    /// Each queue polls its ring for `poll` after a burst before it sleeps.
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// io_uring queues share `poller`'s kernel thread to submit their I/O.
    pub fn with_sq_poller(mut self, poller: Option<SqPoller>) -> Self {
        self.sq_poller = poller.map(Arc::new);
        self
    }

    /// Test hook: requests naming sector `sector` are taken and never finished.
    #[cfg(feature = "debug-hold")]
    pub fn with_hold_sector(mut self, sector: Option<u64>) -> Self {
        self.hold = sector;
        self
    }
}

fn bit(n: u32) -> u64 {
    1 << n
}

impl VirtioDevice for BlkDevice {
    fn name(&self) -> &str {
        "blk"
    }

    fn num_queues(&self) -> u16 {
        self.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn features(&self) -> u64 {
        let mut f = [
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_MQ,
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
        ]
        .into_iter()
        .map(bit)
        .fold(0, |a, b| a | b);
        if self.disk.readonly() {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn config(&self) -> Vec<u8> {
        let mut c = vec![0u8; CONFIG_LEN];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        let block = self.disk.block_size();
        put(0, &(self.disk.size() / SECTOR).to_le_bytes()); // capacity, in 512-byte sectors
        put(8, &SIZE_MAX.to_le_bytes()); // size_max
        put(12, &u32::from(self.queue_size - 2).to_le_bytes()); // seg_max
        put(20, &(block as u32).to_le_bytes()); // blk_size
        put(26, &1u16.to_le_bytes()); // topology: min_io_size, in blocks
        put(34, &self.num_queues.to_le_bytes()); // num_queues
        put(36, &MAX_DWZ_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &MAX_DWZ_SEGMENTS.to_le_bytes()); // max_discard_seg
        put(44, &((block / SECTOR) as u32).to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_DWZ_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DWZ_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        c
    }

    fn queue_handler(
        &self,
        index: u16,
        features: u64,
    ) -> Result<Box<dyn QueueHandler>, DeviceError> {
        let engine = new_engine(
            self.engine,
            Arc::clone(&self.disk),
            self.queue_size,
            self.sq_poller.as_ref(),
        )
        .map_err(|e| DeviceError::QueueSetup {
            index,
            source: Box::new(e),
        })?;
        let queue =
            BlkQueue::new(index, Arc::clone(&self.disk), engine, features).with_poll(self.poll);
        #[cfg(feature = "debug-hold")]
        let queue = queue.with_hold(self.hold);
        Ok(Box::new(queue))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiskOptions;

    fn device(readonly: bool, direct: bool) -> BlkDevice {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("isola-blk-backend-{}-{n}.img", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let disk = Disk::open(
            &path,
            &DiskOptions {
                readonly,
                direct,
                serial: None,
            },
        )
        .unwrap();
        std::fs::remove_file(&path).unwrap();
        BlkDevice::new(Arc::new(disk), 4, 128, EngineKind::Sync)
    }

    #[test]
    fn features_follow_the_disk() {
        let rw = device(false, false).features();
        assert_ne!(rw & bit(VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(rw & bit(VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw & bit(VIRTIO_F_VERSION_1), 0);
        let ro = device(true, false).features();
        assert_ne!(ro & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(
            ro & (bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)),
            0
        );
    }

    #[test]
    fn config_space_layout() {
        let c = device(false, false).config();
        assert_eq!(c.len(), 60);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 1);
        assert_eq!(c[56], 1);
        let direct = device(false, true).config();
        assert_eq!(u32::from_le_bytes(direct[20..24].try_into().unwrap()), 4096);
        assert_eq!(u32::from_le_bytes(direct[44..48].try_into().unwrap()), 8);
    }
}
