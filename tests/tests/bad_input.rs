//! Every bad input gets one clear line on stderr and exit status 2, never a panic.

use std::time::Duration;

use isola_tests::{guest, scratch_dir, Core};

/// Runs the core with `args`, expects exit 2 and an error line containing each of `needles`.
fn refused(args: &[&str], needles: &[&str]) {
    let done = Core::start(args).finish(Duration::from_secs(60));
    let errors: Vec<&str> = done
        .stderr
        .lines()
        .filter(|l| l.starts_with("isola-core: error:") || l.starts_with("error:"))
        .collect();
    assert_eq!(
        done.status.code(),
        Some(2),
        "args {args:?}: {}",
        done.stderr
    );
    assert!(!done.stderr.contains("panicked"), "{}", done.stderr);
    assert_eq!(
        errors.len(),
        1,
        "exactly one error line for {args:?}: {}",
        done.stderr
    );
    for needle in needles {
        assert!(
            errors[0].contains(needle),
            "{:?} lacks {needle:?}",
            errors[0]
        );
    }
    assert!(done.serial.is_empty(), "no guest ran: {:?}", done.serial);
}

fn elf() -> String {
    guest("boot-check.elf").to_str().unwrap().to_owned()
}

fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn missing_unreadable_empty_and_garbage_kernels() {
    let dir = scratch_dir("bad-kernel");
    refused(
        &["--kernel", "/nonexistent/vmlinux"],
        &["cannot read kernel /nonexistent/vmlinux", "No such file"],
    );
    refused(
        &["--kernel", dir.to_str().unwrap()],
        &["cannot read kernel", "Is a directory"],
    );
    let empty = write(&dir, "empty", b"");
    refused(
        &["--kernel", &empty],
        &["neither an ELF vmlinux nor a bzImage"],
    );
    let garbage = write(&dir, "garbage", &[0x90; 8192]);
    refused(
        &["--kernel", &garbage],
        &["neither an ELF vmlinux nor a bzImage"],
    );
    let mut elf32 = vec![0u8; 4096];
    elf32[..4].copy_from_slice(b"\x7fELF");
    elf32[4] = 1;
    let elf32 = write(&dir, "elf32", &elf32);
    refused(&["--kernel", &elf32], &["not a 64-bit x86 one"]);
    // A truncated copy of a real ELF guest: headers fine, segments missing.
    let real = std::fs::read(elf()).unwrap();
    let truncated = write(&dir, "truncated.elf", &real[..200.min(real.len())]);
    refused(&["--kernel", &truncated], &["could not be loaded"]);
    // A bzImage header from before the 64-bit entry point (protocol 2.11).
    let mut old = std::fs::read(guest("boot-check.bzimage")).unwrap();
    old[0x206..0x208].copy_from_slice(&0x020bu16.to_le_bytes());
    let old = write(&dir, "old.bzimage", &old);
    refused(&["--kernel", &old], &["has no 64-bit entry point", "0x20b"]);
}

#[test]
fn missing_and_oversized_initrd() {
    let dir = scratch_dir("bad-initrd");
    refused(
        &["--kernel", &elf(), "--initrd", "/nonexistent/initrd"],
        &["cannot read initrd /nonexistent/initrd"],
    );
    // Root reads any file, so a directory stands in for an unreadable initrd.
    refused(
        &["--kernel", &elf(), "--initrd", dir.to_str().unwrap()],
        &["cannot read initrd", "Is a directory"],
    );
    let big = dir.join("big.img");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    refused(
        &[
            "--kernel",
            &elf(),
            "--memory",
            "16",
            "--initrd",
            big.to_str().unwrap(),
        ],
        &["initrd", "(20971520 bytes) does not fit"],
    );
}

#[test]
fn command_line_too_long() {
    let long = "a".repeat(3000);
    refused(
        &["--kernel", &elf(), "--cmdline", &long],
        &["command line is 3000 bytes", "at most 2047"],
    );
    let bz = guest("boot-check.bzimage");
    refused(
        &["--kernel", bz.to_str().unwrap(), "--cmdline", &long],
        &["command line is 3000 bytes"],
    );
}

#[test]
fn memory_zero_or_more_than_the_host() {
    refused(
        &["--kernel", &elf(), "--memory", "0"],
        &["--memory 0 MiB is less than"],
    );
    refused(
        &["--kernel", &elf(), "--memory", "100000000"],
        &["--memory 100000000 MiB is more than this host has"],
    );
    refused(&["--kernel", &elf(), "--memory=-5"], &["--memory"]);
    refused(&["--kernel", &elf(), "--memory", "many"], &["--memory"]);
}

#[test]
fn cpus_zero_or_too_many() {
    refused(
        &["--kernel", &elf(), "--cpus", "0"],
        &["--cpus must be at least 1"],
    );
    refused(
        &["--kernel", &elf(), "--cpus", "255"],
        &["--cpus 255 is more than the 254"],
    );
    refused(&["--kernel", &elf(), "--cpus", "99999999999"], &["--cpus"]);
}

#[test]
fn unknown_cpu_feature() {
    refused(
        &["--kernel", &elf(), "--cpu-features", "-cx16,-warpdrive"],
        &["unknown CPU feature 'warpdrive'"],
    );
    refused(
        &["--kernel", &elf(), "--cpu-features", "+avx"],
        &["must start with '-'"],
    );
}

#[test]
fn unwritable_serial_log_and_control_socket() {
    refused(
        &[
            "--kernel",
            &elf(),
            "--serial-log",
            "/nonexistent/dir/serial.log",
        ],
        &["cannot open serial log"],
    );
    refused(
        &[
            "--kernel",
            &elf(),
            "--control-socket",
            "/nonexistent/dir/ctl.sock",
        ],
        &["cannot create control socket"],
    );
    // A file that is not a socket is refused, and left as it was.
    let dir = isola_tests::scratch_dir("control-not-a-socket");
    let file = dir.join("notes.txt");
    std::fs::write(&file, b"keep me").unwrap();
    refused(
        &[
            "--kernel",
            &elf(),
            "--control-socket",
            file.to_str().unwrap(),
        ],
        &["exists and is not a socket"],
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}
