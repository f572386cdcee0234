//! What each API path does: validate the request, ask the internal socket that knows, answer
//! in JSON. `docs/api.yaml` describes every route here; the tests hold this file to it.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW};
use hyper::{Method, Request, Response, StatusCode};
use isola_ipc::display::{DisplayRequest, DisplayResponse};
use isola_ipc::input::{InputRequest, InputResponse, BUTTON_LEFT, BUTTON_MIDDLE, BUTTON_RIGHT};
use isola_ipc::supervisor::{SupervisorRequest, SupervisorResponse};
use isola_ipc::{ControlRequest, ControlResponse};
use serde::de::DeserializeOwned;

use crate::backends::{self, BackendError};
use crate::http::{self, error, json, ApiBody};
use crate::model::{
    Button, Display, Input, KeyAction, KeyRequest, PointerRequest, ShutdownRequest, Size,
    TypeRequest,
};
use crate::watch::Watch;
use crate::{metrics, status};

/// The OpenAPI document, served at `GET /openapi.yaml`.
const OPENAPI: &str = include_str!("../../docs/api.yaml");

type Answer = Response<ApiBody>;

/// The routes: path pattern (`{}` is one segment) and the methods it takes.
const ROUTES: &[(&str, &[Method])] = &[
    ("/vm", &[Method::GET]),
    ("/vm/config", &[Method::GET]),
    ("/vm/config.toml", &[Method::GET]),
    ("/vm/pause", &[Method::POST]),
    ("/vm/resume", &[Method::POST]),
    ("/vm/shutdown", &[Method::POST]),
    ("/vm/power-button", &[Method::POST]),
    ("/devices", &[Method::GET]),
    ("/devices/{}", &[Method::GET]),
    ("/devices/{}/restart", &[Method::POST]),
    ("/display", &[Method::GET]),
    ("/display/screenshot", &[Method::GET]),
    ("/input", &[Method::GET]),
    ("/input/key", &[Method::POST]),
    ("/input/type", &[Method::POST]),
    ("/input/pointer", &[Method::POST]),
    ("/events", &[Method::GET]),
    ("/metrics", &[Method::GET]),
    ("/openapi.yaml", &[Method::GET]),
];

/// The route `path` matches and the `{}` segment, if any.
fn route(path: &str) -> Option<(&'static str, &'static [Method], Option<&str>)> {
    let segments: Vec<&str> = path.split('/').collect();
    ROUTES.iter().find_map(|(pattern, methods)| {
        let parts: Vec<&str> = pattern.split('/').collect();
        if parts.len() != segments.len() {
            return None;
        }
        let mut param = None;
        for (p, s) in parts.iter().zip(&segments) {
            if *p == "{}" {
                if s.is_empty() {
                    return None;
                }
                param = Some(*s);
            } else if p != s {
                return None;
            }
        }
        Some((*pattern, *methods, param))
    })
}

pub async fn handle(watch: &Arc<Watch>, request: Request<Incoming>) -> Answer {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let Some((pattern, methods, param)) = route(&path) else {
        return error(StatusCode::NOT_FOUND, format!("no such path: {path}"));
    };
    let method = request.method().clone();
    if !methods.contains(&method) {
        let allow: Vec<&str> = methods.iter().map(Method::as_str).collect();
        let mut answer = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} takes {}, not {method}", allow.join(", ")),
        );
        if let Ok(value) = HeaderValue::from_str(&allow.join(", ")) {
            answer.headers_mut().insert(ALLOW, value);
        }
        return answer;
    }
    if pattern != "/display/screenshot" && !query.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{path} takes no query parameters"),
        );
    }
    let body = match http::read_body(request.into_body()).await {
        Ok(body) => body,
        Err(answer) => return answer,
    };
    let takes_body = matches!(
        pattern,
        "/input/key" | "/input/type" | "/input/pointer" | "/vm/shutdown"
    );
    if !takes_body && !body.is_empty() {
        return error(StatusCode::BAD_REQUEST, format!("{path} takes no body"));
    }
    let param = param.map(str::to_owned);
    match pattern {
        "/vm" => vm_answer(watch).await,
        "/vm/config" => vm_config(watch, false),
        "/vm/config.toml" => vm_config(watch, true),
        "/vm/pause" => core_action(watch, ControlRequest::Pause).await,
        "/vm/resume" => core_action(watch, ControlRequest::Resume).await,
        "/vm/shutdown" => match shutdown_request(&body) {
            Ok(ControlRequest::Shutdown) => core_action(watch, ControlRequest::Shutdown).await,
            Ok(graceful) => graceful_shutdown(watch, graceful).await,
            Err(answer) => answer,
        },
        "/vm/power-button" => core_action(watch, ControlRequest::PowerButton).await,
        "/devices" => match status::devices(watch).await {
            Ok(devices) => json(StatusCode::OK, &devices),
            Err(e) => backend_error(&e),
        },
        "/devices/{}" => device_answer(watch, &param.unwrap_or_default()).await,
        "/devices/{}/restart" => restart(watch, &param.unwrap_or_default()).await,
        "/display" => display_status(watch).await,
        "/display/screenshot" => screenshot(watch, &query).await,
        "/input" => input_status(watch).await,
        "/input/key" => match parse::<KeyRequest>(&body) {
            Ok(r) => {
                let (press, release) =
                    (r.action == KeyAction::Press, r.action == KeyAction::Release);
                match isola_ipc::keys::chord_events(&r.keys, press, release) {
                    Ok(events) => send_keys(watch, events).await,
                    Err(e) => error(StatusCode::BAD_REQUEST, e),
                }
            }
            Err(answer) => answer,
        },
        "/input/type" => match parse::<TypeRequest>(&body) {
            Ok(r) => match isola_ipc::keys::text_events(&r.text) {
                Ok(events) => send_keys(watch, events).await,
                Err(e) => error(StatusCode::BAD_REQUEST, e),
            },
            Err(answer) => answer,
        },
        "/input/pointer" => match parse::<PointerRequest>(&body) {
            Ok(r) => pointer(watch, r).await,
            Err(answer) => answer,
        },
        "/events" => http::event_stream(watch),
        "/metrics" => match metrics::render(watch).await {
            Ok(text) => http::full(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                text,
            ),
            Err(e) => backend_error(&e),
        },
        "/openapi.yaml" => http::full(StatusCode::OK, "application/yaml", OPENAPI),
        _ => error(StatusCode::NOT_FOUND, format!("no such path: {path}")),
    }
}

/// A JSON body of type `T`; anything else is a 400 that says what is wrong and where.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Answer> {
    if body.is_empty() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "a JSON body is required".into(),
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")))
}

/// The grace period of `POST /vm/shutdown` without `timeout_seconds`.
const DEFAULT_GRACE_SECONDS: f64 = 30.0;
/// How much longer than the grace period the core may take to answer a graceful shutdown.
const SHUTDOWN_MARGIN: std::time::Duration = std::time::Duration::from_secs(10);
/// How long after the core's answer its end may take to be recorded.
const END_RECORDED_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// The core's request for a `POST /vm/shutdown` body (none: graceful, default grace).
fn shutdown_request(body: &[u8]) -> Result<ControlRequest, Answer> {
    let r = match body.is_empty() {
        true => ShutdownRequest::default(),
        false => parse::<ShutdownRequest>(body)?,
    };
    let max = isola_ipc::MAX_GRACE_MS as f64 / 1000.0;
    match (r.force, r.timeout_seconds) {
        (true, Some(_)) => Err(error(
            StatusCode::BAD_REQUEST,
            "force and timeout_seconds exclude each other".into(),
        )),
        (true, None) => Ok(ControlRequest::Shutdown),
        (false, Some(t)) if !(t.is_finite() && t > 0.0 && t <= max) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("timeout_seconds must be more than 0 and at most {max}"),
        )),
        (false, t) => Ok(ControlRequest::GracefulShutdown {
            timeout_ms: (t.unwrap_or(DEFAULT_GRACE_SECONDS) * 1000.0) as u64,
        }),
    }
}

/// Presses the power button through the core, which answers when the VM has ended (the
/// guest powered off, or the grace period ran out and the core stopped it); answers the
/// stopped `Vm`, whose `exit.detail` says which.
async fn graceful_shutdown(watch: &Arc<Watch>, request: ControlRequest) -> Answer {
    if watch.exit().is_some() {
        return error(StatusCode::CONFLICT, "the VM has ended".into());
    }
    let ControlRequest::GracefulShutdown { timeout_ms } = request else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "not a graceful shutdown".into(),
        );
    };
    let limit = std::time::Duration::from_millis(timeout_ms) + SHUTDOWN_MARGIN;
    let answer = backends::call_long::<_, ControlResponse>(
        "isola-core",
        &watch.sockets.core,
        &request,
        limit,
    )
    .await;
    match answer {
        Ok(ControlResponse::ShutDown(_)) => {
            until_end_recorded(watch).await;
            vm_answer(watch).await
        }
        Ok(ControlResponse::Error(e)) => error(StatusCode::CONFLICT, e),
        Ok(_) => error(
            StatusCode::BAD_GATEWAY,
            "isola-core answered a graceful shutdown with something else".into(),
        ),
        Err(e) if e.is_absent() => error(
            StatusCode::CONFLICT,
            format!("the core is not serving: {e}"),
        ),
        Err(e) => backend_error(&e),
    }
}

/// Waits (up to [`END_RECORDED_WITHIN`]) until the core's end is recorded. A core that has
/// answered a shutdown is exiting: asking it for its status then races with its exit, and a
/// request it never reads comes back as a reset connection.
async fn until_end_recorded(watch: &Arc<Watch>) {
    let ended = watch.ended.notified();
    tokio::pin!(ended);
    ended.as_mut().enable();
    watch.poke.notify_one();
    if watch.exit().is_none() {
        let _ = tokio::time::timeout(END_RECORDED_WITHIN, ended).await;
    }
}

/// The HTTP status for a failed internal call.
pub fn backend_error(e: &BackendError) -> Answer {
    let status = match e {
        BackendError::Absent { .. } => StatusCode::NOT_FOUND,
        BackendError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        BackendError::Io { .. } | BackendError::Ipc { .. } | BackendError::Unexpected { .. } => {
            StatusCode::BAD_GATEWAY
        }
    };
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    error(status, text)
}

async fn vm_answer(watch: &Arc<Watch>) -> Answer {
    match status::vm(watch).await {
        Ok(vm) => json(StatusCode::OK, &vm),
        Err(e) => backend_error(&e),
    }
}

/// The VM file `isola-run` wrote (`DIR/vm.toml`, defaults made explicit): as JSON in the VM
/// file's schema, or as the TOML text itself, which `isola-run --config` starts again.
fn vm_config(watch: &Arc<Watch>, as_toml: bool) -> Answer {
    let path = &watch.sockets.vm_file;
    let text = match read_vm_file(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return error(
                StatusCode::NOT_FOUND,
                format!(
                    "no VM file at {}: this VM was not started by isola-run",
                    path.display()
                ),
            )
        }
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read {}: {e}", path.display()),
            )
        }
    };
    match isola_vmconfig::file::parse(&text) {
        Ok(_) if as_toml => http::full(StatusCode::OK, "application/toml", text),
        Ok(config) => json(StatusCode::OK, &config),
        Err((line, key, why)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{}:{line}: {key}: {why}", path.display()),
        ),
    }
}

/// The VM file's text, refused past the VM file's own size bound.
fn read_vm_file(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    file.take(isola_vmconfig::file::MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > isola_vmconfig::file::MAX_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {} bytes", isola_vmconfig::file::MAX_FILE_BYTES),
        ));
    }
    Ok(text)
}

async fn device_answer(watch: &Arc<Watch>, name: &str) -> Answer {
    match status::devices(watch).await {
        Ok(devices) => match devices.into_iter().find(|d| d.name == name) {
            Some(device) => json(StatusCode::OK, &device),
            None => error(StatusCode::NOT_FOUND, format!("no device named '{name}'")),
        },
        Err(e) => backend_error(&e),
    }
}

async fn core_action(watch: &Arc<Watch>, request: ControlRequest) -> Answer {
    if watch.exit().is_some() {
        return error(StatusCode::CONFLICT, "the VM has ended".into());
    }
    let answer =
        backends::call::<_, ControlResponse>("isola-core", &watch.sockets.core, &request).await;
    watch.poke.notify_one();
    match answer {
        Ok(ControlResponse::Done) if matches!(request, ControlRequest::Shutdown) => {
            until_end_recorded(watch).await;
            vm_answer(watch).await
        }
        Ok(ControlResponse::Done) => vm_answer(watch).await,
        Ok(ControlResponse::Error(e)) => error(StatusCode::CONFLICT, e),
        Ok(ControlResponse::Status(_) | ControlResponse::ShutDown(_)) => error(
            StatusCode::BAD_GATEWAY,
            "isola-core answered with something else".into(),
        ),
        Err(e) if e.is_absent() => error(
            StatusCode::CONFLICT,
            format!("the core is not serving: {e}"),
        ),
        Err(e) => backend_error(&e),
    }
}

async fn restart(watch: &Arc<Watch>, name: &str) -> Answer {
    // A device is restarted through the daemon that serves it (`input0` -> `input`); a name
    // that is no device's goes to the supervisor as it is.
    let devices = status::devices(watch).await.unwrap_or_default();
    let daemon = devices
        .iter()
        .find(|d| d.name == name)
        .and_then(|d| d.daemon.as_ref())
        .map_or(name, |d| d.name.as_str())
        .to_owned();
    // A planned handover, told to the core first: it reconnects at once to the new instance
    // even right after the last restart (no flap back-off). Best effort, as in isolactl.
    let sockets = devices
        .iter()
        .filter(|d| d.slot.is_some() && d.daemon.as_ref().is_some_and(|x| x.name == daemon));
    for socket in sockets.filter_map(|d| d.socket.clone()) {
        let request = ControlRequest::Handover { socket };
        let _ =
            backends::call::<_, ControlResponse>("isola-core", &watch.sockets.core, &request).await;
    }
    let request = SupervisorRequest::Restart { name: daemon };
    let answer = backends::call::<_, SupervisorResponse>(
        "isola-supervisor",
        &watch.sockets.supervisor,
        &request,
    )
    .await;
    watch.poke.notify_one();
    match answer {
        Ok(SupervisorResponse::Done) => device_answer(watch, name).await,
        Ok(SupervisorResponse::Error(e)) if e.starts_with("no daemon named") => {
            error(StatusCode::NOT_FOUND, e)
        }
        Ok(SupervisorResponse::Error(e)) => error(StatusCode::CONFLICT, e),
        Ok(SupervisorResponse::Status(_)) => error(
            StatusCode::BAD_GATEWAY,
            "isola-supervisor answered with a status".into(),
        ),
        Err(e) if e.is_absent() => error(
            StatusCode::NOT_FOUND,
            format!("no device named '{name}': this VM has no device daemons"),
        ),
        Err(e) => backend_error(&e),
    }
}

async fn display_status(watch: &Arc<Watch>) -> Answer {
    match backends::call::<_, DisplayResponse>(
        "isola-display",
        &watch.sockets.display,
        &DisplayRequest::Status,
    )
    .await
    {
        Ok(DisplayResponse::Status(s)) => json(
            StatusCode::OK,
            &Display {
                scanouts: s
                    .scanouts
                    .iter()
                    .map(|o| o.map(|(width, height)| Size { width, height }))
                    .collect(),
                gpu_connected: s.gpu_connected,
                vnc_clients: s.vnc_clients,
                updates: s.updates,
            },
        ),
        Ok(DisplayResponse::Error(e)) => error(StatusCode::CONFLICT, e),
        Ok(_) => error(
            StatusCode::BAD_GATEWAY,
            "isola-display answered with something else".into(),
        ),
        Err(e) => no_such_device(&e, "display"),
    }
}

fn no_such_device(e: &BackendError, what: &str) -> Answer {
    if e.is_absent() {
        error(
            StatusCode::NOT_FOUND,
            format!("this VM has no {what} ({e})"),
        )
    } else {
        backend_error(e)
    }
}

async fn screenshot(watch: &Arc<Watch>, query: &str) -> Answer {
    let mut scanout = 0u32;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("scanout", v)) => match v.parse() {
                Ok(n) if n < 16 => scanout = n,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("scanout '{v}': expected a number from 0 to 15"),
                    )
                }
            },
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("unknown query parameter '{pair}' (only scanout=N)"),
                )
            }
        }
    }
    match backends::call::<_, DisplayResponse>(
        "isola-display",
        &watch.sockets.display,
        &DisplayRequest::Screenshot { scanout },
    )
    .await
    {
        Ok(DisplayResponse::Screenshot { png, .. }) => http::full(StatusCode::OK, "image/png", png),
        Ok(DisplayResponse::Error(e)) => error(StatusCode::CONFLICT, e),
        Ok(_) => error(
            StatusCode::BAD_GATEWAY,
            "isola-display answered with something else".into(),
        ),
        Err(e) => no_such_device(&e, "display"),
    }
}

async fn input_status(watch: &Arc<Watch>) -> Answer {
    match input_call(watch, InputRequest::Status).await {
        Ok(InputResponse::Status(s)) => json(
            StatusCode::OK,
            &Input {
                keyboard_events: s.keyboard_events,
                tablet_events: s.tablet_events,
                pending: s.pending,
            },
        ),
        Ok(InputResponse::Error(e)) => error(StatusCode::CONFLICT, e),
        Ok(InputResponse::Done) => error(
            StatusCode::BAD_GATEWAY,
            "isola-input answered 'done' to status".into(),
        ),
        Err(e) => no_such_device(&e, "input device"),
    }
}

async fn input_call(
    watch: &Arc<Watch>,
    request: InputRequest,
) -> Result<InputResponse, BackendError> {
    backends::call("isola-input", &watch.sockets.input, &request).await
}

/// Sends key events one by one; stops at the first refusal.
async fn send_keys(watch: &Arc<Watch>, events: Vec<(u16, bool)>) -> Answer {
    for (code, pressed) in events {
        if let Some(answer) =
            input_done(input_call(watch, InputRequest::Key { code, pressed }).await)
        {
            return answer;
        }
    }
    input_status(watch).await
}

/// `None` if isola-input queued the events; the error answer otherwise.
fn input_done(result: Result<InputResponse, BackendError>) -> Option<Answer> {
    match result {
        Ok(InputResponse::Done) => None,
        Ok(InputResponse::Error(e)) => Some(error(StatusCode::CONFLICT, e)),
        Ok(InputResponse::Status(_)) => Some(error(
            StatusCode::BAD_GATEWAY,
            "isola-input answered with a status".into(),
        )),
        Err(e) => Some(no_such_device(&e, "input device")),
    }
}

async fn pointer(watch: &Arc<Watch>, r: PointerRequest) -> Answer {
    let max = isola_ipc::input::INPUT_ABS_MAX;
    if r.x > max || r.y > max {
        return error(
            StatusCode::BAD_REQUEST,
            format!("x and y run from 0 to {max}; got ({}, {})", r.x, r.y),
        );
    }
    let buttons = r.buttons.iter().fold(0, |mask, b| {
        mask | match b {
            Button::Left => BUTTON_LEFT,
            Button::Middle => BUTTON_MIDDLE,
            Button::Right => BUTTON_RIGHT,
        }
    });
    let request = InputRequest::Pointer {
        x: r.x,
        y: r.y,
        buttons,
    };
    match input_done(input_call(watch, request).await) {
        Some(answer) => answer,
        None => input_status(watch).await,
    }
}
