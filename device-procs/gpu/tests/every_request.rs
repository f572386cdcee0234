//! Every vhost-user request code the `vhost` crate defines (and a few it does not), with and
//! without fds, sent to the real, sandboxed `isola-gpu` after negotiation: each is
//! answered or the connection is closed, and the process serves the next frontend (for isola-gpu,
//! GPU_SET_SOCKET is a request it serves: the socket passed is taken as its display).

use std::process::{Command, Stdio};

use isola_device_common::testing::process::{gone, wait_log};
use isola_device_common::testing::requests::every_request_after_negotiation;
use isola_device_common::testing::Scratch;

#[test]
fn every_request_code_after_negotiation_is_answered_or_refused_and_the_process_serves_on() {
    let dir = Scratch::new("every-request");
    let socket = dir.path("gpu.sock");
    let log = dir.path("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_isola-gpu"))
        .arg("--socket")
        .arg(&socket)
        .arg("--state-file")
        .arg(dir.path("gpu.state"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_log(&log, "sandboxed");
    let pid = child.id();
    let (answered, closed) = every_request_after_negotiation(&socket, &|| !gone(pid));
    println!("isola-gpu: {answered} requests answered, {closed} refused by closing");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(child.try_wait().unwrap().is_none(), "{text}");
    assert!(!text.contains("killed by"), "{text}");
    let _ = child.kill();
    let _ = child.wait();
}
