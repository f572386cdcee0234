//! The Linux guest tier's helpers (`tests/tests/linux.rs`, `benches/linux-boot.rs`): the
//! project's Linux image (built and cached by `scripts/linux-guest`), what kind of KVM host
//! this is, and a booted guest whose `/init` prints one `ISOLA-CHECK` line per device check.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::supervisor::Launch;

/// One progress line of the tier on the real stderr (libtest captures `eprintln!` of passing
/// tests; these figures and the host kind are meant to be seen in every run).
pub fn say(line: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr(), "linux tier: {line}");
}

/// The kernel command line every boot starts with: the serial console (the test reads it),
/// a panic ends the VM at once (reset) instead of hanging, no KVM async page faults, and no
/// RCU stall reports (on the nested host fbcon's first redraw alone runs for minutes of
/// emulated ring 0 under load, and each report costs more emulated time to print).
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 no-kvmapf rcupdate.rcu_cpu_stall_suppress=1";

/// The Linux guest: `vmlinux` (PVH ELF) and `initramfs.cpio`, from `scripts/linux-guest`.
#[derive(Debug, Clone)]
pub struct Image {
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
}

/// Builds (first call, 3-4 minutes on 2 cores) or finds (seconds) the image, once per process.
/// `Err` says why it cannot be built here (a package missing), for a `SKIPPED:` line.
pub fn image() -> Result<Image, String> {
    static IMAGE: OnceLock<Result<Image, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/linux-guest");
            let started = Instant::now();
            let out = Command::new(&script)
                .arg("--quiet")
                .output()
                .map_err(|e| format!("{}: {e}", script.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "scripts/linux-guest failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            say(format!(
                "guest image {} ready in {:.1} s",
                dir.display(),
                started.elapsed().as_secs_f64()
            ));
            Ok(Image {
                vmlinux: dir.join("vmlinux"),
                initramfs: dir.join("initramfs.cpio"),
            })
        })
        .clone()
}

/// What kind of KVM this machine offers, decided from what the kernel reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKind {
    /// `kvm_pvm` loaded and no vmx/svm: nested, guest ring 0 emulated (~1000x slower).
    NestedPvm,
    /// `kvm_intel` or `kvm_amd` with vmx/svm: hardware-assisted.
    Hardware,
    /// Neither pattern (e.g. no /dev/kvm module information).
    Unknown,
}

/// The host's kind and the facts it was decided from, e.g. "nested kvm_pvm (guest ring 0
/// emulated): /sys/module/kvm_pvm present, no vmx/svm in /proc/cpuinfo".
pub fn host_kind() -> (HostKind, String) {
    let module = |m: &str| Path::new("/sys/module").join(m).exists();
    let (pvm, intel, amd) = (module("kvm_pvm"), module("kvm_intel"), module("kvm_amd"));
    let flags = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .unwrap_or_default();
    let (vmx, svm) = (
        flags.iter().any(|f| f == "vmx"),
        flags.iter().any(|f| f == "svm"),
    );
    let mut facts: Vec<String> = [("kvm_pvm", pvm), ("kvm_intel", intel), ("kvm_amd", amd)]
        .iter()
        .filter(|(_, loaded)| *loaded)
        .map(|(m, _)| format!("/sys/module/{m} present"))
        .collect();
    facts.push(match (vmx, svm) {
        (false, false) => "no vmx/svm in /proc/cpuinfo".into(),
        (true, _) => "vmx in /proc/cpuinfo".into(),
        (_, true) => "svm in /proc/cpuinfo".into(),
    });
    let kind = if pvm && !vmx && !svm {
        HostKind::NestedPvm
    } else if (intel || amd) && (vmx || svm) && !pvm {
        HostKind::Hardware
    } else {
        HostKind::Unknown
    };
    let name = match kind {
        HostKind::NestedPvm => "nested kvm_pvm (guest ring 0 emulated)",
        HostKind::Hardware => "hardware KVM",
        HostKind::Unknown => "unknown KVM",
    };
    (kind, format!("{name}: {}", facts.join(", ")))
}

/// How long a boot may take to reach `/init` and to finish, by host kind: generous, since
/// the nested host's figures (20-30 s to /init alone) grow when six builds share 2 CPUs.
pub fn deadlines() -> (Duration, Duration) {
    match host_kind().0 {
        HostKind::Hardware => (Duration::from_secs(60), Duration::from_secs(180)),
        // 20-30 s to /init on an idle nested host; over 21 minutes were seen with every
        // device while six builds shared its 2 CPUs.
        _ => (Duration::from_secs(1200), Duration::from_secs(2400)),
    }
}

/// A Linux guest started by `scripts/isola-run`; its serial console is `launch.stdout`.
pub struct Guest {
    pub launch: Launch,
    started: Instant,
    deadline: Instant,
}

impl Guest {
    /// `scripts/isola-run --kernel vmlinux --initrd initramfs.cpio --cmdline "BASE CMDLINE"
    /// --cpus 1 --memory 256 ARGS` in `run_dir` (a `--cpus` in ARGS wins); waits until the
    /// guest's `/init` runs (or panics with the console).
    pub fn boot(run_dir: &Path, image: &Image, cmdline: &str, args: &[&str]) -> Guest {
        let cmdline = format!("{BASE_CMDLINE} {cmdline}");
        let mut all = vec![
            "--kernel",
            image.vmlinux.to_str().expect("utf-8 path"),
            "--initrd",
            image.initramfs.to_str().expect("utf-8 path"),
            "--cmdline",
            &cmdline,
            "--memory",
            "256",
        ];
        if !args.contains(&"--cpus") {
            all.extend_from_slice(&["--cpus", "1"]);
        }
        all.extend_from_slice(args);
        Self::start(run_dir, &all)
    }

    /// `scripts/isola-run ARGS` (e.g. `--linux ...`); waits for `/init` like [`Guest::boot`].
    pub fn start(run_dir: &Path, args: &[&str]) -> Guest {
        let (to_init, total) = deadlines();
        let started = Instant::now();
        let mut guest = Guest {
            launch: Launch::start(run_dir, args),
            started,
            deadline: started + total,
        };
        guest.line("ISOLA-INIT", to_init);
        say(format!(
            "/init reached {:.1} s after start",
            started.elapsed().as_secs_f64()
        ));
        guest
    }

    /// Waits (at most `timeout`, and never past the boot's overall deadline) for a console
    /// line containing `needle`; panics with the last console lines and the launcher's
    /// errors if it does not come (a panic, a hang, or a check that never ran).
    pub fn line(&mut self, needle: &str, timeout: Duration) -> String {
        let timeout = timeout.min(self.deadline.saturating_duration_since(Instant::now()));
        if let Some(line) = self.launch.stdout.wait_for(needle, timeout) {
            return line;
        }
        let last: Vec<&String> = self.launch.stdout.seen.iter().rev().take(40).collect();
        let last: Vec<&str> = last.into_iter().rev().map(String::as_str).collect();
        let errors = self
            .launch
            .stderr
            .drain(Duration::from_millis(200))
            .join("\n");
        panic!(
            "no console line with {needle:?} after {:.1} s ({})\nlast console lines:\n{}\n\
             isola-run stderr:\n{errors}",
            self.started.elapsed().as_secs_f64(),
            host_kind().1,
            last.join("\n")
        );
    }

    /// The `ISOLA-CHECK NAME ...` line's text after the name; panics unless it says `ok`.
    pub fn check_ok(&mut self, name: &str, timeout: Duration) -> String {
        let line = self.line(&format!("ISOLA-CHECK {name} "), timeout);
        let rest = line
            .split_once(&format!("ISOLA-CHECK {name} "))
            .map_or("", |(_, r)| r)
            .to_owned();
        assert!(
            rest.starts_with("ok"),
            "the guest's {name} check failed: {line}\nconsole:\n{}",
            self.launch.stdout.seen.join("\n")
        );
        rest
    }

    /// Waits for `ISOLA-DONE` and for the VM to end by the guest's ACPI poweroff (exit 0).
    pub fn finish(mut self) {
        self.line("ISOLA-DONE", Duration::from_secs(120));
        self.wait_end();
    }

    /// Waits for the VM to end with exit status 0: the guest powered off (by itself, or
    /// answering the power button of a graceful shutdown).
    pub fn wait_end(mut self) {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let status = self.launch.finish(left.max(Duration::from_secs(30)));
        assert!(
            status.success(),
            "the VM did not end cleanly after the guest's poweroff: {status}\n{}",
            self.launch.report()
        );
        say(format!(
            "powered off {:.1} s after start",
            self.started.elapsed().as_secs_f64()
        ));
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// The guest's `isola-probe pattern SEED BYTES`: xorshift64* words, little endian.
pub fn pattern(seed: u64, bytes: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2).wrapping_add(1);
    let mut out = Vec::with_capacity(bytes + 8);
    while out.len() < bytes {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::pattern;

    #[test]
    fn pattern_matches_the_guest_probe() {
        // `isola-probe pattern 7 16 | od -An -tx1`, run on the host build of probe.c.
        assert_eq!(
            pattern(7, 16),
            [
                0x5c, 0x5d, 0x1a, 0x1f, 0xb9, 0x38, 0x96, 0xc6, 0x5c, 0x95, 0x00, 0xe5, 0x70, 0x5d,
                0x0f, 0xc2
            ]
        );
    }
}
