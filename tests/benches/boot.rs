//! Boot benchmark: isola-core and QEMU (`-M microvm`) side by side, interleaved in one run.
//!
//! For each VMM, over `ISOLA_BENCH_RUNS` runs (default 20):
//! - start -> first guest instruction: from spawning the process to the arrival on its stdout
//!   of the byte every test guest writes to COM1 as its first instruction;
//! - start -> poweroff: from spawning to process exit for `boot-check`;
//! - resident memory excluding guest RAM (VmRSS - RssShmem, guest RAM being a shared memfd in
//!   both), sampled while the `msi` guest idles.
//!
//! Run with `cargo bench -p isola-tests --bench boot`. QEMU is optional: without
//! `qemu-system-x86_64` only Isola's figures are printed.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use isola_tests::{binary, guest};

const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy)]
enum Vmm {
    Isola,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Isola => "isola-core",
            Vmm::Qemu => "qemu microvm",
        }
    }

    fn command(self, kernel: &Path, cpus: u32) -> Command {
        match self {
            Vmm::Isola => {
                let mut cmd = Command::new(binary("isola-core"));
                cmd.arg("--kernel").arg(kernel).args([
                    "--memory",
                    "64",
                    "--cpus",
                    &cpus.to_string(),
                ]);
                cmd
            }
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
                    "64",
                    "-object",
                    "memory-backend-memfd,id=ram,size=64M",
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
        }
    }
}

struct Boot {
    first_instruction: Duration,
    poweroff: Duration,
}

/// Starts `vmm` on `kernel` with 1 vCPU, its stdout piped.
fn spawn(vmm: Vmm, kernel: &Path) -> Result<std::process::Child, String> {
    vmm.command(kernel, 1)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{} does not start: {e}", vmm.name()))
}

/// One boot of `boot-check`: times to the first serial byte and to process exit.
fn boot_once(vmm: Vmm, kernel: &Path) -> Result<Boot, String> {
    let start = Instant::now();
    let mut child = spawn(vmm, kernel)?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut first = [0u8; 1];
    let got = stdout.read(&mut first).map_err(|e| e.to_string())?;
    let first_instruction = start.elapsed();
    if got == 0 {
        let _ = child.wait();
        return Err(format!("{} printed nothing", vmm.name()));
    }
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).map_err(|e| e.to_string())?;
    let status = child.wait().map_err(|e| e.to_string())?;
    let poweroff = start.elapsed();
    let text = String::from_utf8_lossy(&rest);
    if !text.contains("boot-check: ok") && !text.contains("cpus-started") {
        return Err(format!(
            "{} run did not finish boot-check ({status}): {text}",
            vmm.name()
        ));
    }
    Ok(Boot {
        first_instruction,
        poweroff,
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
fn idle_rss_kib(vmm: Vmm, kernel: &Path) -> Result<u64, String> {
    let mut child = spawn(vmm, kernel)?;
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
    let runs: usize = std::env::var("ISOLA_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    // Build and locate the binary before anything is timed.
    let _ = binary("isola-core");
    let boot_check = guest("boot-check.elf");
    let msi = guest("msi.elf");
    let qemu_ok = boot_once(Vmm::Qemu, &boot_check)
        .map_err(|e| println!("QEMU comparison skipped: {e}"))
        .is_ok();
    let vmms: Vec<Vmm> = if qemu_ok {
        vec![Vmm::Isola, Vmm::Qemu]
    } else {
        vec![Vmm::Isola]
    };

    let mut first: Vec<Vec<f64>> = vec![Vec::new(); vmms.len()];
    let mut off: Vec<Vec<f64>> = vec![Vec::new(); vmms.len()];
    for _ in 0..runs {
        for (i, vmm) in vmms.iter().enumerate() {
            let boot = boot_once(*vmm, &boot_check).unwrap_or_else(|e| panic!("{e}"));
            first[i].push(boot.first_instruction.as_secs_f64() * 1e3);
            off[i].push(boot.poweroff.as_secs_f64() * 1e3);
        }
    }
    let rss: Vec<f64> = vmms
        .iter()
        .map(|v| idle_rss_kib(*v, &msi).unwrap_or_else(|e| panic!("{e}")) as f64 / 1024.0)
        .collect();

    println!(
        "boot benchmark: {runs} interleaved runs each, 1 vCPU, 64 MiB, guest boot-check.elf (PVH)"
    );
    println!(
        "{:<34}{:>28}{:>28}",
        "",
        vmms[0].name(),
        vmms.get(1).map_or("", |v| v.name())
    );
    for (label, data) in [
        ("start -> first guest instruction", &first),
        ("start -> poweroff (process exit)", &off),
    ] {
        let cols: Vec<String> = data
            .iter()
            .map(|d| {
                let (min, med, max) = summary(d.clone());
                format!("{med:.2} ms [{min:.2}..{max:.2}]")
            })
            .collect();
        let ratio = if cols.len() == 2 {
            format!(
                "   qemu/isola = {:.1}x",
                summary(data[1].clone()).1 / summary(data[0].clone()).1
            )
        } else {
            String::new()
        };
        println!(
            "{label:<34}{:>28}{:>28}{ratio}",
            cols[0],
            cols.get(1).map_or("", String::as_str)
        );
    }
    let cols: Vec<String> = rss.iter().map(|r| format!("{r:.2} MiB")).collect();
    println!(
        "{:<34}{:>28}{:>28}",
        "RSS excluding guest RAM (idle)",
        cols[0],
        cols.get(1).map_or("", String::as_str)
    );
    println!(
        "targets: first instruction < 10 ms: {}; core RSS < 5 MiB: {}",
        if summary(first[0].clone()).1 < 10.0 {
            "met"
        } else {
            "NOT met"
        },
        if rss[0] < 5.0 { "met" } else { "NOT met" }
    );
}
