//! A running core seen from outside: its threads and memfd, `isolactl`, and MSI delivery.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use isola_ipc::{ControlRequest, ControlResponse, VcpuState};
use isola_tests::{binary, control, guest, msi_core, scratch_dir, Core};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Starts the `msi` guest, which waits for interrupts forever, with a control socket.
fn start_msi_guest(test: &str, cpus: u32) -> (Core, std::path::PathBuf, isola_tests::ScratchDir) {
    let dir = scratch_dir(test);
    let (core, socket) = msi_core(&dir, cpus);
    (core, socket, dir)
}

fn isolactl(socket: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary("isolactl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("isolactl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn vcpu_threads_and_sealed_memfd_are_visible_in_proc() {
    let (core, _socket, _dir) = start_msi_guest("proc", 3);
    let pid = core.pid();
    let vcpu_names = || {
        let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim().to_owned())
            .filter(|n| n.starts_with("vcpu"))
            .collect();
        names.sort();
        names
    };
    // A thread takes its name once it runs: on a loaded machine the last vCPU may not have
    // yet when the first one's guest speaks.
    let names = isola_tests::supervisor::wait_until("three named vCPU threads", TIMEOUT, || {
        Some(vcpu_names()).filter(|n| n.len() == 3)
    });
    assert_eq!(names, ["vcpu0", "vcpu1", "vcpu2"]);

    let memfd = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            std::fs::read_link(p)
                .is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:isola-guest-ram"))
        })
        .expect("the core holds the guest RAM memfd");
    // Reopening through /proc gives the same inode, and seals belong to the inode.
    let file = std::fs::File::open(&memfd).unwrap();
    // SAFETY: F_GET_SEALS reads the seal set of a valid open fd and touches no memory.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    let wanted = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    assert_eq!(seals & wanted, wanted, "seals {seals:#x}");
    assert_eq!(file.metadata().unwrap().len(), 32 << 20);
}

#[test]
fn isolactl_status_pause_resume_shutdown() {
    let (mut core, socket, _dir) = start_msi_guest("isolactl", 2);
    let (ok, out, err) = isolactl(&socket, &["status"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("vcpu0: running") && out.contains("vcpu1: running"),
        "{out}"
    );
    assert!(out.starts_with("uptime: "), "{out}");

    let (ok, _, err) = isolactl(&socket, &["pause"]);
    assert!(ok, "{err}");
    let (_, out, _) = isolactl(&socket, &["status"]);
    assert!(
        out.contains("vcpu0: paused") && out.contains("vcpu1: paused"),
        "{out}"
    );
    // A paused guest cannot take the interrupt: nothing arrives until it is resumed.
    let (ok, _, err) = isolactl(&socket, &["inject-msi", "--data", "0x41"]);
    assert!(ok, "{err}");
    core.assert_quiet(Duration::from_millis(300));

    let (ok, _, err) = isolactl(&socket, &["resume"]);
    assert!(ok, "{err}");
    core.wait_for("msi: vector=0x41 count=1", TIMEOUT);
    let (_, out, _) = isolactl(&socket, &["status"]);
    assert!(out.contains("vcpu0: running"), "{out}");

    let (ok, _, err) = isolactl(&socket, &["shutdown", "--hard"]);
    assert!(ok, "{err}");
    let done = core.finish(TIMEOUT);
    assert!(done.status.success(), "{:?} {}", done.status, done.stderr);
    assert!(!socket.exists(), "the core removes its control socket");
}

#[test]
fn msi_interrupts_reach_the_guest_in_order() {
    let (mut core, socket, _dir) = start_msi_guest("msi", 1);
    for (n, vector) in (0x40..0x48u32).enumerate() {
        let answer = control(
            &socket,
            &ControlRequest::InjectMsi {
                address: 0xfee0_0000,
                data: vector,
            },
        );
        assert_eq!(answer, ControlResponse::Done);
        core.wait_for(
            &format!("msi: vector={vector:#04x} count={}", n + 1),
            TIMEOUT,
        );
    }
    core.wait_for("msi: done total=8", TIMEOUT);
    let done = core.finish(TIMEOUT);
    assert!(done.status.success(), "{:?} {}", done.status, done.stderr);
}

#[test]
fn control_socket_survives_garbage_and_rejects_bad_requests() {
    use std::io::{Read, Write};
    let (core, socket, _dir) = start_msi_guest("garbage", 1);
    // A frame that claims 1 GiB, then one with a bad version, then raw noise.
    for junk in [
        (1u32 << 30).to_le_bytes().to_vec(),
        [6u32.to_le_bytes().to_vec(), vec![99, 0, 0, 0, 0, 0]].concat(),
        b"\x05\x00\x00\x00GET / HTTP/1.0".to_vec(),
    ] {
        let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.write_all(&junk).unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
    }
    // Still serving, and the guest still runs.
    match control(&socket, &ControlRequest::Status) {
        ControlResponse::Status(status) => {
            assert_eq!(status.vcpus.len(), 1);
            assert_eq!(status.vcpus[0].state, VcpuState::Running);
        }
        other => panic!("unexpected answer {other:?}"),
    }
    let (ok, _, err) = isolactl(&socket, &["inject-msi", "--data", "0x1ffffffff"]);
    assert!(!ok && err.contains("32 bits"), "{err}");
    drop(core);
}

#[test]
fn second_core_on_a_live_socket_is_refused() {
    let (_core, socket, _dir) = start_msi_guest("socket-in-use", 1);
    let kernel = guest("msi.elf");
    let other = Core::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--control-socket",
        socket.to_str().unwrap(),
    ]);
    let done = other.finish(TIMEOUT);
    assert_eq!(done.status.code(), Some(2), "{}", done.stderr);
    assert!(
        done.stderr.contains("is in use by a running process"),
        "{}",
        done.stderr
    );
}
