//! Why a daemon ended, in words, including which system call a seccomp filter killed it for.
//!
//! `waitpid` only says "killed by SIGSYS". The syscall number is in the kernel's audit record
//! of the kill (`audit: type=1326 ... pid=N ... syscall=S`), which the kernel logs for
//! `SECCOMP_RET_KILL_*` actions (see /proc/sys/kernel/seccomp/actions_logged) and which root
//! can read from /dev/kmsg. The supervisor opens /dev/kmsg at start, skips what is already
//! there, and reads new records only when a daemon died of SIGSYS.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// "exited with status 1", "killed by SIGSEGV", "killed by SIGABRT (core dumped)",
/// "killed by signal 34" (a signal without a name).
pub fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    let signal = status.signal().unwrap_or(0);
    let name = Signal::try_from(signal)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| format!("signal {signal}"));
    let core = if status.core_dumped() {
        " (core dumped)"
    } else {
        ""
    };
    format!("killed by {name}{core}")
}

/// Whether this ending looks like a seccomp kill: SIGSYS itself, or a pid-namespace parent
/// that reports its child's SIGSYS as status 128 + 31.
pub fn is_seccomp_kill(status: ExitStatus) -> bool {
    status.signal() == Some(libc::SIGSYS) || status.code() == Some(128 + libc::SIGSYS)
}

/// One seccomp audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeccompKill {
    pub pid: u32,
    pub exe: Option<String>,
    pub syscall: u64,
}

/// Parses a kmsg record's text: `... audit: type=1326 audit(...): ... pid=N comm="x"
/// exe="/path" sig=31 arch=c000003e syscall=59 ...`.
pub fn parse_seccomp_record(line: &str) -> Option<SeccompKill> {
    let (_, rest) = line.split_once("type=1326 ")?;
    let mut pid = None;
    let mut exe = None;
    let mut syscall = None;
    for field in rest.split(' ') {
        if let Some(v) = field.strip_prefix("pid=") {
            pid = v.parse().ok();
        } else if let Some(v) = field.strip_prefix("exe=") {
            exe = Some(v.trim_matches('"').to_owned());
        } else if let Some(v) = field.strip_prefix("syscall=") {
            syscall = v.parse().ok();
        }
    }
    Some(SeccompKill {
        pid: pid?,
        exe,
        syscall: syscall?,
    })
}

/// New records of the kernel log.
pub struct KernelLog {
    kmsg: Option<File>,
    why_not: String,
}

impl KernelLog {
    pub fn open() -> KernelLog {
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .and_then(|mut f| f.seek(SeekFrom::End(0)).map(|_| f));
        match opened {
            Ok(f) => KernelLog {
                kmsg: Some(f),
                why_not: String::new(),
            },
            Err(e) => KernelLog {
                kmsg: None,
                why_not: format!("/dev/kmsg is not readable: {e}"),
            },
        }
    }

    /// Seccomp records logged since the last call.
    fn drain(&mut self) -> Vec<SeccompKill> {
        let Some(kmsg) = &mut self.kmsg else {
            return Vec::new();
        };
        let mut found = Vec::new();
        let mut record = vec![0u8; 8192];
        loop {
            match kmsg.read(&mut record) {
                Ok(0) => break,
                Ok(n) => {
                    if let Some(kill) = parse_seccomp_record(&String::from_utf8_lossy(&record[..n]))
                    {
                        found.push(kill);
                    }
                }
                // EPIPE: records were overwritten before we read them; go on with the rest.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        found
    }

    /// The syscall a seccomp filter killed `pid` (or a process running `exe`, for daemons that
    /// run their work in a child) for. The audit record goes through the kernel's audit
    /// thread, so it may arrive just after the death: wait for it briefly.
    pub fn seccomp_note(&mut self, pid: u32, exe: &str) -> String {
        if self.kmsg.is_none() {
            return format!("syscall unknown ({})", self.why_not);
        }
        let exe = std::fs::canonicalize(exe)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| exe.to_owned());
        let deadline = Instant::now() + Duration::from_millis(200);
        loop {
            let kills = self.drain();
            let hit = kills
                .iter()
                .rev()
                .find(|k| k.pid == pid || k.exe.as_deref() == Some(exe.as_str()));
            if let Some(kill) = hit {
                return format!("seccomp blocked syscall {}", kill.syscall);
            }
            if Instant::now() >= deadline {
                return "syscall unknown (no audit record in the kernel log)".into();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_records_parse() {
        let line = "6,1234,8958134264,-;audit: type=1326 audit(1795545881.566:106): \
                    auid=4294967295 uid=0 gid=0 ses=4294967295 pid=11737 comm=\"t\" \
                    exe=\"/tmp/sc/t\" sig=31 arch=c000003e syscall=110 compat=0 \
                    ip=0x7f8c648b9829 code=0x80000000\n";
        assert_eq!(
            parse_seccomp_record(line),
            Some(SeccompKill {
                pid: 11737,
                exe: Some("/tmp/sc/t".into()),
                syscall: 110
            })
        );
        assert_eq!(parse_seccomp_record("6,1,2,-;eth0: link up"), None);
        assert_eq!(
            parse_seccomp_record("audit: type=1326 pid=x syscall=1"),
            None
        );
    }

    #[test]
    fn endings_are_described() {
        assert_eq!(describe(ExitStatus::from_raw(9)), "killed by SIGKILL");
        assert_eq!(
            describe(ExitStatus::from_raw(libc::SIGSEGV | 0x80)),
            "killed by SIGSEGV (core dumped)"
        );
        assert_eq!(describe(ExitStatus::from_raw(34)), "killed by signal 34");
        assert_eq!(
            describe(ExitStatus::from_raw(2 << 8)),
            "exited with status 2"
        );
        assert!(is_seccomp_kill(ExitStatus::from_raw(libc::SIGSYS)));
        assert!(is_seccomp_kill(ExitStatus::from_raw(159 << 8)));
        assert!(!is_seccomp_kill(ExitStatus::from_raw(9)));
    }
}
