//! The core boots the `boot-check` guest by both entry paths and the guest reports exactly
//! what the boot protocol handed it.

use std::time::Duration;

use isola_tests::{guest, scratch_dir, skip, Core, Missing};

const TIMEOUT: Duration = Duration::from_secs(60);
const CMDLINE: &str = "console=ttyS0 isola.test=\"quoted value\" root=/dev/vda1 -- init-arg";

/// The e820 map the core documents in `core-vmm/src/layout.rs`, written out independently.
fn expected_e820(mem: u64) -> Vec<String> {
    let line =
        |start: u64, size: u64, kind: u32| format!("e820: {start:#018x} {size:#018x} {kind}");
    let mut map = vec![line(0, 0x9fc00, 1), line(0x9fc00, 0x400, 2)];
    let low_end = mem.min(3 << 30);
    map.push(line(0x10_0000, low_end - 0x10_0000, 1));
    map.push(line(0xe000_0000, 0x10_0000, 2));
    if mem > 3 << 30 {
        map.push(line(4 << 30, mem - (3 << 30), 1));
    }
    map
}

fn make_initrd(dir: &std::path::Path, size: usize) -> (std::path::PathBuf, u32) {
    // Deterministic, non-repeating bytes so a misplaced page changes the checksum.
    let mut state = 0x1234_5678_u32;
    let bytes: Vec<u8> = (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect();
    let path = dir.join("initrd.img");
    std::fs::write(&path, &bytes).unwrap();
    (path, crc32fast::hash(&bytes))
}

fn boot_check(image: &str, protocol: &str, cpus: u32, mem_mib: u64) {
    let dir = scratch_dir(&format!("boot-{image}-{cpus}-{mem_mib}"));
    let (initrd, crc) = make_initrd(&dir, 300_001);
    let cpus_arg = cpus.to_string();
    let mem_arg = mem_mib.to_string();
    let kernel = guest(image);
    let core = Core::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        CMDLINE,
        "--cpus",
        &cpus_arg,
        "--memory",
        &mem_arg,
        "--cpu-features",
        "-cx16,-xsave",
    ]);
    let done = core.finish(TIMEOUT);
    let serial = &done.serial;
    assert!(
        done.status.success(),
        "exit {:?}\nserial:\n{}\nstderr:\n{}",
        done.status,
        serial.join("\n"),
        done.stderr
    );

    let lines: Vec<&str> = serial
        .iter()
        .map(String::as_str)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        lines.first().copied(),
        Some(format!("boot-check: protocol={protocol}").as_str()),
        "{serial:?}"
    );
    assert!(
        lines.contains(&format!("cmdline: {CMDLINE}").as_str()),
        "{serial:?}"
    );

    let map = expected_e820(mem_mib << 20);
    assert!(
        lines.contains(&format!("e820: entries={}", map.len()).as_str()),
        "{serial:?}"
    );
    let got_map: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("e820: 0x"))
        .collect();
    assert_eq!(got_map, map.iter().map(String::as_str).collect::<Vec<_>>());

    let initrd_line = lines
        .iter()
        .find(|l| l.starts_with("initrd: "))
        .expect("an initrd line");
    assert!(
        initrd_line.ends_with(&format!("size=300001 crc32={crc:#010x}")),
        "{initrd_line}"
    );

    assert!(
        lines.contains(&format!("cpus-described: {cpus}").as_str()),
        "{serial:?}"
    );
    let started: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("cpu-started: "))
        .collect();
    let expected: Vec<String> = (1..cpus)
        .map(|id| format!("cpu-started: apic-id={id}"))
        .collect();
    assert_eq!(started, expected);
    assert!(
        lines.contains(&format!("cpus-started: {cpus}").as_str()),
        "{serial:?}"
    );
    assert_eq!(lines.last().copied(), Some("boot-check: ok"));
}

#[test]
fn pvh_elf_one_cpu() {
    boot_check("boot-check.elf", "pvh", 1, 64);
}

#[test]
fn pvh_elf_two_cpus() {
    boot_check("boot-check.elf", "pvh", 2, 64);
}

#[test]
fn pvh_elf_four_cpus() {
    boot_check("boot-check.elf", "pvh", 4, 64);
}

#[test]
fn bzimage_one_cpu() {
    boot_check("boot-check.bzimage", "linux64", 1, 64);
}

#[test]
fn bzimage_two_cpus() {
    boot_check("boot-check.bzimage", "linux64", 2, 64);
}

#[test]
fn bzimage_four_cpus() {
    boot_check("boot-check.bzimage", "linux64", 4, 64);
}

/// More than 3 GiB: RAM is split around the 32-bit MMIO hole and the map says so.
#[test]
fn ram_above_the_mmio_hole() {
    boot_check("boot-check.elf", "pvh", 2, 4096);
    boot_check("boot-check.bzimage", "linux64", 1, 4096);
}

#[test]
fn triple_fault_is_reported_with_registers() {
    let kernel = guest("triple-fault.elf");
    let core = Core::start(&["--kernel", kernel.to_str().unwrap(), "--memory", "32"]);
    let done = core.finish(TIMEOUT);
    assert!(
        done.serial
            .iter()
            .any(|l| l == "triple-fault: faulting now"),
        "{:?}",
        done.serial
    );
    assert_eq!(done.status.code(), Some(3), "stderr: {}", done.stderr);
    let first = done
        .stderr
        .lines()
        .find(|l| l.starts_with("isola-core: "))
        .expect("a reason line");
    assert_eq!(first, "isola-core: guest crashed: triple fault on vcpu0");
    for reg in ["rip=0x", "rsp=0x", "cr0=0x", "cr3=0x", "idt base="] {
        assert!(
            done.stderr.contains(reg),
            "register dump lacks {reg}: {}",
            done.stderr
        );
    }
}

#[test]
fn serial_log_receives_the_guest_output() {
    let dir = scratch_dir("serial-log");
    let log = dir.join("serial.log");
    let kernel = guest("boot-check.elf");
    let core = Core::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "32",
        "--cmdline",
        "logged",
        "--serial-log",
        log.to_str().unwrap(),
    ]);
    let done = core.finish(TIMEOUT);
    assert!(done.status.success(), "{}", done.stderr);
    assert!(
        done.serial.is_empty(),
        "output went to the log, not stdout: {:?}",
        done.serial
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("cmdline: logged\n") && text.ends_with("boot-check: ok\n"),
        "{text}"
    );
}

#[test]
fn i8042_reset_ends_the_vm() {
    let kernel = guest("boot-check.elf");
    let core = Core::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "32",
        "--cmdline",
        "boot-check.end=reset",
    ]);
    let done = core.finish(TIMEOUT);
    assert_eq!(
        done.serial.last().map(String::as_str),
        Some("boot-check: resetting"),
        "{:?}",
        done.serial
    );
    assert!(done.status.success(), "{:?} {}", done.status, done.stderr);
    assert!(
        done.stderr.contains("guest requested a reset"),
        "{}",
        done.stderr
    );
}

/// Reads a /proc/meminfo counter.
fn meminfo(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Guest RAM on 2 MiB huge pages. The test reserves the pages it needs (as root) and gives
/// them back afterwards; it says so and returns if the host cannot reserve them.
#[test]
fn hugepage_backed_guest_boots() {
    const NEEDED: u64 = 32; // 64 MiB
    let knob = "/proc/sys/vm/nr_hugepages";
    let before: u64 = std::fs::read_to_string(knob)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let free = meminfo("HugePages_Free");
    if free < NEEDED && std::fs::write(knob, (before + NEEDED - free).to_string()).is_err() {
        return skip(Missing::Host, "cannot reserve huge pages (not root?)");
    }
    if meminfo("HugePages_Free") < NEEDED {
        let _ = std::fs::write(knob, before.to_string());
        return skip(
            Missing::Host,
            format!("the host could not reserve {NEEDED} huge pages"),
        );
    }
    let kernel = guest("boot-check.elf");
    let core = Core::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--hugepages",
        "--cpus",
        "2",
    ]);
    let done = core.finish(TIMEOUT);
    let _ = std::fs::write(knob, before.to_string());
    assert!(
        done.status.success(),
        "{:?} {} {:?}",
        done.status,
        done.stderr,
        done.serial
    );
    assert_eq!(
        done.serial.last().map(String::as_str),
        Some("boot-check: ok")
    );
}
