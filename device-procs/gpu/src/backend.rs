//! Glue between virtio-gpu and the shared vhost-user server: features, configuration space,
//! the control and cursor queues, the display channel, and saving/restoring the state a
//! restarted process needs.

use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, Weak};

use isola_device_common::chain::{self, Segment};
use isola_device_common::logging::{chain as error_chain, RateLimiter};
use isola_device_common::thread;
use isola_device_common::{
    DescriptorChain, DeviceError, Memory, Progress, QueueContext, QueueError, QueueHandler,
    VirtioDevice,
};
use vhost::vhost_user::GpuBackend;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::device::{Gpu, MAX_REQUEST, NUM_SCANOUTS};
use crate::display::Display;
use crate::protocol::HDR_LEN;
use crate::state::{Snapshot, StateFile};

/// VIRTIO_GPU_F_EDID.
const F_EDID: u32 = 1;
/// `struct virtio_gpu_config`: events_read, events_clear, num_scanouts, num_capsets.
pub const CONFIG_LEN: usize = 16;
const CONTROL_QUEUE: u16 = 0;
const CURSOR_QUEUE: u16 = 1;

/// What both queues and the vhost-user handler share.
pub struct Shared {
    gpu: Mutex<Gpu>,
    display: Display,
    state_file: Option<Mutex<StateFile>>,
    /// A snapshot left by a previous process, restored once guest memory is known.
    pending: Mutex<Option<Snapshot>>,
    /// (st_dev, st_ino) of the guest memory the current state refers to.
    memory_id: Mutex<Option<(u64, u64)>>,
    /// The guest memory map last seen by the control queue, to notice a new one (a weak
    /// reference: it must not keep guest RAM mapped).
    last_memory: Mutex<Weak<Memory>>,
    log: Mutex<RateLimiter>,
}

impl Shared {
    fn warn(&self, what: std::fmt::Arguments<'_>) {
        if let Some(dropped) = self.log.lock().expect("log lock").allow() {
            log::warn!("{what} ({dropped} similar lines dropped)");
        }
    }

    fn save(&self, gpu: &Gpu) {
        let Some(file) = &self.state_file else {
            return;
        };
        let id = *self.memory_id.lock().expect("memory id lock");
        let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.save(&gpu.snapshot(id)) {
            self.warn(format_args!("{}", error_chain(&e)));
        }
    }

    /// Called at the start of every control-queue pass with the current guest memory: a
    /// different guest (a new guest-RAM file) drops the old state; a pending snapshot of
    /// this guest's memory is restored and the display is sent the restored picture.
    /// Lock order everywhere: gpu, then pending / memory id.
    fn sync_memory(&self, mem: &Arc<Memory>) {
        {
            let mut last = self.last_memory.lock().expect("memory lock");
            if Weak::ptr_eq(&last, &Arc::downgrade(mem)) {
                return;
            }
            *last = Arc::downgrade(mem);
        }
        let current = memory_id(mem);
        let mut gpu = self.gpu.lock().expect("gpu lock");
        let old = *self.memory_id.lock().expect("memory id lock");
        if old.is_some() && old != current {
            log::info!("new guest memory: dropping the old guest's resources");
            gpu.reset();
        }
        *self.memory_id.lock().expect("memory id lock") = current;
        if let Some(snap) = self.pending.lock().expect("pending lock").take() {
            if snap.memory_id.is_some() && snap.memory_id == current {
                let n = gpu.restore(mem, &snap);
                log::info!("restored {n} resource(s) left by the previous process");
                self.display.send(&gpu.current_picture());
            } else {
                log::info!("saved state belongs to another guest; starting empty");
            }
        }
        gpu.take_dirty();
        self.save(&gpu);
    }
}

/// Identity of the guest-RAM file (the core's memfd) behind the first memory region.
fn memory_id(mem: &Memory) -> Option<(u64, u64)> {
    let region = mem.iter().next()?;
    let meta = region.file_offset()?.file().metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// The virtio-gpu device served by this process.
pub struct GpuDevice {
    shared: Arc<Shared>,
    queue_size: u16,
}

impl GpuDevice {
    /// A device with a `width` x `height` scanout, `budget` bytes for resources, and
    /// `snapshot` (from `state_file`) to restore once the frontend is back.
    pub fn new(
        width: u32,
        height: u32,
        budget: u64,
        queue_size: u16,
        state_file: Option<StateFile>,
        snapshot: Option<Snapshot>,
    ) -> GpuDevice {
        GpuDevice {
            shared: Arc::new(Shared {
                gpu: Mutex::new(Gpu::new(width, height, budget)),
                display: Display::default(),
                state_file: state_file.map(Mutex::new),
                pending: Mutex::new(snapshot),
                memory_id: Mutex::new(None),
                last_memory: Mutex::new(Weak::new()),
                log: Mutex::new(RateLimiter::new(10)),
            }),
            queue_size,
        }
    }

    pub fn display_connected(&self) -> bool {
        self.shared.display.connected()
    }
}

impl VirtioDevice for GpuDevice {
    fn name(&self) -> &str {
        "gpu"
    }

    fn num_queues(&self) -> u16 {
        2
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn features(&self) -> u64 {
        [
            F_EDID,
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
        ]
        .iter()
        .fold(0, |f, &b| f | (1u64 << b))
    }

    fn config(&self) -> Vec<u8> {
        let mut c = vec![0u8; CONFIG_LEN];
        c[8..12].copy_from_slice(&NUM_SCANOUTS.to_le_bytes());
        c
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        // events_clear is the one writable field; no events are ever raised, so there is
        // nothing to clear.
        if offset == 4 && data.len() <= 4 {
            return Ok(());
        }
        Err(DeviceError::ReadOnlyConfig {
            offset,
            len: data.len(),
        })
    }

    fn queue_handler(
        &self,
        index: u16,
        _features: u64,
    ) -> Result<Box<dyn QueueHandler>, DeviceError> {
        let shared = Arc::clone(&self.shared);
        match index {
            CONTROL_QUEUE => Ok(Box::new(ControlQueue { shared })),
            CURSOR_QUEUE => Ok(Box::new(CursorQueue { shared })),
            _ => Err(DeviceError::Unsupported("a third queue")),
        }
    }

    fn reset(&self) {
        let mut gpu = self.shared.gpu.lock().expect("gpu lock");
        gpu.reset();
        gpu.take_dirty();
        self.shared.pending.lock().expect("pending lock").take();
        self.shared.save(&gpu);
        drop(gpu);
        self.shared
            .display
            .send(&[crate::device::DisplayOp::Scanout {
                scanout: 0,
                width: 0,
                height: 0,
            }]);
    }

    fn set_gpu_socket(&self, backend: GpuBackend) -> Result<(), DeviceError> {
        // The handshake waits for the display's answers: do it on a thread of its own, so
        // that the frontend's SET_SOCKET is acknowledged at once and a display that hangs
        // can hold up neither the frontend nor the guest (updates are dropped until the
        // display is attached; it then gets the whole current picture).
        let generation = self.shared.display.detach();
        let shared = Arc::clone(&self.shared);
        let spawned = thread::spawn_named("gpu-display", move || {
            match shared.display.attach(backend, generation) {
                Ok(true) => {
                    let gpu = shared.gpu.lock().expect("gpu lock");
                    shared.display.send(&gpu.current_picture());
                }
                Ok(false) => log::info!("a newer display connection replaced this one"),
                Err(e) => log::warn!("display handshake failed ({e}); no display"),
            }
        });
        if let Err(e) = spawned {
            // Not the frontend's fault: serve the guest without a display.
            log::warn!("cannot start the display thread ({e}); no display");
        }
        Ok(())
    }
}

/// The readable (request) and writable (response) buffers of a chain, or why not.
fn split_chain(chain: &DescriptorChain) -> Result<(Vec<Segment>, Vec<Segment>), String> {
    let segs = chain.segments().map_err(|e| error_chain(&e))?;
    let readable = segs.iter().take_while(|s| !s.writable).count();
    let (r, w) = segs.split_at(readable);
    Ok((r.to_vec(), w.to_vec()))
}

/// Reads the request bytes (at most `max`) of a chain's readable buffers.
fn read_request(mem: &Memory, readable: &[Segment], max: usize) -> Result<Vec<u8>, String> {
    let len = (chain::total_len(readable) as usize).min(max);
    let (take, _) = chain::split_at(readable, len as u64).map_err(|e| error_chain(&e))?;
    let mut buf = vec![0u8; len];
    chain::read_bytes(mem, &take, &mut buf).map_err(|e| error_chain(&e))?;
    Ok(buf)
}

struct ControlQueue {
    shared: Arc<Shared>,
}

impl ControlQueue {
    /// Serves one request; returns the bytes written to the driver.
    fn serve(&self, chain: &DescriptorChain) -> u32 {
        let shared = &self.shared;
        let mem = chain.memory();
        let (readable, writable) = match split_chain(chain) {
            Ok(parts) => parts,
            Err(e) => {
                shared.warn(format_args!("control request {}: {e}", chain.head()));
                return 0;
            }
        };
        let req = match read_request(mem, &readable, MAX_REQUEST) {
            Ok(req) => req,
            Err(e) => {
                shared.warn(format_args!("control request {}: {e}", chain.head()));
                // Still answered: a response of ERR_UNSPEC if there is room for one.
                Vec::new()
            }
        };
        let mut gpu = shared.gpu.lock().expect("gpu lock");
        let (resp, ops) = gpu.control(mem, &req);
        if gpu.take_dirty() {
            shared.save(&gpu);
        }
        drop(gpu);
        shared.display.send(&ops);
        if chain::total_len(&writable) < resp.len() as u64 {
            shared.warn(format_args!(
                "control request {}: no room for the {}-byte response",
                chain.head(),
                resp.len()
            ));
            return 0;
        }
        match chain::write_bytes(mem, &writable, &resp) {
            Ok(()) => resp.len() as u32,
            Err(e) => {
                shared.warn(format_args!(
                    "control request {}: response: {}",
                    chain.head(),
                    error_chain(&e)
                ));
                0
            }
        }
    }
}

impl QueueHandler for ControlQueue {
    fn process(&mut self, q: &mut QueueContext<'_>) -> Result<Progress, QueueError> {
        self.shared.sync_memory(q.memory());
        while let Some(chain) = q.pop()? {
            let written = self.serve(&chain);
            q.complete(chain.head(), written)?;
        }
        Ok(Progress::Idle)
    }
}

struct CursorQueue {
    shared: Arc<Shared>,
}

impl CursorQueue {
    fn serve(&self, chain: &DescriptorChain) {
        let shared = &self.shared;
        let req = split_chain(chain)
            .and_then(|(readable, _)| read_request(chain.memory(), &readable, HDR_LEN + 64));
        let req = match req {
            Ok(req) => req,
            Err(e) => {
                shared.warn(format_args!("cursor request {}: {e}", chain.head()));
                return;
            }
        };
        let mut gpu = shared.gpu.lock().expect("gpu lock");
        let result = gpu.cursor(&req);
        if gpu.take_dirty() {
            shared.save(&gpu);
        }
        drop(gpu);
        match result {
            Ok(ops) => shared.display.send(&ops),
            Err(e) => shared.warn(format_args!("cursor request {}: {e}", chain.head())),
        }
    }
}

impl QueueHandler for CursorQueue {
    fn process(&mut self, q: &mut QueueContext<'_>) -> Result<Progress, QueueError> {
        while let Some(chain) = q.pop()? {
            self.serve(&chain);
            // The cursor queue has no responses.
            q.complete(chain.head(), 0)?;
        }
        Ok(Progress::Idle)
    }
}
