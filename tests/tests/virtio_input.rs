//! The `virtio-input` guest on `isola-input`'s keyboard and tablet: the configuration the
//! guest reads through the select/subsel window, key and pointer events injected with
//! `isolactl` arriving in order with their SYN reports, LEDs on the status queue, a hostile
//! guest, and `isola-input` killed repeatedly while events flow.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use isola_ipc::input::{InputRequest, InputResponse};
use isola_ipc::{ControlRequest, ControlResponse, DeviceLink, VcpuState};
use isola_tests::input::{reports, request, start_core, status, IsolaInput, Report};
use isola_tests::{binary, control, scratch_dir, Core};

const TIMEOUT: Duration = Duration::from_secs(60);
const EV_SYN: (u16, u16, u32) = (0, 0, 0);
const KEY_ESC: u16 = 1;

/// Reports other than the empty one (a lone SYN) each isola-input process opens with.
fn without_empty(reports: Vec<Report>) -> Vec<Report> {
    reports
        .into_iter()
        .filter(|r| r.events != [EV_SYN])
        .collect()
}

fn isolactl(input: &IsolaInput, args: &[&str]) -> (bool, String) {
    let out = Command::new(binary("isolactl"))
        .arg("--input")
        .arg(&input.control)
        .args(args)
        .output()
        .expect("isolactl runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn isolactl_ok(input: &IsolaInput, args: &[&str]) {
    let (ok, out) = isolactl(input, args);
    assert!(ok, "isolactl {args:?} failed: {out}");
}

fn key(code: u16, value: u32) -> Vec<(u16, u16, u32)> {
    vec![(1, code, value), EV_SYN]
}

/// The guest's lines with `prefix`, without the `virtio-input: ` part.
fn lines<'a>(serial: &'a [String], prefix: &str) -> Vec<&'a str> {
    serial
        .iter()
        .filter_map(|l| l.strip_prefix("virtio-input: "))
        .filter(|l| l.starts_with(prefix))
        .collect()
}

/// Waits until isola-input has handed the guest everything queued.
fn wait_drained(input: &IsolaInput) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(&input.control).pending != 0 {
        assert!(Instant::now() < deadline, "events stay pending");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn config_keys_pointer_and_leds_reach_the_guest_in_order() {
    let dir = scratch_dir("input-normal");
    let input = IsolaInput::start(&dir, &[]);
    let (mut core, _) = start_core(&dir, &input, "virtio-input.mode=normal");
    core.wait_for("virtio-input: ready devices=2", TIMEOUT);

    isolactl_ok(&input, &["key", "ctrl+alt+delete"]);
    isolactl_ok(&input, &["type", "aB"]);
    isolactl_ok(&input, &["key", "0x1e", "--press"]);
    isolactl_ok(
        &input,
        &["pointer", "100", "32767", "--buttons", "left,right"],
    );
    isolactl_ok(&input, &["pointer", "0", "5"]);
    // Refused: outside the tablet's range, an unknown key, a mouse button on the keyboard.
    for args in [
        &["pointer", "32768", "0"][..],
        &["key", "nosuchkey"],
        &["key", "0x110"],
    ] {
        let (ok, out) = isolactl(&input, args);
        assert!(!ok, "isolactl {args:?} was accepted: {out}");
    }
    wait_drained(&input);
    let (ok, out) = isolactl(&input, &["input-status"]);
    assert!(ok, "{out}");
    // 3 keys x 2 + a (2) + shift-b (4) + a press (1) = 13 reports of 2 events; two pointer
    // reports of 5 events.
    // Plus the SYN each device opens with (see isola-input's Events::new), and the first
    // pointer report states all three buttons.
    assert!(out.contains("keyboard events: 27"), "{out}");
    assert!(out.contains("tablet events: 12"), "{out}");
    isolactl_ok(&input, &["key", "esc", "--press"]);
    let done = core.finish(TIMEOUT);
    done.assert_success();
    let serial = &done.serial;

    // The configuration each device showed the guest.
    let expect_config: [&str; 17] = [
        "dev=0 name=\"Isola Keyboard\"",
        "dev=0 ids=0006:1af4:0001:0001",
        "dev=0 ev=0x00 size=0 bits=",
        &format!("dev=0 ev=0x01 size=32 bits=fe{}01", "ff".repeat(30)),
        "dev=0 ev=0x02 size=0 bits=",
        "dev=0 ev=0x03 size=0 bits=",
        "dev=0 ev=0x11 size=1 bits=07",
        "dev=0 ev=0x14 size=1 bits=03",
        "dev=1 name=\"Isola Tablet\"",
        "dev=1 ids=0006:1af4:0002:0001",
        &format!("dev=1 ev=0x01 size=35 bits={}07", "00".repeat(34)),
        "dev=1 ev=0x02 size=2 bits=4001",
        "dev=1 ev=0x03 size=1 bits=03",
        "dev=1 ev=0x11 size=0 bits=",
        "dev=1 abs=0 min=0 max=32767 fuzz=0 flat=0 res=0",
        "dev=1 abs=1 min=0 max=32767 fuzz=0 flat=0 res=0",
        "dev=0 leds sent",
    ];
    let all = lines(serial, "dev=");
    for want in expect_config {
        assert!(
            all.contains(&want),
            "missing {want:?} in:\n{}",
            all.join("\n")
        );
    }
    assert!(
        lines(serial, "dev=1 leds").is_empty(),
        "the tablet has no LEDs"
    );

    // Every report, in order, each ending with its SYN.
    let (ctrl, alt, del, a, shift, b) = (29, 56, 111, 30, 42, 48);
    let mut want_kbd: Vec<Vec<(u16, u16, u32)>> = Vec::new();
    for (code, value) in [
        (ctrl, 1),
        (alt, 1),
        (del, 1),
        (del, 0),
        (alt, 0),
        (ctrl, 0),
        (a, 1),
        (a, 0),
        (shift, 1),
        (b, 1),
        (b, 0),
        (shift, 0),
        (a, 1),
        (KEY_ESC, 1),
    ] {
        want_kbd.push(key(code, value));
    }
    let got = reports(serial);
    for dev in 0..2 {
        let first = got.iter().find(|r| r.dev == dev).expect("a report");
        assert_eq!(
            first.events,
            vec![EV_SYN],
            "each device opens with an empty report"
        );
    }
    let got = without_empty(got);
    let kbd: Vec<_> = got
        .iter()
        .filter(|r| r.dev == 0)
        .map(|r| r.events.clone())
        .collect();
    assert_eq!(kbd, want_kbd, "{got:?}");
    let tablet: Vec<_> = got.iter().filter(|r| r.dev == 1).cloned().collect();
    assert_eq!(
        tablet,
        vec![
            Report {
                dev: 1,
                events: vec![
                    (3, 0, 100),
                    (3, 1, 32767),
                    (1, 0x110, 1),
                    (1, 0x112, 0),
                    (1, 0x111, 1),
                    EV_SYN
                ],
            },
            Report {
                dev: 1,
                events: vec![(3, 0, 0), (3, 1, 5), (1, 0x110, 0), (1, 0x111, 0), EV_SYN],
            },
        ]
    );
    assert!(
        input
            .log_text()
            .contains("kbd: LEDs num=off caps=on scroll=off"),
        "{}",
        input.log_text()
    );
}

#[test]
fn hostile_guest_is_answered_and_the_devices_keep_serving() {
    let dir = scratch_dir("input-hostile");
    let mut input = IsolaInput::start(&dir, &[]);
    let (mut core, _) = start_core(&dir, &input, "virtio-input.mode=hostile");
    core.wait_for("virtio-input: ready devices=2", TIMEOUT);
    isolactl_ok(&input, &["key", "a"]);
    isolactl_ok(&input, &["pointer", "7", "8"]);
    wait_drained(&input);
    isolactl_ok(&input, &["key", "esc", "--press"]);
    let done = core.finish(TIMEOUT);
    done.assert_success();
    for dev in 0..2 {
        for want in [
            format!("dev={dev} hostile status returned=5"),
            format!("dev={dev} hostile events returned=4"),
        ] {
            assert!(
                lines(&done.serial, &want).len() == 1,
                "missing {want:?}:\n{}",
                done.serial.join("\n")
            );
        }
    }
    let got = without_empty(reports(&done.serial));
    let of = |dev| -> Vec<_> {
        got.iter()
            .filter(|r| r.dev == dev)
            .map(|r| r.events.clone())
            .collect()
    };
    assert_eq!(of(0)[..2], [key(30, 1), key(30, 0)]);
    assert_eq!(
        of(1)[0],
        vec![
            (3, 0, 7),
            (3, 1, 8),
            (1, 0x110, 0),
            (1, 0x112, 0),
            (1, 0x111, 0),
            EV_SYN
        ]
    );
    assert!(input.alive(), "isola-input survived the hostile guest");
    let log = input.log_text();
    for want in [
        "ignoring configuration write",
        "status queue: buffer",
        "status queue: ignoring event type 0x7777",
        "event queue: buffer 2 unusable",
    ] {
        assert!(
            log.contains(want),
            "isola-input's log lacks {want:?}:\n{log}"
        );
    }
    assert!(!log.contains("panicked"), "{log}");
}

fn core_devices(core: &mut Core, socket: &Path) -> isola_ipc::VmStatus {
    if let Some(report) = core.exit_report() {
        panic!("{report}");
    }
    match control(socket, &ControlRequest::Status) {
        ControlResponse::Status(status) => status,
        other => panic!("unexpected answer {other:?}"),
    }
}

/// What the injector learnt about one pointer report (x = y = its sequence number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// isola-input answered Done and then showed nothing pending: the guest has it.
    Delivered,
    /// Sent, but the process died before it confirmed delivery: may or may not arrive.
    Uncertain,
}

/// Sends numbered pointer reports one at a time, each confirmed through the status counters,
/// until `stop`; returns each sequence number's fate.
fn inject(control: &Path, stop: &std::sync::atomic::AtomicBool) -> Vec<(u32, Fate)> {
    use std::os::unix::net::UnixStream;
    let mut fates = Vec::new();
    let mut seq = 0u32;
    let mut stream: Option<UnixStream> = None;
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        let Some(s) = stream.as_mut() else {
            stream = UnixStream::connect(control).ok();
            if stream.is_none() {
                std::thread::sleep(Duration::from_millis(2));
            }
            continue;
        };
        seq += 1;
        let req = InputRequest::Pointer {
            x: seq,
            y: seq,
            buttons: 0,
        };
        let mut ask = |req: &InputRequest| -> Option<InputResponse> {
            isola_ipc::write_message(s, req).ok()?;
            isola_ipc::read_message(s).ok()
        };
        match ask(&req) {
            Some(InputResponse::Done) => {}
            Some(other) => panic!("report {seq} refused: {other:?}"),
            None => {
                fates.push((seq, Fate::Uncertain));
                stream = None;
                continue;
            }
        }
        let fate = loop {
            match ask(&InputRequest::Status) {
                Some(InputResponse::Status(st)) if st.pending == 0 => break Fate::Delivered,
                Some(_) => std::thread::sleep(Duration::from_millis(1)),
                None => break Fate::Uncertain,
            }
        };
        if fate == Fate::Uncertain {
            stream = None;
        }
        fates.push((seq, fate));
        std::thread::sleep(Duration::from_millis(1));
    }
    fates
}

#[test]
fn events_flow_through_repeated_isola_input_kills() {
    const KILLS: u32 = 10;
    let dir = scratch_dir("input-restart");
    let mut input = IsolaInput::start(&dir, &[]);
    let (mut core, core_socket) = start_core(&dir, &input, "virtio-input.timeout=120");
    core.wait_for("virtio-input: ready devices=2", TIMEOUT);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let injector = {
        let (control, stop) = (input.control.clone(), std::sync::Arc::clone(&stop));
        std::thread::spawn(move || inject(&control, &stop))
    };
    let mut seed = 0x9e37_79b9_u32;
    for kill in 1..=KILLS {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        std::thread::sleep(Duration::from_millis(100 + u64::from(seed % 200)));
        input.kill_and_restart();
        // Both devices come back; the vCPU never stopped.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let st = core_devices(&mut core, &core_socket);
            assert!(st.vcpus.iter().all(|v| v.state == VcpuState::Running));
            if st
                .devices
                .iter()
                .all(|d| d.link == DeviceLink::Connected && d.reconnects == kill)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "devices not back: {:?}",
                st.devices
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // Let events flow after the last restart too.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Release);
    let fates = injector.join().expect("injector thread");
    let last_sent = fates.last().map_or(0, |f| f.0);
    // Reports after the last restart, then the stop key.
    for seq in last_sent + 1..=last_sent + 20 {
        let req = InputRequest::Pointer {
            x: seq,
            y: seq,
            buttons: 0,
        };
        assert_eq!(request(&input.control, &req), InputResponse::Done);
    }
    wait_drained(&input);
    let esc = InputRequest::Key {
        code: KEY_ESC,
        pressed: true,
    };
    assert_eq!(request(&input.control, &esc), InputResponse::Done);
    let done = core.finish(TIMEOUT);
    done.assert_success();

    // Each report: ABS_X = ABS_Y = its number, button states (all up; a new process states
    // them once), SYN. A report cut short by a kill lacks its tail events, never its SYN.
    let seen: Vec<u32> = without_empty(reports(&done.serial))
        .into_iter()
        .filter(|r| r.dev == 1)
        .map(|r| {
            let (last, body) = r.events.split_last().expect("a report has events");
            assert_eq!(*last, EV_SYN, "{r:?}");
            assert_eq!((body[0].0, body[0].1), (3, 0), "starts with ABS_X: {r:?}");
            for e in body {
                match e {
                    (3, 0 | 1, v) => assert_eq!(*v, body[0].2, "{r:?}"),
                    (1, 0x110..=0x112, 0) => {}
                    _ => panic!("unexpected event in {r:?}"),
                }
            }
            body[0].2
        })
        .collect();
    // In order, never repeated.
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "reports out of order or repeated: {seen:?}"
    );
    let delivered: Vec<u32> = fates
        .iter()
        .filter(|f| f.1 == Fate::Delivered)
        .map(|f| f.0)
        .collect();
    let uncertain = fates.len() - delivered.len();
    for seq in delivered
        .iter()
        .copied()
        .chain(last_sent + 1..=last_sent + 20)
    {
        assert!(
            seen.binary_search(&seq).is_ok(),
            "report {seq} was lost (last sent by the injector: {last_sent}); seen: {seen:?}"
        );
    }
    assert!(
        seen.iter().all(|s| *s <= last_sent + 20),
        "the guest saw reports nobody sent"
    );
    assert!(
        delivered.len() > 10 * KILLS as usize,
        "too few reports flowed: {} delivered, {uncertain} uncertain",
        delivered.len()
    );
    eprintln!(
        "{KILLS} kills: {} reports confirmed and received, {uncertain} sent as the process died",
        delivered.len()
    );
}
