//! Linux boot benchmark: the project's Linux guest (`scripts/linux-guest`: vmlinux through
//! PVH and the busybox initramfs) in isola-core and in `qemu-system-x86_64 -M microvm`,
//! interleaved in one run, 1 vCPU, 256 MiB, no devices beyond the serial port:
//! - start -> the kernel's first console line;
//! - start -> `/init` running (its `ISOLA-INIT` line);
//! - start -> exit after the guest's ACPI poweroff (Isola only: QEMU's microvm powers off
//!   through its own GED device, which this kernel's configuration leaves out, so QEMU is
//!   stopped once /init has run).
//!
//! Run with `cargo bench -p isola-tests --bench linux-boot` (`ISOLA_BENCH_RUNS`, default 3:
//! each boot takes 20-60 s on a nested kvm_pvm host). The medians' ratios are the result:
//! both VMMs run under the same emulation, so a ratio from one run is a fair comparison.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use isola_tests::binary;
use isola_tests::linux::{host_kind, image, Image, BASE_CMDLINE};

const TIMEOUT: Duration = Duration::from_secs(600);

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

    fn spawn(self, image: &Image) -> Result<Child, String> {
        // earlyprintk: the first line leaves the kernel at once, not when the console
        // driver registers and replays its buffer.
        let cmdline = format!("{BASE_CMDLINE} earlyprintk=serial,ttyS0,115200 isola_checks=");
        let mut cmd = match self {
            Vmm::Isola => {
                let mut cmd = Command::new(binary("isola-core"));
                cmd.arg("--kernel")
                    .arg(&image.vmlinux)
                    .arg("--initrd")
                    .arg(&image.initramfs)
                    .args(["--memory", "256", "--cpus", "1", "--cmdline", &cmdline]);
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
                    "256",
                    "-smp",
                    "1",
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-no-reboot",
                    "-serial",
                    "stdio",
                    "-append",
                    &cmdline,
                    "-kernel",
                ])
                .arg(&image.vmlinux)
                .arg("-initrd")
                .arg(&image.initramfs);
                cmd
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{} does not start: {e}", self.name()))
    }
}

struct Boot {
    first_line: Duration,
    init: Duration,
    poweroff: Option<Duration>,
}

/// One boot: times to the first console line, to /init, and (Isola) to exit.
fn boot_once(vmm: Vmm, image: &Image) -> Result<Boot, String> {
    let start = Instant::now();
    let mut child = vmm.spawn(image)?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let mut first_line = None;
    let mut seen = Vec::new();
    let init = loop {
        let left = (start + TIMEOUT).saturating_duration_since(Instant::now());
        let Ok((at, line)) = rx.recv_timeout(left) else {
            let _ = child.kill();
            let _ = child.wait();
            let tail: Vec<String> = seen.iter().rev().take(20).rev().cloned().collect();
            return Err(format!(
                "{} never reached /init; last lines:\n{}",
                vmm.name(),
                tail.join("\n")
            ));
        };
        first_line.get_or_insert(at - start);
        if line.contains("ISOLA-INIT") {
            break at - start;
        }
        seen.push(line);
    };
    let poweroff = match vmm {
        Vmm::Isola => {
            let deadline = start + TIMEOUT;
            loop {
                if child.try_wait().map_err(|e| e.to_string())?.is_some() {
                    break Some(start.elapsed());
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    return Err("isola-core did not exit after the guest's poweroff".into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Vmm::Qemu => {
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    };
    Ok(Boot {
        first_line: first_line.expect("a line came"),
        init,
        poweroff,
    })
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

fn main() {
    let runs: usize = std::env::var("ISOLA_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    println!("host: {}", host_kind().1);
    let image = match image() {
        Ok(image) => image,
        Err(why) => {
            println!("SKIPPED: linux-boot: {why}");
            return;
        }
    };
    let _ = binary("isola-core");
    let qemu = Path::new("/usr/bin/qemu-system-x86_64").exists()
        || Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_ok();
    let vmms: Vec<Vmm> = if qemu {
        vec![Vmm::Isola, Vmm::Qemu]
    } else {
        println!("QEMU comparison skipped: qemu-system-x86_64 is not installed");
        vec![Vmm::Isola]
    };
    let mut first = vec![Vec::new(); vmms.len()];
    let mut init = vec![Vec::new(); vmms.len()];
    let mut off = Vec::new();
    for run in 0..runs {
        for (i, vmm) in vmms.iter().enumerate() {
            let boot = boot_once(*vmm, &image).unwrap_or_else(|e| panic!("{e}"));
            println!(
                "run {run} {:<13} first line {:>7.2} s   /init {:>7.2} s{}",
                vmm.name(),
                boot.first_line.as_secs_f64(),
                boot.init.as_secs_f64(),
                boot.poweroff.map_or(String::new(), |p| format!(
                    "   poweroff {:>7.2} s",
                    p.as_secs_f64()
                ))
            );
            first[i].push(boot.first_line.as_secs_f64());
            init[i].push(boot.init.as_secs_f64());
            if let Some(p) = boot.poweroff {
                off.push(p.as_secs_f64());
            }
        }
    }
    println!("\nmedians over {runs} run(s), seconds (1 vCPU, 256 MiB, no devices):");
    println!("{:<14}{:>12}{:>12}", "", "first line", "/init");
    for (i, vmm) in vmms.iter().enumerate() {
        println!(
            "{:<14}{:>12.2}{:>12.2}",
            vmm.name(),
            median(first[i].clone()),
            median(init[i].clone())
        );
    }
    if !off.is_empty() {
        println!("isola-core poweroff (exit): {:.2} s", median(off));
    }
    if vmms.len() == 2 {
        println!(
            "ratio isola/qemu: first line {:.2}, /init {:.2}",
            median(first[0].clone()) / median(first[1].clone()),
            median(init[0].clone()) / median(init[1].clone())
        );
    }
}
