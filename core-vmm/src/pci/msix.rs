//! MSI-X for one PCI function: the vector table and PBA the guest programs, each vector backed
//! by a KVM MSI route and an irqfd.
//!
//! The irqfd of a vector is what a device process is handed to signal that vector
//! (`VHOST_USER_SET_VRING_CALL`), so an interrupt reaches the guest without waking the core.
//! While a vector is masked (per-vector mask bit, function mask, or MSI-X disabled) its irqfd
//! is unregistered from KVM: signals accumulate in the eventfd counter, and KVM delivers that
//! pending signal as soon as the irqfd is registered again on unmask.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::interrupts::{InterruptRouter, MsiMessage, RoutingError};

/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: usize = 16;
const VECTOR_MASKED: u32 = 1;
/// Message Control bits of the capability.
pub const CONTROL_ENABLE: u16 = 1 << 15;
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// PCI capability id of MSI-X.
pub const CAPABILITY_ID: u8 = 0x11;

#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    #[error("cannot create an irqfd")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error("KVM refused to (un)register an irqfd")]
    Irqfd(#[source] kvm_ioctls::Error),
}

struct Vector {
    address: u64,
    data: u32,
    control: u32,
    gsi: u32,
    irqfd: EventFd,
    registered: bool,
}

pub struct Msix {
    vectors: Vec<Vector>,
    enabled: bool,
    function_masked: bool,
    router: Arc<InterruptRouter>,
}

impl Msix {
    pub fn new(count: u16, router: Arc<InterruptRouter>) -> Result<Self, MsixError> {
        let vectors = (0..count)
            .map(|_| {
                Ok(Vector {
                    address: 0,
                    data: 0,
                    control: VECTOR_MASKED,
                    gsi: router.allocate_gsi()?,
                    irqfd: EventFd::new(libc::EFD_NONBLOCK).map_err(MsixError::EventFd)?,
                    registered: false,
                })
            })
            .collect::<Result<Vec<_>, MsixError>>()?;
        Ok(Msix {
            vectors,
            enabled: false,
            function_masked: false,
            router,
        })
    }

    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// The eventfd that raises vector `index`, if the vector exists.
    pub fn irqfd(&self, index: u16) -> Option<&EventFd> {
        self.vectors.get(index as usize).map(|v| &v.irqfd)
    }

    /// The guest wrote the capability's Message Control.
    pub fn set_control(&mut self, control: u16) -> Result<(), MsixError> {
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.sync_all()
    }

    pub fn table_read(&self, offset: usize, data: &mut [u8]) {
        let (index, field) = (offset / ENTRY_SIZE, offset % ENTRY_SIZE);
        let Some(v) = self.vectors.get(index) else {
            data.fill(0xff);
            return;
        };
        let entry: [u32; 4] = [
            v.address as u32,
            (v.address >> 32) as u32,
            v.data,
            v.control,
        ];
        let bytes: Vec<u8> = entry.iter().flat_map(|w| w.to_le_bytes()).collect();
        for (i, out) in data.iter_mut().enumerate() {
            *out = bytes.get(field + i).copied().unwrap_or(0xff);
        }
    }

    pub fn table_write(&mut self, offset: usize, data: &[u8]) -> Result<(), MsixError> {
        let (index, field) = (offset / ENTRY_SIZE, offset % ENTRY_SIZE);
        let Some(v) = self.vectors.get_mut(index) else {
            return Ok(());
        };
        let mut bytes: Vec<u8> = [
            v.address as u32,
            (v.address >> 32) as u32,
            v.data,
            v.control,
        ]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = bytes.get_mut(field + i) {
                *slot = *b;
            }
        }
        let word =
            |i: usize| u32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
        v.address = u64::from(word(0)) | (u64::from(word(1)) << 32);
        v.data = word(2);
        v.control = word(3) & VECTOR_MASKED;
        self.sync(index)
    }

    /// Pending-bit array: bit n is set while vector n is masked with a signal waiting.
    pub fn pba_read(&self, offset: usize, data: &mut [u8]) {
        for (i, out) in data.iter_mut().enumerate() {
            let mut byte = 0u8;
            for bit in 0..8 {
                let index = (offset + i) * 8 + bit;
                if let Some(v) = self.vectors.get(index) {
                    if !v.registered && pending(&v.irqfd) {
                        byte |= 1 << bit;
                    }
                }
            }
            *out = byte;
        }
    }

    fn sync_all(&mut self) -> Result<(), MsixError> {
        (0..self.vectors.len()).try_for_each(|i| self.sync(i))
    }

    /// Makes KVM's view of vector `index` match the table.
    fn sync(&mut self, index: usize) -> Result<(), MsixError> {
        let active = self.enabled && !self.function_masked;
        let v = &mut self.vectors[index];
        let unmasked = active && v.control & VECTOR_MASKED == 0;
        if unmasked {
            self.router.set_msi(
                v.gsi,
                MsiMessage {
                    address: v.address,
                    data: v.data,
                },
            )?;
            if !v.registered {
                self.router
                    .vm()
                    .register_irqfd(&v.irqfd, v.gsi)
                    .map_err(MsixError::Irqfd)?;
                v.registered = true;
            }
        } else if v.registered {
            self.router
                .vm()
                .unregister_irqfd(&v.irqfd, v.gsi)
                .map_err(MsixError::Irqfd)?;
            v.registered = false;
        }
        Ok(())
    }
}

/// Whether an eventfd has a signal waiting, without consuming it.
fn pending(fd: &EventFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for one open fd, the count is 1 and the timeout 0, so
    // poll only writes `pfd.revents` and returns at once.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
}
