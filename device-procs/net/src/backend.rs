//! Glue between virtio-net and the shared vhost-user server: features, configuration space,
//! queue layout, and the tap offloads that follow what the driver acknowledged.
//!
//! Queue layout (virtio 1.2, 5.1.2): receiveq/transmitq of pair `p` are queues `2p` and
//! `2p + 1`; with more than one pair the device also has a control queue (MQ requires it),
//! at `2 * pairs` once MQ is negotiated, else at 2.

use std::sync::Arc;

use isola_device_common::{DeviceError, QueueHandler, VirtioDevice};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::device::{CtrlQueue, RxQueue, Stats, TxQueue};
use crate::tap::Tap;

/// Length of the configuration space: mac, status, max_virtqueue_pairs, mtu.
pub const CONFIG_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("the driver did not acknowledge VIRTIO_F_VERSION_1 (12-byte headers)")]
    Legacy,
    #[error("no such queue")]
    NoQueue,
    #[error(transparent)]
    Tap(#[from] crate::tap::TapError),
}

/// The virtio-net device served by this process.
pub struct NetDevice {
    tap: Arc<Tap>,
    pairs: u16,
    queue_size: u16,
    mac: [u8; 6],
    mtu: u16,
    stats: Arc<Stats>,
}

fn bit(n: u32) -> u64 {
    1 << n
}

impl NetDevice {
    /// One queue pair per tap queue.
    pub fn new(tap: Arc<Tap>, queue_size: u16, mac: [u8; 6], mtu: u16) -> Self {
        // The tap has 1..=MAX_PAIRS queues (checked by the configuration).
        let pairs = u16::try_from(tap.num_queues()).unwrap_or(u16::MAX);
        NetDevice {
            tap,
            pairs,
            queue_size,
            mac,
            mtu,
            stats: Arc::new(Stats::default()),
        }
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    fn multiqueue(&self) -> bool {
        self.pairs > 1
    }

    /// The tap offloads (`TUN_F_*`) matching the receive offloads the driver accepted.
    pub fn tap_offloads(features: u64) -> libc::c_uint {
        let on = |b: u32| features & bit(b) != 0;
        if !on(VIRTIO_NET_F_GUEST_CSUM) {
            return 0;
        }
        let mut flags = libc::TUN_F_CSUM;
        if on(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if on(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        if on(VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
            flags |= libc::TUN_F_TSO_ECN;
        }
        if on(VIRTIO_NET_F_GUEST_UFO) {
            flags |= libc::TUN_F_UFO;
        }
        flags
    }

    fn handler(&self, index: u16, features: u64) -> Result<Box<dyn QueueHandler>, SetupError> {
        if features & bit(VIRTIO_F_VERSION_1) == 0 {
            return Err(SetupError::Legacy);
        }
        let ctrl_index = if features & bit(VIRTIO_NET_F_MQ) != 0 {
            2 * self.pairs
        } else {
            2
        };
        if features & bit(VIRTIO_NET_F_CTRL_VQ) != 0 && index == ctrl_index {
            return Ok(Box::new(CtrlQueue::new(
                Some(Arc::clone(&self.tap)),
                self.pairs,
            )));
        }
        if index >= 2 * self.pairs {
            return Err(SetupError::NoQueue);
        }
        let pair = usize::from(index / 2);
        if index.is_multiple_of(2) {
            // Receive queues start before the driver sends anything; set the offloads here.
            self.tap.set_offload(Self::tap_offloads(features))?;
            // Every pair is in use until the driver says otherwise (a previous driver may
            // have detached some).
            self.tap.set_queue_attached(pair, true)?;
            Ok(Box::new(RxQueue::new(
                Arc::clone(&self.tap),
                pair,
                features,
                Arc::clone(&self.stats),
            )))
        } else {
            Ok(Box::new(TxQueue::new(
                Arc::clone(&self.tap),
                pair,
                features,
                self.mtu,
                Arc::clone(&self.stats),
            )))
        }
    }
}

impl VirtioDevice for NetDevice {
    fn name(&self) -> &str {
        "net"
    }

    fn num_queues(&self) -> u16 {
        if self.multiqueue() {
            2 * self.pairs + 1
        } else {
            2
        }
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn features(&self) -> u64 {
        let mut f = [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_HOST_UFO,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
        ]
        .iter()
        .fold(0u64, |acc, &b| acc | bit(b));
        if self.multiqueue() {
            f |= bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_MQ);
        }
        f
    }

    fn config(&self) -> Vec<u8> {
        let mut c = Vec::with_capacity(CONFIG_LEN);
        c.extend_from_slice(&self.mac);
        // The tap is attached for as long as this process runs: the link is up.
        c.extend_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c.extend_from_slice(&self.pairs.to_le_bytes());
        c.extend_from_slice(&self.mtu.to_le_bytes());
        c
    }

    fn queue_handler(
        &self,
        index: u16,
        features: u64,
    ) -> Result<Box<dyn QueueHandler>, DeviceError> {
        self.handler(index, features)
            .map_err(|e| DeviceError::QueueSetup {
                index,
                source: Box::new(e),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_offloads_follow_the_receive_features() {
        let f = |bits: &[u32]| bits.iter().fold(0u64, |a, &b| a | bit(b));
        assert_eq!(
            NetDevice::tap_offloads(f(&[VIRTIO_NET_F_GUEST_TSO4])),
            0,
            "no csum, no TSO"
        );
        assert_eq!(
            NetDevice::tap_offloads(f(&[VIRTIO_NET_F_GUEST_CSUM])),
            libc::TUN_F_CSUM
        );
        assert_eq!(
            NetDevice::tap_offloads(f(&[
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_ECN,
                VIRTIO_NET_F_GUEST_UFO
            ])),
            libc::TUN_F_CSUM
                | libc::TUN_F_TSO4
                | libc::TUN_F_TSO6
                | libc::TUN_F_TSO_ECN
                | libc::TUN_F_UFO
        );
        assert_eq!(
            NetDevice::tap_offloads(f(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN])),
            libc::TUN_F_CSUM,
            "ECN only with TSO"
        );
    }
}
