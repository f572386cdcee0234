//! The ioeventfds a vfio-user server offers for its doorbell registers (GET_REGION_IO_FDS):
//! KVM signals the server's eventfd on a guest write to the register, so a doorbell reaches
//! the server without leaving `KVM_RUN` and without a message.
//!
//! They follow the BARs: registered at the BAR's address while memory decoding is on, moved
//! when the guest moves the BAR (on the vCPU thread that wrote it), and replaced with the new
//! server's fds after a reconnect (on the backend thread; its filter allows KVM_IOEVENTFD and
//! nothing else of KVM).

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch};
use vmm_sys_util::eventfd::EventFd;

use crate::interrupts::InterruptRouter;

/// One doorbell: a write of `size` bytes at `offset` of BAR `bar` (of `datamatch`, if set).
pub struct IoEvent {
    pub bar: usize,
    pub offset: u64,
    pub size: u64,
    pub datamatch: Option<u64>,
    pub fd: EventFd,
}

#[derive(Default)]
struct State {
    events: Vec<IoEvent>,
    /// (BAR index, address) of every BAR that decodes now.
    bars: Vec<(usize, u64)>,
    /// (event index, address) of what KVM has now.
    registered: Vec<(usize, u64)>,
}

pub struct IoEvents {
    name: &'static str,
    router: Arc<InterruptRouter>,
    state: Mutex<State>,
}

impl IoEvents {
    pub fn new(name: &'static str, router: Arc<InterruptRouter>, events: Vec<IoEvent>) -> Self {
        IoEvents {
            name,
            router,
            state: Mutex::new(State {
                events,
                ..State::default()
            }),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.lock().events.is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The BARs now decode at `bars`: move the registrations there.
    pub fn place(&self, bars: Vec<(usize, u64)>) {
        let mut state = self.lock();
        if state.bars == bars {
            return;
        }
        self.unregister_all(&mut state);
        state.bars = bars;
        self.register_all(&mut state);
    }

    /// A new server's doorbells replace the old server's.
    pub fn replace(&self, events: Vec<IoEvent>) {
        let mut state = self.lock();
        self.unregister_all(&mut state);
        state.events = events;
        self.register_all(&mut state);
    }

    fn unregister_all(&self, state: &mut State) {
        let vm = self.router.vm();
        for (index, addr) in std::mem::take(&mut state.registered) {
            let Some(e) = state.events.get(index) else {
                continue;
            };
            let at = IoEventAddress::Mmio(addr);
            let result = match (e.datamatch, e.size) {
                (None, _) => vm.unregister_ioevent(&e.fd, &at, NoDatamatch),
                (Some(v), 1) => vm.unregister_ioevent(&e.fd, &at, v as u8),
                (Some(v), 2) => vm.unregister_ioevent(&e.fd, &at, v as u16),
                (Some(v), 4) => vm.unregister_ioevent(&e.fd, &at, v as u32),
                (Some(v), _) => vm.unregister_ioevent(&e.fd, &at, v),
            };
            if let Err(err) = result {
                log::warn!("{}: cannot remove ioeventfd at {addr:#x}: {err}", self.name);
            }
        }
    }

    fn register_all(&self, state: &mut State) {
        let vm = self.router.vm();
        let mut registered = Vec::new();
        for (index, e) in state.events.iter().enumerate() {
            let Some(&(_, base)) = state.bars.iter().find(|(bar, _)| *bar == e.bar) else {
                continue;
            };
            let Some(addr) = base.checked_add(e.offset) else {
                continue;
            };
            let at = IoEventAddress::Mmio(addr);
            let result = match (e.datamatch, e.size) {
                (None, _) => vm.register_ioevent(&e.fd, &at, NoDatamatch),
                (Some(v), 1) => vm.register_ioevent(&e.fd, &at, v as u8),
                (Some(v), 2) => vm.register_ioevent(&e.fd, &at, v as u16),
                (Some(v), 4) => vm.register_ioevent(&e.fd, &at, v as u32),
                (Some(v), _) => vm.register_ioevent(&e.fd, &at, v),
            };
            match result {
                Ok(()) => registered.push((index, addr)),
                Err(err) => log::warn!("{}: cannot place ioeventfd at {addr:#x}: {err}", self.name),
            }
        }
        state.registered = registered;
    }
}

impl Drop for IoEvents {
    fn drop(&mut self) {
        let mut state = std::mem::take(&mut *self.lock());
        self.unregister_all(&mut state);
    }
}
