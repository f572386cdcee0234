//! `isola-input` run as a user runs it: bad command lines, hostile control clients, and the
//! vhost-user side driven by the `vhost` crate's `Frontend` (an implementation independent of
//! the core): the select/subsel window over GET/SET_CONFIG, events reaching a ring the test
//! drives, LEDs on the status queue.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use isola_device_common::testing::{self, GuestRam, SplitQueue};
use isola_ipc::input::{InputRequest, InputResponse};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress};

const TIMEOUT: Duration = Duration::from_secs(20);

use isola_device_common::testing::Scratch;

struct Input {
    child: Child,
    log: PathBuf,
}

impl Input {
    fn start(dir: &Scratch, args: &[&str]) -> Input {
        let log = dir.path("input.log");
        let child = Command::new(env!("CARGO_BIN_EXE_isola-input"))
            .arg("--keyboard-socket")
            .arg(dir.path("kbd.sock"))
            .arg("--tablet-socket")
            .arg(dir.path("tablet.sock"))
            .arg("--control-socket")
            .arg(dir.path("input.sock"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + TIMEOUT;
        // The socket file appears at bind(2), connections succeed after listen(2).
        while UnixStream::connect(dir.path("input.sock")).is_err() {
            assert!(Instant::now() < deadline, "no control socket");
            std::thread::sleep(Duration::from_millis(5));
        }
        Input { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }
}

impl Drop for Input {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ask(stream: &mut UnixStream, request: &InputRequest) -> InputResponse {
    isola_ipc::write_message(stream, request).unwrap();
    isola_ipc::read_message(stream).unwrap()
}

fn ask_new(socket: &Path, request: &InputRequest) -> InputResponse {
    ask(&mut UnixStream::connect(socket).unwrap(), request)
}

#[test]
fn bad_command_lines_exit_2_with_one_line_and_leave_no_socket() {
    let dir = Scratch::new("cli");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_isola-input"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let kbd = dir.path("kbd.sock");
    let kbd = kbd.to_str().unwrap();
    let ctl = dir.path("c.sock");
    let ctl = ctl.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--keyboard-socket", kbd], "--control-socket"),
        (&["--control-socket", ctl], "--keyboard-socket"),
        (
            &[
                "--keyboard-socket",
                kbd,
                "--control-socket",
                ctl,
                "--max-pending",
                "3",
            ],
            "--max-pending 3",
        ),
        (
            &[
                "--keyboard-socket",
                kbd,
                "--control-socket",
                "/nonexistent/dir/c.sock",
            ],
            "cannot listen on /nonexistent/dir/c.sock",
        ),
    ];
    for (args, want) in cases {
        let (code, err) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!Path::new(kbd).exists(), "{args:?} left {kbd} behind");
    }
}

#[test]
fn hostile_control_clients_get_errors_and_the_socket_keeps_serving() {
    let dir = Scratch::new("control");
    let input = Input::start(&dir, &[]);
    let socket = dir.path("input.sock");
    // A frame with garbage for a body: an error answer, then the connection closes.
    let mut s = UnixStream::connect(&socket).unwrap();
    let mut frame = 6u32.to_le_bytes().to_vec();
    frame.extend_from_slice(&isola_ipc::PROTOCOL_VERSION.to_le_bytes());
    frame.extend_from_slice(&[0xff, 0xff, 0xff, 0x7f]);
    s.write_all(&frame).unwrap();
    let answer: InputResponse = isola_ipc::read_message(&mut s).unwrap();
    assert!(
        matches!(answer, InputResponse::Error(ref e) if e.contains("malformed")),
        "{answer:?}"
    );
    assert!(matches!(
        isola_ipc::read_message::<_, InputResponse>(&mut s),
        Err(isola_ipc::IpcError::Closed)
    ));
    // Another version; an absurd length.
    for frame in [
        [4u32.to_le_bytes().as_slice(), &[9, 0, 0, 0]].concat(),
        u32::MAX.to_le_bytes().to_vec(),
    ] {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.write_all(&frame).unwrap();
        let answer: InputResponse = isola_ipc::read_message(&mut s).unwrap();
        assert!(matches!(answer, InputResponse::Error(_)), "{answer:?}");
        assert!(matches!(
            isola_ipc::read_message::<_, InputResponse>(&mut s),
            Err(isola_ipc::IpcError::Closed)
        ));
    }
    // 16 idle clients: a 17th is closed at once, and a slot frees when one leaves.
    let idle: Vec<UnixStream> = (0..16)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let mut extra = UnixStream::connect(&socket).unwrap();
    let _ = isola_ipc::write_message(&mut extra, &InputRequest::Status);
    let answer = isola_ipc::read_message::<_, InputResponse>(&mut extra);
    assert!(answer.is_err(), "{answer:?}\n{}", input.log_text());
    drop(idle);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        // Until the server has seen the idle clients go, new ones may still be closed.
        let mut s = UnixStream::connect(&socket).unwrap();
        let sent = isola_ipc::write_message(&mut s, &InputRequest::Status).is_ok();
        if let (true, Ok(InputResponse::Status(st))) = (sent, isola_ipc::read_message(&mut s)) {
            // The opening SYN of each device is waiting for a guest.
            assert_eq!(st.pending, 2);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the control socket stopped serving"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(input.log_text().contains("control: dropping a client"));
}

#[test]
fn a_full_queue_refuses_whole_reports_with_an_error() {
    let dir = Scratch::new("full");
    let _input = Input::start(&dir, &["--max-pending", "16"]);
    let socket = dir.path("input.sock");
    let mut s = UnixStream::connect(&socket).unwrap();
    let key = |pressed| InputRequest::Key { code: 30, pressed };
    // 1 opening SYN + 7 reports of 2 = 15; the 8th does not fit.
    for i in 0..7 {
        assert_eq!(ask(&mut s, &key(i % 2 == 0)), InputResponse::Done);
    }
    let InputResponse::Error(why) = ask(&mut s, &key(true)) else {
        panic!("the queue is full");
    };
    assert!(why.contains("not taking events"), "{why}");
}

/// Guest memory for the frontend test: event queue at 0, status queue at 0x4000, buffers
/// from 0x8000.
const STATUS_RING: u64 = 0x4000;
const BUFS: u64 = 0x8000;

#[test]
fn a_vhost_user_frontend_reads_the_config_window_and_receives_events() {
    let dir = Scratch::new("frontend");
    let input = Input::start(&dir, &[]);
    let ram = GuestRam::new(1 << 20);
    let mem = ram.memory();
    let mut frontend = testing::connect(&dir.path("tablet.sock"), 2, TIMEOUT);
    testing::negotiate(
        &mut frontend,
        1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1,
        isola_device_common::offered_protocol_features(),
    );
    frontend.set_mem_table(&[ram.region()]).unwrap();

    // select = ID_NAME, then select = ABS_INFO / subsel = ABS_Y.
    let read = |frontend: &mut vhost::vhost_user::Frontend| {
        let (_, c) = frontend
            .get_config(0, 136, VhostUserConfigFlags::WRITABLE, &[0u8; 136])
            .unwrap();
        c
    };
    frontend
        .set_config(0, VhostUserConfigFlags::WRITABLE, &[0x01, 0])
        .unwrap();
    let c = read(&mut frontend);
    assert_eq!((c[2], &c[8..20]), (12, &b"Isola Tablet"[..]));
    frontend
        .set_config(0, VhostUserConfigFlags::WRITABLE, &[0x12])
        .unwrap();
    frontend
        .set_config(1, VhostUserConfigFlags::WRITABLE, &[1])
        .unwrap();
    let c = read(&mut frontend);
    assert_eq!(c[2], 20);
    assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 0x7fff);
    // A write to size is ignored (and logged); the connection stays up.
    frontend
        .set_config(2, VhostUserConfigFlags::WRITABLE, &[99])
        .unwrap();
    assert_eq!(read(&mut frontend)[2], 20);

    let mut events = SplitQueue::new(0, 16, GuestAddress(0));
    let status_q = SplitQueue::new(1, 16, GuestAddress(STATUS_RING));
    testing::start_queue(&mut frontend, &events, &ram, 0);
    testing::start_queue(&mut frontend, &status_q, &ram, 0);
    for i in 0..8u64 {
        let head = events.add(mem, &[(GuestAddress(BUFS + 8 * i), 8, true)]);
        events.publish(mem, head);
    }
    events.kick();
    // The opening SYN is delivered as soon as buffers are there.
    assert!(events.wait_used(mem, 1, TIMEOUT));
    let control = dir.path("input.sock");
    let pointer = InputRequest::Pointer {
        x: 10,
        y: 20,
        buttons: 1,
    };
    assert_eq!(ask_new(&control, &pointer), InputResponse::Done);
    // x, y, left down, middle up, right up, syn.
    assert!(events.wait_used(mem, 7, TIMEOUT), "{}", input.log_text());
    let got: Vec<[u8; 8]> = (0..7)
        .map(|i| {
            let (id, len) = events.used_elem(mem, i);
            assert_eq!(len, 8);
            mem.read_obj(GuestAddress(BUFS + 8 * u64::from(id)))
                .unwrap()
        })
        .collect();
    let ev = |t: u16, c: u16, v: u32| -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..2].copy_from_slice(&t.to_le_bytes());
        b[2..4].copy_from_slice(&c.to_le_bytes());
        b[4..].copy_from_slice(&v.to_le_bytes());
        b
    };
    assert_eq!(
        got,
        vec![
            ev(0, 0, 0),
            ev(3, 0, 10),
            ev(3, 1, 20),
            ev(1, 0x110, 1),
            ev(1, 0x112, 0),
            ev(1, 0x111, 0),
            ev(0, 0, 0)
        ]
    );
    // One buffer left: a second report waits for more.
    assert_eq!(ask_new(&control, &pointer), InputResponse::Done);
    assert!(events.wait_used(mem, 8, TIMEOUT));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(events.used_idx(mem), 8);
    match ask_new(&control, &InputRequest::Status) {
        // Pending: 2 of the tablet's, and the keyboard's opening SYN (no guest took it).
        InputResponse::Status(st) => assert_eq!((st.tablet_events, st.pending), (8, 3)),
        other => panic!("{other:?}"),
    }
    let head = events.add(mem, &[(GuestAddress(BUFS), 8, true)]);
    events.publish(mem, head);
    let head = events.add(mem, &[(GuestAddress(BUFS + 8), 8, true)]);
    events.publish(mem, head);
    events.kick();
    assert!(events.wait_used(mem, 10, TIMEOUT));
    assert!(input.wait_log("ignoring configuration write"));
}
