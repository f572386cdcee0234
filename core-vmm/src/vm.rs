//! The VM: KVM objects, guest RAM, vCPU threads, and the control loop that ends them.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootConfig, BootEntry};
use crate::control::{ControlServer, Starting};
use crate::cpu::cpuid::{self, HiddenFeatures, Hypercalls};
use crate::cpu::hypercall;
use crate::cpu::regs;
use crate::deadline::{Watchdog, WatchdogGuard};
use crate::devices::{Ged, LegacyDevices, GED_IRQ, SERIAL_IRQ};
use crate::interrupts::InterruptRouter;
use crate::layout;
use crate::memory::{GuestRam, MemoryError, MemoryOptions};
use crate::pci::backend::Shared;
use crate::pci::vfio_user_pci::VfioUserPciDevice;
use crate::pci::virtio_pci::{self, VirtioPciDevice};
use crate::pci::PciBus;
use crate::sandbox::{self, SandboxError, SeccompMode, ThreadKind};
use crate::vcpu::{self, ExitNotifier, Vcpu, VcpuHandle, VmExit};
use crate::vfio_user::client::{VfioUserClient, VfioUserError};
use crate::vfio_user::VfioUserSpec;
use crate::vhost_user::{Deadlines, VhostUserConnection, VhostUserError};
use crate::virtio::DeviceSpec;

/// A validated VM description.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub num_cpus: u32,
    pub memory_bytes: u64,
    pub memory: MemoryOptions,
    pub boot: BootConfig,
    pub hidden_features: HiddenFeatures,
    pub serial_log: Option<PathBuf>,
    pub control_socket: Option<PathBuf>,
    pub devices: Vec<DeviceSpec>,
    /// `--device vfio-user,...`, placed on the bus after the vhost-user devices.
    pub vfio_user: Vec<VfioUserSpec>,
    pub device_timeout: std::time::Duration,
    /// The deadline of one vhost-user exchange with a device process.
    pub backend_timeout: std::time::Duration,
    pub seccomp: SeccompMode,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    KvmVersion(i32),
    #[error("KVM lacks a capability the core needs: {0}")]
    KvmCap(&'static str),
    #[error("--cpus {requested} is more than KVM allows on this host ({max})")]
    TooManyCpus { requested: u32, max: usize },
    #[error("KVM refused to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("vcpu{0}: cannot set up its registers")]
    Regs(u32, #[source] regs::RegsError),
    #[error("cannot open serial log {}", .0.display())]
    SerialLog(PathBuf, #[source] std::io::Error),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("cannot start thread {0}")]
    Spawn(&'static str, #[source] std::io::Error),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error("cannot sandbox the core's threads")]
    Sandbox(#[source] SandboxError),
    #[error("device {0}")]
    Device(
        &'static str,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
    #[error("device {0}")]
    Backend(&'static str, #[source] VhostUserError),
    #[error(transparent)]
    Deadline(#[from] crate::deadline::DeadlineError),
    #[error("vfio-user device at {}", .0.display())]
    VfioUser(PathBuf, #[source] VfioUserError),
}

impl VmError {
    /// Errors caused by what the user asked for (exit status 2) rather than by the host.
    pub fn is_bad_input(&self) -> bool {
        match self {
            VmError::TooManyCpus { .. } | VmError::Boot(_) | VmError::SerialLog(..) => true,
            VmError::Control(e) => e.is_bad_input(),
            VmError::Memory(MemoryError::Create(_) | MemoryError::Resize(..)) => true,
            // A device socket that is not a socket, or where nobody answered in time.
            VmError::Backend(
                _,
                VhostUserError::NotASocket(_) | VhostUserError::ConnectTimeout { .. },
            ) => true,
            VmError::VfioUser(
                _,
                VfioUserError::NotASocket(_) | VfioUserError::ConnectTimeout { .. },
            ) => true,
            _ => false,
        }
    }
}

/// A VM ready to run: every KVM object exists, the kernel is loaded, no vCPU runs yet.
pub struct Vm {
    vm: Arc<VmFd>,
    ram: Arc<GuestRam>,
    vcpus: Vec<VcpuFd>,
    devices: Arc<LegacyDevices>,
    /// The power button's event device, also reached by the control socket.
    ged: Arc<Ged>,
    control: Option<ControlServer>,
    seccomp: SeccompMode,
    virtio: Vec<SharedVirtioDevice>,
    /// The status of each vfio-user device, in bus order after the virtio devices.
    vfio_user: Vec<Arc<Shared>>,
    /// Stops the deadline thread when the VM is gone.
    _watchdog: WatchdogGuard,
}

impl Vm {
    pub fn new(config: &VmConfig) -> Result<Self, VmError> {
        let t0 = Instant::now();
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::KvmVersion(version));
        }
        for (cap, name) in [
            (kvm_ioctls::Cap::Irqchip, "in-kernel irqchip"),
            (kvm_ioctls::Cap::Ioeventfd, "ioeventfd"),
            (kvm_ioctls::Cap::Irqfd, "irqfd"),
            (kvm_ioctls::Cap::UserMemory, "user memory"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::KvmCap(name));
            }
        }
        let max = kvm.get_max_vcpus();
        if config.num_cpus as usize > max {
            return Err(VmError::TooManyCpus {
                requested: config.num_cpus,
                max,
            });
        }
        // The control socket is bound first so that a bad path fails before any work is done,
        // and answers (the VM is starting) while the device backends connect.
        let control = config
            .control_socket
            .as_deref()
            .map(ControlServer::bind)
            .transpose()?;
        let control_filter =
            sandbox::filter(ThreadKind::Control, config.seccomp).map_err(VmError::Sandbox)?;
        let devices: Vec<String> = config
            .devices
            .iter()
            .map(|d| format!("{} at {}", d.kind.info().name, d.socket.display()))
            .collect();
        let first_answer = format!("setting up (devices: {})", devices.join(", "));
        let starting = control
            .map(|server| Starting::start(server, control_filter, first_answer))
            .transpose()
            .map_err(|e| VmError::Spawn("control-start", e))?;
        let serial_out: Box<dyn Write + Send> = match &config.serial_log {
            Some(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| VmError::SerialLog(path.clone(), e))?,
            ),
            None => Box::new(std::io::stdout()),
        };

        let vm = Arc::new(
            kvm.create_vm()
                .map_err(|e| VmError::Kvm("create a VM", e))?,
        );
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("report its supported CPUID", e))?;
        // Whether a guest may use hypercalls is found out while the rest is set up; it only
        // matters with more than one vCPU (see `cpu::hypercall`).
        let probing = (config.num_cpus > 1)
            .then(|| {
                let list = supported.clone();
                std::thread::Builder::new()
                    .name("hc-probe".into())
                    .spawn(move || hypercall::probe(&list))
            })
            .transpose()
            .map_err(|e| VmError::Spawn("hc-probe", e))?;

        let ram = Arc::new(GuestRam::new(config.memory_bytes, config.memory)?);
        // Guest RAM is registered before any other KVM object exists, on a thread of its own
        // while this one loads the kernel. Registration waits for an SRCU grace period, and
        // on the nested hosts measured (issue 18) that wait is short only while the VM is
        // new: after the irqchip and PIT exist, or while they are being created, the same
        // 64 MiB slot took 4-12 ms instead of 0.05-0.9 ms. The "KVM floor" column of
        // `benches/boot.rs` times the bare ioctls in this order.
        let registering = {
            let (ram, vm) = (Arc::clone(&ram), Arc::clone(&vm));
            std::thread::Builder::new()
                .name("memslots".into())
                .spawn(move || ram.register(&vm))
                .map_err(|e| VmError::Spawn("memslots", e))?
        };
        let loaded = boot::load(ram.memory(), ram.size(), &config.boot);
        let backend_filter = sandbox::filter(ThreadKind::Backend, config.seccomp);
        registering.join().map_err(|_| {
            VmError::Kvm("register guest memory", kvm_ioctls::Error::new(libc::EIO))
        })??;
        let entry = loaded?;
        let backend_filter = backend_filter.map_err(VmError::Sandbox)?;
        vm.set_tss_address(layout::KVM_TSS_ADDRESS)
            .map_err(|e| VmError::Kvm("set the TSS address", e))?;
        vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| VmError::Kvm("set the identity map address", e))?;
        vm.create_irq_chip()
            .map_err(|e| VmError::Kvm("create the in-kernel irqchip", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(|e| VmError::Kvm("create the in-kernel PIT", e))?;

        let router = Arc::new(InterruptRouter::new(Arc::clone(&vm)));
        let watchdog = {
            let filter = backend_filter.clone();
            Watchdog::start(Box::new(move || {
                sandbox::install(filter.as_ref()).map_err(|e| crate::error_chain(&e))
            }))?
        };
        let deadlines = Deadlines {
            watchdog: watchdog.clone(),
            timeout: config.backend_timeout,
        };
        let watchdog = WatchdogGuard(watchdog);
        let waiting = starting.as_ref().map(|s| Arc::clone(&s.waiting));
        let (mut pci, virtio) = build_pci_bus(
            config,
            &ram,
            &router,
            &deadlines,
            &backend_filter,
            waiting.clone(),
        )?;
        let vfio_user = add_vfio_user_devices(
            &mut pci,
            config,
            &ram,
            &router,
            &deadlines,
            &backend_filter,
            waiting,
        )?;
        let pci = Arc::new(pci);
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|e| VmError::Kvm("route the serial irqfd", e))?;
        let ged_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        vm.register_irqfd(&ged_irq, GED_IRQ)
            .map_err(|e| VmError::Kvm("route the GED irqfd", e))?;
        let ged = Arc::new(Ged::new(ged_irq));
        let devices = Arc::new(LegacyDevices::new(
            serial_out,
            serial_irq,
            Arc::clone(&ged),
            pci,
        ));

        let hypercalls = probing.map_or(Hypercalls::Hide, hypercalls_from);
        let vcpus = (0..config.num_cpus)
            .map(|index| {
                let fd = vm
                    .create_vcpu(u64::from(index))
                    .map_err(|e| VmError::Kvm("create a vCPU", e))?;
                let cpuid = cpuid::for_vcpu(
                    &supported,
                    index,
                    config.num_cpus,
                    &config.hidden_features,
                    hypercalls,
                );
                fd.set_cpuid2(&cpuid)
                    .map_err(|e| VmError::Kvm("set CPUID", e))?;
                regs::setup_msrs(&fd).map_err(|e| VmError::Regs(index, e))?;
                regs::setup_lint(&fd).map_err(|e| VmError::Regs(index, e))?;
                if index == 0 {
                    regs::setup_boot_cpu(&fd, ram.memory(), &entry)
                        .map_err(|e| VmError::Regs(index, e))?;
                }
                Ok(fd)
            })
            .collect::<Result<Vec<_>, VmError>>()?;
        let control = starting.and_then(Starting::finish);
        log::debug!("VM set up in {:?}", t0.elapsed());
        log::info!(
            "{} vCPUs, {} MiB, entry {}",
            config.num_cpus,
            config.memory_bytes >> 20,
            match entry {
                BootEntry::Pvh { entry, .. } => format!("PVH at {entry:#x}"),
                BootEntry::Linux64 { entry, .. } => format!("64-bit Linux at {entry:#x}"),
            }
        );
        Ok(Vm {
            vm,
            ram,
            vcpus,
            devices,
            ged,
            control,
            seccomp: config.seccomp,
            virtio,
            vfio_user,
            _watchdog: watchdog,
        })
    }

    /// Runs the guest until it powers off, resets, crashes or is shut down. Returns how it
    /// ended and [`Held`]: the VM and guest RAM, still open.
    pub fn run(self) -> (Result<VmExit, VmError>, Held) {
        let held = Held {
            _release: defer_vm_release(&self.vm),
            _vm: Arc::clone(&self.vm),
            _ram: Arc::clone(&self.ram),
        };
        (self.serve(), held)
    }

    fn serve(self) -> Result<VmExit, VmError> {
        let Vm {
            vm,
            ram: _,
            vcpus,
            devices,
            ged,
            control,
            seccomp,
            virtio,
            vfio_user,
            _watchdog,
        } = self;
        let vcpu_filter = sandbox::filter(ThreadKind::Vcpu, seccomp).map_err(VmError::Sandbox)?;
        let control_filter =
            sandbox::filter(ThreadKind::Control, seccomp).map_err(VmError::Sandbox)?;
        vcpu::register_kick_handler().map_err(VmError::Signal)?;
        let exit = Arc::new(ExitNotifier::new().map_err(VmError::EventFd)?);
        let (ack_tx, ack_rx) = mpsc::channel();
        let started = Instant::now();
        let mut handles = Vec::with_capacity(vcpus.len());
        for (index, fd) in vcpus.into_iter().enumerate() {
            let index = index as u32;
            let (tx, rx) = mpsc::channel();
            let vcpu = Vcpu::new(
                index,
                fd,
                Arc::clone(&devices),
                Arc::clone(&exit),
                rx,
                ack_tx.clone(),
            );
            let state = vcpu.shared_state();
            let (filter, exit) = (vcpu_filter.clone(), Arc::clone(&exit));
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || match sandbox::install(filter.as_ref()) {
                    Ok(()) => vcpu.run(),
                    Err(e) => exit.notify(VmExit::Failed(format!(
                        "vcpu{index}: {}",
                        crate::error_chain(&e)
                    ))),
                });
            match thread {
                Ok(thread) => handles.push(VcpuHandle {
                    index,
                    events: tx,
                    state,
                    thread,
                }),
                Err(e) => {
                    stop_vcpus(handles);
                    return Err(VmError::Spawn("vcpu", e));
                }
            }
        }
        drop(ack_tx);
        // Installed after the vCPU threads exist, so they do not inherit it.
        if let Err(e) = sandbox::install(control_filter.as_ref()) {
            stop_vcpus(handles);
            return Err(VmError::Sandbox(e));
        }

        let shared: Vec<_> = virtio
            .iter()
            .map(|d| d.lock().unwrap_or_else(|p| p.into_inner()).shared())
            .chain(vfio_user)
            .collect();
        let result = crate::control::serve(
            control,
            crate::control::Context {
                vm: &vm,
                exit: &exit,
                vcpus: &handles,
                acks: &ack_rx,
                devices: &shared,
                ged: &ged,
                started,
            },
        );
        stop_vcpus(handles);
        result.map_err(VmError::from)
    }
}

/// The VM's fd and guest RAM, held past [`Vm::run`] (every vCPU thread has ended by then).
///
/// `isola-core` exits holding it, for two reasons measured on the nested hosts of issue 18.
/// Unmapping guest RAM while KVM still tracks it makes KVM invalidate its view of every
/// guest page (2-10 ms at 8 GiB); at exit the kernel releases the address space first (one
/// MMU-notifier release). And destroying a VM with the in-kernel irqchip and PIT waits for
/// several SRCU grace periods (15-35 ms there, the bench's "KVM floor, in-kernel irqchip"),
/// which would delay the process's exit: the VM fd is also in an io_uring's file table (see
/// [`defer_vm_release`]), so the kernel's io_uring exit worker drops the last reference
/// after the process is gone. Guest RAM is freed at exit either way (KVM does not hold it).
pub struct Held {
    // Field order is drop order. Dropped rather than exited with, the VM is destroyed when
    // `_vm` goes (the ring has let go of it), and RAM is unmapped after that.
    _release: Option<io_uring::IoUring>,
    _vm: Arc<VmFd>,
    _ram: Arc<GuestRam>,
}

/// An io_uring holding `vm` in its registered-file table, or `None` where io_uring is not
/// available (then the VM is destroyed when the process closes its fd, as before). Closing
/// the ring (at exit) queues its teardown on a kernel worker, which drops the VM's last
/// reference there. Nothing is ever submitted to the ring.
fn defer_vm_release(vm: &VmFd) -> Option<io_uring::IoUring> {
    use std::os::fd::AsRawFd;
    let ring = io_uring::IoUring::new(1)
        .and_then(|ring| {
            ring.submitter().register_files(&[vm.as_raw_fd()])?;
            Ok(ring)
        })
        .map_err(|e| log::debug!("no io_uring ({e}): the VM is destroyed before exit"))
        .ok()?;
    Some(ring)
}

/// A virtio device, shared by the PCI bus (vCPU threads) and the VM (for its status).
pub type SharedVirtioDevice = Arc<Mutex<VirtioPciDevice>>;

/// Connects every `--device` backend and puts each behind a virtio-pci function.
fn build_pci_bus(
    config: &VmConfig,
    ram: &Arc<GuestRam>,
    router: &Arc<InterruptRouter>,
    deadlines: &Deadlines,
    backend_filter: &Option<seccompiler::BpfProgram>,
    waiting: Option<Arc<Mutex<String>>>,
) -> Result<(PciBus, Vec<SharedVirtioDevice>), VmError> {
    let mut bus = PciBus::new();
    let mut virtio = Vec::new();
    for spec in &config.devices {
        let info = spec.kind.info();
        if let Some(waiting) = &waiting {
            *waiting.lock().unwrap_or_else(|p| p.into_inner()) = format!(
                "waiting for the {} backend at {}",
                info.name,
                spec.socket.display()
            );
        }
        let mut backend = VhostUserConnection::connect(
            &spec.socket,
            spec.queues,
            info.queue_size,
            config.device_timeout,
            deadlines,
        )
        .map_err(|e| VmError::Backend(info.name, e))?;
        if let Some(display) = &spec.display {
            backend
                .attach_display(display, config.device_timeout)
                .map_err(|e| VmError::Backend(info.name, e))?;
        }
        let bar = bus
            .allocate_bar(virtio_pci::BAR_SIZE)
            .map_err(|e| VmError::Device(info.name, e.into()))?;
        let device = VirtioPciDevice::new(
            spec.kind,
            spec.queues,
            backend,
            Arc::clone(ram),
            Arc::clone(router),
            bar,
            virtio_pci::BackendOptions {
                timeout: config.backend_timeout,
                filter: backend_filter.clone(),
            },
        )
        .map_err(|e| VmError::Device(info.name, e.into()))?;
        let device = Arc::new(Mutex::new(device));
        virtio.push(Arc::clone(&device));
        let slot = bus
            .add(device)
            .map_err(|e| VmError::Device(info.name, e.into()))?;
        log::info!(
            "{} at 00:{slot:02x}.0, BAR0 {bar:#x}, backend {}",
            info.name,
            spec.socket.display()
        );
    }
    Ok((bus, virtio))
}

/// Connects every `--device vfio-user` server and puts each behind a PCI function of its own,
/// after the virtio devices; returns what status shows of each.
fn add_vfio_user_devices(
    bus: &mut PciBus,
    config: &VmConfig,
    ram: &Arc<GuestRam>,
    router: &Arc<InterruptRouter>,
    deadlines: &Deadlines,
    backend_filter: &Option<seccompiler::BpfProgram>,
    waiting: Option<Arc<Mutex<String>>>,
) -> Result<Vec<Arc<Shared>>, VmError> {
    let mut shared = Vec::new();
    for spec in &config.vfio_user {
        if let Some(waiting) = &waiting {
            *waiting.lock().unwrap_or_else(|p| p.into_inner()) = format!(
                "waiting for the vfio-user server at {}",
                spec.socket.display()
            );
        }
        let client = VfioUserClient::connect(&spec.socket, config.device_timeout, deadlines)
            .map_err(|e| VmError::VfioUser(spec.socket.clone(), e))?;
        let status = Arc::new(Shared::new(
            "vfio-user",
            spec.socket.clone(),
            config.backend_timeout,
        ));
        let device = VfioUserPciDevice::new(
            client,
            Arc::clone(ram),
            Arc::clone(router),
            bus,
            Arc::clone(&status),
            backend_filter.clone(),
            spec.ioeventfds,
        )
        .map_err(|e| VmError::Device("vfio-user", e.into()))?;
        let slot = bus
            .add(Arc::new(Mutex::new(device)))
            .map_err(|e| VmError::Device("vfio-user", e.into()))?;
        log::info!(
            "vfio-user at 00:{slot:02x}.0, server {}",
            spec.socket.display()
        );
        shared.push(status);
    }
    Ok(shared)
}

/// The hypercall probe's verdict, logged: what it saw and what the guest is offered.
fn hypercalls_from(
    probe: std::thread::JoinHandle<Result<hypercall::Outcome, hypercall::ProbeError>>,
) -> Hypercalls {
    match probe.join() {
        Ok(Ok(outcome)) => {
            let hypercalls = outcome.hypercalls();
            match hypercalls {
                Hypercalls::Offer => log::debug!("host: {outcome}"),
                Hypercalls::Hide => log::info!(
                    "host: {outcome}; PV IPIs, PV sched yield and PV unhalt hidden from the guest"
                ),
            }
            hypercalls
        }
        Ok(Err(e)) => {
            log::warn!(
                "hypercall probe failed ({}): PV IPIs, PV sched yield and PV unhalt hidden \
                 from the guest",
                crate::error_chain(&e)
            );
            Hypercalls::Hide
        }
        Err(_) => {
            log::warn!("hypercall probe panicked: hypercall-based KVM features hidden");
            Hypercalls::Hide
        }
    }
}

/// Tells every vCPU to finish and waits for its thread.
fn stop_vcpus(handles: Vec<VcpuHandle>) {
    for handle in &handles {
        handle.send(vcpu::VcpuEvent::Finish);
    }
    for handle in handles {
        if handle.thread.join().is_err() {
            log::error!("vcpu{} panicked", handle.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isola_device_common::testing::skip::{skip, Missing};
    use std::os::fd::AsRawFd;

    /// Once the process's own VM fd is closed, the teardown ring's file table still holds the
    /// VM, so the last reference is the ring's (dropped by the kernel's io_uring worker).
    #[test]
    fn the_teardown_ring_holds_the_vm_past_its_fd() {
        let Ok(kvm) = Kvm::new() else {
            skip(Missing::Host, "no usable /dev/kvm");
            return;
        };
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let Some(ring) = defer_vm_release(&vm) else {
            skip(Missing::Host, "io_uring is not available to this process");
            return;
        };
        drop(vm);
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", ring.as_raw_fd()))
            .expect("the ring's fdinfo");
        assert!(
            info.lines().any(|l| l.trim_end().ends_with("kvm-vm")),
            "the ring's registered files do not include the VM:\n{info}"
        );
    }
}
