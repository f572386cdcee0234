//! Tests that cannot run say so, visibly: [`skip`] is the one way a test gives up.
//!
//! A skipped test still reports `ok` to libtest, so the helper
//! - writes `SKIPPED: reason` straight to the process's stderr (libtest captures `eprintln!`
//!   of passing tests; a direct write to fd 2 it does not), naming the test;
//! - appends one line, `KIND<TAB>TEST<TAB>REASON`, to the file `$ISOLA_SKIP_LOG` names, if
//!   set: `scripts/test` sets it and lists every skip at the end;
//! - under CI (`CI=true`) fails the test when what is missing is something `.ci/run`
//!   installs ([`Missing::Installable`]): there it can only mean the CI setup is broken. A
//!   missing host capability ([`Missing::Host`]: no hardware KVM, no huge pages) is not a
//!   failure anywhere.

use std::io::Write;

/// What a skipped test lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// A peer or tool `.ci/run` installs (QEMU's vhost-user-gpu, LibVNCClient,
    /// qemu-storage-daemon, iproute2, a C compiler): under CI its absence fails the test.
    Installable,
    /// A capability of the host (root, hardware KVM, huge pages): never a CI failure.
    Host,
}

impl Missing {
    /// The word in the skip log.
    pub fn as_str(self) -> &'static str {
        match self {
            Missing::Installable => "installable",
            Missing::Host => "host",
        }
    }
}

/// The environment variable naming the skip log.
pub const LOG_VAR: &str = "ISOLA_SKIP_LOG";

/// Records that the calling test cannot run because `what` is missing, and why; the caller
/// then returns. Panics (fails the test) under `CI=true` for [`Missing::Installable`].
pub fn skip(what: Missing, reason: impl std::fmt::Display) {
    let test = std::thread::current()
        .name()
        .unwrap_or("(unnamed thread)")
        .to_owned();
    let reason = reason.to_string().replace(['\n', '\t'], " ");
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {reason}");
    if let Some(log) = std::env::var_os(LOG_VAR) {
        let line = format!("{}\t{test}\t{reason}\n", what.as_str());
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            let _ = writeln!(
                std::io::stderr(),
                "cannot append to {}: {e}",
                std::path::Path::new(&log).display()
            );
        }
    }
    if what == Missing::Installable && under_ci() {
        panic!("SKIPPED under CI, where .ci/run installs what is missing: {reason}");
    }
}

/// Whether this runs under CI (`CI=true`, as CI services and `.ci/run` set it).
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// The child's part: skips for the kind `ISOLA_SKIP_SELFTEST` names. Ignored, so that only
    /// [`skip_logs_prints_and_fails_only_installable_skips_under_ci`] runs it.
    #[test]
    #[ignore = "run by skip_logs_prints_and_fails_only_installable_skips_under_ci"]
    fn child_skips() {
        let what = match std::env::var("ISOLA_SKIP_SELFTEST").as_deref() {
            Ok("host") => Missing::Host,
            Ok("installable") => Missing::Installable,
            other => panic!("ISOLA_SKIP_SELFTEST is {other:?}"),
        };
        skip(
            what,
            "the frobnicator is\tnot installed\n(apt-get install frob)",
        );
    }

    /// Runs [`child_skips`] in a child test process; its success and output.
    fn run_child(what: &str, ci: Option<&str>, log: &std::path::Path) -> (bool, String) {
        let mut command = Command::new(std::env::current_exe().expect("own path"));
        command
            .args(["--exact", "testing::skip::tests::child_skips", "--ignored"])
            .args(["--test-threads", "2"])
            .env("ISOLA_SKIP_SELFTEST", what)
            .env(LOG_VAR, log)
            .env_remove("CI");
        if let Some(ci) = ci {
            command.env("CI", ci);
        }
        let out = command.output().expect("the test binary runs");
        // libtest prints a failed test's captured output (its panic message) on stdout.
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        (out.status.success(), text)
    }

    #[test]
    fn skip_logs_prints_and_fails_only_installable_skips_under_ci() {
        let dir = std::env::temp_dir().join(format!("isola-skip-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips");
        let _ = std::fs::remove_file(&log);
        let name = "testing::skip::tests::child_skips";
        let reason = "the frobnicator is not installed (apt-get install frob)";

        // Not under CI: the test passes, and the skip is visible although libtest captures
        // the output of passing tests.
        let (ok, stderr) = run_child("installable", None, &log);
        assert!(ok, "{stderr}");
        assert!(
            stderr.contains(&format!("SKIPPED: {name}: {reason}")),
            "{stderr}"
        );
        let (ok, stderr) = run_child("installable", Some("false"), &log);
        assert!(ok, "{stderr}");
        // Under CI: what .ci/run installs must be there; a host capability need not.
        let (ok, stderr) = run_child("installable", Some("true"), &log);
        assert!(!ok, "an installable skip passed under CI: {stderr}");
        assert!(stderr.contains("SKIPPED under CI"), "{stderr}");
        let (ok, stderr) = run_child("host", Some("true"), &log);
        assert!(ok, "a host skip failed under CI: {stderr}");

        // One line per skip, in order, tabs and newlines of the reason flattened.
        let logged = std::fs::read_to_string(&log).unwrap();
        let expected: String = ["installable", "installable", "installable", "host"]
            .iter()
            .map(|kind| format!("{kind}\t{name}\t{reason}\n"))
            .collect();
        assert_eq!(logged, expected);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
