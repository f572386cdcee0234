//! Bad input on the command line: one clear line on stderr, exit status 2, no socket left.

mod support;

use std::process::Command;

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
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--socket", sock], "--image"),
        (vec!["--image", image], "--socket"),
        (
            vec!["--socket", sock, "--image", missing.to_str().unwrap()],
            "cannot open image",
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
