//! `isolactl console [PATH | --port N]`: the terminal <-> a console port's socket, byte for
//! byte.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::Context;

/// Ctrl-]: detach, as telnet does.
const DETACH: u8 = 0x1d;

/// Puts stdin in raw mode while alive (if it is a terminal) and restores it when dropped.
struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    fn new() -> RawTerminal {
        // SAFETY: `termios` is plain data; an all-zero value is valid and is overwritten
        // by tcgetattr before use.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one termios through the pointer, which points at
        // `saved`, a live local; on a non-terminal stdin it fails and writes nothing.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return RawTerminal(None);
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the termios it is given, a live local copy.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: tcsetattr reads one termios from the pointer, a live local.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) };
        RawTerminal(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: tcsetattr reads one termios from the pointer, which points at the
            // settings saved by `new`, alive in `self`.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
        }
    }
}

/// Attaches the terminal to `stream`, connected (within the deadline) to the port at `path`.
/// The session itself has no deadline: it lasts until Ctrl-], the end of stdin, or the port
/// hanging up.
/// With `json`, the two notices on stderr are JSON lines (`{"console": "attached", "socket":
/// PATH}`, `{"console": "detached"}`); the port's bytes are the port's bytes either way.
pub fn attach(stream: &UnixStream, path: &Path, json: bool) -> anyhow::Result<()> {
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    let stream = stream.try_clone().context("cannot clone the socket")?;
    let mut from_guest = stream.try_clone().context("cannot clone the socket")?;
    if json {
        let notice = serde_json::json!({ "console": "attached", "socket": path });
        crate::tell!("{notice}\r");
    } else {
        crate::tell!(
            "isolactl: attached to {}; Ctrl-] detaches\r",
            path.display()
        );
    }
    let raw = RawTerminal::new();
    let output = std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        let mut out = std::io::stdout();
        loop {
            match from_guest.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut to_guest = stream;
    let mut buf = [0u8; 4096];
    let mut stdin = std::io::stdin();
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let (data, detach) = match buf[..n].iter().position(|&b| b == DETACH) {
            Some(at) => (&buf[..at], true),
            None => (&buf[..n], false),
        };
        if to_guest.write_all(data).is_err() || detach {
            break;
        }
    }
    let _ = to_guest.shutdown(std::net::Shutdown::Both);
    let _ = output.join();
    drop(raw);
    if json {
        crate::tell!("{}", serde_json::json!({ "console": "detached" }));
    } else {
        crate::tell!("isolactl: detached");
    }
    Ok(())
}
