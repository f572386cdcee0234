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
