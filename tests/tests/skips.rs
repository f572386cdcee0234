//! `scripts/skips`, the end of `scripts/test`: it lists every skip the tests recorded and,
//! under CI, fails the run if one of them lacked something `.ci/run` installs. (The skip
//! helper itself: `device-procs/common/src/testing/skip.rs`.)

use std::path::Path;
use std::process::Command;

use isola_tests::scratch_dir;

/// Runs `scripts/skips LOG` with `CI` set to `ci` (or unset); its status and stdout+stderr.
fn report(log: &Path, ci: Option<&str>) -> (Option<i32>, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/skips");
    let mut command = Command::new(script);
    command.arg(log).env_remove("CI");
    if let Some(ci) = ci {
        command.env("CI", ci);
    }
    let out = command.output().expect("scripts/skips runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

#[test]
fn every_skip_is_listed_and_under_ci_an_installable_one_fails_the_run() {
    let dir = scratch_dir("skips-report");
    let log = dir.join("skips");

    // Nothing recorded (the file is missing, or empty).
    let (status, text) = report(&log, Some("true"));
    assert_eq!(status, Some(0), "{text}");
    assert!(text.contains("No test was skipped."), "{text}");

    // Host capabilities only: listed, never a failure.
    std::fs::write(
        &log,
        "host\tboot::hugepage_backed_guest_boots\tno huge pages\n",
    )
    .unwrap();
    for ci in [None, Some("true")] {
        let (status, text) = report(&log, ci);
        assert_eq!(status, Some(0), "CI={ci:?}: {text}");
        assert!(
            text.contains("SKIPPED (host) boot::hugepage_backed_guest_boots: no huge pages"),
            "{text}"
        );
    }

    // Something .ci/run installs: listed everywhere, a failure under CI only.
    std::fs::write(
        &log,
        "host\tboot::hugepage_backed_guest_boots\tno huge pages\n\
         installable\tgpu::qemu_peer\t/usr/lib/qemu/vhost-user-gpu is not installed\n",
    )
    .unwrap();
    for ci in [None, Some("false")] {
        let (status, text) = report(&log, ci);
        assert_eq!(status, Some(0), "CI={ci:?}: {text}");
        assert!(text.contains("SKIPPED (installable) gpu::qemu_peer: /usr/lib/qemu/vhost-user-gpu is not installed"), "{text}");
        assert!(text.contains("SKIPPED (host)"), "{text}");
    }
    let (status, text) = report(&log, Some("true"));
    assert_eq!(status, Some(1), "{text}");
    assert!(
        text.contains("SKIPPED (installable) gpu::qemu_peer"),
        "{text}"
    );
    assert!(
        text.contains("1 skip(s) for want of something .ci/run installs"),
        "{text}"
    );
}

/// `scripts/test` runs everything with `ISOLA_SKIP_LOG` set and reports it at the end, on
/// failure too; `.ci/run` runs it with `CI=true`.
#[test]
fn the_test_script_collects_skips_and_ci_runs_it_strict() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let test = std::fs::read_to_string(root.join("scripts/test")).unwrap();
    let export = test
        .find("export ISOLA_SKIP_LOG=")
        .expect("the log is exported");
    let trap = test
        .find("trap report_skips EXIT")
        .expect("reported on exit");
    let first_cargo = test.find("\ncargo ").expect("cargo runs");
    assert!(
        export < first_cargo && trap < first_cargo,
        "set up before any test runs"
    );
    assert!(test.contains("scripts/skips \"$skip_log\""), "{test}");
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    let strict = ci.find("export CI=").expect(".ci/run sets CI");
    assert!(strict < ci.rfind("scripts/test").unwrap());
}
