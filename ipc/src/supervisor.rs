//! Messages to `isola-supervisor`'s control socket (`isolactl status` merges its answer with
//! the core's, `isolactl restart NAME`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SupervisorRequest {
    /// Every supervised daemon.
    Status,
    /// Start a daemon again: a running instance is stopped (SIGTERM, then SIGKILL) and the
    /// next one started at once; one given up on gets a fresh retry budget.
    Restart { name: String },
    /// Restart with a new program (`binary`, an absolute path; `None`: the file at the
    /// daemon's program path, e.g. rebuilt in place), same arguments, same socket. The first
    /// instance of the new program dying at once puts the old one back.
    Upgrade {
        name: String,
        binary: Option<String>,
    },
    /// Stop every daemon (SIGTERM, then SIGKILL) and exit.
    Stop,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SupervisorResponse {
    Status(Vec<DaemonStatus>),
    Done,
    /// The request was refused; the text says why.
    Error(String),
}

/// One supervised device daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub name: String,
    /// The vhost-user socket the supervisor listens on for it.
    pub socket: String,
    /// Pid of the running instance.
    pub pid: Option<u32>,
    pub state: DaemonState,
    /// Times the daemon was started again after it died.
    pub restarts: u32,
    /// How the previous instance ended, e.g. "killed by SIGSEGV" or "exited with status 2:
    /// isola-net: ...", with the daemon's last error line after a colon.
    pub last_exit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DaemonState {
    Running,
    /// Dead; starts again after a back-off.
    Restarting,
    /// Given up on; the text says why.
    Failed(String),
}

impl std::fmt::Display for DaemonState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DaemonState::Running => f.write_str("running"),
            DaemonState::Restarting => f.write_str("restarting"),
            DaemonState::Failed(why) => write!(f, "failed ({why})"),
        }
    }
}

/// How the core's devices meet the supervisor's daemons: one rule for isola-api and isolactl.
/// For each of `devices`, in order: the name a user calls it by (the name of the daemon
/// listening on its socket, else its kind and its number among the devices of that kind:
/// `input0`, `input1`) and the index in `daemons` of the daemon that serves it (the one on
/// its socket or, for a daemon that binds its devices' sockets itself, such as isola-input
/// with the keyboard and the tablet, the socketless one named after their kind).
pub fn join_devices(
    devices: &[crate::DeviceStatus],
    daemons: &[DaemonStatus],
) -> Vec<(String, Option<usize>)> {
    let mut per_kind: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    devices
        .iter()
        .map(|d| {
            let n = per_kind.entry(d.name.as_str()).or_default();
            let own = format!("{}{}", d.name, n);
            *n += 1;
            let on_socket = daemons.iter().position(|s| s.socket == d.socket);
            let name = on_socket.map_or(own, |at| daemons[at].name.clone());
            let serving = on_socket.or_else(|| {
                daemons
                    .iter()
                    .position(|s| s.socket.is_empty() && s.name == d.name)
            });
            (name, serving)
        })
        .collect()
}

/// The sockets of the core's `devices` that the daemon named `name` serves (as
/// [`join_devices`] pairs them): what `isolactl restart` and `upgrade` announce to the core
/// as a planned handover ([`crate::ControlRequest::Handover`]) before asking the supervisor.
pub fn sockets_served_by(
    devices: &[crate::DeviceStatus],
    daemons: &[DaemonStatus],
    name: &str,
) -> Vec<String> {
    let Some(at) = daemons.iter().position(|d| d.name == name) else {
        return Vec::new();
    };
    join_devices(devices, daemons)
        .into_iter()
        .zip(devices)
        .filter(|((_, serving), _)| *serving == Some(at))
        .map(|(_, d)| d.socket.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeviceLink, DeviceStatus};

    fn device(kind: &str, socket: &str) -> DeviceStatus {
        DeviceStatus {
            name: kind.into(),
            slot: "00:01.0".into(),
            socket: socket.into(),
            link: DeviceLink::Connected,
            reconnects: 0,
            last_outage_us: None,
            display: None,
        }
    }

    fn daemon(name: &str, socket: &str) -> DaemonStatus {
        DaemonStatus {
            name: name.into(),
            socket: socket.into(),
            pid: Some(1),
            state: DaemonState::Running,
            restarts: 0,
            last_exit: None,
        }
    }

    #[test]
    fn devices_take_their_daemons_name_or_kind_and_number_and_find_the_daemon_serving_them() {
        let devices = [
            device("blk", "/r/blk-a.sock"),
            device("input", "/r/keyboard.sock"),
            device("input", "/r/tablet.sock"),
            device("blk", "/r/blk-b.sock"),
            device("gpu", "/r/gpu.sock"),
        ];
        let daemons = [
            daemon("display", "/r/display.sock"),
            daemon("disk", "/r/blk-a.sock"),
            daemon("input", ""),
        ];
        let joined = join_devices(&devices, &daemons);
        assert_eq!(
            joined,
            [
                ("disk".to_owned(), Some(1)),
                ("input0".to_owned(), Some(2)),
                ("input1".to_owned(), Some(2)),
                ("blk1".to_owned(), None),
                ("gpu0".to_owned(), None),
            ]
        );
        assert_eq!(
            sockets_served_by(&devices, &daemons, "input"),
            ["/r/keyboard.sock", "/r/tablet.sock"]
        );
        assert_eq!(
            sockets_served_by(&devices, &daemons, "disk"),
            ["/r/blk-a.sock"]
        );
        assert!(sockets_served_by(&devices, &daemons, "display").is_empty());
        assert!(sockets_served_by(&devices, &daemons, "nobody").is_empty());
    }
}
