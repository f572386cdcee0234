//! `isolactl`: talk to a running core over its control socket, and to `isola-input`'s
//! control socket (`key`, `type`, `pointer`, `input-status`).

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use isola_ipc::input::{InputRequest, InputResponse};
use isola_ipc::{ControlRequest, ControlResponse};

#[derive(Debug, Parser)]
#[command(name = "isolactl", version, about = "Control a running Isola VM")]
struct Cli {
    /// The core's control socket (its --control-socket).
    #[arg(long, short = 's', env = "ISOLA_CONTROL_SOCKET")]
    socket: Option<PathBuf>,
    /// isola-input's control socket (its --control-socket), for key, type, pointer and
    /// input-status.
    #[arg(long, short = 'i', env = "ISOLA_INPUT_SOCKET")]
    input: Option<PathBuf>,
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
    /// Press and release keys on the guest's keyboard: names such as `a`, `enter`, `f1`,
    /// codes (`30`, `0x1e`), or chords (`ctrl+alt+delete`: pressed in order, released in
    /// reverse). Several arguments are typed one after the other.
    Key {
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
        /// Only press (and hold) the keys.
        #[arg(long, conflicts_with = "release")]
        press: bool,
        /// Only release the keys.
        #[arg(long)]
        release: bool,
    },
    /// Type text on the guest's keyboard (US layout; `\n` in the text is Enter).
    Type { text: String },
    /// Move the guest's tablet pointer to (X, Y), each 0 to 32767, with buttons held.
    Pointer {
        x: u32,
        y: u32,
        /// Buttons held at the new position: any of left, middle, right, comma-separated.
        #[arg(long, value_delimiter = ',', value_parser = ["left", "middle", "right"])]
        buttons: Vec<String>,
    },
    /// Show isola-input's event counters.
    InputStatus,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("'{s}' is not a number: {e}"))
}

/// The requests of `isolactl key`: every chord pressed in order and released in reverse.
fn key_requests(keys: &[String], press: bool, release: bool) -> anyhow::Result<Vec<InputRequest>> {
    let mut out = Vec::new();
    for text in keys {
        let codes = isola_ipc::keys::chord(text).map_err(anyhow::Error::msg)?;
        if !release {
            out.extend(codes.iter().map(|&code| InputRequest::Key {
                code,
                pressed: true,
            }));
        }
        if !press {
            out.extend(codes.iter().rev().map(|&code| InputRequest::Key {
                code,
                pressed: false,
            }));
        }
    }
    Ok(out)
}

fn type_requests(text: &str) -> anyhow::Result<Vec<InputRequest>> {
    const SHIFT: u16 = 42;
    let mut out = Vec::new();
    for c in text.replace("\\n", "\n").chars() {
        let (code, shift) = isola_ipc::keys::char_key(c)
            .with_context(|| format!("no key types {c:?} on a US keyboard"))?;
        let key = |code, pressed| InputRequest::Key { code, pressed };
        if shift {
            out.push(key(SHIFT, true));
        }
        out.extend([key(code, true), key(code, false)]);
        if shift {
            out.push(key(SHIFT, false));
        }
    }
    Ok(out)
}

fn input_requests(command: Command) -> anyhow::Result<Vec<InputRequest>> {
    use isola_ipc::input::{BUTTON_LEFT, BUTTON_MIDDLE, BUTTON_RIGHT};
    Ok(match command {
        Command::Key {
            keys,
            press,
            release,
        } => key_requests(&keys, press, release)?,
        Command::Type { text } => type_requests(&text)?,
        Command::Pointer { x, y, buttons } => {
            let buttons = buttons.iter().fold(0, |mask, b| {
                mask | match b.as_str() {
                    "left" => BUTTON_LEFT,
                    "middle" => BUTTON_MIDDLE,
                    _ => BUTTON_RIGHT,
                }
            });
            vec![InputRequest::Pointer { x, y, buttons }]
        }
        _ => vec![InputRequest::Status],
    })
}

/// Sends input requests one by one; stops at the first refusal.
fn run_input(socket: &std::path::Path, requests: Vec<InputRequest>) -> anyhow::Result<()> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    for request in requests {
        isola_ipc::write_message(&mut stream, &request).context("cannot send the request")?;
        let response: InputResponse =
            isola_ipc::read_message(&mut stream).context("no answer from isola-input")?;
        match response {
            InputResponse::Done => {}
            InputResponse::Error(e) => bail!("{e}"),
            InputResponse::Status(s) => {
                println!("keyboard events: {}", s.keyboard_events);
                println!("tablet events: {}", s.tablet_events);
                println!("pending: {}", s.pending);
            }
        }
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let request = match cli.command {
        Command::Status => ControlRequest::Status,
        Command::Pause => ControlRequest::Pause,
        Command::Resume => ControlRequest::Resume,
        Command::Shutdown => ControlRequest::Shutdown,
        Command::InjectMsi { address, data } => ControlRequest::InjectMsi {
            address,
            data: u32::try_from(data).context("--data must fit in 32 bits")?,
        },
        input => {
            let socket = cli
                .input
                .context("--input SOCKET (or ISOLA_INPUT_SOCKET) is needed for this command")?;
            return run_input(&socket, input_requests(input)?);
        }
    };
    let socket = cli
        .socket
        .context("--socket SOCKET (or ISOLA_CONTROL_SOCKET) is needed for this command")?;
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

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("isolactl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
