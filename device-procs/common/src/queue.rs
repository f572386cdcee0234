//! What a device sees of one running queue: take requests, give them back.
//!
//! Taking a request marks its head in flight; giving it back publishes the used element and
//! clears the mark, in the order the in-flight tracking spec asks for. Heads resubmitted after
//! a reconnect come out of [`QueueContext::pop`] first, oldest first.

use std::collections::VecDeque;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddress;

use crate::chain::DescriptorChain;
use crate::inflight::{InflightError, InflightQueue};
use crate::memory::Memory;
use crate::worker::RingShared;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("virtqueue access failed")]
    Ring(#[source] virtio_queue::Error),
    #[error("in-flight tracking failed")]
    Inflight(#[source] InflightError),
    #[error("cannot signal the driver")]
    Signal(#[source] std::io::Error),
    #[error("device I/O failed")]
    Device(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<InflightError> for QueueError {
    fn from(e: InflightError) -> Self {
        QueueError::Inflight(e)
    }
}

/// One queue during one processing pass.
pub struct QueueContext<'a> {
    index: u16,
    queue: &'a mut Queue,
    mem: Arc<Memory>,
    inflight: Option<&'a mut InflightQueue>,
    resubmit: &'a mut VecDeque<u16>,
    accept_new: bool,
    completed: u32,
    /// Where [`QueueContext::notify`] signals the driver (none in hand-built contexts).
    ring: Option<&'a RingShared>,
    /// Used elements added since the driver was last considered for a signal.
    unsignalled: u32,
}

impl<'a> QueueContext<'a> {
    /// A context without in-flight tracking, e.g. for device tests on hand-built queues.
    pub fn new(
        index: u16,
        queue: &'a mut Queue,
        mem: Arc<Memory>,
        resubmit: &'a mut VecDeque<u16>,
    ) -> Self {
        QueueContext {
            index,
            queue,
            mem,
            inflight: None,
            resubmit,
            accept_new: true,
            completed: 0,
            ring: None,
            unsignalled: 0,
        }
    }

    pub(crate) fn with_signal(mut self, ring: &'a RingShared) -> Self {
        self.ring = Some(ring);
        self
    }

    /// Signals the driver now, if it asked to hear about the used elements added so far
    /// (with EVENT_IDX: its `used_event` was passed), rather than when the pass ends. A handler
    /// that finishes a batch in steps calls this after the first step, so that a driver
    /// waiting for completions wakes up while the rest of the batch runs. Without EVENT_IDX
    /// every check says "signal", so this only signals when the pass ends.
    pub fn notify(&mut self) -> Result<(), QueueError> {
        let Some(ring) = self.ring else {
            return Ok(());
        };
        if self.unsignalled == 0 || !self.queue.event_idx_enabled() {
            return Ok(());
        }
        self.unsignalled = 0;
        if self
            .queue
            .needs_notification(&*self.mem)
            .map_err(QueueError::Ring)?
        {
            ring.signal_call().map_err(QueueError::Signal)?;
        }
        Ok(())
    }

    pub(crate) fn with_tracking(
        mut self,
        inflight: Option<&'a mut InflightQueue>,
        accept_new: bool,
    ) -> Self {
        self.inflight = inflight;
        self.accept_new = accept_new;
        self
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    /// Guest memory as of the start of this pass; hold a clone to keep it mapped.
    pub fn memory(&self) -> &Arc<Memory> {
        &self.mem
    }

    pub fn queue_size(&self) -> u16 {
        self.queue.size()
    }

    /// Used elements added in this pass.
    pub fn completed(&self) -> u32 {
        self.completed
    }

    /// Used elements added since the last [`QueueContext::notify`] looked.
    pub(crate) fn unsignalled(&self) -> u32 {
        self.unsignalled
    }

    /// The next request: a resubmitted one first, then the available ring. `None` when there
    /// is nothing more, or when the queue is disabled.
    pub fn pop(&mut self) -> Result<Option<DescriptorChain>, QueueError> {
        Ok(self.pop_tracked()?.map(|(chain, _)| chain))
    }

    /// Heads an earlier backend took and did not finish, still to come out of [`Self::pop`],
    /// oldest first. A device that records its own progress on a request outside this
    /// process (e.g. how much of it reached a file) uses this to tell a stale record from
    /// one naming a request that will be resubmitted.
    pub fn pending_resubmits(&self) -> impl Iterator<Item = u16> + '_ {
        self.resubmit.iter().copied()
    }

    /// As [`Self::pop`], also saying whether the chain is a resubmission (taken by an earlier
    /// backend, which may have done part of its work) rather than new from the ring.
    pub fn pop_tracked(&mut self) -> Result<Option<(DescriptorChain, bool)>, QueueError> {
        if !self.accept_new {
            return Ok(None);
        }
        let resubmitted = !self.resubmit.is_empty();
        let head = match self.resubmit.pop_front() {
            Some(head) => head,
            None => {
                let next = self
                    .queue
                    .iter(&*self.mem)
                    .map_err(QueueError::Ring)?
                    .next()
                    .map(|chain| chain.head_index());
                let Some(head) = next else {
                    return Ok(None);
                };
                // A head outside the queue cannot be tracked or returned; the chain walk
                // reports it to the device.
                if let (Some(inflight), true) =
                    (self.inflight.as_deref_mut(), head < self.queue.size())
                {
                    inflight.mark(head)?;
                }
                head
            }
        };
        let chain = DescriptorChain::new(
            Arc::clone(&self.mem),
            GuestAddress(self.queue.desc_table()),
            self.queue.size(),
            head,
        );
        Ok(Some((chain, resubmitted)))
    }

    /// Up to `max` requests into `out` (cleared first), in the order [`Self::pop`] would give
    /// them, the available index read once rather than once per request. For a handler that
    /// takes a batch and completes every chain it was given.
    pub fn pop_many(
        &mut self,
        max: usize,
        out: &mut Vec<DescriptorChain>,
    ) -> Result<(), QueueError> {
        out.clear();
        while out.len() < max && !self.resubmit.is_empty() {
            match self.pop()? {
                Some(chain) => out.push(chain),
                None => return Ok(()),
            }
        }
        if !self.accept_new || out.len() >= max {
            return Ok(());
        }
        let (table, size) = (GuestAddress(self.queue.desc_table()), self.queue.size());
        let mut iter = self.queue.iter(&*self.mem).map_err(QueueError::Ring)?;
        while out.len() < max {
            let Some(head) = iter.next().map(|chain| chain.head_index()) else {
                break;
            };
            // As in `pop_tracked`: a head outside the queue is reported by the chain walk.
            if let (Some(inflight), true) = (self.inflight.as_deref_mut(), head < size) {
                inflight.mark(head)?;
            }
            out.push(DescriptorChain::new(
                Arc::clone(&self.mem),
                table,
                size,
                head,
            ));
        }
        Ok(())
    }

    /// Returns `head` to the driver with `len` bytes written. A head outside the queue cannot
    /// be returned; it is dropped.
    pub fn complete(&mut self, head: u16, len: u32) -> Result<(), QueueError> {
        if head >= self.queue.size() {
            return Ok(());
        }
        if let Some(inflight) = self.inflight.as_deref_mut() {
            inflight.begin_used(head)?;
        }
        self.queue
            .add_used(&*self.mem, head, len)
            .map_err(QueueError::Ring)?;
        if let Some(inflight) = self.inflight.as_deref_mut() {
            inflight.end_used(head, self.queue.next_used())?;
        }
        self.completed += 1;
        self.unsignalled += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inflight::InflightRegion;
    use crate::testing::SplitQueue;
    use vm_memory::GuestMemoryBackend;

    /// Guest memory, a driver that made `requests` one-buffer requests available on an 8-entry
    /// queue, the device's view of that queue, and an in-flight region for it.
    fn ring_with(
        requests: usize,
    ) -> (
        Arc<Memory>,
        SplitQueue,
        Queue,
        Arc<InflightRegion>,
        std::fs::File,
    ) {
        let mem = Arc::new(Memory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
        let mut driver = SplitQueue::new(0, 8, GuestAddress(0));
        for _ in 0..requests {
            let head = driver.add(&mem, &[(GuestAddress(0x8000), 1, true)]);
            driver.publish(&mem, head);
        }
        let mut queue = Queue::new(8).unwrap();
        queue.try_set_desc_table_address(driver.desc).unwrap();
        queue.try_set_avail_ring_address(driver.avail).unwrap();
        queue.try_set_used_ring_address(driver.used).unwrap();
        queue.set_ready(true);
        let (region, file, _) = InflightRegion::create(1, 8).unwrap();
        (mem, driver, queue, region, file)
    }

    #[test]
    fn pop_marks_and_complete_clears() {
        let (mem, driver, mut queue, region, _file) = ring_with(3);
        let mut inflight = region.queue(0).unwrap();
        inflight.recover(8, 0).unwrap();
        let mut resubmit = VecDeque::from([6u16]);
        let mut ctx = QueueContext::new(0, &mut queue, Arc::clone(&mem), &mut resubmit)
            .with_tracking(Some(&mut inflight), true);
        assert_eq!(ctx.pending_resubmits().collect::<Vec<_>>(), vec![6]);
        let heads: Vec<(u16, bool)> = std::iter::from_fn(|| {
            ctx.pop_tracked()
                .unwrap()
                .map(|(c, resubmitted)| (c.head(), resubmitted))
        })
        .collect();
        assert_eq!(heads, vec![(6, true), (0, false), (1, false), (2, false)]);
        assert_eq!(ctx.pending_resubmits().count(), 0);
        ctx.complete(1, 0).unwrap();
        ctx.complete(200, 0).unwrap();
        assert_eq!(ctx.completed(), 1);
        drop(ctx);
        // 6 was resubmitted (marked by an earlier backend, not by this pop).
        assert_eq!(inflight.inflight_heads().unwrap(), vec![0, 2]);
        assert_eq!(driver.used_idx(&mem), 1);
        assert_eq!(driver.used_elem(&mem, 0), (1, 0));
        assert_eq!(
            queue
                .used_idx(&*mem, std::sync::atomic::Ordering::Acquire)
                .unwrap()
                .0,
            1
        );
        let disabled = QueueContext::new(0, &mut queue, Arc::clone(&mem), &mut resubmit)
            .with_tracking(None, false)
            .pop()
            .unwrap();
        assert!(disabled.is_none());
        assert!(mem.num_regions() == 1);
    }

    #[test]
    fn pop_many_takes_resubmitted_then_new_up_to_max_and_marks_them() {
        let (mem, mut driver, mut queue, region, _file) = ring_with(4);
        let mut inflight = region.queue(0).unwrap();
        inflight.recover(8, 0).unwrap();
        let mut resubmit = VecDeque::from([6u16]);
        let mut ctx = QueueContext::new(0, &mut queue, Arc::clone(&mem), &mut resubmit)
            .with_tracking(Some(&mut inflight), true);
        let mut chains = Vec::new();
        let heads = |chains: &Vec<DescriptorChain>| -> Vec<u16> {
            chains.iter().map(|c| c.head()).collect()
        };
        ctx.pop_many(3, &mut chains).unwrap();
        assert_eq!(heads(&chains), vec![6, 0, 1]);
        ctx.pop_many(8, &mut chains).unwrap();
        assert_eq!(
            heads(&chains),
            vec![2, 3],
            "cleared first, stops at the avail index"
        );
        ctx.pop_many(8, &mut chains).unwrap();
        assert!(chains.is_empty());
        drop(ctx);
        assert_eq!(inflight.inflight_heads().unwrap(), vec![0, 1, 2, 3]);
        let head = driver.add(&mem, &[(GuestAddress(0x8000), 1, false)]);
        driver.publish(&mem, head);
        let mut none = Vec::new();
        QueueContext::new(0, &mut queue, Arc::clone(&mem), &mut resubmit)
            .with_tracking(None, false)
            .pop_many(8, &mut none)
            .unwrap();
        assert!(none.is_empty(), "a disabled queue gives nothing");
    }

    #[test]
    fn notify_signals_mid_pass_only_when_the_driver_asked() {
        use std::os::fd::AsFd;
        let mem = Arc::new(Memory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
        let mut driver = SplitQueue::new(0, 8, GuestAddress(0));
        for _ in 0..3 {
            let head = driver.add(&mem, &[(GuestAddress(0x8000), 1, true)]);
            driver.publish(&mem, head);
        }
        // The driver wants a call once the first used element is there.
        driver.set_used_event(&mem, 0);
        let mut queue = Queue::new(8).unwrap();
        queue.try_set_desc_table_address(driver.desc).unwrap();
        queue.try_set_avail_ring_address(driver.avail).unwrap();
        queue.try_set_used_ring_address(driver.used).unwrap();
        queue.set_event_idx(true);
        queue.set_ready(true);
        let ring = RingShared::new().unwrap();
        let call = nix::sys::eventfd::EventFd::from_value_and_flags(
            0,
            nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
        )
        .unwrap();
        let dup = call.as_fd().try_clone_to_owned().unwrap();
        ring.set_call(Some(std::fs::File::from(dup)));
        let signals = || call.read().unwrap_or(0);
        let mut resubmit = VecDeque::new();
        let mut ctx =
            QueueContext::new(0, &mut queue, Arc::clone(&mem), &mut resubmit).with_signal(&ring);
        ctx.notify().unwrap();
        assert_eq!(signals(), 0, "nothing used yet");
        let heads: Vec<u16> = std::iter::from_fn(|| ctx.pop().unwrap().map(|c| c.head())).collect();
        ctx.complete(heads[0], 1).unwrap();
        ctx.notify().unwrap();
        assert_eq!(signals(), 1, "used_event 0 passed: signalled at once");
        ctx.complete(heads[1], 1).unwrap();
        ctx.notify().unwrap();
        assert_eq!(signals(), 0, "the driver has not asked again");
        assert_eq!(ctx.unsignalled(), 0);
        ctx.complete(heads[2], 1).unwrap();
        assert_eq!(ctx.unsignalled(), 1, "left for the end of the pass");
    }
}
