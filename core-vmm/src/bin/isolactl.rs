//! `isolactl`: talk to a running core over its control socket, and to `isola-input`'s
//! control socket (`key`, `type`, `pointer`, `input-status`).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use isola_ipc::input::{InputRequest, InputResponse};
use isola_ipc::supervisor::{DaemonStatus, SupervisorRequest, SupervisorResponse};
use isola_ipc::{ControlRequest, ControlResponse};

#[derive(Debug, Parser)]
#[command(name = "isolactl", version, about = "Control a running Isola VM")]
struct Cli {
    /// The core's control socket (its --control-socket); not needed by `console`.
    #[arg(long, short = 's', env = "ISOLA_CONTROL_SOCKET")]
    socket: Option<PathBuf>,
    /// The supervisor's control socket (isola-supervisor --control).
    #[arg(long, env = "ISOLA_SUPERVISOR_SOCKET")]
    supervisor: Option<PathBuf>,
    /// A VM started by scripts/isola-run: its run directory holds control.sock and
    /// supervisor.sock.
    #[arg(long, short = 'r', env = "ISOLA_RUN_DIR")]
    run_dir: Option<PathBuf>,
    /// isola-display's control socket (its --control), for `screenshot`.
    #[arg(long, global = true, env = "ISOLA_DISPLAY_SOCKET")]
    display: Option<PathBuf>,
    /// isola-input's control socket (its --control-socket), for key, type, pointer and
    /// input-status.
    #[arg(long, short = 'i', env = "ISOLA_INPUT_SOCKET")]
    input: Option<PathBuf>,
    /// Seconds to wait for each socket to accept and answer (fractions allowed).
    #[arg(long, global = true, default_value_t = 5.0, value_parser = parse_timeout)]
    timeout: f64,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    fn core_socket(&self) -> anyhow::Result<PathBuf> {
        match (&self.socket, &self.run_dir) {
            (Some(socket), _) => Ok(socket.clone()),
            (None, Some(dir)) => Ok(dir.join("control.sock")),
            (None, None) => bail!("give the core's control socket (--socket) or --run-dir"),
        }
    }

    fn input_socket(&self) -> Option<PathBuf> {
        self.input.clone().or_else(|| {
            self.run_dir
                .as_ref()
                .map(|dir| dir.join("input-control.sock"))
        })
    }

    fn display_socket(&self) -> Option<PathBuf> {
        self.display.clone().or_else(|| {
            self.run_dir
                .as_ref()
                .map(|dir| dir.join("display-control.sock"))
        })
    }

    fn supervisor_socket(&self) -> Option<PathBuf> {
        self.supervisor
            .clone()
            .or_else(|| self.run_dir.as_ref().map(|dir| dir.join("supervisor.sock")))
    }
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
    /// Restart a device daemon: a running one is stopped (SIGTERM; SIGKILL after the
    /// supervisor's stop timeout) and started again at once; one given up on gets a fresh
    /// retry budget. The guest sees a pause; in-flight requests are resubmitted.
    Restart { name: String },
    /// Replace a device daemon's program: like restart, the new instance on the same socket
    /// with the same arguments; `--binary PATH` (default: the file at the same path, e.g.
    /// after a rebuild). If the new program dies at once, the old one is put back.
    Upgrade {
        name: String,
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
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
    /// Attach this terminal to a console port's Unix socket (isola-console --port
    /// socket=PATH). The terminal is raw while attached; Ctrl-] detaches.
    Console {
        /// The port's socket.
        path: PathBuf,
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
    /// Send systemd a notification (sd_notify, e.g. READY=1) on $NOTIFY_SOCKET.
    Notify {
        #[arg(required = true, value_name = "VAR=VALUE")]
        assignments: Vec<String>,
    },
    /// Print a log of a VM started by scripts/isola-run (needs --run-dir): NAME is a daemon
    /// (blk0, console, net, gpu, display, input), `supervisor` or `core`.
    Logs {
        name: String,
        /// Keep printing what is appended, until the VM ends (or Ctrl-C).
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if t > 0.0 && t <= 3600.0 => Ok(t),
        _ => Err(format!(
            "'{s}' is not a number of seconds between 0 and 3600"
        )),
    }
}

/// The `--timeout` in force, set once in `main`.
static TIMEOUT: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

fn timeout() -> Duration {
    TIMEOUT.get().copied().unwrap_or(Duration::from_secs(5))
}

/// Connects to `socket` (`who` names the peer in errors) within the timeout: the connect
/// never blocks (a full listen backlog is retried until the deadline), and reads and writes
/// on the returned stream give up when the time left is over.
fn connect(socket: &Path, who: &str) -> anyhow::Result<UnixStream> {
    use nix::sys::socket::{connect, socket as open, AddressFamily, SockFlag, SockType, UnixAddr};
    let deadline = Instant::now() + timeout();
    let addr = UnixAddr::new(socket)
        .with_context(|| format!("{who}: bad socket path {}", socket.display()))?;
    let stream = loop {
        let fd = open(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .context("cannot create a socket")?;
        use std::os::fd::AsRawFd;
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break UnixStream::from(fd),
            Err(nix::errno::Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(nix::errno::Errno::EAGAIN) => bail!(
                "{who} did not accept a connection on {} within {:?}",
                socket.display(),
                timeout()
            ),
            Err(e) => bail!("cannot connect to {who} at {}: {e}", socket.display()),
        }
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))?;
    Ok(stream)
}

/// One request, one answer, on a fresh connection to `socket`, within the timeout.
fn call<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
    socket: &Path,
    who: &str,
    request: &Req,
) -> anyhow::Result<Resp> {
    let mut stream = connect(socket, who)?;
    isola_ipc::write_message(&mut stream, request)
        .with_context(|| format!("cannot send the request to {who} at {}", socket.display()))?;
    isola_ipc::read_message(&mut stream).map_err(|e| match &e {
        isola_ipc::IpcError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            anyhow::anyhow!(
                "{who} did not answer on {} within {:?}",
                socket.display(),
                timeout()
            )
        }
        _ => anyhow::Error::new(e).context(format!("no answer from {who} at {}", socket.display())),
    })
}

/// Writes a line to stdout; a reader that went away (`isolactl status | head -1`) ends the
/// program quietly instead of a panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
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
    match call(
        &socket,
        "isola-display",
        &DisplayRequest::Screenshot { scanout },
    )? {
        DisplayResponse::Screenshot { width, height, png } => {
            std::fs::write(out, png).with_context(|| format!("cannot write {}", out.display()))?;
            say!("{width}x{height} -> {}", out.display());
            Ok(())
        }
        DisplayResponse::Error(e) => bail!("{e}"),
        DisplayResponse::Status(_) => bail!("isola-display answered with something else"),
    }
}

/// The requests of `isolactl key`: every chord pressed in order and released in reverse.
fn key_requests(keys: &[String], press: bool, release: bool) -> anyhow::Result<Vec<InputRequest>> {
    let mut out = Vec::new();
    for text in keys {
        let events =
            isola_ipc::keys::chord_events(text, press, release).map_err(anyhow::Error::msg)?;
        out.extend(
            events
                .into_iter()
                .map(|(code, pressed)| InputRequest::Key { code, pressed }),
        );
    }
    Ok(out)
}

fn type_requests(text: &str) -> anyhow::Result<Vec<InputRequest>> {
    let events =
        isola_ipc::keys::text_events(&text.replace("\\n", "\n")).map_err(anyhow::Error::msg)?;
    Ok(events
        .into_iter()
        .map(|(code, pressed)| InputRequest::Key { code, pressed })
        .collect())
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
    for request in requests {
        let response: InputResponse = call(socket, "isola-input", &request)?;
        match response {
            InputResponse::Done => {}
            InputResponse::Error(e) => bail!("{e}"),
            InputResponse::Status(s) => {
                say!("keyboard events: {}", s.keyboard_events);
                say!("tablet events: {}", s.tablet_events);
                say!("pending: {}", s.pending);
            }
        }
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let input_socket = cli.input_socket();
    let request = match cli.command {
        Command::Console { ref path } => return console::attach(path),
        Command::Screenshot { ref out, scanout } => {
            return screenshot(cli.display_socket(), out, scanout)
        }
        Command::Status => return status(&cli),
        Command::Notify { ref assignments } => return notify::send(assignments),
        Command::Logs { ref name, follow } => {
            let dir = cli.run_dir.as_ref().context("logs needs --run-dir")?;
            return logs::print(&dir.join("logs"), name, follow);
        }
        Command::Restart { ref name } => {
            return supervisor_request(&cli, SupervisorRequest::Restart { name: name.clone() })
        }
        Command::Upgrade {
            ref name,
            ref binary,
        } => {
            let binary = match binary {
                Some(path) => Some(
                    std::fs::canonicalize(path)
                        .with_context(|| format!("--binary {}", path.display()))?
                        .to_str()
                        .context("--binary: the path is not UTF-8")?
                        .to_owned(),
                ),
                None => None,
            };
            let name = name.clone();
            return supervisor_request(&cli, SupervisorRequest::Upgrade { name, binary });
        }
        Command::Pause => ControlRequest::Pause,
        Command::Resume => ControlRequest::Resume,
        Command::Shutdown => ControlRequest::Shutdown,
        Command::InjectMsi { address, data } => ControlRequest::InjectMsi {
            address,
            data: u32::try_from(data).context("--data must fit in 32 bits")?,
        },
        input => {
            let socket = input_socket.context(
                "--input SOCKET (or ISOLA_INPUT_SOCKET, or --run-dir) is needed for this command",
            )?;
            return run_input(&socket, input_requests(input)?);
        }
    };
    match core_call(&cli.core_socket()?, &request)? {
        ControlResponse::Error(e) => bail!("{e}"),
        _ => Ok(()),
    }
}

/// A request the supervisor answers with `Done` or an error.
fn supervisor_request(cli: &Cli, request: SupervisorRequest) -> anyhow::Result<()> {
    let socket = cli
        .supervisor_socket()
        .context("give the supervisor's socket (--supervisor) or --run-dir")?;
    match supervisor_call(&socket, &request)? {
        SupervisorResponse::Error(e) => bail!("{e}"),
        _ => Ok(()),
    }
}

fn core_call(socket: &Path, request: &ControlRequest) -> anyhow::Result<ControlResponse> {
    call(socket, "the core", request)
}

fn supervisor_call(
    socket: &Path,
    request: &SupervisorRequest,
) -> anyhow::Result<SupervisorResponse> {
    call(socket, "the supervisor", request)
}

/// The core's view (vCPUs, each device's link) merged with the supervisor's (each device
/// daemon's pid, restarts and last exit), matched by socket path.
///
/// With `--run-dir` the supervisor's socket is implied, and a supervisor that is gone or does
/// not answer is reported (on stderr) without hiding the core's status.
fn status(cli: &Cli) -> anyhow::Result<()> {
    let only_supervisor = cli.socket.is_none() && cli.run_dir.is_none();
    let mut supervisor_failed = None;
    let mut daemons = match cli.supervisor_socket() {
        Some(socket) => match supervisor_call(&socket, &SupervisorRequest::Status) {
            Ok(SupervisorResponse::Status(daemons)) => daemons,
            Ok(SupervisorResponse::Error(e)) => bail!("supervisor: {e}"),
            Ok(SupervisorResponse::Done) => bail!("the supervisor answered 'done' to status"),
            Err(e) if !only_supervisor => {
                supervisor_failed = Some(e);
                Vec::new()
            }
            Err(e) => return Err(e),
        },
        None => Vec::new(),
    };
    // With only --supervisor: the daemons alone.
    if only_supervisor && cli.supervisor.is_some() {
        daemons.iter().for_each(print_daemon);
        return Ok(());
    }
    let status = match core_call(&cli.core_socket()?, &ControlRequest::Status)? {
        ControlResponse::Status(status) => status,
        ControlResponse::Error(e) => bail!("{e}"),
        ControlResponse::Done => bail!("the core answered a status request with 'done'"),
    };
    say!(
        "uptime: {}.{:03} s",
        status.uptime_ms / 1000,
        status.uptime_ms % 1000
    );
    for vcpu in status.vcpus {
        say!("vcpu{}: {}", vcpu.index, vcpu.state);
    }
    for device in status.devices {
        say!(
            "{} {}: {} (reconnects {}, backend {})",
            device.name,
            device.slot,
            device.link,
            device.reconnects,
            device.socket
        );
        if let Some(display) = &device.display {
            say!(
                "  display: {} (reattached {}, socket {})",
                display.link,
                display.reattaches,
                display.socket
            );
        }
        if let Some(at) = daemons
            .iter()
            .position(|d| same_path(&d.socket, &device.socket))
        {
            print_daemon(&daemons.remove(at));
        }
    }
    // Daemons no device of the core uses (e.g. a display server).
    for daemon in &daemons {
        print_daemon(daemon);
    }
    if let Some(e) = supervisor_failed {
        eprintln!("isolactl: supervisor: {e:#}");
    }
    Ok(())
}

fn print_daemon(d: &DaemonStatus) {
    let pid = d.pid.map_or("-".to_owned(), |pid| pid.to_string());
    let last = d.last_exit.as_deref().unwrap_or("none");
    say!(
        "  daemon {}: pid {pid}, {}, restarts {}, last exit: {last}",
        d.name,
        d.state,
        d.restarts
    );
}

fn same_path(a: &str, b: &str) -> bool {
    let canonical = |p: &str| std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p));
    a == b || canonical(a) == canonical(b)
}

#[path = "isolactl/logs.rs"]
mod logs;
#[path = "isolactl/notify.rs"]
mod notify;

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
    let cli = Cli::parse();
    let _ = TIMEOUT.set(Duration::from_secs_f64(cli.timeout));
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("isolactl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
