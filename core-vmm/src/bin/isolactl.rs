//! `isolactl`: talk to a running core over its control socket.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use isola_ipc::{ControlRequest, ControlResponse};

#[derive(Debug, Parser)]
#[command(name = "isolactl", version, about = "Control a running Isola VM")]
struct Cli {
    /// The core's control socket (its --control-socket); not needed by `console`.
    #[arg(long, short = 's', env = "ISOLA_CONTROL_SOCKET")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show uptime and every vCPU's state.
    Status,
    /// Stop all vCPUs.
    Pause,
    /// Let paused vCPUs run again.
    Resume,
    /// End the VM.
    Shutdown,
    /// Debugging aid: deliver one MSI to the guest.
    InjectMsi {
        #[arg(long, value_parser = parse_u64, default_value = "0xfee00000")]
        address: u64,
        #[arg(long, value_parser = parse_u64)]
        data: u64,
    },
    /// Attach this terminal to a console port's Unix socket (isola-console --port
    /// socket=PATH). The terminal is raw while attached; Ctrl-] detaches.
    Console {
        /// The port's socket.
        path: PathBuf,
    },
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("'{s}' is not a number: {e}"))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let request = match cli.command {
        Command::Console { path } => return console::attach(&path),
        Command::Status => ControlRequest::Status,
        Command::Pause => ControlRequest::Pause,
        Command::Resume => ControlRequest::Resume,
        Command::Shutdown => ControlRequest::Shutdown,
        Command::InjectMsi { address, data } => ControlRequest::InjectMsi {
            address,
            data: u32::try_from(data).context("--data must fit in 32 bits")?,
        },
    };
    let socket = cli
        .socket
        .context("--socket (or ISOLA_CONTROL_SOCKET) names the core's control socket")?;
    let mut stream = UnixStream::connect(&socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    isola_ipc::write_message(&mut stream, &request).context("cannot send the request")?;
    let response: ControlResponse =
        isola_ipc::read_message(&mut stream).context("no answer from the core")?;
    match response {
        ControlResponse::Done => Ok(()),
        ControlResponse::Error(e) => bail!("{e}"),
        ControlResponse::Status(status) => {
            println!(
                "uptime: {}.{:03} s",
                status.uptime_ms / 1000,
                status.uptime_ms % 1000
            );
            for vcpu in status.vcpus {
                println!("vcpu{}: {}", vcpu.index, vcpu.state);
            }
            for device in status.devices {
                println!(
                    "{} {}: {} (reconnects {}, backend {})",
                    device.name, device.slot, device.link, device.reconnects, device.socket
                );
            }
            Ok(())
        }
    }
}

mod console {
    //! `isolactl console PATH`: the terminal <-> a console port's socket, byte for byte.

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

    pub fn attach(path: &Path) -> anyhow::Result<()> {
        let stream = UnixStream::connect(path)
            .with_context(|| format!("cannot connect to {}", path.display()))?;
        let mut from_guest = stream.try_clone().context("cannot clone the socket")?;
        eprintln!(
            "isolactl: attached to {}; Ctrl-] detaches\r",
            path.display()
        );
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
        eprintln!("isolactl: detached");
        Ok(())
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("isolactl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
