//! `isola-api`: the VM's manager. It starts `isola-core` as its child, watches it and the
//! supervisor's device daemons, and serves the VM's HTTP/1.1 + JSON API on `DIR/api.sock`
//! (mode 0600), described by `docs/api.yaml`. When the core ends it tells the event stream
//! how, and exits with the core's status.
//!
//! It is its own process, not part of the core, so the core's attack surface stays what it
//! was: the core keeps its small binary control socket, and only this process parses HTTP
//! and JSON. See ARCHITECTURE.md, "The API".

mod backends;
mod core;
mod http;
mod metrics;
mod model;
mod procfs;
mod routes;
mod status;
mod watch;

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "isola-api",
    version,
    about = "Start isola-core and serve the VM's HTTP+JSON API on DIR/api.sock"
)]
struct Cli {
    /// The VM's run directory: the API socket goes there (api.sock), and the core's,
    /// supervisor's, display's and input's control sockets are found there.
    #[arg(long, value_name = "DIR")]
    run_dir: PathBuf,
    /// The API socket (default DIR/api.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// How often the core and the supervisor are asked for their state, for the event stream.
    #[arg(long, default_value_t = 100, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(10..=10_000))]
    poll_ms: u64,
    /// What a guest reset does: `end` the VM (exit status 0), or `restart` it in place: the
    /// core is started again with the same command line, and the device daemons (which
    /// serve the next frontend) are connected again; the API and its event stream go on.
    #[arg(long, value_enum, default_value_t = OnReset::End)]
    on_reset: OnReset,
    /// The core's command line: PROGRAM ARGS... (`--exit-report-fd 3` is added).
    #[arg(last = true, required = true, value_name = "CORE")]
    core: Vec<OsString>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnReset {
    End,
    Restart,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("cannot create the API socket")]
    Bind(#[from] isola_ipc::listen::BindError),
    #[error("cannot set up the API socket {0}")]
    Socket(PathBuf, #[source] std::io::Error),
    #[error("cannot start the runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Core(#[from] core::CoreError),
}

fn main() -> ExitCode {
    let pid = std::process::id();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format(move |buf, record| {
            writeln!(
                buf,
                "isola-api[{pid}]: {}: {}",
                record.level(),
                record.args()
            )
        })
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(1)),
        Err(e) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("isola-api: error: {text}");
            ExitCode::from(2)
        }
    }
}

/// Binds `path` with mode 0600 from the start (umask), before any thread exists.
fn bind_private(path: &Path) -> Result<std::os::unix::net::UnixListener, Error> {
    // SAFETY: umask only swaps the process's file-creation mask; no other thread exists yet.
    let old = unsafe { libc::umask(0o177) };
    let bound = isola_ipc::listen::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound?;
    let socket_err = |e| Error::Socket(path.to_owned(), e);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(socket_err)?;
    listener.set_nonblocking(true).map_err(socket_err)?;
    Ok(listener)
}

fn run(cli: Cli) -> Result<i32, Error> {
    let path = cli
        .socket
        .clone()
        .unwrap_or_else(|| cli.run_dir.join("api.sock"));
    let listener = bind_private(&path)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let result = runtime.block_on(async {
        let listener = tokio::net::UnixListener::from_std(listener)
            .map_err(|e| Error::Socket(path.clone(), e))?;
        let watch = watch::Watch::new(backends::Sockets::in_dir(&cli.run_dir));
        tokio::spawn(http::serve(listener, std::sync::Arc::clone(&watch)));
        tokio::spawn(std::sync::Arc::clone(&watch).run(Duration::from_millis(cli.poll_ms)));
        let mut restarts = 0u64;
        let exit = loop {
            let exit = core::run(std::sync::Arc::clone(&watch), &cli.core).await?;
            if cli.on_reset == OnReset::End || exit.reason != "reset" {
                break exit;
            }
            restarts += 1;
            log::info!("the guest reset: starting the core again (restart {restarts})");
            watch.core_restarting(restarts);
        };
        let status = exit.status;
        watch.core_ended(exit);
        // Let the event streams send their last lines.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(status)
    });
    let _ = std::fs::remove_file(&path);
    // Connections still open (an event reader) are dropped with the runtime.
    runtime.shutdown_timeout(Duration::from_millis(100));
    result
}
