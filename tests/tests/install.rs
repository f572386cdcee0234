//! `scripts/install` and the installed launcher: the programs, the launcher and the guest
//! images go under a prefix, and `PREFIX/bin/isola-run` runs the default VM from any
//! directory with the checkout's target directory out of PATH, taking its programs from beside
//! itself or from PATH. The build installed is this test's own (`--bin-dir`), so the test does
//! not build in release.

use std::fs;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use isola_tests::{binary, profile_dir, scratch_dir};

/// The checkout's root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the checkout")
        .to_owned()
}

/// A PATH with the system's directories and `first` (if any) in front, and no target dir.
fn path_without_target(first: Option<&Path>) -> String {
    let mut dirs: Vec<String> = first.map(|d| d.display().to_string()).into_iter().collect();
    dirs.extend(
        ["/usr/local/sbin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .map(|d| d.to_string()),
    );
    dirs.join(":")
}

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    fn report(&self) -> String {
        format!(
            "{:?}\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `command` in its own process group with output to files; after `bound` the group is
/// killed and the test fails with what it printed.
fn run(mut command: Command, scratch: &Path, bound: Duration) -> Output {
    let out_path = scratch.join("out.txt");
    let err_path = scratch.join("err.txt");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).expect("scratch is writable"))
        .stderr(fs::File::create(&err_path).expect("scratch is writable"))
        .process_group(0)
        .spawn()
        .expect("the command starts");
    let deadline = Instant::now() + bound;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait works") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |path: &Path| {
        let mut text = String::new();
        let _ = fs::File::open(path).and_then(|mut f| f.read_to_string(&mut text));
        text
    };
    let (stdout, stderr) = (read(&out_path), read(&err_path));
    let Some(status) = status else {
        panic!("{command:?} did not end within {bound:?}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    };
    Output {
        status,
        stdout,
        stderr,
    }
}

/// `scripts/install --bin-dir PROFILE_DIR PREFIX`; it must succeed.
fn install(scratch: &Path, prefix: &Path) {
    binary("isola-core");
    let mut command = Command::new(repo().join("scripts/install"));
    command.arg("--bin-dir").arg(profile_dir()).arg(prefix);
    let out = run(command, scratch, Duration::from_secs(60));
    assert!(out.status.success(), "scripts/install: {}", out.report());
}

/// `launcher ARGS` started in `cwd` with `PATH=path` and no Cargo variables.
fn launcher(launcher: &Path, cwd: &Path, path: &str, args: &[&str]) -> Command {
    let mut command = Command::new(launcher);
    command
        .args(args)
        .current_dir(cwd)
        .env("PATH", path)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO");
    command
}

#[test]
fn an_installed_launcher_runs_the_default_vm_from_anywhere_with_the_checkout_out_of_path() {
    let scratch = scratch_dir("install-run");
    let prefix = scratch.join("prefix");
    install(&scratch, &prefix);
    let bin = prefix.join("bin");
    for program in [
        "isola-run",
        "isola-core",
        "isola-api",
        "isola-supervisor",
        "isolactl",
        "isola-vmconfig",
        "isola-guests",
        "isola-blk",
        "isola-net",
        "isola-console",
        "isola-gpu",
        "isola-display",
        "isola-input",
        "isola-usb",
    ] {
        assert!(bin.join(program).is_file(), "{program} was not installed");
    }
    let guest = prefix.join("share/isola/guests/virtio-blk.elf");
    assert!(guest.is_file(), "the default VM's guest was not installed");
    assert!(prefix.join("share/isola/scripts/linux-guest").is_file());
    assert!(prefix.join("share/isola/tests/linux/config").is_file());

    // The installed isola-guests points at the installed image, not the build's.
    let elsewhere = scratch.join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let path = path_without_target(Some(&bin));
    let mut command = Command::new(bin.join("isola-guests"));
    command.args(["path", "virtio-blk.elf"]);
    let out = run(command, &scratch, Duration::from_secs(10));
    assert_eq!(
        out.stdout.trim(),
        guest.display().to_string(),
        "{}",
        out.report()
    );

    // The VM it would start: every program and the guest from the prefix.
    let out = run(
        launcher(&bin.join("isola-run"), &elsewhere, &path, &["--dry-run"]),
        &scratch,
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", out.report());
    for expected in ["isola-supervisor", "isola-blk", "isola-api", "isola-core"] {
        let full = format!("{}/{expected}", bin.display());
        assert!(
            out.stdout.contains(&full),
            "{full:?} not in\n{}",
            out.report()
        );
    }
    assert!(
        out.stdout.contains(&guest.display().to_string()),
        "{}",
        out.report()
    );
    let target = profile_dir().display().to_string();
    assert!(!out.stdout.contains(&target), "{}", out.report());

    // And it runs: the guest writes and verifies its disk and powers off, status 0.
    let run_dir = scratch.join("run");
    let out = run(
        launcher(
            &bin.join("isola-run"),
            &elsewhere,
            &path,
            &["--run-dir", run_dir.to_str().unwrap()],
        ),
        &scratch,
        Duration::from_secs(90),
    );
    assert!(out.status.success(), "{}", out.report());
    assert!(
        out.stdout.lines().any(|l| l == "virtio-blk: ok"),
        "{}",
        out.report()
    );
    assert!(!run_dir.exists(), "run directory left behind");
}

/// A launcher with no programs beside it takes them from PATH; relative paths in its
/// options are relative to where it was started.
#[test]
fn a_launcher_alone_takes_its_programs_from_path() {
    let scratch = scratch_dir("install-path");
    let prefix = scratch.join("prefix");
    install(&scratch, &prefix);
    let bin = prefix.join("bin");
    let alone = scratch.join("alone");
    fs::create_dir(&alone).unwrap();
    fs::copy(bin.join("isola-run"), alone.join("isola-run")).unwrap();
    let elsewhere = scratch.join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    fs::write(elsewhere.join("disk.img"), vec![0u8; 1 << 20]).unwrap();

    let out = run(
        launcher(
            &alone.join("isola-run"),
            &elsewhere,
            &path_without_target(Some(&bin)),
            &["--dry-run", "--disk", "disk.img"],
        ),
        &scratch,
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", out.report());
    for expected in ["isola-supervisor", "isola-blk", "isola-core"] {
        let full = format!("{}/{expected}", bin.display());
        assert!(
            out.stdout.contains(&full),
            "{full:?} not in\n{}",
            out.report()
        );
    }
    // isola-blk is given the image's absolute path.
    let disk = format!("--image\\ \\'{}\\'", elsewhere.join("disk.img").display());
    let supervisor = out
        .stdout
        .lines()
        .find(|l| l.contains("isola-supervisor"))
        .unwrap_or_default();
    assert!(
        supervisor.contains(&disk),
        "{disk} not in\n{}",
        out.report()
    );
}

/// A program missing from beside the launcher and from PATH: one line naming it, status 2,
/// nothing started.
#[test]
fn an_installed_launcher_missing_a_program_names_it() {
    let scratch = scratch_dir("install-missing");
    let prefix = scratch.join("prefix");
    install(&scratch, &prefix);
    let bin = prefix.join("bin");
    fs::remove_file(bin.join("isola-blk")).unwrap();
    let run_dir = scratch.join("run");
    let out = run(
        launcher(
            &bin.join("isola-run"),
            &scratch,
            &path_without_target(None),
            &["--run-dir", run_dir.to_str().unwrap()],
        ),
        &scratch,
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.report());
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", out.report());
    assert!(
        lines[0].starts_with("isola-run: isola-blk is missing")
            && lines[0].contains(&bin.display().to_string()),
        "{}",
        out.report()
    );
    assert!(!run_dir.exists(), "run directory made");
}

/// scripts/install refuses a build that lacks a program, naming it, and installs nothing.
#[test]
fn install_refuses_an_incomplete_build() {
    let scratch = scratch_dir("install-incomplete");
    let partial = scratch.join("partial");
    fs::create_dir(&partial).unwrap();
    binary("isola-core");
    fs::copy(profile_dir().join("isola-core"), partial.join("isola-core")).unwrap();
    let prefix = scratch.join("prefix");
    let mut command = Command::new(repo().join("scripts/install"));
    command.arg("--bin-dir").arg(&partial).arg(&prefix);
    let out = run(command, &scratch, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2), "{}", out.report());
    let expected = format!("install: {}/isolactl is missing", partial.display());
    assert!(out.stderr.contains(&expected), "{}", out.report());
    assert!(!prefix.exists(), "something was installed");
}

/// From the checkout, the launcher still takes its programs from the checkout's target
/// directory, wherever it is started from.
#[test]
fn the_checkout_launcher_uses_the_checkouts_build_from_any_directory() {
    let scratch = scratch_dir("install-checkout");
    binary("isola-core");
    let profile = profile_dir();
    let mut args = vec!["--no-build", "--dry-run"];
    if profile.file_name().is_some_and(|n| n == "debug") {
        args.push("--debug");
    }
    let mut command = launcher(
        &repo().join("scripts/isola-run"),
        &scratch,
        &path_without_target(None),
        &args,
    );
    // The target directory the tests were built in, wherever it is.
    command.env(
        "CARGO_TARGET_DIR",
        profile.parent().expect("target/PROFILE"),
    );
    let out = run(command, &scratch, Duration::from_secs(30));
    assert!(out.status.success(), "{}", out.report());
    let core = format!("{}/isola-core", profile.display());
    assert!(
        out.stdout.contains(&core),
        "{core:?} not in\n{}",
        out.report()
    );
}
