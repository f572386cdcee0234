//! The vhost-user request handler: the protocol state of one frontend connection.
//!
//! `vhost`'s `BackendReqHandler` parses and validates each message and calls in here. Every
//! error returned ends the connection (the server logs it on one line); errors carry their
//! whole cause chain in their message for that line.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Error as VhostError, GpuBackend, Result as VhostResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use crate::device::{DeviceError, VirtioDevice};
use crate::inflight::{InflightError, InflightRegion, MAX_QUEUE_SIZE};
use crate::logging::{chain, RateLimiter};
use crate::memory::{Memory, MemoryError, MemoryTable, RegionInfo, MAX_MEM_SLOTS};
use crate::worker::{self, RingShared, Worker, WorkerError, WorkerHandle};

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("queue index {0} is out of range")]
    BadIndex(u32),
    #[error("queue {0} is running")]
    Running(u16),
    #[error("queue size {0} is not a power of two no larger than {1}")]
    BadSize(u32, u16),
    #[error("vring base {0} does not fit a split ring")]
    BadBase(u32),
    #[error("vring flags {0:#x}: dirty logging is not supported")]
    Logging(u32),
    #[error("queue {index}: {what} at frontend address {addr:#x} is not in guest memory")]
    Unmapped {
        index: u16,
        what: &'static str,
        addr: u64,
    },
    #[error("queue {0}: rings without a kick eventfd (polling) are not supported")]
    NoKick(u8),
    #[error("the fd passed for {0} is not an eventfd")]
    NotEventfd(&'static str),
    #[error("features {0:#x} were not offered")]
    FeaturesNotOffered(u64),
    #[error("protocol features {0:#x} were not offered")]
    ProtocolNotOffered(u64),
    #[error("protocol features {new:#x} after {old:#x} were acknowledged")]
    ProtocolRenegotiated { old: u64, new: u64 },
    #[error("features {0:#x} without PROTOCOL_FEATURES after protocol features were negotiated")]
    ProtocolFeaturesDropped(u64),
    #[error("SET_OWNER on a connection that already has an owner")]
    AlreadyOwned,
    #[error("{0} before SET_OWNER")]
    NotOwned(&'static str),
    #[error("memory table")]
    Memory(#[source] MemoryError),
    #[error("in-flight region")]
    Inflight(#[source] InflightError),
    #[error("in-flight region for {asked} queues, the device has {have}")]
    InflightQueues { asked: u16, have: u16 },
    #[error("queue {index}: ring setup")]
    Ring {
        index: u16,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("cannot stop a queue worker")]
    Worker(#[source] WorkerError),
    #[error("device")]
    Device(#[source] DeviceError),
    #[error("cannot set up a queue worker")]
    Io(#[source] std::io::Error),
    #[error("{0} is not supported")]
    Unsupported(&'static str),
}

fn fail(e: HandlerError) -> VhostError {
    VhostError::ReqHandlerError(std::io::Error::other(chain(&e)))
}

/// Protocol features this backend offers.
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

#[derive(Debug, Clone, Copy)]
struct RingAddrs {
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
}

struct Ring {
    size: u16,
    addrs: Option<RingAddrs>,
    base: u16,
    kick: Option<File>,
    shared: Arc<RingShared>,
    worker: Option<WorkerHandle>,
}

impl Ring {
    fn new(size: u16) -> std::io::Result<Self> {
        Ok(Ring {
            size,
            addrs: None,
            base: 0,
            kick: None,
            shared: Arc::new(RingShared::new()?),
            worker: None,
        })
    }
}

/// Protocol state of one connection, for device `D`.
pub(crate) struct DeviceHandler<D: VirtioDevice> {
    device: Arc<D>,
    connection: UnixStream,
    owned: bool,
    acked_features: u64,
    acked_protocol: VhostUserProtocolFeatures,
    /// Whether SET_PROTOCOL_FEATURES was accepted on this connection.
    protocol_set: bool,
    memory: MemoryTable,
    rings: Vec<Ring>,
    inflight: Option<Arc<InflightRegion>>,
    config_log: RateLimiter,
}

/// The (device, inode) of a descriptor, from fstat (no path is looked up, so this works
/// inside the sandbox's empty root).
fn inode_of(fd: std::os::fd::RawFd) -> Option<(u64, u64)> {
    // SAFETY: `libc::stat` is plain integers, so all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one `stat` into `st`; on a bad fd it fails with EBADF.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    Some((st.st_dev, st.st_ino))
}

/// Eventfds live on the kernel's one shared anonymous inode (as epoll, timerfd and signalfd
/// files do): a descriptor on any other inode (a pipe, a socket, a regular file or memfd, a
/// device) is refused. An anonymous file of another kind passes, and then fails its first
/// eventfd read or write, which ends the connection. This replaces a readlink of
/// /proc/self/fd, which a sandboxed device process has neither the /proc nor the syscall for.
pub fn is_eventfd(file: &File) -> bool {
    static ANON_INODE: std::sync::OnceLock<Option<(u64, u64)>> = std::sync::OnceLock::new();
    let anon = ANON_INODE.get_or_init(|| {
        let reference = vmm_sys_util::eventfd::EventFd::new(libc::EFD_CLOEXEC).ok()?;
        inode_of(reference.as_raw_fd())
    });
    anon.is_some() && inode_of(file.as_raw_fd()) == *anon
}

fn checked_eventfd(file: Option<File>, what: &'static str) -> VhostResult<Option<File>> {
    match file {
        Some(f) if !is_eventfd(&f) => Err(fail(HandlerError::NotEventfd(what))),
        other => Ok(other),
    }
}

impl<D: VirtioDevice> DeviceHandler<D> {
    /// `connection` is a clone of the connection's socket: a failing worker shuts it down.
    pub(crate) fn new(device: Arc<D>, connection: UnixStream) -> std::io::Result<Self> {
        let rings = (0..device.num_queues())
            .map(|_| Ring::new(device.max_queue_size()))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(DeviceHandler {
            device,
            connection,
            owned: false,
            acked_features: 0,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            protocol_set: false,
            memory: MemoryTable::default(),
            rings,
            inflight: None,
            config_log: RateLimiter::new(5),
        })
    }

    /// Whether the frontend has sent SET_OWNER (the end of its handshake, for the server's
    /// deadline).
    pub(crate) fn owned(&self) -> bool {
        self.owned
    }

    /// Requests that set up or use the device need an owner first (SET_OWNER): a connection
    /// that skipped it is refused. Only the negotiation queries frontends make before it
    /// (QEMU's vhost_user_backend_init: features, protocol features, queue count, memory
    /// slots) are answered without one.
    fn owner(&self, what: &'static str) -> VhostResult<()> {
        if self.owned {
            Ok(())
        } else {
            Err(fail(HandlerError::NotOwned(what)))
        }
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn ring_index(&self, index: u32) -> Result<u16, HandlerError> {
        u16::try_from(index)
            .ok()
            .filter(|&i| usize::from(i) < self.rings.len())
            .ok_or(HandlerError::BadIndex(index))
    }

    fn stopped_ring(&mut self, index: u32) -> Result<&mut Ring, HandlerError> {
        let i = self.ring_index(index)?;
        let ring = &mut self.rings[usize::from(i)];
        if ring.worker.is_some() {
            return Err(HandlerError::Running(i));
        }
        Ok(ring)
    }

    fn stop_ring(&mut self, index: u16) -> Result<(), HandlerError> {
        let ring = &mut self.rings[usize::from(index)];
        if let Some(handle) = ring.worker.take() {
            let exit = worker::stop(&ring.shared, handle, index).map_err(HandlerError::Worker)?;
            ring.base = exit.queue.next_avail();
        }
        Ok(())
    }

    /// Stops every queue worker and closes the connection. Worker failures were logged
    /// when they happened.
    pub(crate) fn shutdown(&mut self) {
        for index in 0..self.rings.len() as u16 {
            let _ = self.stop_ring(index);
        }
        let _ = self.connection.shutdown(std::net::Shutdown::Both);
    }

    fn reset(&mut self) -> Result<(), HandlerError> {
        for index in 0..self.rings.len() as u16 {
            self.stop_ring(index)?;
        }
        let size = self.device.max_queue_size();
        for ring in &mut self.rings {
            *ring = Ring::new(size).map_err(HandlerError::Io)?;
        }
        self.acked_features = 0;
        self.inflight = None;
        Ok(())
    }

    fn build_queue(&self, index: u16, mem: &Memory) -> Result<Queue, HandlerError> {
        let ring = &self.rings[usize::from(index)];
        let addrs = ring.addrs.ok_or(HandlerError::Unmapped {
            index,
            what: "ring",
            addr: 0,
        })?;
        let err = |source| HandlerError::Ring { index, source };
        let mut queue = Queue::new(self.device.max_queue_size()).map_err(err)?;
        queue.try_set_size(ring.size).map_err(err)?;
        queue.try_set_desc_table_address(addrs.desc).map_err(err)?;
        queue.try_set_avail_ring_address(addrs.avail).map_err(err)?;
        queue.try_set_used_ring_address(addrs.used).map_err(err)?;
        queue.set_event_idx(self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        queue.set_ready(true);
        let size = u64::from(ring.size);
        for (what, addr, len) in [
            ("descriptor table", addrs.desc, 16 * size),
            ("available ring", addrs.avail, 6 + 2 * size),
            ("used ring", addrs.used, 6 + 8 * size),
        ] {
            if !mem.check_range(addr, len as usize) {
                return Err(HandlerError::Unmapped {
                    index,
                    what,
                    addr: addr.0,
                });
            }
        }
        Ok(queue)
    }

    /// Starts queue `index` once it has both its addresses and its kick eventfd.
    fn try_start(&mut self, index: u16) -> Result<(), HandlerError> {
        let i = usize::from(index);
        if self.rings[i].kick.is_none() || self.rings[i].addrs.is_none() {
            return Ok(());
        }
        let mem = self.memory.atomic().memory().into_inner();
        let mut queue = self.build_queue(index, &mem)?;
        let used_idx = queue
            .used_idx(&*mem, Ordering::Acquire)
            .map_err(|source| HandlerError::Ring { index, source })?
            .0;
        let tracking = self
            .acked_protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        let mut inflight = self
            .inflight
            .as_ref()
            .filter(|_| tracking)
            .and_then(|region| region.queue(index));
        let resubmit = match inflight.as_mut() {
            Some(q) => q
                .recover(queue.size(), used_idx)
                .map_err(HandlerError::Inflight)?,
            None => Vec::new(),
        };
        // Every head taken from the ring was either used or is still in flight, so with
        // tracking the next one to take is used_idx + in-flight count, whatever base says.
        let next_avail = match inflight {
            Some(_) => used_idx.wrapping_add(resubmit.len() as u16),
            None => self.rings[i].base,
        };
        if !resubmit.is_empty() {
            log::info!(
                "queue {index}: resubmitting {} requests left in flight",
                resubmit.len()
            );
        }
        queue.set_next_avail(next_avail);
        queue.set_next_used(used_idx);
        let features = self.acked_features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let handler = self
            .device
            .queue_handler(index, features)
            .map_err(HandlerError::Device)?;
        let connection = self.connection.try_clone().map_err(HandlerError::Io)?;
        let gated = self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        let ring = &mut self.rings[i];
        let Some(kick) = ring.kick.take() else {
            return Ok(());
        };
        let worker = Worker {
            index,
            queue,
            memory: self.memory.atomic(),
            kick,
            shared: Arc::clone(&ring.shared),
            inflight,
            resubmit: resubmit.into(),
            handler,
            gated,
            connection,
            served: false,
        };
        let name = format!("{}-q{index}", self.device.name());
        ring.worker = Some(worker.spawn(&name).map_err(HandlerError::Io)?);
        Ok(())
    }

    fn translate(
        &self,
        index: u16,
        what: &'static str,
        addr: u64,
        len: u64,
    ) -> Result<GuestAddress, HandlerError> {
        self.memory
            .frontend_to_guest(addr, len)
            .ok_or(HandlerError::Unmapped { index, what, addr })
    }
}

impl<D: VirtioDevice> Drop for DeviceHandler<D> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn region_info(r: &VhostUserMemoryRegion) -> RegionInfo {
    RegionInfo {
        guest_phys_addr: r.guest_phys_addr,
        size: r.memory_size,
        user_addr: r.user_addr,
        mmap_offset: r.mmap_offset,
    }
}

impl<D: VirtioDevice> VhostUserBackendReqHandlerMut for DeviceHandler<D> {
    fn set_owner(&mut self) -> VhostResult<()> {
        if self.owned {
            return Err(fail(HandlerError::AlreadyOwned));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        self.reset().map_err(fail)?;
        self.device.reset();
        self.owned = false;
        self.protocol_set = false;
        Ok(())
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        self.owner("RESET_DEVICE")?;
        self.reset().map_err(fail)?;
        self.device.reset();
        Ok(())
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        Ok(self.offered_features())
    }

    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        self.owner("SET_FEATURES")?;
        let extra = features & !self.offered_features();
        if extra != 0 {
            return Err(fail(HandlerError::FeaturesNotOffered(extra)));
        }
        // Dropping the bit would silently turn REPLY_ACK off: a frontend waiting for acks
        // would wait for ever. (QEMU keeps it set once protocol features are negotiated.)
        if self.protocol_set && features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(fail(HandlerError::ProtocolFeaturesDropped(features)));
        }
        self.acked_features = features;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        self.owner("SET_MEM_TABLE")?;
        let infos: Vec<RegionInfo> = ctx.iter().map(region_info).collect();
        self.memory
            .set_table(&infos, files)
            .map_err(|e| fail(HandlerError::Memory(e)))?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        self.owner("SET_VRING_NUM")?;
        let max = self.device.max_queue_size();
        let ring = self.stopped_ring(index).map_err(fail)?;
        match u16::try_from(num) {
            Ok(size) if size.is_power_of_two() && size <= max => {
                ring.size = size;
                Ok(())
            }
            _ => Err(fail(HandlerError::BadSize(num, max))),
        }
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostResult<()> {
        self.owner("SET_VRING_ADDR")?;
        if !flags.is_empty() {
            return Err(fail(HandlerError::Logging(flags.bits())));
        }
        let i = self.ring_index(index).map_err(fail)?;
        let size = u64::from(self.stopped_ring(index).map_err(fail)?.size);
        let addrs = RingAddrs {
            desc: self
                .translate(i, "descriptor table", descriptor, 16 * size)
                .map_err(fail)?,
            avail: self
                .translate(i, "available ring", available, 6 + 2 * size)
                .map_err(fail)?,
            used: self
                .translate(i, "used ring", used, 6 + 8 * size)
                .map_err(fail)?,
        };
        self.rings[usize::from(i)].addrs = Some(addrs);
        self.try_start(i).map_err(fail)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        self.owner("SET_VRING_BASE")?;
        let ring = self.stopped_ring(index).map_err(fail)?;
        ring.base = u16::try_from(base).map_err(|_| fail(HandlerError::BadBase(base)))?;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        self.owner("GET_VRING_BASE")?;
        let i = self.ring_index(index).map_err(fail)?;
        self.stop_ring(i).map_err(fail)?;
        let ring = &mut self.rings[usize::from(i)];
        ring.kick = None;
        ring.shared.set_call(None);
        ring.shared.set_err(None);
        Ok(VhostUserVringState::new(index, u32::from(ring.base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        self.owner("SET_VRING_KICK")?;
        let i = self.ring_index(u32::from(index)).map_err(fail)?;
        let fd = checked_eventfd(fd, "SET_VRING_KICK")?
            .ok_or_else(|| fail(HandlerError::NoKick(index)))?;
        // A new kick fd for a running ring: stop it, then start it again with the new one.
        self.stop_ring(i).map_err(fail)?;
        self.rings[usize::from(i)].kick = Some(fd);
        self.try_start(i).map_err(fail)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        self.owner("SET_VRING_CALL")?;
        let i = self.ring_index(u32::from(index)).map_err(fail)?;
        let fd = checked_eventfd(fd, "SET_VRING_CALL")?;
        self.rings[usize::from(i)].shared.set_call(fd);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        self.owner("SET_VRING_ERR")?;
        let i = self.ring_index(u32::from(index)).map_err(fail)?;
        let fd = checked_eventfd(fd, "SET_VRING_ERR")?;
        self.rings[usize::from(i)].shared.set_err(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        Ok(offered_protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostResult<()> {
        let offered = offered_protocol_features().bits();
        if features & !offered != 0 {
            return Err(fail(HandlerError::ProtocolNotOffered(features & !offered)));
        }
        // Once per connection: a change later (REPLY_ACK dropped under a frontend that waits
        // for acks, rings running under other rules) is refused.
        let old = self.acked_protocol.bits();
        if self.protocol_set && features != old {
            return Err(fail(HandlerError::ProtocolRenegotiated {
                old,
                new: features,
            }));
        }
        self.protocol_set = true;
        self.acked_protocol = VhostUserProtocolFeatures::from_bits_truncate(features);
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(u64::from(self.device.num_queues()))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        self.owner("SET_VRING_ENABLE")?;
        let i = self.ring_index(index).map_err(fail)?;
        self.rings[usize::from(i)].shared.set_enabled(enable);
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<Vec<u8>> {
        self.owner("GET_CONFIG")?;
        // The message layer bounds offset + size by the protocol's 4 KiB; bytes past the
        // device's configuration read as zero.
        let config = self.device.config();
        let mut out = vec![0u8; size as usize];
        let start = offset as usize;
        if start < config.len() {
            let n = (config.len() - start).min(out.len());
            out[..n].copy_from_slice(&config[start..start + n]);
        }
        Ok(out)
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<()> {
        self.owner("SET_CONFIG")?;
        if let Err(e) = self.device.write_config(offset, buf) {
            if let Some(dropped) = self.config_log.allow() {
                log::warn!(
                    "ignoring configuration write: {} ({dropped} similar lines dropped)",
                    chain(&e)
                );
            }
        }
        Ok(())
    }

    fn set_gpu_socket(&mut self, gpu_backend: GpuBackend) -> VhostResult<()> {
        self.owner("GPU_SET_SOCKET")?;
        self.device
            .set_gpu_socket(gpu_backend)
            .map_err(|e| fail(HandlerError::Device(e)))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        Err(fail(HandlerError::Unsupported("GET_SHARED_OBJECT")))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VhostResult<(VhostUserInflight, File)> {
        self.owner("GET_INFLIGHT_FD")?;
        let have = self.device.num_queues();
        if inflight.num_queues > have {
            return Err(fail(HandlerError::InflightQueues {
                asked: inflight.num_queues,
                have,
            }));
        }
        let (region, file, size) = InflightRegion::create(inflight.num_queues, inflight.queue_size)
            .map_err(|e| fail(HandlerError::Inflight(e)))?;
        self.inflight = Some(region);
        Ok((
            VhostUserInflight::new(size, 0, inflight.num_queues, inflight.queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostResult<()> {
        self.owner("SET_INFLIGHT_FD")?;
        let have = self.device.num_queues();
        if inflight.num_queues > have {
            return Err(fail(HandlerError::InflightQueues {
                asked: inflight.num_queues,
                have,
            }));
        }
        if let Some(i) = self.rings.iter().position(|r| r.worker.is_some()) {
            return Err(fail(HandlerError::Running(i as u16)));
        }
        if inflight.queue_size > MAX_QUEUE_SIZE {
            return Err(fail(HandlerError::BadSize(
                u32::from(inflight.queue_size),
                MAX_QUEUE_SIZE,
            )));
        }
        let region = InflightRegion::open(
            file,
            inflight.mmap_size,
            inflight.mmap_offset,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(|e| fail(HandlerError::Inflight(e)))?;
        self.inflight = Some(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<VhostUserMemoryRegionBase>> {
        self.owner("ADD_MEM_REG")?;
        self.memory
            .add(&region_info(region), fd)
            .map_err(|e| fail(HandlerError::Memory(e)))?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        self.owner("REM_MEM_REG")?;
        self.memory
            .remove(region.guest_phys_addr, region.memory_size, region.user_addr)
            .map_err(|e| fail(HandlerError::Memory(e)))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostResult<Option<File>> {
        Err(fail(HandlerError::Unsupported("SET_DEVICE_STATE_FD")))
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        Err(fail(HandlerError::Unsupported("CHECK_DEVICE_STATE")))
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        Err(fail(HandlerError::Unsupported("GET_SHMEM_CONFIG")))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostResult<()> {
        Err(fail(HandlerError::Unsupported("SET_LOG_BASE")))
    }
}
