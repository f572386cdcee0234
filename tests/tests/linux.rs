//! Linux's own drivers against every Isola device: the project's Linux 6.1 guest
//! (`scripts/linux-guest`: Debian's linux-source-6.1, tests/linux/patches, tests/linux/config,
//! a busybox initramfs whose /init is tests/linux/init) booted by `scripts/isola-run` with
//! the real device processes under isola-supervisor. The guest runs each check and prints one
//! `ISOLA-CHECK` line; the test confirms each from the host (the bytes in the disk image,
//! datagrams counted on the tap, the echo on the console socket, the picture on the display).
//!
//! Few boots, several checks each (a boot costs 25-40 s on the nested kvm_pvm host, where
//! guest kernel mode is emulated): disks + network + console + isola-blk killed mid-I/O;
//! `scripts/isola-run --linux` (every device) for the GPU and keyboard, isola-input killed
//! between keys. Each prints the kind of host it ran on. Two vCPUs: `tests/linux_smp.rs`.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use isola_ipc::supervisor::DaemonState;
use isola_tests::display::decode_png;
use isola_tests::linux::{host_kind, image, pattern, say, Guest, Image};
use isola_tests::net::{host_udp, in_netns, make_tap, ping, GUEST_IP, HOST_IP};
use isola_tests::supervisor::{supervisor_status, wait_until};
use isola_tests::{binary, scratch_dir, skip, Missing};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const CHECK: Duration = Duration::from_secs(240);
const MIB: usize = 1 << 20;
/// The guest's blk check writes `pattern(BLK_SEED, 1 MiB)` at 1 MiB of /dev/vda.
const BLK_SEED: u64 = 4242;
const UDP_COUNT: usize = 50;

/// The image, or `None` after recording why this host cannot build it (the packages are
/// ones `.ci/run` installs, so under CI that fails the test).
fn linux_image() -> Option<Image> {
    say(format!("host is {}", host_kind().1));
    match image() {
        Ok(image) => Some(image),
        Err(why) => {
            skip(Missing::Installable, why);
            None
        }
    }
}

/// The pid of the supervisor's running daemon `name`, once it runs.
fn daemon_pid(supervisor: &Path, name: &str) -> u32 {
    wait_until(&format!("{name} running"), Duration::from_secs(30), || {
        supervisor_status(supervisor)
            .into_iter()
            .find(|d| d.name == name && d.state == DaemonState::Running)?
            .pid
    })
}

/// SIGKILLs daemon `name` and waits until the supervisor runs a new one; returns the old pid.
fn kill_daemon(supervisor: &Path, name: &str) -> u32 {
    let pid = daemon_pid(supervisor, name);
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill the daemon");
    wait_until(
        &format!("{name} restarted"),
        Duration::from_secs(30),
        || {
            supervisor_status(supervisor)
                .into_iter()
                .find(|d| {
                    d.name == name
                        && d.state == DaemonState::Running
                        && d.pid.is_some_and(|p| p != pid)
                })
                .map(|_| ())
        },
    );
    pid
}

/// Types `line` through `isolactl console SOCKET` (stdin a pipe) and waits for `expect` on
/// its output; returns everything it printed.
fn console_round_trip(socket: &Path, line: &str, expect: &str) -> String {
    let mut child = Command::new(binary("isolactl"))
        .arg("console")
        .arg(socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("isolactl console starts");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut stdin = child.stdin.take().expect("piped");
    // The guest opens hvc0 for reading right after saying it is ready: type until it answers.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen = Vec::new();
    let mut typed = false;
    'outer: while Instant::now() < deadline {
        if !typed {
            stdin
                .write_all(format!("{line}\n").as_bytes())
                .expect("typed on the console");
            typed = true;
        }
        while let Ok(l) = rx.recv_timeout(Duration::from_secs(1)) {
            let hit = l.contains(expect);
            seen.push(l);
            if hit {
                break 'outer;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = seen.join("\n");
    assert!(
        text.contains(expect),
        "the console never echoed {expect:?}; isolactl console printed:\n{text}"
    );
    text
}

/// Receives `count` datagrams "isola-udp SEQ" on `socket`; returns the distinct sequence
/// numbers seen within `timeout`.
fn receive_udp(socket: &UdpSocket, count: usize, timeout: Duration) -> usize {
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout set");
    let deadline = Instant::now() + timeout;
    let mut seen = vec![false; count];
    let mut buf = [0u8; 256];
    while Instant::now() < deadline && seen.iter().any(|s| !s) {
        let Ok(n) = socket.recv(&mut buf) else {
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..n]);
        if let Some(seq) = text
            .strip_prefix("isola-udp ")
            .and_then(|s| s.parse::<usize>().ok())
        {
            if let Some(s) = seen.get_mut(seq) {
                *s = true;
            }
        }
    }
    seen.iter().filter(|s| **s).count()
}

#[test]
fn linux_drives_blk_net_console_and_survives_an_isola_blk_kill() {
    let Some(image) = linux_image() else {
        return;
    };
    in_netns(move || {
        let scratch = scratch_dir("linux-blk-net");
        let disk = scratch.join("disk.img");
        let ro = scratch.join("ro.img");
        std::fs::write(&disk, vec![0u8; 16 * MIB]).expect("disk image");
        let ro_bytes = pattern(7, 4 * MIB);
        std::fs::write(&ro, &ro_bytes).expect("read-only image");
        make_tap("isolalt0");
        // Bound before the guest sends its burst.
        let from_guest = host_udp(5601, 4 * MIB);
        let run_dir = scratch.join("run");
        let ro_spec = format!("{},ro", ro.display());
        let cmdline = format!(
            "isola_checks=blk,net,console,restart isola_seed={BLK_SEED} \
             isola_net={GUEST_IP}/24,{HOST_IP} isola_rounds=8"
        );
        let mut guest = Guest::boot(
            &run_dir,
            &image,
            &cmdline,
            &[
                "--disk",
                disk.to_str().expect("utf-8"),
                "--disk",
                &ro_spec,
                "--net",
                "isolalt0",
                "--console",
            ],
        );

        // blk: the guest's bytes are in the image; the read-only disk refused and is intact.
        let blk = guest.check_ok("blk", CHECK);
        assert!(blk.contains("vdb=refused"), "read-only disk: {blk}");
        let image_bytes = std::fs::read(&disk).expect("disk image readable");
        assert!(
            image_bytes[MIB..2 * MIB] == pattern(BLK_SEED, MIB)[..],
            "the host does not see the guest's pattern at 1 MiB of the image"
        );
        assert!(
            std::fs::read(&ro).expect("ro image") == ro_bytes,
            "the read-only image changed"
        );

        // net: the guest pinged us; its burst arrives here; ours arrives there; we ping it.
        guest.line("ISOLA-READY net-udp", CHECK);
        let got = receive_udp(&from_guest, UDP_COUNT, Duration::from_secs(60));
        assert_eq!(got, UDP_COUNT, "datagrams from the guest");
        guest.line("ISOLA-READY net-recv", CHECK);
        let replies = ping(
            GUEST_IP.parse::<Ipv4Addr>().expect("ip"),
            3,
            Duration::from_secs(10),
        );
        assert_eq!(replies, 3, "the guest answers the host's pings");
        let to_guest = UdpSocket::bind((HOST_IP, 0)).expect("bind");
        for seq in 0..UDP_COUNT {
            to_guest
                .send_to(format!("isola-udp {seq}").as_bytes(), (GUEST_IP, 5602))
                .expect("datagram sent");
            std::thread::sleep(Duration::from_millis(20));
        }
        let net = guest.check_ok("net", CHECK);
        assert!(net.contains(&format!("distinct={UDP_COUNT}")), "{net}");

        // console: a line typed through `isolactl console` comes back from the guest's shell.
        guest.line("ISOLA-READY console", CHECK);
        let token = format!("isola-line-{}", std::process::id());
        console_round_trip(
            &run_dir.join("console.sock"),
            &token,
            &format!("isola-echo: {token}"),
        );
        guest.check_ok("console", CHECK);

        // restart: isola-blk killed while the guest writes and reads; no error, data intact.
        guest.line("ISOLA-READY restart", CHECK);
        guest.line("ISOLA-ROUND 0", CHECK);
        let supervisor = run_dir.join("supervisor.sock");
        let killed = kill_daemon(&supervisor, "blk0");
        say(format!(
            "isola-blk (pid {killed}) killed at {:.1} s",
            guest.elapsed().as_secs_f64()
        ));
        let restart = guest.check_ok("restart", CHECK);
        say(format!("restart check: {restart}"));
        let blk0 = supervisor_status(&supervisor)
            .into_iter()
            .find(|d| d.name == "blk0")
            .expect("blk0");
        assert!(blk0.restarts >= 1, "blk0 was not restarted: {blk0:?}");
        let image_bytes = std::fs::read(&disk).expect("disk image readable");
        let round = pattern(99, 256 * 1024);
        for r in 0..8 {
            let at = (64 + r * 4) * 65536;
            assert!(
                image_bytes[at..at + round.len()] == round[..],
                "restart round {r}: the image does not hold the guest's data"
            );
        }
        guest.finish();
    });
}

/// The share of pixels in the top-left `w` x `h` area of a screenshot that differ from the
/// most common colour there (the background), and the number of 16-pixel rows holding some.
fn drawn(px: &[u32], width: u32, w: u32, h: u32) -> (usize, usize) {
    let mut counts = std::collections::HashMap::new();
    for y in 0..h {
        for x in 0..w {
            *counts.entry(px[(y * width + x) as usize]).or_insert(0usize) += 1;
        }
    }
    let background = counts
        .iter()
        .max_by_key(|(_, n)| **n)
        .map_or(0, |(c, _)| *c);
    let mut rows = std::collections::HashSet::new();
    let mut fg = 0;
    for y in 0..h {
        for x in 0..w {
            if px[(y * width + x) as usize] != background {
                fg += 1;
                rows.insert(y / 16);
            }
        }
    }
    (fg, rows.len())
}

#[test]
fn linux_every_device_gpu_fbcon_and_keyboard_through_an_isola_input_kill() {
    let Some(_image) = linux_image() else {
        return;
    };
    let scratch = scratch_dir("linux-gpu-input");
    let run_dir = scratch.join("run");
    let cmdline = format!(
        "{} isola_checks=gpu,input,smp,power isola_keys=4",
        isola_tests::linux::BASE_CMDLINE
    );
    // `isola-run --linux`: the image with every device (disk, console, GPU + display, input).
    let mut guest = Guest::start(&run_dir, &["--linux", "--cmdline", &cmdline]);

    // gpu: virtio_gpu's DRM card and fbcon; the display shows text in the console area.
    let gpu = guest.check_ok("gpu", CHECK);
    // card0's device is the PCI function (driver virtio-pci); the framebuffer's name says
    // whose DRM fbdev it is.
    assert!(gpu.contains("fb0=virtio_gpudrmfb"), "{gpu}");
    guest.line("ISOLA-READY gpu-drawn", CHECK);
    let shot = scratch.join("screen.png");
    let deadline = Instant::now() + Duration::from_secs(120);
    let (fg, rows) = loop {
        let out = Command::new(binary("isolactl"))
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("screenshot")
            .arg(&shot)
            .output()
            .expect("isolactl runs");
        if out.status.success() {
            let (width, height, px) = decode_png(&std::fs::read(&shot).expect("png"));
            let (fg, rows) = drawn(&px, width, width.min(640), height.min(240));
            if fg > 2000 && rows >= 6 {
                break (fg, rows);
            }
            assert!(
                Instant::now() < deadline,
                "the display never showed fbcon's text: {fg} drawn pixels in {rows} text rows"
            );
        } else {
            assert!(
                Instant::now() < deadline,
                "isolactl screenshot: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    say(format!("fbcon drew {fg} pixels over {rows} text rows"));

    // input: `a` typed, isola-input killed and restarted, `b` typed: all four key events.
    guest.line("evdev ready", CHECK);
    let isolactl = |args: &[&str]| {
        let out = Command::new(binary("isolactl"))
            .arg("--run-dir")
            .arg(&run_dir)
            .args(args)
            .output()
            .expect("isolactl runs");
        assert!(
            out.status.success(),
            "isolactl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    isolactl(&["type", "a"]);
    guest.line("code=30 value=0", CHECK);
    let supervisor = run_dir.join("supervisor.sock");
    kill_daemon(&supervisor, "input");
    // The new isola-input's control socket, then the core's reconnection: retry until typed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new(binary("isolactl"))
            .arg("--run-dir")
            .arg(&run_dir)
            .args(["key", "b"])
            .output()
            .expect("isolactl runs");
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "isolactl key b after the restart: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let input = guest.check_ok("input", CHECK);
    let events: Vec<&String> = guest
        .launch
        .stdout
        .seen
        .iter()
        .filter(|l| l.contains("evdev event type=1 "))
        .collect();
    for want in [
        "code=30 value=1",
        "code=30 value=0",
        "code=48 value=1",
        "code=48 value=0",
    ] {
        assert!(
            events.iter().any(|l| l.contains(want)),
            "no key event {want} in the guest: {events:?} ({input})"
        );
    }
    // One vCPU, whose CPUID Isola gives APIC id 0: what Linux read tells whether this host
    // applies the VMM's CPUID at all (two vCPUs: `tests/linux_smp.rs`).
    let smp = guest.check_ok("smp", CHECK);
    assert!(smp.contains("cpus=1 online=0"), "{smp}");
    say(format!(
        "CPUID topology {}: {smp}",
        if smp.ends_with("initial_apicids=0") {
            "as Isola set it"
        } else {
            "NOT as Isola set it (the host answers CPUID itself)"
        }
    ));
    // power: `isolactl shutdown` presses the ACPI power button; Linux's GED and button
    // drivers turn it into KEY_POWER, /init's listener powers off, and the shutdown is
    // graceful.
    guest.line("ISOLA-READY power", CHECK);
    let out = Command::new(binary("isolactl"))
        .arg("--run-dir")
        .arg(&run_dir)
        .args(["shutdown", "--timeout", "120"])
        .output()
        .expect("isolactl runs");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && said.starts_with("graceful: the guest powered off"),
        "isolactl shutdown: {said}{}\nconsole:\n{}",
        String::from_utf8_lossy(&out.stderr),
        guest.launch.stdout.seen.join("\n")
    );
    say(format!("Linux answered the power button: {}", said.trim()));
    guest.line("ISOLA-POWER-KEY uptime=", CHECK);
    guest.wait_end();
}
