//! `GET /vm` and `GET /devices`: the core's answer and the supervisor's, asked afresh for each
//! request and joined by socket path.

use std::sync::Arc;

use isola_ipc::supervisor::{DaemonState, DaemonStatus, SupervisorRequest, SupervisorResponse};
use isola_ipc::{ControlRequest, ControlResponse, DeviceLink, VcpuState, VmStatus};

use crate::backends::{self, BackendError};
use crate::model::{Daemon, Device, DisplayLink, Link, Vcpu, Vm};
use crate::procfs;
use crate::watch::Watch;

/// Why the core gave no status.
pub enum NoStatus {
    /// It is starting (it says what it waits for), or its socket is not there yet.
    Starting(String),
    /// It did not answer properly.
    Failed(BackendError),
}

/// The core's status.
pub async fn core_status(watch: &Watch) -> Result<VmStatus, NoStatus> {
    match backends::call::<_, ControlResponse>(
        "isola-core",
        &watch.sockets.core,
        &ControlRequest::Status,
    )
    .await
    {
        Ok(ControlResponse::Status(status)) => Ok(status),
        Ok(ControlResponse::Error(e)) => Err(NoStatus::Starting(
            e.strip_prefix("the VM is starting: ")
                .unwrap_or(&e)
                .to_owned(),
        )),
        Ok(ControlResponse::Done | ControlResponse::ShutDown(_)) => {
            Err(NoStatus::Failed(BackendError::Unexpected {
                who: "isola-core",
                what: "something else than a status",
            }))
        }
        Err(e) if e.is_absent() => Err(NoStatus::Starting(format!(
            "its control socket {}",
            watch.sockets.core.display()
        ))),
        Err(e) => Err(NoStatus::Failed(e)),
    }
}

/// The supervisor's daemons and its pid; none if this VM has no supervisor.
pub async fn supervisor(watch: &Watch) -> Result<(Vec<DaemonStatus>, Option<u32>), BackendError> {
    match backends::call_with_pid::<_, SupervisorResponse>(
        "isola-supervisor",
        &watch.sockets.supervisor,
        &SupervisorRequest::Status,
    )
    .await
    {
        Ok((SupervisorResponse::Status(daemons), pid)) => Ok((daemons, pid)),
        Ok(_) => Err(BackendError::Unexpected {
            who: "isola-supervisor",
            what: "something else to status",
        }),
        Err(e) if e.is_absent() => Ok((Vec::new(), None)),
        Err(e) => Err(e),
    }
}

pub async fn vm(watch: &Arc<Watch>) -> Result<Vm, BackendError> {
    if let Some(exit) = watch.exit() {
        return Ok(stopped(exit));
    }
    let pid = watch.core_pid();
    let status = core_status(watch).await;
    // The core may have ended while it was asked.
    if let Some(exit) = watch.exit() {
        return Ok(stopped(exit));
    }
    Ok(match status {
        Ok(s) => Vm {
            state: if all_paused(&s) { "paused" } else { "running" },
            waiting_for: None,
            uptime_ms: s.uptime_ms,
            pid,
            vcpus: s
                .vcpus
                .iter()
                .map(|v| Vcpu {
                    index: v.index,
                    state: v.state.to_string(),
                })
                .collect(),
            exit: None,
        },
        Err(NoStatus::Starting(what)) => Vm {
            state: "starting",
            waiting_for: Some(what),
            uptime_ms: 0,
            pid,
            vcpus: Vec::new(),
            exit: None,
        },
        Err(NoStatus::Failed(e)) => return Err(e),
    })
}

fn stopped(exit: crate::model::Exit) -> Vm {
    Vm {
        state: "stopped",
        waiting_for: None,
        uptime_ms: 0,
        pid: None,
        vcpus: Vec::new(),
        exit: Some(exit),
    }
}

pub fn all_paused(s: &VmStatus) -> bool {
    let mut live = s
        .vcpus
        .iter()
        .filter(|v| v.state != VcpuState::Exited)
        .peekable();
    live.peek().is_some() && live.all(|v| v.state == VcpuState::Paused)
}

fn link(l: &DeviceLink) -> Link {
    match l {
        DeviceLink::Connected => Link {
            state: "connected",
            reason: None,
        },
        DeviceLink::Reconnecting => Link {
            state: "reconnecting",
            reason: None,
        },
        DeviceLink::Unresponsive(why) => Link {
            state: "unresponsive",
            reason: Some(why.clone()),
        },
        DeviceLink::Refused(why) => Link {
            state: "refused",
            reason: Some(why.clone()),
        },
    }
}

fn daemon(d: &DaemonStatus) -> Daemon {
    let (state, failed_reason) = match &d.state {
        DaemonState::Running => ("running", None),
        DaemonState::Restarting => ("restarting", None),
        DaemonState::Failed(why) => ("failed", Some(why.clone())),
    };
    Daemon {
        name: d.name.clone(),
        pid: d.pid,
        state,
        failed_reason,
        restarts: d.restarts,
        last_exit: d.last_exit.clone(),
        counters: d.pid.and_then(procfs::tree_counters),
    }
}

/// The kind of a daemon from its name (`blk0` -> `blk`).
fn kind_of(name: &str) -> String {
    name.trim_end_matches(|c: char| c.is_ascii_digit())
        .to_owned()
}

pub async fn devices(watch: &Arc<Watch>) -> Result<Vec<Device>, BackendError> {
    let (core, supervisor) = tokio::join!(core_status(watch), supervisor(watch));
    let daemons = supervisor?.0;
    let core = match core {
        Err(NoStatus::Failed(e)) if watch.exit().is_none() => return Err(e),
        other => other,
    };
    let mut out = Vec::new();
    let mut used = vec![false; daemons.len()];
    if let Ok(core) = &core {
        let joined = isola_ipc::supervisor::join_devices(&core.devices, &daemons);
        for (d, (name, at)) in core.devices.iter().zip(joined) {
            if let Some(at) = at {
                used[at] = true;
            }
            let last_reconnect_seconds = watch.last_reconnect(&name);
            out.push(Device {
                name,
                kind: d.name.clone(),
                slot: Some(d.slot.clone()),
                socket: Some(d.socket.clone()),
                link: link(&d.link),
                reconnects: d.reconnects,
                daemon: at.map(|at| daemon(&daemons[at])),
                display_link: d.display.as_ref().map(|x| DisplayLink {
                    socket: x.socket.clone(),
                    link: link(&x.link),
                    reattaches: x.reattaches,
                }),
                last_reconnect_seconds,
            });
        }
    }
    // Daemons the core has no device for (isola-display, isola-input's own sockets).
    for (d, _) in daemons.iter().zip(&used).filter(|(_, used)| !**used) {
        out.push(Device {
            name: d.name.clone(),
            kind: kind_of(&d.name),
            slot: None,
            socket: (!d.socket.is_empty()).then(|| d.socket.clone()),
            link: Link {
                state: "none",
                reason: None,
            },
            reconnects: 0,
            daemon: Some(daemon(d)),
            display_link: None,
            last_reconnect_seconds: watch.last_reconnect(&d.name),
        });
    }
    Ok(out)
}
