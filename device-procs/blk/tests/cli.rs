//! Bad input on the command line: one clear line on stderr, exit status 2, no socket left.

mod support;

use std::process::Command;

use isola_device_common::testing::skip::{skip, Missing};
use support::Scratch;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_isola-blk"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_input_is_one_line_and_exit_status_2() {
    let dir = Scratch::new("cli");
    let image = dir.path("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let sock = dir.path("blk.sock");
    let (image, sock) = (image.to_str().unwrap(), sock.to_str().unwrap());
    let missing = dir.path("missing.img");
    let empty = dir.path("empty.img");
    std::fs::File::create(&empty).unwrap();
    let short = dir.path("short.img");
    std::fs::write(&short, [0u8; 511]).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--socket", sock], "--image"),
        (vec!["--image", image], "--socket"),
        (
            vec!["--socket", sock, "--image", missing.to_str().unwrap()],
            "cannot open image",
        ),
        // F8: a disk of no whole sector.
        (
            vec!["--socket", sock, "--image", empty.to_str().unwrap()],
            "holds 0 bytes, not one 512-byte block",
        ),
        (
            vec!["--socket", sock, "--image", short.to_str().unwrap()],
            "holds 511 bytes",
        ),
        (
            vec!["--socket", sock, "--image", image, "--num-queues", "0"],
            "--num-queues 0",
        ),
        (
            vec!["--socket", sock, "--image", image, "--queue-size", "100"],
            "--queue-size 100",
        ),
        (
            vec!["--socket", sock, "--image", image, "--poll-us", "1000001"],
            "--poll-us 1000001",
        ),
        (
            vec!["--socket", sock, "--image", image, "--sq-poll-ms", "10001"],
            "--sq-poll-ms 10001",
        ),
        (
            vec![
                "--socket",
                sock,
                "--image",
                image,
                "--engine",
                "sync",
                "--sq-poll-ms",
                "5",
            ],
            "--sq-poll-ms needs an io_uring engine",
        ),
        (
            vec!["--socket", sock, "--image", image, "--engine", "aio"],
            "'aio'",
        ),
        (
            vec!["--socket", sock, "--fd", "3", "--image", image],
            "cannot be used with",
        ),
        (
            vec!["--fd", "0", "--image", image],
            "not a listening Unix stream socket",
        ),
        (
            vec![
                "--socket",
                sock,
                "--image",
                image,
                "--serial",
                "123456789012345678901",
            ],
            "longer than 20 bytes",
        ),
        // Root may not pick uid 0; anyone else may not pick a uid at all.
        (
            vec!["--socket", sock, "--image", image, "--uid", "0"],
            "--uid/--gid",
        ),
        (
            vec!["--socket", sock, "--image", image, "--sandbox", "maybe"],
            "'maybe'",
        ),
        (
            vec!["--socket", sock, "--image", image, "--seccomp", "trap"],
            "'trap'",
        ),
    ];
    for (args, needle) in cases {
        let (code, stderr) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("isola-blk: ") && stderr.contains(needle),
            "{args:?}: {stderr}"
        );
        assert!(
            !std::path::Path::new(sock).exists(),
            "{args:?} left a socket"
        );
    }
    let (code, stdout_help) = run(&["--help"]);
    assert_eq!(code, Some(0), "{stdout_help}");
}

/// Flags (octal, as `/proc/PID/fdinfo` shows them) of the fd `pid` holds on `path`.
fn open_flags(pid: u32, path: &std::path::Path) -> Option<u32> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let fd = fds
        .filter_map(Result::ok)
        .find(|e| std::fs::read_link(e.path()).ok().as_deref() == Some(path))?
        .file_name();
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.to_str()?)).ok()?;
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
    u32::from_str_radix(flags.trim(), 8).ok()
}

/// Serves `image` as the user `uid` (through `setpriv`, with the sandbox off so no privilege
/// is needed) and returns the flags its image fd was opened with.
fn flags_when_served_by(uid: &str, dir: &std::path::Path, image: &std::path::Path) -> u32 {
    let sock = dir.join(format!("blk-{uid}.sock"));
    let mut child = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
        ])
        .arg(env!("CARGO_BIN_EXE_isola-blk"))
        .args(["--sandbox", "off", "--image"])
        .arg(image)
        .arg("--socket")
        .arg(&sock)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + support::TIMEOUT;
    while !sock.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!("isola-blk as uid {uid} exited with {status}: {err}");
        }
        assert!(std::time::Instant::now() < deadline, "no socket");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // setpriv execs isola-blk: same pid.
    let flags = open_flags(child.id(), image).expect("the image is open");
    child.kill().unwrap();
    child.wait().unwrap();
    flags
}

/// The image is opened without access-time updates by its owner; anyone else who may write
/// it (O_NOATIME needs ownership) still gets it served, opened as it is.
#[test]
fn an_image_of_another_owner_is_served_without_o_noatime() {
    use std::os::unix::fs::{chown, PermissionsExt};
    // SAFETY: geteuid only reads this process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        return skip(Missing::Host, "needs root, to serve as two users");
    }
    let dir = Scratch::new("cli-noatime");
    let shared = dir.path("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let image = shared.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o666)).unwrap();
    chown(&image, Some(65533), Some(65533)).unwrap();
    let noatime = libc::O_NOATIME as u32;
    assert_ne!(
        flags_when_served_by("65533", &shared, &image) & noatime,
        0,
        "owner"
    );
    assert_eq!(
        flags_when_served_by("65534", &shared, &image) & noatime,
        0,
        "not the owner"
    );
}
