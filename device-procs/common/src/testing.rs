//! Test helpers for device crates (feature `test-support`): guest RAM in a memfd the test
//! owns, a minimal split-virtqueue driver on it, and a vhost-user frontend (the `vhost`
//! crate's `Frontend`) set up the way the core sets one up. Test code: failures panic.

pub mod process;
pub mod requests;
pub mod seccomp;
pub mod skip;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::Memory;

/// A fresh scratch directory under the temporary directory, named after the test process
/// and `name`, removed on drop. It derefs to its path.
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("isola-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// `name` inside the directory.
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Guest RAM at guest address 0, backed by a memfd, mapped in this process.
pub struct GuestRam {
    file: File,
    mem: Arc<Memory>,
    size: u64,
}

impl GuestRam {
    /// Guest RAM the way the core makes it: a memfd sealed against shrinking and growing.
    pub fn new(size: u64) -> Self {
        Self::with_seals(size, true)
    }

    /// Guest RAM in a memfd that is not sealed (a careless or hostile frontend's): the
    /// frontend could truncate it under the device's mapping. Devices refuse it.
    pub fn unsealed(size: u64) -> Self {
        Self::with_seals(size, false)
    }

    fn with_seals(size: u64, sealed: bool) -> Self {
        let memfd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .create("test-guest-ram")
            .expect("memfd_create works");
        memfd.as_file().set_len(size).expect("memfd can be sized");
        if sealed {
            memfd
                .add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow])
                .expect("a new memfd can be sealed");
        }
        let file = memfd.into_file();
        let map = MmapRegion::<()>::from_file(
            FileOffset::new(file.try_clone().expect("dup works"), 0),
            size as usize,
        )
        .expect("memfd maps");
        let region = GuestRegionMmap::new(map, GuestAddress(0)).expect("region fits");
        let mem = Arc::new(Memory::from_regions(vec![region]).expect("one region"));
        GuestRam { file, mem, size }
    }

    pub fn memory(&self) -> &Memory {
        &self.mem
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Where guest address `gpa` is mapped in this process (the frontend's address space).
    pub fn host_addr(&self, gpa: GuestAddress) -> u64 {
        self.mem.get_host_address(gpa).expect("address in RAM") as u64
    }

    /// The region as SET_MEM_TABLE / ADD_MEM_REG describe it.
    pub fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.size,
            userspace_addr: self.host_addr(GuestAddress(0)),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }
}

/// A split virtqueue driven from the test, like a guest driver would.
pub struct SplitQueue {
    pub index: u16,
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    pub kick: EventFd,
    pub call: EventFd,
}

impl SplitQueue {
    /// Lays the rings out from `base` (16-byte aligned): table, available ring, and the
    /// used ring on the next 4 KiB boundary.
    pub fn new(index: u16, size: u16, base: GuestAddress) -> Self {
        let n = u64::from(size);
        let avail = base.0 + 16 * n;
        let used = (avail + 6 + 2 * n).div_ceil(4096) * 4096;
        SplitQueue {
            index,
            size,
            desc: base,
            avail: GuestAddress(avail),
            used: GuestAddress(used),
            next_desc: 0,
            avail_idx: 0,
            kick: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            call: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        }
    }

    /// First guest address after the rings.
    pub fn end(&self) -> GuestAddress {
        GuestAddress(self.used.0 + 6 + 8 * u64::from(self.size))
    }

    /// Writes a descriptor at table index `index` as-is (for hand-built hostile chains).
    pub fn put(&self, mem: &Memory, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let desc = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        mem.write_obj(desc, self.desc.unchecked_add(16 * u64::from(index)))
            .expect("descriptor table in RAM");
    }

    /// Writes a chain of `(address, length, device-writable)` buffers on the next free
    /// descriptors and returns its head. Not yet visible to the device: see `publish`.
    pub fn add(&mut self, mem: &Memory, bufs: &[(GuestAddress, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.put(mem, index, addr.0, len, flags, self.next_desc);
        }
        head
    }

    /// Makes `head` available to the device (without a kick).
    pub fn publish(&mut self, mem: &Memory, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, self.avail.unchecked_add(4 + 2 * slot))
            .expect("avail ring in RAM");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.store(
            self.avail_idx,
            self.avail.unchecked_add(2),
            Ordering::Release,
        )
        .expect("avail ring in RAM");
    }

    /// Sets `used_event` (EVENT_IDX): the driver wants a call once used idx passes it.
    pub fn set_used_event(&self, mem: &Memory, value: u16) {
        mem.store(
            value,
            self.avail.unchecked_add(4 + 2 * u64::from(self.size)),
            Ordering::Release,
        )
        .expect("avail ring in RAM");
    }

    pub fn kick(&self) {
        self.kick.write(1).expect("kick eventfd");
    }

    pub fn used_idx(&self, mem: &Memory) -> u16 {
        mem.load(self.used.unchecked_add(2), Ordering::Acquire)
            .expect("used ring in RAM")
    }

    /// Used element `i` (counting from the start of the ring's life): (head, length).
    pub fn used_elem(&self, mem: &Memory, i: u16) -> (u32, u32) {
        let at = self.used.unchecked_add(4 + 8 * u64::from(i % self.size));
        let id: u32 = mem.read_obj(at).expect("used ring in RAM");
        let len: u32 = mem.read_obj(at.unchecked_add(4)).expect("used ring in RAM");
        (id, len)
    }

    /// Waits up to `timeout` until the used index reaches `n`.
    pub fn wait_used(&self, mem: &Memory, n: u16, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.used_idx(mem) == n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.used_idx(mem) == n
    }

    /// The ring as SET_VRING_ADDR carries it: addresses in this process.
    pub fn config(&self, ram: &GuestRam) -> VringConfigData {
        VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: ram.host_addr(self.desc),
            used_ring_addr: ram.host_addr(self.used),
            avail_ring_addr: ram.host_addr(self.avail),
            log_addr: None,
        }
    }
}

/// Connects to a backend socket, retrying until `timeout`.
pub fn connect(path: &Path, num_queues: u64, timeout: Duration) -> Frontend {
    let deadline = Instant::now() + timeout;
    loop {
        match Frontend::connect(path, num_queues) {
            Ok(frontend) => return frontend,
            Err(e) if Instant::now() >= deadline => {
                panic!("cannot connect to {}: {e}", path.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// A one-queue session ready for rings: connected, negotiated with VERSION_1 and every
/// protocol feature the backend library offers, and `ram` as its memory table.
pub fn connect_with_memory(path: &Path, ram: &GuestRam, timeout: Duration) -> Frontend {
    let mut frontend = connect(path, 1, timeout);
    negotiate(
        &mut frontend,
        1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1,
        crate::offered_protocol_features(),
    );
    frontend
        .set_mem_table(&[ram.region()])
        .expect("SET_MEM_TABLE");
    frontend
}

/// SET_OWNER and feature negotiation as the core does it: `device_features` and `protocol`
/// are what the test wants; returns the acknowledged device features.
pub fn negotiate(
    frontend: &mut Frontend,
    device_features: u64,
    protocol: VhostUserProtocolFeatures,
) -> u64 {
    frontend.set_owner().expect("SET_OWNER");
    let offered = frontend.get_features().expect("GET_FEATURES");
    assert_ne!(
        offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    let offered_protocol = frontend
        .get_protocol_features()
        .expect("GET_PROTOCOL_FEATURES");
    let protocol = offered_protocol & protocol;
    frontend
        .set_protocol_features(protocol)
        .expect("SET_PROTOCOL_FEATURES");
    if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    let acked = offered & (device_features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());
    frontend.set_features(acked).expect("SET_FEATURES");
    acked
}

/// SET_VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE for one queue.
pub fn start_queue(frontend: &mut Frontend, queue: &SplitQueue, ram: &GuestRam, base: u16) {
    let i = usize::from(queue.index);
    frontend
        .set_vring_num(i, queue.size)
        .expect("SET_VRING_NUM");
    frontend
        .set_vring_addr(i, &queue.config(ram))
        .expect("SET_VRING_ADDR");
    frontend.set_vring_base(i, base).expect("SET_VRING_BASE");
    frontend
        .set_vring_call(i, &queue.call)
        .expect("SET_VRING_CALL");
    frontend
        .set_vring_kick(i, &queue.kick)
        .expect("SET_VRING_KICK");
    frontend
        .set_vring_enable(i, true)
        .expect("SET_VRING_ENABLE");
}

/// Sends one raw vhost-user message (header fields as given, then `payload`, with `fds`
/// attached): for tests that must send what `Frontend` refuses to.
pub fn raw_message(
    stream: &std::os::unix::net::UnixStream,
    code: u32,
    flags: u32,
    payload: &[u8],
    fds: &[std::os::fd::RawFd],
) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let mut bytes = Vec::with_capacity(12 + payload.len());
    bytes.extend_from_slice(&code.to_le_bytes());
    bytes.extend_from_slice(&flags.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(payload);
    let iov = [std::io::IoSlice::new(&bytes)];
    let cmsgs = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsgs };
    sendmsg::<UnixAddr>(stream.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).expect("sendmsg");
}

/// Whether the peer closes `stream` within `timeout` (reads until EOF, discarding replies).
pub fn closed_by_peer(stream: &std::os::unix::net::UnixStream, timeout: Duration) -> bool {
    use std::io::Read;
    stream
        .set_read_timeout(Some(timeout))
        .expect("read timeout");
    let mut buf = [0u8; 256];
    loop {
        match (&*stream).read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}
