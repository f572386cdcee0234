//! The core as this process's child: started with a parent-death signal and an exit-report
//! pipe (`isola-core --exit-report-fd 3`), waited for, and stopped on SIGTERM.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

use crate::model::Exit;
use crate::watch::Watch;

/// The fd the core writes its exit line to.
const REPORT_FD: i32 = 3;
/// After SIGTERM, how long the core has before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(4);
/// Longest exit line read.
const MAX_REPORT: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("cannot create the exit-report pipe")]
    Pipe(#[source] nix::Error),
    #[error("cannot start {0}")]
    Spawn(String, #[source] std::io::Error),
    #[error("cannot watch for SIGTERM")]
    Signal(#[source] std::io::Error),
}

/// Starts the core (`argv`, with `--exit-report-fd 3` added) and runs it to its end;
/// returns how it ended.
pub async fn run(watch: Arc<Watch>, argv: &[OsString]) -> Result<Exit, CoreError> {
    let (read_end, write_end) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(CoreError::Pipe)?;
    let program = argv.first().cloned().unwrap_or_default();
    let mut command = Command::new(&program);
    command
        .args(&argv[1..])
        .arg("--exit-report-fd")
        .arg(REPORT_FD.to_string());
    let write_raw = write_end.as_raw_fd();
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-
    // safe functions (dup2, fcntl, prctl, getppid, _exit) on integers; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if write_raw == REPORT_FD {
                libc::fcntl(REPORT_FD, libc::F_SETFD, 0);
            } else if libc::dup2(write_raw, REPORT_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The VM dies with its manager, SIGKILL included; a manager that died before the
            // prctl would send nothing, hence the parent check after it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| CoreError::Spawn(program.to_string_lossy().into_owned(), e))?;
    drop(write_end);
    watch.set_core_pid(child.id());
    log::info!(
        "started {} (pid {:?})",
        program.to_string_lossy(),
        child.id()
    );
    let report = tokio::spawn(read_report(read_end));
    let status = wait_or_stop(&mut child).await?;
    let line = match tokio::time::timeout(Duration::from_secs(1), report).await {
        Ok(Ok(line)) => line,
        _ => String::new(),
    };
    Ok(exit_of(&line, status))
}

async fn wait_or_stop(child: &mut Child) -> Result<std::process::ExitStatus, CoreError> {
    let mut term = signal(SignalKind::terminate()).map_err(CoreError::Signal)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(CoreError::Signal)?;
    loop {
        tokio::select! {
            status = child.wait() => match status {
                Ok(status) => return Ok(status),
                Err(e) => {
                    log::error!("waiting for the core failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = term.recv() => return Ok(stop(child).await),
            _ = hangup.recv() => return Ok(stop(child).await),
        }
    }
}

/// SIGTERM to the core, SIGKILL after [`STOP_GRACE`]; its status.
async fn stop(child: &mut Child) -> std::process::ExitStatus {
    log::info!("stopping the core");
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGTERM);
    }
    if let Ok(Ok(status)) = tokio::time::timeout(STOP_GRACE, child.wait()).await {
        return status;
    }
    let _ = child.start_kill();
    match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(Ok(status)) => status,
        _ => std::process::ExitStatus::from_raw(libc::SIGKILL),
    }
}

async fn read_report(fd: OwnedFd) -> String {
    let Ok(pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return String::new();
    };
    let mut text = String::new();
    let _ = pipe.take(MAX_REPORT).read_to_string(&mut text).await;
    text
}

/// How the core ended, from its exit line (if any) and its wait status.
pub fn exit_of(line: &str, status: std::process::ExitStatus) -> Exit {
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    let line = line.lines().next().unwrap_or("").trim();
    let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
    let detail = (!rest.is_empty()).then(|| rest.to_owned());
    let reason = match word {
        "poweroff" | "reset" | "shutdown" | "debug-exit" | "crash" | "failed" => word,
        "error" => "failed",
        _ if status.signal().is_some() => "killed",
        _ => "unknown",
    };
    let detail = match (reason, status.signal()) {
        ("killed", Some(s)) => Some(format!(
            "killed by {}",
            nix::sys::signal::Signal::try_from(s).map_or("a signal", |s| s.as_str())
        )),
        _ => detail,
    };
    Exit {
        reason: reason.to_owned(),
        detail,
        status: code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_lines_and_statuses() {
        let ok = std::process::ExitStatus::from_raw(0);
        assert_eq!(exit_of("poweroff\n", ok).reason, "poweroff");
        let crash = exit_of(
            "crash triple fault on vcpu0\n",
            std::process::ExitStatus::from_raw(3 << 8),
        );
        assert_eq!((crash.reason.as_str(), crash.status), ("crash", 3));
        assert_eq!(crash.detail.as_deref(), Some("triple fault on vcpu0"));
        let killed = exit_of("", std::process::ExitStatus::from_raw(libc::SIGKILL));
        assert_eq!((killed.reason.as_str(), killed.status), ("killed", 137));
        assert_eq!(killed.detail.as_deref(), Some("killed by SIGKILL"));
        assert_eq!(exit_of("", ok).reason, "unknown");
    }
}
