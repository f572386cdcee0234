//! The JSON the API speaks: what `docs/api.yaml` describes, one Rust type per schema.
//!
//! Request bodies refuse unknown fields, so a typo is a 400 naming the field instead of a
//! silently ignored option.

use serde::{Deserialize, Serialize};

/// `GET /vm`.
#[derive(Debug, Clone, Serialize)]
pub struct Vm {
    /// `starting`, `running`, `paused` or `stopped`.
    pub state: &'static str,
    /// While starting: what the core waits for.
    pub waiting_for: Option<String>,
    pub uptime_ms: u64,
    /// The core's pid while it runs.
    pub pid: Option<u32>,
    pub vcpus: Vec<Vcpu>,
    /// How the VM ended, once it has.
    pub exit: Option<Exit>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Vcpu {
    pub index: u32,
    /// `running`, `paused` or `exited`.
    pub state: String,
}

/// How the core ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exit {
    /// `poweroff`, `reset`, `shutdown`, `debug-exit`, `crash`, `failed`, `killed` or
    /// `unknown`.
    pub reason: String,
    /// The core's one-line account of it, if it gave one.
    pub detail: Option<String>,
    /// The core's exit status, or 128 + the signal that killed it.
    pub status: i32,
}

/// One device: the core's side (link) and the supervisor's side (daemon), joined by socket.
#[derive(Debug, Clone, Serialize)]
pub struct Device {
    /// The supervisor's daemon name (`blk0`) or, for a device no supervised daemon listens
    /// for, its kind and number among the core's devices of that kind (`input1`).
    pub name: String,
    /// `blk`, `net`, `console`, `gpu`, `input`, `display`.
    pub kind: String,
    /// PCI slot in the guest, for a device the core has.
    pub slot: Option<String>,
    /// The vhost-user socket.
    pub socket: Option<String>,
    pub link: Link,
    /// Times the core reconnected to a restarted daemon.
    pub reconnects: u32,
    pub daemon: Option<Daemon>,
    /// A GPU's link to its display process.
    pub display_link: Option<DisplayLink>,
    /// Seconds from the daemon's death (as first seen) to the core's reconnect, the last time.
    pub last_reconnect_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Link {
    /// `connected`, `reconnecting`, `unresponsive`, `refused`, or `none` for a daemon the
    /// core has no device for (isola-display).
    pub state: &'static str,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Daemon {
    /// The supervisor's name for it (one daemon may serve several devices: `input`).
    pub name: String,
    pub pid: Option<u32>,
    /// `running`, `restarting` or `failed`.
    pub state: &'static str,
    /// Why the supervisor gave up on it.
    pub failed_reason: Option<String>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    /// Its processes (the sandbox's reaper and the device inside it), added up.
    pub counters: Option<ProcessCounters>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DisplayLink {
    pub socket: String,
    pub link: Link,
    pub reattaches: u32,
}

/// From `/proc/PID/{stat,status,io}` of a process and its descendants.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ProcessCounters {
    pub processes: u32,
    pub rss_bytes: u64,
    pub cpu_seconds: f64,
    /// Bytes through read- and write-like system calls (`rchar`, `wchar`).
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Read- and write-like system calls (`syscr`, `syscw`).
    pub read_calls: u64,
    pub write_calls: u64,
    /// Times it slept waiting for something (a kick, an interrupt, a completion).
    pub voluntary_switches: u64,
}

/// `POST /vm/shutdown` (the body is optional: no body is a graceful shutdown with the
/// default grace period).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    /// Stop at once, without pressing the power button.
    #[serde(default)]
    pub force: bool,
    /// The guest's grace period after the power button, in seconds.
    pub timeout_seconds: Option<f64>,
}

/// `POST /input/key`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    /// A key name, a code, or a chord (`ctrl+alt+delete`).
    pub keys: String,
    #[serde(default)]
    pub action: KeyAction,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyAction {
    /// Press in order, release in reverse.
    #[default]
    Tap,
    Press,
    Release,
}

/// `POST /input/type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypeRequest {
    pub text: String,
}

/// `POST /input/pointer`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointerRequest {
    pub x: u32,
    pub y: u32,
    #[serde(default)]
    pub buttons: Vec<Button>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Button {
    Left,
    Middle,
    Right,
}

/// `GET /display`.
#[derive(Debug, Clone, Serialize)]
pub struct Display {
    pub scanouts: Vec<Option<Size>>,
    pub gpu_connected: bool,
    pub vnc_clients: u32,
    pub updates: u64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

/// `GET /input`.
#[derive(Debug, Clone, Serialize)]
pub struct Input {
    pub keyboard_events: u64,
    pub tablet_events: u64,
    pub pending: u64,
}

/// Every error answer: one line.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    pub error: String,
}

/// One line of `GET /events`.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// `device_died`, `device_restarted`, `device_given_up`, `device_refused`,
    /// `device_unresponsive`, `device_reconnected`, `vcpus_paused`, `vcpus_resumed`,
    /// `guest_powered_off`, `guest_reset`, `guest_crashed`, `vm_shutdown`, `vm_ended`.
    pub event: &'static str,
    pub device: Option<String>,
    /// The daemon's new pid (`device_restarted`), if known.
    pub pid: Option<u32>,
    /// Why: an exit reason, a refusal, a crash.
    pub reason: Option<String>,
    /// `device_reconnected`: seconds since the death was first seen.
    pub latency_seconds: Option<f64>,
}
