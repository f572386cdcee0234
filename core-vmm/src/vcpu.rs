//! One vCPU: a thread named `vcpuN` running a small state machine around `KVM_RUN`.
//!
//! ```text
//!            Pause              Finish
//!  Running ---------> Paused ----------> Exited
//!     ^  <---------     |
//!     |     Resume      |
//!     +--- Finish, or a guest exit that ends the VM ---> Exited
//! ```
//!
//! Control arrives over a channel. A vCPU inside `KVM_RUN` is woken by a signal whose handler
//! sets `kvm_run.immediate_exit`, so a kick that lands just before `KVM_RUN` is not lost: the
//! next `KVM_RUN` returns `EINTR` at once and the loop reads the channel.

use std::cell::Cell;
use std::fmt::Write as _;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use isola_ipc::VcpuState;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::{GuestRequest, LegacyDevices};

/// Signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, or null on threads that run no vCPU.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: a non-null pointer was stored by a `KickTarget` on this very thread and
        // points into the vCPU's mmapped `kvm_run` page; the `KickTarget` clears it when it
        // is dropped (on return or unwind), which `Vcpu::run` makes happen before the
        // `VcpuFd` owning the page can be dropped. A volatile byte store is async-signal-safe.
        unsafe { flag.write_volatile(1) };
    }
}

/// This thread's kick target while alive: the kick handler writes `immediate_exit` through
/// the pointer it holds, and dropping it (on any way out, a panic unwinding included) clears
/// the pointer, so a kick that arrives later touches nothing.
pub(crate) struct KickTarget {
    /// Not `Send`: the pointer is this thread's.
    _thread_bound: std::marker::PhantomData<*mut u8>,
}

impl KickTarget {
    /// Points this thread's kick handler at `flag`.
    ///
    /// # Safety
    ///
    /// `flag` must stay valid for writes (its `kvm_run` page mapped) until the returned
    /// value is dropped, and the value must be dropped on this thread.
    pub(crate) unsafe fn install(flag: *mut u8) -> KickTarget {
        IMMEDIATE_EXIT.with(|cell| cell.set(flag));
        KickTarget {
            _thread_bound: std::marker::PhantomData,
        }
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|cell| cell.set(std::ptr::null_mut()));
    }
}

/// Installs the kick handler for the whole process (once, before any vCPU thread starts).
pub fn register_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), kick_handler)
}

/// Requests to a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEvent {
    Pause,
    Resume,
    Finish,
}

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    Poweroff,
    Reset,
    DebugExit(u8),
    /// Asked for on the control socket: `graceful` when the guest ended itself after the
    /// power button, else the core stopped it; `detail` says what happened.
    Shutdown {
        graceful: bool,
        detail: String,
    },
    /// The guest crashed (triple fault, emulation failure, ...): one-line reason + register dump.
    Crash {
        vcpu: u32,
        reason: String,
        dump: String,
    },
    /// The host side failed while the guest ran (e.g. a vCPU thread could not sandbox itself).
    Failed(String),
}

impl VmExit {
    /// One line: a reason word (`poweroff`, `reset`, `shutdown`, `debug-exit`, `crash`,
    /// `failed`), then details. The `--exit-report-fd` line, and what a graceful shutdown's
    /// requester is told when the VM ends some other way.
    pub fn summary(&self) -> String {
        let one_line = |s: &str| s.lines().next().unwrap_or("").to_owned();
        match self {
            VmExit::Poweroff => "poweroff".into(),
            VmExit::Reset => "reset".into(),
            VmExit::Shutdown { graceful, detail } => format!(
                "shutdown {}: {detail}",
                if *graceful { "graceful" } else { "hard" }
            ),
            VmExit::DebugExit(status) => format!("debug-exit {status}"),
            VmExit::Failed(reason) => format!("failed {}", one_line(reason)),
            VmExit::Crash { vcpu, reason, .. } => {
                format!("crash {} on vcpu{vcpu}", one_line(reason))
            }
        }
    }
}

/// Where vCPUs report the end of the VM; the first report wins.
pub struct ExitNotifier {
    reason: Mutex<Option<VmExit>>,
    evt: EventFd,
}

impl ExitNotifier {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitNotifier {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn notify(&self, exit: VmExit) {
        let mut reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if reason.is_none() {
            *reason = Some(exit);
        }
        if let Err(e) = self.evt.write(1) {
            log::error!("cannot wake the control loop: {e}");
        }
    }

    pub fn take(&self) -> Option<VmExit> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// The eventfd that becomes readable when the VM should end, for poll().
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd is owned by `self.evt`, which lives as long as the returned borrow.
        unsafe { BorrowedFd::borrow_raw(self.evt.as_raw_fd()) }
    }
}

/// What the core keeps of a running vCPU thread.
pub struct VcpuHandle {
    pub index: u32,
    pub events: Sender<VcpuEvent>,
    pub state: Arc<Mutex<VcpuState>>,
    pub thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// Sends `event` and kicks the thread out of `KVM_RUN` so it sees it.
    pub fn send(&self, event: VcpuEvent) {
        // A send error means the thread is gone already, which is what Finish wants anyway.
        if self.events.send(event).is_ok() {
            if let Err(e) = self.thread.kill(kick_signal()) {
                log::debug!("vcpu{}: kick failed (thread exiting?): {e}", self.index);
            }
        }
    }

    pub fn state(&self) -> VcpuState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

enum Outcome {
    Continue,
    End(VmExit),
    Crash(String),
}

pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    devices: Arc<LegacyDevices>,
    exit: Arc<ExitNotifier>,
    events: Receiver<VcpuEvent>,
    /// Acknowledges Pause and Resume to the control loop: (vCPU index, new state).
    acks: Sender<(u32, VcpuState)>,
    state: Arc<Mutex<VcpuState>>,
}

impl Vcpu {
    pub fn new(
        index: u32,
        fd: VcpuFd,
        devices: Arc<LegacyDevices>,
        exit: Arc<ExitNotifier>,
        events: Receiver<VcpuEvent>,
        acks: Sender<(u32, VcpuState)>,
    ) -> Self {
        let state = Arc::new(Mutex::new(VcpuState::Running));
        Vcpu {
            index,
            fd,
            devices,
            exit,
            events,
            acks,
            state,
        }
    }

    pub fn shared_state(&self) -> Arc<Mutex<VcpuState>> {
        Arc::clone(&self.state)
    }

    fn enter(&self, state: VcpuState) -> VcpuState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = state;
        if state != VcpuState::Exited {
            // The control loop may have stopped listening (VM ending); nothing to do then.
            let _ = self.acks.send((self.index, state));
        }
        state
    }

    /// The thread body: runs the state machine until Exited.
    pub fn run(mut self) {
        let flag: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        // SAFETY: `flag` points into the `kvm_run` page of `self.fd`, mapped until the
        // `VcpuFd` is dropped. `kick` is a local of this function and `self` its parameter:
        // locals are dropped before parameters, on return and on unwind alike, so the pointer
        // is cleared before the page can go. It is dropped on this thread.
        let kick = unsafe { KickTarget::install(flag) };
        let mut state = VcpuState::Running;
        while state != VcpuState::Exited {
            state = match state {
                VcpuState::Running => self.running(),
                VcpuState::Paused => self.paused(),
                VcpuState::Exited => unreachable!("loop condition"),
            };
        }
        drop(kick);
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = VcpuState::Exited;
    }

    fn running(&mut self) -> VcpuState {
        loop {
            match self.events.try_recv() {
                Ok(VcpuEvent::Pause) => return self.enter(VcpuState::Paused),
                Ok(VcpuEvent::Resume) => {
                    self.enter(VcpuState::Running);
                }
                Ok(VcpuEvent::Finish) | Err(TryRecvError::Disconnected) => {
                    return VcpuState::Exited
                }
                Err(TryRecvError::Empty) => {}
            }
            match self.run_once() {
                Outcome::Continue => {}
                Outcome::End(exit) => {
                    self.exit.notify(exit);
                    return VcpuState::Exited;
                }
                Outcome::Crash(reason) => {
                    let dump = self.register_dump();
                    self.exit.notify(VmExit::Crash {
                        vcpu: self.index,
                        reason,
                        dump,
                    });
                    return VcpuState::Exited;
                }
            }
        }
    }

    fn paused(&mut self) -> VcpuState {
        match self.events.recv() {
            Ok(VcpuEvent::Pause) => self.enter(VcpuState::Paused),
            Ok(VcpuEvent::Resume) => self.enter(VcpuState::Running),
            Ok(VcpuEvent::Finish) | Err(_) => VcpuState::Exited,
        }
    }

    fn run_once(&mut self) -> Outcome {
        let devices = &self.devices;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                devices.pio_read(port, data);
                Outcome::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => match devices.pio_write(port, data) {
                None => Outcome::Continue,
                Some(GuestRequest::Poweroff) => Outcome::End(VmExit::Poweroff),
                Some(GuestRequest::Reset) => Outcome::End(VmExit::Reset),
                Some(GuestRequest::DebugExit(v)) => Outcome::End(VmExit::DebugExit(v)),
            },
            Ok(VcpuExit::MmioRead(addr, data)) => {
                devices.mmio_read(addr, data);
                Outcome::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                devices.mmio_write(addr, data);
                Outcome::Continue
            }
            // With the in-kernel LAPIC, HLT is handled in the kernel; a HLT exit only means
            // KVM wants user space to look at the vCPU once. Run it again.
            Ok(VcpuExit::Hlt) => Outcome::Continue,
            Ok(VcpuExit::Shutdown) => Outcome::Crash("triple fault".into()),
            Ok(VcpuExit::InternalError) => Outcome::Crash(self.internal_error()),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Outcome::End(VmExit::Poweroff),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Outcome::End(VmExit::Reset),
                other => Outcome::Crash(format!("system event {other}")),
            },
            Ok(other) => Outcome::Crash(format!("unexpected KVM exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Outcome::Continue
            }
            Err(e) => Outcome::Crash(format!("KVM_RUN failed: {e}")),
        }
    }

    fn internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM_RUN just returned KVM_EXIT_INTERNAL_ERROR, for which the kernel fills the
        // `internal` member of the exit union; all of its fields are plain integers.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let data: Vec<String> = internal.data[..n]
            .iter()
            .map(|d| format!("{d:#x}"))
            .collect();
        let what = match internal.suberror {
            1 => "instruction emulation failed",
            2 => "simultaneous exceptions",
            3 => "delivery event failed",
            _ => "internal error",
        };
        format!(
            "KVM {what} (suberror {}, data [{}])",
            internal.suberror,
            data.join(", ")
        )
    }

    fn register_dump(&self) -> String {
        let mut out = String::new();
        match self.fd.get_regs() {
            Ok(r) => {
                let _ = writeln!(
                    out,
                    "rip={:#018x} rsp={:#018x} rflags={:#010x}\n\
                     rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n\
                     rsi={:#018x} rdi={:#018x} rbp={:#018x} r8 ={:#018x}\n\
                     r9 ={:#018x} r10={:#018x} r11={:#018x} r12={:#018x}\n\
                     r13={:#018x} r14={:#018x} r15={:#018x}",
                    r.rip,
                    r.rsp,
                    r.rflags,
                    r.rax,
                    r.rbx,
                    r.rcx,
                    r.rdx,
                    r.rsi,
                    r.rdi,
                    r.rbp,
                    r.r8,
                    r.r9,
                    r.r10,
                    r.r11,
                    r.r12,
                    r.r13,
                    r.r14,
                    r.r15
                );
            }
            Err(e) => {
                let _ = writeln!(out, "general registers unavailable: {e}");
            }
        }
        match self.fd.get_sregs() {
            Ok(s) => {
                let _ = write!(
                    out,
                    "cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}\n\
                     cs={:#06x} (base {:#x}, l={} db={} dpl={}) ss={:#06x} ds={:#06x}\n\
                     gdt base={:#x} limit={:#x} idt base={:#x} limit={:#x}",
                    s.cr0,
                    s.cr2,
                    s.cr3,
                    s.cr4,
                    s.efer,
                    s.cs.selector,
                    s.cs.base,
                    s.cs.l,
                    s.cs.db,
                    s.cs.dpl,
                    s.ss.selector,
                    s.ds.selector,
                    s.gdt.base,
                    s.gdt.limit,
                    s.idt.base,
                    s.idt.limit
                );
            }
            Err(e) => {
                let _ = write!(out, "segment registers unavailable: {e}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kick_target_is_cleared_when_a_panic_unwinds() {
        std::thread::spawn(|| {
            let mut byte = 0u8;
            let flag: *mut u8 = &mut byte;
            let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // SAFETY: `byte` outlives the target, dropped on this thread by the unwind.
                let _kick = unsafe { KickTarget::install(flag) };
                assert_eq!(IMMEDIATE_EXIT.with(Cell::get), flag);
                panic!("a vCPU exit handler panics");
            }));
            assert!(unwound.is_err());
            assert!(
                IMMEDIATE_EXIT.with(Cell::get).is_null(),
                "a kick after the unwind would write to a dead page"
            );
            // A kick now is harmless.
            kick_handler(0, std::ptr::null_mut(), std::ptr::null_mut());
            assert_eq!(byte, 0);
        })
        .join()
        .expect("test thread");
    }
}
