//! virtio-input driven by the crates.io `virtio-drivers` crate (the `vdrivers` guest, its
//! `VirtIOInput`) against `isola-input`'s keyboard and tablet: the configuration the crate
//! reads (names, ids, bitmaps, absolute ranges), `isolactl key`, `type` and `pointer` events in
//! order with the right codes, 100 resets each with a key, and isola-input killed mid-work.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use isola_ipc::DeviceLink;
use isola_tests::input::{status, IsolaInput};
use isola_tests::vdrivers::{self, assert_ok, cmdline, report, RUN_TIMEOUT};
use isola_tests::{binary, scratch_dir, Core};

const WAIT: Duration = Duration::from_secs(60);

fn start_core(dir: &Path, input: &IsolaInput, extra: &str) -> (Core, std::path::PathBuf) {
    let devices = input.device_args().to_vec();
    vdrivers::start(
        dir,
        &devices,
        &cmdline("input", extra),
        &["--device-timeout", "20"],
    )
}

fn isolactl_ok(input: &IsolaInput, args: &[&str]) {
    let out = Command::new(binary("isolactl"))
        .arg("--input")
        .arg(&input.control)
        .args(args)
        .output()
        .expect("isolactl runs");
    assert!(out.status.success(), "isolactl {args:?}: {out:?}");
}

fn wait_drained(input: &IsolaInput) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(&input.control).pending != 0 {
        assert!(Instant::now() < deadline, "events stay pending");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One input event: (type, code, value).
type Event = (u16, u16, i32);

/// The guest's `dev=<n> report ...` lines as (dev, events).
fn reports(lines: &[&str]) -> Vec<(u32, Vec<Event>)> {
    lines
        .iter()
        .filter_map(|l| {
            let rest = l.strip_prefix("dev=")?;
            let (dev, events) = rest.split_once(" report ")?;
            let events = events
                .split(' ')
                .map(|e| {
                    let mut p = e.split(':');
                    let mut next = || p.next().unwrap().parse::<i64>().unwrap();
                    (next() as u16, next() as u16, next() as i32)
                })
                .collect();
            Some((dev.parse().unwrap(), events))
        })
        .collect()
}

const SYN: Event = (0, 0, 0);

fn key(code: u16, value: i32) -> Vec<Event> {
    vec![(1, code, value), SYN]
}

#[test]
fn input_configuration_and_isolactl_key_type_and_pointer_events_in_order() {
    let dir = scratch_dir("vd-input-events");
    let input = IsolaInput::start(&dir, &[]);
    let (mut core, _) = start_core(&dir, &input, "");
    core.wait_for("vdrivers: ready devices=2", WAIT);
    isolactl_ok(&input, &["key", "ctrl+alt+delete"]);
    isolactl_ok(&input, &["type", "aB"]);
    isolactl_ok(
        &input,
        &["pointer", "100", "32767", "--buttons", "left,right"],
    );
    isolactl_ok(&input, &["pointer", "0", "5"]);
    wait_drained(&input);
    isolactl_ok(&input, &["key", "esc", "--press"]);
    let done = core.finish(RUN_TIMEOUT);
    let lines = assert_ok(&done);

    // The configuration, as the crate read it (the same facts the C guest sees).
    let expect = [
        "dev=0 name=\"Isola Keyboard\"".to_owned(),
        "dev=0 ids=0006:1af4:0001:0001".to_owned(),
        "dev=0 ev=0x00 size=0 bits=".to_owned(),
        format!("dev=0 ev=0x01 size=32 bits=fe{}01", "ff".repeat(30)),
        "dev=0 ev=0x02 size=0 bits=".to_owned(),
        "dev=0 ev=0x03 size=0 bits=".to_owned(),
        "dev=0 ev=0x11 size=1 bits=07".to_owned(),
        "dev=0 ev=0x14 size=1 bits=03".to_owned(),
        "dev=1 name=\"Isola Tablet\"".to_owned(),
        "dev=1 ids=0006:1af4:0002:0001".to_owned(),
        format!("dev=1 ev=0x01 size=35 bits={}07", "00".repeat(34)),
        "dev=1 ev=0x02 size=2 bits=4001".to_owned(),
        "dev=1 ev=0x03 size=1 bits=03".to_owned(),
        "dev=1 ev=0x11 size=0 bits=".to_owned(),
        "dev=1 abs=0 min=0 max=32767 fuzz=0 flat=0 res=0".to_owned(),
        "dev=1 abs=1 min=0 max=32767 fuzz=0 flat=0 res=0".to_owned(),
    ];
    // The crate's input set is just the common one; Isola offers nothing beyond it.
    assert_eq!(
        vdrivers::features_beyond_crate(&lines, vdrivers::COMMON_FEATURES),
        0
    );
    for want in &expect {
        assert!(
            lines.contains(&want.as_str()),
            "missing {want:?}: {}",
            report(&done)
        );
    }

    let (ctrl, alt, del, a, shift, b, esc) = (29, 56, 111, 30, 42, 48, 1);
    let mut want_kbd = Vec::new();
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
        (esc, 1),
    ] {
        want_kbd.push(key(code, value));
    }
    let got = reports(&lines);
    let kbd: Vec<_> = got
        .iter()
        .filter(|r| r.0 == 0)
        .map(|r| r.1.clone())
        .collect();
    assert_eq!(kbd, want_kbd, "{}", report(&done));
    let tablet: Vec<_> = got
        .iter()
        .filter(|r| r.0 == 1)
        .map(|r| r.1.clone())
        .collect();
    assert_eq!(
        tablet,
        vec![
            vec![
                (3, 0, 100),
                (3, 1, 32767),
                (1, 0x110, 1),
                (1, 0x112, 0),
                (1, 0x111, 1),
                SYN
            ],
            vec![(3, 0, 0), (3, 1, 5), (1, 0x110, 0), (1, 0x111, 0), SYN],
        ],
        "{}",
        report(&done)
    );
}

#[test]
fn input_reset_and_reinitialised_a_hundred_times_with_a_key_each_time() {
    let dir = scratch_dir("vd-input-resets");
    let input = IsolaInput::start(&dir, &[]);
    let (mut core, _) = start_core(&dir, &input, "vdrivers.mode=resets vdrivers.resets=100");
    let letters = b"abcdefghijklmnopqrstuvwxyz";
    for round in 0..100usize {
        core.wait_for(&format!("vdrivers: ready {round}"), WAIT);
        let letter = (letters[round % 26] as char).to_string();
        isolactl_ok(&input, &["key", &letter, "--press"]);
    }
    let done = core.finish(RUN_TIMEOUT);
    let lines = assert_ok(&done);
    assert!(
        lines.contains(&"resets=100 each got a key"),
        "{}",
        report(&done)
    );
    // Linux key codes of a..z, in the order the rounds pressed them.
    let codes: [u16; 26] = [
        30, 48, 46, 32, 18, 33, 34, 35, 23, 36, 37, 38, 50, 49, 24, 25, 16, 19, 31, 20, 22, 47, 17,
        45, 21, 44,
    ];
    for round in 0..100usize {
        let want = format!("round {round} report 1:{}:1 0:0:0", codes[round % 26]);
        assert!(
            lines.contains(&want.as_str()),
            "{want:?}: {}",
            report(&done)
        );
    }
}

#[test]
fn input_device_process_killed_mid_work_is_only_a_pause() {
    let dir = scratch_dir("vd-input-kill");
    let mut input = IsolaInput::start(&dir, &[]);
    let (mut core, control) = start_core(&dir, &input, "");
    core.wait_for("vdrivers: ready devices=2", WAIT);
    isolactl_ok(&input, &["type", "abc"]);
    wait_drained(&input);
    for kill in 1..=2u32 {
        input.kill_and_restart();
        // Both devices (keyboard and tablet) reconnect to the new process.
        let deadline = Instant::now() + WAIT;
        loop {
            let status = match isola_tests::control(&control, &isola_ipc::ControlRequest::Status) {
                isola_ipc::ControlResponse::Status(s) => s,
                other => panic!("unexpected answer {other:?}"),
            };
            if status
                .devices
                .iter()
                .all(|d| d.link == DeviceLink::Connected && d.reconnects == kill)
            {
                break;
            }
            assert!(Instant::now() < deadline, "not reconnected: {status:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
        isolactl_ok(&input, &["type", "de"]);
        wait_drained(&input);
    }
    isolactl_ok(&input, &["key", "esc", "--press"]);
    let done = core.finish(RUN_TIMEOUT);
    let lines = assert_ok(&done);
    let (a, b, c, d, e, esc) = (30, 48, 46, 32, 18, 1);
    let mut want = Vec::new();
    for code in [a, b, c, d, e, d, e] {
        want.push(key(code, 1));
        want.push(key(code, 0));
    }
    want.push(key(esc, 1));
    let kbd: Vec<_> = reports(&lines)
        .into_iter()
        .filter(|r| r.0 == 0)
        .map(|r| r.1)
        .collect();
    assert_eq!(kbd, want, "{}", report(&done));
}
