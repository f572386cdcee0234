//! Command-line pieces every device process shares: where to listen for the frontend.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use isola_ipc::listen::BindError;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {}", .path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("another process is already listening on {}", .0.display())]
    InUse(PathBuf),
    #[error("--fd {0} is not an open file descriptor")]
    BadFd(RawFd),
    #[error("--fd {0} is not a listening Unix stream socket")]
    NotListening(RawFd),
}

/// Where the frontend connects, and how long it has to introduce itself.
#[derive(Debug, Clone, clap::Args)]
pub struct ListenArgs {
    #[command(flatten)]
    pub at: ListenAt,
    /// A frontend that has not sent SET_OWNER this long after connecting is dropped, and the
    /// next one is served (a silent peer must not hold the device).
    #[arg(long, value_name = "MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub handshake_timeout_ms: u64,
    /// Also map guest memory and in-flight regions in files that are not sealed against
    /// shrinking (a frontend such as libblkio 0.5, whose memfds cannot be sealed). Such a
    /// frontend can truncate the file and make the device fault; the device then dies at once
    /// and is restarted. Off by default: only sealed memfds are mapped.
    #[arg(long)]
    pub allow_unsealed_memory: bool,
}

/// `--socket PATH` or `--fd N`: where the frontend connects.
#[derive(Debug, Clone, clap::Args)]
#[group(required = true, multiple = false)]
pub struct ListenAt {
    /// Listen for the frontend on this Unix socket (a stale socket file is replaced).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Use this inherited, already-listening Unix stream socket (from a launcher).
    #[arg(long, value_name = "N")]
    pub fd: Option<RawFd>,
}

impl ListenArgs {
    /// The listening socket. For `--fd`, call this once: the listener takes the descriptor.
    /// Also sets the serve loop's handshake deadline (`--handshake-timeout-ms`) and whether
    /// unsealed memory is mapped (`--allow-unsealed-memory`).
    pub fn listener(&self) -> Result<UnixListener, ListenError> {
        crate::server::set_handshake_timeout(std::time::Duration::from_millis(
            self.handshake_timeout_ms,
        ));
        crate::memory::allow_unsealed(self.allow_unsealed_memory);
        self.at.listener()
    }
}

impl ListenAt {
    /// The listener: bound at `--socket`, or adopted from `--fd`.
    pub fn listener(&self) -> Result<UnixListener, ListenError> {
        match (&self.socket, self.fd) {
            (Some(path), _) => bind(path),
            (None, Some(fd)) => adopt(fd),
            // clap's group makes one of the two required.
            (None, None) => Err(ListenError::BadFd(-1)),
        }
    }
}

/// Binds `path`, replacing a socket file nobody listens on any more (left by a crash); the
/// path appears only once the socket listens ([`isola_ipc::listen::bind`]).
pub fn bind(path: &Path) -> Result<UnixListener, ListenError> {
    isola_ipc::listen::bind(path).map_err(|e| match e {
        BindError::Bind { path, source } => ListenError::Bind { path, source },
        BindError::NotASocket(path) => ListenError::NotASocket(path),
        BindError::InUse(path) => ListenError::InUse(path),
    })
}

/// Takes ownership of an inherited listening socket after checking that it is one.
fn adopt(fd: RawFd) -> Result<UnixListener, ListenError> {
    if fd < 0 {
        return Err(ListenError::BadFd(fd));
    }
    // SAFETY: F_GETFD reads no memory; on a number that is not an open fd it fails (EBADF).
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(ListenError::BadFd(fd));
    }
    // SAFETY: `borrow_raw` needs `fd` open while the borrow lives: F_GETFD just succeeded,
    // and nothing in this start-up path closes it before the borrow's last use below.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let family = getsockname::<SockaddrStorage>(fd)
        .ok()
        .and_then(|a| a.family());
    let listening = getsockopt(&borrowed, sockopt::AcceptConn).unwrap_or(false);
    let stream = getsockopt(&borrowed, sockopt::SockType).ok() == Some(SockType::Stream);
    if family != Some(AddressFamily::Unix) || !listening || !stream {
        return Err(ListenError::NotListening(fd));
    }
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|_| ListenError::BadFd(fd))?;
    // SAFETY: `from_raw_fd` needs `fd` open and owned by nobody else. It is open (checked
    // above); the launcher handed it to this process for this purpose, and this function is
    // the only place that takes it, called once at start-up.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(UnixListener::from(owned))
}

/// A device process's `main`: command line -> validated configuration -> run.
///
/// Bad input (a clap error, or `from_cli` failing) is one line on stderr, `NAME: message`,
/// and exit status 2; `--help` and `--version` print and exit 0. Logging starts once the
/// command line parses. A failure while running is logged (with its causes) and exit
/// status 1. Anything a device must do before all of this (allocator tuning) stays in its
/// own `main`, before calling this.
pub fn main<C, Cfg, E1, E2>(
    name: &str,
    from_cli: impl FnOnce(C) -> Result<Cfg, E1>,
    run: impl FnOnce(Cfg) -> Result<(), E2>,
) -> std::process::ExitCode
where
    C: clap::Parser,
    E1: std::error::Error,
    E2: std::error::Error,
{
    use std::process::ExitCode;

    let (cli, level) = match parse_with_log_level::<C>() {
        Ok(parsed) => parsed,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{name}: {}", one_line(&e));
            return ExitCode::from(2);
        }
    };
    crate::logging::init_with_level(name, level.as_deref());
    let config = match from_cli(cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{name}: {}", crate::logging::chain(&e));
            return ExitCode::from(2);
        }
    };
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{}", crate::logging::chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The device's own command line plus `--log-level`, which every device process takes.
fn parse_with_log_level<C: clap::Parser>() -> Result<(C, Option<String>), clap::Error> {
    let command = C::command().arg(
        clap::Arg::new("log_level")
            .long("log-level")
            .value_name("FILTER")
            .global(true)
            .value_parser(|s: &str| {
                if isola_ipc::log_filter::valid(s) {
                    Ok(s.to_owned())
                } else {
                    Err(format!(
                        "'{s}' is not a log filter (off, error, warn, info, debug, trace, \
                         or MODULE=LEVEL,...)"
                    ))
                }
            })
            .help(
                "Log filter (error, warn, info, debug, trace, or MODULE=LEVEL,...); \
                 overrides RUST_LOG",
            ),
    );
    let mut matches = command.try_get_matches()?;
    let level = matches.remove_one::<String>("log_level");
    let cli = C::from_arg_matches_mut(&mut matches)?;
    Ok((cli, level))
}

/// A clap error on one line: its first paragraph, whitespace collapsed.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let message = text.split("\n\n").next().unwrap_or(&text);
    let message = message.strip_prefix("error: ").unwrap_or(message);
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Scratch;
    use std::os::fd::IntoRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn stale_sockets_are_replaced_live_ones_are_not() {
        let dir = Scratch::new("stale");
        let path = dir.join("dev.sock");
        let first = bind(&path).unwrap();
        assert!(matches!(bind(&path), Err(ListenError::InUse(_))));
        // Bound under a temporary name and renamed into place: nothing else is left.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["dev.sock"]);
        drop(first);
        // The file is still there, but nobody listens: replaced.
        let _second = bind(&path).unwrap();
        let file = dir.join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(bind(&file), Err(ListenError::NotASocket(_))));
    }

    #[test]
    fn inherited_fds_are_checked() {
        let dir = Scratch::new("fd");
        let listener = UnixListener::bind(dir.join("l.sock")).unwrap();
        let fd = listener.into_raw_fd();
        let adopted = adopt(fd).unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        let not_listening = a.into_raw_fd();
        assert!(matches!(
            adopt(not_listening),
            Err(ListenError::NotListening(_))
        ));
        // SAFETY: `not_listening` came from `into_raw_fd` above and is owned by nobody else.
        drop(unsafe { OwnedFd::from_raw_fd(not_listening) });
        assert!(matches!(adopt(-3), Err(ListenError::BadFd(-3))));
        assert!(matches!(adopt(100_000), Err(ListenError::BadFd(100_000))));
        drop(adopted);
    }
}
