//! `GET /metrics`: the Prometheus text format (version 0.0.4), built afresh for each scrape
//! from the core's and the supervisor's status, `/proc` and the input and display daemons.

use std::fmt::Write as _;
use std::sync::Arc;

use isola_ipc::display::{DisplayRequest, DisplayResponse};
use isola_ipc::input::{InputRequest, InputResponse};
use isola_ipc::VcpuState;

use crate::backends::{self, BackendError};
use crate::model::ProcessCounters;
use crate::procfs;
use crate::status;
use crate::watch::Watch;

/// The text of one scrape.
pub async fn render(watch: &Arc<Watch>) -> Result<String, BackendError> {
    let (core, supervisor, devices) = tokio::join!(
        status::core_status(watch),
        status::supervisor(watch),
        status::devices(watch),
    );
    let (daemons, supervisor_pid) = supervisor?;
    let devices = devices?;
    let mut m = Metrics::default();
    m.family(
        "isola_vm_up",
        "gauge",
        "1 while the VM's core runs and answers.",
    );
    m.sample("isola_vm_up", &[], f64::from(u8::from(core.is_ok())));
    if let Ok(core) = &core {
        m.family(
            "isola_vm_uptime_seconds",
            "gauge",
            "Time since the core started.",
        );
        m.sample(
            "isola_vm_uptime_seconds",
            &[],
            core.uptime_ms as f64 / 1000.0,
        );
        m.family(
            "isola_vcpu_running",
            "gauge",
            "1 for a vCPU that runs, 0 for one paused or exited.",
        );
        for v in &core.vcpus {
            let running = f64::from(u8::from(v.state == VcpuState::Running));
            m.sample(
                "isola_vcpu_running",
                &[("vcpu", &v.index.to_string())],
                running,
            );
        }
    }
    m.family(
        "isola_device_link_up",
        "gauge",
        "1 while the core is connected to the device's daemon.",
    );
    for d in devices.iter().filter(|d| d.slot.is_some()) {
        let up = f64::from(u8::from(d.link.state == "connected"));
        m.sample(
            "isola_device_link_up",
            &[("device", &d.name), ("kind", &d.kind)],
            up,
        );
    }
    m.family(
        "isola_device_reconnects_total",
        "counter",
        "Times the core reconnected to the device's restarted daemon.",
    );
    for d in devices.iter().filter(|d| d.slot.is_some()) {
        m.sample(
            "isola_device_reconnects_total",
            &[("device", &d.name)],
            f64::from(d.reconnects),
        );
    }
    m.family(
        "isola_device_restarts_total",
        "counter",
        "Times the supervisor started the device's daemon again after it died.",
    );
    for d in &daemons {
        m.sample(
            "isola_device_restarts_total",
            &[("device", &d.name)],
            f64::from(d.restarts),
        );
    }
    m.family(
        "isola_device_last_reconnect_seconds",
        "gauge",
        "From the daemon's death (as first seen by the API's watch, every 100 ms) to the core's reconnect, the last time.",
    );
    for d in &devices {
        if let Some(s) = d.last_reconnect_seconds {
            m.sample(
                "isola_device_last_reconnect_seconds",
                &[("device", &d.name)],
                s,
            );
        }
    }
    // Per process: the core, the supervisor, this process, each daemon (its whole tree).
    let mut processes: Vec<(String, ProcessCounters)> = Vec::new();
    let mut add = |name: &str, pid: Option<u32>, tree: bool| {
        let counters = pid.and_then(|p| {
            if tree {
                procfs::tree_counters(p)
            } else {
                procfs::counters(p)
            }
        });
        if let Some(c) = counters {
            processes.push((name.to_owned(), c));
        }
    };
    add("isola-core", watch.core_pid(), false);
    add("isola-supervisor", supervisor_pid, false);
    add("isola-api", Some(std::process::id()), false);
    for d in &daemons {
        add(&d.name, d.pid, true);
    }
    process_families(&mut m, &processes);
    input_and_display(&mut m, watch).await;
    m.family(
        "isola_api_requests_total",
        "counter",
        "API requests answered, by HTTP status.",
    );
    for (code, n) in watch.requests() {
        m.sample(
            "isola_api_requests_total",
            &[("code", &code.to_string())],
            n as f64,
        );
    }
    m.family(
        "isola_api_events_total",
        "counter",
        "Events sent on GET /events, by kind.",
    );
    for (event, n) in watch.events_sent() {
        m.sample("isola_api_events_total", &[("event", event)], n as f64);
    }
    Ok(m.text)
}

fn process_families(m: &mut Metrics, processes: &[(String, ProcessCounters)]) {
    type Field = fn(&ProcessCounters) -> f64;
    let families: [(&str, &str, &str, Field); 7] = [
        (
            "isola_process_resident_memory_bytes",
            "gauge",
            "Resident memory (a daemon: its sandbox's processes added up).",
            |c| c.rss_bytes as f64,
        ),
        (
            "isola_process_cpu_seconds_total",
            "counter",
            "User and system CPU time.",
            |c| c.cpu_seconds,
        ),
        (
            "isola_process_read_bytes_total",
            "counter",
            "Bytes through read-like system calls (rchar).",
            |c| c.read_bytes as f64,
        ),
        (
            "isola_process_write_bytes_total",
            "counter",
            "Bytes through write-like system calls (wchar).",
            |c| c.write_bytes as f64,
        ),
        (
            "isola_process_read_syscalls_total",
            "counter",
            "Read-like system calls (syscr).",
            |c| c.read_calls as f64,
        ),
        (
            "isola_process_write_syscalls_total",
            "counter",
            "Write-like system calls (syscw).",
            |c| c.write_calls as f64,
        ),
        (
            "isola_process_voluntary_context_switches_total",
            "counter",
            "Times a thread slept waiting (a kick, a completion, a request).",
            |c| c.voluntary_switches as f64,
        ),
    ];
    for (name, kind, help, field) in families {
        m.family(name, kind, help);
        for (process, c) in processes {
            m.sample(name, &[("process", process)], field(c));
        }
    }
}

async fn input_and_display(m: &mut Metrics, watch: &Watch) {
    let input = backends::call::<_, InputResponse>(
        "isola-input",
        &watch.sockets.input,
        &InputRequest::Status,
    );
    let display = backends::call::<_, DisplayResponse>(
        "isola-display",
        &watch.sockets.display,
        &DisplayRequest::Status,
    );
    let (input, display) = tokio::join!(input, display);
    if let Ok(InputResponse::Status(s)) = input {
        m.family(
            "isola_input_events_total",
            "counter",
            "Input events handed to the guest, per device.",
        );
        m.sample(
            "isola_input_events_total",
            &[("device", "keyboard")],
            s.keyboard_events as f64,
        );
        m.sample(
            "isola_input_events_total",
            &[("device", "tablet")],
            s.tablet_events as f64,
        );
        m.family(
            "isola_input_pending_events",
            "gauge",
            "Input events waiting for the guest's buffers.",
        );
        m.sample("isola_input_pending_events", &[], s.pending as f64);
    }
    if let Ok(DisplayResponse::Status(s)) = display {
        m.family(
            "isola_display_updates_total",
            "counter",
            "Picture updates received from the GPU.",
        );
        m.sample("isola_display_updates_total", &[], s.updates as f64);
        m.family(
            "isola_display_vnc_clients",
            "gauge",
            "VNC clients connected.",
        );
        m.sample("isola_display_vnc_clients", &[], f64::from(s.vnc_clients));
    }
}

#[derive(Default)]
struct Metrics {
    text: String,
}

impl Metrics {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.text, "{k}=\"{v}\"");
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut m = Metrics::default();
        m.family("x_total", "counter", "A test.");
        m.sample("x_total", &[("device", "a\"b\\c\nd")], 1.5);
        assert_eq!(
            m.text,
            "# HELP x_total A test.\n# TYPE x_total counter\nx_total{device=\"a\\\"b\\\\c\\nd\"} 1.5\n"
        );
    }
}
