//! virtio-input over guest memory: the event queue (device to driver) and the status queue
//! (driver to device, e.g. keyboard LEDs). Unit-testable on hand-built queues, no socket.
//!
//! Events come from the control socket into a bounded [`Events`] queue, one whole report
//! (events up to and including EV_SYN) at a time or not at all. The event queue's worker
//! takes one event per driver buffer, in order. Nothing is popped from the ring unless an
//! event is ready for it, so buffers the driver posted wait in the ring, and a buffer is
//! returned as soon as its event is written: nothing stays in flight, so a restarted process
//! has nothing to resubmit and a guest never sees an event twice.
//!
//! A malformed buffer never stops the queue: on the event queue it is returned empty (length
//! 0) and the event goes into the next buffer; on the status queue it is returned and
//! ignored. Guest memory is only reached through `vm-memory`'s checked accessors.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use isola_device_common::chain::{self, ChainError};
use isola_device_common::logging::{chain as error_chain, RateLimiter};
use isola_device_common::{Progress, QueueContext, QueueError, QueueHandler};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::config::{Kind, EV_LED, EV_SYN, LED_CAPSL, LED_NUML, LED_SCROLLL, SYN_REPORT};

/// Bytes of `struct virtio_input_event`: le16 type, le16 code, le32 value.
pub const EVENT_LEN: usize = 8;

/// One evdev event as virtio-input carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputEvent {
    pub ev_type: u16,
    pub code: u16,
    pub value: u32,
}

impl InputEvent {
    pub fn new(ev_type: u16, code: u16, value: u32) -> Self {
        InputEvent {
            ev_type,
            code,
            value,
        }
    }

    pub fn syn() -> Self {
        InputEvent::new(EV_SYN, SYN_REPORT, 0)
    }

    pub fn to_bytes(self) -> [u8; EVENT_LEN] {
        let mut out = [0u8; EVENT_LEN];
        out[0..2].copy_from_slice(&self.ev_type.to_le_bytes());
        out[2..4].copy_from_slice(&self.code.to_le_bytes());
        out[4..8].copy_from_slice(&self.value.to_le_bytes());
        out
    }

    pub fn from_bytes(b: [u8; EVENT_LEN]) -> Self {
        InputEvent {
            ev_type: u16::from_le_bytes([b[0], b[1]]),
            code: u16::from_le_bytes([b[2], b[3]]),
            value: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventsError {
    #[error(
        "the {kind} has {pending} events waiting for the guest (limit {limit}); \
         the guest is not taking events"
    )]
    Full {
        kind: &'static str,
        pending: usize,
        limit: usize,
    },
    #[error("a report of {0} events is larger than the whole queue")]
    TooLarge(usize),
}

#[derive(Debug, Default)]
struct EventsState {
    pending: VecDeque<InputEvent>,
    delivered: u64,
    /// Pointer buttons (RFB mask bits) as of the last report queued, for edge detection;
    /// `None` until the first one, since a predecessor process may have left any held.
    buttons: Option<u8>,
    leds: u8,
}

/// The events of one device waiting for the guest, shared by the control socket (producer)
/// and the event queue's worker (consumer). Bounded: a report that does not fit is refused.
pub struct Events {
    kind: Kind,
    limit: usize,
    state: Mutex<EventsState>,
    /// Wakes the event queue's worker when events are queued (its `completion_fd`).
    wake: EventFd,
}

impl Events {
    /// The queue starts with one SYN_REPORT: if this process replaces one that was killed
    /// in the middle of a report, the guest has that report's first events but not its SYN,
    /// and this SYN closes it before any new event (so two reports never merge). With no
    /// report open, the guest sees an empty report, which Linux's input core drops.
    pub fn new(kind: Kind, limit: usize) -> std::io::Result<Self> {
        let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(std::io::Error::from)?;
        let state = EventsState {
            pending: VecDeque::from([InputEvent::syn()]),
            ..EventsState::default()
        };
        Ok(Events {
            kind,
            limit,
            state: Mutex::new(state),
            wake,
        })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    fn lock(&self) -> MutexGuard<'_, EventsState> {
        // Plain data; a panic elsewhere cannot leave it half-updated in a harmful way.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `report` (which should end with EV_SYN) whole, or refuses it.
    pub fn push(&self, report: &[InputEvent]) -> Result<(), EventsError> {
        self.push_with(|_| Ok(report.to_vec()))
    }

    /// Builds a report from the button state of the last report and queues it; `build`
    /// returns the events and the new button state is set only if the report is accepted.
    /// Before the first report the state is unknown, so `build` gets `!buttons` and states
    /// every button.
    pub fn push_pointer(
        &self,
        buttons: u8,
        build: impl FnOnce(u8) -> Vec<InputEvent>,
    ) -> Result<(), EventsError> {
        self.push_with(|state| {
            let report = build(state.buttons.unwrap_or(!buttons));
            state.buttons = Some(buttons);
            Ok(report)
        })
    }

    fn push_with(
        &self,
        build: impl FnOnce(&mut EventsState) -> Result<Vec<InputEvent>, EventsError>,
    ) -> Result<(), EventsError> {
        let mut state = self.lock();
        let before = state.buttons;
        let report = build(&mut state)?;
        let refusal = if report.len() > self.limit {
            Some(EventsError::TooLarge(report.len()))
        } else if state.pending.len() + report.len() > self.limit {
            Some(EventsError::Full {
                kind: match self.kind {
                    Kind::Keyboard => "keyboard",
                    Kind::Tablet => "tablet",
                },
                pending: state.pending.len(),
                limit: self.limit,
            })
        } else {
            None
        };
        if let Some(e) = refusal {
            state.buttons = before;
            return Err(e);
        }
        state.pending.extend(report);
        drop(state);
        // Only fails if the counter would overflow, and then the worker is awake anyway.
        let _ = self.wake.write(1);
        Ok(())
    }

    fn peek(&self) -> Option<InputEvent> {
        self.lock().pending.front().copied()
    }

    /// The event returned by `peek` reached the guest.
    fn delivered(&self) {
        let mut state = self.lock();
        state.pending.pop_front();
        state.delivered += 1;
    }

    /// Test aid: takes every pending event, as if the guest had.
    #[cfg(test)]
    pub(crate) fn drain(&self) -> Vec<InputEvent> {
        self.lock().pending.drain(..).collect()
    }

    /// Events handed to the guest so far.
    pub fn delivered_count(&self) -> u64 {
        self.lock().delivered
    }

    pub fn pending_count(&self) -> u64 {
        self.lock().pending.len() as u64
    }

    /// LED state the driver last reported: bit 0 num lock, 1 caps lock, 2 scroll lock.
    pub fn leds(&self) -> u8 {
        self.lock().leds
    }

    /// Records one LED event; returns the new state if it changed.
    fn set_led(&self, code: u16, on: bool) -> Option<u8> {
        let mut state = self.lock();
        let before = state.leds;
        if on {
            state.leds |= 1 << code;
        } else {
            state.leds &= !(1 << code);
        }
        (state.leds != before).then_some(state.leds)
    }

    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }
}

fn warn(log: &mut RateLimiter, what: std::fmt::Arguments<'_>) {
    if let Some(dropped) = log.allow() {
        if dropped > 0 {
            log::warn!("{what} ({dropped} similar lines dropped)");
        } else {
            log::warn!("{what}");
        }
    }
}

/// The handler of the event queue (queue 0).
pub struct EventQueue {
    events: Arc<Events>,
    log: RateLimiter,
}

impl EventQueue {
    pub fn new(events: Arc<Events>) -> Self {
        EventQueue {
            events,
            log: RateLimiter::new(10),
        }
    }

    /// Writes `event` into the chain's device-writable buffers.
    fn fill(
        chain: &isola_device_common::DescriptorChain,
        event: InputEvent,
    ) -> Result<(), ChainError> {
        let segs = chain.segments()?;
        let writable: Vec<_> = segs.into_iter().filter(|s| s.writable).collect();
        let (used, _) = chain::split_at(&writable, EVENT_LEN as u64)?;
        // Check the whole event fits, in guest memory, before writing a byte of it.
        let have = chain::total_len(&used);
        if have < EVENT_LEN as u64 {
            return Err(ChainError::Short {
                needed: EVENT_LEN,
                have: have as usize,
            });
        }
        chain::host_slices(chain.memory(), &used)?;
        chain::write_bytes(chain.memory(), &used, &event.to_bytes())
    }
}

impl QueueHandler for EventQueue {
    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.events.wake_fd())
    }

    fn process(&mut self, queue: &mut QueueContext<'_>) -> Result<Progress, QueueError> {
        loop {
            // No event: leave the driver's buffers in the ring; a queued report wakes us.
            let Some(event) = self.events.peek() else {
                return Ok(Progress::Blocked);
            };
            let Some(chain) = queue.pop()? else {
                // Events but no buffers: wait for the driver's kick.
                return Ok(Progress::Idle);
            };
            match Self::fill(&chain, event) {
                Ok(()) => {
                    queue.complete(chain.head(), EVENT_LEN as u32)?;
                    self.events.delivered();
                }
                Err(e) => {
                    warn(
                        &mut self.log,
                        format_args!(
                            "{}: event queue: buffer {} unusable, returned empty: {}",
                            self.events.kind().short(),
                            chain.head(),
                            error_chain(&e)
                        ),
                    );
                    queue.complete(chain.head(), 0)?;
                }
            }
        }
    }
}

/// The handler of the status queue (queue 1): LED updates from the driver.
pub struct StatusQueue {
    events: Arc<Events>,
    log: RateLimiter,
}

impl StatusQueue {
    pub fn new(events: Arc<Events>) -> Self {
        StatusQueue {
            events,
            log: RateLimiter::new(10),
        }
    }

    /// The events in a chain's device-readable buffers.
    fn read(chain: &isola_device_common::DescriptorChain) -> Result<Vec<InputEvent>, ChainError> {
        let segs = chain.segments()?;
        let readable: Vec<_> = segs.into_iter().filter(|s| !s.writable).collect();
        let len = chain::total_len(&readable);
        if len == 0 || !len.is_multiple_of(EVENT_LEN as u64) || len > 64 * EVENT_LEN as u64 {
            return Err(ChainError::Short {
                needed: EVENT_LEN,
                have: len as usize,
            });
        }
        let mut bytes = vec![0u8; len as usize];
        chain::read_bytes(chain.memory(), &readable, &mut bytes)?;
        Ok(bytes
            .chunks_exact(EVENT_LEN)
            .map(|c| {
                let mut raw = [0u8; EVENT_LEN];
                raw.copy_from_slice(c);
                InputEvent::from_bytes(raw)
            })
            .collect())
    }

    fn apply(&mut self, event: InputEvent) -> bool {
        let kind = self.events.kind();
        match event.ev_type {
            EV_SYN => true,
            EV_LED
                if kind == Kind::Keyboard
                    && matches!(event.code, LED_NUML | LED_CAPSL | LED_SCROLLL) =>
            {
                if let Some(leds) = self.events.set_led(event.code, event.value != 0) {
                    let on = |bit: u8| if leds & (1 << bit) != 0 { "on" } else { "off" };
                    log::info!("kbd: LEDs num={} caps={} scroll={}", on(0), on(1), on(2));
                }
                true
            }
            _ => false,
        }
    }
}

impl QueueHandler for StatusQueue {
    fn process(&mut self, queue: &mut QueueContext<'_>) -> Result<Progress, QueueError> {
        while let Some(chain) = queue.pop()? {
            match Self::read(&chain) {
                Ok(events) => {
                    for event in events {
                        if !self.apply(event) {
                            warn(
                                &mut self.log,
                                format_args!(
                                    "{}: status queue: ignoring event type {:#x} code {:#x}",
                                    self.events.kind().short(),
                                    event.ev_type,
                                    event.code
                                ),
                            );
                        }
                    }
                }
                Err(e) => warn(
                    &mut self.log,
                    format_args!(
                        "{}: status queue: buffer {} ignored: {}",
                        self.events.kind().short(),
                        chain.head(),
                        error_chain(&e)
                    ),
                ),
            }
            queue.complete(chain.head(), 0)?;
        }
        Ok(Progress::Idle)
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
