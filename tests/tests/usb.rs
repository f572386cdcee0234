//! isola-usb through isola-core's vfio-user frontend, driven by the `usb` test guest (its own
//! small xHCI driver, ring 3): the guest resets and runs the controller, sees the keyboard,
//! tablet and disk on their ports, enumerates the keyboard and the disk (device and
//! configuration descriptors), reads the HID reports that `isolactl type` produces on the
//! keyboard's interrupt endpoint, reads block 0 through bulk-only transport (READ(10)) and
//! gets what the host wrote into the image, then writes, reads back and verifies 2,000
//! blocks; isola-usb is killed in the middle of the writes and started again (as the
//! supervisor would), the core reports the link away and back, the guest's driver resets the
//! controller on Host System Error and carries on, and the keyboard works afterwards. Every
//! block the guest wrote is on the image at the end.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use isola_ipc::DeviceLink;
use isola_tests::{binary, guest, scratch_dir, wait_device, wait_for_path, Core};

const BOOT: Duration = Duration::from_secs(120);
const SECTORS: u64 = 2000;

struct Usb {
    child: Child,
}

impl Usb {
    fn start(dir: &Path) -> Usb {
        let socket = dir.join("usb.sock");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(binary("isola-usb"))
            .arg("--socket")
            .arg(&socket)
            .arg("--control-socket")
            .arg(dir.join("input-control.sock"))
            .arg("--disk")
            .arg(dir.join("disk.img"))
            .arg("--state-file")
            .arg(dir.join("usb.state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("isola-usb starts");
        wait_for_path(&socket, Duration::from_secs(20));
        Usb { child }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Usb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `isolactl --input SOCKET type TEXT`, as a user types.
fn isolactl_type(control: &Path, text: &str) {
    let out = Command::new(binary("isolactl"))
        .arg("--input")
        .arg(control)
        .arg("--timeout")
        .arg("10")
        .args(["type", text])
        .output()
        .expect("isolactl runs");
    assert!(out.status.success(), "isolactl type: {out:?}");
}

/// The guest's next line containing `needle`, echoed for the test's log.
fn wait(core: &mut Core, needle: &str) -> String {
    let line = core.wait_for(needle, BOOT);
    eprintln!("{line}");
    line
}

/// Block 0 of the image, written by the host before the guest starts.
fn block0() -> Vec<u8> {
    (0..512u32)
        .map(|i| (i.wrapping_mul(151) ^ (i >> 3) ^ 0x5a) as u8)
        .collect()
}

/// The four reports of typing "hi": h pressed (usage 0x0b), released, i (0x0c), released.
fn assert_hi(core: &mut Core, phase: &str) {
    let expected = ["00 0b 00 00", "00 00 00 00", "00 0c 00 00", "00 00 00 00"];
    for want in expected {
        let line = wait(core, &format!("usb: report {phase}"));
        assert!(
            line.contains(&format!("{phase} {want}")),
            "{line} (wanted {want})"
        );
    }
}

#[test]
fn the_guest_driver_types_and_stores_across_a_kill_of_isola_usb() {
    let dir = scratch_dir("usb_e2e");
    let image: PathBuf = dir.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(4 << 20))
        .expect("image");
    let first = block0();
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .expect("image");
        file.write_all_at(&first, 0).expect("block 0");
    }
    let usb = Usb::start(&dir);
    let socket = dir.join("usb.sock");
    let control = dir.join("control.sock");
    let input = dir.join("input-control.sock");
    let kernel = guest("usb.elf");
    let device = format!("vfio-user,socket={}", socket.display());
    let cmdline = format!("usb.sectors={SECTORS} usb.keys=4");
    let mut core = Core::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--device",
        &device,
        "--control-socket",
        control.to_str().unwrap(),
        "--cmdline",
        &cmdline,
    ]);
    wait_for_path(&control, Duration::from_secs(20));
    let running = wait(&mut core, "usb: running");
    let usbsts = u32::from_str_radix(running.rsplit("0x").next().unwrap().trim(), 16)
        .unwrap_or_else(|_| panic!("{running}"));
    assert_eq!(usbsts & 1, 0, "HCHalted after Run/Stop: {running}");
    // Keyboard and tablet high speed (3) on the USB 2 ports, the disk SuperSpeed (4) on the
    // first USB 3 port, nothing on port 4.
    for (port, connected, speed) in [(1, 1, 3), (2, 1, 3), (3, 1, 4), (4, 0, 0)] {
        let line = wait(&mut core, &format!("usb: port {port} portsc="));
        assert!(
            line.contains(&format!("connected={connected} speed={speed}")),
            "{line}"
        );
    }
    let line = wait(&mut core, "usb: port 1 device");
    assert!(
        line.contains("usb=0200 ep0=64 vendor=1d6b product=0101 configs=1"),
        "{line}"
    );
    // HID, boot subclass, keyboard protocol; interrupt IN endpoint 1, 8 bytes.
    let line = wait(&mut core, "usb: port 1 config");
    assert!(
        line.contains("interfaces=1 interface=03/01/01 endpoints=1 81:3:8"),
        "{line}"
    );
    let line = wait(&mut core, "usb: port 3 device");
    assert!(
        line.contains("usb=0320 ep0=9 vendor=1d6b product=0110 configs=1"),
        "{line}"
    );
    // Mass storage, SCSI transparent command set, bulk-only; bulk IN 1 and OUT 2.
    let line = wait(&mut core, "usb: port 3 config");
    assert!(
        line.contains("interfaces=1 interface=08/06/50 endpoints=2 81:2:1024 02:2:1024"),
        "{line}"
    );
    let line = wait(&mut core, "usb: enumerated");
    assert!(!line.contains("irqs=0"), "{line}");
    wait(&mut core, "usb: keyboard ready before");
    isolactl_type(&input, "hi");
    assert_hi(&mut core, "before");
    // READ CAPACITY(10): the 4 MiB image in 512-byte blocks.
    let line = wait(&mut core, "usb: disk blocks=");
    assert!(line.contains("blocks=8192"), "{line}");
    let line = wait(&mut core, "usb: block 0");
    let want = format!(
        "crc={:08x} starts {:02x} {:02x} {:02x} {:02x}",
        crc32fast::hash(&first),
        first[0],
        first[1],
        first[2],
        first[3]
    );
    assert!(line.contains(&want), "{line} (wanted {want})");
    // Early in the writes, so that most of them come after the restart.
    wait(&mut core, "usb: wrote 200");
    usb.kill();
    let away = wait_device(&mut core, &control, "away", |d| {
        d.link != DeviceLink::Connected
    });
    eprintln!("away: {away:?}");
    let _usb = Usb::start(&dir);
    let back = wait_device(&mut core, &control, "back", |d| {
        d.link == DeviceLink::Connected && d.reconnects >= 1
    });
    eprintln!("back: {back:?}");
    wait(&mut core, "usb: controller lost");
    wait(&mut core, "usb: enumerated again");
    let verified = wait(&mut core, "usb: verified");
    assert!(
        verified.contains(&format!("verified {SECTORS} sectors")),
        "{verified}"
    );
    assert!(!verified.contains("restarts=0"), "{verified}");
    wait(&mut core, "usb: keyboard ready after");
    isolactl_type(&input, "hi");
    assert_hi(&mut core, "after");
    wait(&mut core, "usb: ok");
    core.finish(BOOT).assert_success();
    // What the guest verified through the device is on the image too, and block 0 is as the
    // host wrote it.
    let bytes = std::fs::read(&image).expect("image");
    assert_eq!(&bytes[..512], &first[..], "block 0");
    for lba in 1..=SECTORS as usize {
        for i in 0..512 {
            let want = (i * 7 + lba * 13 + (lba >> 8)) as u8;
            assert_eq!(bytes[lba * 512 + i], want, "sector {lba} byte {i}");
        }
    }
}
