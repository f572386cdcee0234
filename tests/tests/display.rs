//! isola-display end to end: this test plays the GPU backend on the display protocol, then
//! checks what people see: `isolactl screenshot` pixel for pixel, and a real VNC client
//! (LibVNCClient) that captures the same picture and sends a key and a click, which reach
//! a stand-in for isola-input's control socket.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use isola_ipc::display::{DisplayRequest, DisplayResponse};
use isola_ipc::input::{InputRequest, BUTTON_LEFT, INPUT_ABS_MAX};
use isola_tests::display::{
    code, first_difference, message, pattern, read_ppm, request, run_probe, screenshot,
    update_message, vncprobe, words, FakeInput, GpuPeer, IsolaDisplay,
};
use isola_tests::{binary, scratch_dir};

const W: u32 = 320;
const H: u32 = 200;

fn assert_same(what: &str, got: &[u32], want: &[u32], width: u32) {
    if let Some(diff) = first_difference(got, want, width) {
        panic!("{what} differs from what the GPU sent: {diff}");
    }
}

/// The handshake a GPU backend does, with the replies checked.
fn handshake(peer: &mut GpuPeer, width: u32, height: u32) {
    let (req, flags, features) = peer.ask(code::GET_PROTOCOL_FEATURES, &[]);
    assert_eq!((req, flags), (code::GET_PROTOCOL_FEATURES, 4));
    assert_eq!(features, 1u64.to_ne_bytes(), "EDID offered, DMABUF2 not");
    peer.send(code::SET_PROTOCOL_FEATURES, &1u64.to_ne_bytes());
    let (req, _, info) = peer.ask(code::GET_DISPLAY_INFO, &[]);
    assert_eq!(req, code::GET_DISPLAY_INFO);
    assert_eq!(info.len(), 24 + 16 * 24);
    let word = |b: &[u8], i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().unwrap());
    assert_eq!(word(&info, 0), 0x1101, "RESP_OK_DISPLAY_INFO");
    assert_eq!(
        (word(&info, 32), word(&info, 36), word(&info, 40)),
        (width, height, 1)
    );
    assert_eq!(word(&info, 48 + 16), 0, "scanout 1 disabled");
    let (req, _, edid) = peer.ask(code::GET_EDID, &words(&[0]));
    assert_eq!(req, code::GET_EDID);
    assert_eq!(word(&edid, 0), 0x1104, "RESP_OK_EDID");
    assert_eq!(word(&edid, 24), 128);
    let base = &edid[32..160];
    assert_eq!(&base[..8], &[0, 255, 255, 255, 255, 255, 255, 0]);
    assert_eq!(
        base.iter().fold(0u8, |s, b| s.wrapping_add(*b)),
        0,
        "EDID checksum"
    );
    let d = &base[54..72];
    let mode = (
        u32::from(d[2]) | (u32::from(d[4] >> 4) << 8),
        u32::from(d[5]) | (u32::from(d[7] >> 4) << 8),
    );
    assert_eq!(mode, (width, height), "EDID preferred mode");
}

#[test]
fn screenshot_matches_what_the_gpu_sent() {
    let dir = scratch_dir("display-shot");
    let mut display = IsolaDisplay::start(&dir, false, &["--width", "1024", "--height", "600"]);
    let mut gpu = GpuPeer::connect(&display.socket);
    handshake(&mut gpu, 1024, 600);

    // Before any SCANOUT there is no picture to show.
    match request(&display.control, &DisplayRequest::Screenshot { scanout: 0 }) {
        DisplayResponse::Error(e) => assert!(e.contains("no picture"), "{e}"),
        other => panic!("screenshot without a scanout answered {other:?}"),
    }
    gpu.scanout(0, W, H);
    let mut picture = pattern(W, H, 1);
    gpu.update(0, 0, W, H, &picture);
    // A partial update on top: only its rectangle changes.
    let patch = pattern(50, 30, 2);
    gpu.update(100, 70, 50, 30, &patch);
    for row in 0..30 {
        let at = ((70 + row) * W + 100) as usize;
        picture[at..at + 50]
            .copy_from_slice(&patch[(row * 50) as usize..((row + 1) * 50) as usize]);
    }
    // Cursor messages are taken (they are not part of the screenshot).
    let cursor = isola_tests::display::words(&[0, 10, 10, 1, 1]);
    let mut cursor_msg = cursor.clone();
    cursor_msg.extend(std::iter::repeat_n(0xffu8, 64 * 64 * 4));
    gpu.send(code::CURSOR_UPDATE, &cursor_msg);
    gpu.send(code::CURSOR_POS, &words(&[0, 20, 20]));
    gpu.send(code::CURSOR_POS_HIDE, &words(&[0, 20, 20]));
    display.wait_updates(2);

    let (w, h, shot) = screenshot(&display.control, &dir.join("shot.png"));
    assert_eq!((w, h), (W, H));
    assert_same("the screenshot", &shot, &picture, W);

    let status = display.status();
    assert_eq!(status.scanouts, vec![Some((W, H))]);
    assert!(status.gpu_connected);
    assert_eq!(status.updates, 2);

    // Other scanouts are refused with a reason; so is a disabled scanout.
    match request(&display.control, &DisplayRequest::Screenshot { scanout: 3 }) {
        DisplayResponse::Error(e) => assert!(e.contains("scanout 3"), "{e}"),
        other => panic!("{other:?}"),
    }
    gpu.scanout(0, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while display.status().scanouts != vec![None] {
        assert!(Instant::now() < deadline, "scanout was not disabled");
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = Command::new(binary("isolactl"))
        .arg("--display")
        .arg(&display.control)
        .args(["screenshot", dir.join("none.png").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no picture"));
    display.assert_alive();
}

#[test]
fn hostile_gpu_messages_are_dropped_and_the_picture_survives() {
    let dir = scratch_dir("display-hostile");
    let mut display = IsolaDisplay::start(&dir, false, &[]);
    let mut gpu = GpuPeer::connect(&display.socket);
    // An UPDATE before any SCANOUT.
    gpu.update(0, 0, 1, 1, &[0x00ff_0000]);
    gpu.scanout(0, W, H);
    let picture = pattern(W, H, 3);
    gpu.update(0, 0, W, H, &picture);
    display.wait_updates(1);

    let bad: Vec<Vec<u8>> = vec![
        update_message(W - 1, 0, 2, 1, &[1, 2]), // sticks out on the right
        update_message(0, H, 1, 1, &[1]),        // below the scanout
        update_message(u32::MAX, 0, 2, 1, &[1, 2]), // x + w overflows
        update_message(0, 0, 0x1_0000, 0x1_0000, &[1, 2]), // claims far more than it carries
        update_message(0, 0, 2, 2, &[1, 2, 3]),  // one pixel short
        message(code::UPDATE, 0, &[0; 7]),       // truncated header
        message(code::SCANOUT, 0, &words(&[0, 100_000, 100_000])), // too large
        message(code::SCANOUT, 0, &words(&[0, 8192, 8192])), // too many pixels
        message(code::SCANOUT, 0, &words(&[0, 5])), // short
        message(code::SCANOUT, 0, &words(&[7, 64, 64])), // a scanout not shown
        message(code::CURSOR_UPDATE, 0, &words(&[0, 1, 2])), // short cursor
        message(code::CURSOR_POS, 0, &words(&[9, 1, 2])), // other scanout
        message(99, 0, &[1, 2, 3]),              // unknown request
        message(0, 0, &[]),                      // request 0
        message(code::GET_DISPLAY_INFO, 4, &[]), // a "reply" from the backend
        message(
            code::DMABUF_SCANOUT,
            0,
            &words(&[0, 0, 0, 64, 64, 64, 64, 256, 0, 0]),
        ),
    ];
    for msg in &bad {
        gpu.send_raw(msg).expect("display keeps reading");
    }
    // DMABUF scanouts carry a file descriptor: refused, and none of them stays open.
    let fds_before = display.open_fds();
    let dmabuf = std::fs::File::open("/dev/null").unwrap();
    let payload = words(&[0, 0, 0, 64, 64, 64, 64, 256, 0, 0]);
    for _ in 0..64 {
        isola_device_common::testing::raw_message(
            &gpu.stream,
            code::DMABUF_SCANOUT,
            0,
            &payload,
            &[std::os::fd::AsRawFd::as_raw_fd(&dmabuf)],
        );
    }
    // DMABUF_UPDATE is answered (a backend blocks until it is), not acted on.
    let (req, flags, payload) = gpu.ask(code::DMABUF_UPDATE, &words(&[0, 0, 0, 1, 1]));
    assert_eq!((req, flags, payload.len()), (code::DMABUF_UPDATE, 4, 0));
    // The session still works after all of that.
    let (req, _, _) = gpu.ask(code::GET_DISPLAY_INFO, &[]);
    assert_eq!(req, code::GET_DISPLAY_INFO);
    display.wait_log("dropped", Duration::from_secs(10));
    display.wait_log("DMABUF scanout", Duration::from_secs(10));
    let fds_after = display.open_fds();
    assert!(
        fds_after < fds_before + 8,
        "DMABUF fds leaked: {fds_before} open before, {fds_after} after 64 DMABUF_SCANOUTs"
    );
    let (_, _, shot) = screenshot(&display.control, &dir.join("shot.png"));
    assert_same("the screenshot after hostile updates", &shot, &picture, W);
    assert_eq!(display.status().updates, 1, "no bad UPDATE was counted");

    // A payload larger than any valid message closes the session at once...
    gpu.send_raw(&words(&[code::UPDATE, 0, u32::MAX])).unwrap();
    assert!(
        gpu.closed_by_display(Duration::from_secs(10)),
        "session not closed"
    );
    display.wait_log("closed", Duration::from_secs(10));
    // ...the picture stays, and the next session is served.
    let (_, _, shot) = screenshot(&display.control, &dir.join("shot2.png"));
    assert_same("the picture after the session closed", &shot, &picture, W);
    let mut gpu = GpuPeer::connect(&display.socket);
    handshake(&mut gpu, 1280, 800);
    display.assert_alive();
}

#[test]
fn a_new_gpu_session_replaces_the_old_and_the_picture_stays() {
    let dir = scratch_dir("display-replace");
    let mut display = IsolaDisplay::start(&dir, false, &[]);
    let mut first = GpuPeer::connect(&display.socket);
    first.scanout(0, W, H);
    let picture = pattern(W, H, 4);
    first.update(0, 0, W, H, &picture);
    display.wait_updates(1);

    // The GPU backend restarted; the core connects again.
    let mut second = GpuPeer::connect(&display.socket);
    assert!(
        first.closed_by_display(Duration::from_secs(10)),
        "old session kept"
    );
    let (_, _, shot) = screenshot(&display.control, &dir.join("kept.png"));
    assert_same("the picture kept across sessions", &shot, &picture, W);
    assert!(display.status().gpu_connected);

    second.scanout(0, W, H);
    let next = pattern(W, H, 5);
    second.update(0, 0, W, H, &next);
    display.wait_updates(2);
    let (_, _, shot) = screenshot(&display.control, &dir.join("next.png"));
    assert_same("the new session's picture", &shot, &next, W);

    drop(second);
    let deadline = Instant::now() + Duration::from_secs(10);
    while display.status().gpu_connected {
        assert!(
            Instant::now() < deadline,
            "still connected after the GPU left"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    display.assert_alive();
}

#[test]
fn bad_command_lines_are_refused() {
    let dir = scratch_dir("display-cli");
    let sock = dir.join("d.sock");
    for args in [
        vec!["--width", "0"],
        vec!["--width", "5000"],
        vec!["--height", "-3"],
        vec!["--vnc", "0.0.0.0:5999"],
        vec!["--vnc", "not-an-address"],
    ] {
        let out = Command::new(binary("isola-display"))
            .arg("--socket")
            .arg(&sock)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("isola-display: ") && err.lines().count() == 1,
            "{args:?}: {err}"
        );
    }
}

/// RFB 3.8 handshake by hand, for a client that then misbehaves.
fn raw_vnc_client(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut version = [0u8; 12];
    s.read_exact(&mut version).unwrap();
    assert_eq!(&version, b"RFB 003.008\n");
    s.write_all(b"RFB 003.008\n").unwrap();
    let mut types = [0u8; 2];
    s.read_exact(&mut types).unwrap();
    assert_eq!(types, [1, 1], "one security type, None");
    s.write_all(&[1]).unwrap();
    let mut result = [0u8; 4];
    s.read_exact(&mut result).unwrap();
    assert_eq!(result, [0; 4]);
    s.write_all(&[1]).unwrap();
    let mut init = [0u8; 24];
    s.read_exact(&mut init).unwrap();
    let mut name = vec![0u8; u32::from_be_bytes(init[20..24].try_into().unwrap()) as usize];
    s.read_exact(&mut name).unwrap();
    s
}

#[test]
fn a_client_that_never_reads_does_not_stall_the_gpu() {
    let dir = scratch_dir("display-slow");
    let mut display = IsolaDisplay::start(&dir, true, &[]);
    let addr = display.vnc.unwrap();
    let mut gpu = GpuPeer::connect(&display.socket);
    gpu.scanout(0, 1280, 800);
    // A client asks for full updates and then never reads a byte.
    let mut slow = raw_vnc_client(addr);
    for _ in 0..4 {
        slow.write_all(&[3, 0, 0, 0, 0, 0, 0x05, 0x00, 0x03, 0x20])
            .unwrap();
    }
    let frames: Vec<Vec<u8>> = (0..2)
        .map(|s| update_message(0, 0, 1280, 800, &pattern(1280, 800, s)))
        .collect();
    let n = 60u64;
    let start = Instant::now();
    for i in 0..n {
        gpu.send_raw(&frames[(i % 2) as usize]).unwrap();
        if i % 20 == 19 {
            // The client keeps asking (incremental) without reading.
            let _ = slow.write_all(&[3, 1, 0, 0, 0, 0, 0x05, 0x00, 0x03, 0x20]);
        }
    }
    display.wait_updates(n);
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "{n} full-screen updates took {:?}",
        start.elapsed()
    );
    assert_eq!(display.status().vnc_clients, 1);
    // Garbage from a client closes only that client.
    let mut bad = raw_vnc_client(addr);
    bad.write_all(&[42]).unwrap();
    let mut b = [0u8; 1];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match bad.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(_) => assert!(Instant::now() < deadline, "bad client not closed"),
        }
    }
    display.wait_log("unknown message type 42", Duration::from_secs(10));
    drop(slow);
    display.assert_alive();
}

/// The VNC client (LibVNCClient) sees the GPU's picture over TCP and a Unix socket, with
/// Raw and with ZRLE; its key press and click reach isola-input as evdev events.
#[test]
fn vnc_client_captures_the_picture_and_types_and_clicks() {
    let dir = scratch_dir("display-vnc");
    let Some(probe) = vncprobe(&dir) else { return };
    let input = FakeInput::start(&dir.join("input.sock"));
    let vnc_unix = dir.join("vnc.sock");
    let mut display = IsolaDisplay::start(
        &dir,
        true,
        &[
            "--vnc-unix",
            vnc_unix.to_str().unwrap(),
            "--input",
            input.path.to_str().unwrap(),
        ],
    );
    let addr = display.vnc.unwrap();
    let mut gpu = GpuPeer::connect(&display.socket);
    gpu.scanout(0, W, H);
    let picture = pattern(W, H, 6);
    gpu.update(0, 0, W, H, &picture);
    let mut cursor = isola_tests::display::words(&[0, 5, 5, 3, 4]);
    // Opaque (alpha 0xff) in the top half of the cursor image, clear below.
    for i in 0..64 * 64u32 {
        let p: u32 = if i < 32 * 64 { 0xff00_ff00 } else { 0 };
        cursor.extend_from_slice(&p.to_ne_bytes());
    }
    gpu.send(code::CURSOR_UPDATE, &cursor);
    display.wait_updates(1);

    let host = addr.ip().to_string();
    let unix = vnc_unix.to_str().unwrap();
    for (host, port, encoding) in [
        (host.as_str(), addr.port(), "raw"),
        (host.as_str(), addr.port(), "zrle"),
        (unix, 0, "zrle"),
    ] {
        let out = dir.join(format!("vnc-{encoding}-{port}.ppm"));
        let lines = run_probe(
            &probe,
            host,
            port,
            encoding,
            &out,
            &["key:0x61", "click:160,100"],
        );
        let (w, h, got) = read_ppm(&out);
        assert_eq!((w, h), (W, H));
        assert_same(
            &format!("the VNC picture ({encoding}, {host})"),
            &got,
            &picture,
            W,
        );
        assert!(
            lines.iter().any(|l| l == "cursor 64 64 3 4 2048"),
            "no cursor shape: {lines:?}"
        );
        let events = input.take(4, Duration::from_secs(10));
        let (x, y) = (160 * INPUT_ABS_MAX / (W - 1), 100 * INPUT_ABS_MAX / (H - 1));
        assert_eq!(
            events,
            vec![
                InputRequest::Key {
                    code: 30,
                    pressed: true
                },
                InputRequest::Key {
                    code: 30,
                    pressed: false
                },
                InputRequest::Pointer {
                    x,
                    y,
                    buttons: BUTTON_LEFT
                },
                InputRequest::Pointer { x, y, buttons: 0 },
            ],
            "input via {host} {encoding}"
        );
    }
    display.assert_alive();
}

/// A scanout that changes size reaches a connected client as DesktopSize and a full update.
#[test]
fn vnc_client_follows_a_resize() {
    let dir = scratch_dir("display-resize");
    let Some(probe) = vncprobe(&dir) else { return };
    let mut display = IsolaDisplay::start(&dir, true, &[]);
    let addr = display.vnc.unwrap();
    let mut gpu = GpuPeer::connect(&display.socket);
    gpu.scanout(0, W, H);
    gpu.update(0, 0, W, H, &pattern(W, H, 7));
    display.wait_updates(1);
    let (w2, h2) = (200, 120);
    let bigger = pattern(w2, h2, 8);
    let out = dir.join("resized.ppm");
    let socket = display.socket.clone();
    let resizer = std::thread::spawn(move || {
        // After the client has its first picture.
        std::thread::sleep(Duration::from_millis(700));
        let mut gpu = GpuPeer::connect(&socket);
        gpu.scanout(0, w2, h2);
        gpu.update(0, 0, w2, h2, &bigger);
        std::thread::sleep(Duration::from_secs(3));
        bigger
    });
    let lines = run_probe(
        &probe,
        &addr.ip().to_string(),
        addr.port(),
        "zrle",
        &out,
        &[&format!("size:{w2},{h2}")],
    );
    let want = resizer.join().unwrap();
    assert_eq!(
        lines.last().map(String::as_str),
        Some("size 200 120"),
        "{lines:?}"
    );
    let (w, h, got) = read_ppm(&out);
    assert_eq!((w, h), (w2, h2));
    assert_same("the resized picture", &got, &want, w2);
    display.assert_alive();
}

/// At most 32 VNC clients (isola-display's MAX_CLIENTS) at once; the next is turned away,
/// and a slot frees up when a client leaves.
#[test]
fn vnc_clients_are_capped() {
    let dir = scratch_dir("display-cap");
    let mut display = IsolaDisplay::start(&dir, true, &[]);
    let addr = display.vnc.unwrap();
    let mut clients: Vec<TcpStream> = (0..32).map(|_| raw_vnc_client(addr)).collect();
    let mut extra = TcpStream::connect(addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 12];
    assert!(
        matches!(extra.read(&mut b), Ok(0) | Err(_)),
        "the 33rd client was served"
    );
    display.wait_log("turned away", Duration::from_secs(10));
    clients.pop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while display.status().vnc_clients > 31 {
        assert!(
            Instant::now() < deadline,
            "the client that left still counts"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The writer thread of the departed client may still be ending: retry briefly.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if s.read_exact(&mut b).is_ok() {
            assert_eq!(&b, b"RFB 003.008\n");
            break;
        }
        assert!(Instant::now() < deadline, "no slot freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    display.assert_alive();
}

/// Without isola-input, VNC input is dropped (and logged), never queued; once isola-input
/// listens, the next events reach it.
#[test]
fn vnc_input_waits_for_no_one_and_finds_isola_input_when_it_comes() {
    let dir = scratch_dir("display-input-later");
    let Some(probe) = vncprobe(&dir) else { return };
    let input_path = dir.join("input.sock");
    let mut display = IsolaDisplay::start(&dir, true, &["--input", input_path.to_str().unwrap()]);
    let addr = display.vnc.unwrap();
    let mut gpu = GpuPeer::connect(&display.socket);
    gpu.scanout(0, W, H);
    gpu.update(0, 0, W, H, &pattern(W, H, 10));
    display.wait_updates(1);
    let host = addr.ip().to_string();
    let out = dir.join("a.ppm");
    run_probe(&probe, &host, addr.port(), "raw", &out, &["key:0x62"]);
    display.wait_log("input event dropped", Duration::from_secs(10));

    let input = FakeInput::start(&input_path);
    // The link retries at most every 200 ms.
    std::thread::sleep(Duration::from_millis(300));
    run_probe(&probe, &host, addr.port(), "raw", &out, &["key:0x62"]);
    assert_eq!(
        input.take(2, Duration::from_secs(10)),
        vec![
            InputRequest::Key {
                code: 48,
                pressed: true
            },
            InputRequest::Key {
                code: 48,
                pressed: false
            },
        ]
    );
    display.assert_alive();
}

/// RFB 3.3 and 3.7 clients are served too; a client that picks a security type not offered,
/// or speaks no RFB, is turned away with a reason (3.8) and the server keeps going.
#[test]
fn older_rfb_versions_and_bad_handshakes() {
    let dir = scratch_dir("display-rfb");
    let mut display = IsolaDisplay::start(&dir, true, &["--width", "640", "--height", "480"]);
    let addr = display.vnc.unwrap();
    let connect = |version: &[u8]| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut v = [0u8; 12];
        s.read_exact(&mut v).unwrap();
        s.write_all(version).unwrap();
        s
    };
    let server_init = |s: &mut TcpStream| {
        s.write_all(&[1]).unwrap(); // shared
        let mut init = [0u8; 24];
        s.read_exact(&mut init).unwrap();
        (
            u16::from_be_bytes([init[0], init[1]]),
            u16::from_be_bytes([init[2], init[3]]),
        )
    };
    // 3.3: the server names the security type (None) itself.
    let mut s = connect(b"RFB 003.003\n");
    let mut ty = [0u8; 4];
    s.read_exact(&mut ty).unwrap();
    assert_eq!(u32::from_be_bytes(ty), 1);
    assert_eq!(server_init(&mut s), (640, 480));
    // 3.7: a list, the client's choice, and no SecurityResult.
    let mut s = connect(b"RFB 003.007\n");
    let mut list = [0u8; 2];
    s.read_exact(&mut list).unwrap();
    assert_eq!(list, [1, 1]);
    s.write_all(&[1]).unwrap();
    assert_eq!(server_init(&mut s), (640, 480));
    // 3.8 choosing VNC authentication (2): failed, with a reason.
    let mut s = connect(b"RFB 003.008\n");
    s.read_exact(&mut list).unwrap();
    s.write_all(&[2]).unwrap();
    let mut result = [0u8; 8];
    s.read_exact(&mut result).unwrap();
    assert_eq!(u32::from_be_bytes(result[..4].try_into().unwrap()), 1);
    let mut reason = vec![0u8; u32::from_be_bytes(result[4..].try_into().unwrap()) as usize];
    s.read_exact(&mut reason).unwrap();
    assert!(String::from_utf8_lossy(&reason).contains("None"));
    // Not RFB at all.
    let mut s = connect(b"GET / HTTP/1");
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    display.wait_log("protocol version", Duration::from_secs(10));
    // Still serving.
    drop(raw_vnc_client(addr));
    display.assert_alive();
}
