//! Whether this host completes a KVM hypercall made in guest ring 0, found by making one in a
//! throwaway VM before the guest's vCPUs are set up.
//!
//! `KVM_GET_SUPPORTED_CPUID` offers PV IPIs, PV sched yield and PV unhalt (leaf 0x40000001)
//! on every KVM host, and a Linux guest with more than one vCPU then sends its IPIs with
//! `vmmcall`/`vmcall`. On a host that runs guest ring 0 through KVM's instruction emulator
//! (the nested `kvm_pvm` host these tests run on) that instruction never completes: the
//! emulator's hypercall handler only rewrites it into the vendor's form and lets the CPU
//! execute it again, which is emulated again, forever. Linux on two vCPUs hung there, in the
//! first IPI CPU 1 sent, with CPU 0 spinning on a lock CPU 1 held.
//!
//! The probe runs `mov $1, %eax; vmmcall (vmcall on Intel); hlt` in 64-bit ring 0 on a VM
//! without an in-kernel irqchip, so the `hlt` comes back as an exit. The vCPU thread is kicked
//! out of `KVM_RUN` every few milliseconds; if it has spent [`CPU_BUDGET`] of its own CPU time
//! in there without reaching the `hlt`, the hypercall is looping (a returning one takes
//! microseconds, even emulated). Counting the thread's CPU time rather than wall time keeps a
//! busy machine, where the thread barely runs, from deciding it.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use kvm_bindings::CpuId;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use nix::time::ClockId;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::Killable;

use crate::boot::BootEntry;
use crate::cpu::cpuid::Hypercalls;
use crate::cpu::regs;
use crate::layout;
use crate::memory::{GuestRam, MemoryError, MemoryOptions};
use crate::vcpu;

/// RAM of the probe VM: the boot GDT, its stack and page tables all sit below 64 KiB.
const PROBE_RAM: u64 = 0x1_0000;
/// Where the probe's three instructions go.
const PROBE_CODE: u64 = 0x1000;
/// KVM_HC_VAPIC_POLL_IRQ: does nothing and returns 0 on every KVM.
const KVM_HC_VAPIC_POLL_IRQ: u8 = 1;
/// CPU time the vCPU thread may spend in `KVM_RUN` before the hypercall counts as looping: a
/// returning one needs microseconds, and even emulated (~1 us per instruction) well under 1 ms.
pub const CPU_BUDGET: Duration = Duration::from_millis(2);
/// How often the vCPU thread is kicked out of `KVM_RUN` to look at its CPU time.
const KICK_EVERY: Duration = Duration::from_millis(2);
/// Wall-time bound on the whole probe (a thread that gets no CPU for this long is not waited
/// for: the features are hidden, which costs speed, never correctness).
const WALL_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("KVM refused to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("no memory for the probe VM")]
    Memory(#[source] MemoryError),
    #[error("cannot write the probe's code")]
    Write(#[source] vm_memory::GuestMemoryError),
    #[error("cannot set up the probe vCPU")]
    Regs(#[source] regs::RegsError),
    #[error("cannot start the probe thread")]
    Spawn(#[source] std::io::Error),
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("the probe vCPU stopped with {0}")]
    Unexpected(String),
}

/// What the probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The hypercall returned this value in RAX.
    Returned(u64),
    /// Still inside the hypercall after this much CPU time in `KVM_RUN`.
    Looping(Duration),
    /// The thread got too little CPU to tell within [`WALL_LIMIT`].
    Undecided(Duration),
}

impl Outcome {
    /// Hypercall-based features are offered only after a hypercall was seen to return.
    pub fn hypercalls(&self) -> Hypercalls {
        match self {
            Outcome::Returned(_) => Hypercalls::Offer,
            Outcome::Looping(_) | Outcome::Undecided(_) => Hypercalls::Hide,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Returned(rax) => write!(f, "a ring-0 hypercall returned {rax:#x}"),
            Outcome::Looping(cpu) => write!(
                f,
                "a ring-0 hypercall had not returned after {} ms of CPU in KVM_RUN",
                cpu.as_millis()
            ),
            Outcome::Undecided(cpu) => write!(
                f,
                "undecided: the probe thread got {} ms of CPU in {} s",
                cpu.as_millis(),
                WALL_LIMIT.as_secs()
            ),
        }
    }
}

/// `vendor` is leaf 0's EBX: AMD and Hygon use `vmmcall`, everyone else `vmcall`.
fn probe_code(cpuid: &CpuId) -> [u8; 9] {
    let ebx = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.ebx);
    let amd = ebx == u32::from_le_bytes(*b"Auth") || ebx == u32::from_le_bytes(*b"Hygo");
    let modrm = if amd { 0xd9 } else { 0xc1 };
    // mov $1, %eax; vmmcall | vmcall; hlt
    [
        0xb8,
        KVM_HC_VAPIC_POLL_IRQ,
        0,
        0,
        0,
        0x0f,
        0x01,
        modrm,
        0xf4,
    ]
}

/// Makes one hypercall in a VM of its own with `cpuid` (KVM's supported list) on its vCPU.
pub fn probe(cpuid: &CpuId) -> Result<Outcome, ProbeError> {
    let t0 = Instant::now();
    let kvm = Kvm::new().map_err(|e| ProbeError::Kvm("open /dev/kvm", e))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| ProbeError::Kvm("create the probe VM", e))?;
    vm.set_tss_address(layout::KVM_TSS_ADDRESS)
        .map_err(|e| ProbeError::Kvm("set the probe VM's TSS address", e))?;
    let ram = GuestRam::new(PROBE_RAM, MemoryOptions::default()).map_err(ProbeError::Memory)?;
    ram.register(&vm).map_err(ProbeError::Memory)?;
    ram.memory()
        .write_slice(&probe_code(cpuid), GuestAddress(PROBE_CODE))
        .map_err(ProbeError::Write)?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| ProbeError::Kvm("create the probe vCPU", e))?;
    vcpu.set_cpuid2(cpuid)
        .map_err(|e| ProbeError::Kvm("set the probe vCPU's CPUID", e))?;
    let entry = BootEntry::Linux64 {
        entry: PROBE_CODE,
        boot_params: 0,
    };
    regs::setup_boot_cpu(&vcpu, ram.memory(), &entry).map_err(ProbeError::Regs)?;
    let set_up = t0.elapsed();
    let (outcome, joined) = run(vcpu)?;
    log::debug!(
        "hypercall probe: set up in {set_up:?}, decided in {:?}",
        t0.elapsed()
    );
    if !joined {
        // The vCPU may still be inside KVM_RUN on its thread: its memory must stay mapped.
        std::mem::forget(ram);
    }
    Ok(outcome)
}

/// Runs the probe vCPU on a thread of its own, kicking it until it decides; the flag says
/// whether the thread is gone (and with it the vCPU).
fn run(vcpu: VcpuFd) -> Result<(Outcome, bool), ProbeError> {
    vcpu::register_kick_handler().map_err(ProbeError::Signal)?;
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("hypercall-probe".into())
        .spawn(move || {
            let outcome = run_on_this_thread(vcpu);
            let _ = tx.send(outcome);
        })
        .map_err(ProbeError::Spawn)?;
    let started = Instant::now();
    loop {
        match rx.recv_timeout(KICK_EVERY) {
            Ok(outcome) => {
                if thread.join().is_err() {
                    log::error!("the hypercall probe thread panicked after answering");
                }
                return outcome.map(|o| (o, true));
            }
            Err(RecvTimeoutError::Timeout) if started.elapsed() > 2 * WALL_LIMIT => {
                // The thread decides by WALL_LIMIT at its next kick; one that has not
                // answered by twice that is left behind, with the VM's memory (see `probe`).
                return Ok((Outcome::Undecided(Duration::ZERO), false));
            }
            Err(RecvTimeoutError::Timeout) => {
                // The thread may not have reached KVM_RUN yet: a kick then does nothing, and
                // the next one comes in KICK_EVERY.
                let _ = thread.kill(vcpu::kick_signal());
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(ProbeError::Unexpected("a panic on the probe thread".into()))
            }
        }
    }
}

/// The probe vCPU's `KVM_RUN` loop, on the thread that owns it.
fn run_on_this_thread(mut vcpu: VcpuFd) -> Result<Outcome, ProbeError> {
    let flag: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
    // SAFETY: `flag` points into the `kvm_run` page of `vcpu`, which stays mapped until
    // `vcpu` is dropped at the end of this function; `kick` is declared after `vcpu`'s
    // binding, so it is dropped (clearing the pointer) first, on return and on unwind alike,
    // and on this thread.
    let kick = unsafe { vcpu::KickTarget::install(flag) };
    let cpu_at_start = thread_cpu_time();
    let started = Instant::now();
    let outcome = loop {
        match vcpu.run() {
            Ok(VcpuExit::Hlt) => match vcpu.get_regs() {
                Ok(regs) => break Ok(Outcome::Returned(regs.rax)),
                Err(e) => break Err(ProbeError::Kvm("read the probe vCPU's registers", e)),
            },
            Ok(other) => break Err(ProbeError::Unexpected(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                let cpu = thread_cpu_time().saturating_sub(cpu_at_start);
                if cpu >= CPU_BUDGET {
                    break Ok(Outcome::Looping(cpu));
                }
                if started.elapsed() >= WALL_LIMIT {
                    break Ok(Outcome::Undecided(cpu));
                }
            }
            Err(e) => break Err(ProbeError::Kvm("run the probe vCPU", e)),
        }
    };
    drop(kick);
    outcome
}

/// CPU time this thread has used so far (user and system; zero if the clock cannot be read).
fn thread_cpu_time() -> Duration {
    ClockId::CLOCK_THREAD_CPUTIME_ID
        .now()
        .map_or(Duration::ZERO, Duration::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn vendor(name: &[u8; 12]) -> CpuId {
        let word = |i: usize| u32::from_le_bytes(name[i..i + 4].try_into().unwrap());
        CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: 0,
            ebx: word(0),
            edx: word(4),
            ecx: word(8),
            ..Default::default()
        }])
        .unwrap()
    }

    #[test]
    fn the_probe_uses_the_vendors_hypercall_instruction() {
        assert_eq!(
            &probe_code(&vendor(b"AuthenticAMD"))[5..8],
            &[0x0f, 0x01, 0xd9]
        );
        assert_eq!(
            &probe_code(&vendor(b"HygonGenuine"))[5..8],
            &[0x0f, 0x01, 0xd9]
        );
        assert_eq!(
            &probe_code(&vendor(b"GenuineIntel"))[5..8],
            &[0x0f, 0x01, 0xc1]
        );
        assert_eq!(probe_code(&vendor(b"GenuineIntel"))[8], 0xf4, "then hlt");
    }

    #[test]
    fn only_a_returned_hypercall_offers_the_features() {
        assert_eq!(Outcome::Returned(0).hypercalls(), Hypercalls::Offer);
        assert_eq!(Outcome::Looping(CPU_BUDGET).hypercalls(), Hypercalls::Hide);
        assert_eq!(
            Outcome::Undecided(Duration::ZERO).hypercalls(),
            Hypercalls::Hide
        );
    }

    #[test]
    fn thread_cpu_time_advances_with_work() {
        let before = thread_cpu_time();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        assert!(thread_cpu_time() > before, "{x}");
    }
}
