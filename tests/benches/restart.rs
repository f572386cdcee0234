//! Restart benchmark: time from a device daemon's death (SIGKILL) to the first request it
//! completes after `isola-supervisor` started it again and the core reconnected, while a
//! guest keeps the device busy. Median and max over `ISOLA_BENCH_KILLS` kills (default 20)
//! per device type.
//!
//! `cargo bench -p isola-tests --bench restart`
//!
//! The end of the interval is the line "queue N: first request completed" that the shared
//! device library logs once per queue start; the bench reads it from the daemon's stderr
//! as it is written. Kills are spaced beyond the supervisor's `--min-uptime-ms` so every
//! restart is immediate (the back-off applies to daemons that die right after starting).
//! Also reported: death -> restarted (the supervisor's log line), the part of the interval
//! spent before the core could even reconnect.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use isola_tests::supervisor::{supervisor_status, Supervisor};
use isola_tests::{binary, guest, scratch_dir, Core};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[derive(Clone)]
struct Case {
    name: &'static str,
    /// The supervisor's `--daemon` value.
    daemon: String,
    /// The core's `--device` values.
    devices: Vec<String>,
    kernel: String,
    cmdline: String,
    /// isola-input's control socket: the bench sends a key every millisecond until the
    /// restarted daemon takes one (input completes requests only when there are events).
    input_control: Option<PathBuf>,
    /// Other daemons the case needs (e.g. isola-display for the GPU), never killed.
    helpers: Vec<String>,
}

/// Sends a key press and release to `control` until the daemon accepts them.
fn poke_input(control: &Path, deadline: Instant) -> bool {
    use isola_ipc::input::{InputRequest, InputResponse};
    while Instant::now() < deadline {
        if let Ok(mut stream) = std::os::unix::net::UnixStream::connect(control) {
            let accepted = [true, false].into_iter().all(|pressed| {
                isola_ipc::write_message(&mut stream, &InputRequest::Key { code: 30, pressed })
                    .is_ok()
                    && matches!(
                        isola_ipc::read_message::<_, InputResponse>(&mut stream),
                        Ok(InputResponse::Done)
                    )
            });
            if accepted {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn measure(case: &Case, dir: &Path, kills: usize) -> Option<(Vec<Duration>, Vec<Duration>)> {
    let control = dir.join(format!("{}-supervisor.sock", case.name));
    std::env::set_var("RUST_LOG", "info");
    let mut daemons = vec![case.daemon.clone()];
    daemons.extend(case.helpers.iter().cloned());
    let mut sup = Supervisor::start(
        &control,
        &daemons,
        &["--restart-limit", "1000", "--min-uptime-ms", "200"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut args = vec![
        "--kernel".to_owned(),
        case.kernel.clone(),
        "--cmdline".to_owned(),
        case.cmdline.clone(),
        "--memory".to_owned(),
        "64".to_owned(),
    ];
    for device in &case.devices {
        args.extend(["--device".to_owned(), device.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut core = Core::start(&args);
    if let Some(input) = &case.input_control {
        std::thread::sleep(Duration::from_millis(500));
        poke_input(input, Instant::now() + Duration::from_secs(30));
    }
    sup.stderr
        .wait_for("first request completed", Duration::from_secs(30))?;
    let mut to_first = Vec::new();
    let mut to_restart = Vec::new();
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(300));
        let pid = supervisor_status(&control)
            .into_iter()
            .find(|d| d.name == case.name)?
            .pid?;
        let t0 = Instant::now();
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).ok()?;
        sup.stderr
            .wait_for("restarted, pid", Duration::from_secs(10))?;
        to_restart.push(t0.elapsed());
        if let Some(input) = &case.input_control {
            poke_input(input, Instant::now() + Duration::from_secs(10));
        }
        sup.stderr
            .wait_for("first request completed", Duration::from_secs(10))?;
        to_first.push(t0.elapsed());
    }
    if let Some(report) = core.exit_report() {
        eprintln!("{}: the core ended early: {report}", case.name);
        return None;
    }
    Some((to_first, to_restart))
}

/// The tap of the net case, in a network namespace of this process's own.
const TAP: &str = "rst0";

/// As root: a private network namespace (inherited by every process the bench starts) with a
/// tap for isola-net. Returns the tap's interface index.
fn private_tap() -> Option<i32> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
    for args in [
        &["link", "set", "lo", "up"][..],
        &["tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"],
        &["link", "set", TAP, "up"],
    ] {
        let ok = std::process::Command::new("ip")
            .args(args)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return None;
        }
    }
    let name = std::ffi::CString::new(TAP).ok()?;
    // SAFETY: if_nametoindex reads the NUL-terminated name only.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index as i32)
}

/// Sends a broadcast ARP request for the guest's address out of the tap every millisecond,
/// from a thread, for the rest of the run: isola-net completes a receive request for each
/// one it hands the guest.
fn arp_every_millisecond(ifindex: i32) {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        )
    };
    assert!(fd >= 0, "AF_PACKET socket");
    let mut frame = vec![0xffu8; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99, 0x08, 0x06]);
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99, 10, 0, 0, 1]);
    frame.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
    std::thread::spawn(move || {
        // SAFETY: all-zero is a valid sockaddr_ll; the fields set below make it complete.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = ifindex;
        to.sll_halen = 6;
        to.sll_addr[..6].fill(0xff);
        loop {
            // SAFETY: sends `frame` (valid for its length) to a valid sockaddr_ll.
            unsafe {
                libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&to as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}

fn main() {
    let kills: usize = std::env::var("ISOLA_BENCH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    // Before any thread starts: unshare needs a single-threaded process.
    let tap = private_tap();
    let dir = scratch_dir("bench-restart");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 4 << 20]).expect("scratch image");
    let sock = |name: &str| dir.join(name).display().to_string();
    let input_control = dir.join("input-control.sock");
    let cases = [
        Case {
            name: "blk",
            daemon: format!(
                "blk:{}:{} --image {}",
                sock("blk.sock"),
                binary("isola-blk").display(),
                image.display()
            ),
            devices: vec![format!("blk,socket={}", sock("blk.sock"))],
            kernel: guest("virtio-blk.elf").display().to_string(),
            cmdline: "virtio-blk.mode=loop virtio-blk.sectors=256 virtio-blk.depth=16".into(),
            input_control: None,
            helpers: vec![],
        },
        Case {
            name: "console",
            daemon: format!(
                "console:{}:{} --port socket={}",
                sock("console.sock"),
                binary("isola-console").display(),
                sock("console-user.sock")
            ),
            devices: vec![format!("console,socket={}", sock("console.sock"))],
            kernel: guest("virtio-console.elf").display().to_string(),
            cmdline: "console.mode=stream console.seconds=3600 console.fill=0".into(),
            input_control: None,
            helpers: vec![],
        },
        Case {
            name: "input",
            daemon: format!(
                "input:-:{} --keyboard-socket {} --control-socket {}",
                binary("isola-input").display(),
                sock("keyboard.sock"),
                input_control.display()
            ),
            devices: vec![format!("input,socket={}", sock("keyboard.sock"))],
            kernel: guest("virtio-input.elf").display().to_string(),
            cmdline: "virtio-input.timeout=3600".into(),
            input_control: Some(input_control.clone()),
            helpers: vec![],
        },
        Case {
            name: "gpu",
            daemon: format!(
                "gpu:{}:{} --resolution 320x200 --state-file {}",
                sock("gpu.sock"),
                binary("isola-gpu").display(),
                sock("gpu.state")
            ),
            devices: vec![format!(
                "gpu,socket={},display={}",
                sock("gpu.sock"),
                sock("display.sock")
            )],
            kernel: guest("virtio-gpu.elf").display().to_string(),
            cmdline: "virtio-gpu.frames=1000000".into(),
            input_control: None,
            helpers: vec![format!(
                "display:-:{} --socket {} --width 320 --height 200",
                binary("isola-display").display(),
                sock("display.sock")
            )],
        },
    ];
    let mut cases = Vec::from(cases);
    match tap {
        Some(ifindex) => {
            arp_every_millisecond(ifindex);
            cases.push(Case {
                name: "net",
                daemon: format!(
                    "net:{}:{} --tap {TAP}",
                    sock("net.sock"),
                    binary("isola-net").display()
                ),
                devices: vec![format!("net,socket={}", sock("net.sock"))],
                kernel: guest("virtio-net.elf").display().to_string(),
                cmdline: "virtio-net.idle=3600".into(),
                input_control: None,
                helpers: vec![],
            });
        }
        None => println!("(net skipped: needs root, `ip` and a tap)"),
    }

    println!("restart: death (SIGKILL) -> first completed request, {kills} kills per device");
    println!(
        "| device | median | max | p90 | death -> restarted (median) |\n|---|---|---|---|---|"
    );
    for case in &cases {
        match measure(case, &dir, kills) {
            Some((mut first, mut restart)) => {
                first.sort();
                restart.sort();
                println!(
                    "| {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
                    case.name,
                    ms(percentile(&first, 0.5)),
                    ms(*first.last().expect("kills > 0")),
                    ms(percentile(&first, 0.9)),
                    ms(percentile(&restart, 0.5)),
                );
            }
            None => println!("| {} | failed (see stderr) | | | |", case.name),
        }
    }
}
