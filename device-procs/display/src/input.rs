//! The link to `isola-input`'s control socket (`--input`): VNC key and pointer events go on
//! as [`InputRequest`]s. The link connects on first use and again after any failure (so a
//! restarted `isola-input` is picked up); while it is down, events are dropped and counted,
//! never queued.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use isola_device_common::logging::chain;
use isola_ipc::input::{InputRequest, InputResponse};

/// How long one request may take before the link is considered broken.
const TIMEOUT: Duration = Duration::from_secs(1);
/// After a failed connect, events are dropped without trying again for this long.
const RETRY: Duration = Duration::from_millis(200);

#[derive(Debug)]
struct Link {
    stream: Option<UnixStream>,
    last_failure: Option<Instant>,
}

/// Where VNC input goes.
#[derive(Debug)]
pub struct InputSink {
    path: Option<PathBuf>,
    link: Mutex<Link>,
    sent: AtomicU64,
    dropped: AtomicU64,
}

impl InputSink {
    /// `None`: no `--input`; every event is dropped (and counted).
    pub fn new(path: Option<PathBuf>) -> InputSink {
        InputSink {
            path,
            link: Mutex::new(Link {
                stream: None,
                last_failure: None,
            }),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn drop_event(&self, why: &str) {
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        // Log the first drop and then every 1000th, so a missing isola-input is visible
        // without flooding the log.
        if n == 1 || n.is_multiple_of(1000) {
            log::warn!("input event dropped ({n} so far): {why}");
        }
    }

    /// Sends one event; on any failure the event is dropped and the link reset.
    pub fn send(&self, request: &InputRequest) {
        let Some(path) = &self.path else {
            self.drop_event("no --input socket configured");
            return;
        };
        let mut link = self.link.lock().unwrap_or_else(|e| e.into_inner());
        if link.stream.is_none() {
            if link.last_failure.is_some_and(|t| t.elapsed() < RETRY) {
                drop(link);
                self.drop_event("isola-input is not reachable");
                return;
            }
            match connect(path) {
                Ok(stream) => {
                    log::info!("connected to isola-input at {}", path.display());
                    link.stream = Some(stream);
                    link.last_failure = None;
                }
                Err(e) => {
                    link.last_failure = Some(Instant::now());
                    drop(link);
                    self.drop_event(&format!("cannot connect to {}: {e}", path.display()));
                    return;
                }
            }
        }
        let Some(stream) = link.stream.as_mut() else {
            return;
        };
        let result = isola_ipc::write_message(stream, request)
            .and_then(|()| isola_ipc::read_message::<_, InputResponse>(stream));
        match result {
            Ok(InputResponse::Done | InputResponse::Status(_)) => {
                self.sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok(InputResponse::Error(why)) => {
                drop(link);
                self.drop_event(&format!("isola-input refused it: {why}"));
            }
            Err(e) => {
                link.stream = None;
                link.last_failure = Some(Instant::now());
                drop(link);
                self.drop_event(&format!("isola-input link broke: {}", chain(&e)));
            }
        }
    }
}

fn connect(path: &PathBuf) -> std::io::Result<UnixStream> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    Ok(stream)
}
