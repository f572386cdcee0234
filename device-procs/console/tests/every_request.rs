//! Every vhost-user request code the `vhost` crate defines (and a few it does not), with and
//! without fds, sent to the real, sandboxed `isola-console` after negotiation: each is
//! answered or the connection is closed, and the process serves the next frontend (F2: before,
//! GPU_SET_SOCKET with an fd killed it by seccomp).

use std::process::Command;

use isola_device_common::testing::requests::assert_the_device_serves_on_after_every_request;
use isola_device_common::testing::Scratch;

#[test]
fn every_request_code_after_negotiation_is_answered_or_refused_and_the_process_serves_on() {
    let dir = Scratch::new("every-request");
    let socket = dir.path("vu.sock");
    let mut device = Command::new(env!("CARGO_BIN_EXE_isola-console"));
    device
        .arg("--socket")
        .arg(&socket)
        .arg("--port")
        .arg(format!("socket={}", dir.path("p0.sock").display()));
    assert_the_device_serves_on_after_every_request(device, &socket, &dir);
}
