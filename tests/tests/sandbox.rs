//! isola-blk sandboxed while it serves the `virtio-blk` guest through `isola-core`: both of
//! its processes run under seccomp with no_new_privs, no capabilities, uid 65534 (the tests
//! run as root), their own namespaces and an empty root, the device process being pid 1 of
//! its own pid namespace; and the guest's whole workload still passes. (The SIGSYS tests
//! need a test hook compiled into isola-blk: `device-procs/blk/tests/sandbox.rs`.)

use std::fs::File;
use std::time::Duration;

use isola_tests::sandbox::{assert_sandboxed, device_pid, status_field};
use isola_tests::{guest, scratch_dir, Core, IsolaBlk};

const TIMEOUT: Duration = Duration::from_secs(90);

#[test]
fn isola_blk_is_sandboxed_while_it_serves_the_guest() {
    let dir = scratch_dir("sandbox-guest");
    let image = dir.join("disk.img");
    File::create(&image).unwrap().set_len(4096 * 512).unwrap();
    let socket = dir.join("blk.sock");
    let backend = IsolaBlk::start_with(&socket, &image, &["--engine", "io-uring"]);
    let kernel = guest("virtio-blk.elf");
    let device = format!("blk,socket={}", socket.display());
    let mut core = Core::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--device",
        &device,
        "--device-timeout",
        "20",
        "--cmdline",
        "virtio-blk.mode=loop virtio-blk.seconds=3 virtio-blk.sectors=1000 \
         virtio-blk.seed=7 virtio-blk.depth=32",
    ]);
    // The first progress line (after a second of I/O): the guest is being served now.
    core.wait_for("virtio-blk: loop cycles=", TIMEOUT);
    let reaper = backend.pid();
    let device_process = device_pid(reaper);
    assert_sandboxed(reaper, "reaper");
    assert_sandboxed(device_process, "device");
    let nspid = status_field(device_process, "NSpid");
    assert_eq!(nspid.split_whitespace().last(), Some("1"), "NSpid {nspid}");
    let done = core.finish(TIMEOUT);
    done.assert_success();
    assert!(
        done.serial
            .iter()
            .any(|l| l.starts_with("virtio-blk: loop done cycles=")),
        "{:?}",
        done.serial
    );
}
