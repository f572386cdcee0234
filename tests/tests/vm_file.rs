//! The VM file: `scripts/isola-run --config vm.toml` starts the same VM as the same settings
//! given as flags (same daemon and core command lines, same configuration written to the run
//! directory), flags override the file, and each kind of bad file is refused with one line
//! naming the key path and the line.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use isola_tests::supervisor::Launch;
use isola_tests::{binary, profile_dir, scratch_dir, wait_for_path};

/// `isola-run --dry-run ARGS` from `cwd`: what it would run, started nowhere.
fn dry_run(cwd: &Path, args: &[&str]) -> Output {
    binary("isola-vmconfig");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/isola-run");
    Command::new(script)
        .current_dir(cwd)
        .arg("--bin-dir")
        .arg(profile_dir())
        .arg("--dry-run")
        .args(args)
        .output()
        .expect("isola-run runs")
}

fn stdout_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("UTF-8")
}

/// A file with every key, the images it names, and the same VM as flags.
fn every_key(dir: &Path) -> (std::path::PathBuf, Vec<String>) {
    for image in ["root.img", "data.img"] {
        std::fs::write(dir.join(image), vec![0u8; 1 << 20]).unwrap();
    }
    let kernel = isola_tests::guest("virtio-blk.elf");
    let file = dir.join("vm.toml");
    std::fs::write(
        &file,
        format!(
            r#"# every key
kernel = "{kernel}"
initrd = "data.img"
cmdline = "virtio-blk.mode=loop virtio-blk.seconds=1"
cpus = 1
memory_mib = 64
hugepages = true
prefault = true
input = true

[[disk]]
path = "root.img"
readonly = true
engine = "sync"

[[disk]]
path = "data.img"
sq_poll = true
engine = "io-uring"

[[net]]
tap = "isolavmf0"
mac = "02:00:00:00:00:09"

[[net]]
tap = "isolavmf1"

[console]
log = "guest.log"

[[console.port]]
name = "org.example.agent"
log = "agent.log"

[[console.port]]
name = "second"

[display]
width = 640
height = 480
vnc = "127.0.0.1:5999"
"#,
            kernel = kernel.display()
        ),
    )
    .unwrap();
    let d = |name: &str| dir.join(name).display().to_string();
    let flags = vec![
        "--kernel".into(),
        kernel.display().to_string(),
        "--initrd".into(),
        d("data.img"),
        "--cmdline".into(),
        "virtio-blk.mode=loop virtio-blk.seconds=1".into(),
        "--cpus".into(),
        "1".into(),
        "--memory".into(),
        "64".into(),
        "--hugepages".into(),
        "--prefault".into(),
        "--input".into(),
        "--disk".into(),
        format!("{},ro,engine=sync", d("root.img")),
        "--disk".into(),
        format!("{},sq-poll,engine=io-uring", d("data.img")),
        "--net".into(),
        "isolavmf0,mac=02:00:00:00:00:09".into(),
        "--net".into(),
        "isolavmf1".into(),
        "--console-log".into(),
        d("guest.log"),
        "--console-port".into(),
        format!("org.example.agent,log={}", d("agent.log")),
        "--console-port".into(),
        "second".into(),
        "--display".into(),
        "640x480".into(),
        "--vnc".into(),
        "127.0.0.1:5999".into(),
    ];
    (file, flags)
}

#[test]
fn a_vm_file_runs_the_same_commands_as_the_same_flags() {
    let scratch = scratch_dir("vmfile-same");
    let (file, flags) = every_key(&scratch);
    let run_dir = scratch.join("run");
    let run = run_dir.to_str().unwrap();
    // From another directory, with the file named relative to it: paths in the file are the
    // file's directory's.
    let from_file = stdout_ok(&dry_run(
        Path::new("/"),
        &[
            "--run-dir",
            run,
            "--config",
            file.strip_prefix("/").unwrap().to_str().unwrap(),
        ],
    ));
    let mut args: Vec<&str> = vec!["--run-dir", run];
    args.extend(flags.iter().map(String::as_str));
    let from_flags = stdout_ok(&dry_run(&scratch, &args));
    assert_eq!(from_file, from_flags);
    // Every option reached its daemon or the core.
    for needle in [
        "--engine\\ sync\\ --readonly",
        "--sq-poll-ms\\ 10",
        "--engine\\ io-uring",
        "--mac\\ 02:00:00:00:00:09",
        "--tap\\ \\'isolavmf1\\'",
        "name=org.example.agent\\,socket=",
        "console-2.sock",
        "--width\\ 640\\ --height\\ 480",
        "--vnc\\ 127.0.0.1:5999",
        "--hugepages --prefault",
        "--cpus 1 --memory 64",
        "agent.log",
        "--initrd",
    ] {
        assert!(from_file.contains(needle), "no {needle} in\n{from_file}");
    }
    assert!(!run_dir.exists(), "--dry-run made the run directory");
}

#[test]
fn flags_override_the_file_and_replace_its_lists() {
    let scratch = scratch_dir("vmfile-override");
    let (file, _) = every_key(&scratch);
    let file = file.to_str().unwrap();
    let other = scratch.join("data.img");
    let out = stdout_ok(&dry_run(
        &scratch,
        &[
            "--config",
            file,
            "--cpus",
            "3",
            "--disk",
            other.to_str().unwrap(),
            "--net",
            "isolavmf9",
            "--display",
            "800x600",
        ],
    ));
    assert!(out.contains("--cpus 3 "), "{out}");
    assert!(out.contains("cpus = 3\n"), "{out}");
    // The file's two disks and two nets are replaced by the one given; the rest stays.
    assert_eq!(out.matches("[[disk]]").count(), 1, "{out}");
    assert!(!out.contains("root.img"), "{out}");
    assert_eq!(out.matches("[[net]]").count(), 1, "{out}");
    assert!(
        out.contains("isolavmf9") && !out.contains("isolavmf0"),
        "{out}"
    );
    assert!(out.contains("--width\\ 800\\ --height\\ 600"), "{out}");
    assert!(out.contains("--vnc\\ 127.0.0.1:5999"), "{out}");
    assert!(out.contains("org.example.agent"), "{out}");
}

/// Each kind of bad file: exit status 2, one line `isola-run: FILE:LINE: KEY: why`.
#[test]
fn each_kind_of_bad_file_is_refused_with_its_key_path_and_line() {
    let scratch = scratch_dir("vmfile-bad");
    let cases: &[(&str, &str, &str)] = &[
        (
            "cpus = 1\nmemroy_mib = 64\n",
            "2: memroy_mib: ",
            "unknown field",
        ),
        (
            "[[disk]]\npath = \"x.img\"\nrw = true\n",
            "3: disk[0].rw: ",
            "unknown field",
        ),
        ("cpus = \"two\"\n", "1: cpus: ", "invalid type"),
        ("\n\ncpus = 0\n", "3: cpus: ", "expected 1 to 255"),
        (
            "memory_mib = 100000000\n",
            "1: memory_mib: ",
            "expected 8 to",
        ),
        (
            "[[disk]]\npath = \"x.img\"\nengine = \"fast\"\n",
            "3: disk[0].engine: ",
            "unknown variant `fast`",
        ),
        (
            "[[disk]]\npath = \"nope.img\"\n",
            "2: disk[0].path: ",
            "No such file",
        ),
        (
            "[[disk]]\nreadonly = true\n",
            "1: disk[0]: ",
            "missing field `path`",
        ),
        (
            "[[net]]\ntap = \"t0\"\nmac = \"ff:ff:ff:ff:ff:ff\"\n",
            "3: net[0].mac: ",
            "multicast",
        ),
        (
            "[[net]]\ntap = \"a tap\"\n",
            "2: net[0].tap: ",
            "interface name",
        ),
        (
            "[display]\nheight = 5000\n",
            "2: display.height: ",
            "expected 16 to 4095",
        ),
        (
            "[display]\nvnc = \"nowhere\"\n",
            "2: display.vnc: ",
            "ADDR:PORT",
        ),
        (
            "[console]\nlog = \"/no/such/dir/x.log\"\n",
            "2: console.log: ",
            "does not exist",
        ),
        ("kernel = \"absent.elf\"\n", "1: kernel: ", "No such file"),
        (
            "hugepages = true\nmemory_mib = 9\n",
            "2: memory_mib: ",
            "huge page",
        ),
        ("cpus = 1\ncpus = [\n", "2: ", "TOML"),
    ];
    std::fs::write(scratch.join("x.img"), [0u8; 512]).unwrap();
    for (i, (text, place, words)) in cases.iter().enumerate() {
        let file = scratch.join(format!("bad{i}.toml"));
        std::fs::write(&file, text).unwrap();
        let out = dry_run(&scratch, &["--config", file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(out.status.code(), Some(2), "{text:?}: {stderr}");
        assert_eq!(lines.len(), 1, "{text:?}: not one line:\n{stderr}");
        let expected = format!("isola-run: {}:{place}", file.display());
        assert!(
            lines[0].starts_with(&expected),
            "{text:?}: '{}' does not start with '{expected}'",
            lines[0]
        );
        assert!(
            lines[0].contains(words),
            "{text:?}: no '{words}' in '{}'",
            lines[0]
        );
        assert!(out.stdout.is_empty(), "{text:?}: printed something");
    }
    // A file that is not there.
    let out = dry_run(&scratch, &["--config", "absent.toml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("isola-run: ") && stderr.contains("absent.toml"),
        "{stderr}"
    );
}

/// A real VM from a file: the guest runs, and the configuration it writes to its run
/// directory (what the API reports) is the one the same flags give, and read back as a file
/// it runs the same commands.
#[test]
fn a_vm_started_from_a_file_reports_the_configuration_of_the_same_flags() {
    let scratch = scratch_dir("vmfile-run");
    std::fs::write(scratch.join("disk.img"), vec![0u8; 16 << 20]).unwrap();
    let file = scratch.join("vm.toml");
    std::fs::write(
        &file,
        "cpus = 1\nmemory_mib = 64\ncmdline = \"virtio-blk.mode=loop virtio-blk.seconds=1 \
         virtio-blk.sectors=256\"\n\n[[disk]]\npath = \"disk.img\"\n\n[console]\n",
    )
    .unwrap();
    let run_dir = scratch.join("run");
    let mut launch = Launch::start(&run_dir, &["--config", file.to_str().unwrap()]);
    wait_for_path(&launch.control_socket(), Duration::from_secs(60));
    let reported = std::fs::read_to_string(run_dir.join("vm.toml")).expect("DIR/vm.toml");
    launch.finishes_with(Duration::from_secs(120), "virtio-blk: ok");
    let disk = scratch.join("disk.img");
    let from_flags = stdout_ok(&dry_run(
        &scratch,
        &[
            "--cpus",
            "1",
            "--memory",
            "64",
            "--cmdline",
            "virtio-blk.mode=loop virtio-blk.seconds=1 virtio-blk.sectors=256",
            "--disk",
            disk.to_str().unwrap(),
            "--console",
        ],
    ));
    assert!(
        from_flags.contains(&format!("{reported}# the supervisor")),
        "the file's VM reported\n{reported}\nthe flags' VM is\n{from_flags}"
    );
    // The reported configuration, saved as a file, runs the same commands.
    let saved = scratch.join("saved.toml");
    std::fs::write(&saved, &reported).unwrap();
    let again = stdout_ok(&dry_run(&scratch, &["--config", saved.to_str().unwrap()]));
    assert_eq!(again, from_flags);
}
