//! What the API knows between requests: the event stream, fed by watching the core and the
//! supervisor (one status request to each per tick, compared with the previous answer) and by
//! the core's exit, and the figures that need memory (reconnect latency, the exit).
//!
//! Within a tick the core is asked before the supervisor: a reconnect the core reports
//! implies the daemon's restart happened before that answer, so the supervisor's later answer
//! shows it too, and `device_died`, `device_restarted`, `device_reconnected` come out in that
//! order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use isola_ipc::supervisor::{DaemonState, DaemonStatus, SupervisorRequest, SupervisorResponse};
use isola_ipc::{ControlRequest, ControlResponse, DeviceLink, VcpuState, VmStatus};
use tokio::sync::{broadcast, Notify};

use crate::backends::{self, Sockets};
use crate::model::{Event, Exit};

/// Events a slow `GET /events` reader may fall behind by before it is told it lost some.
const EVENT_BACKLOG: usize = 1024;

/// One serialized event, newline included; `last` after the VM ended.
pub struct EventLine {
    pub text: String,
    pub last: bool,
}

pub struct Watch {
    pub sockets: Sockets,
    pub events: broadcast::Sender<Arc<EventLine>>,
    /// Wakes the poller at once (after a request that changes state).
    pub poke: Notify,
    /// Set once the core has ended; streams end after sending it.
    pub ended: Notify,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    daemons: Vec<DaemonStatus>,
    core: Option<VmStatus>,
    /// Per device name: when its daemon's death (or the core's lost link) was first seen.
    died_at: HashMap<String, Instant>,
    last_reconnect: HashMap<String, f64>,
    exit: Option<Exit>,
    core_pid: Option<u32>,
    events_sent: HashMap<&'static str, u64>,
    requests: HashMap<u16, u64>,
}

impl Watch {
    pub fn new(sockets: Sockets) -> Arc<Watch> {
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        Arc::new(Watch {
            sockets,
            events,
            poke: Notify::new(),
            ended: Notify::new(),
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_core_pid(&self, pid: Option<u32>) {
        self.lock().core_pid = pid;
    }

    pub fn core_pid(&self) -> Option<u32> {
        self.lock().core_pid
    }

    pub fn exit(&self) -> Option<Exit> {
        self.lock().exit.clone()
    }

    pub fn last_reconnect(&self, device: &str) -> Option<f64> {
        self.lock().last_reconnect.get(device).copied()
    }

    pub fn events_sent(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<_> = self
            .lock()
            .events_sent
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        v.sort();
        v
    }

    pub fn count_request(&self, status: u16) {
        *self.lock().requests.entry(status).or_default() += 1;
    }

    pub fn requests(&self) -> Vec<(u16, u64)> {
        let mut v: Vec<_> = self.lock().requests.iter().map(|(k, v)| (*k, *v)).collect();
        v.sort();
        v
    }

    /// Sends one event to every `GET /events` reader.
    pub fn emit(&self, event: &'static str, device: Option<&str>, f: impl FnOnce(&mut Event)) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut e = Event {
            timestamp_ms: u64::try_from(now.as_millis()).unwrap_or(u64::MAX),
            time: rfc3339(now),
            event,
            device: device.map(str::to_owned),
            pid: None,
            reason: None,
            latency_seconds: None,
        };
        f(&mut e);
        log::info!("event: {event} {}", device.unwrap_or(""));
        *self.lock().events_sent.entry(event).or_default() += 1;
        if let Ok(mut line) = serde_json::to_string(&e) {
            line.push('\n');
            // No receiver is not an error: nobody is listening.
            let last = event == "vm_ended";
            let _ = self.events.send(Arc::new(EventLine { text: line, last }));
        }
    }

    /// The guest reset and the core is started again (`--on-reset restart`): a
    /// `guest_reset` event whose reason says so, and the VM goes on.
    pub fn core_restarting(&self, restarts: u64) {
        self.lock().core_pid = None;
        self.emit("guest_reset", None, |e| {
            e.reason = Some(format!("the VM restarts in place (restart {restarts})"))
        });
    }

    /// The core has ended: records how, and tells the readers.
    pub fn core_ended(&self, exit: Exit) {
        let event = match exit.reason.as_str() {
            "poweroff" => "guest_powered_off",
            "reset" => "guest_reset",
            "crash" => "guest_crashed",
            "shutdown" => "vm_shutdown",
            _ => "vm_ended",
        };
        let detail = exit.detail.clone();
        let status = exit.status;
        {
            let mut inner = self.lock();
            inner.exit = Some(exit);
            inner.core_pid = None;
        }
        self.emit(event, None, |e| {
            e.reason = Some(detail.unwrap_or_else(|| format!("exit status {status}")))
        });
        if event != "vm_ended" {
            self.emit("vm_ended", None, |e| {
                e.reason = Some(format!("exit status {status}"))
            });
        }
        self.ended.notify_waiters();
    }

    /// Watches the core and the supervisor every `interval` (or when poked) until the end.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        loop {
            if self.exit().is_some() {
                return;
            }
            self.tick().await;
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.poke.notified() => {}
            }
        }
    }

    async fn tick(&self) {
        let core = match backends::call::<_, ControlResponse>(
            "isola-core",
            &self.sockets.core,
            &ControlRequest::Status,
        )
        .await
        {
            Ok(ControlResponse::Status(status)) => Some(status),
            _ => None,
        };
        let daemons = match backends::call::<_, SupervisorResponse>(
            "isola-supervisor",
            &self.sockets.supervisor,
            &SupervisorRequest::Status,
        )
        .await
        {
            Ok(SupervisorResponse::Status(daemons)) => Some(daemons),
            _ => None,
        };
        if let Some(daemons) = daemons {
            let before = std::mem::take(&mut self.lock().daemons);
            for new in &daemons {
                if let Some(old) = before.iter().find(|d| d.name == new.name) {
                    self.daemon_changed(old, new);
                }
            }
            self.lock().daemons = daemons;
        }
        if let Some(core) = core {
            let before = self.lock().core.take();
            if let Some(old) = &before {
                self.core_changed(old, &core);
            }
            self.lock().core = Some(core);
        }
    }

    fn daemon_changed(&self, old: &DaemonStatus, new: &DaemonStatus) {
        let was_running = old.state == DaemonState::Running;
        let is_running = new.state == DaemonState::Running;
        let name = new.name.as_str();
        if was_running && (!is_running || new.pid != old.pid) {
            self.lock()
                .died_at
                .entry(name.to_owned())
                .or_insert_with(Instant::now);
            self.emit("device_died", Some(name), |e| {
                e.reason = new.last_exit.clone();
                e.pid = old.pid;
            });
        }
        if let DaemonState::Failed(why) = &new.state {
            if !matches!(old.state, DaemonState::Failed(_)) {
                self.emit("device_given_up", Some(name), |e| {
                    e.reason = Some(why.clone())
                });
            }
        }
        if is_running && (!was_running || new.pid != old.pid) {
            self.emit("device_restarted", Some(name), |e| e.pid = new.pid);
        }
    }

    fn core_changed(&self, old: &VmStatus, new: &VmStatus) {
        let names = self.device_names(new);
        for (i, dev) in new.devices.iter().enumerate() {
            let Some(prev) = old.devices.get(i) else {
                continue;
            };
            let name = names[i].as_str();
            if prev.link == DeviceLink::Connected && dev.link != DeviceLink::Connected {
                self.lock()
                    .died_at
                    .entry(name.to_owned())
                    .or_insert_with(Instant::now);
            }
            if dev.reconnects > prev.reconnects {
                let latency = self
                    .lock()
                    .died_at
                    .remove(name)
                    .map(|t| t.elapsed().as_secs_f64());
                if let Some(l) = latency {
                    self.lock().last_reconnect.insert(name.to_owned(), l);
                }
                self.emit("device_reconnected", Some(name), |e| {
                    e.latency_seconds = latency
                });
            }
            if dev.link != prev.link {
                match &dev.link {
                    DeviceLink::Refused(why) => self.emit("device_refused", Some(name), |e| {
                        e.reason = Some(why.clone())
                    }),
                    DeviceLink::Unresponsive(why) => {
                        self.emit("device_unresponsive", Some(name), |e| {
                            e.reason = Some(why.clone())
                        })
                    }
                    _ => {}
                }
            }
        }
        let paused = |s: &VmStatus| {
            let live: Vec<_> = s
                .vcpus
                .iter()
                .filter(|v| v.state != VcpuState::Exited)
                .collect();
            !live.is_empty() && live.iter().all(|v| v.state == VcpuState::Paused)
        };
        match (paused(old), paused(new)) {
            (false, true) => self.emit("vcpus_paused", None, |_| {}),
            (true, false) => self.emit("vcpus_resumed", None, |_| {}),
            _ => {}
        }
    }

    /// The API name of each of the core's devices, in its order (see [`device_names`]).
    pub fn device_names(&self, core: &VmStatus) -> Vec<String> {
        device_names(core, &self.lock().daemons)
    }
}

/// The API name of each of the core's devices, in its order
/// ([`isola_ipc::supervisor::join_devices`]).
pub fn device_names(core: &VmStatus, daemons: &[DaemonStatus]) -> Vec<String> {
    isola_ipc::supervisor::join_devices(&core.devices, daemons)
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

/// `2026-12-07T06:29:19.123Z`.
pub fn rfc3339(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(Duration::from_millis(951_827_696_789)),
            "2000-02-29T12:34:56.789Z"
        );
        assert_eq!(
            rfc3339(Duration::from_secs(1_796_621_359)),
            "2026-12-07T05:29:19.000Z"
        );
    }
}
