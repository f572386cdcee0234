//! Every vhost-user request code the `vhost` crate defines (and a few it does not), with and
//! without fds, sent to the real, sandboxed `isola-net` after negotiation: each is answered or
//! the connection is closed, and the process serves the next frontend (F2: before,
//! GPU_SET_SOCKET with an fd killed it by seccomp).

mod support;

use isola_device_common::testing::process::gone;
use isola_device_common::testing::requests::every_request_after_negotiation;
use support::*;

#[test]
fn every_request_code_after_negotiation_is_answered_or_refused_and_the_process_serves_on() {
    in_netns(|| {
        let dir = Scratch::new("every-request");
        let mut net = serve_tap0(&dir);
        let pid = net.child.id();
        let socket = dir.path("net.sock");
        let (answered, closed) = every_request_after_negotiation(&socket, &|| !gone(pid));
        println!("isola-net: {answered} requests answered, {closed} refused by closing");
        let text = net.log_text();
        assert!(net.child.try_wait().unwrap().is_none(), "{text}");
        assert!(!text.contains("killed by"), "{text}");
    });
}
