//! The MULTIPORT control protocol (virtio 1.2, 5.3.6.2): 8-byte messages
//! `{ le32 id; le16 event; le16 value; }` on the control queues, some followed by data.
//!
//! Device -> driver messages wait in a bounded outbox until the driver posts a control
//! receive buffer; driver -> device messages are decoded here and answered through it. A
//! driver that floods the device (e.g. DEVICE_READY in a loop) fills the outbox, and what
//! does not fit is dropped with a rate-limited log line: memory stays bounded.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use isola_device_common::logging::RateLimiter;
use nix::sys::eventfd::EventFd;

use crate::port::Port;

pub const DEVICE_READY: u16 = 0;
pub const DEVICE_ADD: u16 = 1;
pub const DEVICE_REMOVE: u16 = 2;
pub const PORT_READY: u16 = 3;
pub const CONSOLE_PORT: u16 = 4;
pub const RESIZE: u16 = 5;
pub const PORT_OPEN: u16 = 6;
pub const PORT_NAME: u16 = 7;

/// Size of the message header.
pub const HEADER: usize = 8;
/// Most device -> driver messages waiting for control buffers.
pub const OUTBOX_LIMIT: usize = 256;

/// A control message: header plus optional data (a port name, a size).
pub fn message(id: u32, event: u16, value: u16, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER + data.len());
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m.extend_from_slice(data);
    m
}

/// The header of a message, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u32,
    pub event: u16,
    pub value: u16,
}

impl Header {
    pub fn decode(raw: &[u8; HEADER]) -> Header {
        Header {
            id: u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]),
            event: u16::from_le_bytes([raw[4], raw[5]]),
            value: u16::from_le_bytes([raw[6], raw[7]]),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("message for port {0}, which does not exist")]
    BadPort(u32),
    #[error("event {0} is not one a driver sends")]
    UnknownEvent(u16),
    #[error("the driver reported a failure (event {event}, value {value})")]
    DriverFailed { event: u16, value: u16 },
}

/// State of the control protocol, shared by both control queues, the I/O thread and the
/// data queues (which report users coming and going).
pub struct Control {
    ports: Vec<Arc<Port>>,
    outbox: Mutex<VecDeque<Vec<u8>>>,
    /// Completion eventfd of the control receive queue: a message is waiting.
    pub event: EventFd,
    device_ready: AtomicBool,
    port_ready: Vec<AtomicBool>,
    guest_open: Vec<AtomicBool>,
    dropped_log: Mutex<RateLimiter>,
}

impl Control {
    pub fn new(ports: Vec<Arc<Port>>, event: EventFd) -> Control {
        let n = ports.len();
        Control {
            ports,
            outbox: Mutex::new(VecDeque::new()),
            event,
            device_ready: AtomicBool::new(false),
            port_ready: (0..n).map(|_| AtomicBool::new(false)).collect(),
            guest_open: (0..n).map(|_| AtomicBool::new(false)).collect(),
            dropped_log: Mutex::new(RateLimiter::new(5)),
        }
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, VecDeque<Vec<u8>>> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a message for the driver (dropped, and logged, if the outbox is full).
    pub fn send(&self, msg: Vec<u8>) {
        {
            let mut outbox = self.outbox();
            if outbox.len() >= OUTBOX_LIMIT {
                drop(outbox);
                let mut limiter = self.dropped_log.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(n) = limiter.allow() {
                    log::warn!(
                        "control outbox full ({OUTBOX_LIMIT} messages): dropping one ({n} more dropped before)"
                    );
                }
                return;
            }
            outbox.push_back(msg);
        }
        Port::poke(&self.event);
    }

    /// The next message for the driver, if any; `put_back` returns it to the front.
    pub fn take(&self) -> Option<Vec<u8>> {
        self.outbox().pop_front()
    }

    pub fn put_back(&self, msg: Vec<u8>) {
        self.outbox().push_front(msg);
    }

    pub fn pending(&self) -> usize {
        self.outbox().len()
    }

    /// Whether the driver has said PORT_READY for port `id` (so it may hear about it).
    pub fn port_ready(&self, id: u32) -> bool {
        self.port_ready
            .get(id as usize)
            .is_some_and(|r| r.load(Ordering::Acquire))
    }

    /// Whether the guest has the port open (its last PORT_OPEN).
    pub fn guest_open(&self, id: u32) -> bool {
        self.guest_open
            .get(id as usize)
            .is_some_and(|r| r.load(Ordering::Acquire))
    }

    /// A user attached to or left port `id`: tell the driver if it knows the port.
    pub fn host_connected(&self, id: u32, connected: bool) {
        if self.port_ready(id) {
            self.send(message(id, PORT_OPEN, u16::from(connected), &[]));
        }
    }

    /// The console port's terminal changed size. The data is `{ le16 cols; le16 rows; }` as
    /// the virtio specification has it (Linux's driver reads rows first: a known mismatch).
    pub fn resize(&self, id: u32, cols: u16, rows: u16) {
        if id == 0 && self.port_ready(0) {
            let mut size = [0u8; 4];
            size[0..2].copy_from_slice(&cols.to_le_bytes());
            size[2..4].copy_from_slice(&rows.to_le_bytes());
            self.send(message(0, RESIZE, 0, &size));
        }
    }

    /// Handles one driver -> device message.
    pub fn handle(&self, h: Header) -> Result<(), ControlError> {
        let port = || {
            self.ports
                .get(h.id as usize)
                .ok_or(ControlError::BadPort(h.id))
        };
        match h.event {
            DEVICE_READY => {
                if h.value != 1 {
                    return Err(ControlError::DriverFailed {
                        event: h.event,
                        value: h.value,
                    });
                }
                self.device_ready.store(true, Ordering::Release);
                for p in &self.ports {
                    self.send(message(p.id, DEVICE_ADD, 0, &[]));
                }
                Ok(())
            }
            PORT_READY => {
                let p = port()?;
                if h.value != 1 {
                    return Err(ControlError::DriverFailed {
                        event: h.event,
                        value: h.value,
                    });
                }
                self.port_ready[p.id as usize].store(true, Ordering::Release);
                if p.id == 0 {
                    self.send(message(0, CONSOLE_PORT, 1, &[]));
                    if let Some((cols, rows)) = p.size() {
                        self.resize(0, cols, rows);
                    }
                }
                if let Some(name) = &p.name {
                    self.send(message(p.id, PORT_NAME, 1, name.as_bytes()));
                }
                self.send(message(p.id, PORT_OPEN, u16::from(p.host_connected()), &[]));
                Ok(())
            }
            PORT_OPEN => {
                let p = port()?;
                self.guest_open[p.id as usize].store(h.value != 0, Ordering::Release);
                Ok(())
            }
            other => Err(ControlError::UnknownEvent(other)),
        }
    }

    /// After a driver reset: it will start the handshake again.
    pub fn reset(&self) {
        self.outbox().clear();
        self.device_ready.store(false, Ordering::Release);
        for flag in self.port_ready.iter().chain(&self.guest_open) {
            flag.store(false, Ordering::Release);
        }
    }
}
