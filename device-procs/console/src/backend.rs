//! Glue between virtio-console and the shared vhost-user server: features, configuration
//! space, and which handler serves which queue.
//!
//! Queue layout (virtio 1.2, 5.3.2): port 0's receiveq and transmitq (0, 1); with MULTIPORT
//! the control receiveq and transmitq (2, 3), then a receiveq/transmitq pair per further
//! port (4 + 2(k-1), 5 + 2(k-1) for port k). So N ports need 2N + 2 queues; the core's
//! `--device console,socket=...,queues=2N+2` must say so.
//!
//! The configuration space is constant (cols = rows = 0, `max_nr_ports`, `emerg_wr` = 0):
//! the core compares it when a restarted process reconnects, and a terminal size there would
//! change. Sizes travel as RESIZE control messages instead, which needs MULTIPORT; SIZE and
//! EMERG_WRITE are not offered.

use std::sync::Arc;

use isola_device_common::{DeviceError, QueueHandler, VirtioDevice};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::control::Control;
use crate::device::{ControlRx, ControlTx, RxQueue, TxQueue};
use crate::port::Port;

pub const VIRTIO_CONSOLE_F_MULTIPORT: u32 = 1;
/// `struct virtio_console_config`: cols u16, rows u16, max_nr_ports u32, emerg_wr u32.
pub const CONFIG_LEN: usize = 12;

/// What a queue index serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    Receive(usize),
    Transmit(usize),
    ControlReceive,
    ControlTransmit,
}

/// The role of queue `index` with `ports` ports and MULTIPORT on or off; `None` past the end.
pub fn queue_role(index: u16, ports: usize, multiport: bool) -> Option<QueueRole> {
    let i = usize::from(index);
    let role = match (i, multiport) {
        (0, _) => QueueRole::Receive(0),
        (1, _) => QueueRole::Transmit(0),
        (2, true) => QueueRole::ControlReceive,
        (3, true) => QueueRole::ControlTransmit,
        (i, true) if i >= 4 => {
            let port = (i - 4) / 2 + 1;
            if port >= ports {
                return None;
            }
            if i % 2 == 0 {
                QueueRole::Receive(port)
            } else {
                QueueRole::Transmit(port)
            }
        }
        _ => return None,
    };
    Some(role)
}

/// The virtio-console device served by this process.
pub struct ConsoleDevice {
    ports: Vec<Arc<Port>>,
    control: Option<Arc<Control>>,
    queue_size: u16,
}

impl ConsoleDevice {
    /// `control` is present exactly when the device offers MULTIPORT.
    pub fn new(ports: Vec<Arc<Port>>, control: Option<Arc<Control>>, queue_size: u16) -> Self {
        ConsoleDevice {
            ports,
            control,
            queue_size,
        }
    }

    pub fn multiport(&self) -> bool {
        self.control.is_some()
    }

    /// Queues the guest must see: 2, or 2 per port plus the control pair.
    pub fn queues_needed(&self) -> u16 {
        if self.multiport() {
            2 * self.ports.len() as u16 + 2
        } else {
            2
        }
    }
}

impl VirtioDevice for ConsoleDevice {
    fn name(&self) -> &str {
        "console"
    }

    fn num_queues(&self) -> u16 {
        self.queues_needed()
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn features(&self) -> u64 {
        let mut f = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC);
        if self.multiport() {
            f |= 1 << VIRTIO_CONSOLE_F_MULTIPORT;
        }
        f
    }

    fn config(&self) -> Vec<u8> {
        let mut c = vec![0u8; CONFIG_LEN];
        c[4..8].copy_from_slice(&(self.ports.len() as u32).to_le_bytes());
        c
    }

    fn queue_handler(
        &self,
        index: u16,
        features: u64,
    ) -> Result<Box<dyn QueueHandler>, DeviceError> {
        let multiport = features & (1 << VIRTIO_CONSOLE_F_MULTIPORT) != 0;
        let control = self.control.as_ref().filter(|_| multiport);
        let role = queue_role(index, self.ports.len(), multiport).ok_or_else(|| {
            DeviceError::QueueSetup {
                index,
                source: format!("queue {index} does not exist with these features").into(),
            }
        })?;
        let port = |i: usize| Arc::clone(&self.ports[i]);
        Ok(match (role, control) {
            (QueueRole::Receive(i), c) => Box::new(RxQueue::new(port(i), c.cloned())),
            (QueueRole::Transmit(i), c) => Box::new(TxQueue::new(port(i), c.cloned())),
            (QueueRole::ControlReceive, Some(c)) => {
                // The control receive queue starts with every driver (re)start: the driver
                // begins the handshake again, so what it had not read is void.
                c.reset();
                Box::new(ControlRx::new(Arc::clone(c)))
            }
            (QueueRole::ControlTransmit, Some(c)) => Box::new(ControlTx::new(Arc::clone(c))),
            (_, None) => {
                return Err(DeviceError::Unsupported("control queues without MULTIPORT"));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_roles_follow_the_spec_layout() {
        assert_eq!(queue_role(0, 3, true), Some(QueueRole::Receive(0)));
        assert_eq!(queue_role(1, 3, true), Some(QueueRole::Transmit(0)));
        assert_eq!(queue_role(2, 3, true), Some(QueueRole::ControlReceive));
        assert_eq!(queue_role(3, 3, true), Some(QueueRole::ControlTransmit));
        assert_eq!(queue_role(4, 3, true), Some(QueueRole::Receive(1)));
        assert_eq!(queue_role(7, 3, true), Some(QueueRole::Transmit(2)));
        assert_eq!(queue_role(8, 3, true), None);
        assert_eq!(queue_role(2, 1, false), None);
        assert_eq!(queue_role(1, 1, false), Some(QueueRole::Transmit(0)));
    }
}
