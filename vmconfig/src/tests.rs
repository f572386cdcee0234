use super::file::parse;
use super::*;

const FULL: &str = r#"
kernel = "/boot/vmlinux"
initrd = "/boot/initramfs.cpio"
cmdline = "console=ttyS0 panic=-1"
cpus = 2
memory_mib = 512
hugepages = true
prefault = true
input = true
on_reset = "restart"

[[disk]]
path = "/images/root.img"
readonly = true
engine = "io-uring"
sq_poll = true

[[disk]]
path = "/images/data.img"

[[net]]
tap = "isola0"
mac = "02:00:00:00:00:07"

[console]
log = "/var/log/guest.log"

[[console.port]]
name = "org.example.agent"
log = "/var/log/agent.log"

[display]
width = 640
height = 480
vnc = "127.0.0.1:5900"
"#;

fn full() -> VmConfig {
    VmConfig {
        kernel: Some("/boot/vmlinux".into()),
        initrd: Some("/boot/initramfs.cpio".into()),
        cmdline: Some("console=ttyS0 panic=-1".into()),
        cpus: Some(2),
        memory_mib: Some(512),
        hugepages: true,
        prefault: true,
        disks: vec![
            Disk {
                path: "/images/root.img".into(),
                readonly: true,
                engine: Engine::IoUring,
                sq_poll: true,
            },
            Disk {
                path: "/images/data.img".into(),
                readonly: false,
                engine: Engine::Auto,
                sq_poll: false,
            },
        ],
        nets: vec![Net {
            tap: "isola0".into(),
            mac: Some("02:00:00:00:00:07".into()),
        }],
        console: Some(Console {
            log: Some("/var/log/guest.log".into()),
            ports: vec![ConsolePort {
                name: "org.example.agent".into(),
                log: Some("/var/log/agent.log".into()),
            }],
        }),
        display: Some(Display {
            width: Some(640),
            height: Some(480),
            vnc: Some("127.0.0.1:5900".into()),
        }),
        input: true,
        on_reset: OnReset::Restart,
    }
}

#[test]
fn every_key_is_read() {
    assert_eq!(parse(FULL), Ok(full()));
}

#[test]
fn toml_and_json_round_trip() {
    let vm = full();
    let text = toml::to_string(&vm).unwrap();
    assert_eq!(parse(&text), Ok(vm.clone()), "{text}");
    let json = serde_json::to_string(&vm).unwrap();
    assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), vm);
    // The API's JSON has the file's key names.
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["disk"][0]["engine"], "io-uring");
    assert_eq!(value["memory_mib"], 512);
}

#[test]
fn flags_round_trip() {
    for vm in [full(), VmConfig::default(), full().resolved()] {
        let args = args::to_args(&vm);
        let back = args::from_args(&args).unwrap();
        assert_eq!(back.resolved(), vm.resolved(), "{args:?}");
    }
}

#[test]
fn an_empty_file_is_the_default_vm() {
    let vm = parse("").unwrap();
    assert_eq!(vm, VmConfig::default());
    let resolved = vm.resolved();
    assert_eq!((resolved.cpus, resolved.memory_mib), (Some(2), Some(128)));
    assert!(resolved.kernel.is_none() && resolved.disks.is_empty());
}

#[test]
fn a_display_brings_its_defaults_and_input() {
    let vm = parse("[display]\n").unwrap().resolved();
    let display = vm.display.unwrap();
    assert_eq!((display.width, display.height), (Some(1280), Some(800)));
    assert!(vm.input);
}

/// (file, line, key, words in the reason)
fn refused(text: &str) -> (usize, String, String) {
    match parse(text) {
        Ok(vm) => panic!("accepted {text:?} as {vm:?}"),
        Err(e) => e,
    }
}

#[track_caller]
fn assert_refused(text: &str, line: usize, key: &str, words: &str) {
    let (l, k, why) = refused(text);
    assert_eq!((l, k.as_str()), (line, key), "{why}");
    assert!(why.contains(words), "'{why}' does not say '{words}'");
    assert!(!why.contains('\n'), "'{why}' is not one line");
}

#[test]
fn unknown_keys_are_refused_with_their_place() {
    assert_refused(
        "cpus = 1\nmemroy_mib = 64\n",
        2,
        "memroy_mib",
        "unknown field `memroy_mib`",
    );
    assert_refused(
        "[[disk]]\npath = \"/a\"\n\n[[disk]]\npath = \"/b\"\nreadonly = true\nrw = false\n",
        7,
        "disk[1].rw",
        "unknown field `rw`",
    );
    assert_refused(
        "[display]\nwidht = 640\n",
        2,
        "display.widht",
        "unknown field `widht`",
    );
    assert_refused(
        "[console]\n[[console.port]]\nname = \"a\"\npty = true\n",
        4,
        "console.port[0].pty",
        "unknown field `pty`",
    );
}

#[test]
fn bad_values_are_refused_with_their_key_path_and_line() {
    assert_refused("cpus = 0\n", 1, "cpus", "expected 1 to 255");
    assert_refused("\ncpus = \"two\"\n", 2, "cpus", "invalid type");
    assert_refused("memory_mib = 4\n", 1, "memory_mib", "expected 8 to");
    assert_refused("memory_mib = -1\n", 1, "memory_mib", "invalid value");
    assert_refused(
        "hugepages = true\nmemory_mib = 63\n",
        2,
        "memory_mib",
        "huge page",
    );
    assert_refused(
        "[[disk]]\npath = \"/a\"\nengine = \"fast\"\n",
        3,
        "disk[0].engine",
        "unknown variant `fast`",
    );
    assert_refused(
        "[[disk]]\nreadonly = true\n",
        1,
        "disk[0]",
        "missing field `path`",
    );
    assert_refused("[[disk]]\npath = \"/a,ro\"\n", 2, "disk[0].path", "','");
    assert_refused(
        "[[net]]\ntap = \"isola0\"\n[[net]]\ntap = \"a/b\"\n",
        4,
        "net[1].tap",
        "not a network interface name",
    );
    assert_refused(
        "[[net]]\ntap = \"t\"\nmac = \"01:00:00:00:00:01\"\n",
        3,
        "net[0].mac",
        "multicast",
    );
    assert_refused(
        "[[net]]\ntap = \"t\"\nmac = \"02:00:00:00:00\"\n",
        3,
        "net[0].mac",
        "not a MAC address",
    );
    assert_refused(
        "[display]\nwidth = 8\n",
        2,
        "display.width",
        "expected 16 to 4095",
    );
    assert_refused(
        "[display]\nvnc = \"localhost\"\n",
        2,
        "display.vnc",
        "ADDR:PORT",
    );
    assert_refused(
        "[console]\n[[console.port]]\nname = \"has space\"\n",
        3,
        "console.port[0].name",
        "port name",
    );
    assert_refused("input = 1\n", 1, "input", "invalid type");
}

#[test]
fn syntax_errors_are_refused_with_their_line() {
    let (line, key, why) = refused("cpus = 1\n\nmemory_mib = = 3\n");
    assert_eq!((line, key.as_str()), (3, ""), "{why}");
    assert!(!why.contains('\n'), "{why}");
    let (line, _, why) = refused("cpus = 1\ncpus = 2\n");
    assert_eq!(line, 2, "{why}");
    assert!(why.contains("duplicate"), "{why}");
}

#[test]
fn too_many_console_ports_are_refused() {
    let mut text = String::from("[console]\n");
    for i in 0..=MAX_EXTRA_PORTS {
        text.push_str(&format!("[[console.port]]\nname = \"p{i}\"\n"));
    }
    let (line, key, why) = refused(&text);
    assert_eq!(key, "console.port", "{why}");
    assert!(why.contains("at most 30"), "{why}");
    assert_eq!(line, 2, "{why}");
}

#[test]
fn missing_files_are_refused_with_their_key_path_and_line() {
    let dir = std::env::temp_dir().join(format!("isola-vmconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vmlinux = dir.join("vmlinux");
    std::fs::write(&vmlinux, b"not a kernel, but a file").unwrap();
    let file = dir.join("vm.toml");
    let cases = [
        (
            "kernel = \"vmlinux\"\n[[disk]]\npath = \"nope.img\"\n",
            3,
            "disk[0].path",
            "No such file",
        ),
        (
            "cpus = 1\nkernel = \"absent\"\n",
            2,
            "kernel",
            "No such file",
        ),
        ("kernel = \".\"\n", 1, "kernel", "not a regular file"),
        (
            "[console]\nlog = \"no/such/dir/log\"\n",
            2,
            "console.log",
            "does not exist",
        ),
    ];
    for (text, line, key, words) in cases {
        std::fs::write(&file, text).unwrap();
        let err = file::load(&file).unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("{}:{line}: {key}: ", file.display())),
            "{shown}"
        );
        assert!(shown.contains(words), "{shown}");
    }
    // Relative paths are the file's directory's.
    std::fs::write(&file, "kernel = \"vmlinux\"\n").unwrap();
    assert_eq!(file::load(&file).unwrap().kernel, Some(vmlinux));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_flags_name_the_flag() {
    let err = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args::from_args(&args).unwrap_err()
    };
    assert!(err(&["--cpus", "0"]).starts_with("--cpus: "));
    assert!(err(&["--disk", "/a,engine=fast"]).contains("engine 'fast'"));
    assert!(err(&["--net", "t,mac=ff:00:00:00:00:00"]).contains("multicast"));
    assert!(err(&["--display", "10x10"]).starts_with("--display: "));
    assert!(err(&["--bogus"]).contains("unknown VM flag"));
    assert!(err(&["--kernel"]).contains("needs a value"));
}

#[test]
fn the_examples_in_docs_parse() {
    for (name, text) in [
        (
            "test-guest",
            include_str!("../../docs/examples/test-guest.toml"),
        ),
        (
            "linux-desktop",
            include_str!("../../docs/examples/linux-desktop.toml"),
        ),
        ("server", include_str!("../../docs/examples/server.toml")),
    ] {
        let vm = parse(text).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let back = args::from_args(&args::to_args(&vm)).unwrap();
        assert_eq!(back.resolved(), vm.resolved(), "{name}");
    }
}
