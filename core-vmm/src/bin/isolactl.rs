//! `isolactl`: talk to a running core over its control socket, and to `isola-input`'s
//! control socket (`key`, `type`, `pointer`, `input-status`); with `--json`, answer in the
//! API's JSON (through `DIR/api.sock` when the VM has one); `events` follows the API's event
//! stream.

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
#[command(
    name = "isolactl",
    version,
    about = "Control a running Isola VM",
    after_help = "Every command gives up after --timeout seconds (default 5) on a socket that \
                  does not accept or answer. With --run-dir, every socket is found in the run \
                  directory; a VM without a device (no daemon's socket there) is not an error \
                  for status. With --json, each command prints one JSON document (events and \
                  logs: one per line; errors: {\"error\": TEXT} on stdout, exit status 1); \
                  through DIR/api.sock when the run directory has one and no other socket is \
                  named, the API's own JSON (docs/api.yaml)."
)]
struct Cli {
    /// The core's control socket (its --control-socket); not needed by `console`.
    #[arg(long, short = 's', global = true, env = "ISOLA_CONTROL_SOCKET")]
    socket: Option<PathBuf>,
    /// The supervisor's control socket (isola-supervisor --control).
    #[arg(long, global = true, env = "ISOLA_SUPERVISOR_SOCKET")]
    supervisor: Option<PathBuf>,
    /// A VM started by scripts/isola-run: its run directory holds control.sock,
    /// supervisor.sock, console.sock, input-control.sock and display-control.sock.
    #[arg(long, short = 'r', global = true, env = "ISOLA_RUN_DIR")]
    run_dir: Option<PathBuf>,
    /// isola-display's control socket (its --control), for `screenshot`.
    #[arg(long, global = true, env = "ISOLA_DISPLAY_SOCKET")]
    display: Option<PathBuf>,
    /// isola-input's control socket (its --control-socket), for key, type, pointer and
    /// input-status.
    #[arg(long, short = 'i', global = true, env = "ISOLA_INPUT_SOCKET")]
    input: Option<PathBuf>,
    /// Seconds to wait for each socket to accept and answer (fractions allowed; default 5).
    /// `events`, `logs --follow` and `console`: for the connection and the first answer only.
    /// `shutdown`: the guest's grace period after the power button (default 30).
    #[arg(long, global = true, value_parser = parse_timeout)]
    timeout: Option<f64>,
    /// The VM's API socket (isola-api; default with --run-dir: DIR/api.sock if there), for
    /// `events` and the answers of --json.
    #[arg(long, global = true, env = "ISOLA_API_SOCKET")]
    api: Option<PathBuf>,
    /// Print machine-readable JSON: the API's shapes (docs/api.yaml: Vm, Device, Input,
    /// Event), one document per command, or one per line for events and logs.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// The grace period of `isolactl shutdown` without --timeout.
const DEFAULT_GRACE: f64 = 30.0;
/// How much longer than the grace period a graceful shutdown's answer may take (the core
/// stopping the vCPUs and answering).
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(10);

impl Cli {
    /// `shutdown`'s request to the core: graceful unless --hard.
    fn shutdown_request(&self) -> ControlRequest {
        match self.command {
            Command::Shutdown { hard: true } => ControlRequest::Shutdown,
            _ => ControlRequest::GracefulShutdown {
                timeout_ms: (self.grace().as_secs_f64() * 1000.0) as u64,
            },
        }
    }

    /// The guest's grace period for a graceful `shutdown`.
    fn grace(&self) -> Duration {
        Duration::from_secs_f64(self.timeout.unwrap_or(DEFAULT_GRACE))
    }

    /// How long each socket exchange may take: --timeout (default 5 s), except for a graceful
    /// shutdown, whose answer comes when the VM has ended.
    fn exchange_timeout(&self) -> Duration {
        match self.command {
            Command::Shutdown { hard: false } => self.grace() + SHUTDOWN_MARGIN,
            _ => Duration::from_secs_f64(self.timeout.unwrap_or(5.0)),
        }
    }

    /// The API socket --json and `events` use: `--api`, or `DIR/api.sock` when it is there
    /// and no internal socket is named on the command line.
    fn api_socket(&self) -> Option<PathBuf> {
        if self.api.is_some() {
            return self.api.clone();
        }
        let named = self.socket.is_some()
            || self.supervisor.is_some()
            || self.input.is_some()
            || self.display.is_some();
        let socket = self.run_dir.as_ref()?.join("api.sock");
        (!named && std::fs::symlink_metadata(&socket).is_ok()).then_some(socket)
    }

    fn core_socket(&self) -> anyhow::Result<PathBuf> {
        match (&self.socket, &self.run_dir) {
            (Some(socket), _) => Ok(socket.clone()),
            (None, Some(dir)) => Ok(dir.join("control.sock")),
            (None, None) => bail!("give the core's control socket (--socket) or --run-dir"),
        }
    }

    /// The socket given with `explicit`, or `name` in the run directory. `Ok(None)`: the run
    /// directory has no such socket, so the VM has no such device (`what`, for the error).
    fn socket_for(
        &self,
        explicit: &Option<PathBuf>,
        name: &str,
        flag: &str,
    ) -> anyhow::Result<Option<PathBuf>> {
        match (explicit, &self.run_dir) {
            (Some(socket), _) => Ok(Some(socket.clone())),
            (None, Some(dir)) => {
                let socket = dir.join(name);
                // A socket file left by a killed process still counts: connecting to it
                // says what happened.
                Ok(std::fs::symlink_metadata(&socket).is_ok().then_some(socket))
            }
            (None, None) => bail!("give {flag} SOCKET or --run-dir"),
        }
    }

    /// A socket this command needs; `what` names the device the VM would lack.
    fn needed(
        &self,
        explicit: &Option<PathBuf>,
        name: &str,
        flag: &str,
        what: &str,
    ) -> anyhow::Result<PathBuf> {
        self.socket_for(explicit, name, flag)?.with_context(|| {
            let dir = self.run_dir.as_deref().unwrap_or(Path::new("."));
            format!("this VM has {what} (no {})", dir.join(name).display())
        })
    }

    fn input_socket(&self) -> anyhow::Result<PathBuf> {
        self.needed(
            &self.input,
            "input-control.sock",
            "--input",
            "no input device",
        )
    }

    fn display_socket(&self) -> anyhow::Result<PathBuf> {
        self.needed(
            &self.display,
            "display-control.sock",
            "--display",
            "no display",
        )
    }

    fn supervisor_socket(&self) -> anyhow::Result<PathBuf> {
        self.needed(
            &self.supervisor,
            "supervisor.sock",
            "--supervisor",
            "no device daemons",
        )
    }

    /// Port 0 is `console.sock` in the run directory, port N `console-N.sock`.
    fn console_socket(&self, path: &Option<PathBuf>, port: Option<u32>) -> anyhow::Result<PathBuf> {
        let name = match port {
            None | Some(0) => "console.sock".to_owned(),
            Some(n) => format!("console-{n}.sock"),
        };
        let what = match port {
            None | Some(0) => "no console".to_owned(),
            Some(n) => format!("no console port {n}"),
        };
        if path.is_none() && self.run_dir.is_none() {
            bail!("give the console port's socket (isolactl console PATH) or --run-dir");
        }
        self.needed(path, &name, "PATH", &what)
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
    /// End the VM gracefully: press the guest's power button, wait up to --timeout seconds
    /// (default 30) for the guest to power off, then stop it hard. Prints which happened.
    Shutdown {
        /// Stop the VM at once, without asking the guest.
        #[arg(long, alias = "force")]
        hard: bool,
    },
    /// Press the guest's ACPI power button (the guest's OS decides what to do; most power
    /// off). Returns at once.
    PowerButton,
    /// Restart a device daemon: a running one is stopped (SIGTERM; SIGKILL after the
    /// supervisor's stop timeout) and started again at once; one given up on gets a fresh
    /// retry budget. The guest sees a pause; in-flight requests are resubmitted.
    Restart {
        /// The daemon's name as `status` shows it: blk0, blk1, console, net, input, gpu,
        /// display, ...
        name: String,
    },
    /// Replace a device daemon's program: like restart, the new instance on the same socket
    /// with the same arguments; `--binary PATH` (default: the file at the same path, e.g.
    /// after a rebuild). If the new program dies at once, the old one is put back.
    Upgrade {
        /// The daemon's name as `status` shows it.
        name: String,
        /// The new program (default: the file at the daemon's program's path).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
    /// Debugging aid: deliver one MSI to the guest.
    InjectMsi {
        /// The MSI's address (decimal or 0x hex); the default targets the BSP's local APIC.
        #[arg(long, value_parser = parse_u64, default_value = "0xfee00000")]
        address: u64,
        /// The MSI's data, 32 bits (decimal or 0x hex): the vector is its low byte.
        #[arg(long, value_parser = parse_u64)]
        data: u64,
    },
    /// Save what a scanout of the display shows as a PNG file (needs --display or --run-dir).
    Screenshot {
        /// The PNG file to write.
        out: PathBuf,
        /// Which scanout (0 is the first display).
        #[arg(long, default_value_t = 0)]
        scanout: u32,
    },
    /// Attach this terminal to a console port (isola-console --port socket=PATH): with
    /// --run-dir, port 0 (hvc0) unless --port says another. The terminal is raw while
    /// attached; Ctrl-] detaches.
    Console {
        /// The port's socket (default with --run-dir: DIR/console.sock).
        #[arg(conflicts_with = "port")]
        path: Option<PathBuf>,
        /// With --run-dir: port N's socket, DIR/console-N.sock (isola-run --console-port).
        #[arg(long, value_name = "N")]
        port: Option<u32>,
    },
    /// Press and release keys on the guest's keyboard: names such as `a`, `enter`, `f1`,
    /// codes (`30`, `0x1e`), or chords (`ctrl+alt+delete`: pressed in order, released in
    /// reverse). Several arguments are typed one after the other.
    Key {
        /// A key name (list below), a code, or a chord of them joined by `+`.
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
    Type {
        /// The text; a character with no key on a US keyboard is refused before anything
        /// is typed.
        text: String,
    },
    /// Move the guest's tablet pointer to (X, Y), each 0 to 32767, with buttons held.
    Pointer {
        /// Horizontal position, 0 (left edge) to 32767 (right edge).
        x: u32,
        /// Vertical position, 0 (top) to 32767 (bottom).
        y: u32,
        /// Buttons held at the new position: any of left, middle, right, comma-separated.
        #[arg(long, value_delimiter = ',', value_parser = ["left", "middle", "right"])]
        buttons: Vec<String>,
    },
    /// Show isola-input's event counters.
    InputStatus,
    /// Follow the VM's events (GET /events of its API socket: device died, restarted, given
    /// up, refused, reconnected; vCPUs paused, resumed; guest powered off, reset, crashed):
    /// one line each, until the VM ends. Needs --api or a run directory with api.sock.
    Events,
    /// Send systemd a notification (sd_notify, e.g. READY=1) on $NOTIFY_SOCKET.
    Notify {
        /// The notification's lines, e.g. READY=1 or STATUS=text.
        #[arg(required = true, value_name = "VAR=VALUE")]
        assignments: Vec<String>,
    },
    /// Print a log of a VM started by scripts/isola-run (needs --run-dir): NAME is a daemon
    /// (blk0, console, net, gpu, display, input), `supervisor` or `core`.
    Logs {
        /// The log: a daemon's name, `supervisor` or `core`.
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

/// Writes a line to stderr, never panicking (`eprintln!` panics when stderr is a closed
/// pipe): a message nobody can read is dropped.
macro_rules! tell {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}
pub(crate) use tell;

fn parse_u64(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("'{s}' is not a number: {e}"))
}

/// `isolactl screenshot`: asks isola-display, not the core.
fn screenshot(socket: &Path, out: &Path, scanout: u32) -> anyhow::Result<(u32, u32)> {
    use isola_ipc::display::{DisplayRequest, DisplayResponse};
    match call(
        socket,
        "isola-display",
        &DisplayRequest::Screenshot { scanout },
    )? {
        DisplayResponse::Screenshot { width, height, png } => {
            std::fs::write(out, png).with_context(|| format!("cannot write {}", out.display()))?;
            Ok((width, height))
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

fn input_requests(command: &Command) -> anyhow::Result<Vec<InputRequest>> {
    use isola_ipc::input::{BUTTON_LEFT, BUTTON_MIDDLE, BUTTON_RIGHT};
    Ok(match command {
        Command::Key {
            keys,
            press,
            release,
        } => key_requests(keys, *press, *release)?,
        Command::Type { text } => type_requests(text)?,
        Command::Pointer { x, y, buttons } => {
            let buttons = buttons.iter().fold(0, |mask, b| {
                mask | match b.as_str() {
                    "left" => BUTTON_LEFT,
                    "middle" => BUTTON_MIDDLE,
                    _ => BUTTON_RIGHT,
                }
            });
            vec![InputRequest::Pointer {
                x: *x,
                y: *y,
                buttons,
            }]
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
    // The streams first: prose or JSON, they print as they go.
    match cli.command {
        Command::Console { ref path, port } => {
            let socket = cli.console_socket(path, port)?;
            return console::attach(&connect(&socket, "the console port")?, &socket, cli.json);
        }
        Command::Logs { ref name, follow } => {
            let dir = cli.run_dir.as_ref().context("logs needs --run-dir")?;
            return logs::print(&dir.join("logs"), name, follow, cli.json);
        }
        Command::Events => return events(&cli),
        _ => {}
    }
    if cli.json {
        let answer = json::run(&cli)?;
        say!("{answer}");
        return Ok(());
    }
    let input_socket = cli.input_socket();
    let request = match cli.command {
        Command::Screenshot { ref out, scanout } => {
            let (width, height) = screenshot(&cli.display_socket()?, out, scanout)?;
            say!("{width}x{height} -> {}", out.display());
            return Ok(());
        }
        Command::Status => return status(&cli),
        Command::Notify { ref assignments } => return notify::send(assignments),
        Command::Restart { .. } | Command::Upgrade { .. } => return run_supervisor_command(&cli),
        Command::Pause => ControlRequest::Pause,
        Command::Resume => ControlRequest::Resume,
        Command::PowerButton => ControlRequest::PowerButton,
        Command::Shutdown { .. } => {
            let request = cli.shutdown_request();
            match core_call(&cli.core_socket()?, &request)? {
                ControlResponse::Error(e) => bail!("{e}"),
                ControlResponse::ShutDown(report) => say!("{}", shutdown_line(&report)),
                _ => say!("hard: stopped at once on request"),
            }
            return Ok(());
        }
        Command::InjectMsi { address, data } => ControlRequest::InjectMsi {
            address,
            data: u32::try_from(data).context("--data must fit in 32 bits")?,
        },
        ref input => {
            let requests = input_requests(input)?;
            return run_input(&input_socket?, requests);
        }
    };
    match core_call(&cli.core_socket()?, &request)? {
        ControlResponse::Error(e) => bail!("{e}"),
        _ => Ok(()),
    }
}

/// `isolactl events`: GET /events of the API socket, each event a line (its JSON with
/// --json), until the server ends the stream when the VM ends.
fn events(cli: &Cli) -> anyhow::Result<()> {
    let Some(api) = cli.api_socket() else {
        let dir = cli.run_dir.as_deref().unwrap_or(Path::new("."));
        bail!(
            "events needs the VM's API socket: give --api SOCKET, or --run-dir of a VM started \
             with isola-api (no {})",
            dir.join("api.sock").display()
        );
    };
    http::follow_lines(&api, "/events", |line| {
        if cli.json {
            say!("{line}");
            return Ok(());
        }
        let e: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not a JSON event: {line}"))?;
        let mut text = format!(
            "{} {}",
            e["time"].as_str().unwrap_or("-"),
            e["event"].as_str().unwrap_or("?")
        );
        if let Some(device) = e["device"].as_str() {
            text.push_str(&format!(" {device}"));
        }
        if let Some(pid) = e["pid"].as_u64() {
            text.push_str(&format!(" pid {pid}"));
        }
        if let Some(latency) = e["latency_seconds"].as_f64() {
            text.push_str(&format!(" after {latency:.3} s"));
        }
        if let Some(reason) = e["reason"].as_str() {
            text.push_str(&format!(": {reason}"));
        }
        say!("{text}");
        Ok(())
    })
}

/// `restart` and `upgrade`: requests to the supervisor, each announced to the core first as a
/// planned handover of the daemon's devices, so that the core reconnects at once even to a
/// daemon replaced right after the last replacement (no flap back-off).
fn run_supervisor_command(cli: &Cli) -> anyhow::Result<()> {
    if let Command::Restart { ref name } | Command::Upgrade { ref name, .. } = cli.command {
        announce_handover(cli, name);
    }
    match cli.command {
        Command::Restart { ref name } => {
            supervisor_request(cli, SupervisorRequest::Restart { name: name.clone() })
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
            supervisor_request(cli, SupervisorRequest::Upgrade { name, binary })
        }
        _ => bail!("not a supervisor command"),
    }
}

/// A request the supervisor answers with `Done` or an error.
fn supervisor_request(cli: &Cli, request: SupervisorRequest) -> anyhow::Result<()> {
    let socket = cli.supervisor_socket()?;
    match supervisor_call(&socket, &request)? {
        SupervisorResponse::Error(e) => bail!("{e}"),
        _ => Ok(()),
    }
}

/// `graceful: ...` or `hard: ...`: how a shutdown ended.
fn shutdown_line(report: &isola_ipc::ShutdownReport) -> String {
    let how = if report.graceful { "graceful" } else { "hard" };
    format!("{how}: {}", report.detail)
}

/// Tells the core that the devices daemon `name` serves are about to be handed over. Best
/// effort: without it (no core, or one that refuses) the restart still happens, and only a
/// daemon replaced again within the core's flap window is retried after a back-off.
fn announce_handover(cli: &Cli, name: &str) {
    let (Ok(core), Ok(supervisor)) = (cli.core_socket(), cli.supervisor_socket()) else {
        return;
    };
    let Ok(ControlResponse::Status(vm)) = core_call(&core, &ControlRequest::Status) else {
        return;
    };
    let Ok(SupervisorResponse::Status(daemons)) =
        supervisor_call(&supervisor, &SupervisorRequest::Status)
    else {
        return;
    };
    for socket in isola_ipc::supervisor::sockets_served_by(&vm.devices, &daemons, name) {
        if let Ok(ControlResponse::Error(e)) =
            core_call(&core, &ControlRequest::Handover { socket })
        {
            eprintln!("isolactl: note: the core was not told of the handover: {e}");
        }
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
/// With `--run-dir` the supervisor's socket is implied: a run directory without one is a VM
/// without device daemons (nothing to report), and a supervisor that is gone (its socket
/// left behind) or does not answer is reported on stderr without hiding the core's status.
fn status(cli: &Cli) -> anyhow::Result<()> {
    let only_supervisor = cli.socket.is_none() && cli.run_dir.is_none();
    let mut supervisor_failed = None;
    let supervisor = match (&cli.supervisor, &cli.run_dir) {
        (None, None) => None,
        _ => cli.socket_for(&cli.supervisor, "supervisor.sock", "--supervisor")?,
    };
    let mut daemons = match supervisor {
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
        other => bail!("the core answered a status request with {other:?}"),
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
        tell!("isolactl: supervisor: {e:#}");
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

#[path = "isolactl/http.rs"]
mod http;
#[path = "isolactl/json.rs"]
mod json;
#[path = "isolactl/logs.rs"]
mod logs;
#[path = "isolactl/notify.rs"]
mod notify;

#[path = "isolactl/console.rs"]
mod console;

/// The command line, with the list of key names in `key`'s help.
fn parse_cli() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let keys = format!(
        "Key names (any case): {}.",
        isola_ipc::keys::names().collect::<Vec<_>>().join(" ")
    );
    let command = Cli::command().mut_subcommand("key", |key| key.after_help(keys));
    let matches = command.get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn main() -> ExitCode {
    let cli = parse_cli();
    let _ = TIMEOUT.set(cli.exchange_timeout());
    let json = cli.json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tell!("isolactl: error: {e:#}");
            if json {
                // Not `say!`: a closed stdout must not turn the failure into status 0.
                use std::io::Write as _;
                let error = serde_json::json!({ "error": format!("{e:#}") });
                let _ = writeln!(std::io::stdout().lock(), "{error}");
            }
            ExitCode::FAILURE
        }
    }
}
