//! Resource counters of a process and its descendants, from `/proc`: what `/metrics` and
//! `GET /devices` report per process. A device daemon is a sandbox reaper whose child is the
//! device, so a daemon's figures add up its whole tree.

use crate::model::ProcessCounters;

/// At most this many processes are added up under one pid (a daemon has two).
const MAX_TREE: usize = 64;

/// The counters of `pid` and its descendants; `None` if `pid` is gone.
pub fn tree_counters(pid: u32) -> Option<ProcessCounters> {
    let mut total = ProcessCounters::default();
    let mut todo = vec![pid];
    let mut seen = 0usize;
    while let Some(p) = todo.pop() {
        seen += 1;
        if seen > MAX_TREE {
            break;
        }
        let Some(one) = counters(p) else {
            if p == pid {
                return None;
            }
            continue;
        };
        add(&mut total, &one);
        todo.extend(children(p));
    }
    Some(total)
}

fn add(total: &mut ProcessCounters, one: &ProcessCounters) {
    total.processes = total.processes.saturating_add(one.processes);
    total.rss_bytes = total.rss_bytes.saturating_add(one.rss_bytes);
    total.cpu_seconds += one.cpu_seconds;
    total.read_bytes = total.read_bytes.saturating_add(one.read_bytes);
    total.write_bytes = total.write_bytes.saturating_add(one.write_bytes);
    total.read_calls = total.read_calls.saturating_add(one.read_calls);
    total.write_calls = total.write_calls.saturating_add(one.write_calls);
    total.voluntary_switches = total
        .voluntary_switches
        .saturating_add(one.voluntary_switches);
}

/// One process's counters; `None` if it is gone. Fields the kernel will not show us (another
/// user's `io`) stay 0.
pub fn counters(pid: u32) -> Option<ProcessCounters> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state): utime is field 14, stime 15, rss (pages) 24.
    let num = |field: usize| -> u64 {
        fields
            .get(field - 3)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let ticks = clock_ticks();
    let mut c = ProcessCounters {
        processes: 1,
        rss_bytes: num(24).saturating_mul(page_size()),
        cpu_seconds: (num(14) + num(15)) as f64 / ticks,
        ..ProcessCounters::default()
    };
    if let Ok(io) = std::fs::read_to_string(format!("/proc/{pid}/io")) {
        for line in io.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim().parse().unwrap_or(0);
            match key {
                "rchar" => c.read_bytes = value,
                "wchar" => c.write_bytes = value,
                "syscr" => c.read_calls = value,
                "syscw" => c.write_calls = value,
                _ => {}
            }
        }
    }
    c.voluntary_switches = tasks(pid)
        .iter()
        .map(|tid| voluntary_switches(pid, *tid))
        .sum();
    Some(c)
}

fn tasks(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .take(MAX_TREE * 16)
                .collect()
        })
        .unwrap_or_default()
}

fn voluntary_switches(pid: u32, tid: u32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Children of every thread of `pid` (`/proc/PID/task/TID/children`).
fn children(pid: u32) -> Vec<u32> {
    tasks(pid)
        .iter()
        .filter_map(|tid| std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value; no pointers.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a configuration value; no pointers.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_counters_are_read_and_grow() {
        let me = std::process::id();
        let before = tree_counters(me).expect("this process exists");
        assert!(before.rss_bytes > 0 && before.processes >= 1);
        let data = std::fs::read("/proc/self/stat").expect("readable");
        assert!(!data.is_empty());
        let after = tree_counters(me).expect("this process exists");
        assert!(
            after.read_calls > before.read_calls,
            "{before:?} -> {after:?}"
        );
        assert!(counters(u32::MAX).is_none());
    }
}
