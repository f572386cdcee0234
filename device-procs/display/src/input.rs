//! The link to `isola-input`'s control socket (`--input`): VNC key and pointer events go on
//! as [`InputRequest`]s. The link connects on first use and again after any failure (so a
//! restarted `isola-input` is picked up); while it is down, events are dropped and counted,
//! never queued.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use isola_device_common::logging::chain;
use isola_ipc::input::{InputRequest, InputResponse};

use crate::connector::InputPath;

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
    path: Option<InputPath>,
    link: Mutex<Link>,
    sent: AtomicU64,
    dropped: AtomicU64,
}

impl InputSink {
    /// `None`: no `--input`; every event is dropped (and counted).
    pub fn new(path: Option<InputPath>) -> InputSink {
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

    /// Sends one event; on any failure the event is dropped and the link reset. A link that
    /// worked before and now cannot even take the request is stale (isola-input was
    /// restarted): the event goes again, at once, on a fresh connection, so the first
    /// keystrokes after a restart are not lost. Only an unwritten request is sent again; one
    /// that was written but not answered may have been taken, and is not repeated.
    pub fn send(&self, request: &InputRequest) {
        let Some(path) = &self.path else {
            self.drop_event("no --input socket configured");
            return;
        };
        let mut link = self.link.lock().unwrap_or_else(|e| e.into_inner());
        let mut fresh = false;
        loop {
            let stream = match link.stream.as_mut() {
                Some(stream) => stream,
                None => {
                    if link.last_failure.is_some_and(|t| t.elapsed() < RETRY) {
                        drop(link);
                        self.drop_event("isola-input is not reachable");
                        return;
                    }
                    match path.connect() {
                        Ok(stream) => {
                            log::info!("connected to isola-input at {}", path.path().display());
                            fresh = true;
                            link.last_failure = None;
                            link.stream.insert(stream)
                        }
                        Err(e) => {
                            link.last_failure = Some(Instant::now());
                            drop(link);
                            self.drop_event(&format!(
                                "cannot connect to {}: {e}",
                                path.path().display()
                            ));
                            return;
                        }
                    }
                }
            };
            let failure = match exchange(stream, request) {
                Ok(InputResponse::Done | InputResponse::Status(_)) => {
                    self.sent.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(InputResponse::Error(why)) => {
                    drop(link);
                    self.drop_event(&format!("isola-input refused it: {why}"));
                    return;
                }
                Err(failure) => failure,
            };
            link.stream = None;
            match failure {
                Failure::Unsent(e) if !fresh => {
                    log::info!(
                        "the link to isola-input went stale ({}); connecting again",
                        chain(&e)
                    );
                    // `fresh` is set by the connect above: one new attempt, no more.
                    fresh = true;
                    link.last_failure = None;
                    if let Ok(stream) = path.connect() {
                        log::info!("connected to isola-input at {}", path.path().display());
                        link.stream = Some(stream);
                        continue;
                    }
                    link.last_failure = Some(Instant::now());
                    drop(link);
                    self.drop_event("isola-input is not reachable after its link broke");
                    return;
                }
                Failure::Unsent(e) | Failure::Unanswered(e) => {
                    link.last_failure = Some(Instant::now());
                    drop(link);
                    self.drop_event(&format!("isola-input link broke: {}", chain(&e)));
                    return;
                }
            }
        }
    }
}

/// How one request on the link failed.
enum Failure {
    /// Not (completely) written: isola-input did not take it.
    Unsent(isola_ipc::IpcError),
    /// Written, then no answer: isola-input may have taken it.
    Unanswered(isola_ipc::IpcError),
}

fn exchange(stream: &mut UnixStream, request: &InputRequest) -> Result<InputResponse, Failure> {
    isola_ipc::write_message(stream, request).map_err(Failure::Unsent)?;
    isola_ipc::read_message(stream).map_err(Failure::Unanswered)
}
