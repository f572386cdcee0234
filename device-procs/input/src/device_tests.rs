//! Tests of `device.rs`: both queues on guest memory with hand-built descriptor chains,
//! including a hostile driver.

use std::collections::VecDeque;

use isola_device_common::testing::SplitQueue;
use isola_device_common::Memory;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::config::{EV_KEY, LED_CAPSL};

/// Guest RAM: [0, 64 KiB) and [128 KiB, 192 KiB), with a hole between.
const LOW_END: u64 = 0x1_0000;
const HIGH: u64 = 0x2_0000;
const QSIZE: u16 = 16;
const CANARY: u8 = 0xee;
const BUFS: u64 = 0x8000;

struct Rig {
    mem: Arc<Memory>,
    driver: SplitQueue,
    queue: Queue,
    resubmit: VecDeque<u16>,
}

impl Rig {
    fn new() -> Rig {
        let mem = Arc::new(
            Memory::from_ranges(&[
                (GuestAddress(0), LOW_END as usize),
                (GuestAddress(HIGH), LOW_END as usize),
            ])
            .unwrap(),
        );
        mem.write_slice(&vec![CANARY; LOW_END as usize], GuestAddress(0))
            .unwrap();
        mem.write_slice(&vec![CANARY; LOW_END as usize], GuestAddress(HIGH))
            .unwrap();
        let driver = SplitQueue::new(0, QSIZE, GuestAddress(0));
        mem.write_slice(&vec![0u8; driver.end().0 as usize], GuestAddress(0))
            .unwrap();
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.try_set_desc_table_address(driver.desc).unwrap();
        queue.try_set_avail_ring_address(driver.avail).unwrap();
        queue.try_set_used_ring_address(driver.used).unwrap();
        queue.set_ready(true);
        Rig {
            mem,
            driver,
            queue,
            resubmit: VecDeque::new(),
        }
    }

    fn post(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let bufs: Vec<_> = bufs
            .iter()
            .map(|&(a, l, w)| (GuestAddress(a), l, w))
            .collect();
        let head = self.driver.add(&self.mem, &bufs);
        self.driver.publish(&self.mem, head);
        head
    }

    fn run(&mut self, handler: &mut dyn QueueHandler) -> Progress {
        let mut ctx = QueueContext::new(
            0,
            &mut self.queue,
            Arc::clone(&self.mem),
            &mut self.resubmit,
        );
        handler.process(&mut ctx).unwrap()
    }

    fn used(&self) -> Vec<(u32, u32)> {
        (0..self.driver.used_idx(&self.mem))
            .map(|i| self.driver.used_elem(&self.mem, i))
            .collect()
    }

    fn event_at(&self, addr: u64) -> InputEvent {
        let mut raw = [0u8; EVENT_LEN];
        self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
        InputEvent::from_bytes(raw)
    }
}

/// Events of a process that has delivered its opening SYN.
fn fresh(kind: Kind, limit: usize) -> Arc<Events> {
    let events = Arc::new(Events::new(kind, limit).unwrap());
    assert_eq!(events.drain(), vec![InputEvent::syn()]);
    events
}

fn key(code: u16, pressed: bool) -> Vec<InputEvent> {
    vec![
        InputEvent::new(EV_KEY, code, u32::from(pressed)),
        InputEvent::syn(),
    ]
}

#[test]
fn events_fill_posted_buffers_in_order() {
    let mut rig = Rig::new();
    let events = fresh(Kind::Keyboard, 64);
    let mut handler = EventQueue::new(Arc::clone(&events));
    // No events: nothing is taken, however many buffers there are.
    for i in 0..3 {
        rig.post(&[(BUFS + 8 * i, 8, true)]);
    }
    assert_eq!(rig.run(&mut handler), Progress::Blocked);
    assert!(rig.used().is_empty());
    // Two reports, four events: three buffers now, the last event waits.
    events.push(&key(30, true)).unwrap();
    events.push(&key(30, false)).unwrap();
    assert_eq!(rig.run(&mut handler), Progress::Idle);
    assert_eq!(rig.used(), vec![(0, 8), (1, 8), (2, 8)]);
    assert_eq!(rig.event_at(BUFS), InputEvent::new(EV_KEY, 30, 1));
    assert_eq!(rig.event_at(BUFS + 8), InputEvent::syn());
    assert_eq!(rig.event_at(BUFS + 16), InputEvent::new(EV_KEY, 30, 0));
    assert_eq!((events.delivered_count(), events.pending_count()), (3, 1));
    // A buffer split over two descriptors takes the next one.
    rig.post(&[(BUFS + 0x100, 3, true), (BUFS + 0x200, 5, true)]);
    assert_eq!(rig.run(&mut handler), Progress::Blocked);
    let mut raw = [0u8; 8];
    rig.mem
        .read_slice(&mut raw[..3], GuestAddress(BUFS + 0x100))
        .unwrap();
    rig.mem
        .read_slice(&mut raw[3..], GuestAddress(BUFS + 0x200))
        .unwrap();
    assert_eq!(InputEvent::from_bytes(raw), InputEvent::syn());
    assert_eq!(rig.used()[3], (3, 8));
    assert_eq!((events.delivered_count(), events.pending_count()), (4, 0));
}

#[test]
fn hostile_event_buffers_are_returned_empty_and_the_event_waits() {
    let mut rig = Rig::new();
    let events = fresh(Kind::Tablet, 64);
    let mut handler = EventQueue::new(Arc::clone(&events));
    events
        .push(&[InputEvent::new(3, 0, 77), InputEvent::syn()])
        .unwrap();
    let heads = [
        rig.post(&[(BUFS, 8, false)]),            // device-readable
        rig.post(&[(BUFS + 0x10, 4, true)]),      // too short
        rig.post(&[(LOW_END - 4, 8, true)]),      // runs into the hole
        rig.post(&[(0xdead_0000_0000, 8, true)]), // nowhere near RAM
        rig.post(&[(u64::MAX - 3, 8, true)]),     // wraps around
    ];
    // A chain whose next index is outside the table.
    rig.driver.put(&rig.mem, 5, BUFS, 8, 1 | 2, 200);
    rig.driver.publish(&rig.mem, 5);
    // An indirect table outside guest memory.
    rig.driver.put(&rig.mem, 6, 0xdead_0000, 32, 4, 0);
    rig.driver.publish(&rig.mem, 6);
    // Then two good buffers.
    rig.driver.put(&rig.mem, 7, BUFS + 0x40, 8, 2, 0);
    rig.driver.publish(&rig.mem, 7);
    rig.driver.put(&rig.mem, 8, BUFS + 0x48, 8, 2, 0);
    rig.driver.publish(&rig.mem, 8);
    assert_eq!(rig.run(&mut handler), Progress::Blocked);
    let used = rig.used();
    let mut expected: Vec<(u32, u32)> = heads.iter().map(|&h| (u32::from(h), 0)).collect();
    expected.extend([(5, 0), (6, 0), (7, 8), (8, 8)]);
    assert_eq!(used, expected);
    assert_eq!(rig.event_at(BUFS + 0x40), InputEvent::new(3, 0, 77));
    assert_eq!(rig.event_at(BUFS + 0x48), InputEvent::syn());
    // Nothing was written where it should not have been: the readable buffer, the short one
    // and the bytes before the hole keep the canary.
    let mut around = [0u8; 8];
    rig.mem.read_slice(&mut around, GuestAddress(BUFS)).unwrap();
    assert_eq!(around, [CANARY; 8]);
    rig.mem
        .read_slice(&mut around[..4], GuestAddress(BUFS + 0x10))
        .unwrap();
    assert_eq!(around[..4], [CANARY; 4]);
    rig.mem
        .read_slice(&mut around[..4], GuestAddress(LOW_END - 4))
        .unwrap();
    assert_eq!(around[..4], [CANARY; 4]);
    assert_eq!(events.delivered_count(), 2);
}

#[test]
fn status_queue_takes_leds_and_survives_garbage() {
    let mut rig = Rig::new();
    let events = fresh(Kind::Keyboard, 64);
    let mut handler = StatusQueue::new(Arc::clone(&events));
    let put_event = |rig: &Rig, at: u64, e: InputEvent| {
        rig.mem
            .write_slice(&e.to_bytes(), GuestAddress(at))
            .unwrap()
    };
    put_event(&rig, BUFS, InputEvent::new(EV_LED, LED_CAPSL, 1));
    put_event(&rig, BUFS + 8, InputEvent::syn());
    put_event(&rig, BUFS + 16, InputEvent::new(EV_LED, 9, 1)); // no such LED
    put_event(&rig, BUFS + 24, InputEvent::new(EV_KEY, 30, 1)); // not a status event
    let good = rig.post(&[(BUFS, 16, false)]);
    let garbage = [
        rig.post(&[(BUFS + 16, 16, false)]),
        rig.post(&[(BUFS, 5, false)]),             // not a whole event
        rig.post(&[(BUFS, 8, true)]),              // device-writable only
        rig.post(&[(LOW_END - 8, 16, false)]),     // into the hole
        rig.post(&[(0xdead_0000_0000, 8, false)]), // nowhere near RAM
        rig.post(&[(BUFS, 8, false), (BUFS, 1 << 20, false)]), // absurdly long
    ];
    assert_eq!(rig.run(&mut handler), Progress::Idle);
    assert_eq!(events.leds(), 1 << LED_CAPSL);
    let used = rig.used();
    assert_eq!(used.len(), 1 + garbage.len());
    assert_eq!(used[0], (u32::from(good), 0));
    for (i, &head) in garbage.iter().enumerate() {
        assert_eq!(used[1 + i], (u32::from(head), 0));
    }
    // Turning caps lock off again.
    put_event(&rig, BUFS + 0x100, InputEvent::new(EV_LED, LED_CAPSL, 0));
    rig.post(&[(BUFS + 0x100, 8, false)]);
    rig.run(&mut handler);
    assert_eq!(events.leds(), 0);
    // A tablet ignores LED events.
    let tablet = fresh(Kind::Tablet, 64);
    let mut handler = StatusQueue::new(Arc::clone(&tablet));
    put_event(&rig, BUFS + 0x100, InputEvent::new(EV_LED, LED_CAPSL, 1));
    rig.post(&[(BUFS + 0x100, 8, false)]);
    rig.run(&mut handler);
    assert_eq!(tablet.leds(), 0);
}

#[test]
fn the_queue_bound_refuses_whole_reports() {
    let events = fresh(Kind::Keyboard, 3);
    events.push(&key(30, true)).unwrap();
    assert!(matches!(
        events.push(&key(30, false)),
        Err(EventsError::Full {
            pending: 2,
            limit: 3,
            ..
        })
    ));
    assert_eq!(events.pending_count(), 2);
    assert_eq!(
        events.push(&[InputEvent::syn(); 4]),
        Err(EventsError::TooLarge(4))
    );
}

#[test]
fn a_new_process_first_closes_a_report_its_predecessor_left_open() {
    let mut rig = Rig::new();
    let events = Arc::new(Events::new(Kind::Keyboard, 64).unwrap());
    let mut handler = EventQueue::new(Arc::clone(&events));
    events.push(&key(30, true)).unwrap();
    for i in 0..3 {
        rig.post(&[(BUFS + 8 * i, 8, true)]);
    }
    rig.run(&mut handler);
    assert_eq!(rig.event_at(BUFS), InputEvent::syn());
    assert_eq!(rig.event_at(BUFS + 8), InputEvent::new(EV_KEY, 30, 1));
    assert_eq!(rig.event_at(BUFS + 16), InputEvent::syn());
}
