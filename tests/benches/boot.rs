//! Boot benchmark: isola-core and QEMU (`-M microvm`) side by side, interleaved in one run.
//!
//! For each VMM and guest RAM size, over `ISOLA_BENCH_RUNS` runs (default 20):
//! - start -> first guest instruction: from spawning the process to the arrival on its stdout
//!   of the byte every test guest writes to COM1 as its first instruction;
//! - start -> poweroff: from spawning to process exit for `boot-check`;
//! - teardown: from the arrival of the guest's last line (`boot-check: ok`, written just before
//!   it powers off) to process exit;
//! - resident memory excluding guest RAM (VmRSS - RssShmem, guest RAM being a shared memfd in
//!   both), sampled while the `msi` guest idles.
//!
//! Run with `cargo bench -p isola-tests --bench boot`. QEMU is optional: without
//! `qemu-system-x86_64` only Isola's figures are printed. `ISOLA_BENCH_MEMORY`: comma-separated
//! guest RAM sizes in MiB (default `64,8192`). `ISOLA_BENCH_BASELINE`: a directory holding
//! another build's `isola-core` (e.g. main's `target/release`), timed as one more VMM,
//! interleaved with the others: before and after a change in one run.
//!
//! Two more columns time the minimal-KVM floor (module `floor`): this bench's own binary,
//! started again, making only the KVM ioctls a VM needs and running a few real-mode
//! instructions that print the same last line. "in-kernel irqchip" has Isola's KVM objects
//! (memory slot, then PIC/IOAPIC and PIT); "split irqchip" has QEMU microvm's (LAPIC only).
//! What Isola spends above the first is its own; what the first spends is the host's.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use isola_tests::linux::host_kind;
use isola_tests::{binary, guest};

const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone)]
enum Vmm {
    Isola,
    /// `isola-core` of another build (`ISOLA_BENCH_BASELINE`).
    Baseline(PathBuf),
    Qemu,
    /// The minimal-KVM floor (module `floor`) with these interrupt controllers.
    Floor(floor::Irqchip),
}

impl Vmm {
    fn name(&self) -> &'static str {
        match self {
            Vmm::Isola => "isola-core",
            Vmm::Baseline(_) => "isola-core baseline",
            Vmm::Qemu => "qemu microvm",
            Vmm::Floor(floor::Irqchip::InKernel) => "KVM floor, in-kernel irqchip",
            Vmm::Floor(floor::Irqchip::Split) => "KVM floor, split irqchip",
        }
    }

    fn command(&self, kernel: &Path, cpus: u32, mib: u64) -> Command {
        let isola = |binary: PathBuf| {
            let mut cmd = Command::new(binary);
            cmd.arg("--kernel").arg(kernel).args([
                "--memory",
                &mib.to_string(),
                "--cpus",
                &cpus.to_string(),
            ]);
            cmd
        };
        match self {
            Vmm::Isola => isola(binary("isola-core")),
            Vmm::Baseline(path) => isola(path.clone()),
            Vmm::Qemu => {
                let mut cmd = Command::new("qemu-system-x86_64");
                cmd.args([
                    "-M",
                    "microvm,x-option-roms=off,rtc=off,pit=on,pic=on,isa-serial=on",
                    "-enable-kvm",
                    // QEMU aborts setting MSR_IA32_ARCH_CAPABILITIES on these nested hosts.
                    "-cpu",
                    "host,-arch-capabilities",
                    "-m",
                    &format!("{mib}M"),
                    "-object",
                    &format!("memory-backend-memfd,id=ram,size={mib}M"),
                    "-machine",
                    "memory-backend=ram",
                    "-smp",
                    &cpus.to_string(),
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-no-reboot",
                    "-serial",
                    "stdio",
                    "-device",
                    "isa-debug-exit,iobase=0xf4,iosize=1",
                    "-kernel",
                ]);
                cmd.arg(kernel);
                cmd
            }
            Vmm::Floor(irqchip) => {
                let exe = std::env::current_exe().expect("the bench knows its path");
                let mut cmd = Command::new(exe);
                cmd.env(floor::ENV, format!("{mib},{}", irqchip.arg()));
                cmd
            }
        }
    }
}

struct Boot {
    first_instruction: Duration,
    poweroff: Duration,
    teardown: Duration,
}

/// Starts `vmm` on `kernel` with 1 vCPU and `mib` MiB, its stdout piped.
fn spawn(vmm: &Vmm, kernel: &Path, mib: u64) -> Result<std::process::Child, String> {
    vmm.command(kernel, 1, mib)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{} does not start: {e}", vmm.name()))
}

const LAST_LINE: &str = "boot-check: ok";

/// One boot of `boot-check`: times to the first serial byte, from its last line to process
/// exit, and to process exit.
fn boot_once(vmm: &Vmm, kernel: &Path, mib: u64) -> Result<Boot, String> {
    let start = Instant::now();
    let mut child = spawn(vmm, kernel, mib)?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut first = [0u8; 1];
    let got = stdout.read(&mut first).map_err(|e| e.to_string())?;
    let first_instruction = start.elapsed();
    if got == 0 {
        let _ = child.wait();
        return Err(format!("{} printed nothing", vmm.name()));
    }
    let mut rest = Vec::new();
    let mut buf = [0u8; 4096];
    let mut last_line = None;
    loop {
        let n = stdout.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        rest.extend_from_slice(&buf[..n]);
        if last_line.is_none() && String::from_utf8_lossy(&rest).contains(LAST_LINE) {
            last_line = Some(Instant::now());
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let (end, poweroff) = (Instant::now(), start.elapsed());
    let Some(last_line) = last_line else {
        return Err(format!(
            "{} run did not finish boot-check ({status}): {}",
            vmm.name(),
            String::from_utf8_lossy(&rest)
        ));
    };
    Ok(Boot {
        first_instruction,
        poweroff,
        teardown: end - last_line,
    })
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Resident memory excluding guest RAM, with the `msi` guest idling after its setup.
fn idle_rss_kib(vmm: &Vmm, kernel: &Path, mib: u64) -> Result<u64, String> {
    let mut child = spawn(vmm, kernel, mib)?;
    let mut stdout = child.stdout.take().expect("piped");
    let deadline = Instant::now() + TIMEOUT;
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("msi: ready") {
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("msi guest never got ready".into());
        }
        let n = stdout.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("{} exited early", vmm.name()));
        }
        seen.extend_from_slice(&buf[..n]);
    }
    std::thread::sleep(Duration::from_millis(200));
    let pid = child.id();
    let rss = status_kib(pid, "VmRSS").unwrap_or(0);
    let shmem = status_kib(pid, "RssShmem").unwrap_or(0);
    let _ = child.kill();
    let _ = child.wait();
    Ok(rss.saturating_sub(shmem))
}

fn summary(mut samples: Vec<f64>) -> (f64, f64, f64) {
    samples.sort_by(|a, b| a.total_cmp(b));
    let median = samples[samples.len() / 2];
    (samples[0], median, samples[samples.len() - 1])
}

fn main() {
    if let Ok(spec) = std::env::var(floor::ENV) {
        let (mib, irqchip) = spec.split_once(',').expect("MIB,IRQCHIP");
        let irqchip = match irqchip {
            "split" => floor::Irqchip::Split,
            _ => floor::Irqchip::InKernel,
        };
        floor::run(mib.parse().expect("MiB"), irqchip);
    }
    let runs: usize = std::env::var("ISOLA_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let sizes: Vec<u64> = std::env::var("ISOLA_BENCH_MEMORY")
        .ok()
        .map(|v| v.split(',').filter_map(|w| w.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![64, 8192]);
    // Build and locate the binary before anything is timed.
    let _ = binary("isola-core");
    let boot_check = guest("boot-check.elf");
    let msi = guest("msi.elf");
    let mut vmms = vec![Vmm::Isola];
    if let Some(dir) = std::env::var_os("ISOLA_BENCH_BASELINE") {
        let path = PathBuf::from(dir).join("isola-core");
        if path.exists() {
            vmms.push(Vmm::Baseline(path));
        } else {
            println!("baseline skipped: no {}", path.display());
        }
    }
    match boot_once(&Vmm::Qemu, &boot_check, 64) {
        Ok(_) => vmms.push(Vmm::Qemu),
        Err(e) => println!("QEMU comparison skipped: {e}"),
    }
    vmms.push(Vmm::Floor(floor::Irqchip::InKernel));
    vmms.push(Vmm::Floor(floor::Irqchip::Split));
    for mib in sizes {
        run_size(&vmms, &boot_check, &msi, runs, mib);
    }
}

/// Formats the (min, median, max) of `samples` in ms.
fn cell(samples: &[f64]) -> String {
    let (min, med, max) = summary(samples.to_vec());
    format!("{med:.2} ms [{min:.2}..{max:.2}]")
}

/// Every VMM in `vmms` with `mib` MiB of guest RAM, `runs` boots each, interleaved.
fn run_size(vmms: &[Vmm], boot_check: &Path, msi: &Path, runs: usize, mib: u64) {
    let mut first: Vec<Vec<f64>> = vec![Vec::new(); vmms.len()];
    let mut off: Vec<Vec<f64>> = vec![Vec::new(); vmms.len()];
    let mut down: Vec<Vec<f64>> = vec![Vec::new(); vmms.len()];
    let load_before = load_average();
    for _ in 0..runs {
        for (i, vmm) in vmms.iter().enumerate() {
            let boot = boot_once(vmm, boot_check, mib).unwrap_or_else(|e| panic!("{e}"));
            first[i].push(boot.first_instruction.as_secs_f64() * 1e3);
            off[i].push(boot.poweroff.as_secs_f64() * 1e3);
            down[i].push(boot.teardown.as_secs_f64() * 1e3);
        }
    }
    // The floor runs no `msi` guest: it has no idle state to sample.
    let rss: Vec<Option<f64>> = vmms
        .iter()
        .map(|v| {
            (!matches!(v, Vmm::Floor(_))).then(|| {
                idle_rss_kib(v, msi, mib).unwrap_or_else(|e| panic!("{e}")) as f64 / 1024.0
            })
        })
        .collect();

    println!(
        "boot benchmark: {runs} interleaved runs each, 1 vCPU, {mib} MiB, guest boot-check.elf (PVH); median [min..max]"
    );
    println!(
        "host: {}; load average before/after: {load_before} / {}",
        host_kind().1,
        load_average()
    );
    let header: String = vmms.iter().map(|v| format!("{:>30}", v.name())).collect();
    println!("{:<34}{header}", "");
    for (label, data) in [
        ("start -> first guest instruction", &first),
        ("start -> poweroff (process exit)", &off),
        ("teardown: last line -> exit", &down),
    ] {
        let cols: String = data.iter().map(|d| format!("{:>30}", cell(d))).collect();
        let med = |i: usize| summary(data[i].clone()).1;
        let ratios: Vec<String> = (1..vmms.len())
            .map(|i| format!("{}/isola = {:.2}x", vmms[i].name(), med(i) / med(0)))
            .collect();
        println!("{label:<34}{cols}   {}", ratios.join(", "));
    }
    let cols: String = rss
        .iter()
        .map(|r| format!("{:>30}", r.map_or("-".into(), |r| format!("{r:.2} MiB"))))
        .collect();
    println!("{:<34}{cols}", "RSS excluding guest RAM (idle)");
    let target = if mib <= 64 { 3.0 } else { 8.0 };
    println!(
        "targets at {mib} MiB: first instruction < {target} ms: {}; teardown <= 5 ms: {}; core RSS < 5 MiB: {}",
        met(summary(first[0].clone()).1 < target),
        met(summary(down[0].clone()).1 <= 5.0),
        met(rss[0].is_some_and(|r| r < 5.0)),
    );
}

/// The 1, 5 and 15-minute load averages (the machine is shared: figures mean little without).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

/// The minimal-KVM floor: the bench binary, started again with `FLOOR_ENV` set, makes only the
/// ioctls a VM needs to run one instruction, then runs a real-mode guest that writes
/// `LAST_LINE` to COM1 and powers off through the debug-exit port, and exits with every KVM
/// fd and the guest RAM mapping still open (as `isola-core` does). Timed by the same
/// `boot_once` as the VMMs, it is what the host's KVM costs at the least.
mod floor {
    use std::io::Write;

    use kvm_bindings::{
        kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, KVM_CAP_SPLIT_IRQCHIP,
        KVM_PIT_SPEAKER_DUMMY,
    };
    use kvm_ioctls::{Kvm, VcpuExit};

    pub const ENV: &str = "ISOLA_BENCH_KVM_FLOOR";

    /// Which interrupt controllers the floor VM has.
    #[derive(Clone, Copy)]
    pub enum Irqchip {
        /// In-kernel PIC, IOAPIC and PIT, created after the memory slot: Isola's KVM objects.
        InKernel,
        /// Only the LAPIC in the kernel (KVM_CAP_SPLIT_IRQCHIP), as QEMU's microvm has it.
        Split,
    }

    impl Irqchip {
        pub fn arg(self) -> &'static str {
            match self {
                Irqchip::InKernel => "in-kernel",
                Irqchip::Split => "split",
            }
        }
    }

    const CODE_AT: u64 = 0x1000;
    const COM1: u16 = 0x3f8;
    const DEBUG_EXIT: u16 = 0xf4;

    /// Real mode at `CODE_AT`: `mov dx, COM1; mov si, msg; l: lodsb; test al, al; jz done;
    /// out dx, al; jmp l; done: out DEBUG_EXIT, al; hlt; msg: "\n" LAST_LINE "\n" 0`.
    fn guest_code() -> Vec<u8> {
        let msg = CODE_AT as u16 + 0x11;
        let mut code = vec![0xba, COM1 as u8, (COM1 >> 8) as u8, 0xbe];
        code.extend_from_slice(&msg.to_le_bytes());
        code.extend_from_slice(&[0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8]);
        code.extend_from_slice(&[0xe6, DEBUG_EXIT as u8, 0xf4]);
        assert_eq!(code.len(), 0x11, "the message starts where `msg` says");
        code.extend_from_slice(format!("\n{}\n\0", super::LAST_LINE).as_bytes());
        code
    }

    /// `mib` MiB of shared memfd RAM, mapped; never unmapped (the process exits with it).
    fn guest_ram(mib: u64) -> &'static mut [u8] {
        let size = (mib << 20) as usize;
        // SAFETY: memfd_create with a NUL-terminated name and valid flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"kvm-floor-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: ftruncate on the memfd just created.
        assert_eq!(unsafe { libc::ftruncate(fd, size as libc::off_t) }, 0);
        // SAFETY: a new shared mapping of `size` bytes of the memfd, at an address the kernel
        // picks; the result is checked against MAP_FAILED.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap of guest RAM");
        // SAFETY: `addr` is a live read-write mapping of `size` bytes that is never unmapped
        // (the process exits with it) and that nothing else in this process refers to.
        unsafe { std::slice::from_raw_parts_mut(addr.cast::<u8>(), size) }
    }

    /// Runs the floor VM (see the module's doc) and exits the process.
    pub fn run(mib: u64, irqchip: Irqchip) -> ! {
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let ram = guest_ram(mib);
        let code = guest_code();
        ram[CODE_AT as usize..CODE_AT as usize + code.len()].copy_from_slice(&code);
        let slot = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: mib << 20,
            userspace_addr: ram.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the slot covers exactly the live mapping `ram`, which is never unmapped.
        unsafe { vm.set_user_memory_region(slot) }.expect("KVM_SET_USER_MEMORY_REGION");
        match irqchip {
            Irqchip::InKernel => {
                vm.set_tss_address(0xfffb_d000).expect("KVM_SET_TSS_ADDR");
                vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
                let pit = kvm_pit_config {
                    flags: KVM_PIT_SPEAKER_DUMMY,
                    ..Default::default()
                };
                vm.create_pit2(pit).expect("KVM_CREATE_PIT2");
            }
            Irqchip::Split => {
                let mut cap = kvm_enable_cap {
                    cap: KVM_CAP_SPLIT_IRQCHIP,
                    ..Default::default()
                };
                cap.args[0] = 24;
                vm.enable_cap(&cap).expect("KVM_CAP_SPLIT_IRQCHIP");
            }
        }
        let mut vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let mut sregs = vcpu.get_sregs().expect("KVM_GET_SREGS");
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).expect("KVM_SET_SREGS");
        let regs = kvm_bindings::kvm_regs {
            rip: CODE_AT,
            rflags: 2,
            ..Default::default()
        };
        vcpu.set_regs(&regs).expect("KVM_SET_REGS");
        let mut out = std::io::stdout().lock();
        loop {
            match vcpu.run().expect("KVM_RUN") {
                VcpuExit::IoOut(COM1, data) => {
                    out.write_all(data)
                        .and_then(|()| out.flush())
                        .expect("stdout");
                }
                VcpuExit::IoOut(DEBUG_EXIT, _) | VcpuExit::Hlt => {
                    // Exits with the VM and RAM still open: the kernel tears them down.
                    std::mem::forget((vcpu, vm, kvm));
                    std::process::exit(0)
                }
                exit => panic!("floor guest: unexpected exit {exit:?}"),
            }
        }
    }
}
