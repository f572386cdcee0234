//! The VM's API (`DIR/api.sock`, served by isola-api) through clients we did not write:
//! curl for every endpoint, schemathesis and openapi-spec-validator holding the server to
//! `docs/api.yaml`, prometheus_client parsing `/metrics`; and bad input of every kind, each
//! answered with a clear 4xx (or dropped at a deadline) while the VM and other clients go on.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use isola_device_common::testing::skip::{skip, Missing};
use isola_tests::api::{
    curl, launch_blk, launch_gpu, post_json, python, raw, status_of, Answer, EventReader,
};
use isola_tests::scratch_dir;

fn ok(answer: &Answer, what: &str) -> serde_json::Value {
    assert_eq!(answer.status, 200, "{what}: {}", answer.body);
    answer.json()
}

/// A 4xx whose body is `{"error": one line}` mentioning `needle`.
fn refused(answer: &Answer, status: u16, needle: &str) {
    assert_eq!(answer.status, status, "{}", answer.body);
    let e = answer.json();
    let text = e["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error text: {e}"));
    assert!(!text.contains('\n'), "{text}");
    assert!(
        text.contains(needle),
        "{text:?} does not mention {needle:?}"
    );
}

fn names(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[test]
fn every_endpoint_answers_curl() {
    let scratch = scratch_dir("api-endpoints");
    let run_dir = scratch.join("run");
    let mut launch = launch_gpu(&run_dir);
    let api = run_dir.join("api.sock");
    let mode = std::fs::metadata(&api).expect("api.sock exists");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        mode.permissions().mode() & 0o777,
        0o600,
        "api.sock must be mode 0600"
    );
    let mut events = EventReader::start(&api);

    let vm = ok(&curl(&api, &[], "/vm"), "GET /vm");
    assert_eq!(vm["state"], "running", "{vm}");
    assert!(
        vm["pid"].as_u64().is_some() && vm["vcpus"].as_array().is_some_and(|v| !v.is_empty()),
        "{vm}"
    );

    // The configuration: the VM file isola-run wrote, as JSON and as the file itself (which
    // `isola-run --config` starts again: tests/vm_file.rs).
    let config = ok(&curl(&api, &[], "/vm/config"), "GET /vm/config");
    assert_eq!(config["cmdline"], "virtio-gpu.wait=1", "{config}");
    assert_eq!(config["display"]["width"], 640, "{config}");
    assert_eq!(config["display"]["height"], 400, "{config}");
    assert!(config["cpus"].as_u64() >= Some(1), "{config}");
    assert!(
        config["kernel"]
            .as_str()
            .is_some_and(|k| k.ends_with("virtio-gpu.elf")),
        "{config}"
    );
    let file = curl(&api, &[], "/vm/config.toml");
    assert_eq!(file.status, 200, "{}", file.body);
    assert_eq!(
        file.body,
        std::fs::read_to_string(run_dir.join("vm.toml")).expect("DIR/vm.toml"),
    );
    refused(&curl(&api, &[], "/vm/config?x=1"), 400, "query");

    let devices = ok(&curl(&api, &[], "/devices"), "GET /devices");
    let list = devices.as_array().expect("an array");
    let by_name = |n: &str| {
        list.iter()
            .find(|d| d["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("no {n} in {devices}"))
    };
    let gpu = by_name("gpu");
    assert_eq!(gpu["link"]["state"], "connected", "{gpu}");
    assert_eq!(gpu["display_link"]["link"]["state"], "connected", "{gpu}");
    assert!(
        gpu["daemon"]["pid"].as_u64().is_some()
            && gpu["daemon"]["counters"]["rss_bytes"].as_u64() > Some(0),
        "{gpu}"
    );
    assert_eq!(by_name("input0")["daemon"]["state"], "running");
    assert_eq!(by_name("display")["link"]["state"], "none");
    assert_eq!(
        ok(&curl(&api, &[], "/devices/gpu"), "GET /devices/gpu")["name"],
        "gpu"
    );
    refused(&curl(&api, &[], "/devices/nosuch"), 404, "nosuch");
    refused(
        &curl(&api, &["-X", "POST"], "/devices/nosuch/restart"),
        404,
        "nosuch",
    );

    let display = ok(&curl(&api, &[], "/display"), "GET /display");
    assert_eq!(display["scanouts"][0]["width"], 640, "{display}");
    let shot = scratch.join("shot.png");
    let out = Command::new("curl")
        .args(["-sS", "-o"])
        .arg(&shot)
        .args(["-w", "%{http_code} %{content_type}", "--unix-socket"])
        .arg(&api)
        .arg("http://localhost/display/screenshot?scanout=0")
        .output()
        .expect("curl runs");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 image/png");
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&shot).expect("written"),
    ));
    let info = decoder.read_info().expect("a PNG");
    assert_eq!((info.info().width, info.info().height), (640, 400));
    refused(
        &curl(&api, &[], "/display/screenshot?scanout=99"),
        400,
        "scanout",
    );

    let before = ok(&curl(&api, &[], "/input"), "GET /input");
    let count = |v: &serde_json::Value| {
        v["keyboard_events"].as_u64().unwrap_or(0)
            + v["tablet_events"].as_u64().unwrap_or(0)
            + v["pending"].as_u64().unwrap_or(0)
    };
    ok(
        &post_json(&api, "/input/key", r#"{"keys":"ctrl+alt+delete"}"#),
        "key",
    );
    ok(
        &post_json(&api, "/input/key", r#"{"keys":"a","action":"press"}"#),
        "key press",
    );
    ok(
        &post_json(&api, "/input/key", r#"{"keys":"a","action":"release"}"#),
        "key release",
    );
    ok(
        &post_json(&api, "/input/type", r#"{"text":"Hi!\n"}"#),
        "type",
    );
    let after = ok(
        &post_json(
            &api,
            "/input/pointer",
            r#"{"x":16384,"y":100,"buttons":["left"]}"#,
        ),
        "pointer",
    );
    assert!(count(&after) > count(&before), "{before} -> {after}");
    refused(
        &post_json(&api, "/input/key", r#"{"keys":"nosuchkey"}"#),
        400,
        "nosuchkey",
    );
    refused(
        &post_json(&api, "/input/type", r#"{"text":"é"}"#),
        400,
        "US keyboard",
    );
    refused(
        &post_json(&api, "/input/pointer", r#"{"x":40000,"y":0}"#),
        400,
        "32767",
    );

    // A running daemon restarted on request: a new process, counted, and its device back.
    let input_pid = by_name("input0")["daemon"]["pid"].as_u64().expect("a pid");
    // The answer is the device as the supervisor has it when it took the request: the
    // restart itself (stop, start, the core's reconnect) follows.
    let restarted = ok(
        &curl(&api, &["-X", "POST"], "/devices/input0/restart"),
        "POST /devices/input0/restart",
    );
    assert_eq!(restarted["name"], "input0", "{restarted}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = ok(&curl(&api, &[], "/devices/input0"), "GET /devices/input0");
        let pid = now["daemon"]["pid"].as_u64();
        if pid.is_some()
            && pid != Some(input_pid)
            && now["daemon"]["restarts"].as_u64() >= Some(1)
            && now["link"]["state"] == "connected"
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "input0 did not come back after its restart: {now}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let paused = ok(&curl(&api, &["-X", "POST"], "/vm/pause"), "pause");
    assert_eq!(paused["state"], "paused", "{paused}");
    assert!(paused["vcpus"]
        .as_array()
        .expect("vcpus")
        .iter()
        .all(|v| v["state"] == "paused"));
    let resumed = ok(&curl(&api, &["-X", "POST"], "/vm/resume"), "resume");
    assert_eq!(resumed["state"], "running", "{resumed}");

    let metrics = curl(&api, &[], "/metrics");
    assert_eq!(metrics.status, 200);
    assert!(metrics.body.contains("isola_vm_up 1"), "{}", metrics.body);
    let yaml = curl(&api, &[], "/openapi.yaml");
    assert_eq!(
        yaml.body.trim_end(),
        std::fs::read_to_string(isola_tests::api::document())
            .expect("docs/api.yaml")
            .trim_end()
    );

    let seen = events.until("vcpus_resumed", Duration::from_secs(30));
    assert!(
        names(&seen).contains(&"vcpus_paused".to_owned()),
        "{seen:?}"
    );

    let down = ok(
        &post_json(&api, "/vm/shutdown", r#"{"force": true}"#),
        "shutdown",
    );
    assert!(
        down["state"] == "running" || down["state"] == "stopped" || down["state"] == "starting",
        "{down}"
    );
    let end = events.until("vm_ended", Duration::from_secs(30));
    assert_eq!(
        names(&end)[names(&end).len() - 2..],
        ["vm_shutdown", "vm_ended"],
        "{end:?}"
    );
    assert!(
        events.ends_within(Duration::from_secs(10)),
        "the event stream did not end with the VM"
    );
    let status = launch.finish(Duration::from_secs(60));
    assert!(
        status.success(),
        "isola-run: {status:?}\n{}",
        launch.report()
    );
}

/// Forwards loopback TCP connections to a Unix socket, for tools that speak only TCP.
fn forward_tcp_to(socket: PathBuf) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let port = listener.local_addr().expect("bound").port();
    std::thread::spawn(move || {
        for tcp in listener.incoming().map_while(Result::ok) {
            let Ok(unix) = UnixStream::connect(&socket) else {
                return;
            };
            let (mut t2, mut u2) = (
                tcp.try_clone().expect("clone"),
                unix.try_clone().expect("clone"),
            );
            let (mut t1, mut u1) = (tcp, unix);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut t1, &mut u1);
                let _ = u1.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut u2, &mut t2);
                let _ = t2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    port
}

#[test]
fn the_running_server_holds_to_its_openapi_document() {
    let Some(python) = python() else {
        skip(
            Missing::Installable,
            "no Python with schemathesis, openapi-spec-validator and prometheus_client (.ci/run makes target/api-venv)",
        );
        return;
    };
    let document = isola_tests::api::document();
    let valid = Command::new(&python)
        .args(["-m", "openapi_spec_validator"])
        .arg(&document)
        .output()
        .expect("python runs");
    assert!(
        valid.status.success(),
        "docs/api.yaml is not valid OpenAPI: {}{}",
        String::from_utf8_lossy(&valid.stdout),
        String::from_utf8_lossy(&valid.stderr)
    );

    let scratch = scratch_dir("api-schema");
    let run_dir = scratch.join("run");
    let mut launch = launch_gpu(&run_dir);
    let api = run_dir.join("api.sock");
    let port = forward_tcp_to(api.clone());
    // Every operation but shutdown (done last, by hand) and the endless event stream, with
    // the checks that hold the answers to the document and bad input to a 4xx.
    let out = Command::new(&python)
        .args(["-m", "schemathesis.cli", "run"])
        .arg(&document)
        .arg(format!("--url=http://127.0.0.1:{port}"))
        .args([
            "--exclude-operation-id=shutdownVm",
            "--exclude-operation-id=events",
            "--checks=not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,negative_data_rejection,unsupported_method",
            "--max-examples=15",
            "--request-timeout=20",
            "--generation-deterministic",
            "--suppress-health-check=all",
        ])
        .env("SCHEMATHESIS_HOOKS", "")
        .current_dir(scratch.join("."))
        .output()
        .expect("schemathesis runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found the server off its document:\n{text}"
    );
    assert!(
        text.contains("Tested: 17"),
        "schemathesis did not test every operation:\n{text}"
    );
    // The VM went on through all of it.
    let vm = ok(&curl(&api, &["-X", "POST"], "/vm/resume"), "resume");
    assert_eq!(vm["state"], "running", "{vm}");
    ok(
        &post_json(&api, "/vm/shutdown", r#"{"force": true}"#),
        "shutdown",
    );
    let status = launch.finish(Duration::from_secs(60));
    assert!(
        status.success(),
        "isola-run: {status:?}\n{}",
        launch.report()
    );
}

/// Sends `head` one byte a second (a slowloris client); returns how long until the server
/// closed the connection, or `None` if it was still open after `limit`.
fn slow_client(socket: &Path, head: &[u8], limit: Duration) -> Option<(Duration, Vec<u8>)> {
    let mut stream = UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(10)))
        .expect("timeout");
    let start = Instant::now();
    let mut got = Vec::new();
    for byte in head.iter().cycle() {
        if start.elapsed() > limit {
            return None;
        }
        let mut buf = [0u8; 512];
        match stream.read(&mut buf) {
            Ok(0) => return Some((start.elapsed(), got)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Some((start.elapsed(), got)),
        }
        if stream.write_all(&[*byte]).is_err() {
            return Some((start.elapsed(), got));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    None
}

#[test]
fn bad_input_each_gets_a_clear_4xx_and_the_vm_runs_on() {
    let scratch = scratch_dir("api-bad-input");
    let run_dir = scratch.join("run");
    let mut launch = launch_blk(&run_dir, 40);
    let api = run_dir.join("api.sock");
    let uptime = |a: &Answer| a.json()["uptime_ms"].as_u64().unwrap_or(0);
    let first = uptime(&curl(&api, &[], "/vm"));

    // Slow clients run meanwhile: a header a byte a second, and one that sends nothing.
    let slow = {
        let api = api.clone();
        std::thread::spawn(move || {
            slow_client(
                &api,
                b"GET /vm HTTP/1.1\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                Duration::from_secs(60),
            )
        })
    };
    let idle = {
        let api = api.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let got = raw(&api, b"", Duration::from_secs(60)).expect("connect");
            (start.elapsed(), got)
        })
    };

    // JSON bodies: malformed, unknown field, wrong type, missing field, none, too large.
    refused(
        &post_json(&api, "/input/key", r#"{"keys": "a""#),
        400,
        "bad JSON body",
    );
    refused(
        &post_json(&api, "/input/key", r#"{"keys":"a","bogus":1}"#),
        400,
        "unknown field `bogus`",
    );
    refused(
        &post_json(&api, "/input/pointer", r#"{"x":"left","y":0}"#),
        400,
        "invalid type",
    );
    refused(
        &post_json(&api, "/input/pointer", r#"{"x":-1,"y":0}"#),
        400,
        "invalid value",
    );
    refused(
        &post_json(&api, "/input/key", r#"{"action":"tap"}"#),
        400,
        "missing field `keys`",
    );
    refused(
        &post_json(&api, "/input/key", r#"{"keys":"a","action":"smash"}"#),
        400,
        "unknown variant",
    );
    refused(&post_json(&api, "/input/type", "[]"), 400, "bad JSON body");
    refused(
        &curl(&api, &["-X", "POST"], "/input/type"),
        400,
        "JSON body is required",
    );
    let huge = format!(r#"{{"text":"{}"}}"#, "a".repeat(100_000));
    let huge_file = scratch.join("huge.json");
    std::fs::write(&huge_file, huge).expect("write");
    let data = format!("@{}", huge_file.display());
    refused(
        &curl(&api, &["-X", "POST", "--data-binary", &data], "/input/type"),
        413,
        "65536",
    );
    refused(
        &curl(&api, &["-X", "POST", "--data-binary", "x"], "/vm/pause"),
        400,
        "takes no body",
    );
    // Paths, methods, queries.
    refused(&curl(&api, &[], "/nosuch"), 404, "/nosuch");
    refused(&curl(&api, &[], "/vm/"), 404, "/vm/");
    refused(&curl(&api, &["-X", "DELETE"], "/vm"), 405, "takes GET");
    refused(
        &curl(&api, &["-X", "GET"], "/vm/shutdown"),
        405,
        "takes POST",
    );
    refused(&curl(&api, &[], "/vm?verbose=1"), 400, "no query");
    // Not HTTP at all, and a head over the bound.
    let garbage = raw(&api, b"HELLO THERE\r\n\r\n", Duration::from_secs(10)).expect("connect");
    assert_eq!(
        status_of(&garbage),
        Some(400),
        "{}",
        String::from_utf8_lossy(&garbage)
    );
    let big_head = format!(
        "GET /vm HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    let answer = raw(&api, big_head.as_bytes(), Duration::from_secs(10)).expect("connect");
    assert_eq!(
        status_of(&answer),
        Some(431),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // A body that never comes: the declared length is not sent.
    let stalled = raw(
        &api,
        b"POST /input/type HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{",
        Duration::from_secs(30),
    )
    .expect("connect");
    assert_eq!(
        status_of(&stalled),
        Some(408),
        "{}",
        String::from_utf8_lossy(&stalled)
    );

    // 100 clients at once, half of them sending garbage: each gets an answer.
    let barrier = Arc::new(Barrier::new(100));
    let clients: Vec<_> = (0..100)
        .map(|i| {
            let (api, barrier) = (api.clone(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let mut stream = UnixStream::connect(&api).expect("connect");
                stream.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
                barrier.wait();
                let request: &[u8] = if i % 2 == 0 {
                    b"GET /vm HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
                } else {
                    b"POST /input/key HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nconnection: close\r\n\r\n{{{{{"
                };
                stream.write_all(request).expect("write");
                let mut got = Vec::new();
                let _ = stream.read_to_end(&mut got);
                (i, status_of(&got))
            })
        })
        .collect();
    for client in clients {
        let (i, status) = client.join().expect("client thread");
        let want = if i % 2 == 0 { 200 } else { 400 };
        assert_eq!(status, Some(want), "client {i}");
    }

    // While the slow clients were at it, others were served.
    for _ in 0..5 {
        assert_eq!(curl(&api, &[], "/vm").status, 200);
    }
    let (closed_after, got) = slow
        .join()
        .expect("slow client")
        .expect("the slowloris client was never dropped");
    assert!(
        closed_after < Duration::from_secs(40),
        "dropped only after {closed_after:?}"
    );
    let answer = String::from_utf8_lossy(&got);
    assert!(
        got.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    let (idle_after, _) = idle.join().expect("idle client");
    assert!(
        idle_after < Duration::from_secs(40),
        "an idle connection stayed {idle_after:?}"
    );

    // The VM went on: still running, uptime grew, the guest finishes its loop clean.
    let vm = curl(&api, &[], "/vm");
    assert_eq!(vm.json()["state"], "running", "{}", vm.body);
    assert!(uptime(&vm) > first);
    launch.finishes_with(Duration::from_secs(120), "virtio-blk: ok");
}

/// Samples of a scrape, parsed by prometheus_client's own parser: `name{labels}` -> value.
fn parse_metrics(python: &Path, text: &str) -> std::collections::HashMap<String, f64> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = Command::new(python)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("python ends");
    assert!(
        out.status.success(),
        "prometheus_client cannot parse /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from the script")
}

#[test]
fn events_and_metrics_follow_a_killed_device_and_guest_io() {
    let python = python();
    let scratch = scratch_dir("api-events");
    let run_dir = scratch.join("run");
    let mut launch = launch_blk(&run_dir, 30);
    let api = run_dir.join("api.sock");
    let mut events = EventReader::start(&api);

    // Metrics: parsed by an independent parser; blk0's I/O counters grow with the guest's.
    let scrape = || {
        let m = curl(&api, &[], "/metrics");
        assert_eq!(m.status, 200);
        m.body
    };
    let first = scrape();
    std::thread::sleep(Duration::from_secs(2));
    let second = scrape();
    match &python {
        Some(python) => {
            let (a, b) = (
                parse_metrics(python, &first),
                parse_metrics(python, &second),
            );
            for key in [
                r#"isola_process_write_bytes_total{process="blk0"}"#,
                r#"isola_process_cpu_seconds_total{process="blk0"}"#,
                r#"isola_process_voluntary_context_switches_total{process="blk0"}"#,
            ] {
                let (x, y) = (a.get(key), b.get(key));
                assert!(x.is_some() && y > x, "{key}: {x:?} -> {y:?}\n{second}");
            }
            assert_eq!(b.get("isola_vm_up{}"), Some(&1.0));
            assert_eq!(
                b.get(r#"isola_device_link_up{device="blk0",kind="blk"}"#),
                Some(&1.0)
            );
            assert!(b.contains_key(r#"isola_process_resident_memory_bytes{process="isola-core"}"#));
        }
        None => skip(
            Missing::Installable,
            "no Python with prometheus_client (.ci/run makes target/api-venv): /metrics not parsed",
        ),
    }

    // Kill blk0's daemon: died, restarted, reconnected, in that order.
    let device = curl(&api, &[], "/devices/blk0").json();
    let pid = device["daemon"]["pid"].as_u64().expect("blk0 runs") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill blk0");
    let seen = events.until("device_reconnected", Duration::from_secs(60));
    let order: Vec<String> = seen
        .iter()
        .filter(|e| e["device"] == "blk0")
        .map(|e| e["event"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        order,
        ["device_died", "device_restarted", "device_reconnected"],
        "{seen:?}"
    );
    assert_eq!(seen[0]["reason"], "killed by SIGKILL", "{seen:?}");
    assert_eq!(seen[0]["pid"], pid, "{seen:?}");
    let after = curl(&api, &[], "/devices/blk0").json();
    assert_eq!(after["daemon"]["restarts"], 1, "{after}");
    assert_eq!(after["reconnects"], 1, "{after}");
    assert_eq!(after["daemon"]["last_exit"], "killed by SIGKILL", "{after}");
    assert!(
        after["last_reconnect_seconds"].as_f64().is_some(),
        "{after}"
    );
    if let Some(python) = &python {
        let m = parse_metrics(python, &scrape());
        assert_eq!(
            m.get(r#"isola_device_restarts_total{device="blk0"}"#),
            Some(&1.0)
        );
        assert_eq!(
            m.get(r#"isola_device_reconnects_total{device="blk0"}"#),
            Some(&1.0)
        );
    }

    // The guest finishes its loop with every block intact and powers off: the stream says so
    // and ends.
    let end = events.until("vm_ended", Duration::from_secs(120));
    assert_eq!(
        names(&end)[names(&end).len() - 2..],
        ["guest_powered_off", "vm_ended"],
        "{end:?}"
    );
    assert!(events.ends_within(Duration::from_secs(10)));
    launch.finishes_with(Duration::from_secs(60), "virtio-blk: ok");
}
