//! What each vCPU's CPUID tells a guest kernel about the machine, read by the `cpu-check`
//! guest in ring 0 on every vCPU: its APIC id in every leaf that carries one, and one package
//! whose cores the APIC ids number (leaf 0xb's core level, AMD's 0x80000008/0x8000001e),
//! which is how Linux computes package and die ids. And: the KVM paravirtual features that
//! work by hypercall (PV IPIs, PV sched yield, PV unhalt) are offered only if a hypercall made
//! in guest ring 0 returns on this host. On the nested kvm_pvm host it never does (KVM's
//! instruction emulator rewrites the hypercall instruction and re-executes it, emulated again,
//! forever): Linux with PV IPIs then hangs in the first IPI CPU 1 sends.

use std::collections::HashMap;
use std::time::Duration;

use isola_tests::linux::host_kind;
use isola_tests::{guest, Core};

const TIMEOUT: Duration = Duration::from_secs(120);

const KVM_FEATURE_PV_UNHALT: u32 = 7;
const KVM_FEATURE_PV_SEND_IPI: u32 = 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 13;
const HYPERCALL_FEATURES: [(u32, &str); 3] = [
    (KVM_FEATURE_PV_UNHALT, "PV_UNHALT"),
    (KVM_FEATURE_PV_SEND_IPI, "PV_SEND_IPI"),
    (KVM_FEATURE_PV_SCHED_YIELD, "PV_SCHED_YIELD"),
];

/// (APIC id, ring, leaf, subleaf) -> [eax, ebx, ecx, edx].
type Cpuid = HashMap<(u32, u32, u32, u32), [u32; 4]>;

struct Report {
    cpuid: Cpuid,
    hypercall: String,
    serial: String,
}

fn field(line: &str, key: &str) -> u32 {
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"));
    match value.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => value.parse(),
    }
    .unwrap_or_else(|e| panic!("bad {key} in {line:?}: {e}"))
}

fn run_cpu_check(cpus: u32, cmdline: &str) -> Report {
    let kernel = guest("cpu-check.elf");
    let cpus_arg = cpus.to_string();
    let core = Core::start(&[
        "--kernel",
        kernel.to_str().expect("utf-8 path"),
        "--cpus",
        &cpus_arg,
        "--memory",
        "64",
        "--cmdline",
        cmdline,
    ]);
    let done = core.finish(TIMEOUT);
    let serial = done.serial.join("\n");
    assert!(
        done.status.success() && serial.contains("cpu-check: ok"),
        "exit {:?}\nserial:\n{serial}\nstderr:\n{}",
        done.status,
        done.stderr
    );
    let mut cpuid = Cpuid::new();
    for line in done.serial.iter().filter(|l| l.starts_with("cpuid: ")) {
        let key = (
            field(line, "cpu"),
            field(line, "ring"),
            field(line, "leaf"),
            field(line, "sub"),
        );
        let regs = ["eax", "ebx", "ecx", "edx"].map(|r| field(line, r));
        assert!(cpuid.insert(key, regs).is_none(), "twice: {line}");
    }
    let hypercall = done
        .serial
        .iter()
        .find(|l| l.starts_with("hypercall: "))
        .unwrap_or_else(|| panic!("no hypercall line:\n{serial}"))
        .clone();
    Report {
        cpuid,
        hypercall,
        serial,
    }
}

impl Report {
    fn get(&self, apic: u32, leaf: u32, sub: u32) -> [u32; 4] {
        *self
            .cpuid
            .get(&(apic, 0, leaf, sub))
            .unwrap_or_else(|| panic!("cpu {apic} leaf {leaf:#x}.{sub} missing:\n{}", self.serial))
    }
}

/// Checks, for every vCPU, the topology leaves as Linux 6.1 reads them (detect_extended_topology,
/// early_init_amd_mc / amd_get_topology): its own APIC id everywhere, one package.
fn one_package_numbered_by_apic_id(cpus: u32) {
    // No hypercall: where it never returns, its vCPU would spin in the host until the end.
    let report = run_cpu_check(cpus, "cpu-check.hypercall=0");
    for apic in 0..cpus {
        let ctx = |what: &str| format!("cpu {apic}: {what}\n{}", report.serial);
        let [_, ebx, _, edx] = report.get(apic, 1, 0);
        assert_eq!(ebx >> 24, apic, "{}", ctx("leaf 1 initial APIC id"));
        assert_eq!(
            (ebx >> 16) & 0xff,
            cpus,
            "{}",
            ctx("leaf 1 logical CPU count")
        );
        assert_eq!(edx >> 28 & 1, u32::from(cpus > 1), "{}", ctx("leaf 1 HTT"));

        let [eax0, ebx0, ecx0, edx0] = report.get(apic, 0xb, 0);
        assert_eq!(edx0, apic, "{}", ctx("leaf 0xb.0 x2APIC id"));
        assert_eq!(
            ((ecx0 >> 8) & 0xff, ebx0 & 0xffff, eax0 & 0x1f),
            (1, 1, 0),
            "{}",
            ctx("leaf 0xb.0: SMT level, one thread, shift 0")
        );
        let [eax1, ebx1, ecx1, edx1] = report.get(apic, 0xb, 1);
        assert_eq!(
            (ecx1 >> 8) & 0xff,
            2,
            "{}",
            ctx("leaf 0xb.1 is the core level")
        );
        assert_eq!(edx1, apic, "{}", ctx("leaf 0xb.1 x2APIC id"));
        assert_eq!(
            ebx1 & 0xffff,
            cpus,
            "{}",
            ctx("leaf 0xb.1 logical CPUs in the package")
        );
        let shift = eax1 & 0x1f;
        assert!(
            1u64 << shift >= u64::from(cpus),
            "{}",
            ctx("leaf 0xb.1 shift too small")
        );
        assert_eq!(
            apic >> shift,
            0,
            "{}",
            ctx("package id (APIC id >> core shift)")
        );

        let amd = report.get(apic, 0, 0)[1] == u32::from_le_bytes(*b"Auth");
        let topoext = report.get(apic, 0x8000_0001, 0)[2] >> 22 & 1 == 1;
        if amd {
            let ecx = report.get(apic, 0x8000_0008, 0)[2];
            assert_eq!(
                (ecx & 0xff) + 1,
                cpus,
                "{}",
                ctx("0x80000008 cores per package")
            );
            assert_eq!(
                apic >> ((ecx >> 12) & 0xf),
                0,
                "{}",
                ctx("0x80000008 APIC id size")
            );
        }
        if amd && topoext {
            let [eax, ebx, ecx, _] = report.get(apic, 0x8000_001e, 0);
            assert_eq!(eax, apic, "{}", ctx("0x8000001e extended APIC id"));
            assert_eq!(
                (ebx >> 8) & 0xff,
                0,
                "{}",
                ctx("0x8000001e one thread per core")
            );
            assert_eq!(ecx & 0xff, 0, "{}", ctx("0x8000001e node (Linux's die id)"));
        }
    }
}

#[test]
fn two_vcpus_are_one_package_numbered_by_apic_id() {
    one_package_numbered_by_apic_id(2);
}

#[test]
fn four_vcpus_are_one_package_numbered_by_apic_id() {
    one_package_numbered_by_apic_id(4);
}

/// The host condition behind the Linux two-vCPU hang, and Isola's answer to it: if a hypercall
/// made in ring 0 does not return, no vCPU may be offered a feature that needs one.
#[test]
fn hypercall_features_are_offered_only_where_hypercalls_return() {
    let report = run_cpu_check(2, "");
    let returned = report.hypercall.starts_with("hypercall: returned");
    eprintln!(
        "cpu_topology: host is {}; {}",
        host_kind().1,
        if returned {
            "KVM hypercalls return here"
        } else {
            "KVM hypercalls made in guest ring 0 never return here"
        }
    );
    if returned {
        assert!(
            report.hypercall.ends_with("rax=0x0"),
            "{}",
            report.hypercall
        );
        return;
    }
    assert!(
        report.hypercall.contains("state=1"),
        "the AP never reached the hypercall:\n{}",
        report.serial
    );
    for apic in 0..2 {
        let features = report.get(apic, 0x4000_0001, 0)[0];
        let offered: Vec<&str> = HYPERCALL_FEATURES
            .iter()
            .filter(|(bit, _)| features >> bit & 1 == 1)
            .map(|(_, name)| *name)
            .collect();
        assert!(
            offered.is_empty(),
            "cpu {apic} is offered {offered:?} (0x40000001 eax={features:#x}) although a \
             hypercall never returns on this host ({})",
            report.hypercall
        );
    }
}
