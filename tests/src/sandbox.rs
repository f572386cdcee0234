//! Checks of a sandboxed device process from the outside, through /proc: the pid a
//! supervisor started (the reaper) and its one child (the device, pid 1 of its own pid
//! namespace).

pub use isola_device_common::testing::process::{
    assert_sandboxed, assert_sandboxed_on_host_network, device_pid, status_field,
};

/// The children of `pid` (a reaper's: its device, and any helper it forked before the
/// sandbox, such as isola-display's input connector).
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Whether `pid` is pid 1 of a pid namespace of its own (a sandboxed device process).
pub fn is_namespace_init(pid: u32) -> bool {
    let nspid = status_field(pid, "NSpid");
    let ids: Vec<&str> = nspid.split_whitespace().collect();
    ids.len() > 1 && ids.last() == Some(&"1")
}
