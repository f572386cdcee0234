//! The project's Linux guest (`scripts/linux-guest`) on two vCPUs: both come up, `/init` runs,
//! and `/proc/cpuinfo` shows two CPUs in one package.
//!
//! Why this once hung on the nested kvm_pvm host, right after CPU 1 printed
//! "smpboot: CPU 1 Converting physical 0 to logical die 1": CPU 1 was inside a `vmmcall`
//! (KVM_HC_SEND_IPI: Linux sends IPIs by hypercall when CPUID leaf 0x40000001 offers
//! PV_SEND_IPI) that never returns on that host, and CPU 0 spun on a lock CPU 1 held. The
//! host's KVM emulates guest ring 0, and its emulator answers a hypercall instruction by
//! rewriting it and executing it again, forever. Isola now offers the hypercall-based KVM
//! features only where a probe hypercall returns (`core-vmm/src/cpu/hypercall.rs`). The "die
//! 1" line was a second, harmless Isola bug: leaf 0xb had no core level on that AMD host, so
//! Linux made each vCPU a package of its own (`cpu/cpuid.rs` now always describes one).
//!
//! Before Linux boots, the `cpu-check` guest tells which kind of host this is for hypercalls
//! (they return, or they never do), and the test names it, so a failure here says whether it
//! happened where Isola must hide those features.
//!
//! A third hang on that host came after CPU 1's bring-up: pid 1 spun before `/init` in the
//! kernel's own `ptp_kvm_init`, whose KVM_HC_CLOCK_PAIRING hypercall no CPUID bit gates (its
//! kernel stack, read from guest RAM: `kernel_init_freeable` -> `ptp_kvm_init` ->
//! `kvm_arch_ptp_init` -> `kvm_hypercall2`). The guest's config now leaves
//! CONFIG_PTP_1588_CLOCK_KVM off (`tests/linux/config`).

use std::time::{Duration, Instant};

use isola_tests::linux::{deadlines, host_kind, image, say, BASE_CMDLINE};
use isola_tests::supervisor::Launch;
use isola_tests::{guest, scratch_dir, skip, Core, Missing};

/// How long the smp check may take once /init runs (it reads /proc, no device I/O).
const CHECK: Duration = Duration::from_secs(240);

/// Whether a KVM hypercall made in guest ring 0 returns on this host, from the `cpu-check`
/// guest's own report: (returns, its line).
fn hypercalls_return() -> (bool, String) {
    let kernel = guest("cpu-check.elf");
    let core = Core::start(&[
        "--kernel",
        kernel.to_str().expect("utf-8 path"),
        "--cpus",
        "2",
        "--memory",
        "64",
    ]);
    let done = core.finish(Duration::from_secs(120));
    let line = done
        .serial
        .iter()
        .find(|l| l.starts_with("hypercall: "))
        .unwrap_or_else(|| {
            panic!(
                "cpu-check gave no hypercall line (exit {:?}):\n{}\n{}",
                done.status,
                done.serial.join("\n"),
                done.stderr
            )
        })
        .clone();
    (line.starts_with("hypercall: returned"), line)
}

#[test]
fn linux_boots_on_two_vcpus_in_one_package() {
    say(format!("host is {}", host_kind().1));
    let image = match image() {
        Ok(image) => image,
        Err(why) => {
            skip(Missing::Installable, why);
            return;
        }
    };
    let (returns, line) = hypercalls_return();
    say(format!(
        "host condition: {} (cpu-check: {line})",
        if returns {
            "KVM hypercalls from guest ring 0 return: PV IPIs offered to Linux"
        } else {
            "KVM hypercalls from guest ring 0 never return: Isola must hide PV IPIs, PV sched \
             yield and PV unhalt, or CPU 1 hangs in its first IPI"
        }
    ));

    let scratch = scratch_dir("linux-smp");
    let (to_init, total) = deadlines();
    let started = Instant::now();
    let cmdline = format!("{BASE_CMDLINE} isola_checks=smp");
    let mut launch = Launch::start(
        &scratch.join("run"),
        &[
            "--kernel",
            image.vmlinux.to_str().expect("utf-8 path"),
            "--initrd",
            image.initramfs.to_str().expect("utf-8 path"),
            "--cmdline",
            &cmdline,
            "--memory",
            "256",
            "--cpus",
            "2",
        ],
    );
    let brought_up = wait(&mut launch, "smp: Brought up ", to_init, started);
    let packages = wait(
        &mut launch,
        "smpboot: Max logical packages: ",
        to_init,
        started,
    );
    say(format!(
        "CPU 1 up {:.1} s after start: {}",
        started.elapsed().as_secs_f64(),
        brought_up.trim()
    ));
    let console = launch.stdout.seen.join("\n");
    assert!(
        brought_up.contains("1 node, 2 CPUs"),
        "Linux did not bring up both vCPUs: {brought_up}"
    );
    assert!(
        packages.trim_end().ends_with("packages: 1") && !console.contains("Converting physical"),
        "Linux put the vCPUs in more than one package:\n{}",
        lines_with(&console, &["smpboot", "Converting"])
    );
    if !returns {
        assert!(
            !console.contains("kvm-guest: setup PV IPIs"),
            "Linux set up PV IPIs on a host whose hypercalls never return:\n{}",
            lines_with(&console, &["kvm-guest"])
        );
    }

    wait(&mut launch, "ISOLA-INIT", to_init, started);
    say(format!(
        "/init reached {:.1} s after start",
        started.elapsed().as_secs_f64()
    ));
    let smp = wait(&mut launch, "ISOLA-CHECK smp ", CHECK, started);
    let smp = smp.split_once("ISOLA-CHECK smp ").map_or("", |(_, r)| r);
    assert!(
        smp.contains("cpus=2 online=0-1"),
        "Linux did not bring up both vCPUs: {smp}"
    );
    assert!(
        smp.contains("physical_ids=0 "),
        "Linux put the vCPUs in more than one package: {smp}"
    );
    assert!(
        smp.ends_with("initial_apicids=0,1"),
        "CPUID's APIC ids are not the vCPU indexes: {smp}"
    );
    say(format!("smp: {smp}"));
    wait(&mut launch, "ISOLA-DONE", CHECK, started);
    let left = total.saturating_sub(started.elapsed());
    let status = launch.finish(left.max(Duration::from_secs(30)));
    assert!(
        status.success(),
        "the VM did not end cleanly after the guest's poweroff: {status}\n{}",
        launch.report()
    );
}

/// Waits for a console line containing `needle`; panics with the last console lines after
/// `timeout`.
fn wait(launch: &mut Launch, needle: &str, timeout: Duration, started: Instant) -> String {
    if let Some(line) = launch.stdout.wait_for(needle, timeout) {
        return line;
    }
    let seen = &launch.stdout.seen;
    let last = seen[seen.len().saturating_sub(40)..].join("\n");
    let errors = launch.stderr.drain(Duration::from_millis(200)).join("\n");
    panic!(
        "no console line with {needle:?} after {:.1} s ({})\nlast console lines:\n{last}\n\
         isola-run stderr:\n{errors}",
        started.elapsed().as_secs_f64(),
        host_kind().1
    );
}
/// The console lines containing any of `needles`, for a failure message.
fn lines_with(console: &str, needles: &[&str]) -> String {
    console
        .lines()
        .filter(|l| needles.iter().any(|n| l.contains(n)))
        .collect::<Vec<_>>()
        .join("\n")
}
