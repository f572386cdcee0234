//! `isolactl`: talk to a running core over its control socket.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use isola_ipc::{ControlRequest, ControlResponse};

#[derive(Debug, Parser)]
#[command(name = "isolactl", version, about = "Control a running Isola VM")]
struct Cli {
    /// The core's control socket (its --control-socket).
    #[arg(long, short = 's', env = "ISOLA_CONTROL_SOCKET")]
    socket: Option<PathBuf>,
    /// isola-display's control socket (its --control), for `screenshot`.
    #[arg(long, global = true, env = "ISOLA_DISPLAY_SOCKET")]
    display: Option<PathBuf>,
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
    /// Save what scanout 0 of the display shows as a PNG file (needs --display).
    Screenshot {
        /// The PNG file to write.
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        scanout: u32,
    },
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("'{s}' is not a number: {e}"))
}

/// `isolactl screenshot`: asks isola-display, not the core.
fn screenshot(display: Option<PathBuf>, out: &Path, scanout: u32) -> anyhow::Result<()> {
    use isola_ipc::display::{DisplayRequest, DisplayResponse};
    let socket =
        display.context("screenshot needs --display SOCKET (isola-display's --control)")?;
    let mut stream = UnixStream::connect(&socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    isola_ipc::write_message(&mut stream, &DisplayRequest::Screenshot { scanout })
        .context("cannot send the request")?;
    match isola_ipc::read_message(&mut stream).context("no answer from isola-display")? {
        DisplayResponse::Screenshot { width, height, png } => {
            std::fs::write(out, png).with_context(|| format!("cannot write {}", out.display()))?;
            println!("{width}x{height} -> {}", out.display());
            Ok(())
        }
        DisplayResponse::Error(e) => bail!("{e}"),
        DisplayResponse::Status(_) => bail!("isola-display answered with something else"),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let request = match cli.command {
        Command::Screenshot { out, scanout } => return screenshot(cli.display, &out, scanout),
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
        .context("--socket (or ISOLA_CONTROL_SOCKET) is needed")?;
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
