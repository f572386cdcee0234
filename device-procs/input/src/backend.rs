//! Glue between virtio-input and the shared vhost-user server: features, the select/subsel
//! configuration window, and the two queue handlers.

use std::sync::{Arc, Mutex};

use isola_device_common::{DeviceError, QueueHandler, VirtioDevice};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use crate::config::{config_space, Kind};
use crate::device::{EventQueue, Events, StatusQueue};

/// Largest virtqueue a frontend may set up (the core uses 64).
pub const MAX_QUEUE_SIZE: u16 = 256;
pub const EVENT_QUEUE: u16 = 0;
pub const STATUS_QUEUE: u16 = 1;

/// One virtio-input device (a keyboard or a tablet) served on one socket.
pub struct InputDevice {
    kind: Kind,
    events: Arc<Events>,
    /// The driver's last `select` and `subsel` (configuration bytes 0 and 1).
    selector: Mutex<(u8, u8)>,
    name: String,
}

impl InputDevice {
    pub fn new(events: Arc<Events>) -> Self {
        let kind = events.kind();
        InputDevice {
            kind,
            events,
            selector: Mutex::new((0, 0)),
            name: format!("input-{}", kind.short()),
        }
    }

    pub fn events(&self) -> &Arc<Events> {
        &self.events
    }

    fn selector(&self) -> std::sync::MutexGuard<'_, (u8, u8)> {
        self.selector.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl VirtioDevice for InputDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn num_queues(&self) -> u16 {
        2
    }

    fn max_queue_size(&self) -> u16 {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn config(&self) -> Vec<u8> {
        let (select, subsel) = *self.selector();
        config_space(self.kind, select, subsel)
    }

    /// Only `select` (byte 0) and `subsel` (byte 1) are writable; a write that reaches
    /// further is refused whole.
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        let end = (offset as usize).checked_add(data.len());
        if data.is_empty() || end.is_none_or(|end| end > 2) {
            return Err(DeviceError::ReadOnlyConfig {
                offset,
                len: data.len(),
            });
        }
        let mut selector = self.selector();
        for (i, &byte) in data.iter().enumerate() {
            match offset as usize + i {
                0 => selector.0 = byte,
                _ => selector.1 = byte,
            }
        }
        Ok(())
    }

    fn queue_handler(
        &self,
        index: u16,
        _features: u64,
    ) -> Result<Box<dyn QueueHandler>, DeviceError> {
        match index {
            EVENT_QUEUE => Ok(Box::new(EventQueue::new(Arc::clone(&self.events)))),
            STATUS_QUEUE => Ok(Box::new(StatusQueue::new(Arc::clone(&self.events)))),
            _ => Err(DeviceError::Unsupported("a third virtio-input queue")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EV_ABS, EV_KEY};

    fn tablet() -> InputDevice {
        InputDevice::new(Arc::new(Events::new(Kind::Tablet, 16).unwrap()))
    }

    #[test]
    fn select_then_read() {
        let dev = tablet();
        assert_eq!(dev.config()[2], 0, "nothing selected at start");
        dev.write_config(0, &[0x11]).unwrap();
        dev.write_config(1, &[EV_ABS as u8]).unwrap();
        let c = dev.config();
        assert_eq!((c[0], c[1], c[2], c[8]), (0x11, 3, 1, 0x03));
        dev.write_config(0, &[0x11, EV_KEY as u8]).unwrap();
        assert_eq!(dev.config()[2], 35);
        dev.write_config(0, &[0x01]).unwrap();
        dev.write_config(1, &[0]).unwrap();
        assert_eq!(&dev.config()[8..20], b"Isola Tablet");
    }

    #[test]
    fn writes_past_subsel_are_refused_and_change_nothing() {
        let dev = tablet();
        dev.write_config(0, &[0x01, 0]).unwrap();
        for (offset, data) in [
            (2u32, &[5u8][..]),
            (0, &[0x11, 3, 9][..]),
            (8, &[1, 2, 3, 4][..]),
            (u32::MAX, &[1][..]),
            (0, &[][..]),
        ] {
            assert!(dev.write_config(offset, data).is_err(), "{offset} {data:?}");
        }
        assert_eq!(&dev.config()[..3], &[0x01, 0, 12]);
    }

    #[test]
    fn two_queues_and_no_third() {
        let dev = tablet();
        assert!(dev.queue_handler(0, 0).is_ok());
        assert!(dev.queue_handler(1, 0).is_ok());
        assert!(dev.queue_handler(2, 0).is_err());
        assert_ne!(dev.features() & (1 << VIRTIO_F_VERSION_1), 0);
    }
}
