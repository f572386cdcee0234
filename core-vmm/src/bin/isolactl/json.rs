//! `isolactl --json`: every command's answer as one JSON document on stdout.
//!
//! Through the VM's API socket (`--api`, or `DIR/api.sock` of `--run-dir` when it is there and
//! no other socket is named) the answer is the API's own JSON (`docs/api.yaml`). Without it,
//! isolactl asks the core's, the supervisor's and the devices' sockets as it does for prose
//! and builds JSON of the API's shapes (`Vm`, `Device`, `Input`) from their answers, so a
//! script reads the same fields either way; what only the API knows (the core's pid, process
//! counters, reconnect latency) is `null`.

use std::path::Path;

use anyhow::{bail, Context};
use isola_ipc::input::InputResponse;
use isola_ipc::supervisor::{DaemonState, DaemonStatus, SupervisorRequest, SupervisorResponse};
use isola_ipc::{ControlRequest, ControlResponse, DeviceLink, VcpuState, VmStatus};
use serde_json::{json, Value};

use crate::http;
use crate::{Cli, Command};

/// The answer of a command that is not a stream (`events`, `logs` and `console` are).
pub fn run(cli: &Cli) -> anyhow::Result<Value> {
    match cli.api_socket() {
        Some(api) => through_api(cli, &api),
        None => direct(cli),
    }
}

fn get(api: &Path, path: &str) -> anyhow::Result<Value> {
    http::request(api, "GET", path, None)?.json(&format!("GET {path}"))
}

fn post(api: &Path, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    http::request(api, "POST", path, body.as_ref())?.json(&format!("POST {path}"))
}

fn through_api(cli: &Cli, api: &Path) -> anyhow::Result<Value> {
    Ok(match &cli.command {
        Command::Status => json!({ "vm": get(api, "/vm")?, "devices": get(api, "/devices")? }),
        Command::Pause => post(api, "/vm/pause", None)?,
        Command::Resume => post(api, "/vm/resume", None)?,
        Command::PowerButton => post(api, "/vm/power-button", None)?,
        Command::Shutdown { hard } => {
            let body = match hard {
                true => json!({ "force": true }),
                false => json!({ "timeout_seconds": cli.grace().as_secs_f64() }),
            };
            post(api, "/vm/shutdown", Some(body))?
        }
        Command::Restart { name } => {
            if !plausible_name(name) {
                bail!("'{name}' is not a device name");
            }
            post(api, &format!("/devices/{name}/restart"), None)?
        }
        Command::Key {
            keys,
            press,
            release,
        } => {
            let action = match (press, release) {
                (true, _) => "press",
                (_, true) => "release",
                _ => "tap",
            };
            let mut last = Value::Null;
            for k in keys {
                let body = json!({ "keys": k, "action": action });
                last = post(api, "/input/key", Some(body))?;
            }
            last
        }
        Command::Type { text } => post(
            api,
            "/input/type",
            Some(json!({ "text": text.replace("\\n", "\n") })),
        )?,
        Command::Pointer { x, y, buttons } => post(
            api,
            "/input/pointer",
            Some(json!({ "x": x, "y": y, "buttons": buttons })),
        )?,
        Command::InputStatus => get(api, "/input")?,
        Command::Screenshot { out, scanout } => {
            let path = format!("/display/screenshot?scanout={scanout}");
            let answer = http::request(api, "GET", &path, None)?;
            if answer.status >= 400 {
                answer.json(&format!("GET {path}"))?;
                bail!("GET {path}: HTTP error");
            }
            let (width, height) = png_size(&answer.body).context("the screenshot is no PNG")?;
            std::fs::write(out, &answer.body)
                .with_context(|| format!("cannot write {}", out.display()))?;
            screenshot(out, *scanout, width, height)
        }
        // No API route: the internal sockets, as without the API.
        _ => direct(cli)?,
    })
}

fn plausible_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    if png.len() < 24 || &png[..8] != b"\x89PNG\r\n\x1a\n" || &png[12..16] != b"IHDR" {
        return None;
    }
    let be = |at: usize| u32::from_be_bytes([png[at], png[at + 1], png[at + 2], png[at + 3]]);
    Some((be(16), be(20)))
}

fn screenshot(out: &Path, scanout: u32, width: u32, height: u32) -> Value {
    json!({ "file": out, "scanout": scanout, "width": width, "height": height })
}

fn direct(cli: &Cli) -> anyhow::Result<Value> {
    Ok(match &cli.command {
        Command::Status => {
            let daemons = daemons(cli)?;
            let status = core_status(cli)?;
            json!({ "vm": vm(&status), "devices": devices(&status, &daemons) })
        }
        Command::Shutdown { .. } => {
            let report = match crate::core_call(&cli.core_socket()?, &cli.shutdown_request())? {
                ControlResponse::Error(e) => bail!("{e}"),
                ControlResponse::ShutDown(report) => report,
                _ => isola_ipc::ShutdownReport {
                    graceful: false,
                    detail: "stopped at once on request".into(),
                },
            };
            // The API's Vm of an ended VM; what only the API knows is null.
            json!({
                "state": "stopped", "waiting_for": null, "uptime_ms": 0, "pid": null,
                "vcpus": [], "exit": {
                    "reason": "shutdown", "detail": crate::shutdown_line(&report), "status": 0
                }
            })
        }
        Command::Pause | Command::Resume | Command::PowerButton | Command::InjectMsi { .. } => {
            let request = match &cli.command {
                Command::Pause => ControlRequest::Pause,
                Command::Resume => ControlRequest::Resume,
                Command::PowerButton => ControlRequest::PowerButton,
                Command::InjectMsi { address, data } => ControlRequest::InjectMsi {
                    address: *address,
                    data: u32::try_from(*data).context("--data must fit in 32 bits")?,
                },
                _ => unreachable!("matched above"),
            };
            let socket = cli.core_socket()?;
            if let ControlResponse::Error(e) = crate::core_call(&socket, &request)? {
                bail!("{e}");
            }
            match crate::core_call(&socket, &ControlRequest::Status) {
                Ok(ControlResponse::Status(status)) => vm(&status),
                Ok(other) => bail!("the core answered a status request with {other:?}"),
                Err(e) => return Err(e),
            }
        }
        Command::Restart { name } | Command::Upgrade { name, .. } => {
            crate::run_supervisor_command(cli)?;
            let daemons = daemons(cli)?;
            let status = match cli.core_socket() {
                Ok(socket) => match crate::core_call(&socket, &ControlRequest::Status)? {
                    ControlResponse::Status(status) => status,
                    other => bail!("the core answered a status request with {other:?}"),
                },
                // Only --supervisor: the daemons alone.
                Err(_) => VmStatus {
                    uptime_ms: 0,
                    vcpus: Vec::new(),
                    devices: Vec::new(),
                },
            };
            devices(&status, &daemons)
                .into_iter()
                .find(|d| d["name"] == **name || d["daemon"]["name"] == **name)
                .with_context(|| format!("no device named '{name}' after the restart"))?
        }
        Command::Screenshot { out, scanout } => {
            let (width, height) = crate::screenshot(&cli.display_socket()?, out, *scanout)?;
            screenshot(out, *scanout, width, height)
        }
        Command::Key { .. } | Command::Type { .. } | Command::Pointer { .. } => {
            let socket = cli.input_socket()?;
            let requests = crate::input_requests(&cli.command)?;
            crate::run_input(&socket, requests)?;
            input_status(&socket)?
        }
        Command::InputStatus => input_status(&cli.input_socket()?)?,
        Command::Notify { assignments } => {
            crate::notify::send(assignments)?;
            json!({ "sent": assignments })
        }
        Command::Events | Command::Logs { .. } | Command::Console { .. } => {
            bail!("not a one-answer command")
        }
    })
}

fn input_status(socket: &Path) -> anyhow::Result<Value> {
    match crate::call(
        socket,
        "isola-input",
        &isola_ipc::input::InputRequest::Status,
    )? {
        InputResponse::Status(s) => Ok(json!({
            "keyboard_events": s.keyboard_events,
            "tablet_events": s.tablet_events,
            "pending": s.pending,
        })),
        InputResponse::Error(e) => bail!("{e}"),
        InputResponse::Done => bail!("isola-input answered a status request with 'done'"),
    }
}

fn core_status(cli: &Cli) -> anyhow::Result<VmStatus> {
    match crate::core_call(&cli.core_socket()?, &ControlRequest::Status)? {
        ControlResponse::Status(status) => Ok(status),
        ControlResponse::Error(e) => bail!("{e}"),
        other => bail!("the core answered a status request with {other:?}"),
    }
}

/// The supervisor's daemons; none for a VM without one (no socket in the run directory).
fn daemons(cli: &Cli) -> anyhow::Result<Vec<DaemonStatus>> {
    let socket = match (&cli.supervisor, &cli.run_dir) {
        (None, None) => None,
        _ => cli.socket_for(&cli.supervisor, "supervisor.sock", "--supervisor")?,
    };
    let Some(socket) = socket else {
        return Ok(Vec::new());
    };
    match crate::supervisor_call(&socket, &SupervisorRequest::Status)? {
        SupervisorResponse::Status(daemons) => Ok(daemons),
        SupervisorResponse::Error(e) => bail!("supervisor: {e}"),
        SupervisorResponse::Done => bail!("the supervisor answered 'done' to status"),
    }
}

/// The API's `Vm` from the core's status.
fn vm(s: &VmStatus) -> Value {
    let mut live = s
        .vcpus
        .iter()
        .filter(|v| v.state != VcpuState::Exited)
        .peekable();
    let paused = live.peek().is_some() && live.all(|v| v.state == VcpuState::Paused);
    let vcpus: Vec<Value> = s
        .vcpus
        .iter()
        .map(|v| json!({ "index": v.index, "state": v.state.to_string() }))
        .collect();
    json!({
        "state": if paused { "paused" } else { "running" },
        "waiting_for": null,
        "uptime_ms": s.uptime_ms,
        "pid": null,
        "vcpus": vcpus,
        "exit": null,
    })
}

/// The API's `Link`.
fn link(l: &DeviceLink) -> Value {
    let (state, reason) = match l {
        DeviceLink::Connected => ("connected", None),
        DeviceLink::Reconnecting => ("reconnecting", None),
        DeviceLink::Unresponsive(why) => ("unresponsive", Some(why)),
        DeviceLink::Refused(why) => ("refused", Some(why)),
    };
    json!({ "state": state, "reason": reason })
}

/// The API's `Daemon`.
fn daemon(d: &DaemonStatus) -> Value {
    let (state, failed_reason) = match &d.state {
        DaemonState::Running => ("running", None),
        DaemonState::Restarting => ("restarting", None),
        DaemonState::Failed(why) => ("failed", Some(why)),
    };
    json!({
        "name": d.name,
        "pid": d.pid,
        "state": state,
        "failed_reason": failed_reason,
        "restarts": d.restarts,
        "last_exit": d.last_exit,
        "counters": null,
    })
}

/// The API's `Device` list: the core's devices joined with the supervisor's daemons by
/// socket (named as isola-api names them), then the daemons no device of the core uses.
fn devices(core: &VmStatus, daemons: &[DaemonStatus]) -> Vec<Value> {
    let mut used = vec![false; daemons.len()];
    let mut out = Vec::new();
    let joined = isola_ipc::supervisor::join_devices(&core.devices, daemons);
    for (d, (name, at)) in core.devices.iter().zip(joined) {
        if let Some(at) = at {
            used[at] = true;
        }
        let display_link = d.display.as_ref().map(
            |x| json!({ "socket": x.socket, "link": link(&x.link), "reattaches": x.reattaches }),
        );
        out.push(json!({
            "name": name,
            "kind": d.name,
            "slot": d.slot,
            "socket": d.socket,
            "link": link(&d.link),
            "reconnects": d.reconnects,
            "daemon": at.map(|at| daemon(&daemons[at])),
            "display_link": display_link,
            "last_reconnect_seconds": null,
        }));
    }
    for (d, _) in daemons.iter().zip(&used).filter(|(_, used)| !**used) {
        out.push(json!({
            "name": d.name,
            "kind": d.name.trim_end_matches(|c: char| c.is_ascii_digit()),
            "slot": null,
            "socket": (!d.socket.is_empty()).then(|| d.socket.clone()),
            "link": { "state": "none", "reason": null },
            "reconnects": 0,
            "daemon": daemon(d),
            "display_link": null,
            "last_reconnect_seconds": null,
        }));
    }
    out
}
