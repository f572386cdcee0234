//! What the console's frontend-driven tests share: the device process, killed when the test
//! ends, and a frontend that has started the first port's two queues.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use isola_device_common::testing::{connect, negotiate, start_queue, GuestRam, SplitQueue};
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;
use vm_memory::GuestAddress;

pub const RAM: u64 = 1 << 20;
pub const VERSION_1: u64 = 1 << 32;
pub const WAIT: Duration = Duration::from_secs(10);

/// The device process, killed and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts isola-console on the vhost-user socket `vu` with one port (`--port PORT`),
/// negotiates VERSION_1 with every protocol feature it offers, shares `ram`, and starts
/// receive queue 0 and transmit queue 1 (16 entries each).
pub fn single_port(vu: &Path, port: &str, ram: &GuestRam) -> (Proc, Frontend, Vec<SplitQueue>) {
    let child = Command::new(env!("CARGO_BIN_EXE_isola-console"))
        .arg("--socket")
        .arg(vu)
        .arg("--port")
        .arg(port)
        .stderr(Stdio::null())
        .spawn()
        .expect("start isola-console");
    let proc = Proc(child);
    let mut fe = connect(vu, 2, WAIT);
    negotiate(
        &mut fe,
        VERSION_1,
        isola_device_common::offered_protocol_features(),
    );
    fe.set_mem_table(&[ram.region()]).expect("SET_MEM_TABLE");
    let queues: Vec<SplitQueue> = (0..2)
        .map(|i| SplitQueue::new(i, 16, GuestAddress(0x1000 * (1 + 2 * u64::from(i)))))
        .collect();
    for queue in &queues {
        start_queue(&mut fe, queue, ram, 0);
    }
    (proc, fe, queues)
}
