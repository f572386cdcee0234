//! A daemon's output: one pipe for its stdout and stderr, read line by line by a thread that
//! writes each line to the daemon's log file (or the supervisor's stderr) and keeps the lines
//! that explain how the instance ended.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a reap waits for a dead instance's last stderr lines.
const STDERR_GRACE: Duration = Duration::from_millis(200);

/// What an instance's stderr said that explains its ending.
#[derive(Debug, Default, Clone)]
pub struct Tail {
    /// Its last line that is not routine logging (INFO, DEBUG, TRACE): an error or warning,
    /// or a plain line such as a device's one-line refusal of its configuration.
    pub error_line: Option<String>,
    /// The sandbox reaper's report of a seccomp kill ("syscall=N (name) thread=T").
    pub seccomp: Option<String>,
}

impl Tail {
    fn note(&mut self, line: &str) {
        if let Some(at) = line.find("killed by seccomp: syscall=") {
            self.seccomp = Some(line[at + "killed by seccomp: ".len()..].to_owned());
        }
        let routine = [" INFO ", " DEBUG ", " TRACE "].iter().any(|level| {
            line.split_once("]:")
                .is_some_and(|(_, rest)| rest.starts_with(level))
        });
        if !routine && !line.trim().is_empty() {
            self.error_line = Some(line.to_owned());
        }
    }
}

/// The forwarder of one instance's stderr.
pub struct StderrWatch {
    tail: Arc<Mutex<Tail>>,
    /// Disconnected when the forwarder has seen the end of the stream.
    done: Receiver<()>,
}

impl StderrWatch {
    /// What the instance said last, once its stderr has ended (the instance is dead: that
    /// follows at once unless something it started still holds the pipe; bounded).
    pub fn last_words(&self) -> Tail {
        if let Err(RecvTimeoutError::Timeout) = self.done.recv_timeout(STDERR_GRACE) {
            log::debug!("stderr still open after the instance ended");
        }
        self.tail.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

/// Copies a daemon's output line by line to its log file (each line after the UTC time), or
/// to our stderr without a log file, keeping what explains an ending.
pub fn forward_output(name: &str, output: OwnedFd, log_file: Option<&Path>) -> StderrWatch {
    let tail = Arc::new(Mutex::new(Tail::default()));
    let (alive, done) = mpsc::channel::<()>();
    let watch = StderrWatch {
        tail: Arc::clone(&tail),
        done,
    };
    let mut file = None;
    if let Some(path) = log_file {
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path);
        match opened {
            Ok(f) => file = Some(f),
            Err(e) => log::warn!(
                "{name}: cannot open {}: {e}; its output goes to stderr",
                path.display()
            ),
        }
    }
    let spawned = std::thread::Builder::new()
        .name(format!("log-{name}"))
        .spawn(move || {
            let _alive = alive;
            let stamped = file.is_some();
            let mut out: Box<dyn Write> = match file {
                Some(file) => Box::new(file),
                None => Box::new(std::io::stderr()),
            };
            for line in BufReader::new(std::fs::File::from(output)).lines() {
                let Ok(line) = line else { break };
                let _ = if stamped {
                    writeln!(out, "{} {line}", crate::time::utc_now())
                } else {
                    writeln!(out, "{line}")
                };
                if let Ok(mut tail) = tail.lock() {
                    tail.note(&line);
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("{name}: cannot forward its output: {e}");
    }
    watch
}
