//! Bad input on the command line: one clear line on stderr, exit status 2, no socket left.

use std::path::PathBuf;
use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_isola-gpu"))
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
    let dir: PathBuf = std::env::temp_dir().join(format!("isola-gpu-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("gpu.sock");
    let sock = sock.to_str().unwrap();
    let unreadable = dir.join("state-is-a-directory");
    std::fs::create_dir_all(&unreadable).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![], "--socket"),
        (
            vec!["--socket", sock, "--resolution", "1280"],
            "--resolution 1280",
        ),
        (
            vec!["--socket", sock, "--resolution", "0x0"],
            "--resolution 0x0",
        ),
        (
            vec!["--socket", sock, "--resolution", "8192x600"],
            "--resolution 8192x600",
        ),
        (
            vec!["--socket", sock, "--max-memory", "0"],
            "--max-memory 0",
        ),
        (
            vec!["--socket", sock, "--queue-size", "100"],
            "--queue-size 100",
        ),
        (
            vec![
                "--socket",
                sock,
                "--state-file",
                unreadable.to_str().unwrap(),
            ],
            "cannot read",
        ),
        // F8: a state file that cannot hold state.
        (
            vec!["--socket", sock, "--state-file", "/dev/null"],
            "/dev/null is not a regular file",
        ),
        (vec!["--fd", "0"], "not a listening Unix stream socket"),
    ];
    for (args, needle) in cases {
        let (code, stderr) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("isola-gpu: ") && stderr.contains(needle),
            "{args:?}: {stderr}"
        );
        assert!(
            !std::path::Path::new(sock).exists(),
            "{args:?} left a socket"
        );
    }
    // A state file that is not one: a warning, and the process starts empty.
    let garbage = dir.join("garbage.state");
    std::fs::write(&garbage, b"not a state file").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_isola-gpu"))
        .args(["--socket", sock, "--state-file", garbage.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::path::Path::new(sock).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "isola-gpu did not start"
        );
        assert!(child.try_wait().unwrap().is_none(), "isola-gpu exited");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let (code, help) = run(&["--help"]);
    assert_eq!(code, Some(0), "{help}");
    std::fs::remove_dir_all(&dir).unwrap();
}
